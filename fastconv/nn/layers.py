"""Layers: each one wraps a public kernel and caches only what its backward pass needs.

Layer contract (shared with the profiler and the GPU backend): ``name``, ``kind``
("conv", "pool", "dense", "activation", "dropout", "reshape"), ``params`` / ``grads``
(``"W"``, ``"b"``; empty for stateless layers), ``built``; ``build(input_shape)`` runs on the
first ``forward`` (``input_shape`` excludes the batch dimension), ``output_shape(input_shape)``,
``forward(x, training=False)``, ``backward(dy)``. Array code goes through the array module of
the input, so the same layer runs on NumPy and CuPy arrays.
"""

from __future__ import annotations

import numbers

import numpy as np

from .. import _checks as chk
from .. import ops
from . import _dense, _relu, initializers
from ._xp import array_module

__all__ = [
    "Layer",
    "Conv2D",
    "MaxPool2D",
    "AvgPool2D",
    "Dense",
    "ReLU",
    "Dropout",
    "Flatten",
    "LAYER_CLASSES",
]


def _spatial_shape(input_shape, what):
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ValueError(
            f"{what} expects inputs of shape (N, C, H, W), got per-sample shape {shape}"
        )
    return shape


class Layer:
    """Base class. Subclasses set ``kind`` and implement ``forward``/``backward``."""

    kind = "layer"
    # True when ``backward(dy, need_dx=False)`` skips computing the input gradient (and
    # returns None): Sequential uses it on its first layer, whose input needs no gradient.
    can_skip_dx = False

    def __init__(self, name: str | None = None):
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        self.name = name or type(self).__name__.lower()
        self.params: dict = {}
        self.grads: dict = {}
        self.built = False
        self.input_shape: tuple | None = None
        # Set by Sequential so that initialisation and dropout follow the model's seed.
        self.rng: np.random.Generator | None = None

    # -- construction --------------------------------------------------------------------------
    def build(self, input_shape) -> None:
        """Create parameters for per-sample ``input_shape`` (batch dimension excluded)."""
        self.input_shape = tuple(int(s) for s in input_shape)
        self.output_shape(self.input_shape)  # validates
        self.built = True

    def output_shape(self, input_shape) -> tuple:
        return tuple(input_shape)

    def get_config(self) -> dict:
        """Constructor arguments, JSON-serialisable (used by checkpoints)."""
        return {"name": self.name}

    def _rng(self) -> np.random.Generator:
        if self.rng is None:
            self.rng = np.random.default_rng()
        return self.rng

    def _ensure_built(self, x):
        chk.check_array(x, "x")
        if not self.built:
            self.build(x.shape[1:])
            # Parameters are created as float32 NumPy arrays; follow the input's library/dtype.
            for key, value in self.params.items():
                self.params[key] = _like(value, x)
        elif tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"layer {self.name!r} was built for per-sample shape {self.input_shape}, "
                f"got input of shape {tuple(x.shape)}"
            )

    def forward(self, x, training: bool = False):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def _cached(self, value, what="forward(x, training=True)"):
        if value is None:
            raise RuntimeError(f"layer {self.name!r}: backward() needs a preceding {what}")
        return value

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _like(value, x):
    """``value`` on the same array library and dtype as ``x``."""
    if chk.is_cupy_array(x) and not chk.is_cupy_array(value):
        value = ops.to_gpu(value)
    elif not chk.is_cupy_array(x) and chk.is_cupy_array(value):
        value = ops.to_cpu(value)
    return value if value.dtype == x.dtype else value.astype(x.dtype)


def _relu_mask_grad(dy, y, out=None):
    """dy * (y > 0): the ReLU gradient seen through its output (a NaN in dy propagates).

    NumPy arrays of one shape and dtype go through a Numba kernel (``_relu``) when there is an
    ``out`` buffer to reuse, or in float16, which NumPy computes in software; otherwise a
    multiply by the boolean mask (~15x faster than ``where`` with a scalar).
    """
    same = dy.shape == y.shape and dy.dtype == y.dtype and not chk.is_cupy_array(dy)
    if same and (out is not None or dy.dtype == np.float16):
        return _relu.relu_mask_grad(dy, y, out=out)
    return dy * (y > 0)


class Conv2D(Layer):
    """2-D convolution; ``activation="relu"`` is fused into the kernel epilogue.

    Parameters
    ----------
    filters : int
    kernel_size : int or (int, int)
    stride, padding : int or (int, int)
    activation : None or "relu"
    kernel_initializer : str
        One of ``he_normal`` (default), ``he_uniform``, ``glorot_normal``, ``glorot_uniform``.
        Biases start at zero.
    """

    kind = "conv"
    can_skip_dx = True

    def __init__(
        self,
        filters,
        kernel_size,
        stride=1,
        padding=0,
        activation=None,
        kernel_initializer="he_normal",
        name=None,
    ):
        super().__init__(name)
        self.filters = chk.as_int(filters, "filters", 1)
        self.kernel_size = chk.as_pair(kernel_size, "kernel_size", 1)
        self.stride = chk.as_pair(stride, "stride", 1)
        self.padding = chk.as_pair(padding, "padding", 0)
        if activation not in chk.ACTIVATIONS:
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        self.activation = activation
        initializers.get(kernel_initializer)
        self.kernel_initializer = kernel_initializer
        self._x = None
        self._y = None

    def get_config(self):
        return {
            "filters": self.filters,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "activation": self.activation,
            "kernel_initializer": self.kernel_initializer,
            "name": self.name,
        }

    def output_shape(self, input_shape):
        C, H, W = _spatial_shape(input_shape, "Conv2D")
        g = chk.window_geometry((1, C, H, W), self.kernel_size, self.stride, self.padding)
        return (self.filters, g.OH, g.OW)

    def build(self, input_shape):
        super().build(input_shape)
        C = self.input_shape[0]
        init = initializers.get(self.kernel_initializer)
        self.params = {
            "W": init((self.filters, C, *self.kernel_size), self._rng()),
            "b": np.zeros(self.filters, dtype=np.float32),
        }
        self.grads = {}

    def forward(self, x, training=False):
        self._ensure_built(x)
        y = ops.conv2d(
            x, self.params["W"], self.params["b"], self.stride, self.padding, self.activation
        )
        # Inference keeps no references, so predict() does not pin activations in memory.
        self._x = x if training else None
        self._y = y if (training and self.activation == "relu") else None
        return y

    def backward(self, dy, need_dx=True):
        """Gradients into ``grads``; returns dx, or None (not computed) if ``need_dx`` is False."""
        x = self._cached(self._x)
        if self.activation == "relu":
            dy = self._masked(dy, self._cached(self._y))
        dx, dw, db = ops.conv2d_backward(
            dy, x, self.params["W"], self.stride, self.padding, need_dx=need_dx
        )
        self.grads = {"W": dw, "b": db}
        self._x = self._y = None
        return dx

    def _masked(self, dy, y):
        """The fused ReLU's gradient. On the CPU it goes into a buffer kept from step to step:
        conv2d_backward only reads it, and a fresh array per step cost page faults (~10% of a
        deep-MNIST training step across the six layers)."""
        if chk.is_cupy_array(dy):
            return _relu_mask_grad(dy, y)
        buffer = getattr(self, "_dy_buffer", None)
        if buffer is None or buffer.shape != dy.shape or buffer.dtype != dy.dtype:
            buffer = self._dy_buffer = np.empty(dy.shape, dy.dtype)
        return _relu_mask_grad(dy, y, out=buffer)


class _Pool2D(Layer):
    kind = "pool"

    def __init__(self, size=2, stride=None, padding=0, name=None):
        super().__init__(name)
        self.size = chk.as_pair(size, "size", 1)
        self.stride = self.size if stride is None else chk.as_pair(stride, "stride", 1)
        self.padding = chk.as_pair(padding, "padding", 0)
        self._x = None

    def get_config(self):
        return {
            "size": list(self.size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "name": self.name,
        }

    def output_shape(self, input_shape):
        C, H, W = _spatial_shape(input_shape, type(self).__name__)
        g = chk.validate_pool(
            np.empty((1, C, H, W), np.float32),
            self.size,
            self.stride,
            self.padding,
            max_pool=isinstance(self, MaxPool2D),
        )
        return (C, g.OH, g.OW)


class MaxPool2D(_Pool2D):
    """Max pooling (stride defaults to ``size``; padding never wins the max)."""

    def forward(self, x, training=False):
        self._ensure_built(x)
        self._x = x if training else None
        return ops.max_pool2d(x, self.size, self.stride, self.padding)

    def backward(self, dy):
        x = self._cached(self._x)
        self._x = None
        return ops.max_pool2d_backward(dy, x, self.size, self.stride, self.padding)


class AvgPool2D(_Pool2D):
    """Average pooling (zero padding counts in the divisor)."""

    def forward(self, x, training=False):
        self._ensure_built(x)
        self._x = tuple(x.shape) if training else None
        return ops.avg_pool2d(x, self.size, self.stride, self.padding)

    def backward(self, dy):
        shape = self._cached(self._x)
        self._x = None
        return ops.avg_pool2d_backward(dy, shape, self.size, self.stride, self.padding)


class Dense(Layer):
    """Fully connected layer ``y = x @ W + b`` with ``W`` of shape ``(in, out)``.

    Inputs must be ``(N, in)``; put a :class:`Flatten` after convolutional layers. On the CPU
    the products run as Numba kernels on the same thread pool as the convolutions (float16 is
    computed in float32 and rounded back); on the GPU they are CuPy matmuls.
    """

    kind = "dense"

    def __init__(self, units, kernel_initializer="he_normal", name=None):
        super().__init__(name)
        self.units = chk.as_int(units, "units", 1)
        initializers.get(kernel_initializer)
        self.kernel_initializer = kernel_initializer
        self._x = None

    def get_config(self):
        return {
            "units": self.units,
            "kernel_initializer": self.kernel_initializer,
            "name": self.name,
        }

    def output_shape(self, input_shape):
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 1:
            raise ValueError(
                f"Dense expects inputs of shape (N, features), got per-sample shape {shape}; "
                "add a Flatten layer before it"
            )
        return (self.units,)

    def build(self, input_shape):
        super().build(input_shape)
        init = initializers.get(self.kernel_initializer)
        self.params = {
            "W": init((self.input_shape[0], self.units), self._rng()),
            "b": np.zeros(self.units, dtype=np.float32),
        }
        self.grads = {}

    def forward(self, x, training=False):
        self._ensure_built(x)
        if x.ndim != 2:
            raise ValueError(f"Dense expects a 2-D input (N, features), got shape {tuple(x.shape)}")
        self._x = x if training else None
        W, b = self.params["W"], self.params["b"]
        if chk.is_cupy_array(x):
            y = x @ W
            y += b
            return y
        x32, W32, b32 = (_f32c(a) for a in (x, W, b))
        return _dense.dense_forward(x32, W32, b32).astype(x.dtype, copy=False)

    def backward(self, dy):
        x = self._cached(self._x)
        self._x = None
        W = self.params["W"]
        chk.check_array(dy, "dy", 2)
        chk.check_same_kind("x", x, dy=dy)
        chk.check_shape(dy, "dy", (x.shape[0], self.units))
        db = dy.sum(axis=0, dtype=np.float32).astype(dy.dtype, copy=False)
        if chk.is_cupy_array(x):
            self.grads = {"W": x.T @ dy, "b": db}
            return dy @ W.T
        x32, dy32, W32 = (_f32c(a) for a in (x, dy, W))
        self.grads = {
            "W": _dense.dense_grad_w(x32, dy32).astype(dy.dtype, copy=False),
            "b": db,
        }
        return _dense.dense_grad_x(dy32, W32).astype(dy.dtype, copy=False)


def _f32c(a):
    """C-contiguous float32 (float16 Dense math runs in float32: the products are small)."""
    return np.ascontiguousarray(a, dtype=np.float32)


class ReLU(Layer):
    """max(x, 0); NaN propagates."""

    kind = "activation"

    def __init__(self, name=None):
        super().__init__(name)
        self._y = None

    def forward(self, x, training=False):
        self._ensure_built(x)
        xp = array_module(x)
        y = xp.maximum(x, xp.zeros((), dtype=x.dtype))
        self._y = y if training else None
        return y

    def backward(self, dy):
        y = self._cached(self._y)
        self._y = None
        return _relu_mask_grad(dy, y)


class Dropout(Layer):
    """Inverted dropout: in training, zero each unit with probability ``rate`` and scale the
    survivors by ``1/(1-rate)``; at inference it is the identity (the book instead scales at
    test time; the expected outputs are the same)."""

    kind = "dropout"

    def __init__(self, rate=0.5, name=None):
        super().__init__(name)
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
            raise ValueError(f"rate must be a number in [0, 1), got {rate!r}")
        self.rate = float(rate)
        self._mask = None

    def get_config(self):
        return {"rate": self.rate, "name": self.name}

    def forward(self, x, training=False):
        self._ensure_built(x)
        if not training or self.rate == 0.0:
            self._mask = None
            return x
        xp = array_module(x)
        if xp is np:
            u = self._rng().random(x.shape, dtype=np.float32)
        else:
            u = xp.random.random(x.shape, dtype=np.float32)
        keep = np.float32(1.0 - self.rate)
        self._mask = (u < keep).astype(x.dtype) * x.dtype.type(1.0 / keep)
        return x * self._mask

    def backward(self, dy):
        if self._mask is None:
            if self.rate == 0.0:
                return dy
            self._cached(None)
        mask, self._mask = self._mask, None
        return dy * mask


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W), in C order (as the book's Affine layer)."""

    kind = "reshape"

    def __init__(self, name=None):
        super().__init__(name)
        self._shape = None

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape, dtype=np.int64)),)

    def forward(self, x, training=False):
        self._ensure_built(x)
        self._shape = tuple(x.shape) if training else None
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        shape = self._cached(self._shape)
        self._shape = None
        return dy.reshape(shape)


LAYER_CLASSES = {
    cls.__name__: cls for cls in (Conv2D, MaxPool2D, AvgPool2D, Dense, ReLU, Dropout, Flatten)
}
