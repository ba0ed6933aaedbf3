"""What thread safety costs one thread: the launch lock and the workspace checkout per call.

Both are taken once per kernel call. Their cost is measured in isolation (uncontended, as on a
single-threaded caller) and set against the calls they guard: the smallest conv call, a deep
MNIST conv layer, and a whole training step. Prints a Markdown table; ``--out FILE`` replaces
the block between ``<!-- reliability-cost:start/end -->`` in FILE.

    python -m bench.thread_safety_cost --out docs/reliability.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

import fastconv as fc
from bench.common import check_region_target, write_region
from fastconv.cpu import _workspace as ws


def _per_call_us(fn, n):
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def _min_us(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="Markdown file to update")
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args(argv)
    if args.out:
        check_region_target(args.out)

    def lock():
        with ws.launch_guard():
            pass

    def checkout():
        with ws.checkout(("thread-safety-cost", 0), lambda alloc: alloc((16,))):
            pass

    for f in (lock, checkout):
        _per_call_us(f, 1000)
    lock_us = min(_per_call_us(lock, 20000) for _ in range(5))
    checkout_us = min(_per_call_us(checkout, 20000) for _ in range(5))
    guard_us = lock_us + checkout_us

    rng = np.random.default_rng(0)
    small_x = rng.random((1, 8, 8, 8), dtype=np.float32)
    small_w = rng.random((8, 8, 3, 3), dtype=np.float32)
    x = rng.random((100, 32, 14, 14), dtype=np.float32)
    w = rng.random((32, 32, 3, 3), dtype=np.float32)
    from fastconv.models import deep_mnist_net

    model = deep_mnist_net(seed=0).compile("adam")
    xb = rng.random((100, 1, 28, 28), dtype=np.float32)
    yb = rng.integers(0, 10, 100)
    cases = [
        ("conv2d (1, 8, 8, 8) * (8, 8, 3, 3): the smallest call", 1,
         lambda: fc.conv2d(small_x, small_w, None, 1, 1)),
        ("conv2d, deep MNIST conv3 (100, 32, 14, 14) * (32, 32, 3, 3)", 1,
         lambda: fc.conv2d(x, w, None, 1, 1)),
        ("deep MNIST training step, batch 100 (about 40 guarded calls)", 40,
         lambda: model.train_on_batch(xb, yb)),
    ]  # fmt: skip
    rows = []
    for name, calls, fn in cases:
        for _ in range(3):
            fn()
        t = _min_us(fn, args.repeats if calls == 1 else max(5, args.repeats // 20))
        rows.append((name, t, calls * guard_us / t))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"Launch lock (uncontended acquire + release): {lock_us:.3f} us per call; workspace "
        f"checkout + return: {checkout_us:.3f} us per call.",
        "",
        "| call | time (min) | lock + checkout share |",
        "|---|---:|---:|",
        *(f"| {n} | {t:,.0f} us | {s:.2%} |" for n, t, s in rows),
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
        f"Python {platform.python_version()}, NumPy {np.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load:.2f}. "
        "Regenerate: `python -m bench.thread_safety_cost --out docs/reliability.md`.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_region(args.out, "reliability-cost", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
