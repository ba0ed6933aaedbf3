"""Plain NumPy float64 oracle for every kernel: the tests' reference and the benchmarks' baseline.

Written for clarity, not speed, and independently of the fast kernels: convolution and
pooling go through ``sliding_window_view`` + ``einsum`` rather than through im2col, so
a bug shared by im2col and the fast conv path cannot hide. Every function accepts any
float array, computes in float64 and returns float64. Arguments are validated with the
same rules as the public API, except that float64 input is allowed here.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ._checks import (
    CONV_ALGORITHMS,
    as_int,
    check_x_shape,
    pool_pads,
    validate_conv,
    window_geometry,
)
from .kernels import Kernels

__all__ = [
    "im2col",
    "col2im",
    "conv2d",
    "conv2d_backward",
    "grouped_conv2d",
    "grouped_conv2d_backward",
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
    "ReferenceKernels",
    "KERNELS",
]


def _f64(a, name):
    a = np.asarray(a)
    if a.ndim != 4 and name in ("x", "dy"):
        raise ValueError(f"{name} must be 4-dimensional, got shape {a.shape}")
    return a.astype(np.float64)


def _windows(xp, g):
    """(N, C, OH, OW, kh, kw) view of the padded input's windows."""
    return sliding_window_view(xp, (g.kh, g.kw), axis=(2, 3))[:, :, :: g.sh, :: g.sw][
        :, :, : g.OH, : g.OW
    ]


def _overhang(g):
    """Rows and columns that ceil-mode windows reach past the padded input (0 otherwise)."""
    eh = max(0, (g.OH - 1) * g.sh + g.kh - (g.H + 2 * g.ph))
    ew = max(0, (g.OW - 1) * g.sw + g.kw - (g.W + 2 * g.pw))
    return eh, ew


def _pad(x, g, value=0.0, beyond=None):
    """Pad with ``value``; the ceil-mode overhang past the padding with ``beyond`` (default
    ``value``)."""
    eh, ew = _overhang(g)
    xp = np.pad(x, ((0, 0), (0, 0), (g.ph, g.ph), (g.pw, g.pw)), constant_values=value)
    if eh or ew:
        fill = value if beyond is None else beyond
        xp = np.pad(xp, ((0, 0), (0, 0), (0, eh), (0, ew)), constant_values=fill)
    return xp


def _crop(xp, g):
    return xp[:, :, g.ph : g.ph + g.H, g.pw : g.pw + g.W]


def _scatter_windows(contrib, g):
    """Sum ``contrib`` (N, C, OH, OW, kh, kw) back onto the padded image; return it cropped."""
    eh, ew = _overhang(g)
    xp = np.zeros((g.N, g.C, g.H + 2 * g.ph + eh, g.W + 2 * g.pw + ew))
    for i in range(g.kh):
        for j in range(g.kw):
            xp[:, :, i : i + g.sh * g.OH : g.sh, j : j + g.sw * g.OW : g.sw] += contrib[..., i, j]
    return _crop(xp, g)


def im2col(x, kh, kw, stride=1, pad=0):
    """Unfold windows into rows: shape (N*OH*OW, C*kh*kw), rows (n, oh, ow), columns (c, i, j)."""
    x = _f64(x, "x")
    g = window_geometry(x.shape, (as_int(kh, "kh", 1), as_int(kw, "kw", 1)), stride, pad)
    win = _windows(_pad(x, g), g)  # N, C, OH, OW, kh, kw
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(g.N * g.OH * g.OW, g.C * g.kh * g.kw)


def col2im(cols, x_shape, kh, kw, stride=1, pad=0):
    """Adjoint of :func:`im2col`: scatter-add rows back into an (N, C, H, W) image."""
    cols = np.asarray(cols, dtype=np.float64)
    g = window_geometry(
        check_x_shape(x_shape), (as_int(kh, "kh", 1), as_int(kw, "kw", 1)), stride, pad
    )
    contrib = cols.reshape(g.N, g.OH, g.OW, g.C, g.kh, g.kw).transpose(0, 3, 1, 2, 4, 5)
    return _scatter_windows(contrib, g)


def _conv_problem(x, w, stride, pad, groups, dilation):
    """Validated sizes, and the input zero-padded on its four sides."""
    p = validate_conv(x.astype(np.float32), w.astype(np.float32), None, stride, pad, None,
                      groups, dilation)  # fmt: skip
    t, bottom, left, right = p.pads
    xp = np.pad(x, ((0, 0), (0, 0), (t, bottom), (left, right)))
    return p, xp


def _tap(p, i, j):
    """The slice of the padded input that kernel tap ``(i, j)`` meets at every output."""
    r, c = i * p.dh, j * p.dw
    rows = slice(r, r + p.sh * (p.OH - 1) + 1, p.sh)
    cols = slice(c, c + p.sw * (p.OW - 1) + 1, p.sw)
    return slice(None), slice(None), rows, cols


def conv2d(x, w, b=None, stride=1, pad=0, activation=None, groups=1, dilation=1):
    """Cross-correlation ``y[n,f] = sum_c x[n,c] * w[f,c] + b[f]`` over channel groups, optionally
    followed by ReLU: written as a sum over the kernel's taps (each a strided slice of the padded
    input), so it shares nothing with the kernels' windows, im2col or Winograd.

    ``pad``: int, ``(h, w)`` or ``(top, bottom, left, right)``; ``dilation``: int or ``(dh, dw)``;
    ``w``: ``(F, C // groups, kh, kw)``."""
    x, w = _f64(x, "x"), np.asarray(w, dtype=np.float64)
    p, xp = _conv_problem(x, w, stride, pad, groups, dilation)
    G, Fg, Cg = p.groups, p.F // p.groups, p.C // p.groups
    wg = w.reshape(G, Fg, Cg, p.kh, p.kw)
    y = np.zeros((p.N, G, Fg, p.OH, p.OW))
    for i in range(p.kh):
        for j in range(p.kw):
            xs = xp[_tap(p, i, j)].reshape(p.N, G, Cg, p.OH, p.OW)
            y += np.einsum("ngcxy,gfc->ngfxy", xs, wg[..., i, j])
    y = y.reshape(p.N, p.F, p.OH, p.OW)
    if b is not None:
        y += np.asarray(b, dtype=np.float64)[None, :, None, None]
    if activation == "relu":
        y = np.maximum(y, 0.0)
    return y


def conv2d_backward(dy, x, w, stride=1, pad=0, groups=1, dilation=1):
    """Gradients ``(dx, dw, db)`` of :func:`conv2d` (without activation) given ``dy``: each tap's
    share of ``dw`` from its input slice, and of ``dx`` scattered back onto that slice."""
    dy, x, w = _f64(dy, "dy"), _f64(x, "x"), np.asarray(w, dtype=np.float64)
    p, xp = _conv_problem(x, w, stride, pad, groups, dilation)
    G, Fg, Cg = p.groups, p.F // p.groups, p.C // p.groups
    wg = w.reshape(G, Fg, Cg, p.kh, p.kw)
    dyg = dy.reshape(p.N, G, Fg, p.OH, p.OW)
    dxp = np.zeros_like(xp)
    dw = np.zeros((G, Fg, Cg, p.kh, p.kw))
    for i in range(p.kh):
        for j in range(p.kw):
            tap = _tap(p, i, j)
            xs = xp[tap].reshape(p.N, G, Cg, p.OH, p.OW)
            dw[..., i, j] = np.einsum("ngfxy,ngcxy->gfc", dyg, xs)
            dxp[tap] += np.einsum("ngfxy,gfc->ngcxy", dyg, wg[..., i, j]).reshape(
                p.N, p.C, p.OH, p.OW
            )
    t, _, left, _ = p.pads
    dx = dxp[:, :, t : t + p.H, left : left + p.W]
    return dx, dw.reshape(w.shape), dy.sum(axis=(0, 2, 3))


def grouped_conv2d(x, w, b=None, stride=1, pad=0, activation=None, groups=1, dilation=1):
    """:func:`conv2d` (the direct grouped kernels' oracle: the same computation)."""
    return conv2d(x, w, b, stride, pad, activation, groups, dilation)


def grouped_conv2d_backward(dy, x, w, stride=1, pad=0, groups=1, dilation=1):
    """Gradients ``(dx, dw, db)`` of :func:`grouped_conv2d` (without activation)."""
    return conv2d_backward(dy, x, w, stride, pad, groups, dilation)


def _pool_geometry(x_shape, size, stride, pad, ceil_mode=False, max_pool=False,
                   count_include_pad=True):  # fmt: skip
    """The pooling problem as the public API validates it: ``(g, pads)``, ``g`` a symmetric
    :class:`Geometry` when the pads are symmetric, else None (no ceil_mode then)."""
    pads, extra, g = pool_pads(x_shape, size, stride, pad, max_pool, ceil_mode, count_include_pad)
    return (g if not any(extra) else None), pads, g


def _pooled(x, size, stride, pad, ceil_mode, max_pool, count_include_pad=True):
    """``(windows, real, counts)`` of a pooling: the padded input's windows (N, C, OH, OW, kh, kw)
    (padding -inf for max, 0 for average), a mask of the cells that are input pixels, and the
    divisor of each average (cells inside the padded input, or real cells only)."""
    sym, pads, g = _pool_geometry(x.shape, size, stride, pad, ceil_mode, max_pool,
                                  count_include_pad)  # fmt: skip
    fill = -np.inf if max_pool else 0.0
    if sym is not None:
        win = _windows(_pad(x, sym, fill), sym)
        real = _windows(_pad(np.ones(x.shape, bool), sym, False), sym)
        inside = _windows(_pad(np.ones((1, 1, sym.H, sym.W)), sym, 1.0, beyond=0.0), sym)
        real1 = _windows(_pad(np.ones((1, 1, sym.H, sym.W)), sym, 0.0), sym)
    else:  # asymmetric: each side padded as given, no ceil-mode overhang
        t, b, left, r = pads
        spec = ((0, 0), (0, 0), (t, b), (left, r))
        win = _windows(np.pad(x, spec, constant_values=fill), g)
        real = _windows(np.pad(np.ones(x.shape, bool), spec), g)
        inside = np.ones((1, 1, g.OH, g.OW, g.kh, g.kw))
        real1 = _windows(np.pad(np.ones((1, 1, *x.shape[2:])), spec), g)
    counts = (inside if count_include_pad else real1).sum(axis=(4, 5))[0, 0]
    return win, real, counts, sym, pads, g


def _scatter(contrib, x_shape, pads, sym, g):
    """Sum window contributions back onto the input (cropping the padding)."""
    if sym is not None:
        return _scatter_windows(contrib, sym)
    t, b, left, r = pads
    N, C, H, W = x_shape
    xp = np.zeros((N, C, H + t + b, W + left + r))
    for i in range(g.kh):
        for j in range(g.kw):
            xp[:, :, i : i + g.sh * g.OH : g.sh, j : j + g.sw * g.OW : g.sw] += contrib[..., i, j]
    return xp[:, :, t : t + H, left : left + W]


def max_pool2d(x, size=2, stride=None, pad=0, ceil_mode=False):
    """Max over each window; padding is -inf so it never wins. NaN propagates. ``pad``: int,
    ``(h, w)`` or ``(top, bottom, left, right)``."""
    x = _f64(x, "x")
    win = _pooled(x, size, stride, pad, ceil_mode, True)[0]
    return win.max(axis=(4, 5))


def max_pool2d_backward(dy, x, size=2, stride=None, pad=0, ceil_mode=False):
    """Route each output gradient to the first maximum of its window (row-major), as PyTorch."""
    dy, x = _f64(dy, "dy"), _f64(x, "x")
    win, real, _, sym, pads, g = _pooled(x, size, stride, pad, ceil_mode, True)
    win = win.reshape(*win.shape[:4], g.kh * g.kw)
    real = real.reshape(win.shape)
    m = win.max(axis=-1, keepdims=True)  # NaN if the window holds one
    # The first real pixel equal to the max (or the first NaN): padding must not take the
    # gradient even when the window's real pixels are all -inf, as in PyTorch.
    hit = ((win == m) | (np.isnan(win) & np.isnan(m))) & real
    first = np.argmax(hit, axis=-1)
    onehot = np.zeros(win.shape)
    np.put_along_axis(onehot, first[..., None], 1.0, axis=-1)
    contrib = (onehot * dy[..., None]).reshape(*win.shape[:4], g.kh, g.kw)
    return _scatter(contrib, x.shape, pads, sym, g)


def avg_pool2d(x, size=2, stride=None, pad=0, ceil_mode=False, count_include_pad=True):
    """Mean over each window. ``count_include_pad``: zero padding counted in the divisor
    (PyTorch's default; a ceil-mode window past the padded input divides by its cells inside
    it, as PyTorch); False: only the input's cells (ONNX's default, Keras's "same")."""
    x = _f64(x, "x")
    win, _, counts, *_ = _pooled(x, size, stride, pad, ceil_mode, False, count_include_pad)
    return win.sum(axis=(4, 5)) / counts


def avg_pool2d_backward(dy, x_shape, size=2, stride=None, pad=0, ceil_mode=False,
                        count_include_pad=True):  # fmt: skip
    """Gradient of :func:`avg_pool2d`: each window gets ``dy`` over its divisor."""
    dy = _f64(dy, "dy")
    x_shape = check_x_shape(x_shape)
    _, _, counts, sym, pads, g = _pooled(np.zeros(x_shape), size, stride, pad, ceil_mode, False,
                                         count_include_pad)  # fmt: skip
    N, C = x_shape[:2]
    contrib = np.broadcast_to((dy / counts)[..., None, None], (N, C, g.OH, g.OW, g.kh, g.kw))
    return _scatter(contrib, x_shape, pads, sym, g)


# --- batch normalisation, global pooling, dense, ReLU -------------------------------------------
#
# Written from the definitions, per channel, with the gradient of batch normalisation derived
# step by step through the chain rule (mean -> variance -> normalised value), not from the
# closed form the kernels use.


def _channel_axes(x):
    if x.ndim == 2:
        return (0,)
    if x.ndim == 4:
        return (0, 2, 3)
    raise ValueError(f"x must be 2- or 4-dimensional, got shape {x.shape}")


def _per_channel(v, x):
    """A (C,) vector shaped to broadcast against x (N, C) or (N, C, H, W)."""
    v = np.asarray(v, dtype=np.float64)
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def _relu64(y, activation):
    return np.maximum(y, 0.0) if activation == "relu" else y


def batch_norm_forward(x, gamma, beta, eps=1e-5, activation=None):
    """Training-mode batch norm: ``(y, mean, biased var)`` of each channel over N (, H, W)."""
    x = np.asarray(x, dtype=np.float64)
    axes = _channel_axes(x)
    count = int(np.prod([x.shape[a] for a in axes]))
    if count == 1:
        raise ValueError("more than 1 value per channel is needed in training (variance undefined)")
    mean = x.mean(axis=axes)
    var = ((x - _per_channel(mean, x)) ** 2).mean(axis=axes)
    xhat = (x - _per_channel(mean, x)) / np.sqrt(_per_channel(var, x) + eps)
    y = xhat * _per_channel(gamma, x) + _per_channel(beta, x)
    return _relu64(y, activation), mean, var


def batch_norm_inference(x, gamma, beta, mean, var, eps=1e-5, activation=None):
    """Batch norm with given (running) statistics."""
    x = np.asarray(x, dtype=np.float64)
    _channel_axes(x)
    xhat = (x - _per_channel(mean, x)) / np.sqrt(_per_channel(var, x) + eps)
    return _relu64(xhat * _per_channel(gamma, x) + _per_channel(beta, x), activation)


def _relu_masked(dy, y):
    dy = np.asarray(dy, dtype=np.float64)
    if y is None:
        return dy
    return dy * (np.asarray(y, dtype=np.float64) > 0)


def batch_norm_backward(dy, x, gamma, mean, var, eps=1e-5, y=None):
    """``(dx, dgamma, dbeta)`` of :func:`batch_norm_forward` at the statistics ``mean``, ``var``.

    ``y``: the forward's output when it fused a ReLU (``dy`` is masked by ``y > 0``).
    """
    x = np.asarray(x, dtype=np.float64)
    dy = _relu_masked(dy, y)
    axes = _channel_axes(x)
    count = int(np.prod([x.shape[a] for a in axes]))
    mu, v, gam = _per_channel(mean, x), _per_channel(var, x), _per_channel(gamma, x)
    xc = x - mu
    std_inv = 1.0 / np.sqrt(v + eps)
    dxhat = dy * gam
    # var = mean(xc**2), xhat = xc * (var + eps)**-1/2, xc = x - mean(x)
    dvar = np.sum(dxhat * xc * -0.5 * std_inv**3, axis=axes, keepdims=True)
    dmu = np.sum(-dxhat * std_inv, axis=axes, keepdims=True) + dvar * np.mean(
        -2.0 * xc, axis=axes, keepdims=True
    )
    dx = dxhat * std_inv + dvar * 2.0 * xc / count + dmu / count
    dgamma = np.sum(dy * xc * std_inv, axis=axes)
    dbeta = np.sum(dy, axis=axes)
    return dx, dgamma, dbeta


def batch_norm_inference_backward(dy, gamma, var, eps=1e-5, y=None):
    """dx of :func:`batch_norm_inference` (statistics held fixed)."""
    dy = _relu_masked(dy, y)
    return dy * _per_channel(gamma, dy) / np.sqrt(_per_channel(var, dy) + eps)


def fold_batch_norm(w, b, gamma, beta, mean, var, eps=1e-5):
    """Weights of a conv (F, C, kh, kw) or dense (in, F) layer with a following BN folded in."""
    w = np.asarray(w, dtype=np.float64)
    F = w.shape[0] if w.ndim == 4 else w.shape[1]
    b = np.zeros(F) if b is None else np.asarray(b, dtype=np.float64)
    s = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    w_folded = w * (s[:, None, None, None] if w.ndim == 4 else s[None, :])
    b_folded = (b - np.asarray(mean, np.float64)) * s + np.asarray(beta, np.float64)
    return w_folded, b_folded


def global_avg_pool2d(x):
    """(N, C, H, W) -> (N, C): the mean of each channel's plane."""
    x = _f64(x, "x")
    return x.mean(axis=(2, 3))


def global_avg_pool2d_backward(dy, x_shape):
    """Every pixel of channel (n, c) gets ``dy[n, c] / (H*W)``."""
    N, C, H, W = check_x_shape(x_shape)
    dy = np.asarray(dy, dtype=np.float64)
    return np.broadcast_to(dy[:, :, None, None] / (H * W), (N, C, H, W)).copy()


def dense(x, w, b=None, activation=None):
    """``x @ w + b`` (Keras layout ``w (in, out)``), optionally followed by ReLU."""
    y = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    if b is not None:
        y = y + np.asarray(b, np.float64)
    return _relu64(y, activation)


def dense_backward(dy, x, w):
    """``(dx, dw, db)`` of :func:`dense` without activation."""
    dy, x, w = (np.asarray(a, np.float64) for a in (dy, x, w))
    return dy @ w.T, x.T @ dy, dy.sum(axis=0)


def relu(x):
    """max(x, 0); NaN propagates."""
    return np.maximum(np.asarray(x, np.float64), 0.0)


def relu_backward(dy, y):
    """``dy * (y > 0)`` (a NaN or inf in ``dy`` where y <= 0 gives NaN, as the product does)."""
    return _relu_masked(dy, y)


def leaky_relu(x, alpha=0.01):
    """``x`` where ``x > 0``, else ``alpha * x``; NaN propagates."""
    x = np.asarray(x, np.float64)
    return np.where(x > 0, x, float(alpha) * x)


def leaky_relu_backward(dy, x, alpha=0.01):
    """``dy`` where ``x > 0``, else ``alpha * dy`` (PyTorch's rule, through the input)."""
    dy = np.asarray(dy, np.float64)
    return np.where(np.asarray(x, np.float64) > 0, dy, float(alpha) * dy)


def clip(x, lo, hi):
    """``lo`` below ``lo``, ``hi`` above ``hi``, else ``x``; NaN propagates."""
    x = np.asarray(x, np.float64)
    return np.where(x < lo, float(lo), np.where(x > hi, float(hi), x))


def clip_backward(dy, x, lo, hi):
    """``dy`` where ``lo < x < hi``, else 0 (the kinks and NaN included: PyTorch's vectorised
    hardtanh_backward; its scalar loop lets dy through a NaN)."""
    x = np.asarray(x, np.float64)
    return np.where((x > lo) & (x < hi), np.asarray(dy, np.float64), 0.0)


def warp_bilinear(x, theta, flow=None, out_hw=None):
    """Bilinear resampling: ``out[n, c, i, j] = x[n, c]`` at ``(sx, sy) = theta[n] @ (j, i, 1)``
    (+ ``flow[n, :, i, j]``), pixel centres at integers, 0 outside; a neighbour of weight 0 is
    not read (so NaN there does not spread)."""
    x = _f64(x, "x")
    N, C, H, W = x.shape
    OH, OW = (H, W) if out_hw is None else out_hw
    t = np.asarray(theta, np.float64).reshape(N, 2, 3)
    i, j = np.meshgrid(np.arange(OH, dtype=np.float64), np.arange(OW, dtype=np.float64),
                       indexing="ij")  # fmt: skip
    sx = t[:, 0, 0, None, None] * j + t[:, 0, 1, None, None] * i + t[:, 0, 2, None, None]
    sy = t[:, 1, 0, None, None] * j + t[:, 1, 1, None, None] * i + t[:, 1, 2, None, None]
    if flow is not None:
        flow = np.asarray(flow, np.float64)
        sx, sy = sx + flow[:, 0], sy + flow[:, 1]
    x0, y0 = np.floor(sx), np.floor(sy)
    fx, fy = sx - x0, sy - y0
    n = np.arange(N)[:, None, None]
    out = np.zeros((N, C, OH, OW))
    for dy_, wy in ((0, 1 - fy), (1, fy)):
        for dx_, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = (y0 + dy_).astype(np.int64), (x0 + dx_).astype(np.int64)
            read = (wx * wy != 0) & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            v = x[n, :, np.clip(yy, 0, H - 1), np.clip(xx, 0, W - 1)]  # (N, OH, OW, C)
            out += np.where(read[..., None], (wx * wy)[..., None] * v, 0.0).transpose(0, 3, 1, 2)
    return out


def gaussian_blur(fields, taps):
    """Separable convolution of planes ``fields`` (P, H, W) with centred ``taps``: along rows,
    then columns, zero outside each plane."""
    f = np.asarray(fields, np.float64)
    taps = np.asarray(taps, np.float64)
    r = (taps.size - 1) // 2
    H, W = f.shape[1:]
    padded = np.pad(f, ((0, 0), (0, 0), (r, r)))
    rows = sum(t * padded[:, :, k : k + W] for k, t in enumerate(taps))
    padded = np.pad(rows, ((0, 0), (r, r), (0, 0)))
    return sum(t * padded[:, k : k + H, :] for k, t in enumerate(taps))


# --- the float64 oracle as a backend of the kernel interface ------------------------------------


def _ceil_mode(g) -> bool:
    """Was geometry ``g`` made with ceil_mode (more windows than floor division gives)?"""
    return (g.H + 2 * g.ph - g.kh) // g.sh + 1 < g.OH or (g.W + 2 * g.pw - g.kw) // g.sw + 1 < g.OW


def _window_args(g) -> dict:
    return {"stride": (g.sh, g.sw), "pad": (g.ph, g.pw)}


def _pool_args(g) -> dict:
    return {"size": (g.kh, g.kw), **_window_args(g), "ceil_mode": _ceil_mode(g)}


class ReferenceKernels(Kernels):
    """The float64 oracle behind the :class:`~fastconv.kernels.Kernels` interface: each op
    computes in float64 and rounds once to the input's dtype (statistics to float32), so the
    conformance test can run the public API over it (validation, empty batches, dtypes)."""

    # One computation stands for every algorithm: a named one is accepted (and ignored).
    conv_algorithms = CONV_ALGORITHMS

    def im2col(self, x, g):
        return im2col(x, g.kh, g.kw, **_window_args(g)).astype(x.dtype)

    def col2im(self, cols, g):
        return col2im(cols, g.x_shape, g.kh, g.kw, **_window_args(g)).astype(cols.dtype)

    def conv2d(self, x, w, b, g, activation, algorithm=None):
        return conv2d(x, w, b, activation=activation, **_window_args(g)).astype(x.dtype)

    def conv2d_backward(self, dy, x, w, g, need_dx=True, algorithm=None):
        dx, dw, db = conv2d_backward(dy, x, w, **_window_args(g))
        return (dx.astype(x.dtype) if need_dx else None), dw.astype(x.dtype), db.astype(x.dtype)

    def grouped_conv2d(self, x, w, b, p, activation):
        args = {"stride": (p.sh, p.sw), "pad": p.pads, "groups": p.groups, "dilation": (p.dh, p.dw)}
        return grouped_conv2d(x, w, b, activation=activation, **args).astype(x.dtype)

    def grouped_conv2d_backward(self, dy, x, w, p, need_dx=True):
        args = {"stride": (p.sh, p.sw), "pad": p.pads, "groups": p.groups, "dilation": (p.dh, p.dw)}
        dx, dw, db = grouped_conv2d_backward(dy, x, w, **args)
        return (dx.astype(x.dtype) if need_dx else None), dw.astype(x.dtype), db.astype(x.dtype)

    def max_pool2d(self, x, g):
        return max_pool2d(x, **_pool_args(g)).astype(x.dtype)

    def max_pool2d_backward(self, dy, x, g):
        return max_pool2d_backward(dy, x, **_pool_args(g)).astype(x.dtype)

    def avg_pool2d(self, x, g):
        return avg_pool2d(x, **_pool_args(g)).astype(x.dtype)

    def avg_pool2d_backward(self, dy, g):
        return avg_pool2d_backward(dy, g.x_shape, **_pool_args(g)).astype(dy.dtype)

    def batch_norm_forward(self, x, gamma, beta, g, eps, relu):
        y, mean, var = batch_norm_forward(x, gamma, beta, eps, "relu" if relu else None)
        return y.astype(x.dtype), mean.astype(np.float32), var.astype(np.float32)

    def batch_norm_inference(self, x, gamma, beta, mean, var, g, eps, relu):
        y = batch_norm_inference(x, gamma, beta, mean, var, eps, "relu" if relu else None)
        return y.astype(x.dtype)

    def batch_norm_backward(self, dy, x, gamma, mean, var, g, eps, y=None):
        grads = batch_norm_backward(dy, x, gamma, mean, var, eps, y)
        return tuple(a.astype(x.dtype) for a in grads)

    def batch_norm_inference_backward(self, dy, gamma, var, g, eps, y=None):
        return batch_norm_inference_backward(dy, gamma, var, eps, y).astype(dy.dtype)

    def global_avg_pool2d(self, x, g):
        return global_avg_pool2d(x).astype(x.dtype)

    def global_avg_pool2d_backward(self, dy, g):
        return global_avg_pool2d_backward(dy, g.shape).astype(dy.dtype)

    def dense(self, x, w, b, g, relu):
        return dense(x, w, b, "relu" if relu else None).astype(x.dtype)

    def dense_backward(self, dy, x, w, g, need_dx=True):
        dx, dw, db = dense_backward(dy, x, w)
        return (dx.astype(x.dtype) if need_dx else None), dw.astype(x.dtype), db.astype(x.dtype)

    def relu(self, x):
        return relu(x).astype(x.dtype)

    def relu_backward(self, dy, y, out=None):
        result = relu_backward(dy, y).astype(dy.dtype)
        if out is None:
            return result
        out[...] = result
        return out

    def leaky_relu(self, x, alpha):
        return leaky_relu(x, alpha).astype(x.dtype)

    def leaky_relu_backward(self, dy, x, alpha, out=None):
        result = leaky_relu_backward(dy, x, alpha).astype(dy.dtype)
        if out is None:
            return result
        out[...] = result
        return out

    def clip(self, x, lo, hi):
        return clip(x, lo, hi).astype(x.dtype)

    def clip_backward(self, dy, x, lo, hi, out=None):
        result = clip_backward(dy, x, lo, hi).astype(dy.dtype)
        if out is None:
            return result
        out[...] = result
        return out

    def warp_bilinear(self, x, theta, flow, out_hw):
        return warp_bilinear(x, theta, flow, out_hw).astype(x.dtype)

    def gaussian_blur(self, fields, taps):
        return gaussian_blur(fields, taps).astype(fields.dtype)


KERNELS = ReferenceKernels()
