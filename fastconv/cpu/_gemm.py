"""GEMM micro-kernels of the CPU convolutions, plain Numba loops that LLVM vectorises.

B is never materialised: its rows are slices of one flat float32 buffer at given offsets (an
unfolded column matrix, the shifted views of stacked padded images, or Winograd-transformed
tiles), which is what makes the direct path possible. The innermost loop of each product runs
over a contiguous row so that it vectorises (AVX-512 where available); measurements of the
blockings are in docs/kernels.md ("Optimisation log, conv layers", entries 5 and 8).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["FASTMATH", "INF", "gemm_nn", "gemm_nt"]

# Reassociation lets LLVM vectorise the reductions; never nnan/ninf: NaN must propagate.
FASTMATH = {"contract", "reassoc", "arcp", "nsz"}
INF = np.float32(np.inf)
_FASTMATH = FASTMATH


@njit(cache=True, fastmath=_FASTMATH)
def gemm_nn(a, src, offsets, length, c):
    """c[:, :length] += a (M, K) @ B, where row k of B is ``src[offsets[k]:offsets[k]+length]``.

    B is never materialised: its rows are slices of one flat fp32 buffer, either an unfolded
    column matrix (offsets k*P) or a padded image whose shifted views are the kernel taps
    (offsets c*Hp*Wp + i*Wp + j). Blocked 8 rows of ``c`` x 4 rows of B: each pass over a row
    does 32 FMAs per 12 loads and 8 stores, and the contiguous inner loop vectorises. With
    64-byte aligned rows of ``c``, 8x4 made the deep-MNIST forward passes 13-20% faster than
    4x8 (idle machine, one thread); the rows left over (M % 8) go through the 4x8 blocking of
    :func:`gemm_nn_rows`.
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
    gemm_nn_rows(a, src, offsets, length, c, M8)


@njit(cache=True, fastmath=_FASTMATH)
def gemm_nn_rows(a, src, offsets, length, c, m_start):
    """Rows ``m_start:`` of :func:`gemm_nn`, blocked 4 rows of ``c`` x 8 rows of B."""
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
def gemm_nt(a, src, offsets, length, c):
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
