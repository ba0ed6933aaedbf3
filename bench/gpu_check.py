"""One-shot GPU check: ``PYTHONPATH=. python bench/gpu_check.py --out DIR``.

For a person with an NVIDIA GPU (H100/H200 in mind; Python 3.12, CuPy and PyTorch preinstalled,
no internet), run from the repository root; it finishes within ``--budget-s`` (default 540 s).
Every section runs on its own (a failure is recorded and the rest still run) and gets what is
left of the global time budget:

1. ``environment``: Python, NumPy, CuPy, CUDA driver/runtime, NVRTC, device, PyTorch/cuDNN,
   the relevant environment variables, fastconv's availability verdict.
2. ``tests``: every GPU-marked test (``pytest -m gpu tests/``).
3. ``device_vs_emulation``: random geometries on the device against the g++ emulation of the
   same kernels: bit-exact for im2col, col2im, pooling and the direct convolution (the device
   compiles with -ftz=true -fmad=false, mirrored by the emulation), a tolerance for the GEMM
   paths (cuBLAS vs a float32-accumulating NumPy GEMM).
4. ``compute_sanitizer``: ``compute-sanitizer`` memcheck, racecheck and initcheck over every
   kernel in both dtypes on tiny shapes, when the tool is on PATH (or under $CUDA_PATH/bin).
5. ``fp16_over_2_31``: max/avg pooling forward and backward of a float16 tensor of more than
   2^31 elements (when the device has the memory), checked on its last planes.
6. ``stream``: the ops on a non-default stream equal the default stream's results bit for bit.
7. ``launch_overhead``: host microseconds per launch (fastconv op, raw launcher, a CuPy
   elementwise op, a PyTorch op).
8. ``layers``: each deep-MNIST conv and pool layer, forward and backward, float32 and float16,
   fastconv vs PyTorch/cuDNN (TF32 off), CUDA events, interleaved rounds, medians.
9. ``training``: one deep-MNIST epoch (batch 100, Adam 1e-3, data on the device) fastconv vs
   PyTorch eager on the same GPU, and fastconv's training step in float16 vs float32.

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md``; exit status 0 when no section failed.
``--fake-cupy`` runs the whole script on the CPU against the stand-in CuPy
(``fastconv.gpu._standin``) with small sizes and PyTorch on the CPU: it proves the plumbing
(CI runs it), not the device. ``--dry-run`` prints the plan.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's fastconv, even when PYTHONPATH is unset

SECTIONS = (
    "environment",
    "tests",
    "device_vs_emulation",
    "compute_sanitizer",
    "fp16_over_2_31",
    "stream",
    "launch_overhead",
    "layers",
    "training",
)
# name, (C, H, W) input, filters, pad: the deep MNIST net's convolutions (3x3, stride 1, ReLU).
CONV_LAYERS = [
    ("conv1", (1, 28, 28), 16, 1),
    ("conv2", (16, 28, 28), 16, 1),
    ("conv3", (16, 14, 14), 32, 1),
    ("conv4", (32, 14, 14), 32, 2),
    ("conv5", (32, 8, 8), 64, 1),
    ("conv6", (64, 8, 8), 64, 1),
]
POOL_LAYERS = [("pool1", (16, 28, 28)), ("pool2", (32, 16, 16)), ("pool3", (64, 8, 8))]
DTYPES = ("float32", "float16")


class Check:
    """Shared state: the mode, sizes and the global deadline."""

    def __init__(self, args):
        self.fake = args.fake_cupy
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.budget_s
        self.batch = 2 if self.fake else 100
        self.reps = 1 if self.fake else args.reps
        self.rounds = 1 if self.fake else args.rounds
        self.warmup = 1 if self.fake else 3
        self.torch_device = "cpu" if self.fake else "cuda"

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def need(self, seconds: float, what: str) -> None:
        if self.left() < seconds:
            raise Skipped(f"time budget: {self.left():.0f} s left, {what} needs ~{seconds:.0f} s")


class Skipped(Exception):
    pass


def _sync():
    import cupy

    cupy.cuda.Device().synchronize()


# --- 1. environment ------------------------------------------------------------------------------


def environment(c: Check) -> dict:
    import numpy as np

    import fastconv
    from fastconv import gpu

    env = {
        "mode": "fake-cupy (stand-in, CPU)" if c.fake else "device",
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
    }
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
    try:
        import torch

        env.update(
            torch=torch.__version__,
            torch_cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            torch_cuda_available=torch.cuda.is_available(),
        )
    except ImportError as e:
        env["torch"] = f"not installed ({e})"
    if shutil.which("nvidia-smi"):
        q = "name,driver_version,memory.total,clocks.max.sm,power.limit"
        done = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        env["nvidia_smi"] = done.stdout.strip()
    return env


# --- 2. tests -------------------------------------------------------------------------------------


def _subprocess_env(c: Check) -> dict:
    from fastconv.gpu import _standin

    parts = [str(ROOT)] + ([_standin.PATH_DIR] if c.fake else [])
    old = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(parts + ([old] if old else [])))


def run_tests(c: Check) -> dict:
    c.need(30, "the GPU test suite")
    # On the stand-in the kernels are emulated: tests/test_gpu.py only (a 5-epoch MNIST test
    # elsewhere would take far too long on a CPU emulation).
    targets = ["tests/test_gpu.py"] if c.fake else ["tests/"]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
           *targets]  # fmt: skip
    timeout = max(30.0, min(300.0, c.left() - 200))
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=_subprocess_env(c), capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
        rc, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = -1, f"timed out after {timeout:.0f} s\n{e.stdout or ''}"
    lines = out.strip().splitlines()
    result = {
        "command": " ".join(cmd[1:]),
        "returncode": rc,
        "summary": lines[-1] if lines else "",
        "tail": "\n".join(lines[-60:]),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if rc != 0:
        raise SectionFailed(result)
    return result


class SectionFailed(Exception):
    def __init__(self, data):
        super().__init__(data.get("summary", "failed"))
        self.data = data


# --- 3. device vs emulation ---------------------------------------------------------------------


def device_vs_emulation(c: Check, n_cases: int = 40) -> dict:
    import numpy as np

    from fastconv import gpu
    from fastconv.gpu import _emulation as emu

    c.need(20, "device vs emulation")
    if shutil.which("g++") is None:
        raise Skipped("g++ not found: the emulation to compare against cannot be built")
    lib = emu.build_library()
    emulated = emu.emulated_ops(emu.EmulatedLauncher(lib, max_blocks=None))
    device = gpu._ops()
    rng = np.random.default_rng(2026)
    try:
        return _compare_random_cases(c, n_cases, device, emulated, rng)
    finally:
        device.direct_max_k = emulated.direct_max_k = gpu._kernel_ops.DIRECT_MAX_K


def _compare_random_cases(c: Check, n_cases, device, emulated, rng) -> dict:
    import cupy
    import numpy as np

    from fastconv import _checks as chk
    from fastconv import gpu

    worst = {}
    failures = []
    cases = 0
    for i in range(n_cases):
        if c.left() < 60:
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
            ),
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
                emulated.max_pool2d_backward(dyp, x, gp),
                True,
            )
            checks["avg_pool2d"] = (device.avg_pool2d(xg, gp).get(), emulated.avg_pool2d(x, gp),
                                    True)  # fmt: skip
            checks["avg_pool2d_backward"] = (
                device.avg_pool2d_backward(cupy.asarray(dyp), gp).get(),
                emulated.avg_pool2d_backward(dyp, gp),
                True,
            )
        for name, (got, want, exact) in checks.items():
            key = f"{name} {np.dtype(dtype).name}"
            got64, want64 = got.astype(np.float64), want.astype(np.float64)
            scale = max(float(np.abs(want64).max()) if want64.size else 0.0, 1.0)
            err = float(np.abs(got64 - want64).max()) / scale if got.size else 0.0
            worst[key] = max(worst.get(key, 0.0), err)
            tol = 0.0 if exact else (1e-5 if dtype == np.float32 else 8 * 2.0**-11)
            if got.shape != want.shape or not err <= tol:
                failures.append({"case": i, "op": key, "geometry": list(g), "rel_err": err,
                                 "tol": tol})  # fmt: skip
    result = {
        "cases": cases,
        "worst_relative_error": dict(sorted(worst.items())),
        "failures": failures[:20],
        "exact_ops": "im2col, col2im, conv2d_direct, bias-grad (db), max/avg pooling fwd+bwd",
    }
    if failures:
        raise SectionFailed(dict(result, summary=f"{len(failures)} mismatches"))
    return result


# --- 4. compute-sanitizer ------------------------------------------------------------------------


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


# Every public op in both dtypes on tiny shapes (and the GEMM paths), as its own process.
TINY_TOUR = """
import numpy as np
import cupy
import fastconv
from fastconv import gpu
rng = np.random.default_rng(0)
for dt in (np.float32, np.float16):
    for kmax in (0, 10**6):
        gpu._ops().direct_max_k = kmax
        x = cupy.asarray(rng.standard_normal((2, 3, 7, 6)).astype(dt))
        w = cupy.asarray(rng.standard_normal((4, 3, 3, 3)).astype(dt))
        b = cupy.asarray(rng.standard_normal(4).astype(dt))
        y = fastconv.conv2d(x, w, b, stride=(2, 1), pad=1, activation="relu")
        fastconv.conv2d_backward(y, x, w, stride=(2, 1), pad=1)
        fastconv.conv2d_backward(y, x, w, stride=(2, 1), pad=1, need_dx=False)
    c = fastconv.im2col(x, 3, 2, stride=2, pad=1)
    fastconv.col2im(c, x.shape, 3, 2, stride=2, pad=1)
    p = fastconv.max_pool2d(x, 3, 2, 1)
    fastconv.max_pool2d_backward(p, x, 3, 2, 1)
    a = fastconv.avg_pool2d(x, 2)
    fastconv.avg_pool2d_backward(a, x.shape, 2)
cupy.cuda.Device().synchronize()
print("TOUR DONE")
"""


def compute_sanitizer(c: Check) -> dict:
    c.need(30, "compute-sanitizer")
    tool = _compute_sanitizer()
    env = _subprocess_env(c)
    result = {"tool": tool, "runs": {}}
    tools = ("memcheck", "racecheck", "initcheck") if tool else (None,)
    for name in tools:
        prefix = [tool, "--tool", name, "--error-exitcode", "3"] if name else []
        cmd = [*prefix, sys.executable, "-c", TINY_TOUR]
        timeout = max(20.0, min(180.0, c.left() - 150))
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout)  # fmt: skip
            out = (done.stdout + done.stderr).strip().splitlines()
            ok = done.returncode == 0 and any("TOUR DONE" in line for line in out)
            summary = next((ln for ln in reversed(out) if "ERROR SUMMARY" in ln), out[-1:] or "")
            result["runs"][name or "plain (no compute-sanitizer)"] = {
                "ok": ok,
                "returncode": done.returncode,
                "summary": summary if isinstance(summary, str) else str(summary),
                "tail": "\n".join(out[-25:]) if not ok else "",
            }
        except subprocess.TimeoutExpired:
            result["runs"][name or "plain"] = {"ok": False, "summary": f"timeout {timeout:.0f} s"}
    if not all(r["ok"] for r in result["runs"].values()):
        raise SectionFailed(dict(result, summary="a sanitizer run reported errors"))
    if tool is None:
        raise Skipped("compute-sanitizer not found (the tiny tour ran without it: ok)")
    return result


# --- 5. float16 over 2^31 elements ---------------------------------------------------------------


def fp16_over_2_31(c: Check) -> dict:
    import cupy
    import numpy as np

    import fastconv
    from fastconv import reference as ref

    c.need(40, "the 2^31-element case")
    # (N, C, H, W) with N*C*H*W > 2^31: flat offsets beyond int32 in every kernel.
    shape = (2, 3, 8, 9) if c.fake else (64, 64, 512, 1028)
    elements = int(np.prod(shape))
    need = elements * 2 * 2 + 3 * (elements // 4) * 2  # x and dx, then y, dy and a (half)
    free, _ = cupy.cuda.runtime.memGetInfo()
    if not c.fake and free < need * 1.15:
        raise Skipped(f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
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
        checks[f"avg_pool2d[{n},{ci}]"] = bool(err <= 2 * 2.0**-11 * 4)
    result = {
        "shape": list(shape),
        "elements": elements,
        "over_2_31": elements > 2**31,
        "seconds": round(seconds, 2),
        "checks": checks,
    }
    del x, y, dy, dx, a
    if hasattr(cupy, "get_default_memory_pool"):
        cupy.get_default_memory_pool().free_all_blocks()  # give the 12 GB back to later sections
    if not all(checks.values()):
        raise SectionFailed(dict(result, summary="wrong values"))
    if c.fake:
        result["note"] = "fake-cupy: a small shape on the same code path"
    return result


# --- 6. non-default stream -----------------------------------------------------------------------


def stream(c: Check) -> dict:
    import cupy
    import numpy as np

    import fastconv

    c.need(10, "the stream check")
    rng = np.random.default_rng(3)
    x = cupy.asarray(rng.standard_normal((c.batch, 16, 14, 14)).astype(np.float32))
    w = cupy.asarray(rng.standard_normal((32, 16, 3, 3)).astype(np.float32))

    def run():
        y = fastconv.conv2d(x, w, pad=1, activation="relu")
        dx, dw, db = fastconv.conv2d_backward(y, x, w, pad=1)
        return [a.get() for a in (y, dx, dw, db, fastconv.max_pool2d(y, 2))]

    want = run()
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        got = run()
    s.synchronize()
    same = all(bool((a == b).all()) for a, b in zip(got, want, strict=True))
    if not same:
        raise SectionFailed({"summary": "results differ on a non-default stream"})
    return {"bitwise_equal_to_default_stream": same}


# --- 7. launch overhead --------------------------------------------------------------------------


def launch_overhead(c: Check) -> dict:
    import cupy
    import numpy as np

    import fastconv
    from fastconv.gpu import _module

    c.need(15, "launch overhead")
    n = 50 if c.fake else 3000
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

    out = {
        "calls": n,
        "fastconv.max_pool2d (validate + dispatch + launch), us": per_call(
            lambda: fastconv.max_pool2d(x, 2)
        ),
        "_module.launch (checked raw launch), us": per_call(
            lambda: _module.launch("max_pool2d", 1, x, y, *geom)
        ),
        "cupy elementwise x + 1, us": per_call(lambda: x + 1),
    }
    try:
        import torch

        t = torch.zeros((1, 1, 2, 2), device=c.torch_device)
        out["torch.relu, us"] = per_call(lambda: torch.relu(t))
    except Exception as e:
        out["torch.relu, us"] = f"n/a ({type(e).__name__})"
    return out


# --- 8. layers vs cuDNN --------------------------------------------------------------------------


def _timer(c: Check, lib: str):
    if c.fake or lib == "host":

        def run(fn, reps):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            _sync()
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


def time_pair(c: Check, ours, theirs) -> tuple[float, float]:
    """Interleaved rounds (drift hits both alike), medians, after warm-up calls."""
    import torch

    for _ in range(c.warmup):  # NVRTC/module load, cuDNN autotuning, allocator pools
        ours()
        theirs()
    _sync()
    if not c.fake:
        torch.cuda.synchronize()
    t_ours, t_theirs = _timer(c, "cupy"), _timer(c, "torch")
    a, b = [], []
    for _ in range(c.rounds):
        a.append(t_ours(ours, c.reps))
        b.append(t_theirs(theirs, c.reps))
    return statistics.median(a), statistics.median(b)


def _row(name, kind, dtype, direction, ms_ours, ms_torch, agree) -> dict:
    return {
        "layer": name,
        "kind": kind,
        "dtype": dtype,
        "pass": direction,
        "fastconv_ms": round(ms_ours, 4),
        "torch_ms": round(ms_torch, 4),
        "fastconv_over_torch": round(ms_ours / ms_torch, 3) if ms_torch else None,
        "max_rel_diff_vs_torch": agree,
    }


def layers(c: Check) -> dict:
    c.need(60, "the layer timings")  # first: a section past the budget imports nothing
    import cupy
    import numpy as np
    import torch
    import torch.nn.functional as tf

    import fastconv

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False  # same precision as fastconv's FP32 cuBLAS GEMMs
    torch.backends.cuda.matmul.allow_tf32 = False
    rng = np.random.default_rng(0)
    rows = []

    def t(a):
        return torch.as_tensor(a.get(), device=c.torch_device)

    def diff(ours, theirs):
        a = ours.get().astype("float64")
        b = theirs.detach().float().cpu().numpy().astype("float64")
        return float(abs(a - b).max() / max(abs(b).max(), 1.0))

    for dtype in DTYPES:
        if c.fake and dtype == "float16":
            break  # PyTorch's CPU convolutions do not take half
        for name, (ch, h, w), f, pad in CONV_LAYERS:
            if c.left() < 45:
                raise Skipped(f"time budget after {len(rows)} rows: {rows}")
            x = cupy.asarray(rng.standard_normal((c.batch, ch, h, w)).astype(dtype))
            wt = cupy.asarray((rng.standard_normal((f, ch, 3, 3)) / (9 * ch) ** 0.5).astype(dtype))
            b = cupy.asarray((0.1 * rng.standard_normal(f)).astype(dtype))
            y = fastconv.conv2d(x, wt, b, pad=pad, activation="relu")
            dy = cupy.asarray(rng.standard_normal(y.shape).astype(dtype))
            xt, wtt, bt, dyt = t(x), t(wt), t(b), t(dy)

            def ours_fwd(x=x, wt=wt, b=b, pad=pad):
                return fastconv.conv2d(x, wt, b, pad=pad, activation="relu")

            def torch_fwd(xt=xt, wtt=wtt, bt=bt, pad=pad):
                return torch.relu(tf.conv2d(xt, wtt, bt, padding=pad))

            def ours_bwd(dy=dy, x=x, wt=wt, pad=pad):
                return fastconv.conv2d_backward(dy, x, wt, pad=pad)

            def torch_bwd(dyt=dyt, xt=xt, wtt=wtt, f=f, pad=pad):
                return torch.ops.aten.convolution_backward(
                    dyt, xt, wtt, [f], [1, 1], [pad, pad], [1, 1], False, [0, 0], 1,
                    [True, True, True],
                )  # fmt: skip

            agree_fwd = diff(ours_fwd(), torch_fwd())
            agree_bwd = max(diff(o, r) for o, r in zip(ours_bwd(), torch_bwd(), strict=True))
            passes = (
                ("forward", ours_fwd, torch_fwd, agree_fwd),
                ("backward", ours_bwd, torch_bwd, agree_bwd),
            )
            for direction, o, r, agree in passes:
                ms_o, ms_t = time_pair(c, o, r)
                rows.append(_row(name, "conv", dtype, direction, ms_o, ms_t, agree))
        for name, (ch, h, w) in POOL_LAYERS:
            x = cupy.asarray(rng.standard_normal((c.batch, ch, h, w)).astype(dtype))
            dy = cupy.asarray(rng.standard_normal((c.batch, ch, h // 2, w // 2)).astype(dtype))
            xt, dyt = t(x), t(dy)
            _, idx = tf.max_pool2d(xt, 2, return_indices=True)

            def ours_fwd(x=x):
                return fastconv.max_pool2d(x, 2)

            def torch_fwd(xt=xt):
                return tf.max_pool2d(xt, 2)

            def ours_bwd(dy=dy, x=x):
                return fastconv.max_pool2d_backward(dy, x, 2)

            def torch_bwd(dyt=dyt, xt=xt, idx=idx):
                # PyTorch reuses the forward's saved indices; fastconv recomputes the argmax.
                return torch.ops.aten.max_pool2d_with_indices_backward(
                    dyt, xt, [2, 2], [2, 2], [0, 0], [1, 1], False, idx
                )

            for direction, o, r in (("forward", ours_fwd, torch_fwd),
                                    ("backward", ours_bwd, torch_bwd)):  # fmt: skip
                agree = diff(o(), r())
                ms_o, ms_t = time_pair(c, o, r)
                rows.append(_row(name, "pool", dtype, direction, ms_o, ms_t, agree))
    conv = [r for r in rows if r["kind"] == "conv"]
    worst = max((r["fastconv_over_torch"] for r in conv), default=None)
    return {
        "batch": c.batch,
        "rows": rows,
        "goal": "every conv layer <= 1.5x cuDNN",
        "worst_conv_ratio": worst,
        "goal_met": None if c.fake else (worst is not None and worst <= 1.5),
    }


# --- 9. training ---------------------------------------------------------------------------------


def _torch_deep_mnist(device):
    import torch
    from torch import nn

    def conv(ch, f, pad):
        return [nn.Conv2d(ch, f, 3, padding=pad), nn.ReLU()]

    layers_ = [
        *conv(1, 16, 1), *conv(16, 16, 1), nn.MaxPool2d(2),
        *conv(16, 32, 1), *conv(32, 32, 2), nn.MaxPool2d(2),
        *conv(32, 64, 1), *conv(64, 64, 1), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(1024, 50), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(50, 10), nn.Dropout(0.5),
    ]  # fmt: skip
    model = nn.Sequential(*layers_).to(device)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def training(c: Check) -> dict:
    c.need(90, "one training epoch on each side")  # first: past the budget, import nothing
    import cupy
    import numpy as np
    import torch

    from fastconv.datasets import load_mnist
    from fastconv.models import deep_mnist_net
    from fastconv.nn import Adam

    (x_train, y_train), (x_test, y_test) = load_mnist()
    # fake-cupy: the kernels are emulated one thread at a time, so a token epoch.
    n, batch = (8, 4) if c.fake else (len(x_train), 100)
    x_train, y_train = x_train[:n], y_train[:n]
    if c.fake:
        x_test, y_test = x_test[:8], y_test[:8]
    xg, yg = cupy.asarray(x_train), cupy.asarray(y_train.astype(np.int64))
    net = deep_mnist_net(seed=0)
    net.compile(Adam(lr=1e-3), "softmax_cross_entropy")
    net.build(x_train.shape[1:])
    net = net.to("gpu", "float32")
    net.fit(xg[:batch], yg[:batch], epochs=1, batch_size=batch, verbose=0)  # warm-up
    _sync()
    t0 = time.perf_counter()
    hist = net.fit(xg, yg, epochs=1, batch_size=batch, verbose=0)
    _sync()
    ours_s = time.perf_counter() - t0

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model, opt = _torch_deep_mnist(c.torch_device)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt = torch.as_tensor(x_train, device=c.torch_device)
    yt = torch.as_tensor(y_train.astype(np.int64), device=c.torch_device)

    def torch_epoch(limit=None):
        perm = torch.randperm(n, device=c.torch_device)
        losses = []
        for start in range(0, n if limit is None else limit, batch):
            sel = perm[start : start + batch]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[sel]), yt[sel])
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return float(torch.stack(losses).mean())

    torch_epoch(limit=batch)  # warm-up (cuDNN autotuning)
    if not c.fake:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch_loss = torch_epoch()
    if not c.fake:
        torch.cuda.synchronize()
    torch_s = time.perf_counter() - t0
    test = net.evaluate(x_test, y_test, batch_size=500)

    # fastconv training step, float16 vs float32 (same batch, device data, medians).
    steps = {}
    for dtype in DTYPES:
        m = deep_mnist_net(seed=0)
        m.compile(Adam(lr=1e-3), "softmax_cross_entropy")
        m.build(x_train.shape[1:])
        m = m.to("gpu", dtype)
        xb, yb = xg[:batch].astype(dtype), yg[:batch]
        for _ in range(1 if c.fake else 3):
            m.train_on_batch(xb, yb)
        times = []
        for _ in range(1 if c.fake else c.rounds):
            _sync()
            t0 = time.perf_counter()
            for _ in range(1 if c.fake else c.reps):
                m.train_on_batch(xb, yb)
            _sync()
            times.append((time.perf_counter() - t0) * 1e3 / c.reps)
        steps[dtype] = round(statistics.median(times), 3)
    ratio = ours_s / torch_s if torch_s else None
    return {
        "samples": n,
        "batch": batch,
        "fastconv_epoch_s": round(ours_s, 3),
        "torch_epoch_s": round(torch_s, 3),
        "fastconv_over_torch": round(ratio, 3) if ratio else None,
        "fastconv_train_loss": float(hist.history["loss"][-1]),
        "torch_train_loss": torch_loss,
        "fastconv_test_accuracy_after_1_epoch": float(test["accuracy"]),
        "step_ms": steps,
        "fp16_step_over_fp32": round(steps["float16"] / steps["float32"], 3),
        "goals": {
            "epoch <= 1.0x PyTorch eager": None if c.fake else bool(ratio and ratio <= 1.0),
            "fp16 step faster than fp32": None if c.fake else steps["float16"] < steps["float32"],
        },
    }


# --- report --------------------------------------------------------------------------------------

FUNCTIONS = {
    "environment": environment,
    "tests": run_tests,
    "device_vs_emulation": device_vs_emulation,
    "compute_sanitizer": compute_sanitizer,
    "fp16_over_2_31": fp16_over_2_31,
    "stream": stream,
    "launch_overhead": launch_overhead,
    "layers": layers,
    "training": training,
}


def run_section(report: dict, name: str, c: Check) -> None:
    t0 = time.perf_counter()
    entry: dict = {}
    try:
        entry = {"status": "ok", "data": FUNCTIONS[name](c)}
    except Skipped as e:
        entry = {"status": "skipped", "reason": str(e)}
    except SectionFailed as e:
        entry = {"status": "failed", "data": e.data}
    except BaseException as e:  # noqa: BLE001 - one section's failure must not stop the rest
        if isinstance(e, KeyboardInterrupt):
            raise
        entry = {"status": "failed", "error": traceback.format_exc()}
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    report["sections"][name] = entry
    print(f"[gpu_check] {name}: {entry['status']} ({entry['seconds']} s)", flush=True)


def to_markdown(r: dict) -> str:
    out = [f"# fastconv GPU check ({r['mode']})", "", f"Started {r['started']}, "
           f"{r['seconds']} s of a {r['budget_s']} s budget.", ""]  # fmt: skip
    out += ["| section | status | seconds |", "|---|---|---:|"]
    out += [f"| {k} | {v['status']} | {v['seconds']} |" for k, v in r["sections"].items()]
    out.append("")
    for name, v in r["sections"].items():
        out += [f"## {name}", ""]
        if v["status"] == "skipped":
            out += [f"Skipped: {v['reason']}", ""]
            continue
        if "error" in v:
            out += ["```", v["error"].rstrip(), "```", ""]
            continue
        data = v.get("data", {})
        if name == "layers" and isinstance(data, dict) and data.get("rows"):
            out += [
                "| layer | dtype | pass | fastconv ms | torch ms | fastconv/torch | max rel diff |",
                "|---|---|---|---:|---:|---:|---:|",
            ]
            out += [
                f"| {x['layer']} | {x['dtype']} | {x['pass']} | {x['fastconv_ms']:.3f} | "
                f"{x['torch_ms']:.3f} | {x['fastconv_over_torch']} | "
                f"{x['max_rel_diff_vs_torch']:.1e} |"
                for x in data["rows"]
            ]
            out += [
                "",
                f"Goal: {data['goal']}; worst conv ratio {data['worst_conv_ratio']}, met: "
                f"{data['goal_met']}. cuDNN TF32 off (precision matched).",
                "",
            ]
            continue
        text = json.dumps(data, indent=2, default=str)
        tail = data.get("tail") if isinstance(data, dict) else None
        if tail:
            data = {k: v2 for k, v2 in data.items() if k != "tail"}
            text = json.dumps(data, indent=2, default=str) + "\n\n" + tail
        out += ["```", text, "```", ""]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for gpu_check.md / .json")
    p.add_argument("--budget-s", type=float, default=540.0, help="global time budget")
    p.add_argument("--fake-cupy", action="store_true",
                   help="run on the CPU against the stand-in CuPy (plumbing only)")  # fmt: skip
    p.add_argument("--only", nargs="*", choices=SECTIONS, help="run only these sections")
    p.add_argument("--reps", type=int, default=20, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    if os.environ.get("FASTCONV_FAKE_CUPY", "") not in ("", "0"):
        args.fake_cupy = True
    names = args.only or list(SECTIONS)
    print(f"gpu_check: sections {', '.join(names)}; budget {args.budget_s:.0f} s; "
          f"{'stand-in CuPy on the CPU' if args.fake_cupy else 'device'}")  # fmt: skip
    if args.dry_run:
        for line in __doc__.split("\n\n")[1].splitlines():
            print(line)
        return 0
    if args.fake_cupy:
        from fastconv.gpu import _standin

        if not _standin.is_standin(sys.modules.get("cupy")):
            _standin.install()
    import fastconv
    from fastconv import gpu

    c = Check(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "fake-cupy" if c.fake else "device",
        "budget_s": args.budget_s,
        "sections": {},
    }
    if not fastconv.gpu_available():
        print(f"gpu_check: no usable GPU: {gpu.unavailable_reason()}", file=sys.stderr)
        run_section(report, "environment", c)
        names = []
        report["unavailable_reason"] = gpu.unavailable_reason()
    for name in names:
        run_section(report, name, c)
    report["seconds"] = round(time.perf_counter() - c.t0, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(to_markdown(report))
    print(f"wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'} ({report['seconds']} s)")
    if "unavailable_reason" in report:
        return 2
    return 1 if any(v["status"] == "failed" for v in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
