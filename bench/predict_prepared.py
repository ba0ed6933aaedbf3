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


def _ort_worker(threads, conn):
    """ONNX Runtime in a process of its own: its spinning intra-op threads would otherwise
    steal the cores from Numba's between calls (measured: deep-MNIST's batch-1 p50 went from
    ~1.4 ms to 9-66 ms with a session in the same process)."""
    import warnings

    warnings.filterwarnings("ignore")
    from fastconv.models import deep_mnist_net, resnet18

    sessions = {}
    try:
        sessions["mnist"] = _ort_session(deep_mnist_net(seed=0), (1, 28, 28), threads)
    except Exception as e:  # noqa: BLE001 - reported, the benchmark goes on without ORT
        conn.send(f"no ORT: {type(e).__name__}: {e}")
        return
    conn.send("ready" if sessions["mnist"] is not None else "no ORT: not importable")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        what, x, batch = msg
        if what == "resnet" and what not in sessions:
            sessions["resnet"] = _ort_session(resnet18(seed=0), (3, 224, 224), threads)
        run = sessions[what]
        if batch == 1:  # per-image latencies
            times = []
            for i in range(x.shape[0]):
                times.append(_timed(lambda i=i, run=run, x=x: run(x[i : i + 1])))
            conn.send(times)
        else:

            def whole(run=run, x=x, batch=batch):
                return [run(x[i : i + batch]) for i in range(0, len(x), batch)]

            conn.send(_timed(whole))


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _report(name, times, unit=1e3, fmt="{:.2f} ms"):
    med = {k: statistics.median(v) for k, v in times.items()}
    cells = [
        f"{k} {fmt.format(med[k] * unit)} (min {fmt.format(min(times[k]) * unit)})" for k in times
    ]
    ratio = med["prepared"] / med["unprepared"]
    extra = f"; prepared/ORT {med['prepared'] / med['ort']:.2f}x" if "ort" in med else ""
    print(f"{name}: " + ", ".join(cells) + f"; prepared/unprepared {ratio:.3f}x{extra}")


class _Ort:
    """The ORT worker process (see :func:`_ort_worker`), or None when ORT is unavailable."""

    def __init__(self, threads):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_ort_worker, args=(threads, child), daemon=True)
        self.proc.start()
        status = self.conn.recv()
        self.ok = status == "ready"
        if not self.ok:
            print(f"({status}: no ORT column)")

    def run(self, what, x, batch):
        self.conn.send((what, x, batch))
        return self.conn.recv()

    def close(self):
        self.conn.send(None)
        self.proc.join(10)


def _runners(model, what, ort):
    runners = {
        "unprepared": lambda x, b: _timed(lambda: model.predict(x, batch_size=b, prepared=False)),
        "prepared": lambda x, b: _timed(lambda: model.predict(x, batch_size=b, prepared=True)),
    }
    if ort is not None and ort.ok:
        runners["ort"] = lambda x, b: ort.run(what, x, b)
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
    print(f"Numba threads {numba.get_num_threads()}")
    rng = np.random.default_rng(0)

    ort = _Ort(args.threads) if args.ort else None

    model = deep_mnist_net(seed=0)
    x = rng.random((1000, 1, 28, 28), dtype=np.float32)
    a = model.predict(x[:100], prepared=False)
    b = model.predict(x[:100], prepared=True)
    print(f"deep-MNIST outputs bitwise equal: {np.array_equal(a, b)}")
    runners = _runners(model, "mnist", ort)
    for k, run in runners.items():  # compile, plan, workspaces
        run(x[:100], 100)
        if k != "ort":
            run(x[:1], 1)
    times = {k: [] for k in runners}
    for _ in range(args.rounds):
        for k, run in runners.items():
            times[k].append(run(x, 100))
    _report("deep-MNIST 1000 images, batches of 100", times)

    # Batch-1 latency: chunks of 20 images per path in turn (per image for fastconv).
    lat = {k: [] for k in runners}
    for c0 in range(0, args.images, 20):
        chunk = x[c0 % 1000 : c0 % 1000 + 20]
        for k, run in runners.items():
            if k == "ort":
                lat[k] += ort.run("mnist", chunk, 1)
            else:
                lat[k] += [run(chunk[i : i + 1], 1) for i in range(chunk.shape[0])]
    cells = []
    for k, v in lat.items():
        p50, p99 = np.percentile(v, 50) * 1e3, np.percentile(v, 99) * 1e3
        cells.append(f"{k} p50 {p50:.3f} ms p99 {p99:.3f} ms")
    p50 = {k: np.percentile(v, 50) for k, v in lat.items()}
    extra = f"; prepared/ORT p50 {p50['prepared'] / p50['ort']:.2f}x" if "ort" in p50 else ""
    print(
        "deep-MNIST batch-1 latency: "
        + ", ".join(cells)
        + f"; p50 prepared/unprepared {p50['prepared'] / p50['unprepared']:.3f}x{extra}"
    )

    if not args.no_resnet:
        model = resnet18(seed=0)
        x = rng.standard_normal((8, 3, 224, 224), dtype=np.float32)
        a = model.predict(x, batch_size=8, prepared=False)
        b = model.predict(x, batch_size=8, prepared=True)
        print(f"ResNet-18 outputs bitwise equal: {np.array_equal(a, b)}")
        runners = _runners(model, "resnet", ort)
        for run in runners.values():
            run(x, 8)
        times = {k: [] for k in runners}
        for _ in range(max(3, args.rounds // 2)):
            for k, run in runners.items():
                times[k].append(run(x, 8))
        _report("ResNet-18 batch 8, 224x224", times)
    if ort is not None:
        ort.close()


if __name__ == "__main__":
    main()
