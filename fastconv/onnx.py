"""ONNX export and import: :func:`export` writes a model as an ONNX graph, :func:`load` reads one.

The ``onnx`` package is optional (``pip install 'fastconv[onnx]'``) and imported only inside
these functions, so ``import fastconv`` never needs it.

Export (float32 models; a float16 model is refused: export ``model.to(dtype="float32")``, the
same weights widened) maps every layer to standard operators of the default domain, opset 13 or
later (17 by default), and checks the result with ``onnx.checker.check_model``:

=========================  ==================================================================
fastconv layer             ONNX
=========================  ==================================================================
Conv2D, DepthwiseConv2D    Conv (``pads``, ``strides``, ``dilations``, ``group``; "same" as
                           ``auto_pad`` SAME_UPPER), bias input, + Relu node ``<layer>/relu``
                           for ``activation="relu"``
SeparableConv2D            Conv ``<layer>/depthwise`` (one group per channel), then 1x1 Conv
Dense, DropConnectDense    Gemm (``W`` as ``B``, (in, out): ``transB=0``), + Relu as above
MaxPool2D / AvgPool2D      MaxPool / AveragePool (``pads``, ``ceil_mode``; the layer's
                           ``count_include_pad``)
GlobalAveragePooling2D     GlobalAveragePool + Flatten node ``<layer>/flatten``
BatchNorm2D / BatchNorm1D  BatchNormalization (inference form: moving statistics, epsilon,
                           momentum)
ReLU, LeakyReLU, Sigmoid,  Relu, LeakyRelu (alpha), Sigmoid, Tanh, Softmax (axis 1)
Tanh, Softmax
ReLU6                      Clip (min 0, max 6 as inputs)
Dropout                    Dropout with its ratio (the identity at inference)
Flatten                    Flatten (axis 1)
Add / Concatenate          Add (Sum for more than two inputs) / Concat
=========================  ==================================================================

Names come from the layers: a node is named after its layer, its output value too, and a
layer's weights are the initializers ``<layer>/W``, ``<layer>/b``, ``<layer>/gamma``... The
input keeps the model's input name and a dynamic batch dimension ``N``.

Import (:func:`load`) builds an :class:`fastconv.nn.Model` from graphs made of those operators
(also written by other tools: MatMul, Identity, Sum, a Reshape that flattens, ``auto_pad``
VALID/SAME_UPPER/SAME_LOWER, ``transB=1``; Conv with any ``group`` and ``dilations`` as a
Conv2D with ``groups``/``dilation_rate``, asymmetric ``pads`` as ``(top, bottom, left,
right)``, AveragePool's ``count_include_pad`` either way, Clip to [0, 6] as ReLU6 and to
[0, inf) as ReLU), with the node names as layer names and the initializers as weights.
Anything fastconv cannot compute exactly is refused with a ValueError naming the node, its op
type and what is missing (pooling dilations, ceil_mode with asymmetric pads, an op without a
fastconv layer...). A file that is not an ONNX model
gives a ValueError, a missing one FileNotFoundError; nothing is ever unpickled. A round trip
keeps the architecture, names, weights and predictions; what is only about training is not
kept (``trainable``, regularizers, initializers), DropConnectDense comes back as Dense, and a
Sequential as a functional Model.
A DepthwiseConv2D comes back as a Conv2D with one group per channel, a SeparableConv2D as
its two convolutions (the same functions and weights).

Pooling in ``ceil_mode`` follows PyTorch and ONNX Runtime: a last window that would start in the
right padding is dropped (the ONNX shape inference of some versions keeps it).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

__all__ = ["export", "load", "to_onnx", "from_onnx", "DEFAULT_OPSET", "MIN_OPSET"]

#: the opset :func:`export` writes by default (supported by ONNX Runtime since 1.12)
DEFAULT_OPSET = 17
#: the oldest opset :func:`export` writes (Softmax on one axis, Dropout's ratio as an input)
MIN_OPSET = 13
#: the oldest opset :func:`load` reads
MIN_LOAD_OPSET = 11
INSTALL = "pip install 'fastconv[onnx]'"
_TWO_GB = 2**31 - 1  # a protobuf message larger than this cannot be serialised


def _onnx():
    try:
        import onnx
    except ImportError as e:
        raise ImportError(
            f"ONNX export and import need the onnx package ({e}): {INSTALL}"
        ) from None
    if not hasattr(onnx, "ModelProto"):  # a folder named onnx on sys.path, not the package
        raise ImportError(f"ONNX export and import need the onnx package: {INSTALL}")
    return onnx


# ==============================================================================================
# export
# ==============================================================================================


def to_onnx(model, *, opset: int = DEFAULT_OPSET):
    """The ONNX ``ModelProto`` of a float32 ``model``, checked with ``onnx.checker``.

    Parameters
    ----------
    model : fastconv.nn.Model or Sequential
        Built (its weights exist); float32, on either backend.
    opset : int
        Default-domain opset, from :data:`MIN_OPSET` to the newest the installed onnx knows.

    Returns
    -------
    onnx.ModelProto
    """
    onnx = _onnx()
    from . import __version__
    from .nn.model import Model

    if not isinstance(model, Model):
        raise TypeError(
            f"model must be a fastconv.nn Model or Sequential, got {type(model).__name__}"
        )
    if not model.built:
        raise ValueError("model is not built: build it (or run it once) before exporting")
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be an int from {MIN_OPSET} to {newest}, got {opset!r}")
    if model.dtype != np.float32:
        raise ValueError(
            f"model has dtype {model.dtype}: only float32 models are exported; export "
            "model.to(dtype='float32') (the same weights, widened)"
        )
    helper = onnx.helper
    writer = _Writer(onnx, model._input.name)
    for node in model._nodes:
        emit = _EMITTERS.get(type(node.layer).__name__)
        layer = node.layer
        if emit is None or type(layer) is not _layer_class(type(layer).__name__):
            raise ValueError(
                f"layer {layer.name!r} ({type(layer).__name__}) has no ONNX export; exported "
                f"layers: {', '.join(sorted(_EMITTERS))}"
            )
        ins = [writer.value_of(t) for t in node.inputs]
        out = writer.new_value(node.output, layer.name)
        emit(writer, layer, ins, out)

    float32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        writer.nodes,
        model.name,
        [helper.make_tensor_value_info(writer.input_name, float32, ["N", *model.input_shape])],
        [
            helper.make_tensor_value_info(
                writer.value_of(model._output), float32, ["N", *model.output_shape]
            )
        ],
        writer.initializers,
    )
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="fastconv",
                              producer_version=__version__)  # fmt: skip
    # The oldest IR version that carries this opset: runtimes refuse IR versions newer than
    # theirs, and onnx's default is the newest it knows.
    proto.ir_version = helper.find_min_ir_version_for(opsets)
    if proto.ByteSize() > _TWO_GB:
        raise ValueError(
            f"model {model.name!r} has more than 2 GB of weights, more than one ONNX file holds "
            "(external data files are not written)"
        )
    onnx.checker.check_model(proto)
    return proto


def export(model, path, *, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model`` as an ONNX file (see :func:`to_onnx`); returns the path.

    The file is written to a temporary file next to ``path`` and renamed over it, so a failed
    export never leaves a truncated file.
    """
    from .nn._files import atomic_write, check_writable_file

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or path, got {type(path).__name__}")
    check_writable_file(path, "path")
    data = to_onnx(model, opset=opset).SerializeToString()
    atomic_write(path, lambda f: f.write(data), suffix=".onnx")
    return Path(path)


def _layer_class(name):
    from .nn.layers import LAYER_CLASSES

    return LAYER_CLASSES.get(name)


class _Writer:
    """Nodes, initializers and unique value names of the graph being written."""

    def __init__(self, onnx, input_name):
        self.onnx = onnx
        self.nodes, self.initializers = [], []
        self.input_name = input_name
        self.taken = {input_name}
        self.values = {}  # symbolic tensor id -> value name

    def value_of(self, tensor) -> str:
        return self.values.get(tensor.id, self.input_name)

    def unique(self, base) -> str:
        # A weightless layer may appear at several places of a graph: its later uses get ":k".
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}:{k}"
        self.taken.add(name)
        return name

    def new_value(self, tensor, base) -> str:
        name = self.values[tensor.id] = self.unique(base)
        return name

    def weight(self, prefix, name, value) -> str:
        from .nn.backend import to_numpy

        array = np.ascontiguousarray(to_numpy(value), dtype=np.float32)
        full = self.unique(f"{prefix}/{name}")
        self.initializers.append(self.onnx.numpy_helper.from_array(array, full))
        return full

    def node(self, op, inputs, outputs, name, **attrs):
        self.nodes.append(self.onnx.helper.make_node(op, inputs, outputs, name=name, **attrs))


def _with_relu(w, layer, op, inputs, out, **attrs):
    """``op`` named after the layer, then the fused ReLU as its own node ``<node>/relu``."""
    if layer.activation is None:
        w.node(op, inputs, [out], out, **attrs)
        return
    pre = w.unique(f"{out}/pre_relu")
    w.node(op, inputs, [pre], out, **attrs)
    w.node("Relu", [pre], [out], f"{out}/relu")


def _product_inputs(w, layer, x, out):
    inputs = [x, w.weight(out, "W", layer.params["W"])]
    if layer.use_bias:
        inputs.append(w.weight(out, "b", layer.params["b"]))
    return inputs


def _window_attrs(layer, groups):
    """Conv attributes of a convolution layer's window: Keras's "same" as ONNX's SAME_UPPER
    (the odd pixel after, as TensorFlow; load gives "same" back), else ``pads`` in ONNX's order
    (top, left, bottom, right)."""
    top, bottom, left, right = layer.pads
    pad = ({"auto_pad": "SAME_UPPER"} if layer.padding_arg == "same"
           else {"pads": [top, left, bottom, right]})  # fmt: skip
    return dict(kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
                dilations=list(layer.dilation_rate), group=groups, **pad)  # fmt: skip


def _emit_conv(w, layer, ins, out):
    # DepthwiseConv2D: a Conv with one group per input channel.
    groups = layer.groups if type(layer).__name__ == "Conv2D" else layer.input_shape[0]
    _with_relu(w, layer, "Conv", _product_inputs(w, layer, ins[0], out), out,
               **_window_attrs(layer, groups))  # fmt: skip


def _emit_separable(w, layer, ins, out):
    """The depthwise Conv (no bias) into ``<layer>/depthwise``, then the 1x1 Conv."""
    mid = w.unique(f"{out}/depthwise")
    kernel = w.weight(out, "depthwise_kernel", layer.params["depthwise_kernel"])
    w.node("Conv", [ins[0], kernel], [mid], mid, **_window_attrs(layer, layer.input_shape[0]))
    inputs = [mid, w.weight(out, "pointwise_kernel", layer.params["pointwise_kernel"])]
    if layer.use_bias:
        inputs.append(w.weight(out, "bias", layer.params["bias"]))
    _with_relu(w, layer, "Conv", inputs, out, kernel_shape=[1, 1])


def _emit_relu6(w, layer, ins, out):
    bounds = []
    for name, value in (("min", 0.0), ("max", 6.0)):  # Clip's bounds are inputs since opset 11
        bounds.append(w.unique(f"{out}/{name}"))
        w.initializers.append(w.onnx.numpy_helper.from_array(np.array(value, np.float32),
                                                             bounds[-1]))  # fmt: skip
    w.node("Clip", [ins[0], *bounds], [out], out)


def _emit_dense(w, layer, ins, out):
    # W is (in, out) as Gemm's B with transB=0: no transposed copy.
    _with_relu(w, layer, "Gemm", _product_inputs(w, layer, ins[0], out), out)


def _emit_pool(op):
    def emit(w, layer, ins, out):
        top, bottom, left, right = layer.pads
        attrs = {"kernel_shape": list(layer.size), "strides": list(layer.stride),
                 "pads": [top, left, bottom, right], "ceil_mode": int(layer.ceil_mode)}  # fmt: skip
        if op == "AveragePool":  # 1: zero padding counts in the divisor, as PyTorch's
            attrs["count_include_pad"] = int(layer.count_include_pad)
        w.node(op, ins, [out], out, **attrs)

    return emit


def _emit_gap(w, layer, ins, out):
    pooled = w.unique(f"{out}/pooled")  # (N, C, 1, 1), flattened to the layer's (N, C)
    w.node("GlobalAveragePool", ins, [pooled], out)
    w.node("Flatten", [pooled], [out], f"{out}/flatten", axis=1)


def _emit_batch_norm(w, layer, ins, out):
    inputs = [ins[0]] + [
        w.weight(out, name, layer.get_weight(name))
        for name in ("gamma", "beta", "moving_mean", "moving_variance")
    ]
    w.node("BatchNormalization", inputs, [out], out, epsilon=layer.epsilon,
           momentum=layer.momentum)  # fmt: skip


def _emit_simple(op, **fixed):
    def emit(w, layer, ins, out):
        attrs = {k: (v(layer) if callable(v) else v) for k, v in fixed.items()}
        w.node(op, ins, [out], out, **attrs)

    return emit


def _emit_dropout(w, layer, ins, out):
    ratio = w.unique(f"{out}/ratio")
    w.initializers.append(w.onnx.numpy_helper.from_array(np.array(layer.rate, np.float32), ratio))
    w.node("Dropout", [ins[0], ratio], [out], out)


def _emit_add(w, layer, ins, out):
    w.node("Add" if len(ins) == 2 else "Sum", ins, [out], out)


_EMITTERS = {
    "Conv2D": _emit_conv,
    "DepthwiseConv2D": _emit_conv,
    "SeparableConv2D": _emit_separable,
    "Dense": _emit_dense,
    "DropConnectDense": _emit_dense,  # the mean network at inference: a Dense
    "MaxPool2D": _emit_pool("MaxPool"),
    "MaxPool2DCeil": _emit_pool("MaxPool"),
    "AvgPool2D": _emit_pool("AveragePool"),
    "GlobalAveragePooling2D": _emit_gap,
    "BatchNorm2D": _emit_batch_norm,
    "BatchNorm1D": _emit_batch_norm,
    "ReLU": _emit_simple("Relu"),
    "ReLU6": _emit_relu6,
    "LeakyReLU": _emit_simple("LeakyRelu", alpha=lambda layer: layer.alpha),
    "Sigmoid": _emit_simple("Sigmoid"),
    "Tanh": _emit_simple("Tanh"),
    "Softmax": _emit_simple("Softmax", axis=1),
    "Dropout": _emit_dropout,
    "Flatten": _emit_simple("Flatten", axis=1),
    "Add": _emit_add,
    "Concatenate": _emit_simple("Concat", axis=lambda layer: layer.axis),
}


# ==============================================================================================
# import
# ==============================================================================================


def load(path):
    """Read an ONNX file into a :class:`fastconv.nn.Model` (see :func:`from_onnx`).

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        Not an ONNX model, weights in external files, or a graph fastconv cannot run (the
        message names the node, its op type and what is missing).
    """
    onnx = _onnx()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or path, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"ONNX file {os.fspath(path)} does not exist")
    if p.is_dir():
        raise ValueError(f"path {os.fspath(path)}: is a directory, not an ONNX file")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(p.read_bytes())
    except Exception as e:  # protobuf's DecodeError and friends: not a model
        raise ValueError(
            f"{os.fspath(path)}: not an ONNX model (unreadable protobuf: {e})"
        ) from None
    return from_onnx(proto, where=os.fspath(path))


def from_onnx(proto, *, where: str = "ONNX model"):
    """An :class:`fastconv.nn.Model` computing what the ONNX model ``proto`` computes.

    The graph must have one float32 input with a fixed per-sample shape (any batch dimension)
    and one output, and be made of the operators listed in the module docstring; layers are
    named after the nodes (``/`` read as ``.``), weights come from the initializers (or
    Constant nodes). ``where`` names the model in error messages.
    """
    onnx = _onnx()
    if not isinstance(proto, onnx.ModelProto):
        raise TypeError(f"proto must be an onnx.ModelProto, got {type(proto).__name__}")
    for t in _all_initializers(proto.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise ValueError(
                f"{where}: initializer {t.name!r} keeps its data in an external file; load reads "
                "self-contained files only (onnx.save_model(m, path, save_as_external_data=False))"
            )
    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # ValidationError, or a C++ error on a malformed message
        raise ValueError(f"{where}: not a valid ONNX model: {_first_line(e)}") from None
    return _Reader(onnx, proto, where).model()


def _all_initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t


def _first_line(e) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _float32_attr(value) -> float:
    """An ONNX float attribute (stored as float32) as the shortest decimal that gives it back:
    epsilon 1e-3 reads as 0.001, not 0.0010000000474974513."""
    return float(str(np.float32(value)))


def _same_split(n, extent, stride, upper=True):
    """``auto_pad`` SAME's padding along one axis: Keras's "same" (SAME_UPPER: the odd pixel
    after), or the same total with the odd pixel before (SAME_LOWER)."""
    from .nn.layers.conv import keras_same_padding

    before, after = keras_same_padding(n, extent, stride)
    return (before, after) if upper else (after, before)


class _Reader:
    """One pass over the graph's nodes (topological, as the checker ensures): each node becomes
    a fastconv layer called on the symbolic tensors of its inputs."""

    def __init__(self, onnx, proto, where):
        self.onnx, self.proto, self.where = onnx, proto, where
        self.graph = proto.graph
        self.opset = self._opset()
        self.consts = {t.name: t for t in self.graph.initializer}
        self.consumers: dict[str, list] = {}
        for node in self.graph.node:
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in self.graph.output}
        self.values = {}  # ONNX value name -> SymbolicTensor
        self.weights = {}  # layer -> {weight name: (array, initializer name, node)}
        self.layer_nodes = {}  # id(layer) -> node (for messages)
        self.absorbed = set()  # ids of nodes folded into an earlier layer
        self.names: set[str] = set()

    # -- refusals ---------------------------------------------------------------------------------
    def refuse(self, node, what):
        name = node.name or (node.output[0] if node.output else "?")
        raise ValueError(f"{self.where}: node {name!r} ({node.op_type}): {what}")

    def _opset(self):
        version = None
        for o in self.proto.opset_import:
            if o.domain in ("", "ai.onnx"):
                version = o.version
        if version is None:
            raise ValueError(f"{self.where}: no default-domain opset (ai.onnx) imported")
        if version < MIN_LOAD_OPSET:
            raise ValueError(
                f"{self.where}: opset {version} is older than {MIN_LOAD_OPSET}, the oldest read; "
                "convert it with onnx.version_converter"
            )
        return version

    # -- graph ends -------------------------------------------------------------------------------
    def _input(self):
        from .nn import Input

        inputs = [i for i in self.graph.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise ValueError(
                f"{self.where}: the graph has {len(inputs)} inputs "
                f"({', '.join(i.name for i in inputs) or 'none'}); fastconv models take one"
            )
        vi = inputs[0]
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or t.elem_type != self.onnx.TensorProto.FLOAT:
            raise ValueError(f"{self.where}: input {vi.name!r} must be a float32 tensor")
        dims = list(t.shape.dim)
        if len(dims) < 2 or any(not d.HasField("dim_value") or d.dim_value < 1 for d in dims[1:]):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            raise ValueError(
                f"{self.where}: input {vi.name!r} has shape {shape}; fastconv needs (batch, "
                "per-sample sizes...) with every per-sample size fixed"
            )
        name = vi.name.replace("/", ".") or "input"
        self.values[vi.name] = Input(tuple(d.dim_value for d in dims[1:]), name=name)

    def model(self):
        from .nn.model import ALLOCATE_WEIGHTS, Model, fill_weights

        self._input()
        if len(self.graph.output) != 1:
            raise ValueError(
                f"{self.where}: the graph has {len(self.graph.output)} outputs; fastconv models "
                "have one"
            )
        for node in self.graph.node:
            if id(node) in self.absorbed:
                continue
            if node.domain not in ("", "ai.onnx"):
                self.refuse(node, f"operators of domain {node.domain!r} have no fastconv layer")
            handler = getattr(self, f"_op_{node.op_type}", None)
            if handler is None:
                self.refuse(
                    node,
                    f"the op type {node.op_type} has no fastconv layer (supported: "
                    f"{', '.join(sorted(n[4:] for n in dir(self) if n.startswith('_op_')))})",
                )
            handler(node)
        out_name = self.graph.output[0].name
        if out_name not in self.values:
            raise ValueError(f"{self.where}: the graph output {out_name!r} is not computed")
        name = (self.graph.name or "onnx_model").replace("/", ".")
        # Weights are declared, not created: they come from the file (checked below).
        token = ALLOCATE_WEIGHTS.set(False)
        try:
            model = Model(self.values[self._input_name()], self.values[out_name], name=name)
        except ValueError as e:
            raise ValueError(f"{self.where}: {e}") from None
        finally:
            ALLOCATE_WEIGHTS.reset(token)
        arrays = []
        for layer, wname in model.weight_entries():
            array, init, node = self.weights[id(layer)][wname]
            expected = layer.declared_shape(wname)
            if tuple(array.shape) != tuple(expected):
                self.refuse(
                    node,
                    f"initializer {init!r} has shape {tuple(array.shape)}, the layer needs "
                    f"{tuple(expected)}",
                )
            arrays.append(array)
        fill_weights(model, arrays)
        return model

    def _input_name(self):
        return next(i.name for i in self.graph.input if i.name not in self.consts)

    # -- helpers ----------------------------------------------------------------------------------
    def attrs(self, node) -> dict:
        return {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}

    def tensor(self, node, name):
        """The symbolic tensor of value ``name`` (a computed value, not a constant)."""
        if name in self.values:
            return self.values[name]
        if name in self.consts:
            self.refuse(node, f"input {name!r} is a constant; fastconv layers take it computed")
        self.refuse(node, f"input {name!r} is not computed before this node")

    def const(self, node, name, what, dtype=np.float32):
        """The array of a constant input (initializer or Constant node)."""
        if name not in self.consts:
            self.refuse(node, f"{what} {name!r} must be a constant (an initializer)")
        array = self.onnx.numpy_helper.to_array(self.consts[name])
        if dtype is not None and array.dtype != dtype:
            self.refuse(
                node, f"{what} {name!r} has dtype {array.dtype}, expected {np.dtype(dtype)}"
            )
        return array

    def layer_name(self, node):
        """The node's name as a layer name ('/' is the one character a layer name cannot hold),
        or None (an automatic name) when empty or taken."""
        name = node.name.replace("/", ".").strip(".")
        if not name or name in self.names:
            return None
        self.names.add(name)
        return name

    def connect(self, node, layer, inputs, output, weights=None):
        """Call ``layer`` on ``inputs`` (symbolic tensors); its output is value ``output``."""
        try:
            y = layer(inputs)
        except ValueError as e:
            self.refuse(node, str(e))
        self.values[output] = y
        self.weights[id(layer)] = weights or {}

    def make(self, node, cls, *args, **kwargs):
        try:
            return cls(*args, name=self.layer_name(node), **kwargs)
        except (TypeError, ValueError) as e:
            self.refuse(node, f"no {cls.__name__} for these attributes: {e}")

    def only_consumer(self, value):
        """The one node reading ``value`` (None if several, none, or it is a graph output)."""
        users = self.consumers.get(value, [])
        if value in self.graph_outputs or len(users) != 1:
            return None
        return users[0]

    def single_output(self, node):
        extra = [o for o in node.output[1:] if o]
        used = [o for o in extra if o in self.consumers or o in self.graph_outputs]
        if used:
            self.refuse(node, f"output {used[0]!r} is used; fastconv computes the first only")

    def check_attrs(self, node, attrs, allowed):
        unknown = sorted(set(attrs) - set(allowed))
        if unknown:
            self.refuse(node, f"attribute {unknown[0]!r} is not supported")

    def window(self, node, attrs, x, kernel, dilations=(1, 1)):
        """Strides and padding of a Conv or pooling node, or a refusal. The padding is a pair
        when symmetric, else ``(top, bottom, left, right)`` (ONNX's ``pads`` are ``(top,
        left, bottom, right)``); ``auto_pad`` SAME_UPPER is Keras's "same" (the odd pixel
        after), SAME_LOWER puts it before."""
        strides = list(attrs.get("strides", [1, 1]))
        if len(kernel) != 2 or len(strides) != 2 or len(x.shape) != 3:
            self.refuse(node, "only 2-D windows on (N, C, H, W) inputs are supported")
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto == "NOTSET":
            pads = list(attrs.get("pads", [0, 0, 0, 0]))
            if len(pads) != 4:
                self.refuse(node, f"pads {pads} (expected 4 values for a 2-D window)")
            top, left, bottom, right = (int(v) for v in pads)
        elif auto == "VALID":
            top = left = bottom = right = 0
        elif auto == "SAME_UPPER":  # the layers' "same" is Keras's: the odd pixel after
            return strides, "same"
        elif auto == "SAME_LOWER":
            (top, bottom), (left, right) = (
                _same_split(n, (k - 1) * d + 1, s, upper=False)
                for n, k, s, d in zip(x.shape[1:], kernel, strides, dilations, strict=True)
            )  # fmt: skip
        else:
            self.refuse(node, f"auto_pad {auto!r} is not supported")
        if top == bottom and left == right:
            return strides, (top, left)
        return strides, (top, bottom, left, right)

    def fused_relu(self, node):
        """The Relu node our exporter writes after a Conv or Gemm (``<node>/relu``), or None:
        it becomes the layer's ``activation="relu"`` (any other Relu stays a ReLU layer)."""
        user = self.only_consumer(node.output[0])
        if (
            user is not None
            and user.op_type == "Relu"
            and node.name
            and (user.name == f"{node.name}/relu")
        ):
            self.absorbed.add(id(user))
            return user
        return None

    def product(self, node, cls, x, w, b, wname, bname, **kwargs):
        relu = self.fused_relu(node)
        layer = self.make(node, cls, activation="relu" if relu else None, use_bias=b is not None,
                          **kwargs)  # fmt: skip
        weights = {"W": (w, wname, node)}
        if b is not None:
            weights["b"] = (b, bname, node)
        self.connect(node, layer, x, (relu or node).output[0], weights)

    # -- operators --------------------------------------------------------------------------------
    def _op_Conv(self, node):
        from .nn.layers import Conv2D

        attrs = self.attrs(node)
        self.check_attrs(node, attrs, ("auto_pad", "dilations", "group", "kernel_shape", "pads",
                                       "strides"))  # fmt: skip
        x = self.tensor(node, node.input[0])
        w = self.const(node, node.input[1], "weight")
        if w.ndim != 4:
            self.refuse(node, f"weight of shape {w.shape}: only 2-D convolutions are supported")
        kernel = list(attrs.get("kernel_shape", w.shape[2:]))
        if kernel != list(w.shape[2:]):
            self.refuse(
                node, f"kernel_shape {kernel} differs from the weight's {list(w.shape[2:])}"
            )
        dilations = tuple(int(d) for d in attrs.get("dilations", [1, 1]))
        if len(dilations) != 2:
            self.refuse(node, f"dilations {list(dilations)} (expected 2 values)")
        strides, padding = self.window(node, attrs, x, kernel, dilations)
        has_b = len(node.input) > 2 and node.input[2]
        b = self.const(node, node.input[2], "bias") if has_b else None
        # One class for every group count: Conv2D's weights are (F, C / groups, kh, kw), as
        # ONNX's (a depthwise layer is groups == C).
        self.product(node, Conv2D, x, w, b, node.input[1], has_b and node.input[2],
                     filters=int(w.shape[0]), kernel_size=tuple(kernel), stride=tuple(strides),
                     padding=padding, groups=int(attrs.get("group", 1)),
                     dilation_rate=dilations)  # fmt: skip

    def _op_Gemm(self, node):
        from .nn.layers import Dense

        attrs = self.attrs(node)
        self.check_attrs(node, attrs, ("alpha", "beta", "transA", "transB"))
        if attrs.get("transA", 0):
            self.refuse(node, "transA=1 (the input transposed) is not supported")
        for key in ("alpha", "beta"):
            if attrs.get(key, 1.0) != 1.0:
                self.refuse(node, f"{key}={attrs[key]} (only 1.0 is supported)")
        x = self.tensor(node, node.input[0])
        w = self.const(node, node.input[1], "weight")
        if w.ndim != 2:
            self.refuse(node, f"weight of shape {w.shape} (expected a matrix)")
        if attrs.get("transB", 0):
            w = np.ascontiguousarray(w.T)  # fastconv's Dense keeps W as (in, out)
        has_b = len(node.input) > 2 and node.input[2]
        b = None
        if has_b:
            b = self.const(node, node.input[2], "bias")
            if b.shape not in ((w.shape[1],), (1, w.shape[1])):
                self.refuse(node, f"bias of shape {b.shape} (expected ({w.shape[1]},))")
            b = b.reshape(-1)
        self.product(node, Dense, x, w, b, node.input[1], has_b and node.input[2],
                     units=int(w.shape[1]))  # fmt: skip

    def _op_MatMul(self, node):
        from .nn.layers import Dense

        x = self.tensor(node, node.input[0])
        w = self.const(node, node.input[1], "weight")
        if w.ndim != 2 or len(x.shape) != 1:
            self.refuse(node, "only (N, features) @ (features, units) with a constant matrix")
        self.product(node, Dense, x, w, None, node.input[1], None, units=int(w.shape[1]))

    def _pool(self, node, cls, allowed, extra=None, same_ok=True, **options):
        attrs = self.attrs(node)
        self.check_attrs(node, attrs, allowed)
        self.single_output(node)
        if any(d != 1 for d in attrs.get("dilations", [1, 1])):
            self.refuse(node, f"dilations {list(attrs['dilations'])} (pooling has none here)")
        x = self.tensor(node, node.input[0])
        kernel = list(attrs["kernel_shape"])
        strides, padding = self.window(node, attrs, x, kernel)
        if padding == "same" and not same_ok:  # the layer's "same" would not count the padding
            (t, b), (left, r) = (
                _same_split(n, k, s) for n, k, s in zip(x.shape[1:], kernel, strides, strict=True)
            )
            padding = (t, left) if (t, left) == (b, r) else (t, b, left, r)
        if extra:
            extra(attrs, padding)
        layer = self.make(node, cls, tuple(kernel), tuple(strides), padding,
                          ceil_mode=bool(attrs.get("ceil_mode", 0)), **options)  # fmt: skip
        self.connect(node, layer, x, node.output[0])

    def _op_MaxPool(self, node):
        from .nn.layers import MaxPool2D

        def check(attrs, padding):
            if attrs.get("storage_order", 0) != 0:
                self.refuse(node, "storage_order 1 (only the Indices output uses it)")

        self._pool(node, MaxPool2D, ("auto_pad", "ceil_mode", "dilations", "kernel_shape",
                                     "pads", "storage_order", "strides"), check)  # fmt: skip

    def _op_AveragePool(self, node):
        from .nn.layers import AvgPool2D

        include = bool(self.attrs(node).get("count_include_pad", 0))  # ONNX's default: 0
        # None: the layer's default for numeric padding, True (so a round trip keeps the config)
        self._pool(node, AvgPool2D, ("auto_pad", "ceil_mode", "count_include_pad", "dilations",
                                     "kernel_shape", "pads", "strides"),
                   same_ok=not include, count_include_pad=None if include else False)  # fmt: skip

    def _op_Clip(self, node):
        from .nn.layers import ReLU, ReLU6

        attrs = self.attrs(node)
        self.check_attrs(node, attrs, ("min", "max"))  # opset < 11: bounds as attributes
        bounds = []
        for i, key in ((1, "min"), (2, "max")):
            if len(node.input) > i and node.input[i]:
                bounds.append(float(self.const(node, node.input[i], key).reshape(-1)[0]))
            else:
                bounds.append(attrs.get(key))
        lo, hi = bounds
        if lo == 0.0 and hi == 6.0:
            cls = ReLU6
        elif lo == 0.0 and (hi is None or hi == float("inf")):
            cls = ReLU
        else:
            self.refuse(node, f"Clip to [{lo}, {hi}] (only [0, 6] as ReLU6 and [0, inf) as ReLU)")
        self.connect(node, self.make(node, cls), self.tensor(node, node.input[0]),
                     node.output[0])  # fmt: skip

    def _op_GlobalAveragePool(self, node):
        from .nn.layers import AvgPool2D, GlobalAveragePooling2D

        x = self.tensor(node, node.input[0])
        if len(x.shape) != 3:
            self.refuse(node, f"input of per-sample shape {x.shape}; only (N, C, H, W) inputs")
        user = self.only_consumer(node.output[0])
        if user is not None and user.op_type == "Flatten" and self.attrs(user).get("axis", 1) == 1:
            self.absorbed.add(id(user))  # (N, C, 1, 1) flattened: the layer's (N, C)
            layer = self.make(node, GlobalAveragePooling2D)
            self.connect(node, layer, x, user.output[0])
            return
        # Kept 4-D for what follows: one window over the whole map.
        layer = self.make(node, AvgPool2D, tuple(x.shape[1:]))
        self.connect(node, layer, x, node.output[0])

    def _op_BatchNormalization(self, node):
        from .nn.layers import BatchNorm1D, BatchNorm2D

        attrs = self.attrs(node)
        self.check_attrs(node, attrs, ("epsilon", "momentum", "training_mode", "spatial"))
        if attrs.get("training_mode", 0):
            self.refuse(node, "training_mode=1 (only the inference form is supported)")
        if attrs.get("spatial", 1) != 1:
            self.refuse(node, "spatial=0 (per-activation statistics) is not supported")
        self.single_output(node)
        x = self.tensor(node, node.input[0])
        cls = {3: BatchNorm2D, 1: BatchNorm1D}.get(len(x.shape))
        if cls is None:
            self.refuse(node, f"input of per-sample shape {x.shape}; only (N, C, H, W) or (N, C)")
        names = ("gamma", "beta", "moving_mean", "moving_variance")
        weights = {
            n: (self.const(node, v, n), v, node)
            for n, v in zip(names, node.input[1:5], strict=True)
        }
        layer = self.make(node, cls, momentum=_float32_attr(attrs.get("momentum", 0.9)),
                          epsilon=_float32_attr(attrs.get("epsilon", 1e-5)))  # fmt: skip
        self.connect(node, layer, x, node.output[0], weights)

    def _activation(self, node, cls, allowed=(), **kwargs):
        self.check_attrs(node, self.attrs(node), allowed)
        layer = self.make(node, cls, **kwargs)
        self.connect(node, layer, self.tensor(node, node.input[0]), node.output[0])

    def _op_Relu(self, node):
        from .nn.layers import ReLU

        self._activation(node, ReLU)

    def _op_LeakyRelu(self, node):
        from .nn.layers import LeakyReLU

        alpha = _float32_attr(self.attrs(node).get("alpha", 0.01))
        self._activation(node, LeakyReLU, ("alpha",), alpha=alpha)

    def _op_Sigmoid(self, node):
        from .nn.layers import Sigmoid

        self._activation(node, Sigmoid)

    def _op_Tanh(self, node):
        from .nn.layers import Tanh

        self._activation(node, Tanh)

    def _op_Softmax(self, node):
        from .nn.layers import Softmax

        x = self.tensor(node, node.input[0])
        rank = len(x.shape) + 1
        axis = self.attrs(node).get("axis", -1 if self.opset >= 13 else 1)
        axis = axis + rank if axis < 0 else axis
        # Before opset 13 Softmax flattened everything from `axis` on: the same over axis 1
        # only for (N, features).
        if axis != 1 or (self.opset < 13 and rank != 2):
            self.refuse(node, f"softmax over axis {axis} of a rank-{rank} input (only axis 1)")
        self._activation(node, Softmax, ("axis",))

    def _op_Dropout(self, node):
        from .nn.layers import Dropout

        attrs = self.attrs(node)
        self.check_attrs(node, attrs, ("seed", "ratio"))
        self.single_output(node)
        rate = attrs.get("ratio", 0.5)
        if len(node.input) > 1 and node.input[1]:
            rate = float(self.const(node, node.input[1], "ratio", dtype=None).reshape(()))
        if len(node.input) > 2 and node.input[2]:
            if bool(self.const(node, node.input[2], "training_mode", dtype=None).reshape(())):
                self.refuse(node, "training_mode true: dropout at inference is the identity")
        layer = self.make(node, Dropout, rate=_float32_attr(rate))
        self.connect(node, layer, self.tensor(node, node.input[0]), node.output[0])

    def _op_Identity(self, node):
        self.values[node.output[0]] = self.tensor(node, node.input[0])

    def _op_Flatten(self, node):
        from .nn.layers import Flatten

        x = self.tensor(node, node.input[0])
        axis = self.attrs(node).get("axis", 1)
        if (axis + len(x.shape) + 1 if axis < 0 else axis) != 1:
            self.refuse(node, f"axis {axis} (only 1: (N, features))")
        self._activation(node, Flatten, ("axis",))

    def _op_Reshape(self, node):
        from .nn.layers import Flatten

        x = self.tensor(node, node.input[0])
        shape = self.const(node, node.input[1], "shape", dtype=np.int64).tolist()
        size = math.prod(x.shape)
        zero_copies = not self.attrs(node).get("allowzero", 0)
        flattens = len(shape) == 2 and (
            (shape[0] == -1 and shape[1] == size)
            or (shape[0] == 0 and zero_copies and shape[1] in (-1, size))
        )
        if not flattens:
            self.refuse(node, f"shape {shape}: only a flattening to (N, {size}) is supported")
        layer = self.make(node, Flatten)
        self.connect(node, layer, x, node.output[0])

    def _merge(self, node, layer):
        xs = [self.tensor(node, name) for name in node.input]
        shapes = {x.shape for x in xs}
        if node.op_type in ("Add", "Sum") and len(shapes) > 1:
            self.refuse(
                node,
                f"inputs of shapes {sorted(shapes)}: broadcasting is not supported (fastconv's "
                "Add needs equal shapes)",
            )
        self.connect(node, layer, xs, node.output[0])

    def _op_Add(self, node):
        from .nn.layers import Add

        self._merge(node, self.make(node, Add))

    def _op_Sum(self, node):
        from .nn.layers import Add

        if len(node.input) == 1:
            self._op_Identity(node)
            return
        self._merge(node, self.make(node, Add))

    def _op_Concat(self, node):
        from .nn.layers import Concatenate

        rank = len(self.tensor(node, node.input[0]).shape) + 1
        axis = self.attrs(node)["axis"]
        axis = axis + rank if axis < 0 else axis
        if axis < 1:
            self.refuse(node, "axis 0 (the batch) is not supported")
        self._merge(node, self.make(node, Concatenate, axis=axis))

    def _op_Constant(self, node):
        attrs = self.attrs(node)
        if "value" not in attrs:
            self.refuse(node, f"only tensor constants ('value') are supported, got {sorted(attrs)}")
        self.consts[node.output[0]] = next(a.t for a in node.attribute if a.name == "value")
