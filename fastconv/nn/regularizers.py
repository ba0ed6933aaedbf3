"""Weight penalties added to the loss per layer: ``Dense(..., kernel_regularizer=L2(1e-4))``.

A regulariser adds ``penalty(w)`` to the training loss and ``gradient(w)`` to the weight's
gradient at every step (Keras's conventions: ``L1(l1)``: ``l1 * sum|w|``, gradient
``l1 * sign(w)``; ``L2(l2)``: ``l2 * sum(w**2)``, gradient ``2 * l2 * w``). For Adam, prefer
decoupled weight decay (:class:`fastconv.nn.AdamW`): an L2 gradient is rescaled by Adam's
per-weight step sizes, so it does not shrink weights uniformly (Loshchilov & Hutter, 2019).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .backend import array_module

__all__ = ["Regularizer", "L1", "L2", "L1L2", "get"]


def _factor(value, name):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    # finite in float32 too: the gradient term is computed in float32
    if not ok or not math.isfinite(value) or value < 0 or value > float(np.finfo(np.float32).max):
        raise ValueError(f"{name} must be a finite number >= 0 (in float32), got {value!r}")
    return float(value)


class Regularizer:
    """``l1 * sum|w| + l2 * sum(w**2)``; subclasses only fix which factors they take."""

    def __init__(self, l1=0.0, l2=0.0):
        self.l1 = _factor(l1, "l1")
        self.l2 = _factor(l2, "l2")

    def penalty(self, w) -> float:
        w32 = w.astype(np.float32, copy=False)
        xp = array_module(w)
        total = 0.0
        if self.l1:
            total += self.l1 * float(xp.abs(w32).sum(dtype=np.float64))
        if self.l2:
            total += self.l2 * float((w32 * w32).sum(dtype=np.float64))
        return total

    def gradient(self, w):
        """d penalty / d w, in ``w``'s dtype."""
        w32 = w.astype(np.float32, copy=False)
        g = (2.0 * self.l2) * w32 if self.l2 else array_module(w).zeros_like(w32)
        if self.l1:
            g = g + np.float32(self.l1) * array_module(w).sign(w32)
        return g.astype(w.dtype, copy=False)

    def get_config(self) -> dict:
        return {"class": "L1L2", "l1": self.l1, "l2": self.l2}

    def __repr__(self):
        return f"{type(self).__name__}(l1={self.l1}, l2={self.l2})"


class L1(Regularizer):
    """``l1 * sum|w|`` (sparse weights)."""

    def __init__(self, l1=0.01):
        super().__init__(l1=l1)


class L2(Regularizer):
    """``l2 * sum(w**2)`` (weight decay coupled to the gradient)."""

    def __init__(self, l2=0.01):
        super().__init__(l2=l2)


class L1L2(Regularizer):
    """Both penalties."""


def get(value):
    """None, a :class:`Regularizer`, a config dict (what ``get_config`` returns, as stored in
    checkpoints) or a name "l1"/"l2" (factor 0.01)."""
    if value is None or isinstance(value, Regularizer):
        return value
    if isinstance(value, str) and value in ("l1", "l2"):
        return L1() if value == "l1" else L2()
    if isinstance(value, dict) and value.get("class") in ("L1", "L2", "L1L2"):
        return L1L2(value.get("l1", 0.0), value.get("l2", 0.0))
    raise ValueError(
        f"a regularizer must be None, L1(...), L2(...), L1L2(...), 'l1', 'l2' or a config dict, "
        f"got {value!r}"
    )
