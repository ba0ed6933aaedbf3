"""Dense and ReLU kernels (CPU backend) against the float64 reference, NumPy and PyTorch."""

from __future__ import annotations

import numpy as np
import op_cases
import pytest
from conftest import assert_close

import fastconv as fc
from fastconv import reference as ref

# (N, in, out): under and over the 4-row blocks, the book's first Dense layer, one column.
DENSE_SHAPES = [(7, 37, 13), (4, 5, 3), (1, 3, 2), (100, 1024, 50), (9, 6, 1)]


def _dense_bound(x, w, b, dtype):
    """|error| bound: the float32 sum of K products (tolerance rule) on the magnitudes summed,
    plus the output's rounding."""
    mags = ref.dense(np.abs(x), np.abs(w), None if b is None else np.abs(b))
    K = x.shape[1]
    return (np.finfo(np.float32).eps * 4 * np.sqrt(K) + np.finfo(dtype).eps) * mags + 1e-7


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_dense_matches_reference(backend, shape, bias, activation, dtype, rng):
    N, K, F = shape
    x = rng.standard_normal((N, K)).astype(dtype)
    w = (rng.standard_normal((K, F)) / np.sqrt(K)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype) if bias else None
    y = fc.dense(x, w, b, activation)
    assert y.shape == (N, F) and y.dtype == dtype
    want = ref.dense(x, w, b, activation)
    assert np.all(np.abs(y.astype(np.float64) - want) <= _dense_bound(x, w, b, dtype))
    if activation:
        assert (y >= 0).all()


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=str)
def test_dense_backward_matches_reference(backend, shape, dtype, rng):
    N, K, F = shape
    x = rng.standard_normal((N, K)).astype(dtype)
    w = rng.standard_normal((K, F)).astype(dtype)
    dy = rng.standard_normal((N, F)).astype(dtype)
    dx, dw, db = fc.dense_backward(dy, x, w)
    want_dx, want_dw, want_db = ref.dense_backward(dy, x, w)
    for got in (dx, dw, db):
        assert got.dtype == dtype
    eps = np.finfo(np.float32).eps * 4 + np.finfo(dtype).eps
    assert np.all(np.abs(dx - want_dx) <= eps * np.sqrt(F) * (np.abs(dy) @ np.abs(w.T)) + 1e-7)
    assert np.all(np.abs(dw - want_dw) <= eps * np.sqrt(N) * (np.abs(x.T) @ np.abs(dy)) + 1e-7)
    assert_close(db, want_db, dtype, N)
    none, dw2, db2 = fc.dense_backward(dy, x, w, need_dx=False)
    assert none is None
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)


def test_dense_matches_pytorch_linear_and_autograd(torch, rng):
    x = rng.standard_normal((11, 20)).astype(np.float32)
    w = rng.standard_normal((20, 6)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    dy = rng.standard_normal((11, 6)).astype(np.float32)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = torch.nn.functional.linear(xt, wt.T, bt)  # PyTorch stores (out, in)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(fc.dense(x, w, b), yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    for got, want in zip(fc.dense_backward(dy, x, w), (xt.grad, wt.grad, bt.grad), strict=True):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_dense_nan_inf_and_non_contiguous(backend, dtype, rng):
    x = rng.standard_normal((6, 8)).astype(dtype)
    w = rng.standard_normal((8, 5)).astype(dtype)
    x[2, 3] = np.nan
    w[1, 4] = np.inf
    y = fc.dense(x, w, activation="relu")
    assert np.isnan(y[2]).all()  # NaN survives the ReLU
    finite_rows = [i for i in range(6) if i != 2]
    assert np.isfinite(y[finite_rows, :4]).all()
    xs = rng.standard_normal((8, 6)).astype(dtype).T  # (6, 8) transposed view
    ws = rng.standard_normal((5, 8)).astype(dtype).T
    want = ref.dense(xs, ws)
    assert np.all(np.abs(fc.dense(xs, ws) - want) <= _dense_bound(xs, ws, None, dtype))
    dy = rng.standard_normal((5, 6)).astype(dtype).T
    for got, exact in zip(fc.dense_backward(dy, xs, ws), ref.dense_backward(dy, xs, ws),
                          strict=True):  # fmt: skip
        assert_close(got, exact, dtype, 8)


# --- ReLU ---------------------------------------------------------------------------------------


SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.5, -2.5, 65504.0, 1e-7, -1e-7]


@pytest.mark.parametrize("shape", [(3, 4, 9, 11), (5,), (2, 7), (200, 300)], ids=str)
def test_relu_and_its_gradient_are_numpy_bit_for_bit(backend, shape, dtype, rng):
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    k = min(len(SPECIALS), x.size)
    x.flat[:k] = SPECIALS[:k]
    dy.flat[:k] = SPECIALS[::-1][:k]
    y = fc.relu(x)
    assert y.dtype == dtype and y.shape == shape
    want = np.maximum(x, dtype.type(0))
    nan = np.isnan(want)
    assert np.array_equal(nan, np.isnan(y))
    assert np.array_equal(y[~nan], want[~nan])  # values (-0.0 == 0.0)
    with np.errstate(invalid="ignore"):
        want_dx = dy * (x > 0)
    dx = fc.relu_backward(dy, x)
    nan = np.isnan(want_dx)
    assert np.array_equal(nan, np.isnan(dx))
    bits = np.uint16 if dtype == np.float16 else np.uint32
    assert np.array_equal(want_dx.view(bits)[~nan], dx.view(bits)[~nan])
    assert_close(dx, ref.relu_backward(dy, x), dtype)
    assert_close(y, ref.relu(x), dtype)


def test_relu_keeps_nan_payload_and_negative_zero_as_torch(torch):
    x = np.array([-0.0, 0.0, -1.0, 2.0, np.nan], np.float32)
    y = fc.relu(x)
    want = torch.relu(torch.tensor(x)).numpy()
    assert np.array_equal(np.signbit(y[:4]), np.signbit(want[:4]))
    assert np.isnan(y[4])


def test_relu_backward_writes_into_out(backend, dtype, rng):
    y = rng.standard_normal((4, 5, 6)).astype(dtype)
    dy = rng.standard_normal(y.shape).astype(dtype)
    out = np.full(y.shape, 7, dtype)
    got = fc.relu_backward(dy, y, out=out)
    assert got is out
    np.testing.assert_array_equal(out, dy * (y > 0))
    # Non-contiguous dy/y are fine; out must be C-contiguous and must not alias the inputs.
    got2 = fc.relu_backward(dy.transpose(2, 1, 0), y.transpose(2, 1, 0))
    np.testing.assert_array_equal(got2, (dy * (y > 0)).transpose(2, 1, 0))
    with pytest.raises(ValueError, match="out must not share memory with dy"):
        fc.relu_backward(dy, y, out=dy)
    with pytest.raises(ValueError, match="out must not share memory with y"):
        fc.relu_backward(dy, y, out=y)
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        fc.relu_backward(dy[:, :, :3], y[:, :, :3], out=np.empty((4, 5, 6), dtype)[:, :, ::2])
    with pytest.raises(ValueError, match=r"out must have shape \(4, 5, 6\)"):
        fc.relu_backward(dy, y, out=np.empty((4, 5), dtype))
    with pytest.raises(TypeError, match="out must have dtype float32 or float16"):
        fc.relu_backward(dy, y, out=np.empty(y.shape, np.float64))
    other = np.float32 if dtype == np.float16 else np.float16
    with pytest.raises(TypeError, match="out must have the same dtype as dy"):
        fc.relu_backward(dy, y, out=np.empty(y.shape, other))


def test_empty_inputs(backend, dtype):
    assert fc.relu(np.zeros((0, 3), dtype)).shape == (0, 3)
    assert fc.relu_backward(np.zeros((0,), dtype), np.zeros((0,), dtype)).shape == (0,)
    x = np.zeros((0, 4), dtype)
    w = np.ones((4, 3), dtype)
    assert fc.dense(x, w, np.ones(3, dtype)).shape == (0, 3)
    dx, dw, db = fc.dense_backward(np.zeros((0, 3), dtype), x, w)
    assert dx.shape == (0, 4) and (dw == 0).all() and dw.shape == (4, 3) and (db == 0).all()
    assert fc.dense_backward(np.zeros((0, 3), dtype), x, w, need_dx=False)[0] is None


def _bad_calls():
    f32 = np.float32
    x = np.zeros((4, 3), f32)
    w = np.zeros((3, 2), f32)
    dy = np.zeros((4, 2), f32)
    V, T = ValueError, TypeError
    yield "x-float64", lambda: fc.dense(x.astype(float), w), T, "x must have dtype"
    yield "x-int", lambda: fc.dense(x.astype(np.int8), w), T, "x must have dtype"
    yield "x-3d", lambda: fc.dense(x[None], w), V, "x must be 2-dimensional"
    yield "w-rows", lambda: fc.dense(x, w[:2]), V, r"w must have 3 rows \(w.shape\[0\]"
    yield "w-dtype", lambda: fc.dense(x, w.astype(np.float16)), T, "w must have the same dtype"
    yield "b-length", lambda: fc.dense(x, w, np.zeros(3, f32)), V, r"b must have length 2"
    yield "activation", lambda: fc.dense(x, w, None, "gelu"), V, "activation must be None"
    yield "dy-shape", lambda: fc.dense_backward(dy[:, :1], x, w), V, r"dy must have shape \(4, 2\)"
    yield "dy-dtype", lambda: fc.dense_backward(dy.astype(np.float16), x, w), T, "dy must have"
    yield "need_dx", lambda: fc.dense_backward(dy, x, w, need_dx=1), T, "need_dx must be a bool"
    yield "relu-float64", lambda: fc.relu(x.astype(float)), T, "x must have dtype"
    yield "relu-list", lambda: fc.relu([1.0]), T, "x must be a numpy.ndarray"
    yield "relu_b-shape", lambda: fc.relu_backward(x, x[:2]), V, r"y must have shape \(4, 3\)"
    yield "relu_b-dtype", lambda: fc.relu_backward(x, x.astype(np.float16)), T, "y must have the"
    yield "relu_b-dy-int", lambda: fc.relu_backward(x.astype(int), x), T, "dy must have dtype"


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in _bad_calls()],
                         ids=[c[0] for c in _bad_calls()])  # fmt: skip
def test_bad_arguments_are_named(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


# --- conformance cases (tests/kernels/op_cases.py; run by test_kernel_interface.py) -------------


def _dense_inputs(rng, dt, n, out_first=False):
    r = op_cases.normal
    first = r(rng, (n, 7 if out_first else 13), dt)
    return first, *((r(rng, (n, 13), dt),) if out_first else ()), r(rng, (13, 7), dt)


op_cases.register(
    "dense",
    lambda x, w, b: fc.dense(x, w, b, "relu"),
    lambda x, w, b: ref.dense(x, w, b, "relu"),
    lambda rng, dt, n: (*_dense_inputs(rng, dt, n), op_cases.normal(rng, (7,), dt)),
    terms=13,
)
op_cases.register(
    "dense_backward",
    fc.dense_backward,
    ref.dense_backward,
    lambda rng, dt, n: _dense_inputs(rng, dt, n, out_first=True),
    terms=13,
)
op_cases.register(
    "relu",
    fc.relu,
    ref.relu,
    lambda rng, dt, n: (op_cases.normal(rng, (n, 3, 4, 4), dt),),
    any_rank=True,
)
op_cases.register(
    "relu_backward",
    fc.relu_backward,
    ref.relu_backward,
    lambda rng, dt, n: tuple(op_cases.normal(rng, (n, 3, 4, 4), dt) for _ in range(2)),
    refusals=[(lambda dy, y: fc.relu_backward(dy, y[:1]), ValueError, "y must have shape")],
    any_rank=True,
)
