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
from ._simd import MR, NR, copy_block, copy_row, fetch_add, gemm_packed, load_transposed

__all__ = ["SERIAL_FLOPS", "Blocking", "blocking", "matmul", "matmul_batched"]

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
def _store(cbuf, ldc, out, i0, rows, j0, cols, bias, has_bias, relu, bias_rows):
    """Epilogue: ``out[i0+r, j0+j] = act(cbuf[r*ldc + j] + bias)`` in out's dtype, the bias
    ``bias[j0+j]`` (a Dense layer's, per column) or with ``bias_rows`` ``bias[i0+r]`` (a
    convolution's, per output channel)."""
    for r in range(rows):
        src = cbuf[r * ldc : r * ldc + cols]
        dst = out[i0 + r, j0 : j0 + cols]
        if has_bias and bias_rows:
            br = load(bias[i0 + r])
            for j in range(cols):
                v = src[j] + br
                if relu and v < np.float32(0.0):  # False for NaN: NaN propagates
                    v = np.float32(0.0)
                dst[j] = store_value(dst, v)
        elif has_bias:
            bs = bias[j0 : j0 + cols]
            for j in range(cols):
                v = src[j] + load(bs[j])
                if relu and v < np.float32(0.0):
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
        i0 = (item // n_cols) * MC
        j0 = (item % n_cols) * NC
        _item(a, trans_a, b, trans_b, out, bias, has_bias, relu, False, K, blk, i0, j0, ap, bp,
              cbuf, offs_a, offs_b)  # fmt: skip


@njit(cache=True)
def _batched_items(a, b, out, bias, has_bias, relu, K, blk, counter, ap, bp, cbuf):
    """:func:`_items` of ``out[n] = act(a @ b[n] + bias[:, None])`` for every n: the items of
    all products in one queue (item = (n * row blocks + row block) * column blocks + column
    block), the bias per row (a convolution's output channel)."""
    B, M, N = out.shape
    KC, MC, NC, ldc = blk
    offs_a = np.arange(16) * MR
    offs_b = np.arange(16) * NR
    n_cols = -(-N // NC)
    per_product = -(-M // MC) * n_cols
    items = B * per_product
    while True:
        item = fetch_add(counter, 1)
        if item >= items:
            break
        n = item // per_product
        rest = item - n * per_product
        i0 = (rest // n_cols) * MC
        j0 = (rest % n_cols) * NC
        _item(a, False, b[n], False, out[n], bias, has_bias, relu, True, K, blk, i0, j0, ap, bp,
              cbuf, offs_a, offs_b)  # fmt: skip


@njit(cache=True)
def _item(a, trans_a, b, trans_b, out, bias, has_bias, relu, bias_rows, K, blk, i0, j0, ap, bp,
          cbuf, offs_a, offs_b):  # fmt: skip
    """One MC x NC block of ``out``, computed whole."""
    M, N = out.shape
    KC, MC, NC, ldc = blk
    mc = min(MC, M - i0)
    nc = min(NC, N - j0)
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
               relu, bias_rows)  # fmt: skip
        if c_done < nc:
            _store(cbuf[c_done:], ldc, out, i0, r_done, j0 + c_done, nc - c_done, bias,
                   has_bias, relu, bias_rows)  # fmt: skip
    else:
        _store(cbuf, ldc, out, i0, mc, j0, nc, bias, has_bias, relu, bias_rows)


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


@njit(cache=True, parallel=True)
def _batched(a, b, out, bias, has_bias, relu, K, blk, ap, bp, cbuf):
    counter = np.zeros(1, np.int64)
    for t in prange(bp.shape[0]):
        _batched_items(a, b, out, bias, has_bias, relu, K, blk, counter, ap[t], bp[t], cbuf[t])


@njit(cache=True)
def _batched_serial(a, b, out, bias, has_bias, relu, K, blk, ap, bp, cbuf):
    """:func:`_batched` on the calling thread."""
    counter = np.zeros(1, np.int64)
    _batched_items(a, b, out, bias, has_bias, relu, K, blk, counter, ap[0], bp[0], cbuf[0])


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


def matmul_batched(a, b, out, bias=None, relu=False, blk=None):
    """``out[n] = act(a @ b[n] + bias[:, None])`` for every n on Numba's threads (a 1x1
    convolution: ``a`` the filters, ``b[n]`` an image's channels by pixels); returns ``out``.

    Parameters
    ----------
    a : ndarray (M, K); b : ndarray (B, K, N); out : ndarray (B, M, N), written whole; all
        C-contiguous, one dtype (float32, or float16 as its bits)
    bias : ndarray (M,) or None, added per row; relu : bool (NaN kept)
    blk : :class:`Blocking` or None: the columns of one product in items of at most what
        keeps the output buffer in ``c_block`` (the batch gives the threads their items)
    """
    B, M, N = out.shape
    K = a.shape[1]
    if B == 0 or M == 0 or N == 0:
        return out
    n_threads = max(1, numba.get_num_threads())
    if blk is None:
        blk = blocking(M, K, N, 1, False, split=1)
    items = B * -(-M // blk.MC) * -(-N // blk.NC)
    if 2 * B * M * N * K < SERIAL_FLOPS:
        n_threads = 1
    n_threads = min(n_threads, items)
    bv = bits_view(bias) if bias is not None else bits_view(out[0, 0])
    key = ("matmul", blk, n_threads)
    with _workspace.checkout(key, _workspace_make(blk, n_threads)) as (ap, bp, cbuf):
        kernel = _batched_serial if n_threads == 1 else _batched
        kernel(
            bits_view(a), bits_view(b), bits_view(out), bv, bias is not None, bool(relu), K, blk,
            ap, bp, cbuf,
        )  # fmt: skip
    return out
