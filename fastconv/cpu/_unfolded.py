"""The unfolded (im2col-GEMM) convolution path: any stride, any values.

Per block of ``nb`` images, the Caffe layout ``col (K = C*kh*kw, nb*OH*OW)`` in a per-thread
float32 workspace, then ``y = W @ col``; backward ``dW += dy @ col^T``, ``dcol = W^T @ dy`` and a
per-image fold (one thread per image: deterministic). The direct path falls back to it image by
image where non-finite values would leak through its shared padding.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._gemm import FASTMATH, gemm_nn, gemm_nt
from ._half import load, store_value
from ._layout import store_rows
from ._matmul import gemm_offsets

__all__ = ["valid_range", "unfold_image", "fold_image", "forward_block", "backward_block"]


@njit(cache=True)
def valid_range(in_size, out_size, stride, pad, offset):
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


@njit(cache=True)
def unfold_image(x, n, col, L, col0, g):
    """Windows of image ``n`` of ``x`` (float32 or half bits) into a flat fp32 column matrix:
    row k = (c, i, j) starts at ``k*L``, this image's OH*OW columns at ``col0``.
    """
    # Inner loops index slices from 0: Numba then needs no negative-index wraparound and
    # LLVM vectorises the copies (offset indices measured 5x slower).
    kh, kw, sh, sw, ph, pw, OH, OW = g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.OH, g.OW
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    P = OH * OW
    for c in range(C):
        for i in range(kh):
            oh_lo, oh_hi = valid_range(H, OH, sh, ph, i)
            for j in range(kw):
                k = (c * kh + i) * kw + j
                row = col[k * L + col0 : k * L + col0 + P]
                ow_lo, ow_hi = valid_range(W, OW, sw, pw, j)
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
def fold_image(dcol, L, col0, dx_acc, g):
    """dx_acc (C, H, W) fp32 <- sum of one image's window contributions, the adjoint of
    :func:`unfold_image` (same flat layout). Runs on one thread for one image, so the
    accumulation order is fixed (deterministic).
    """
    kh, kw, sh, sw, ph, pw, OH, OW = g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.OH, g.OW
    C, H, W = dx_acc.shape
    dx_acc[:] = 0.0
    for c in range(C):
        for i in range(kh):
            oh_lo, oh_hi = valid_range(H, OH, sh, ph, i)
            for j in range(kw):
                k = (c * kh + i) * kw + j
                base = k * L + col0
                ow_lo, ow_hi = valid_range(W, OW, sw, pw, j)
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


@njit(cache=True, fastmath=FASTMATH)
def forward_block(x, n0, count, nb, w_fk, wp, packed, offsets, bias, relu, y, buf, acc, bp, cbuf,
                  g):  # fmt: skip
    """y[n0 : n0+count] through the column matrix ``buf`` (K rows of nb*OH*OW) and the
    float32 product ``acc`` (F rows): ``w_fk @ buf``, or with ``packed`` the filters ``wp``
    by :func:`~fastconv.cpu._matmul.gemm_offsets` (``bp``/``cbuf`` its scratch)."""
    P = g.OH * g.OW
    L = nb * P
    for b in range(count):
        unfold_image(x, n0 + b, buf, L, b * P, g)
    if packed:
        gemm_offsets(wp, buf, offsets, count * P, acc, bp, cbuf)
    else:
        acc[:] = 0.0
        gemm_nn(w_fk, buf, offsets, count * P, acc)
    for b in range(count):
        store_rows(acc, b * P, g.OW, y[n0 + b], g.OH, g.OW, bias, relu)


@njit(cache=True, fastmath=FASTMATH)
def backward_block(dy, x, n0, count, nb, w_kf, need_dx, dw_t, dx, col, dcol, dyn, dx_acc, g):
    """Images n0 .. n0+count-1 through the unfolded column matrix: accumulates their dW into
    ``dw_t`` (F, K) and writes their dx (when ``need_dx``); any stride, any values."""
    F, OH, OW = dy.shape[1], dy.shape[2], dy.shape[3]
    C = x.shape[1]
    K = C * g.kh * g.kw
    P = OH * OW
    L = nb * P
    for b in range(count):
        src = dy[n0 + b]
        for f in range(F):
            dst = dyn[f * L + b * P : f * L + (b + 1) * P]
            src_f = src[f].ravel()
            for p in range(P):
                dst[p] = load(src_f[p])
        unfold_image(x, n0 + b, col, L, b * P, g)
    gemm_nt(dyn[: F * L].reshape((F, L)), col, np.arange(K) * L, count * P, dw_t)
    if not need_dx:
        return
    dcol[: K * L] = 0.0
    dcol2 = dcol[: K * L].reshape((K, L))
    gemm_nn(w_kf, dyn, np.arange(F) * L, count * P, dcol2)
    for b in range(count):
        fold_image(dcol, L, b * P, dx_acc, g)
        out = dx[n0 + b].ravel()
        flat = dx_acc.ravel()
        for q in range(out.size):
            out[q] = store_value(out, flat[q])
