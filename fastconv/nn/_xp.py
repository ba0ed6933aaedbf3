"""Array-module helpers so that layer code runs unchanged on NumPy and CuPy arrays."""

from __future__ import annotations

import numpy as np

from .._checks import is_cupy_array


def array_module(a):
    """``cupy`` for a CuPy array, else ``numpy`` (CuPy is imported only when already in use)."""
    if is_cupy_array(a):
        import cupy

        return cupy
    return np


def to_backend(a, backend: str, dtype=None):
    """Copy ``a`` onto ``backend`` ("cpu" or "gpu"), optionally casting to ``dtype``."""
    from .. import ops

    if backend == "gpu":
        a = ops.to_gpu(a)
    elif backend == "cpu":
        a = ops.to_cpu(a)
    else:
        raise ValueError(f"backend must be 'cpu' or 'gpu', got {backend!r}")
    if dtype is not None and a.dtype != np.dtype(dtype):
        a = a.astype(dtype)
    return a


def to_numpy(a):
    """A NumPy view/copy of ``a`` (``a`` may live on the GPU)."""
    return a.get() if is_cupy_array(a) else np.asarray(a)


def check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dt}")
    return dt


def check_backend(backend: str) -> str:
    if backend not in ("cpu", "gpu"):
        raise ValueError(f"backend must be 'cpu' or 'gpu', got {backend!r}")
    return backend
