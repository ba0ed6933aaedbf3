"""The layer contract shared by every layer, the model graph, the trainer and the profiler.

A layer declares its weights (:meth:`Layer.weight_specs`), computes its output shape, and runs
as a pair of functions that keep nothing on the layer:

* ``call(x, training) -> (y, cache)``: ``cache`` is what the backward pass needs (None at
  inference, so ``predict`` pins no activations and is safe from several threads);
* ``call_backward(cache, dy, need_dx) -> (dx, grads)``: ``grads`` maps each *trainable* weight
  name to its gradient (empty for a frozen layer); ``dx`` may be None when ``need_dx`` is False.

Models run layers only through that pair. ``forward``/``backward`` are an eager convenience for
using one layer on its own (as in the book): they keep the last cache on the layer and fill
``layer.grads``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ... import _checks as chk
from ... import ops
from ...device import device_of
from .. import initializers
from ..backend import array_module

__all__ = ["Layer", "ProductLayer", "WeightSpec", "register_layer", "LAYER_CLASSES", "snake_case"]

#: layer class name -> class; what ``load_model`` can rebuild (see :func:`register_layer`)
LAYER_CLASSES: dict[str, type] = {}


def register_layer(cls):
    """Class decorator: make a user-defined :class:`Layer` loadable by ``load_model``.

    Its ``get_config()`` must return the constructor's keyword arguments (JSON types only).
    """
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        raise TypeError(f"register_layer expects a Layer subclass, got {cls!r}")
    existing = LAYER_CLASSES.get(cls.__name__)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"a different layer class named {cls.__name__!r} is already registered "
            f"({existing.__module__}.{existing.__qualname__})"
        )
    LAYER_CLASSES[cls.__name__] = cls
    return cls


def snake_case(name: str) -> str:
    """ "MaxPool2D" -> "max_pool2d", "ReLU" -> "relu", "BatchNorm2D" -> "batch_norm2d"."""
    name = name.replace("ReLU", "Relu")
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and name[i - 1].islower():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


class WeightSpec(NamedTuple):
    """One weight of a layer: its name, shape and how it starts.

    ``initializer`` is a name from :mod:`fastconv.nn.initializers` (``"zeros"``, ``"ones"``,
    ``"he_normal"``...). ``trainable`` False marks state that the optimizer never touches
    (BatchNorm's moving statistics). ``dtype`` None follows the model's dtype; "float32" keeps
    the weight in float32 in every model dtype.
    """

    name: str
    shape: tuple
    initializer: str
    trainable: bool = True
    dtype: str | None = None


def _per_sample(shape) -> tuple:
    return tuple(int(s) for s in shape)


def _weight_bytes(spec) -> int:
    """Bytes of a weight as it is created (float32, see :meth:`Layer.build`), in Python ints:
    no overflow whatever the shape."""
    return math.prod(int(s) for s in spec.shape) * 4


class Layer:
    """Base class of every layer.

    Subclasses set ``kind`` (the profiler's category: "conv", "pool", "norm", "dense",
    "activation", "dropout", "reshape", "merge") and implement :meth:`output_shape`,
    :meth:`call` and :meth:`call_backward`; layers with weights also :meth:`weight_specs`.

    Parameters
    ----------
    name : str, optional
        Unique within a model; a default one (``conv2d_1``...) is given otherwise.
    trainable : bool
        False freezes the layer (see :attr:`trainable`).
    """

    kind = "layer"
    #: whether one layer object may be called at several places of a graph (weightless layers)
    shareable = False
    #: whether the layer takes a list of tensors (Add, Concatenate)
    multi_input = False

    def __init__(self, name: str | None = None, trainable: bool = True):
        if name is not None and (not isinstance(name, str) or not name or "/" in name):
            raise TypeError(f"name must be a non-empty str without '/', got {name!r}")
        self.name = name or snake_case(type(self).__name__)
        self._auto_named = name is None
        self.trainable = trainable
        self.params: dict = {}  # trainable weights, Keras order
        self.buffers: dict = {}  # non-trainable state
        self.grads: dict = {}  # from the last eager backward()
        self.built = False
        self.input_shape = None  # per sample (no batch dimension); a list for merge layers
        self.rng: np.random.Generator | None = None  # set by the model: init and dropout
        self._eager = None  # (cache, output shape) of the last eager forward(training=True)
        self._symbolic_calls = 0
        #: weight name -> :class:`fastconv.nn.regularizers.Regularizer` (penalty in training)
        self.regularizers: dict = {}
        self._weights_version = 0
        self._prepared = None  # (key, prepared weights) of the inference path

    def _set_regularizers(self, **by_weight) -> None:
        """``kernel_regularizer``/``bias_regularizer`` arguments -> :attr:`regularizers`
        (``by_weight`` maps weight names, e.g. ``W=...``, to a regularizer or None)."""
        from .. import regularizers

        self.regularizers = {}
        for weight, value in by_weight.items():
            reg = regularizers.get(value)
            if reg is not None:
                self.regularizers[weight] = reg

    def _regularizer_config(self, **names) -> dict:
        """Config entries for the regularizers set (none when unset: older configs stay)."""
        return {
            arg: self.regularizers[weight].get_config()
            for arg, weight in names.items()
            if weight in self.regularizers
        }

    # -- the weights version (what prepared inference weights are checked against) -------------

    @property
    def weights_version(self) -> int:
        """A counter that every official writer of this layer's weights bumps (building,
        :meth:`set_weight`, ``Model.set_weights``, an optimizer step of ``fit`` /
        ``train_on_batch``, loading, BatchNorm's moving statistics in training, the
        distributed strategy's broadcasts). Prepared inference weights are rebuilt when it
        changes. Writes into the arrays themselves (``layer.params["W"][...] = ...``) are not
        seen: call :meth:`weights_changed` after them."""
        return self._weights_version

    def weights_changed(self) -> None:
        """Say that this layer's weight arrays were written in place: the prepared inference
        weights made from them are dropped and rebuilt on the next ``predict``."""
        self._weights_version += 1
        self._prepared = None

    # -- fusion (the model's execution plan asks the layers) --------------------------------------

    #: whether the layer has a prepared inference path (:meth:`call_prepared`)
    prepares = False
    #: whether the layer's output is the sum of its two inputs (Add), which a preceding
    #: prepared convolution may add in its epilogue at inference
    adds_inputs = False

    def call_prepared(self, x, folded, fuse_relu: bool, residual=None):
        """Inference output through weights prepared once per weights version (with layer
        ``folded`` folded in, a ReLU when ``fuse_relu``, and ``residual`` added before it).
        A layer with :attr:`fuses_relu6` also takes ``relu6=True`` (with ``fuse_relu``: the
        following ReLU6 instead, no residual)."""
        raise NotImplementedError

    #: "relu" for a ReLU layer, "relu6" for a ReLU6 layer, which a preceding layer may run
    #: in its epilogue
    epilogue = None
    #: whether a ReLU reading only this layer's output may run in this layer's epilogue
    fuses_relu = False
    #: whether a ReLU6 reading only this layer's output may run in this layer's epilogue at
    #: inference, on its prepared or folded path (MobileNet's conv-BN-ReLU6)
    fuses_relu6 = False
    #: whether this layer can be folded into a preceding convolution's weights at inference
    folds_into_conv = False

    def can_fold(self, following, training: bool) -> bool:
        """May ``following`` (a layer reading only this layer's output) be folded into this
        layer's weights for this pass? Then the plan runs :meth:`call_folded` instead."""
        return False

    def call_folded(self, x, folded, fuse_relu: bool):
        """Inference output of this layer with layer ``folded`` folded in (see :meth:`can_fold`)
        and a following ReLU fused when ``fuse_relu`` (``relu6=True`` as for
        :meth:`call_prepared`)."""
        raise NotImplementedError

    # -- the PyTorch twin (fastconv.torch_bridge builds the graph from these) --------------------

    #: whether the twin returns a tensor of its own (not a view or alias of its input), so a
    #: following twin may work in place on it
    torch_fresh = False

    def torch_module(self, torch, inplace=False):
        """The ``torch.nn.Module`` computing what this layer computes, for :func:`to_torch`;
        ``inplace``: it may overwrite its input. Merge layers return None (see
        :meth:`torch_merge`)."""
        raise TypeError(
            f"no PyTorch equivalent known for layer {self.name!r} ({type(self).__name__})"
        )

    def torch_weights(self, module) -> list:
        """``[(weight name, tensor of the twin module, "T" if transposed else None)]``."""
        return []

    def declared_shape(self, weight: str) -> tuple:
        """A weight's shape as declared for the built input shape (also when the weights were
        not created, as for a twin of a model built without allocating them)."""
        for spec in self.weight_specs(self.input_shape):
            if spec.name == weight:
                return tuple(spec.shape)
        raise KeyError(weight)

    # -- freezing --------------------------------------------------------------------------------
    @property
    def trainable(self) -> bool:
        """False freezes the layer: the optimizer skips its weights, it computes no weight
        gradients, and a frozen BatchNorm normalises with its moving statistics (inference
        mode) even in training, as in Keras, so a pretrained base can be fine-tuned safely."""
        return self._trainable

    @trainable.setter
    def trainable(self, value):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"trainable must be a bool, got {type(value).__name__}")
        self._trainable = bool(value)

    # -- construction ----------------------------------------------------------------------------
    def output_shape(self, input_shape) -> tuple:
        """Per-sample output shape for a per-sample input shape; raises ValueError if invalid."""
        return _per_sample(input_shape)

    def weight_specs(self, input_shape) -> list[WeightSpec]:
        """The weights this layer creates for ``input_shape``, in Keras order (none by default)."""
        return []

    def build(self, input_shape, allocate: bool = True) -> None:
        """Validate ``input_shape`` (per sample) and create the weights as float32 NumPy arrays.

        With ``allocate=False`` the weights are declared but not created (checkpoint loading
        fills them from the file after checking their shapes, so a crafted architecture cannot
        make the loader allocate memory the file does not hold).
        """
        shape = (
            [_per_sample(s) for s in input_shape] if self.multi_input else _per_sample(input_shape)
        )
        self.output_shape(shape)  # validates
        self.input_shape = shape
        self.params, self.buffers = {}, {}
        specs = self.weight_specs(shape)
        if allocate:  # all sizes first: refuse before any weight exists
            for spec in specs:
                chk.check_allocation(_weight_bytes(spec), self._weight_what(spec))
        self.weights_changed()
        for spec in specs:
            value = None
            if allocate:
                try:
                    value = initializers.get(spec.initializer)(spec.shape, self._rng())
                except MemoryError:
                    nbytes = _weight_bytes(spec)
                    raise ValueError(
                        f"{self._weight_what(spec)} needs {nbytes:,} bytes "
                        f"({nbytes / 2**30:,.1f} GiB): out of memory"
                    ) from None
            (self.params if spec.trainable else self.buffers)[spec.name] = value
        self.built = True

    def _weight_what(self, spec) -> str:
        return f"{type(self).__name__} {self.name!r}: weight {spec.name} of shape {spec.shape}"

    def get_config(self) -> dict:
        """Constructor arguments, JSON-serialisable (checkpoints rebuild layers from them)."""
        config = {"name": self.name}
        if not self.trainable:
            config["trainable"] = False
        return config

    def _rng(self) -> np.random.Generator:
        if self.rng is None:
            self.rng = np.random.default_rng()
        return self.rng

    # -- weights ---------------------------------------------------------------------------------
    def weight_names(self) -> list[str]:
        """Names of every weight, Keras order (trainable ones first, then the state)."""
        return [*self.params, *self.buffers]

    def get_weight(self, name):
        return self.params[name] if name in self.params else self.buffers[name]

    def set_weight(self, name, value) -> None:
        (self.params if name in self.params else self.buffers)[name] = value
        self.weights_changed()

    def weight_dtype(self, name, model_dtype) -> np.dtype:
        """The dtype weight ``name`` is kept in for a model computing in ``model_dtype``."""
        for spec in self.weight_specs(self.input_shape):
            if spec.name == name:
                return np.dtype(spec.dtype) if spec.dtype else np.dtype(model_dtype)
        raise KeyError(name)

    def count_params(self) -> int:
        """Number of parameters (trainable weights; BatchNorm's moving statistics excluded)."""
        return sum(int(np.prod(p.shape)) for p in self.params.values())

    # -- execution (what models call) -----------------------------------------------------------
    def call(self, x, training: bool = False):
        """Compute the output; return ``(y, cache)``, cache None unless ``training``."""
        raise NotImplementedError

    def call_backward(self, cache, dy, need_dx: bool = True):
        """Return ``(dx, grads)`` for the output gradient ``dy`` (see the module docstring)."""
        raise NotImplementedError

    # -- eager use of a single layer --------------------------------------------------------------
    def __call__(self, inputs):
        """On symbolic tensors (from :func:`fastconv.nn.Input`): add this layer to a graph and
        return its output tensor. On arrays: :meth:`forward` in inference mode."""
        from ..graph import SymbolicTensor, connect

        items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        if items and all(isinstance(t, SymbolicTensor) for t in items):
            return connect(self, inputs)
        if any(isinstance(t, SymbolicTensor) for t in items):
            raise TypeError(f"layer {self.name!r}: mix of symbolic tensors and arrays")
        return self.forward(inputs, training=False)

    def forward(self, x, training: bool = False):
        """Run the layer on arrays, building it on first use from ``x``'s shape, library and
        dtype; with ``training`` the cache is kept for :meth:`backward`."""
        self._ensure_built(x)
        y, cache = self.call(x, training=training)
        self._eager = (cache, tuple(y.shape)) if training else None
        return y

    def backward(self, dy, need_dx: bool = True):
        """Gradients of the last ``forward(x, training=True)``: fills :attr:`grads`, returns dx
        (None if ``need_dx`` is False and the layer skipped it)."""
        if self._eager is None:
            raise RuntimeError(
                f"layer {self.name!r}: backward() needs a preceding forward(x, training=True)"
            )
        (cache, y_shape), self._eager = self._eager, None
        check_gradient(dy, y_shape, f"dy of layer {self.name!r}")
        dx, self.grads = self.call_backward(cache, dy, need_dx=need_dx)
        return dx

    def _ensure_built(self, x):
        items = x if self.multi_input else [x]
        if self.multi_input and (not isinstance(x, (list, tuple)) or len(x) < 2):
            raise TypeError(f"layer {self.name!r} takes a list of at least two arrays")
        for i, a in enumerate(items):
            chk.check_array(a, f"x[{i}]" if self.multi_input else "x")
        shapes = [tuple(a.shape[1:]) for a in items]
        shape = shapes if self.multi_input else shapes[0]
        if not self.built:
            self.build(shape)
            # Weights start as float32 NumPy arrays; follow the input's library and dtype.
            first = items[0]
            for name in self.weight_names():
                value = self.get_weight(name)
                self.set_weight(name, _like(value, first, self.weight_dtype(name, first.dtype)))
        elif shape != self.input_shape:
            raise ValueError(
                f"layer {self.name!r} was built for per-sample shape {self.input_shape}, "
                f"got input of shape {tuple(items[0].shape) if not self.multi_input else shapes}"
            )

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class ProductLayer(Layer):
    """What Conv2D and Dense share: ``y = act(product(x, W) + b)`` with an optional bias, a
    ReLU that runs in the product's epilogue (given, or fused from a following ReLU layer), and
    weight penalties. Subclasses give the product and its backward (``_product``,
    ``_product_backward``), the shape of ``W`` and the twin's product module (``_torch_core``)."""

    torch_fresh = True
    _torch_transposed = None  # "T" where the twin stores W transposed (nn.Linear)

    def torch_module(self, torch, inplace=False):
        core = self._torch_core(torch)
        return torch.nn.Sequential(core, torch.nn.ReLU(inplace=True)) if self.activation else core

    def torch_weights(self, module) -> list:
        core = module[0] if self.activation else module
        out = [("W", core.weight, self._torch_transposed)]
        return out + ([("b", core.bias, None)] if self.use_bias else [])

    def _init_product(
        self, activation, use_bias, kernel_initializer, kernel_regularizer, bias_regularizer
    ) -> None:
        if activation not in chk.ACTIVATIONS:
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        self.activation = activation
        if not isinstance(use_bias, (bool, np.bool_)):
            raise TypeError(f"use_bias must be a bool, got {type(use_bias).__name__}")
        self.use_bias = bool(use_bias)
        self.kernel_initializer = initializers.check_kernel_initializer(kernel_initializer)
        if bias_regularizer is not None and not self.use_bias:
            raise ValueError("bias_regularizer needs use_bias=True")
        self._set_regularizers(W=kernel_regularizer, b=bias_regularizer)

    def _product_config(self) -> dict:
        return {
            "activation": self.activation,
            "use_bias": self.use_bias,
            "kernel_initializer": self.kernel_initializer,
            **self._regularizer_config(kernel_regularizer="W", bias_regularizer="b"),
            **Layer.get_config(self),
        }

    def _product_specs(self, w_shape, units) -> list:
        specs = [WeightSpec("W", tuple(w_shape), self.kernel_initializer)]
        if self.use_bias:
            specs.append(WeightSpec("b", (units,), "zeros"))
        return specs

    @property
    def fuses_relu(self) -> bool:
        """A following ReLU layer can run inside this layer's epilogue."""
        return self.activation is None

    def call(self, x, training=False, fuse_relu=False):
        act = "relu" if fuse_relu else self.activation
        y = self._product(x, self.params["W"], self.params.get("b"), act)
        if not training:
            return y, None
        return y, (x, y if act == "relu" else None)

    def call_backward(self, cache, dy, need_dx=True):
        x, y = cache
        return self._backward_through(x, y, dy, self.params["W"], need_dx)

    def _backward_through(self, x, y, dy, w, need_dx):
        """Gradients of the forward that ran ``x`` through weights ``w`` (``y``: its output
        when a ReLU was fused, else None)."""
        if y is not None:
            dy = self._relu_grad(dy, y)
        if not self.trainable and not need_dx:
            return None, {}
        dx, dw, db = self._product_backward(dy, x, w, need_dx)
        if not self.trainable:
            return dx, {}
        return dx, ({"W": dw, "b": db} if self.use_bias else {"W": dw})

    def _relu_grad(self, dy, y):
        return ops.relu_backward(dy, y)

    def _product(self, x, w, b, activation):
        raise NotImplementedError

    def _product_backward(self, dy, x, w, need_dx):
        raise NotImplementedError


def check_gradient(dy, shape, what: str) -> None:
    """An output gradient must be an array of the output's exact shape."""
    if not hasattr(dy, "shape") or not hasattr(dy, "dtype"):
        raise TypeError(f"{what} must be an array, got {type(dy).__name__}")
    if tuple(dy.shape) != tuple(shape):
        raise ValueError(f"{what} must have shape {tuple(shape)}, got {tuple(dy.shape)}")


def _like(value, x, dtype):
    """``value`` on ``x``'s array library, in ``dtype``."""
    return device_of(x).asarray(value, dtype)


def xp_of(x):
    """The array module of ``x`` (or of the first array of a list)."""
    return array_module(x[0] if isinstance(x, (list, tuple)) else x)
