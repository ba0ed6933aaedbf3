"""BatchNorm2D and global average pooling on the deep-MNIST shapes: fastconv vs PyTorch CPU.

Usage::

    python -m bench.norm_table [--out docs/benchmarks.md] [--repeats 200] [--stat median]

For every activation shape of the book's deep MNIST net at batch 100 (16@28x28, 32@14x14,
32@16x16, 64@8x8, and 64@4x4 after the last pool) this times one training step of each layer:

* BatchNorm2D: the training forward (batch statistics, normalise) plus the backward
  (dx, dgamma, dbeta). fastconv: ``batch_norm_forward`` + ``batch_norm_backward``; PyTorch:
  ``aten.native_batch_norm`` (training, running statistics updated) +
  ``aten.native_batch_norm_backward``, the kernels autograd calls, without autograd's overhead.
* Global average pooling: ``global_avg_pool2d`` + ``global_avg_pool2d_backward``; PyTorch:
  ``aten._adaptive_avg_pool2d(x, 1)`` + ``aten._adaptive_avg_pool2d_backward``.

fastconv runs in float32 and float16 (half storage, float32 arithmetic); PyTorch in float32 with
2 threads. All implementations are timed in interleaved rounds (the order rotates each round)
so that load from other processes hits them alike; each entry is the median (or ``--stat min``)
of its rounds, and every ratio is against PyTorch in the same run (below 1 is faster). The
machine and its load average are printed with the table; ``--out`` writes the table between
the ``<!-- norm-table:start -->`` / ``<!-- norm-table:end -->`` markers of a markdown file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import fastconv  # noqa: E402
from bench.common import check_region_target, machine_line, write_region  # noqa: E402

try:
    import torch
except ImportError:
    torch = None

BATCH = 100
SHAPES = [(16, 28), (32, 14), (32, 16), (64, 8), (64, 4)]  # (C, H = W)
OPS = ("bn", "gap")
OP_NAMES = {"bn": "BatchNorm2D fwd+bwd", "gap": "global avg pool fwd+bwd"}
STATS = {"median": statistics.median, "min": min}


def make_calls(op: str, C: int, H: int, seed: int = 0) -> dict:
    """``{impl: zero-argument callable}`` running one forward + backward of ``op``."""
    rng = np.random.default_rng(seed)
    shape = (BATCH, C, H, H)
    x64 = rng.standard_normal(shape) * 2.0 + 0.5
    dy64 = rng.standard_normal(shape)
    gamma64, beta64 = rng.standard_normal(C), rng.standard_normal(C)
    calls = {}
    for impl, dtype in (("fastconv fp32", np.float32), ("fastconv fp16", np.float16)):
        x, dy = x64.astype(dtype), dy64.astype(dtype)
        gamma, beta = gamma64.astype(dtype), beta64.astype(dtype)
        if op == "bn":

            def step(x=x, dy=dy, gamma=gamma, beta=beta):
                _, mean, var = fastconv.batch_norm_forward(x, gamma, beta)
                return fastconv.batch_norm_backward(dy, x, gamma, mean, var)

        else:
            dyg = dy[:, :, 0, 0].copy()

            def step(x=x, dyg=dyg):
                fastconv.global_avg_pool2d(x)
                return fastconv.global_avg_pool2d_backward(dyg, x.shape)

        calls[impl] = step
    if torch is not None:
        xt, dyt = (
            torch.from_numpy(x64.astype(np.float32)),
            torch.from_numpy(dy64.astype(np.float32)),
        )
        gt = torch.from_numpy(gamma64.astype(np.float32))
        bt = torch.from_numpy(beta64.astype(np.float32))
        rm, rv = torch.zeros(C), torch.ones(C)
        aten = torch.ops.aten
        if op == "bn":

            def torch_step():
                _, save_mean, save_invstd = aten.native_batch_norm(
                    xt, gt, bt, rm, rv, True, 0.1, 1e-5
                )
                return aten.native_batch_norm_backward(
                    dyt, xt, gt, rm, rv, save_mean, save_invstd, True, 1e-5, [True, True, True]
                )

        else:
            dyg = dyt[:, :, :1, :1].contiguous()

            def torch_step():
                aten._adaptive_avg_pool2d(xt, [1, 1])
                return aten._adaptive_avg_pool2d_backward(dyg, xt)

        calls["torch"] = torch_step
    return calls


def time_calls(calls: dict, repeats: int, stat: str) -> dict:
    """Seconds per call for each implementation: ``stat`` over interleaved rounds."""
    for fn in calls.values():
        for _ in range(3):
            fn()  # compile, warm caches and the allocator
    names = list(calls)
    samples = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            t0 = time.perf_counter()
            calls[name]()
            samples[name].append(time.perf_counter() - t0)
    return {name: STATS[stat](ts) for name, ts in samples.items()}


def _cell(t: float, base: float | None) -> str:
    us = f"{t * 1e6:.0f} us"
    return f"{us} ({t / base:.2f}x)" if base else us


def build_table(repeats: int, stat: str, ops=OPS, shapes=SHAPES, log=print) -> str:
    impls = (
        ["torch", "fastconv fp32", "fastconv fp16"]
        if torch is not None
        else [
            "fastconv fp32",
            "fastconv fp16",
        ]
    )
    head = ["op", "shape (batch 100)"] + [i if i == "torch" else f"{i} (x torch)" for i in impls]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    worst = {}
    for op in ops:
        for C, H in shapes:
            log(f"timing {op} {C}@{H}x{H} ...")
            t = time_calls(make_calls(op, C, H), repeats, stat)
            base = t.get("torch")
            row = [OP_NAMES[op], f"{C}@{H}x{H}"]
            row += [_cell(t[i], None if i == "torch" else base) for i in impls]
            rows.append("| " + " | ".join(row) + " |")
            if base:
                for i in impls[1:]:
                    worst[(op, i)] = max(worst.get((op, i), 0.0), t[i] / base)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    notes = (
        f"{stat.capitalize()} of {repeats} interleaved rounds after 3 warm-up calls; one round "
        "runs each implementation once (forward + backward); ratio = time / PyTorch time in the "
        "same run, below 1 is faster. PyTorch: `aten.native_batch_norm` (training) + "
        "`native_batch_norm_backward`, `aten._adaptive_avg_pool2d` + its backward, float32, "
        "2 threads; fastconv through its public, validating functions."
    )
    if worst:
        notes += (
            " Worst ratio over the shapes: "
            + ", ".join(f"{OP_NAMES[op]} {impl} {r:.2f}x" for (op, impl), r in worst.items())
            + "."
        )
    notes += f"\n\nMachine: {machine_line()}"
    if load:
        notes += f"; load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min)"
    return "\n".join(rows) + "\n\n" + notes + ".\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="markdown file whose norm-table region to replace")
    parser.add_argument("--repeats", type=int, default=200, help="interleaved rounds (default 200)")
    parser.add_argument(
        "--stat", choices=sorted(STATS), default="median", help="median (default) or min"
    )
    parser.add_argument("--ops", nargs="*", choices=OPS, default=list(OPS))
    args = parser.parse_args(argv)
    if args.out:
        check_region_target(args.out)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if torch is not None:
        torch.set_num_threads(2)
    table = build_table(args.repeats, args.stat, args.ops, log=lambda m: print(m, file=sys.stderr))
    print(table)
    if args.out:
        write_region(args.out, "norm-table", table)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
