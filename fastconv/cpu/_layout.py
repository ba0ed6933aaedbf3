"""Layouts of the convolution workspaces: aligned buffers, images stacked per channel, packed
weights, and the epilogue that writes NCHW results.

Stacking (the direct path's only copy of the input): the padded images of a block are laid one
after another in each channel's segment, sharing their zero padding, so that the unfolded
matrix row of tap (c, i, j) is the stack shifted by ``c*cstride + i*stride + j``.
"""

from __future__ import annotations

import types
from typing import NamedTuple

import numba
import numpy as np
from numba import njit

from ._gemm import INF
from ._half import bits_view, load, store_value

__all__ = [
    "ALIGN",
    "ACTIVATION_CODES",
    "NO_ACTIVATION",
    "RELU",
    "RELU6",
    "relu6",
    "StackLayout",
    "round_up",
    "row_stride",
    "aligned_empty",
    "threads",
    "image_range",
    "tap_offsets",
    "stack_layout",
    "stack_images",
    "packed_weights",
    "store_rows",
    "add_residual_block",
    "add_residual_image",
    "add_residual_rows",
    "serial_twin",
]

# GEMM rows (accumulators, stacked planes) start on 64-byte boundaries: unaligned AVX-512
# loads and stores of the accumulator rows cost up to 25% of the product's speed (8x8 layers).
ALIGN = 16  # float32 values per 64 bytes


class StackLayout(NamedTuple):
    """``nb`` padded images stacked per channel: tiles of ``rows`` x ``stride`` values one after
    another in each channel's segment of ``cstride`` values."""

    rows: int
    stride: int
    cstride: int


def round_up(n, multiple=ALIGN):
    return -(-n // multiple) * multiple


def row_stride(n):
    """Distance between GEMM rows of ``n`` values: a multiple of ``ALIGN``, but never of 4 KiB.

    Rows a multiple of 4 KiB apart map to the same L1 sets: conv4's 8 accumulator rows of
    1024 floats (+ 4 B rows) thrashed its 8 ways, and its direct forward ran at a third of
    conv6's speed for the same FLOPs (13.2 vs 7.8 ms, one thread); one more 64-byte line per
    row fixes it (see docs/kernels.md).
    """
    n = round_up(n)
    return n + ALIGN if n % 1024 == 0 else n


def aligned_empty(shape):
    """Uninitialised float32 array whose data starts on a 64-byte boundary (rows whose length
    is a multiple of ``ALIGN`` then all start on one)."""
    size = int(np.prod(shape))
    raw = np.empty(size + ALIGN, np.float32)
    skip = (-raw.ctypes.data // 4) % ALIGN
    return raw[skip : skip + size].reshape(shape)


def threads(N):
    """Threads a call over ``N`` images uses: Numba's count, at most one per image."""
    return max(1, min(numba.get_num_threads(), N))


@njit(cache=True)
def image_range(t, n_threads, N):
    """Images [lo, hi) of thread ``t``: contiguous ranges, so each thread owns its outputs."""
    return t * N // n_threads, (t + 1) * N // n_threads


def tap_offsets(C, kh, kw, plane, row):
    """Flat offsets of the (c, i, j) taps in a stack of C planes of size ``plane``."""
    c = np.arange(C, dtype=np.int64)[:, None, None] * plane
    i = np.arange(kh, dtype=np.int64)[None, :, None] * row
    j = np.arange(kw, dtype=np.int64)[None, None, :]
    return (c + i + j).ravel()


def stack_layout(rows, cols, ph, pw, kh, kw, nb):
    """:class:`StackLayout` of ``nb`` padded ``rows`` x ``cols`` images stacked per channel.

    When 0 <= pad <= kernel-1, neighbouring rows and images share their zero padding: a row
    is [pw zeros, cols pixels] and the next row's zeros act as its right padding, and
    likewise between images, with a zero tail after the last one. That trims the extra
    outputs the direct path computes (8x8 pad 1: 81 instead of 100 per 64 outputs).
    Otherwise (negative pad: a crop; or a pad beyond kernel-1) each image gets a full tile.
    The channel stride is a multiple of ``ALIGN``, so that every channel starts aligned
    (and dy stacked this way gives aligned GEMM rows); the extra tail is zeros.
    """
    if 0 <= ph <= kh - 1 and 0 <= pw <= kw - 1:
        t_rows, stride = rows + ph, cols + pw
        return StackLayout(t_rows, stride, row_stride(nb * t_rows * stride + ph * stride + pw))
    t_rows, stride = rows + 2 * ph, cols + 2 * pw
    return StackLayout(t_rows, stride, row_stride(nb * t_rows * stride))


@njit(cache=True)
def stack_images(src, n0, count, dst, layout, top, left, check):
    """Images n0 .. n0+count-1 of ``src``, padded, one after another in each channel's
    segment ``dst[c*cstride : (c+1)*cstride]``: tiles of ``rows`` x ``stride`` (``layout``)
    with the image at (top, left), zeros everywhere else (tail included), fp32.

    ``top``/``left`` may be negative (the tile then crops the image). With ``check``, returns
    whether every copied value is finite: the shifted-view products read pixels across row
    ends (their results are discarded), harmless unless 0 * inf or NaN leaks in, so callers
    fall back. Without it (the forward, where those results are only dropped), returns True.
    """
    # Zeroing each channel's segment whole and then copying the image rows measured ~2x
    # faster than writing each padded row (zeros and pixels) piece by piece.
    rows, stride, cstride = layout
    C, Hs, Ws = src.shape[1], src.shape[2], src.shape[3]
    tile = rows * stride
    r_lo, r_hi = max(0, -top), min(Hs, rows - top)
    s_lo, s_hi = max(0, -left), min(Ws, stride - left)
    width = s_hi - s_lo
    nonfinite = 0
    for c in range(C):
        plane = dst[c * cstride : (c + 1) * cstride]
        plane[:] = 0.0
        if width <= 0:
            continue
        for b in range(count):
            img = src[n0 + b, c]
            for r in range(r_lo, r_hi):
                start = b * tile + (r + top) * stride + left + s_lo
                seg = plane[start : start + width]
                srow = img[r]
                srow = srow[s_lo:s_hi]
                if check:
                    # No fastmath here: it would let LLVM assume the values finite. An
                    # integer count keeps the loop vectorisable.
                    row_nonfinite = 0
                    for q in range(width):
                        v = load(srow[q])
                        seg[q] = v
                        row_nonfinite += not (abs(v) < INF)
                    nonfinite += row_nonfinite
                else:
                    for q in range(width):
                        seg[q] = load(srow[q])
    return nonfinite == 0


@njit(cache=True)
def _pack_weights(w, w_fk, w_kf, w_flip):
    """fp32 GEMM operands: W as (F, K), its transpose (K, F), and the transposed, spatially
    flipped filters (C, F*kh*kw) with which dx is a stride-1 convolution of dy.

    Returns whether all weights are finite.
    """
    F, C, kh, kw = w.shape
    finite = True
    for f in range(F):
        for c in range(C):
            for i in range(kh):
                for j in range(kw):
                    k = (c * kh + i) * kw + j
                    v = load(w[f, c, i, j])
                    if not (abs(v) < INF):
                        finite = False
                    w_fk[f, k] = v
                    w_kf[k, f] = v
                    w_flip[c, (f * kh + kh - 1 - i) * kw + kw - 1 - j] = v
    return finite


def packed_weights(w):
    """``(w_fk, w_kf, w_flip, finite)``: the float32 operands of :func:`_pack_weights`."""
    F, C, kh, kw = w.shape
    K = C * kh * kw
    w_fk = np.empty((F, K), np.float32)
    w_kf = np.empty((K, F), np.float32)
    w_flip = np.empty((C, F * kh * kw), np.float32)
    finite = _pack_weights(bits_view(w), w_fk, w_kf, w_flip)
    return w_fk, w_kf, w_flip, finite


# The activation a kernel's epilogue applies: a small integer so that one compiled kernel serves
# all three (Python's True and False are 1 and 0). ReLU6 is min(max(v, 0), 6) with NaN kept, in
# float32 before the store: rounding to float16 is monotonic and 0 and 6 are exact, so the
# bits are those of the ReLU6 layer applied to the stored values.
NO_ACTIVATION, RELU, RELU6 = 0, 1, 2
ACTIVATION_CODES = {None: NO_ACTIVATION, "relu": RELU, "relu6": RELU6}


@njit(inline="always")
def relu6(v):
    """min(max(v, 0), 6) keeping NaN and -0.0, as :func:`fastconv.clip` (0, 6) (Numba's
    float max and min return their first argument when it is NaN or the two are equal).
    Written with selects or early returns, the store loops stayed scalar and branchy: 2.5 ms
    against 0.19 for MobileNetV2's 7x7x960 depthwise stores at batch 8."""
    return min(max(v, np.float32(0.0)), np.float32(6.0))


@njit(cache=True)
def store_rows(acc, col0, row_stride, dst, rows, cols, bias, relu):
    """dst (M, rows, cols) <- acc[m, col0 + r*row_stride + s] (+ bias[m], then the activation
    ``relu``: an :data:`ACTIVATION_CODES` value), written in dst's dtype."""
    for m in range(dst.shape[0]):
        bm = bias[m]
        for r in range(rows):
            src = acc[m, col0 + r * row_stride : col0 + r * row_stride + cols]
            out = dst[m, r]
            if relu == RELU6:
                for s in range(cols):
                    out[s] = store_value(out, relu6(src[s] + bm))
            elif relu:
                for s in range(cols):
                    v = src[s] + bm
                    # ``not v < 0`` keeps NaN (a plain max would turn it into 0).
                    out[s] = store_value(out, v if not v < 0.0 else np.float32(0.0))
            else:
                for s in range(cols):
                    out[s] = store_value(out, src[s] + bm)


# --- residual epilogue (prepared inference: ResNet's relu(bn(conv(x)) + shortcut)) ---------


@njit(inline="always")
def _residual_sum(y_value, res_value, relu):
    """``act(y + res)`` of two stored values, in float32 (NaN kept by the ReLU): what every
    residual epilogue below writes back, rounded, into ``y``."""
    v = load(y_value) + load(res_value)
    if relu and v < np.float32(0.0):  # False for NaN: NaN is kept
        v = np.float32(0.0)
    return v


@njit(cache=True)
def add_residual_block(y, res, d_off, d_stride, rows, cols, relu):
    """``y[q] = act(y[q] + res[q])`` for the block ``q = d_off + c*d_stride + r`` (r < rows,
    c < cols) that the Winograd epilogue has just stored, so it is still in L1. ``y`` was
    rounded to its dtype first and the sum is rounded again: the bits of the unfused conv,
    Add and ReLU (float16 included, which NumPy adds in float32)."""
    yf = y.reshape(-1)
    rf = res.reshape(-1)
    for c in range(cols):
        base = d_off + c * d_stride
        for r in range(rows):
            yf[base + r] = store_value(yf, _residual_sum(yf[base + r], rf[base + r], relu))


@njit(cache=True)
def add_residual_image(y, res, n, relu):
    """``y[n] = act(y[n] + res[n])`` for one image the GEMM epilogue has just stored (its
    F*OH*OW values are still in L1/L2); rounded as :func:`add_residual_block`."""
    yn = y[n].reshape(-1)
    rn = res[n].reshape(-1)
    for q in range(yn.shape[0]):
        yn[q] = store_value(yn, _residual_sum(yn[q], rn[q], relu))


@njit(cache=True)
def add_residual_rows(y, res, n, m_lo, m_hi, oh_lo, oh_hi, relu):
    """:func:`add_residual_image` on channels ``m_lo:m_hi`` and rows ``oh_lo:oh_hi`` of
    image ``n``: one thread's block of a shared image (``_direct.forward_split``)."""
    for m in range(m_lo, m_hi):
        for r in range(oh_lo, oh_hi):
            yr, rr = y[n, m, r], res[n, m, r]
            for s in range(yr.shape[0]):
                yr[s] = store_value(yr, _residual_sum(yr[s], rr[s], relu))


def serial_twin(dispatcher):
    """The serial compilation of a ``parallel=True`` kernel's source (``prange`` is ``range``
    there): same work in the same order, so the same bits, without the thread pool.

    The function is copied under its own name: Numba's on-disk cache is keyed by the
    function's qualified name and source line, not by ``parallel``, so a second dispatcher of
    the same function shared the first one's cache and the parallel kernel loaded the serial
    machine code (caught by tests/kernels/test_threading.py: no parallel region ever ran)."""
    fn = dispatcher.py_func
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                              fn.__defaults__, fn.__closure__)  # fmt: skip
    twin.__qualname__ = fn.__qualname__ + "_serial"
    twin.__module__ = fn.__module__
    return njit(cache=True)(twin)
