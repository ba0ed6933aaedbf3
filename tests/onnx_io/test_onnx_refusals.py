"""What load refuses, and how: a ValueError naming the node, its op type and what is missing;
files that are not ONNX models give a ValueError (never a protobuf traceback), missing ones
FileNotFoundError."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fastconv import models
from fastconv import onnx as fc_onnx


def _graph(onnx, nodes, inits, input_shape=(2, 8, 8), out="y", out_rank=4, elem=None,
           opset=17):  # fmt: skip
    helper = onnx.helper
    float32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", elem or float32, ["N", *input_shape])],
        [helper.make_tensor_value_info(out, float32, [None] * out_rank)],
        [onnx.numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = helper.find_min_ir_version_for(opsets)
    return proto


def _conv(onnx, **attrs):
    w = np.ones((4, 2, 3, 3), np.float32)
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="my_conv", **attrs)
    return _graph(onnx, [node], {"w": w})


def _load(onnx, proto, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(proto, str(path))
    return fc_onnx.load(path)


def _refused(onnx, proto, tmp_path, *words):
    with pytest.raises(ValueError) as info:
        _load(onnx, proto, tmp_path)
    message = str(info.value)
    for word in words:
        assert re.search(word, message), f"{word!r} not in {message!r}"
    return message


@pytest.mark.parametrize(
    ("attrs", "what"),
    [
        ({"group": 3}, r"groups must divide"),
        ({"dilations": [0, 1]}, r"dilation\w*\[0\] must be >= 1"),
        ({"dilations": [1, 2, 3]}, r"dilations \[1, 2, 3\]"),
        ({"pads": [0, 1, 0, -2]}, r"pad\w*\[3\] must be >= 0"),
        ({"auto_pad": "NONSENSE"}, r"auto_pad 'NONSENSE'"),
    ],
)
def test_conv_attributes_fastconv_cannot_express(attrs, what, onnx, tmp_path):
    proto = _conv(onnx, **attrs)
    _refused(onnx, proto, tmp_path, r"node 'my_conv' \(Conv\)", what)


def test_unsupported_op_is_named(onnx, tmp_path):
    nodes = [onnx.helper.make_node("Elu", ["x"], ["y"], name="act")]
    message = _refused(onnx, _graph(onnx, nodes, {}), tmp_path, r"node 'act' \(Elu\)",
                       "no fastconv layer")  # fmt: skip
    assert "Conv" in message and "Gemm" in message  # what is supported


def test_lstm_is_refused(onnx, tmp_path):
    h = 3
    inits = {"W": np.ones((1, 4 * h, 5)), "R": np.ones((1, 4 * h, h))}
    node = onnx.helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="rnn", hidden_size=h)
    proto = _graph(onnx, [node], inits, input_shape=(2, 5), out_rank=4)
    _refused(onnx, proto, tmp_path, r"node 'rnn' \(LSTM\)", "has no fastconv layer")


@pytest.mark.parametrize(
    ("op", "attrs", "what"),
    [
        ("AveragePool", {"pads": [2, 2, 2, 2]}, "at most half the window"),
        ("MaxPool", {"pads": [1, 0, 0, 1], "ceil_mode": 1}, "ceil_mode=True needs the same"),
        ("MaxPool", {"dilations": [2, 2]}, r"dilations \[2, 2\]"),
        ("MaxPool", {"storage_order": 1}, "storage_order"),
    ],
)
def test_pool_attributes_fastconv_cannot_express(op, attrs, what, onnx, tmp_path):
    node = onnx.helper.make_node(op, ["x"], ["y"], name="pool", kernel_shape=[3, 3], **attrs)
    _refused(onnx, _graph(onnx, [node], {}), tmp_path, rf"node 'pool' \({op}\)", what)


def test_other_refusals_name_the_node(onnx, tmp_path):
    helper = onnx.helper
    cases = [
        # a bias added as a separate constant: no fastconv layer adds a constant
        ([helper.make_node("Add", ["x", "c"], ["y"], name="bias_add")], {"c": np.ones((2, 1, 1))},
         {}, r"node 'bias_add' \(Add\).*'c' is a constant"),
        # broadcasting between two computed values
        ([helper.make_node("GlobalAveragePool", ["x"], ["g"], name="gap"),
          helper.make_node("Add", ["x", "g"], ["y"], name="bcast")], {}, {},
         r"node 'bcast' \(Add\).*broadcasting"),
        # weights computed in the graph
        ([helper.make_node("Relu", ["w0"], ["w"], name="wr"),
          helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], {"w0": np.ones((4, 2, 3, 3))},
         {}, r"node 'wr' \(Relu\).*'w0' is a constant"),
        ([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn",
                           training_mode=1)],
         {k: np.ones(2) for k in "sbmv"}, {}, r"node 'bn' \(BatchNormalization\).*training_mode"),
        ([helper.make_node("Flatten", ["x"], ["f"], name="flat"),
          helper.make_node("Gemm", ["f", "w"], ["y"], name="fc", transA=1)],
         {"w": np.ones((2, 3))}, {"out_rank": 2}, r"node 'fc' \(Gemm\).*transA"),
        ([helper.make_node("Flatten", ["x"], ["f"], name="flat"),
          helper.make_node("Gemm", ["f", "w"], ["y"], name="fc", alpha=2.0)],
         {"w": np.ones((128, 3))}, {"out_rank": 2}, r"node 'fc' \(Gemm\).*alpha=2\.0"),
        ([helper.make_node("Softmax", ["x"], ["y"], name="sm")], {}, {},
         r"node 'sm' \(Softmax\).*axis 3"),
        ([helper.make_node("Concat", ["x", "x"], ["y"], name="cat", axis=0)], {}, {},
         r"node 'cat' \(Concat\).*axis 0"),
        ([helper.make_node("Reshape", ["x", "s"], ["y"], name="rs")], {}, {"shape_init": True},
         r"node 'rs' \(Reshape\).*only a flattening"),
    ]  # fmt: skip
    for nodes, inits, options, what in cases:
        if options.get("shape_init"):
            proto = _graph(onnx, nodes, inits, out_rank=3)
            proto.graph.initializer.append(
                onnx.numpy_helper.from_array(np.array([0, 8, 16], np.int64), "s")
            )
        else:
            proto = _graph(onnx, nodes, inits, out_rank=options.get("out_rank", 4))
        _refused(onnx, proto, tmp_path, what)


def test_graph_ends_fastconv_cannot_take(onnx, tmp_path):
    helper = onnx.helper
    relu = [helper.make_node("Relu", ["x"], ["y"], name="r")]
    # a dynamic spatial size
    proto = _graph(onnx, relu, {}, input_shape=(2, "H", 8))
    _refused(onnx, proto, tmp_path, "input 'x'", "every per-sample size fixed")
    # float16 input
    proto = _graph(onnx, relu, {}, elem=onnx.TensorProto.FLOAT16)
    proto.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    _refused(onnx, proto, tmp_path, "input 'x' must be a float32 tensor")
    # two outputs
    proto = _graph(onnx, relu + [helper.make_node("Sigmoid", ["x"], ["z"], name="s")], {})
    proto.graph.output.append(
        helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [None] * 4)
    )
    _refused(onnx, proto, tmp_path, "2 outputs")
    # two inputs
    proto = _graph(onnx, [helper.make_node("Add", ["x", "x2"], ["y"], name="a")], {})
    proto.graph.input.append(
        helper.make_tensor_value_info("x2", onnx.TensorProto.FLOAT, ["N", 2, 8, 8])
    )
    _refused(onnx, proto, tmp_path, "2 inputs")
    # an operator of another domain
    proto = _graph(onnx, [helper.make_node("Gelu", ["x"], ["y"], name="g",
                                           domain="com.microsoft")], {})  # fmt: skip
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _refused(onnx, proto, tmp_path, r"node 'g' \(Gelu\)", "domain 'com.microsoft'")
    # opset older than the oldest read
    _refused(onnx, _graph(onnx, relu, {}, opset=9), tmp_path, "opset 9 is older than 11")


def test_a_file_that_is_no_onnx_model(onnx, tmp_path):
    path = tmp_path / "bad.onnx"
    good = fc_onnx.to_onnx(models.resnet_mnist(seed=0)).SerializeToString()
    contents = [
        b"\xff\xfe garbage \x00\x01" * 50,  # does not parse
        good[: len(good) // 2],  # truncated
        b"",  # empty: parses as an empty message, which the checker refuses
        b"hello, I am a text file\n",
        np.random.default_rng(0).bytes(4096),
    ]
    for data in contents:
        path.write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            fc_onnx.load(path)
    # A checkpoint of another format (a zip archive) is no ONNX model either.
    models.resnet_mnist(seed=0).save(tmp_path / "ckpt.npz")
    with pytest.raises(ValueError, match="ckpt.npz"):
        fc_onnx.load(tmp_path / "ckpt.npz")


def test_missing_file_directory_and_bad_path_argument(onnx, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fc_onnx.load(tmp_path / "nope.onnx")
    with pytest.raises(ValueError, match="is a directory"):
        fc_onnx.load(tmp_path)
    with pytest.raises(TypeError, match="path must be a str or path"):
        fc_onnx.load(42)
    with pytest.raises(TypeError, match="proto must be an onnx.ModelProto"):
        fc_onnx.from_onnx(b"bytes")


def test_external_data_is_refused_without_reading_it(onnx, tmp_path):
    proto = fc_onnx.to_onnx(models.resnet_mnist(seed=0))
    path = tmp_path / "ext.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)  # fmt: skip
    with pytest.raises(ValueError, match="external file"):
        fc_onnx.load(path)


def test_wrong_weight_shapes_name_the_initializer(onnx, tmp_path):
    helper = onnx.helper
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w", "b"], ["y"], name="fc")]  # fmt: skip
    proto = _graph(onnx, nodes, {"w": np.ones((128, 3)), "b": np.ones(4)}, out_rank=2)
    _refused(onnx, proto, tmp_path, r"node 'fc' \(Gemm\)", r"bias of shape \(4,\)")
