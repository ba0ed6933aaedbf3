"""Conv2D: the convolution layer, with bias and ReLU fused into the kernel's epilogue."""

from __future__ import annotations

import numpy as np

from ... import _checks as chk
from ... import ops
from .. import initializers
from ..backend import array_module
from .base import Layer, WeightSpec, register_layer

__all__ = ["Conv2D", "spatial_shape"]


def spatial_shape(input_shape, layer) -> tuple:
    """A per-sample ``(C, H, W)`` shape, or a ValueError naming the layer."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ValueError(
            f"{type(layer).__name__} {layer.name!r} expects inputs of shape (N, C, H, W), got "
            f"per-sample shape {shape}"
        )
    return shape


def _padding(padding, kernel_size):
    """int, (h, w), "valid" (0) or "same" (odd kernels: output size ceil(input / stride))."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if kernel_size[0] % 2 == 0 or kernel_size[1] % 2 == 0:
            raise ValueError(
                f"padding='same' needs an odd kernel_size (symmetric padding), got {kernel_size}"
            )
        return (kernel_size[0] // 2, kernel_size[1] // 2)
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    return chk.as_pair(padding, "padding", 0)


@register_layer
class Conv2D(Layer):
    """2-D convolution (cross-correlation), NCHW, weights ``W (filters, in, kh, kw)`` as PyTorch.

    Parameters
    ----------
    filters : int
    kernel_size : int or (int, int)
    stride : int or (int, int)
    padding : int, (int, int), "valid" or "same"
        "same" (odd kernels) keeps ``ceil(H / stride)`` rows and columns.
    activation : None or "relu"
        Fused into the kernel's epilogue (one pass over the output).
    use_bias : bool
        False for a convolution followed by BatchNorm, whose beta replaces the bias.
    kernel_initializer : str
        ``he_normal`` (default), ``he_uniform``, ``glorot_normal`` or ``glorot_uniform``.
    kernel_regularizer, bias_regularizer : Regularizer, optional
        Weight penalties added to the training loss (:mod:`fastconv.nn.regularizers`).
    """

    kind = "conv"

    def __init__(
        self,
        filters,
        kernel_size,
        stride=1,
        padding=0,
        activation=None,
        use_bias=True,
        kernel_initializer="he_normal",
        name=None,
        trainable=True,
        kernel_regularizer=None,
        bias_regularizer=None,
    ):
        super().__init__(name, trainable)
        self.filters = chk.as_int(filters, "filters", 1)
        self.kernel_size = chk.as_pair(kernel_size, "kernel_size", 1)
        self.stride = chk.as_pair(stride, "stride", 1)
        self.padding_arg = padding if isinstance(padding, str) else None
        self.padding = _padding(padding, self.kernel_size)
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
        self._dy_buffer = None

    def get_config(self):
        return {
            "filters": self.filters,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding_arg or list(self.padding),
            "activation": self.activation,
            "use_bias": self.use_bias,
            "kernel_initializer": self.kernel_initializer,
            **self._regularizer_config(kernel_regularizer="W", bias_regularizer="b"),
            **super().get_config(),
        }

    def output_shape(self, input_shape):
        C, H, W = spatial_shape(input_shape, self)
        try:
            g = chk.window_geometry((1, C, H, W), self.kernel_size, self.stride, self.padding)
        except ValueError as e:
            raise ValueError(f"Conv2D {self.name!r} on input {(C, H, W)}: {e}") from None
        return (self.filters, g.OH, g.OW)

    def weight_specs(self, input_shape):
        C = spatial_shape(input_shape, self)[0]
        specs = [WeightSpec("W", (self.filters, C, *self.kernel_size), self.kernel_initializer)]
        if self.use_bias:
            specs.append(WeightSpec("b", (self.filters,), "zeros"))
        return specs

    @property
    def fuses_relu(self) -> bool:
        """A following ReLU layer can run inside this layer's epilogue."""
        return self.activation is None

    def call(self, x, training=False, fuse_relu=False):
        act = "relu" if fuse_relu else self.activation
        y = ops.conv2d(x, self.params["W"], self.params.get("b"), self.stride, self.padding, act)
        if not training:
            return y, None
        return y, (x, y if act == "relu" else None)

    def call_backward(self, cache, dy, need_dx=True):
        x, y = cache
        if y is not None:
            dy = self._relu_grad(dy, y)
        if not self.trainable and not need_dx:
            return None, {}
        dx, dw, db = ops.conv2d_backward(
            dy, x, self.params["W"], self.stride, self.padding, need_dx=need_dx
        )
        if not self.trainable:
            return dx, {}
        return dx, ({"W": dw, "b": db} if self.use_bias else {"W": dw})

    def _relu_grad(self, dy, y):
        """The fused ReLU's gradient, written into a buffer kept from step to step:
        conv2d_backward only reads it, and a fresh array per step cost page faults
        (~10% of a deep-MNIST training step across the six layers)."""
        buffer = self._dy_buffer
        if (
            buffer is None
            or buffer.shape != dy.shape
            or buffer.dtype != dy.dtype
            or type(buffer) is not type(dy)
        ):
            buffer = self._dy_buffer = array_module(dy).empty(dy.shape, dy.dtype)
        return ops.relu_backward(dy, y, out=buffer)
