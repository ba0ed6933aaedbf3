"""PROVISIONAL CPU backend: delegates to the float64 reference and casts back.

Placeholder so the layers can be developed in parallel; replaced by the Numba kernels.
"""

import numpy as np

from .. import reference as ref


def ascontiguous(a):
    return np.ascontiguousarray(a)


def _pool_args(g):
    return dict(size=(g.kh, g.kw), stride=(g.sh, g.sw), pad=(g.ph, g.pw))


def im2col(x, g):
    return ref.im2col(x, g.kh, g.kw, (g.sh, g.sw), (g.ph, g.pw)).astype(x.dtype)


def col2im(cols, g):
    return ref.col2im(cols, g.x_shape, g.kh, g.kw, (g.sh, g.sw), (g.ph, g.pw)).astype(cols.dtype)


def conv2d(x, w, b, g, activation):
    return ref.conv2d(x, w, b, (g.sh, g.sw), (g.ph, g.pw), activation).astype(x.dtype)


def conv2d_backward(dy, x, w, g):
    return tuple(a.astype(x.dtype) for a in ref.conv2d_backward(dy, x, w, (g.sh, g.sw), (g.ph, g.pw)))


def max_pool2d(x, g):
    return ref.max_pool2d(x, **_pool_args(g)).astype(x.dtype)


def max_pool2d_backward(dy, x, g):
    return ref.max_pool2d_backward(dy, x, **_pool_args(g)).astype(x.dtype)


def avg_pool2d(x, g):
    return ref.avg_pool2d(x, **_pool_args(g)).astype(x.dtype)


def avg_pool2d_backward(dy, g):
    return ref.avg_pool2d_backward(dy, g.x_shape, **_pool_args(g)).astype(dy.dtype)
