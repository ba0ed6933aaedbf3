"""Batch normalisation kernels (CPU backend) against the float64 reference, PyTorch, numerical
gradients and closed forms; edge cases, NaN, determinism, validation and folding."""

from __future__ import annotations

import numpy as np
import op_cases
import pytest
from _gradcheck import numeric_directional
from conftest import assert_close

import fastconv as fc
from fastconv import reference as ref
from fastconv.cpu import batchnorm as cpu_bn

# Shapes covering both CPU reduction paths (planes under and over 32 pixels), 2-D input under
# and over one 16-channel block, C = 1, H = W = 1, many channels with a small batch, odd sizes.
SHAPES = [
    (6, 5, 4, 4),  # lanes path (P = 16)
    (3, 4, 7, 9),  # segments path (P = 63)
    (2, 1, 5, 5),  # C = 1
    (5, 3, 1, 1),  # H = W = 1
    (2, 70, 3, 3),  # many channels, small batch
    (9, 7),  # 2-D (BatchNorm1D)
    (3, 40),  # 2-D, several 16-channel blocks
    (2, 1),  # 2-D, smallest valid training batch
    (40, 20, 8, 8),  # big enough for the parallel kernels
]


def _params(rng, shape, dtype):
    C = shape[1]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    gamma = rng.standard_normal(C).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    return x, gamma, beta


def _count(shape):
    return shape[0] * (shape[2] * shape[3] if len(shape) == 4 else 1)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_forward_matches_reference(shape, activation, dtype, rng):
    x, gamma, beta = _params(rng, shape, dtype)
    y, mean, var = fc.batch_norm_forward(x, gamma, beta, 1e-5, activation)
    want_y, want_mean, want_var = ref.batch_norm_forward(x, gamma, beta, 1e-5, activation)
    assert mean.dtype == var.dtype == np.float32 and mean.shape == var.shape == (shape[1],)
    M = _count(shape)
    assert_close(mean, want_mean, np.float32, M)
    assert_close(var, want_var, np.float32, M)
    assert_close(y, want_y, dtype, M)
    if activation == "relu":
        assert (y >= 0).all()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fused_relu", [False, True])
def test_backward_matches_reference(shape, fused_relu, dtype, rng):
    x, gamma, beta = _params(rng, shape, dtype)
    y, mean, var = fc.batch_norm_forward(x, gamma, beta, 1e-5, "relu" if fused_relu else None)
    dy = rng.standard_normal(shape).astype(dtype)
    y_arg = y if fused_relu else None
    got = fc.batch_norm_backward(dy, x, gamma, mean, var, 1e-5, y=y_arg)
    want = ref.batch_norm_backward(dy, x, gamma, mean, var, 1e-5, y=y_arg)
    for name, a, b in zip(("dx", "dgamma", "dbeta"), got, want, strict=True):
        assert a.dtype == dtype, name
        assert_close(a, b, dtype, _count(shape))


@pytest.mark.parametrize("shape", [(6, 5, 4, 4), (3, 4, 7, 9), (9, 7)], ids=str)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_inference_and_its_backward_match_reference(shape, activation, dtype, rng):
    x, gamma, beta = _params(rng, shape, dtype)
    mean = rng.standard_normal(shape[1]).astype(np.float32)
    var = rng.uniform(0.1, 3.0, shape[1]).astype(np.float32)
    y = fc.batch_norm_inference(x, gamma, beta, mean, var, 1e-3, activation)
    assert y.dtype == dtype
    assert_close(y, ref.batch_norm_inference(x, gamma, beta, mean, var, 1e-3, activation), dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y_arg = y if activation else None
    dx = fc.batch_norm_inference_backward(dy, gamma, var, 1e-3, y=y_arg)
    assert dx.dtype == dtype
    assert_close(dx, ref.batch_norm_inference_backward(dy, gamma, var, 1e-3, y_arg), dtype)


def test_backward_closed_form_properties(rng):
    """Training-mode dx is orthogonal to constants and to xhat per channel (the batch
    statistics absorb shifts and scalings), and dgamma = sum(dy * xhat), dbeta = sum(dy)."""
    x, gamma, beta = _params(rng, (8, 3, 5, 5), np.float32)
    _, mean, var = fc.batch_norm_forward(x, gamma, beta)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx, dgamma, dbeta = fc.batch_norm_backward(dy, x, gamma, mean, var)
    x64 = x.astype(np.float64)
    xhat = (x64 - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5)
    dx64 = dx.astype(np.float64)
    scale = np.abs(dx64).sum(axis=(0, 2, 3))
    assert np.all(np.abs(dx64.sum(axis=(0, 2, 3))) <= 1e-5 * scale)
    assert np.all(np.abs((dx64 * xhat).sum(axis=(0, 2, 3))) <= 1e-5 * scale * 3)
    np.testing.assert_allclose(dgamma, (dy * xhat).sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dbeta, dy.astype(np.float64).sum(axis=(0, 2, 3)), rtol=1e-5,
                               atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (6, 4)], ids=str)
def test_gradients_against_finite_differences(shape, rng):
    """Directional derivatives of L = sum(forward(x) * R) match the backward pass."""
    x, gamma, beta = _params(rng, shape, np.float32)
    r = rng.standard_normal(shape)

    def loss_fn():
        return fc.batch_norm_forward(x, gamma, beta)[0]

    _, mean, var = fc.batch_norm_forward(x, gamma, beta)
    dx, dgamma, dbeta = fc.batch_norm_backward(r.astype(np.float32), x, gamma, mean, var)
    for arr, grad in ((x, dx), (gamma, dgamma), (beta, dbeta)):
        direction = rng.standard_normal(arr.shape).astype(np.float32)
        numeric = numeric_directional(loss_fn, arr, r, direction, eps=1e-2)
        analytic = float(np.sum(grad.astype(np.float64) * direction))
        assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (numeric, analytic)


def test_variance_is_accurate_for_a_large_mean():
    """Two-pass variance: data far from zero (mean 1000, std 0.01) keeps its variance, where
    E[x^2] - E[x]^2 in float32 would lose every digit (and could go negative)."""
    rng = np.random.default_rng(3)
    x = (1000.0 + 0.01 * rng.standard_normal((50, 4, 6, 6))).astype(np.float32)
    g = np.ones(4, np.float32)
    _, mean, var = fc.batch_norm_forward(x, g, np.zeros(4, np.float32))
    _, want_mean, want_var = ref.batch_norm_forward(x, g, np.zeros(4))
    np.testing.assert_allclose(var, want_var, rtol=1e-3)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6)


def test_deep_mnist_shape_float16(rng):
    """A deep-MNIST activation (batch 100, 16@28x28) in half: statistics over 78,400 values."""
    x, gamma, beta = _params(rng, (100, 16, 28, 28), np.float16)
    y, mean, var = fc.batch_norm_forward(x, gamma, beta)
    want_y, want_mean, want_var = ref.batch_norm_forward(x, gamma, beta)
    assert_close(mean, want_mean, np.float32, 78400)
    assert_close(var, want_var, np.float32, 78400)
    assert_close(y, want_y, np.float16, 78400)


# --- PyTorch ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 3, 6, 5), (16, 10), (4, 20, 4, 4)], ids=str)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_matches_pytorch_training_and_autograd(torch, shape, activation, rng):
    F = torch.nn.functional
    x, gamma, beta = _params(rng, shape, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    gt, bt = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
    rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
    yt = F.batch_norm(xt, rm, rv, gt, bt, training=True, momentum=1.0, eps=1e-5)
    if activation:
        yt = torch.relu(yt)
    yt.backward(torch.tensor(dy))
    y, mean, var = fc.batch_norm_forward(x, gamma, beta, 1e-5, activation)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    # momentum=1 leaves the running mean equal to the batch mean and the running variance
    # equal to the *unbiased* batch variance: var * M / (M - 1).
    M = _count(shape)
    np.testing.assert_allclose(mean, rm.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var * M / (M - 1), rv.numpy(), rtol=1e-5)
    grads = fc.batch_norm_backward(dy, x, gamma, mean, var, 1e-5, y=y if activation else None)
    for got, want in zip(grads, (xt.grad, gt.grad, bt.grad), strict=True):
        want = want.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1, np.abs(want).max()))


@pytest.mark.parametrize("shape", [(8, 3, 6, 5), (16, 10)], ids=str)
def test_matches_pytorch_eval_mode(torch, shape, rng):
    x, gamma, beta = _params(rng, shape, np.float32)
    mean = rng.standard_normal(shape[1]).astype(np.float32)
    var = rng.uniform(0.2, 2.0, shape[1]).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.batch_norm(
        xt, torch.tensor(mean), torch.tensor(var), torch.tensor(gamma), torch.tensor(beta),
        training=False, eps=1e-3,
    )  # fmt: skip
    dy = rng.standard_normal(shape).astype(np.float32)
    yt.backward(torch.tensor(dy))
    y = fc.batch_norm_inference(x, gamma, beta, mean, var, 1e-3)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    dx = fc.batch_norm_inference_backward(dy, gamma, var, 1e-3)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-5, atol=1e-5)


# --- NaN, edge cases, determinism ---------------------------------------------------------------


def test_nan_and_inf_propagate_to_their_channel_only(dtype):
    x = np.tile(np.arange(8, dtype=dtype).reshape(2, 1, 2, 2), (1, 3, 1, 1))
    x[1, 0, 0, 1] = np.nan
    x[0, 2, 1, 1] = np.inf
    g, b = np.ones(3, dtype), np.zeros(3, dtype)
    y, mean, var = fc.batch_norm_forward(x, g, b, activation="relu")
    assert np.isnan(y[:, 0]).all() and np.isnan(mean[0]) and np.isnan(var[0])
    assert np.isnan(y[:, 2]).all() or np.isinf(mean[2])  # inf - inf in the variance: NaN
    assert np.isfinite(y[:, 1]).all() and np.isfinite(mean[1])
    dx, dgamma, dbeta = fc.batch_norm_backward(np.ones_like(x), x, g, mean, var)
    assert np.isnan(dx[:, 0]).all() and np.isnan(dgamma[0])
    assert np.isfinite(dx[:, 1]).all() and np.isfinite(dgamma[1]) and np.isfinite(dbeta[1])
    dy = np.ones_like(x)
    dy[0, 1, 0, 0] = np.nan
    dx, dgamma, dbeta = fc.batch_norm_backward(dy, x, g, mean, var)
    assert np.isnan(dx[:, 1]).all() and np.isnan(dbeta[1])


def test_one_value_per_channel_is_an_error():
    g = np.ones(3, np.float32)
    for x in (np.zeros((1, 3), np.float32), np.zeros((1, 3, 1, 1), np.float32)):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            fc.batch_norm_forward(x, g, g)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            fc.batch_norm_backward(x, x, g, g, g)
    # Inference with one value per channel is fine.
    one = np.ones((1, 3, 1, 1), np.float32)
    np.testing.assert_allclose(fc.batch_norm_inference(one, g, g, g, g, 0.0), 1.0)


def test_empty_batch(dtype):
    g = np.ones(3, dtype)
    s = np.ones(3, np.float32)
    for shape in ((0, 3, 4, 4), (0, 3)):
        x = np.zeros(shape, dtype)
        y, mean, var = fc.batch_norm_forward(x, g, g)
        assert y.shape == shape and y.dtype == dtype
        assert mean.dtype == np.float32 and np.isnan(mean).all() and np.isnan(var).all()
        dx, dgamma, dbeta = fc.batch_norm_backward(x, x, g, s, s, y=x)
        assert dx.shape == shape and dx.dtype == dtype
        assert dgamma.dtype == dtype and (dgamma == 0).all() and (dbeta == 0).all()
        assert fc.batch_norm_inference(x, g, g, s, s).shape == shape
        assert fc.batch_norm_inference_backward(x, g, s).shape == shape


def test_non_contiguous_inputs(dtype, rng):
    base = (rng.standard_normal((6, 5, 8, 4)) * 3).astype(dtype)
    x = base.transpose(0, 1, 3, 2)[:, ::2]  # (6, 3, 4, 8), strided
    assert not x.flags.c_contiguous
    gamma = rng.standard_normal(6).astype(dtype)[::2]
    beta = rng.standard_normal(3).astype(dtype)
    y, mean, var = fc.batch_norm_forward(x, gamma, beta)
    want = ref.batch_norm_forward(x, gamma, beta)
    for a, b in zip((y, mean, var), want, strict=True):
        assert_close(a, b, a.dtype, 6 * 32)
    dy = rng.standard_normal(x.shape).astype(dtype)[..., ::-1]
    for a, b in zip(fc.batch_norm_backward(dy, x, gamma, mean, var),
                    ref.batch_norm_backward(dy, x, gamma, mean, var), strict=True):  # fmt: skip
        assert_close(a, b, dtype, 6 * 32)


@pytest.mark.parametrize("shape", [(7, 9, 4, 4), (5, 6, 7, 7), (6, 35)], ids=str)
def test_bit_identical_whatever_the_block_size_and_thread_count(shape, rng):
    """Each channel's sums run in one fixed order: any block size (so any number of threads,
    which only changes the block size) and the serial path give the same bits."""
    x, gamma, beta = _params(rng, shape, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    N, C = shape[:2]
    P = x.size // (N * C)
    xr, dyr = x.reshape(N, -1), dy.reshape(N, -1)
    results = []
    for block in (1, 2, 4, C):
        y = np.empty_like(xr)
        mean, var = np.empty(C, np.float32), np.empty(C, np.float32)
        cpu_bn._forward(xr, gamma, beta, y, mean, var, 1e-5, True, P, block)
        dx, dg, db = np.empty_like(xr), np.empty(C, np.float32), np.empty(C, np.float32)
        cpu_bn._backward(dyr, xr, y, True, gamma, mean, var, dx, dg, db, 1e-5, P, block)
        results.append([a.tobytes() for a in (y, mean, var, dx, dg, db)])
    # The public functions run problems this small serially (no parallel region).
    assert x.size < cpu_bn._PARALLEL_MIN
    y, mean, var = fc.batch_norm_forward(x, gamma, beta, activation="relu")
    grads = fc.batch_norm_backward(dy, x, gamma, mean, var, y=y)
    results.append([a.tobytes() for a in (y, mean, var, *grads)])
    assert all(r == results[0] for r in results[1:])


_CACHE_PROBE = """
import hashlib, numpy as np, fastconv as fc
rng = np.random.default_rng(3)
out = []
for shape in [(2, 32, 32, 32), (8, 64, 4, 4), (3, 5, 7, 7)]:  # parallel segments, lanes; serial
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    gamma, beta = rng.standard_normal((2, shape[1])).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, mean, var = fc.batch_norm_forward(x, gamma, beta, activation="relu")
    grads = fc.batch_norm_backward(dy, x, gamma, mean, var, y=y)
    out.append(hashlib.sha256(b"".join(a.tobytes() for a in (y, mean, var, *grads))).hexdigest())
print(" ".join(out))
"""


def test_same_bits_from_a_fresh_compile_and_from_numbas_cache(tmp_path):
    """The training kernels once summed under fast-math "reassoc": LLVM vectorised the sums
    one way when compiling and another in the code Numba cached, so a warm cache changed
    variances by an ulp (and a ReLU6 decision deep in MobileNetV2). Two processes sharing an
    empty cache directory: the first compiles, the second loads; the bits must agree."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    runs = [
        subprocess.run(
            [sys.executable, "-c", _CACHE_PROBE],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    assert any((tmp_path / "numba-cache").rglob("*.nbc")), "the first run cached nothing"
    fresh, cached = (r.stdout.split() for r in runs)
    assert len(fresh) == 3 and fresh == cached


# --- folding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_into_conv_matches_conv_then_bn(with_bias, dtype, rng):
    x = rng.standard_normal((2, 3, 6, 6)).astype(dtype)
    w = (rng.standard_normal((4, 3, 3, 3)) / 3).astype(dtype)
    b = rng.standard_normal(4).astype(dtype) if with_bias else None
    gamma, beta = rng.standard_normal(4).astype(dtype), rng.standard_normal(4).astype(dtype)
    mean = rng.standard_normal(4).astype(np.float32)
    var = rng.uniform(0.5, 2, 4).astype(np.float32)
    wf, bf = fc.fold_batch_norm(w, b, gamma, beta, mean, var)
    assert wf.dtype == bf.dtype == dtype and wf.shape == w.shape and bf.shape == (4,)
    want_w, want_b = ref.fold_batch_norm(w, b, gamma, beta, mean, var)
    assert_close(wf, want_w, dtype)
    assert_close(bf, want_b, dtype)
    got = fc.conv2d(x, wf, bf, 1, 1)
    want = ref.batch_norm_inference(ref.conv2d(x, w, b, 1, 1), gamma, beta, mean, var)
    # Folded weights and bias are rounded once to the dtype: the error is bounded by that
    # rounding times the magnitude of the terms summed, plus the output's own rounding.
    eps = np.finfo(dtype).eps
    terms = ref.conv2d(np.abs(x), np.abs(wf), np.abs(bf), 1, 1)
    assert np.all(np.abs(got - want) <= 2 * eps * (terms + np.abs(want)) + 1e-6)


def test_fold_into_dense_matches_dense_then_bn(rng):
    x = rng.standard_normal((5, 7)).astype(np.float32)
    w = rng.standard_normal((7, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    gamma, beta = (
        rng.standard_normal(3).astype(np.float32),
        rng.standard_normal(3).astype(np.float32),
    )
    mean, var = rng.standard_normal(3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32)
    wf, bf = fc.fold_batch_norm(w, b, gamma, beta, mean, var)
    got = fc.dense(x, wf, bf)
    want = ref.batch_norm_inference(ref.dense(x, w, b), gamma, beta, mean, var)
    assert_close(got, want, np.float32, 7)


# --- validation ---------------------------------------------------------------------------------


def _bad_calls():
    f32 = np.float32
    x = np.zeros((4, 3, 2, 2), f32)
    g = np.ones(3, f32)
    s = np.ones(3, f32)
    V, T = ValueError, TypeError
    bnf, bnb = fc.batch_norm_forward, fc.batch_norm_backward
    bni, bnib = fc.batch_norm_inference, fc.batch_norm_inference_backward
    yield "x-float64", lambda: bnf(x.astype(np.float64), g, g), T, "x must have dtype"
    yield "x-int", lambda: bnf(x.astype(np.int32), g, g), T, "x must have dtype"
    yield "x-3d", lambda: bnf(x[0], g, g), V, "x must be 2-dimensional .* or 4-dimensional"
    yield "x-list", lambda: bnf(x.tolist(), g, g), T, "x must be a numpy.ndarray"
    yield "x-no-pixels", lambda: bnf(x[:, :, :0], g, g), V, "x must have height and width"
    yield "gamma-length", lambda: bnf(x, g[:2], g), V, r"gamma must have shape \(3,\)"
    yield "beta-dtype", lambda: bnf(x, g, g.astype(np.float16)), T, "beta must have the same dtype"
    yield "gamma-2d", lambda: bnf(x, g[None], g), V, "gamma must be 1-dimensional"
    yield "eps-negative", lambda: bnf(x, g, g, -1e-5), V, "eps must be finite and >= 0"
    yield "eps-nan", lambda: bnf(x, g, g, float("nan")), V, "eps must be finite"
    yield "eps-bool", lambda: bnf(x, g, g, True), T, "eps must be a real number"
    yield "eps-str", lambda: bnf(x, g, g, "1e-5"), T, "eps must be a real number"
    yield "activation", lambda: bnf(x, g, g, 1e-5, "tanh"), V, "activation must be None or 'relu'"
    yield (
        "mean-float16",
        lambda: bni(x, g, g, s.astype(np.float16), s),
        T,
        "mean must have dtype float32",
    )
    yield "var-shape", lambda: bni(x, g, g, s, s[:2]), V, r"var must have shape \(3,\)"
    yield "var-list", lambda: bni(x, g, g, s, [1.0, 1, 1]), T, "var must be a numpy.ndarray"
    yield "var-2d", lambda: bni(x, g, g, s, s[None]), V, "var must be 1-dimensional"
    yield "dy-shape", lambda: bnb(x[:2], x, g, s, s), V, r"dy must have shape \(4, 3, 2, 2\)"
    yield (
        "dy-dtype",
        lambda: bnb(x.astype(np.float16), x, g, s, s),
        T,
        "dy must have the same dtype",
    )
    yield "y-shape", lambda: bnb(x, x, g, s, s, y=x[:, :2]), V, "y must have shape"
    yield "y-dtype", lambda: bnb(x, x, g, s, s, y=x.astype(np.float16)), T, "y must have the same"
    yield (
        "bwd-mean-f64",
        lambda: bnb(x, x, g, s.astype(float), s),
        T,
        "mean must have dtype float32",
    )
    yield "inf-bwd-gamma", lambda: bnib(x, g[:1], s), V, r"gamma must have shape \(3,\)"
    yield "inf-bwd-var", lambda: bnib(x, g, s.astype(np.float16)), T, "var must have dtype float32"
    yield "inf-bwd-y", lambda: bnib(x, g, s, y=x[:1]), V, "y must have shape"
    fold = fc.fold_batch_norm
    w = np.zeros((3, 2, 3, 3), f32)
    yield "fold-w-3d", lambda: fold(w[0], None, g, g, s, s), V, "w must be a conv kernel"
    yield "fold-b", lambda: fold(w, g[:2], g, g, s, s), V, r"b must have shape \(3,\)"
    yield "fold-gamma-dense", lambda: fold(np.zeros((5, 4), f32), None, g, g, s, s), V, "gamma"
    yield "fold-var-dtype", lambda: fold(w, None, g, g, s, s.astype(np.float16)), T, "var must"


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in _bad_calls()],
                         ids=[c[0] for c in _bad_calls()])  # fmt: skip
def test_bad_arguments_are_named(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


# --- conformance cases (tests/kernels/op_cases.py; run by test_kernel_interface.py) -------------


def _bn_inputs(rng, dtype, n):
    r = op_cases.normal
    x = r(rng, (n, 3, 4, 5), dtype)
    gamma, beta = r(rng, (3,), dtype), r(rng, (3,), dtype)
    mean, var = r(rng, (3,), np.float32), np.abs(r(rng, (3,), np.float32)) + 0.5
    return x, gamma, beta, mean, var


def _bn_batch_inputs(rng, dtype, n):
    """As _bn_inputs, with the batch's own statistics (what the training backward takes)."""
    x, gamma, beta, _, _ = _bn_inputs(rng, dtype, n)
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(0, 2, 3)), x64.var(axis=(0, 2, 3))
    return x, gamma, beta, mean.astype(np.float32), var.astype(np.float32)


op_cases.register(
    "batch_norm_forward",
    lambda x, ga, be, m, v: fc.batch_norm_forward(x, ga, be, activation="relu"),
    lambda x, ga, be, m, v: ref.batch_norm_forward(x, ga, be, 1e-5, "relu"),
    _bn_inputs,
    terms=100,
)
op_cases.register(
    "batch_norm_inference",
    lambda x, ga, be, m, v: fc.batch_norm_inference(x, ga, be, m, v, activation="relu"),
    lambda x, ga, be, m, v: ref.batch_norm_inference(x, ga, be, m, v, 1e-5, "relu"),
    _bn_inputs,
    terms=4,
)
op_cases.register(
    "batch_norm_backward",
    lambda x, ga, be, m, v: fc.batch_norm_backward(x[::-1].copy(), x, ga, m, v),
    lambda x, ga, be, m, v: ref.batch_norm_backward(x[::-1].copy(), x, ga, m, v),
    _bn_batch_inputs,
    terms=100,
)
op_cases.register(
    "batch_norm_inference_backward",
    lambda x, ga, be, m, v: fc.batch_norm_inference_backward(x, ga, v, y=x[::-1].copy()),
    lambda x, ga, be, m, v: ref.batch_norm_inference_backward(x, ga, v, y=x[::-1].copy()),
    _bn_inputs,
    terms=4,
)
