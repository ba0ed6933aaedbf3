"""The convolution features' layers (Conv2D groups and dilation, DepthwiseConv2D,
SeparableConv2D, ReLU6, padding as (top, bottom, left, right) and Keras's "same" in the
poolings): numerical gradients, the float64 reference, the PyTorch twin (float32 and float16,
forward and backward), configs and checkpoints, and the arguments they refuse."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from conftest import assert_close
from test_layers import check_layer_gradients

from fastconv import nn
from fastconv import reference as ref

# name -> (layer factory, per-sample input shape); every feature, asymmetric padding included
LAYERS = {
    "conv-groups-dilated": (lambda: nn.Conv2D(6, 3, padding="same", groups=2, dilation_rate=2),
                            (4, 9, 8)),
    "conv-same-asymmetric-relu": (lambda: nn.Conv2D(4, 3, stride=2, padding="same",
                                                    activation="relu"), (3, 8, 9)),
    "conv-four-pads": (lambda: nn.Conv2D(4, (3, 2), padding=(1, 0, 2, 1)), (2, 7, 6)),
    "conv-groups-equal-channels": (lambda: nn.Conv2D(6, 3, padding=1, groups=3), (3, 6, 6)),
    "depthwise": (lambda: nn.DepthwiseConv2D(3, 2, padding="same", depth_multiplier=2),
                  (3, 8, 7)),
    "depthwise-dilated-relu": (lambda: nn.DepthwiseConv2D((3, 2), 1, padding=1,
                                                          dilation_rate=(1, 2),
                                                          activation="relu"), (4, 7, 7)),
    "separable": (lambda: nn.SeparableConv2D(5, 3, 2, padding="same", depth_multiplier=2,
                                             activation="relu"), (3, 8, 8)),
    "separable-no-bias": (lambda: nn.SeparableConv2D(4, 3, use_bias=False, dilation_rate=2),
                          (2, 7, 7)),
    "relu6": (lambda: nn.ReLU6(), (3, 5, 5)),
    "max-pool-same": (lambda: nn.MaxPool2D(3, 2, padding="same"), (3, 8, 7)),
    "max-pool-four-pads": (lambda: nn.MaxPool2D(3, 2, padding=(1, 0, 0, 1)), (2, 6, 6)),
    "avg-pool-same": (lambda: nn.AvgPool2D(3, 2, padding="same"), (3, 8, 7)),
    "avg-pool-four-pads": (lambda: nn.AvgPool2D(2, 2, padding=(0, 1, 1, 0)), (2, 5, 5)),
    "avg-pool-four-pads-excluded": (lambda: nn.AvgPool2D(3, 2, padding=(1, 0, 0, 1),
                                                         count_include_pad=False), (2, 6, 6)),
}  # fmt: skip


def _model(name, dtype="float32"):
    factory, shape = LAYERS[name]
    model = nn.Sequential([factory()], input_shape=shape, seed=0, dtype=dtype)
    layer = model.layers[0]
    rng = np.random.default_rng(1)
    for w in ("b", "bias"):  # a bias that is not zero, so that it counts
        if w in layer.params:
            layer.params[w][...] = rng.standard_normal(layer.params[w].shape).astype(dtype)
    return model


def _input(model, rng, dtype=np.float32):
    x = rng.standard_normal((3, *model.input_shape))
    if isinstance(model.layers[0], nn.ReLU6):
        x = 5 * x  # both kinks crossed: values below 0 and above 6
    return x.astype(dtype)


# --- the float64 reference ----------------------------------------------------------------------


def test_grouped_dilated_conv_matches_the_reference(rng):
    layer = nn.Conv2D(6, 3, stride=2, padding=(2, 1, 1, 2), groups=3, dilation_rate=(2, 1))
    x = rng.standard_normal((2, 6, 9, 8)).astype(np.float32)
    y = layer.forward(x, training=True)
    W, b = layer.params["W"], layer.params["b"]
    assert W.shape == (6, 2, 3, 3)
    want = ref.conv2d(x, W, b, (2, 2), (2, 1, 1, 2), None, groups=3, dilation=(2, 1))
    assert_close(y, want, np.float32, 18)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = layer.backward(dy)
    rdx, rdw, rdb = ref.conv2d_backward(dy, x, W, (2, 2), (2, 1, 1, 2), groups=3,
                                        dilation=(2, 1))  # fmt: skip
    for got, exact in ((dx, rdx), (layer.grads["W"], rdw), (layer.grads["b"], rdb)):
        assert_close(got, exact, np.float32, 200)


def test_depthwise_and_separable_are_their_definitions(rng):
    """Depthwise: output channel ``c * m + j`` from input channel ``c`` alone; separable: that,
    then a 1x1 convolution with the bias."""
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    dw = nn.DepthwiseConv2D(3, padding=1, depth_multiplier=2)
    y = dw.forward(x)
    W, b = dw.params["W"], dw.params["b"]
    assert W.shape == (6, 1, 3, 3) and b.shape == (6,)
    for c in range(3):
        want = ref.conv2d(x[:, c : c + 1], W[2 * c : 2 * c + 2], b[2 * c : 2 * c + 2], 1, 1)
        assert_close(y[:, 2 * c : 2 * c + 2], want, np.float32, 9)
    sep = nn.SeparableConv2D(4, 3, padding=1, depth_multiplier=2)
    y = sep.forward(x)
    assert [k for k in sep.params] == ["depthwise_kernel", "pointwise_kernel", "bias"]
    t = ref.conv2d(x, sep.params["depthwise_kernel"], None, 1, 1, None, groups=3)
    want = ref.conv2d(t, sep.params["pointwise_kernel"], sep.params["bias"], 1, 0)
    assert_close(y, want, np.float32, 54)


def test_relu6_values_and_nan(rng):
    x = np.array([[np.nan, -1.0, 0.0, 3.0, 6.0, 7.5, np.inf, -np.inf]], np.float32)
    y = nn.ReLU6().forward(x)
    np.testing.assert_array_equal(y, [[np.nan, 0, 0, 3, 6, 6, 6, 0]])
    layer = nn.ReLU6()
    layer.forward(x, training=True)
    dx = layer.backward(np.ones_like(x))
    np.testing.assert_array_equal(dx, [[0, 0, 0, 1, 0, 0, 0, 0]])  # as torch's: 0 at the kinks


# --- numerical gradients ------------------------------------------------------------------------

GRADIENT_CASES = [n for n in LAYERS if "relu" not in n and "pool" not in n]


@pytest.mark.parametrize("name", GRADIENT_CASES)
def test_gradients_are_the_numerical_ones(name, rng):
    model = _model(name)
    x = _input(model, rng)
    if name == "relu6":  # away from the kinks at 0 and 6 by more than the step
        x = np.where(np.abs(x) < 0.1, 0.5, x)
        x = np.where(np.abs(x - 6) < 0.1, 5.5, x).astype(np.float32)
    check_layer_gradients(model.layers[0], x, rng)


@pytest.mark.parametrize("name", [n for n in LAYERS if "pool" in n])
def test_pool_gradients_are_the_numerical_ones(name, rng):
    model = _model(name)
    # distinct values 0.1 apart: steps of 1e-2 never change which input wins a window
    size = int(np.prod((3, *model.input_shape)))
    x = (rng.permutation(size) - size // 2).reshape(3, *model.input_shape).astype(np.float32) / 10
    check_layer_gradients(model.layers[0], x, rng, eps=1e-2)


# --- the PyTorch twin ---------------------------------------------------------------------------


def _against_twin(model, x, dy, torch):
    """fastconv's forward, input and weight gradients next to the float64 twin's."""
    from fastconv.torch_bridge import module_key, to_torch

    twin = copy.deepcopy(to_torch(model)).double()
    y = model.forward(x, training=True)
    dx = model.backward(dy)
    tx = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    ty = twin(tx)
    ty.backward(torch.from_numpy(dy.astype(np.float64)))
    layer = model.layers[0]
    pairs = [(y, ty.detach().numpy()), (dx, tx.grad.numpy())]
    module = twin.layers[module_key(layer.name)]
    grads = dict(zip(model.trainable_weight_keys(), model.gradients(), strict=True))
    for wname, tensor, _ in layer.torch_weights(module):
        pairs.append((grads[(layer.name, wname)], tensor.grad.numpy()))
    return pairs


@pytest.mark.parametrize("name", list(LAYERS))
def test_forward_and_backward_match_the_pytorch_twin(name, torch):
    rng = np.random.default_rng(2)
    model = _model(name)
    x = _input(model, rng)
    dy = rng.standard_normal((3, *model.output_shape)).astype(np.float32)
    for got, want in _against_twin(model, x, dy, torch):
        assert_close(got, want, np.float32, 300)


FLOAT16_CASES = ["conv-groups-dilated", "conv-same-asymmetric-relu", "depthwise", "separable",
                 "relu6", "max-pool-same", "avg-pool-same"]  # fmt: skip


@pytest.mark.parametrize("name", FLOAT16_CASES)
def test_float16_matches_the_twin(name, torch):
    """float16 in and out (float32 accumulation) against the float64 twin of the same
    (float16) weights."""
    rng = np.random.default_rng(3)
    model = _model(name, dtype="float16")
    x = _input(model, rng, np.float16)
    dy = rng.standard_normal((3, *model.output_shape)).astype(np.float16)
    for got, want in _against_twin(model, x, dy, torch):
        assert got.dtype == np.float16
        assert_close(got, want, np.float16, 300)


# --- configs, checkpoints, kinds ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(LAYERS))
def test_config_round_trip_and_checkpoint(name, tmp_path, rng):
    model = _model(name)
    layer = model.layers[0]
    config = layer.get_config()
    json.dumps(config)
    assert type(layer)(**config).get_config() == config
    path = tmp_path / "m.npz"
    model.save(path)
    loaded = nn.load_model(path)
    assert loaded.layers[0].get_config() == config
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = _input(model, rng)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


def test_older_configs_get_the_defaults():
    """Configs written before these features have no groups, dilation_rate or
    count_include_pad: they mean 1, 1 and PyTorch's True; plain layers still write none."""
    conv = nn.Conv2D(4, 3, padding=1)
    assert {"groups", "dilation_rate"}.isdisjoint(conv.get_config())
    conv = nn.Conv2D(**{"filters": 4, "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1]})
    assert conv.groups == 1 and conv.dilation_rate == (1, 1)
    pool = nn.AvgPool2D(**{"size": [2, 2], "stride": [2, 2], "padding": [1, 1]})
    assert pool.count_include_pad is True and "count_include_pad" not in pool.get_config()


def test_profiler_kinds():
    assert nn.DepthwiseConv2D(3).kind == "depthwise"
    assert nn.SeparableConv2D(4, 3).kind == "conv"
    depthwise = nn.Conv2D(6, 3, groups=3)
    grouped = nn.Conv2D(6, 3, groups=3)
    depthwise.build((3, 5, 5))
    grouped.build((6, 5, 5))
    assert depthwise.kind == "depthwise" and grouped.kind == "conv"


def test_keras_weight_layouts():
    layer = nn.DepthwiseConv2D((3, 2), depth_multiplier=3)
    layer.build((4, 6, 6))
    assert [w.shape for w in layer.params.values()] == [(12, 1, 3, 2), (12,)]
    assert layer.output_shape((4, 6, 6)) == (12, 4, 5)
    layer = nn.SeparableConv2D(5, 3, depth_multiplier=2, use_bias=False)
    layer.build((4, 6, 6))
    assert [w.shape for w in layer.params.values()] == [(8, 1, 3, 3), (5, 8, 1, 1)]
    layer = nn.Conv2D(6, 3, groups=2, dilation_rate=2)
    layer.build((4, 9, 9))
    assert layer.params["W"].shape == (6, 2, 3, 3) and layer.output_shape((4, 9, 9)) == (6, 5, 5)


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: nn.Conv2D(5, 3, groups=2), ValueError, "groups must divide filters"),
        (lambda: nn.Conv2D(4, 3, groups=0), ValueError, "groups must be >= 1"),
        (lambda: nn.Conv2D(4, 3, groups=1.5), TypeError, "groups must be an int"),
        (lambda: nn.Conv2D(4, 3, dilation_rate=0), ValueError, "dilation_rate must be >= 1"),
        (lambda: nn.DepthwiseConv2D(3, dilation_rate=(1, 0)), ValueError, r"dilation_rate\[1\]"),
        (lambda: nn.DepthwiseConv2D(3, depth_multiplier=0), ValueError, "depth_multiplier"),
        (lambda: nn.SeparableConv2D(0, 3), ValueError, "filters"),
        (lambda: nn.Conv2D(4, 3, padding="full"), ValueError, "padding must be"),
        (lambda: nn.Conv2D(4, 3, padding=(1, 2, 3)), ValueError, "padding must be"),
        (lambda: nn.Conv2D(4, 3, padding=(1, 1, -1, 1)), ValueError, r"padding\[2\]"),
        (lambda: nn.MaxPool2D(3, padding="same", ceil_mode=True), ValueError, "ceil_mode"),
        (lambda: nn.AvgPool2D(2, count_include_pad=1), TypeError, "count_include_pad"),
    ],
)
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_groups_must_divide_the_input_channels():
    with pytest.raises(ValueError, match="'g'.*groups must divide the input channels"):
        nn.Sequential([nn.Conv2D(4, 3, groups=2, name="g")], input_shape=(3, 5, 5))
    with pytest.raises(ValueError, match="'d' on input"):
        nn.Sequential([nn.DepthwiseConv2D(3, dilation_rate=3, name="d")], input_shape=(3, 5, 5))
