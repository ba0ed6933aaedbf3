"""GFLOP/s of the Dense layers' three products: fastconv's GEMM layer against NumPy's BLAS and
PyTorch (CPU), on every Dense shape of the model zoo, with the machine's FMA peak.

    python -m bench.gemm_table                        # every shape, batches 8, 32, 128
    python -m bench.gemm_table --layers alexnet-fc6 --batches 32 --rounds 3    # a quick look
    python -m bench.gemm_table --out docs/benchmarks.md      # replace the table in the docs

Products of a Dense layer ``y = x @ w`` with ``x (M, K)``, ``w (K, N)``: forward ``x @ w``,
``dx = dy @ w.T`` and ``dW = x.T @ dy``, all into preallocated outputs (NumPy and PyTorch
through ``out=``; fastconv through its GEMM layer, :func:`fastconv.cpu._matmul.matmul`, which
:func:`fastconv.dense` and :func:`fastconv.dense_backward` call). Each implementation runs in a
worker process of its own (fastconv float32, fastconv float16, NumPy float32, PyTorch float32;
2 threads each), because thread pools that spin-wait after a parallel region take the cores
another library in the same process needs (see docs/kernels.md). The parent times one call of
each worker in turn, product by product, round after round, sleeping ``--settle`` seconds
before each call so that the previous worker's spinning threads have gone to sleep; each cell
is the median over ``--rounds`` rounds, and every ratio is against NumPy in the same run. Each
timing is a loop of the same number of calls for every implementation (20 ms at 50 GFLOP/s).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import check_region_target, write_region

ROOT = Path(__file__).resolve().parents[1]


#: (name, in, out) of every distinct Dense layer of the zoo (fastconv.models)
LAYERS = [
    ("alexnet-fc6", 9216, 4096),
    ("alexnet/vgg16-fc7", 4096, 4096),
    ("alexnet/vgg16-fc8", 4096, 1000),
    ("vgg16-fc6", 25088, 4096),
    ("googlenet-fc", 1024, 1000),
    ("resnet-fc", 512, 1000),
    ("lenet5-c5", 400, 120),
    ("lenet5-f6", 120, 84),
    ("lenet5-out", 84, 10),
    ("mnist-dense", 1024, 50),
]
PRODUCTS = ("forward", "dx", "dW")
IMPLS = ("numpy", "fastconv float32", "fastconv float16", "torch")


def _calls(M, K, N):
    """Calls per timing, the same for every implementation: a loop of at least 20 ms at
    50 GFLOP/s (a timing that depended on each implementation's own first call would time
    one cold call for some and a warm loop for others)."""
    return max(1, round(0.02 * 50e9 / (2.0 * M * K * N)))


def product_shape(product, M, K, N):
    """(rows, reduction, columns) of one product of a Dense layer x (M, K) @ w (K, N)."""
    return {"forward": (M, K, N), "dx": (M, N, K), "dW": (K, M, N)}[product]


# --- workers ------------------------------------------------------------------------------------


def _make_calls(impl, M, K, N):
    """``{product: zero-argument call}`` for one implementation on fixed random operands."""
    dtype = np.float16 if impl == "fastconv float16" else np.float32
    rng = np.random.default_rng(0)
    x = rng.standard_normal((M, K)).astype(dtype)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(dtype)
    dy = rng.standard_normal((M, N)).astype(dtype)
    y, dx, dw = np.empty((M, N), dtype), np.empty((M, K), dtype), np.empty((K, N), dtype)
    if impl == "numpy":
        return {
            "forward": lambda: np.matmul(x, w, out=y),
            "dx": lambda: np.matmul(dy, w.T, out=dx),
            "dW": lambda: np.matmul(x.T, dy, out=dw),
        }
    if impl == "torch":
        import torch

        xt, wt, dyt = (torch.from_numpy(a) for a in (x, w, dy))
        yt, dxt, dwt = (torch.from_numpy(a) for a in (y, dx, dw))
        return {
            "forward": lambda: torch.matmul(xt, wt, out=yt),
            "dx": lambda: torch.matmul(dyt, wt.T, out=dxt),
            "dW": lambda: torch.matmul(xt.T, dyt, out=dwt),
        }
    from fastconv.cpu import launch_guard
    from fastconv.cpu._matmul import matmul

    def guarded(*args):
        with launch_guard():
            matmul(*args)

    return {
        "forward": lambda: guarded(x, w, y, False, False),
        "dx": lambda: guarded(dy, w, dx, False, True),
        "dW": lambda: guarded(x, dy, dw, True, False),
    }


def _blas_info():
    """NumPy's BLAS as threadpoolctl sees it (library, kernel architecture, threads)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    return ", ".join(
        f"{d['internal_api']} {d.get('version')} {d.get('architecture')} {d['num_threads']} threads"
        for d in threadpool_info()
        if d["user_api"] == "blas"
    )


def _serve(conn, impl):
    try:
        if impl == "torch":
            import torch

            torch.set_num_threads(2)
        else:
            import fastconv.cpu  # noqa: F401  (threading layer before any parallel region)
        calls = {}
        conn.send(("ok", _blas_info()))
        while True:
            cmd, arg = conn.recv()
            if cmd == "stop":
                return
            if cmd == "setup":
                calls = _make_calls(impl, *arg)
                for call in calls.values():  # warm up (compilation, first touch)
                    call()
                    call()
                conn.send(("ok", None))
            elif cmd == "time":
                product, n = arg
                call = calls[product]
                t0 = time.perf_counter()
                for _ in range(n):
                    call()
                conn.send(("ok", (time.perf_counter() - t0) / n))
            elif cmd == "peak":
                from bench.fma_peak import fma_peak

                conn.send(("ok", fma_peak(2, seconds=0.3, repeats=3)))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))


class Worker:
    def __init__(self, impl):
        self.impl = impl
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, impl), daemon=True)
        self.process.start()
        child.close()
        self.info = self.ask(None)

    def ask(self, cmd, arg=None):
        if cmd is not None:
            self.conn.send((cmd, arg))
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"{self.impl}: {value}")
        return value

    def stop(self):
        self.conn.send(("stop", None))
        self.process.join(timeout=30)


# --- the table ----------------------------------------------------------------------------------


def run(layers, batches, impls, rounds, settle):
    workers = [Worker(i) for i in impls]
    peak = workers[[w.impl for w in workers].index("fastconv float32")].ask("peak") if (
        "fastconv float32" in impls) else None  # fmt: skip
    rows = []
    try:
        for name, K, N in layers:
            for M in batches:
                for w in workers:
                    w.ask("setup", (M, K, N))
                samples = {(i, p): [] for i in impls for p in PRODUCTS}
                for _ in range(rounds):
                    for p in PRODUCTS:
                        for w in workers:
                            time.sleep(settle)
                            samples[(w.impl, p)].append(w.ask("time", (p, _calls(M, K, N))))
                for p in PRODUCTS:
                    r, k, c = product_shape(p, M, K, N)
                    flops = 2.0 * r * k * c
                    row = {"layer": name, "M": M, "K": K, "N": N, "product": p,
                           "shape": f"{r}x{k}x{c}"}  # fmt: skip
                    for i in impls:
                        row[i] = flops / statistics.median(samples[(i, p)]) / 1e9
                    rows.append(row)
                    print(_line(row, impls), flush=True)
    finally:
        for w in workers:
            w.stop()
    return rows, peak, workers[0].info


def _line(row, impls):
    cells = [f"{row['layer']} M={row['M']} {row['product']}"]
    cells += [f"{i} {row[i]:.1f}" for i in impls]
    return "  ".join(cells)


def markdown(rows, impls, peak, rounds, settle, command, blas):
    from fastconv.benchmark import machine_info

    info = machine_info(torch_threads=2)
    head = ["layer (in -> out)", "batch", "product", "M x K x N"]
    head += [f"{i} GFLOP/s" for i in impls]
    head += [f"{i} / numpy" for i in impls if i != "numpy"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['layer']} ({r['K']} -> {r['N']})", str(r["M"]), r["product"], r["shape"]]
        cells += [f"{r[i]:.1f}" for i in impls]
        cells += [f"{r[i] / r['numpy']:.2f}x" for i in impls if i != "numpy"]
        out.append("| " + " | ".join(cells) + " |")
    worst = {i: min(r[i] / r["numpy"] for r in rows) for i in impls if i != "numpy"}
    peak_txt = f"{peak:.0f} GFLOP/s on 2 threads" if peak else "not measured"
    load = "/".join(f"{v:.1f}" for v in os.getloadavg())
    out += [
        "",
        f"`{command}`: medians of {rounds} interleaved rounds ({settle} s settle before each "
        f"call), one worker process per implementation, 2 threads each; GFLOP/s = 2MKN / time; "
        f"ratios > 1 mean faster than NumPy's BLAS in the same run. FMA peak (`bench/fma_peak.py`, "
        f"CPU time): {peak_txt}. Lowest ratio per implementation: "
        + ", ".join(f"{i} {v:.2f}x" for i, v in worst.items())
        + f". NumPy's BLAS: {blas}. {info['cpu']}, {info['cores']} cores; "
        f"NumPy {info['numpy']}, Numba {info['numba']}, PyTorch {info.get('torch')}; "
        f"{info['date']}; load average {load} at the end.",
    ]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="all", help="comma-separated layer names, or all")
    parser.add_argument("--batches", default="8,32,128")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settle", type=float, default=0.05, help="seconds before each call")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--out", help="markdown file whose gemm-table section is replaced")
    args = parser.parse_args(argv)
    if args.out:
        check_region_target(args.out)
    layers = LAYERS if args.layers == "all" else [
        entry for entry in LAYERS if entry[0] in args.layers.split(",")]  # fmt: skip
    impls = tuple(args.impls.split(","))
    if "numpy" not in impls:
        parser.error("numpy is the baseline of every ratio")
    if "torch" in impls:
        try:
            import torch  # noqa: F401
        except ImportError:
            impls = tuple(i for i in impls if i != "torch")
    batches = [int(b) for b in args.batches.split(",")]
    rows, peak, blas = run(layers, batches, impls, args.rounds, args.settle)
    command = "python -m bench.gemm_table " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(rows, impls, peak, args.rounds, args.settle, command.strip(), blas)
    print(text)
    if args.out:
        write_region(args.out, "gemm-table", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
