"""Finite-difference gradient checks shared by the nn tests.

Layers run in float32; the scalar probe ``L = sum(forward(x) * R)`` is accumulated in float64
and differentiated by central differences, with steps large enough that float32 rounding of
the forward pass stays well below the tolerance.
"""

import numpy as np


def probe_loss(y, r):
    return float(np.sum(y.astype(np.float64) * r))


def numeric_grad_entries(fn, arr, r, indices, eps=1e-3):
    """Central differences of ``sum(fn() * r)`` w.r.t. ``arr[idx]`` for each ``idx``."""
    values = []
    for idx in indices:
        old = arr[idx]
        arr[idx] = old + eps
        plus = probe_loss(fn(), r)
        arr[idx] = old - eps
        minus = probe_loss(fn(), r)
        arr[idx] = old
        values.append((plus - minus) / (2 * eps))
    return np.array(values)


def numeric_directional(fn, arr, r, direction, eps=1e-3):
    """Central difference of ``sum(fn() * r)`` along ``direction`` (same shape as ``arr``)."""
    base = arr.copy()
    arr[...] = base + eps * direction
    plus = probe_loss(fn(), r)
    arr[...] = base - eps * direction
    minus = probe_loss(fn(), r)
    arr[...] = base
    return (plus - minus) / (2 * eps)


def sample_indices(shape, k, rng):
    flat = rng.choice(int(np.prod(shape)), size=min(k, int(np.prod(shape))), replace=False)
    return [np.unravel_index(i, shape) for i in flat]


def numerical_grad(f, a, dy, eps=1e-6):
    """d<f(a), dy>/da by central differences (float64)."""
    grad = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        old = a[idx]
        a[idx] = old + eps
        plus = np.sum(f(a) * dy)
        a[idx] = old - eps
        minus = np.sum(f(a) * dy)
        a[idx] = old
        grad[idx] = (plus - minus) / (2 * eps)
    return grad
