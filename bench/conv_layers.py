"""Conv layers: fastconv (fp32, fp16; any CPU algorithm) against PyTorch CPU (fp32).

For every layer it prints the median forward, backward and forward+backward time of each
implementation and the ratio to PyTorch measured in the same run (ratio < 1: fastconv is
faster). Both libraries use ``--threads`` threads (default 2, as in the goal). Layers:
``--net mnist`` (default), the deep-MNIST net of the book (ch. 8) at batch 100, or
``--net vgg``, the distinct 3x3 layers of VGG-16 at batch 8 on ``--size`` x ``--size``
inputs (default 64: 224 / 3.5; ``--size 224`` for the real thing, ~1 minute a round).
``--algorithms`` lists the fastconv algorithms to time (default ``auto``, the per-shape rule;
the algorithm it picked is printed per layer).

    python -m bench.conv_layers [--repeats 15] [--threads 2] [--stat median|min]
        [--net mnist|vgg] [--batch N] [--size 64] [--no-fp16] [--layers conv1,conv2]
        [--algorithms auto,direct,winograd4x4] [--forward-only] [--clock wall|cpu]

``--clock cpu`` (one thread only) times process CPU time: on a machine shared with busy
processes it measures what the code costs rather than the share of a core it got.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import fastconv as fc
from bench.common import deep_mnist_layers

# (name, C_in, F, H=W, pad), all 3x3 stride 1 (book ch. 8), read from deep_mnist_net().
LAYERS = [(m.name, m.C, m.F, m.H, m.pad) for m in deep_mnist_layers() if m.kind == "conv"]


def vgg_layers(size=64):
    """The distinct 3x3 pad-1 layers of VGG-16 (Simonyan & Zisserman 2015, config D) on a
    ``size`` x ``size`` input; each block halves the image (2x2 max pooling)."""
    blocks = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512),
              (512, 512), (512, 512)]  # fmt: skip
    scale = [1, 1, 2, 2, 4, 4, 8, 8, 16]
    names = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv4_1",
             "conv4_2", "conv5_1"]  # fmt: skip
    return [
        (name, C, F, max(1, size // s), 1)
        for name, (C, F), s in zip(names, blocks, scale, strict=True)
    ]


def _fastconv_calls(x, w, b, dy, pad, algorithm):
    def fwd():
        fc.conv2d(x, w, b, 1, pad, activation="relu", algorithm=algorithm)

    def bwd():
        fc.conv2d_backward(dy, x, w, 1, pad, algorithm=algorithm)

    def both():
        fwd()
        bwd()

    return fwd, bwd, both


def _torch_calls(x, w, b, dy, pad):
    import torch

    xt = torch.from_numpy(x).requires_grad_(True)
    wt = torch.from_numpy(w).requires_grad_(True)
    bt = torch.from_numpy(b).requires_grad_(True)
    dyt = torch.from_numpy(dy)
    F = torch.nn.functional

    def fwd():
        with torch.no_grad():
            F.relu(F.conv2d(xt, wt, bt, padding=pad))

    # Backward of the bare conv (dx, dw, db), like fastconv's conv2d_backward.
    y = F.conv2d(xt, wt, bt, padding=pad)

    def bwd():
        torch.autograd.grad(y, (xt, wt, bt), dyt, retain_graph=True)

    def both():
        out = F.relu(F.conv2d(xt, wt, bt, padding=pad))
        torch.autograd.grad(out, (xt, wt, bt), dyt)

    return fwd, bwd, both


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _interleaved_times(calls, repeats, stat, warmup=3, clock="wall"):
    """Median (or minimum) time of every call, measured round-robin so that load from other
    processes on a shared machine hits every implementation alike (ratios are what we report).
    The minimum estimates the uncontended time when the machine is shared."""
    times = {key: [] for key in calls}
    for rep in range(warmup + repeats):
        for key, fn in calls.items():
            t0 = CLOCKS[clock]()
            fn()
            if rep >= warmup:
                times[key].append(CLOCKS[clock]() - t0)
    reduce = min if stat == "min" else statistics.median
    return {key: reduce(v) for key, v in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--net", choices=("mnist", "vgg"), default="mnist")
    parser.add_argument("--batch", type=int, help="default 100 (mnist) or 8 (vgg)")
    parser.add_argument("--size", type=int, default=64, help="vgg input height = width")
    parser.add_argument("--no-fp16", action="store_true", help="skip the float16 timings")
    parser.add_argument("--layers", help="comma-separated layer names (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both libraries")
    parser.add_argument("--stat", choices=("median", "min"), default="median")
    parser.add_argument(
        "--algorithms", default="auto", help="fastconv algorithms, e.g. auto,direct,winograd4x4"
    )
    parser.add_argument("--forward-only", action="store_true", help="time forward passes only")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="cpu: process CPU time (only with --threads 1), robust to other processes' load",
    )
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (idle OpenMP workers spin and count)")
    layers = LAYERS if args.net == "mnist" else vgg_layers(args.size)
    batch = args.batch or (100 if args.net == "mnist" else 8)
    algorithms = args.algorithms.split(",")

    try:
        import torch

        torch.set_num_threads(args.threads)
        have_torch = True
    except ImportError:
        have_torch = False
        print("torch not importable: printing fastconv times only")

    import numba

    # fastconv.cpu picks Numba's threading layer at import, which only works before the
    # first parallel launch; numba.set_num_threads is one, so import it first (without this
    # the benchmark ran on the OpenMP layer, unlike fastconv in normal use).
    import fastconv.cpu  # noqa: F401

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    print(
        f"Numba threading layer: {numba.threading_layer()}; load average {os.getloadavg()[0]:.1f}"
    )
    rng = np.random.default_rng(0)
    wanted = set(args.layers.split(",")) if args.layers else {name for name, *_ in layers}
    width = max(8, *(len(a) + 5 for a in algorithms))
    header = f"{'layer':7} {'impl':{width}} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8}"
    if have_torch:
        header += f" {'fwd/pt':>7} {'bwd/pt':>7} {'f+b/pt':>7}"
    print(
        f"{args.net}, batch {batch}, {args.threads} thread(s), {args.stat} of {args.repeats}"
        f" interleaved runs ({args.clock} time); ratio < 1 means faster than PyTorch"
    )
    print(header)
    totals: dict[str, np.ndarray] = {}
    for name, C, F_, HW, pad in layers:
        if name not in wanted:
            continue
        x = rng.standard_normal((batch, C, HW, HW)).astype(np.float32)
        w = (rng.standard_normal((F_, C, 3, 3)) * np.sqrt(2.0 / (9 * C))).astype(np.float32)
        b = rng.standard_normal(F_).astype(np.float32) * 0.1
        OHW = HW + 2 * pad - 2
        dy = rng.standard_normal((batch, F_, OHW, OHW)).astype(np.float32)
        impls = {}
        if have_torch:
            impls["torch32"] = _torch_calls(x, w, b, dy, pad)
        for algorithm in algorithms:
            impls[f"fc32 {algorithm}"] = _fastconv_calls(x, w, b, dy, pad, algorithm)
            if not args.no_fp16:
                half = (a.astype(np.float16) for a in (x, w, b, dy))
                impls[f"fc16 {algorithm}"] = _fastconv_calls(*half, pad, algorithm)
        passes = (0,) if args.forward_only else (0, 1, 2)
        calls = {(impl, k): fn for impl, fns in impls.items() for k, fn in enumerate(fns)
                 if k in passes}  # fmt: skip
        fc.clear_conv_algorithm_choices()
        med = _interleaved_times(calls, args.repeats, args.stat, clock=args.clock)
        picked = sorted({f"{c.pass_} {c.algorithm}" for c in fc.conv_algorithm_choices()
                         if c.dtype == "float32" and c.source == "rule"}, reverse=True)  # fmt: skip
        if picked:
            print(f"{name}: auto ran " + ", ".join(picked))
        nan = float("nan")
        rows = {impl: tuple(med.get((impl, k), nan) for k in range(3)) for impl in impls}
        for impl, t in rows.items():
            line = f"{name:7} {impl:{width}} " + " ".join(f"{1e3 * v:8.2f}" for v in t)
            if have_torch:
                line += " " + " ".join(
                    f"{v / p:7.2f}" for v, p in zip(t, rows["torch32"], strict=True)
                )
            print(line)
            totals[impl] = totals.get(impl, np.zeros(3)) + np.array(t)
    for impl, t in totals.items():
        line = f"{'total':7} {impl:{width}} " + " ".join(f"{1e3 * v:8.2f}" for v in t)
        if have_torch:
            line += " " + " ".join(
                f"{v / p:7.2f}" for v, p in zip(t, totals["torch32"], strict=True)
            )
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
