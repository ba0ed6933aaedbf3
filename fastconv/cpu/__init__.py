"""CPU backend: Numba kernels. Called only from :mod:`fastconv.ops`, after validation.

Threading layer: unless the user chose one (``NUMBA_THREADING_LAYER`` or
``NUMBA_THREADING_LAYER_PRIORITY`` in the environment, or ``numba.config.THREADING_LAYER``
assigned before this import), this module selects Numba's ``workqueue`` layer. A training step
launches ~20 short parallel regions; with the OpenMP layer each launch had to wake threads that
had gone to sleep (or were spinning against other processes), and a deep-MNIST step ran
2-2.6x slower on the shared 2-core machine (docs/kernels.md, "Optimisation log"). The choice
is process-wide and takes effect only if no parallel Numba code has run yet. Caveat of
``workqueue``: parallel Numba functions must not be launched from several Python threads at
once (fastconv's kernels hold the GIL, so they never are); set ``NUMBA_THREADING_LAYER=omp``
(or ``tbb``) to keep another layer.
"""

import os

import numba
import numpy as np

from .conv import col2im, conv2d, conv2d_backward, im2col
from .pool import avg_pool2d, avg_pool2d_backward, max_pool2d, max_pool2d_backward


def _choose_threading_layer() -> None:
    user_chose = (
        "NUMBA_THREADING_LAYER" in os.environ
        or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ
        or numba.config.THREADING_LAYER != "default"
    )
    if not user_chose:
        numba.config.THREADING_LAYER = "workqueue"


# Importing the kernels launches nothing (njit compiles on first call), so this still comes
# before any fastconv parallel region.
_choose_threading_layer()

__all__ = [
    "ascontiguous",
    "im2col",
    "col2im",
    "conv2d",
    "conv2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
]


def ascontiguous(a):
    return np.ascontiguousarray(a)
