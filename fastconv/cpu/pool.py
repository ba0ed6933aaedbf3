"""PROVISIONAL: delegates to the float64 reference; replaced by Numba kernels."""

from .. import reference as ref


def _args(g):
    return dict(size=(g.kh, g.kw), stride=(g.sh, g.sw), pad=(g.ph, g.pw))


def max_pool2d(x, g):
    return ref.max_pool2d(x, **_args(g)).astype(x.dtype)


def max_pool2d_backward(dy, x, g):
    return ref.max_pool2d_backward(dy, x, **_args(g)).astype(x.dtype)


def avg_pool2d(x, g):
    return ref.avg_pool2d(x, **_args(g)).astype(x.dtype)


def avg_pool2d_backward(dy, g):
    return ref.avg_pool2d_backward(dy, g.x_shape, **_args(g)).astype(dy.dtype)
