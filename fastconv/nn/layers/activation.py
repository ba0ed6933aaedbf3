"""Activation layers: ReLU and LeakyReLU (kernels), ReLU6 (the ReLU kernel and a clip), Sigmoid,
Tanh and Softmax (array code, float32 math)."""

from __future__ import annotations

import numpy as np

from ... import _checks as chk
from ... import ops
from .base import Layer, register_layer, xp_of

__all__ = ["ReLU", "ReLU6", "LeakyReLU", "Sigmoid", "Tanh", "Softmax"]


class _Activation(Layer):
    kind = "activation"
    shareable = True
    torch_fresh = True


def _f32(x):
    return x if x.dtype == np.float32 else x.astype(np.float32)


@register_layer
class ReLU(_Activation):
    """``max(x, 0)``; NaN propagates. A Conv2D, Dense or BatchNorm before it (its only input,
    without activation) runs it in its own epilogue when the model fuses."""

    epilogue = "relu"

    def call(self, x, training=False):
        y = ops.relu(x)
        return y, (y if training else None)

    def call_backward(self, cache, dy, need_dx=True):
        return ops.relu_backward(dy, cache), {}

    def torch_module(self, torch, inplace=False):
        return torch.nn.ReLU(inplace=inplace)


@register_layer
class ReLU6(_Activation):
    """``min(max(x, 0), 6)`` (MobileNet's activation; PyTorch's ``nn.ReLU6``); NaN propagates.

    The gradient passes where ``0 < x < 6`` and is zero elsewhere (at both kinks and for a
    NaN input too, as PyTorch's hardtanh on a whole tensor). One pass of the
    :func:`fastconv.clip` kernel each way in training; at inference it runs in the epilogue
    of a preceding convolution's prepared or BatchNorm-folded path (the same bits).
    """

    epilogue = "relu6"

    def call(self, x, training=False):
        return ops.clip(x, 0.0, 6.0), (x if training else None)

    def call_backward(self, cache, dy, need_dx=True):
        return ops.clip_backward(dy, cache, 0.0, 6.0), {}

    def torch_module(self, torch, inplace=False):
        return torch.nn.ReLU6(inplace=inplace)


@register_layer
class LeakyReLU(_Activation):
    """``x`` where ``x > 0``, else ``alpha * x`` (Keras's LeakyReLU, default slope 0.3);
    the gradient goes through the input, as PyTorch's ``nn.LeakyReLU``."""

    def __init__(self, alpha=0.3, name=None, trainable=True):
        super().__init__(name, trainable)
        chk.as_finite_float32(alpha, "alpha")
        self.alpha = float(alpha)

    def get_config(self):
        return {"alpha": self.alpha, **super().get_config()}

    def call(self, x, training=False):
        return ops.leaky_relu(x, self.alpha), (x if training else None)

    def call_backward(self, cache, dy, need_dx=True):
        return ops.leaky_relu_backward(dy, cache, self.alpha), {}

    def torch_module(self, torch, inplace=False):
        # The gradient needs the input, which an in-place twin would overwrite.
        return torch.nn.LeakyReLU(self.alpha)


@register_layer
class Sigmoid(_Activation):
    """``1 / (1 + exp(-x))``, computed without overflow for large ``|x|``."""

    def call(self, x, training=False):
        xp = xp_of(x)
        x32 = _f32(x)
        e = xp.exp(-xp.abs(x32))  # in (0, 1]: never overflows
        y = xp.where(x32 >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        y = xp.where(xp.isnan(x32), x32, y).astype(x.dtype)  # NaN stays NaN
        return y, (y if training else None)

    def call_backward(self, cache, dy, need_dx=True):
        y = _f32(cache)
        return (_f32(dy) * y * (1.0 - y)).astype(dy.dtype), {}

    def torch_module(self, torch, inplace=False):
        return torch.nn.Sigmoid()


@register_layer
class Tanh(_Activation):
    """``tanh(x)``."""

    def call(self, x, training=False):
        y = xp_of(x).tanh(_f32(x)).astype(x.dtype)
        return y, (y if training else None)

    def call_backward(self, cache, dy, need_dx=True):
        y = _f32(cache)
        return (_f32(dy) * (1.0 - y * y)).astype(dy.dtype), {}

    def torch_module(self, torch, inplace=False):
        return torch.nn.Tanh()


@register_layer
class Softmax(_Activation):
    """Softmax over the feature axis (axis 1 of ``(N, features)``), max-shifted for stability.

    For classification, train on the scores with the ``softmax_cross_entropy`` loss (more
    accurate and cheaper); this layer is for models that must output probabilities.
    """

    def output_shape(self, input_shape):
        shape = tuple(int(s) for s in input_shape)
        if len(shape) < 1:
            raise ValueError(f"Softmax {self.name!r} needs inputs of shape (N, features, ...)")
        return shape

    def call(self, x, training=False):
        xp = xp_of(x)
        s = _f32(x)
        s = s - s.max(axis=1, keepdims=True)
        e = xp.exp(s)
        y = (e / e.sum(axis=1, keepdims=True)).astype(x.dtype)
        return y, (y if training else None)

    def call_backward(self, cache, dy, need_dx=True):
        y, g = _f32(cache), _f32(dy)
        return (y * (g - (g * y).sum(axis=1, keepdims=True))).astype(dy.dtype), {}

    def torch_module(self, torch, inplace=False):
        return torch.nn.Softmax(dim=1)
