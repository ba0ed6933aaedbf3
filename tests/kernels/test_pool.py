"""Max and average pooling (CPU kernels) against the float64 reference and PyTorch."""

from __future__ import annotations

import numpy as np
import op_cases
import pytest
from conftest import assert_close, distinct_values
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

import fastconv
from fastconv import reference as ref
from fastconv.cpu import pool as cpu_pool

# (x shape, size, stride, pad): every kernel path and window shape; first two take the
# 2x2 stride-2 fast path (even and odd input), the rest the general kernels.
CASES = [
    ((2, 3, 8, 6), 2, None, 0),
    ((2, 3, 7, 9), 2, 2, 0),
    ((2, 3, 5, 6), 1, 1, 0),
    ((2, 3, 7, 7), 3, 1, 1),
    ((2, 3, 9, 8), 3, 2, 1),
    ((1, 2, 7, 9), (2, 3), (1, 2), (1, 1)),
    ((1, 2, 8, 8), 2, 1, 1),
    ((1, 2, 9, 7), 3, None, 0),
    ((1, 2, 6, 9), (3, 2), 3, (1, 0)),
]
CASE_IDS = [f"{s}-k{k}-s{st_}-p{p}" for s, k, st_, p in CASES]


def _windows(x, size, stride, pad, fill):
    """(N, C, OH, OW, kh, kw) windows of ``x`` padded with ``fill``."""
    kh, kw = (size, size) if isinstance(size, int) else size
    stride = (kh, kw) if stride is None else stride
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (pad, pad) if isinstance(pad, int) else pad
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    return sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]


@pytest.mark.parametrize(("shape", "size", "stride", "pad"), CASES, ids=CASE_IDS)
def test_max_pool_matches_reference(shape, size, stride, pad, dtype, rng):
    x = distinct_values(shape, rng, dtype)
    y = fastconv.max_pool2d(x, size, stride, pad)
    # Max only selects: exact in both dtypes.
    np.testing.assert_array_equal(y, ref.max_pool2d(x, size, stride, pad).astype(dtype))
    assert y.dtype == dtype

    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = fastconv.max_pool2d_backward(dy, x, size, stride, pad)
    # Overlapping windows sum several gradients into one pixel (at most kh*kw of them).
    k = int(np.prod(_windows(x, size, stride, pad, 0).shape[-2:]))
    assert_close(dx, ref.max_pool2d_backward(dy, x, size, stride, pad), dtype, k)


@pytest.mark.parametrize(("shape", "size", "stride", "pad"), CASES, ids=CASE_IDS)
def test_avg_pool_matches_reference(shape, size, stride, pad, dtype, rng):
    x = rng.standard_normal(shape).astype(dtype)
    y = fastconv.avg_pool2d(x, size, stride, pad)
    k = int(np.prod(_windows(x, size, stride, pad, 0).shape[-2:]))
    assert_close(y, ref.avg_pool2d(x, size, stride, pad), dtype, k)

    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = fastconv.avg_pool2d_backward(dy, x.shape, size, stride, pad)
    assert_close(dx, ref.avg_pool2d_backward(dy, x.shape, size, stride, pad), dtype, k)


@pytest.mark.parametrize(("shape", "size", "stride", "pad"), CASES[:5], ids=CASE_IDS[:5])
def test_ties_go_to_first_maximum(shape, size, stride, pad, dtype, rng):
    # Three distinct values: nearly every window has ties.
    x = rng.integers(-1, 2, size=shape).astype(dtype)
    dy = rng.standard_normal(fastconv.max_pool2d(x, size, stride, pad).shape).astype(dtype)
    dx = fastconv.max_pool2d_backward(dy, x, size, stride, pad)
    kh = size if isinstance(size, int) else max(size)
    assert_close(dx, ref.max_pool2d_backward(dy, x, size, stride, pad), dtype, kh * kh)


def test_avg_pool_pad_beyond_half_window(rng):
    # Allowed for average pooling (windows of pure padding average to 0), unlike max pooling.
    x = rng.standard_normal((1, 2, 3, 3)).astype(np.float32)
    y = fastconv.avg_pool2d(x, 2, 1, 2)
    assert_close(y, ref.avg_pool2d(x, 2, 1, 2), np.float32, 4)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = fastconv.avg_pool2d_backward(dy, x.shape, 2, 1, 2)
    assert_close(dx, ref.avg_pool2d_backward(dy, x.shape, 2, 1, 2), np.float32, 4)


def test_padding_never_wins_the_max(dtype):
    x = -np.ones((1, 1, 4, 4), dtype)
    y = fastconv.max_pool2d(x, 3, 2, 1)
    np.testing.assert_array_equal(y, -1)
    dx = fastconv.max_pool2d_backward(np.ones_like(y), x, 3, 2, 1)
    assert dx.sum() == y.size  # every gradient landed on a real pixel


def test_negative_infinity_is_a_value(dtype):
    # A window of -inf pixels outputs -inf and passes the gradient to its first pixel.
    x = np.full((1, 1, 4, 4), -np.inf, dtype)
    x[0, 0, 2:, 2:] = 1
    for size, stride, pad in [(2, 2, 0), (3, 1, 1)]:
        y = fastconv.max_pool2d(x, size, stride, pad)
        np.testing.assert_array_equal(y, ref.max_pool2d(x, size, stride, pad).astype(dtype))
        dy = np.arange(1, y.size + 1, dtype=dtype).reshape(y.shape)
        np.testing.assert_array_equal(
            fastconv.max_pool2d_backward(dy, x, size, stride, pad),
            ref.max_pool2d_backward(dy, x, size, stride, pad).astype(dtype),
        )


@pytest.mark.parametrize(("size", "stride", "pad"), [(2, 2, 0), (3, 2, 1), (2, 1, 0)])
def test_nan_propagates_and_takes_the_gradient(size, stride, pad, dtype, rng):
    x = distinct_values((2, 2, 6, 6), rng, dtype)
    x[0, 1, 3, 2] = np.nan
    x[1, 0, 0, 5] = np.nan
    y = fastconv.max_pool2d(x, size, stride, pad)
    expected = ref.max_pool2d(x, size, stride, pad)
    assert np.isnan(expected).any()
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    np.testing.assert_array_equal(y[~np.isnan(y)], expected[~np.isnan(expected)])

    dy = np.ones_like(y)
    dx = fastconv.max_pool2d_backward(dy, x, size, stride, pad)
    np.testing.assert_array_equal(dx, ref.max_pool2d_backward(dy, x, size, stride, pad))
    assert dx[0, 1, 3, 2] > 0 and dx[1, 0, 0, 5] > 0


def test_avg_pool_nan_propagates(dtype):
    x = np.zeros((1, 1, 4, 4), dtype)
    x[0, 0, 1, 1] = np.nan
    y = fastconv.avg_pool2d(x, 2)
    np.testing.assert_array_equal(np.isnan(y[0, 0]), [[True, False], [False, False]])


def test_fast_path_agrees_with_general_kernel(dtype, rng):
    # The 2x2 kernels and the general kernels must agree bit for bit, ties and NaNs included.
    x = rng.integers(-2, 3, size=(3, 4, 10, 12)).astype(dtype)
    x[0, 0, 4, 5] = x[2, 3, 9, 11] = np.nan
    x[1, 1, 0, 0] = -np.inf
    xb = x.view(np.uint16) if dtype == np.float16 else x
    planes = xb.reshape(-1, 10, 12)
    fast, general = np.empty((12, 5, 6), xb.dtype), np.empty((12, 5, 6), xb.dtype)
    cpu_pool._max_forward_2x2(planes, fast)
    cpu_pool._max_forward(planes, general, 2, 2, 2, 2, 0, 0)
    np.testing.assert_array_equal(fast, general)

    dy = rng.standard_normal((12, 5, 6)).astype(dtype)
    dyb = dy.view(np.uint16) if dtype == np.float16 else dy
    dx_fast, dx_general = np.empty_like(planes), np.empty_like(planes)
    cpu_pool._backward_2x2_kernel_for(planes.dtype)(dyb, planes, dx_fast)
    cpu_pool._max_backward(dyb, planes, dx_general, 2, 2, 2, 2, 0, 0)
    np.testing.assert_array_equal(dx_fast, dx_general)


def test_avg_fast_path_agrees_with_general_kernel(dtype, rng):
    # The 2x2/s2 average: the general kernel's sum from +0.0 in the same order, -0.0 and NaN
    # and infinities included, odd sizes (the last row and column unused).
    x = (rng.standard_normal((3, 4, 11, 13)) * 1e3).astype(dtype)
    x[0, 0, :2, :2] = -0.0
    x[0, 1, 4, 5] = np.nan
    x[1, 1, 0, 0], x[1, 1, 0, 1] = np.inf, -np.inf
    x[2, 2, 2, 2] = np.inf
    xb = x.view(np.uint16) if dtype == np.float16 else x
    planes = xb.reshape(-1, 11, 13)
    fast, general = np.empty((12, 5, 6), xb.dtype), np.empty((12, 5, 6), xb.dtype)
    cpu_pool._avg_forward_2x2(planes, fast)
    cpu_pool._avg_forward(planes, general, 2, 2, 2, 2, 0, 0)
    np.testing.assert_array_equal(fast, general)
    assert np.signbit(fast.view(dtype)[0, 0, 0]) == np.signbit(general.view(dtype)[0, 0, 0])
    serial = np.empty_like(fast)
    cpu_pool._avg_forward_2x2_serial(planes, serial)
    np.testing.assert_array_equal(serial, fast)
    y = fastconv.avg_pool2d(x, 2)  # through the op: the fast path, against the reference
    with np.errstate(invalid="ignore"):  # inf - inf in the reference's window sum
        expected = ref.avg_pool2d(x, 2)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    finite = np.isfinite(expected)
    assert_close(np.where(finite, y, 0), np.where(finite, expected, 0), dtype, k=4)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4)])
def test_empty_batch_or_channels(shape, dtype):
    # Zero images or channels are valid (as in PyTorch) and give empty results.
    x = np.zeros(shape, dtype)
    for size, stride, pad in [(2, 2, 0), (3, 1, 1)]:
        y = fastconv.max_pool2d(x, size, stride, pad)
        assert y.shape == ref.max_pool2d(x, size, stride, pad).shape and y.dtype == dtype
        assert fastconv.max_pool2d_backward(y, x, size, stride, pad).shape == shape
        assert fastconv.avg_pool2d(x, size, stride, pad).shape == y.shape


def test_non_contiguous_input(dtype, rng):
    base = distinct_values((2, 6, 3, 10), rng, dtype)
    x = base.transpose(0, 2, 3, 1)[:, :, ::2]  # (2, 3, 5, 6), strided
    assert not x.flags.c_contiguous
    for size, stride, pad in [(2, 2, 0), (3, 1, 1)]:
        y = fastconv.max_pool2d(x, size, stride, pad)
        np.testing.assert_array_equal(y, ref.max_pool2d(x, size, stride, pad).astype(dtype))
        dy = rng.standard_normal(y.shape).astype(dtype)[..., ::-1]  # non-contiguous too
        dx = fastconv.max_pool2d_backward(dy, x, size, stride, pad)
        assert_close(dx, ref.max_pool2d_backward(dy, x, size, stride, pad), dtype, 9)
        dxa = fastconv.avg_pool2d_backward(dy, x.shape, size, stride, pad)
        assert_close(dxa, ref.avg_pool2d_backward(dy, x.shape, size, stride, pad), dtype, 9)


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    sh=st.integers(1, 3),
    sw=st.integers(1, 3),
)
def test_max_output_is_an_element_of_its_window(data, h, w, kh, kw, sh, sw):
    ph = data.draw(st.integers(0, kh // 2), label="ph")
    pw = data.draw(st.integers(0, kw // 2), label="pw")
    assume(kh <= h + 2 * ph and kw <= w + 2 * pw)  # else rejected: see test_validation.py
    values = st.floats(-1e4, 1e4, width=32)
    flat = data.draw(st.lists(values, min_size=2 * h * w, max_size=2 * h * w), label="x")
    x = np.array(flat, np.float32).reshape(1, 2, h, w)
    y = fastconv.max_pool2d(x, (kh, kw), (sh, sw), (ph, pw))
    win = _windows(x, (kh, kw), (sh, sw), (ph, pw), -np.inf)[:, :, : y.shape[2], : y.shape[3]]
    assert not np.isinf(y).any()
    assert (win == y[..., None, None]).any(axis=(-2, -1)).all()
    assert (win <= y[..., None, None]).all()


# --- PyTorch ---------------------------------------------------------------------------------

TORCH_CASES = [(2, None, 0), (3, 2, 1), ((2, 3), (1, 2), (1, 1)), (3, 1, 1)]


@pytest.mark.parametrize(("size", "stride", "pad"), TORCH_CASES)
def test_matches_torch(torch, size, stride, pad, rng):
    F = torch.nn.functional
    x = distinct_values((2, 3, 9, 8), rng)
    x[1, 2, 4, 4] = np.nan  # one NaN per window at most: torch's NaN choice is unambiguous
    xt = torch.from_numpy(x.copy()).requires_grad_()
    kw = dict(kernel_size=size, stride=stride, padding=pad)

    yt = F.max_pool2d(xt, **kw)
    y = fastconv.max_pool2d(x, size, stride, pad)
    np.testing.assert_array_equal(y, yt.detach().numpy())
    dy = rng.standard_normal(y.shape).astype(np.float32)
    yt.backward(torch.from_numpy(dy))
    dx = fastconv.max_pool2d_backward(dy, x, size, stride, pad)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-6, atol=1e-6)

    x = np.nan_to_num(x)
    xt = torch.from_numpy(x).requires_grad_()
    yt = F.avg_pool2d(xt, **kw)  # count_include_pad=True is PyTorch's default
    np.testing.assert_allclose(fastconv.avg_pool2d(x, size, stride, pad), yt.detach(), 1e-6, 1e-5)
    yt.backward(torch.from_numpy(dy))
    dx = fastconv.avg_pool2d_backward(dy, x.shape, size, stride, pad)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-6, atol=1e-6)


def test_matches_torch_with_ties(torch, rng):
    x = rng.integers(0, 2, size=(2, 3, 8, 8)).astype(np.float32)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    for size, stride in [(2, 2), (3, 1)]:
        xt.grad = None
        yt = torch.nn.functional.max_pool2d(xt, size, stride)
        dy = rng.standard_normal(tuple(yt.shape)).astype(np.float32)
        yt.backward(torch.from_numpy(dy))
        dx = fastconv.max_pool2d_backward(dy, x, size, stride)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-6, atol=1e-6)


# --- conformance cases (tests/kernels/op_cases.py; run by test_kernel_interface.py) -------------


def _planes(rng, dt, n, h=7, w=6):
    return (op_cases.normal(rng, (n, 2, h, w), dt),)


op_cases.register(
    "max_pool2d",
    lambda x: fastconv.max_pool2d(x, 3, 2, 1, ceil_mode=True),
    lambda x: ref.max_pool2d(x, 3, 2, 1, ceil_mode=True),
    _planes,
)
op_cases.register(
    "max_pool2d_backward",
    lambda dy, x: fastconv.max_pool2d_backward(dy, x, 2),
    lambda dy, x: ref.max_pool2d_backward(dy, x, 2),
    lambda rng, dt, n: (*_planes(rng, dt, n, 3, 3), *_planes(rng, dt, n)),
)
op_cases.register(
    "avg_pool2d",
    lambda x: fastconv.avg_pool2d(x, 3, 1, 1),
    lambda x: ref.avg_pool2d(x, 3, 1, 1),
    _planes,
    terms=9,
)
op_cases.register(
    "avg_pool2d_backward",
    lambda dy: fastconv.avg_pool2d_backward(dy, (dy.shape[0], 2, 7, 6), 3, 1, 1),
    lambda dy: ref.avg_pool2d_backward(dy, (dy.shape[0], 2, 7, 6), 3, 1, 1),
    _planes,
    terms=9,
)
