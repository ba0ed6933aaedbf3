"""Property-based fuzz of every public kernel against the float64 reference.

Hypothesis draws the geometry (batch, channels, sizes, kernel, stride, padding), the dtype and
the memory layout of every array argument (C order, Fortran order, a strided slice of a larger
array, a transposed view), and each public op must agree with ``fastconv.reference`` within the
project's tolerance rule (tests/conftest.py), or reject the geometry with a ValueError exactly
when the reference does.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, tolerance
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fastconv as fc
from fastconv import reference as ref

LAYOUTS = ("c", "fortran", "strided", "transposed")
EPS32 = float(np.finfo(np.float32).eps)
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def arrange(a, layout):
    """The same values as ``a`` in another memory layout (a view when possible)."""
    if layout == "fortran":
        return np.asfortranarray(a)
    if layout == "strided":
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if layout == "transposed" and a.ndim >= 2:
        return np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
    return np.ascontiguousarray(a)


@st.composite
def problems(draw, max_size=9, pool=False):
    """A sliding-window problem: shapes, window, stride, padding, dtype, layouts, seed."""
    g = {
        "n": draw(st.integers(0, 3)),
        "c": draw(st.integers(1, 4)),
        "h": draw(st.integers(1, max_size)),
        "w": draw(st.integers(1, max_size)),
        "kh": draw(st.integers(1, 4)),
        "kw": draw(st.integers(1, 4)),
        "sh": draw(st.integers(1, 3)),
        "sw": draw(st.integers(1, 3)),
        "dtype": draw(st.sampled_from([np.float32, np.float16])),
        "layouts": draw(st.lists(st.sampled_from(LAYOUTS), min_size=4, max_size=4)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }
    limit_h, limit_w = (g["kh"] // 2, g["kw"] // 2) if pool else (2, 2)
    g["ph"] = draw(st.integers(0, limit_h))
    g["pw"] = draw(st.integers(0, limit_w))
    return g


def _valid(g):
    return g["kh"] <= g["h"] + 2 * g["ph"] and g["kw"] <= g["w"] + 2 * g["pw"]


def _out(g):
    return (
        (g["h"] + 2 * g["ph"] - g["kh"]) // g["sh"] + 1,
        (g["w"] + 2 * g["pw"] - g["kw"]) // g["sw"] + 1,
    )


def _rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _window(g):
    return dict(stride=(g["sh"], g["sw"]), pad=(g["ph"], g["pw"]))


def _check_rejected_like_reference(call, ref_call):
    with pytest.raises(ValueError) as ours:
        call()
    with pytest.raises(ValueError) as theirs:
        ref_call()
    assert "exceeds the padded input" in str(ours.value) and str(theirs.value)


@SETTINGS
@given(g=problems(), f=st.integers(1, 5))
def test_conv2d_and_its_gradients(g, f):
    rng = np.random.default_rng(g["seed"])
    x = _rand(rng, (g["n"], g["c"], g["h"], g["w"]), g["dtype"])
    w = _rand(rng, (f, g["c"], g["kh"], g["kw"]), g["dtype"])
    b = _rand(rng, (f,), g["dtype"])
    win = _window(g)
    if not _valid(g):
        _check_rejected_like_reference(
            lambda: fc.conv2d(x, w, b, **win), lambda: ref.conv2d(x, w, b, **win)
        )
        return
    lx, lw, lb, ldy = g["layouts"]
    k = g["c"] * g["kh"] * g["kw"]
    y = fc.conv2d(arrange(x, lx), arrange(w, lw), arrange(b, lb), **win, activation="relu")
    assert_close(y, ref.conv2d(x, w, b, **win, activation="relu"), g["dtype"], k)
    dy = _rand(rng, (g["n"], f, *_out(g)), g["dtype"])
    got = fc.conv2d_backward(arrange(dy, ldy), arrange(x, lx), arrange(w, lw), **win)
    want = ref.conv2d_backward(dy, x, w, **win)
    spans = (
        f * g["kh"] * g["kw"],
        g["n"] * _out(g)[0] * _out(g)[1],
        g["n"] * _out(g)[0] * _out(g)[1],
    )
    for a, e, span in zip(got, want, spans, strict=True):
        assert_close(a, e, g["dtype"], span)


@SETTINGS
@given(g=problems())
def test_im2col_and_col2im(g):
    rng = np.random.default_rng(g["seed"])
    x = _rand(rng, (g["n"], g["c"], g["h"], g["w"]), g["dtype"])
    args = (g["kh"], g["kw"], (g["sh"], g["sw"]), (g["ph"], g["pw"]))
    if not _valid(g):
        _check_rejected_like_reference(lambda: fc.im2col(x, *args), lambda: ref.im2col(x, *args))
        return
    cols = fc.im2col(arrange(x, g["layouts"][0]), *args)
    np.testing.assert_array_equal(cols, ref.im2col(x, *args).astype(g["dtype"]))
    c = _rand(rng, cols.shape, g["dtype"])
    back = fc.col2im(arrange(c, g["layouts"][1]), x.shape, *args)
    assert_close(back, ref.col2im(c, x.shape, *args), g["dtype"], g["kh"] * g["kw"])


@SETTINGS
@given(g=problems(pool=True))
def test_pooling_and_its_gradients(g):
    rng = np.random.default_rng(g["seed"])
    x = _rand(rng, (g["n"], g["c"], g["h"], g["w"]), g["dtype"])
    size, win = (g["kh"], g["kw"]), _window(g)
    if not _valid(g):
        _check_rejected_like_reference(
            lambda: fc.max_pool2d(x, size, **win), lambda: ref.max_pool2d(x, size, **win)
        )
        return
    lx, ldy = g["layouts"][:2]
    y = fc.max_pool2d(arrange(x, lx), size, **win)
    np.testing.assert_array_equal(y, ref.max_pool2d(x, size, **win).astype(g["dtype"]))
    dy = _rand(rng, y.shape, g["dtype"])
    dx = fc.max_pool2d_backward(arrange(dy, ldy), arrange(x, lx), size, **win)
    assert_close(dx, ref.max_pool2d_backward(dy, x, size, **win), g["dtype"], g["kh"] * g["kw"])
    a = fc.avg_pool2d(arrange(x, lx), size, **win)
    assert_close(a, ref.avg_pool2d(x, size, **win), g["dtype"], g["kh"] * g["kw"])
    da = fc.avg_pool2d_backward(arrange(dy, ldy), x.shape, size, **win)
    assert_close(
        da, ref.avg_pool2d_backward(dy, x.shape, size, **win), g["dtype"], g["kh"] * g["kw"]
    )


@st.composite
def channel_problems(draw):
    """(N, C) or (N, C, H, W) batches for the per-channel kernels."""
    four_d = draw(st.booleans())
    n = draw(st.integers(0, 5))
    c = draw(st.integers(1, 6))
    shape = (n, c, draw(st.integers(1, 7)), draw(st.integers(1, 7))) if four_d else (n, c)
    return {
        "shape": shape,
        "dtype": draw(st.sampled_from([np.float32, np.float16])),
        "layouts": draw(st.lists(st.sampled_from(LAYOUTS), min_size=3, max_size=3)),
        "relu": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@SETTINGS
@given(p=channel_problems())
@example(  # two close values in a channel: the mean's rounding, magnified by 1/std
    p={"shape": (2, 3), "dtype": np.float32, "layouts": ["c", "c", "c"], "relu": False,
       "seed": 1424133}
)  # fmt: skip
def test_batch_norm_and_its_gradients(p):
    rng = np.random.default_rng(p["seed"])
    shape, dtype = p["shape"], p["dtype"]
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    gamma, beta = _rand(rng, shape[1:2], dtype), _rand(rng, shape[1:2], dtype)
    act = "relu" if p["relu"] else None
    m = int(np.prod(shape)) // shape[1]
    lx, ldy, _ = p["layouts"]
    if m == 1:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            fc.batch_norm_forward(arrange(x, lx), gamma, beta, activation=act)
        return
    if m == 0:  # an empty batch: no statistics (NaN), an empty output
        y, mean, var = fc.batch_norm_forward(arrange(x, lx), gamma, beta, activation=act)
        assert y.shape == shape and np.isnan(mean).all() and np.isnan(var).all()
        return
    y, mean, var = fc.batch_norm_forward(arrange(x, lx), gamma, beta, activation=act)
    ry, rmean, rvar = ref.batch_norm_forward(x, gamma, beta, activation=act)
    np.testing.assert_allclose(mean, rmean, rtol=1e-5, atol=1e-5 * np.abs(x).max())
    np.testing.assert_allclose(var, rvar, rtol=1e-4, atol=1e-6 * np.abs(x).max() ** 2)
    # Normalised values are O(|gamma|) + |beta|: the tolerance scale of the output. Its error
    # budget is the chain mean -> variance (sums of m terms; x - mean loses up to |x|/|x - mean|
    # of relative precision) -> rsqrt -> gamma*xhat + beta, which can cancel: hypothesis found
    # 12 float32 ulps of |gamma*xhat| at m = 2 (a plain float32 NumPy computation: 8), beyond
    # the budget of a single sum of m terms that this check used before. The cancellation
    # itself is the input's conditioning: the float32 mean is off by about an ulp of |x|, so
    # y carries |gamma| * ulp(|x|) / std whatever the kernel (hypothesis: x = 4.248 and 4.182
    # in one channel, std 0.033, y 1.4e-5 off where 16*m ulps allowed 2.7e-6).
    axes = (0, 2, 3) if len(shape) == 4 else (0,)
    x64 = x.astype(np.float64)
    cancel = np.abs(gamma.astype(np.float64)) * np.abs(x64).max(axis=axes) / np.sqrt(rvar + 1e-5)
    tol = tolerance(dtype, 16 * m)
    np.testing.assert_allclose(
        y.astype(np.float64), ry,
        rtol=0, atol=tol * max(1.0, float(np.abs(ry).max())) + 4 * EPS32 * float(cancel.max()),
    )  # fmt: skip
    dy = _rand(rng, shape, dtype)
    got = fc.batch_norm_backward(arrange(dy, ldy), arrange(x, lx), gamma, mean, var,
                                 y=y if act else None)  # fmt: skip
    want = ref.batch_norm_backward(dy, x, gamma, mean, var, y=y if act else None)
    dx, dgamma, dbeta = got
    rdx, rdgamma, rdbeta = want
    assert_close(dgamma, rdgamma, dtype, 4 * m)
    assert_close(dbeta, rdbeta, dtype, 4 * m)
    # dx = gamma/std/m * (m*dy - sum(dy) - xhat*sum(dy*xhat)): its terms are of size
    # |gamma|/std*|dy| and cancel (exactly, for m = 2 with eps = 0), so its rounding error scales
    # with them, not with dx (hypothesis: dx = 0.126 with terms ~300x larger, 1.8e-5 apart).
    inv_std = 1 / np.sqrt(var.astype(np.float64) + 1e-5)
    terms = float((np.abs(gamma.astype(np.float64)) * inv_std).max() * np.abs(dy).max(initial=0))
    tol = tolerance(dtype, 4 * m)
    np.testing.assert_allclose(dx.astype(np.float64), rdx, rtol=tol, atol=tol * max(1.0, terms))
    assert dx.dtype == dtype
    # Inference folds the statistics (y = x*scale + shift): the same |gamma|*|x|/std cancels
    inf = fc.batch_norm_inference(arrange(x, lx), gamma, beta, mean, var, activation=act)
    rinf = ref.batch_norm_inference(x, gamma, beta, mean, var, activation=act)
    np.testing.assert_allclose(
        inf.astype(np.float64), rinf,
        rtol=0, atol=tolerance(dtype) * max(1.0, float(np.abs(rinf).max()))
        + 4 * EPS32 * float(cancel.max()),
    )  # fmt: skip
    assert inf.dtype == dtype


@SETTINGS
@given(p=channel_problems())
def test_global_average_pooling_dense_and_relu(p):
    rng = np.random.default_rng(p["seed"])
    shape, dtype = p["shape"], p["dtype"]
    lx, ldy, lw = p["layouts"]
    x = _rand(rng, shape, dtype)
    if len(shape) == 4:
        y = fc.global_avg_pool2d(arrange(x, lx))
        assert_close(y, ref.global_avg_pool2d(x), dtype, shape[2] * shape[3])
        dy = _rand(rng, y.shape, dtype)
        dx = fc.global_avg_pool2d_backward(arrange(dy, ldy), shape)
        assert_close(dx, ref.global_avg_pool2d_backward(dy, shape), dtype)
        x = x.reshape(shape[0], int(np.prod(shape[1:])))
    units = 1 + p["seed"] % 7
    w = _rand(rng, (x.shape[1], units), dtype)
    b = _rand(rng, (units,), dtype)
    act = "relu" if p["relu"] else None
    y = fc.dense(arrange(x, lx), arrange(w, lw), b, activation=act)
    assert_close(y, ref.dense(x, w, b, activation=act), dtype, x.shape[1])
    dy = _rand(rng, y.shape, dtype)
    for a, e, k in zip(fc.dense_backward(arrange(dy, ldy), arrange(x, lx), arrange(w, lw)),
                       ref.dense_backward(dy, x, w), (units, x.shape[0], x.shape[0]),
                       strict=True):  # fmt: skip
        assert_close(a, e, dtype, k)
    r = fc.relu(arrange(x, lx))
    np.testing.assert_array_equal(r, ref.relu(x).astype(dtype))
    g = fc.relu_backward(arrange(dy[:, :1].repeat(x.shape[1], 1), ldy), x)
    np.testing.assert_array_equal(
        g, ref.relu_backward(dy[:, :1].repeat(x.shape[1], 1), x).astype(dtype)
    )
