"""Global average pooling on the CPU: (N, C, H, W) -> (N, C) and back, float32 and float16.

Both passes run ``prange`` over images: each thread owns whole images, so every output is
written by one thread and each mean is a float32 sum of one contiguous plane in a fixed order
(deterministic). The backward pass converts ``dy[n, c] / (H*W)`` once per plane and fills the
plane with it (half bits copied, not re-rounded per pixel). Small problems run serially: a
parallel region costs more to start than they take.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._half import bits_view, load, store_value

__all__ = ["global_avg_pool2d", "global_avg_pool2d_backward"]

_FASTMATH = {"contract", "reassoc", "arcp", "nsz"}  # vectorised sums; NaN/inf still propagate
_SERIAL_BELOW = 1 << 15  # elements of x


@njit(inline="always", fastmath=_FASTMATH)
def _mean_row(x, y, n):
    C, P = x.shape[1], x.shape[2]
    for c in range(C):
        s = np.float32(0.0)
        for p in range(P):
            s += load(x[n, c, p])
        y[n, c] = store_value(y, s / np.float32(P))


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _forward(x, y):
    for n in prange(x.shape[0]):
        _mean_row(x, y, n)


@njit(cache=True, fastmath=_FASTMATH)
def _forward_serial(x, y):
    for n in range(x.shape[0]):
        _mean_row(x, y, n)


@njit(inline="always")
def _fill_row(dy, dx, n):
    C, P = dx.shape[1], dx.shape[2]
    for c in range(C):
        v = store_value(dx, load(dy[n, c]) / np.float32(P))
        for p in range(P):
            dx[n, c, p] = v


@njit(parallel=True, cache=True)
def _backward(dy, dx):
    for n in prange(dx.shape[0]):
        _fill_row(dy, dx, n)


@njit(cache=True)
def _backward_serial(dy, dx):
    for n in range(dx.shape[0]):
        _fill_row(dy, dx, n)


def global_avg_pool2d(x, g):
    """Backend of :func:`fastconv.global_avg_pool2d` (validated, C-contiguous, N >= 1)."""
    y = np.empty((g.N, g.C), dtype=x.dtype)
    kernel = _forward_serial if x.size < _SERIAL_BELOW else _forward
    kernel(bits_view(x).reshape(g.N, g.C, g.P), bits_view(y))
    return y


def global_avg_pool2d_backward(dy, g):
    """Backend of :func:`fastconv.global_avg_pool2d_backward`."""
    dx = np.empty(g.shape, dtype=dy.dtype)
    kernel = _backward_serial if dx.size < _SERIAL_BELOW else _backward
    kernel(bits_view(dy), bits_view(dx).reshape(g.N, g.C, g.P))
    return dx
