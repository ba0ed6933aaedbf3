"""Kernel outputs kept between inference calls: :class:`OutputPool` and :func:`empty`.

Why: an activation of a batch (deep-MNIST at batch 100: 1.2-5 MB a layer) is above glibc's
mmap threshold until the process happens to free a larger block (which raises the threshold),
so in many processes each layer's output was a fresh memory map, faulted in page by page and
unmapped again a layer later. Measured (2026-12-07, 2 threads, the same model and input, only
the process's allocation history differing): 1000 images in 87-94 ms with 33k page faults per
run, against 103-127 ms with 127k-180k. ONNX Runtime plans its activations' memory once per
input shape; this pool gets the same effect without a plan.

How: while a pool is active on the calling thread (``with pool:``, what a model's inference
does), :func:`empty` hands out an array of the requested shape and dtype
that the pool made earlier *and that nothing references any more*. The test is CPython's
reference count: an array still held by a caller, a cache, a view (``view.base`` holds its
owner) or another thread is never handed out twice, so no plan of lifetimes is needed and no
caller can see its result overwritten. Small arrays (under ``MIN_BYTES``) come from malloc's
heap, which already reuses them. A pool keeps at most ``MAX_PER_SHAPE`` arrays of one shape
and ``max_bytes`` in all; beyond, :func:`empty` allocates as NumPy does.
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np

__all__ = ["OutputPool", "empty"]

MIN_BYTES = 256 << 10  # below: malloc's heap, which reuses small blocks anyway
MAX_PER_SHAPE = 4

_local = threading.local()


def _free_refcount() -> int:
    """``sys.getrefcount`` of an array referenced only by a pool's list, seen from the scan
    loop in :meth:`OutputPool.take` (list slot, loop variable, the call's argument)."""
    kept = [np.empty(1)]
    for a in kept:
        return sys.getrefcount(a)
    raise AssertionError  # unreachable


class OutputPool:
    """Arrays kept for reuse as kernel outputs (see the module's docstring). Thread-safe."""

    def __init__(self, max_bytes: int = 512 << 20):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._lock = threading.Lock()
        self._arrays: dict = {}  # (shape, dtype) -> [ndarray, ...]

    def take(self, shape, dtype) -> np.ndarray:
        """An unreferenced kept array of ``shape`` and ``dtype``, or a new one (kept if the
        pool's bounds allow)."""
        key = (shape, dtype)
        with self._lock:
            kept = self._arrays.get(key)
            if kept is not None:
                for a in kept:
                    if sys.getrefcount(a) <= _FREE:
                        return a
            a = np.empty(shape, dtype)
            if (kept is None or len(kept) < MAX_PER_SHAPE) and (
                self.nbytes + a.nbytes <= self.max_bytes
            ):
                self._arrays.setdefault(key, []).append(a)
                self.nbytes += a.nbytes
            return a

    def clear(self) -> None:
        """Forget every kept array (those still in use stay alive with their users)."""
        with self._lock:
            self._arrays.clear()
            self.nbytes = 0

    def __enter__(self):
        """Serve :func:`empty` on this thread from this pool until ``__exit__``."""
        stack = _local.__dict__.setdefault("stack", [])
        stack.append(self)
        return self

    def __exit__(self, *exc):
        _local.stack.pop()


_FREE = _free_refcount()


def empty(shape, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)``, from the thread's active :class:`OutputPool` if there is
    one and the array is large enough to be worth keeping. The caller must write every
    element (a reused array holds an earlier call's values)."""
    stack = getattr(_local, "stack", None)
    if stack:
        dtype = np.dtype(dtype)
        if math.prod(shape) * dtype.itemsize >= MIN_BYTES:  # (small ones: no key to build)
            return stack[-1].take(tuple(int(s) for s in shape), dtype)
    return np.empty(shape, dtype)
