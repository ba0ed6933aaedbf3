"""Max and average pooling on the CPU: Numba kernels, float32 and float16 (as uint16 bits).

Every kernel runs ``prange`` over the ``N*C`` image planes, so each thread reads and writes
only its own planes: the backward passes scatter into a plane without write races even when
windows overlap. Arithmetic is float32 for both dtypes (see :mod:`fastconv.cpu._half`).

Semantics follow PyTorch: padding never wins a max (it acts as -inf, so only real pixels are
visited); a NaN in a window makes the output NaN and takes the gradient; ties send the
gradient to the first maximum in row-major window order; average pooling counts the zero
padding in the divisor (``count_include_pad=True``). One difference: in a window with
several NaNs the first takes the gradient (as ``fastconv.reference``), PyTorch's the last.
In ceil mode (the geometry's output size rounded up) the last windows run past the
bottom/right edge: they are clipped to the input, and an average window divides by its cells
inside the padded input, as PyTorch.

The general max-pool forward (any window, stride and padding; GoogLeNet's 3x3 pools) is
separable: a pass along each input row takes, for every output column, the first maximum of
its window's columns (clipped to the input), and a pass down the result takes, for every
output row, the first maximum over its window's rows, top to bottom. Its output has the bits
of the window loop it replaced (first maximum in row-major order under ``_wins``: the first
NaN's payload, the sign of the first zero of a zero maximum; see ``_max_block``). Each pass
runs over a block of planes as one long row where the geometry allows (stride 1; stride 2 on
even widths, after splitting the rows into their even and odd columns) and redoes the
outputs clipped at an edge, so LLVM vectorises the loops: 4-15x faster than the window loop
on GoogLeNet's and AlexNet's pools in float32, 15-57x in float16 (docs/kernels.md, "Max
pooling forward").

The general max-pool backward runs the same two passes, each carrying its maximum's position
beside the value, then adds every window's gradient at its maximum's position in output order
(the bits of the window-by-window argmax; 3-8x faster on GoogLeNet's pools than the search of
each window's taps for the forward's maximum that it replaced).

The deep-MNIST net only uses 2x2 stride-2 unpadded max pooling, so that case has its own
kernels: no window bounds to clip, a branch-free 4-way max, and a backward pass that writes
every input pixel exactly once instead of zeroing and scattering.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from . import _outputs as outputs
from ._half import bits_view, from_bits, load, store_value
from ._layout import serial_twin

__all__ = ["max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward"]


@njit(inline="always")
def _wins(value, best):
    """Does ``value`` replace ``best`` as the running maximum (first max wins, NaN sticks)?"""
    # Bitwise, not short-circuit, operators: LLVM then emits selects rather than branches.
    return (value > best) | ((value != value) & (best == best))


@njit(inline="always")
def _clip(start, k, size):
    """Valid [begin, end) rows/cols of a window starting at padded offset ``start``."""
    return max(start, 0), min(start + k, size)


# --- max-pool forward, any size, stride, pad: separable, vectorised ---------------------------
#
# The forward kernels below index with unsigned offsets (``np.uint64``): Numba then emits no
# wraparound test for negative indices, which stops LLVM from vectorising, and no slice
# objects, whose creation cost more than the work on a short row (a row of 56 outputs took
# 26 ns through four slices, 11 ns through offsets).


@njit(inline="always")
def _pick(value, best):
    """``value`` if it replaces ``best`` as the running maximum, else ``best``.

    The same test as :func:`_wins` written with two comparisons instead of three (best not NaN
    and ``value`` not <= ``best``: greater, or NaN); vectorised, a 3-tap pass ran ~20% faster
    with it. The two agree on every pair (tests/kernels/test_max_pool_fast.py).
    """
    return value if (not (value <= best)) & (best == best) else best


@njit(inline="always")
def _streams(off, stride, doff, dstride, n):
    """The unsigned source offset and stride, destination offset and stride, and count of a
    tap pass (see the note above)."""
    return np.uint64(off), np.uint64(stride), np.uint64(doff), np.uint64(dstride), np.uint64(n)


@njit(inline="always")
def _row_pass(W, OW, kw, sw, pw):
    """``(lo, hi, RS, flat)`` of a horizontal pass: output columns lo..hi-1 have their whole
    window inside the row; the row maxima are stored RS apart, and ``flat`` says the pass can
    run over a chunk's rows as one long row (stride 1, or stride 2 on even widths)."""
    lo = min(OW, (pw + sw - 1) // sw)
    hi = max(lo, min(OW, (W + pw - kw) // sw + 1))
    if sw == 1 and OW <= W:
        return lo, hi, W, True  # the input's row stride: output ow of row r is rows[r*W + ow]
    if sw == 2 and W % 2 == 0 and OW <= W // 2:
        return lo, hi, W // 2, True  # 2*RS == W: output ow of row r reads 2*(r*RS + ow) - pw + t
    return lo, hi, OW, False


@njit(inline="always")
def _taps(src, off, stride, step, taps, dst, doff, n, dstride=1):
    """``dst[doff + i*dstride]`` = first maximum of ``src[off + i*stride + t*step]`` over
    t = 0..taps-1 in that order, for i < n; written through :func:`store_value`, so ``dst``
    may hold half bits. ``src`` is float32; offsets are >= 0 whenever n > 0.

    With ``stride`` 1 every tap is a contiguous stream and the loop vectorises over ``i``.
    Up to three taps in one pass, more in further passes. One tap runs as two (the same twice:
    ``_pick(v, v)`` keeps the bits of ``v``): fewer loops to compile, for a rare case (two
    taps are the clipped edges of 3x3 windows, one pass of three was 20-30% slower there).
    """
    if n <= 0:
        return
    o0, st, d0, ds, m = _streams(off, stride, doff, dstride, n)
    o1 = o0 + np.uint64(min(taps - 1, 1) * step)
    if taps <= 2:
        for i in range(m):
            v = _pick(src[o1 + i * st], src[o0 + i * st])
            dst[d0 + i * ds] = store_value(dst, v)
        return
    o2 = o0 + np.uint64(2 * step)
    if taps == 3:
        for i in range(m):
            v = _pick(src[o2 + i * st], _pick(src[o1 + i * st], src[o0 + i * st]))
            dst[d0 + i * ds] = store_value(dst, v)
        return
    acc = np.empty(n, np.float32)
    for i in range(m):
        acc[i] = _pick(src[o2 + i * st], _pick(src[o1 + i * st], src[o0 + i * st]))
    for t in range(3, taps):
        ot = o0 + np.uint64(t * step)
        for i in range(m):
            acc[i] = _pick(src[ot + i * st], acc[i])
    for i in range(m):
        dst[d0 + i * ds] = store_value(dst, acc[i])


@njit(cache=True)
def _taps_unit(src, off, step, taps, dst, doff, n):
    """:func:`_taps` over contiguous streams (stride 1)."""
    _taps(src, off, 1, step, taps, dst, doff, n)


@njit(cache=True)
def _taps_strided(src, off, stride, step, taps, dst, doff, n, dstride):
    """:func:`_taps` at any strides (the edge columns, strides above 2)."""
    _taps(src, off, stride, step, taps, dst, doff, n, dstride)


@njit(inline="always")
def _split(src, off, length, split):
    """Split ``src[off : off + length]`` into its even values, then its odd ones, in ``split``
    (for stride-2 windows: each tap of a row then reads a contiguous stream of ``split``).
    Returns the count of even values, where the odd ones start.

    Stride-2 loads (``row[2*i + t]``) compiled to gathers, ~2x slower than this split (a loop
    LLVM turns into permutes) followed by contiguous reads. It indexes slices: with unsigned
    offsets LLVM left it scalar, 2.7x slower on 112x112 planes.
    """
    half = (length + 1) // 2
    row = src[off : off + length]
    even = split[:half]
    odd = split[half:]
    for j in range(length // 2):
        even[j] = row[2 * j]
        odd[j] = row[2 * j + 1]
    if length % 2 == 1:
        even[half - 1] = row[length - 1]
    return half


@njit(inline="always")
def _split_start(half, c):
    """Where value ``c`` of a split row (:func:`_split`) is (``c`` >= 0)."""
    return np.uint64((0 if c % 2 == 0 else half) + c // 2)


@njit(inline="always")
def _split_taps(half, c, kw):
    """Where a split row's first three taps from value ``c`` are (fewer repeat the last)."""
    return (_split_start(half, c), _split_start(half, c + min(kw - 1, 1)),
            _split_start(half, c + min(kw - 1, 2)))  # fmt: skip


@njit(cache=True)
def _taps_stride2(split, half, c, cstep, dst, doff, dstep, count, n, kw):
    """For each of ``count`` rows r: ``dst[doff + r*dstep + i]`` = first maximum of the split
    row's values ``c + r*cstep + 2*i + t`` over t = 0..kw-1, for i < n (every tap a contiguous
    stream of ``split``; fewer than three taps repeat the last, as in :func:`_taps`)."""
    if n <= 0:
        return
    m = np.uint64(n)
    for r in range(count):
        cr = c + r * cstep
        d0 = np.uint64(doff + r * dstep)
        o0, o1, o2 = _split_taps(half, cr, kw)
        for i in range(m):
            dst[d0 + i] = _pick(split[o2 + i], _pick(split[o1 + i], split[o0 + i]))
        for t in range(3, kw):
            ot = _split_start(half, cr + t)
            for i in range(m):
                dst[d0 + i] = _pick(split[ot + i], dst[d0 + i])


def _float_plane(plane):
    """A float32 array: ``plane`` itself, or its half bits converted (exactly) to a new one."""


@overload(_float_plane, inline="always")
def _float_plane_impl(plane):
    if plane.dtype == types.uint16:

        def convert(plane):
            f = np.empty(plane.size, np.float32)
            for i in range(plane.size):
                f[i] = load(plane[i])
            return f

        return convert
    return lambda plane: plane


# Planes per task of the max-pool forward: about this many input values, so that small planes
# run long loops (7x7: 83 planes a task) and large ones one plane at a time.
MAX_POOL_BLOCK_VALUES = 4096
# Input rows per chunk of the horizontal pass, about this many values: a chunk is still in L1
# when its edge columns are done.
MAX_POOL_CHUNK_VALUES = 2048


@njit(cache=True)
def _max_block(x, out, B, H, W, OH, OW, kh, kw, sh, sw, ph, pw):
    """``B`` consecutive planes of :func:`_max_forward` (flat: ``x`` B*H*W, ``out`` B*OH*OW).

    Separable: ``rows[r, ow]``, the first maximum of input row ``r`` over output column
    ``ow``'s clipped columns; then ``out[oh, ow]``, the first maximum of ``rows[h, ow]`` over
    output row ``oh``'s clipped rows of its plane, top to bottom. The window loop's result is
    the window's first element (in row-major order) of its highest rank (NaN above every
    number, then numbers by value, -0.0 and +0.0 equal): each row's pass keeps that row's first
    element of its highest rank and the column pass the first row holding the window's highest
    rank, so both give the same element, and the same bits.

    Where the row lengths allow, a pass is one loop over all the block's rows as if they were
    one long row (the planes' rows are consecutive in memory), and the outputs whose windows
    such a loop gets wrong (crossing a row's edge, or a plane's) are redone clipped: small
    planes (GoogLeNet's 7x7 and 14x14) run long vector loops instead of many short ones.
    """
    xf = _float_plane(x)
    R = B * H  # input rows
    # Horizontal pass into rows (row stride RS). A flat loop: the chunk's rows as one long row.
    lo, hi, RS, flat = _row_pass(W, OW, kw, sw, pw)
    rows = np.empty(R * RS, np.float32)
    CH = max(1, MAX_POOL_CHUNK_VALUES // W)
    split = np.empty(min(R, CH) * W if sw == 2 else 0, np.float32)
    for r0 in range(0, R, CH):
        m = min(R - r0, CH)
        xb, rb = r0 * W, r0 * RS
        # The interior columns lo..hi-1.
        n = (m - 1) * RS + hi - lo if hi > lo else 0
        if sw == 2:
            half = _split(xf, xb, m * W, split)
            if flat:
                _taps_stride2(split, half, 2 * lo - pw, 0, rows, rb + lo, 0, 1, n, kw)
            else:
                _taps_stride2(split, half, 2 * lo - pw, W, rows, rb + lo, RS, m, hi - lo, kw)
        elif flat:
            _taps_unit(xf, xb + lo - pw, 1, kw, rows, rb + lo, n)
        else:
            for r in range(r0, r0 + m):
                if sw == 1:
                    _taps_unit(xf, r * W + lo - pw, 1, kw, rows, r * RS + lo, hi - lo)
                else:
                    _taps_strided(
                        xf, r * W + lo * sw - pw, sw, 1, kw, rows, r * RS + lo, hi - lo, 1
                    )
        # The edge columns, clipped (a flat loop's other outputs are interior columns or the
        # unused columns OW..RS-1): one column of all the chunk's rows at a time (loads W
        # apart, stores RS apart), not a short loop per row.
        for j in range(lo + OW - hi):
            ow = j if j < lo else hi + j - lo
            ws, we = _clip(ow * sw - pw, kw, W)
            _taps_strided(xf, xb + ws, W, 1, we - ws, rows, rb + ow, m, RS)
    # Vertical pass. Output rows oh0..oh1-1 have their whole window inside the plane.
    plane_rows, plane_out = H * RS, OH * OW
    if sh == 1 and RS == OW:
        oh0 = min(OH, ph)
        oh1 = max(oh0, min(OH, H - kh + ph + 1))
        if OH == H and oh1 > oh0:
            # Rows and output planes of the same size: one loop from the first plane's first
            # interior row to the last plane's last (the rows between are redone below).
            n = (B - 1) * plane_out + (oh1 - oh0) * OW
            _taps_unit(rows, (oh0 - ph) * OW, OW, kh, out, oh0 * OW, n)
        else:
            for b in range(B):
                rb, ob = b * plane_rows, b * plane_out
                n = (oh1 - oh0) * OW
                _taps_unit(rows, rb + (oh0 - ph) * OW, OW, kh, out, ob + oh0 * OW, n)
        for b in range(B):
            rb, ob = b * plane_rows, b * plane_out
            for oh in range(oh0):
                hs, he = _clip(oh - ph, kh, H)
                _taps_unit(rows, rb + hs * OW, OW, he - hs, out, ob + oh * OW, OW)
            for oh in range(oh1, OH):
                hs, he = _clip(oh - ph, kh, H)
                _taps_unit(rows, rb + hs * OW, OW, he - hs, out, ob + oh * OW, OW)
    else:
        for b in range(B):
            rb, ob = b * plane_rows, b * plane_out
            for oh in range(OH):
                hs, he = _clip(oh * sh - ph, kh, H)
                _taps_unit(rows, rb + hs * RS, RS, he - hs, out, ob + oh * OW, OW)


@njit(parallel=True, cache=True)
def _max_forward(x, out, kh, kw, sh, sw, ph, pw):
    P, H, W = x.shape
    OH, OW = out.shape[1], out.shape[2]
    xf = x.reshape(P * H * W)
    of = out.reshape(P * OH * OW)
    B = max(1, MAX_POOL_BLOCK_VALUES // (H * W))
    # Each block in a serial function: the same loops inlined into a prange body ran slower
    # (docs/kernels.md, "Things learnt about Numba here").
    for k in prange((P + B - 1) // B):
        p0 = k * B
        p1 = min(P, p0 + B)
        x_block = xf[p0 * H * W : p1 * H * W]
        out_block = of[p0 * OH * OW : p1 * OH * OW]
        _max_block(x_block, out_block, p1 - p0, H, W, OH, OW, kh, kw, sh, sw, ph, pw)


# --- general kernels (any size, stride, pad): max backward, average ---------------------------


@njit(inline="always")
def _arg_position(isrc, ibase, o):
    """Block position of source value ``o``: ``o`` itself when the source is the block's
    input (``isrc`` None: compiled away), else ``ibase + isrc[o]``."""
    if isrc is None:
        return np.int32(o)
    return np.int32(ibase) + isrc[o]


@njit(inline="always")
def _arg3(src, isrc, ibase, o0, o1, o2, st, dst, idst, d0, ds, m):
    """``dst``/``idst`` = value and position of the first maximum of three source streams
    (offsets ``o0``, ``o1``, ``o2``, stride ``st``) under :func:`_pick`, for i < m. Fewer
    taps repeat the last one: a repeated value never replaces itself (NaN included), so the
    position stays the first's."""
    for i in range(m):
        v = src[o0 + i * st]
        k = _arg_position(isrc, ibase, o0 + i * st)
        v1 = src[o1 + i * st]
        k1 = _arg_position(isrc, ibase, o1 + i * st)
        take = (not (v1 <= v)) & (v == v)
        v = v1 if take else v
        k = k1 if take else k
        v2 = src[o2 + i * st]
        k2 = _arg_position(isrc, ibase, o2 + i * st)
        take = (not (v2 <= v)) & (v == v)
        dst[d0 + i * ds] = v2 if take else v
        idst[d0 + i * ds] = k2 if take else k


@njit(inline="always")
def _arg_fold(src, isrc, ibase, ot, st, dst, idst, d0, ds, m):
    """Fold one more tap (offset ``ot``) into ``dst``/``idst`` (windows of over 3 taps)."""
    for i in range(m):
        v = src[ot + i * st]
        k = _arg_position(isrc, ibase, ot + i * st)
        best = dst[d0 + i * ds]
        take = (not (v <= best)) & (best == best)
        dst[d0 + i * ds] = v if take else best
        idst[d0 + i * ds] = k if take else idst[d0 + i * ds]


@njit(inline="always")
def _taps_arg(src, isrc, ibase, off, stride, step, taps, dst, idst, doff, n, dstride):
    """:func:`_taps` that also writes, in ``idst``, the block position of each maximum: the
    source offset itself (``isrc`` None) or ``ibase + isrc[offset]``. ``dst`` is float32."""
    if n <= 0:
        return
    o0, st, d0, ds, m = _streams(off, stride, doff, dstride, n)
    o1 = o0 + np.uint64(min(taps - 1, 1) * step)
    o2 = o0 + np.uint64(min(taps - 1, 2) * step)
    _arg3(src, isrc, ibase, o0, o1, o2, st, dst, idst, d0, ds, m)
    for t in range(3, taps):
        _arg_fold(src, isrc, ibase, o0 + np.uint64(t * step), st, dst, idst, d0, ds, m)


@njit(inline="always")
def _taps_stride2_arg(split, spos, ibase, half, c, cstep, dst, idst, doff, dstep, count, n, kw):
    """:func:`_taps_stride2` that also writes each maximum's block position (``ibase`` +
    ``spos``, the positions split as the values were)."""
    if n <= 0:
        return
    m = np.uint64(n)
    one = np.uint64(1)
    for r in range(count):
        cr = c + r * cstep
        d0 = np.uint64(doff + r * dstep)
        o0, o1, o2 = _split_taps(half, cr, kw)
        _arg3(split, spos, ibase, o0, o1, o2, one, dst, idst, d0, one, m)
        for t in range(3, kw):
            _arg_fold(split, spos, ibase, _split_start(half, cr + t), one, dst, idst, d0, one, m)


@njit(cache=True)
def _max_route_block(x, dy, dx, B, H, W, OH, OW, kh, kw, sh, sw, ph, pw):
    """Max-pool backward of ``B`` consecutive planes (flat: ``x``/``dx`` B*H*W, ``dy``
    B*OH*OW): the forward's separable passes of :func:`_max_block`, each carrying the block
    position of its maximum beside the value, then every window's gradient added at its
    maximum's position in output order, in float32.

    The position is the first maximum's in row-major window order (the element whose bits
    the forward outputs, see :func:`_max_block`): the pixel a window-by-window argmax picks
    (first maximum wins, the first NaN sticks). Tracking it through the vectorised passes
    replaced a search of every window's taps for the forward's maximum (a compare and select
    per tap and output: 3-8x slower on GoogLeNet's pools, docs/pooling.md).
    """
    xf = _float_plane(x)
    R = B * H
    lo, hi, RS, flat = _row_pass(W, OW, kw, sw, pw)
    rows = np.empty(R * RS, np.float32)
    where = np.empty(R * RS, np.int32)  # block position of each row maximum
    CH = max(1, MAX_POOL_CHUNK_VALUES // W)
    split = np.empty(min(R, CH) * W if sw == 2 else 0, np.float32)
    order = np.empty(min(R, CH) * W if sw == 2 else 0, np.int32)
    spos = np.empty(min(R, CH) * W if sw == 2 else 0, np.int32)
    for k in range(order.size):
        order[k] = k
    split_rows = 0  # the chunk length spos holds the split positions of
    for r0 in range(0, R, CH):
        m = min(R - r0, CH)
        xb, rb = r0 * W, r0 * RS
        n = (m - 1) * RS + hi - lo if hi > lo else 0
        if sw == 2:
            half = _split(xf, xb, m * W, split)
            if m != split_rows:  # the first chunk, and a shorter last one
                _split(order, 0, m * W, spos)
                split_rows = m
            if flat:
                _taps_stride2_arg(split, spos, xb, half, 2 * lo - pw, 0, rows, where, rb + lo, 0,
                                  1, n, kw)  # fmt: skip
            else:
                _taps_stride2_arg(split, spos, xb, half, 2 * lo - pw, W, rows, where, rb + lo,
                                  RS, m, hi - lo, kw)  # fmt: skip
        elif flat:
            _taps_arg(xf, None, 0, xb + lo - pw, 1, 1, kw, rows, where, rb + lo, n, 1)
        else:
            for r in range(r0, r0 + m):
                _taps_arg(xf, None, 0, r * W + lo * sw - pw, sw, 1, kw, rows, where,
                          r * RS + lo, hi - lo, 1)  # fmt: skip
        for j in range(lo + OW - hi):
            ow = j if j < lo else hi + j - lo
            ws, we = _clip(ow * sw - pw, kw, W)
            _taps_arg(xf, None, 0, xb + ws, W, 1, we - ws, rows, where, rb + ow, m, RS)
    # Vertical pass: each output's maximum over its window's row maxima, and its position.
    best = np.empty(B * OH * OW, np.float32)
    pick = np.empty(B * OH * OW, np.int32)
    plane_rows, plane_out = H * RS, OH * OW
    if sh == 1 and RS == OW:
        oh0 = min(OH, ph)
        oh1 = max(oh0, min(OH, H - kh + ph + 1))
        if OH == H and oh1 > oh0:
            n = (B - 1) * plane_out + (oh1 - oh0) * OW
            _taps_arg(rows, where, 0, (oh0 - ph) * OW, 1, OW, kh, best, pick, oh0 * OW, n, 1)
        else:
            for b in range(B):
                rb, ob = b * plane_rows, b * plane_out
                n = (oh1 - oh0) * OW
                _taps_arg(rows, where, 0, rb + (oh0 - ph) * OW, 1, OW, kh, best, pick,
                          ob + oh0 * OW, n, 1)  # fmt: skip
        for b in range(B):
            rb, ob = b * plane_rows, b * plane_out
            for oh in range(oh0):
                hs, he = _clip(oh - ph, kh, H)
                _taps_arg(rows, where, 0, rb + hs * OW, 1, OW, he - hs, best, pick,
                          ob + oh * OW, OW, 1)  # fmt: skip
            for oh in range(oh1, OH):
                hs, he = _clip(oh - ph, kh, H)
                _taps_arg(rows, where, 0, rb + hs * OW, 1, OW, he - hs, best, pick,
                          ob + oh * OW, OW, 1)  # fmt: skip
    else:
        for b in range(B):
            rb, ob = b * plane_rows, b * plane_out
            for oh in range(OH):
                hs, he = _clip(oh * sh - ph, kh, H)
                _taps_arg(rows, where, 0, rb + hs * RS, 1, RS, he - hs, best, pick,
                          ob + oh * OW, OW, 1)  # fmt: skip
    # Scatter in output order (overlapping windows sum in PyTorch's order), in float32.
    acc = np.zeros(B * H * W, np.float32)
    for o in range(B * OH * OW):
        acc[pick[o]] += load(dy[o])
    for k in range(B * H * W):
        dx[k] = store_value(dx, acc[k])


@njit(parallel=True, cache=True)
def _max_backward(dy, x, dx, kh, kw, sh, sw, ph, pw):
    P, H, W = x.shape
    OH, OW = dy.shape[1], dy.shape[2]
    xf = x.reshape(P * H * W)
    dyf = dy.reshape(P * OH * OW)
    dxf = dx.reshape(P * H * W)
    B = max(1, MAX_POOL_BLOCK_VALUES // (H * W))
    for k in prange((P + B - 1) // B):
        p0 = k * B
        p1 = min(P, p0 + B)
        _max_route_block(xf[p0 * H * W : p1 * H * W], dyf[p0 * OH * OW : p1 * OH * OW],
                         dxf[p0 * H * W : p1 * H * W], p1 - p0, H, W, OH, OW, kh, kw, sh, sw,
                         ph, pw)  # fmt: skip


@njit(inline="always")
def _padded_extent(start, k, size, pad):
    """Cells of a window starting at ``start`` inside the zero-padded input: ``k``, except for
    a ceil-mode window running past the padding (which does not count, as in PyTorch)."""
    return min(start + k, size + pad) - start


@njit(parallel=True, cache=True)
def _avg_forward(x, out, kh, kw, sh, sw, ph, pw):
    P, H, W = x.shape
    OH, OW = out.shape[1], out.shape[2]
    for p in prange(P):
        for oh in range(OH):
            hs, he = _clip(oh * sh - ph, kh, H)
            rows = _padded_extent(oh * sh - ph, kh, H, ph)
            for ow in range(OW):
                ws, we = _clip(ow * sw - pw, kw, W)
                scale = np.float32(1.0) / np.float32(rows * _padded_extent(ow * sw - pw, kw, W, pw))
                s = np.float32(0.0)
                for h in range(hs, he):
                    for w in range(ws, we):
                        s += load(x[p, h, w])
                out[p, oh, ow] = store_value(out, s * scale)


@njit(parallel=True, cache=True)
def _avg_forward_2x2(x, out):
    """:func:`_avg_forward` for 2x2 windows at stride 2 inside the input (:func:`_is_2x2`):
    the same sum in the same order from +0.0 (so -0.0 inputs give +0.0, as there) times the
    same exact 1/4, without the per-window clipping and division (LeNet-5's pools at batch
    8: 77 and 34 us, the general kernel)."""
    P = x.shape[0]
    OH, OW = out.shape[1], out.shape[2]
    quarter = np.float32(0.25)
    for p in prange(P):
        for oh in range(OH):
            top, bottom, dst = x[p, 2 * oh], x[p, 2 * oh + 1], out[p, oh]
            for ow in range(OW):
                s = np.float32(0.0) + load(top[2 * ow])
                s = s + load(top[2 * ow + 1])
                s = s + load(bottom[2 * ow])
                s = s + load(bottom[2 * ow + 1])
                dst[ow] = store_value(out, s * quarter)


@njit(parallel=True, cache=True)
def _avg_backward(dy, dx, kh, kw, sh, sw, ph, pw):
    # A gather: each input pixel sums the dy of the windows covering it, so every output is
    # written once and no accumulation buffer is needed.
    P, H, W = dx.shape
    OH, OW = dy.shape[1], dy.shape[2]
    # 1 / divisor of each output row and column (kh, kw except for ceil-mode windows).
    inv_rows = np.empty(OH, np.float32)
    for oh in range(OH):
        inv_rows[oh] = np.float32(1.0) / np.float32(_padded_extent(oh * sh - ph, kh, H, ph))
    inv_cols = np.empty(OW, np.float32)
    for ow in range(OW):
        inv_cols[ow] = np.float32(1.0) / np.float32(_padded_extent(ow * sw - pw, kw, W, pw))
    for p in prange(P):
        for h in range(H):
            hp = h + ph
            # windows oh with oh*sh <= hp < oh*sh + kh
            oh0 = max(0, (hp - kh + sh) // sh)
            oh1 = min(OH, hp // sh + 1)
            for w in range(W):
                wp = w + pw
                ow0 = max(0, (wp - kw + sw) // sw)
                ow1 = min(OW, wp // sw + 1)
                s = np.float32(0.0)
                for oh in range(oh0, oh1):
                    for ow in range(ow0, ow1):
                        s += load(dy[p, oh, ow]) * (inv_rows[oh] * inv_cols[ow])
                dx[p, h, w] = store_value(dx, s)


# --- 2x2 stride-2 unpadded fast path -----------------------------------------------------------


@njit(inline="always")
def _max4(a, b, c, d):
    """Maximum of a 2x2 window, NaN propagating.

    Branch-free: ``max`` of floats compiles to a min/max instruction and the NaN case is a
    select on a flag, so random data causes no branch mispredictions.
    """
    has_nan = (a != a) | (b != b) | (c != c) | (d != d)
    # Any NaN operand makes the sum NaN; inf - inf cannot matter as it is used only with a NaN.
    return (a + b + c + d) if has_nan else max(max(a, b), max(c, d))


@njit(inline="always")
def _max4_and_flag(a, b, c, d):
    """:func:`_max4` plus whether the window holds a NaN, for the forward kernel.

    The same arithmetic; this shape of it is what LLVM vectorises well in the forward loop:
    with :func:`_max4` the float16 forward took 13x longer on 8-pixel-wide rows (measured,
    single thread: 0.84 vs 0.065 ms for batch 100, 64@8x8), while the backward is faster
    with :func:`_max4` (0.70 vs 0.98 ms on 16@28x28 float32).
    """
    has_nan = (a != a) | (b != b) | (c != c) | (d != d)
    m = max(max(a, b), max(c, d))
    return (a + b + c + d) if has_nan else m, has_nan


@njit(inline="always")
def _route_2x2(a, b, c, d, g, zero):
    """The four ``dx`` values of a 2x2 window: ``g`` at its first maximum, ``zero`` elsewhere.

    Random data makes the argmax unpredictable: branching on it mispredicted often enough to
    make the backward ~5x slower, so the first maximum is found with masks and every value
    is a select. ``m`` is NaN when the window holds one, and then only NaNs "equal" it.
    """
    m = _max4(a, b, c, d)
    hit_a = (a == m) | (a != a)
    hit_b = ((b == m) | (b != b)) and not hit_a
    hit_c = ((c == m) | (c != c)) and not (hit_a or hit_b)
    hit_d = not (hit_a or hit_b or hit_c)
    return (
        g if hit_a else zero,
        g if hit_b else zero,
        g if hit_c else zero,
        g if hit_d else zero,
    )


@njit(inline="always")
def _zero_uncovered(dx, p, OH, OW, zero):
    """Zero the last row/column of an odd-sized plane, which no 2x2 window covers."""
    H, W = dx.shape[1], dx.shape[2]
    if W > 2 * OW:
        for h in range(2 * OH):
            dx[p, h, W - 1] = zero
    for h in range(2 * OH, H):
        for w in range(W):
            dx[p, h, w] = zero


@njit(parallel=True, cache=True)
def _max_forward_2x2(x, out):
    P = x.shape[0]
    OH, OW = out.shape[1], out.shape[2]
    for p in prange(P):
        for oh in range(OH):
            h = 2 * oh
            for ow in range(OW):
                w = 2 * ow
                best, _ = _max4_and_flag(
                    load(x[p, h, w]),
                    load(x[p, h, w + 1]),
                    load(x[p, h + 1, w]),
                    load(x[p, h + 1, w + 1]),
                )
                out[p, oh, ow] = store_value(out, best)


@njit(parallel=True, cache=True)
def _max_backward_2x2(dy, x, dx):
    OH, OW = dy.shape[1], dy.shape[2]
    zero = store_value(dx, np.float32(0.0))
    for p in prange(x.shape[0]):
        for oh in range(OH):
            h = 2 * oh
            for ow in range(OW):
                w = 2 * ow
                # Windows do not overlap: dy is copied as is (half bits included), no rounding.
                dx[p, h, w], dx[p, h, w + 1], dx[p, h + 1, w], dx[p, h + 1, w + 1] = _route_2x2(
                    load(x[p, h, w]),
                    load(x[p, h, w + 1]),
                    load(x[p, h + 1, w]),
                    load(x[p, h + 1, w + 1]),
                    dy[p, oh, ow],
                    zero,
                )
        _zero_uncovered(dx, p, OH, OW, zero)


@njit(parallel=True, cache=True)
def _max_backward_2x2_half(dy, x, dx):
    # Same as _max_backward_2x2, but each pair of input rows is first converted to a float32
    # buffer: a contiguous loop the compiler vectorises (vcvtph2ps on many halves at once),
    # where converting four scattered halves per window measured ~2x slower overall. For
    # float32 the extra copy only costs, so that dtype keeps the direct kernel.
    W = x.shape[2]
    OH, OW = dy.shape[1], dy.shape[2]
    zero = store_value(dx, np.float32(0.0))
    for p in prange(x.shape[0]):
        rows = np.empty((2, W), dtype=np.float32)
        for oh in range(OH):
            h = 2 * oh
            for w in range(W):
                rows[0, w] = load(x[p, h, w])
                rows[1, w] = load(x[p, h + 1, w])
            for ow in range(OW):
                w = 2 * ow
                dx[p, h, w], dx[p, h, w + 1], dx[p, h + 1, w], dx[p, h + 1, w + 1] = _route_2x2(
                    rows[0, w], rows[0, w + 1], rows[1, w], rows[1, w + 1], dy[p, oh, ow], zero
                )
        _zero_uncovered(dx, p, OH, OW, zero)


def _backward_2x2_kernel_for(dtype):
    """The 2x2 backward kernel for a kernel-side dtype (float32, or uint16 half bits)."""
    return _max_backward_2x2_half if dtype == np.uint16 else _max_backward_2x2


# --- backend entry points (validated, C-contiguous input) -------------------------------------


def _is_2x2(g) -> bool:
    # Not in ceil mode on odd sizes: the fast kernels read whole 2x2 windows, unclipped.
    return (g.kh, g.kw, g.sh, g.sw, g.ph, g.pw) == (2, 2, 2, 2, 0, 0) and (
        2 * g.OH <= g.H and 2 * g.OW <= g.W
    )


def _planes(a, h, w):
    """(N, C, h, w) array -> (N*C, h, w) kernel view (half as uint16 bits)."""
    return bits_view(a).reshape(-1, h, w)


def _window_args(g):
    return g.kh, g.kw, g.sh, g.sw, g.ph, g.pw


# Forward pooling reading fewer input values than this runs on the calling thread: the serial
# twins (the same source compiled without ``parallel``; every plane computed alike, so the
# same bits) spare a small batch the thread pool's wake-up, tens of microseconds idle and
# milliseconds when other processes hold the cores. Deep-MNIST at batch 1 reads 3k-12k
# values per pooling layer; at batch 100, 0.3M-1.2M.
SERIAL_POOL_VALUES = 65536

_max_forward_2x2_serial = serial_twin(_max_forward_2x2)
_max_forward_serial = serial_twin(_max_forward)
_avg_forward_serial = serial_twin(_avg_forward)
_avg_forward_2x2_serial = serial_twin(_avg_forward_2x2)
_max_backward_serial = serial_twin(_max_backward)


def _general_max(xp, out, g) -> bool:
    """The general max-pool forward of planes ``xp`` into ``out``, serially under
    :data:`SERIAL_POOL_VALUES`; returns whether it ran serially."""
    serial = xp.size < SERIAL_POOL_VALUES
    (_max_forward_serial if serial else _max_forward)(xp, out, *_window_args(g))
    return serial


def max_pool2d(x, g):
    xp = _planes(x, g.H, g.W)
    out = outputs.empty((g.N * g.C, g.OH, g.OW), xp.dtype)
    if _is_2x2(g):
        serial = xp.size < SERIAL_POOL_VALUES
        (_max_forward_2x2_serial if serial else _max_forward_2x2)(xp, out)
    else:
        _general_max(xp, out, g)
    return from_bits(out, x.dtype).reshape(g.N, g.C, g.OH, g.OW)


# The general backward's positions are int32 within a block of planes (at most
# max(MAX_POOL_BLOCK_VALUES, H*W) values), and its scatter has no bounds checks.
MAX_ROUTE_PIXELS = 2**31


def max_pool2d_backward(dy, x, g):
    if g.H * g.W > MAX_ROUTE_PIXELS and not _is_2x2(g):
        raise ValueError(
            f"max_pool2d_backward: x planes of {g.H}x{g.W} = {g.H * g.W} pixels; the CPU "
            f"kernel takes at most {MAX_ROUTE_PIXELS} pixels a plane (int32 positions)"
        )
    xp = _planes(x, g.H, g.W)
    dyp = _planes(dy, g.OH, g.OW)
    dx = np.empty_like(xp)
    if _is_2x2(g):
        _backward_2x2_kernel_for(xp.dtype)(dyp, xp, dx)
    else:
        # The forward's passes again, carrying each maximum's position, then the scatter.
        serial = xp.size < SERIAL_POOL_VALUES
        (_max_backward_serial if serial else _max_backward)(dyp, xp, dx, *_window_args(g))
    return from_bits(dx, x.dtype).reshape(g.x_shape)


def avg_pool2d(x, g):
    xp = _planes(x, g.H, g.W)
    out = outputs.empty((g.N * g.C, g.OH, g.OW), xp.dtype)
    serial = xp.size < SERIAL_POOL_VALUES
    if _is_2x2(g):
        (_avg_forward_2x2_serial if serial else _avg_forward_2x2)(xp, out)
    else:
        (_avg_forward_serial if serial else _avg_forward)(xp, out, *_window_args(g))
    return from_bits(out, x.dtype).reshape(g.N, g.C, g.OH, g.OW)


def avg_pool2d_backward(dy, g):
    dyp = _planes(dy, g.OH, g.OW)
    dx = np.empty((g.N * g.C, g.H, g.W), dtype=dyp.dtype)
    _avg_backward(dyp, dx, *_window_args(g))
    return from_bits(dx, dy.dtype).reshape(g.x_shape)


class PoolKernels:
    """This module's ops as methods of the CPU kernel set (:class:`fastconv.cpu.CpuKernels`
    inherits them): adding an op here registers it there."""

    max_pool2d = staticmethod(max_pool2d)
    max_pool2d_backward = staticmethod(max_pool2d_backward)
    avg_pool2d = staticmethod(avg_pool2d)
    avg_pool2d_backward = staticmethod(avg_pool2d_backward)
