"""Inference through prepared weights against the unprepared path, in one run.

Three workloads, each timed for both paths (``model.predict(..., prepared=True/False)``) in
interleaved rounds so both see the same machine load; reported: the median (and minimum) of
each and the ratio of the medians, with ONNX Runtime's time where ``--ort`` is given and
onnxruntime and torch import (its session built from the PyTorch twin, exported with
``torch.onnx.export(..., dynamo=False)``):

* deep-MNIST (``deep_mnist_net``): 1000 images in batches of 100;
* deep-MNIST batch-1 latency: p50 and p99 over ``--images`` single-image predicts;
* ResNet-18, batch 8 of 224x224 (skipped with ``--no-resnet``).

    python -m bench.predict_prepared --rounds 7 --images 300 --ort

Run with 2 Numba threads (``NUMBA_NUM_THREADS=2``) for the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _ort_session(model, shape, threads):
    try:
        import io

        import onnxruntime as ort
        import torch

        from fastconv.torch_bridge import to_torch
    except ImportError:
        return None
    twin = to_torch(model).eval()
    buf = io.BytesIO()
    torch.onnx.export(
        twin, torch.zeros((1, *shape)), buf, dynamo=False, input_names=["x"],
        output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
    )  # fmt: skip
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _report(name, times, unit=1e3, fmt="{:.2f} ms"):
    med = {k: statistics.median(v) for k, v in times.items()}
    cells = [
        f"{k} {fmt.format(med[k] * unit)} (min {fmt.format(min(times[k]) * unit)})"
        for k in times
    ]
    ratio = med["prepared"] / med["unprepared"]
    extra = f"; prepared/ORT {med['prepared'] / med['ort']:.2f}x" if "ort" in med else ""
    print(f"{name}: " + ", ".join(cells) + f"; prepared/unprepared {ratio:.3f}x{extra}")


def _runners(model, shape, args):
    runners = {
        "unprepared": lambda x, b: model.predict(x, batch_size=b, prepared=False),
        "prepared": lambda x, b: model.predict(x, batch_size=b, prepared=True),
    }
    if args.ort:
        session = _ort_session(model, shape, args.threads)
        if session is None:
            print("(onnxruntime or torch not importable: no ORT column)")
        else:
            def ort_run(x, b):
                return [session(x[i : i + b]) for i in range(0, x.shape[0], b)]

            runners["ort"] = ort_run
    return runners


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--images", type=int, default=300, help="batch-1 predicts per path")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    parser.add_argument("--ort", action="store_true", help="also time ONNX Runtime")
    parser.add_argument("--no-resnet", action="store_true")
    args = parser.parse_args(argv)

    import numba

    from bench.common import machine_line
    from fastconv.models import deep_mnist_net, resnet18

    print(machine_line(args.threads))
    print(f"Numba threads {numba.get_num_threads()}, layer {numba.threading_layer()}"
          if False else f"Numba threads {numba.get_num_threads()}")  # fmt: skip
    rng = np.random.default_rng(0)

    model = deep_mnist_net(seed=0)
    x = rng.random((1000, 1, 28, 28), dtype=np.float32)
    a = model.predict(x[:100], prepared=False)
    b = model.predict(x[:100], prepared=True)
    print(f"deep-MNIST outputs bitwise equal: {np.array_equal(a, b)}")
    runners = _runners(model, (1, 28, 28), args)
    for run in runners.values():  # compile, plan, workspaces
        run(x[:100], 100)
        run(x[:1], 1)
    times = {k: [] for k in runners}
    for _ in range(args.rounds):
        for k, run in runners.items():
            times[k].append(_timed(lambda run=run: run(x, 100)))
    _report("deep-MNIST 1000 images, batches of 100", times)

    lat = {k: [] for k in runners}
    for i in range(args.images):  # interleaved image by image
        xi = x[i % 1000 : i % 1000 + 1]
        for k, run in runners.items():
            lat[k].append(_timed(lambda run=run: run(xi, 1)))
    cells = []
    for k, v in lat.items():
        p50, p99 = np.percentile(v, 50) * 1e3, np.percentile(v, 99) * 1e3
        cells.append(f"{k} p50 {p50:.3f} ms p99 {p99:.3f} ms")
    ratio = np.percentile(lat["prepared"], 50) / np.percentile(lat["unprepared"], 50)
    extra = ""
    if "ort" in lat:
        extra = f"; prepared/ORT p50 {np.percentile(lat['prepared'], 50) / np.percentile(lat['ort'], 50):.2f}x"
    print("deep-MNIST batch-1 latency: " + ", ".join(cells) + f"; p50 prepared/unprepared {ratio:.3f}x{extra}")

    if args.no_resnet:
        return
    model = resnet18(seed=0)
    x = rng.standard_normal((8, 3, 224, 224), dtype=np.float32)
    a = model.predict(x, batch_size=8, prepared=False)
    b = model.predict(x, batch_size=8, prepared=True)
    print(f"ResNet-18 max |prepared - unprepared| {np.abs(a - b).max():.3g}")
    runners = _runners(model, (3, 224, 224), args)
    for run in runners.values():
        run(x, 8)
    times = {k: [] for k in runners}
    for _ in range(max(3, args.rounds // 2)):
        for k, run in runners.items():
            times[k].append(_timed(lambda run=run: run(x, 8)))
    _report("ResNet-18 batch 8, 224x224", times)


if __name__ == "__main__":
    main()
