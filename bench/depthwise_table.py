"""MobileNetV2's depthwise 3x3 layers: fastconv's depthwise kernels against PyTorch's grouped
convolution (``groups == C``, oneDNN on the CPU), forward + backward, in one run.

Every distinct depthwise layer of MobileNetV2 at 224x224 (channels, input size, stride), batch 8
by default. Each round times fastconv (``depthwise_conv2d`` + ``depthwise_conv2d_backward``)
and PyTorch (``conv2d(groups=C)`` forward + autograd backward, channels_last or not, the
faster kept) one after the other, so both see the same machine load; the table gives medians
and the ratio (lower is faster for fastconv).

    python -m bench.depthwise_table --batch 8 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import fastconv as fc

from .common import machine_line

# (channels, input height = width, stride) of MobileNetV2's depthwise layers at 224x224
LAYERS = [
    (32, 112, 1),
    (96, 112, 2),
    (144, 56, 1),
    (144, 56, 2),
    (192, 28, 1),
    (192, 28, 2),
    (384, 14, 1),
    (576, 14, 1),
    (576, 14, 2),
    (960, 7, 1),
]


def _time(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(machine_line(args.threads))
    print(f"batch {args.batch}, {args.rounds} interleaved rounds, forward + backward, ms")
    print("| layer (C, HxW, stride) | fastconv | PyTorch | ratio |")
    print("|---|---:|---:|---:|")
    ratios = []
    for C, size, stride in LAYERS:
        x = rng.standard_normal((args.batch, C, size, size)).astype(np.float32)
        w = (rng.standard_normal((C, 1, 3, 3)) / 3).astype(np.float32)
        y = fc.depthwise_conv2d(x, w, None, stride, 1)
        dy = rng.standard_normal(y.shape).astype(np.float32)

        def ours():
            fc.depthwise_conv2d(x, w, None, stride, 1)
            fc.depthwise_conv2d_backward(dy, x, w, stride, 1)

        def theirs(channels_last):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            tx = torch.from_numpy(x).to(memory_format=fmt).requires_grad_()
            tw = torch.from_numpy(w).requires_grad_()
            tdy = torch.from_numpy(dy).to(memory_format=fmt)

            def run():
                out = torch.nn.functional.conv2d(tx, tw, None, stride, 1, groups=C)
                out.backward(tdy)

            return run

        runs = {"fc": ours, "nchw": theirs(False), "nhwc": theirs(True)}
        times = {k: [] for k in runs}
        for _ in range(args.rounds):
            for k, fn in runs.items():
                times[k].append(_time(fn, args.reps))
        med = {k: statistics.median(v) for k, v in times.items()}
        torch_ms = min(med["nchw"], med["nhwc"])
        ratios.append(med["fc"] / torch_ms)
        print(f"| {C}, {size}x{size}, s{stride} | {med['fc']:.2f} | {torch_ms:.2f} | "
              f"{med['fc'] / torch_ms:.2f}x |")  # fmt: skip
    print(f"geometric mean ratio: {float(np.exp(np.mean(np.log(ratios)))):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
