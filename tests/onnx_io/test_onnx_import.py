"""Import of graphs written with ``onnx.helper`` (not by fastconv's exporter, in the idioms of
other exporters): loaded with ``fastconv.onnx.load`` and compared with ONNX Runtime on random
input."""

from __future__ import annotations

import numpy as np
import pytest

from fastconv import nn
from fastconv import onnx as fc_onnx


class GraphBuilder:
    """A graph under construction with ``onnx.helper``: nodes, random float32 initializers."""

    def __init__(self, onnx, rng, input_shape, input_name="x"):
        self.onnx, self.rng = onnx, rng
        self.helper = onnx.helper
        self.nodes, self.inits = [], []
        self.input_shape = input_shape
        self.input_name = input_name

    def init(self, name, shape, kind="normal", dtype=np.float32):
        if kind == "normal":
            value = self.rng.standard_normal(shape) * (2.0 / max(1, np.prod(shape[1:]))) ** 0.5
        elif kind == "positive":
            value = self.rng.uniform(0.5, 1.5, shape)
        else:
            value = np.asarray(kind)
        value = np.asarray(value, dtype=dtype)
        self.inits.append(self.onnx.numpy_helper.from_array(value, name))
        return name

    def node(self, op, inputs, outputs, name, **attrs):
        self.nodes.append(self.helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def conv(self, x, name, c_in, c_out, k, bias=True, **attrs):
        w = self.init(f"{name}.weight", (c_out, c_in, k, k))
        ins = [x, w] + ([self.init(f"{name}.bias", (c_out,), "normal")] if bias else [])
        return self.node("Conv", ins, [f"{name}_out"], name, kernel_shape=[k, k], **attrs)

    def bn(self, x, name, c):
        ins = [x, self.init(f"{name}.scale", (c,), "positive"),
               self.init(f"{name}.B", (c,)), self.init(f"{name}.mean", (c,)),
               self.init(f"{name}.var", (c,), "positive")]  # fmt: skip
        return self.node("BatchNormalization", ins, [f"{name}_out"], name, epsilon=1e-3)

    def model(self, output, out_rank, opset=17, batch="batch"):
        helper, float32 = self.helper, self.onnx.TensorProto.FLOAT
        graph = helper.make_graph(
            self.nodes,
            "foreign",
            [helper.make_tensor_value_info(self.input_name, float32, [batch, *self.input_shape])],
            [helper.make_tensor_value_info(output, float32, [None] * out_rank)],
            self.inits,
        )
        opsets = [helper.make_opsetid("", opset)]
        proto = helper.make_model(graph, opset_imports=opsets, producer_name="test")
        proto.ir_version = helper.find_min_ir_version_for(opsets)
        self.onnx.checker.check_model(proto)
        return proto


def _save(onnx, proto, tmp_path, name="m.onnx"):
    path = tmp_path / name
    onnx.save_model(proto, str(path))
    return path


def _compare(onnx, proto, tmp_path, run_ort, assert_logits_close, batch=3, seed=0):
    path = _save(onnx, proto, tmp_path)
    model = fc_onnx.load(path)
    x = np.random.default_rng(seed).standard_normal((batch, *model.input_shape))
    x = x.astype(np.float32)
    assert_logits_close(model.predict(x), run_ort(path, x))
    return model


def test_conv_bn_relu_pool_gemm_net(onnx, tmp_path, run_ort, assert_logits_close):
    """PyTorch's idioms: slash-separated node names, Gemm with transB=1 (nn.Linear's (out, in)
    weight), a Flatten, a bias-free conv followed by BatchNormalization."""
    g = GraphBuilder(onnx, np.random.default_rng(1), (3, 16, 16))
    x = g.conv("x", "/features/conv1", 3, 8, 3, pads=[1, 1, 1, 1], bias=False)
    x = g.bn(x, "/features/bn1", 8)
    x = g.node("Relu", [x], ["r1"], "/features/relu1")
    x = g.node("MaxPool", [x], ["p1"], "/features/pool1", kernel_shape=[2, 2], strides=[2, 2])
    x = g.conv(x, "/features/conv2", 8, 16, 3, strides=[2, 2], pads=[1, 1, 1, 1])
    x = g.node("Relu", [x], ["r2"], "/features/relu2")
    x = g.node("Flatten", [x], ["flat"], "/flatten", axis=1)
    w = g.init("fc.weight", (10, 16 * 4 * 4))
    x = g.node("Gemm", [x, w, g.init("fc.bias", (10,))], ["logits"], "/fc/Gemm",
               alpha=1.0, beta=1.0, transB=1)  # fmt: skip
    model = _compare(onnx, g.model(x, 2), tmp_path, run_ort, assert_logits_close)
    assert [layer.name for layer in model.layers] == [
        "features.conv1", "features.bn1", "features.relu1", "features.pool1", "features.conv2",
        "features.relu2", "flatten", "fc.Gemm"]  # fmt: skip
    bn = model.layers[1]
    assert isinstance(bn, nn.BatchNorm2D) and bn.epsilon == 1e-3
    # transB=1: the (out, in) matrix transposed to Dense's (in, out).
    w_file = onnx.numpy_helper.to_array(next(t for t in g.inits if t.name == "fc.weight"))
    np.testing.assert_array_equal(model.layers[-1].params["W"], w_file.T)


def test_residual_add(onnx, tmp_path, run_ort, assert_logits_close):
    g = GraphBuilder(onnx, np.random.default_rng(2), (4, 9, 9))
    y = g.conv("x", "conv_a", 4, 4, 3, pads=[1, 1, 1, 1], bias=False)
    y = g.node("Relu", [g.bn(y, "bn_a", 4)], ["ra"], "relu_a")
    y = g.bn(g.conv(y, "conv_b", 4, 4, 3, auto_pad="SAME_UPPER"), "bn_b", 4)
    z = g.node("Add", [y, "x"], ["sum"], "add")
    z = g.node("Relu", [z], ["rz"], "relu_out")
    z = g.node("GlobalAveragePool", [z], ["gap"], "gap")
    z = g.node("Flatten", [z], ["gap_flat"], "gap_flatten")
    out = g.node("Gemm", [z, g.init("fc_w", (4, 5))], ["out"], "fc")
    model = _compare(onnx, g.model(out, 2), tmp_path, run_ort, assert_logits_close)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("Add") == 1 and "GlobalAveragePooling2D" in kinds
    assert model.layers[kinds.index("Conv2D", 2)].padding == (1, 1)  # SAME_UPPER, symmetric


def test_concat_branches(onnx, tmp_path, run_ort, assert_logits_close):
    """An inception-style block: four branches concatenated on the channels, a ceil-mode max
    pool, a stride-1 padded pool branch, Sum of three, Softmax over the classes."""
    g = GraphBuilder(onnx, np.random.default_rng(3), (3, 11, 11))
    b1 = g.conv("x", "b1", 3, 4, 1)
    b2 = g.conv(g.node("Relu", [g.conv("x", "b2_0", 3, 2, 1)], ["b2r"], "b2_relu"),
                "b2_1", 2, 5, 3, pads=[1, 1, 1, 1])  # fmt: skip
    b3 = g.node("MaxPool", ["x"], ["b3p"], "b3_pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                strides=[1, 1])  # fmt: skip
    b3 = g.conv(b3, "b3", 3, 3, 1)
    b4 = g.node("AveragePool", ["x"], ["b4p"], "b4_pool", kernel_shape=[3, 3],
                pads=[1, 1, 1, 1], strides=[1, 1], count_include_pad=1)  # fmt: skip
    cat = g.node("Concat", [b1, b2, b3, b4], ["cat"], "concat", axis=-3)
    p = g.node("MaxPool", [cat], ["pool"], "pool", kernel_shape=[3, 3], strides=[2, 2],
               ceil_mode=1)  # fmt: skip
    s = g.node("Sum", [p, p, p], ["s3"], "sum3")
    f = g.node("Reshape", [s, g.init("shape", None, [0, -1], np.int64)], ["flat"], "reshape")
    logits = g.node("MatMul", [f, g.init("w", (15 * 5 * 5, 6))], ["logits"], "matmul")
    out = g.node("Softmax", [logits], ["prob"], "softmax", axis=1)
    model = _compare(onnx, g.model(out, 2), tmp_path, run_ort, assert_logits_close)
    cat_layer = next(layer for layer in model.layers if layer.name == "concat")
    assert isinstance(cat_layer, nn.Concatenate) and cat_layer.axis == 1
    assert next(layer for layer in model.layers if layer.name == "pool").ceil_mode


def test_constant_nodes_dropout_identity_and_a_fixed_batch(onnx, tmp_path, run_ort,
                                                           assert_logits_close):  # fmt: skip
    """Weights from Constant nodes, Dropout (the identity at inference) with its ratio, Identity,
    LeakyRelu, Sigmoid, Tanh, a global pool kept 4-D, and an input with a fixed batch size,
    which still loads for any batch."""
    g = GraphBuilder(onnx, np.random.default_rng(4), (2, 6, 6))
    rng = np.random.default_rng(5)
    w = onnx.numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32))
    g.node("Constant", [], ["cw"], "const_w", value=w)
    x = g.node("Conv", ["x", "cw"], ["c"], "conv", kernel_shape=[3, 3], auto_pad="VALID")
    x = g.node("LeakyRelu", [x], ["lr"], "leaky", alpha=0.1)
    x = g.node("Dropout", [x, g.init("ratio", None, 0.25)], ["d"], "drop")
    x = g.node("Identity", [x], ["id"], "identity")
    x = g.node("GlobalAveragePool", [x], ["gap"], "gap")  # (N, 3, 1, 1): kept 4-D
    x = g.node("Sigmoid", [x], ["sig"], "sig")
    x = g.node("Flatten", [x], ["f"], "flatten")
    x = g.node("Tanh", [x], ["t"], "tanh")
    proto = g.model(x, 2, batch=3)
    model = _compare(onnx, proto, tmp_path, run_ort, assert_logits_close, batch=3)
    kinds = {layer.name: type(layer).__name__ for layer in model.layers}
    assert kinds["gap"] == "AvgPool2D" and kinds["drop"] == "Dropout" and "identity" not in kinds
    assert next(layer for layer in model.layers if layer.name == "drop").rate == 0.25
    assert model.predict(np.zeros((7, 2, 6, 6), np.float32)).shape == (7, 3)


def test_bad_node_names_fall_back_to_automatic_names(onnx, tmp_path, run_ort,
                                                     assert_logits_close):  # fmt: skip
    g = GraphBuilder(onnx, np.random.default_rng(6), (4,))
    x = g.node("Gemm", ["x", g.init("w1", (4, 4))], ["h"], "")
    x = g.node("Relu", [x], ["r"], "/block/act")
    x = g.node("Gemm", [x, g.init("w2", (4, 3))], ["o"], "block.act")  # "/" read as "."
    model = _compare(onnx, g.model(x, 2), tmp_path, run_ort, assert_logits_close)
    names = [layer.name for layer in model.layers]
    assert names[1] == "block.act" and len(set(names)) == 3


@pytest.mark.parametrize("opset", [11, 13])
def test_older_opsets_load(opset, onnx, tmp_path, run_ort, assert_logits_close):
    g = GraphBuilder(onnx, np.random.default_rng(7), (1, 8, 8))
    x = g.conv("x", "conv", 1, 2, 3)
    x = g.node("Flatten", [x], ["f"], "flatten")
    x = g.node("Softmax", [x], ["s"], "softmax", axis=1)  # flattening semantics before 13: (N, F)
    _compare(onnx, g.model(x, 2, opset=opset), tmp_path, run_ort, assert_logits_close)


# --- the convolution features (issue 22), as other exporters write them ---------------------------


def _features_graph(onnx, conv_attrs, c_in=4, c_out=8, groups=1, opset=17, size=(9, 8)):
    g = GraphBuilder(onnx, np.random.default_rng(5), (c_in, *size))
    w = g.init("conv.weight", (c_out, c_in // groups, 3, 3))
    b = g.init("conv.bias", (c_out,))
    y = g.node("Conv", ["x", w, b], ["conv_out"], "conv", kernel_shape=[3, 3], group=groups,
               **conv_attrs)  # fmt: skip
    return g, y


@pytest.mark.parametrize(
    ("attrs", "groups"),
    [
        ({"group_only": True}, 2),
        ({}, 4),  # depthwise x2
        ({"dilations": [2, 2], "pads": [2, 2, 2, 2]}, 1),
        ({"dilations": [1, 3], "pads": [0, 1, 1, 2]}, 2),
        ({"pads": [1, 0, 0, 1], "strides": [2, 2]}, 1),  # (top, left, bottom, right)
        ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 1),
        ({"auto_pad": "SAME_LOWER", "strides": [2, 2]}, 4),
    ],
)
def test_grouped_dilated_and_asymmetric_convolutions(attrs, groups, onnx, tmp_path, run_ort,
                                                     assert_logits_close):  # fmt: skip
    attrs = {k: v for k, v in attrs.items() if k != "group_only"}
    g, y = _features_graph(onnx, attrs, groups=groups)
    model = _compare(onnx, g.model(y, 4), tmp_path, run_ort, assert_logits_close)
    conv = model.get_layer("conv")
    assert conv.groups == groups


@pytest.mark.parametrize(
    ("op", "attrs"),
    [
        ("AveragePool", {"pads": [0, 0, 1, 1], "strides": [2, 2]}),  # count_include_pad 0
        ("AveragePool", {"pads": [1, 0, 0, 1], "count_include_pad": 1}),
        ("AveragePool", {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),  # Keras "same"
        ("MaxPool", {"pads": [0, 1, 1, 0], "strides": [2, 2]}),
        ("MaxPool", {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    ],
)
def test_asymmetric_pooling_and_count_include_pad(op, attrs, onnx, tmp_path, run_ort,
                                                  assert_logits_close):  # fmt: skip
    g = GraphBuilder(onnx, np.random.default_rng(6), (3, 9, 8))
    y = g.node(op, ["x"], ["pool_out"], "pool", kernel_shape=[2, 2], **attrs)
    _compare(onnx, g.model(y, 4), tmp_path, run_ort, assert_logits_close)


@pytest.mark.parametrize(("bounds", "layer"), [((0.0, 6.0), "ReLU6"), ((0.0, None), "ReLU")])
def test_clip_as_relu6_or_relu(bounds, layer, onnx, tmp_path, run_ort, assert_logits_close):
    g, y = _features_graph(onnx, {"pads": [1, 1, 1, 1]})
    ins = [y, g.init("lo", (), bounds[0])] + ([g.init("hi", (), bounds[1])] if bounds[1] else [])
    out = g.node("Clip", ins, ["clip_out"], "clip")
    model = _compare(onnx, g.model(out, 4), tmp_path, run_ort, assert_logits_close)
    assert type(model.get_layer("clip")).__name__ == layer
