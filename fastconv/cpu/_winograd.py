"""Winograd convolution F(m x m, 3 x 3) on the CPU, m = 2 or 4 (Lavin & Gray, 2016).

For a 3x3, stride-1 layer each m x m output tile of one filter is ``A^T [U (.) V] A``, with
``U = G g G^T`` the transformed filter and ``V = B^T d B`` the transformed (m+2) x (m+2) input
tile; summed over input channels, the a*a = (m+2)^2 element-wise products become a*a
independent matrix products ``M[xi] (F x tiles) = U[xi] (F x C) @ V[xi] (C x tiles)``.
F(4x4) does 36 multiplies per 16 outputs and channel pair where direct convolution does 144
(4x fewer), F(2x2) 16 per 4 (2.25x fewer); the transforms cost additions.

Layout (per thread, per work item = a group of G images x a band of ``nr`` tile rows):

* the input band is copied once into a *phase* layout, ``xq[c][qa][qb][th][tw][n]`` holding
  padded pixel ``(th*m + qa, tw*m + qb)`` of image ``n`` (images innermost). Element (i, j) of
  tile (th, tw) is then ``xq[c][i%m][j%m][th + i//m][tw + j//m]``, so for fixed (i, j) the
  tiles of a tile row and all images of the group form one contiguous run of ``TW*G``
  values: every transform is a vector operation over such runs, whatever the image size
  (8x8 images give runs of 2*G, 224x224 images 56*G);
* transforms (:func:`~fastconv.cpu._simd.make_apply`, explicit vectors, masked tails) go
  through small scratch rows ``t`` / ``o``; ``V`` and ``M`` hold ``a*a`` matrices whose rows
  are those runs, one tile row after another (``ldv`` values per row, rounded up to the
  micro-kernel width);
* the products are register-blocked micro-kernel calls (:func:`~fastconv.cpu._simd.gemm_block`);
* the epilogue adds the bias, applies ReLU and scatters the tile outputs to NCHW
  (float32 or half bits).

Backward: dx is the same forward computation on dy (padded by 2 - pad) with the spatially
flipped, transposed filters. dW: with dM = A dY A^T (the gradient of a tile's M), dU[xi] =
sum over tiles of dM[xi] (F x tiles) @ V[xi]^T (tiles x C), a dot-product GEMM over long rows,
then dW = G^T dU G. Threads take contiguous ranges of work items; dU and db are per-thread
partial sums reduced in thread order (deterministic).

Non-finite values: a tile transform mixes all pixels of a tile (a NaN would reach outputs
that never see it in the direct sum, and inf - inf = NaN), and the transforms amplify values
by up to ~4e4 (F(4x4)), which could overflow float32 where the direct sum does not. The copy
into the phase layout therefore counts values that are not finite or not below
:data:`LIMIT`; such a call is redone by the caller on the exact GEMM paths (as are calls with
such weights).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ._half import store_value
from ._layout import add_residual_block, image_range, serial_twin
from ._simd import (
    MR,
    NR,
    gemm_block,
    gemm_block16,
    load_transposed,
    make_apply,
    make_program,
    store_transposed,
)

__all__ = [
    "LIMIT",
    "TILES",
    "WinogradPlan",
    "WinogradWork",
    "make_plan",
    "work_shapes",
    "transform_weights",
    "forward_residual",
    "weight_grad_kernel",
    "weight_grad_finish",
]

# Inputs and weights at or above this magnitude send a call back to the GEMM paths: with
# |x|, |w| < 2^50 the F(4x4) intermediates (<= ~3.6e4 * C * |x| |w|) stay finite for any
# C < 7000.
LIMIT = np.float32(2.0**50)

# Transform matrices (Lavin & Gray 2016; interpolation points 0, +-1 and 0, +-1, +-2).
_BT = {
    2: [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    4: [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
}
_G = {
    2: [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
    4: [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
}
_AT = {
    2: [[1, 1, 1, 0], [0, 1, -1, -1]],
    4: [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
}
TILES = (2, 4)


# F(4x4) transforms factored by hand (Lavin & Gray's shared terms, with fused multiply-adds):
# 14 operations for B^T (28 as a plain matrix product), 10 for A^T (20), 8 for A (16).
def _bt4_program(op, d):
    d0, d1, d2, d3, d4, d5 = d
    t1 = op.sub(d3, d1)
    t2 = op.sub(d4, d2)
    return [
        op.fma(4.0, d0, op.fma(-5.0, d2, d4)),
        op.fma(-4.0, op.add(d1, d2), op.add(d3, d4)),
        op.fma(4.0, op.sub(d1, d2), op.sub(d4, d3)),
        op.fma(2.0, t1, t2),
        op.fma(-2.0, t1, t2),
        op.fma(4.0, d1, op.fma(-5.0, d3, d5)),
    ]


def _at4_program(op, v):
    m0, m1, m2, m3, m4, m5 = v
    a, b = op.add(m1, m2), op.sub(m1, m2)
    c, d = op.add(m3, m4), op.sub(m3, m4)
    return [op.add(op.add(m0, a), c), op.fma(2.0, d, b), op.fma(4.0, c, a),
            op.add(op.fma(8.0, d, b), m5)]  # fmt: skip


def _a4_program(op, y):
    y0, y1, y2, y3 = y
    even, odd = op.add(y0, y2), op.add(y1, y3)
    even4, odd4 = op.fma(4.0, y2, y0), op.fma(4.0, y3, y1)
    return [y0, op.add(even, odd), op.sub(even, odd), op.fma(2.0, odd4, even4),
            op.fma(-2.0, odd4, even4), y3]  # fmt: skip


_bt2, _bt4 = make_apply(_BT[2]), make_program(6, 6, _bt4_program)
_at2, _at4 = make_apply(_AT[2]), make_program(6, 4, _at4_program)
# dM = A dY A^T with A = AT^T: (m+2) outputs from m inputs.
_a2, _a4 = make_apply(np.array(_AT[2]).T), make_program(4, 6, _a4_program)

# Work items small enough that V and M ((m+2)^2 x (C + F) x columns) stay in L2: groups of
# at most 16 images and bands of one tile row for the deep-MNIST layers. Measured (one thread,
# 50 images, interleaved, CPU-time minima): 25-35% faster on every deep-MNIST layer than
# groups of 50 images in bands of ~512 columns, and ahead of groups of 8, 12, 25 or 32.
_TARGET_COLUMNS = 128  # columns (tile-row runs of a band) per work item, at least one row
_MAX_GROUP = 16  # images per group
_MIN_BLOCK_FILTERS = 32  # filters per block at least, where threads share the filters


class WinogradPlan(NamedTuple):
    """How a Winograd call is split (all ints: Numba's parallel regions take flat tuples)."""

    m: int  # output tile size (2 or 4)
    G: int  # images per group (the last group may hold fewer)
    ngroups: int
    nr: int  # tile rows per band (the last band may hold fewer)
    nbands: int
    TH: int  # tile rows and columns covering the output
    TW: int
    ldv: int  # values per row of V and M
    Fp: int  # output channels rounded up to the micro-kernel's rows (forward products)
    Cr: int  # input channels rounded up likewise (rows of V per xi; dW products)
    FN: int  # output channels rounded up to the dW micro-kernel's columns (16 or 32)
    top: int  # zero rows above the input (the padding)
    left: int  # zero columns left of the input
    nfb: int  # filter blocks: forward work items per (group, band), each its own filters
    fb: int  # filters per block (a multiple of MR)

    @property
    def items(self) -> int:
        """Work items of a call: (group, band, filter block) triples."""
        return self.ngroups * self.nbands * self.nfb


class WinogradWork(NamedTuple):
    """Per-thread float32 workspaces, each ``(threads, ...)``, plus per-thread offsets."""

    xq: np.ndarray  # input band in the phase layout
    dq: np.ndarray  # dy band in the phase layout (weight gradient only)
    t: np.ndarray  # transform scratch, (m+2)^2 runs
    o: np.ndarray  # output tiles of one filter, m^2 runs
    v: np.ndarray  # transformed input, (m+2)^2 x C rows
    mm: np.ndarray  # products M (forward; (m+2)^2 x Fp rows) or dM (weight gradient)
    offs: np.ndarray  # int64 (threads, 3, k): stream offsets (transforms, dW GEMM), column offsets


def make_plan(N, C, F, OH, OW, m, n_threads, top, left, split_filters=False):
    """The :class:`WinogradPlan` of a call: groups of images and bands of tile rows such that
    a work item has about ``_TARGET_COLUMNS`` columns and there is work for every thread.

    With ``split_filters`` (forward calls; the weight gradient sums over items) threads left
    idle by too few (group, band) items share the filters instead of the tile rows: each
    item then transforms the same band and multiplies it by its block of U. Splitting the
    tile rows of small maps left items of fewer columns than a micro-kernel panel (7x7 maps
    at batch 8: 16 of 32), and each thread read all of U. Same bits either way: every
    output is the same chain of products.
    """
    TH, TW = -(-OH // m), -(-OW // m)
    Fp = -(-F // MR) * MR
    ngroups = -(-N // _MAX_GROUP)
    if N >= 8 * n_threads:
        # A multiple of the thread count: threads get whole groups of nearly equal size
        # (100 images on 2 threads: 8 groups of 13 and 9, 52 / 48 images a thread, where 7
        # groups of 15 gave 45 / 55).
        ngroups = -(-ngroups // n_threads) * n_threads
    G = -(-N // ngroups)
    ngroups = -(-N // G)
    nr_target = max(1, min(TH, round(_TARGET_COLUMNS / (TW * G))))
    nbands = -(-TH // nr_target)
    nfb, fb = 1, Fp
    if split_filters and ngroups * nbands < n_threads and Fp >= 2 * _MIN_BLOCK_FILTERS:
        want = -(-n_threads // (ngroups * nbands))
        fb = -(-max(_MIN_BLOCK_FILTERS, -(-Fp // want)) // MR) * MR
        nfb = -(-Fp // fb)
    if ngroups * nbands * nfb < n_threads:
        nbands = min(TH, -(-n_threads // ngroups))  # split tile rows between threads
    nr = -(-TH // nbands)
    nbands = -(-TH // nr)
    if ngroups * nbands * nfb < n_threads and N > ngroups:  # still idle: smaller groups
        G = -(-N // min(N, -(-n_threads // nbands)))
        ngroups = -(-N // G)
    ldv = -(-(nr * TW * G) // NR) * NR
    Cr = -(-C // MR) * MR
    FN = -(-F // 16) * 16 if F <= 16 else -(-F // NR) * NR
    return WinogradPlan(m, G, ngroups, nr, nbands, TH, TW, ldv, Fp, Cr, FN, top, left, nfb, fb)


def work_shapes(plan, C, F, W_in, W_out, backward_weights=False):
    """Per-thread workspace sizes (float32 values) of :class:`WinogradWork`."""
    m, a = plan.m, plan.m + 2
    run = plan.TW * plan.G
    fn = plan.FN if backward_weights else 1
    return WinogradWork(
        xq=(C * m * m * (plan.nr + 1) * (plan.TW + 1) * plan.G,),
        dq=(m * m * plan.nr * run * fn,) if backward_weights else (1,),
        t=(a * a * run * fn,),
        o=(m * m * run,),
        v=(a * a * plan.Cr * plan.ldv,),
        mm=(a * a * plan.nr * run * fn,) if backward_weights else (a * a * plan.Fp * plan.ldv,),
        offs=(3, 64 + max(C, W_in, W_out)),
    )


# --- weights ------------------------------------------------------------------------------------

# The 2-D weight transforms as one matrix on the 9 taps: U[k*a + l] = sum_ij G[k,i] G[l,j] g[i,j]
# (coefficients computed in float64 and rounded once), and its adjoint for dW = G^T dU G.
_U2, _U4 = make_apply(np.kron(_G[2], _G[2])), make_apply(np.kron(_G[4], _G[4]))
_DW2 = make_apply(np.kron(_G[2], _G[2]).T)
_DW4 = make_apply(np.kron(_G[4], _G[4]).T)


# Filter pairs per task of the weight transform (a multiple of 16: the gathers' blocks).
TRANSFORM_CHUNK = 4096


@njit(cache=True, parallel=True)
def _transform_weights(w, m, for_dx, taps, u, offs):
    """u[xi, r, s] = (G g G^T)[xi] of every filter pair, vectorised over the pairs; returns
    how many weights are not finite or not below LIMIT.

    Forward: rows r = filters f, columns s = input channels c, g = w[f, c]. dx (``for_dx``):
    rows r = input channels c, columns s = filters f, and g = w[f, c] rotated by 180 degrees
    (dx is the convolution of dy with the flipped, transposed filters). ``taps`` (9 x pairs)
    receives the taps tap-major first, through 16 x 16 transposes.

    Chunks of :data:`TRANSFORM_CHUNK` pairs run in parallel, each with its own offsets (rows
    of ``offs``): every value is computed as in one pass, so the bits do not depend on the
    chunks. One thread took 8.2 ms for ResNet's 512x512 layers in F(4x4) (U 38 MB, a fresh
    memory map every call: its page faults too now spread over the threads).
    """
    F, C = w.shape[0], w.shape[1]
    P = F * C
    cols = F if for_dx else C
    rows_padded = u.shape[1]
    a = m + 2
    nchunks = -(-P // TRANSFORM_CHUNK)
    bad = 0
    for k in prange(nchunks):
        p0 = k * TRANSFORM_CHUNK
        n = min(TRANSFORM_CHUNK, P - p0)
        o = offs[k]
        for t in range(9):
            o[2, t] = (8 - t) * P if for_dx else t * P  # rotated taps for dx
        if for_dx:  # taps[t][c*F + f]: up to 16 filters of one channel at a time
            for c in range(p0 // F, (p0 + n - 1) // F + 1):
                lo, hi = max(0, p0 - c * F), min(F, p0 + n - c * F)
                for f0 in range(lo, hi, 16):
                    bad += load_transposed(w, (f0 * C + c) * 9, C * 9, min(16, hi - f0), 9,
                                           taps, c * F + f0, o[2], 0)  # fmt: skip
        else:  # taps[t][f*C + c]: 16 consecutive pairs at a time
            for q0 in range(p0, p0 + n, 16):
                bad += load_transposed(w, q0 * 9, 9, min(16, p0 + n - q0), 9, taps, q0, o[2], 0)
        for t in range(9):
            o[0, t] = t * P + p0
        for xi in range(a * a):
            o[1, xi] = xi * rows_padded * cols + p0
        if m == 4:
            _U4(taps, o[0], u.reshape(-1), o[1], n)
        else:
            _U2(taps, o[0], u.reshape(-1), o[1], n)
    return bad


_transform_weights_serial = serial_twin(_transform_weights)


def transform_weights(w_bits, m, rows_padded, for_dx=False):
    """``(U, ok)``: U as ``((m+2)^2, rows_padded, cols)`` float32 (zero rows past the real
    ones; forward rows = filters, cols = input channels, dx the other way round), and
    whether the weights are all finite and below :data:`LIMIT`."""
    F, C = w_bits.shape[0], w_bits.shape[1]
    cols = F if for_dx else C
    a = m + 2
    taps = np.empty(9 * F * C, np.float32)
    u = np.empty((a * a, rows_padded, cols), np.float32)
    u[:, F if not for_dx else C :] = 0.0  # only the padding rows: the transform writes the rest
    offs = np.empty((-(-F * C // TRANSFORM_CHUNK), 3, max(9, a * a)), np.int64)
    # One chunk (the deep-MNIST layers) on the calling thread: no parallel region to wake.
    kernel = _transform_weights if offs.shape[0] > 1 else _transform_weights_serial
    bad = kernel(w_bits, m, for_dx, taps, u, offs)
    return u, bad == 0


# --- copies into the phase layout ---------------------------------------------------------------


@njit(cache=True)
def _copy_phase(src, n0, count, row0, left, m, nr, TW, dst, col_off):
    """Rows ``row0 .. row0 + nr*m + 1`` of images n0 .. n0+count-1 of ``src`` (N, C, H, W)
    into ``dst[c][qa][qb][th][tw][n]`` (padded pixel (th*m + qa, tw*m + qb); zeros outside the
    image). Returns how many copied values are not finite or not below LIMIT."""
    # 16 x 16 blocks (images x columns) transposed in registers: 0.2 ns a value where a
    # scalar scatter took 0.7 ns and images-innermost gathers 2.8 ns (one cache line a load).
    N, C, H, W = src.shape
    THp, TWp = nr + 1, TW + 1
    plane = THp * TWp * count
    dst[: C * m * m * plane] = 0.0
    w_hi = min(W, TWp * m - left)
    for w in range(w_hi):
        ww = w + left
        col_off[w] = (ww % m) * plane + (ww // m) * count
    bad = 0
    image = C * H * W
    for c in range(C):
        for hh in range(nr * m + 2):
            ih = row0 + hh
            if ih < 0 or ih >= H:
                continue
            base = ((c * m + hh % m) * m * THp + hh // m) * TWp * count
            for nb in range(0, count, 16):
                rows = min(16, count - nb)
                s_off = ((n0 + nb) * C + c) * H * W + ih * W
                for w0 in range(0, w_hi, 16):
                    bad += load_transposed(
                        src, s_off + w0, image, rows, min(16, w_hi - w0), dst, base + nb,
                        col_off, w0,
                    )  # fmt: skip
    return bad


@njit(cache=True)
def _copy_dy_phase(dy, n0, count, th0, nr, m, TW, FN, dst, col_off, db_t):
    """dY tiles of tile rows th0 .. th0+nr-1 into ``dst[i][j][tr][tw][n][f]`` (filters
    innermost, FN of them; zeros past the output and past F), adding each value to
    ``db_t[f]``. Returns how many values are not finite or not below LIMIT."""
    N, F, OH, OW = dy.shape
    block = nr * TW * count * FN  # one (i, j) plane
    dst[: m * m * block] = 0.0
    for ow in range(OW):
        col_off[ow] = (ow % m) * block + (ow // m) * count * FN
    bad = 0
    plane = OH * OW
    for n in range(count):
        for tr in range(nr):
            for i in range(m):
                oh = (th0 + tr) * m + i
                if oh >= OH:
                    continue
                base = (i * m * nr + tr) * TW * count * FN + n * FN
                for f0 in range(0, F, 16):
                    rows = min(16, F - f0)
                    s_off = ((n0 + n) * F + f0) * plane + oh * OW
                    for w0 in range(0, OW, 16):
                        bad += load_transposed(
                            dy, s_off + w0, plane, rows, min(16, OW - w0), dst, base + f0,
                            col_off, w0,
                        )  # fmt: skip
    # db: every lane (filter) sums its own values in order, so the loop vectorises over f.
    acc = db_t[:FN]
    for q in range(m * m * block // FN):
        row = dst[q * FN : (q + 1) * FN]
        for f in range(FN):
            acc[f] += row[f]
    return bad


# --- transforms -----------------------------------------------------------------------------


@njit(cache=True)
def _input_transform(xq, c, tr, count, plan, t, v, so, do, col0):
    """V[xi][c][col0 : col0 + TW*count] <- B^T d B of tile row ``tr`` of channel ``c``."""
    m, TW, ldv, Cr = plan.m, plan.TW, plan.ldv, plan.Cr
    a = m + 2
    THp, TWp = plan.nr + 1, TW + 1
    run = TW * count
    for i in range(a):  # rows of the tiles: transform along the columns
        for j in range(a):
            so[j] = ((((c * m + i % m) * m + j % m) * THp + tr + i // m) * TWp + j // m) * count
            do[j] = (i * a + j) * run
        if m == 4:
            _bt4(xq, so, t, do, run)
        else:
            _bt2(xq, so, t, do, run)
    for j in range(a):  # then along the rows
        for i in range(a):
            so[i] = (i * a + j) * run
            do[i] = ((i * a + j) * Cr + c) * ldv + col0
        if m == 4:
            _bt4(t, so, v, do, run)
        else:
            _bt2(t, so, v, do, run)


@njit(cache=True)
def _output_tiles(mm, f, col0, run, plan, t, o, so, do):
    """o[(i*m + j) * run + p] <- (A^T M A)[i, j] of filter ``f`` for the run at ``col0``."""
    m, Fp, ldv = plan.m, plan.Fp, plan.ldv
    a = m + 2
    for j in range(a):
        for k in range(a):
            so[k] = ((k * a + j) * Fp + f) * ldv + col0
        for i in range(m):
            do[i] = (i * a + j) * run
        if m == 4:
            _at4(mm, so, t, do, run)
        else:
            _at2(mm, so, t, do, run)
    for i in range(m):
        for j in range(a):
            so[j] = (i * a + j) * run
        for j in range(m):
            do[j] = (i * m + j) * run
        if m == 4:
            _at4(t, so, o, do, run)
        else:
            _at2(t, so, o, do, run)


@njit(cache=True)
def _products(u, v, mm, C, cols, plan, f0, f1):
    """mm[xi] rows f0..f1-1 (of Fp, multiples of MR) = u[xi] (Fp x C) @ v[xi] (C x cols),
    those rows, for every xi."""
    a = plan.m + 2
    Fp, ldv, Cr = plan.Fp, plan.ldv, plan.Cr
    for xi in range(a * a):
        for p0 in range(0, cols, NR):
            for m0 in range(f0, f1, MR):
                gemm_block(
                    u, (xi * Fp + m0) * C, C, v, xi * Cr * ldv + p0, ldv, C,
                    mm, (xi * Fp + m0) * ldv + p0, ldv, False,
                )  # fmt: skip


# --- forward (also dx) ---------------------------------------------------------------------------


@njit(cache=True)
def _forward_items(x, u, bias, relu, y, plan, lo, hi, xq, t, o, v, mm, offs, flags, res, has_res):
    """Work items lo .. hi-1 of a forward call. With ``has_res`` each stored block gets
    ``res`` (same shape and dtype as ``y``) added before the ReLU, while it is still in L1:
    ``relu(conv + bias + res)``, rounded as the unfused conv, Add and ReLU round it."""
    N, C = x.shape[0], x.shape[1]
    F, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    m, G, nr, TW = plan.m, plan.G, plan.nr, plan.TW
    so, do, col_off = offs[0], offs[1], offs[2]
    for item in range(lo, hi):
        pair, block = item // plan.nfb, item % plan.nfb
        group, band = pair // plan.nbands, pair % plan.nbands
        f0 = block * plan.fb
        f1 = min(F, f0 + plan.fb)
        n0 = group * G
        count = min(G, N - n0)
        th0 = band * nr
        nrr = min(nr, plan.TH - th0)
        bad = _copy_phase(x, n0, count, th0 * m - plan.top, plan.left, m, nr, TW, xq, col_off)
        if bad:
            flags[item] = 1
            continue
        run = TW * count
        for tr in range(nrr):
            for c in range(C):
                _input_transform(xq, c, tr, count, plan, t, v, so, do, tr * run)
        for ow in range(OW):
            col_off[ow] = (ow % m) * run + (ow // m) * count
        image = F * OH * OW
        cols = -(-(nrr * run) // NR) * NR
        _products(u, v, mm, C, cols, plan, f0, min(plan.Fp, f0 + plan.fb))
        for tr in range(nrr):
            oh0 = (th0 + tr) * m
            for f in range(f0, f1):
                _output_tiles(mm, f, tr * run, run, plan, t, o, so, do)
                for i in range(min(m, OH - oh0)):
                    for nb in range(0, count, 16):
                        d_off = ((n0 + nb) * F + f) * OH * OW + (oh0 + i) * OW
                        for ow0 in range(0, OW, 16):
                            store_transposed(
                                o, i * m * run + nb, col_off, ow0, min(16, OW - ow0),
                                min(16, count - nb), bias[f], relu and not has_res, y,
                                d_off + ow0, image,
                            )  # fmt: skip
                            if has_res:
                                add_residual_block(
                                    y, res, d_off + ow0, image, min(16, OW - ow0),
                                    min(16, count - nb), relu,
                                )  # fmt: skip


def _forward_residual(x, u, bias, relu, y, plan, ws, flags, res, has_res):
    """y = conv3x3(x) (+ bias, ReLU) by Winograd on every Numba thread, with an optional
    residual (see :func:`_forward_items`; pass ``y`` and False for none): the forward kernel
    of the unprepared and prepared paths (:data:`forward_residual_serial` is its serial
    twin). ``flags[item]`` is set where the input had values that are not finite or too large
    (outputs then unset)."""
    n_threads = ws.xq.shape[0]
    items = plan.ngroups * plan.nbands * plan.nfb
    for t in prange(n_threads):
        lo, hi = image_range(t, n_threads, items)
        _forward_items(
            x, u, bias, relu, y, plan, lo, hi, ws.xq[t], ws.t[t], ws.o[t], ws.v[t], ws.mm[t],
            ws.offs[t], flags, res, has_res,
        )  # fmt: skip


# One source, two compilations: a parallel region wakes the thread pool (tens of
# microseconds, milliseconds when other processes hold the cores), which a batch-1 layer of
# a few MFLOP cannot amortise; the serial twin (prange is range there) runs the same work
# items in the same order on the calling thread, so its results are bitwise the same.
forward_residual = njit(cache=True, parallel=True)(_forward_residual)
forward_residual_serial = serial_twin(forward_residual)


# --- weight gradient ---------------------------------------------------------------------------


@njit(cache=True)
def _weight_grad_items(x, dy, plan, lo, hi, xq, dq, t, v, mm, offs, du_t, db_t, flags):
    """Partial dU^T[xi] (Cr x FN) and db over work items lo .. hi-1.

    V comes from the forward transform (rows: channels, runs of positions); dY is copied
    filters-innermost, so that dM = A dY A^T is a transform over long runs of (position,
    filter) and dM[xi] is directly the (positions x FN) B operand of the micro-kernel:
    dU^T[xi] += V[xi] (Cr x positions) @ dM[xi] (positions x FN), accumulated across items.
    """
    N, C = x.shape[0], x.shape[1]
    m, G, nr, TW, Cr, FN, ldv = plan.m, plan.G, plan.nr, plan.TW, plan.Cr, plan.FN, plan.ldv
    a = m + 2
    so, do, col_off = offs[0], offs[1], offs[2]
    ldm = nr * TW * G * FN  # values per xi of dM
    du_t[:] = 0.0
    db_t[:] = 0.0
    for item in range(lo, hi):
        group, band = item // plan.nbands, item % plan.nbands
        n0 = group * G
        count = min(G, N - n0)
        th0 = band * nr
        nrr = min(nr, plan.TH - th0)
        bad = _copy_phase(x, n0, count, th0 * m - plan.top, plan.left, m, nr, TW, xq, col_off)
        bad += _copy_dy_phase(dy, n0, count, th0, nrr, m, TW, FN, dq, col_off, db_t)
        if bad:
            flags[item] = 1
            continue
        run = TW * count
        run_f = run * FN
        for tr in range(nrr):
            for c in range(C):
                _input_transform(xq, c, tr, count, plan, t, v, so, do, tr * run)
            # dM = A dY A^T over the runs of (tw, n, f): along j, then along i.
            for i in range(m):
                for j in range(m):
                    so[j] = ((i * m + j) * nrr + tr) * run_f
                for j in range(a):
                    do[j] = (i * a + j) * run_f
                if m == 4:
                    _a4(dq, so, t, do, run_f)
                else:
                    _a2(dq, so, t, do, run_f)
            for j in range(a):
                for i in range(m):
                    so[i] = (i * a + j) * run_f
                for k in range(a):
                    do[k] = (k * a + j) * ldm + tr * run_f
                if m == 4:
                    _a4(t, so, mm, do, run_f)
                else:
                    _a2(t, so, mm, do, run_f)
        cols = nrr * run
        for xi in range(a * a):
            for f0 in range(0, FN, NR if FN % NR == 0 else 16):
                for c0 in range(0, Cr, MR):
                    args = (
                        v, (xi * Cr + c0) * ldv, ldv, mm, xi * ldm + f0, FN, cols,
                        du_t, (xi * Cr + c0) * FN + f0, FN, True,
                    )  # fmt: skip
                    if FN % NR == 0:
                        gemm_block(*args)
                    else:
                        gemm_block16(*args)


@njit(cache=True, parallel=True)
def weight_grad_kernel(x, dy, plan, ws, du_part, db_part, flags):
    """Per-thread partial dU^T ((m+2)^2, Cr, FN) and db (FN) by Winograd."""
    n_threads = ws.xq.shape[0]
    items = plan.ngroups * plan.nbands
    for t in prange(n_threads):
        lo, hi = image_range(t, n_threads, items)
        _weight_grad_items(
            x, dy, plan, lo, hi, ws.xq[t], ws.dq[t], ws.t[t], ws.v[t], ws.mm[t], ws.offs[t],
            du_part[t], db_part[t], flags,
        )  # fmt: skip


@njit(cache=True)
def _weight_grad_finish(du_part, db_part, m, dw, db, du, taps, offs):
    """dw[f, c] = G^T (sum_t du_part[t, :, c, f]) G and db = sum_t db_part[t] (thread order),
    written in dw's dtype. ``du``/``taps`` are float32 scratch of (m+2)^2 and 9 pair runs."""
    n_threads, aa, Cr, FN = du_part.shape
    F, C = dw.shape[0], dw.shape[1]
    P = Cr * FN
    flat = du_part.reshape((n_threads, aa * P))
    du[:] = flat[0]
    for t in range(1, n_threads):  # thread order; each element its own sum (vectorises)
        part = flat[t]
        for q in range(aa * P):
            du[q] += part[q]
    for xi in range(aa):
        offs[0, xi] = xi * P
    for t in range(9):
        offs[1, t] = t * P
    if m == 4:
        _DW4(du, offs[0], taps, offs[1], P)
    else:
        _DW2(du, offs[0], taps, offs[1], P)
    for f in range(F):
        for c in range(C):
            for k in range(9):
                dw[f, c, k // 3, k % 3] = store_value(dw, taps[k * P + c * FN + f])
        s = np.float32(0.0)
        for t in range(n_threads):
            s += db_part[t, f]
        db[f] = store_value(db, s)


def weight_grad_finish(du_part, db_part, m, dw_bits, db_bits):
    """Reduce the per-thread partial sums and transform dU back to dW (see above)."""
    aa, Cr, FN = du_part.shape[1:]
    du = np.empty(aa * Cr * FN, np.float32)
    taps = np.empty(9 * Cr * FN, np.float32)
    offs = np.empty((2, aa), np.int64)
    _weight_grad_finish(du_part, db_part, m, dw_bits, db_bits, du, taps, offs)
