"""Every zoo model's forward pass: fastconv ``predict`` against ONNX Runtime on the same exported
weights, in one process, interleaved rounds (issue 21's "every other zoo model's forward").

For each model: build it (seeded), export it (``fastconv.onnx.to_onnx``), check that the logits
agree within 1e-4 of the largest, then time ``predict`` and the ONNX Runtime session (all graph
optimisations, ``--threads`` intra-op threads, sequential) on the same batch, alternating which
goes first, with a pause between them so that the other's spinning threads sleep. Medians and
the ratio (fastconv / ONNX Runtime; below 1 is faster).

    python -m bench.zoo_vs_ort --batch 8 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from fastconv.benchmark_ort import _agree, _session
from fastconv.models import MODELS

from .common import machine_line

DEFAULT = ["lenet5", "alexnet", "vgg16", "resnet18", "resnet34", "googlenet", "mobilenet_v2"]


def _ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT, choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settle", type=float, default=0.2, help="seconds between the two")
    args = parser.parse_args(argv)
    print(machine_line(args.threads))
    print(f"batch {args.batch}, {args.rounds} interleaved rounds, forward (predict), ms")
    print("| model | fastconv | ONNX Runtime | ratio | logits agree |")
    print("|---|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for name in args.models:
        model = MODELS[name](seed=0)
        x = rng.standard_normal((args.batch, *model.input_shape)).astype(np.float32)
        ort = _session(model, args.threads)
        diff = _agree(name, model.predict(x), ort(x))
        runs = {"fastconv": lambda m=model, x=x: m.predict(x), "ort": lambda o=ort, x=x: o(x)}
        times = {"fastconv": [], "ort": []}
        for r in range(args.rounds):
            for key in ("fastconv", "ort") if r % 2 == 0 else ("ort", "fastconv"):
                time.sleep(args.settle)
                times[key].append(_ms(runs[key]))
        ours, theirs = statistics.median(times["fastconv"]), statistics.median(times["ort"])
        print(f"| {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x | {diff:.1e} |",
              flush=True)  # fmt: skip
        del model, ort
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
