"""One-shot GPU check for a lent device: ``python -m bench.gpu_check`` (the report goes to $OUT).

For a person with an NVIDIA GPU for a few minutes (H100/H200 in mind; Python, CuPy and PyTorch
preinstalled, no internet), run from the repository root. ``--out DIR`` or else ``$OUT`` names
the report's directory (neither: an error). It writes ``gpu_check.json`` and ``gpu_check.md``
there at the start and again after EVERY section (atomic replacements), so a run cut short by
the machine's time limit, a hang or a kill still leaves every finished section on disk; the
sections are ordered by what a first run must not fail to bring back:

1. ``environment``: Python, NumPy, CuPy, CUDA driver/runtime, NVRTC, cuBLAS, device, PyTorch and
   cuDNN, the relevant environment variables, ``nvidia-smi``, fastconv's availability verdict
   (without a usable GPU the run stops here, exit status 2, saying why).
2. ``correctness``: every kernel on the device against the g++ emulation of the same ``.cu``
   sources (bit for bit for every non-GEMM kernel: convolution, im2col/col2im, pooling, batch
   norm, global average pooling, ReLU, augmentation warp and blur, dropout, the fused optimizer
   updates; within a float32 tolerance for the cuBLAS paths: dense, GEMM convolution), random
   geometries, dropout against its NumPy Philox twin, and a non-default stream.
3. ``layers``: per-layer forward and backward times, float32 and float16, at MNIST sizes (the
   deep MNIST net) and ImageNet sizes (ResNet layers), against PyTorch/cuDNN with TF32 off:
   CUDA events, interleaved rounds, medians; each result checked against cuDNN's within a
   float32 error bound.
4. ``training``: one deep-MNIST epoch (60,000 images, batch 100, Adam, data on the device)
   against PyTorch eager on the same GPU, with a time breakdown of a step on both sides
   (forward by layer type, loss, backward, optimizer, framework), host microseconds per launch
   and launches per step; test accuracy after the epoch.
5. ``chunked``: the 512 MiB im2col workspace bound, forced on a small layer by lowering the
   limit (chunked == whole) and reached naturally by VGG-16's conv1_2 at batch 16 (timed
   against cuDNN, peak memory); max/avg pooling of a float16 tensor of more than 2^31 elements.
6. ``fp16``: the training step in float16 against float32.
7. ``tests``: ``pytest -m gpu tests/``.
8. ``sanitizer``: ``compute-sanitizer`` memcheck, racecheck and initcheck over a tour of every
   kernel in both precisions with CuPy's memory pool disabled (``set_allocator(None)``: every
   buffer its own allocation, so an out-of-bounds access is not hidden inside a pooled block).

Goals asserted (a miss is listed in the report and makes the exit status 1): every conv layer
<= 1.5x cuDNN; the MNIST epoch <= 1.0x PyTorch eager; the float16 step faster than float32;
every result within tolerance of cuDNN and of the emulation; test accuracy >= 94% after one
epoch; pytest and the sanitizers clean. Exit status: 0 all met, 1 something failed or was
missed (the report's ``failures`` list says what), 2 no usable GPU, 130 interrupted.

Every section runs in a child process in a process group of its own (``start_new_session``),
capped in time: on time-out the whole group is killed (``os.killpg``), its output kept as text
in ``logs/<section>.log`` and whatever it had recorded so far put in the report. A child
whose parent disappears (the run killed with SIGKILL) kills its own group. The whole run stays
within ``--budget-s`` (default 470 s: under 8 minutes on an H100).

``--dry-run`` runs every section's code on the CPU against the stand-in CuPy
(:mod:`fastconv_testing.cupy_standin`: NumPy arrays, the g++-emulated kernels, a model of
cuBLAS) and PyTorch on the CPU, with tiny sizes and short caps: CI runs it to prove the script
end to end. Timing goals are not judged there (``met: null``); correctness goals are. ``--plan``
prints this and exits.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()

SECTIONS = (
    "environment",
    "correctness",
    "layers",
    "training",
    "chunked",
    "fp16",
    "tests",
    "sanitizer",
)
# Per-section time caps in seconds: (device, dry run). The device caps add up to the default
# budget; a section that overruns is killed and the next one gets what is left.
CAPS = {
    "environment": (45, 40),
    "correctness": (60, 60),
    "layers": (90, 40),
    "training": (80, 60),
    "chunked": (45, 30),
    "fp16": (25, 40),
    "tests": (60, 90),
    "sanitizer": (65, 60),
}
DEFAULT_BUDGET_S = 470.0
MIN_SECTION_S = 5.0  # less than this left: the section is skipped, not started
# Test hook: comma-separated "hang:SECTION" / "raise:SECTION" (see _hook).
HOOK_ENV = "FASTCONV_GPU_CHECK_HOOK"
SANITIZER_TOOLS = ("memcheck", "racecheck", "initcheck")

# Goals (section -> thresholds), stated once.
CONV_VS_CUDNN_MAX = 1.5
EPOCH_VS_TORCH_MAX = 1.0
# After one epoch the deep MNIST net's held-out accuracy was 96.8% on the CPU backend
# (docs/mnist_book_curves.png, epoch 1); a wrong gradient or mask leaves it far lower.
TEST_ACCURACY_MIN = 0.94


def _mnist_layers():
    """The deep MNIST net's convolutions, ``(name, (C, H, W), filters, kernel, stride, pad)``,
    and pools, ``(name, (C, H, W))``: read from ``deep_mnist_net()`` (:mod:`bench.common`), as
    every benchmark reads them (when a section runs: importing fastconv costs a second)."""
    from bench.common import deep_mnist_layers

    layers = deep_mnist_layers()
    convs = [(f"mnist {m.name}", (m.C, m.H, m.H), m.F, 3, 1, m.pad)
             for m in layers if m.kind == "conv"]  # fmt: skip
    pools = [(f"mnist {m.name}", (m.C, m.H, m.H)) for m in layers if m.kind == "pool"]
    return convs, pools


# ResNet-18/34 layers at ImageNet resolution (batch IMAGENET_BATCH).
IMAGENET_CONVS = [
    ("resnet stem 7x7/2", (3, 224, 224), 64, 7, 2, 3),
    ("resnet conv2_x", (64, 56, 56), 64, 3, 1, 1),
    ("resnet down 1x1/2", (64, 56, 56), 128, 1, 2, 0),
    ("resnet conv3_x", (128, 28, 28), 128, 3, 1, 1),
    ("resnet conv4_x", (256, 14, 14), 256, 3, 1, 1),
    ("resnet conv5_x", (512, 7, 7), 512, 3, 1, 1),
]
IMAGENET_BATCH = 32
DTYPES = ("float32", "float16")
U32 = 2.0**-24  # unit roundoff of float32
U16 = 2.0**-11  # unit roundoff of float16


class Skipped(Exception):
    pass


# --- files and processes -------------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader (or a run
    killed mid-write) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a log, decoded as text (undecodable bytes replaced): a
    killed child's output is shown as it was printed, not as a bytes repr."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


def run_group(argv, cap: float, log: Path, env: dict) -> tuple[int | None, bool, float]:
    """Run ``argv`` as the leader of a new process group (a session of its own) with its output
    in ``log``; after ``cap`` seconds kill the whole group. Returns (returncode, timed_out,
    seconds). The group is swept after a normal exit too, so nothing it started outlives it."""
    t0 = time.monotonic()
    with open(log, "ab") as out:
        p = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        timed_out = False
        try:
            p.wait(timeout=max(cap, 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
        except BaseException:  # interrupted: take the section down with us, then propagate
            _kill_group(p.pid)
            p.wait()
            raise
        finally:
            _kill_group(p.pid)
            p.wait()
    return (None if timed_out else p.returncode), timed_out, time.monotonic() - t0


def _start_watchdog() -> None:
    """In a section's child: if the parent dies (a SIGKILL of the run cannot be caught), kill
    this child's own process group, i.e. the section and everything it started."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(0.25)
            if os.getppid() != parent:
                os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, name="gpu_check-watchdog", daemon=True).start()


def _child_env(dry: bool) -> dict:
    from fastconv_testing import cupy_standin as _standin

    parts = [str(ROOT)] + ([_standin.PATH_DIR] if dry else [])
    old = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(parts + ([old] if old else [])),
                PYTHONUNBUFFERED="1")  # fmt: skip


# --- a section's context (in the child) ----------------------------------------------------------


class Ctx:
    """What a section function gets: the mode, sizes, its time cap, goals and partial results."""

    def __init__(self, args):
        self.name = args.child_section
        self.dry = args.dry_run
        self.work = Path(args.work)
        self.t0 = time.monotonic()
        self.cap = args.child_cap
        self.reps = 1 if self.dry else args.reps
        self.rounds = 1 if self.dry else args.rounds
        self.warmup = 1 if self.dry else 3
        self.torch_device = "cpu" if self.dry else "cuda"
        self.goals: list[dict] = []

    def left(self) -> float:
        return self.cap - (time.monotonic() - self.t0)

    def judge(self, ok) -> bool | None:
        """A timing goal's verdict: None in a dry run (stand-in timings mean nothing)."""
        return None if self.dry else bool(ok)

    def goal(self, goal: str, met, detail: str = "") -> None:
        self.goals.append({"goal": goal, "met": met, "detail": detail})

    def partial(self, data) -> None:
        """Record what is done so far: the report shows it if the section is killed."""
        payload = {"data": data, "goals": self.goals}
        _atomic_write(self.work / f"{self.name}.partial.json", json.dumps(payload, default=str))


def _sync():
    import cupy

    cupy.cuda.Device().synchronize()


def _hook(ctx: Ctx) -> None:
    """Test hooks (``$FASTCONV_GPU_CHECK_HOOK``): ``hang:SECTION`` starts a grandchild in the
    section's process group and sleeps (a hung section); ``raise:SECTION`` fails it."""
    for item in filter(None, os.environ.get(HOOK_ENV, "").split(",")):
        action, _, section = item.partition(":")
        if section != ctx.name:
            continue
        if action == "raise":
            raise RuntimeError("planted failure (test hook)")
        if action == "hang":
            # Non-ASCII on purpose: the report must show a killed child's output as text.
            print("hook: this section hangs \u2014 ü ✓", flush=True)
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
            ctx.partial({"hook_pids": [os.getpid(), child.pid]})
            time.sleep(3600)


# --- 1. environment ------------------------------------------------------------------------------


def _compute_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_PATH", ""), os.environ.get("CUDA_HOME", ""),
                 "/usr/local/cuda"):  # fmt: skip
        cand = Path(root) / "bin" / "compute-sanitizer"
        if root and cand.exists():
            return str(cand)
    return None


def environment(c: Ctx) -> dict:
    import numpy as np

    import fastconv
    from fastconv import gpu

    env = {
        "mode": "dry run: stand-in CuPy on the CPU" if c.dry else "device",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "fastconv_gpu_available": fastconv.gpu_available(),
        "unavailable_reason": gpu.unavailable_reason(),
        "env": {
            k: v
            for k, v in os.environ.items()
            if k.startswith(("CUPY_", "CUDA_", "NVIDIA_", "PYTORCH_", "TORCH_"))
        },  # fmt: skip
        "compute_sanitizer": _compute_sanitizer(),
        "gxx": shutil.which("g++"),
    }
    try:
        import torch

        env.update(
            torch=torch.__version__,
            torch_cuda=torch.version.cuda,
            torch_cuda_available=torch.cuda.is_available(),
            cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        )
    except ImportError as e:
        env["torch"] = f"not installed ({e})"
    if shutil.which("nvidia-smi"):
        q = "name,driver_version,memory.total,clocks.max.sm,power.limit"
        done = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)  # fmt: skip
        env["nvidia_smi"] = done.stdout.strip()
    if not env["fastconv_gpu_available"]:
        return env
    import cupy

    rt = cupy.cuda.runtime
    dev = cupy.cuda.Device()
    props = rt.getDeviceProperties(dev.id)
    name = props["name"]
    env.update(
        cupy=cupy.__version__,
        cuda_driver=rt.driverGetVersion(),
        cuda_runtime=rt.runtimeGetVersion(),
        device=name.decode() if isinstance(name, bytes) else str(name),
        compute_capability=dev.compute_capability,
        multiprocessors=dev.attributes["MultiProcessorCount"],
        memory_gib=round(props["totalGlobalMem"] / 2**30, 1),
        device_count=rt.getDeviceCount(),
    )
    try:
        env["nvrtc"] = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    except Exception as e:
        env["nvrtc"] = f"unknown ({type(e).__name__}: {e})"
    try:
        from cupy.cuda import cublas

        env["cublas"] = cublas.getVersion(cublas.create()) if hasattr(cublas, "getVersion") else "?"
    except Exception as e:
        env["cublas"] = f"unknown ({type(e).__name__})"
    return env


# --- 2. correctness -----------------------------------------------------------------------------


def _is_exact(name: str) -> bool:
    """Entries of the kernel tour computed without cuBLAS: bit-equal across implementations."""
    return not any(tag in name for tag in ("gemm", "dense_y", "dense_dx", "dense_dw",
                                           "conv_dx", "conv_dw", "chunked"))  # fmt: skip


def kernel_tour(k, dev, host, dtypes=DTYPES, seed=0) -> dict:
    """Every kernel of ``SIGNATURES`` in each dtype, through the backend's own
    :class:`~fastconv.gpu._kernel_ops.KernelOps` ``k`` on tiny inputs: ``{name: result}`` as
    NumPy arrays. ``dev``/``host`` move arrays to and from ``k``'s array library, so the same
    tour runs on a device, on the emulation (for comparison) and under compute-sanitizer.
    Names containing a cuBLAS path (see :func:`_is_exact`) agree only within rounding."""
    import numpy as np

    from fastconv import _checks as chk
    from fastconv.gpu import _random
    from fastconv.gpu._kernel_ops import elementwise_ops

    rng = np.random.default_rng(seed)
    out = {}
    saved = (k.direct_max_k, k.workspace_bytes)
    try:
        for name in dtypes:
            dt = np.dtype(name)

            def r(*shape, scale=1.0, dt=dt):
                return (scale * rng.standard_normal(shape)).astype(dt)

            x, w, b = r(2, 3, 9, 8), r(4, 3, 3, 3, scale=0.3), r(4)
            g = chk.validate_conv2d(x, w, b, (1, 2), (1, 0), "relu")
            dy = r(g.N, 4, g.OH, g.OW)
            X, W, B, DY = dev(x), dev(w), dev(b), dev(dy)
            k.direct_max_k = 10**6
            out[f"conv_direct {name}"] = host(k.conv2d(X, W, B, g, "relu"))
            k.direct_max_k = 0
            out[f"conv_gemm {name}"] = host(k.conv2d(X, W, B, g, "relu"))
            out[f"conv_gemm_plain {name}"] = host(k.conv2d(X, W, None, g, None))
            dx, dw, db = k.conv2d_backward(DY, X, W, g)
            out[f"conv_dx {name}"], out[f"conv_dw {name}"] = host(dx), host(dw)
            out[f"conv_db {name}"] = host(db)
            out[f"conv_dw_no_dx {name}"] = host(k.conv2d_backward(DY, X, W, g, False)[1])
            # One image's unfolded buffer per chunk: the 512 MiB path with a tiny limit.
            k.workspace_bytes = g.C * g.kh * g.kw * g.OH * g.OW * dt.itemsize
            out[f"conv_chunked_y {name}"] = host(k.conv2d(X, W, B, g, "relu"))
            cdx, cdw, _ = k.conv2d_backward(DY, X, W, g)
            out[f"conv_chunked_dx {name}"], out[f"conv_chunked_dw {name}"] = host(cdx), host(cdw)
            k.direct_max_k, k.workspace_bytes = saved
            for layout in (0, 1):
                cols = k.im2col(X, g, layout)
                out[f"im2col{layout} {name}"] = host(cols)
                out[f"col2im{layout} {name}"] = host(k.col2im(cols, g, layout))
            # direct grouped: depthwise x2 (3 groups of 1 channel), stride 2, asymmetric
            # padding, dilation (1, 2)
            wdw, bdw = r(6, 1, 3, 3, scale=0.3), r(6)
            pdw = chk.validate_conv(x, wdw, bdw, 2, (0, 1, 1, 0), "relu", 3, (1, 2))
            WDW = dev(wdw)
            out[f"grouped {name}"] = host(k.grouped_conv2d(X, WDW, dev(bdw), pdw, "relu"))
            res = k.grouped_conv2d_backward(dev(r(2, 6, pdw.OH, pdw.OW)), X, WDW, pdw)
            for part, v in zip(("dx", "dw", "db"), res, strict=True):
                out[f"grouped_{part} {name}"] = host(v)
            gp = chk.validate_pool(x, 3, 2, 1, max_pool=True)
            dyp = dev(r(gp.N, gp.C, gp.OH, gp.OW))
            out[f"max_pool {name}"] = host(k.max_pool2d(X, gp))
            out[f"max_pool_dx {name}"] = host(k.max_pool2d_backward(dyp, X, gp))
            out[f"avg_pool {name}"] = host(k.avg_pool2d(X, gp))
            out[f"avg_pool_dx {name}"] = host(k.avg_pool2d_backward(dyp, gp))
            gamma, beta = r(3), r(3)
            gb, eps = chk.validate_batch_norm(x, gamma, beta, 1e-5, "relu")
            G, BE = dev(gamma), dev(beta)
            for relu in (False, True):
                y, mean, var = k.batch_norm_forward(X, G, BE, gb, eps, relu)
                out[f"bn_y relu={relu} {name}"] = host(y)
                out[f"bn_mean {name}"], out[f"bn_var {name}"] = host(mean), host(var)
                dyb = dev(r(*x.shape))
                res = k.batch_norm_backward(dyb, X, G, mean, var, gb, eps, y if relu else None)
                for part, v in zip(("dx", "dgamma", "dbeta"), res, strict=True):
                    out[f"bn_{part} relu={relu} {name}"] = host(v)
                out[f"bn_inf relu={relu} {name}"] = host(
                    k.batch_norm_inference(X, G, BE if relu else None, mean, var, gb, eps, relu)
                )
                out[f"bn_inf_dx relu={relu} {name}"] = host(k.batch_norm_inference_backward(
                    dyb, G, var, gb, eps, y if relu else None))  # fmt: skip
            gg = chk.validate_global_avg_pool(x)
            out[f"gap {name}"] = host(k.global_avg_pool2d(X, gg))
            out[f"gap_dx {name}"] = host(k.global_avg_pool2d_backward(dev(r(2, 3)), gg))
            xd, wd, bd = r(5, 7), r(7, 6, scale=0.4), r(6)
            gd = chk.validate_dense(xd, wd, bd, "relu")
            out[f"dense_y {name}"] = host(k.dense(dev(xd), dev(wd), dev(bd), gd, True))
            ddx, ddw, ddb = k.dense_backward(dev(r(5, 6)), dev(xd), dev(wd), gd)
            out[f"dense_dx {name}"], out[f"dense_dw {name}"] = host(ddx), host(ddw)
            out[f"dense_db {name}"] = host(ddb)
            # Every elementwise op (relu, leaky_relu... and their gradients), with no line of
            # its own: arrays of one shape for x/y/dy, 0.2 for each scalar, no out.
            for op in elementwise_ops(k):
                params = inspect.signature(getattr(k, op)).parameters
                args = [dev(r(3, 5, 7)) if p in ("x", "y", "dy") else np.float32(0.2)
                        for p in params if p != "out"]  # fmt: skip
                out[f"{op} {name}"] = host(getattr(k, op)(*args))
            theta = np.array([[0.9, -0.2, 1.3, 0.25, 1.1, -0.7]] * 2, np.float32)
            flow = (0.5 * rng.standard_normal((2, 2, 7, 6))).astype(np.float32)
            out[f"warp {name}"] = host(k.warp_bilinear(X, dev(theta), None, (7, 6)))
            out[f"warp_flow {name}"] = host(k.warp_bilinear(X, dev(theta), dev(flow), (7, 6)))
            taps = np.array([0.25, 0.5, 0.25], np.float32)
            out[f"blur {name}"] = host(k.gaussian_blur(dev(r(2, 6, 5)), dev(taps)))
            xdrop = r(4, 33)
            out[f"dropout {name}"] = host(k.dropout(dev(xdrop), (123456, 789), 0.4))
            out[f"dropout_twin {name}"] = _random.dropout_reference(xdrop, (123456, 789), 0.4)
            p, gr = r(50), r(50)
            m, v = rng.standard_normal(50).astype(np.float32), np.abs(r(50)).astype(np.float32)
            P, M, V = dev(p.copy()), dev(m.copy()), dev(v.copy())
            # The kernels themselves: p and g in this dtype (the optimizers pass float32 masters).
            k.fused_adam(P, dev(gr), M, V, np.float32(0.1), np.float32(0.001),
                         np.float32(1e-3), np.float32(1e-7))  # fmt: skip
            out[f"adam_p {name}"], out[f"adam_m {name}"] = host(P), host(M)
            out[f"adam_v {name}"] = host(V)
            P, V = dev(p.copy()), dev(m.copy())
            k.fused_momentum(P, dev(gr), V, np.float32(0.9), np.float32(0.01))
            out[f"momentum_p {name}"], out[f"momentum_v {name}"] = host(P), host(V)
    finally:
        k.direct_max_k, k.workspace_bytes = saved
    return out


def _rel_err(got, want) -> float:
    import numpy as np

    got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got64.shape != want64.shape:
        return float("inf")
    if not got64.size:
        return 0.0
    both_nan = np.isnan(got64) & np.isnan(want64)
    diff = np.where(both_nan, 0.0, np.abs(got64 - want64))
    scale = max(float(np.nanmax(np.abs(want64))), 1.0)
    return float(np.nanmax(diff) / scale) if not np.isnan(diff).any() else float("inf")


def _gemm_tol(name: str) -> float:
    """The GEMM paths of the tour sum at most a few hundred products: float32 within 1e-5 of
    the output scale (the emulation's float32 GEMM vs cuBLAS's, other summation orders); float16
    within 8 half-ulps (one rounding each side, plus the float32 differences)."""
    return 1e-5 if name.endswith("float32") else 8 * U16


def compare_tours(got: dict, want: dict) -> tuple[dict, list]:
    worst, failures = {}, []
    for name, w in want.items():
        if name.startswith("dropout_twin"):
            continue
        err = _rel_err(got[name], w)
        worst[name] = err
        exact = _is_exact(name)
        tol = 0.0 if exact else _gemm_tol(name)
        if exact:
            same = got[name].shape == w.shape and got[name].tobytes() == w.tobytes()
            if not same:
                failures.append({"op": name, "rel_err": err, "tol": "bitwise"})
        elif not err <= tol:
            failures.append({"op": name, "rel_err": err, "tol": tol})
    return worst, failures


def correctness(c: Ctx) -> dict:
    import cupy
    import numpy as np

    from fastconv import gpu
    from fastconv_testing import emulation as emu

    if shutil.which("g++") is None:
        raise Skipped("g++ not found: the emulation to compare against cannot be built")
    lib = emu.build_library()
    emulated = emu.emulated_ops(emu.EmulatedLauncher(lib, max_blocks=None))
    device = gpu._ops()
    result: dict = {}

    def dev(a):
        return cupy.asarray(a)

    def host(a):
        return a.get()

    # (a) the tour: every kernel, device against emulation.
    got = kernel_tour(device, dev, host)
    want = kernel_tour(emulated, lambda a: a, np.asarray)
    worst, failures = compare_tours(got, want)
    result["tour_entries"] = len(want)
    result["tour_worst_relative_error"] = {k: v for k, v in worst.items() if v}
    result["tour_failures"] = failures
    c.goal("every non-GEMM kernel bit-equal to the g++ emulation (tour)",
           not [f for f in failures if f["tol"] == "bitwise"],
           f"{sum(f['tol'] == 'bitwise' for f in failures)} mismatches")  # fmt: skip
    c.goal("GEMM paths within tolerance of the emulation's float32 GEMM (tour)",
           not [f for f in failures if f["tol"] != "bitwise"],
           f"{sum(f['tol'] != 'bitwise' for f in failures)} beyond tolerance")  # fmt: skip
    twin_ok = all(got[f"dropout {d}"].tobytes() == got[f"dropout_twin {d}"].tobytes()
                  for d in DTYPES)  # fmt: skip
    c.goal("dropout on the device equals its NumPy Philox4x32-10 twin", twin_ok)
    c.partial(result)

    # (b) the same tour on a non-default stream: kernels and cuBLAS follow CuPy's stream.
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        on_stream = kernel_tour(device, dev, host)
    stream.synchronize()
    _, stream_failures = compare_tours(on_stream, got)
    result["stream_failures"] = stream_failures
    c.goal("a non-default stream gives the default stream's results", not stream_failures,
           f"{len(stream_failures)} differ")  # fmt: skip
    c.partial(result)

    # (c) random geometries of the convolution and pooling kernels.
    try:
        result["random"] = _compare_random_cases(c, 6 if c.dry else 40, device, emulated,
                                                 np.random.default_rng(2026))  # fmt: skip
    finally:
        device.direct_max_k = emulated.direct_max_k = gpu._kernel_ops.DIRECT_MAX_K
    c.goal("random geometries: device == emulation (exact ops), GEMM paths within tolerance",
           not result["random"]["failures"], f"{len(result['random']['failures'])} mismatches "
           f"in {result['random']['cases']} cases")  # fmt: skip
    return result


def _compare_random_cases(c: Ctx, n_cases, device, emulated, rng) -> dict:
    import cupy
    import numpy as np

    from fastconv import _checks as chk
    from fastconv import gpu

    worst = {}
    failures = []
    cases = 0
    for i in range(n_cases):
        if c.left() < 0.25 * c.cap:
            break
        dtype = (np.float32, np.float16)[i % 2]
        n, ch = int(rng.integers(1, 4)), int(rng.integers(1, 6))
        h, w = int(rng.integers(1, 20)), int(rng.integers(1, 20))
        k = (int(rng.integers(1, 5)), int(rng.integers(1, 5)))
        s = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        p = (int(rng.integers(0, 3)), int(rng.integers(0, 3)))
        f = int(rng.integers(1, 9))
        x = rng.standard_normal((n, ch, h, w)).astype(dtype)
        wt = (rng.standard_normal((f, ch, *k)) / np.sqrt(ch * k[0] * k[1])).astype(dtype)
        b = rng.standard_normal(f).astype(dtype)
        try:
            g = chk.validate_conv2d(x, wt, b, s, p, "relu")
        except ValueError:
            continue
        cases += 1
        xg, wg, bg = cupy.asarray(x), cupy.asarray(wt), cupy.asarray(b)
        dy = rng.standard_normal((n, f, g.OH, g.OW)).astype(dtype)
        dyg = cupy.asarray(dy)
        checks = {
            "im2col": (device.im2col(xg, g).get(), emulated.im2col(x, g), True),
            "col2im": (
                device.col2im(cupy.asarray(emulated.im2col(x, g)), g).get(),
                emulated.col2im(emulated.im2col(x, g), g),
                True,
            ),  # fmt: skip
        }
        for path, kmax in (("direct", 10**6), ("gemm", 0)):
            device.direct_max_k = emulated.direct_max_k = kmax
            checks[f"conv2d_{path}"] = (
                device.conv2d(xg, wg, bg, g, "relu").get(),
                emulated.conv2d(x, wt, b, g, "relu"),
                path == "direct",
            )
        device.direct_max_k = emulated.direct_max_k = gpu._kernel_ops.DIRECT_MAX_K
        got_b = device.conv2d_backward(dyg, xg, wg, g)
        want_b = emulated.conv2d_backward(dy, x, wt, g)
        for name, got, want in zip(("dx", "dw", "db"), got_b, want_b, strict=True):
            checks[f"conv2d_backward_{name}"] = (got.get(), want, name == "db")
        if 2 * p[0] <= k[0] and 2 * p[1] <= k[1]:
            gp = chk.validate_pool(x, k, s, p, max_pool=True)
            dyp = rng.standard_normal((n, ch, gp.OH, gp.OW)).astype(dtype)
            checks["max_pool2d"] = (device.max_pool2d(xg, gp).get(), emulated.max_pool2d(x, gp),
                                    True)  # fmt: skip
            checks["max_pool2d_backward"] = (
                device.max_pool2d_backward(cupy.asarray(dyp), xg, gp).get(),
                emulated.max_pool2d_backward(dyp, x, gp), True)  # fmt: skip
            checks["avg_pool2d"] = (device.avg_pool2d(xg, gp).get(), emulated.avg_pool2d(x, gp),
                                    True)  # fmt: skip
            checks["avg_pool2d_backward"] = (
                device.avg_pool2d_backward(cupy.asarray(dyp), gp).get(),
                emulated.avg_pool2d_backward(dyp, gp), True)  # fmt: skip
        for name, (got, want, exact) in checks.items():
            key = f"{name} {np.dtype(dtype).name}"
            err = _rel_err(got, want)
            worst[key] = max(worst.get(key, 0.0), err)
            ok = got.tobytes() == want.tobytes() if exact else err <= _gemm_tol(key)
            if got.shape != want.shape or not ok:
                failures.append({"case": i, "op": key, "geometry": list(g), "rel_err": err})
    return {
        "cases": cases,
        "worst_relative_error": dict(sorted(worst.items())),
        "failures": failures[:20],
        "exact_ops": "im2col, col2im, conv2d_direct, db, max/avg pooling fwd+bwd",
    }


# --- 3. layers against cuDNN ---------------------------------------------------------------------


def _timer(c: Ctx, lib: str):
    if c.dry:

        def run(fn, reps):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - t0) * 1e3 / reps

        return run
    if lib == "cupy":
        import cupy

        def run(fn, reps):
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            for _ in range(reps):
                fn()
            stop.record()
            stop.synchronize()
            return cupy.cuda.get_elapsed_time(start, stop) / reps

        return run
    import torch

    def run(fn, reps):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / reps

    return run


def time_pair(c: Ctx, ours, theirs) -> tuple[float, float]:
    """Milliseconds per call: interleaved rounds (drift hits both alike), medians, after
    warm-up calls (NVRTC/module load, cuDNN autotuning, allocator pools)."""
    import torch

    for _ in range(c.warmup):
        ours()
        theirs()
    _sync()
    if not c.dry:
        torch.cuda.synchronize()
    t_ours, t_theirs = _timer(c, "cupy"), _timer(c, "torch")
    a, b = [], []
    for _ in range(c.rounds):
        a.append(t_ours(ours, c.reps))
        b.append(t_theirs(theirs, c.reps))
    return statistics.median(a), statistics.median(b)


def _torch_setup(c: Ctx):
    import torch

    torch.backends.cudnn.benchmark = True
    # Same precision as fastconv's float32 cuBLAS GEMMs: no TF32 on either side.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if c.dry:
        torch.set_num_threads(1)
    return torch


def _within_bound(ours, theirs, bound_terms, k: int, dtype: str) -> tuple[bool, float]:
    """Agreement of two float32-accumulated results, elementwise, with the error bound of a
    sum of ``k`` products (Higham, Thm 3.5): each result is within ``k u (|A||B|)_ij`` of the
    exact value (``u = 2^-24``), so they differ by at most ``2 k u`` of it; x2 for tensor-core
    accumulation that truncates, x4 for cuDNN's transform algorithms (Winograd, FFT), which
    cudnn.benchmark may pick and whose rounding error is larger than a GEMM's. float16 results
    are rounded once each: ``+ u16 (|a| + |b|)``. A wiring error shows up as a difference of the
    order of the values, far above this worst-case bound. Returns (ok, largest error/bound)."""
    import numpy as np

    a, b = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    bound = 16 * k * U32 * np.asarray(bound_terms, np.float64)
    if dtype == "float16":
        bound = bound + U16 * (np.abs(a) + np.abs(b))
    err = np.abs(a - b)
    if a.shape != b.shape or np.isnan(err).any():
        return False, float("inf")
    ratio = float(np.max(err / np.maximum(bound, 1e-30))) if err.size else 0.0
    return bool((err <= bound).all()), ratio


def _row(name, kind, dtype, direction, ms_ours, ms_torch, agree, err_ratio) -> dict:
    return {
        "layer": name,
        "kind": kind,
        "dtype": dtype,
        "pass": direction,
        "fastconv_ms": round(ms_ours, 4),
        "torch_ms": round(ms_torch, 4),
        "fastconv_over_torch": round(ms_ours / ms_torch, 3) if ms_torch else None,
        "agrees_with_torch": agree,
        "err_over_bound": err_ratio,
    }


def _conv_rows(c: Ctx, layer, batch, dtype, rng) -> list[dict]:
    """Forward and backward of one conv layer (+ReLU fused), timed and checked against cuDNN."""
    import cupy
    import torch.nn.functional as tf

    import fastconv

    torch = _torch_setup(c)
    name, (ch, h, w), f, kk, s, pad = layer
    x = cupy.asarray(rng.standard_normal((batch, ch, h, w)).astype(dtype))
    wt = cupy.asarray((rng.standard_normal((f, ch, kk, kk)) / (kk * kk * ch) ** 0.5).astype(dtype))
    b = cupy.asarray((0.1 * rng.standard_normal(f)).astype(dtype))
    y = fastconv.conv2d(x, wt, b, stride=s, pad=pad, activation="relu")
    dy = cupy.asarray(rng.standard_normal(y.shape).astype(dtype))

    def t(a):
        return torch.as_tensor(a.get(), device=c.torch_device)

    xt, wtt, bt, dyt = t(x), t(wt), t(b), t(dy)

    def ours_fwd():
        return fastconv.conv2d(x, wt, b, stride=s, pad=pad, activation="relu")

    def torch_fwd():
        return torch.relu(tf.conv2d(xt, wtt, bt, stride=s, padding=pad))

    def ours_bwd():
        return fastconv.conv2d_backward(dy, x, wt, stride=s, pad=pad)

    def torch_bwd():
        return torch.ops.aten.convolution_backward(
            dyt, xt, wtt, [f], [s, s], [pad, pad], [1, 1], False, [0, 0], 1, [True, True, True]
        )

    # Error-bound terms: the same sums over absolute values (float32, on the torch device).
    ax, aw, ady = xt.abs().float(), wtt.abs().float(), dyt.abs().float()
    fwd_terms = tf.conv2d(ax, aw, bt.abs().float(), stride=s, padding=pad)
    bdx, bdw, _ = torch.ops.aten.convolution_backward(
        ady, ax, aw, [f], [s, s], [pad, pad], [1, 1], False, [0, 0], 1, [True, True, False]
    )
    bdb = ady.sum((0, 2, 3))

    def np_(tensor):
        return tensor.detach().float().cpu().numpy()

    k_fwd = ch * kk * kk + 1  # + the bias
    k_dx = f * kk * kk
    k_dw = batch * y.shape[2] * y.shape[3]
    ok_f, r_f = _within_bound(ours_fwd().get(), np_(torch_fwd()), np_(fwd_terms), k_fwd, dtype)
    theirs = torch_bwd()
    checks = [
        _within_bound(o.get(), np_(r), np_(bnd), kk_, dtype)
        for o, r, bnd, kk_ in zip(
            ours_bwd(), theirs, (bdx, bdw, bdb), (k_dx, k_dw, k_dw), strict=True
        )  # fmt: skip
    ]
    ok_b, r_b = all(ok for ok, _ in checks), max(r for _, r in checks)
    rows = []
    for direction, o, r, ok, ratio in (("forward", ours_fwd, torch_fwd, ok_f, r_f),
                                       ("backward", ours_bwd, torch_bwd, ok_b, r_b)):  # fmt: skip
        ms_o, ms_t = time_pair(c, o, r)
        rows.append(_row(name, "conv", dtype, direction, ms_o, ms_t, ok, round(ratio, 4)))
    return rows


def _pool_rows(c: Ctx, name, shape, batch, dtype, size, stride, pad, rng) -> list[dict]:
    """Max pooling forward and backward against PyTorch: the forward exactly; the backward
    exactly except in windows holding a tie (float16 random values tie now and then, and which
    of the equal maxima gets the gradient is each implementation's choice)."""
    import cupy
    import numpy as np
    import torch.nn.functional as tf

    import fastconv

    torch = _torch_setup(c)
    ch, h, w = shape
    x = cupy.asarray(rng.standard_normal((batch, ch, h, w)).astype(dtype))
    y = fastconv.max_pool2d(x, size, stride, pad)
    dy = cupy.asarray(rng.standard_normal(y.shape).astype(dtype))
    xt = torch.as_tensor(x.get(), device=c.torch_device)
    dyt = torch.as_tensor(dy.get(), device=c.torch_device)
    _, idx = tf.max_pool2d(xt, size, stride, pad, return_indices=True)

    def ours_fwd():
        return fastconv.max_pool2d(x, size, stride, pad)

    def torch_fwd():
        return tf.max_pool2d(xt, size, stride, pad)

    def ours_bwd():
        return fastconv.max_pool2d_backward(dy, x, size, stride, pad)

    def torch_bwd():
        # PyTorch reuses the forward's saved indices; fastconv recomputes the argmax.
        return torch.ops.aten.max_pool2d_with_indices_backward(
            dyt, xt, [size, size], [stride, stride], [pad, pad], [1, 1], False, idx
        )

    fwd_ok = bool((ours_fwd().get() == torch_fwd().cpu().numpy()).all())
    mism = ours_bwd().get() != torch_bwd().cpu().numpy()
    if size == stride and pad == 0 and h % size == 0 and w % size == 0:
        xs = x.get().reshape(batch, ch, h // size, size, w // size, size)
        tie = (xs == xs.max(axis=(3, 5), keepdims=True)).sum(axis=(3, 5), keepdims=True) > 1
        tie = np.broadcast_to(tie, xs.shape).reshape(x.shape)
        bwd_ok = not (mism & ~tie).any()
    else:
        bwd_ok = not mism.any()
    rows = []
    for direction, o, r, ok in (("forward", ours_fwd, torch_fwd, fwd_ok),
                                ("backward", ours_bwd, torch_bwd, bwd_ok)):  # fmt: skip
        ms_o, ms_t = time_pair(c, o, r)
        rows.append(_row(name, "pool", dtype, direction, ms_o, ms_t, ok, 0.0))
    return rows


def _scaled(c: Ctx, layer):
    """A dry run keeps each layer's structure (kernel, stride, pad) at a size the CPU
    emulation runs in a moment: channels / 8, planes at most 12 pixels."""
    if not c.dry:
        return layer
    name, (ch, h, w), f, kk, s, pad = layer
    ch = ch if ch <= 3 else max(1, ch // 8)
    return name, (ch, min(h, 12), min(w, 12)), max(2, f // 8), kk, s, pad


def layers(c: Ctx) -> dict:
    import numpy as np

    torch, why_not = _torch_or_reason(c)
    if torch is None:
        raise Skipped(f"{why_not}: nothing to compare against")
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    mnist_batch = 2 if c.dry else 100
    imagenet_batch = 1 if c.dry else IMAGENET_BATCH
    # PyTorch's CPU convolutions do not take half: a dry run checks the float32 flow only.
    dtypes = ("float32",) if c.dry else DTYPES
    mnist_convs, mnist_pools = _mnist_layers()
    plan = [("conv", layer, mnist_batch) for layer in mnist_convs]
    plan += [("pool", layer, mnist_batch) for layer in mnist_pools]
    plan += [("conv", layer, imagenet_batch) for layer in IMAGENET_CONVS]
    plan += [("imagenet pool", ("resnet maxpool 3x3/2", (64, 112, 112)), imagenet_batch)]
    for dtype in dtypes:
        for kind, layer, batch in plan:
            if c.left() < 0.1 * c.cap:
                raise Skipped(f"time cap reached after {len(rows)} rows")
            if kind == "conv":
                rows += _conv_rows(c, _scaled(c, layer), batch, dtype, rng)
            elif kind == "pool":
                name, (ch, h, w) = layer
                rows += _pool_rows(c, name, (ch, h, w), batch, dtype, 2, 2, 0, rng)
            elif dtype == "float32":  # overlapping windows: ties only checkable in float32
                name, (ch, h, w) = layer
                if c.dry:
                    ch, h, w = 8, 12, 12
                rows += _pool_rows(c, name, (ch, h, w), batch, dtype, 3, 2, 1, rng)
            c.partial({"rows": rows})
    conv = [r for r in rows if r["kind"] == "conv"]
    slow = [
        f"{r['layer']} {r['dtype']} {r['pass']} {r['fastconv_over_torch']}x"
        for r in conv
        if (r["fastconv_over_torch"] or 0) > CONV_VS_CUDNN_MAX
    ]
    worst = max((r["fastconv_over_torch"] or 0 for r in conv), default=None)
    c.goal(f"every conv layer <= {CONV_VS_CUDNN_MAX}x cuDNN (fwd and bwd, fp32 and fp16)",
           c.judge(not slow), f"worst {worst}x; over: {', '.join(slow) or 'none'}")  # fmt: skip
    disagree = [
        f"{r['layer']} {r['dtype']} {r['pass']}" for r in rows if not r["agrees_with_torch"]
    ]
    c.goal("every layer's results within the float32 error bound of PyTorch/cuDNN's",
           not disagree, ", ".join(disagree) or "all agree")  # fmt: skip
    return {"mnist_batch": mnist_batch, "imagenet_batch": imagenet_batch, "rows": rows,
            "worst_conv_ratio": worst, "tf32": "off on both sides"}  # fmt: skip


# --- 4. training ---------------------------------------------------------------------------------


def _mnist(c: Ctx):
    import numpy as np

    from fastconv.datasets import load_mnist

    (x_train, y_train), (x_test, y_test) = load_mnist()
    if c.dry:  # the kernels are emulated one thread at a time: a token epoch
        x_train, y_train, x_test, y_test = x_train[:8], y_train[:8], x_test[:8], y_test[:8]
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


def _deep_mnist(dtype="float32"):
    from fastconv.models import deep_mnist_net
    from fastconv.nn import Adam

    net = deep_mnist_net(seed=0)
    net.compile(Adam(lr=1e-3), "softmax_cross_entropy", metrics=["accuracy"])
    return net.to("gpu", dtype)


def _torch_phases(c: Ctx, model, opt, xb, yb, steps: int) -> dict:
    """Mean milliseconds per phase of a PyTorch training step (CUDA events on a device)."""
    torch = _torch_setup(c)
    loss_fn = torch.nn.CrossEntropyLoss()

    def mark():
        if c.dry:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def ms(a, b):
        return (b - a) * 1e3 if c.dry else a.elapsed_time(b)

    sums = {"forward": 0.0, "loss": 0.0, "backward": 0.0, "update": 0.0}
    for _ in range(steps):
        m0 = mark()
        opt.zero_grad(set_to_none=True)
        out = model(xb)
        m1 = mark()
        loss = loss_fn(out, yb)
        m2 = mark()
        loss.backward()
        m3 = mark()
        opt.step()
        m4 = mark()
        if not c.dry:
            m4.synchronize()
        for key, (a, b) in zip(sums, ((m0, m1), (m1, m2), (m2, m3), (m3, m4)), strict=True):
            sums[key] += ms(a, b) / steps
    return {k: round(v, 4) for k, v in sums.items()}


def _launch_counts(net, xb, yb) -> dict:
    """Kernel launches and cuBLAS GEMMs of one fastconv training step (the backend's own;
    CuPy elementwise operations of fastconv.nn are not counted)."""
    from fastconv import gpu

    k = gpu._ops()
    counts = {"kernels": 0, "gemms": 0}
    launch, gemm = k.launch, k.gemm

    def counted_launch(*a, **kw):
        counts["kernels"] += 1
        return launch(*a, **kw)

    def counted_gemm(*a, **kw):
        counts["gemms"] += 1
        return gemm(*a, **kw)

    k.launch, k.gemm = counted_launch, counted_gemm
    try:
        net.train_on_batch(xb, yb)
    finally:
        k.launch, k.gemm = launch, gemm
    return counts


def _host_us_per_launch(c: Ctx) -> dict:
    import cupy
    import numpy as np

    import fastconv
    from fastconv.gpu import _module

    n = 50 if c.dry else 3000
    x = cupy.zeros((1, 1, 2, 2), dtype=np.float32)
    y = cupy.empty((1, 1, 1, 1), dtype=np.float32)
    geom = (1, 1, 2, 2, 2, 2, 2, 2, 0, 0, 1, 1)

    def per_call(fn):
        fn()
        _sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t0) / n * 1e6
        _sync()
        return round(host, 2)

    return {
        "fastconv.max_pool2d (validate + dispatch + launch)": per_call(
            lambda: fastconv.max_pool2d(x, 2)
        ),
        "_module.launch (checked raw launch)": per_call(
            lambda: _module.launch("max_pool2d", 1, x, y, *geom)
        ),
        "cupy elementwise x + 1": per_call(lambda: x + 1),
    }


def _torch_or_reason(c: Ctx):
    """(torch, None) ready for the comparison, or (None, why not)."""
    try:
        torch = _torch_setup(c)
    except ImportError as e:
        return None, f"PyTorch is not installed ({e})"
    if not c.dry and not torch.cuda.is_available():
        return None, f"PyTorch {torch.__version__} has no usable CUDA device"
    return torch, None


def training(c: Ctx) -> dict:
    import cupy

    from fastconv.profiler import profile_model

    x_train, y_train, x_test, y_test = _mnist(c)
    n, batch = len(x_train), (4 if c.dry else 100)
    xg, yg = cupy.asarray(x_train), cupy.asarray(y_train)
    net = _deep_mnist()
    net.fit(xg[:batch], yg[:batch], epochs=1, batch_size=batch, verbose=0)  # warm-up
    _sync()
    t0 = time.perf_counter()
    hist = net.fit(xg, yg, epochs=1, batch_size=batch, verbose=0, seed=1)
    _sync()
    ours_s = time.perf_counter() - t0
    test = net.evaluate(cupy.asarray(x_test), cupy.asarray(y_test), batch_size=500)
    acc = float(test["accuracy"])
    result = {"samples": n, "batch": batch, "fastconv_epoch_s": round(ours_s, 3),
              "fastconv_train_loss": float(hist.history["loss"][-1]),
              "fastconv_test_accuracy": acc}  # fmt: skip
    c.goal(f"test accuracy >= {TEST_ACCURACY_MIN:.0%} after one epoch",
           None if c.dry else acc >= TEST_ACCURACY_MIN, f"{acc:.4f}")  # fmt: skip
    c.partial(result)

    # Where a step's time goes (one batch, device data): the profiler's CUDA events.
    steps = 1 if c.dry else 10
    xb, yb = xg[:batch], yg[:batch]
    prof = profile_model(net, xb, yb, steps=steps, warmup=0 if c.dry else 2)
    bt = prof.by_type_ms
    layer_types = [k for k in bt if k not in ("loss", "update", "framework")]
    result["fastconv_step_ms"] = {
        # PyTorch's phases below; its loss backward is inside its "backward".
        "by_phase": {
            "forward": round(sum(bt[k]["forward"] for k in layer_types), 4),
            "loss": round(bt["loss"]["forward"] + bt["loss"]["backward"], 4),
            "backward": round(sum(bt[k]["backward"] for k in layer_types), 4),
            "update": round(bt["update"]["backward"], 4),
            "framework": round(bt["framework"]["forward"], 4),
        },
        "by_type": {k: round(v["forward"] + v["backward"], 4) for k, v in bt.items()},
        "forward_by_type": {k: round(v["forward"], 4) for k, v in bt.items()},
        "step_ms": round(prof.step_ms, 4),
        "untimed_step_ms": round(prof.overhead["untimed_step_ms"], 4),
        "notes": prof.notes,
    }
    result["launches_per_step"] = _launch_counts(net, xb, yb)
    result["host_us_per_launch"] = _host_us_per_launch(c)
    c.partial(result)

    torch, why_not = _torch_or_reason(c)
    if torch is None:
        c.goal(f"one MNIST epoch <= {EPOCH_VS_TORCH_MAX}x PyTorch eager", None, why_not)
        return result
    from fastconv.torch_bridge import to_torch

    twin = to_torch(net).to(c.torch_device)
    opt = torch.optim.Adam(twin.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt = torch.as_tensor(x_train, device=c.torch_device)
    yt = torch.as_tensor(y_train, device=c.torch_device)

    def torch_epoch(limit=None):
        twin.train()
        perm = torch.randperm(n, device=c.torch_device)
        losses = []
        for start in range(0, n if limit is None else limit, batch):
            sel = perm[start : start + batch]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(twin(xt[sel]), yt[sel])
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return float(torch.stack(losses).mean())

    torch_epoch(limit=batch)  # warm-up (cuDNN autotuning)
    if not c.dry:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch_loss = torch_epoch()
    if not c.dry:
        torch.cuda.synchronize()
    torch_s = time.perf_counter() - t0
    twin.eval()
    with torch.no_grad():
        pred = twin(torch.as_tensor(x_test, device=c.torch_device)).argmax(1).cpu().numpy()
    ratio = ours_s / torch_s if torch_s else None
    result.update(torch_epoch_s=round(torch_s, 3), torch_train_loss=torch_loss,
                  torch_test_accuracy=float((pred == y_test).mean()),
                  fastconv_over_torch=round(ratio, 3) if ratio else None)  # fmt: skip
    result["torch_step_ms"] = _torch_phases(c, twin, opt, xt[:batch], yt[:batch], steps)
    c.goal(f"one MNIST epoch <= {EPOCH_VS_TORCH_MAX}x PyTorch eager",
           c.judge(ratio is not None and ratio <= EPOCH_VS_TORCH_MAX),
           f"{ours_s:.2f} s vs {torch_s:.2f} s ({ratio and round(ratio, 3)}x)")  # fmt: skip
    return result


# --- 5. the 512 MiB chunk path and 2^31 elements -------------------------------------------------


def chunked(c: Ctx) -> dict:
    import cupy
    import numpy as np

    import fastconv
    from fastconv import _checks as chk
    from fastconv import gpu

    k = gpu._ops()
    rng = np.random.default_rng(5)
    result: dict = {"workspace_bytes": k.workspace_bytes}

    # (a) forced: the same layer whole and in chunks of 2 images (limit lowered).
    x = cupy.asarray(rng.standard_normal((8, 32, 14, 14)).astype(np.float32))
    w = cupy.asarray((rng.standard_normal((32, 32, 3, 3)) / 17).astype(np.float32))
    dy = cupy.asarray(rng.standard_normal((8, 32, 14, 14)).astype(np.float32))
    g = chk.validate_conv2d(x, w, None, 1, 1)
    whole = [fastconv.conv2d(x, w, pad=1).get(), *(a.get() for a in
             fastconv.conv2d_backward(dy, x, w, pad=1))]  # fmt: skip
    saved = k.workspace_bytes
    k.workspace_bytes = 2 * 32 * 9 * 14 * 14 * 4
    try:
        n_chunks = len(k._chunks(g, 4))
        parts = [fastconv.conv2d(x, w, pad=1).get(), *(a.get() for a in
                 fastconv.conv2d_backward(dy, x, w, pad=1))]  # fmt: skip
    finally:
        k.workspace_bytes = saved
    errs = {name: _rel_err(p, q) for name, p, q in zip(("y", "dx", "dw", "db"), parts, whole,
                                                        strict=True)}  # fmt: skip
    result["forced"] = {"chunks": n_chunks, "rel_err_vs_whole": errs}
    # Per chunk the GEMMs are other shapes (cuBLAS may pick other kernels) and dW is summed
    # over chunks in float32: agreement within the GEMM tolerance, db (no GEMM) exactly.
    ok = n_chunks == 4 and errs["db"] == 0 and max(errs.values()) <= 1e-5
    c.goal("chunked convolution (limit lowered to 2 images) == whole batch", ok,
           f"{n_chunks} chunks, errors {errs}")  # fmt: skip
    c.partial(result)

    # (b) natural: VGG-16 conv1_2 at batch 16 unfolds 16 x 115.6 MB > 512 MiB.
    torch, why_not = (None, "dry run") if c.dry else _torch_or_reason(c)
    if c.dry:
        result["natural"] = "dry run: skipped (1.8 GB of activations; case (a) has the flow)"
    elif torch is None:
        result["natural"] = f"skipped: {why_not} (cuDNN is the reference)"
    else:
        result["natural"] = _vgg_conv1_2(c, rng)
        # Its 2 GB of arrays died with the call: give them back to the device.
        cupy.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()
        c.partial(result)

    # (c) float16 pooling over more than 2^31 elements: 64-bit flat offsets in the kernels.
    result["fp16_over_2_31"] = _fp16_over_2_31(c)
    return result


def _vgg_conv1_2(c: Ctx, rng) -> dict:
    import cupy
    import numpy as np
    import torch.nn.functional as tf

    import fastconv
    from fastconv import _checks as chk
    from fastconv import gpu

    torch = _torch_setup(c)
    batch = 16
    x = cupy.asarray(rng.standard_normal((batch, 64, 224, 224), dtype=np.float32))
    w = cupy.asarray((rng.standard_normal((64, 64, 3, 3)) / 24).astype(np.float32))
    b = cupy.asarray((0.1 * rng.standard_normal(64)).astype(np.float32))
    g = chk.validate_conv2d(x, w, b, 1, 1)
    chunks = len(gpu._ops()._chunks(g, 4))
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    before = pool.total_bytes()
    y = fastconv.conv2d(x, w, b, pad=1, activation="relu")
    dx, dw, db = fastconv.conv2d_backward(y, x, w, pad=1)
    _sync()
    peak_extra = pool.total_bytes() - before
    xt, wt, bt = (torch.as_tensor(a.get(), device="cuda") for a in (x, w, b))
    yt = torch.relu(tf.conv2d(xt, wt, bt, padding=1))
    ok, ratio = _within_bound(y.get(), yt.cpu().numpy(),
                              tf.conv2d(xt.abs(), wt.abs(), bt.abs(), padding=1).cpu().numpy(),
                              64 * 9 + 1, "float32")  # fmt: skip
    dyt = torch.as_tensor(y.get(), device="cuda")

    def ours():
        fastconv.conv2d(x, w, b, pad=1, activation="relu")
        fastconv.conv2d_backward(y, x, w, pad=1)

    def theirs():
        torch.relu(tf.conv2d(xt, wt, bt, padding=1))
        torch.ops.aten.convolution_backward(dyt, xt, wt, [64], [1, 1], [1, 1], [1, 1], False,
                                            [0, 0], 1, [True, True, True])  # fmt: skip

    saved = c.reps
    c.reps = 3
    try:
        ms_o, ms_t = time_pair(c, ours, theirs)
    finally:
        c.reps = saved
    c.goal("VGG-16 conv1_2 (batch 16, chunked) within the error bound of cuDNN", ok,
           f"err/bound {ratio:.3g}")  # fmt: skip
    return {"batch": batch, "chunks": chunks, "pool_bytes_grabbed": int(peak_extra),
            "fwd_bwd_ms": round(ms_o, 3), "torch_fwd_bwd_ms": round(ms_t, 3),
            "fastconv_over_torch": round(ms_o / ms_t, 3), "err_over_bound": ratio}  # fmt: skip


def _fp16_over_2_31(c: Ctx) -> dict:
    import cupy
    import numpy as np

    import fastconv
    from fastconv import reference as ref

    shape = (2, 3, 8, 9) if c.dry else (64, 64, 512, 1028)
    elements = int(np.prod(shape))
    need = elements * 2 * 2 + 3 * (elements // 4) * 2  # x and dx, then y, dy and a (half)
    free, _ = cupy.cuda.runtime.memGetInfo()
    if not c.dry and free < need * 1.15:
        return {"skipped": f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"}
    rs = cupy.random.default_rng(1)
    x = cupy.empty(shape, dtype=np.float16)
    for n in range(shape[0]):  # image by image: no 8.6 GB float32 temporary
        x[n] = rs.standard_normal(shape[1:], dtype=np.float32).astype(np.float16)
    t0 = time.perf_counter()
    y = fastconv.max_pool2d(x, 2)
    dy = cupy.ones(y.shape, dtype=np.float16)
    dx = fastconv.max_pool2d_backward(dy, x, 2)
    a = fastconv.avg_pool2d(x, 2)
    _sync()
    seconds = time.perf_counter() - t0
    checks = {}
    for n, ci in ((0, 0), (shape[0] - 1, shape[1] - 1)):  # first plane and the last one
        xs = x[n : n + 1, ci : ci + 1].get()
        checks[f"max_pool2d[{n},{ci}]"] = bool(
            (y[n : n + 1, ci : ci + 1].get() == ref.max_pool2d(xs, 2).astype(np.float16)).all()
        )
        want = ref.max_pool2d_backward(np.ones((1, 1, *y.shape[2:])), xs, 2).astype(np.float16)
        checks[f"max_pool2d_backward[{n},{ci}]"] = bool(
            (dx[n : n + 1, ci : ci + 1].get() == want).all()
        )
        err = np.abs(a[n : n + 1, ci : ci + 1].get() - ref.avg_pool2d(xs, 2)).max()
        checks[f"avg_pool2d[{n},{ci}]"] = bool(err <= 2 * U16 * 4)
    del x, y, dy, dx, a
    cupy.get_default_memory_pool().free_all_blocks()  # give the ~12 GB back
    c.goal("float16 pooling over 2^31 elements: first and last planes right",
           all(checks.values()), json.dumps(checks))  # fmt: skip
    return {"shape": list(shape), "elements": elements, "over_2_31": elements > 2**31,
            "seconds": round(seconds, 2), "checks": checks}  # fmt: skip


# --- 6. float16 vs float32 -----------------------------------------------------------------------


def fp16(c: Ctx) -> dict:
    import cupy

    x_train, y_train, _, _ = _mnist(c)
    batch = 4 if c.dry else 100
    xg, yg = cupy.asarray(x_train[:batch]), cupy.asarray(y_train[:batch])
    steps = {}
    for dtype in DTYPES:
        m = _deep_mnist(dtype)
        xb = xg.astype(dtype)
        for _ in range(1 if c.dry else 3):
            m.train_on_batch(xb, yg)
        times = []
        for _ in range(c.rounds):
            _sync()
            t0 = time.perf_counter()
            for _ in range(c.reps):
                m.train_on_batch(xb, yg)
            _sync()
            times.append((time.perf_counter() - t0) * 1e3 / c.reps)
        steps[dtype] = round(statistics.median(times), 3)
        c.partial({"step_ms": steps})
    ratio = steps["float16"] / steps["float32"]
    c.goal("float16 training step faster than float32", c.judge(ratio < 1.0),
           f"{steps['float16']} ms vs {steps['float32']} ms ({ratio:.3f}x)")  # fmt: skip
    return {"batch": batch, "step_ms": steps, "fp16_over_fp32": round(ratio, 3)}


# --- 8. the sanitizer tour (run as its own process, under compute-sanitizer on a device) ----------


def tour_main(args) -> int:
    """Every kernel in both dtypes (:func:`kernel_tour`) with CuPy's memory pool disabled, the
    (kernel, dtype) pairs launched recorded; prints TOUR DONE and writes the coverage."""
    if args.dry_run:
        from fastconv_testing import cupy_standin as _standin

        if not _standin.is_standin(sys.modules.get("cupy")):
            _standin.install()
    import cupy

    # No pool: each buffer is its own cudaMalloc, sized exactly, so memcheck sees an access one
    # element past an array instead of inside the pool's larger block, and initcheck sees fresh
    # (uninitialised) memory on each allocation rather than a recycled, already-written block.
    cupy.cuda.set_allocator(None)
    from fastconv import gpu
    from fastconv.gpu import _source

    k = gpu._ops()
    seen = set()
    launch = k.launch

    def recording(kernel, n, *a):
        dtype = next(x.dtype.name for x, code in zip(a, _source.SIGNATURES[kernel], strict=True)
                     if code in "rw")  # fmt: skip
        seen.add((kernel, dtype))
        return launch(kernel, n, *a)

    k.launch = recording
    kernel_tour(k, cupy.asarray, lambda a: a.get())
    cupy.cuda.Device().synchronize()
    missing = sorted({(kk, d) for kk in _source.SIGNATURES for d in _source.CTYPES} - seen)
    cov = {"launched": len(seen), "missing": missing}
    _atomic_write(Path(args.work) / f"tour-{args.tour_label}.json", json.dumps(cov))
    print(f"TOUR DONE: {len(seen)} kernel x dtype pairs, missing {missing}", flush=True)
    return 0 if not missing else 4


# --- the parent: sections as child processes, the report ----------------------------------------

FUNCTIONS = {
    "environment": environment,
    "correctness": correctness,
    "layers": layers,
    "training": training,
    "chunked": chunked,
    "fp16": fp16,
}


def child_section(args) -> int:
    _start_watchdog()
    if args.dry_run:
        from fastconv_testing import cupy_standin as _standin

        _standin.install()
    c = Ctx(args)
    result: dict = {"status": "ok"}
    try:
        _hook(c)
        result["data"] = FUNCTIONS[c.name](c)
    except Skipped as e:
        result = {"status": "skipped", "summary": str(e)}
    except Exception as e:
        result = {"status": "failed", "summary": f"{type(e).__name__}: {e}"[:300],
                  "error": traceback.format_exc()}  # fmt: skip
    result["goals"] = c.goals
    _atomic_write(c.work / f"{c.name}.json", json.dumps(result, indent=2, default=str))
    return 0


def child_exec(args) -> int:
    """Run a command in this process's group (so a kill of the group takes it too), with the
    watchdog; its output goes to ours (the section's log)."""
    _start_watchdog()
    done = subprocess.run(args.command, cwd=ROOT)
    return done.returncode


class Interrupted(Exception):
    pass


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


def _section_cmd(args, name, cap, work: Path) -> list[str]:
    cmd = [sys.executable, str(SCRIPT), "--child-section", name, "--work", str(work),
           "--child-cap", f"{cap:.1f}", "--reps", str(args.reps),
           "--rounds", str(args.rounds)]  # fmt: skip
    return cmd + (["--dry-run"] if args.dry_run else [])


def _exec_cmd(work: Path, command: list[str]) -> list[str]:
    return [sys.executable, str(SCRIPT), "--child-exec", "--work", str(work), "--", *command]


def _run_python_section(args, name, cap, work, env) -> dict:
    log = work / f"{name}.log"
    for stale in (f"{name}.json", f"{name}.partial.json", f"{name}.log"):
        (work / stale).unlink(missing_ok=True)
    rc, timed_out, seconds = run_group(_section_cmd(args, name, cap, work), cap, log, env)
    entry = _read_json(work / f"{name}.json")
    if entry is None:
        partial = _read_json(work / f"{name}.partial.json") or {}
        entry = {
            "status": "timeout" if timed_out else "crashed",
            "summary": (
                f"killed after its {cap:.0f} s cap (process group)"
                if timed_out
                else f"the section's process died (exit status {rc})"
            ),  # fmt: skip
            "data": partial.get("data", {}),
            "goals": partial.get("goals", []),
            "log_tail": _tail(log),
        }
    elif entry["status"] == "failed":
        entry["log_tail"] = _tail(log)
    entry["seconds"] = round(seconds, 1)
    return entry


def _pytest_summary(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return next((ln.strip("= ") for ln in reversed(lines)
                 if " passed" in ln or " failed" in ln or " error" in ln or "no tests" in ln),
                lines[-1] if lines else "")  # fmt: skip


def _run_tests_section(args, cap, work, env) -> dict:
    log = work / "tests.log"
    log.unlink(missing_ok=True)
    if args.dry_run:
        # The stand-in emulates the kernels one thread at a time: a few device tests prove the
        # flow (pytest in a child group, the summary parsed, the verdict).
        targets = ["tests/gpu/test_gpu.py", "-k",
                   "gemm_pinned or non_default_stream or mixing_numpy or capped_grid"]  # fmt: skip
    else:
        targets = ["tests/"]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
           *targets]  # fmt: skip
    rc, timed_out, seconds = run_group(_exec_cmd(work, cmd), cap, log, env)
    text = _tail(log, 400)
    summary = _pytest_summary(text)
    ok = rc == 0
    entry = {
        "status": "timeout" if timed_out else ("ok" if ok else "failed"),
        "summary": summary,
        "data": {"command": " ".join(cmd[1:]), "returncode": rc, "summary": summary},
        "goals": [
            {"goal": "pytest -m gpu passes", "met": ok and not timed_out, "detail": summary}
        ],  # fmt: skip
        "seconds": round(seconds, 1),
    }
    if not ok:
        entry["log_tail"] = _tail(log, 80)
    return entry


def _run_sanitizer_section(args, cap, work, env) -> dict:
    tool = None if args.dry_run else _compute_sanitizer()
    t0 = time.monotonic()
    runs, goals = {}, []
    labels = SANITIZER_TOOLS if tool else ("plain",)
    for i, label in enumerate(labels):
        left = cap - (time.monotonic() - t0)
        share = left / (len(labels) - i)
        log = work / f"sanitizer-{label}.log"
        log.unlink(missing_ok=True)
        (work / f"tour-{label}.json").unlink(missing_ok=True)
        tour = [sys.executable, str(SCRIPT), "--tour", "--work", str(work), "--tour-label", label]
        tour += ["--dry-run"] if args.dry_run else []
        cmd = ([tool, "--tool", label, "--error-exitcode", "3"] if tool else []) + tour
        if share < MIN_SECTION_S:
            runs[label] = {"ok": False, "summary": "not run: section cap spent"}
            continue
        rc, timed_out, seconds = run_group(_exec_cmd(work, cmd), share, log, env)
        text = _tail(log, 400)
        cov = _read_json(work / f"tour-{label}.json") or {}
        summary = next((ln for ln in reversed(text.splitlines()) if "ERROR SUMMARY" in ln),
                       "timed out" if timed_out else f"exit status {rc}")  # fmt: skip
        ok = rc == 0 and not timed_out and "TOUR DONE" in text and not cov.get("missing", 1)
        runs[label] = {"ok": ok, "returncode": rc, "seconds": round(seconds, 1),
                       "summary": summary, "coverage": cov}  # fmt: skip
        if not ok:
            runs[label]["log_tail"] = _tail(log, 40)
        goals.append({"goal": f"{label}: clean over every kernel x dtype (pool disabled)",
                      "met": ok, "detail": f"{summary}; coverage {cov}"})  # fmt: skip
    entry = {"status": "ok", "data": {"tool": tool, "runs": runs}, "goals": goals,
             "seconds": round(time.monotonic() - t0, 1)}  # fmt: skip
    if not tool and not args.dry_run:
        # The tour ran without the tool: nothing sanitized, say so rather than pass.
        entry["status"] = "skipped"
        entry["summary"] = "compute-sanitizer not found (PATH, $CUDA_PATH/bin, /usr/local/cuda)"
    elif args.dry_run:
        entry["data"]["note"] = "dry run: the tour ran without compute-sanitizer (flow only)"
    return entry


def failures(report: dict) -> list[str]:
    out = []
    for name, s in report["sections"].items():
        if s["status"] in ("failed", "timeout", "crashed", "interrupted"):
            out.append(f"{name}: {s['status']}: {s.get('summary', '')}")
        for g in s.get("goals", []):
            if g["met"] is False:
                out.append(f"{name}: goal missed: {g['goal']} ({g['detail']})")
    return out


def write_report(out: Path, report: dict) -> None:
    report["failures"] = failures(report)
    _atomic_write(out / "gpu_check.json", json.dumps(report, indent=2, default=str))
    _atomic_write(out / "gpu_check.md", to_markdown(report))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def to_markdown(r: dict) -> str:
    done = "finished" if r.get("finished") else (
        "NOT finished (sections marked running or pending did not complete)")  # fmt: skip
    out = [f"# fastconv GPU check ({r['mode']})", "",
           f"Started {r['started']}; {r.get('seconds', 0)} s of a {r['budget_s']} s budget; "
           f"{done}.", ""]  # fmt: skip
    if r.get("unavailable_reason"):
        out += [f"**No usable GPU**: {r['unavailable_reason']}", ""]
    if r["failures"]:
        out += ["**Failures** (exit status 1):", ""] + [f"- {f}" for f in r["failures"]] + [""]
    elif r.get("finished"):
        out += ["No failures: every goal judged was met.", ""]
    out += ["| section | status | goals met | seconds | cap s |", "|---|---|---|---:|---:|"]
    for name, s in r["sections"].items():
        goals = s.get("goals", [])
        judged = [g for g in goals if g["met"] is not None]
        met = f"{sum(bool(g['met']) for g in judged)}/{len(judged)}" if goals else ""
        if len(judged) < len(goals):
            met += f" ({len(goals) - len(judged)} not judged)"
        out.append(f"| {name} | {s['status']} | {met} | {s.get('seconds', '')} | "
                   f"{s.get('cap_s', '')} |")  # fmt: skip
    out.append("")
    for name, s in r["sections"].items():
        if s["status"] in ("pending",):
            continue
        out += [f"## {name}", ""]
        if s.get("summary"):
            out += [f"{s['status']}: {s['summary']}", ""]
        for g in s.get("goals", []):
            mark = {True: "met", False: "MISSED", None: "not judged"}[g["met"]]
            out.append(f"- goal {mark}: {g['goal']} ({g['detail']})")
        if s.get("goals"):
            out.append("")
        data = s.get("data") or {}
        if name == "layers" and data.get("rows"):
            out += ["| layer | dtype | pass | fastconv ms | torch ms | fastconv/torch | "
                    "agrees | err/bound |", "|---|---|---|---:|---:|---:|---|---:|"]  # fmt: skip
            out += [f"| {x['layer']} | {x['dtype']} | {x['pass']} | {x['fastconv_ms']:.4f} | "
                    f"{x['torch_ms']:.4f} | {x['fastconv_over_torch']} | "
                    f"{x['agrees_with_torch']} | {_fmt(x['err_over_bound'])} |"
                    for x in data["rows"]]  # fmt: skip
            out.append("")
            data = {k: v for k, v in data.items() if k != "rows"}
        if name == "training" and "fastconv_step_ms" in data:
            ours, theirs = data["fastconv_step_ms"], data.get("torch_step_ms", {})
            out += ["One training step by phase (ms; fastconv's loss includes its backward, "
                    "PyTorch's is inside its backward):", "",
                    "| phase | fastconv | PyTorch |", "|---|---:|---:|"]  # fmt: skip
            for phase, ms in ours["by_phase"].items():
                out.append(f"| {phase} | {ms} | {theirs.get(phase, '')} |")
            out += ["", "fastconv by layer type (forward + backward, ms): " + ", ".join(
                f"{k} {v}" for k, v in ours["by_type"].items()), ""]  # fmt: skip
        if data:
            out += ["```", json.dumps(data, indent=2, default=str), "```", ""]
        if s.get("error"):
            out += ["```", s["error"].rstrip(), "```", ""]
        if s.get("log_tail"):
            out += [f"Last lines of logs/{name}.log:", "", "```", s["log_tail"].rstrip(), "```", ""]
    return "\n".join(out) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="directory for gpu_check.md / .json (default: $OUT)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"global time budget (default {DEFAULT_BUDGET_S:.0f} s)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true",
                   help="every section on the CPU, stand-in CuPy, tiny sizes")  # fmt: skip
    p.add_argument("--only", nargs="*", choices=SECTIONS,
                   help="run only these sections (environment always runs first)")  # fmt: skip
    p.add_argument("--cap", action="append", default=[], metavar="SECTION=SECONDS",
                   help="override a section's time cap (repeatable)")  # fmt: skip
    p.add_argument("--reps", type=int, default=20, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median)")
    p.add_argument("--plan", action="store_true", help="print what the check does and exit")
    # Internal: the child processes.
    p.add_argument("--child-section", choices=list(FUNCTIONS), help=argparse.SUPPRESS)
    p.add_argument("--child-exec", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tour", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tour-label", default="plain", help=argparse.SUPPRESS)
    p.add_argument("--child-cap", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("command", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    caps = {}
    for item in args.cap:
        name, _, sec = item.partition("=")
        if name not in SECTIONS:
            p.error(f"--cap: unknown section {name!r}")
        try:
            caps[name] = float(sec)
        except ValueError:
            p.error(f"--cap {item!r}: SECONDS must be a number")
    args.cap = caps
    internal = args.child_section or args.child_exec or args.tour
    if not internal and not args.plan:
        args.out = args.out or os.environ.get("OUT")
        if not args.out:
            p.error("no report directory: pass --out DIR or set $OUT")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_section:
        return child_section(args)
    if args.child_exec:
        return child_exec(args)
    if args.tour:
        return tour_main(args)
    if args.plan:
        print(__doc__)
        return 0
    return run_all(args)


def run_all(args) -> int:
    out = Path(args.out).resolve()
    work = out / "logs"
    work.mkdir(parents=True, exist_ok=True)
    col = 1 if args.dry_run else 0
    budget = args.budget_s if args.budget_s is not None else (
        sum(v[1] for v in CAPS.values()) if args.dry_run else DEFAULT_BUDGET_S)  # fmt: skip
    caps = {name: float(args.cap.get(name, CAPS[name][col])) for name in SECTIONS}
    plan = ["environment"] + [s for s in (args.only or SECTIONS) if s != "environment"]
    t0 = time.monotonic()
    report: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "dry run: stand-in CuPy on the CPU" if args.dry_run else "device",
        "budget_s": budget,
        "finished": False,
        "seconds": 0.0,
        "sections": {name: {"status": "pending", "cap_s": caps[name]} for name in plan},
    }
    env = _child_env(args.dry_run)
    print(f"gpu_check: {', '.join(plan)}; budget {budget:.0f} s; report in {out}", flush=True)
    write_report(out, report)
    old_term = signal.signal(signal.SIGTERM, _raise_interrupted)
    current = None
    try:
        for name in plan:
            current = name
            left = budget - (time.monotonic() - t0)
            cap = min(caps[name], left)
            if name == "environment":  # always: without it nothing else can be judged
                cap = max(cap, MIN_SECTION_S)
            elif left < MIN_SECTION_S:
                report["sections"][name] = {
                    "status": "skipped",
                    "cap_s": caps[name],
                    "summary": f"time budget: {left:.0f} s left",
                }
                write_report(out, report)
                continue
            report["sections"][name] = {"status": "running", "cap_s": round(cap, 1)}
            write_report(out, report)
            if name == "tests":
                entry = _run_tests_section(args, cap, work, env)
            elif name == "sanitizer":
                entry = _run_sanitizer_section(args, cap, work, env)
            else:
                entry = _run_python_section(args, name, cap, work, env)
            entry["cap_s"] = round(cap, 1)
            report["sections"][name] = entry
            report["seconds"] = round(time.monotonic() - t0, 1)
            print(f"[gpu_check] {name}: {entry['status']} ({entry.get('seconds', 0)} s)",
                  flush=True)  # fmt: skip
            if name == "environment":
                data = entry.get("data") or {}
                if entry["status"] != "ok" or not data.get("fastconv_gpu_available"):
                    report["unavailable_reason"] = data.get("unavailable_reason") or \
                        entry.get("summary", "the environment section did not finish")  # fmt: skip
                    for rest in plan[1:]:
                        report["sections"][rest] = {"status": "skipped",
                                                    "summary": "no usable GPU"}  # fmt: skip
                    break
            write_report(out, report)
        current = None
    except (KeyboardInterrupt, Interrupted) as e:
        report["sections"][current] = {"status": "interrupted", "summary": str(e) or "SIGINT",
                                       "cap_s": caps[current]}  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, old_term)
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["finished"] = current is None
    write_report(out, report)
    print(f"wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'} ({report['seconds']} s)")
    for line in report["failures"]:
        print(f"FAILED: {line}")
    if current is not None:
        return 130
    if "unavailable_reason" in report:
        print(f"gpu_check: no usable GPU: {report['unavailable_reason']}", file=sys.stderr)
        return 2
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
