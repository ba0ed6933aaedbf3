"""ReLU and leaky ReLU with their gradients on the CPU, float32 and float16 (as uint16 bits).

Why kernels rather than NumPy's ``np.maximum(x, 0)`` and ``dy * (y > 0)``: NumPy allocates a
boolean mask and a fresh result each call (for a (100, 16, 28, 28) activation that is ~1.5 ms
of page faults and memory traffic in float32), and computes float16 in software (~25 ms for
the gradient, more than the convolution's whole backward pass). These kernels read half
values as bits and convert in registers (``fastconv.cpu._half``), and the gradient can write
into a buffer the caller reuses from step to step.

The forward copies x's own bits where x is not below zero (NaN payloads and -0.0 kept, as
``torch.relu``; NumPy's ``maximum`` keeps -0.0 in float16 but not in float32) and writes +0
elsewhere. The gradient is exactly ``dy * 1`` or ``dy * 0`` in float32, rounded back to the
dtype: NumPy's ``dy * (y > 0)`` bit for bit (so ``inf * 0`` gives NaN).

Leaky ReLU follows PyTorch's ``leaky_relu``: ``x`` where ``x > 0`` (its bits copied), else
``alpha * x`` in float32 rounded once; the gradient is taken through the input, ``dy`` where
``x > 0`` else ``alpha * dy``, as ``leaky_relu_backward``.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from . import _outputs as outputs
from ._half import bits_view, load, store_value

__all__ = [
    "relu",
    "relu_backward",
    "leaky_relu",
    "leaky_relu_backward",
    "clip",
    "clip_backward",
]

# Smaller arrays call the chunk functions directly, without a parallel region (even a one-task
# region wakes the thread team, which under load can wait milliseconds).
_PARALLEL_MIN = 1 << 15


# The chunk loops index slices from 0: with ``range(i0, i1)`` LLVM cannot prove the index
# non-negative, keeps NumPy's wraparound test in the loop and does not vectorise (3-8x slower).


@njit(cache=True)
def _relu_chunk(x, out, i0, i1):
    xs, os = x[i0:i1], out[i0:i1]
    zero = store_value(out, np.float32(0.0))
    for i in range(xs.size):
        os[i] = zero if load(xs[i]) < np.float32(0.0) else xs[i]


@njit(parallel=True, cache=True)
def _relu(x, out, chunk):
    n = x.size
    for b in prange((n + chunk - 1) // chunk):
        _relu_chunk(x, out, b * chunk, min(n, (b + 1) * chunk))


@njit(cache=True)
def _grad_chunk(dy, y, out, i0, i1):
    ds, ys, os = dy[i0:i1], y[i0:i1], out[i0:i1]
    for i in range(ds.size):
        keep = np.float32(1.0) if load(ys[i]) > np.float32(0.0) else np.float32(0.0)
        os[i] = store_value(os, load(ds[i]) * keep)


@njit(parallel=True, cache=True)
def _relu_grad(dy, y, out, chunk):
    n = dy.size
    for b in prange((n + chunk - 1) // chunk):
        _grad_chunk(dy, y, out, b * chunk, min(n, (b + 1) * chunk))


def _chunk(n: int) -> int:
    """Elements per task: one chunk per thread."""
    return -(-n // numba.config.NUMBA_NUM_THREADS)


def relu(x):
    """Backend of :func:`fastconv.relu` (validated, C-contiguous, non-empty)."""
    out = outputs.empty(x.shape, x.dtype)
    xv, ov = bits_view(x).reshape(-1), bits_view(out).reshape(-1)
    if x.size < _PARALLEL_MIN:
        _relu_chunk(xv, ov, 0, x.size)
    else:
        _relu(xv, ov, _chunk(x.size))
    return out


def relu_backward(dy, y, out=None):
    """Backend of :func:`fastconv.relu_backward`: ``dy * (y > 0)``, into ``out`` if given."""
    if out is None:
        out = np.empty(dy.shape, dtype=dy.dtype)
    flat = tuple(bits_view(a).reshape(-1) for a in (dy, y, out))
    if dy.size < _PARALLEL_MIN:
        _grad_chunk(*flat, 0, dy.size)
    else:
        _relu_grad(*flat, _chunk(dy.size))
    return out


@njit(cache=True)
def _leaky_chunk(x, out, alpha, i0, i1):
    xs, os = x[i0:i1], out[i0:i1]
    for i in range(xs.size):
        v = load(xs[i])
        os[i] = xs[i] if v > np.float32(0.0) else store_value(os, v * alpha)


@njit(parallel=True, cache=True)
def _leaky(x, out, alpha, chunk):
    n = x.size
    for b in prange((n + chunk - 1) // chunk):
        _leaky_chunk(x, out, alpha, b * chunk, min(n, (b + 1) * chunk))


@njit(cache=True)
def _leaky_grad_chunk(dy, x, out, alpha, i0, i1):
    ds, xs, os = dy[i0:i1], x[i0:i1], out[i0:i1]
    for i in range(ds.size):
        g = load(ds[i])
        os[i] = store_value(os, g if load(xs[i]) > np.float32(0.0) else g * alpha)


@njit(parallel=True, cache=True)
def _leaky_grad(dy, x, out, alpha, chunk):
    n = dy.size
    for b in prange((n + chunk - 1) // chunk):
        _leaky_grad_chunk(dy, x, out, alpha, b * chunk, min(n, (b + 1) * chunk))


def leaky_relu(x, alpha):
    """Backend of :func:`fastconv.leaky_relu` (validated, C-contiguous, non-empty; ``alpha`` a
    float32)."""
    out = outputs.empty(x.shape, x.dtype)
    xv, ov = bits_view(x).reshape(-1), bits_view(out).reshape(-1)
    if x.size < _PARALLEL_MIN:
        _leaky_chunk(xv, ov, alpha, 0, x.size)
    else:
        _leaky(xv, ov, alpha, _chunk(x.size))
    return out


def leaky_relu_backward(dy, x, alpha, out=None):
    """Backend of :func:`fastconv.leaky_relu_backward`, into ``out`` if given."""
    if out is None:
        out = np.empty(dy.shape, dtype=dy.dtype)
    flat = tuple(bits_view(a).reshape(-1) for a in (dy, x, out))
    if dy.size < _PARALLEL_MIN:
        _leaky_grad_chunk(*flat, alpha, 0, dy.size)
    else:
        _leaky_grad(*flat, alpha, _chunk(dy.size))
    return out


@njit(cache=True)
def _clip_chunk(x, out, lo, hi, i0, i1):
    xs, os = x[i0:i1], out[i0:i1]
    low, high = store_value(os, lo), store_value(os, hi)
    for i in range(xs.size):
        v = load(xs[i])
        os[i] = low if v < lo else (high if v > hi else xs[i])  # NaN: its bits copied


@njit(parallel=True, cache=True)
def _clip(x, out, lo, hi, chunk):
    n = x.size
    for b in prange((n + chunk - 1) // chunk):
        _clip_chunk(x, out, lo, hi, b * chunk, min(n, (b + 1) * chunk))


@njit(cache=True)
def _clip_grad_chunk(dy, x, out, lo, hi, i0, i1):
    ds, xs, os = dy[i0:i1], x[i0:i1], out[i0:i1]
    zero = store_value(os, np.float32(0.0))
    for i in range(ds.size):
        v = load(xs[i])
        os[i] = ds[i] if (v > lo and v < hi) else zero  # a NaN input: 0


@njit(parallel=True, cache=True)
def _clip_grad(dy, x, out, lo, hi, chunk):
    n = dy.size
    for b in prange((n + chunk - 1) // chunk):
        _clip_grad_chunk(dy, x, out, lo, hi, b * chunk, min(n, (b + 1) * chunk))


def clip(x, lo, hi):
    """Backend of :func:`fastconv.clip` (validated, C-contiguous, non-empty; float32 bounds)."""
    out = outputs.empty(x.shape, x.dtype)
    xv, ov = bits_view(x).reshape(-1), bits_view(out).reshape(-1)
    if x.size < _PARALLEL_MIN:
        _clip_chunk(xv, ov, lo, hi, 0, x.size)
    else:
        _clip(xv, ov, lo, hi, _chunk(x.size))
    return out


def clip_backward(dy, x, lo, hi, out=None):
    """Backend of :func:`fastconv.clip_backward`, into ``out`` if given."""
    if out is None:
        out = np.empty(dy.shape, dtype=dy.dtype)
    flat = tuple(bits_view(a).reshape(-1) for a in (dy, x, out))
    if dy.size < _PARALLEL_MIN:
        _clip_grad_chunk(*flat, lo, hi, 0, dy.size)
    else:
        _clip_grad(*flat, lo, hi, _chunk(dy.size))
    return out


class ActivationKernels:
    """This module's ops as methods of the CPU kernel set (:class:`fastconv.cpu.CpuKernels`
    inherits them): adding an op here registers it there."""

    relu = staticmethod(relu)
    relu_backward = staticmethod(relu_backward)
    leaky_relu = staticmethod(leaky_relu)
    leaky_relu_backward = staticmethod(leaky_relu_backward)
    clip = staticmethod(clip)
    clip_backward = staticmethod(clip_backward)
