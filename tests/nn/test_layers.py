"""Layers: numerical gradients (float32 layers, float64 probe), reference agreement, contract."""

import numpy as np
import pytest
from _gradcheck import numeric_directional, numeric_grad_entries, sample_indices

from fastconv import conv2d
from fastconv import reference as ref
from fastconv.nn import (
    AvgPool2D,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    MaxPool2D,
    ReLU,
    initializers,
)

RTOL, ATOL = 2e-2, 2e-3


def _away_from_zero(a, margin=0.05):
    """Push values away from 0 so that ReLU kinks are not crossed by the finite differences."""
    return np.where(np.abs(a) < margin, np.sign(a + 1e-12) * margin, a).astype(a.dtype)


def check_layer_gradients(layer, x, rng, eps=1e-3, n_entries=12, pre_activation=None):
    """backward() against central differences, for the input and every parameter.

    For layers ending in a ReLU, pass the ``pre_activation``: probe weights of outputs whose
    pre-activation lies within a margin of the kink are zeroed, so no finite difference crosses
    it, while outputs clearly on either side (including the zeroed negative ones, whose gradient
    must be masked) are still checked.
    """
    y = layer.forward(x, training=True)
    r = rng.standard_normal(y.shape)
    if pre_activation is not None:
        near_kink = np.abs(pre_activation) <= 0.1
        r[near_kink] = 0.0
        assert (pre_activation < -0.1).mean() > 0.2 and (pre_activation > 0.1).mean() > 0.2
    dx = layer.backward(r.astype(np.float32))
    assert dx.shape == x.shape and dx.dtype == x.dtype

    def fn():
        return layer.forward(x, training=False)

    targets = [("x", x, dx)] + [(k, layer.params[k], layer.grads[k]) for k in layer.params]
    for name, arr, grad in targets:
        assert grad.shape == arr.shape, name
        idx = sample_indices(arr.shape, n_entries, rng)
        num = numeric_grad_entries(fn, arr, r, idx, eps)
        ana = np.array([grad[i] for i in idx], dtype=np.float64)
        np.testing.assert_allclose(ana, num, rtol=RTOL, atol=ATOL, err_msg=name)
        direction = rng.standard_normal(arr.shape).astype(np.float32)
        num_dir = numeric_directional(fn, arr, r, direction, eps)
        ana_dir = float(np.sum(grad.astype(np.float64) * direction))
        assert ana_dir == pytest.approx(num_dir, rel=RTOL, abs=10 * ATOL), name


@pytest.mark.parametrize(
    "stride,padding,activation",
    [(1, 1, "relu"), (2, 0, None), (1, 2, "relu"), ((1, 2), (2, 1), None)],
)
def test_conv2d_gradients(stride, padding, activation):
    rng = np.random.default_rng(0)
    layer = Conv2D(3, 3, stride=stride, padding=padding, activation=activation)
    layer.rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 6, 5)).astype(np.float32)
    layer.forward(x)
    layer.params["b"][...] = rng.standard_normal(3).astype(np.float32)
    pre = None
    if activation == "relu":
        pre = conv2d(x, layer.params["W"], layer.params["b"], stride, padding)
    check_layer_gradients(layer, x, rng, pre_activation=pre)


def test_conv2d_matches_reference_and_masks_fused_relu():
    rng = np.random.default_rng(2)
    layer = Conv2D(4, (3, 2), stride=1, padding=1, activation="relu")
    x = rng.standard_normal((3, 2, 7, 6)).astype(np.float32)
    y = layer.forward(x, training=True)
    W, b = layer.params["W"], layer.params["b"]
    b[...] = rng.standard_normal(4).astype(np.float32)
    y = layer.forward(x, training=True)
    pre = ref.conv2d(x, W, b, 1, 1)
    np.testing.assert_allclose(y, np.maximum(pre, 0), rtol=1e-4, atol=1e-5)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = layer.backward(dy)
    rdx, rdw, rdb = ref.conv2d_backward(dy * (pre > 0), x, W, 1, 1)
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.grads["W"], rdw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.grads["b"], rdb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (MaxPool2D, {}),
        (MaxPool2D, dict(size=3, stride=2, padding=1)),
        (AvgPool2D, {}),
        (AvgPool2D, dict(size=3, stride=1, padding=1)),
    ],
)
def test_pool_gradients(cls, kwargs):
    rng = np.random.default_rng(3)
    # distinct values 0.1 apart: steps of 1e-2 (and random directions scaled by it) never change
    # which input wins a window, so max pooling is differentiable at this point
    x = rng.permutation(2 * 3 * 6 * 6).reshape(2, 3, 6, 6).astype(np.float32) / 10
    layer = cls(**kwargs)
    check_layer_gradients(layer, x, rng, eps=1e-2)


def test_dense_relu_flatten_gradients():
    rng = np.random.default_rng(4)
    dense = Dense(5)
    dense.rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 7)).astype(np.float32)
    dense.forward(x)
    dense.params["b"][...] = rng.standard_normal(5).astype(np.float32)
    check_layer_gradients(dense, x, rng)
    check_layer_gradients(ReLU(), _away_from_zero(x), rng)
    x4 = rng.standard_normal((2, 3, 2, 2)).astype(np.float32)
    flat = Flatten()
    y = flat.forward(x4, training=True)
    np.testing.assert_array_equal(y, x4.reshape(2, 12))
    check_layer_gradients(Flatten(), x4, rng)


def test_dense_forward_matches_matmul():
    rng = np.random.default_rng(5)
    layer = Dense(3)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    y = layer.forward(x)
    expected = x.astype(np.float64) @ layer.params["W"] + layer.params["b"]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert layer.params["W"].shape == (4, 3) and layer.params["b"].shape == (3,)


def test_dropout_inverted_scaling_and_backward_mask():
    rng = np.random.default_rng(6)
    layer = Dropout(0.25)
    layer.rng = np.random.default_rng(7)
    x = np.ones((200, 100), np.float32)
    y = layer.forward(x, training=True)
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx = layer.backward(dy)
    np.testing.assert_allclose(dx, dy * y, rtol=1e-6)  # y is exactly the mask here
    np.testing.assert_array_equal(layer.forward(x, training=False), x)


def test_relu_propagates_nan():
    x = np.array([[np.nan, -1.0, 2.0]], np.float32)
    y = ReLU().forward(x)
    assert np.isnan(y[0, 0]) and y[0, 1] == 0 and y[0, 2] == 2


def test_layer_contract_kinds_params_and_output_shape():
    x = np.zeros((2, 3, 9, 9), np.float32)
    cases = [
        (Conv2D(4, 3, padding=2, activation="relu"), "conv", {"W", "b"}),
        (MaxPool2D(2), "pool", set()),
        (AvgPool2D(3, stride=2), "pool", set()),
        (Flatten(), "reshape", set()),
    ]
    for layer, kind, keys in cases:
        assert not layer.built
        y = layer.forward(x)
        assert layer.built and layer.kind == kind and set(layer.params) == keys
        assert y.shape[1:] == layer.output_shape(x.shape[1:])
        assert y.dtype == np.float32
    h = np.zeros((2, 6), np.float32)
    for layer, kind in [(Dense(3), "dense"), (ReLU(), "activation"), (Dropout(0.5), "dropout")]:
        y = layer.forward(h, training=True)
        assert layer.kind == kind and y.shape[1:] == layer.output_shape(h.shape[1:])
    assert Conv2D(8, 3, stride=2).output_shape((1, 28, 28)) == (8, 13, 13)
    assert Conv2D(32, 3, padding=2).output_shape((16, 14, 14)) == (32, 16, 16)


def test_layer_errors():
    with pytest.raises(ValueError, match="activation"):
        Conv2D(4, 3, activation="tanh")
    with pytest.raises(ValueError, match="filters"):
        Conv2D(0, 3)
    with pytest.raises(TypeError, match="kernel_size"):
        Conv2D(4, 2.5)
    with pytest.raises(ValueError, match="kernel_initializer"):
        Dense(3, kernel_initializer="zeros")
    with pytest.raises(ValueError, match="rate"):
        Dropout(1.0)
    with pytest.raises(ValueError, match="Flatten"):
        Dense(3).forward(np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="exceeds"):
        Conv2D(4, 5).forward(np.zeros((1, 1, 3, 3), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        Conv2D(4, 3).forward(np.zeros((1, 1, 5, 5), np.float64))
    layer = Conv2D(2, 3)
    layer.forward(np.zeros((1, 1, 5, 5), np.float32))
    with pytest.raises(ValueError, match="built for per-sample shape"):
        layer.forward(np.zeros((1, 2, 5, 5), np.float32))
    with pytest.raises(RuntimeError, match="backward"):
        layer.backward(np.zeros((1, 2, 3, 3), np.float32))
    with pytest.raises(RuntimeError, match="backward"):
        MaxPool2D().backward(np.zeros((1, 1, 2, 2), np.float32))


@pytest.mark.parametrize(
    "name,shape,expected_std",
    [
        ("he_normal", (64, 32, 3, 3), np.sqrt(2 / (32 * 9))),
        ("he_uniform", (400, 300), np.sqrt(6 / 400) / np.sqrt(3)),
        ("glorot_normal", (300, 500), np.sqrt(2 / 800)),
        ("glorot_uniform", (32, 16, 5, 5), np.sqrt(6 / (16 * 25 + 32 * 25)) / np.sqrt(3)),
    ],
)
def test_initializer_statistics(name, shape, expected_std):
    w = initializers.get(name)(shape, np.random.default_rng(0))
    assert w.shape == shape and w.dtype == np.float32
    assert abs(w.mean()) < 0.05 * expected_std
    assert w.std() == pytest.approx(expected_std, rel=0.03)
    if "uniform" in name:
        assert np.abs(w).max() <= expected_std * np.sqrt(3) * (1 + 1e-6)
    again = initializers.get(name)(shape, np.random.default_rng(0))
    np.testing.assert_array_equal(w, again)


def test_fans():
    assert initializers.fans((10, 20)) == (10, 20)
    assert initializers.fans((16, 3, 5, 5)) == (75, 400)
    with pytest.raises(ValueError):
        initializers.fans((3, 3, 3))


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-5), (np.float16, 3e-3)])
def test_dense_kernels_match_float64(dtype, rtol):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((7, 37)).astype(dtype)
    layer = Dense(13)
    layer.forward(x)  # builds the parameters in x's dtype
    W, b = layer.params["W"], layer.params["b"]
    b[...] = rng.standard_normal(13).astype(dtype)
    y = layer.forward(x, training=True)
    assert y.dtype == dtype
    x64, W64 = x.astype(np.float64), W.astype(np.float64)
    scale = np.abs(x64) @ np.abs(W64) + np.abs(b.astype(np.float64))
    expected = x64 @ W64 + b
    assert np.all(np.abs(y - expected) <= rtol * scale + 1e-6)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dy)
    dy64 = dy.astype(np.float64)
    for got, want, bound in [
        (dx, dy64 @ W64.T, np.abs(dy64) @ np.abs(W64.T)),
        (layer.grads["W"], x64.T @ dy64, np.abs(x64.T) @ np.abs(dy64)),
        (layer.grads["b"], dy64.sum(0), np.abs(dy64).sum(0)),
    ]:
        assert got.dtype == dtype
        assert np.all(np.abs(got - want) <= rtol * bound + 1e-6)


def test_float16_relu_mask_kernel_is_bit_exact_with_numpy():
    """The float16 ReLU-gradient kernel gives NumPy's ``dy * (y > 0)`` bit for bit,
    NaN, inf and signed zeros included, on a batch big enough to run on several threads."""
    from fastconv import relu_backward as relu_mask_grad

    rng = np.random.default_rng(21)
    y = rng.standard_normal((3, 4, 9, 11)).astype(np.float16)
    dy = rng.standard_normal(y.shape).astype(np.float16)
    y.flat[:8] = [np.nan, 0.0, -0.0, 1, -1, -1, -1, 2]
    dy.flat[:8] = [1, np.inf, np.nan, -np.inf, 2, -3, np.inf, np.nan]
    with np.errstate(invalid="ignore"):
        expected = dy * (y > 0)
    got = relu_mask_grad(dy, y)
    assert got.dtype == np.float16 and got.shape == y.shape
    nan = np.isnan(expected)
    assert np.array_equal(nan, np.isnan(got))
    assert np.array_equal(expected.view(np.uint16)[~nan], got.view(np.uint16)[~nan])
    # Non-contiguous inputs are accepted.
    got_t = relu_mask_grad(dy.transpose(0, 1, 3, 2), y.transpose(0, 1, 3, 2))
    assert np.array_equal(np.nan_to_num(got_t), np.nan_to_num(got.transpose(0, 1, 3, 2)))


def test_conv_relu_backward_reuses_its_buffer_without_aliasing_results():
    """Conv2D(relu) masks dy into a buffer kept across steps: results of one backward pass must
    not change when the next pass overwrites that buffer, and must match the reference."""
    rng = np.random.default_rng(5)
    layer = Conv2D(4, 3, padding=1, activation="relu")
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    results = []
    for _ in range(2):
        y = layer.forward(x, training=True)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dx = layer.backward(dy)
        results.append((dy * (y > 0), dx, layer.grads["W"], layer.grads["b"]))
    W = layer.params["W"].astype(np.float64)
    for masked, dx, dw, db in results:
        want = ref.conv2d_backward(masked.astype(np.float64), x.astype(np.float64), W, 1, 1)
        for got, exact in zip((dx, dw, db), want, strict=True):
            np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
