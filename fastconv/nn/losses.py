"""Softmax cross-entropy, computed in float32 whatever the score dtype (log-sum-exp is stable)."""

from __future__ import annotations

import numpy as np

from .. import _checks as chk
from .backend import array_module

__all__ = ["SoftmaxCrossEntropy", "get"]


def check_labels(y, n: int, num_classes: int, name: str = "y"):
    """Validate integer labels (N,) in [0, num_classes) or one-hot/probability targets (N, K)."""
    if not (isinstance(y, np.ndarray) or chk.is_cupy_array(y)):
        raise TypeError(f"{name} must be a numpy.ndarray or cupy.ndarray, got {type(y).__name__}")
    if y.ndim == 1:
        if y.dtype.kind not in "iu":
            raise TypeError(f"{name} with shape (N,) must hold integer class labels, got {y.dtype}")
        if y.shape[0] != n:
            raise ValueError(f"{name} must have {n} labels (one per sample), got {y.shape[0]}")
        if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"{name} labels must be in [0, {num_classes}), got range "
                f"[{int(y.min())}, {int(y.max())}]"
            )
    elif y.ndim == 2:
        if y.shape != (n, num_classes):
            raise ValueError(
                f"one-hot {name} must have shape {(n, num_classes)}, got {tuple(y.shape)}"
            )
    else:
        raise ValueError(
            f"{name} must be integer labels (N,) or one-hot (N, K), got shape {tuple(y.shape)}"
        )
    return y


class SoftmaxCrossEntropy:
    """Mean over the batch of ``-log softmax(scores)[y]``.

    ``forward(scores, y) -> float`` with ``y`` integer labels (N,) or one-hot (N, K);
    ``backward() -> dscores = (softmax(scores) - onehot(y)) / N`` in the scores' dtype.
    """

    name = "softmax_cross_entropy"

    def __init__(self):
        self._probs = None
        self._y = None

    def forward(self, scores, y) -> float:
        chk.check_array(scores, "scores", 2)
        n, k = scores.shape
        if n == 0:
            raise ValueError("scores must hold at least one sample")
        check_labels(y, n, k)
        xp = array_module(scores)
        s = scores.astype(np.float32)
        s -= s.max(axis=1, keepdims=True)
        log_z = xp.log(xp.exp(s).sum(axis=1, keepdims=True))
        log_p = s - log_z
        if y.ndim == 1:
            loss = -log_p[xp.arange(n), y].mean()
        else:
            loss = -(y.astype(np.float32) * log_p).sum() / n
        self._probs = xp.exp(log_p)
        self._y = y
        self._dtype = scores.dtype
        return float(loss)

    def backward(self):
        if self._probs is None:
            raise RuntimeError("SoftmaxCrossEntropy.backward() needs a preceding forward()")
        xp = array_module(self._probs)
        d = self._probs
        n = d.shape[0]
        if self._y.ndim == 1:
            d[xp.arange(n), self._y] -= 1.0
        else:
            d -= self._y.astype(np.float32)
        d /= n
        self._probs = None
        return d.astype(self._dtype, copy=False)


_BY_NAME = {"softmax_cross_entropy": SoftmaxCrossEntropy}


def get(loss):
    if isinstance(loss, str):
        try:
            return _BY_NAME[loss]()
        except KeyError:
            raise ValueError(f"loss must be one of {sorted(_BY_NAME)}, got {loss!r}") from None
    if hasattr(loss, "forward") and hasattr(loss, "backward"):
        return loss
    raise TypeError(f"loss must be a name or an object with forward/backward, got {loss!r}")
