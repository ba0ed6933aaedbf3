"""The CPU GEMM layer: ``out = act(op(a) @ op(b) + bias)`` for float32 and float16 (half bits).

``op(a)`` is ``a`` or ``a.T`` (likewise ``b``), so the Dense layer's three products need no
transposed copies: forward ``x @ w``, ``dx = dy @ w.T``, ``dW = x.T @ dy``.

Structure (Goto / BLIS): the output is cut into work items of MC x NC, which the threads take
from a shared counter. For each block of KC reduction steps an item packs its MC x KC block of
``op(a)`` into MR-row panels stored column after column and the KC x NC block of ``op(b)`` into
NR-column panels (per-thread buffers that stay in L2), then runs the register-blocked
micro-kernel :func:`~fastconv.cpu._simd.gemm_packed` over every MR x NR tile, accumulating into
a float32 buffer; the epilogue adds the bias, applies ReLU and stores float32 or half. Packing
converts half to float32 once per value (vector loads, 16 x 16 transposes in registers for the
transposed operands), so the micro-kernel only ever sees float32; rows and columns past the
edges are packed as zeros and never stored. Products under :data:`SERIAL_FLOPS` run on the
calling thread. Measurements behind the choices: docs/kernels.md, "Dense layers".

Determinism: each output element is one chain of fused multiply-adds over ascending k (the
micro-kernel reloads its float32 partial result between KC blocks, so the blocking does not
change a bit), computed by one thread. Results do not depend on the thread count, the
blocking, or which thread ran which item.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from . import _workspace
from ._half import bits_view, load, store_value
from ._layout import RELU6, relu6
from ._simd import (
    MR,
    NR,
    copy_block,
    copy_row,
    fetch_add,
    gemm_packed,
    gemm_row_panels1,
    gemm_row_panels2,
    gemm_rows,
    load_transposed,
)

__all__ = ["SERIAL_FLOPS", "Blocking", "blocking", "matmul", "pack_filters", "pointwise",
           "pack_panels", "matmul_panels", "PackedA", "gemm_offsets",
           "gemm_offsets_part", "OFFSETS_NC"]  # fmt: skip

SERIAL_FLOPS = 4_000_000  # ~40 us on one core; a parallel launch costs ~10-50 us (measured)


class Blocking(NamedTuple):
    """Cache blocking of one call: KC reduction steps per packed block of ``op(b)``, MC x NC
    outputs per work item (MC a multiple of MR, NC of NR), ``ldc`` the float32 buffer's row
    stride."""

    KC: int
    MC: int
    NC: int
    ldc: int


def blocking(
    M, K, N, n_threads, trans_b=False, b_block=131072, c_block=65536, kc_trans=1024, split=2
):
    """:class:`Blocking` for an (M x K) @ (K x N) product on ``n_threads`` threads.

    Chosen so that ``b`` streams from memory in long runs, which is what bounds the products
    where few rows share each value of ``b`` (runs of 1 KiB every 16 KiB read at 9 GB/s on
    one core, whole 16 KiB rows at 20 GB/s). MC: all rows up to 128, so that each packed
    block of ``op(b)`` serves every row. Plain ``b`` (rows of ``op(b)`` contiguous): NC, the
    columns split into ``split`` items per thread, at most what keeps the float32 output
    buffer within ``c_block`` floats; KC, what keeps the packed block within ``b_block``
    floats (L2). Transposed ``b`` (runs along the reduction): KC = ``kc_trans``, NC what fits
    ``b_block``. The defaults were measured on the fc6-fc8 shapes (docs/kernels.md).
    """
    return Blocking(*_choose(M, K, N, n_threads, trans_b, b_block, c_block, kc_trans, split))


@njit(cache=True)
def _choose(M, K, N, n_threads, trans_b, b_block, c_block, kc_trans, split):
    """(KC, MC, NC, ldc) of :func:`blocking`."""
    mc = min(128, -(-M // MR) * MR)
    if K <= 32 and not trans_b:
        # A short reduction (dW at batch 8-32): the stores of the output bound the product,
        # and they stream best in long row runs (fc6's dW at batch 8, one core: 21.7 ms with
        # 512-column items, 16.1 ms with 2048).
        per_item = -(-N // (n_threads * split))
        nc = -(-per_item // NR) * NR
        mc = max(MR, min(mc, c_block // nc // MR * MR))
        ldc = nc + 16 if nc % 1024 == 0 else nc
        return max(16, K), mc, nc, ldc
    if trans_b:
        kc = max(16, min(kc_trans, K))
        nc = min(-(-N // (n_threads * split)), max(NR, b_block // kc))
    else:
        nc = min(-(-N // (n_threads * split)), max(NR, c_block // mc))
        kc = 0
    nc = -(-nc // NR) * NR
    if not trans_b:
        kc = max(16, min(b_block // nc, K))
    # Rows a multiple of 4 KiB apart share L1 sets (see _layout.row_stride): one more line.
    ldc = nc + 16 if nc % 1024 == 0 else nc
    return kc, mc, nc, ldc


@njit(cache=True)
def _pack_a(a, trans, M, K, i0, mc, pc, kc, ap, offs):
    """Block ``op(a)[i0:i0+mc, pc:pc+kc]`` as MR-row panels stored column after column:
    ``ap[(ir*kc + kk)*MR + r] = op(a)[i0 + ir*MR + r, pc + kk]``, zeros for rows past M.
    ``offs`` holds ``c*MR`` for c < 16."""
    for ir in range(-(-mc // MR)):
        r0 = i0 + ir * MR
        rows = min(MR, M - r0)
        base = ir * kc * MR
        if rows < MR:
            ap[base : base + kc * MR] = 0.0
        if trans:  # op(a)[i, k] = a[k, i]: MR contiguous values per k
            copy_block(a, pc * M + r0, M, ap, base, MR, kc, rows)
        else:  # a transpose, rows x 16 values at a time in registers
            for k0 in range(0, kc, 16):
                load_transposed(
                    a, r0 * K + pc + k0, K, rows, min(16, kc - k0), ap, base + k0 * MR, offs, 0
                )


@njit(cache=True)
def _pack_b(b, trans, K, N, pc, kc, jc, nc, bp, offs):
    """Block ``op(b)[pc:pc+kc, jc:jc+nc]`` as NR-column panels:
    ``bp[(jr*kc + kk)*NR + j] = op(b)[pc + kk, jc + jr*NR + j]``, zeros for columns past N.
    ``offs`` holds ``c*NR`` for c < 16."""
    panels = -(-nc // NR)
    if trans:  # op(b)[k, j] = b[j, k]: a transpose, 16 x 16 values at a time in registers
        for jr in range(panels):
            c0 = jc + jr * NR
            cols = min(NR, N - c0)
            base = jr * kc * NR
            if cols < NR:
                bp[base : base + kc * NR] = 0.0
            for j0 in range(0, cols, 16):
                for k0 in range(0, kc, 16):
                    load_transposed(
                        b, (c0 + j0) * K + pc + k0, K, min(16, cols - j0), min(16, kc - k0),
                        bp, base + k0 * NR + j0, offs, 0,
                    )  # fmt: skip
        return
    # Row after row of b (contiguous runs of nc values: what the prefetchers stream best),
    # each row cut into the panels; only the last panel can be partial.
    full = nc // NR
    rest = nc - full * NR
    for kk in range(kc):
        s0 = (pc + kk) * N + jc
        for jr in range(full):
            copy_row(b, s0 + jr * NR, bp, (jr * kc + kk) * NR, NR)
        if rest:
            d0 = (full * kc + kk) * NR
            copy_row(b, s0 + full * NR, bp, d0, rest)
            bp[d0 + rest : d0 + NR] = 0.0


@njit(cache=True)
def _store(cbuf, ldc, out, i0, rows, j0, cols, bias, has_bias, relu):
    """Epilogue: ``out[i0+r, j0+j] = act(cbuf[r*ldc + j] + bias[j0+j])`` in out's dtype."""
    for r in range(rows):
        src = cbuf[r * ldc : r * ldc + cols]
        dst = out[i0 + r, j0 : j0 + cols]
        if has_bias:
            bs = bias[j0 : j0 + cols]
            for j in range(cols):
                v = src[j] + load(bs[j])
                if relu and v < np.float32(0.0):  # False for NaN: NaN propagates
                    v = np.float32(0.0)
                dst[j] = store_value(dst, v)
        elif relu:
            for j in range(cols):
                v = src[j]
                dst[j] = store_value(dst, v if not v < np.float32(0.0) else np.float32(0.0))
        else:
            for j in range(cols):
                dst[j] = store_value(dst, src[j])


def _is_float32(array):
    """Whether ``array`` holds float32 (a compile-time constant in Numba code)."""


@overload(_is_float32)
def _is_float32_impl(array):
    value = array.dtype == types.float32
    return lambda array: value


@njit(inline="always")
def _item_block(item, n_cols, M, N, MC, NC):
    """Work item -> its block of the output: first row and column, rows and columns."""
    i0 = (item // n_cols) * MC
    j0 = (item % n_cols) * NC
    return i0, j0, min(MC, M - i0), min(NC, N - j0)


@njit(cache=True)
def _items(a, trans_a, b, trans_b, out, bias, has_bias, relu, K, blk, counter, ap, bp, cbuf):
    """Work items taken from ``counter`` until none is left (item = row block * column blocks
    + column block): dynamic scheduling, so a thread that the OS preempts (the cores are
    shared) holds the others up less at the join; each item is computed whole by one
    thread, so the results do not depend on who took what. Each item packs its own blocks of
    both operands (the blocks of ``op(a)`` are repacked by every column block: 1/NC of the
    item's work), so one parallel region does the whole product."""
    M, N = out.shape
    KC, MC, NC, ldc = blk
    offs_a = np.arange(16) * MR
    offs_b = np.arange(16) * NR
    n_cols = -(-N // NC)
    items = -(-M // MC) * n_cols
    while True:
        item = fetch_add(counter, 1)
        if item >= items:
            break
        i0, j0, mc, nc = _item_block(item, n_cols, M, N, MC, NC)
        panels = -(-nc // NR)
        blocks = -(-mc // MR)
        if K == 0:
            for r in range(mc):
                cbuf[r * ldc : r * ldc + nc] = 0.0
        # One KC block, float32, no epilogue: whole tiles go from the registers to ``out``
        # (skipping the buffer and its copy: dW at small batch sizes is bound by these stores).
        direct = K <= KC and _is_float32(out) and not has_bias and not relu
        full_r = mc // MR if direct else 0
        full_c = nc // NR if direct else 0
        for pc in range(0, K, KC):
            kc = min(KC, K - pc)
            _pack_a(a, trans_a, M, K, i0, mc, pc, kc, ap, offs_a)
            _pack_b(b, trans_b, K, N, pc, kc, j0, nc, bp, offs_b)
            for jr in range(panels):
                for ir in range(blocks):
                    a_off, b_off = ir * kc * MR, jr * kc * NR
                    if ir < full_r and jr < full_c:  # never for half outputs (full_r = 0)
                        c_off = (i0 + ir * MR) * N + j0 + jr * NR
                        gemm_packed(ap, a_off, bp, b_off, kc, out, c_off, N, False)
                    else:
                        c_off = ir * MR * ldc + jr * NR
                        gemm_packed(ap, a_off, bp, b_off, kc, cbuf, c_off, ldc, pc > 0)
        if direct:  # the edges: rows below the whole tiles, then columns right of them
            r_done, c_done = full_r * MR, full_c * NR
            _store(cbuf[r_done * ldc :], ldc, out, i0 + r_done, mc - r_done, j0, nc, bias, has_bias,
                   relu)  # fmt: skip
            if c_done < nc:
                _store(cbuf[c_done:], ldc, out, i0, r_done, j0 + c_done, nc - c_done, bias,
                       has_bias, relu)  # fmt: skip
        else:
            _store(cbuf, ldc, out, i0, mc, j0, nc, bias, has_bias, relu)


@njit(cache=True, parallel=True)
def _matmul(a, trans_a, b, trans_b, out, bias, has_bias, relu, K, blk, ap, bp, cbuf):
    counter = np.zeros(1, np.int64)
    for t in prange(bp.shape[0]):
        _items(
            a, trans_a, b, trans_b, out, bias, has_bias, relu, K, blk, counter, ap[t], bp[t],
            cbuf[t],
        )  # fmt: skip


@njit(cache=True)
def _matmul_serial(a, trans_a, b, trans_b, out, bias, has_bias, relu, K, blk, ap, bp, cbuf):
    """:func:`_matmul` on the calling thread (small products: no fork/join)."""
    counter = np.zeros(1, np.int64)
    _items(
        a, trans_a, b, trans_b, out, bias, has_bias, relu, K, blk, counter, ap[0], bp[0], cbuf[0]
    )


@njit(cache=True)
def _matmul_small(a, trans_a, b, trans_b, out, bias, has_bias, relu):
    """A small product in one call from Python: blocking chosen and buffers allocated here,
    which takes the overhead of an 8x84x10 product from ~8 to ~3 us."""
    M, N = out.shape
    K = a.shape[0] if trans_a else a.shape[1]
    kc, mc, nc, ldc = _choose(M, K, N, 1, trans_b, 131072, 65536, 1024, 1)
    blk = Blocking(kc, mc, nc, ldc)
    ap = np.empty((1, mc * kc), np.float32)
    bp = np.empty((1, kc * nc), np.float32)
    cbuf = np.empty((1, mc * ldc), np.float32)
    counter = np.zeros(1, np.int64)
    _items(
        a, trans_a, b, trans_b, out, bias, has_bias, relu, K, blk, counter, ap[0], bp[0], cbuf[0]
    )


def _workspace_make(blk, n_threads):
    def make(alloc):
        ap = alloc((n_threads, blk.MC * blk.KC))
        bp = alloc((n_threads, blk.KC * blk.NC))
        cbuf = alloc((n_threads, blk.MC * blk.ldc))
        return ap, bp, cbuf

    return make


def matmul(a, b, out, trans_a=False, trans_b=False, bias=None, relu=False, blk=None):
    """``out = act(op(a) @ op(b) + bias)`` on Numba's threads; returns ``out``.

    Parameters
    ----------
    a, b : ndarray, float32 or float16, C-contiguous 2-D; ``op(a)`` is (M, K) (``a.T`` when
        ``trans_a``), ``op(b)`` is (K, N) (``b.T`` when ``trans_b``)
    out : ndarray, (M, N), C-contiguous, a's dtype; written whole
    bias : ndarray (N,) or None; relu : bool, applied after the bias (NaN kept)
    blk : :class:`Blocking` or None (measured defaults)
    """
    M, N = out.shape
    K = a.shape[0] if trans_a else a.shape[1]
    if M == 0 or N == 0:
        return out
    bv = bits_view(bias) if bias is not None else bits_view(out[0])
    # Products under SERIAL_FLOPS run on the calling thread: a parallel launch costs more.
    if blk is None and 2 * M * N * K < SERIAL_FLOPS:
        _matmul_small(
            bits_view(a), bool(trans_a), bits_view(b), bool(trans_b), bits_view(out), bv,
            bias is not None, bool(relu),
        )  # fmt: skip
        return out
    n_threads = max(1, numba.get_num_threads())
    if blk is None:
        blk = blocking(M, K, N, n_threads, trans_b)
    items = -(-M // blk.MC) * -(-N // blk.NC)
    n_threads = min(n_threads, items)
    key = ("matmul", blk, n_threads)
    with _workspace.checkout(key, _workspace_make(blk, n_threads)) as (ap, bp, cbuf):
        kernel = _matmul_serial if n_threads == 1 else _matmul
        kernel(
            bits_view(a), bool(trans_a), bits_view(b), bool(trans_b), bits_view(out), bv,
            bias is not None, bool(relu), K, blk, ap, bp, cbuf,
        )  # fmt: skip
    return out


# --- 1x1 convolutions: out[n] = act(a @ b[n] + bias (+ res[n])) over the images' pixels -------
#
# A pointwise convolution in NCHW is one product per image, (F x C) @ (C x P), all sharing the
# filters. As separate products, a 7x7 map (P = 49) fills two 32-column panels with 15 columns
# of zeros and each item repacks its block of filters; here the columns of all images form one
# row of B * P columns (an item's panels gather their columns across image boundaries, the
# epilogue scatters them back), and the filters are packed once per call, or once per
# weights version on the prepared path.


class PackedA(NamedTuple):
    """``op(a)`` (M x K) packed once (:func:`pack_filters`): row blocks of MC and reduction
    blocks of KC, each laid out as :func:`_pack_a` lays a block, block (i0, pc) at
    ``i0*K + pc*rows`` (rows: the block's rows rounded up to MR)."""

    packed: np.ndarray  # float32
    MC: int
    KC: int
    M: int
    K: int


def pack_filters(a, trans_a=False):
    """``op(a)`` packed once for :func:`pointwise` and :func:`gemm_offsets`: a
    :class:`PackedA`. ``a`` C-contiguous float32 or float16 (M x K, or K x M with
    ``trans_a``)."""
    M, K = (a.shape[1], a.shape[0]) if trans_a else a.shape
    mc, kc = _pointwise_blocks(M, K)
    packed = np.empty(max(1, -(-M // MR) * MR * K), np.float32)
    _pack_filters(bits_view(a), bool(trans_a), M, K, mc, kc, packed)
    return PackedA(packed, mc, kc, M, K)


def _pointwise_blocks(M, K):
    """(MC, KC): all rows up to 128 (each packed column block then serves them all) and
    reductions of up to 512 steps (a 32-column panel of 512 steps is 64 KiB: L2)."""
    return max(MR, min(128, -(-M // MR) * MR)), max(1, min(512, K))


@njit(cache=True)
def _pack_filters(a, trans_a, M, K, MC, KC, packed):
    offs = np.arange(16) * MR
    for i0 in range(0, M, MC):
        mc = min(MC, M - i0)
        rows_pad = -(-mc // MR) * MR
        for pc in range(0, K, KC):
            kc = min(KC, K - pc)
            base = i0 * K + pc * rows_pad
            _pack_a(a, trans_a, M, K, i0, mc, pc, kc, packed[base:], offs)


@njit(cache=True)
def _pack_columns(b, K, P, pc, kc, j0, nc, bp):
    """Columns j0 .. j0+nc of the (K x B*P) matrix whose column n*P + p is ``b[n, :, p]``, rows
    pc .. pc+kc, as NR-column panels (zeros past the last column)."""
    panels = -(-nc // NR)
    for kk in range(kc):
        row = pc + kk
        for jr in range(panels):
            c0 = j0 + jr * NR
            cols = min(NR, j0 + nc - c0)
            d0 = (jr * kc + kk) * NR
            j = c0
            while j < c0 + cols:
                n = j // P
                p = j - n * P
                run = min(c0 + cols - j, P - p)
                copy_row(b, (n * K + row) * P + p, bp, d0 + j - c0, run)
                j += run
            if cols < NR:
                bp[d0 + cols : d0 + NR] = 0.0


@njit(cache=True)
def _store_columns(cbuf, ldc, out, i0, rows, j0, cols, P, bias, relu, res, has_res):
    """``out[n, i0+r, p] = act(cbuf[r*ldc + j - j0] + bias[i0+r])`` for the columns j = n*P + p
    of the block; with ``has_res`` the value is rounded to out's dtype, ``res[n, i0+r, p]``
    added and the sum rounded again (the bits of a separate Add), then the ReLU. ``relu`` an
    activation code (:data:`~fastconv.cpu._layout.ACTIVATION_CODES`; ReLU6 without ``res``)."""
    for r in range(rows):
        f = i0 + r
        bf = bias[f]
        j = j0
        while j < j0 + cols:
            n = j // P
            p = j - n * P
            run = min(j0 + cols - j, P - p)
            src = cbuf[r * ldc + j - j0 : r * ldc + j - j0 + run]
            dst = out[n, f, p : p + run]
            if has_res:
                rr = res[n, f, p : p + run]
                for q in range(run):
                    v = load(store_value(dst, src[q] + bf)) + load(rr[q])
                    if relu and v < np.float32(0.0):  # False for NaN: NaN is kept
                        v = np.float32(0.0)
                    dst[q] = store_value(dst, v)
            elif relu == RELU6:
                for q in range(run):
                    dst[q] = store_value(dst, relu6(src[q] + bf))
            elif relu:
                for q in range(run):
                    v = src[q] + bf
                    dst[q] = store_value(dst, v if not v < np.float32(0.0) else np.float32(0.0))
            else:
                for q in range(run):
                    dst[q] = store_value(dst, src[q] + bf)
            j += run


#: up to this many filters a float32 1x1 product reads the image's rows where they lie
#: instead of packing them (:func:`_pointwise_items`)
POINTWISE_IN_PLACE_MAX_M = 32
_NO_OFFSETS = np.zeros(0, np.int64)  # the row offsets of a product that packs its rows


@njit(cache=True)
def _pointwise_items(packed, b, out, bias, relu, res, has_res, K, blk, counter, bp, cbuf,
                     in_place, row_offsets):  # fmt: skip
    """The work items of :func:`pointwise`. With ``in_place`` (float32, few filters) an item
    whose columns lie in one image, all NR-wide reads inside ``b``, runs the micro-kernel on
    the image's rows where they lie (``row_offsets[k] = k * P``; :func:`gemm_rows`): packed,
    each column block was copied to be used by one or two row blocks only. Same FMA chains,
    same bits."""
    B, M, P = out.shape
    KC, MC, NC, ldc = blk
    total = B * P
    n_cols = -(-total // NC)
    items = -(-M // MC) * n_cols
    flat = b.reshape(-1)
    while True:
        item = fetch_add(counter, 1)
        if item >= items:
            break
        i0, j0, mc, nc = _item_block(item, n_cols, M, total, MC, NC)
        rows_pad = -(-mc // MR) * MR
        panels = -(-nc // NR)
        blocks = rows_pad // MR
        n, p0 = j0 // P, j0 % P
        direct = (
            in_place
            and _is_float32(b)
            and p0 + nc <= P
            and (n * K + K - 1) * P + p0 + panels * NR <= flat.size
        )
        if K == 0:
            for r in range(mc):
                cbuf[r * ldc : r * ldc + nc] = 0.0
        for pc in range(0, K, KC):
            kc = min(KC, K - pc)
            a_base = i0 * K + pc * rows_pad
            if direct:
                for jr in range(panels):
                    for ir in range(blocks):
                        gemm_rows(packed, a_base + ir * kc * MR, flat, row_offsets, pc,
                                  n * K * P + p0 + jr * NR, kc, cbuf, ir * MR * ldc + jr * NR,
                                  ldc, pc > 0)  # fmt: skip
                continue
            _pack_columns(b, K, P, pc, kc, j0, nc, bp)
            for jr in range(panels):
                for ir in range(blocks):
                    gemm_packed(packed, a_base + ir * kc * MR, bp, jr * kc * NR, kc, cbuf,
                                ir * MR * ldc + jr * NR, ldc, pc > 0)  # fmt: skip
        _store_columns(cbuf, ldc, out, i0, mc, j0, nc, P, bias, relu, res, has_res)


@njit(cache=True, parallel=True)
def _pointwise(packed, b, out, bias, relu, res, has_res, K, blk, bp, cbuf, in_place,
               row_offsets):  # fmt: skip
    counter = np.zeros(1, np.int64)
    for t in prange(bp.shape[0]):
        _pointwise_items(packed, b, out, bias, relu, res, has_res, K, blk, counter, bp[t],
                         cbuf[t], in_place, row_offsets)  # fmt: skip


@njit(cache=True)
def _pointwise_serial(packed, b, out, bias, relu, res, has_res, K, blk, bp, cbuf, in_place,
                      row_offsets):  # fmt: skip
    """:func:`_pointwise` on the calling thread."""
    counter = np.zeros(1, np.int64)
    _pointwise_items(packed, b, out, bias, relu, res, has_res, K, blk, counter, bp[0], cbuf[0],
                     in_place, row_offsets)  # fmt: skip


def pointwise(filters, b, out, bias, relu=False, res=None, serial=None):
    """``out[n] = act(op(a) @ b[n] + bias[:, None] (+ res[n]))`` for every image n: a 1x1
    convolution (``a`` the filters, ``b[n]`` an image as channels x pixels); returns ``out``.

    Parameters
    ----------
    filters : :class:`PackedA` from :func:`pack_filters` (op(a) is M x K)
    b : ndarray (B, K, P); out : ndarray (B, M, P), written whole; res : None or like out.
        C-contiguous, one dtype (float32, or float16 as its uint16 bits)
    bias : ndarray (M,) float32 (zeros for none); relu : activation code (bool for ReLU, or
        :data:`~fastconv.cpu._layout.ACTIVATION_CODES`; NaN kept; ReLU6 without ``res``)
    serial : None (by size), or True/False to force the calling thread / the thread pool
    """
    packed, MC, KC = filters.packed, filters.MC, filters.KC
    B, M, P = out.shape
    K = b.shape[1]
    if B == 0 or M == 0 or P == 0:
        return out
    total = B * P
    n_threads = max(1, numba.get_num_threads())
    if serial is None:
        serial = 2 * total * M * K < SERIAL_FLOPS
    if serial:
        n_threads = 1
    # Columns: an item per thread and a half at least, within what keeps the float32 output
    # block in c_block floats; NR-column panels.
    nc = min(-(-total // (2 * n_threads)), max(NR, 65536 // MC), max(NR, 131072 // KC))
    nc = -(-nc // NR) * NR
    ldc = nc + 16 if nc % 1024 == 0 else nc
    blk = Blocking(KC, MC, nc, ldc)
    n_threads = min(n_threads, -(-M // MC) * -(-total // nc))
    has_res = res is not None
    rv = bits_view(res) if has_res else bits_view(out)
    key = ("pointwise", blk, n_threads)
    make = _pointwise_make(blk, n_threads)
    in_place = M <= POINTWISE_IN_PLACE_MAX_M and b.dtype == np.float32
    row_offsets = np.arange(K, dtype=np.int64) * P if in_place else _NO_OFFSETS
    with _workspace.checkout(key, make) as (bp, cbuf):
        kernel = _pointwise_serial if n_threads == 1 else _pointwise
        kernel(packed, bits_view(b), bits_view(out), bias, int(relu), rv, has_res, K, blk, bp,
               cbuf, in_place, row_offsets)  # fmt: skip
    return out


def _pointwise_make(blk, n_threads):
    def make(alloc):
        return alloc((n_threads, blk.KC * blk.NC)), alloc((n_threads, blk.MC * blk.ldc))

    return make


# --- Dense weights packed once (prepared inference): out = act(a @ W + bias (+ res)) -----------
#
# ``matmul`` packs its blocks of W on every call: at inference batch sizes the product reads
# W once from memory either way, but in runs cut by the blocking (8 KiB runs of a 16 KiB row
# for AlexNet's fc6 at batch 8) and through the packing copy. Packed once, panel after panel
# (each 32-column panel's K rows contiguous), a product streams W in runs of KC*NR values and
# only packs its few rows of ``a``. Same FMA chains as ``matmul`` (ascending k per output,
# rounded once): the same bits.

PANEL_KC = 512  # reduction steps per block: a 32-column panel block is 64 KiB


def pack_panels(w):
    """``w`` (K, N), float32 or float16, as float32 NR-column panels: ``packed[jp, k, j] =
    w[k, jp*NR + j]`` (zeros past N)."""
    K, N = w.shape
    packed = np.empty((-(-N // NR), K, NR), np.float32)
    _pack_panels(bits_view(w), packed)
    return packed


@njit(cache=True)
def _pack_panels(w, packed):
    K, N = w.shape
    for jp in range(packed.shape[0]):
        cols = min(NR, N - jp * NR)
        for k in range(K):
            d0 = (jp * K + k) * NR
            copy_row(w, k * N + jp * NR, packed, d0, cols)
            if cols < NR:
                packed.reshape(-1)[d0 + cols : d0 + NR] = 0.0


@njit(cache=True)
def _panel_items(a, packed, out, bias, has_bias, relu, res, has_res, blk, counter, ap, cbuf):
    M, N = out.shape
    K = a.shape[1]
    KC, MC, NC, ldc = blk
    offs_a = np.arange(16) * MR
    flat = packed.reshape(-1)
    n_cols = -(-N // NC)
    items = -(-M // MC) * n_cols
    while True:
        item = fetch_add(counter, 1)
        if item >= items:
            break
        i0, j0, mc, nc = _item_block(item, n_cols, M, N, MC, NC)
        panels = -(-nc // NR)
        blocks = -(-mc // MR)
        if K == 0:
            for r in range(mc):
                cbuf[r * ldc : r * ldc + nc] = 0.0
        for pc in range(0, K, KC):
            kc = min(KC, K - pc)
            _pack_a(a, False, M, K, i0, mc, pc, kc, ap, offs_a)
            for jr in range(panels):
                b_off = ((j0 // NR + jr) * K + pc) * NR
                for ir in range(blocks):
                    gemm_packed(ap, ir * kc * MR, flat, b_off, kc, cbuf, ir * MR * ldc + jr * NR,
                                ldc, pc > 0)  # fmt: skip
        if has_res:
            _store_residual(cbuf, ldc, out, i0, mc, j0, nc, bias, has_bias, relu, res)
        else:
            _store(cbuf, ldc, out, i0, mc, j0, nc, bias, has_bias, relu)


@njit(cache=True)
def _store_residual(cbuf, ldc, out, i0, rows, j0, cols, bias, has_bias, relu, res):
    """:func:`_store` with ``res`` added: the product (+ bias) rounded to out's dtype, the
    residual added and the sum rounded again (a separate Add's bits), then the ReLU."""
    for r in range(rows):
        src = cbuf[r * ldc : r * ldc + cols]
        dst = out[i0 + r, j0 : j0 + cols]
        rr = res[i0 + r, j0 : j0 + cols]
        for j in range(cols):
            v = src[j] + load(bias[j0 + j]) if has_bias else src[j]
            v = load(store_value(dst, v)) + load(rr[j])
            if relu and v < np.float32(0.0):  # False for NaN: NaN is kept
                v = np.float32(0.0)
            dst[j] = store_value(dst, v)


@njit(cache=True, parallel=True)
def _panels(a, packed, out, bias, has_bias, relu, res, has_res, blk, ap, cbuf):
    counter = np.zeros(1, np.int64)
    for t in prange(ap.shape[0]):
        _panel_items(a, packed, out, bias, has_bias, relu, res, has_res, blk, counter, ap[t],
                     cbuf[t])  # fmt: skip


@njit(cache=True)
def _panels_serial(a, packed, out, bias, has_bias, relu, res, has_res, blk, ap, cbuf):
    """:func:`_panels` on the calling thread."""
    counter = np.zeros(1, np.int64)
    _panel_items(a, packed, out, bias, has_bias, relu, res, has_res, blk, counter, ap[0], cbuf[0])


@njit(cache=True)
def _panels_small(a, packed, out, bias, has_bias, relu, res, has_res, KC):
    """A small product in one call from Python, its buffers allocated here (no workspace
    checkout: batch-1 inference, ~3 us of overhead instead of ~10)."""
    M, N = out.shape
    mc = min(128, -(-M // MR) * MR)
    nc = -(-N // NR) * NR
    ldc = nc + 16 if nc % 1024 == 0 else nc
    blk = Blocking(KC, mc, nc, ldc)
    counter = np.zeros(1, np.int64)
    ap = np.empty(mc * KC, np.float32)
    cbuf = np.empty(mc * ldc, np.float32)
    _panel_items(a, packed, out, bias, has_bias, relu, res, has_res, blk, counter, ap, cbuf)


#: up to this many rows a product with packed panels runs row by row
#: (:func:`_panels_rows`) instead of on MR-row tiles that would be mostly zeros
ROW_PRODUCT_MAX_ROWS = 2


@njit(cache=True)
def _panels_rows(a, packed, out, bias, has_bias, relu, res, has_res):
    """:func:`_panels_small` for a few rows (batch-1 inference): each row of ``a``, converted
    to float32, times two panels at a time (:func:`~fastconv.cpu._simd.gemm_row_panels2`).
    The same FMA chain per element as the MR-row tiles, so the same bits; 1024 x 50 at one
    row took 11 us a call on the tiles (7 zero rows, two chains a panel) and 4.5 us here."""
    M, N = out.shape
    K = a.shape[1]
    flat = packed.reshape(-1)
    panels = packed.shape[0]
    ldc = panels * NR
    cbuf = np.empty(M * ldc, np.float32)
    row = np.empty(max(K, 1), np.float32)
    for i in range(M):
        if K == 0:
            cbuf[i * ldc : (i + 1) * ldc] = 0.0
            continue
        copy_row(a, i * K, row, 0, K)
        for jp in range(0, panels - 1, 2):
            gemm_row_panels2(row, 0, flat, jp * K * NR, K * NR, K, cbuf, i * ldc + jp * NR)
        if panels % 2:
            jp = panels - 1
            gemm_row_panels1(row, 0, flat, jp * K * NR, 0, K, cbuf, i * ldc + jp * NR)
    if has_res:
        _store_residual(cbuf, ldc, out, 0, M, 0, N, bias, has_bias, relu, res)
    else:
        _store(cbuf, ldc, out, 0, M, 0, N, bias, has_bias, relu)


def matmul_panels(a, packed, out, bias=None, relu=False, res=None):
    """``out = act(a @ W + bias (+ res))`` with W packed by :func:`pack_panels`; bits equal to
    :func:`matmul` of the unpacked W (without ``res``). ``a`` (M, K), ``out`` and ``res``
    (M, N), C-contiguous, one dtype; ``bias`` (N,) of that dtype or None."""
    M, N = out.shape
    K = a.shape[1]
    if M == 0 or N == 0:
        return out
    has_res = res is not None
    bv = bits_view(bias) if bias is not None else bits_view(out[0])
    rv = bits_view(res) if has_res else bits_view(out)
    kc = max(1, min(PANEL_KC, K))
    mc = min(128, -(-M // MR) * MR)
    if M <= ROW_PRODUCT_MAX_ROWS and 2 * M * N * K < SERIAL_FLOPS:
        _panels_rows(bits_view(a), packed, bits_view(out), bv, bias is not None, bool(relu), rv,
                     has_res)  # fmt: skip
        return out
    if 2 * M * N * K < SERIAL_FLOPS and mc * (-(-N // NR) * NR) <= 65536:
        _panels_small(bits_view(a), packed, bits_view(out), bv, bias is not None, bool(relu), rv,
                      has_res, kc)  # fmt: skip
        return out
    n_threads = max(1, numba.get_num_threads())
    if 2 * M * N * K < SERIAL_FLOPS:
        n_threads = 1
    # Columns: two items a thread at least; the float32 output block within 64 Ki values.
    nc = min(-(-N // (2 * n_threads)), max(NR, 65536 // mc))
    nc = -(-nc // NR) * NR
    ldc = nc + 16 if nc % 1024 == 0 else nc
    blk = Blocking(kc, mc, nc, ldc)
    n_threads = min(n_threads, -(-M // mc) * -(-N // nc))
    key = ("panels", blk, n_threads)

    def make(alloc):
        return alloc((n_threads, blk.MC * blk.KC)), alloc((n_threads, blk.MC * blk.ldc))

    with _workspace.checkout(key, make) as (ap, cbuf):
        kernel = _panels_serial if n_threads == 1 else _panels
        kernel(bits_view(a), packed, bits_view(out), bv, bias is not None, bool(relu), rv,
               has_res, blk, ap, cbuf)  # fmt: skip
    return out


# --- products whose B rows are runs of one buffer (the direct and unfolded convolutions) ------

#: columns of B per packed block in :func:`gemm_offsets`: KC x 256 floats stay in L2
OFFSETS_NC = 256


@njit(cache=True)
def gemm_offsets(pa, src, offsets, length, c, bp, cbuf, in_place=False):
    """``c[:, :length] = op(a) @ B`` (not accumulated) where row k of B is
    ``src[offsets[k] : offsets[k] + length]``: a padded image's shifted views (the direct
    convolution's taps) or the rows of an unfolded column matrix. ``pa`` a :class:`PackedA`;
    ``bp`` (KC * OFFSETS_NC) and ``cbuf`` (MC * OFFSETS_NC) float32 scratch. Each value of
    ``c`` is one FMA chain over ascending k (the GEMM layer's micro-kernel), whatever the
    blocking. With ``in_place`` B is read where it lies instead of packed (``src`` must hold
    NR readable values past every row's end)."""
    gemm_offsets_part(pa, src, offsets, 0, length, 0, pa.M, c, bp, cbuf, in_place)


@njit(cache=True)
def gemm_offsets_part(pa, src, offsets, j_lo, j_hi, m_lo, m_hi, c, bp, cbuf, in_place):
    """The block ``c[m_lo:m_hi, j_lo:j_hi]`` of :func:`gemm_offsets` (``m_lo`` a multiple of
    MR): what one thread computes when the threads share one image's product
    (:func:`fastconv.cpu._direct.forward_split`). Its values have the bits of the whole
    product's: the same FMA chain for each, whichever block holds it, packed or in place."""
    M, K, MC, KC = pa.M, pa.K, pa.MC, pa.KC
    NC = OFFSETS_NC
    for j0 in range(j_lo, j_hi, NC):
        nc = min(NC, j_hi - j0)
        panels = -(-nc // NR)
        for i0 in range(0, M, MC):
            mc = min(MC, M - i0)
            r_lo, r_hi = max(m_lo - i0, 0), min(m_hi - i0, mc)
            if r_lo >= r_hi:
                continue
            rows_pad = -(-mc // MR) * MR
            for pc in range(0, K, KC):
                kc = min(KC, K - pc)
                a_base = i0 * K + pc * rows_pad
                if in_place:
                    for jr in range(panels):
                        for ir in range(r_lo // MR, -(-r_hi // MR)):
                            gemm_rows(pa.packed, a_base + ir * kc * MR, src, offsets, pc,
                                      j0 + jr * NR, kc, cbuf, ir * MR * NC + jr * NR, NC,
                                      pc > 0)  # fmt: skip
                    continue
                for kk in range(kc):
                    s0 = offsets[pc + kk] + j0
                    for jr in range(panels):
                        cols = min(NR, nc - jr * NR)
                        d0 = (jr * kc + kk) * NR
                        copy_row(src, s0 + jr * NR, bp, d0, cols)
                        if cols < NR:
                            bp[d0 + cols : d0 + NR] = 0.0
                for jr in range(panels):
                    for ir in range(r_lo // MR, -(-r_hi // MR)):
                        gemm_packed(pa.packed, a_base + ir * kc * MR, bp, jr * kc * NR, kc, cbuf,
                                    ir * MR * NC + jr * NR, NC, pc > 0)  # fmt: skip
            for r in range(r_lo, r_hi):
                c[i0 + r, j0 : j0 + nc] = cbuf[r * NC : r * NC + nc]
