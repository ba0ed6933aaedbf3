"""Dense (fully connected) layer kernels on the CPU: float32 and float16 (as uint16 bits).

``y = act(x @ w + b)`` with ``x (M, K)``, ``w (K, N)`` (Keras layout), and the three products of
the backward pass, all through the GEMM layer :func:`fastconv.cpu._matmul.matmul` (packed
panels, register-blocked micro-kernel, bias and ReLU fused into the store; float16 converted
to float32 while packing, accumulated in float32, rounded once on store). The backward
products need no transposed copies: ``dx = dy @ w.T`` and ``dW = x.T @ dy`` pack the
transposed operand directly. It runs on Numba's thread pool, not a BLAS: see
docs/kernels.md ("Dense layers: the GEMM layer") for the measurements behind that choice.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from . import _outputs as outputs
from ._half import bits_view, load, store_value
from ._matmul import matmul

__all__ = ["dense_forward", "dense_backward"]

# Reassociation lets the column sums vectorise; no nnan/ninf, so NaN and inf propagate.
_FASTMATH = {"contract", "reassoc", "arcp", "nsz"}


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
    return matmul(x, w, outputs.empty((g.N, g.F), x.dtype), bias=b, relu=relu)


def dense_backward(dy, x, w, g, need_dx=True):
    """Backend of :func:`fastconv.dense_backward`: ``(dx or None, dw, db)``."""
    dw = matmul(x, dy, np.empty((g.K, g.F), dtype=x.dtype), trans_a=True)
    db = np.empty(g.F, dtype=x.dtype)
    _column_sums(bits_view(dy), bits_view(db))
    if not need_dx:
        return None, dw, db
    dx = matmul(dy, w, np.empty((g.N, g.K), dtype=x.dtype), trans_b=True)
    return dx, dw, db


class DenseKernels:
    """This module's ops as methods of the CPU kernel set (:class:`fastconv.cpu.CpuKernels`
    inherits them): adding an op here registers it there."""

    dense = staticmethod(dense_forward)
    dense_backward = staticmethod(dense_backward)
