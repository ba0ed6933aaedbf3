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

The deep-MNIST net only uses 2x2 stride-2 unpadded max pooling, so that case has its own
kernels: no window bounds to clip, a branch-free 4-way max, and a backward pass that writes
every input pixel exactly once instead of zeroing and scattering.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

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


@njit(inline="always")
def _window_argmax(plane, hs, he, ws, we):
    # Callers guarantee a non-empty window (pad <= size/2 is validated), so seeding with its
    # first pixel is safe and makes an all -inf window pick its first element, like PyTorch.
    best = load(plane[hs, ws])
    bh, bw = hs, ws
    for h in range(hs, he):
        for w in range(ws, we):
            v = load(plane[h, w])
            if _wins(v, best):
                best = v
                bh, bw = h, w
    return best, bh, bw


# --- general kernels (any size, stride, pad) --------------------------------------------------


@njit(parallel=True, cache=True)
def _max_forward(x, out, kh, kw, sh, sw, ph, pw):
    P, H, W = x.shape
    OH, OW = out.shape[1], out.shape[2]
    for p in prange(P):
        plane = x[p]
        for oh in range(OH):
            hs, he = _clip(oh * sh - ph, kh, H)
            for ow in range(OW):
                ws, we = _clip(ow * sw - pw, kw, W)
                best, _, _ = _window_argmax(plane, hs, he, ws, we)
                out[p, oh, ow] = store_value(out, best)


@njit(parallel=True, cache=True)
def _max_backward(dy, x, dx, kh, kw, sh, sw, ph, pw):
    P, H, W = x.shape
    OH, OW = dy.shape[1], dy.shape[2]
    for p in prange(P):
        plane = x[p]
        # Overlapping windows can route several gradients to one pixel: sum them in float32
        # (also for half, whose own additions would round at every step).
        acc = np.zeros((H, W), dtype=np.float32)
        for oh in range(OH):
            hs, he = _clip(oh * sh - ph, kh, H)
            for ow in range(OW):
                ws, we = _clip(ow * sw - pw, kw, W)
                _, bh, bw = _window_argmax(plane, hs, he, ws, we)
                acc[bh, bw] += load(dy[p, oh, ow])
        for h in range(H):
            for w in range(W):
                dx[p, h, w] = store_value(dx, acc[h, w])


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


def max_pool2d(x, g):
    xp = _planes(x, g.H, g.W)
    out = outputs.empty((g.N * g.C, g.OH, g.OW), xp.dtype)
    serial = xp.size < SERIAL_POOL_VALUES
    if _is_2x2(g):
        (_max_forward_2x2_serial if serial else _max_forward_2x2)(xp, out)
    else:
        (_max_forward_serial if serial else _max_forward)(xp, out, *_window_args(g))
    return from_bits(out, x.dtype).reshape(g.N, g.C, g.OH, g.OW)


def max_pool2d_backward(dy, x, g):
    xp = _planes(x, g.H, g.W)
    dyp = _planes(dy, g.OH, g.OW)
    dx = np.empty_like(xp)
    if _is_2x2(g):
        _backward_2x2_kernel_for(xp.dtype)(dyp, xp, dx)
    else:
        _max_backward(dyp, xp, dx, *_window_args(g))
    return from_bits(dx, x.dtype).reshape(g.x_shape)


def avg_pool2d(x, g):
    xp = _planes(x, g.H, g.W)
    out = outputs.empty((g.N * g.C, g.OH, g.OW), xp.dtype)
    kernel = _avg_forward_serial if xp.size < SERIAL_POOL_VALUES else _avg_forward
    kernel(xp, out, *_window_args(g))
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
