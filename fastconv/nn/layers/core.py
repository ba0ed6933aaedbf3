"""Dense, Dropout and Flatten."""

from __future__ import annotations

import math
import numbers

from ... import _checks as chk
from ... import ops
from ...prepared import prepare_dense
from ..backend import DropoutMask
from ..graph import MAX_ELEMENTS
from .base import Layer, ProductLayer, register_layer

__all__ = ["Dense", "DropConnectDense", "Dropout", "Flatten"]


@register_layer
class Dense(ProductLayer):
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
        self._init_product(
            activation, use_bias, kernel_initializer, kernel_regularizer, bias_regularizer
        )

    def get_config(self):
        return {
            "units": self.units,
            **self._product_config(),
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
        return self._product_specs((int(input_shape[0]), self.units), self.units)

    _torch_transposed = "T"  # nn.Linear keeps W as (out, in)

    def _torch_core(self, torch):
        n_in, n_out = self.declared_shape("W")
        return torch.nn.Linear(n_in, n_out, bias=self.use_bias)

    def _product(self, x, w, b, activation):
        return ops.dense(x, w, b, activation)

    prepares = True  # fastconv.prepared.prepare_dense: weights packed once per version

    def prepared_weights(self):
        """The :class:`~fastconv.prepared.PreparedDense` of this layer, made once per weights
        version (a copy: an optimizer may write the layer's arrays in place)."""
        key = self._weights_version
        cached = self._prepared
        if cached is not None and cached[0] == key:
            return cached[1]
        prepared = prepare_dense(self.params["W"], self.params.get("b"))
        self._prepared = (key, prepared)
        return prepared

    def call_prepared(self, x, folded, fuse_relu, residual=None):
        act = "relu" if fuse_relu or self.activation == "relu" else None
        return self.prepared_weights()(x, act, residual)

    def _product_backward(self, dy, x, w, need_dx):
        return ops.dense_backward(dy, x, w, need_dx=need_dx)


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
        mask = DropoutMask(self._rng(), w.shape, w, self.rate)
        w_used = mask.apply(w)
        y = self._product(x, w_used, self.params.get("b"), act)
        return y, (x, y if act == "relu" else None, (w_used, mask))

    def call_backward(self, cache, dy, need_dx=True):
        x, y, dropped = cache
        if dropped is None:
            return super().call_backward((x, y), dy, need_dx)
        w_used, mask = dropped
        dx, grads = self._backward_through(x, y, dy, w_used, need_dx)
        if "W" in grads:
            grads["W"] = mask.apply(grads["W"])  # d(W * mask)/dW: dropped weights get none
        return dx, grads


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
        mask = DropoutMask(self._rng(), x.shape, x, self.rate)
        return mask.apply(x), mask

    def call_backward(self, cache, dy, need_dx=True):
        return (dy if cache is None else cache.apply(dy)), {}

    def torch_module(self, torch, inplace=False):
        return torch.nn.Dropout(self.rate)


@register_layer
class Flatten(Layer):
    """``(N, C, H, W) -> (N, C*H*W)`` in C order (as the book's Affine layer)."""

    kind = "reshape"
    shareable = True

    def output_shape(self, input_shape):
        # Python ints: np.prod wrapped around to a negative size for (3, 2**31, 2**31).
        size = math.prod(int(s) for s in input_shape)
        if size > MAX_ELEMENTS:
            raise ValueError(
                f"Flatten {self.name!r}: per-sample shape {tuple(input_shape)} has {size:,} "
                f"elements, more than an array can hold ({MAX_ELEMENTS:,})"
            )
        return (size,)

    def call(self, x, training=False):
        return x.reshape(x.shape[0], -1), (tuple(x.shape) if training else None)

    def call_backward(self, cache, dy, need_dx=True):
        return dy.reshape(cache), {}

    def torch_module(self, torch, inplace=False):
        return torch.nn.Flatten()
