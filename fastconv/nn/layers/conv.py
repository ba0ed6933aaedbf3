"""Conv2D: the convolution layer, with bias and ReLU fused into the kernel's epilogue."""

from __future__ import annotations

from ... import _checks as chk
from ... import ops
from ...prepared import prepare_conv2d
from ..backend import array_module
from .base import ProductLayer, register_layer

__all__ = ["Conv2D"]


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
    the odd pixel after (bottom/right), which is where TensorFlow puts it.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _padding(padding):
    """int, (h, w), "valid" (0) or "same" (resolved per input size by :func:`keras_same_padding`
    when the layer is built); ``None`` stands for "same" until then."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        return None
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    return chk.as_pair(padding, "padding", 0)


@register_layer
class Conv2D(ProductLayer):
    """2-D convolution (cross-correlation), NCHW, weights ``W (filters, in, kh, kw)`` as PyTorch.

    Parameters
    ----------
    filters : int
    kernel_size : int or (int, int)
    stride : int or (int, int)
    padding : int, (int, int), "valid" or "same"
        "same" pads exactly as Keras/TensorFlow: ``ceil(H / stride)`` rows and columns out,
        the padding computed from the input size when the layer is built. Where Keras would
        pad asymmetrically (an odd total, e.g. a 3x3 kernel at stride 2 on an even size),
        the layer refuses with a ValueError rather than give other values: fastconv pads
        symmetrically only.
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
        self.padding = _padding(padding)
        self._init_product(
            activation, use_bias, kernel_initializer, kernel_regularizer, bias_regularizer
        )
        self._dy_buffer = None

    def get_config(self):
        return {
            "filters": self.filters,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding_arg or list(self.padding),
            **self._product_config(),
        }

    def output_shape(self, input_shape):
        C, H, W = spatial_shape(input_shape, self)
        if self.padding_arg == "same":
            self.padding = self._same_padding(H, W)
        try:
            g = chk.window_geometry((1, C, H, W), self.kernel_size, self.stride, self.padding)
        except ValueError as e:
            raise ValueError(f"Conv2D {self.name!r} on input {(C, H, W)}: {e}") from None
        return (self.filters, g.OH, g.OW)

    def _same_padding(self, H, W):
        """Keras's "same" padding for an ``H x W`` input, or a ValueError where it is
        asymmetric (which Keras's values need and symmetric padding cannot give)."""
        (top, bottom), (left, right) = (
            keras_same_padding(n, k, s)
            for n, k, s in zip((H, W), self.kernel_size, self.stride, strict=True)
        )
        if top != bottom or left != right:
            # The symmetric padding that keeps Keras's output shape (PyTorch's usual choice).
            sym = ((top + bottom + 1) // 2, (left + right + 1) // 2)
            raise ValueError(
                f"Conv2D {self.name!r}: padding='same' with kernel_size {self.kernel_size} and "
                f"stride {self.stride} on a {H}x{W} input pads asymmetrically in Keras/"
                f"TensorFlow (top {top}, bottom {bottom}, left {left}, right {right}); fastconv "
                "pads symmetrically only, and a symmetric padding would give other values. "
                f"Write padding={sym} for PyTorch-style padding with the same output shape "
                "(the sampling grid one pixel earlier than Keras's), or use an input size for "
                "which Keras's padding is symmetric"
            )
        return (top, left)

    def weight_specs(self, input_shape):
        C = spatial_shape(input_shape, self)[0]
        return self._product_specs((self.filters, C, *self.kernel_size), self.filters)

    def can_fold(self, following, training):
        # Inference only (training needs the batch statistics), and only into a bare product.
        return not training and self.activation is None and following.folds_into_conv

    def call_folded(self, x, folded, fuse_relu):
        w, b = folded.fold_into(self.params["W"], self.params.get("b"))
        return ops.conv2d(x, w, b, self.stride, self.padding, "relu" if fuse_relu else None)

    prepares = True

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

    def call_prepared(self, x, folded, fuse_relu, residual=None):
        act = "relu" if fuse_relu or self.activation == "relu" else None
        return self.prepared_weights(folded)(x, act, residual)

    def _torch_core(self, torch):
        F, C, kh, kw = self.declared_shape("W")
        return torch.nn.Conv2d(C, F, (kh, kw), self.stride, self.padding, bias=self.use_bias)

    def _product(self, x, w, b, activation):
        return ops.conv2d(x, w, b, self.stride, self.padding, activation)

    def _product_backward(self, dy, x, w, need_dx):
        return ops.conv2d_backward(dy, x, w, self.stride, self.padding, need_dx=need_dx)

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
