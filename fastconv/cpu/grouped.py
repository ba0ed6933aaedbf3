"""Direct grouped convolution on the CPU for few channels per group (depthwise: one; ShuffleNet
and ResNeXt-style groups of a few), float32 and float16, any stride, dilation and asymmetric
padding. Filter ``f`` of group ``g = f // (F / groups)`` reads input channels
``g*Cg .. (g+1)*Cg - 1`` (``Cg = C / groups``).

A GEMM per group would multiply ``Fg x Cg*kh*kw`` by ``Cg*kh*kw x OH*OW`` matrices, far too
thin for any GEMM when ``Cg`` is small (depthwise: one row); these loops instead run each tap
over a whole output row: for tap ``(i, j)`` the input columns it meets form a strided range,
clipped once per row and tap so the inner loop has no branch. At stride 1 the planes are
laid "wide" (below) so that each tap is one long contiguous product over a whole plane (5-8x
the row-by-row loops on ResNeXt and MobileNet planes). Each task owns whole output planes
(forward), input planes (``dx``) or filters (``dw``, ``db``), so every value is a float32 sum
in a fixed order: deterministic whatever the thread count. Small problems run serially (a
parallel region wakes the thread team, which under load can wait milliseconds).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from . import _outputs as outputs
from ._half import bits_view, load, store_value
from ._layout import ACTIVATION_CODES, RELU6, relu6

__all__ = ["grouped_conv2d", "grouped_conv2d_backward"]

_FASTMATH = {"contract", "reassoc", "nsz"}  # vectorised row sums; NaN/inf still propagate
_PARALLEL_MIN = 1 << 14  # output elements x taps; smaller problems run serially


@njit(inline="always")
def _columns(off, sw, W, OW):
    """Output columns ``ox`` whose input column ``ox*sw + off`` lies in ``[0, W)``."""
    lo = 0 if off >= 0 else (-off + sw - 1) // sw
    hi = min(OW, (W - 1 - off) // sw + 1) if W - 1 - off >= 0 else 0
    return lo, hi


@njit(inline="always")
def _row_taps(acc, row, w, f, c, i, geo, W, OW):
    """``acc[ox] += w[f, c, i, j] * row[ox*sw + j*dw - left]`` for every tap ``j`` of row ``i``."""
    sw, left, dw = geo[1], geo[3], geo[5]
    for j in range(w.shape[3]):
        off = j * dw - left
        lo, hi = _columns(off, sw, W, OW)
        if hi <= lo:
            continue
        wv = w[f, c, i, j]
        # Loops from 0 over views: Numba's negative-index wraparound test then folds away
        # and the loop vectorises (from lo it stayed scalar).
        out = acc[lo:hi]
        src = row[lo * sw + off : (hi - 1) * sw + off + 1 : sw]
        for k in range(hi - lo):
            out[k] += wv * load(src[k])


@njit(cache=True, fastmath=_FASTMATH)
def _forward_planes(x, w, b, y, q0, q1, geo, relu):
    """Output planes ``q0..q1`` (plane ``q`` = image ``q // F``, filter ``q % F``)."""
    sh, top, dh, groups = geo[0], geo[2], geo[4], geo[6]
    H, W = x.shape[2], x.shape[3]
    F, Cg, kh = w.shape[0], w.shape[1], w.shape[2]
    OH, OW = y.shape[2], y.shape[3]
    Fg = F // groups
    acc = np.empty(OW, np.float32)
    for q in range(q0, q1):
        n, f = q // F, q % F
        c0 = (f // Fg) * Cg
        for oy in range(OH):
            acc[:] = b[f]
            for c in range(Cg):
                for i in range(kh):
                    iy = oy * sh - top + i * dh
                    if 0 <= iy < H:
                        _row_taps(acc, x[n, c0 + c, iy], w, f, c, i, geo, W, OW)
            out = y[n, f, oy]
            for ox in range(OW):
                v = acc[ox]
                if relu == RELU6:
                    v = relu6(v)
                elif relu and v < 0.0:  # NaN and -0.0 pass, as the ReLU kernel
                    v = np.float32(0.0)
                out[ox] = store_value(y, v)


# --- stride 1: the "wide" layout --------------------------------------------------------------
# With stride 1 an output plane computed on the padded input's full width (OH rows of Wp, the
# last kw-1 columns of each row wasted) makes every tap ONE long contiguous product over the
# flattened plane: acc[k] += w * xp[i*dh*Wp + j*dw + k] for k < (OH-1)*Wp + OW, instead of
# OH short rows clipped one by one.


@njit(inline="always")
def _pad_plane(src, dst, top, left, Wp):
    """``src`` (H, W) into the flat zero-padded float32 plane ``dst`` of width ``Wp``."""
    dst[:] = 0.0
    W = src.shape[1]
    for iy in range(src.shape[0]):
        o = (iy + top) * Wp + left
        d = dst[o : o + W]  # slices indexed from 0: the copy vectorises
        s = src[iy]
        for ix in range(W):
            d[ix] = load(s[ix])


@njit(cache=True)
def _store_plane(y, n, f, acc, width, relu):
    """Output plane ``y[n, f]`` from an accumulator laid out in rows of ``width`` (bias and
    taps added), with the fused activation ``relu`` (an activation code: NaN and -0.0 pass,
    as the ReLU and clip kernels)."""
    OH, OW = y.shape[2], y.shape[3]
    for oy in range(OH):
        out = y[n, f, oy]
        src = acc[oy * width : oy * width + OW]  # indexed from 0: vectorises
        if relu == RELU6:
            for ox in range(OW):
                out[ox] = store_value(y, relu6(src[ox]))
            continue
        for ox in range(OW):
            v = src[ox]
            if relu and v < 0.0:
                v = np.float32(0.0)
            out[ox] = store_value(y, v)


@njit(cache=True, fastmath=_FASTMATH)
def _forward_planes_s1(x, w, b, y, q0, q1, geo, relu):
    top, left, dh, dw, groups = geo[2], geo[3], geo[4], geo[5], geo[6]
    F, Cg, kh, kw = w.shape
    OH, OW = y.shape[2], y.shape[3]
    Hp, Wp = OH + (kh - 1) * dh, OW + (kw - 1) * dw
    L = (OH - 1) * Wp + OW
    Fg = F // groups
    xp = np.empty(Hp * Wp, np.float32)
    acc = np.empty(L, np.float32)
    for q in range(q0, q1):
        n, f = q // F, q % F
        c0 = (f // Fg) * Cg
        acc[:] = b[f]
        for c in range(Cg):
            _pad_plane(x[n, c0 + c], xp, top, left, Wp)
            if kh == 3 and kw == 3:
                # all nine taps in one pass over acc (one read and write of it, not three)
                k00, k01, k02 = w[f, c, 0, 0], w[f, c, 0, 1], w[f, c, 0, 2]
                k10, k11, k12 = w[f, c, 1, 0], w[f, c, 1, 1], w[f, c, 1, 2]
                k20, k21, k22 = w[f, c, 2, 0], w[f, c, 2, 1], w[f, c, 2, 2]
                r1, r2 = dh * Wp, 2 * dh * Wp
                s00, s01, s02 = xp[0:L], xp[dw : dw + L], xp[2 * dw : 2 * dw + L]
                s10, s11 = xp[r1 : r1 + L], xp[r1 + dw : r1 + dw + L]
                s12 = xp[r1 + 2 * dw : r1 + 2 * dw + L]
                s20, s21 = xp[r2 : r2 + L], xp[r2 + dw : r2 + dw + L]
                s22 = xp[r2 + 2 * dw : r2 + 2 * dw + L]
                for k in range(L):
                    acc[k] += (
                        k00 * s00[k] + k01 * s01[k] + k02 * s02[k]
                        + k10 * s10[k] + k11 * s11[k] + k12 * s12[k]
                        + k20 * s20[k] + k21 * s21[k] + k22 * s22[k]
                    )  # fmt: skip
                continue
            for i in range(kh):
                row = i * dh * Wp
                if kw == 3:  # a kernel row's three taps in one pass: a third of acc's traffic
                    w0, w1, w2 = w[f, c, i, 0], w[f, c, i, 1], w[f, c, i, 2]
                    s0 = xp[row : row + L]
                    s1 = xp[row + dw : row + dw + L]
                    s2 = xp[row + 2 * dw : row + 2 * dw + L]
                    for k in range(L):
                        acc[k] += w0 * s0[k] + w1 * s1[k] + w2 * s2[k]
                    continue
                for j in range(kw):
                    wv = w[f, c, i, j]
                    src = xp[row + j * dw : row + j * dw + L]
                    for k in range(L):
                        acc[k] += wv * src[k]
        _store_plane(y, n, f, acc, Wp, relu)


@njit(parallel=True, cache=True)
def _forward_s1(x, w, b, y, geo, relu, tasks):
    planes = y.shape[0] * y.shape[1]
    for t in prange(tasks):
        _forward_planes_s1(x, w, b, y, t * planes // tasks, (t + 1) * planes // tasks, geo, relu)


@njit(cache=True, fastmath=_FASTMATH)
def _dx_planes_s1(dy, w, dx, q0, q1, geo):
    top, left, dh, dw, groups = geo[2], geo[3], geo[4], geo[5], geo[6]
    C, H, W = dx.shape[1], dx.shape[2], dx.shape[3]
    F, Cg, kh, kw = w.shape
    OH, OW = dy.shape[2], dy.shape[3]
    Hp, Wp = OH + (kh - 1) * dh, OW + (kw - 1) * dw
    L = (OH - 1) * Wp + OW
    Fg = F // groups
    dxp = np.empty(Hp * Wp, np.float32)
    # dy laid wide, with 2*dw zeros before and after: a kernel row's three taps then gather
    # from it in one pass (the scatter of each tap onto overlapping ranges could not vectorise)
    pad = 2 * dw
    dyp = np.zeros(L + 2 * pad, np.float32)
    dyw = dyp[pad : pad + L]
    for q in range(q0, q1):
        n, ci = q // C, q % C
        g, c = ci // Cg, ci % Cg
        dxp[:] = 0.0
        for m in range(Fg):
            f = g * Fg + m
            dyw[:] = 0.0
            for oy in range(OH):
                for ox in range(OW):
                    dyw[oy * Wp + ox] = load(dy[n, f, oy, ox])
            for i in range(kh):
                row = i * dh * Wp
                if kw == 3:
                    w0, w1, w2 = w[f, c, i, 0], w[f, c, i, 1], w[f, c, i, 2]
                    dst = dxp[row : row + L + pad]
                    g0 = dyp[pad : pad + L + pad]
                    g1 = dyp[pad - dw : pad - dw + L + pad]
                    g2 = dyp[0 : L + pad]
                    for k in range(L + pad):
                        dst[k] += w0 * g0[k] + w1 * g1[k] + w2 * g2[k]
                    continue
                for j in range(kw):
                    wv = w[f, c, i, j]
                    dst = dxp[row + j * dw : row + j * dw + L]
                    for k in range(L):
                        dst[k] += wv * dyw[k]
        plane = dx[n, ci]
        for iy in range(H):
            o = (iy + top) * Wp + left
            for ix in range(W):
                plane[iy, ix] = store_value(dx, dxp[o + ix])


@njit(parallel=True, cache=True)
def _dx_s1(dy, w, dx, geo, tasks):
    planes = dx.shape[0] * dx.shape[1]
    for t in prange(tasks):
        _dx_planes_s1(dy, w, dx, t * planes // tasks, (t + 1) * planes // tasks, geo)


@njit(cache=True, fastmath=_FASTMATH)
def _dw_filters_s1(dy, x, dw_out, db_out, f0, f1, geo):
    top, left, dh, dw, groups = geo[2], geo[3], geo[4], geo[5], geo[6]
    N = x.shape[0]
    F, Cg, kh, kw = dw_out.shape
    OH, OW = dy.shape[2], dy.shape[3]
    Hp, Wp = OH + (kh - 1) * dh, OW + (kw - 1) * dw
    L = (OH - 1) * Wp + OW
    Fg = F // groups
    xp = np.empty(Hp * Wp, np.float32)
    dyw = np.empty(L, np.float32)
    for f in range(f0, f1):
        c0 = (f // Fg) * Cg
        dw_out[f] = 0.0
        bias = np.float32(0.0)
        for n in range(N):
            dyw[:] = 0.0
            for oy in range(OH):
                s = np.float32(0.0)
                for ox in range(OW):
                    v = load(dy[n, f, oy, ox])
                    dyw[oy * Wp + ox] = v
                    s += v
                bias += s
            for c in range(Cg):
                _pad_plane(x[n, c0 + c], xp, top, left, Wp)
                for i in range(kh):
                    row = i * dh * Wp
                    if kw == 3:  # three dot products in one pass over dy
                        s0 = xp[row : row + L]
                        s1 = xp[row + dw : row + dw + L]
                        s2 = xp[row + 2 * dw : row + 2 * dw + L]
                        a0 = a1 = a2 = np.float32(0.0)
                        for k in range(L):
                            gk = dyw[k]
                            a0 += gk * s0[k]
                            a1 += gk * s1[k]
                            a2 += gk * s2[k]
                        dw_out[f, c, i, 0] += a0
                        dw_out[f, c, i, 1] += a1
                        dw_out[f, c, i, 2] += a2
                        continue
                    for j in range(kw):
                        src = xp[row + j * dw : row + j * dw + L]
                        s = np.float32(0.0)
                        for k in range(L):
                            s += dyw[k] * src[k]
                        dw_out[f, c, i, j] += s
        db_out[f] = bias


@njit(parallel=True, cache=True)
def _dw_s1(dy, x, dw_out, db_out, geo, tasks):
    F = dw_out.shape[0]
    for t in prange(tasks):
        _dw_filters_s1(dy, x, dw_out, db_out, t * F // tasks, (t + 1) * F // tasks, geo)


@njit(parallel=True, cache=True)
def _forward(x, w, b, y, geo, relu, tasks):
    planes = y.shape[0] * y.shape[1]
    for t in prange(tasks):
        _forward_planes(x, w, b, y, t * planes // tasks, (t + 1) * planes // tasks, geo, relu)


# --- 3x3, stride 2: four phase planes ------------------------------------------------------------
# Strided taps are gathers (one lane at a time); split into its four phases, a padded plane
# gives every tap as a contiguous run: padded pixel (2*oy + i, 2*ox + j) is phase
# (i % 2, j % 2) at (oy + i // 2, ox + j // 2). On phase planes of width Wq = OW + 1 all nine
# taps are then one pass of contiguous loads over the flattened output (the "wide" layout of
# stride 1, with Wq - OW wasted columns a row).


@njit(inline="always")
def _phase_planes(src, ph, top, left, Hq, Wq):
    """ph[2a + b][r*Wq + c] = padded pixel (2r + a, 2c + b) of ``src`` (zeros outside).

    Each input row is read once, its even and odd columns together (a loop LLVM turns into
    permutes; stride-2 loads compile to gathers, see the max-pooling forward), and written
    as two contiguous runs."""
    H, W = src.shape
    ph[:, :] = 0.0
    pe = left % 2  # the column phase of even input columns; odd ones have 1 - pe
    ce = (left - pe) // 2  # phase column of input column 0
    co = (left + pe) // 2  # phase column of input column 1
    n_even = min((W + 1) // 2, Wq - ce)
    n_odd = min(W // 2, Wq - co)
    both = min(n_even, n_odd)
    for y in range(H):
        r2 = y + top
        r = r2 // 2
        if r >= Hq:
            break
        a = r2 % 2
        row = src[y]
        de = ph[2 * a + pe, r * Wq + ce : r * Wq + ce + max(n_even, 0)]
        do = ph[2 * a + 1 - pe, r * Wq + co : r * Wq + co + max(n_odd, 0)]
        for k in range(both):
            de[k] = load(row[2 * k])
            do[k] = load(row[2 * k + 1])
        for k in range(both, n_even):
            de[k] = load(row[2 * k])
        for k in range(both, n_odd):
            do[k] = load(row[2 * k + 1])


@njit(cache=True, fastmath=_FASTMATH)
def _forward_planes_s2k3(x, w, b, y, q0, q1, geo, relu):
    top, left, groups = geo[2], geo[3], geo[6]
    F, Cg = w.shape[0], w.shape[1]
    OH, OW = y.shape[2], y.shape[3]
    Hq, Wq = OH + 1, OW + 1
    L = (OH - 1) * Wq + OW
    Fg = F // groups
    ph = np.empty((4, Hq * Wq + 1), np.float32)
    acc = np.empty(L, np.float32)
    for q in range(q0, q1):
        n, f = q // F, q % F
        c0 = (f // Fg) * Cg
        acc[:] = b[f]
        for c in range(Cg):
            _phase_planes(x[n, c0 + c], ph, top, left, Hq, Wq)
            k00, k01, k02 = w[f, c, 0, 0], w[f, c, 0, 1], w[f, c, 0, 2]
            k10, k11, k12 = w[f, c, 1, 0], w[f, c, 1, 1], w[f, c, 1, 2]
            k20, k21, k22 = w[f, c, 2, 0], w[f, c, 2, 1], w[f, c, 2, 2]
            p00, p01, p10, p11 = ph[0], ph[1], ph[2], ph[3]
            a0, a1, a2, a3 = p00[0:L], p00[1 : L + 1], p00[Wq : Wq + L], p00[Wq + 1 : Wq + 1 + L]
            b0, b1 = p01[0:L], p01[Wq : Wq + L]
            c0_, c1_ = p10[0:L], p10[1 : L + 1]
            d0 = p11[0:L]
            for k in range(L):
                acc[k] += (
                    k00 * a0[k] + k02 * a1[k] + k20 * a2[k] + k22 * a3[k]
                    + k01 * b0[k] + k21 * b1[k] + k10 * c0_[k] + k12 * c1_[k] + k11 * d0[k]
                )  # fmt: skip
        _store_plane(y, n, f, acc, Wq, relu)


@njit(parallel=True, cache=True)
def _forward_s2k3(x, w, b, y, geo, relu, tasks):
    planes = y.shape[0] * y.shape[1]
    for t in prange(tasks):
        _forward_planes_s2k3(x, w, b, y, t * planes // tasks, (t + 1) * planes // tasks, geo,
                             relu)  # fmt: skip


@njit(cache=True, fastmath=_FASTMATH)
def _dx_planes(dy, w, dx, q0, q1, geo):
    """Input-gradient planes ``q0..q1`` (plane ``q`` = image ``q // C``, channel ``q % C``):
    every tap's output row of every filter that read the channel scattered onto the input row
    it read, in a float32 plane."""
    sh, sw, top, left, dh, dw, groups = geo
    C, H, W = dx.shape[1], dx.shape[2], dx.shape[3]
    F, Cg, kh, kw = w.shape
    OH, OW = dy.shape[2], dy.shape[3]
    Fg = F // groups
    acc = np.empty((H, W), np.float32)
    for q in range(q0, q1):
        n, ci = q // C, q % C
        g, c = ci // Cg, ci % Cg
        acc[:] = 0.0
        for m in range(Fg):
            f = g * Fg + m
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
                        if hi <= lo:
                            continue
                        wv = w[f, c, i, j]
                        dst = row[lo * sw + off : (hi - 1) * sw + off + 1 : sw]
                        src = grad[lo:hi]
                        for k in range(hi - lo):
                            dst[k] += wv * load(src[k])
        plane = dx[n, ci]
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
    sh, sw, top, left, dh, dw, groups = geo
    N, C, H, W = x.shape
    F, Cg, kh, kw = dw_out.shape
    OH, OW = dy.shape[2], dy.shape[3]
    Fg = F // groups
    for f in range(f0, f1):
        c0 = (f // Fg) * Cg
        bias = np.float32(0.0)
        dw_out[f] = 0.0
        for n in range(N):
            for oy in range(OH):
                grad = dy[n, f, oy]
                s = np.float32(0.0)
                for ox in range(OW):
                    s += load(grad[ox])
                bias += s
                for c in range(Cg):
                    for i in range(kh):
                        iy = oy * sh - top + i * dh
                        if iy < 0 or iy >= H:
                            continue
                        row = x[n, c0 + c, iy]
                        for j in range(kw):
                            off = j * dw - left
                            lo, hi = _columns(off, sw, W, OW)
                            if hi <= lo:
                                continue
                            src = row[lo * sw + off : (hi - 1) * sw + off + 1 : sw]
                            g = grad[lo:hi]
                            s = np.float32(0.0)
                            for k in range(hi - lo):
                                s += load(g[k]) * load(src[k])
                            dw_out[f, c, i, j] += s
        db_out[f] = bias


@njit(parallel=True, cache=True)
def _dw(dy, x, dw_out, db_out, geo, tasks):
    F = dw_out.shape[0]
    for t in prange(tasks):
        _dw_filters(dy, x, dw_out, db_out, t * F // tasks, (t + 1) * F // tasks, geo)


def _geo(p):
    """The kernels' scalars: stride, the top/left padding, dilation, groups (bottom/right
    padding is in the output size)."""
    return (p.sh, p.sw, p.pads[0], p.pads[2], p.dh, p.dw, p.groups)


def _tasks(work: int, count: int) -> int:
    """1 (serial, no parallel region) for small problems, else a few tasks per thread, each a
    run of planes/filters (one scratch buffer each; 7,680 one-plane tasks cost more than the
    work of a 7x7 layer)."""
    if work < _PARALLEL_MIN:
        return 1
    return min(count, 8 * numba.get_num_threads())


def grouped_conv2d(x, w, b, p, activation):
    """Backend of :func:`fastconv.grouped_conv2d` (validated, C-contiguous, non-empty); ``p``
    is the :class:`~fastconv._checks.ConvProblem`."""
    y = outputs.empty((p.N, p.F, p.OH, p.OW), x.dtype)
    w32 = w.astype(np.float32)
    b32 = np.zeros(p.F, np.float32) if b is None else b.astype(np.float32)
    xv, yv = bits_view(x), bits_view(y)
    relu = ACTIVATION_CODES[activation]
    s1 = (p.sh, p.sw) == (1, 1)
    tasks = _tasks(y.size * w[0].size, p.N * p.F)
    s2k3 = (p.sh, p.sw, p.kh, p.kw, p.dh, p.dw) == (2, 2, 3, 3, 1, 1)
    if tasks == 1:
        planes = _forward_planes_s1 if s1 else _forward_planes_s2k3 if s2k3 else _forward_planes
        planes(xv, w32, b32, yv, 0, p.N * p.F, _geo(p), relu)
    else:
        kernel = _forward_s1 if s1 else _forward_s2k3 if s2k3 else _forward
        kernel(xv, w32, b32, yv, _geo(p), relu, tasks)
    return y


def grouped_conv2d_backward(dy, x, w, p, need_dx=True):
    """``(dx or None, dw, db)`` of :func:`grouped_conv2d` without activation."""
    w32 = w.astype(np.float32)
    dyv, xv = bits_view(dy), bits_view(x)
    work = dy.size * w[0].size
    dw32 = np.empty(w.shape, np.float32)
    db32 = np.empty(p.F, np.float32)
    s1 = (p.sh, p.sw) == (1, 1)
    tasks = _tasks(work, p.F)
    if tasks == 1:
        (_dw_filters_s1 if s1 else _dw_filters)(dyv, xv, dw32, db32, 0, p.F, _geo(p))
    else:
        (_dw_s1 if s1 else _dw)(dyv, xv, dw32, db32, _geo(p), tasks)
    dx = None
    if need_dx:
        dx = np.empty(x.shape, dtype=x.dtype)
        dxv = bits_view(dx)
        tasks = _tasks(work, p.N * p.C)
        if tasks == 1:
            (_dx_planes_s1 if s1 else _dx_planes)(dyv, w32, dxv, 0, p.N * p.C, _geo(p))
        else:
            (_dx_s1 if s1 else _dx)(dyv, w32, dxv, _geo(p), tasks)
    return dx, dw32.astype(x.dtype), db32.astype(x.dtype)


class GroupedKernels:
    """This module's ops as methods of the CPU kernel set (:class:`fastconv.cpu.CpuKernels`
    inherits them): adding an op here registers it there."""

    grouped_conv2d = staticmethod(grouped_conv2d)
    grouped_conv2d_backward = staticmethod(grouped_conv2d_backward)
