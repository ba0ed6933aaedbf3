"""Grouped, depthwise and dilated convolutions against PyTorch (oneDNN on the CPU), forward +
backward, in one run.

``--layers depthwise`` (default): every distinct depthwise 3x3 layer of MobileNetV2 at 224x224.
``--layers grouped``: ResNeXt-50 (32x4d)'s grouped 3x3 layers (32 groups) and DeepLab-style
dilated 3x3 layers (dilation 2 and 4). Batch 8 by default. Each round times fastconv
(``conv2d`` + ``conv2d_backward`` with ``groups``/``dilation``) and PyTorch (``conv2d`` forward
+ autograd backward, channels_last or not, the faster kept) one after the other, so both see
the same machine load; the table gives medians and the ratio (lower is faster for fastconv).

    python -m bench.depthwise_table --batch 8 --rounds 7
    python -m bench.depthwise_table --layers grouped --batch 8 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import fastconv as fc

from .common import machine_line

# (channels in = out, input height = width, stride, groups, dilation); groups None: depthwise
DEPTHWISE = [
    (32, 112, 1, None, 1),
    (96, 112, 2, None, 1),
    (144, 56, 1, None, 1),
    (144, 56, 2, None, 1),
    (192, 28, 1, None, 1),
    (192, 28, 2, None, 1),
    (384, 14, 1, None, 1),
    (576, 14, 1, None, 1),
    (576, 14, 2, None, 1),
    (960, 7, 1, None, 1),
]
GROUPED = [  # ResNeXt-50 32x4d's 3x3 layers; DeepLab-style dilated layers
    (128, 56, 1, 32, 1),
    (256, 28, 1, 32, 1),
    (512, 14, 1, 32, 1),
    (1024, 7, 1, 32, 1),
    (256, 28, 1, 1, 2),
    (512, 28, 1, 1, 4),
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
    parser.add_argument("--layers", choices=("depthwise", "grouped"), default="depthwise")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(machine_line(args.threads))
    print(f"batch {args.batch}, {args.rounds} interleaved rounds, forward + backward, ms")
    print("| layer (C, HxW, stride, groups, dilation) | fastconv | PyTorch | ratio |")
    print("|---|---:|---:|---:|")
    ratios = []
    for C, size, stride, groups, dilation in DEPTHWISE if args.layers == "depthwise" else GROUPED:
        G = C if groups is None else groups
        x = rng.standard_normal((args.batch, C, size, size)).astype(np.float32)
        w = (rng.standard_normal((C, C // G, 3, 3)) / 3).astype(np.float32)
        kw = {"stride": stride, "pad": dilation, "groups": G, "dilation": dilation}
        y = fc.conv2d(x, w, **kw)
        dy = rng.standard_normal(y.shape).astype(np.float32)

        def ours(x=x, w=w, dy=dy, kw=kw):
            fc.conv2d(x, w, **kw)
            fc.conv2d_backward(dy, x, w, **kw)

        def theirs(channels_last, x=x, w=w, dy=dy, stride=stride, dilation=dilation, G=G):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            tx = torch.from_numpy(x).to(memory_format=fmt).requires_grad_()
            tw = torch.from_numpy(w).requires_grad_()
            tdy = torch.from_numpy(dy).to(memory_format=fmt)

            def run():
                out = torch.nn.functional.conv2d(tx, tw, None, stride, dilation, dilation, G)
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
        print(f"| {C}, {size}x{size}, s{stride}, g{G}, d{dilation} | {med['fc']:.2f} | "
              f"{torch_ms:.2f} | "
              f"{med['fc'] / torch_ms:.2f}x |")  # fmt: skip
    print(f"geometric mean ratio: {float(np.exp(np.mean(np.log(ratios)))):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
