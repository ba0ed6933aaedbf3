"""Global average pooling on the CPU: (N, C, H, W) -> (N, C) and back, float32 and float16.

Both passes split the batch into blocks of images, one task per block, so every output is
written by one thread and each mean is a float32 sum of one contiguous plane in a fixed order
(deterministic; the sum's vectorised order depends only on H*W). The backward pass converts
``dy[n, c] / (H*W)`` once per plane and fills the plane with it (half bits copied, not rounded
per pixel). Small problems call the row functions directly, without a parallel region (even a
one-task region wakes the thread team, which under load can wait milliseconds).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from . import _outputs as outputs
from ._half import bits_view, load, store_value

__all__ = ["global_avg_pool2d", "global_avg_pool2d_backward"]

_FASTMATH = {"reassoc", "nsz"}  # vectorised plane sums; NaN/inf still propagate
_PARALLEL_MIN = 1 << 15  # elements of x; smaller problems run serially


@njit(cache=True, fastmath=_FASTMATH)
def _mean_rows(x, y, n0, n1):
    C, P = x.shape[1], x.shape[2]
    for n in range(n0, n1):
        for c in range(C):
            plane = x[n, c]
            s = np.float32(0.0)
            for p in range(P):
                s += load(plane[p])
            y[n, c] = store_value(y, s / np.float32(P))


@njit(parallel=True, cache=True)
def _forward(x, y, rows):
    N = x.shape[0]
    for b in prange((N + rows - 1) // rows):
        _mean_rows(x, y, b * rows, min(N, (b + 1) * rows))


@njit(cache=True)
def _fill_rows(dy, dx, n0, n1):
    C, P = dx.shape[1], dx.shape[2]
    for n in range(n0, n1):
        for c in range(C):
            v = store_value(dx, load(dy[n, c]) / np.float32(P))
            plane = dx[n, c]
            for p in range(P):
                plane[p] = v


@njit(parallel=True, cache=True)
def _backward(dy, dx, rows):
    N = dx.shape[0]
    for b in prange((N + rows - 1) // rows):
        _fill_rows(dy, dx, b * rows, min(N, (b + 1) * rows))


def _rows_per_task(g) -> int:
    return -(-g.N // numba.config.NUMBA_NUM_THREADS)


def global_avg_pool2d(x, g):
    """Backend of :func:`fastconv.global_avg_pool2d` (validated, C-contiguous, non-empty)."""
    y = outputs.empty((g.N, g.C), x.dtype)
    xv, yv = bits_view(x).reshape(g.N, g.C, g.P), bits_view(y)
    if x.size < _PARALLEL_MIN:
        _mean_rows(xv, yv, 0, g.N)
    else:
        _forward(xv, yv, _rows_per_task(g))
    return y


def global_avg_pool2d_backward(dy, g):
    """Backend of :func:`fastconv.global_avg_pool2d_backward`."""
    dx = np.empty(g.shape, dtype=dy.dtype)
    dyv, dxv = bits_view(dy), bits_view(dx).reshape(g.N, g.C, g.P)
    if dx.size < _PARALLEL_MIN:
        _fill_rows(dyv, dxv, 0, g.N)
    else:
        _backward(dyv, dxv, _rows_per_task(g))
    return dx


class GlobalPoolKernels:
    """This module's ops as methods of the CPU kernel set (:class:`fastconv.cpu.CpuKernels`
    inherits them): adding an op here registers it there."""

    global_avg_pool2d = staticmethod(global_avg_pool2d)
    global_avg_pool2d_backward = staticmethod(global_avg_pool2d_backward)
