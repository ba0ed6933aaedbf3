"""Convolution layers: Conv2D (grouped, dilated), DepthwiseConv2D and SeparableConv2D, with bias
and ReLU fused into the kernel's epilogue."""

from __future__ import annotations

import numpy as np

from ... import _checks as chk
from ... import ops
from ...prepared import prepare_conv2d
from ..backend import array_module
from .base import ProductLayer, WeightSpec, register_layer

__all__ = ["Conv2D", "DepthwiseConv2D", "SeparableConv2D"]


def spatial_shape(input_shape, layer) -> tuple:
    """A per-sample ``(C, H, W)`` shape, or a ValueError naming the layer."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ValueError(
            f"{type(layer).__name__} {layer.name!r} expects inputs of shape (N, C, H, W), got "
            f"per-sample shape {shape}"
        )
    return shape


def keras_same_padding(size, kernel, stride):
    """Keras/TensorFlow ``padding="same"`` along one axis: ``(before, after)``.

    The output keeps ``ceil(size / stride)`` positions; the padding that needs is split with
    the odd pixel after (bottom/right), which is where TensorFlow puts it. ``kernel`` is the
    dilated extent ``(k - 1) * dilation + 1`` for a dilated kernel.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def same_pads(shape_hw, kernel, stride, dilation=(1, 1)):
    """Keras's "same" padding of an ``(H, W)`` input as the kernels take it: ``(ph, pw)`` where
    it is symmetric, else ``(top, bottom, left, right)``."""
    (top, bottom), (left, right) = (
        keras_same_padding(n, (k - 1) * d + 1, s)
        for n, k, s, d in zip(shape_hw, kernel, stride, dilation, strict=True)
    )
    return compact_pads((top, bottom, left, right))


def compact_pads(pads):
    """``(top, bottom, left, right)`` -> ``(ph, pw)`` where opposite sides agree (the form
    configs and kernels always took), else the 4-tuple itself."""
    top, bottom, left, right = pads
    return (top, left) if (top, left) == (bottom, right) else (top, bottom, left, right)


def four_pads(padding):
    """``(top, bottom, left, right)`` of a ``(ph, pw)`` pair or a 4-tuple."""
    return tuple(padding) if len(padding) == 4 else (padding[0], padding[0], padding[1], padding[1])


def _padding(padding):
    """int, (h, w), (top, bottom, left, right), "valid" (0) or "same" (resolved per input size
    by :func:`same_pads` when the layer is built); ``None`` stands for "same" until then."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        return None
    if isinstance(padding, str):
        raise ValueError(
            f"padding must be an int, a pair, a 4-tuple, 'valid' or 'same', got {padding!r}"
        )
    if isinstance(padding, (tuple, list)) and len(padding) == 4:
        return compact_pads(tuple(chk.as_int(p, f"padding[{i}]", 0) for i, p in enumerate(padding)))
    if isinstance(padding, (tuple, list)) and len(padding) != 2:
        raise ValueError(
            f"padding must be an int, a pair (h, w) or (top, bottom, left, right), got {padding!r}"
        )
    return chk.as_pair(padding, "padding", 0)


def _zeros_view(shape):
    """A zero-strided float32 array of ``shape``: validation by the kernels' own checks
    without allocating it."""
    return np.broadcast_to(np.float32(0), tuple(shape))


class _Conv(ProductLayer):
    """What the convolution layers share: the window (``kernel_size``, ``stride``, ``padding``
    with Keras's "same", ``dilation_rate``), the groups, the kernel calls and the twin.

    ``padding`` holds what the kernels take: ``(ph, pw)`` where opposite sides agree, else
    ``(top, bottom, left, right)`` (:attr:`pads` is always the 4-tuple).
    """

    kind = "conv"

    def _init_window(self, kernel_size, stride, padding, dilation_rate) -> None:
        self.kernel_size = chk.as_pair(kernel_size, "kernel_size", 1)
        self.stride = chk.as_pair(stride, "stride", 1)
        self.dilation_rate = chk.as_pair(dilation_rate, "dilation_rate", 1)
        self.padding_arg = padding if isinstance(padding, str) else None
        self.padding = _padding(padding)
        self._dy_buffer = None

    def _window_config(self) -> dict:
        config = {
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding_arg or list(self.padding),
        }
        if self.dilation_rate != (1, 1):  # absent when 1: configs written before stay the same
            config["dilation_rate"] = list(self.dilation_rate)
        return config

    @property
    def pads(self) -> tuple:
        """``(top, bottom, left, right)``."""
        return four_pads(self.padding)

    def _groups_for(self, C) -> int:
        """The number of groups for ``C`` input channels."""
        raise NotImplementedError

    def _conv_kwargs(self, groups) -> dict:
        """The feature keywords of ``ops.conv2d`` that differ from their defaults (a plain
        convolution passes none)."""
        kwargs = {}
        if groups != 1:
            kwargs["groups"] = groups
        if self.dilation_rate != (1, 1):
            kwargs["dilation"] = self.dilation_rate
        return kwargs

    def _geometry(self, input_shape, filters, groups):
        """Validate the window on a ``(C, H, W)`` input (resolving "same"); ``(OH, OW)``."""
        C, H, W = input_shape
        if self.padding_arg == "same":
            self.padding = same_pads((H, W), self.kernel_size, self.stride, self.dilation_rate)
        x = _zeros_view((1, C, H, W))
        w = _zeros_view((filters, C // groups, *self.kernel_size))
        try:
            p = chk.validate_conv(
                x, w, None, self.stride, self.padding, None, groups, self.dilation_rate
            )
        except ValueError as e:
            what = f"{type(self).__name__} {self.name!r} on input {(C, H, W)}"
            raise ValueError(f"{what}: {e}") from None
        return p.OH, p.OW

    def _conv(self, x, w, b, activation, groups):
        return ops.conv2d(x, w, b, self.stride, self.padding, activation,
                          **self._conv_kwargs(groups))  # fmt: skip

    def _conv_backward(self, dy, x, w, need_dx, groups):
        return ops.conv2d_backward(dy, x, w, self.stride, self.padding, need_dx=need_dx,
                                   **self._conv_kwargs(groups))  # fmt: skip

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

    # -- the twin: nn.Conv2d, after a ZeroPad2d where the padding is asymmetric ------------------

    def _torch_conv(self, torch, C, F, groups, bias):
        """``nn.Conv2d`` with this layer's window (padding 0 when asymmetric: see
        :meth:`_torch_padded`)."""
        pad = self.padding if len(self.padding) == 2 else 0
        return torch.nn.Conv2d(C, F, self.kernel_size, self.stride, pad, self.dilation_rate,
                               groups, bias=bias)  # fmt: skip

    def _torch_padded(self, torch, *modules):
        """``modules`` after the asymmetric padding, if any, as a list."""
        if len(self.padding) == 2:
            return list(modules)
        top, bottom, left, right = self.padding
        return [torch.nn.ZeroPad2d((left, right, top, bottom)), *modules]

    @property
    def _torch_core_index(self) -> int:
        return 0 if len(self.padding) == 2 else 1

    def torch_module(self, torch, inplace=False):
        parts = self._torch_padded(torch, self._torch_core(torch))
        if self.activation:
            parts.append(torch.nn.ReLU(inplace=True))
        return parts[0] if len(parts) == 1 else torch.nn.Sequential(*parts)

    def _torch_core_of(self, module):
        """The twin's module holding the weights (:meth:`_torch_core`'s)."""
        wrapped = self.activation or len(self.padding) == 4
        return module[self._torch_core_index] if wrapped else module

    def torch_weights(self, module) -> list:
        core = self._torch_core_of(module)
        out = [("W", core.weight, None)]
        return out + ([("b", core.bias, None)] if self.use_bias else [])


def _fused(fuse_relu, relu6):
    """The activation a fused step runs: ReLU6 (``relu6``, inference), ReLU or none."""
    return ("relu6" if relu6 else "relu") if fuse_relu else None


@register_layer
class Conv2D(_Conv):
    """2-D convolution (cross-correlation), NCHW, weights ``W (filters, in // groups, kh, kw)``
    as PyTorch.

    Parameters
    ----------
    filters : int
    kernel_size : int or (int, int)
    stride : int or (int, int)
    padding : int, (int, int), (top, bottom, left, right), "valid" or "same"
        "same" pads exactly as Keras/TensorFlow: ``ceil(H / stride)`` rows and columns out,
        the padding computed from the input size when the layer is built, the odd pixel at the
        bottom/right where the total is odd (asymmetric padding).
    activation : None or "relu"
        Fused into the kernel's epilogue (one pass over the output).
    use_bias : bool
        False for a convolution followed by BatchNorm, whose beta replaces the bias.
    kernel_initializer : str
        ``he_normal`` (default), ``he_uniform``, ``glorot_normal`` or ``glorot_uniform``.
    kernel_regularizer, bias_regularizer : Regularizer, optional
        Weight penalties added to the training loss (:mod:`fastconv.nn.regularizers`).
    groups : int
        Input and output channels split into ``groups`` independent convolutions (it must
        divide both); ``groups`` equal to the input channels is a depthwise convolution (see
        also :class:`DepthwiseConv2D`).
    dilation_rate : int or (int, int)
        Spacing of the kernel's taps (Keras's name; PyTorch's ``dilation``).
    """

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
        groups=1,
        dilation_rate=1,
    ):
        super().__init__(name, trainable)
        self.filters = chk.as_int(filters, "filters", 1)
        self.groups = chk.as_int(groups, "groups", 1)
        if self.filters % self.groups:
            raise ValueError(
                f"groups must divide filters, got groups={self.groups} for {self.filters} filters"
            )
        self._init_window(kernel_size, stride, padding, dilation_rate)
        self._init_product(
            activation, use_bias, kernel_initializer, kernel_regularizer, bias_regularizer
        )

    @property
    def kind(self) -> str:
        """The profiler's category: "depthwise" where each input channel has a group of its
        own (``groups`` equal to the input channels, more than one), else "conv"."""
        C = self.input_shape[0] if self.input_shape else None
        return "depthwise" if self.groups > 1 and self.groups == C else "conv"

    def get_config(self):
        config = {"filters": self.filters, **self._window_config(), **self._product_config()}
        if self.groups != 1:
            config["groups"] = self.groups
        return config

    def _groups_for(self, C):
        if C % self.groups:
            raise ValueError(
                f"Conv2D {self.name!r}: groups must divide the input channels, got "
                f"groups={self.groups} for {C} input channels"
            )
        return self.groups

    def output_shape(self, input_shape):
        shape = spatial_shape(input_shape, self)
        OH, OW = self._geometry(shape, self.filters, self._groups_for(shape[0]))
        return (self.filters, OH, OW)

    def weight_specs(self, input_shape):
        C = spatial_shape(input_shape, self)[0]
        w_shape = (self.filters, C // self._groups_for(C), *self.kernel_size)
        return self._product_specs(w_shape, self.filters)

    def can_fold(self, following, training):
        # Inference only (training needs the batch statistics), and only into a bare product.
        return not training and self.activation is None and following.folds_into_conv

    def call_folded(self, x, folded, fuse_relu, relu6=False):
        w, b = folded.fold_into(self.params["W"], self.params.get("b"))
        return self._conv(x, w, b, _fused(fuse_relu, relu6), self.groups)

    @property
    def prepares(self) -> bool:
        """Prepared inference weights (:mod:`fastconv.prepared`) for a plain convolution: one
        group, no dilation, the same padding on opposite sides."""
        return self.groups == 1 and self.dilation_rate == (1, 1) and len(self.padding) == 2

    def prepared_weights(self, folded=None):
        """The :class:`~fastconv.prepared.PreparedConv2d` of this layer (with BatchNorm
        ``folded`` folded in), made once per weights version of both layers."""
        key = (self._weights_version, self.activation, self.stride, self.padding,
               None if folded is None else (id(folded), folded.weights_version))  # fmt: skip
        cached = self._prepared
        if cached is not None and cached[0] == key:
            return cached[1]
        if folded is not None:  # fresh arrays: no copy needed
            w, b = folded.fold_into(self.params["W"], self.params.get("b"))
            prepared = prepare_conv2d(w, b, self.stride, self.padding, copy=False)
        else:  # copies: the layer's own arrays may be written in place by an optimizer
            prepared = prepare_conv2d(self.params["W"], self.params.get("b"), self.stride,
                                      self.padding)  # fmt: skip
        self._prepared = (key, prepared)
        return prepared

    def call_prepared(self, x, folded, fuse_relu, residual=None, relu6=False):
        act = _fused(fuse_relu or self.activation == "relu", relu6)
        return self.prepared_weights(folded)(x, act, residual)

    @property
    def fuses_relu6(self) -> bool:
        return self.activation is None

    def _torch_core(self, torch):
        F, Cg, _, _ = self.declared_shape("W")
        return self._torch_conv(torch, Cg * self.groups, F, self.groups, self.use_bias)

    def _product(self, x, w, b, activation):
        return self._conv(x, w, b, activation, self.groups)

    def _product_backward(self, dy, x, w, need_dx):
        return self._conv_backward(dy, x, w, need_dx, self.groups)


@register_layer
class DepthwiseConv2D(_Conv):
    """Depthwise convolution (Keras's ``DepthwiseConv2D``): each input channel convolved with
    ``depth_multiplier`` kernels of its own, ``C * depth_multiplier`` channels out (output
    channel ``c * depth_multiplier + j`` from input channel ``c``, as Keras and PyTorch).

    Weights are stored as PyTorch's ``Conv2d(C, C * depth_multiplier, groups=C)`` keeps them:
    ``W (C * depth_multiplier, 1, kh, kw)`` (Keras: ``(kh, kw, C, depth_multiplier)``), then
    ``b (C * depth_multiplier,)``; ``get_weights()`` gives W, b.

    Parameters
    ----------
    kernel_size, stride, padding, activation, use_bias, kernel_initializer : as :class:`Conv2D`
    depth_multiplier : int
        Output channels per input channel.
    dilation_rate : int or (int, int)
        As :class:`Conv2D`'s.
    kernel_regularizer, bias_regularizer : Regularizer, optional
        As :class:`Conv2D`'s (Keras calls the first ``depthwise_regularizer``).
    """

    kind = "depthwise"

    def __init__(
        self,
        kernel_size,
        stride=1,
        padding="valid",
        depth_multiplier=1,
        dilation_rate=1,
        activation=None,
        use_bias=True,
        kernel_initializer="he_normal",
        name=None,
        trainable=True,
        kernel_regularizer=None,
        bias_regularizer=None,
    ):
        super().__init__(name, trainable)
        self.depth_multiplier = chk.as_int(depth_multiplier, "depth_multiplier", 1)
        self._init_window(kernel_size, stride, padding, dilation_rate)
        self._init_product(
            activation, use_bias, kernel_initializer, kernel_regularizer, bias_regularizer
        )

    def get_config(self):
        return {
            **self._window_config(),
            "depth_multiplier": self.depth_multiplier,
            **self._product_config(),
        }

    @property
    def groups(self) -> int:
        """One group per input channel (known once built)."""
        return self.input_shape[0] if self.input_shape else None

    def _groups_for(self, C):
        return C

    def output_shape(self, input_shape):
        C, H, W = spatial_shape(input_shape, self)
        F = C * self.depth_multiplier
        OH, OW = self._geometry((C, H, W), F, C)
        return (F, OH, OW)

    def weight_specs(self, input_shape):
        C = spatial_shape(input_shape, self)[0]
        F = C * self.depth_multiplier
        return self._product_specs((F, 1, *self.kernel_size), F)

    def can_fold(self, following, training):
        return not training and self.activation is None and following.folds_into_conv

    def call_folded(self, x, folded, fuse_relu, relu6=False):
        w, b = folded.fold_into(self.params["W"], self.params.get("b"))
        return self._conv(x, w, b, _fused(fuse_relu, relu6), x.shape[1])

    @property
    def fuses_relu6(self) -> bool:
        return self.activation is None

    def _torch_core(self, torch):
        F = self.declared_shape("W")[0]
        C = F // self.depth_multiplier
        return self._torch_conv(torch, C, F, C, self.use_bias)

    def _product(self, x, w, b, activation):
        return self._conv(x, w, b, activation, x.shape[1])

    def _product_backward(self, dy, x, w, need_dx):
        return self._conv_backward(dy, x, w, need_dx, x.shape[1])


@register_layer
class SeparableConv2D(_Conv):
    """Depthwise-separable convolution (Keras's ``SeparableConv2D``): a depthwise convolution
    (no bias), then a 1x1 "pointwise" convolution to ``filters`` channels with the bias and
    the activation.

    Weights, in Keras order: ``depthwise_kernel (C * depth_multiplier, 1, kh, kw)`` and
    ``pointwise_kernel (filters, C * depth_multiplier, 1, 1)``, stored as PyTorch's
    ``Conv2d`` keeps them, then ``bias (filters,)``. The profiler counts the whole layer as
    "conv" (for the depthwise part apart, build it from DepthwiseConv2D and a 1x1 Conv2D).

    Parameters
    ----------
    filters : int
    kernel_size, stride, padding, dilation_rate : as :class:`Conv2D` (the depthwise step's)
    depth_multiplier : int
        Channels per input channel after the depthwise step.
    activation, use_bias, kernel_initializer : as :class:`Conv2D` (both kernels start from
        ``kernel_initializer``)
    depthwise_regularizer, pointwise_regularizer, bias_regularizer : Regularizer, optional
        Weight penalties added to the training loss.
    """

    def __init__(
        self,
        filters,
        kernel_size,
        stride=1,
        padding="valid",
        depth_multiplier=1,
        dilation_rate=1,
        activation=None,
        use_bias=True,
        kernel_initializer="he_normal",
        name=None,
        trainable=True,
        depthwise_regularizer=None,
        pointwise_regularizer=None,
        bias_regularizer=None,
    ):
        super().__init__(name, trainable)
        self.filters = chk.as_int(filters, "filters", 1)
        self.depth_multiplier = chk.as_int(depth_multiplier, "depth_multiplier", 1)
        self._init_window(kernel_size, stride, padding, dilation_rate)
        self._init_product(activation, use_bias, kernel_initializer, None, bias_regularizer)
        self._set_regularizers(depthwise_kernel=depthwise_regularizer,
                               pointwise_kernel=pointwise_regularizer,
                               bias=bias_regularizer)  # fmt: skip

    def get_config(self):
        config = {
            "filters": self.filters,
            **self._window_config(),
            "depth_multiplier": self.depth_multiplier,
            **self._product_config(),
            **self._regularizer_config(
                depthwise_regularizer="depthwise_kernel",
                pointwise_regularizer="pointwise_kernel",
                bias_regularizer="bias",
            ),  # fmt: skip
        }
        return config

    def output_shape(self, input_shape):
        C, H, W = spatial_shape(input_shape, self)
        OH, OW = self._geometry((C, H, W), C * self.depth_multiplier, C)
        return (self.filters, OH, OW)

    def weight_specs(self, input_shape):
        C = spatial_shape(input_shape, self)[0]
        M = C * self.depth_multiplier
        specs = [
            WeightSpec("depthwise_kernel", (M, 1, *self.kernel_size), self.kernel_initializer),
            WeightSpec("pointwise_kernel", (self.filters, M, 1, 1), self.kernel_initializer),
        ]
        if self.use_bias:
            specs.append(WeightSpec("bias", (self.filters,), "zeros"))
        return specs

    def can_fold(self, following, training):
        # BatchNorm scales the pointwise step's output channels: it folds into that step.
        return not training and self.activation is None and following.folds_into_conv

    def call_folded(self, x, folded, fuse_relu):
        w, b = folded.fold_into(self.params["pointwise_kernel"], self.params.get("bias"))
        t = self._conv(x, self.params["depthwise_kernel"], None, None, x.shape[1])
        return ops.conv2d(t, w, b, 1, 0, "relu" if fuse_relu else None)

    def call(self, x, training=False, fuse_relu=False):
        act = "relu" if fuse_relu else self.activation
        t = self._conv(x, self.params["depthwise_kernel"], None, None, x.shape[1])
        y = ops.conv2d(t, self.params["pointwise_kernel"], self.params.get("bias"), 1, 0, act)
        if not training:
            return y, None
        return y, (x, t, y if act == "relu" else None)

    def call_backward(self, cache, dy, need_dx=True):
        x, t, y = cache
        if y is not None:
            dy = self._relu_grad(dy, y)
        if not self.trainable and not need_dx:
            return None, {}
        dt, dpw, db = ops.conv2d_backward(dy, t, self.params["pointwise_kernel"], 1, 0)
        dx, ddw, _ = self._conv_backward(dt, x, self.params["depthwise_kernel"], need_dx,
                                         x.shape[1])  # fmt: skip
        if not self.trainable:
            return dx, {}
        grads = {"depthwise_kernel": ddw, "pointwise_kernel": dpw}
        if self.use_bias:
            grads["bias"] = db
        return dx, grads

    def _torch_core(self, torch):
        M, _, _, _ = self.declared_shape("depthwise_kernel")
        C = M // self.depth_multiplier
        depthwise = self._torch_conv(torch, C, M, C, False)
        pointwise = torch.nn.Conv2d(M, self.filters, 1, bias=self.use_bias)
        return torch.nn.Sequential(depthwise, pointwise)

    def torch_weights(self, module) -> list:
        depthwise, pointwise = self._torch_core_of(module)
        out = [("depthwise_kernel", depthwise.weight, None),
               ("pointwise_kernel", pointwise.weight, None)]  # fmt: skip
        return out + ([("bias", pointwise.bias, None)] if self.use_bias else [])
