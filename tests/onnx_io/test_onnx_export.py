"""Export: every zoo model and every layer, checked by onnx.checker and run by ONNX Runtime, which
must give fastconv's predictions (within 1e-4 of the largest logit)."""

from __future__ import annotations

import numpy as np
import pytest

from fastconv import models, nn
from fastconv import onnx as fc_onnx

# name, builder arguments, batch: the zoo at its own input size; batch 1 for the 224x224 models
# (each takes seconds in both runtimes). VGG-16 writes a 553 MB file: marked slow as well.
ZOO = [
    ("deep-mnist", {}, 4),
    ("resnet-mnist", {}, 4),
    ("lenet5", {}, 4),
    ("lenet5", {"activation": "relu"}, 2),
    ("alexnet", {}, 1),
    pytest.param("vgg16", {}, 1, marks=pytest.mark.slow),
    ("resnet18", {}, 2),
    ("resnet34", {}, 1),
    ("googlenet", {}, 1),
    ("mobilenet_v2", {}, 1),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "batch"), ZOO, ids=lambda v: v if isinstance(v, str) else None
)
def test_zoo_model_runs_the_same_in_onnx_runtime(
    name, kwargs, batch, tmp_path, onnx, run_ort, randomize_state, assert_logits_close
):
    rng = np.random.default_rng(7)
    model = models.get_model(name, seed=0, **kwargs)
    randomize_state(model, rng)
    path = fc_onnx.export(model, tmp_path / f"{name}.onnx")
    onnx.checker.check_model(str(path))
    x = rng.standard_normal((batch, *model.input_shape)).astype(np.float32)
    assert_logits_close(run_ort(path, x), model.predict(x))


def test_bn_net_runs_the_same_in_onnx_runtime(tmp_path, run_ort, randomize_state,
                                              assert_logits_close):  # fmt: skip
    rng = np.random.default_rng(3)
    model = models.deep_mnist_bn_net(seed=1)
    randomize_state(model, rng)
    path = fc_onnx.export(model, tmp_path / "bn.onnx")
    x = rng.random((5, 1, 28, 28), dtype=np.float32)
    assert_logits_close(run_ort(path, x), model.predict(x))


def test_every_layer_runs_the_same_in_onnx_runtime(
    tmp_path, onnx, run_ort, randomize_state, assert_logits_close, every_layer_model
):
    rng = np.random.default_rng(11)
    model = every_layer_model()
    randomize_state(model, rng)
    path = fc_onnx.export(model, tmp_path / "every.onnx")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert ops >= {"Conv", "MaxPool", "AveragePool", "Concat", "BatchNormalization", "LeakyRelu",
                   "Sigmoid", "Tanh", "Sum", "GlobalAveragePool", "Flatten", "Gemm", "Dropout",
                   "Relu", "Softmax"}  # fmt: skip
    x = rng.standard_normal((3, 3, 15, 12)).astype(np.float32)
    assert_logits_close(run_ort(path, x), model.predict(x))


def test_convolution_features_run_the_same_in_onnx_runtime(tmp_path, onnx, run_ort,
                                                          assert_logits_close):  # fmt: skip
    """Groups, dilation, Keras's "same" where it pads asymmetrically (8x9 at stride 2),
    4-sided pads, depthwise and separable convolutions, ReLU6, and average pooling without the
    padding in its divisor."""
    layers = [
        nn.Conv2D(6, 3, stride=2, padding="same", name="same"),
        nn.Conv2D(6, 3, padding=(1, 0, 2, 1), groups=2, dilation_rate=(2, 1), name="grouped"),
        nn.DepthwiseConv2D(3, padding="same", depth_multiplier=2, activation="relu", name="dw"),
        nn.ReLU6(name="relu6"),
        nn.SeparableConv2D(4, 3, padding=1, depth_multiplier=2, name="sep"),
        nn.MaxPool2D(2, 2, padding="same", name="max"),
        nn.AvgPool2D(3, 1, padding="same", name="avg"),
        nn.Flatten(),
        nn.Dense(5),
    ]
    model = nn.Sequential(layers, input_shape=(3, 15, 18), seed=0)
    rng = np.random.default_rng(4)
    for layer in model.layers:  # biases that count
        for w in ("b", "bias"):
            if w in layer.params:
                layer.params[w][...] = rng.standard_normal(layer.params[w].shape)
                layer.weights_changed()
    path = fc_onnx.export(model, tmp_path / "features.onnx")
    onnx.checker.check_model(str(path))
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("Conv") == 5 and "Clip" in ops
    x = 4 * rng.standard_normal((3, 3, 15, 18)).astype(np.float32)
    assert_logits_close(run_ort(path, x), model.predict(x))


@pytest.mark.parametrize("opset", [fc_onnx.MIN_OPSET, 21])
def test_opsets_run_the_same(opset, run_ort, assert_logits_close):
    rng = np.random.default_rng(5)
    model = models.resnet_mnist(seed=2)
    proto = fc_onnx.to_onnx(model, opset=opset)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", opset)]
    x = rng.random((2, 1, 28, 28), dtype=np.float32)
    assert_logits_close(run_ort(proto, x), model.predict(x))


def test_names_come_from_the_layers(onnx):
    model = models.resnet_mnist(seed=0)
    graph = fc_onnx.to_onnx(model).graph
    nodes = {node.name for node in graph.node}
    assert {layer.name for layer in model.layers} <= nodes
    inits = {t.name for t in graph.initializer}
    expected = {f"{layer.name}/{w}" for layer in model.layers for w in layer.weight_names()}
    assert inits == expected
    (inp,) = graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "input" and dims[0].dim_param == "N"
    assert [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert graph.output[0].name == "fc"
    # Dense weights stay (in, out): Gemm with transB=0.
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    assert all(a.name != "transB" or a.i == 0 for a in gemm.attribute)
    w = next(t for t in graph.initializer if t.name == "fc/W")
    assert list(w.dims) == [64, 10]


def test_a_shared_weightless_layer_gets_one_value_per_use(run_ort, assert_logits_close):
    relu = nn.ReLU(name="shared")
    inp = nn.Input((4,))
    y = relu(nn.Dense(4, name="d1")(relu(inp)))
    model = nn.Model(inp, nn.Dense(3, name="d2")(y), seed=0)
    proto = fc_onnx.to_onnx(model)
    assert [n.name for n in proto.graph.node if n.op_type == "Relu"] == ["shared", "shared:1"]
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    assert_logits_close(run_ort(proto, x), model.predict(x))


def test_float16_model_is_refused_with_what_to_do(onnx):
    model = models.resnet_mnist(seed=0).to(dtype="float16")
    with pytest.raises(ValueError, match=r"float16.*model\.to\(dtype='float32'\)"):
        fc_onnx.to_onnx(model)


def test_bad_arguments_are_refused(onnx, tmp_path):
    model = models.resnet_mnist(seed=0)
    with pytest.raises(TypeError, match="model must be a fastconv.nn Model"):
        fc_onnx.to_onnx("resnet")
    with pytest.raises(ValueError, match="not built"):
        fc_onnx.to_onnx(nn.Sequential([nn.Dense(3)]))
    for opset in (12, 10_000, "17", True):
        with pytest.raises(ValueError, match="opset must be an int from 13"):
            fc_onnx.to_onnx(model, opset=opset)
    with pytest.raises(TypeError, match="path must be a str or path"):
        fc_onnx.export(model, 3)
    with pytest.raises(ValueError, match="does not exist"):
        fc_onnx.export(model, tmp_path / "no" / "such" / "dir.onnx")
    with pytest.raises(ValueError, match="is a directory"):
        fc_onnx.export(model, tmp_path)


def test_a_layer_without_onnx_export_is_named(onnx):
    class Doubling(nn.Layer):
        shareable = True

        def call(self, x, training=False):
            return 2 * x, None

    inp = nn.Input((3,))
    model = nn.Model(inp, nn.Dense(2)(Doubling(name="twice")(inp)), seed=0)
    with pytest.raises(ValueError, match=r"layer 'twice' \(Doubling\) has no ONNX export"):
        fc_onnx.to_onnx(model)


def test_failed_export_leaves_no_file(onnx, tmp_path):
    model = models.resnet_mnist(seed=0).to(dtype="float16")
    with pytest.raises(ValueError):
        fc_onnx.export(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
