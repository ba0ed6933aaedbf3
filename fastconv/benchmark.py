"""End-to-end benchmark of the deep MNIST net: fastconv vs PyTorch vs the book's NumPy approach.

Times, in one run and interleaved round by round so that every implementation sees the same
machine load: (a) one training step (forward, backward, Adam) at batch 100 and (b) inference
over 1000 images (batches of 100), for fastconv CPU float32, fastconv CPU float16 (inference),
PyTorch CPU float32 (channels_last, foreach Adam: its fastest setting) and a book-style NumPy
net (float64). Every network starts from the same weights. Reports medians and ratios to
PyTorch (lower is faster), and can write a markdown table into a file between
``<!-- e2e-table:start -->`` and ``<!-- e2e-table:end -->`` and a PNG bar chart.

The baselines are built from fastconv's own model, so the architecture is defined once
(:func:`fastconv.models.deep_mnist_net`): PyTorch's through :func:`fastconv.torch_bridge.to_torch`,
the NumPy one through :func:`fastconv.book_numpy.from_model`. Everything is in the package:
``fastconv bench`` runs from an installed wheel.

``fastconv bench --vs onnxruntime`` compares inference with ONNX Runtime on the exported net
instead (:mod:`fastconv.benchmark_ort`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

__all__ = [
    "machine_info",
    "machine_line",
    "run_benchmark",
    "markdown_table",
    "write_markdown",
    "torch_train_step",
    "torch_predict",
]

START_MARK = "<!-- e2e-table:start -->"
END_MARK = "<!-- e2e-table:end -->"


def torch_train_step(net, optimizer, x, y):
    """One PyTorch training step (forward, mean softmax cross-entropy, backward, update)."""
    import torch

    net.train()
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def torch_predict(net, x, batch_size=100):
    """PyTorch scores for ``x`` in eval mode, ``batch_size`` images at a time."""
    import torch

    net.eval()
    with torch.no_grad():
        return torch.cat([net(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(torch_threads=None) -> dict:
    """CPU model, usable cores, library versions and the UTC date of the run."""
    import numba

    info = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        # Other processes' load skews timings (PyTorch's spin-waiting pool suffers most).
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = (
            torch_threads if torch_threads is not None else torch.get_num_threads()
        )
    except ImportError:
        info["torch"] = None
    return info


def load_average_text() -> str:
    """The 1/5/15-minute load averages as ``a/b/c`` ("n/a" where the system has none)."""
    if not hasattr(os, "getloadavg"):
        return "n/a"
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def machine_line(torch_threads: int | None = 2, extra: str = "") -> str:
    """The one-line description of the machine every benchmark prints: CPU, cores, library
    versions (PyTorch's threads; PyTorch left out with ``torch_threads=None``), ``extra``
    (another library), date and load average."""
    info = machine_info(torch_threads=torch_threads)
    libraries = [f"Python {info['python']}", f"NumPy {info['numpy']}",
                 f"Numba {info['numba']} ({info['numba_threads']} "
                 f"thread{'' if info['numba_threads'] == 1 else 's'})"]  # fmt: skip
    if torch_threads is not None:
        libraries.append(
            f"PyTorch {info['torch']} ({torch_threads} threads)" if info["torch"] else "no PyTorch"
        )
    if extra:
        libraries.append(extra)
    return (
        f"{info['cpu']}, {info['cores']} cores; {', '.join(libraries)}; {info['date']}; "
        f"load average {load_average_text()} (1/5/15 min)"
    )


def _fastconv_model(seed, dtype="float32"):
    from .models import deep_mnist_net

    model = deep_mnist_net(seed=seed)
    if dtype != "float32":
        model = model.to(dtype=dtype)
    return model.compile(optimizer="adam", loss="softmax_cross_entropy")


NAMES = {
    "fastconv32": "fastconv CPU float32",
    "fastconv16": "fastconv CPU float16",
    "torch": "PyTorch CPU float32",
    "numpy": "NumPy book-style float64",
}
TORCH_NAME = NAMES["torch"]


def _inputs(seed, batch_size, infer_images):
    rng = np.random.default_rng(seed)
    x = rng.random((batch_size, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, batch_size)
    x_infer = rng.random((infer_images, 1, 28, 28), dtype=np.float32)
    return x, y, x_infer


def _implementation(key, seed, batch_size, infer_images, torch_threads):
    """``(train or None, infer)`` callables of one implementation, from fastconv's initial weights.

    Every implementation starts from the weights of ``deep_mnist_net(seed)`` and sees the same
    inputs, so the benchmark times equal work (checked by ``tests/cli/test_benchmark.py``).
    """
    x, y, x_infer = _inputs(seed, batch_size, infer_images)
    fc = _fastconv_model(seed)
    if key == "fastconv32":
        return (lambda: fc.train_on_batch(x, y)), (lambda: fc.predict(x_infer, batch_size=100))
    if key == "fastconv16":
        fc16 = fc.to(dtype="float16")
        x16 = x_infer.astype(np.float16)
        return None, (lambda: fc16.predict(x16, batch_size=100))
    if key == "torch":
        import torch

        from .torch_bridge import to_torch

        torch.set_num_threads(torch_threads)
        # PyTorch at its best on this CPU: channels_last weights and activations (oneDNN's
        # blocked kernels without a reorder per layer: its step 53 -> 39 ms, its inference of
        # 1000 images 188 -> 101 ms, 2026-12-07) and the foreach Adam update.
        net = to_torch(fc).to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, foreach=True)
        tx, ty, tx_infer = (torch.from_numpy(a) for a in (x, y.astype(np.int64), x_infer))
        tx = tx.contiguous(memory_format=torch.channels_last)
        tx_infer = tx_infer.contiguous(memory_format=torch.channels_last)
        return (
            (lambda: torch_train_step(net, opt, tx, ty)),
            (lambda: torch_predict(net, tx_infer, batch_size=100)),
        )
    if key == "numpy":
        from .book_numpy import from_model

        net = from_model(fc)
        return (lambda: net.train_on_batch(x, y)), (lambda: net.predict(x_infer, batch_size=100))
    raise ValueError(f"unknown implementation {key!r}")


def _time(fn, n):
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def _worker(conn, key, seed, batch_size, infer_images, torch_threads):
    """Serve timing requests for one implementation in its own process.

    Own processes keep the thread pools apart: Numba's OpenMP workers, OpenBLAS and PyTorch's
    pool spin-wait after a parallel region, and in one process could take the cores that the
    implementation being timed needs.
    """
    try:
        train, infer = _implementation(key, seed, batch_size, infer_images, torch_threads)
        if train is not None:
            train()  # warm-up: Numba compilation or cache load, allocator, first-call costs
        infer()
        conn.send(("ready", train is not None))
        while True:
            command, n = conn.recv()
            if command == "stop":
                break
            conn.send(("ok", _time(train if command == "train" else infer, n)))
    except Exception as exc:  # reported to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


class _Worker:
    def __init__(self, ctx, key, *args):
        self.key = key
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, key, *args), daemon=True)
        self.process.start()
        child.close()

    def receive(self):
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"benchmark worker {NAMES[self.key]!r} failed: {value}")
        return value

    def time(self, command, n, settle):
        # Let the previous worker's spinning threads go to sleep before timing this one.
        time.sleep(settle)
        self.conn.send((command, n))
        return self.receive()

    def stop(self):
        try:
            self.conn.send(("stop", 0))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.terminate()


def run_benchmark(
    steps=5,
    repeats=5,
    numpy_repeats=1,
    numpy_steps=1,
    include_numpy=True,
    batch_size=100,
    infer_images=1000,
    seed=0,
    torch_threads=2,
    settle=0.2,
    log=None,
) -> dict:
    """Time a training step and inference for every implementation; medians and ratios.

    Parameters
    ----------
    steps : int
        Training steps per timed sample (the sample is their mean).
    repeats : int
        Samples per implementation; each round times every implementation once, in turn.
    numpy_repeats, numpy_steps : int
        The same for the slow NumPy net (it runs only in the first ``numpy_repeats`` rounds).
    include_numpy : bool
        Leave the NumPy net out when False.
    batch_size, infer_images : int
        Training batch, and number of images classified (in batches of 100) per inference sample.
    torch_threads : int
        ``torch.set_num_threads`` for PyTorch.
    settle : float
        Seconds of idle before each timed sample, so that no other worker still spins.

    Each implementation runs in its own process (spawned; Numba's and PyTorch's thread pools
    would otherwise compete inside one process), and the rounds interleave the processes, one
    timing at a time, so that all of them see the same machine load.

    Returns
    -------
    dict
        ``machine`` (see :func:`machine_info`), ``settings`` and ``results``: one entry per
        implementation with ``train_ms``/``infer_ms`` (medians, None where not measured), the raw
        samples, ``train_ratio``/``infer_ratio`` to PyTorch (ratio of medians) and
        ``*_ratio_paired`` (median of the round-by-round ratios).
    """
    for name, value, minimum in [
        ("steps", steps, 1),
        ("repeats", repeats, 1),
        ("numpy_repeats", numpy_repeats, 1),
        ("numpy_steps", numpy_steps, 1),
        ("batch_size", batch_size, 1),
        ("infer_images", infer_images, 1),
        ("torch_threads", torch_threads, 1),
    ]:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if not 0 <= settle <= 10:
        raise ValueError(f"settle must be between 0 and 10 seconds, got {settle!r}")
    if importlib.util.find_spec("torch") is None:
        raise RuntimeError(
            "the benchmark's baseline is PyTorch: install it pinned, pip install torch==2.13.0"
        )
    log = log or (lambda msg: None)
    import multiprocessing

    keys = ["fastconv32", "fastconv16", "torch"] + (["numpy"] if include_numpy else [])
    samples = {NAMES[k]: {"train": [], "infer": []} for k in keys}
    ctx = multiprocessing.get_context("spawn")
    log("starting one process per implementation and warming up (Numba compiles on a first run)")
    workers = [_Worker(ctx, k, seed, batch_size, infer_images, torch_threads) for k in keys]
    try:
        trains = {w.key: w.receive() for w in workers}
        for r in range(repeats):
            log(f"round {r + 1}/{repeats}")
            for w in workers:
                slow = w.key == "numpy"
                if slow and r >= numpy_repeats:
                    continue
                name = NAMES[w.key]
                if trains[w.key]:
                    n = numpy_steps if slow else steps
                    samples[name]["train"].append(w.time("train", n, settle))
                samples[name]["infer"].append(w.time("infer", 1, settle))
    finally:
        for w in workers:
            w.stop()

    def median(values):
        return float(np.median(values)) if values else None

    torch_train = median(samples[TORCH_NAME]["train"])
    torch_infer = median(samples[TORCH_NAME]["infer"])

    def paired(values, reference):
        # Round by round, both timed moments apart: robust to load that drifts between rounds.
        pairs = [v / r for v, r in zip(values, reference, strict=False)]
        return float(np.median(pairs)) if pairs else None

    results = []
    for name, s in samples.items():
        train_ms, infer_ms = median(s["train"]), median(s["infer"])
        results.append(
            {
                "name": name,
                "train_ms": train_ms,
                "infer_ms": infer_ms,
                "train_ratio": None if train_ms is None else train_ms / torch_train,
                "infer_ratio": infer_ms / torch_infer,
                "train_ratio_paired": paired(s["train"], samples[TORCH_NAME]["train"]),
                "infer_ratio_paired": paired(s["infer"], samples[TORCH_NAME]["infer"]),
                "train_samples_ms": s["train"],
                "infer_samples_ms": s["infer"],
            }
        )
    return {
        "machine": machine_info(torch_threads),
        "settings": {
            "steps": steps,
            "repeats": repeats,
            "numpy_steps": numpy_steps,
            "numpy_repeats": numpy_repeats,
            "batch_size": batch_size,
            "infer_images": infer_images,
            "infer_batch_size": 100,
            "seed": seed,
        },
        "results": results,
    }


def _fmt_load(load):
    return "n/a" if not load else "/".join(f"{v:.1f}" for v in load) + " (1/5/15 min)"


def _ratio(value):
    return "n/a" if value is None else f"{value:.2f}x"


def _spread(median, samples):
    if median is None:
        return "n/a"
    if len(samples) < 2:
        return f"{median:.1f}"
    return f"{median:.1f} ({min(samples):.0f}-{max(samples):.0f})"


def markdown_table(report: dict, command: str | None = None) -> str:
    """The report as a markdown table plus a line describing the machine and settings."""
    s, m = report["settings"], report["machine"]
    lines = [
        f"| implementation | training step, batch {s['batch_size']} (ms) | vs PyTorch "
        f"| inference, {s['infer_images']} images (ms) | vs PyTorch |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['name']} | {_spread(r['train_ms'], r['train_samples_ms'])} "
            f"| {_ratio(r['train_ratio'])} | {_spread(r['infer_ms'], r['infer_samples_ms'])} "
            f"| {_ratio(r['infer_ratio'])} |"
        )
    lines += [
        "",
        f"Medians of {s['repeats']} interleaved rounds (training samples: mean of {s['steps']} "
        f"steps; NumPy: {s['numpy_repeats']} round(s) of {s['numpy_steps']} step(s)), with the "
        f"range of the samples in brackets; inference in "
        f"batches of {s['infer_batch_size']}; ratios < 1 are faster than PyTorch, which runs "
        f"channels_last with the foreach Adam update (its fastest CPU setting). "
        f"Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, NumPy {m['numpy']}, "
        f"Numba {m['numba']} ({m['numba_threads']} threads), PyTorch {m.get('torch')} "
        f"({m.get('torch_threads')} threads); {m['date']}; load average at the end "
        f"{_fmt_load(m.get('load_average'))}.",
    ]
    if command:
        lines.append(f"Reproduce: `{command}`")
    return "\n".join(lines)


def write_markdown(
    path, table: str, start_mark=START_MARK, end_mark=END_MARK, header="# Benchmarks\n"
) -> None:
    """Put ``table`` between the markers (the e2e-table ones by default) of ``path`` (markers
    appended if missing; a missing file starts with ``header``). The one writer of a marked
    region: ``bench.common.write_region`` calls it too."""
    path = Path(path)
    text = path.read_text() if path.exists() else header
    block = f"{start_mark}\n{table}\n{end_mark}"
    start, end = text.find(start_mark), text.find(end_mark)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(end_mark) :]
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_png(path, report: dict) -> None:
    """Two bar charts (training step, inference), log scale, PyTorch ratios written on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in [
        (axes[0], "train", f"training step, batch {report['settings']['batch_size']}"),
        (axes[1], "infer", f"inference, {report['settings']['infer_images']} images"),
    ]:
        rows = [r for r in report["results"] if r[f"{key}_ms"] is not None]
        names = [r["name"].replace(" ", "\n", 2) for r in rows]
        values = [r[f"{key}_ms"] for r in rows]
        colors = [f"C{list(NAMES.values()).index(r['name'])}" for r in rows]
        bars = ax.bar(range(len(rows)), values, color=colors)
        for bar, r in zip(bars, rows, strict=True):
            ax.annotate(
                f"{r[f'{key}_ratio']:.2f}x",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
            )
        ax.set_xticks(range(len(rows)), names, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median, log scale)")
        ax.set_title(title)
    fig.suptitle(f"deep MNIST net on {report['machine']['cpu']} (ratios vs PyTorch)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _command(args) -> int:
    import json

    log = (lambda msg: print(msg, file=sys.stderr)) if not args.quiet else None
    if args.vs == "onnxruntime":
        from . import benchmark_ort

        return benchmark_ort.command(args, log)
    try:
        report = _run_from_args(args, log)
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"fastconv bench: {exc}") from exc
    command = (
        f"fastconv bench --steps {args.steps} --repeats {args.repeats} "
        f"--numpy-repeats {args.numpy_repeats} --numpy-steps {args.numpy_steps}"
        f" --batch-size {args.batch_size} --infer-images {args.infer_images}"
        + (" --no-numpy" if args.no_numpy else "")
        + (f" --out-md {args.out_md}" if args.out_md else "")
        + (f" --out-png {args.out_png}" if args.out_png else "")
    )
    table = markdown_table(report, command)
    if args.out_md:
        write_markdown(args.out_md, table)
    if args.out_png:
        write_png(args.out_png, report)
    print(json.dumps(report) if args.json else table)
    return 0


def _run_from_args(args, log):
    return run_benchmark(
        steps=args.steps,
        repeats=args.repeats,
        numpy_repeats=args.numpy_repeats,
        numpy_steps=args.numpy_steps,
        include_numpy=not args.no_numpy,
        batch_size=args.batch_size,
        infer_images=args.infer_images,
        seed=args.seed,
        torch_threads=args.torch_threads,
        log=log,
    )


def _add_arguments(p):
    p.add_argument("--steps", type=int, default=5, help="training steps per sample (default 5)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--numpy-repeats", type=int, default=1, help="rounds for the NumPy net")
    p.add_argument("--numpy-steps", type=int, default=1, help="steps per NumPy sample")
    p.add_argument("--no-numpy", action="store_true", help="leave out the slow NumPy net")
    p.add_argument("--batch-size", type=int, default=100, help="training batch (default 100)")
    p.add_argument("--infer-images", type=int, default=1000, help="images classified (1000)")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-md", metavar="FILE", help="markdown file to put the table in")
    p.add_argument("--out-png", metavar="FILE", help="PNG bar chart to write")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--vs", choices=("pytorch", "onnxruntime"), default="pytorch",
                   help="baseline: PyTorch and the NumPy net (default), or ONNX Runtime on the "
                   "exported net (inference only; needs the onnx extra)")  # fmt: skip
    ort = p.add_argument_group("--vs onnxruntime")
    ort.add_argument("--latency-images", type=int, default=200,
                     help="single images timed per round for batch-1 latency (200)")  # fmt: skip
    ort.add_argument("--threads", type=int, default=2,
                     help="Numba threads and ONNX Runtime intra-op threads (2)")  # fmt: skip
    ort.add_argument("--resnet", action="store_true",
                     help="add ResNet-18, batch 8, 224x224 (slow: seconds a sample)")  # fmt: skip
    ort.add_argument("--hog", action="store_true",
                     help="add batch-1 latency while a process spins on one core")  # fmt: skip
    ort.add_argument("--sporadic", action="store_true",
                     help="add batch-1 latency of single images 20 ms apart")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    p.set_defaults(func=_command)


def add_subcommand(subparsers):
    """Add ``fastconv bench`` to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "bench",
        help="end-to-end benchmark vs PyTorch and the book's NumPy approach",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    _add_arguments(p)
    return p


def main(argv=None) -> int:
    """``fastconv bench`` with ``argv`` (tests; the console script goes through the CLI)."""
    parser = argparse.ArgumentParser(prog="fastconv bench", description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    return args.func(args)
