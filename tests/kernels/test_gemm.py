"""The CPU GEMM layer (fastconv.cpu._matmul) through the Dense ops: odd shapes against the float64
reference and PyTorch, both dtypes, the bias/ReLU epilogue, transposed and strided inputs,
bit-for-bit determinism (thread count, blocking, concurrent callers)."""

from __future__ import annotations

import itertools
import threading

import numba
import numpy as np
import pytest

import fastconv as fc
from fastconv import reference as ref
from fastconv.cpu._matmul import Blocking, blocking, matmul

EPS32 = np.finfo(np.float32).eps


def _bound(a, b, k, dtype):
    """|error| bound of a product computed in float32 over k terms and stored in ``dtype``:
    float32 accumulation (k * eps on the summed magnitudes; the FMA chain's error grows at
    most linearly) plus the output's rounding (relative, or half a subnormal step)."""
    mags = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))
    return (EPS32 * k + np.finfo(dtype).eps) * mags + _tiny(dtype)


def _tiny(dtype):
    return float(np.finfo(dtype).smallest_subnormal)


def _check(got, want, bound):
    excess = np.abs(got.astype(np.float64) - want) - bound
    assert np.all(excess <= 0), f"error above its bound by up to {excess.max():.3g}"


# M in 1, 7, 13 (below, at and across the 8-row panels); K, N in 1, 7, 13, 4097 (one past a
# power of two: a partial 16-value transpose, a partial 32-column panel, a partial KC block).
ODD = [(M, K, N) for M, K, N in itertools.product((1, 7, 13), (1, 7, 13, 4097), (1, 7, 13, 4097))]


@pytest.mark.parametrize("shape", ODD, ids=lambda s: "x".join(map(str, s)))
def test_dense_odd_shapes_against_the_reference(shape, dtype, rng):
    M, K, N = shape
    x = rng.standard_normal((M, K)).astype(dtype)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(dtype)
    b = rng.standard_normal(N).astype(dtype)
    y = fc.dense(x, w, b, "relu")
    want = ref.dense(x, w, b, "relu")
    mags = ref.dense(np.abs(x), np.abs(w), np.abs(b))
    _check(y, want, (EPS32 * (K + 1) + np.finfo(dtype).eps) * mags + _tiny(dtype))
    dy = rng.standard_normal((M, N)).astype(dtype)
    dx, dw, db = fc.dense_backward(dy, x, w)
    want_dx, want_dw, want_db = ref.dense_backward(dy, x, w)
    _check(dx, want_dx, _bound(dy, w.T, N, dtype))
    _check(dw, want_dw, _bound(x.T, dy, M, dtype))
    db_mags = np.abs(dy).astype(np.float64).sum(0)
    _check(db, want_db, (EPS32 * M + np.finfo(dtype).eps) * db_mags + _tiny(dtype))


@pytest.mark.parametrize("shape", [(1, 7, 13), (13, 4097, 7), (7, 13, 4097), (32, 300, 200)],
                         ids=lambda s: "x".join(map(str, s)))  # fmt: skip
def test_dense_against_pytorch(torch, shape, dtype, rng):
    M, K, N = shape
    x = rng.standard_normal((M, K)).astype(dtype)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(dtype)
    b = rng.standard_normal(N).astype(dtype)
    dy = rng.standard_normal((M, N)).astype(dtype)
    # PyTorch in float32 (its CPU float16 products round differently from ours), stored like
    # ours: the float16 comparison then measures only our accumulation and one rounding.
    xt, wt, bt = (torch.tensor(a.astype(np.float32), requires_grad=True) for a in (x, w, b))
    yt = torch.relu(torch.nn.functional.linear(xt, wt.T, bt))
    y = fc.dense(x, w, b, "relu")
    tol = 4 * np.finfo(dtype).eps + EPS32 * np.sqrt(K) * 4
    scale = float(np.abs(yt.detach().numpy()).max()) + 1
    np.testing.assert_allclose(
        y.astype(np.float32), yt.detach().numpy(), rtol=tol, atol=tol * scale
    )
    zt = torch.nn.functional.linear(xt, wt.T, bt)
    zt.backward(torch.tensor(dy.astype(np.float32)))
    for got, want in zip(fc.dense_backward(dy, x, w), (xt.grad, wt.grad, bt.grad), strict=True):
        want = want.numpy()
        scale = float(np.abs(want).max()) + 1
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=tol, atol=tol * scale)


def test_epilogue_bias_relu_nan_inf(dtype):
    x = np.array([[1.0, 2.0], [-1.0, 0.5], [np.nan, 1.0], [np.inf, 0.0]], dtype)
    w = np.array([[1.0, -1.0, 0.0], [0.5, 2.0, -3.0]], dtype)
    b = np.array([-2.0, 0.5, 1.5], dtype)
    with np.errstate(invalid="ignore"):
        want = ref.dense(x, w, b)
    y = fc.dense(x, w, b)
    np.testing.assert_array_equal(y, want.astype(dtype))  # exact: every term is exact here
    yr = fc.dense(x, w, b, "relu")
    assert np.isnan(yr[2]).all()  # NaN survives the ReLU
    assert np.isnan(yr[3, 2])  # inf * 0 = NaN, then NaN survives the ReLU
    assert yr[3, 0] == np.inf and yr[3, 1] == 0  # -inf -> 0
    finite = np.isfinite(want[:2])
    np.testing.assert_array_equal(yr[:2][finite], np.maximum(want[:2], 0)[finite].astype(dtype))


def test_non_contiguous_inputs(dtype, rng):
    x = rng.standard_normal((40, 26)).astype(dtype)[::3, ::2]  # (14, 13), strided
    w = rng.standard_normal((37, 13)).astype(dtype).T  # (13, 37), transposed view
    b = rng.standard_normal(74).astype(dtype)[::2]
    dy = rng.standard_normal((37, 14)).astype(dtype).T
    y = fc.dense(x, w, b, "relu")
    np.testing.assert_array_equal(
        y, fc.dense(np.ascontiguousarray(x), np.ascontiguousarray(w), np.ascontiguousarray(b),
                    "relu"),
    )  # fmt: skip
    for got, want in zip(
        fc.dense_backward(dy, x, w),
        fc.dense_backward(
            np.ascontiguousarray(dy), np.ascontiguousarray(x), np.ascontiguousarray(w)
        ),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)


def _products(dtype, M, K, N, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K)).astype(dtype)
    w = rng.standard_normal((K, N)).astype(dtype)
    dy = rng.standard_normal((M, N)).astype(dtype)
    return x, w, dy


def test_results_do_not_depend_on_blocking_or_thread_count(dtype):
    """Each output is one FMA chain over ascending k: the same bits for any KC / MC / NC and any
    number of threads."""
    M, K, N = 21, 700, 150
    x, w, dy = _products(dtype, M, K, N)
    cases = [(x, w, (M, N), False, False), (dy, w, (M, K), False, True),
             (x, dy, (K, N), True, False)]  # fmt: skip
    for a, b, shape, ta, tb in cases:
        k = a.shape[0] if ta else a.shape[1]
        first = matmul(a, b, np.empty(shape, dtype), ta, tb)
        blocks = [Blocking(16, 8, 32, 32), Blocking(64, 16, 96, 96), Blocking(k, 128, 4096, 4112),
                  blocking(shape[0], k, shape[1], 1, tb)]  # fmt: skip
        for blk in blocks:
            got = matmul(a, b, np.empty(shape, dtype), ta, tb, blk=blk)
            np.testing.assert_array_equal(got.view(np.uint8), first.view(np.uint8))
    saved = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = fc.dense(x, w), *fc.dense_backward(dy, x, w)
    finally:
        numba.set_num_threads(saved)
    many = fc.dense(x, w), *fc.dense_backward(dy, x, w)
    for a, b in zip(one, many, strict=True):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_dense_from_several_threads_matches_serial(dtype):
    shapes = [(13, 300, 70), (8, 64, 1000), (32, 1000, 33), (1, 4097, 7)]
    inputs = [_products(dtype, *s, seed=i) for i, s in enumerate(shapes)]
    serial = [(fc.dense(x, w, None, "relu"), *fc.dense_backward(dy, x, w)) for x, w, dy in inputs]
    failures = []
    barrier = threading.Barrier(4)

    def body(t):
        barrier.wait()
        try:
            for r in range(6):
                i = (t + r) % len(inputs)
                x, w, dy = inputs[i]
                got = (fc.dense(x, w, None, "relu"), *fc.dense_backward(dy, x, w))
                for a, b in zip(got, serial[i], strict=True):
                    if not np.array_equal(a.view(np.uint8), b.view(np.uint8)):
                        failures.append((t, r, i))
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(repr(e))

    threads = [threading.Thread(target=body, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not failures, failures[:5]


def test_empty_reduction_gives_bias(dtype):
    # K = 0: the product is empty, the output is the bias (then ReLU).
    x = np.zeros((3, 0), dtype)
    w = np.zeros((0, 5), dtype)
    b = np.array([1.0, -2.0, 0.0, 3.5, -0.5], dtype)
    np.testing.assert_array_equal(fc.dense(x, w, b), np.broadcast_to(b, (3, 5)))
    np.testing.assert_array_equal(
        fc.dense(x, w, b, "relu"), np.broadcast_to(np.maximum(b, 0), (3, 5))
    )
    assert (fc.dense(x, w) == 0).all()
    dx, dw, db = fc.dense_backward(np.ones((3, 5), dtype), x, w)
    assert dx.shape == (3, 0) and dw.shape == (0, 5) and (db == 3).all()
