"""Weights prepared once for inference: :func:`prepare_conv2d`, :func:`prepare_dense`.

``fastconv.conv2d(x, w, b, ...)`` validates its arguments, converts the bias, transforms or
packs the weights and plans the call every time. A :class:`PreparedConv2d` does the weight
work once (lazily, per algorithm) and validates and plans once per input shape; a call then
checks only what can differ from the shape it was planned for (the array's library, shape,
dtype, the activation and the residual). ``fastconv.nn`` keeps one per layer for ``predict``
and drops it when the layer's weights version changes (docs/architecture.md).

The prepared object owns its weight arrays (copies, or the folded weights it was given): it
never sees later writes to the arrays it was made from.
"""

from __future__ import annotations

import numpy as np

from . import _checks as chk
from .device import device_of

__all__ = ["PreparedConv2d", "PreparedDense", "PreparedMaxPool2d", "prepare_conv2d",
           "prepare_dense", "prepare_max_pool2d"]  # fmt: skip


def _owned(w, b, copy):
    """``(w, b)`` C-contiguous on their device: copies when ``copy`` (the prepared object then
    owns its weights), else the arrays themselves where already contiguous."""
    if not isinstance(copy, (bool, np.bool_)):
        raise TypeError(f"copy must be a bool, got {type(copy).__name__}")
    dev = device_of(w)
    xp = dev.xp
    w = xp.array(w, order="C", copy=True) if copy else dev.ascontiguous(w)
    if b is not None:
        b = xp.array(b, order="C", copy=True) if copy else dev.ascontiguous(b)
    return w, b


def prepare_conv2d(w, b=None, stride=1, pad=0, copy=True):
    """Prepare convolution weights for repeated inference calls.

    Parameters
    ----------
    w : ndarray, (F, C, kh, kw), float32 or float16 (NumPy or CuPy)
    b : ndarray, (F,), w's dtype, optional
    stride, pad : int or (int, int)
    copy : bool
        False: keep ``w`` and ``b`` themselves (the caller promises not to change them, e.g.
        freshly folded weights); True (default) copies them.

    Returns
    -------
    PreparedConv2d
        ``prepared(x, activation=None, residual=None)`` equals
        ``fastconv.conv2d(x, w, b, stride, pad, activation)`` bit for bit (with a residual:
        ``relu(conv2d(x, w, b) + residual)`` as the separate ops round it).
    """
    chk.check_array(w, "w", 4)
    if b is not None:
        chk.check_array(b, "b", 1)
    chk.check_same_kind("w", w, b=b)
    F, C, kh, kw = (int(s) for s in w.shape)
    if kh < 1 or kw < 1:
        raise ValueError(f"w must have kernel height and width >= 1, got shape {tuple(w.shape)}")
    if b is not None and b.shape[0] != F:
        raise ValueError(f"b must have length {F} (w.shape[0]), got {b.shape[0]}")
    stride = chk.as_pair(stride, "stride", 1)
    pad = chk.as_pair(pad, "pad", 0)
    w, b = _owned(w, b, copy)
    return PreparedConv2d(w, b, stride, pad)


class PreparedConv2d:
    """Convolution weights prepared for inference (made by :func:`prepare_conv2d`).

    Attributes ``w``, ``b``, ``stride``, ``pad``: what it computes with (read-only by
    contract). Thread-safe: several threads may call one object at once.
    """

    def __init__(self, w, b, stride, pad):
        self.w, self.b, self.stride, self.pad = w, b, stride, pad
        self.dtype = np.dtype(w.dtype)
        self._device = device_of(w)
        self._cpu = None
        if self._device.kernels.conv_algorithms:  # the Numba backend
            from .cpu import prepared as cpu_prepared

            self._cpu = cpu_prepared
            self._weights = cpu_prepared.ConvWeights(w, b)
        # (array type, shape, algorithm setting) -> plan; plain dict: a lost race only
        # builds a plan twice.
        self._plans: dict = {}

    def _plan(self, x):
        """The plan for ``x``'s shape (validated and built on the first call of the shape)."""
        setting = self._cpu._select.get_global() if self._cpu is not None else None
        key = (type(x), x.shape, x.dtype, setting)
        plan = self._plans.get(key)
        if plan is not None:
            return plan, None
        g = chk.validate_conv2d(x, self.w, self.b, self.stride, self.pad)
        if device_of(x) is not self._device:
            raise TypeError(
                f"x must be on the prepared weights' device ({self._device.name}), got "
                f"{type(x).__name__}"
            )
        if self._cpu is None or g.N == 0:
            return None, g
        name, source = self._cpu.choose(g, self._weights, x.dtype)
        if name is None:  # benchmark mode, shape not measured yet: not cached
            return None, g
        plan = self._plans[key] = self._cpu.make_plan(g, self._weights, name, source)
        return plan, None

    def __call__(self, x, activation=None, residual=None):
        """``act(conv2d(x, w, b) [+ residual])``.

        Parameters
        ----------
        x : ndarray, (N, C, H, W), the weights' dtype and library
        activation : None, "relu" or "relu6" (``min(max(v, 0), 6)``, MobileNet's)
        residual : ndarray of the output's shape and dtype, optional
            Added before the activation, in the same pass over the output (ResNet's
            shortcut); not with "relu6".
        """
        if activation not in (None, "relu", "relu6"):
            raise ValueError(f"activation must be None, 'relu' or 'relu6', got {activation!r}")
        if activation == "relu6" and residual is not None:
            raise ValueError("activation 'relu6' takes no residual (only None or 'relu' do)")
        if not chk.is_array(x):
            raise TypeError(f"x must be a numpy.ndarray or cupy.ndarray, got {type(x).__name__}")
        plan, g = self._plan(x)
        y_shape = plan.y_shape if plan is not None else (g.N, self.w.shape[0], g.OH, g.OW)
        if residual is not None:
            if type(residual) is not type(x):
                raise TypeError(
                    f"residual must be a {type(x).__name__} like x, got {type(residual).__name__}"
                )
            if residual.shape != y_shape or residual.dtype != x.dtype:
                raise ValueError(
                    f"residual must have the output's shape {y_shape} and dtype {x.dtype}, got "
                    f"{tuple(residual.shape)} {residual.dtype}"
                )
        dev = self._device
        if plan is None:  # GPU, an empty batch, or benchmark mode's first call of a shape
            return self._unprepared(x, g, activation, residual)
        if not x.flags.c_contiguous:
            x = dev.ascontiguous(x)
        if residual is not None and not residual.flags.c_contiguous:
            residual = dev.ascontiguous(residual)
        code = self._cpu.ACTIVATION_CODES[activation]
        with dev.launch_guard():
            return self._cpu.conv2d_prepared(x, self._weights, plan, code, residual)

    def _unprepared(self, x, g, activation, residual):
        from . import ops

        if residual is None:
            return ops.conv2d(x, self.w, self.b, self.stride, self.pad, activation)
        y = ops.conv2d(x, self.w, self.b, self.stride, self.pad)
        y += residual  # in the output's dtype, as the Add layer's sum
        return ops.relu(y) if activation == "relu" else y

    def __repr__(self):
        return (
            f"PreparedConv2d(w={tuple(self.w.shape)} {self.dtype}, bias={self.b is not None}, "
            f"stride={self.stride}, pad={self.pad})"
        )


def prepare_dense(w, b=None, copy=True):
    """Prepare Dense weights ``(in, out)`` for repeated inference calls.

    Parameters
    ----------
    w : ndarray, (K, N), float32 or float16 (NumPy or CuPy)
    b : ndarray, (N,), w's dtype, optional
    copy : bool
        As for :func:`prepare_conv2d`.

    Returns
    -------
    PreparedDense
        ``prepared(x, activation=None, residual=None)`` equals ``fastconv.dense(x, w, b,
        activation)`` bit for bit (with a residual: the separate Add's and ReLU's rounding).
        On the CPU the weights are packed once into the GEMM layer's column panels (float32),
        so a call only packs its rows of ``x``; on the GPU it calls ``fastconv.dense``.
    """
    chk.check_array(w, "w", 2)
    if b is not None:
        chk.check_array(b, "b", 1)
    chk.check_same_kind("w", w, b=b)
    if b is not None and b.shape[0] != w.shape[1]:
        raise ValueError(f"b must have length {w.shape[1]} (w.shape[1]), got {b.shape[0]}")
    w, b = _owned(w, b, copy)
    return PreparedDense(w, b)


class PreparedDense:
    """Dense weights prepared for inference (made by :func:`prepare_dense`); thread-safe."""

    def __init__(self, w, b):
        self.w, self.b = w, b
        self.dtype = np.dtype(w.dtype)
        self._device = device_of(w)
        self._packed = None  # the CPU's column panels, made on the first call
        self._shapes: dict = {}  # (array type, shape, dtype) -> validated geometry

    def __call__(self, x, activation=None, residual=None):
        """``act(x @ w + b [+ residual])``; ``x`` (N, K) in the weights' dtype and library."""
        from . import ops

        key = (type(x), x.shape, x.dtype)
        g = self._shapes.get(key)
        if g is None:  # validated once per input shape
            g = chk.validate_dense(x, self.w, self.b, None)
            if device_of(x) is not self._device:
                raise TypeError(
                    f"x must be on the prepared weights' device ({self._device.name}), got "
                    f"{type(x).__name__}"
                )
            if x.dtype != self.dtype:
                raise TypeError(f"x must have the weights' dtype {self.dtype}, got {x.dtype}")
            self._shapes[key] = g
        if activation is not None and activation != "relu":
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        relu = activation == "relu"
        if residual is not None:
            if type(residual) is not type(x):
                raise TypeError(
                    f"residual must be a {type(x).__name__} like x, got {type(residual).__name__}"
                )
            if residual.shape != (g.N, g.F) or residual.dtype != x.dtype:
                raise ValueError(
                    f"residual must have the output's shape {(g.N, g.F)} and dtype {x.dtype}, "
                    f"got {tuple(residual.shape)} {residual.dtype}"
                )
        dev = self._device
        if not dev.kernels.conv_algorithms or g.N == 0 or g.F == 0:  # GPU (one implementation)
            y = ops.dense(x, self.w, self.b, None if residual is not None else activation)
            if residual is None:
                return y
            y += residual
            return ops.relu(y) if relu else y
        from .cpu import _matmul, _outputs

        packed = self._packed
        if packed is None:
            packed = self._packed = _matmul.pack_panels(self.w)
        if not x.flags.c_contiguous:
            x = dev.ascontiguous(x)
        if residual is not None and not residual.flags.c_contiguous:
            residual = dev.ascontiguous(residual)
        y = _outputs.empty((g.N, g.F), x.dtype)
        with dev.launch_guard():
            return _matmul.matmul_panels(x, packed, y, self.b, relu, residual)

    def __repr__(self):
        return f"PreparedDense(w={tuple(self.w.shape)} {self.dtype}, bias={self.b is not None})"


def prepare_max_pool2d(size=2, stride=None, pad=0, ceil_mode=False):
    """Max pooling validated once per input shape, for repeated inference calls.

    Parameters are :func:`fastconv.max_pool2d`'s. Returns a :class:`PreparedMaxPool2d`:
    ``prepared(x)`` equals ``fastconv.max_pool2d(x, size, stride, pad, ceil_mode)`` (the same
    kernel). The op's checks took ~5 of a batch-1 pooling call's ~8 us (deep-MNIST's 16x28x28,
    2026-12-07), its kernel ~2.
    """
    kh, kw = chk.as_pair(size, "size", 1)
    chk.pool_pads((1, 1, 4 * kh, 4 * kw), size, stride, pad, True, ceil_mode)  # (the arguments)
    return PreparedMaxPool2d(size, stride, pad, ceil_mode)


class PreparedMaxPool2d:
    """Max pooling with its geometry validated once per input shape (made by
    :func:`prepare_max_pool2d`); thread-safe."""

    def __init__(self, size, stride, pad, ceil_mode):
        self.args = (size, stride, pad, ceil_mode)
        # (array type, shape, dtype) -> (kernel, geometry, launch guard), or None where the
        # op has work around its kernel (asymmetric padding, an empty batch)
        self._shapes: dict = {}

    def __call__(self, x):
        """``fastconv.max_pool2d(x, *args)``."""
        key = (type(x), x.shape, x.dtype)
        found = self._shapes.get(key, False)
        if not found:  # a shape seen for the first time, or one the op itself must run
            from . import ops

            y = ops.max_pool2d(x, *self.args)  # validates
            if found is False:
                _, extra, g = chk.pool_pads(x.shape, *self.args[:3], True, self.args[3])
                dev = device_of(x)
                plain = not any(extra) and g.N > 0
                self._shapes[key] = (
                    (dev.kernels.max_pool2d, g, dev.launch_guard()) if plain else None
                )
            return y
        kernel, g, guard = found
        if not x.flags.c_contiguous:
            x = device_of(x).ascontiguous(x)
        with guard:
            return kernel(x, g)

    def __repr__(self):
        size, stride, pad, ceil_mode = self.args
        return f"PreparedMaxPool2d(size={size}, stride={stride}, pad={pad}, ceil_mode={ceil_mode})"
