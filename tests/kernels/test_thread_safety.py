"""Kernels and predict() called from several Python threads at once give the serial results.

The CPU kernels share workspaces between calls and run on Numba's thread pool; both used to
break under concurrent callers (wrong results with OpenMP, an abort with ``workqueue``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import fastconv as fc

ROOT = Path(__file__).resolve().parents[2]
THREADS = 4
ROUNDS = 12


def _cases(rng, dtype):
    """(name, zero-argument call) for every public kernel, each on its own arrays."""
    x = rng.standard_normal((6, 8, 14, 14)).astype(dtype)
    w = rng.standard_normal((16, 8, 3, 3)).astype(dtype)
    b = rng.standard_normal(16).astype(dtype)
    y = fc.conv2d(x, w, b, 1, 1)
    dy = rng.standard_normal(y.shape).astype(dtype)
    xs = rng.standard_normal((5, 3, 9, 11)).astype(dtype)
    ws = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    ys = fc.conv2d(xs, ws, None, 2, 1)
    p = fc.max_pool2d(x, 2)
    dp = rng.standard_normal(p.shape).astype(dtype)
    cols = fc.im2col(x, 3, 3, 1, 1)
    return {
        "conv2d": lambda: fc.conv2d(x, w, b, 1, 1, activation="relu"),
        "conv2d_stride2": lambda: fc.conv2d(xs, ws, None, 2, 1),
        "conv2d_backward": lambda: fc.conv2d_backward(dy, x, w, 1, 1),
        "conv2d_backward_stride2": lambda: fc.conv2d_backward(ys, xs, ws, 2, 1),
        "im2col": lambda: fc.im2col(x, 3, 3, 1, 1),
        "col2im": lambda: fc.col2im(cols, x.shape, 3, 3, 1, 1),
        "max_pool2d": lambda: fc.max_pool2d(x, 2),
        "max_pool2d_3x3": lambda: fc.max_pool2d(x, 3, 2, 1),
        "max_pool2d_backward": lambda: fc.max_pool2d_backward(dp, x, 2),
        "avg_pool2d": lambda: fc.avg_pool2d(x, 3, 2, 1),
        "avg_pool2d_backward": lambda: fc.avg_pool2d_backward(dp, x.shape, 2),
    }


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def _run_concurrently(jobs):
    """Run each job (a callable returning a list of mismatches) in its own thread."""
    failures: list = []
    barrier = threading.Barrier(len(jobs))

    def body(job):
        barrier.wait()
        try:
            failures.extend(job())
        except Exception as e:  # noqa: BLE001 - reported as a failure below
            failures.append(repr(e))

    threads = [threading.Thread(target=body, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return failures


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_every_kernel_from_several_threads_matches_serial(dtype):
    # Each thread has its own inputs (different seeds) and interleaves every kernel, so calls
    # of the same shape from different threads overlap.
    per_thread = [_cases(np.random.default_rng(seed), dtype) for seed in range(THREADS)]
    expected = [{name: _as_tuple(call()) for name, call in cases.items()} for cases in per_thread]

    def job(t):
        def run():
            bad = []
            for r in range(ROUNDS):
                for name, call in per_thread[t].items():
                    got = _as_tuple(call())
                    for a, e in zip(got, expected[t][name], strict=True):
                        if not np.array_equal(a, e, equal_nan=True):
                            bad.append(f"thread {t} round {r}: {name}")
            return bad

        return run

    failures = _run_concurrently([job(t) for t in range(THREADS)])
    assert failures == []


def test_predict_on_a_shared_model_from_several_threads():
    from fastconv.models import deep_mnist_net

    model = deep_mnist_net(seed=0)
    rng = np.random.default_rng(1)
    inputs = [rng.random((30, 1, 28, 28), dtype=np.float32) for _ in range(THREADS)]
    model.build((1, 28, 28))
    expected = [model.predict(x, batch_size=10) for x in inputs]

    def job(t):
        def run():
            bad = []
            for r in range(4):
                if not np.array_equal(model.predict(inputs[t], batch_size=10), expected[t]):
                    bad.append(f"thread {t} round {r}")
            return bad

        return run

    assert _run_concurrently([job(t) for t in range(THREADS)]) == []


PROGRAM = """
import threading, numpy as np, numba, fastconv as fc
rng = np.random.default_rng(0)
x = rng.standard_normal((8, 8, 14, 14)).astype(np.float32)
w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
ref = fc.conv2d(x, w, None, 1, 1)
bad = []
def run():
    for _ in range(30):
        if not np.array_equal(fc.conv2d(x, w, None, 1, 1), ref):
            bad.append(1)
ts = [threading.Thread(target=run) for _ in range(3)]
[t.start() for t in ts]; [t.join() for t in ts]
print(numba.threading_layer(), len(bad))
"""


@pytest.mark.parametrize("layer", ["workqueue", "omp"])
def test_each_threading_layer_is_safe_from_several_threads(layer):
    if layer == "omp":
        pytest.importorskip("numba.np.ufunc.omppool")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    env["NUMBA_THREADING_LAYER"] = layer
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [layer, "0"]
