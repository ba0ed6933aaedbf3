"""Numba kernels for the Dense layer on the CPU (float32).

Why not ``x @ W`` through NumPy's BLAS: the convolution kernels run on Numba's OpenMP thread
pool, and a second pool (OpenBLAS) taking turns with it on the same cores costs far more than
these small products (100x1024x50 for the book's net: ~0.1-0.3 ms each) take, and so does waking
any pool for them on a busy machine. They therefore run serially in the calling thread.
Inputs are validated, C-contiguous float32 arrays (see ``layers.Dense``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Reassociation lets the inner loops vectorise; no nnan/ninf, so NaN and inf propagate.
_FASTMATH = {"contract", "reassoc", "arcp", "nsz"}


@njit(fastmath=_FASTMATH, cache=True)
def dense_forward(x, w, b):
    """``x @ w + b``: (M, K) @ (K, N) + (N,)."""
    M, K = x.shape
    N = w.shape[1]
    out = np.empty((M, N), dtype=np.float32)
    for i in range(M):
        acc = np.zeros(N, dtype=np.float32)
        for k in range(K):
            v = x[i, k]
            for j in range(N):
                acc[j] += v * w[k, j]
        for j in range(N):
            out[i, j] = acc[j] + b[j]
    return out


@njit(fastmath=_FASTMATH, cache=True)
def dense_grad_w(x, dy):
    """``x.T @ dy``: (M, K)^T @ (M, N) -> (K, N)."""
    M, K = x.shape
    N = dy.shape[1]
    out = np.zeros((K, N), dtype=np.float32)
    for k in range(K):
        for i in range(M):
            v = x[i, k]
            for j in range(N):
                out[k, j] += v * dy[i, j]
    return out


@njit(fastmath=_FASTMATH, cache=True)
def dense_grad_x(dy, w):
    """``dy @ w.T``: (M, N) @ (K, N)^T -> (M, K)."""
    M, N = dy.shape
    K = w.shape[0]
    out = np.empty((M, K), dtype=np.float32)
    for i in range(M):
        for k in range(K):
            s = np.float32(0.0)
            for j in range(N):
                s += dy[i, j] * w[k, j]
            out[i, k] = s
    return out
