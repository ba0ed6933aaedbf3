"""CPU convolution kernels in Numba: im2col/col2im and conv2d forward/backward.

Design (see ``docs/kernels.md`` for the measurements behind it):

* The public :func:`im2col` / :func:`col2im` use the book's layout, rows (n, oh, ow) and columns
  (c, i, j). Convolution does not go through them: a whole-batch column matrix is tens of MB
  and writing it alone costs more than PyTorch's whole layer.
* Convolution works image by image, each thread owning a contiguous range of images and its
  own fp32 workspaces (reused across calls). Per image it unfolds the "Caffe" layout
  ``col`` (K = C*kh*kw, P = OH*OW), small enough to stay in L2, and multiplies:
  forward ``y[n] (F, P) = W (F, K) @ col``, already NCHW, with bias and ReLU fused in the
  epilogue; backward ``dW += dy[n] @ col^T`` into a per-thread partial sum (reduced at the
  end, so no write races), ``dcol = W^T @ dy[n]`` folded back into ``dx[n]``.
* The matrix products are register-blocked loops whose innermost loop runs over a contiguous
  row so that LLVM vectorises it (AVX-512 where available).
* float16 arrays are read and written as uint16 bits through :mod:`fastconv.cpu._half`;
  everything is computed and accumulated in float32.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ._half import bits_view, load, store_value

__all__ = ["im2col", "col2im", "conv2d", "conv2d_backward"]

# Reassociation lets LLVM vectorise the reductions; never nnan/ninf: NaN must propagate.
_FASTMATH = {"contract", "reassoc", "arcp", "nsz"}


# --- index helpers ------------------------------------------------------------------------------


@njit(cache=True, inline="always")
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
    N, C, H, W = x.shape
    for row_block in prange(N * OH):
        n = row_block // OH
        oh = row_block - n * OH
        for c in range(C):
            for i in range(kh):
                ih = oh * sh - ph + i
                inside_h = 0 <= ih < H
                for j in range(kw):
                    k = (c * kh + i) * kw + j
                    lo, hi = _valid_range(W, OW, sw, pw, j)
                    if not inside_h:
                        lo = hi = 0
                    base = row_block * OW
                    for ow in range(0, lo):
                        out[base + ow, k] = 0
                    for ow in range(lo, hi):
                        out[base + ow, k] = x[n, c, ih, ow * sw - pw + j]
                    for ow in range(hi, OW):
                        out[base + ow, k] = 0


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


@njit(cache=True, inline="always")
def _unfold_image(x, n, col, kh, kw, sh, sw, ph, pw, OH, OW):
    """col (C*kh*kw, OH*OW) fp32 <- windows of image ``n`` of ``x`` (float32 or half bits)."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    for c in range(C):
        for i in range(kh):
            oh_lo, oh_hi = _valid_range(H, OH, sh, ph, i)
            for j in range(kw):
                row = col[(c * kh + i) * kw + j]
                ow_lo, ow_hi = _valid_range(W, OW, sw, pw, j)
                for p in range(0, oh_lo * OW):
                    row[p] = 0.0
                for oh in range(oh_lo, oh_hi):
                    ih = oh * sh - ph + i
                    base = oh * OW
                    for ow in range(0, ow_lo):
                        row[base + ow] = 0.0
                    if sw == 1:
                        src = ow_lo - pw + j
                        for ow in range(ow_lo, ow_hi):
                            row[base + ow] = load(x[n, c, ih, src + ow - ow_lo])
                    else:
                        for ow in range(ow_lo, ow_hi):
                            row[base + ow] = load(x[n, c, ih, ow * sw - pw + j])
                    for ow in range(ow_hi, OW):
                        row[base + ow] = 0.0
                for p in range(oh_hi * OW, OH * OW):
                    row[p] = 0.0


@njit(cache=True, inline="always")
def _fold_image(dcol, dx_acc, kh, kw, sh, sw, ph, pw, OH, OW):
    """dx_acc (C, H, W) fp32 <- sum of the window contributions in dcol (C*kh*kw, OH*OW).

    Runs on one thread for one image, so the accumulation order is fixed (deterministic).
    """
    C, H, W = dx_acc.shape
    dx_acc[:] = 0.0
    for c in range(C):
        for i in range(kh):
            oh_lo, oh_hi = _valid_range(H, OH, sh, ph, i)
            for j in range(kw):
                row = dcol[(c * kh + i) * kw + j]
                ow_lo, ow_hi = _valid_range(W, OW, sw, pw, j)
                for oh in range(oh_lo, oh_hi):
                    dst = dx_acc[c, oh * sh - ph + i]
                    base = oh * OW
                    if sw == 1:
                        shift = j - pw
                        for ow in range(ow_lo, ow_hi):
                            dst[ow + shift] += row[base + ow]
                    else:
                        for ow in range(ow_lo, ow_hi):
                            dst[ow * sw - pw + j] += row[base + ow]


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _gemm_nn(a, b, c):
    """c (M, P) += a (M, K) @ b (K, P), all fp32 C-contiguous.

    Blocked 4 rows of ``c`` x 4 rows of ``b``: each pass over a row of length P does 16 FMAs
    per 8 loads and 4 stores, and the contiguous P loop vectorises.
    """
    M, K = a.shape
    P = b.shape[1]
    M4 = M - M % 4
    K4 = K - K % 4
    for m in range(0, M4, 4):
        c0, c1, c2, c3 = c[m], c[m + 1], c[m + 2], c[m + 3]
        for k in range(0, K4, 4):
            b0, b1, b2, b3 = b[k], b[k + 1], b[k + 2], b[k + 3]
            a00, a01, a02, a03 = a[m, k], a[m, k + 1], a[m, k + 2], a[m, k + 3]
            a10, a11, a12, a13 = a[m + 1, k], a[m + 1, k + 1], a[m + 1, k + 2], a[m + 1, k + 3]
            a20, a21, a22, a23 = a[m + 2, k], a[m + 2, k + 1], a[m + 2, k + 2], a[m + 2, k + 3]
            a30, a31, a32, a33 = a[m + 3, k], a[m + 3, k + 1], a[m + 3, k + 2], a[m + 3, k + 3]
            for p in range(P):
                v0, v1, v2, v3 = b0[p], b1[p], b2[p], b3[p]
                c0[p] += a00 * v0 + a01 * v1 + a02 * v2 + a03 * v3
                c1[p] += a10 * v0 + a11 * v1 + a12 * v2 + a13 * v3
                c2[p] += a20 * v0 + a21 * v1 + a22 * v2 + a23 * v3
                c3[p] += a30 * v0 + a31 * v1 + a32 * v2 + a33 * v3
        for k in range(K4, K):
            bk = b[k]
            a0, a1, a2, a3 = a[m, k], a[m + 1, k], a[m + 2, k], a[m + 3, k]
            for p in range(P):
                v = bk[p]
                c0[p] += a0 * v
                c1[p] += a1 * v
                c2[p] += a2 * v
                c3[p] += a3 * v
    for m in range(M4, M):
        cm = c[m]
        for k in range(K):
            bk = b[k]
            am = a[m, k]
            for p in range(P):
                cm[p] += am * bk[p]


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _gemm_nt(a, b, c):
    """c (M, N) += a (M, P) @ b (N, P)^T, all fp32 C-contiguous: dot products over P.

    Blocked 2 rows of ``a`` x 4 rows of ``b`` (8 running sums, 6 loads per 8 FMAs).
    """
    M, P = a.shape
    N = b.shape[0]
    M2 = M - M % 2
    N4 = N - N % 4
    for m in range(0, M2, 2):
        r0, r1 = a[m], a[m + 1]
        for n in range(0, N4, 4):
            q0, q1, q2, q3 = b[n], b[n + 1], b[n + 2], b[n + 3]
            s00 = s01 = s02 = s03 = np.float32(0.0)
            s10 = s11 = s12 = s13 = np.float32(0.0)
            for p in range(P):
                u0, u1 = r0[p], r1[p]
                v0, v1, v2, v3 = q0[p], q1[p], q2[p], q3[p]
                s00 += u0 * v0
                s01 += u0 * v1
                s02 += u0 * v2
                s03 += u0 * v3
                s10 += u1 * v0
                s11 += u1 * v1
                s12 += u1 * v2
                s13 += u1 * v3
            c[m, n] += s00
            c[m, n + 1] += s01
            c[m, n + 2] += s02
            c[m, n + 3] += s03
            c[m + 1, n] += s10
            c[m + 1, n + 1] += s11
            c[m + 1, n + 2] += s12
            c[m + 1, n + 3] += s13
        for n in range(N4, N):
            qn = b[n]
            s0 = s1 = np.float32(0.0)
            for p in range(P):
                s0 += r0[p] * qn[p]
                s1 += r1[p] * qn[p]
            c[m, n] += s0
            c[m + 1, n] += s1
    for m in range(M2, M):
        rm = a[m]
        for n in range(N):
            qn = b[n]
            s = np.float32(0.0)
            for p in range(P):
                s += rm[p] * qn[p]
            c[m, n] += s


@njit(cache=True, inline="always")
def _image_range(t, n_threads, N):
    return t * N // n_threads, (t + 1) * N // n_threads


# --- conv2d forward / backward kernels -----------------------------------------------------------


@njit(cache=True)
def _pack_weights(w, w_fk, w_kf):
    """fp32 copies of the filters as (F, K) and its transpose (K, F), the GEMM operands."""
    F, C, kh, kw = w.shape
    for f in range(F):
        for c in range(C):
            for i in range(kh):
                for j in range(kw):
                    k = (c * kh + i) * kw + j
                    v = load(w[f, c, i, j])
                    w_fk[f, k] = v
                    w_kf[k, f] = v


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def _conv_forward_kernel(x, w_fk, bias, relu, y, col_ws, acc_ws, kh, kw, sh, sw, ph, pw, OH, OW):
    N = x.shape[0]
    F = y.shape[1]
    P = OH * OW
    n_threads = col_ws.shape[0]
    for t in prange(n_threads):
        col = col_ws[t]
        acc = acc_ws[t]
        lo, hi = _image_range(t, n_threads, N)
        for n in range(lo, hi):
            _unfold_image(x, n, col, kh, kw, sh, sw, ph, pw, OH, OW)
            acc[:] = 0.0
            _gemm_nn(w_fk, col, acc)
            yn = y[n].reshape((F, P))
            for f in range(F):
                bf = bias[f]
                src = acc[f]
                dst = yn[f]
                if relu:
                    for p in range(P):
                        v = src[p] + bf
                        # ``not v < 0`` keeps NaN (a plain max would turn it into 0).
                        dst[p] = store_value(dst, v if not v < 0.0 else np.float32(0.0))
                else:
                    for p in range(P):
                        dst[p] = store_value(dst, src[p] + bf)


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def _conv_backward_kernel(
    dy, x, w_kf, dx, dw_part, db_part, col_ws, dcol_ws, dy_ws, dx_ws, kh, kw, sh, sw, ph, pw
):
    N, F, OH, OW = dy.shape
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    P = OH * OW
    n_threads = col_ws.shape[0]
    for t in prange(n_threads):
        col = col_ws[t]
        dcol = dcol_ws[t]
        dyn = dy_ws[t]
        dx_acc = dx_ws[t]
        dw_t = dw_part[t]
        db_t = db_part[t]
        dw_t[:] = 0.0
        db_t[:] = 0.0
        lo, hi = _image_range(t, n_threads, N)
        for n in range(lo, hi):
            src = dy[n].reshape((F, P))
            for f in range(F):
                s = np.float32(0.0)
                for p in range(P):
                    v = load(src[f, p])
                    dyn[f, p] = v
                    s += v
                db_t[f] += s
            _unfold_image(x, n, col, kh, kw, sh, sw, ph, pw, OH, OW)
            _gemm_nt(dyn, col, dw_t)
            dcol[:] = 0.0
            _gemm_nn(w_kf, dyn, dcol)
            _fold_image(dcol, dx_acc, kh, kw, sh, sw, ph, pw, OH, OW)
            out = dx[n]
            for c in range(C):
                for h in range(H):
                    for w_ in range(W):
                        out[c, h, w_] = store_value(out, dx_acc[c, h, w_])


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

_WORKSPACE_CACHE: dict = {}
_WORKSPACE_CACHE_SIZE = 8


def _workspace(key, make):
    """Per-thread fp32 buffers, reused across calls with the same key (shape, threads)."""
    ws = _WORKSPACE_CACHE.get(key)
    if ws is None:
        if len(_WORKSPACE_CACHE) >= _WORKSPACE_CACHE_SIZE:
            _WORKSPACE_CACHE.pop(next(iter(_WORKSPACE_CACHE)))
        ws = make()
        _WORKSPACE_CACHE[key] = ws
    return ws


def _threads(N):
    return max(1, min(numba.get_num_threads(), N))


def _packed_weights(w):
    F = w.shape[0]
    K = w.shape[1] * w.shape[2] * w.shape[3]
    w_fk = np.empty((F, K), np.float32)
    w_kf = np.empty((K, F), np.float32)
    _pack_weights(bits_view(w), w_fk, w_kf)
    return w_fk, w_kf


def conv2d(x, w, b, g, activation):
    """Backend conv2d: ``(N, F, OH, OW)`` in ``x``'s dtype, bias and ReLU fused."""
    F = w.shape[0]
    K, P = g.C * g.kh * g.kw, g.OH * g.OW
    nt = _threads(g.N)
    col_ws, acc_ws = _workspace(
        ("fwd", K, P, F, nt),
        lambda: (np.empty((nt, K, P), np.float32), np.empty((nt, F, P), np.float32)),
    )
    w_fk, _ = _packed_weights(w)
    bias = np.zeros(F, np.float32)
    if b is not None:
        bias[:] = b  # F values: the epilogue adds them in fp32
    y = np.empty((g.N, F, g.OH, g.OW), dtype=x.dtype)
    _conv_forward_kernel(
        bits_view(x), w_fk, bias, activation == "relu", bits_view(y), col_ws, acc_ws,
        g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.OH, g.OW,
    )  # fmt: skip
    return y


def conv2d_backward(dy, x, w, g):
    """Backend conv2d gradients ``(dx, dw, db)``, each in ``x``'s dtype."""
    F = w.shape[0]
    K, P = g.C * g.kh * g.kw, g.OH * g.OW
    nt = _threads(g.N)
    col_ws, dcol_ws, dy_ws, dx_ws, dw_part, db_part = _workspace(
        ("bwd", K, P, F, g.C, g.H, g.W, nt),
        lambda: (
            np.empty((nt, K, P), np.float32),
            np.empty((nt, K, P), np.float32),
            np.empty((nt, F, P), np.float32),
            np.empty((nt, g.C, g.H, g.W), np.float32),
            np.empty((nt, F, K), np.float32),
            np.empty((nt, F), np.float32),
        ),
    )
    _, w_kf = _packed_weights(w)
    dx = np.empty(g.x_shape, dtype=x.dtype)
    dw = np.empty(w.shape, dtype=x.dtype)
    db = np.empty(F, dtype=x.dtype)
    _conv_backward_kernel(
        bits_view(dy), bits_view(x), w_kf, bits_view(dx), dw_part, db_part,
        col_ws, dcol_ws, dy_ws, dx_ws, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw,
    )  # fmt: skip
    _reduce_partials(dw_part, db_part, bits_view(dw), bits_view(db))
    return dx, dw, db
