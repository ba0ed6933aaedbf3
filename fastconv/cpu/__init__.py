"""CPU backend: Numba kernels. Called only from :mod:`fastconv.ops`, after validation."""

import numpy as np

from .conv import col2im, conv2d, conv2d_backward, im2col
from .pool import avg_pool2d, avg_pool2d_backward, max_pool2d, max_pool2d_backward

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
