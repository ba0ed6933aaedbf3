"""CPU convolution kernels (im2col, col2im, conv2d, conv2d_backward) against independent oracles.

Oracles: the float64 NumPy reference (``fastconv.reference``, written with einsum over
sliding windows, not im2col), central differences, and PyTorch when importable.

Tolerances are error bounds, not fudge factors: a sum of n products accumulated in float32
is within n * eps32 * sum(|terms|) of the exact value, so each result is compared with
``n * eps32 * magnitude`` where ``magnitude`` is the reference applied to absolute values.
float16 results are additionally rounded once to half: + eps16/2 * |exact|.
"""

from __future__ import annotations

import numba
import numpy as np
import op_cases
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastconv as fc
from fastconv import reference as ref
from fastconv.cpu import _winograd as cpu_winograd
from fastconv.cpu import conv as cpu_conv
from fastconv_testing.winograd import mixed_magnitude

EPS32 = float(np.finfo(np.float32).eps)
EPS16 = float(np.finfo(np.float16).eps)
DTYPES = [np.float32, np.float16]


def assert_within_bound(got, exact, magnitude, n_terms, dtype, what, algorithm=None, kind=None):
    """|got - exact| <= 2*n*eps32*magnitude (+ eps16/2*|exact| for half), elementwise.

    ``algorithm`` (what ran, see :func:`ran`) and ``kind`` ("y", "dx", "dw" or "db") widen
    the bound for Winograd: the magnitude becomes that of the terms it mixes
    (:func:`mixed_magnitude`), plus :data:`WINOGRAD_TERM` * eps32 * that magnitude.
    """
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == exact.shape, what
    magnitude = mixed_magnitude(magnitude, kind, algorithm)
    extra = WINOGRAD_TERM.get(algorithm, 0.0) if kind in ("y", "dx", "dw") else 0.0
    bound = (2.0 * n_terms + extra) * EPS32 * magnitude + 1e-30
    if np.dtype(dtype) == np.float16:
        bound = bound + 0.5 * EPS16 * np.abs(exact)
    err = np.abs(got - exact)
    if err.size == 0:
        return
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (
        f"{what}: error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"
    )


# Winograd's transforms add rounding error that does not shrink with the number of summed
# terms: the coefficients of F(4x4,3x3) reach 5 (B^T) and 8 (A^T), so a tile's results carry
# errors of order (sum of |coefficients|) * eps32 * magnitude. Measured worst |error| /
# (eps32 * mixed magnitude), float32, deep-MNIST layers and the test shapes: direct 2.7,
# F(2x2,3x3) 3.1, F(4x4,3x3) 60 (a one-channel layer; 12-20 with 16-64 channels)
# (bench/winograd_error.py, docs/kernels.md). The bounds add this many eps32 * magnitude, 3x
# the worst measured, to the 2*n*eps32*magnitude allowed for any float32 sum of n terms.
WINOGRAD_TERM = {"winograd4x4": 200.0, "winograd2x2": 16.0}


def ran(pass_):
    """The algorithm recorded for ``pass_`` since the last clear (None if none ran)."""
    names = [c.algorithm for c in fc.conv_algorithm_choices() if c.pass_ == pass_]
    assert len(set(names)) <= 1, names
    return names[0] if names else None


def _rand(rng, shape, dtype, scale=1.0):
    # Values exactly representable in ``dtype``: the reference then sees the same inputs.
    return (rng.standard_normal(shape) * scale).astype(dtype)


@pytest.fixture(params=["auto", "direct", "unfolded", "winograd4x4", "winograd2x2"])
def path(request, monkeypatch):
    """Run a test on each algorithm: the default choice, and each one set process-wide (it
    then runs every layer it can; the others keep the default rule).

    Blocks of 2 images (GEMM paths) and groups of 2 images in bands of one tile row
    (Winograd) also exercise partial blocks, groups and bands.
    """
    if request.param != "auto":
        monkeypatch.setattr(cpu_conv, "_images_per_block", lambda g, direct: min(2, g.N) or 1)
        monkeypatch.setattr(cpu_winograd, "_MAX_GROUP", 2)
        monkeypatch.setattr(cpu_winograd, "_TARGET_COLUMNS", 1)
    previous = fc.set_conv_algorithm(request.param)
    fc.clear_conv_algorithm_choices()
    yield request.param
    fc.set_conv_algorithm(previous)


# --- im2col / col2im -----------------------------------------------------------------------

WINDOW_CASES = [
    # (N, C, H, W, kh, kw, stride, pad)
    (1, 1, 5, 5, 1, 1, 1, 0),
    (3, 2, 6, 7, 3, 3, 1, 1),
    (2, 3, 9, 8, 5, 5, 2, 2),
    (1, 2, 10, 9, 7, 7, 1, 3),
    (3, 2, 7, 6, 2, 3, (2, 1), (0, 1)),
    (2, 1, 4, 4, 3, 3, 3, 2),  # stride > kernel - pad: some pixels in no window
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", WINDOW_CASES)
def test_im2col_matches_reference(case, dtype):
    N, C, H, W, kh, kw, stride, pad = case
    x = _rand(np.random.default_rng(0), (N, C, H, W), dtype)
    cols = fc.im2col(x, kh, kw, stride, pad)
    assert cols.dtype == dtype
    np.testing.assert_array_equal(cols, ref.im2col(x, kh, kw, stride, pad))  # a pure copy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", WINDOW_CASES)
def test_col2im_matches_reference(case, dtype):
    N, C, H, W, kh, kw, stride, pad = case
    g = fc._checks.window_geometry((N, C, H, W), (kh, kw), stride, pad)
    cols = _rand(np.random.default_rng(1), (N * g.OH * g.OW, C * kh * kw), dtype)
    out = fc.col2im(cols, (N, C, H, W), kh, kw, stride, pad)
    assert out.dtype == dtype and out.shape == (N, C, H, W)
    exact = ref.col2im(cols, (N, C, H, W), kh, kw, stride, pad)
    magnitude = ref.col2im(np.abs(cols.astype(np.float64)), (N, C, H, W), kh, kw, stride, pad)
    assert_within_bound(out, exact, magnitude, kh * kw, dtype, "col2im")


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 3),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    sh=st.integers(1, 3),
    sw=st.integers(1, 3),
    ph=st.integers(0, 2),
    pw=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_im2col_col2im_adjoint(n, c, h, w, kh, kw, sh, sw, ph, pw, seed):
    """<im2col(x), cols> == <x, col2im(cols)> for every geometry the validator accepts."""
    if kh > h + 2 * ph or kw > w + 2 * pw:
        with pytest.raises(ValueError, match="exceeds the padded input"):
            fc.im2col(np.zeros((n, c, h, w), np.float32), kh, kw, (sh, sw), (ph, pw))
        return
    rng = np.random.default_rng(seed)
    x = _rand(rng, (n, c, h, w), np.float32)
    unfolded = fc.im2col(x, kh, kw, (sh, sw), (ph, pw))
    cols = _rand(rng, unfolded.shape, np.float32)
    folded = fc.col2im(cols, x.shape, kh, kw, (sh, sw), (ph, pw))
    lhs = np.dot(unfolded.astype(np.float64).ravel(), cols.astype(np.float64).ravel())
    rhs = np.dot(x.astype(np.float64).ravel(), folded.astype(np.float64).ravel())
    scale = np.abs(unfolded).astype(np.float64).ravel() @ np.abs(cols).astype(np.float64).ravel()
    assert abs(lhs - rhs) <= 4 * kh * kw * EPS32 * scale + 1e-12


# --- conv2d forward ------------------------------------------------------------------------

CONV_CASES = [
    # (N, C, H, W, F, kh, kw, stride, pad)
    (1, 1, 6, 5, 2, 1, 1, 1, 0),
    (3, 3, 7, 6, 4, 3, 3, 1, 1),
    (1, 5, 28, 26, 6, 3, 3, 1, 2),  # long rows: the default plan takes the direct path
    (3, 2, 9, 8, 5, 5, 5, 2, 2),
    (1, 4, 11, 10, 3, 7, 7, 1, 3),
    (3, 2, 8, 7, 5, 2, 3, (2, 1), (0, 1)),
    (3, 4, 6, 6, 3, 1, 1, 1, 2),  # pad > kernel - 1: dx sees only part of dy
    # GEMM blocking remainders: F = 13 rows (8 + 4 + 1), K = 90 taps (90 % 4 = 2); dx has
    # C = 10 rows and F*kh*kw = 117 taps.
    (2, 10, 7, 6, 13, 3, 3, 1, 1),
]


def _conv_magnitude(x, w, b, stride, pad):
    mag = ref.conv2d(np.abs(x.astype(np.float64)), np.abs(w.astype(np.float64)), None, stride, pad)
    if b is not None:
        mag = mag + np.abs(b.astype(np.float64))[None, :, None, None]
    return mag


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_reference(case, dtype, path):
    N, C, H, W, F, kh, kw, stride, pad = case
    rng = np.random.default_rng(2)
    x, w, b = _rand(rng, (N, C, H, W), dtype), _rand(rng, (F, C, kh, kw), dtype), None
    for bias in (False, True):
        b = _rand(rng, (F,), dtype) if bias else None
        for activation in (None, "relu"):
            y = fc.conv2d(x, w, b, stride, pad, activation)
            assert y.dtype == dtype
            exact = ref.conv2d(x, w, b, stride, pad, activation)
            assert_within_bound(
                y,
                exact,
                _conv_magnitude(x, w, b, stride, pad),
                C * kh * kw + 1,
                dtype,
                f"y {activation}",
                ran("forward"),
                "y",
            )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_backward_matches_reference(case, dtype, path):
    N, C, H, W, F, kh, kw, stride, pad = case
    rng = np.random.default_rng(3)
    x, w = _rand(rng, (N, C, H, W), dtype), _rand(rng, (F, C, kh, kw), dtype)
    g = fc._checks.validate_conv2d(x, w, None, stride, pad)
    dy = _rand(rng, (N, F, g.OH, g.OW), dtype)
    dx, dw, db = fc.conv2d_backward(dy, x, w, stride, pad)
    assert (dx.dtype, dw.dtype, db.dtype) == (dtype,) * 3
    exact = ref.conv2d_backward(dy, x, w, stride, pad)
    mags = ref.conv2d_backward(*(np.abs(a.astype(np.float64)) for a in (dy, x, w)), stride, pad)
    terms = {"dx": F * kh * kw, "dw": N * g.OH * g.OW, "db": N * g.OH * g.OW}
    for name, got, ex, mag in zip(terms, (dx, dw, db), exact, mags, strict=True):
        assert_within_bound(got, ex, mag, terms[name], dtype, name, ran("backward"), name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[3]])
def test_conv2d_backward_without_dx(case, dtype, path):
    """need_dx=False returns None for dx and exactly the same dw, db as the full backward."""
    N, C, H, W, F, kh, kw, stride, pad = case
    rng = np.random.default_rng(3)
    x, w = _rand(rng, (N, C, H, W), dtype), _rand(rng, (F, C, kh, kw), dtype)
    g = fc._checks.validate_conv2d(x, w, None, stride, pad)
    dy = _rand(rng, (N, F, g.OH, g.OW), dtype)
    _, dw_full, db_full = fc.conv2d_backward(dy, x, w, stride, pad)
    dx, dw, db = fc.conv2d_backward(dy, x, w, stride, pad, need_dx=False)
    assert dx is None
    np.testing.assert_array_equal(dw, dw_full)
    np.testing.assert_array_equal(db, db_full)
    exact = ref.conv2d_backward(dy, x, w, stride, pad)
    mags = ref.conv2d_backward(*(np.abs(a.astype(np.float64)) for a in (dy, x, w)), stride, pad)
    algorithm = ran("backward_weights")
    assert_within_bound(dw, exact[1], mags[1], N * g.OH * g.OW, dtype, "dw", algorithm, "dw")


def test_conv2d_backward_need_dx_must_be_bool():
    x, w = np.zeros((1, 1, 4, 4), np.float32), np.zeros((2, 1, 3, 3), np.float32)
    dy = np.zeros((1, 2, 2, 2), np.float32)
    with pytest.raises(TypeError, match="need_dx must be a bool"):
        fc.conv2d_backward(dy, x, w, need_dx="no")


DEEP_MNIST_LAYERS = [
    # (C, F, H=W, pad): the book's ch. 8 network, 3x3 stride 1
    (1, 16, 28, 1),
    (16, 16, 28, 1),
    (16, 32, 14, 1),
    (32, 32, 14, 2),
    (32, 64, 8, 1),
    (64, 64, 8, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer", DEEP_MNIST_LAYERS)
def test_deep_mnist_layers(layer, dtype):
    C, F, HW, pad = layer
    N = 3
    rng = np.random.default_rng(4)
    x = _rand(rng, (N, C, HW, HW), dtype)
    w = _rand(rng, (F, C, 3, 3), dtype, np.sqrt(2.0 / (9 * C)))
    b = _rand(rng, (F,), dtype, 0.1)
    fc.clear_conv_algorithm_choices()
    y = fc.conv2d(x, w, b, 1, pad, "relu")
    exact = ref.conv2d(x, w, b, 1, pad, "relu")
    mag = _conv_magnitude(x, w, b, 1, pad)
    assert_within_bound(y, exact, mag, 9 * C + 1, dtype, "y", ran("forward"), "y")
    dy = _rand(rng, y.shape, dtype)
    exact = ref.conv2d_backward(dy, x, w, 1, pad)
    mags = ref.conv2d_backward(*(np.abs(a.astype(np.float64)) for a in (dy, x, w)), 1, pad)
    P = y.shape[2] * y.shape[3]
    for name, got, ex, mag, n in zip(
        ("dx", "dw", "db"),
        fc.conv2d_backward(dy, x, w, 1, pad),
        exact,
        mags,
        (9 * F, N * P, N * P),
        strict=True,
    ):
        assert_within_bound(got, ex, mag, n, dtype, name, ran("backward"), name)


def test_reference_backward_matches_central_differences():
    """The oracle itself: reference.conv2d_backward is the gradient of reference.conv2d."""
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((3, 2, 3, 2))
    b, stride, pad = rng.standard_normal(3), (2, 1), (1, 2)
    dy = rng.standard_normal(ref.conv2d(x, w, b, stride, pad).shape)
    dx, dw, db = ref.conv2d_backward(dy, x, w, stride, pad)

    def loss(x_, w_, b_):
        return float(np.sum(ref.conv2d(x_, w_, b_, stride, pad) * dy))

    h = 1e-6
    for arr, grad in ((x, dx), (w, dw), (b, db)):
        numeric = np.empty_like(arr)
        for idx in np.ndindex(arr.shape):
            saved = arr[idx]
            arr[idx] = saved + h
            up = loss(x, w, b)
            arr[idx] = saved - h
            down = loss(x, w, b)
            arr[idx] = saved
            numeric[idx] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)


@settings(max_examples=15, deadline=None)
@given(
    alpha=st.floats(-3, 3, allow_nan=False, width=32),
    kh=st.integers(1, 3),
    stride=st.integers(1, 2),
    pad=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_conv2d_is_linear_in_x(alpha, kh, stride, pad, seed):
    rng = np.random.default_rng(seed)
    x1, x2 = _rand(rng, (2, 3, 6, 5), np.float32), _rand(rng, (2, 3, 6, 5), np.float32)
    w = _rand(rng, (4, 3, kh, kh), np.float32)
    combined = (np.float32(alpha) * x1 + x2).astype(np.float32)
    lhs = fc.conv2d(combined, w, None, stride, pad).astype(np.float64)
    rhs = alpha * fc.conv2d(x1, w, None, stride, pad).astype(np.float64) + fc.conv2d(
        x2, w, None, stride, pad
    )
    mag = ref.conv2d(np.abs(x1) * abs(alpha) + np.abs(x2), np.abs(w), None, stride, pad)
    # Three float32 convolutions, each within n*eps*mag, plus rounding of alpha*x1 + x2.
    assert np.all(np.abs(lhs - rhs) <= (3 * 3 * kh * kh + 2) * 2 * EPS32 * mag + 1e-30)


# --- special values, layouts, workspaces ---------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_propagate_like_reference(dtype, path):
    rng = np.random.default_rng(6)
    x, w = _rand(rng, (3, 4, 9, 9), dtype), _rand(rng, (5, 4, 3, 3), dtype)
    x[0, 1, 0, 0] = np.nan  # a corner pixel: only some taps see it
    x[2, 3, 4, 8] = np.inf
    y = fc.conv2d(x, w, None, 1, 1, "relu")
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref.conv2d(x, w, None, 1, 1, "relu")))
    dy = _rand(rng, y.shape, dtype)
    for got, exact in zip(
        fc.conv2d_backward(dy, x, w, 1, 1), ref.conv2d_backward(dy, x, w, 1, 1), strict=True
    ):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(exact))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(exact))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_weights_in_backward(dtype, path):
    rng = np.random.default_rng(7)
    x, w = _rand(rng, (2, 4, 8, 8), dtype), _rand(rng, (5, 4, 3, 3), dtype)
    w[1, 2, 0, 2] = np.nan
    dy = _rand(rng, (2, 5, 8, 8), dtype)
    for got, exact in zip(
        fc.conv2d_backward(dy, x, w, 1, 1), ref.conv2d_backward(dy, x, w, 1, 1), strict=True
    ):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(exact))


def test_relu_is_fused_after_bias():
    x = np.zeros((1, 1, 3, 3), np.float32)
    w = np.ones((2, 1, 3, 3), np.float32)
    b = np.array([-1.5, 2.0], np.float32)
    y = fc.conv2d(x, w, b, 1, 1, activation="relu")
    np.testing.assert_array_equal(y[0, 0], 0.0)
    np.testing.assert_array_equal(y[0, 1], 2.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype):
    rng = np.random.default_rng(8)
    x = _rand(rng, (3, 6, 10, 4), dtype).transpose(0, 1, 3, 2)[:, ::2]  # (3, 3, 4, 10)
    w = _rand(rng, (3, 3, 3, 4), dtype)[:, :, ::-1, :3]  # (3, 3, 3, 3), negative strides
    b = _rand(rng, (6,), dtype)[::2]
    assert not (x.flags.c_contiguous or w.flags.c_contiguous or b.flags.c_contiguous)
    y = fc.conv2d(x, w, b, 1, 1)
    assert_within_bound(
        y, ref.conv2d(x, w, b, 1, 1), _conv_magnitude(x, w, b, 1, 1), 28, dtype, "y non-contiguous"
    )
    dy = _rand(rng, (3, 3, 10, 4), dtype).transpose(0, 1, 3, 2)
    exact = ref.conv2d_backward(dy, x, w, 1, 1)
    mags = ref.conv2d_backward(*(np.abs(a.astype(np.float64)) for a in (dy, x, w)), 1, 1)
    for got, ex, mag, n in zip(
        fc.conv2d_backward(dy, x, w, 1, 1), exact, mags, (27, 120, 120), strict=True
    ):
        assert_within_bound(got, ex, mag, n, dtype, "grads non-contiguous")
    cols = fc.im2col(x, 3, 2, 1, 1)
    np.testing.assert_array_equal(cols, ref.im2col(x, 3, 2, 1, 1))


def test_workspaces_follow_shape_and_thread_count():
    """Cached per-thread buffers must never leak results between shapes or thread counts."""
    rng = np.random.default_rng(9)
    threads = numba.get_num_threads()
    try:
        for n_threads in sorted({1, threads}):
            numba.set_num_threads(n_threads)
            for shape in ((3, 2, 8, 8), (2, 2, 5, 9), (3, 2, 8, 8)):
                x, w = _rand(rng, shape, np.float32), _rand(rng, (4, 2, 3, 3), np.float32)
                y = fc.conv2d(x, w, None, 1, 1)
                np.testing.assert_allclose(y, ref.conv2d(x, w, None, 1, 1), rtol=1e-5, atol=1e-5)
                dx, dw, db = fc.conv2d_backward(y, x, w, 1, 1)
                ex = ref.conv2d_backward(y, x, w, 1, 1)
                np.testing.assert_allclose(dw, ex[1], rtol=1e-4, atol=1e-4)
                np.testing.assert_allclose(dx, ex[0], rtol=1e-4, atol=1e-4)
    finally:
        numba.set_num_threads(threads)


def test_bad_arguments_are_rejected():
    x = np.zeros((2, 3, 5, 5), np.float32)
    w = np.zeros((4, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="input channels"):
        fc.conv2d(x, np.zeros((4, 2, 3, 3), np.float32))
    with pytest.raises(TypeError, match="dtype float32 or float16"):
        fc.conv2d(x.astype(np.float64), w)
    with pytest.raises(TypeError, match="same dtype"):
        fc.conv2d(x, w.astype(np.float16))
    with pytest.raises(ValueError, match="exceeds the padded input"):
        fc.conv2d(x, np.zeros((4, 3, 7, 7), np.float32))
    with pytest.raises(ValueError, match="dy must have shape"):
        fc.conv2d_backward(np.zeros((2, 4, 5, 5), np.float32), x, w)
    with pytest.raises(ValueError, match="activation"):
        fc.conv2d(x, w, activation="tanh")
    with pytest.raises(ValueError, match="cols must have shape"):
        fc.col2im(np.zeros((10, 27), np.float32), (2, 3, 5, 5), 3, 3)


# --- PyTorch --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [(3, 3, 9, 8, 4, 3, 3, 1, 1), (2, 16, 14, 14, 32, 3, 3, 1, 2), (2, 3, 9, 8, 5, 5, 2, 2, 1)],
)
def test_matches_torch(torch, case):
    N, C, H, W, F, kh, kw, stride, pad = case
    rng = np.random.default_rng(10)
    x, w, b = _rand(rng, (N, C, H, W), np.float32), _rand(rng, (F, C, kh, kw), np.float32), None
    b = _rand(rng, (F,), np.float32)
    xt, wt, bt = (torch.from_numpy(a).requires_grad_(True) for a in (x, w, b))
    yt = torch.nn.functional.conv2d(xt, wt, bt, stride=stride, padding=pad)
    y = fc.conv2d(x, w, b, stride, pad)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-4 * np.abs(y).max())
    dy = _rand(rng, y.shape, np.float32)
    yt.backward(torch.from_numpy(dy))
    for got, expected in zip(
        fc.conv2d_backward(dy, x, w, stride, pad), (xt.grad, wt.grad, bt.grad), strict=True
    ):
        expected = expected.numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "x_shape, w_shape",
    [((0, 3, 5, 5), (4, 3, 3, 3)), ((2, 0, 5, 5), (4, 0, 3, 3)), ((2, 3, 5, 5), (0, 3, 3, 3))],
)
def test_empty_dimensions(x_shape, w_shape, dtype):
    """Zero images, channels or filters give empty or bias-only results, never a crash."""
    rng = np.random.default_rng(11)
    x, w, b = _rand(rng, x_shape, dtype), _rand(rng, w_shape, dtype), _rand(rng, w_shape[:1], dtype)
    y = fc.conv2d(x, w, b, 1, 1)
    np.testing.assert_allclose(y, ref.conv2d(x, w, b, 1, 1), rtol=1e-3)
    dy = _rand(rng, y.shape, dtype)
    for got, exact in zip(
        fc.conv2d_backward(dy, x, w, 1, 1), ref.conv2d_backward(dy, x, w, 1, 1), strict=True
    ):
        assert got.shape == exact.shape
        np.testing.assert_allclose(
            got, exact, rtol=1e-2, atol=1e-2 * (np.abs(exact).max(initial=0) + 1)
        )


# --- conformance cases (tests/kernels/op_cases.py; run by test_kernel_interface.py) -------------


def _conv_inputs(rng, dtype, n):
    r = op_cases.normal
    return r(rng, (n, 3, 7, 6), dtype), r(rng, (4, 3, 3, 3), dtype), r(rng, (4,), dtype)


op_cases.register(
    "im2col",
    lambda x: fc.im2col(x, 3, 3, 2, 1),
    lambda x: ref.im2col(x, 3, 3, 2, 1),
    lambda rng, dt, n: (op_cases.normal(rng, (n, 2, 7, 6), dt),),
)
op_cases.register(
    "col2im",
    lambda c: fc.col2im(c, (c.shape[0] // 12, 2, 7, 6), 3, 3, 2, 1),
    lambda c: ref.col2im(c, (c.shape[0] // 12, 2, 7, 6), 3, 3, 2, 1),
    lambda rng, dt, n: (op_cases.normal(rng, (n * 12, 18), dt),),
    terms=4,
)
op_cases.register(
    "conv2d",
    lambda x, w, b: fc.conv2d(x, w, b, 1, 1, "relu"),
    lambda x, w, b: ref.conv2d(x, w, b, 1, 1, "relu"),
    _conv_inputs,
    terms=27,
)
op_cases.register(
    "conv2d_backward",
    lambda dy, x, w: fc.conv2d_backward(dy, x, w, 1, 1),
    lambda dy, x, w: ref.conv2d_backward(dy, x, w, 1, 1),
    lambda rng, dt, n: (op_cases.normal(rng, (n, 4, 7, 6), dt), *_conv_inputs(rng, dt, n)[:2]),
    terms=200,
)
