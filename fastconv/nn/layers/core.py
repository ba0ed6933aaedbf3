"""Dense, Dropout and Flatten."""

from __future__ import annotations

import numbers

import numpy as np

from ... import _checks as chk
from ... import ops
from .. import initializers
from ..backend import random_uniform
from .base import Layer, WeightSpec, register_layer

__all__ = ["Dense", "DropConnectDense", "Dropout", "Flatten"]


@register_layer
class Dense(Layer):
    """Fully connected layer ``y = x @ W + b``, ``W`` of shape ``(in, out)`` as Keras.

    Inputs are ``(N, in)``: put a :class:`Flatten` after convolutional layers. ``activation``
    "relu" is fused into the product's epilogue. ``kernel_regularizer``/``bias_regularizer``
    add weight penalties to the training loss (:mod:`fastconv.nn.regularizers`).
    """

    kind = "dense"

    def __init__(
        self,
        units,
        activation=None,
        use_bias=True,
        kernel_initializer="he_normal",
        name=None,
        trainable=True,
        kernel_regularizer=None,
        bias_regularizer=None,
    ):
        super().__init__(name, trainable)
        self.units = chk.as_int(units, "units", 1)
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

    def get_config(self):
        return {
            "units": self.units,
            "activation": self.activation,
            "use_bias": self.use_bias,
            "kernel_initializer": self.kernel_initializer,
            **self._regularizer_config(kernel_regularizer="W", bias_regularizer="b"),
            **super().get_config(),
        }

    def output_shape(self, input_shape):
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 1:
            raise ValueError(
                f"Dense {self.name!r} expects inputs of shape (N, features), got per-sample "
                f"shape {shape}; add a Flatten layer before it"
            )
        return (self.units,)

    def weight_specs(self, input_shape):
        specs = [WeightSpec("W", (int(input_shape[0]), self.units), self.kernel_initializer)]
        if self.use_bias:
            specs.append(WeightSpec("b", (self.units,), "zeros"))
        return specs

    @property
    def fuses_relu(self) -> bool:
        """A following ReLU layer can run inside this layer's epilogue."""
        return self.activation is None

    def call(self, x, training=False, fuse_relu=False):
        act = "relu" if fuse_relu else self.activation
        y = ops.dense(x, self.params["W"], self.params.get("b"), act)
        if not training:
            return y, None
        return y, (x, y if act == "relu" else None)

    def call_backward(self, cache, dy, need_dx=True):
        x, y = cache
        if y is not None:
            dy = ops.relu_backward(dy, y)
        if not self.trainable and not need_dx:
            return None, {}
        dx, dw, db = ops.dense_backward(dy, x, self.params["W"], need_dx=need_dx)
        if not self.trainable:
            return dx, {}
        return dx, ({"W": dw, "b": db} if self.use_bias else {"W": dw})


@register_layer
class DropConnectDense(Dense):
    """Dense layer with DropConnect (Wan et al., 2013): in training each weight of ``W`` is
    dropped with probability ``rate`` and the survivors scaled by ``1/(1-rate)``; at inference
    the full ``W`` (the mean network). One mask per mini-batch, shared by its samples (the
    paper draws one per sample, a (N, in, out) tensor); the bias is never dropped. The mask
    follows the model's seed.
    """

    def __init__(self, units, rate=0.5, **kwargs):
        super().__init__(units, **kwargs)
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
            raise ValueError(f"rate must be a number in [0, 1), got {rate!r}")
        self.rate = float(rate)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}

    def call(self, x, training=False, fuse_relu=False):
        if not training or self.rate == 0.0:
            y, cache = super().call(x, training, fuse_relu)
            return y, (None if cache is None else (*cache, None))
        act = "relu" if fuse_relu else self.activation
        w = self.params["W"]
        keep = np.float32(1.0 - self.rate)
        u = random_uniform(self._rng(), w.shape, like=w)
        mask = (u < keep).astype(w.dtype) * w.dtype.type(1.0 / keep)
        w_used = w * mask
        y = ops.dense(x, w_used, self.params.get("b"), act)
        return y, (x, y if act == "relu" else None, (w_used, mask))

    def call_backward(self, cache, dy, need_dx=True):
        x, y, dropped = cache
        if dropped is None:
            return super().call_backward((x, y), dy, need_dx)
        w_used, mask = dropped
        if y is not None:
            dy = ops.relu_backward(dy, y)
        if not self.trainable and not need_dx:
            return None, {}
        dx, dw, db = ops.dense_backward(dy, x, w_used, need_dx=need_dx)
        if not self.trainable:
            return dx, {}
        dw = dw * mask  # d(W * mask)/dW: dropped weights get no gradient
        return dx, ({"W": dw, "b": db} if self.use_bias else {"W": dw})


@register_layer
class Dropout(Layer):
    """Inverted dropout: in training, zero each unit with probability ``rate`` and scale the
    survivors by ``1/(1-rate)``; at inference the identity (the book scales at test time
    instead; the expected outputs are the same). The mask follows the model's seed."""

    kind = "dropout"

    def __init__(self, rate=0.5, name=None, trainable=True):
        super().__init__(name, trainable)
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
            raise ValueError(f"rate must be a number in [0, 1), got {rate!r}")
        self.rate = float(rate)

    def get_config(self):
        return {"rate": self.rate, **super().get_config()}

    def call(self, x, training=False):
        if not training or self.rate == 0.0:
            return x, None
        keep = np.float32(1.0 - self.rate)
        u = random_uniform(self._rng(), x.shape, like=x)
        mask = (u < keep).astype(x.dtype) * x.dtype.type(1.0 / keep)
        return x * mask, mask

    def call_backward(self, cache, dy, need_dx=True):
        return (dy if cache is None else dy * cache), {}


@register_layer
class Flatten(Layer):
    """``(N, C, H, W) -> (N, C*H*W)`` in C order (as the book's Affine layer)."""

    kind = "reshape"
    shareable = True

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape, dtype=np.int64)),)

    def call(self, x, training=False):
        return x.reshape(x.shape[0], -1), (tuple(x.shape) if training else None)

    def call_backward(self, cache, dy, need_dx=True):
        return dy.reshape(cache), {}
