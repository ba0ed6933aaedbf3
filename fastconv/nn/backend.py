"""Where a model's arrays live and in which dtype: a device (:mod:`fastconv.device`) and a dtype.

A :class:`Backend` is owned by each model. Layers never ask which library an array comes from
except through :func:`array_module`; transfers, casts and random numbers that must follow the
model's seed go through the backend, whose device decides NumPy from CuPy.
"""

from __future__ import annotations

import numpy as np

from ..device import GPU, array_module, device_of, get_device
from ..device import to_host as to_numpy

__all__ = [
    "Backend", "DropoutMask", "array_module", "to_numpy", "check_dtype", "check_backend_name",
]  # fmt: skip

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
        if device_of(like) is GPU:
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
        # The mask's own key and a's own size: no user argument reaches this kernel.
        return GPU.kernels.dropout(GPU.ascontiguous(a), self._key, self.rate)
