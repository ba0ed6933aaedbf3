"""Depthwise convolution on the CPU (``groups == C``: each input channel convolved on its own
with ``M`` filters), float32 and float16, any stride, dilation and asymmetric padding.

A grouped GEMM would multiply ``1 x kh*kw`` by ``kh*kw x OH*OW`` matrices, far too thin for
any GEMM; these loops instead run each tap over a whole output row: for tap ``(i, j)`` the
input columns it meets form a strided range, clipped once per row and tap so the inner loop
has no branch (it vectorises at stride 1). Each task owns whole output planes (forward), input
planes (``dx``) or filters (``dw``, ``db``), so every value is a float32 sum in a fixed order:
deterministic whatever the thread count. Small problems run serially (a parallel region
wakes the thread team, which under load can wait milliseconds).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ._half import bits_view, load, store_value

__all__ = ["depthwise_conv2d", "depthwise_conv2d_backward"]

_FASTMATH = {"contract", "reassoc", "nsz"}  # vectorised row sums; NaN/inf still propagate
_PARALLEL_MIN = 1 << 14  # output elements x taps; smaller problems run serially


@njit(inline="always")
def _columns(off, sw, W, OW):
    """Output columns ``ox`` whose input column ``ox*sw + off`` lies in ``[0, W)``."""
    lo = 0 if off >= 0 else (-off + sw - 1) // sw
    hi = min(OW, (W - 1 - off) // sw + 1) if W - 1 - off >= 0 else 0
    return lo, hi


@njit(cache=True, fastmath=_FASTMATH)
def _forward_planes(x, w, b, y, q0, q1, geo, relu):
    """Output planes ``q0..q1`` (plane ``q`` = image ``q // F``, filter ``q % F``)."""
    sh, sw, top, left, dh, dw = geo
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    F, kh, kw = w.shape
    OH, OW = y.shape[2], y.shape[3]
    M = F // C
    acc = np.empty(OW, np.float32)
    for q in range(q0, q1):
        n, f = q // F, q % F
        c = f // M
        for oy in range(OH):
            acc[:] = b[f]
            for i in range(kh):
                iy = oy * sh - top + i * dh
                if iy < 0 or iy >= H:
                    continue
                row = x[n, c, iy]
                for j in range(kw):
                    off = j * dw - left
                    lo, hi = _columns(off, sw, W, OW)
                    wv = w[f, i, j]
                    if sw == 1:  # unit stride spelled out: contiguous, so it vectorises
                        for ox in range(lo, hi):
                            acc[ox] += wv * load(row[ox + off])
                    else:
                        for ox in range(lo, hi):
                            acc[ox] += wv * load(row[ox * sw + off])
            out = y[n, f, oy]
            for ox in range(OW):
                v = acc[ox]
                if relu and v < 0.0:  # NaN and -0.0 pass, as the ReLU kernel
                    v = np.float32(0.0)
                out[ox] = store_value(y, v)


@njit(parallel=True, cache=True)
def _forward(x, w, b, y, geo, relu, tasks):
    planes = y.shape[0] * y.shape[1]
    for t in prange(tasks):
        _forward_planes(x, w, b, y, t * planes // tasks, (t + 1) * planes // tasks, geo, relu)


@njit(cache=True, fastmath=_FASTMATH)
def _dx_planes(dy, w, dx, q0, q1, geo):
    """Input-gradient planes ``q0..q1`` (plane ``q`` = image ``q // C``, channel ``q % C``):
    every tap's output row scattered onto the input row it read, in a float32 plane."""
    sh, sw, top, left, dh, dw = geo
    C, H, W = dx.shape[1], dx.shape[2], dx.shape[3]
    F, kh, kw = w.shape
    OH, OW = dy.shape[2], dy.shape[3]
    M = F // C
    acc = np.empty((H, W), np.float32)
    for q in range(q0, q1):
        n, c = q // C, q % C
        acc[:] = 0.0
        for m in range(M):
            f = c * M + m
            for oy in range(OH):
                grad = dy[n, f, oy]
                for i in range(kh):
                    iy = oy * sh - top + i * dh
                    if iy < 0 or iy >= H:
                        continue
                    row = acc[iy]
                    for j in range(kw):
                        off = j * dw - left
                        lo, hi = _columns(off, sw, W, OW)
                        wv = w[f, i, j]
                        if sw == 1:
                            for ox in range(lo, hi):
                                row[ox + off] += wv * load(grad[ox])
                        else:
                            for ox in range(lo, hi):
                                row[ox * sw + off] += wv * load(grad[ox])
        plane = dx[n, c]
        for iy in range(H):
            for ix in range(W):
                plane[iy, ix] = store_value(dx, acc[iy, ix])


@njit(parallel=True, cache=True)
def _dx(dy, w, dx, geo, tasks):
    planes = dx.shape[0] * dx.shape[1]
    for t in prange(tasks):
        _dx_planes(dy, w, dx, t * planes // tasks, (t + 1) * planes // tasks, geo)


@njit(cache=True, fastmath=_FASTMATH)
def _dw_filters(dy, x, dw_out, db_out, f0, f1, geo):
    """``dw[f]`` and ``db[f]`` for filters ``f0..f1``: sums over the batch and the output
    plane, one float32 partial per output row, rows added in order."""
    sh, sw, top, left, dh, dw = geo
    N, C, H, W = x.shape
    F, kh, kw = dw_out.shape
    OH, OW = dy.shape[2], dy.shape[3]
    M = F // C
    for f in range(f0, f1):
        c = f // M
        bias = np.float32(0.0)
        for i in range(kh):
            for j in range(kw):
                dw_out[f, i, j] = 0.0
        for n in range(N):
            for oy in range(OH):
                grad = dy[n, f, oy]
                s = np.float32(0.0)
                for ox in range(OW):
                    s += load(grad[ox])
                bias += s
                for i in range(kh):
                    iy = oy * sh - top + i * dh
                    if iy < 0 or iy >= H:
                        continue
                    row = x[n, c, iy]
                    for j in range(kw):
                        off = j * dw - left
                        lo, hi = _columns(off, sw, W, OW)
                        s = np.float32(0.0)
                        if sw == 1:
                            for ox in range(lo, hi):
                                s += load(grad[ox]) * load(row[ox + off])
                        else:
                            for ox in range(lo, hi):
                                s += load(grad[ox]) * load(row[ox * sw + off])
                        dw_out[f, i, j] += s
        db_out[f] = bias


@njit(parallel=True, cache=True)
def _dw(dy, x, dw_out, db_out, geo, tasks):
    F = dw_out.shape[0]
    for t in prange(tasks):
        _dw_filters(dy, x, dw_out, db_out, t * F // tasks, (t + 1) * F // tasks, geo)


def _geo(p):
    """The kernels' scalars: stride, the top/left padding, dilation (bottom/right padding is
    in the output size)."""
    return (p.sh, p.sw, p.pads[0], p.pads[2], p.dh, p.dw)


def _tasks(work: int, count: int) -> int:
    """1 (serial, no parallel region) for small problems, else a few tasks per thread, each a
    run of planes/filters (one scratch buffer each; 7,680 one-plane tasks cost more than the
    work of a 7x7 layer)."""
    if work < _PARALLEL_MIN:
        return 1
    return min(count, 8 * numba.get_num_threads())


def depthwise_conv2d(x, w, b, p, activation):
    """Backend of :func:`fastconv.depthwise_conv2d` (validated, C-contiguous, non-empty);
    ``p`` is the :class:`~fastconv._checks.ConvProblem`."""
    y = np.empty((p.N, p.F, p.OH, p.OW), dtype=x.dtype)
    w32 = w.astype(np.float32).reshape(p.F, p.kh, p.kw)
    b32 = np.zeros(p.F, np.float32) if b is None else b.astype(np.float32)
    xv, yv = bits_view(x), bits_view(y)
    relu = activation == "relu"
    tasks = _tasks(y.size * p.kh * p.kw, p.N * p.F)
    if tasks == 1:
        _forward_planes(xv, w32, b32, yv, 0, p.N * p.F, _geo(p), relu)
    else:
        _forward(xv, w32, b32, yv, _geo(p), relu, tasks)
    return y


def depthwise_conv2d_backward(dy, x, w, p, need_dx=True):
    """``(dx or None, dw, db)`` of :func:`depthwise_conv2d` without activation."""
    w32 = w.astype(np.float32).reshape(p.F, p.kh, p.kw)
    dyv, xv = bits_view(dy), bits_view(x)
    work = dy.size * p.kh * p.kw
    dw32 = np.empty((p.F, p.kh, p.kw), np.float32)
    db32 = np.empty(p.F, np.float32)
    tasks = _tasks(work, p.F)
    if tasks == 1:
        _dw_filters(dyv, xv, dw32, db32, 0, p.F, _geo(p))
    else:
        _dw(dyv, xv, dw32, db32, _geo(p), tasks)
    dx = None
    if need_dx:
        dx = np.empty(x.shape, dtype=x.dtype)
        dxv = bits_view(dx)
        tasks = _tasks(work, p.N * p.C)
        if tasks == 1:
            _dx_planes(dyv, w32, dxv, 0, p.N * p.C, _geo(p))
        else:
            _dx(dyv, w32, dxv, _geo(p), tasks)
    dw_out = dw32.reshape(w.shape).astype(x.dtype)
    return dx, dw_out, db32.astype(x.dtype)


class DepthwiseKernels:
    """This module's ops as methods of the CPU kernel set (:class:`fastconv.cpu.CpuKernels`
    inherits them): adding an op here registers it there."""

    depthwise_conv2d = staticmethod(depthwise_conv2d)
    depthwise_conv2d_backward = staticmethod(depthwise_conv2d_backward)
