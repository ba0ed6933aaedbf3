"""INTERIM: array-code stand-ins for the ops the `kernels` branch implements as kernels
(relu, dense, batch norm, global average pooling). Deleted when that branch is merged."""

from __future__ import annotations

import numpy as np

from ._checks import is_cupy_array


def _xp(a):
    if is_cupy_array(a):
        import cupy

        return cupy
    return np


def relu(x):
    xp = _xp(x)
    return xp.where(x < 0, x.dtype.type(0), x)


def relu_backward(dy, y, out=None):
    r = dy * (y > 0)
    if out is not None:
        out[...] = r
        return out
    return r


def dense(x, w, b=None, activation=None):
    y = x.astype(np.float32) @ w.astype(np.float32)
    if b is not None:
        y += b.astype(np.float32)
    if activation == "relu":
        y = relu(y)
    return y.astype(x.dtype)


def dense_backward(dy, x, w, need_dx=True):
    d = dy.astype(np.float32)
    dw = (x.astype(np.float32).T @ d).astype(x.dtype)
    db = d.sum(axis=0).astype(x.dtype)
    dx = (d @ w.astype(np.float32).T).astype(x.dtype) if need_dx else None
    return dx, dw, db


def _axes(x):
    return (0,) if x.ndim == 2 else (0, 2, 3)


def _b(v, x):
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def batch_norm_forward(x, gamma, beta, eps=1e-5, activation=None):
    m = x.size // x.shape[1]
    if m < 2:
        raise ValueError("batch_norm_forward needs more than 1 value per channel (N*H*W >= 2)")
    x32 = x.astype(np.float32)
    mean = x32.mean(axis=_axes(x))
    var = ((x32 - _b(mean, x)) ** 2).mean(axis=_axes(x))
    y = batch_norm_inference(x, gamma, beta, mean, var, eps, activation)
    return y, mean.astype(np.float32), var.astype(np.float32)


def batch_norm_inference(x, gamma, beta, mean, var, eps=1e-5, activation=None):
    xp = _xp(x)
    inv = 1.0 / xp.sqrt(var.astype(np.float32) + np.float32(eps))
    y = (x.astype(np.float32) - _b(mean, x)) * _b(inv * gamma.astype(np.float32), x) + _b(
        beta.astype(np.float32), x
    )
    if activation == "relu":
        y = relu(y)
    return y.astype(x.dtype)


def batch_norm_backward(dy, x, gamma, mean, var, eps=1e-5, y=None):
    xp = _xp(x)
    if y is not None:
        dy = dy * (y > 0)
    ax = _axes(x)
    m = x.size // x.shape[1]
    inv = 1.0 / xp.sqrt(var + np.float32(eps))
    xhat = (x.astype(np.float32) - _b(mean, x)) * _b(inv, x)
    d = dy.astype(np.float32)
    dbeta = d.sum(axis=ax)
    dgamma = (d * xhat).sum(axis=ax)
    dx = _b(gamma.astype(np.float32) * inv / m, x) * (m * d - _b(dbeta, x) - xhat * _b(dgamma, x))
    return dx.astype(x.dtype), dgamma.astype(x.dtype), dbeta.astype(x.dtype)


def batch_norm_inference_backward(dy, gamma, var, eps=1e-5, y=None):
    xp = _xp(dy)
    if y is not None:
        dy = dy * (y > 0)
    inv = 1.0 / xp.sqrt(var + np.float32(eps))
    return (dy.astype(np.float32) * _b(gamma.astype(np.float32) * inv, dy)).astype(dy.dtype)


def fold_batch_norm(w, b, gamma, beta, mean, var, eps=1e-5):
    xp = _xp(w)
    scale = gamma.astype(np.float32) / xp.sqrt(var + np.float32(eps))
    shape = (-1,) + (1,) * (w.ndim - 1) if w.ndim == 4 else (1, -1)
    w2 = (w.astype(np.float32) * scale.reshape(shape)).astype(w.dtype)
    b0 = b.astype(np.float32) if b is not None else xp.zeros_like(scale)
    b2 = ((b0 - mean) * scale + beta.astype(np.float32)).astype(w.dtype)
    return w2, b2


def global_avg_pool2d(x):
    return x.astype(np.float32).mean(axis=(2, 3)).astype(x.dtype)


def global_avg_pool2d_backward(dy, x_shape):
    xp = _xp(dy)
    n, c, h, w = x_shape
    d = dy.astype(np.float32) / np.float32(h * w)
    return xp.broadcast_to(d[:, :, None, None], x_shape).astype(dy.dtype)
