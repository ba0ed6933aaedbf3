"""Fused optimizer updates: one pass over each parameter, no temporaries.

The array expressions of :mod:`fastconv.nn.optimizers` allocate parameter-sized temporaries at
every step (Adam: ``g - m``, ``g*g``, ``g*g - v``, ``sqrt(v)``, ``+ eps``, ``lr_t*m``, the
quotient; momentum: ``lr*g``), each a separate pass over memory: for AlexNet's 61M weights that
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
