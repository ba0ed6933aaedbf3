"""The CPU GEMM layer: ``out = act(op(a) @ op(b) + bias)`` for float32 and float16 (half bits).

``op(a)`` is ``a`` or ``a.T`` (likewise ``b``), so the Dense layer's three products need no
transposed copies: forward ``x @ w``, ``dx = dy @ w.T``, ``dW = x.T @ dy``.

Structure (Goto / BLIS): ``op(a)`` (M x K) is packed once per call into MR-row panels stored
column after column (:func:`_pack_a`, shared by all threads); the output is cut into work items
of MC x NC; for each item and each block of KC reduction steps a thread packs the KC x NC block
of ``op(b)`` into NR-column panels (its own buffer, which stays in L2) and runs the
register-blocked micro-kernel :func:`~fastconv.cpu._simd.gemm_packed` over every MR x NR tile,
accumulating into a float32 buffer; the epilogue adds the bias, applies ReLU and stores
float32 or half. Packing converts half to float32 once per value, so the micro-kernel only
ever sees float32; rows and columns past the edges are packed as zeros and never stored.

Determinism: each output element is one chain of fused multiply-adds over ascending k (the
micro-kernel reloads its float32 partial result between KC blocks, so the blocking does not
change a bit), computed by one thread. Results do not depend on the thread count, the
blocking, or which thread ran which item.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from . import _workspace
from ._half import bits_view, load, store_value
from ._layout import aligned_empty, image_range
from ._simd import MR, NR, copy_row, gemm_packed, load_transposed

__all__ = ["SERIAL_FLOPS", "Blocking", "blocking", "matmul"]

SERIAL_FLOPS = 4_000_000  # ~40 us on one core; a parallel launch costs ~10-50 us (measured)


class Blocking(NamedTuple):
    """Cache blocking of one call: KC reduction steps per packed block of ``op(b)``, MC x NC
    outputs per work item (MC a multiple of MR, NC of NR), ``ldc`` the float32 buffer's row
    stride."""

    KC: int
    MC: int
    NC: int
    ldc: int


def blocking(M, K, N, n_threads, trans_b=False, b_block=131072, c_block=65536, kc_trans=1024):
    """:class:`Blocking` for an (M x K) @ (K x N) product on ``n_threads`` threads.

    Chosen so that ``b`` streams from memory in long runs, which is what bounds the products
    where few rows share each value of ``b`` (runs of 1 KiB every 16 KiB read at 9 GB/s on
    one core, whole 16 KiB rows at 20 GB/s). MC: all rows up to 128, so that each packed
    block of ``op(b)`` serves every row. Plain ``b`` (rows of ``op(b)`` contiguous): NC, the
    columns split evenly between the threads, at most what keeps the float32 output buffer
    within ``c_block`` floats; KC, what keeps the packed block within ``b_block`` floats (L2).
    Transposed ``b`` (runs along the reduction): KC = ``kc_trans``, NC what fits ``b_block``.
    """
    mc = min(128, -(-M // MR) * MR)
    if trans_b:
        kc = max(16, min(kc_trans, K))
        nc = min(-(-N // n_threads), max(NR, b_block // kc))
    else:
        nc = min(-(-N // n_threads), max(NR, c_block // mc))
    nc = -(-nc // NR) * NR
    if not trans_b:
        kc = max(16, min(b_block // nc, K))
    # Rows a multiple of 4 KiB apart share L1 sets (see _layout.row_stride): one more line.
    ldc = nc + 16 if nc % 1024 == 0 else nc
    return Blocking(kc, mc, nc, ldc)


@njit(cache=True)
def _pack_a(a, trans, M, K, ap, ib, offs):
    """Panel ``ib`` of op(a) (M x K): ``ap[(ib*K + k)*MR + r] = op(a)[ib*MR + r, k]``, zeros
    for rows past M. ``offs`` holds ``c*MR`` for c < 16."""
    r0 = ib * MR
    rows = min(MR, M - r0)
    base = ib * K * MR
    if rows < MR:
        ap[base : base + K * MR] = 0.0
    if trans:  # op(a)[i, k] = a[k, i]: MR contiguous values per k
        for k in range(K):
            copy_row(a, k * M + r0, ap, base + k * MR, rows)
    else:  # a transpose, 16 x rows values at a time in registers
        for k0 in range(0, K, 16):
            load_transposed(a, r0 * K + k0, K, rows, min(16, K - k0), ap, base + k0 * MR, offs, 0)


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


@njit(cache=True)
def _items(a_pack, b, trans_b, out, bias, has_bias, relu, K, blk, lo, hi, bp, cbuf, offs_b):
    """Work items lo .. hi-1 of one thread (item = row block * column blocks + column block)."""
    M, N = out.shape
    KC, MC, NC, ldc = blk
    n_cols = -(-N // NC)
    for item in range(lo, hi):
        i0 = (item // n_cols) * MC
        j0 = (item % n_cols) * NC
        mc = min(MC, M - i0)
        nc = min(NC, N - j0)
        panels = -(-nc // NR)
        blocks = -(-mc // MR)
        ib0 = i0 // MR
        if K == 0:
            for r in range(mc):
                cbuf[r * ldc : r * ldc + nc] = 0.0
        for pc in range(0, K, KC):
            kc = min(KC, K - pc)
            _pack_b(b, trans_b, K, N, pc, kc, j0, nc, bp, offs_b)
            for jr in range(panels):
                for ir in range(blocks):
                    gemm_packed(
                        a_pack, ((ib0 + ir) * K + pc) * MR, bp, jr * kc * NR, kc,
                        cbuf, ir * MR * ldc + jr * NR, ldc, pc > 0,
                    )  # fmt: skip
        _store(cbuf, ldc, out, i0, mc, j0, nc, bias, has_bias, relu)


@njit(cache=True, parallel=True)
def _matmul(a, trans_a, b, trans_b, out, bias, has_bias, relu, K, blk, a_pack, bp, cbuf):
    M, N = out.shape
    offs_a = np.arange(16) * MR
    offs_b = np.arange(16) * NR
    for ib in prange(-(-M // MR)):
        _pack_a(a, trans_a, M, K, a_pack, ib, offs_a)
    n_threads = bp.shape[0]
    items = -(-M // blk.MC) * -(-N // blk.NC)
    for t in prange(n_threads):
        lo, hi = image_range(t, n_threads, items)
        _items(
            a_pack, b, trans_b, out, bias, has_bias, relu, K, blk, lo, hi, bp[t], cbuf[t], offs_b
        )


@njit(cache=True)
def _matmul_serial(a, trans_a, b, trans_b, out, bias, has_bias, relu, K, blk, a_pack, bp, cbuf):
    """:func:`_matmul` on the calling thread (small products: no fork/join)."""
    M, N = out.shape
    offs_a = np.arange(16) * MR
    for ib in range(-(-M // MR)):
        _pack_a(a, trans_a, M, K, a_pack, ib, offs_a)
    items = -(-M // blk.MC) * -(-N // blk.NC)
    _items(
        a_pack, b, trans_b, out, bias, has_bias, relu, K, blk, 0, items, bp[0], cbuf[0],
        np.arange(16) * NR,
    )  # fmt: skip


def _workspace_make(M, K, blk, n_threads):
    def make():
        a_pack = aligned_empty((-(-M // MR) * MR * max(K, 1),))
        bp = aligned_empty((n_threads, blk.KC * blk.NC))
        cbuf = aligned_empty((n_threads, blk.MC * blk.ldc))
        return a_pack, bp, cbuf

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
    # Products under SERIAL_FLOPS run on the calling thread: a parallel launch costs more.
    n_threads = 1 if 2 * M * N * K < SERIAL_FLOPS else max(1, numba.get_num_threads())
    if blk is None:
        blk = blocking(M, K, N, n_threads, trans_b)
    items = -(-M // blk.MC) * -(-N // blk.NC)
    n_threads = min(n_threads, items)
    key = ("matmul", -(-M // MR) * MR * max(K, 1), blk, n_threads)
    with _workspace.checkout(key, _workspace_make(M, K, blk, n_threads)) as (a_pack, bp, cbuf):
        bv = bits_view(bias) if bias is not None else bits_view(out[0])
        kernel = _matmul_serial if n_threads == 1 else _matmul
        kernel(
            bits_view(a), bool(trans_a), bits_view(b), bool(trans_b), bits_view(out), bv,
            bias is not None, bool(relu), K, blk, a_pack, bp, cbuf,
        )  # fmt: skip
    return out
