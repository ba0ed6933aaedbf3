"""CPU convolution kernels in Numba: im2col/col2im and conv2d forward/backward.

Design (see ``docs/kernels.md`` for the measurements behind it):

* The public :func:`im2col` / :func:`col2im` use the book's layout, rows (n, oh, ow) and columns
  (c, i, j). Convolution does not go through them: a whole-batch column matrix is tens of MB
  and writing it alone costs more than PyTorch's whole layer.
* Convolution: each thread owns a contiguous range of images, its own fp32 workspaces
  (reused across calls) and, for dW/db, a partial sum reduced at the end (no write races).
  Images go through in blocks stacked side by side, so the products have long rows.
  - Direct path (stride 1): the padded images are stacked per channel, sharing their zero
    padding; the unfolded matrix row of tap (c, i, j) is then just a shifted view of the
    stack, so ``y = W @ views`` needs no unfolding (a few outputs straddling the padding are
    computed and dropped). dx is a stride-1 convolution of padded dy with the flipped,
    transposed filters; dW a product of dy with the shifted views.
  - Unfolded path (stride > 1; backward with C < 4): the "Caffe" layout
    ``col (K = C*kh*kw, nb*OH*OW)``, ``y = W @ col``, ``dW += dy @ col^T``,
    ``dcol = W^T @ dy`` folded back into dx.
  Bias and ReLU are fused into the epilogue that writes NCHW output.
* The matrix products are blocked loops (4x8 and 4x4) whose innermost loop runs over a contiguous
  row so that LLVM vectorises it (AVX-512 where available).
* float16 arrays are read and written as uint16 bits through :mod:`fastconv.cpu._half`;
  everything is computed and accumulated in float32.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ._half import bits_view, load, store_value
from ._workspace import checkout

__all__ = ["im2col", "col2im", "conv2d", "conv2d_backward"]

# Reassociation lets LLVM vectorise the reductions; never nnan/ninf: NaN must propagate.
_FASTMATH = {"contract", "reassoc", "arcp", "nsz"}
_INF = np.float32(np.inf)


# --- index helpers ------------------------------------------------------------------------------


@njit(cache=True)
def _valid_range(in_size, out_size, stride, pad, offset):
    """Output indices ``o`` in [lo, hi) whose input index ``o*stride - pad + offset`` is inside."""
    # o*stride >= pad - offset  and  o*stride <= in_size - 1 + pad - offset
    lo_num = pad - offset
    lo = 0 if lo_num <= 0 else (lo_num + stride - 1) // stride
    hi_num = in_size - 1 + pad - offset
    hi = 0 if hi_num < 0 else hi_num // stride + 1
    if hi > out_size:
        hi = out_size
    if lo > hi:
        lo = hi
    return lo, hi


# --- public im2col / col2im ---------------------------------------------------------------------


@njit(cache=True, parallel=True)
def _im2col_kernel(x, out, kh, kw, sh, sw, ph, pw, OH, OW):
    # Each output row is written whole and in order (contiguous stores); rows of one image
    # row go to one thread. A plain copy: half bits are copied as they are.
    N, C, H, W = x.shape
    for row_block in prange(N * OH):
        n = row_block // OH
        oh = row_block - n * OH
        for ow in range(OW):
            dst = out[row_block * OW + ow]
            iw0 = ow * sw - pw
            for c in range(C):
                for i in range(kh):
                    ih = oh * sh - ph + i
                    seg = dst[(c * kh + i) * kw : (c * kh + i + 1) * kw]
                    if ih < 0 or ih >= H:
                        seg[:] = 0
                        continue
                    xrow = x[n, c, ih]
                    for j in range(kw):
                        iw = iw0 + j
                        seg[j] = xrow[iw] if 0 <= iw < W else 0


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def _col2im_kernel(cols, out, kh, kw, sh, sw, ph, pw, OH, OW):
    # A gather: every output pixel sums its own contributions in a fixed order, so the result is
    # deterministic and threads never write the same element.
    N, C, H, W = out.shape
    for plane in prange(N * C):
        n = plane // C
        c = plane - n * C
        for h in range(H):
            for w in range(W):
                acc = np.float32(0.0)
                for i in range(kh):
                    oh_num = h + ph - i
                    if oh_num < 0 or oh_num % sh != 0:
                        continue
                    oh = oh_num // sh
                    if oh >= OH:
                        continue
                    for j in range(kw):
                        ow_num = w + pw - j
                        if ow_num < 0 or ow_num % sw != 0:
                            continue
                        ow = ow_num // sw
                        if ow >= OW:
                            continue
                        acc += load(cols[(n * OH + oh) * OW + ow, (c * kh + i) * kw + j])
                out[n, c, h, w] = store_value(out, acc)


def im2col(x, g):
    """Backend im2col: ``(N*OH*OW, C*kh*kw)`` in ``x``'s dtype (see :func:`fastconv.im2col`)."""
    out = np.empty((g.N * g.OH * g.OW, g.C * g.kh * g.kw), dtype=x.dtype)
    _im2col_kernel(bits_view(x), bits_view(out), g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.OH, g.OW)
    return out


def col2im(cols, g):
    """Backend col2im, the exact adjoint of :func:`im2col`, in ``cols``' dtype."""
    out = np.empty(g.x_shape, dtype=cols.dtype)
    _col2im_kernel(bits_view(cols), bits_view(out), g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.OH, g.OW)
    return out


# --- per-image building blocks ------------------------------------------------------------------


@njit(cache=True)
def _unfold_image(x, n, col, L, col0, kh, kw, sh, sw, ph, pw, OH, OW):
    """Windows of image ``n`` of ``x`` (float32 or half bits) into a flat fp32 column matrix:
    row k = (c, i, j) starts at ``k*L``, this image's OH*OW columns at ``col0``.
    """
    # Inner loops index slices from 0: Numba then needs no negative-index wraparound and
    # LLVM vectorises the copies (offset indices measured 5x slower).
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    P = OH * OW
    for c in range(C):
        for i in range(kh):
            oh_lo, oh_hi = _valid_range(H, OH, sh, ph, i)
            for j in range(kw):
                k = (c * kh + i) * kw + j
                row = col[k * L + col0 : k * L + col0 + P]
                ow_lo, ow_hi = _valid_range(W, OW, sw, pw, j)
                count = ow_hi - ow_lo
                row[: oh_lo * OW] = 0.0
                row[oh_hi * OW :] = 0.0
                first = ow_lo * sw - pw + j
                for oh in range(oh_lo, oh_hi):
                    dst = row[oh * OW : (oh + 1) * OW]
                    dst[:ow_lo] = 0.0
                    dst[ow_hi:] = 0.0
                    seg = dst[ow_lo:ow_hi]
                    xrow = x[n, c, oh * sh - ph + i]
                    if sw == 1:
                        src = xrow[first : first + count]
                        for q in range(count):
                            seg[q] = load(src[q])
                    else:
                        for q in range(count):
                            seg[q] = load(xrow[first + q * sw])


@njit(cache=True)
def _fold_image(dcol, L, col0, dx_acc, kh, kw, sh, sw, ph, pw, OH, OW):
    """dx_acc (C, H, W) fp32 <- sum of one image's window contributions, the adjoint of
    :func:`_unfold_image` (same flat layout). Runs on one thread for one image, so the
    accumulation order is fixed (deterministic).
    """
    C, H, W = dx_acc.shape
    dx_acc[:] = 0.0
    for c in range(C):
        for i in range(kh):
            oh_lo, oh_hi = _valid_range(H, OH, sh, ph, i)
            for j in range(kw):
                k = (c * kh + i) * kw + j
                base = k * L + col0
                ow_lo, ow_hi = _valid_range(W, OW, sw, pw, j)
                count = ow_hi - ow_lo
                first = ow_lo * sw - pw + j
                for oh in range(oh_lo, oh_hi):
                    src = dcol[base + oh * OW + ow_lo : base + oh * OW + ow_hi]
                    dst_row = dx_acc[c, oh * sh - ph + i]
                    if sw == 1:
                        dst = dst_row[first : first + count]
                        for q in range(count):
                            dst[q] += src[q]
                    else:
                        for q in range(count):
                            dst_row[first + q * sw] += src[q]


@njit(cache=True, fastmath=_FASTMATH)
def _gemm_nn(a, src, offsets, length, c):
    """c[:, :length] += a (M, K) @ B, where row k of B is ``src[offsets[k]:offsets[k]+length]``.

    B is never materialised: its rows are slices of one flat fp32 buffer, either an unfolded
    column matrix (offsets k*P) or a padded image whose shifted views are the kernel taps
    (offsets c*Hp*Wp + i*Wp + j). Blocked 8 rows of ``c`` x 4 rows of B: each pass over a row
    does 32 FMAs per 12 loads and 8 stores, and the contiguous inner loop vectorises. With
    64-byte aligned rows of ``c``, 8x4 made the deep-MNIST forward passes 13-20% faster than
    4x8 (idle machine, one thread); the rows left over (M % 8) go through the 4x8 blocking of
    :func:`_gemm_nn_rows`.
    """
    M, K = a.shape
    M8 = M - M % 8
    K4 = K - K % 4
    for m in range(0, M8, 8):
        c0, c1 = c[m, :length], c[m + 1, :length]
        c2, c3 = c[m + 2, :length], c[m + 3, :length]
        c4, c5 = c[m + 4, :length], c[m + 5, :length]
        c6, c7 = c[m + 6, :length], c[m + 7, :length]
        for k in range(0, K4, 4):
            b0 = src[offsets[k] : offsets[k] + length]
            b1 = src[offsets[k + 1] : offsets[k + 1] + length]
            b2 = src[offsets[k + 2] : offsets[k + 2] + length]
            b3 = src[offsets[k + 3] : offsets[k + 3] + length]
            a00, a01, a02, a03 = a[m, k], a[m, k + 1], a[m, k + 2], a[m, k + 3]
            a10, a11, a12, a13 = a[m + 1, k], a[m + 1, k + 1], a[m + 1, k + 2], a[m + 1, k + 3]
            a20, a21, a22, a23 = a[m + 2, k], a[m + 2, k + 1], a[m + 2, k + 2], a[m + 2, k + 3]
            a30, a31, a32, a33 = a[m + 3, k], a[m + 3, k + 1], a[m + 3, k + 2], a[m + 3, k + 3]
            a40, a41, a42, a43 = a[m + 4, k], a[m + 4, k + 1], a[m + 4, k + 2], a[m + 4, k + 3]
            a50, a51, a52, a53 = a[m + 5, k], a[m + 5, k + 1], a[m + 5, k + 2], a[m + 5, k + 3]
            a60, a61, a62, a63 = a[m + 6, k], a[m + 6, k + 1], a[m + 6, k + 2], a[m + 6, k + 3]
            a70, a71, a72, a73 = a[m + 7, k], a[m + 7, k + 1], a[m + 7, k + 2], a[m + 7, k + 3]
            for p in range(length):
                v0, v1, v2, v3 = b0[p], b1[p], b2[p], b3[p]
                c0[p] += a00 * v0 + a01 * v1 + a02 * v2 + a03 * v3
                c1[p] += a10 * v0 + a11 * v1 + a12 * v2 + a13 * v3
                c2[p] += a20 * v0 + a21 * v1 + a22 * v2 + a23 * v3
                c3[p] += a30 * v0 + a31 * v1 + a32 * v2 + a33 * v3
                c4[p] += a40 * v0 + a41 * v1 + a42 * v2 + a43 * v3
                c5[p] += a50 * v0 + a51 * v1 + a52 * v2 + a53 * v3
                c6[p] += a60 * v0 + a61 * v1 + a62 * v2 + a63 * v3
                c7[p] += a70 * v0 + a71 * v1 + a72 * v2 + a73 * v3
        for k in range(K4, K):
            bk = src[offsets[k] : offsets[k] + length]
            a0, a1, a2, a3 = a[m, k], a[m + 1, k], a[m + 2, k], a[m + 3, k]
            a4, a5, a6, a7 = a[m + 4, k], a[m + 5, k], a[m + 6, k], a[m + 7, k]
            for p in range(length):
                v = bk[p]
                c0[p] += a0 * v
                c1[p] += a1 * v
                c2[p] += a2 * v
                c3[p] += a3 * v
                c4[p] += a4 * v
                c5[p] += a5 * v
                c6[p] += a6 * v
                c7[p] += a7 * v
    _gemm_nn_rows(a, src, offsets, length, c, M8)


@njit(cache=True, fastmath=_FASTMATH)
def _gemm_nn_rows(a, src, offsets, length, c, m_start):
    """Rows ``m_start:`` of :func:`_gemm_nn`, blocked 4 rows of ``c`` x 8 rows of B."""
    M, K = a.shape
    M4 = m_start + (M - m_start) // 4 * 4
    K8 = K - K % 8
    K4 = K - K % 4
    for m in range(m_start, M4, 4):
        c0, c1 = c[m, :length], c[m + 1, :length]
        c2, c3 = c[m + 2, :length], c[m + 3, :length]
        for k in range(0, K8, 8):
            # 8 rows of B per pass halve the traffic on c (measured +10-15% over 4).
            b0 = src[offsets[k] : offsets[k] + length]
            b1 = src[offsets[k + 1] : offsets[k + 1] + length]
            b2 = src[offsets[k + 2] : offsets[k + 2] + length]
            b3 = src[offsets[k + 3] : offsets[k + 3] + length]
            b4 = src[offsets[k + 4] : offsets[k + 4] + length]
            b5 = src[offsets[k + 5] : offsets[k + 5] + length]
            b6 = src[offsets[k + 6] : offsets[k + 6] + length]
            b7 = src[offsets[k + 7] : offsets[k + 7] + length]
            r0, r1, r2, r3 = (
                a[m, k : k + 8],
                a[m + 1, k : k + 8],
                a[m + 2, k : k + 8],
                a[m + 3, k : k + 8],
            )
            a00, a01, a02, a03, a04, a05, a06, a07 = (
                r0[0],
                r0[1],
                r0[2],
                r0[3],
                r0[4],
                r0[5],
                r0[6],
                r0[7],
            )
            a10, a11, a12, a13, a14, a15, a16, a17 = (
                r1[0],
                r1[1],
                r1[2],
                r1[3],
                r1[4],
                r1[5],
                r1[6],
                r1[7],
            )
            a20, a21, a22, a23, a24, a25, a26, a27 = (
                r2[0],
                r2[1],
                r2[2],
                r2[3],
                r2[4],
                r2[5],
                r2[6],
                r2[7],
            )
            a30, a31, a32, a33, a34, a35, a36, a37 = (
                r3[0],
                r3[1],
                r3[2],
                r3[3],
                r3[4],
                r3[5],
                r3[6],
                r3[7],
            )
            for p in range(length):
                v0, v1, v2, v3 = b0[p], b1[p], b2[p], b3[p]
                v4, v5, v6, v7 = b4[p], b5[p], b6[p], b7[p]
                c0[p] += (a00 * v0 + a01 * v1 + a02 * v2 + a03 * v3) + (
                    a04 * v4 + a05 * v5 + a06 * v6 + a07 * v7
                )
                c1[p] += (a10 * v0 + a11 * v1 + a12 * v2 + a13 * v3) + (
                    a14 * v4 + a15 * v5 + a16 * v6 + a17 * v7
                )
                c2[p] += (a20 * v0 + a21 * v1 + a22 * v2 + a23 * v3) + (
                    a24 * v4 + a25 * v5 + a26 * v6 + a27 * v7
                )
                c3[p] += (a30 * v0 + a31 * v1 + a32 * v2 + a33 * v3) + (
                    a34 * v4 + a35 * v5 + a36 * v6 + a37 * v7
                )
        for k in range(K8, K4, 4):
            b0 = src[offsets[k] : offsets[k] + length]
            b1 = src[offsets[k + 1] : offsets[k + 1] + length]
            b2 = src[offsets[k + 2] : offsets[k + 2] + length]
            b3 = src[offsets[k + 3] : offsets[k + 3] + length]
            a00, a01, a02, a03 = a[m, k], a[m, k + 1], a[m, k + 2], a[m, k + 3]
            a10, a11, a12, a13 = a[m + 1, k], a[m + 1, k + 1], a[m + 1, k + 2], a[m + 1, k + 3]
            a20, a21, a22, a23 = a[m + 2, k], a[m + 2, k + 1], a[m + 2, k + 2], a[m + 2, k + 3]
            a30, a31, a32, a33 = a[m + 3, k], a[m + 3, k + 1], a[m + 3, k + 2], a[m + 3, k + 3]
            for p in range(length):
                v0, v1, v2, v3 = b0[p], b1[p], b2[p], b3[p]
                c0[p] += a00 * v0 + a01 * v1 + a02 * v2 + a03 * v3
                c1[p] += a10 * v0 + a11 * v1 + a12 * v2 + a13 * v3
                c2[p] += a20 * v0 + a21 * v1 + a22 * v2 + a23 * v3
                c3[p] += a30 * v0 + a31 * v1 + a32 * v2 + a33 * v3
        for k in range(K4, K):
            bk = src[offsets[k] : offsets[k] + length]
            a0, a1, a2, a3 = a[m, k], a[m + 1, k], a[m + 2, k], a[m + 3, k]
            for p in range(length):
                v = bk[p]
                c0[p] += a0 * v
                c1[p] += a1 * v
                c2[p] += a2 * v
                c3[p] += a3 * v
    for m in range(M4, M):
        cm = c[m, :length]
        for k in range(K):
            bk = src[offsets[k] : offsets[k] + length]
            am = a[m, k]
            for p in range(length):
                cm[p] += am * bk[p]


@njit(cache=True, fastmath=_FASTMATH)
def _gemm_nt(a, src, offsets, length, c):
    """c (M, N) += a[:, :length] @ B^T, row n of B being ``src[offsets[n]:offsets[n]+length]``.

    Dot products over ``length``, blocked 4 rows of ``a`` x 4 rows of B: 16 running sums
    (vector registers, thanks to reassociation) and 8 loads per 16 FMAs (measured 1.3-1.5x
    faster than 2 x 4).
    """
    M = a.shape[0]
    N = c.shape[1]
    M4 = M - M % 4
    N4 = N - N % 4
    for m in range(0, M4, 4):
        r0, r1 = a[m, :length], a[m + 1, :length]
        r2, r3 = a[m + 2, :length], a[m + 3, :length]
        for n in range(0, N4, 4):
            q0 = src[offsets[n] : offsets[n] + length]
            q1 = src[offsets[n + 1] : offsets[n + 1] + length]
            q2 = src[offsets[n + 2] : offsets[n + 2] + length]
            q3 = src[offsets[n + 3] : offsets[n + 3] + length]
            s00 = s01 = s02 = s03 = np.float32(0.0)
            s10 = s11 = s12 = s13 = np.float32(0.0)
            s20 = s21 = s22 = s23 = np.float32(0.0)
            s30 = s31 = s32 = s33 = np.float32(0.0)
            for p in range(length):
                u0, u1, u2, u3 = r0[p], r1[p], r2[p], r3[p]
                v0, v1, v2, v3 = q0[p], q1[p], q2[p], q3[p]
                s00 += u0 * v0
                s01 += u0 * v1
                s02 += u0 * v2
                s03 += u0 * v3
                s10 += u1 * v0
                s11 += u1 * v1
                s12 += u1 * v2
                s13 += u1 * v3
                s20 += u2 * v0
                s21 += u2 * v1
                s22 += u2 * v2
                s23 += u2 * v3
                s30 += u3 * v0
                s31 += u3 * v1
                s32 += u3 * v2
                s33 += u3 * v3
            c[m, n] += s00
            c[m, n + 1] += s01
            c[m, n + 2] += s02
            c[m, n + 3] += s03
            c[m + 1, n] += s10
            c[m + 1, n + 1] += s11
            c[m + 1, n + 2] += s12
            c[m + 1, n + 3] += s13
            c[m + 2, n] += s20
            c[m + 2, n + 1] += s21
            c[m + 2, n + 2] += s22
            c[m + 2, n + 3] += s23
            c[m + 3, n] += s30
            c[m + 3, n + 1] += s31
            c[m + 3, n + 2] += s32
            c[m + 3, n + 3] += s33
        for n in range(N4, N):
            qn = src[offsets[n] : offsets[n] + length]
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for p in range(length):
                v = qn[p]
                s0 += r0[p] * v
                s1 += r1[p] * v
                s2 += r2[p] * v
                s3 += r3[p] * v
            c[m, n] += s0
            c[m + 1, n] += s1
            c[m + 2, n] += s2
            c[m + 3, n] += s3
    for m in range(M4, M):
        rm = a[m, :length]
        for n in range(N):
            qn = src[offsets[n] : offsets[n] + length]
            s = np.float32(0.0)
            for p in range(length):
                s += rm[p] * qn[p]
            c[m, n] += s


@njit(cache=True)
def _stack_images(src, n0, count, dst, cstride, rows, stride, top, left, check):
    """Images n0 .. n0+count-1 of ``src``, padded, one after another in each channel's
    segment ``dst[c*cstride : (c+1)*cstride]``: tiles of ``rows`` x ``stride`` with the image
    at (top, left), zeros everywhere else (tail included), fp32.

    ``top``/``left`` may be negative (the tile then crops the image). With ``check``, returns
    whether every copied value is finite: the shifted-view products read pixels across row
    ends (their results are discarded), harmless unless 0 * inf or NaN leaks in, so callers
    fall back. Without it (the forward, where those results are only dropped), returns True.
    """
    # Zeroing each channel's segment whole and then copying the image rows measured ~2x
    # faster than writing each padded row (zeros and pixels) piece by piece.
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
                        row_nonfinite += not (abs(v) < _INF)
                    nonfinite += row_nonfinite
                else:
                    for q in range(width):
                        seg[q] = load(srow[q])
    return nonfinite == 0


@njit(cache=True)
def _image_range(t, n_threads, N):
    return t * N // n_threads, (t + 1) * N // n_threads


# --- conv2d forward / backward kernels -----------------------------------------------------------


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
                    if not (abs(v) < _INF):
                        finite = False
                    w_fk[f, k] = v
                    w_kf[k, f] = v
                    w_flip[c, (f * kh + kh - 1 - i) * kw + kw - 1 - j] = v
    return finite


@njit(cache=True)
def _store_rows(acc, col0, row_stride, dst, rows, cols, bias, relu):
    """dst (M, rows, cols) <- acc[m, col0 + r*row_stride + s] (+ bias[m], then ReLU if asked),
    written in dst's dtype."""
    for m in range(dst.shape[0]):
        bm = bias[m]
        for r in range(rows):
            src = acc[m, col0 + r * row_stride : col0 + r * row_stride + cols]
            out = dst[m, r]
            if relu:
                for s in range(cols):
                    v = src[s] + bm
                    # ``not v < 0`` keeps NaN (a plain max would turn it into 0).
                    out[s] = store_value(out, v if not v < 0.0 else np.float32(0.0))
            else:
                for s in range(cols):
                    out[s] = store_value(out, src[s] + bm)


# The per-thread work lives in serial functions called from a thin ``prange`` over threads:
# inlined into the parallel region the same loops measured 2x slower (LLVM lost the
# vectorisation-friendly shape of the outlined parfor body).
#
# Two paths (chosen per shape in Python, see ``_plan``):
# * direct (stride 1): the padded image's shifted views are the GEMM's B rows, no unfolding;
#   one image at a time, rows of length ~OH*(W+2*pw).
# * unfolded: ``nb`` images unfolded side by side into a (K, nb*OH*OW) column matrix, so that
#   small images still give long, vectorisable GEMM rows. Any stride.


@njit(cache=True, fastmath=_FASTMATH)
def _forward_images(
    x, lo, hi, w_fk, bias, relu, y, buf, acc, offsets, direct, nb, rows, stride, cstride,
    kh, kw, sh, sw, ph, pw, OH, OW,
):  # fmt: skip
    P = OH * OW
    L = nb * P
    if direct:
        tile = rows * stride
        for n0 in range(lo, hi, nb):
            count = min(nb, hi - n0)
            _stack_images(x, n0, count, buf, cstride, rows, stride, ph, pw, False)
            acc[:] = 0.0
            _gemm_nn(w_fk, buf, offsets, (count - 1) * tile + (OH - 1) * stride + OW, acc)
            for b in range(count):
                _store_rows(acc, b * tile, stride, y[n0 + b], OH, OW, bias, relu)
        return
    for n0 in range(lo, hi, nb):
        count = min(nb, hi - n0)
        for b in range(count):
            _unfold_image(x, n0 + b, buf, L, b * P, kh, kw, sh, sw, ph, pw, OH, OW)
        acc[:] = 0.0
        _gemm_nn(w_fk, buf, offsets, count * P, acc)
        for b in range(count):
            _store_rows(acc, b * P, OW, y[n0 + b], OH, OW, bias, relu)


@njit(cache=True, parallel=True)
def _conv_forward_kernel(
    x, w_fk, bias, relu, y, buf_ws, acc_ws, offsets, direct, nb, rows, stride, cstride,
    kh, kw, sh, sw, ph, pw, OH, OW,
):  # fmt: skip
    n_threads = buf_ws.shape[0]
    for t in prange(n_threads):
        lo, hi = _image_range(t, n_threads, x.shape[0])
        _forward_images(
            x, lo, hi, w_fk, bias, relu, y, buf_ws[t], acc_ws[t], offsets, direct, nb,
            rows, stride, cstride, kh, kw, sh, sw, ph, pw, OH, OW,
        )  # fmt: skip


@njit(cache=True, fastmath=_FASTMATH)
def _backward_unfolded(
    dy, x, n0, count, nb, w_kf, need_dx, dw_t, dx, col, dcol, dyn, dx_acc, kh, kw, sh, sw, ph, pw
):
    """Images n0 .. n0+count-1 through the unfolded column matrix: any stride, any values."""
    F, OH, OW = dy.shape[1], dy.shape[2], dy.shape[3]
    C = x.shape[1]
    K = C * kh * kw
    P = OH * OW
    L = nb * P
    for b in range(count):
        src = dy[n0 + b]
        for f in range(F):
            dst = dyn[f * L + b * P : f * L + (b + 1) * P]
            src_f = src[f].ravel()
            for p in range(P):
                dst[p] = load(src_f[p])
        _unfold_image(x, n0 + b, col, L, b * P, kh, kw, sh, sw, ph, pw, OH, OW)
    _gemm_nt(dyn[: F * L].reshape((F, L)), col, np.arange(K) * L, count * P, dw_t)
    if not need_dx:
        return
    dcol[: K * L] = 0.0
    dcol2 = dcol[: K * L].reshape((K, L))
    _gemm_nn(w_kf, dyn, np.arange(F) * L, count * P, dcol2)
    for b in range(count):
        _fold_image(dcol, L, b * P, dx_acc, kh, kw, sh, sw, ph, pw, OH, OW)
        out = dx[n0 + b].ravel()
        flat = dx_acc.ravel()
        for q in range(out.size):
            out[q] = store_value(out, flat[q])


@njit(cache=True, fastmath=_FASTMATH)
def _backward_images(
    dy, x, lo, hi, w_kf, w_flip, direct, nb, need_dx, dx, dw_t, db_t, xbuf, dybuf, acc, col,
    dcol, dyn, dx_acc, offs_x, offs_dy, x_layout, dy_layout, kh, kw, sh, sw, ph, pw,
):  # fmt: skip
    F, OH, OW = dy.shape[1], dy.shape[2], dy.shape[3]
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    x_rows, x_stride, x_cstride = x_layout
    # dy padded by (kh-1-ph, kw-1-pw): the full convolution that gives dx.
    d_rows, d_stride, d_cstride = dy_layout
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
    if not direct:
        for n0 in range(lo, hi, nb):
            count = min(nb, hi - n0)
            _backward_unfolded(
                dy, x, n0, count, nb, w_kf, need_dx, dw_t, dx, col, dcol, dyn, dx_acc,
                kh, kw, sh, sw, ph, pw,
            )  # fmt: skip
        return
    no_bias = np.zeros(C, np.float32)
    x_tile, dy_tile = x_rows * x_stride, d_rows * d_stride
    for n0 in range(lo, hi, nb):
        count = min(nb, hi - n0)
        if need_dx:
            # dx: a stride-1 convolution of dy, fully padded, with the flipped, transposed
            # filters.
            _stack_images(
                dy, n0, count, dybuf, d_cstride, d_rows, d_stride, kh - 1 - ph, kw - 1 - pw, False
            )
            acc[:] = 0.0
            _gemm_nn(w_flip, dybuf, offs_dy, (count - 1) * dy_tile + (H - 1) * d_stride + W, acc)
            for b in range(count):
                _store_rows(acc, b * dy_tile, d_stride, dx[n0 + b], H, W, no_bias, False)
        if _stack_images(x, n0, count, xbuf, x_cstride, x_rows, x_stride, ph, pw, True):
            # dy laid out like the padded images (zeros past OH, OW), so that dW[f, (c,i,j)]
            # is a dot product with the (i, j)-shifted view of the images.
            _stack_images(dy, n0, count, dyn, x_cstride, x_rows, x_stride, 0, 0, False)
            a = dyn[: F * x_cstride].reshape((F, x_cstride))
            length = (count - 1) * x_tile + (OH - 1) * x_stride + OW
            _gemm_nt(a, xbuf, offs_x, length, dw_t)
        else:
            # inf/NaN in x: the shifted views would also pair it with the zeros between
            # rows and images (0 * inf = NaN); the unfolded path pairs only true windows.
            # It rewrites dx with the same values.
            for b in range(count):
                _backward_unfolded(
                    dy, x, n0 + b, 1, 1, w_kf, need_dx, dw_t, dx, col, dcol, dyn, dx_acc,
                    kh, kw, sh, sw, ph, pw,
                )  # fmt: skip


@njit(cache=True, parallel=True)
def _conv_backward_kernel(
    dy, x, w_kf, w_flip, direct, nb, need_dx, dx, dw_part, db_part, xbuf, dybuf, acc, col,
    dcol, dyn, dx_acc, offs_x, offs_dy, x_layout, dy_layout, kh, kw, sh, sw, ph, pw,
):  # fmt: skip
    n_threads = dw_part.shape[0]
    for t in prange(n_threads):
        lo, hi = _image_range(t, n_threads, x.shape[0])
        _backward_images(
            dy, x, lo, hi, w_kf, w_flip, direct, nb, need_dx, dx, dw_part[t], db_part[t], xbuf[t],
            dybuf[t], acc[t], col[t], dcol[t], dyn[t], dx_acc[t], offs_x, offs_dy,
            x_layout, dy_layout, kh, kw, sh, sw, ph, pw,
        )  # fmt: skip


@njit(cache=True, fastmath=_FASTMATH)
def _reduce_partials(dw_part, db_part, dw, db):
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


# --- workspaces -------------------------------------------------------------------------------

# GEMM rows (accumulators, stacked planes) start on 64-byte boundaries: unaligned AVX-512
# loads and stores of the accumulator rows cost up to 25% of the product's speed (8x8 layers).
_ALIGN = 16  # float32 values per 64 bytes


def _round_up(n, multiple=_ALIGN):
    return -(-n // multiple) * multiple


def _aligned_empty(shape):
    """Uninitialised float32 array whose data starts on a 64-byte boundary (rows whose length
    is a multiple of ``_ALIGN`` then all start on one)."""
    size = int(np.prod(shape))
    raw = np.empty(size + _ALIGN, np.float32)
    skip = (-raw.ctypes.data // 4) % _ALIGN
    return raw[skip : skip + size].reshape(shape)


def _threads(N):
    return max(1, min(numba.get_num_threads(), N))


def _tap_offsets(C, kh, kw, plane, row):
    """Flat offsets of the (c, i, j) taps in a stack of C planes of size ``plane``."""
    c = np.arange(C, dtype=np.int64)[:, None, None] * plane
    i = np.arange(kh, dtype=np.int64)[None, :, None] * row
    j = np.arange(kw, dtype=np.int64)[None, None, :]
    return (c + i + j).ravel()


def _packed_weights(w):
    F, C, kh, kw = w.shape
    K = C * kh * kw
    w_fk = np.empty((F, K), np.float32)
    w_kf = np.empty((K, F), np.float32)
    w_flip = np.empty((C, F * kh * kw), np.float32)
    finite = _pack_weights(bits_view(w), w_fk, w_kf, w_flip)
    return w_fk, w_kf, w_flip, finite


# Images per GEMM: stack until a row of the product holds about this many values (long
# vectorised rows, few passes over the weights). 1024 measured best among 256..2048 on the
# deep-MNIST layers (5-10% over 512); the stacked images of one block stay within L2.
_TARGET_COLUMNS = 1024


def _stack_layout(rows, cols, ph, pw, kh, kw, nb):
    """(tile rows, row stride, channel stride) of ``nb`` padded images stacked per channel.

    When 0 <= pad <= kernel-1, neighbouring rows and images share their zero padding: a row
    is [pw zeros, cols pixels] and the next row's zeros act as its right padding, and
    likewise between images, with a zero tail after the last one. That trims the extra
    outputs the direct path computes (8x8 pad 1: 81 instead of 100 per 64 outputs).
    Otherwise (negative pad: a crop; or a pad beyond kernel-1) each image gets a full tile.
    The channel stride is a multiple of ``_ALIGN``, so that every channel starts aligned
    (and dy stacked this way gives aligned GEMM rows); the extra tail is zeros.
    """
    if 0 <= ph <= kh - 1 and 0 <= pw <= kw - 1:
        t_rows, stride = rows + ph, cols + pw
        return t_rows, stride, _round_up(nb * t_rows * stride + ph * stride + pw)
    t_rows, stride = rows + 2 * ph, cols + 2 * pw
    return t_rows, stride, _round_up(nb * t_rows * stride)


def _plan(g, F, backward):
    """(direct, nb): which path a shape takes, and how many images go into one GEMM.

    Measured on the deep-MNIST layers (docs/kernels.md): with images stacked, the direct path
    (stride 1) beat the unfolded one on every layer, although it computes up to 1.3x too many
    outputs (8x8 images): unfolding writes K = C*kh*kw copies of every pixel in short row
    segments. The direct dx is a GEMM with C rows, too few to block when C < 4 (conv1: C = 1),
    where dcol = W^T @ dy with K rows is faster.
    Images are stacked until a GEMM row holds about _TARGET_COLUMNS values.
    """
    direct = g.sh == 1 and g.sw == 1 and (not backward or g.C >= 4)
    if direct:
        rows, stride, _ = _stack_layout(g.H, g.W, g.ph, g.pw, g.kh, g.kw, 1)
        per_image = rows * stride
    else:
        per_image = g.OH * g.OW
    nb = max(1, min(g.N, -(-_TARGET_COLUMNS // per_image)))
    return direct, nb


def conv2d(x, w, b, g, activation):
    """Backend conv2d: ``(N, F, OH, OW)`` in ``x``'s dtype, bias and ReLU fused."""
    F = w.shape[0]
    K, P = g.C * g.kh * g.kw, g.OH * g.OW
    nt = _threads(g.N)
    direct, nb = _plan(g, F, backward=False)
    rows, stride, cstride = _stack_layout(g.H, g.W, g.ph, g.pw, g.kh, g.kw, nb)
    if direct:
        buf_len, acc_len = g.C * cstride, _round_up(nb * rows * stride)
        offsets = _tap_offsets(g.C, g.kh, g.kw, cstride, stride)
    else:
        buf_len, acc_len = K * nb * P, _round_up(nb * P)
        offsets = np.arange(K, dtype=np.int64) * (nb * P)
    w_fk, _, _, _ = _packed_weights(w)
    bias = np.zeros(F, np.float32)
    if b is not None:
        bias[:] = b  # F values: the epilogue adds them in fp32
    y = np.empty((g.N, F, g.OH, g.OW), dtype=x.dtype)
    with checkout(
        ("fwd", buf_len, acc_len, F, nt),
        lambda: (_aligned_empty((nt, buf_len)), _aligned_empty((nt, F, acc_len))),
    ) as (buf, acc):
        _conv_forward_kernel(
            bits_view(x), w_fk, bias, activation == "relu", bits_view(y), buf, acc, offsets,
            direct, nb, rows, stride, cstride, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.OH, g.OW,
        )  # fmt: skip
    return y


def conv2d_backward(dy, x, w, g, need_dx=True):
    """Backend conv2d gradients ``(dx, dw, db)``, each in ``x``'s dtype; ``dx`` is None (and
    not computed) when ``need_dx`` is False."""
    F = w.shape[0]
    K, P = g.C * g.kh * g.kw, g.OH * g.OW
    nt = _threads(g.N)
    direct, nb = _plan(g, F, backward=True)
    _, w_kf, w_flip, finite_w = _packed_weights(w)
    # Non-finite weights would leak through the zero padding of dy on the direct dx path.
    direct = direct and finite_w
    x_layout = _stack_layout(g.H, g.W, g.ph, g.pw, g.kh, g.kw, nb)
    dy_layout = _stack_layout(g.OH, g.OW, g.kh - 1 - g.ph, g.kw - 1 - g.pw, g.kh, g.kw, nb)
    # The unfolded path's buffers also serve the direct path, one image at a time, for
    # images with non-finite values.
    L = P if direct else nb * P
    shapes = (
        (g.C * x_layout[2],) if direct else (1,),  # stacked padded images
        (F * dy_layout[2],) if direct else (1,),  # stacked padded dy for dx
        (g.C, _round_up(nb * dy_layout[0] * dy_layout[1])) if direct else (1, 1),  # dx accumulator
        (K * L,),  # unfolded images
        (K * L,),  # their gradient
        (F * max(L, x_layout[2] if direct else 0),),  # dy in fp32
        (g.C, g.H, g.W),  # folded dx of one image
    )
    offs_x = _tap_offsets(g.C, g.kh, g.kw, x_layout[2], x_layout[1])
    offs_dy = _tap_offsets(F, g.kh, g.kw, dy_layout[2], dy_layout[1])
    # Without dx the kernel never touches it: a 1-element stand-in keeps the signature typed.
    dx = np.empty(g.x_shape if need_dx else (1, 1, 1, 1), dtype=x.dtype)
    dw = np.empty(w.shape, dtype=x.dtype)
    db = np.empty(F, dtype=x.dtype)
    with checkout(
        ("bwd", F, direct, nb, *g, nt),
        lambda: (
            tuple(_aligned_empty((nt, *s)) for s in shapes)
            + (np.empty((nt, F, K), np.float32), np.empty((nt, F), np.float32))
        ),
    ) as ws:
        *buffers, dw_part, db_part = ws
        _conv_backward_kernel(
            bits_view(dy), bits_view(x), w_kf, w_flip, direct, nb, need_dx, bits_view(dx),
            dw_part, db_part, *buffers, offs_x, offs_dy, x_layout, dy_layout,
            g.kh, g.kw, g.sh, g.sw, g.ph, g.pw,
        )  # fmt: skip
        _reduce_partials(dw_part, db_part, bits_view(dw), bits_view(db))
    return (dx if need_dx else None), dw, db
