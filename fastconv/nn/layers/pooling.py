"""Pooling layers: max and average over windows, and global average pooling."""

from __future__ import annotations

import numpy as np

from ... import _checks as chk
from ... import ops
from ...prepared import prepare_max_pool2d
from ._torch_parts import torch_parts
from .base import Layer, register_layer
from .conv import _padding, four_pads, same_pads, spatial_shape

__all__ = ["MaxPool2D", "AvgPool2D", "GlobalAveragePooling2D"]


class _Pool2D(Layer):
    kind = "pool"
    shareable = True
    torch_fresh = True
    _max = False
    count_include_pad = True  # AvgPool2D's may differ

    def __init__(self, size=2, stride=None, padding=0, name=None, trainable=True, ceil_mode=False):
        super().__init__(name, trainable)
        self.size = chk.as_pair(size, "size", 1)
        self.stride = self.size if stride is None else chk.as_pair(stride, "stride", 1)
        self.padding_arg = padding if isinstance(padding, str) else None
        self.padding = _padding(padding)
        self.ceil_mode = chk.check_ceil_mode(ceil_mode)
        if self.ceil_mode and self.padding_arg == "same":
            # "same" fixes the output size at ceil(H / stride): a ceil mode would contradict it.
            raise ValueError("ceil_mode must be False with padding='same'")

    def get_config(self):
        config = {
            "size": list(self.size),
            "stride": list(self.stride),
            "padding": self.padding_arg or list(self.padding),
            **super().get_config(),
        }
        if self.ceil_mode:  # absent when False: configs written before ceil_mode stay the same
            config["ceil_mode"] = True
        return config

    @property
    def pads(self) -> tuple:
        """``(top, bottom, left, right)``."""
        return four_pads(self.padding)

    def output_shape(self, input_shape):
        C, H, W = spatial_shape(input_shape, self)
        if self.padding_arg == "same":
            self.padding = same_pads((H, W), self.size, self.stride)
        try:  # the kernels' own checks, on the shape of one sample
            _, _, g = chk.pool_pads((1, C, H, W), self.size, self.stride, self.padding,
                                    self._max, self.ceil_mode, self.count_include_pad)  # fmt: skip
        except ValueError as e:
            what = f"{type(self).__name__} {self.name!r} on input {(C, H, W)}"
            raise ValueError(f"{what}: {e}") from None
        return (C, g.OH, g.OW)

    def _torch_pad(self, torch, value):
        """The twin's module padding the input by :attr:`pads` with ``value``."""
        return torch_parts(torch).Pad(self.pads, value)


@register_layer
class MaxPool2D(_Pool2D):
    """Max pooling; ``stride`` defaults to ``size``; padding never wins the max.

    ``padding``: int, ``(h, w)``, ``(top, bottom, left, right)``, "valid" or "same" (Keras's:
    ``ceil(H / stride)`` rows and columns out, the odd padding pixel at the bottom/right).
    ``ceil_mode=True`` rounds the output size up (PyTorch's ``ceil_mode``), the last window
    running past the bottom/right edge being clipped there: GoogLeNet's stride-2 pools need it
    (56x56 -> 28x28 with a 3x3/2 window, where floor gives 27x27).
    """

    _max = True
    prepares = True  # fastconv.prepared.prepare_max_pool2d: validated once per input shape

    def call(self, x, training=False):
        y = ops.max_pool2d(x, self.size, self.stride, self.padding, self.ceil_mode)
        return y, (x if training else None)

    def call_prepared(self, x, folded, fuse_relu, residual=None):
        # (No weights, nothing to fold or fuse: the plan gives None, False, None.)
        args = (self.size, self.stride, self.padding, self.ceil_mode)
        cached = self._prepared
        if cached is None or cached[0] != args:  # (padding="same" is set when built)
            cached = self._prepared = (args, prepare_max_pool2d(*args))
        return cached[1](x)

    def call_backward(self, cache, dy, need_dx=True):
        args = (self.size, self.stride, self.padding, self.ceil_mode)
        return ops.max_pool2d_backward(dy, cache, *args), {}

    def torch_module(self, torch, inplace=False):
        if len(self.padding) == 2:
            return torch.nn.MaxPool2d(self.size, self.stride, self.padding,
                                      ceil_mode=self.ceil_mode)  # fmt: skip
        # Asymmetric: pad with -inf (never the max), then pool without padding.
        pool = torch.nn.MaxPool2d(self.size, self.stride, 0, ceil_mode=self.ceil_mode)
        return torch.nn.Sequential(self._torch_pad(torch, float("-inf")), pool)


@register_layer
class MaxPool2DCeil(MaxPool2D):
    """``MaxPool2D(..., ceil_mode=True)`` under the name the zoo used before ``ceil_mode``, so
    checkpoints that name it still load."""

    def __init__(self, size=2, stride=None, padding=0, name=None, trainable=True, ceil_mode=True):
        if ceil_mode is not True:
            raise ValueError("MaxPool2DCeil has ceil_mode=True; use MaxPool2D otherwise")
        super().__init__(size, stride, padding, name, trainable, ceil_mode=True)


@register_layer
class AvgPool2D(_Pool2D):
    """Average pooling; ``padding`` and ``ceil_mode`` as :class:`MaxPool2D`'s (a window running
    past the padded input divides by its cells inside it, as PyTorch's).

    ``count_include_pad``: whether zero padding counts in the divisor. None (the default)
    means True for a numeric padding (PyTorch's default) and False for ``padding="same"``
    (Keras's, which averages over the input cells of each window only).
    """

    def __init__(
        self,
        size=2,
        stride=None,
        padding=0,
        name=None,
        trainable=True,
        ceil_mode=False,
        count_include_pad=None,
    ):
        super().__init__(size, stride, padding, name, trainable, ceil_mode)
        if count_include_pad is not None and not isinstance(count_include_pad, (bool, np.bool_)):
            raise TypeError(
                f"count_include_pad must be None or a bool, got {type(count_include_pad).__name__}"
            )
        self.count_include_pad_arg = None if count_include_pad is None else bool(count_include_pad)

    @property
    def count_include_pad(self) -> bool:
        """Whether the padding counts in the divisor (see the class docstring)."""
        if self.count_include_pad_arg is not None:
            return self.count_include_pad_arg
        return self.padding_arg != "same"

    def get_config(self):
        config = super().get_config()
        if self.count_include_pad_arg is not None:  # absent by default: older configs stay
            config["count_include_pad"] = self.count_include_pad_arg
        return config

    def _kwargs(self) -> dict:
        # Passed only when not the default, which every kernel takes.
        return {} if self.count_include_pad else {"count_include_pad": False}

    def call(self, x, training=False):
        y = ops.avg_pool2d(x, self.size, self.stride, self.padding, self.ceil_mode,
                           **self._kwargs())  # fmt: skip
        return y, (tuple(x.shape) if training else None)

    def call_backward(self, cache, dy, need_dx=True):
        args = (self.size, self.stride, self.padding, self.ceil_mode)
        return ops.avg_pool2d_backward(dy, cache, *args, **self._kwargs()), {}

    def torch_module(self, torch, inplace=False):
        include = self.count_include_pad
        if len(self.padding) == 2:
            return torch.nn.AvgPool2d(self.size, self.stride, self.padding, self.ceil_mode,
                                      count_include_pad=include)  # fmt: skip
        if include:  # asymmetric zero padding, then pool without padding
            pool = torch.nn.AvgPool2d(self.size, self.stride, 0, ceil_mode=self.ceil_mode)
            return torch.nn.Sequential(self._torch_pad(torch, 0.0), pool)
        return torch_parts(torch).AvgPoolOverInput(self.size, self.stride, self.pads,
                                                   self.ceil_mode)  # fmt: skip


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

    torch_fresh = True

    def torch_module(self, torch, inplace=False):
        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
