"""PROVISIONAL: delegates to the float64 reference; replaced by Numba kernels."""

from .. import reference as ref


def im2col(x, g):
    return ref.im2col(x, g.kh, g.kw, (g.sh, g.sw), (g.ph, g.pw)).astype(x.dtype)


def col2im(cols, g):
    return ref.col2im(cols, g.x_shape, g.kh, g.kw, (g.sh, g.sw), (g.ph, g.pw)).astype(cols.dtype)


def conv2d(x, w, b, g, activation):
    return ref.conv2d(x, w, b, (g.sh, g.sw), (g.ph, g.pw), activation).astype(x.dtype)


def conv2d_backward(dy, x, w, g):
    grads = ref.conv2d_backward(dy, x, w, (g.sh, g.sw), (g.ph, g.pw))
    return tuple(a.astype(x.dtype) for a in grads)
