"""``fastconv bench --vs onnxruntime``: fastconv's ``predict`` against ONNX Runtime on the same net.

The deep MNIST net (:func:`fastconv.models.deep_mnist_net`) is exported with
:func:`fastconv.onnx.to_onnx` (the same weights) and run by an ONNX Runtime session
(CPUExecutionProvider, ``ORT_ENABLE_ALL``, the same number of intra-op threads as Numba's), in
this process, in interleaved rounds (the first of the two alternates), after a check that both
give the same logits within 1e-4 of the largest:

(a) throughput: ``infer_images`` images in batches of ``batch_size``;
(b) batch-1 latency: ``latency_images`` single images one after another, p50 and p99 over the
    samples of every round;
(c) optionally (``--resnet``, slow) ResNet-18 at batch 8, 224x224;
(d) optionally (``--hog``) the latency again while a process spins on one core;
(e) optionally (``--sporadic``) the latency of single images ``SPORADIC_GAP_S`` apart (a
    request now and then: the threads have gone to sleep between them).

Ratios are fastconv / ONNX Runtime (lower is faster); each is the median of the per-round
ratios (both timed moments apart, so load that drifts between rounds cancels).
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np

__all__ = ["run_ort_benchmark", "ort_markdown_table", "max_relative_difference", "TOLERANCE"]

#: logits of fastconv and ONNX Runtime must agree within this, relative to the largest
TOLERANCE = 1e-4
#: (e): the idle time before each image, and at most this many images a round
SPORADIC_GAP_S = 0.02
SPORADIC_IMAGES = 40
START_MARK = "<!-- ort-table:start -->"
END_MARK = "<!-- ort-table:end -->"


def max_relative_difference(a, b) -> float:
    """``max |a - b| / max |b|``: the error relative to the largest logit."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def _session(model, threads):
    import onnxruntime as ort

    from .onnx import to_onnx

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(
        to_onnx(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _batches(run, x, batch_size):
    """ONNX Runtime over ``x`` in batches (what ``predict(x, batch_size)`` does in fastconv)."""
    return np.concatenate([run(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _agree(what, fastconv, ort):
    diff = max_relative_difference(fastconv, ort)
    if not diff <= TOLERANCE:
        raise RuntimeError(
            f"{what}: fastconv and ONNX Runtime logits differ by {diff:.2e} of the largest "
            f"(more than {TOLERANCE:g}): the timings would not compare the same computation"
        )
    return diff


def _clock(fn):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _spin(stop):
    while not stop.is_set():
        pass


def _rounds(sample, repeats, settle):
    """``repeats`` interleaved rounds of ``sample[key]() -> [ms, ...]`` for both implementations
    (the first alternating); returns the samples and the per-round ratios of their medians."""
    out = {"fastconv": [], "ort": []}
    ratios = []
    for r in range(repeats):
        order = ("fastconv", "ort") if r % 2 == 0 else ("ort", "fastconv")
        got = {}
        for key in order:
            time.sleep(settle)  # the other's spinning threads go to sleep first
            got[key] = sample[key]()
            out[key].extend(got[key])
        ratios.append(float(np.median(got["fastconv"]) / np.median(got["ort"])))
    return out, ratios


def _with_spinner(fn, *args):
    """``fn(*args)`` while another process spins on one core (latency under load)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    spinner = ctx.Process(target=_spin, args=(stop,), daemon=True)
    spinner.start()
    try:
        time.sleep(0.5)  # spinning before the first sample
        return fn(*args)
    finally:
        stop.set()
        spinner.join(timeout=5)
        if spinner.is_alive():
            spinner.terminate()


def _check_args(**values):
    for name, (value, minimum) in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def run_ort_benchmark(
    repeats=5,
    infer_images=1000,
    batch_size=100,
    latency_images=200,
    threads=2,
    resnet=False,
    resnet_repeats=3,
    hog=False,
    sporadic=False,
    seed=0,
    settle=0.2,
    log=None,
) -> dict:
    """Time fastconv and ONNX Runtime on the deep MNIST net (and ResNet-18 with ``resnet``).

    Parameters
    ----------
    repeats : int
        Interleaved rounds of (a) and (b).
    infer_images, batch_size : int
        Throughput: images per sample and the batch they run in.
    latency_images : int
        Single images timed one by one per round and implementation.
    threads : int
        Numba threads and ONNX Runtime intra-op threads.
    resnet, resnet_repeats
        Add ResNet-18, batch 8, 224x224 (one forward pass a sample), for that many rounds.
    hog : bool
        Add the batch-1 latency while another process spins on one core.
    sporadic : bool
        Add the batch-1 latency of single images ``SPORADIC_GAP_S`` apart (at most
        ``SPORADIC_IMAGES`` a round).
    settle : float
        Seconds of idle before each timed block.

    Returns
    -------
    dict
        ``machine``, ``settings``, ``agreement`` (max relative logit difference per net) and
        ``rows``: ``name``, ``fastconv_ms``/``ort_ms`` (medians or percentiles), the samples'
        ranges and ``ratio`` (median of the per-round ratios; for percentiles, of the two
        percentiles).
    """
    _check_args(repeats=(repeats, 1), infer_images=(infer_images, 1), batch_size=(batch_size, 1),
                latency_images=(latency_images, 2), threads=(threads, 1),
                resnet_repeats=(resnet_repeats, 1))  # fmt: skip
    if not 0 <= settle <= 10:
        raise ValueError(f"settle must be between 0 and 10 seconds, got {settle!r}")
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        raise RuntimeError(
            "the comparison needs onnx and ONNX Runtime: pip install 'fastconv[onnx]'"
        )
    import numba

    if threads > numba.config.NUMBA_NUM_THREADS:
        raise ValueError(
            f"threads must be at most Numba's {numba.config.NUMBA_NUM_THREADS}, got {threads}"
        )
    numba.set_num_threads(threads)
    log = log or (lambda msg: None)
    from .models import deep_mnist_net, resnet18

    rng = np.random.default_rng(seed)
    model = deep_mnist_net(seed=seed)
    x = rng.random((infer_images, 1, 28, 28), dtype=np.float32)
    singles = list(rng.random((latency_images, 1, 1, 28, 28), dtype=np.float32))
    ort_run = _session(model, threads)
    log("checking that both give the same logits (and warming up: Numba compiles on a first run)")
    agreement = {"deep MNIST": _agree("deep MNIST net", model.predict(x, batch_size=batch_size),
                                      _batches(ort_run, x, batch_size))}  # fmt: skip
    throughput = {
        "fastconv": lambda: [_clock(lambda: model.predict(x, batch_size=batch_size))],
        "ort": lambda: [_clock(lambda: _batches(ort_run, x, batch_size))],
    }
    latency = {
        "fastconv": lambda: [_clock(lambda s=s: model.predict(s)) for s in singles],
        "ort": lambda: [_clock(lambda s=s: ort_run(s)) for s in singles],
    }
    spaced = singles[:SPORADIC_IMAGES]

    def one_by_one(run):
        out = []
        for s in spaced:
            time.sleep(SPORADIC_GAP_S)
            out.append(_clock(lambda s=s: run(s)))
        return out

    sporadic_latency = {
        "fastconv": lambda: one_by_one(model.predict),
        "ort": lambda: one_by_one(ort_run),
    }
    rows = []
    log(f"(a) {infer_images} images in batches of {batch_size}, {repeats} rounds")
    rows.append(_row(f"{infer_images} images, batches of {batch_size} (ms)",
                     *_rounds(throughput, repeats, settle)))  # fmt: skip
    log(f"(b) batch-1 latency over {latency_images} images, {repeats} rounds")
    rows += _latency_rows("batch-1 latency", *_rounds(latency, repeats, settle))
    if hog:
        log("(d) batch-1 latency with one core taken by a spinning process")
        rows += _latency_rows(
            "batch-1 latency, one core spinning", *_with_spinner(_rounds, latency, repeats, settle)
        )
    if sporadic:
        log(f"(e) batch-1 latency of {len(spaced)} images {SPORADIC_GAP_S * 1e3:g} ms apart")
        rows += _latency_rows(
            f"batch-1 latency, one image every {SPORADIC_GAP_S * 1e3:g} ms",
            *_rounds(sporadic_latency, repeats, settle),
        )
    if resnet:
        log(f"(c) ResNet-18, batch 8, 224x224, {resnet_repeats} rounds (seconds each)")
        big = resnet18(seed=seed)
        xb = rng.random((8, 3, 224, 224), dtype=np.float32)
        big_run = _session(big, threads)
        agreement["ResNet-18"] = _agree("ResNet-18", big.predict(xb, batch_size=8), big_run(xb))
        forward = {
            "fastconv": lambda: [_clock(lambda: big.predict(xb, batch_size=8))],
            "ort": lambda: [_clock(lambda: big_run(xb))],
        }
        rows.append(_row("ResNet-18 forward, batch 8, 224x224 (ms)",
                         *_rounds(forward, resnet_repeats, settle)))  # fmt: skip
    return {
        "machine": _machine(threads),
        "settings": {
            "repeats": repeats,
            "infer_images": infer_images,
            "batch_size": batch_size,
            "latency_images": latency_images,
            "threads": threads,
            "resnet": resnet,
            "resnet_repeats": resnet_repeats,
            "hog": hog,
            "sporadic": sporadic,
            "seed": seed,
        },  # fmt: skip
        "agreement": agreement,
        "rows": rows,
    }


def _row(name, samples, ratios):
    f, o = samples["fastconv"], samples["ort"]
    return {"name": name, "fastconv_ms": float(np.median(f)), "ort_ms": float(np.median(o)),
            "fastconv_range": [min(f), max(f)], "ort_range": [min(o), max(o)],
            "ratio": float(np.median(ratios)), "round_ratios": ratios}  # fmt: skip


def _latency_rows(name, samples, ratios):
    rows = []
    for q in (50, 99):
        f = float(np.percentile(samples["fastconv"], q))
        o = float(np.percentile(samples["ort"], q))
        rows.append({"name": f"{name} p{q} (ms)", "fastconv_ms": f, "ort_ms": o,
                     "fastconv_range": None, "ort_range": None, "ratio": f / o,
                     "round_ratios": ratios if q == 50 else None})  # fmt: skip
    return rows


def _machine(threads) -> dict:
    import onnxruntime

    from .benchmark import machine_line

    ort = f"ONNX Runtime {onnxruntime.__version__} ({_threads(threads, 'intra-op thread')})"
    return {
        "line": machine_line(torch_threads=None, extra=ort),
        "onnxruntime": onnxruntime.__version__,
    }


def _threads(n, what="thread") -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _cell(value, spread):
    if spread is None or spread[0] == spread[1]:
        return f"{value:.2f}" if value < 10 else f"{value:.1f}"
    return f"{value:.1f} ({spread[0]:.0f}-{spread[1]:.0f})" if value >= 10 else (
        f"{value:.2f} ({spread[0]:.2f}-{spread[1]:.2f})")  # fmt: skip


def ort_markdown_table(report: dict, command: str | None = None) -> str:
    """The report as a markdown table, the logit agreement, the settings and the machine."""
    s = report["settings"]
    lines = [
        "| measurement | fastconv | ONNX Runtime | fastconv / ORT |",
        "|---|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['name']} | {_cell(r['fastconv_ms'], r['fastconv_range'])} "
            f"| {_cell(r['ort_ms'], r['ort_range'])} | {r['ratio']:.2f}x |"
        )
    agree = ", ".join(f"{k} {v:.1e}" for k, v in report["agreement"].items())
    resnet = f" (ResNet-18: {s['resnet_repeats']})" if s["resnet"] else ""
    spaced = (
        f" ({min(s['latency_images'], SPORADIC_IMAGES)} for the row of images "
        f"{SPORADIC_GAP_S * 1e3:g} ms apart)"
        if s.get("sporadic")
        else ""
    )
    lines += [
        "",
        f"Deep MNIST net unless named; both in one process, {_threads(s['threads'])} each "
        f"(Numba; ONNX Runtime intra-op, ORT_ENABLE_ALL, CPUExecutionProvider), {s['repeats']} "
        f"interleaved rounds{resnet}; medians with the range of the "
        f"samples in brackets; latency percentiles over {s['latency_images']} single images a "
        f"round{spaced}; ratios are medians of the per-round ratios (percentile rows: of the "
        f"percentiles), lower is faster for fastconv. Largest logit difference, relative to "
        f"the largest logit: {agree} (limit {TOLERANCE:g}). Machine: {report['machine']['line']}.",
    ]
    if command:
        lines.append(f"Reproduce: `{command}`")
    return "\n".join(lines)


def command(args, log) -> int:
    """The ``--vs onnxruntime`` run of ``fastconv bench`` (its arguments parsed there)."""
    import json

    from .benchmark import write_markdown

    if args.out_png:
        raise SystemExit("fastconv bench: --out-png charts the PyTorch comparison only")
    try:
        report = run_ort_benchmark(
            repeats=args.repeats, infer_images=args.infer_images, batch_size=args.batch_size,
            latency_images=args.latency_images, threads=args.threads, resnet=args.resnet,
            hog=args.hog, sporadic=args.sporadic, seed=args.seed, log=log,
        )  # fmt: skip
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"fastconv bench: {exc}") from exc
    cmd = (
        f"fastconv bench --vs onnxruntime --repeats {args.repeats} --infer-images "
        f"{args.infer_images} --batch-size {args.batch_size} --latency-images "
        f"{args.latency_images} --threads {args.threads}"
        + (" --resnet" if args.resnet else "")
        + (" --hog" if args.hog else "")
        + (" --sporadic" if args.sporadic else "")
        + (f" --out-md {args.out_md}" if args.out_md else "")
    )
    table = ort_markdown_table(report, cmd)
    if args.out_md:
        write_markdown(args.out_md, table, START_MARK, END_MARK)
    print(json.dumps(report) if args.json else table)
    return 0
