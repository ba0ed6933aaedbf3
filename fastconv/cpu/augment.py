"""Data-augmentation kernels on the CPU: bilinear warping and a separable Gaussian blur.

Serial ``@njit(nogil=True)`` kernels, on purpose: they run in the background batch loader's
thread while the training step runs Numba's parallel kernels in the main thread. Releasing the
GIL lets the two overlap; a parallel kernel here would have to take the process-wide launch
lock (see :mod:`fastconv.cpu._workspace`) and so wait for the training step instead. A batch of
100 MNIST digits is ~80k output pixels: well within one core's budget.

Arithmetic is float32 in the same order as ``gpu/kernels/augment.cu``, so the emulated CUDA
kernels reproduce these results bit for bit (the real GPU may contract multiply-adds into FMAs:
a few ulps apart). Arguments are validated by :func:`fastconv._checks.validate_warp` /
:func:`~fastconv._checks.validate_blur` before they get here (no bounds checks inside).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._half import bits_view, from_bits, load, store_value

__all__ = ["warp_bilinear", "gaussian_blur"]


@njit(nogil=True, cache=True)
def _warp(x, theta, flow, has_flow, out):
    """``out[n, c, i, j] = bilinear(x[n, c], sx, sy)`` with ``(sx, sy) = A_n (j, i, 1)``
    (+ ``flow[n, :, i, j]``); pixels outside the source read as 0.

    A neighbour whose bilinear weight is exactly 0 is not read at all, so integer source
    coordinates (identity, flips, 90-degree rotations, integer shifts) copy pixels exactly,
    NaN and inf included, and never touch a pixel they do not use.
    """
    N, C, H, W = x.shape
    OH, OW = out.shape[2], out.shape[3]
    one = np.float32(1.0)
    lo = np.float32(-2.0)
    hi_x = np.float32(W + 1)
    hi_y = np.float32(H + 1)
    for n in range(N):
        a0, a1, a2 = theta[n, 0], theta[n, 1], theta[n, 2]
        a3, a4, a5 = theta[n, 3], theta[n, 4], theta[n, 5]
        for c in range(C):
            src = x[n, c]
            dst = out[n, c]
            for i in range(OH):
                bx = a1 * np.float32(i)
                by = a4 * np.float32(i)
                for j in range(OW):
                    fj = np.float32(j)
                    sx = a0 * fj + bx + a2
                    sy = a3 * fj + by + a5
                    if has_flow:
                        sx = sx + flow[n, 0, i, j]
                        sy = sy + flow[n, 1, i, j]
                    # floor() by truncation of the coordinate clamped to [-2, size + 1]: far
                    # outside stays outside, no int overflow, and 2x faster than math.floor.
                    cx = min(max(sx, lo), hi_x)
                    cy = min(max(sy, lo), hi_y)
                    x0 = int(cx)
                    y0 = int(cy)
                    x0 -= np.float32(x0) > cx
                    y0 -= np.float32(y0) > cy
                    fx = sx - np.float32(x0)
                    fy = sy - np.float32(y0)
                    acc = np.float32(0.0)
                    if (y0 >= 0) & (y0 < H):
                        if (x0 >= 0) & (x0 < W):
                            acc += ((one - fx) * (one - fy)) * load(src[y0, x0])
                        if (fx != 0) & (x0 + 1 >= 0) & (x0 + 1 < W):
                            acc += (fx * (one - fy)) * load(src[y0, x0 + 1])
                    if (fy != 0) & (y0 + 1 >= 0) & (y0 + 1 < H):
                        if (x0 >= 0) & (x0 < W):
                            acc += ((one - fx) * fy) * load(src[y0 + 1, x0])
                        if (fx != 0) & (x0 + 1 >= 0) & (x0 + 1 < W):
                            acc += (fx * fy) * load(src[y0 + 1, x0 + 1])
                    dst[i, j] = store_value(dst, acc)


@njit(nogil=True, cache=True)
def _blur_axis(src, dst, taps, axis):
    """1-D convolution of each (H, W) plane with ``taps`` (odd length, centred) along
    ``axis`` (1: rows, along W; 0: columns, along H); zero outside the plane.

    Each output sums its in-range terms in ascending tap order, as the CUDA kernel does, but
    the loops run tap-outer and column-inner so that the inner loop is a vectorisable AXPY
    over a row (8x faster than one output at a time).
    """
    P, H, W = src.shape
    r = (taps.shape[0] - 1) // 2
    acc = np.empty(W, dtype=np.float32)
    for p in range(P):
        for i in range(H):
            acc[:] = 0.0
            if axis == 1:
                for k in range(-r, r + 1):
                    t = taps[k + r]
                    for j in range(max(0, -k), min(W, W - k)):
                        acc[j] += t * src[p, i, j + k]
            else:
                for k in range(max(-r, -i), min(r, H - 1 - i) + 1):
                    t = taps[k + r]
                    for j in range(W):
                        acc[j] += t * src[p, i + k, j]
            for j in range(W):
                dst[p, i, j] = acc[j]


def warp_bilinear(x, theta, flow, out_hw):
    """Validated, C-contiguous ``x`` (N, C, H, W) float32/float16, ``theta`` (N, 2, 3) float32,
    ``flow`` (N, 2, OH, OW) float32 or None; returns (N, C, OH, OW) in ``x``'s dtype."""
    N, C = x.shape[:2]
    OH, OW = out_hw
    out = np.empty((N, C, OH, OW), dtype=x.dtype)
    has_flow = flow is not None
    f = flow if has_flow else np.zeros((1, 2, 1, 1), np.float32)
    _warp(bits_view(x), theta.reshape(N, 6), f, has_flow, bits_view(out))
    return from_bits(out, x.dtype)


def gaussian_blur(fields, taps):
    """Separable blur of float32 planes ``fields`` (P, H, W) with ``taps`` (rows, then
    columns); zero padding."""
    tmp = np.empty_like(fields)
    out = np.empty_like(fields)
    _blur_axis(fields, tmp, taps, 1)
    _blur_axis(tmp, out, taps, 0)
    return out


class AugmentKernels:
    """This module's ops as methods of the CPU kernel set (:class:`fastconv.cpu.CpuKernels`
    inherits them): adding an op here registers it there."""

    warp_bilinear = staticmethod(warp_bilinear)
    gaussian_blur = staticmethod(gaussian_blur)
