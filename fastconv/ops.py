"""Public kernels: validate once, then run on the arrays' device.

Every function here validates its arguments (:mod:`fastconv._checks`), finds the device of
its arrays (:func:`fastconv.device.device_of`: NumPy -> CPU, CuPy -> GPU) and calls the op of
that device's kernel set (the :class:`fastconv.kernels.Kernels` interface) with C-contiguous
arrays and the validated geometry. This module is the only caller of a kernel set, so
validation cannot be skipped on the way to a kernel that does no bounds checks.

It is also the op table: each function marked ``@kernel_op`` is an op every backend
implements, by a method of the same name (:data:`fastconv.kernels.OPS`).
"""

from __future__ import annotations

import numpy as np

from . import _checks as chk
from .device import CPU, device_of
from .kernels import clamp6, kernel_op

__all__ = [
    "im2col",
    "col2im",
    "conv2d",
    "conv2d_backward",
    "grouped_conv2d",
    "grouped_conv2d_backward",
    "set_conv_algorithm",
    "get_conv_algorithm",
    "conv_algorithm_choices",
    "clear_conv_algorithm_choices",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "batch_norm_forward",
    "batch_norm_inference",
    "batch_norm_backward",
    "batch_norm_inference_backward",
    "fold_batch_norm",
    "global_avg_pool2d",
    "global_avg_pool2d_backward",
    "dense",
    "dense_backward",
    "relu",
    "relu_backward",
    "leaky_relu",
    "leaky_relu_backward",
    "clip",
    "clip_backward",
    "warp_bilinear",
    "gaussian_blur",
    "gpu_available",
    "to_gpu",
    "to_cpu",
]


def _launch(dev, kernel, *args, **kwargs):
    """Run ``kernel`` (a method of ``dev.kernels``) under the device's launch guard (thread
    safety, see :mod:`fastconv.cpu._workspace`)."""
    with dev.launch_guard():
        return kernel(*args, **kwargs)


def _contiguous(dev, *arrays):
    return tuple(None if a is None else dev.ascontiguous(a) for a in arrays)


# An empty batch (N = 0) is valid for every op, as in PyTorch: each op below returns its
# correctly shaped result (zeros for gradients summed over the batch) without launching a
# kernel on nothing.


@kernel_op
def im2col(x, kh, kw, stride=1, pad=0):
    """Unfold sliding windows into a matrix.

    Parameters
    ----------
    x : ndarray, (N, C, H, W), float32 or float16
    kh, kw : int
        Window height and width.
    stride, pad : int or (int, int)

    Returns
    -------
    ndarray, (N*OH*OW, C*kh*kw), same dtype as ``x``
        Rows ordered (n, oh, ow), columns (c, i, j), as in the book.
    """
    g = chk.validate_im2col(x, kh, kw, stride, pad)
    dev = device_of(x)
    if g.N == 0:
        return dev.zeros((0, g.C * g.kh * g.kw), x.dtype)
    (x,) = _contiguous(dev, x)
    return _launch(dev, dev.kernels.im2col, x, g)


@kernel_op
def col2im(cols, x_shape, kh, kw, stride=1, pad=0):
    """Adjoint of :func:`im2col`: sum every column entry back into its image pixel.

    Returns
    -------
    ndarray, ``x_shape``, same dtype as ``cols``
    """
    g = chk.validate_col2im(cols, x_shape, kh, kw, stride, pad)
    dev = device_of(cols)
    if g.N == 0:
        return dev.zeros(g.x_shape, cols.dtype)
    (cols,) = _contiguous(dev, cols)
    return _launch(dev, dev.kernels.col2im, cols, g)


def _conv_algorithm(algorithm, g, dev):
    """Keyword arguments for the backend: ``{}`` (the process-wide choice, and always on the
    GPU, which has one implementation) or ``{"algorithm": canonical name or "auto"}``."""
    if algorithm is None:
        return {}
    name = chk.check_conv_algorithm(algorithm)
    if not dev.kernels.conv_algorithms:
        if name == "auto":
            return {}
        raise ValueError(
            f"algorithm={algorithm!r} selects a CPU convolution algorithm; the GPU backend has "
            "one implementation (use algorithm=None or 'auto' with CuPy arrays)"
        )
    if name != "auto":
        chk.check_conv_algorithm_applies(name, g)
    return {"algorithm": name}


@kernel_op
def conv2d(x, w, b=None, stride=1, pad=0, activation=None, algorithm=None, *, groups=1,
           dilation=1):  # fmt: skip
    """2-D cross-correlation (the deep-learning "convolution").

    Parameters
    ----------
    x : ndarray, (N, C, H, W)
    w : ndarray, (F, C // groups, kh, kw)
    b : ndarray, (F,), optional
    stride : int or (int, int)
    pad : int, (int, int) or (top, bottom, left, right)
        Zero padding; the 4-tuple form pads opposite sides differently (Keras/TensorFlow
        "same" with a stride, ONNX's ``SAME_UPPER``; ONNX's ``pads`` list is
        ``(top, left, bottom, right)``).
    activation : None, "relu" or "relu6"
        Fused epilogue applied after the bias; "relu6" is ``min(max(v, 0), 6)`` (NaN kept),
        fused into the CPU's direct, unfolded, pointwise and grouped stores (elsewhere the
        ReLU is fused and the upper bound applied after, with the same bits).
    algorithm : None or str
        CPU algorithm for this call: ``"direct"`` (stride 1), ``"unfolded"`` (any layer),
        ``"winograd4x4"`` (alias ``"winograd"``) or ``"winograd2x2"`` (3x3, stride 1,
        pad <= 2), or ``"auto"`` (the fixed rule of :func:`set_conv_algorithm`). None
        (default) uses :func:`set_conv_algorithm`'s setting. An algorithm that cannot run
        the layer raises ValueError. The GPU backend has one implementation: there only None
        and ``"auto"`` are accepted. Groups of few channels (depthwise included) have their
        own kernel (any algorithm named is refused for them).
    groups : int
        Channel groups, dividing C and F (ResNeXt); ``groups == C`` is a depthwise
        convolution. Groups of few channels run on :func:`grouped_conv2d`'s direct kernel.
    dilation : int or (int, int)
        Spacing of the kernel's taps (DeepLab's atrous convolution).

    Returns
    -------
    ndarray, (N, F, OH, OW), same dtype as ``x``
    """
    p = chk.validate_conv(x, w, b, stride, pad, activation, groups, dilation)
    dev = device_of(x)
    if not p.plain:
        return _conv2d_general(dev, p, x, w, b, activation, algorithm)
    g = p.geometry()
    choice = _conv_algorithm(algorithm, g, dev)
    if g.N == 0:
        return dev.zeros((0, w.shape[0], g.OH, g.OW), x.dtype)
    x, w, b = _contiguous(dev, x, w, b)
    act, clamp = _conv_activation(dev, activation)
    y = _launch(dev, dev.kernels.conv2d, x, w, b, g, act, **choice)
    return clamp6(y, dev.xp) if clamp else y


def _conv_activation(dev, activation):
    """``(activation for the backend, whether to clamp at 6 after)``: a backend that does not
    list "relu6" in ``conv_activations`` fuses the ReLU, and :func:`~fastconv.kernels.clamp6`
    applies the upper bound after (the clip kernel's bits, NaN kept)."""
    if activation != "relu6" or "relu6" in dev.kernels.conv_activations:
        return activation, False
    return "relu", True


@kernel_op
def conv2d_backward(dy, x, w, stride=1, pad=0, need_dx=True, algorithm=None, *, groups=1,
                    dilation=1):  # fmt: skip
    """Gradients of :func:`conv2d` (without activation).

    Parameters
    ----------
    need_dx : bool
        False skips computing ``dx`` (e.g. for a network's first layer, whose input needs no
        gradient) and returns None in its place.
    algorithm, groups, dilation, pad : as for :func:`conv2d`.

    Returns
    -------
    dx : ndarray, (N, C, H, W), or None when ``need_dx`` is False
    dw : ndarray, (F, C // groups, kh, kw)
    db : ndarray, (F,)
    """
    p = chk.validate_conv_backward(dy, x, w, stride, pad, groups, dilation)
    if not isinstance(need_dx, (bool, np.bool_)):
        raise TypeError(f"need_dx must be a bool, got {type(need_dx).__name__}")
    dev = device_of(x)
    if p.N == 0:  # nothing to sum: zero weight and bias gradients
        dx = dev.zeros(x.shape, x.dtype) if need_dx else None
        return dx, dev.zeros(w.shape, x.dtype), dev.zeros((w.shape[0],), x.dtype)
    if not p.plain:
        return _conv2d_backward_general(dev, p, dy, x, w, bool(need_dx), algorithm)
    g = p.geometry()
    choice = _conv_algorithm(algorithm, g, dev)
    dy, x, w = _contiguous(dev, dy, x, w)
    return _launch(dev, dev.kernels.conv2d_backward, dy, x, w, g, need_dx=bool(need_dx), **choice)


# --- grouped, dilated and asymmetrically padded convolutions -------------------------------------
#
# Groups of at most GROUPED_DIRECT_MAX_CHANNELS input channels (depthwise: one) go to the direct
# grouped kernels, which take stride, dilation and all four pads natively. Everything else is
# composed here from the kernels' plain convolution, identically on every device: a dilated
# stride-1 convolution as one undilated convolution over the input's dh x dw phases stacked
# in the batch (TensorFlow's space-to-batch: no multiply by the zeros of a dilated kernel);
# other dilations as zeros between the taps of the weights; asymmetric padding as explicit
# zero rows/columns on the side that needs more; larger groups as one convolution per group.

#: channels per group up to which the direct grouped kernels beat a GEMM per group
#: (docs/kernels.md, "Groups, depthwise, dilation, asymmetric padding")
GROUPED_DIRECT_MAX_CHANNELS = 16


def _direct_grouped(p) -> bool:
    return p.groups > 1 and p.C // p.groups <= GROUPED_DIRECT_MAX_CHANNELS


def _pre_pad(dev, a, extra, value):
    """``a`` with ``extra`` (top, bottom, left, right) rows/columns of ``value`` added: the
    asymmetric part of a padding, which the kernels' symmetric padding cannot express."""
    if not any(extra):
        return a
    spec = ((0, 0), (0, 0), extra[:2], extra[2:])
    return dev.xp.pad(a, spec, constant_values=value)


def _crop(dev, a, extra, x_shape):
    if not any(extra):
        return a
    t, left = extra[0], extra[2]
    return dev.ascontiguous(a[:, :, t : t + x_shape[2], left : left + x_shape[3]])


def _dilated(dev, w, p):
    """``w`` with ``dh - 1`` / ``dw - 1`` zeros between its taps."""
    if (p.dh, p.dw) == (1, 1):
        return w
    kh, kw = p.extent
    wd = dev.zeros((w.shape[0], w.shape[1], kh, kw), w.dtype)
    wd[:, :, :: p.dh, :: p.dw] = w
    return wd


def _refuse_named_algorithm(algorithm, what):
    if algorithm not in (None, "auto"):
        raise ValueError(
            f"algorithm={algorithm!r}: {what} has one implementation; use algorithm=None or 'auto'"
        )


def _phases(dev, p):
    """Space-to-batch geometry of a stride-1 dilated problem: the padded input cut into its
    ``dh x dw`` phases (each ``Hs x Ws``, the input padded up to a multiple of the dilation)."""
    t, b, left, r = p.pads
    Hs, Ws = -(-(p.H + t + b) // p.dh), -(-(p.W + left + r) // p.dw)
    pads = ((0, 0), (0, 0), (t, Hs * p.dh - p.H - t), (left, Ws * p.dw - p.W - left))
    return Hs, Ws, pads


def _to_phases(dev, a, p, Hs, Ws):
    """(N, C, Hs*dh, Ws*dw) -> (dh*dw*N, C, Hs, Ws): phase (a, b) holds rows a::dh, cols b::dw."""
    N, C = a.shape[:2]
    a = a.reshape(N, C, Hs, p.dh, Ws, p.dw).transpose(3, 5, 0, 1, 2, 4)
    return dev.ascontiguous(a).reshape(p.dh * p.dw * N, C, Hs, Ws)


def _from_phases(dev, a, p, N):
    """The inverse of :func:`_to_phases`: (dh*dw*N, C, h, w) -> (N, C, h*dh, w*dw)."""
    _, C, h, w = a.shape
    a = a.reshape(p.dh, p.dw, N, C, h, w).transpose(2, 3, 4, 0, 5, 1)
    return dev.ascontiguous(a).reshape(N, C, h * p.dh, w * p.dw)


def _conv2d_general(dev, p, x, w, b, activation, algorithm):
    if _direct_grouped(p):
        _refuse_named_algorithm(algorithm, "a direct grouped (or depthwise) convolution")
        return grouped_conv2d(x, w, b, (p.sh, p.sw), p.pads, activation, p.groups,
                              (p.dh, p.dw))  # fmt: skip
    if p.N == 0:
        return dev.zeros((0, p.F, p.OH, p.OW), x.dtype)
    if (p.dh, p.dw) != (1, 1) and (p.sh, p.sw) == (1, 1):
        Hs, Ws, pads = _phases(dev, p)
        xs = _to_phases(dev, dev.xp.pad(x, pads), p, Hs, Ws)
        ys = conv2d(xs, w, b, 1, 0, activation, algorithm, groups=p.groups)
        return dev.ascontiguous(_from_phases(dev, ys, p, p.N)[:, :, : p.OH, : p.OW])
    extra, sym = chk.split_pads(p.pads)
    x = _pre_pad(dev, x, extra, 0.0)
    wd = _dilated(dev, w, p)
    if p.groups == 1:
        return conv2d(x, wd, b, (p.sh, p.sw), sym, activation, algorithm)
    Cg, Fg = p.C // p.groups, p.F // p.groups
    y = dev.xp.empty((p.N, p.F, p.OH, p.OW), x.dtype)
    for k in range(p.groups):
        cs, fs = slice(k * Cg, (k + 1) * Cg), slice(k * Fg, (k + 1) * Fg)
        bk = None if b is None else b[fs]
        y[:, fs] = conv2d(x[:, cs], wd[fs], bk, (p.sh, p.sw), sym, activation, algorithm)
    return y


def _conv2d_backward_general(dev, p, dy, x, w, need_dx, algorithm):
    if _direct_grouped(p):
        _refuse_named_algorithm(algorithm, "a direct grouped (or depthwise) convolution")
        return grouped_conv2d_backward(dy, x, w, (p.sh, p.sw), p.pads, need_dx, p.groups,
                                       (p.dh, p.dw))  # fmt: skip
    if (p.dh, p.dw) != (1, 1) and (p.sh, p.sw) == (1, 1):
        Hs, Ws, pads = _phases(dev, p)
        xs = _to_phases(dev, dev.xp.pad(x, pads), p, Hs, Ws)
        # dy on the phases' whole output grid (zeros past OH, OW: they add nothing)
        oh, ow = Hs - p.kh + 1, Ws - p.kw + 1
        dyf = dev.zeros((p.N, p.F, oh * p.dh, ow * p.dw), dy.dtype)
        dyf[:, :, : p.OH, : p.OW] = dy
        dys = _to_phases(dev, dyf, p, oh, ow)
        dxs, dw, db = conv2d_backward(dys, xs, w, 1, 0, need_dx, algorithm, groups=p.groups)
        if not need_dx:
            return None, dw, db
        t, left = p.pads[0], p.pads[2]
        dx = _from_phases(dev, dxs, p, p.N)[:, :, t : t + p.H, left : left + p.W]
        return dev.ascontiguous(dx), dw, db
    x_shape = x.shape
    extra, sym = chk.split_pads(p.pads)
    x = _pre_pad(dev, x, extra, 0.0)
    wd = _dilated(dev, w, p)
    Cg, Fg = p.C // p.groups, p.F // p.groups
    dx = dev.xp.empty(x.shape, x.dtype) if need_dx else None
    dw = dev.xp.empty(wd.shape, x.dtype)
    db = dev.xp.empty((p.F,), x.dtype)
    for k in range(p.groups):
        cs, fs = slice(k * Cg, (k + 1) * Cg), slice(k * Fg, (k + 1) * Fg)
        dxk, dw[fs], db[fs] = conv2d_backward(dy[:, fs], x[:, cs], wd[fs], (p.sh, p.sw), sym,
                                              need_dx, algorithm)  # fmt: skip
        if need_dx:
            dx[:, cs] = dxk
    if (p.dh, p.dw) != (1, 1):
        dw = dev.ascontiguous(dw[:, :, :: p.dh, :: p.dw])
    if need_dx:
        dx = _crop(dev, dx, extra, x_shape)
    return dx, dw, db


@kernel_op
def grouped_conv2d(x, w, b=None, stride=1, pad=0, activation=None, groups=1, dilation=1):
    """Direct grouped convolution, the kernel behind ``conv2d(..., groups=g)`` when a group has
    at most :data:`GROUPED_DIRECT_MAX_CHANNELS` input channels: depthwise (``groups == C``,
    MobileNet's 3x3 layers, Keras's ``depth_multiplier`` being ``F / C``) and small groups
    (ShuffleNet, ResNeXt). Filter ``f`` of group ``f // (F / groups)`` reads that group's
    ``C / groups`` channels.

    Parameters
    ----------
    x : ndarray, (N, C, H, W)
    w : ndarray, (F, C // groups, kh, kw)
    b : ndarray, (F,), optional
    stride, pad, activation, groups, dilation : as for :func:`conv2d`

    Returns
    -------
    ndarray, (N, F, OH, OW), same dtype as ``x``
    """
    p = chk.validate_conv(x, w, b, stride, pad, activation, groups, dilation)
    dev = device_of(x)
    if p.N == 0:
        return dev.zeros((0, p.F, p.OH, p.OW), x.dtype)
    x, w, b = _contiguous(dev, x, w, b)
    act, clamp = _conv_activation(dev, activation)
    y = _launch(dev, dev.kernels.grouped_conv2d, x, w, b, p, act)
    return clamp6(y, dev.xp) if clamp else y


@kernel_op
def grouped_conv2d_backward(dy, x, w, stride=1, pad=0, need_dx=True, groups=1, dilation=1):
    """Gradients ``(dx or None, dw, db)`` of :func:`grouped_conv2d` (without activation)."""
    p = chk.validate_conv_backward(dy, x, w, stride, pad, groups, dilation)
    if not isinstance(need_dx, (bool, np.bool_)):
        raise TypeError(f"need_dx must be a bool, got {type(need_dx).__name__}")
    dev = device_of(x)
    if p.N == 0:
        dx = dev.zeros(x.shape, x.dtype) if need_dx else None
        return dx, dev.zeros(w.shape, x.dtype), dev.zeros((w.shape[0],), x.dtype)
    dy, x, w = _contiguous(dev, dy, x, w)
    return _launch(dev, dev.kernels.grouped_conv2d_backward, dy, x, w, p, bool(need_dx))


def set_conv_algorithm(algorithm="auto"):
    """Choose the CPU convolution algorithm process-wide; returns the previous setting.

    ``"auto"`` (default): a fixed rule per layer shape (Winograd F(4x4,3x3) for 3x3 stride-1
    layers with at least 8 input and output channels, else direct for stride 1, else
    unfolded), so results never depend on timing. ``"benchmark"``: on the first call of each
    shape and pass, time every applicable algorithm and keep the fastest (cached; the choice
    may differ between runs, and with it the rounding of the results). An algorithm name
    (see :func:`conv2d`): used for every layer it can run; other layers keep the ``"auto"``
    rule. A call's own ``algorithm=`` argument overrides this setting. Every choice is
    recorded: :func:`conv_algorithm_choices`.
    """
    from .cpu import _select

    name = chk.check_conv_algorithm(algorithm, modes=chk.CONV_ALGORITHM_MODES)
    return _select.set_global(name)


def get_conv_algorithm():
    """The process-wide CPU convolution algorithm setting (see :func:`set_conv_algorithm`)."""
    from .cpu import _select

    return _select.get_global()


def conv_algorithm_choices():
    """Which algorithm each CPU convolution ran, per shape and pass.

    Returns
    -------
    list of ConvAlgorithmChoice
        Named tuples ``(pass_, dtype, x_shape, w_shape, stride, pad, algorithm, source, calls,
        fallbacks)``, in order of first use; ``pass_`` is ``"forward"``, ``"backward"`` or
        ``"backward_weights"`` (``need_dx=False``), ``source`` how the algorithm was chosen
        (``"argument"``, ``"global"``, ``"measured"`` or ``"rule"``), ``fallbacks`` how many
        of the calls were redone on an exact GEMM path because the inputs or weights held
        NaN, inf or values of magnitude >= 2**50 (Winograd's transforms would spread or
        overflow them).
    """
    from .cpu import _select

    return _select.choices()


def clear_conv_algorithm_choices():
    """Forget the recorded choices and the ``"benchmark"`` measurements."""
    from .cpu import _select

    _select.clear()


@kernel_op
def max_pool2d(x, size=2, stride=None, pad=0, ceil_mode=False):
    """Max pooling; ``stride`` defaults to ``size`` and padding never wins the max.

    ``pad``: int, ``(h, w)`` or ``(top, bottom, left, right)`` (each side at most half the
    window). ``ceil_mode`` rounds the output size up instead of down: the last window may run
    past the bottom/right edge and is clipped there (PyTorch's ``ceil_mode=True``; GoogLeNet
    uses it); it needs symmetric padding.

    Returns
    -------
    ndarray, (N, C, OH, OW), same dtype as ``x``
    """
    chk.check_array(x, "x", 4)
    _, extra, g = chk.pool_pads(x.shape, size, stride, pad, True, ceil_mode)
    dev = device_of(x)
    if g.N == 0:
        return dev.zeros((0, g.C, g.OH, g.OW), x.dtype)
    (x,) = _contiguous(dev, _pre_pad(dev, x, extra, -np.inf))
    return _launch(dev, dev.kernels.max_pool2d, x, g)


@kernel_op
def max_pool2d_backward(dy, x, size=2, stride=None, pad=0, ceil_mode=False):
    """Gradient of :func:`max_pool2d`, sent to the first maximum of each window (as PyTorch;
    with asymmetric padding, a window whose input cells are all -inf may send it to the
    padding)."""
    chk.check_array(x, "x", 4)
    _, extra, g = chk.pool_pads(x.shape, size, stride, pad, True, ceil_mode)
    chk.check_array(dy, "dy", 4)
    chk.check_same_kind("x", x, dy=dy)
    chk.check_shape(dy, "dy", (g.N, g.C, g.OH, g.OW))
    dev = device_of(x)
    if g.N == 0:
        return dev.zeros(x.shape, x.dtype)
    dy, xp = _contiguous(dev, dy, _pre_pad(dev, x, extra, -np.inf))
    dx = _launch(dev, dev.kernels.max_pool2d_backward, dy, xp, g)
    return _crop(dev, dx, extra, x.shape)


def _real_fraction(dev, x_shape, extra, g):
    """(OH, OW) float32: the share of each window's divisor that is input cells (what turns
    the kernels' count-the-padding average into ``count_include_pad=False``'s)."""
    ones = dev.full((1, 1, *x_shape[2:]), 1.0, np.float32)
    ones = dev.ascontiguous(_pre_pad(dev, ones, extra, 0.0))
    with dev.launch_guard():
        return dev.kernels.avg_pool2d(ones, g._replace(N=1, C=1))[0, 0]


@kernel_op
def avg_pool2d(x, size=2, stride=None, pad=0, ceil_mode=False, count_include_pad=True):
    """Average pooling.

    ``count_include_pad=True`` (PyTorch's default): zero padding counts in the divisor; with
    ``ceil_mode`` a window running past the padded edge divides by the part of it inside the
    padded input only (as PyTorch). False (ONNX's default, Keras's ``padding="same"``): each
    window divides by its input cells only (each pad side then at most half the window).
    ``pad``: int, ``(h, w)`` or ``(top, bottom, left, right)``."""
    chk.check_array(x, "x", 4)
    _, extra, g = chk.pool_pads(x.shape, size, stride, pad, False, ceil_mode, count_include_pad)
    dev = device_of(x)
    if g.N == 0:
        return dev.zeros((0, g.C, g.OH, g.OW), x.dtype)
    (xp,) = _contiguous(dev, _pre_pad(dev, x, extra, 0.0))
    y = _launch(dev, dev.kernels.avg_pool2d, xp, g)
    if count_include_pad:
        return y
    frac = _real_fraction(dev, x.shape, extra, g)
    return (y.astype(np.float32) / frac).astype(x.dtype)


@kernel_op
def avg_pool2d_backward(dy, x_shape, size=2, stride=None, pad=0, ceil_mode=False,
                        count_include_pad=True):  # fmt: skip
    """Gradient of :func:`avg_pool2d` with respect to an input of shape ``x_shape``."""
    chk.check_array(dy, "dy", 4)
    x_shape = chk.check_x_shape(x_shape)
    _, extra, g = chk.pool_pads(x_shape, size, stride, pad, False, ceil_mode, count_include_pad)
    chk.check_shape(dy, "dy", (g.N, g.C, g.OH, g.OW))
    dev = device_of(dy)
    if g.N == 0:
        return dev.zeros(x_shape, dy.dtype)
    if not count_include_pad:
        dy = (dy.astype(np.float32) / _real_fraction(dev, x_shape, extra, g)).astype(dy.dtype)
    (dy,) = _contiguous(dev, dy)
    dx = _launch(dev, dev.kernels.avg_pool2d_backward, dy, g)
    return _crop(dev, dx, extra, x_shape)


# --- batch normalisation ------------------------------------------------------------------------


@kernel_op
def batch_norm_forward(x, gamma, beta, eps=1e-5, activation=None):
    """Batch normalisation in training mode, with the batch's own statistics.

    Parameters
    ----------
    x : ndarray, (N, C) or (N, C, H, W), float32 or float16
    gamma, beta : ndarray, (C,), x's dtype
        Scale and shift.
    eps : float
        Added to the variance before the square root.
    activation : None or "relu"
        ReLU fused into the same pass (NaN propagates).

    Returns
    -------
    y : ndarray, x's shape and dtype
    mean, var : ndarray, (C,), float32
        The batch mean and the *biased* batch variance of each channel over N (and H, W); for
        an empty batch (N = 0) they are NaN (no statistics exist: do not fold them into
        running averages).

    Raises
    ------
    ValueError
        When a channel holds exactly one value (N*H*W == 1): the variance is undefined.
    """
    g, eps = chk.validate_batch_norm(x, gamma, beta, eps, activation)
    dev = device_of(x)
    if g.N == 0 or g.C == 0:
        mean, var = (dev.full((g.C,), np.nan, np.float32) for _ in range(2))
        return dev.zeros(g.shape, x.dtype), mean, var
    x, gamma, beta = _contiguous(dev, x, gamma, beta)
    relu = activation == "relu"
    return _launch(dev, dev.kernels.batch_norm_forward, x, gamma, beta, g, eps, relu)


@kernel_op
def batch_norm_inference(x, gamma, beta, mean, var, eps=1e-5, activation=None):
    """Batch normalisation with given statistics: ``gamma*(x - mean)/sqrt(var + eps) + beta``.

    ``mean``, ``var``: float32 (C,) running statistics (float32 for every model dtype, as
    cuDNN requires). Returns an array of x's shape and dtype.
    """
    g, eps = chk.validate_batch_norm_inference(x, gamma, beta, mean, var, eps, activation)
    dev = device_of(x)
    if x.size == 0:
        return dev.zeros(g.shape, x.dtype)
    x, gamma, beta, mean, var = _contiguous(dev, x, gamma, beta, mean, var)
    relu = activation == "relu"
    return _launch(dev, dev.kernels.batch_norm_inference, x, gamma, beta, mean, var, g, eps, relu)


@kernel_op
def batch_norm_backward(dy, x, gamma, mean, var, eps=1e-5, y=None):
    """Gradients of :func:`batch_norm_forward` (training mode).

    Parameters
    ----------
    dy, x : ndarray, (N, C) or (N, C, H, W)
    gamma : ndarray, (C,), x's dtype
    mean, var : ndarray, (C,), float32
        What the forward pass returned.
    y : ndarray, optional
        The forward's output when it fused a ReLU: ``dy`` is masked by ``y > 0`` in the same
        pass.

    Returns
    -------
    dx : ndarray, x's shape; dgamma, dbeta : ndarray, (C,); all in x's dtype
        ``dx = gamma*invstd/M * (M*dy - sum(dy) - xhat*sum(dy*xhat))``, ``M = N*H*W``.
    """
    g, eps = chk.validate_batch_norm_backward(dy, x, gamma, mean, var, eps, y)
    dev = device_of(x)
    if g.N == 0 or g.C == 0:  # sums over an empty batch: zero parameter gradients
        zero = dev.zeros((g.C,), x.dtype)
        return dev.zeros(g.shape, x.dtype), zero, dev.zeros((g.C,), x.dtype)
    dy, x, gamma, mean, var, y = _contiguous(dev, dy, x, gamma, mean, var, y)
    return _launch(dev, dev.kernels.batch_norm_backward, dy, x, gamma, mean, var, g, eps, y)


@kernel_op
def batch_norm_inference_backward(dy, gamma, var, eps=1e-5, y=None):
    """dx of :func:`batch_norm_inference` (a frozen BatchNorm layer): ``dy*gamma/sqrt(var+eps)``,
    with ``dy`` masked by ``y > 0`` when the forward fused a ReLU and ``y`` is given."""
    g, eps = chk.validate_batch_norm_inference_backward(dy, gamma, var, eps, y)
    dev = device_of(dy)
    if dy.size == 0:
        return dev.zeros(g.shape, dy.dtype)
    dy, gamma, var, y = _contiguous(dev, dy, gamma, var, y)
    return _launch(dev, dev.kernels.batch_norm_inference_backward, dy, gamma, var, g, eps, y)


def fold_batch_norm(w, b, gamma, beta, mean, var, eps=1e-5):
    """Fold an inference-mode batch norm into the conv or dense layer before it.

    Parameters
    ----------
    w : ndarray, (F, C, kh, kw) (conv) or (in, F) (dense)
    b : ndarray, (F,), or None (no bias)
    gamma, beta : ndarray, (F,), w's dtype
    mean, var : ndarray, (F,), float32

    Returns
    -------
    w_folded, b_folded : ndarrays of w's dtype, computed in float32
        ``conv(x, w_folded, b_folded) == batch_norm_inference(conv(x, w, b), ...)``.
    """
    F, eps = chk.validate_fold_batch_norm(w, b, gamma, beta, mean, var, eps)
    xp = device_of(w).xp
    f32 = np.float32
    scale = gamma.astype(f32) / xp.sqrt(var + f32(eps))
    per_channel = scale.reshape(-1, 1, 1, 1) if w.ndim == 4 else scale.reshape(1, -1)
    w_folded = (w.astype(f32) * per_channel).astype(w.dtype)
    bias = xp.zeros(F, dtype=f32) if b is None else b.astype(f32)
    b_folded = ((bias - mean) * scale + beta.astype(f32)).astype(w.dtype)
    return w_folded, b_folded


# --- global average pooling ----------------------------------------------------------------------


@kernel_op
def global_avg_pool2d(x):
    """Mean of each channel plane: (N, C, H, W) -> (N, C), any H, W >= 1, x's dtype."""
    g = chk.validate_global_avg_pool(x)
    dev = device_of(x)
    if x.size == 0:
        return dev.zeros((g.N, g.C), x.dtype)
    (x,) = _contiguous(dev, x)
    return _launch(dev, dev.kernels.global_avg_pool2d, x, g)


@kernel_op
def global_avg_pool2d_backward(dy, x_shape):
    """Gradient of :func:`global_avg_pool2d`: (N, C) -> ``x_shape``, every pixel ``dy/(H*W)``."""
    g = chk.validate_global_avg_pool_backward(dy, x_shape)
    dev = device_of(dy)
    if g.N == 0:
        return dev.zeros(g.shape, dy.dtype)
    (dy,) = _contiguous(dev, dy)
    return _launch(dev, dev.kernels.global_avg_pool2d_backward, dy, g)


# --- dense and ReLU -------------------------------------------------------------------------------


@kernel_op
def dense(x, w, b=None, activation=None):
    """Fully connected layer ``act(x @ w + b)``.

    Parameters
    ----------
    x : ndarray, (N, in)
    w : ndarray, (in, out) (Keras layout)
    b : ndarray, (out,), optional
    activation : None or "relu", fused into the store

    Returns
    -------
    ndarray, (N, out), x's dtype (float32 accumulation)
    """
    g = chk.validate_dense(x, w, b, activation)
    dev = device_of(x)
    if g.N == 0 or g.F == 0:
        return dev.zeros((g.N, g.F), x.dtype)
    x, w, b = _contiguous(dev, x, w, b)
    return _launch(dev, dev.kernels.dense, x, w, b, g, activation == "relu")


@kernel_op
def dense_backward(dy, x, w, need_dx=True):
    """Gradients of :func:`dense` (without activation).

    Returns
    -------
    dx : ndarray, (N, in), or None when ``need_dx`` is False
    dw : ndarray, (in, out)
    db : ndarray, (out,)
    """
    g = chk.validate_dense_backward(dy, x, w, need_dx)
    dev = device_of(x)
    if g.N == 0:
        dx = dev.zeros((0, g.K), x.dtype) if need_dx else None
        return dx, dev.zeros((g.K, g.F), x.dtype), dev.zeros((g.F,), x.dtype)
    dy, x, w = _contiguous(dev, dy, x, w)
    return _launch(dev, dev.kernels.dense_backward, dy, x, w, g, need_dx=bool(need_dx))


@kernel_op
def relu(x):
    """``max(x, 0)`` for any shape; NaN propagates. Returns a new array of x's dtype."""
    chk.validate_elementwise(x)
    dev = device_of(x)
    if x.size == 0:
        return dev.zeros(x.shape, x.dtype)
    (x,) = _contiguous(dev, x)
    return _launch(dev, dev.kernels.relu, x)


@kernel_op
def relu_backward(dy, y, out=None):
    """ReLU gradient seen through its output: ``dy * (y > 0)``.

    ``out``: optional C-contiguous array of dy's shape and dtype (not ``dy`` or ``y``) to
    write into, e.g. a buffer reused from step to step; it is returned.
    """
    chk.validate_elementwise_backward(dy, y, out, "y")
    dev = device_of(dy)
    if dy.size == 0:
        return out if out is not None else dev.zeros(dy.shape, dy.dtype)
    dy, y = _contiguous(dev, dy, y)
    return _launch(dev, dev.kernels.relu_backward, dy, y, out)


@kernel_op
def leaky_relu(x, alpha=0.01):
    """``x`` where ``x > 0``, else ``alpha * x``, for any shape (NaN propagates; float16
    multiplies in float32). ``alpha`` defaults to PyTorch's 0.01 (``nn.LeakyReLU``'s default
    is Keras's 0.3). Returns a new array of x's dtype."""
    chk.validate_elementwise(x)
    alpha = chk.as_finite_float32(alpha, "alpha")
    dev = device_of(x)
    if x.size == 0:
        return dev.zeros(x.shape, x.dtype)
    (x,) = _contiguous(dev, x)
    return _launch(dev, dev.kernels.leaky_relu, x, alpha)


@kernel_op
def leaky_relu_backward(dy, x, alpha=0.01, out=None):
    """Gradient of :func:`leaky_relu` through its input: ``dy`` where ``x > 0``, else
    ``alpha * dy``; ``out`` as for :func:`relu_backward`."""
    chk.validate_elementwise_backward(dy, x, out, "x")
    alpha = chk.as_finite_float32(alpha, "alpha")
    dev = device_of(dy)
    if dy.size == 0:
        return out if out is not None else dev.zeros(dy.shape, dy.dtype)
    dy, x = _contiguous(dev, dy, x)
    return _launch(dev, dev.kernels.leaky_relu_backward, dy, x, alpha, out)


def _bounds(lo, hi):
    lo, hi = chk.as_finite_float32(lo, "lo"), chk.as_finite_float32(hi, "hi")
    if not lo <= hi:
        raise ValueError(f"lo must be at most hi, got lo={lo}, hi={hi}")
    return lo, hi


@kernel_op
def clip(x, lo=0.0, hi=6.0):
    """``min(max(x, lo), hi)`` for any shape (``torch.clamp``; NaN propagates); the defaults
    are ReLU6's. ``lo <= hi``, finite in float32, rounded once to x's dtype. Returns a new
    array of x's dtype."""
    chk.validate_elementwise(x)
    lo, hi = _bounds(lo, hi)
    dev = device_of(x)
    if x.size == 0:
        return dev.zeros(x.shape, x.dtype)
    (x,) = _contiguous(dev, x)
    return _launch(dev, dev.kernels.clip, x, lo, hi)


@kernel_op
def clip_backward(dy, x, lo=0.0, hi=6.0, out=None):
    """Gradient of :func:`clip` through its input: ``dy`` where ``lo < x < hi``, else 0 (the
    kinks included, as PyTorch's hardtanh; a NaN input too, as PyTorch's vectorised loop,
    whose scalar tail lets dy through); ``out`` as for :func:`relu_backward`."""
    chk.validate_elementwise_backward(dy, x, out, "x")
    lo, hi = _bounds(lo, hi)
    dev = device_of(dy)
    if dy.size == 0:
        return out if out is not None else dev.zeros(dy.shape, dy.dtype)
    dy, x = _contiguous(dev, dy, x)
    return _launch(dev, dev.kernels.clip_backward, dy, x, lo, hi, out)


# --- augmentation ------------------------------------------------------------------------------


@kernel_op
def warp_bilinear(x, theta, flow=None, out_size=None):
    """Resample each image through its own affine map (and displacement field), bilinearly.

    Parameters
    ----------
    x : ndarray, (N, C, H, W), float32 or float16
    theta : ndarray, (N, 2, 3), float32
        Per sample, the map from output pixel ``(j, i)`` (column, row) to the source point
        ``(sx, sy) = theta[n] @ (j, i, 1)``, in pixel units (pixel centres at integers).
    flow : ndarray, (N, 2, OH, OW), float32, optional
        Displacements ``(dx, dy)`` added to the source point of each output pixel.
    out_size : int or (int, int), optional
        ``(OH, OW)``; default ``(H, W)``.

    Returns
    -------
    ndarray, (N, C, OH, OW), same dtype as ``x``
        Source points outside the image read as 0. Integer source points copy the pixel
        exactly (a neighbour with bilinear weight 0 is never read).
    """
    out_hw = chk.validate_warp(x, theta, flow, out_size)
    dev = device_of(x)
    if x.size == 0:
        return dev.zeros((*x.shape[:2], *out_hw), x.dtype)
    x, theta, flow = _contiguous(dev, x, theta, flow)
    # The augmentation kernels have no parallel region: they run outside the launch guard, so
    # the batch loader's thread never waits for the training step's kernels.
    return dev.kernels.warp_bilinear(x, theta, flow, out_hw)


def gaussian_taps(sigma: float, truncate: float = 3.0) -> np.ndarray:
    """Normalised float32 Gaussian taps of ``sigma`` (radius ``ceil(truncate * sigma)``)."""
    radius = max(1, int(np.ceil(truncate * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (t / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


@kernel_op
def gaussian_blur(fields, sigma):
    """Separable Gaussian blur of float32 planes ``fields`` (P, H, W), zero outside each plane
    (``scipy.ndimage.gaussian_filter(mode="constant", truncate=3)`` per plane)."""
    sigma = chk.validate_blur(fields, sigma)
    dev = device_of(fields)
    if fields.size == 0:
        return dev.zeros(fields.shape, fields.dtype)
    (fields,) = _contiguous(dev, fields)
    taps = gaussian_taps(sigma)
    return dev.kernels.gaussian_blur(fields, dev.asarray(taps))  # serial, as warp_bilinear


# --- devices -----------------------------------------------------------------------------------


def gpu_available() -> bool:
    """True when CuPy is installed and a CUDA device is usable. Never raises."""
    try:
        from . import gpu

        return gpu.available()
    except Exception:
        return False


def to_gpu(x):
    """Copy a NumPy array to the current CUDA device (a CuPy array is returned as is).

    Raises
    ------
    RuntimeError
        Saying why no GPU can be used (CuPy missing, no device, driver too old).
    """
    from . import gpu

    return gpu.to_gpu(x)


def to_cpu(x):
    """Return ``x`` as a NumPy array (copying from the GPU if needed)."""
    if not chk.is_array(x):
        raise TypeError(f"x must be a numpy.ndarray or cupy.ndarray, got {type(x).__name__}")
    return CPU.asarray(x)


# --- optimizer updates (used by fastconv.nn.optimizers; not part of the public kernel API) --------


def adam_update(p, g, m, v, beta1, beta2, lr_t, eps):
    """One Adam step in place, the book's form: ``m += (1-beta1)*(g - m);
    v += (1-beta2)*(g*g - v);  p -= lr_t*m / (sqrt(v) + eps)``, all in float32.

    ``p``, ``g``, ``m``, ``v``: float32 arrays of one shape (NumPy or CuPy). One fused pass where
    :func:`fastconv.kernels.fusable_update` allows: on the CPU a parallel Numba kernel
    (:mod:`fastconv.cpu.optim`), on the GPU one CUDA kernel launch (``kernels/optim.cu``); both
    bit-identical to the array expressions of :meth:`fastconv.kernels.Kernels.adam_update` used
    otherwise (the GPU flushes float32 subnormals to zero).
    """
    dev = device_of(p)
    c1, c2 = np.float32(1 - beta1), np.float32(1 - beta2)
    with dev.launch_guard():
        dev.kernels.adam_update(p, g, m, v, c1, c2, np.float32(lr_t), np.float32(eps))


def momentum_update(p, g, v, momentum, lr):
    """One momentum step in place: ``v = momentum*v - lr*g;  p += v`` (float32; fused on the
    CPU and on the GPU, bit-identical to the array expressions)."""
    dev = device_of(p)
    with dev.launch_guard():
        dev.kernels.momentum_update(p, g, v, np.float32(momentum), np.float32(lr))


def sgd_update(p, g, lr):
    """One SGD step in place: ``p -= lr*g`` (float32; fused on the CPU, bit-identical to the
    array expression)."""
    dev = device_of(p)
    with dev.launch_guard():
        dev.kernels.sgd_update(p, g, np.float32(lr))


def nesterov_update(p, g, v, momentum, lr):
    """One step of the book's Nesterov form in place: ``v = momentum*v - lr*g;
    p += momentum*momentum*v - (1+momentum)*lr*g`` (float32; fused on the CPU, bit-identical
    to the array expressions)."""
    m, lr = np.float32(momentum), np.float32(lr)
    mm, c = m * m, (1 + m) * lr  # float32 scalars, rounded as the expressions round them
    dev = device_of(p)
    with dev.launch_guard():
        dev.kernels.nesterov_update(p, g, v, m, lr, mm, c)


def adagrad_update(p, g, h, lr, eps):
    """One AdaGrad step in place: ``h += g*g;  p -= lr*g / (sqrt(h) + eps)`` (float32; fused on
    the CPU, bit-identical to the array expressions)."""
    dev = device_of(p)
    with dev.launch_guard():
        dev.kernels.adagrad_update(p, g, h, np.float32(lr), np.float32(eps))


def rmsprop_update(p, g, h, decay_rate, lr, eps):
    """One RMSProp step in place: ``h = decay_rate*h + (1-decay_rate)*g*g;
    p -= lr*g / (sqrt(h) + eps)`` (float32; fused on the CPU, bit-identical to the array
    expressions)."""
    d = np.float32(decay_rate)
    c = 1 - d  # a float32 scalar, as in the expression
    dev = device_of(p)
    with dev.launch_guard():
        dev.kernels.rmsprop_update(p, g, h, d, c, np.float32(lr), np.float32(eps))
