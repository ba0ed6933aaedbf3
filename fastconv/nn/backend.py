"""Where a model's arrays live and in which dtype: the one place that knows NumPy from CuPy.

A :class:`Backend` is owned by each model. Layers never ask which library an array comes from
except through :func:`array_module`; transfers, casts and random numbers that must follow the
model's seed go through the backend, so "is this CuPy?" is decided here and nowhere else in
``fastconv.nn``.
"""

from __future__ import annotations

import numpy as np

from .._checks import is_cupy_array

__all__ = [
    "Backend", "DropoutMask", "array_module", "to_numpy", "check_dtype", "check_backend_name",
]  # fmt: skip

DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def array_module(a):
    """``cupy`` for a CuPy array, else ``numpy`` (CuPy is imported only when already in use)."""
    if is_cupy_array(a):
        import cupy

        return cupy
    return np


def to_numpy(a):
    """``a`` as a NumPy array (copied from the GPU when it lives there)."""
    return a.get() if is_cupy_array(a) else np.asarray(a)


def check_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}") from None
    if dt not in DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dt}")
    return dt


def check_backend_name(name) -> str:
    if name not in ("cpu", "gpu"):
        raise ValueError(f"backend must be 'cpu' or 'gpu', got {name!r}")
    return name


class Backend:
    """Array library, device and compute dtype of a model.

    Parameters
    ----------
    name : "cpu" or "gpu"
        NumPy arrays and the Numba kernels, or CuPy arrays on the current CUDA device.
    dtype : "float32" or "float16"
        The dtype of activations and parameters (statistics such as BatchNorm's moving mean
        and variance stay float32 in both, see docs/dtypes.md).
    """

    def __init__(self, name="cpu", dtype="float32"):
        self.name = check_backend_name(name)
        self.dtype = check_dtype(dtype)
        if self.name == "gpu":
            from .. import ops

            if not ops.gpu_available():
                ops.to_gpu(np.zeros(1, np.float32))  # raises, saying why (no CuPy, no device...)

    @property
    def xp(self):
        """The array module: ``numpy`` or ``cupy``."""
        if self.name == "gpu":
            import cupy

            return cupy
        return np

    def owns(self, a) -> bool:
        """Is ``a`` an array of this backend's library (whatever its dtype)?"""
        return is_cupy_array(a) == (self.name == "gpu")

    def asarray(self, a, dtype=None):
        """``a`` on this backend in ``dtype`` (default: the backend's); no copy if it is already."""
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        if self.name == "gpu":
            if not is_cupy_array(a):
                import cupy

                a = cupy.asarray(np.asarray(a))
        elif is_cupy_array(a):
            a = a.get()
        else:
            a = np.asarray(a)
        return a if a.dtype == dtype else a.astype(dtype)

    def labels(self, y):
        """Integer labels or one-hot targets moved (not cast) to this backend."""
        if self.name == "gpu" and not is_cupy_array(y):
            import cupy

            return cupy.asarray(np.asarray(y))
        if self.name == "cpu" and is_cupy_array(y):
            return y.get()
        return y

    def index(self, a, idx):
        """``a[idx]`` for an integer index array ``idx`` (NumPy), whichever library ``a`` uses."""
        if is_cupy_array(a):
            import cupy

            return a[cupy.asarray(idx)]
        return a[idx]

    def synchronize(self) -> None:
        if self.name == "gpu":
            import cupy

            cupy.cuda.get_current_stream().synchronize()

    def __eq__(self, other):
        # ``model.backend == "gpu"`` reads naturally (and was the API before the Backend object).
        if isinstance(other, str):
            return self.name == other
        if isinstance(other, Backend):
            return (self.name, self.dtype) == (other.name, other.dtype)
        return NotImplemented

    def __hash__(self):
        return hash((self.name, self.dtype))

    def __repr__(self):
        return f"Backend({self.name!r}, {self.dtype.name!r})"


class DropoutMask:
    """One training call's dropout mask, drawn from the model's generator ``rng``:
    ``apply(a)`` is ``a * mask``, with ``mask`` 0 where a unit is dropped (probability
    ``rate``) and ``1/(1-rate)`` (rounded to ``a``'s dtype) where it is kept.

    CPU: the mask is an array made from ``rng.random`` (float32 uniforms).
    GPU: one Philox key is drawn from ``rng`` instead (:mod:`fastconv.gpu._random`) and the
    ``dropout`` kernel regenerates the mask from it on every ``apply``: no generator is built
    per call (a CuPy generator sets up a cuRAND state per thread of its launch, on every
    construction), no mask is stored between the forward and backward passes, and a forward
    costs one launch. Both follow the model's seed; the two backends' masks differ (different
    generators).
    """

    __slots__ = ("shape", "rate", "_mask", "_key")

    def __init__(self, rng: np.random.Generator, shape, like, rate: float):
        self.shape = tuple(shape)
        self.rate = float(rate)
        if is_cupy_array(like):
            from ..gpu import _random

            self._key, self._mask = _random.draw_key(rng), None
        else:
            keep = np.float32(1.0 - rate)
            u = rng.random(self.shape, dtype=np.float32)
            self._key = None
            self._mask = (u < keep).astype(like.dtype) * like.dtype.type(1.0 / keep)

    def apply(self, a):
        """``a * mask`` for an array ``a`` of the mask's shape (on the backend it was drawn
        for)."""
        if tuple(a.shape) != self.shape:
            raise ValueError(f"dropout mask of shape {self.shape} applied to shape {a.shape}")
        if self._key is None:
            return a * self._mask
        from .. import gpu

        return gpu.dropout(a, self._key, self.rate)
