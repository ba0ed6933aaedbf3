"""export -> load gives the same layers, names, weights and predictions."""

from __future__ import annotations

import numpy as np
import pytest

from fastconv import models, nn
from fastconv import onnx as fc_onnx

# What a round trip does not keep: training settings, which ONNX does not describe.
TRAINING_ONLY = {"kernel_initializer", "trainable", "kernel_regularizer", "bias_regularizer"}


def _config(layer):
    config = {k: v for k, v in layer.get_config().items() if k not in TRAINING_ONLY}
    if type(layer).__name__ == "DropConnectDense":  # comes back as the Dense it is at inference
        del config["rate"]
    return config


CASES = {
    "deep-mnist": lambda: models.deep_mnist_net(seed=1),
    "deep-mnist-bn": lambda: models.deep_mnist_bn_net(seed=1),
    "resnet-mnist": lambda: models.resnet_mnist(seed=1),
    "lenet5": lambda: models.lenet5(seed=1),
    "googlenet-64": lambda: models.googlenet(num_classes=10, input_shape=(3, 64, 64), seed=1),
    "every-layer": None,  # the conftest's every_layer_model
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_keeps_layers_names_weights_and_predictions(
    case, onnx, tmp_path, randomize_state, every_layer_model
):
    rng = np.random.default_rng(9)
    model = CASES[case]() if CASES[case] else every_layer_model(seed=4)
    randomize_state(model, rng)
    back = fc_onnx.load(fc_onnx.export(model, tmp_path / "m.onnx"))
    assert isinstance(back, nn.Model)
    assert back.input_shape == model.input_shape and back.output_shape == model.output_shape
    assert back._input.name == model._input.name
    expected = [
        ("Dense" if type(layer).__name__ == "DropConnectDense" else type(layer).__name__,
         layer.name)
        for layer in model.layers
    ]  # fmt: skip
    assert [(type(layer).__name__, layer.name) for layer in back.layers] == expected
    for a, b in zip(model.layers, back.layers, strict=True):
        assert _config(b) == _config(a), a.name
    assert [n for _, n in back.weight_entries()] == [n for _, n in model.weight_entries()]
    for a, b in zip(model.get_weights(), back.get_weights(), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert _edges(back) == _edges(model)
    x = rng.standard_normal((3, *model.input_shape)).astype(np.float32)
    np.testing.assert_array_equal(back.predict(x), model.predict(x))


def _edges(model):
    """The graph as (layer, [names of what it reads]) in execution order."""
    return [(n.layer.name, [t.source for t in n.inputs]) for n in model._nodes]
