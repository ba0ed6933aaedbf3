"""Pooling layers: max and average over windows, and global average pooling."""

from __future__ import annotations

import numpy as np

from ... import _checks as chk
from ... import ops
from .base import Layer, register_layer
from .conv import spatial_shape

__all__ = ["MaxPool2D", "AvgPool2D", "GlobalAveragePooling2D"]


class _Pool2D(Layer):
    kind = "pool"
    shareable = True
    _max = False

    def __init__(self, size=2, stride=None, padding=0, name=None, trainable=True):
        super().__init__(name, trainable)
        self.size = chk.as_pair(size, "size", 1)
        self.stride = self.size if stride is None else chk.as_pair(stride, "stride", 1)
        self.padding = chk.as_pair(padding, "padding", 0)

    def get_config(self):
        return {
            "size": list(self.size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            **super().get_config(),
        }

    def output_shape(self, input_shape):
        C, H, W = spatial_shape(input_shape, self)
        # A zero-strided view stands for one sample: validation without allocating it.
        sample = np.broadcast_to(np.float32(0), (1, C, H, W))
        try:
            g = chk.validate_pool(sample, self.size, self.stride, self.padding, self._max)
        except ValueError as e:
            what = f"{type(self).__name__} {self.name!r} on input {(C, H, W)}"
            raise ValueError(f"{what}: {e}") from None
        return (C, g.OH, g.OW)


@register_layer
class MaxPool2D(_Pool2D):
    """Max pooling; ``stride`` defaults to ``size``; padding never wins the max."""

    _max = True

    def call(self, x, training=False):
        y = ops.max_pool2d(x, self.size, self.stride, self.padding)
        return y, (x if training else None)

    def call_backward(self, cache, dy, need_dx=True):
        return ops.max_pool2d_backward(dy, cache, self.size, self.stride, self.padding), {}


@register_layer
class AvgPool2D(_Pool2D):
    """Average pooling; zero padding counts in the divisor (PyTorch's default)."""

    def call(self, x, training=False):
        y = ops.avg_pool2d(x, self.size, self.stride, self.padding)
        return y, (tuple(x.shape) if training else None)

    def call_backward(self, cache, dy, need_dx=True):
        return ops.avg_pool2d_backward(dy, cache, self.size, self.stride, self.padding), {}


@register_layer
class GlobalAveragePooling2D(Layer):
    """Mean over the spatial axes: ``(N, C, H, W) -> (N, C)``, for any ``H, W``."""

    kind = "pool"
    shareable = True

    def output_shape(self, input_shape):
        C, _, _ = spatial_shape(input_shape, self)
        return (C,)

    def call(self, x, training=False):
        return ops.global_avg_pool2d(x), (tuple(x.shape) if training else None)

    def call_backward(self, cache, dy, need_dx=True):
        return ops.global_avg_pool2d_backward(dy, cache), {}
