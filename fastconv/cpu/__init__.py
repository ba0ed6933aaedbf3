"""CPU backend: Numba kernels. Called only from :mod:`fastconv.ops`, after validation.

Threading layer: unless the user chose one (``NUMBA_THREADING_LAYER`` or
``NUMBA_THREADING_LAYER_PRIORITY`` in the environment, or ``numba.config.THREADING_LAYER``
assigned before this import), this module asks Numba for the OpenMP layer first, then TBB,
then ``workqueue``. On the idle 2-core machine a deep-MNIST training step took 33.9 ms with
OpenMP and 43.1 ms with ``workqueue`` (PyTorch 36 ms in the same runs): ``workqueue`` barely
ran the two threads' work in parallel (conv6 forward + backward 9.1 ms on 2 threads vs 11.9 on
one; OpenMP 5.7-6.4 ms). Trade-off (docs/kernels.md, "Optimisation log"): when other busy
processes share the cores, OpenMP's spinning threads make each parallel region wait for a
time slice (8 ms per launch measured under load, against ~50 us with ``workqueue``); on such a
machine set ``NUMBA_THREADING_LAYER=workqueue``. The choice is process-wide and takes effect
only if no parallel Numba code has run yet (``numba.set_num_threads`` counts: import
``fastconv.cpu`` before calling it).
"""

import os

import numba
import numpy as np

from ._workspace import launch_guard
from .activation import relu, relu_backward
from .augment import gaussian_blur, warp_bilinear
from .batchnorm import (
    batch_norm_backward,
    batch_norm_forward,
    batch_norm_inference,
    batch_norm_inference_backward,
)
from .conv import conv2d, conv2d_backward
from .dense import dense_backward, dense_forward
from .global_pool import global_avg_pool2d, global_avg_pool2d_backward
from .im2col import col2im, im2col
from .pool import avg_pool2d, avg_pool2d_backward, max_pool2d, max_pool2d_backward


def _choose_threading_layer() -> None:
    user_chose = (
        "NUMBA_THREADING_LAYER" in os.environ
        or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ
        or numba.config.THREADING_LAYER != "default"
    )
    if not user_chose:
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


# Importing the kernels launches nothing (njit compiles on first call), so this still comes
# before any fastconv parallel region.
_choose_threading_layer()

__all__ = [
    "ascontiguous",
    "launch_guard",
    "im2col",
    "col2im",
    "conv2d",
    "conv2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "batch_norm_forward",
    "batch_norm_inference",
    "batch_norm_backward",
    "batch_norm_inference_backward",
    "global_avg_pool2d",
    "global_avg_pool2d_backward",
    "dense_forward",
    "dense_backward",
    "relu",
    "relu_backward",
    "zeros",
    "full",
    "warp_bilinear",
    "gaussian_blur",
]


def ascontiguous(a):
    return np.ascontiguousarray(a)


def zeros(shape, dtype):
    """A zero-filled result (empty-batch shortcuts in :mod:`fastconv.ops`)."""
    return np.zeros(shape, dtype=dtype)


def full(shape, value, dtype):
    return np.full(shape, value, dtype=dtype)
