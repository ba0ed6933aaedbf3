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

from ._checks import as_int, as_pair, check_x_shape, window_geometry

__all__ = [
    "im2col",
    "col2im",
    "conv2d",
    "conv2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
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


def conv2d(x, w, b=None, stride=1, pad=0, activation=None):
    """Cross-correlation ``y[n,f] = sum_c x[n,c] * w[f,c] + b[f]``, optionally followed by ReLU."""
    x, w = _f64(x, "x"), np.asarray(w, dtype=np.float64)
    g = window_geometry(x.shape, w.shape[2:], stride, pad)
    y = np.einsum("ncxyij,fcij->nfxy", _windows(_pad(x, g), g), w, optimize=True)
    if b is not None:
        y += np.asarray(b, dtype=np.float64)[None, :, None, None]
    if activation == "relu":
        y = np.maximum(y, 0.0)
    return y


def conv2d_backward(dy, x, w, stride=1, pad=0):
    """Gradients ``(dx, dw, db)`` of :func:`conv2d` (without activation) given ``dy``."""
    dy, x, w = _f64(dy, "dy"), _f64(x, "x"), np.asarray(w, dtype=np.float64)
    g = window_geometry(x.shape, w.shape[2:], stride, pad)
    win = _windows(_pad(x, g), g)
    dw = np.einsum("nfxy,ncxyij->fcij", dy, win, optimize=True)
    db = dy.sum(axis=(0, 2, 3))
    contrib = np.einsum("nfxy,fcij->ncxyij", dy, w, optimize=True)
    dx = _scatter_windows(contrib, g)
    return dx, dw, db


def _pool_geometry(x_shape, size, stride, pad, ceil_mode=False):
    kernel = as_pair(size, "size", 1)
    stride = kernel if stride is None else stride
    return window_geometry(x_shape, kernel, stride, pad, "window", ceil_mode=bool(ceil_mode))


def _window_counts(g):
    """(OH, OW) divisors of average pooling: the window's cells inside the zero-padded input
    (kh*kw, except for ceil-mode windows running past it)."""
    inside = _pad(np.ones((1, 1, g.H, g.W)), g, value=1.0, beyond=0.0)
    return _windows(inside, g).sum(axis=(4, 5))[0, 0]


def max_pool2d(x, size=2, stride=None, pad=0, ceil_mode=False):
    """Max over each window; padding is -inf so it never wins. NaN propagates."""
    x = _f64(x, "x")
    g = _pool_geometry(x.shape, size, stride, pad, ceil_mode)
    win = _windows(_pad(x, g, -np.inf), g)
    return win.max(axis=(4, 5))


def max_pool2d_backward(dy, x, size=2, stride=None, pad=0, ceil_mode=False):
    """Route each output gradient to the first maximum of its window (row-major), as PyTorch."""
    dy, x = _f64(dy, "dy"), _f64(x, "x")
    g = _pool_geometry(x.shape, size, stride, pad, ceil_mode)
    win = _windows(_pad(x, g, -np.inf), g).reshape(g.N, g.C, g.OH, g.OW, g.kh * g.kw)
    real = _windows(_pad(np.ones(x.shape, bool), g, False), g).reshape(win.shape)
    m = win.max(axis=-1, keepdims=True)  # NaN if the window holds one
    # The first real pixel equal to the max (or the first NaN): padding must not take the
    # gradient even when the window's real pixels are all -inf, as in PyTorch.
    hit = ((win == m) | (np.isnan(win) & np.isnan(m))) & real
    first = np.argmax(hit, axis=-1)
    onehot = np.zeros(win.shape)
    np.put_along_axis(onehot, first[..., None], 1.0, axis=-1)
    contrib = (onehot * dy[..., None]).reshape(g.N, g.C, g.OH, g.OW, g.kh, g.kw)
    return _scatter_windows(contrib, g)


def avg_pool2d(x, size=2, stride=None, pad=0, ceil_mode=False):
    """Mean over each window, zero padding counted in the divisor (PyTorch's default); a
    ceil-mode window past the padded input divides by its cells inside it (as PyTorch)."""
    x = _f64(x, "x")
    g = _pool_geometry(x.shape, size, stride, pad, ceil_mode)
    return _windows(_pad(x, g), g).sum(axis=(4, 5)) / _window_counts(g)


def avg_pool2d_backward(dy, x_shape, size=2, stride=None, pad=0, ceil_mode=False):
    """Gradient of :func:`avg_pool2d`: each window gets ``dy`` over its divisor."""
    dy = _f64(dy, "dy")
    g = _pool_geometry(check_x_shape(x_shape), size, stride, pad, ceil_mode)
    contrib = np.broadcast_to(
        (dy / _window_counts(g))[..., None, None], (g.N, g.C, g.OH, g.OW, g.kh, g.kw)
    )
    return _scatter_windows(contrib, g)
