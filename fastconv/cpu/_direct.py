"""The direct convolution path (stride 1) and the parallel kernels of both GEMM paths.

Direct: the images of a block are stacked per channel, padded and sharing their zero padding
(:func:`~fastconv.cpu._layout.stack_images`); row (c, i, j) of the unfolded matrix is then the
stack shifted by ``c*cstride + i*stride + j``, so ``y = W @ views`` needs no unfolding (outputs
straddling the padding are computed and dropped). dx is a stride-1 convolution of padded dy
with the flipped, transposed filters; dW a product of dy with the shifted views.

Threads split the batch into contiguous image ranges; each owns its float32 workspaces, its
outputs and, for dW/db, a partial sum reduced in thread order at the end: no write races, and
results do not depend on scheduling. The per-thread work lives in serial functions called
from a thin ``prange`` over threads: inlined into the parallel region the same loops measured
2x slower (LLVM lost the vectorisation-friendly shape of the outlined parfor body).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from . import _unfolded
from ._gemm import FASTMATH, gemm_nn, gemm_nt
from ._half import load, store_value
from ._layout import (
    NO_ACTIVATION,
    add_residual_image,
    add_residual_rows,
    image_range,
    serial_twin,
    stack_images,
    store_rows,
)
from ._matmul import gemm_offsets, gemm_offsets_part
from ._simd import MR

__all__ = ["GemmPlan", "ForwardWork", "BackwardWork", "forward_residual", "forward_split",
           "forward_split_serial",
           "SPLIT_COLUMNS", "SPLIT_FILTERS", "backward_kernel", "reduce_partials"]  # fmt: skip


class GemmPlan(NamedTuple):
    """How a call runs on the GEMM paths (built by :mod:`fastconv.cpu.conv`). With it go two
    :class:`~fastconv.cpu._layout.StackLayout`: ``x_layout`` (stacked padded images) and
    ``dy_layout`` (stacked dy padded by (kh-1-ph, kw-1-pw), for the direct dx)."""

    direct: bool  # shifted views of stacked images (stride 1) or unfolded column matrices
    nb: int  # images per GEMM
    offs_x: np.ndarray  # B-row offsets of the forward / dW product
    offs_dy: np.ndarray  # B-row offsets of the direct dx product
    packed: bool  # forward product by the GEMM layer's micro-kernel (_matmul.gemm_offsets)


# The stack layouts travel as separate arguments: Numba's parallel regions reject a named
# tuple nested in another one ("scalar type ... given for non scalar argument").


class ForwardWork(NamedTuple):
    """Per-thread float32 workspaces of the forward pass, each ``(threads, ...)``."""

    buf: np.ndarray  # stacked images or unfolded columns
    acc: np.ndarray  # (F, columns) product
    bp: np.ndarray  # a packed block of B (KC x OFFSETS_NC), see _matmul.gemm_offsets
    cbuf: np.ndarray  # its float32 output block (MC x OFFSETS_NC)


class BackwardWork(NamedTuple):
    """Per-thread float32 workspaces of the backward pass, each ``(threads, ...)``."""

    xbuf: np.ndarray  # stacked padded images
    dybuf: np.ndarray  # stacked padded dy for dx
    acc: np.ndarray  # dx accumulator (C, columns)
    col: np.ndarray  # unfolded images
    dcol: np.ndarray  # their gradient
    dyn: np.ndarray  # dy in fp32 (stacked like x on the direct path)
    dx_acc: np.ndarray  # folded dx of one image
    dw_part: np.ndarray  # (threads, F, K) partial dW
    db_part: np.ndarray  # (threads, F) partial db


@njit(cache=True, fastmath=FASTMATH)
def _forward_images(x, lo, hi, w_fk, wp, bias, relu, y, buf, acc, bp, cbuf, plan, x_layout, g,
                    res, has_res):  # fmt: skip
    """Images lo .. hi-1 of a forward call: the filters ``w_fk`` (F, K) float32, or with
    ``plan.packed`` ``wp`` (a :class:`~fastconv.cpu._matmul.PackedA`); with ``has_res`` each
    image gets ``res`` added before the ReLU right after its store
    (:func:`~fastconv.cpu._layout.add_residual_image`)."""
    nb = plan.nb
    store_relu = NO_ACTIVATION if has_res else relu  # (ReLU6 comes without a residual)
    if not plan.direct:
        for n0 in range(lo, hi, nb):
            count = min(nb, hi - n0)
            _unfolded.forward_block(
                x, n0, count, nb, w_fk, wp, plan.packed, plan.offs_x, bias, store_relu, y, buf,
                acc, bp, cbuf, g,
            )  # fmt: skip
            if has_res:
                for b in range(count):
                    add_residual_image(y, res, n0 + b, relu)
        return
    rows, stride, _ = x_layout
    tile = rows * stride
    for n0 in range(lo, hi, nb):
        count = min(nb, hi - n0)
        stack_images(x, n0, count, buf, x_layout, g.ph, g.pw, False)
        length = (count - 1) * tile + (g.OH - 1) * stride + g.OW
        if plan.packed:
            gemm_offsets(wp, buf, plan.offs_x, length, acc, bp, cbuf)
        else:
            acc[:] = 0.0
            gemm_nn(w_fk, buf, plan.offs_x, length, acc)
        for b in range(count):
            store_rows(acc, b * tile, stride, y[n0 + b], g.OH, g.OW, bias, store_relu)
            if has_res:
                add_residual_image(y, res, n0 + b, relu)


def _forward_residual(x, w_fk, wp, bias, relu, y, ws, plan, x_layout, g, res, has_res):
    """y = conv(x) (+ bias, ReLU) on every Numba thread (``ws`` a :class:`ForwardWork`), with
    an optional residual (``has_res``; pass ``y`` and False for none): the forward kernel of
    both the unprepared and the prepared paths. Compiled twice, like the Winograd one:
    parallel, and serial for small calls (the same images in the same order on the calling
    thread: the same bits)."""
    n_threads = ws.buf.shape[0]
    for t in prange(n_threads):
        lo, hi = image_range(t, n_threads, x.shape[0])
        _forward_images(
            x, lo, hi, w_fk, wp, bias, relu, y, ws.buf[t], ws.acc[t], ws.bp[t], ws.cbuf[t], plan,
            x_layout, g, res, has_res,
        )  # fmt: skip


forward_residual = njit(cache=True, parallel=True)(_forward_residual)
forward_residual_serial = serial_twin(forward_residual)


# --- fewer images than threads: the threads share each image's product ---------------------

SPLIT_COLUMNS = 1  # each thread takes a band of output rows (all filters)
SPLIT_FILTERS = 2  # each thread takes a band of filters (all output rows)


@njit(cache=True)
def _split_part(t, n_threads, split, x, wp, buf, acc, bp, cbuf, offsets, n0, count, bias, relu,
                y, x_layout, g, res, has_res):  # fmt: skip
    """Thread ``t``'s share of a block of images: it stacks them into its own buffer (a
    buffer stacked once and read by every thread cost more in cache traffic between the
    cores than the copy: 6.4 of a 28x28x16 layer's 38 us), computes its band of the product
    (stacked output rows, ``SPLIT_COLUMNS``, or filters in multiples of MR,
    ``SPLIT_FILTERS``) into its own accumulator and stores it."""
    rows, stride, _ = x_layout
    tile = rows * stride
    F = wp.M
    length = (count - 1) * tile + (g.OH - 1) * stride + g.OW
    R = -(-length // stride)  # stacked output rows, the last one partial
    if split == SPLIT_COLUMNS:
        r0, r1 = t * R // n_threads, (t + 1) * R // n_threads
        m_lo, m_hi = 0, F
    else:
        r0, r1 = 0, R
        blocks = -(-F // MR)
        m_lo = t * blocks // n_threads * MR
        m_hi = min((t + 1) * blocks // n_threads * MR, F)
    j_lo, j_hi = r0 * stride, min(r1 * stride, length)
    if j_lo >= j_hi or m_lo >= m_hi:
        return
    stack_images(x, n0, count, buf, x_layout, g.ph, g.pw, False)
    gemm_offsets_part(wp, buf, offsets, j_lo, j_hi, m_lo, m_hi, acc, bp, cbuf, True)
    store_relu = NO_ACTIVATION if has_res else relu  # (ReLU6 comes without a residual)
    for b in range(count):
        oh_lo = min(max(r0 - b * rows, 0), g.OH)
        oh_hi = min(max(r1 - b * rows, 0), g.OH)
        if oh_lo >= oh_hi:
            continue
        store_rows(acc[m_lo:m_hi], b * tile + oh_lo * stride, stride,
                   y[n0 + b, m_lo:m_hi, oh_lo:oh_hi], oh_hi - oh_lo, g.OW, bias[m_lo:m_hi],
                   store_relu)  # fmt: skip
        if has_res:
            add_residual_rows(y, res, n0 + b, m_lo, m_hi, oh_lo, oh_hi, relu)


@njit(cache=True, parallel=True)
def forward_split(x, wp, bias, relu, y, ws, plan, x_layout, g, res, has_res, split):
    """:func:`forward_residual` on the direct path's packed product for fewer images than
    threads (batch 1): for each block of images every thread stacks them, computes its band
    of the product (``split``: ``SPLIT_COLUMNS`` or ``SPLIT_FILTERS``) reading B in place
    and stores it. Bitwise the serial kernel's results: each output is the same FMA chain
    (:func:`~fastconv.cpu._matmul.gemm_offsets_part`) and the same epilogue, whichever
    thread computes it. ``ws`` a :class:`ForwardWork` (``bp`` unused: B is not packed)."""
    n_threads = ws.buf.shape[0]
    nb = plan.nb
    for n0 in range(0, x.shape[0], nb):
        count = min(nb, x.shape[0] - n0)
        for t in prange(n_threads):
            _split_part(t, n_threads, split, x, wp, ws.buf[t], ws.acc[t], ws.bp[t], ws.cbuf[t],
                        plan.offs_x, n0, count, bias, relu, y, x_layout, g, res,
                        has_res)  # fmt: skip


# The same bands one after another on the calling thread (the same bits): what a call runs
# while the cores are busy with other work (conv.SplitTimer).
forward_split_serial = serial_twin(forward_split)


@njit(cache=True, fastmath=FASTMATH)
def _backward_images(dy, x, lo, hi, w_kf, w_flip, need_dx, dx, ws, t, plan, x_layout, dy_layout, g):
    F, OH, OW = dy.shape[1], dy.shape[2], dy.shape[3]
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    kh, kw, ph, pw = g.kh, g.kw, g.ph, g.pw
    nb = plan.nb
    dw_t, db_t = ws.dw_part[t], ws.db_part[t]
    col, dcol, dyn, dx_acc = ws.col[t], ws.dcol[t], ws.dyn[t], ws.dx_acc[t]
    dw_t[:] = 0.0
    db_t[:] = 0.0
    for n in range(lo, hi):
        src = dy[n]
        for f in range(F):
            s = np.float32(0.0)
            for r in range(OH):
                row = src[f, r]
                for q in range(OW):
                    s += load(row[q])
            db_t[f] += s
    if not plan.direct:
        for n0 in range(lo, hi, nb):
            count = min(nb, hi - n0)
            _unfolded.backward_block(
                dy, x, n0, count, nb, w_kf, need_dx, dw_t, dx, col, dcol, dyn, dx_acc, g
            )  # fmt: skip
        return
    xbuf, dybuf, acc = ws.xbuf[t], ws.dybuf[t], ws.acc[t]
    no_bias = np.zeros(C, np.float32)
    x_rows, x_stride, x_cstride = x_layout
    # dy padded by (kh-1-ph, kw-1-pw): the full convolution that gives dx.
    d_rows, d_stride, _ = dy_layout
    x_tile, dy_tile = x_rows * x_stride, d_rows * d_stride
    for n0 in range(lo, hi, nb):
        count = min(nb, hi - n0)
        if need_dx:
            # dx: a stride-1 convolution of dy, fully padded, with the flipped, transposed
            # filters.
            stack_images(dy, n0, count, dybuf, dy_layout, kh - 1 - ph, kw - 1 - pw, False)
            acc[:] = 0.0
            length = (count - 1) * dy_tile + (H - 1) * d_stride + W
            gemm_nn(w_flip, dybuf, plan.offs_dy, length, acc)
            for b in range(count):
                store_rows(acc, b * dy_tile, d_stride, dx[n0 + b], H, W, no_bias, False)
        if stack_images(x, n0, count, xbuf, x_layout, ph, pw, True):
            # dy laid out like the padded images (zeros past OH, OW), so that dW[f, (c,i,j)]
            # is a dot product with the (i, j)-shifted view of the images.
            stack_images(dy, n0, count, dyn, x_layout, 0, 0, False)
            a = dyn[: F * x_cstride].reshape((F, x_cstride))
            length = (count - 1) * x_tile + (OH - 1) * x_stride + OW
            gemm_nt(a, xbuf, plan.offs_x, length, dw_t)
        else:
            # inf/NaN in x: the shifted views would also pair it with the zeros between
            # rows and images (0 * inf = NaN); the unfolded path pairs only true windows.
            # It rewrites dx with the same values.
            for b in range(count):
                _unfolded.backward_block(
                    dy, x, n0 + b, 1, 1, w_kf, need_dx, dw_t, dx, col, dcol, dyn, dx_acc, g
                )  # fmt: skip


@njit(cache=True, parallel=True)
def backward_kernel(dy, x, w_kf, w_flip, need_dx, dx, ws, plan, x_layout, dy_layout, g):
    """dx (when ``need_dx``) and per-thread partial dW, db into ``ws`` (:class:`BackwardWork`)."""
    n_threads = ws.dw_part.shape[0]
    for t in prange(n_threads):
        lo, hi = image_range(t, n_threads, x.shape[0])
        _backward_images(
            dy, x, lo, hi, w_kf, w_flip, need_dx, dx, ws, t, plan, x_layout, dy_layout, g
        )  # fmt: skip


@njit(cache=True, fastmath=FASTMATH)
def reduce_partials(dw_part, db_part, dw, db):
    """Sum the per-thread partial gradients (in thread order: deterministic) into dw, db."""
    n_threads, F, K = dw_part.shape
    dw2 = dw.reshape((F, K))
    for f in range(F):
        for k in range(K):
            s = np.float32(0.0)
            for t in range(n_threads):
                s += dw_part[t, f, k]
            dw2[f, k] = store_value(dw2, s)
        s = np.float32(0.0)
        for t in range(n_threads):
            s += db_part[t, f]
        db[f] = store_value(db, s)
