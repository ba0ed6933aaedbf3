"""Losses, computed in float32 whatever the score dtype.

* :class:`SoftmaxCrossEntropy`: classification (one class per sample), optional label
  smoothing; log-sum-exp is stable.
* :class:`BinaryCrossEntropy`: multi-label outputs (an independent yes/no per output unit),
  computed from the logits as ``max(s, 0) - s*y + log(1 + exp(-|s|))`` (no overflow).
* :class:`MeanSquaredError`: regression.

Each takes the model's raw outputs ("scores", no activation layer), has ``forward(scores, y)
-> float`` and ``backward() -> dscores``, ``check_targets(y, n, output_shape)`` (what ``fit`` and
``evaluate`` accept as targets) and ``probabilities(scores)`` (what ``predict(...,
probabilities=True)`` returns: softmax, sigmoid, or a ValueError for regression).
"""

from __future__ import annotations

import numbers

import numpy as np

from .. import _checks as chk
from .backend import array_module

__all__ = [
    "Loss",
    "SoftmaxCrossEntropy",
    "BinaryCrossEntropy",
    "MeanSquaredError",
    "LOSS_CLASSES",
    "get",
    "softmax",
    "sigmoid",
]


def check_labels(y, n: int, num_classes: int, name: str = "y"):
    """Validate integer labels (N,) in [0, num_classes) or one-hot/probability targets (N, K)."""
    if not chk.is_array(y):
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


def softmax(scores):
    """Row-wise softmax in float32 (max-shifted)."""
    xp = array_module(scores)
    s = scores.astype(np.float32)
    s -= s.max(axis=1, keepdims=True)
    e = xp.exp(s)
    e /= e.sum(axis=1, keepdims=True)
    return e


def sigmoid(scores):
    """Element-wise logistic function in float32, without overflow."""
    xp = array_module(scores)
    s = scores.astype(np.float32)
    e = xp.exp(-xp.abs(s))
    return xp.where(s >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


def _scores(scores):
    chk.check_array(scores, "scores")
    if scores.ndim < 2:
        raise ValueError(f"scores must have shape (N, outputs), got {tuple(scores.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("scores must hold at least one sample")
    return scores


class Loss:
    """Base class: ``name`` (for checkpoints and ``compile(loss=...)``), ``get_config()``."""

    name = "loss"
    #: a classification loss: ``fit`` reports accuracy by default
    classification = False

    def get_config(self) -> dict:
        return {}

    def check_targets(self, y, n: int, output_shape, name: str = "y"):
        raise NotImplementedError

    def probabilities(self, scores):
        raise ValueError(f"{type(self).__name__} outputs are not probabilities")

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class SoftmaxCrossEntropy(Loss):
    """Mean over the batch of ``-sum_k q_k log softmax(scores)_k``.

    ``q`` is the one-hot target (from integer labels (N,) or given (N, K)); with
    ``label_smoothing`` e, ``q = (1 - e) * q + e / K`` (Szegedy et al., 2016).
    ``backward() -> dscores = (softmax(scores) - q) / N`` in the scores' dtype.
    """

    name = "softmax_cross_entropy"
    classification = True

    def __init__(self, label_smoothing=0.0):
        ok = isinstance(label_smoothing, numbers.Real) and not isinstance(label_smoothing, bool)
        if not ok or not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self._probs = None
        self._y = None

    def get_config(self):
        return {"label_smoothing": self.label_smoothing} if self.label_smoothing else {}

    def check_targets(self, y, n, output_shape, name="y"):
        return check_labels(y, n, int(output_shape[0]), name)

    def probabilities(self, scores):
        return softmax(scores)

    def _target(self, y, n, k, xp):
        """Dense float32 targets q (N, K), smoothed."""
        if y.ndim == 1:
            q = xp.zeros((n, k), dtype=np.float32)
            q[xp.arange(n), y] = 1.0
        else:
            q = y.astype(np.float32)
        if self.label_smoothing:
            e = np.float32(self.label_smoothing)
            q = q * (1 - e) + e / np.float32(k)
        return q

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
        if y.ndim == 1 and not self.label_smoothing:
            loss = -log_p[xp.arange(n), y].mean()
        else:
            loss = -(self._target(y, n, k, xp) * log_p).sum() / n
        self._probs = xp.exp(log_p)
        self._y = y
        self._dtype = scores.dtype
        return float(loss)

    def backward(self):
        if self._probs is None:
            raise RuntimeError("SoftmaxCrossEntropy.backward() needs a preceding forward()")
        xp = array_module(self._probs)
        d = self._probs
        n, k = d.shape
        if self._y.ndim == 1 and not self.label_smoothing:
            d[xp.arange(n), self._y] -= 1.0
        else:
            d -= self._target(self._y, n, k, xp)
        d /= n
        self._probs = None
        return d.astype(self._dtype, copy=False)


def _dense_targets(y, n, output_shape, name, what):
    if not chk.is_array(y):
        raise TypeError(f"{name} must be a numpy.ndarray or cupy.ndarray, got {type(y).__name__}")
    if y.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold numbers, got dtype {y.dtype}")
    want = (n, *tuple(int(s) for s in output_shape))
    if tuple(y.shape) != want:
        raise ValueError(f"{name} must have shape {want} ({what}), got {tuple(y.shape)}")
    return y


class BinaryCrossEntropy(Loss):
    """Multi-label loss on logits: the mean over every sample and output unit of
    ``-(y log sigmoid(s) + (1 - y) log(1 - sigmoid(s)))`` (PyTorch's ``BCEWithLogitsLoss``),
    computed as ``max(s, 0) - s*y + log(1 + exp(-|s|))``. Targets ``y`` in [0, 1], shaped like
    the outputs. ``backward() = (sigmoid(s) - y) / y.size``."""

    name = "binary_cross_entropy"

    def __init__(self):
        self._cache = None

    def check_targets(self, y, n, output_shape, name="y"):
        y = _dense_targets(y, n, output_shape, name, "a target in [0, 1] per output unit")
        if y.size and (float(y.min()) < 0 or float(y.max()) > 1):
            raise ValueError(f"{name} must lie in [0, 1], got [{float(y.min())}, {float(y.max())}]")
        return y

    def probabilities(self, scores):
        return sigmoid(scores)

    def forward(self, scores, y) -> float:
        _scores(scores)
        self.check_targets(y, scores.shape[0], scores.shape[1:])
        xp = array_module(scores)
        s = scores.astype(np.float32)
        t = y.astype(np.float32)
        loss = xp.maximum(s, 0) - s * t + xp.log1p(xp.exp(-xp.abs(s)))
        self._cache = (s, t, scores.dtype)
        return float(loss.mean())

    def backward(self):
        if self._cache is None:
            raise RuntimeError("BinaryCrossEntropy.backward() needs a preceding forward()")
        s, t, dtype = self._cache
        self._cache = None
        return ((sigmoid(s) - t) / np.float32(s.size)).astype(dtype, copy=False)


class MeanSquaredError(Loss):
    """Regression loss: ``mean((scores - y)**2)`` over every sample and output (PyTorch's
    ``MSELoss``); ``backward() = 2 (scores - y) / y.size``."""

    name = "mean_squared_error"

    def __init__(self):
        self._cache = None

    def check_targets(self, y, n, output_shape, name="y"):
        return _dense_targets(y, n, output_shape, name, "one target per output")

    def forward(self, scores, y) -> float:
        _scores(scores)
        self.check_targets(y, scores.shape[0], scores.shape[1:])
        diff = scores.astype(np.float32) - y.astype(np.float32)
        self._cache = (diff, scores.dtype)
        return float((diff * diff).mean())

    def backward(self):
        if self._cache is None:
            raise RuntimeError("MeanSquaredError.backward() needs a preceding forward()")
        diff, dtype = self._cache
        self._cache = None
        return (diff * np.float32(2.0 / diff.size)).astype(dtype, copy=False)


LOSS_CLASSES = {
    cls.name: cls for cls in (SoftmaxCrossEntropy, BinaryCrossEntropy, MeanSquaredError)
}
_ALIASES = {"bce": "binary_cross_entropy", "mse": "mean_squared_error",
            "categorical_cross_entropy": "softmax_cross_entropy"}  # fmt: skip


def get(loss, **kwargs):
    """A loss from a name (``"softmax_cross_entropy"``, ``"binary_cross_entropy"`` or
    ``"bce"``, ``"mean_squared_error"`` or ``"mse"``; kwargs go to it) or an object as is."""
    if isinstance(loss, str):
        cls = LOSS_CLASSES.get(_ALIASES.get(loss, loss))
        if cls is None:
            names = sorted([*LOSS_CLASSES, *_ALIASES])
            raise ValueError(f"loss must be one of {names}, got {loss!r}")
        return cls(**kwargs)
    if hasattr(loss, "forward") and hasattr(loss, "backward"):
        return loss
    raise TypeError(f"loss must be a name or an object with forward/backward, got {loss!r}")
