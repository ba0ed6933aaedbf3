"""Global average pooling (CPU backend) against the float64 reference and PyTorch."""

from __future__ import annotations

import numpy as np
import op_cases
import pytest
from conftest import assert_close

import fastconv as fc
from fastconv import reference as ref

SHAPES = [(2, 3, 5, 7), (4, 1, 1, 1), (3, 6, 1, 9), (1, 2, 28, 28), (100, 64, 4, 4), (7, 70, 3, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_match_reference(backend, shape, dtype, rng):
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    y = fc.global_avg_pool2d(x)
    assert y.shape == shape[:2] and y.dtype == dtype
    assert_close(y, ref.global_avg_pool2d(x), dtype, shape[2] * shape[3])
    dy = rng.standard_normal(shape[:2]).astype(dtype)
    dx = fc.global_avg_pool2d_backward(dy, shape)
    assert dx.shape == shape and dx.dtype == dtype
    assert_close(dx, ref.global_avg_pool2d_backward(dy, shape), dtype)


def test_closed_forms(backend):
    """Constant planes average to the constant; the gradient spreads dy evenly (exactly, for
    a power-of-two plane) and sums back to dy."""
    x = np.broadcast_to(np.arange(6, dtype=np.float32).reshape(2, 3, 1, 1), (2, 3, 4, 4)).copy()
    np.testing.assert_array_equal(fc.global_avg_pool2d(x), np.arange(6).reshape(2, 3))
    dy = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    dx = fc.global_avg_pool2d_backward(dy, x.shape)
    np.testing.assert_array_equal(dx, np.broadcast_to(dy[:, :, None, None] / 16, x.shape))
    np.testing.assert_array_equal(dx.sum(axis=(2, 3)), dy)


def test_adjoint_identity(backend, rng):
    """<gap(x), dy> == <x, gap_backward(dy)>: the backward is the forward's transpose."""
    x = rng.standard_normal((3, 5, 6, 7)).astype(np.float32)
    dy = rng.standard_normal((3, 5)).astype(np.float32)
    lhs = np.vdot(fc.global_avg_pool2d(x).astype(np.float64), dy)
    rhs = np.vdot(x.astype(np.float64), fc.global_avg_pool2d_backward(dy, x.shape))
    assert abs(lhs - rhs) <= 1e-5 * max(1.0, abs(lhs))


@pytest.mark.parametrize("shape", [(4, 8, 7, 7), (2, 3, 1, 5), (100, 64, 4, 4)], ids=str)
def test_matches_pytorch(torch, shape, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape[:2]).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.adaptive_avg_pool2d(xt, 1)
    yt.backward(torch.tensor(dy).reshape(yt.shape))
    np.testing.assert_allclose(fc.global_avg_pool2d(x), yt.detach().numpy()[:, :, 0, 0],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(fc.global_avg_pool2d_backward(dy, shape), xt.grad.numpy(),
                               rtol=1e-6, atol=1e-7)  # fmt: skip


def test_nan_and_inf_stay_in_their_plane(backend, dtype):
    x = np.ones((2, 3, 4, 4), dtype)
    x[0, 1, 2, 2] = np.nan
    x[1, 2, 0, 0] = np.inf
    y = fc.global_avg_pool2d(x)
    assert np.isnan(y[0, 1]) and np.isposinf(y[1, 2])
    assert np.isfinite(np.delete(y.ravel(), [1, 5])).all()
    dy = np.ones((2, 3), dtype)
    dy[1, 0] = np.nan
    dx = fc.global_avg_pool2d_backward(dy, x.shape)
    assert np.isnan(dx[1, 0]).all() and np.isfinite(dx[0]).all()


def test_empty_batch_and_non_contiguous(backend, dtype, rng):
    x = np.zeros((0, 3, 4, 4), dtype)
    assert fc.global_avg_pool2d(x).shape == (0, 3)
    dx = fc.global_avg_pool2d_backward(np.zeros((0, 3), dtype), (0, 3, 4, 4))
    assert dx.shape == (0, 3, 4, 4) and dx.dtype == dtype
    base = rng.standard_normal((3, 8, 5, 6)).astype(dtype)
    xs = base.transpose(0, 1, 3, 2)[:, ::3]
    assert not xs.flags.c_contiguous
    assert_close(fc.global_avg_pool2d(xs), ref.global_avg_pool2d(xs), dtype, 30)
    dy = rng.standard_normal((6, 3)).astype(dtype).T  # (3, 6) strided
    assert_close(fc.global_avg_pool2d_backward(dy, (3, 6, 2, 2)),
                 ref.global_avg_pool2d_backward(dy, (3, 6, 2, 2)), dtype)  # fmt: skip


def _bad_calls():
    f32 = np.float32
    x = np.zeros((2, 3, 4, 4), f32)
    dy = np.zeros((2, 3), f32)
    V, T = ValueError, TypeError
    gap, gapb = fc.global_avg_pool2d, fc.global_avg_pool2d_backward
    yield "x-float64", lambda: gap(x.astype(np.float64)), T, "x must have dtype"
    yield "x-int", lambda: gap(x.astype(np.int64)), T, "x must have dtype"
    yield "x-2d", lambda: gap(x[:, :, 0, 0]), V, "x must be 4-dimensional"
    yield "x-no-pixels", lambda: gap(x[:, :, :0]), V, "x must have height and width"
    yield "dy-4d", lambda: gapb(x, x.shape), V, "dy must be 2-dimensional"
    yield "dy-shape", lambda: gapb(dy[:, :2], x.shape), V, r"dy must have shape \(2, 3\)"
    yield "dy-float64", lambda: gapb(dy.astype(float), x.shape), T, "dy must have dtype"
    yield "x_shape-len", lambda: gapb(dy, (2, 3, 4)), V, "x_shape must be a 4-tuple"
    yield "x_shape-zero-h", lambda: gapb(dy, (2, 3, 0, 4)), V, r"x_shape\[2\] must be >= 1"
    yield "x_shape-float", lambda: gapb(dy, (2, 3, 4.0, 4)), T, r"x_shape\[2\] must be an int"


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in _bad_calls()],
                         ids=[c[0] for c in _bad_calls()])  # fmt: skip
def test_bad_arguments_are_named(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


# --- conformance cases (tests/kernels/op_cases.py; run by test_kernel_interface.py) -------------

op_cases.register(
    "global_avg_pool2d",
    fc.global_avg_pool2d,
    ref.global_avg_pool2d,
    lambda rng, dt, n: (op_cases.normal(rng, (n, 3, 5, 4), dt),),
    terms=20,
)
op_cases.register(
    "global_avg_pool2d_backward",
    lambda dy: fc.global_avg_pool2d_backward(dy, (dy.shape[0], 3, 5, 4)),
    lambda dy: ref.global_avg_pool2d_backward(dy, (dy.shape[0], 3, 5, 4)),
    lambda rng, dt, n: (op_cases.normal(rng, (n, 3), dt),),
)
