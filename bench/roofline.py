"""Roofline of the deep-MNIST conv layers: effective GFLOP/s against this machine's FMA peak.

For each layer and pass (forward = conv + bias + ReLU; backward = dx, dW, db) the *direct
convolution's* FLOP count (2 * N * F * C * kh * kw * OH * OW per product; the backward does two
such products) divided by the measured time, for fastconv (its ``auto`` algorithm, float32)
and PyTorch CPU (oneDNN), both on ``--threads`` threads, timed in interleaved rounds. The peak
comes from ``bench/fma_peak.py`` (vector FMAs, CPU time per thread). An algorithm that does
fewer multiplies than direct convolution (Winograd) can show an effective rate above the
peak: that is the point of it.

Usage::

    python -m bench.roofline [--threads 2] [--repeats 15] [--stat median|min]
                                          [--png docs/roofline.png] [--md out.md]
                                          [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np

import fastconv as fc  # noqa: E402
from bench.conv_layers import LAYERS  # noqa: E402
from bench.fma_peak import fma_peak, micro_kernel_rate  # noqa: E402

try:
    import torch
except ImportError:
    torch = None

BATCH = 100


def _calls(name, C, F, HW, pad, rng):
    x = rng.standard_normal((BATCH, C, HW, HW)).astype(np.float32)
    w = (rng.standard_normal((F, C, 3, 3)) * np.sqrt(2.0 / (9 * C))).astype(np.float32)
    b = (rng.standard_normal(F) * 0.1).astype(np.float32)
    out = HW + 2 * pad - 2
    dy = rng.standard_normal((BATCH, F, out, out)).astype(np.float32)
    calls = {
        ("fastconv", "forward"): lambda: fc.conv2d(x, w, b, 1, pad, "relu"),
        ("fastconv", "backward"): lambda: fc.conv2d_backward(dy, x, w, 1, pad),
    }
    if torch is not None:
        xt, wt, bt, dyt = (torch.from_numpy(a) for a in (x, w, b, dy))
        conv_bwd = torch.ops.aten.convolution_backward
        calls[("torch", "forward")] = lambda: torch.relu(
            torch.nn.functional.conv2d(xt, wt, bt, padding=pad)
        )
        calls[("torch", "backward")] = lambda: conv_bwd(
            dyt, xt, wt, [F], [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, [True] * 3
        )
    flops = 2 * BATCH * F * C * 9 * out * out
    return calls, {"forward": flops, "backward": 2 * flops}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(threads, repeats, stat, clock="wall"):
    """Rows ``(layer, pass, flops, {impl: seconds}, algorithm)``."""
    rng = np.random.default_rng(0)
    reduce = min if stat == "min" else statistics.median
    rows = []
    for name, C, F, HW, pad in LAYERS:
        calls, flops = _calls(name, C, F, HW, pad, rng)
        for fn in calls.values():
            fn()
            fn()
        fc.clear_conv_algorithm_choices()
        samples = {key: [] for key in calls}
        keys = list(calls)
        for r in range(repeats):
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                t0 = CLOCKS[clock]()
                calls[key]()
                samples[key].append(CLOCKS[clock]() - t0)
        ran = {c.pass_: c.algorithm for c in fc.conv_algorithm_choices()}
        for pass_ in ("forward", "backward"):
            times = {impl: reduce(samples[(impl, p)]) for impl, p in samples if p == pass_}
            rows.append((name, pass_, flops[pass_], times, ran.get(pass_, "?")))
    return rows


def markdown(rows, peak, micro, threads, stat, repeats, clock="wall"):
    head = (
        "| layer | pass | direct MFLOP | PyTorch ms | PyTorch GFLOP/s (of peak) | "
        "fastconv ms | fastconv GFLOP/s (of peak) | fastconv algorithm | fastconv / PyTorch |"
    )
    lines = [head, "|" + "---|" * 9]
    for name, pass_, flops, times, algorithm in rows:
        fct = times["fastconv"]
        cells = [name, pass_, f"{flops / 1e6:.0f}"]
        if "torch" in times:
            pt = times["torch"]
            cells += [f"{pt * 1e3:.2f}", f"{flops / pt / 1e9:.0f} ({flops / pt / 1e9 / peak:.0%})"]
        else:
            cells += ["n/a", "n/a"]
        cells += [f"{fct * 1e3:.2f}", f"{flops / fct / 1e9:.0f} ({flops / fct / 1e9 / peak:.0%})"]
        cells += [algorithm, f"{fct / times['torch']:.2f}" if "torch" in times else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    note = (
        f"\n{stat.capitalize()} of {repeats} interleaved calls ({clock} time), batch {BATCH}, "
        f"{threads} thread(s) for both libraries. Peak: {peak:.0f} GFLOP/s (vector FMAs, "
        f"`bench/fma_peak.py`, CPU time per thread); fastconv's GEMM micro-kernel on "
        f"L1-resident operands: {micro:.0f} GFLOP/s. Effective GFLOP/s = direct-convolution "
        f"FLOPs / time (Winograd does fewer). {now}; load average {os.getloadavg()[0]:.1f}.\n"
    )
    return "\n".join(lines) + "\n" + note


def plot(rows, peak, micro, threads, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{name}\n{'fwd' if pass_ == 'forward' else 'bwd'}" for name, pass_, *_ in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=80)
    width = 0.4
    for k, (impl, color) in enumerate((("torch", "#888888"), ("fastconv", "#1f77b4"))):
        rates = [r[2] / r[3][impl] / 1e9 if impl in r[3] else 0 for r in rows]
        label = "PyTorch (oneDNN, direct)" if impl == "torch" else "fastconv (auto)"
        ax.bar(x + (k - 0.5) * width, rates, width, label=label, color=color)
    ax.axhline(peak, color="red", linestyle="--", linewidth=1, label=f"FMA peak {peak:.0f}")
    ax.axhline(micro, color="orange", linestyle=":", linewidth=1,
               label=f"GEMM micro-kernel {micro:.0f}")  # fmt: skip
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("direct-conv GFLOP/s")
    ax.set_title(f"Deep-MNIST conv layers, batch {BATCH}, {threads} threads", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--stat", choices=("median", "min"), default="median")
    parser.add_argument("--png", type=Path, help="write a bar chart here")
    parser.add_argument("--md", type=Path, help="write the markdown table here")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: process CPU time (only with --threads 1)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (idle OpenMP workers spin and count)")
    if torch is not None:
        torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    peak = fma_peak(args.threads)
    micro = micro_kernel_rate(args.threads)
    rows = measure(args.threads, args.repeats, args.stat, args.clock)
    table = markdown(rows, peak, micro, args.threads, args.stat, args.repeats, args.clock)
    print(table)
    if args.md:
        args.md.write_text(table)
    if args.png:
        plot(rows, peak, micro, args.threads, args.png)
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
