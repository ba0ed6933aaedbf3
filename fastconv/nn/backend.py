"""Where a model's arrays live and in which dtype: a device (:mod:`fastconv.device`) and a dtype.

A :class:`Backend` is owned by each model. Layers never ask which library an array comes from
except through :func:`array_module`; transfers, casts and random numbers that must follow the
model's seed go through the backend, whose device decides NumPy from CuPy.
"""

from __future__ import annotations

import numpy as np

from .._checks import is_cupy_array
from ..device import array_module, device_of, get_device
from ..device import to_host as to_numpy

__all__ = ["Backend", "array_module", "to_numpy", "check_dtype", "check_backend_name"]

DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


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
        self.device = get_device(self.name)
        if self.name == "gpu":
            from .. import ops

            if not ops.gpu_available():
                ops.to_gpu(np.zeros(1, np.float32))  # raises, saying why (no CuPy, no device...)

    @property
    def xp(self):
        """The array module: ``numpy`` or ``cupy``."""
        return self.device.xp

    def owns(self, a) -> bool:
        """Is ``a`` an array of this backend's library (whatever its dtype)?"""
        return self.device.owns(a)

    def asarray(self, a, dtype=None):
        """``a`` on this backend in ``dtype`` (default: the backend's); no copy if it is already."""
        return self.device.asarray(a, self.dtype if dtype is None else np.dtype(dtype))

    def labels(self, y):
        """Integer labels or one-hot targets moved (not cast) to this backend."""
        return self.device.asarray(y)

    def index(self, a, idx):
        """``a[idx]`` for an integer index array ``idx`` (NumPy), whichever library ``a`` uses."""
        return a[device_of(a).asarray(idx)]

    def synchronize(self) -> None:
        self.device.synchronize()

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


def random_uniform(rng: np.random.Generator, shape, like):
    """Uniform [0, 1) float32 numbers on ``like``'s device, drawn from the seeded ``rng``.

    On the GPU a CuPy generator is seeded from ``rng`` on every call, so dropout masks follow the
    model's seed on both backends (not the same numbers: the generators differ).
    """
    if is_cupy_array(like):
        import cupy

        seed = int(rng.integers(0, 2**63 - 1))
        return cupy.random.default_rng(seed).random(shape, dtype=np.float32)
    return rng.random(shape, dtype=np.float32)
