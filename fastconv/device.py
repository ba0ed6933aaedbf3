"""The one place that decides NumPy from CuPy: a :class:`Device` per kind of array.

Everything device-specific goes through one of the two devices: which array library, how to
make or move an array there, how to wait for it, the lock a parallel kernel launch holds, and
the kernel set (:class:`fastconv.kernels.Kernels`) that computes on it. :func:`device_of`
picks the device from an array; nothing else in the package asks what type an array is
(apart from :mod:`fastconv._checks`, whose messages name the types, and :mod:`fastconv.gpu`).
CuPy is imported only once a CuPy array or the GPU device is actually used.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ._checks import is_cupy_array

__all__ = ["Device", "CPU", "GPU", "device_of", "get_device", "array_module", "to_host"]


class _NoPool(contextlib.nullcontext):
    """:meth:`Device.output_pool` where nothing is kept: a null context that clears."""

    def clear(self) -> None:
        """Nothing kept, nothing to drop."""


class Device:
    """Where arrays live and which kernels compute on them."""

    name: str

    @property
    def xp(self):
        """The array module: ``numpy`` or ``cupy``."""
        raise NotImplementedError

    @property
    def kernels(self):
        """The :class:`~fastconv.kernels.Kernels` of this device."""
        raise NotImplementedError

    def owns(self, a) -> bool:
        """Is ``a`` an array of this device's library (whatever its dtype)?"""
        return is_cupy_array(a) == (self.name == "gpu")

    def launch_guard(self):
        """The context a kernel launch runs in (thread safety, docs/reliability.md)."""
        return contextlib.nullcontext()

    def ascontiguous(self, a):
        return self.xp.ascontiguousarray(a)

    def zeros(self, shape, dtype):
        return self.xp.zeros(shape, dtype=dtype)

    def full(self, shape, value, dtype):
        return self.xp.full(shape, value, dtype=dtype)

    def asarray(self, a, dtype=None):
        """``a`` on this device (copied there from the other one if needed), in ``dtype``
        when given; no copy when it is already there in that dtype."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for the work queued on this device (nothing to wait for on the CPU)."""

    def output_pool(self):
        """A pool that kernel outputs may be reused from across calls (a context manager:
        ``with device.output_pool():``, and ``clear()`` to drop what it keeps), or a pool
        that keeps nothing where the array library already pools (CuPy's memory pool)."""
        return _NoPool()

    def __repr__(self):
        return f"<fastconv device {self.name}>"


class _Cpu(Device):
    name = "cpu"

    @property
    def xp(self):
        return np

    _kernels = None  # fastconv.cpu.KERNELS, imported on first use (Numba compiles then)
    _guard = None

    @property
    def kernels(self):
        kernels = self._kernels
        if kernels is None:
            from .cpu import KERNELS as kernels

            self._kernels = kernels
        return kernels

    def launch_guard(self):
        guard = self._guard
        if guard is None:
            from .cpu import launch_guard

            guard = self._guard = launch_guard()
        return guard

    def output_pool(self):
        from .cpu._outputs import OutputPool

        return OutputPool()

    def ascontiguous(self, a):  # every op calls it: NumPy directly, not through xp
        return np.ascontiguousarray(a)

    def asarray(self, a, dtype=None):
        a = a.get() if is_cupy_array(a) else np.asarray(a)
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)


class _Gpu(Device):
    name = "gpu"

    @property
    def xp(self):
        import cupy

        return cupy

    @property
    def kernels(self):
        from . import gpu

        return gpu.kernels()

    def asarray(self, a, dtype=None):
        if not is_cupy_array(a):
            from . import gpu

            a = gpu.to_gpu(np.asarray(a))  # says why when no GPU can be used
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)

    def synchronize(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()


CPU: Device = _Cpu()
GPU: Device = _Gpu()


def device_of(a) -> Device:
    """The device of array ``a``: :data:`GPU` for a CuPy array, else :data:`CPU`."""
    return GPU if is_cupy_array(a) else CPU


def get_device(name) -> Device:
    """The device called ``name`` ("cpu" or "gpu")."""
    if name == "cpu":
        return CPU
    if name == "gpu":
        return GPU
    raise ValueError(f"backend must be 'cpu' or 'gpu', got {name!r}")


def array_module(a):
    """``cupy`` for a CuPy array, else ``numpy``."""
    return device_of(a).xp


def to_host(a):
    """``a`` as a NumPy array (copied from the GPU when it lives there)."""
    return CPU.asarray(a)
