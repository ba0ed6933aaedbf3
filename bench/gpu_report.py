"""GPU report: ``PYTHONPATH=. python bench/gpu_report.py --out DIR [--dry-run]``.

Run on a CUDA machine (CuPy matching its CUDA, PyTorch with cuDNN, numba, pytest; no internet
needed) from the repository root. In order, each part failing on its own without stopping the
rest:

1. ``pytest -m gpu tests/test_gpu.py``: the kernel suite on CuPy arrays vs the float64 reference
   and the CPU backend.
2. Every convolution and pooling layer of the deep MNIST net (batch 100), forward and backward,
   float32 and float16: fastconv vs PyTorch/cuDNN on the same device, timed with CUDA events,
   interleaved rounds, medians; ratio = PyTorch time / fastconv time (> 1: fastconv faster).
   Outputs are also compared (max relative difference). Precision is matched: cuDNN TF32 is off
   (fastconv's float32 GEMMs use CuPy's default full-FP32 cuBLAS compute type).
3. If ``fastconv.models`` exists: the deep MNIST net trained ``--epochs`` epochs on the GPU
   (float32, Adam 1e-3, batch 100), test accuracy, and a training step vs the same net in
   PyTorch on the GPU.

Writes ``DIR/gpu_report.md`` and ``DIR/gpu_report.json``. ``--dry-run`` prints the plan and exits
0 without touching CuPy, PyTorch or a device (CI runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's fastconv, even when PYTHONPATH is unset

BATCH = 100
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


def plan(args) -> list[str]:
    layers = [n for n, *_ in CONV_LAYERS] + [n for n, _ in POOL_LAYERS]
    return [
        f"1. {sys.executable} -m pytest -m gpu tests/test_gpu.py (device kernel suite)",
        f"2. time {', '.join(layers)} forward+backward, batch {BATCH}, {' and '.join(DTYPES)}:"
        f" fastconv vs PyTorch/cuDNN, CUDA events, {args.rounds} interleaved rounds of"
        f" {args.reps} calls, medians, ratio = torch/fastconv; outputs cross-checked",
        f"3. if fastconv.models exists: train deep_mnist_net {args.epochs} epoch(s) on the GPU"
        f" (float32, Adam 1e-3, batch {BATCH}), test accuracy, step time vs PyTorch on the GPU",
        f"4. write {Path(args.out) / 'gpu_report.md'} and {Path(args.out) / 'gpu_report.json'}",
    ]


# --- environment ---------------------------------------------------------------------------------


def environment() -> dict:
    import cupy
    import torch

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return {
        "device": name.decode() if isinstance(name, bytes) else str(name),
        "compute_capability": cupy.cuda.Device().compute_capability,
        "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "cupy": cupy.__version__,
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "CUPY_TF32": os.environ.get("CUPY_TF32", ""),
    }


# --- 1. test suite -------------------------------------------------------------------------------


def run_tests() -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "tests/test_gpu.py"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = (done.stdout + done.stderr).strip().splitlines()
    return {
        "command": " ".join(cmd[1:]),
        "returncode": done.returncode,
        "summary": lines[-1] if lines else "",
        "tail": "\n".join(lines[-40:]),
        "seconds": round(time.perf_counter() - t0, 1),
    }


# --- 2. per-layer timings ------------------------------------------------------------------------


def _cuda_ms(fn, reps: int, lib: str) -> float:
    """Mean ms per call of ``fn`` over ``reps`` back-to-back calls, by CUDA events."""
    if lib == "cupy":
        import cupy

        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        stop.synchronize()
        return cupy.cuda.get_elapsed_time(start, stop) / reps
    import torch

    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / reps


def time_pair(ours, theirs, reps: int, rounds: int) -> tuple[float, float]:
    """Interleaved rounds so that clock and thermal drift hit both sides alike; medians."""
    import cupy
    import torch

    for _ in range(3):  # warm-up: NVRTC/module load, cuDNN autotuning, allocator pools
        ours()
        theirs()
    cupy.cuda.Device().synchronize()
    torch.cuda.synchronize()
    a, b = [], []
    for _ in range(rounds):
        a.append(_cuda_ms(ours, reps, "cupy"))
        b.append(_cuda_ms(theirs, reps, "torch"))
    return statistics.median(a), statistics.median(b)


def _max_rel_diff(ours, theirs) -> float:
    import cupy

    a = cupy.asnumpy(ours).astype("float64")
    b = theirs.detach().float().cpu().numpy().astype("float64")
    return float(abs(a - b).max() / max(abs(b).max(), 1.0))


def time_layers(reps: int, rounds: int) -> list[dict]:
    import cupy
    import torch
    import torch.nn.functional as tf

    import fastconv

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False  # same precision as fastconv's FP32 cuBLAS GEMMs
    torch.backends.cuda.matmul.allow_tf32 = False
    rng = cupy.random.default_rng(0)
    rows = []

    def t(a):
        return torch.as_tensor(a, device="cuda")

    for dtype in DTYPES:
        for name, (c, h, w), f, pad in CONV_LAYERS:
            x = rng.standard_normal((BATCH, c, h, w), dtype="float32").astype(dtype)
            wt = (rng.standard_normal((f, c, 3, 3), dtype="float32") / (9 * c) ** 0.5).astype(dtype)
            b = (0.1 * rng.standard_normal((f,), dtype="float32")).astype(dtype)
            y = fastconv.conv2d(x, wt, b, pad=pad, activation="relu")
            dy = rng.standard_normal(y.shape, dtype="float32").astype(dtype)
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

            agree_fwd = _max_rel_diff(ours_fwd(), torch_fwd())
            agree_bwd = max(
                _max_rel_diff(o, r) for o, r in zip(ours_bwd(), torch_bwd(), strict=True)
            )
            for direction, o, r, agree in (
                ("forward", ours_fwd, torch_fwd, agree_fwd),
                ("backward", ours_bwd, torch_bwd, agree_bwd),
            ):
                ms_o, ms_t = time_pair(o, r, reps, rounds)
                rows.append(_row(name, "conv", dtype, direction, ms_o, ms_t, agree))
        for name, (c, h, w) in POOL_LAYERS:
            x = rng.standard_normal((BATCH, c, h, w), dtype="float32").astype(dtype)
            dy = rng.standard_normal((BATCH, c, h // 2, w // 2), dtype="float32").astype(dtype)
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

            passes = (("forward", ours_fwd, torch_fwd), ("backward", ours_bwd, torch_bwd))
            for direction, o, r in passes:
                agree = _max_rel_diff(o(), r())
                ms_o, ms_t = time_pair(o, r, reps, rounds)
                rows.append(_row(name, "pool", dtype, direction, ms_o, ms_t, agree))
    return rows


def _row(name, kind, dtype, direction, ms_ours, ms_torch, agree) -> dict:
    return {
        "layer": name,
        "kind": kind,
        "dtype": dtype,
        "pass": direction,
        "fastconv_ms": round(ms_ours, 4),
        "torch_ms": round(ms_torch, 4),
        "ratio_torch_over_fastconv": round(ms_torch / ms_ours, 3),
        "max_rel_diff_vs_torch": agree,
    }


# --- 3. training ---------------------------------------------------------------------------------


def _torch_deep_mnist():
    import torch
    from torch import nn

    def conv(c, f, pad):
        return [nn.Conv2d(c, f, 3, padding=pad), nn.ReLU()]

    layers = [
        *conv(1, 16, 1), *conv(16, 16, 1), nn.MaxPool2d(2),
        *conv(16, 32, 1), *conv(32, 32, 2), nn.MaxPool2d(2),
        *conv(32, 64, 1), *conv(64, 64, 1), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(1024, 50), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(50, 10), nn.Dropout(0.5),
    ]  # fmt: skip
    model = nn.Sequential(*layers).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, opt


def train(epochs: int, reps: int) -> dict:
    try:
        from fastconv.models import deep_mnist_net
    except ImportError as e:
        return {"skipped": f"fastconv.models is not available on this branch ({e})"}
    try:
        from fastconv.datasets import load_mnist
    except ImportError as e:
        return {"skipped": f"fastconv.datasets is not available ({e})"}
    import cupy
    import numpy as np
    import torch

    (x_train, y_train), (x_test, y_test) = load_mnist()
    net = deep_mnist_net(seed=0)
    net.compile("adam", "softmax_cross_entropy")
    net.build(x_train.shape[1:])
    net = net.to("gpu", "float32")
    rng = np.random.default_rng(0)
    history = []
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x_train))
        losses = []
        cupy.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for start in range(0, len(x_train), BATCH):
            # NumPy batches through the documented interface: the model moves them to the GPU.
            sel = order[start : start + BATCH]
            losses.append(net.train_on_batch(x_train[sel], y_train[sel])["loss"])
        cupy.cuda.Device().synchronize()
        seconds = time.perf_counter() - t0
        test = net.evaluate(x_test, y_test, batch_size=500)
        history.append(
            {
                "epoch": epoch,
                "seconds": round(seconds, 2),
                "train_loss": float(np.mean(losses)),
                "test_accuracy": float(test["accuracy"]),
            }
        )

    # One training step, same batch, fastconv vs PyTorch on this GPU (interleaved medians).
    model, opt = _torch_deep_mnist()
    xb, yb = x_train[:BATCH], y_train[:BATCH]
    loss_fn = torch.nn.CrossEntropyLoss()

    # Same work on both sides: copy the NumPy batch to the device, step, read the loss back
    # (train_on_batch returns floats, which synchronises).
    def torch_step():
        xt, yt = torch.from_numpy(xb).cuda(), torch.from_numpy(yb).cuda()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xt), yt)
        loss.backward()
        opt.step()
        return loss.item()

    def ours_step():
        return net.train_on_batch(xb, yb)

    ms_o, ms_t = time_pair(ours_step, torch_step, reps, 5)
    return {
        "epochs": history,
        "step_ms_fastconv": round(ms_o, 3),
        "step_ms_torch": round(ms_t, 3),
        "step_ratio_torch_over_fastconv": round(ms_t / ms_o, 3),
    }


# --- report --------------------------------------------------------------------------------------


def _section(report, key, fn, *a):
    t0 = time.perf_counter()
    try:
        report[key] = fn(*a)
    except Exception:
        report[key] = {"error": traceback.format_exc()}
    print(f"[gpu_report] {key}: {time.perf_counter() - t0:.1f} s", flush=True)


def to_markdown(r: dict) -> str:
    out = ["# fastconv GPU report", ""]
    env = r.get("environment", {})
    out += [f"- {k}: {v}" for k, v in env.items()] + [""]
    t = r.get("tests", {})
    out += ["## Device test suite", ""]
    if "error" in t:
        out += ["```", t["error"], "```", ""]
    else:
        out += [f"`{t.get('command')}` -> rc {t.get('returncode')}: {t.get('summary')}", ""]
        if t.get("returncode"):
            out += ["```", t.get("tail", ""), "```", ""]
    out += ["## Layers (batch 100): fastconv vs PyTorch/cuDNN, CUDA events, medians", ""]
    layers = r.get("layers")
    if isinstance(layers, dict):
        out += ["```", layers.get("error", ""), "```", ""]
    elif layers:
        out += [
            "| layer | dtype | pass | fastconv ms | torch ms | torch/fastconv | max rel diff |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        out += [
            f"| {x['layer']} | {x['dtype']} | {x['pass']} | {x['fastconv_ms']:.3f} | "
            f"{x['torch_ms']:.3f} | {x['ratio_torch_over_fastconv']:.2f} | "
            f"{x['max_rel_diff_vs_torch']:.1e} |"
            for x in layers
        ]
        out += ["", "Ratio > 1: fastconv faster. cuDNN TF32 off (precision matched).", ""]
    tr = r.get("training", {})
    out += ["## Training (deep MNIST, float32, GPU)", ""]
    if "error" in tr or "skipped" in tr:
        out += ["```", tr.get("error", tr.get("skipped", "")), "```", ""]
    else:
        out += ["| epoch | seconds | train loss | test accuracy |", "|---:|---:|---:|---:|"]
        out += [
            f"| {e['epoch']} | {e['seconds']} | {e['train_loss']:.4f} | {e['test_accuracy']:.4f} |"
            for e in tr.get("epochs", [])
        ]
        out += [
            "",
            f"Training step: fastconv {tr['step_ms_fastconv']} ms, PyTorch {tr['step_ms_torch']}"
            f" ms, torch/fastconv {tr['step_ratio_torch_over_fastconv']}",
            "",
        ]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for gpu_report.md / .json")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--reps", type=int, default=20, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-training", action="store_true")
    args = p.parse_args(argv)
    for line in plan(args):
        print(line)
    if args.dry_run:
        return 0

    import fastconv
    from fastconv import gpu

    if not fastconv.gpu_available():
        print(f"gpu_report: no usable GPU: {gpu.unavailable_reason()}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _section(report, "environment", environment)
    if not args.skip_tests:
        _section(report, "tests", run_tests)
    _section(report, "layers", time_layers, args.reps, args.rounds)
    if not args.skip_training:
        _section(report, "training", train, args.epochs, args.reps)
    (out / "gpu_report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_report.md").write_text(to_markdown(report))
    print(f"wrote {out / 'gpu_report.md'} and {out / 'gpu_report.json'}")
    failed = report.get("tests", {}).get("returncode", 0) != 0 or any(
        isinstance(v, dict) and "error" in v for v in report.values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
