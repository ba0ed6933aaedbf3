"""The batch-norm, global-pooling, dense and ReLU ops called from several Python threads at once
give the serial results, bit for bit (they keep no state between calls; parallel launches are
serialised by the CPU backend's launch guard)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import fastconv as fc


def _cases(rng, dtype):
    x = rng.standard_normal((12, 16, 8, 8)).astype(dtype)
    g, b = rng.standard_normal(16).astype(dtype), rng.standard_normal(16).astype(dtype)
    y, mean, var = fc.batch_norm_forward(x, g, b, activation="relu")
    dy = rng.standard_normal(x.shape).astype(dtype)
    x2 = rng.standard_normal((40, 64)).astype(dtype)
    w2 = rng.standard_normal((64, 10)).astype(dtype)
    dy2 = rng.standard_normal((40, 10)).astype(dtype)
    return [
        lambda: fc.batch_norm_forward(x, g, b, activation="relu"),
        lambda: fc.batch_norm_backward(dy, x, g, mean, var, y=y),
        lambda: fc.batch_norm_inference(x, g, b, mean, var),
        lambda: fc.batch_norm_inference_backward(dy, g, var, y=y),
        lambda: fc.global_avg_pool2d(x),
        lambda: fc.global_avg_pool2d_backward(dy[:, :, 0, 0].copy(), x.shape),
        lambda: fc.dense(x2, w2, w2[0], "relu"),
        lambda: fc.dense_backward(dy2, x2, w2),
        lambda: fc.relu(x),
        lambda: fc.relu_backward(dy, y),
    ]


def _bits(result):
    return [a.tobytes() for a in (result if isinstance(result, tuple) else (result,))]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_new_ops_from_several_threads_match_serial(dtype):
    jobs = []
    for seed in range(4):
        calls = _cases(np.random.default_rng(seed), dtype)
        jobs.append((calls, [_bits(c()) for c in calls]))
    failures = []
    barrier = threading.Barrier(len(jobs))

    def body(calls, expected):
        barrier.wait()
        for _ in range(3):
            for i, call in enumerate(calls):
                if _bits(call()) != expected[i]:
                    failures.append(i)

    threads = [threading.Thread(target=body, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not failures, failures
