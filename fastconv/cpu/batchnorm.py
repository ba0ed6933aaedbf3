"""Batch normalisation on the CPU: Numba kernels, float32 and float16 (as uint16 bits).

Every input is seen as ``(N, C, P)`` (``P = H*W``, 1 for a 2-D ``(N, C)`` input).

* Training statistics are reduced **per channel, one channel per task** (``prange`` over C):
  each channel's sum is taken by one thread in a fixed order, so the result never depends on
  the thread count or scheduling. The variance takes two passes (sum, then sum of squared
  deviations from the mean), not ``E[x^2] - E[x]^2``, which cancels catastrophically in float32.
  Each pass sums a channel plane by plane (a vectorised float32 sum of P values, then the N
  plane sums), which keeps the rounding error near ``(P/16 + N)`` ulps instead of ``N*P``.
* The three passes of the forward (mean, variance, normalise) and the two of the backward
  (sums, dx) run back to back on one channel, whose data (313 KB for the largest deep-MNIST
  layer, 16@28x28 at batch 100) stays in the 1 MB L2 cache between passes: the tensor is read
  from memory about once.
* 2-D input ``(N, C)`` with many channels would read one float per cache line channel by
  channel; those go through ``*_rows`` kernels that own a block of ``_CB`` adjacent channels
  and walk the rows, summing the block's channels side by side (still a fixed order).
* Inference (a per-channel affine map) and its backward are elementwise: ``prange`` over N.
* Statistics and per-channel coefficients are float32; ``mean``/``var`` are float32 for both
  dtypes, ``gamma``/``beta``/``dgamma``/``dbeta`` are in x's dtype.

Small problems run serial kernels (``_SERIAL_BELOW`` elements): a parallel region costs more to
start than these take (measured in docs/normalization.md).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._half import bits_view, load, store_value

__all__ = [
    "batch_norm_forward",
    "batch_norm_inference",
    "batch_norm_backward",
    "batch_norm_inference_backward",
]

# Reassociation lets LLVM vectorise the reductions (a fixed order per compiled kernel, so still
# deterministic); no nnan/ninf: NaN and inf must propagate.
_FASTMATH = {"contract", "reassoc", "arcp", "nsz"}
_CB = 16  # channels per task in the 2-D (rows) kernels: one AVX-512 register of float32
_SERIAL_BELOW = 1 << 15  # elements; below this a parallel launch costs more than it saves


# --- per-channel helpers (one thread owns the channel) ----------------------------------------


@njit(inline="always", fastmath=_FASTMATH)
def _channel_mean(x, c, N, P):
    total = np.float32(0.0)
    for n in range(N):
        s = np.float32(0.0)
        for p in range(P):
            s += load(x[n, c, p])
        total += s
    return total / np.float32(N * P)


@njit(inline="always", fastmath=_FASTMATH)
def _channel_var(x, c, N, P, mu):
    total = np.float32(0.0)
    for n in range(N):
        s = np.float32(0.0)
        for p in range(P):
            d = load(x[n, c, p]) - mu
            s += d * d
        total += s
    return total / np.float32(N * P)


@njit(inline="always")
def _inv_std(var, eps):
    return np.float32(1.0) / np.sqrt(var + np.float32(eps))


@njit(inline="always")
def _relu(v):
    # v < 0 is False for NaN, so NaN passes through (as torch.relu and np.maximum).
    return np.float32(0.0) if v < np.float32(0.0) else v


@njit(inline="always")
def _masked(dy, y, n, c, p):
    """dy * (y > 0) in float32 when the forward fused a ReLU (``y`` given), else dy."""
    d = load(dy[n, c, p])
    if y is not None:
        d = d * (np.float32(1.0) if load(y[n, c, p]) > np.float32(0.0) else np.float32(0.0))
    return d


@njit(inline="always", fastmath=_FASTMATH)
def _forward_channel(x, gamma, beta, y, mean, var, eps, relu, c):
    N, _, P = x.shape
    mu = _channel_mean(x, c, N, P)
    v = _channel_var(x, c, N, P, mu)
    scale = load(gamma[c]) * _inv_std(v, eps)
    shift = load(beta[c]) - mu * scale
    for n in range(N):
        for p in range(P):
            out = load(x[n, c, p]) * scale + shift
            y[n, c, p] = store_value(y, _relu(out) if relu else out)
    mean[c] = mu
    var[c] = v


@njit(inline="always", fastmath=_FASTMATH)
def _backward_channel(dy, x, y, gamma, mean, var, dx, dgamma, dbeta, eps, c):
    N, _, P = x.shape
    mu = mean[c]
    inv_std = _inv_std(var[c], eps)
    sum_dy = np.float32(0.0)
    sum_dy_xc = np.float32(0.0)
    for n in range(N):
        s1 = np.float32(0.0)
        s2 = np.float32(0.0)
        for p in range(P):
            d = _masked(dy, y, n, c, p)
            s1 += d
            s2 += d * (load(x[n, c, p]) - mu)
        sum_dy += s1
        sum_dy_xc += s2
    sum_dy_xhat = sum_dy_xc * inv_std
    M = np.float32(N * P)
    # dx = gamma*invstd/M * (M*dy - sum(dy) - xhat*sum(dy*xhat))
    k = load(gamma[c]) * inv_std / M
    for n in range(N):
        for p in range(P):
            xhat = (load(x[n, c, p]) - mu) * inv_std
            d = _masked(dy, y, n, c, p)
            dx[n, c, p] = store_value(dx, k * (M * d - sum_dy - xhat * sum_dy_xhat))
    dgamma[c] = store_value(dgamma, sum_dy_xhat)
    dbeta[c] = store_value(dbeta, sum_dy)


# --- training forward --------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _forward_planes(x, gamma, beta, y, mean, var, eps, relu):
    for c in prange(x.shape[1]):
        _forward_channel(x, gamma, beta, y, mean, var, eps, relu, c)


@njit(cache=True, fastmath=_FASTMATH)
def _forward_planes_serial(x, gamma, beta, y, mean, var, eps, relu):
    for c in range(x.shape[1]):
        _forward_channel(x, gamma, beta, y, mean, var, eps, relu, c)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _forward_rows(x, gamma, beta, y, mean, var, eps, relu):
    # x, y: (N, C). Task = a block of _CB channels; each channel still sums rows in order.
    N, C = x.shape
    for blk in prange((C + _CB - 1) // _CB):
        c0 = blk * _CB
        w = min(_CB, C - c0)
        acc = np.zeros(_CB, dtype=np.float32)
        for n in range(N):
            for j in range(w):
                acc[j] += load(x[n, c0 + j])
        mu = acc / np.float32(N)
        acc[:] = 0.0
        for n in range(N):
            for j in range(w):
                d = load(x[n, c0 + j]) - mu[j]
                acc[j] += d * d
        scale = np.empty(_CB, dtype=np.float32)
        shift = np.empty(_CB, dtype=np.float32)
        for j in range(w):
            v = acc[j] / np.float32(N)
            mean[c0 + j] = mu[j]
            var[c0 + j] = v
            scale[j] = load(gamma[c0 + j]) * _inv_std(v, eps)
            shift[j] = load(beta[c0 + j]) - mu[j] * scale[j]
        for n in range(N):
            for j in range(w):
                out = load(x[n, c0 + j]) * scale[j] + shift[j]
                y[n, c0 + j] = store_value(y, _relu(out) if relu else out)


# --- training backward -------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _backward_planes(dy, x, y, gamma, mean, var, dx, dgamma, dbeta, eps):
    for c in prange(x.shape[1]):
        _backward_channel(dy, x, y, gamma, mean, var, dx, dgamma, dbeta, eps, c)


@njit(cache=True, fastmath=_FASTMATH)
def _backward_planes_serial(dy, x, y, gamma, mean, var, dx, dgamma, dbeta, eps):
    for c in range(x.shape[1]):
        _backward_channel(dy, x, y, gamma, mean, var, dx, dgamma, dbeta, eps, c)


@njit(inline="always")
def _masked_row(dy, y, n, c):
    d = load(dy[n, c])
    if y is not None:
        d = d * (np.float32(1.0) if load(y[n, c]) > np.float32(0.0) else np.float32(0.0))
    return d


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _backward_rows(dy, x, y, gamma, mean, var, dx, dgamma, dbeta, eps):
    N, C = x.shape
    M = np.float32(N)
    for blk in prange((C + _CB - 1) // _CB):
        c0 = blk * _CB
        w = min(_CB, C - c0)
        mu = np.zeros(_CB, dtype=np.float32)
        inv_std = np.zeros(_CB, dtype=np.float32)
        for j in range(w):
            mu[j] = mean[c0 + j]
            inv_std[j] = _inv_std(var[c0 + j], eps)
        sum_dy = np.zeros(_CB, dtype=np.float32)
        sum_dy_xc = np.zeros(_CB, dtype=np.float32)
        for n in range(N):
            for j in range(w):
                d = _masked_row(dy, y, n, c0 + j)
                sum_dy[j] += d
                sum_dy_xc[j] += d * (load(x[n, c0 + j]) - mu[j])
        sum_dy_xhat = sum_dy_xc * inv_std
        k = np.empty(_CB, dtype=np.float32)
        for j in range(w):
            k[j] = load(gamma[c0 + j]) * inv_std[j] / M
            dgamma[c0 + j] = store_value(dgamma, sum_dy_xhat[j])
            dbeta[c0 + j] = store_value(dbeta, sum_dy[j])
        for n in range(N):
            for j in range(w):
                xhat = (load(x[n, c0 + j]) - mu[j]) * inv_std[j]
                d = _masked_row(dy, y, n, c0 + j)
                dx[n, c0 + j] = store_value(dx, k[j] * (M * d - sum_dy[j] - xhat * sum_dy_xhat[j]))


# --- inference: a per-channel affine map, and its gradient -----------------------------------


@njit(inline="always", fastmath=_FASTMATH)
def _affine_row(x, scale, shift, y, relu, n):
    C, P = x.shape[1], x.shape[2]
    for c in range(C):
        a, b = scale[c], shift[c]
        for p in range(P):
            out = load(x[n, c, p]) * a + b
            y[n, c, p] = store_value(y, _relu(out) if relu else out)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _affine(x, scale, shift, y, relu):
    for n in prange(x.shape[0]):
        _affine_row(x, scale, shift, y, relu, n)


@njit(cache=True, fastmath=_FASTMATH)
def _affine_serial(x, scale, shift, y, relu):
    for n in range(x.shape[0]):
        _affine_row(x, scale, shift, y, relu, n)


@njit(inline="always", fastmath=_FASTMATH)
def _scale_grad_row(dy, y, scale, dx, n):
    C, P = dy.shape[1], dy.shape[2]
    for c in range(C):
        a = scale[c]
        for p in range(P):
            dx[n, c, p] = store_value(dx, _masked(dy, y, n, c, p) * a)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _scale_grad(dy, y, scale, dx):
    for n in prange(dy.shape[0]):
        _scale_grad_row(dy, y, scale, dx, n)


@njit(cache=True, fastmath=_FASTMATH)
def _scale_grad_serial(dy, y, scale, dx):
    for n in range(dy.shape[0]):
        _scale_grad_row(dy, y, scale, dx, n)


@njit(cache=True)
def _inference_coefficients(gamma, beta, mean, var, eps, scale, shift):
    # float32, in the same expression order as the training forward's coefficients.
    for c in range(scale.shape[0]):
        scale[c] = load(gamma[c]) * _inv_std(var[c], eps)
        shift[c] = (load(beta[c]) if beta is not None else np.float32(0.0)) - mean[c] * scale[c]


# --- backend entry points (validated, C-contiguous, non-empty) ---------------------------------


def _view3(a, g):
    """(N, C[, H, W]) -> kernel view (N, C, P), half as uint16 bits."""
    return bits_view(a).reshape(g.N, g.C, g.P)


def _use_rows(g) -> bool:
    # 2-D input: per-channel loops would stride by C; wide channel blocks read whole rows.
    return g.P == 1 and g.C >= _CB


def batch_norm_forward(x, gamma, beta, g, eps, relu):
    """Backend of :func:`fastconv.batch_norm_forward`: ``(y, mean, var)``."""
    y = np.empty(g.shape, dtype=x.dtype)
    mean = np.empty(g.C, dtype=np.float32)
    var = np.empty(g.C, dtype=np.float32)
    args = (bits_view(gamma), bits_view(beta))
    if _use_rows(g):
        _forward_rows(bits_view(x), *args, bits_view(y), mean, var, eps, relu)
    else:
        kernel = _forward_planes_serial if x.size < _SERIAL_BELOW else _forward_planes
        kernel(_view3(x, g), *args, _view3(y, g), mean, var, eps, relu)
    return y, mean, var


def batch_norm_backward(dy, x, gamma, mean, var, g, eps, y):
    """Backend of :func:`fastconv.batch_norm_backward`: ``(dx, dgamma, dbeta)``."""
    dx = np.empty(g.shape, dtype=x.dtype)
    dgamma = np.empty(g.C, dtype=x.dtype)
    dbeta = np.empty(g.C, dtype=x.dtype)
    tail = (bits_view(gamma), mean, var)
    outs = (bits_view(dx), bits_view(dgamma), bits_view(dbeta), eps)
    if _use_rows(g):
        yv = None if y is None else bits_view(y)
        _backward_rows(bits_view(dy), bits_view(x), yv, *tail, *outs)
    else:
        kernel = _backward_planes_serial if x.size < _SERIAL_BELOW else _backward_planes
        yv = None if y is None else _view3(y, g)
        outs = (_view3(dx, g),) + outs[1:]
        kernel(_view3(dy, g), _view3(x, g), yv, *tail, *outs)
    return dx, dgamma, dbeta


def _coefficients(gamma, beta, mean, var, eps):
    scale = np.empty(mean.shape[0], dtype=np.float32)
    shift = np.empty_like(scale)
    _inference_coefficients(
        bits_view(gamma), None if beta is None else bits_view(beta), mean, var, eps, scale, shift
    )
    return scale, shift


def batch_norm_inference(x, gamma, beta, mean, var, g, eps, relu):
    """Backend of :func:`fastconv.batch_norm_inference`."""
    scale, shift = _coefficients(gamma, beta, mean, var, eps)
    y = np.empty(g.shape, dtype=x.dtype)
    kernel = _affine_serial if x.size < _SERIAL_BELOW else _affine
    kernel(_view3(x, g), scale, shift, _view3(y, g), relu)
    return y


def batch_norm_inference_backward(dy, gamma, var, g, eps, y):
    """Backend of :func:`fastconv.batch_norm_inference_backward`: ``dy * gamma / sqrt(var+eps)``
    (masked by ``y > 0`` when given)."""
    scale, _ = _coefficients(gamma, None, var, var, eps)  # shift unused
    dx = np.empty(g.shape, dtype=dy.dtype)
    kernel = _scale_grad_serial if dy.size < _SERIAL_BELOW else _scale_grad
    kernel(_view3(dy, g), None if y is None else _view3(y, g), scale, _view3(dx, g))
    return dx
