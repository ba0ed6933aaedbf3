"""Dense (fully connected) layer kernels on the CPU: float32 and float16 (as uint16 bits).

``y = act(x @ w + b)`` with ``x (M, K)``, ``w (K, N)`` (Keras layout), and the three products of
the backward pass. Why not ``x @ w`` through NumPy's BLAS: the convolution kernels run on
Numba's thread pool, and a second pool (OpenBLAS) taking turns with it on the same cores costs
far more than these small products (100x1024x50 for the book's net) take: measured here, a
0.07 ms BLAS call took 3-25 ms right after a Numba parallel region. These kernels run on
Numba's own pool instead, each task owning a block of 4 output rows (no write races, and each
output element summed by one thread in a fixed order: deterministic), with the 4 rows' updates
sharing every load of the other operand. On the idle 2-core machine the three products of the
book's first Dense layer take 0.43 ms together, against 1.17 ms for the serial loops they
replaced. float16 operands are converted in registers as they are loaded and every product is
accumulated in float32 (one rounding to half on store); bias and ReLU are fused into the
forward's store.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._half import bits_view, load, store_value

__all__ = ["dense_forward", "dense_backward"]

# Reassociation lets the inner loops vectorise; no nnan/ninf, so NaN and inf propagate.
_FASTMATH = {"contract", "reassoc", "arcp", "nsz"}
_ROWS = 4  # output rows per task: enough reuse of each loaded row, enough tasks for 2+ threads


# Each prange body only calls a block function (compiled once, not inlined): Numba's parfor
# passes then see a few lines, which keeps the compile time of these kernels down.


@njit(fastmath=_FASTMATH, cache=True)
def _forward_block(x, w, b, out, relu, i0):
    M, K = x.shape
    N = w.shape[1]
    rows = min(_ROWS, M - i0)
    acc = np.zeros((_ROWS, N), dtype=np.float32)
    if rows == _ROWS:
        for k in range(K):
            v0, v1 = load(x[i0, k]), load(x[i0 + 1, k])
            v2, v3 = load(x[i0 + 2, k]), load(x[i0 + 3, k])
            wk = w[k]
            for j in range(N):
                wkj = load(wk[j])
                acc[0, j] += v0 * wkj
                acc[1, j] += v1 * wkj
                acc[2, j] += v2 * wkj
                acc[3, j] += v3 * wkj
    else:
        for r in range(rows):
            for k in range(K):
                v = load(x[i0 + r, k])
                wk = w[k]
                for j in range(N):
                    acc[r, j] += v * load(wk[j])
    for r in range(rows):
        o = out[i0 + r]
        for j in range(N):
            v = acc[r, j] + load(b[j])
            if relu and v < np.float32(0.0):  # False for NaN: NaN propagates
                v = np.float32(0.0)
            o[j] = store_value(o, v)


@njit(cache=True, parallel=True)
def _forward(x, w, b, out, relu):
    """``out = act(x @ w + b)``: (M, K) @ (K, N) + (N,)."""
    for block in prange((x.shape[0] + _ROWS - 1) // _ROWS):
        _forward_block(x, w, b, out, relu, block * _ROWS)


@njit(fastmath=_FASTMATH, cache=True)
def _grad_w_block(x, dy, dw, k0):
    M, K = x.shape
    N = dy.shape[1]
    rows = min(_ROWS, K - k0)
    acc = np.zeros((_ROWS, N), dtype=np.float32)
    if rows == _ROWS:
        for i in range(M):
            v0, v1 = load(x[i, k0]), load(x[i, k0 + 1])
            v2, v3 = load(x[i, k0 + 2]), load(x[i, k0 + 3])
            di = dy[i]
            for j in range(N):
                d = load(di[j])
                acc[0, j] += v0 * d
                acc[1, j] += v1 * d
                acc[2, j] += v2 * d
                acc[3, j] += v3 * d
    else:
        for r in range(rows):
            for i in range(M):
                v = load(x[i, k0 + r])
                di = dy[i]
                for j in range(N):
                    acc[r, j] += v * load(di[j])
    for r in range(rows):
        o = dw[k0 + r]
        for j in range(N):
            o[j] = store_value(o, acc[r, j])


@njit(cache=True, parallel=True)
def _grad_w(x, dy, dw):
    """``dw = x.T @ dy``: (M, K)^T @ (M, N) -> (K, N)."""
    for block in prange((x.shape[1] + _ROWS - 1) // _ROWS):
        _grad_w_block(x, dy, dw, block * _ROWS)


@njit(cache=True)
def _transpose_to_float(w):
    """A float32 ``w.T`` (N, K), converted once: dx's updates then stream contiguous rows."""
    K, N = w.shape
    w_t = np.empty((N, K), dtype=np.float32)
    for j in range(N):  # contiguous writes; the strided reads stay in cache (w is small)
        row = w_t[j]
        for k in range(K):
            row[k] = load(w[k, j])
    return w_t


@njit(fastmath=_FASTMATH, cache=True)
def _grad_x_block(dy, w_t, dx, i0):
    # Row by row: each update streams one contiguous row of w_t into a float32 accumulator row
    # (measured faster here than sharing w_t's loads between 4 rows, whose 4 accumulator rows
    # (16 KB for K = 1024) cost more load/store traffic than they save).
    M, N = dy.shape
    K = w_t.shape[1]
    acc = np.empty(K, dtype=np.float32)
    for i in range(i0, min(M, i0 + _ROWS)):
        acc[:] = 0.0
        di = dy[i]
        for j in range(N):
            d = load(di[j])
            wj = w_t[j]
            for k in range(K):
                acc[k] += d * wj[k]
        o = dx[i]
        for k in range(K):
            o[k] = store_value(o, acc[k])


@njit(cache=True, parallel=True)
def _grad_x(dy, w_t, dx):
    """``dx = dy @ w.T`` given ``w_t = w.T`` in float32: (M, N) @ (N, K) -> (M, K)."""
    for block in prange((dy.shape[0] + _ROWS - 1) // _ROWS):
        _grad_x_block(dy, w_t, dx, block * _ROWS)


@njit(fastmath=_FASTMATH, cache=True)
def _column_sums(dy, db):
    """``db = dy.sum(axis=0)``, rows added in order (serial: M*N adds are a few microseconds)."""
    M, N = dy.shape
    acc = np.zeros(N, dtype=np.float32)
    for i in range(M):
        for j in range(N):
            acc[j] += load(dy[i, j])
    for j in range(N):
        db[j] = store_value(db, acc[j])


# --- backend entry points (validated, C-contiguous, M >= 1) ------------------------------------


def dense_forward(x, w, b, g, relu):
    """Backend of :func:`fastconv.dense`: ``(M, N)`` in x's dtype."""
    out = np.empty((g.N, g.F), dtype=x.dtype)
    # No bias: add zeros rather than specialising the kernel on None (a second compile).
    bv = bits_view(np.zeros(g.F, dtype=x.dtype) if b is None else b)
    _forward(bits_view(x), bits_view(w), bv, bits_view(out), relu)
    return out


def dense_backward(dy, x, w, g, need_dx=True):
    """Backend of :func:`fastconv.dense_backward`: ``(dx or None, dw, db)``."""
    dyv = bits_view(dy)
    dw = np.empty((g.K, g.F), dtype=x.dtype)
    _grad_w(bits_view(x), dyv, bits_view(dw))
    db = np.empty(g.F, dtype=x.dtype)
    _column_sums(dyv, bits_view(db))
    if not need_dx:
        return None, dw, db
    dx = np.empty((g.N, g.K), dtype=x.dtype)
    _grad_x(dyv, _transpose_to_float(bits_view(w)), bits_view(dx))
    return dx, dw, db
