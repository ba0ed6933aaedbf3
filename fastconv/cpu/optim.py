"""Fused optimizer updates: one pass over each parameter, no temporaries.

The array expressions of :mod:`fastconv.nn.optimizers` allocate parameter-sized temporaries at
every step (Adam: ``g - m``, ``g*g``, ``g*g - v``, ``sqrt(v)``, ``+ eps``, ``lr_t*m``, the
quotient; momentum: ``lr*g``; likewise SGD, Nesterov, AdaGrad and RMSProp), each a separate pass
over memory: for AlexNet's 61M weights that
is ~2 GB of traffic and, for a 411 MB weight matrix, a 411 MB peak on top of the model. These
kernels do the same float32 operations in the same order per element (no fastmath, so no
contraction into FMAs), so their results are bit-identical to the expressions'.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def adam_update(p, g, m, v, c1, c2, lr_t, eps):
    """``m += c1*(g - m);  v += c2*(g*g - v);  p -= lr_t*m / (sqrt(v) + eps)`` on flat
    float32 arrays (``c1 = 1 - beta1``, ``c2 = 1 - beta2``)."""
    for i in prange(p.size):
        gi = g[i]
        mi = m[i] + c1 * (gi - m[i])
        vi = v[i] + c2 * (gi * gi - v[i])
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - lr_t * mi / (np.sqrt(vi) + eps)


@njit(parallel=True, cache=True)
def momentum_update(p, g, v, momentum, lr):
    """``v = momentum*v - lr*g;  p += v`` on flat float32 arrays."""
    for i in prange(p.size):
        vi = v[i] * momentum - lr * g[i]
        v[i] = vi
        p[i] = p[i] + vi


@njit(parallel=True, cache=True)
def sgd_update(p, g, lr):
    """``p -= lr*g`` on flat float32 arrays."""
    for i in prange(p.size):
        p[i] = p[i] - lr * g[i]


@njit(parallel=True, cache=True)
def nesterov_update(p, g, v, momentum, lr, mm, c):
    """``v = momentum*v - lr*g;  p += mm*v;  p -= c*g`` on flat float32 arrays, with the
    scalars ``mm = momentum*momentum`` and ``c = (1 + momentum)*lr`` rounded by the caller
    as the array expressions round them."""
    for i in prange(p.size):
        gi = g[i]
        vi = v[i] * momentum - lr * gi
        v[i] = vi
        pi = p[i] + mm * vi
        p[i] = pi - c * gi


@njit(parallel=True, cache=True)
def adagrad_update(p, g, h, lr, eps):
    """``h += g*g;  p -= lr*g / (sqrt(h) + eps)`` on flat float32 arrays."""
    for i in prange(p.size):
        gi = g[i]
        hi = h[i] + gi * gi
        h[i] = hi
        p[i] = p[i] - lr * gi / (np.sqrt(hi) + eps)


@njit(parallel=True, cache=True)
def rmsprop_update(p, g, h, decay, c, lr, eps):
    """``h = h*decay + (c*g)*g;  p -= lr*g / (sqrt(h) + eps)`` on flat float32 arrays
    (``c = 1 - decay``)."""
    for i in prange(p.size):
        gi = g[i]
        hi = h[i] * decay + c * gi * gi
        h[i] = hi
        p[i] = p[i] - lr * gi / (np.sqrt(hi) + eps)
