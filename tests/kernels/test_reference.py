"""The float64 oracle itself: brute-force loops on tiny shapes and numerical gradients.

Everything else is tested against :mod:`fastconv.reference`, so it is checked here against
code that shares nothing with it: explicit index loops written from the definitions, and
central differences for every backward function.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from _gradcheck import numerical_grad

from fastconv import reference as ref

# (x shape, kernel (kh, kw), stride, pad)
GEOMETRIES = [
    ((2, 2, 5, 4), (3, 2), (1, 1), (0, 0)),
    ((1, 3, 5, 5), (3, 3), (2, 2), (1, 1)),
    ((2, 1, 4, 6), (2, 3), (2, 1), (1, 0)),
]


def _out(size, k, s, p):
    return (size + 2 * p - k) // s + 1


def _pixel(x, n, c, h, w, fill):
    """x[n, c, h, w] in the padded image's coordinates handled by the caller; ``fill`` outside."""
    if 0 <= h < x.shape[2] and 0 <= w < x.shape[3]:
        return x[n, c, h, w]
    return fill


def brute_im2col(x, kh, kw, s, p):
    N, C, H, W = x.shape
    OH, OW = _out(H, kh, s[0], p[0]), _out(W, kw, s[1], p[1])
    cols = np.zeros((N * OH * OW, C * kh * kw))
    for n, oh, ow, c, i, j in itertools.product(
        range(N), range(OH), range(OW), range(C), range(kh), range(kw)
    ):
        h, w = oh * s[0] - p[0] + i, ow * s[1] - p[1] + j
        cols[(n * OH + oh) * OW + ow, (c * kh + i) * kw + j] = _pixel(x, n, c, h, w, 0.0)
    return cols


def brute_conv(x, wt, b, s, p):
    N, C, H, W = x.shape
    F, _, kh, kw = wt.shape
    OH, OW = _out(H, kh, s[0], p[0]), _out(W, kw, s[1], p[1])
    y = np.zeros((N, F, OH, OW))
    for n, f, oh, ow in itertools.product(range(N), range(F), range(OH), range(OW)):
        acc = b[f]
        for c, i, j in itertools.product(range(C), range(kh), range(kw)):
            acc += wt[f, c, i, j] * _pixel(x, n, c, oh * s[0] - p[0] + i, ow * s[1] - p[1] + j, 0)
        y[n, f, oh, ow] = acc
    return y


def brute_pool(x, kh, kw, s, p, mode):
    N, C, H, W = x.shape
    OH, OW = _out(H, kh, s[0], p[0]), _out(W, kw, s[1], p[1])
    y = np.zeros((N, C, OH, OW))
    for n, c, oh, ow in itertools.product(range(N), range(C), range(OH), range(OW)):
        fill = -np.inf if mode == "max" else 0.0
        vals = [
            _pixel(x, n, c, oh * s[0] - p[0] + i, ow * s[1] - p[1] + j, fill)
            for i in range(kh)
            for j in range(kw)
        ]
        y[n, c, oh, ow] = max(vals) if mode == "max" else sum(vals) / (kh * kw)
    return y


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.mark.parametrize(("shape", "k", "s", "p"), GEOMETRIES)
def test_im2col_and_col2im(shape, k, s, p, rng):
    x = rng.standard_normal(shape)
    cols = ref.im2col(x, *k, s, p)
    np.testing.assert_array_equal(cols, brute_im2col(x, *k, s, p))
    # col2im is the adjoint: <im2col(x), c> == <x, col2im(c)> for every x and c.
    c = rng.standard_normal(cols.shape)
    back = ref.col2im(c, shape, *k, s, p)
    assert back.shape == shape
    np.testing.assert_allclose(np.sum(cols * c), np.sum(x * back), rtol=1e-12)


@pytest.mark.parametrize(("shape", "k", "s", "p"), GEOMETRIES)
def test_conv2d(shape, k, s, p, rng):
    x = rng.standard_normal(shape)
    wt = rng.standard_normal((3, shape[1], *k))
    b = rng.standard_normal(3)
    expected = brute_conv(x, wt, b, s, p)
    np.testing.assert_allclose(ref.conv2d(x, wt, b, s, p), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        ref.conv2d(x, wt, b, s, p, activation="relu"), np.maximum(expected, 0), atol=1e-12
    )
    np.testing.assert_allclose(ref.conv2d(x, wt, None, s, p), brute_conv(x, wt, 0 * b, s, p))


@pytest.mark.parametrize(("shape", "k", "s", "p"), GEOMETRIES)
def test_conv2d_backward_numerically(shape, k, s, p, rng):
    x = rng.standard_normal(shape)
    wt = rng.standard_normal((2, shape[1], *k))
    b = rng.standard_normal(2)
    dy = rng.standard_normal(ref.conv2d(x, wt, b, s, p).shape)
    dx, dw, db = ref.conv2d_backward(dy, x, wt, s, p)
    num = dict(
        dx=numerical_grad(lambda a: ref.conv2d(a, wt, b, s, p), x.copy(), dy),
        dw=numerical_grad(lambda a: ref.conv2d(x, a, b, s, p), wt.copy(), dy),
        db=numerical_grad(lambda a: ref.conv2d(x, wt, a, s, p), b.copy(), dy),
    )
    for name, got in dict(dx=dx, dw=dw, db=db).items():
        np.testing.assert_allclose(got, num[name], rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize(("shape", "k", "s", "p"), GEOMETRIES)
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_pool_forward(shape, k, s, p, mode, rng):
    x = -np.abs(rng.standard_normal(shape))  # all negative: zero padding must not win a max
    f = ref.max_pool2d if mode == "max" else ref.avg_pool2d
    np.testing.assert_allclose(f(x, k, s, p), brute_pool(x, *k, s, p, mode), rtol=1e-13)


@pytest.mark.parametrize(("shape", "k", "s", "p"), GEOMETRIES)
def test_pool_backward_numerically(shape, k, s, p, rng):
    # Distinct values at least 1e-2 apart: a 1e-6 step never changes which pixel is the max.
    x = rng.permutation(np.prod(shape)).reshape(shape) * 1e-2
    dy = rng.standard_normal(ref.max_pool2d(x, k, s, p).shape)
    np.testing.assert_allclose(
        ref.max_pool2d_backward(dy, x, k, s, p),
        numerical_grad(lambda a: ref.max_pool2d(a, k, s, p), x.copy(), dy),
        rtol=1e-6,
        atol=1e-8,
    )
    np.testing.assert_allclose(
        ref.avg_pool2d_backward(dy, shape, k, s, p),
        numerical_grad(lambda a: ref.avg_pool2d(a, k, s, p), x.copy(), dy),
        rtol=1e-6,
        atol=1e-8,
    )


def test_max_pool_backward_routes_ties_nan_and_inf_like_pytorch():
    x = np.array([[[[1.0, 1.0], [0.0, 1.0]]]])
    np.testing.assert_array_equal(
        ref.max_pool2d_backward(np.ones((1, 1, 1, 1)), x)[0, 0], [[1, 0], [0, 0]]
    )
    x = np.array([[[[1.0, np.nan], [np.nan, 5.0]]]])  # first NaN takes it
    np.testing.assert_array_equal(
        ref.max_pool2d_backward(np.ones((1, 1, 1, 1)), x)[0, 0], [[0, 1], [0, 0]]
    )
    # A window of -inf pixels and padding: the gradient goes to the first real pixel.
    x = np.full((1, 1, 2, 2), -np.inf)
    dx = ref.max_pool2d_backward(np.ones((1, 1, 3, 3)), x, 2, 1, 1)
    np.testing.assert_array_equal(dx[0, 0], [[4, 2], [2, 1]])
