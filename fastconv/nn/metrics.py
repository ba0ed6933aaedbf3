"""Metrics beyond the loss: accuracy, top-k accuracy, binary accuracy, mean absolute error,
per-class accuracy, the confusion matrix and its plot.

Batch metrics (for ``model.compile(metrics=[...])``) are objects with a ``name`` and
``__call__(scores, y) -> float``, the batch mean; ``fit`` and ``evaluate`` average them over
samples. ``"accuracy"`` follows the loss, as in Keras: the arg-max accuracy for softmax
cross-entropy, the thresholded per-unit accuracy for binary cross-entropy.
The whole-set functions (:func:`confusion_matrix`, :func:`per_class_accuracy`) take labels.
"""

from __future__ import annotations

import numbers

import numpy as np

from .backend import to_numpy

__all__ = [
    "Metric",
    "Accuracy",
    "TopKAccuracy",
    "BinaryAccuracy",
    "MeanAbsoluteError",
    "get",
    "accuracy",
    "top_k_accuracy",
    "confusion_matrix",
    "per_class_accuracy",
    "plot_confusion_matrix",
]


def _labels_of(y):
    """Integer labels from labels (N,) or one-hot/probabilities (N, K)."""
    return y.argmax(axis=1) if y.ndim == 2 else y


def accuracy(scores, y) -> float:
    """Share of samples whose highest score is the label (ties: the first index)."""
    return float((scores.argmax(axis=1) == _labels_of(y)).mean())


def top_k_accuracy(scores, y, k: int = 5) -> float:
    """Share of samples whose label is among the ``k`` highest scores. A tie at the k-th
    place counts against the sample only if the label's score is strictly below the k-th."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    scores = to_numpy(scores).astype(np.float32)
    y = to_numpy(_labels_of(y))
    n, classes = scores.shape
    if k >= classes:
        return 1.0
    kth = np.partition(scores, classes - k, axis=1)[:, classes - k]
    return float((scores[np.arange(n), y] >= kth).mean())


class Metric:
    """A batch metric: ``name`` (the log key) and ``__call__(scores, y) -> float``."""

    name = "metric"

    def __call__(self, scores, y) -> float:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


class Accuracy(Metric):
    """Arg-max accuracy (single-label classification)."""

    name = "accuracy"

    def __call__(self, scores, y):
        return accuracy(scores, y)


class TopKAccuracy(Metric):
    """Label among the ``k`` highest scores; logged as ``top{k}_accuracy``."""

    def __init__(self, k=5):
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        self.k = int(k)
        self.name = f"top{self.k}_accuracy"

    def __call__(self, scores, y):
        return top_k_accuracy(scores, y, self.k)

    def __repr__(self):
        return f"TopKAccuracy(k={self.k})"


class BinaryAccuracy(Metric):
    """Multi-label accuracy: share of (sample, unit) pairs where ``logit > 0`` (probability
    above 0.5) matches ``y > 0.5``. Logged as ``accuracy`` (it replaces it for BCE)."""

    name = "accuracy"

    def __call__(self, scores, y):
        return float(((scores > 0) == (y > 0.5)).mean())


class MeanAbsoluteError(Metric):
    """``mean(|scores - y|)`` (regression); logged as ``mae``."""

    name = "mae"

    def __call__(self, scores, y):
        diff = scores.astype(np.float32) - y.astype(np.float32)
        return float(abs(diff).mean())


def get(metric, loss=None) -> Metric:
    """A metric from a name (``"accuracy"``, ``"top_k_accuracy"`` (k=5), ``"top3_accuracy"``,
    ``"binary_accuracy"``, ``"mae"``) or a :class:`Metric` as is. ``"accuracy"`` becomes
    :class:`BinaryAccuracy` for a binary cross-entropy ``loss``."""
    if isinstance(metric, Metric):
        return metric
    if not isinstance(metric, str):
        raise TypeError(f"metrics must be names or Metric objects, got {metric!r}")
    if metric == "accuracy":
        if getattr(loss, "name", None) == "binary_cross_entropy":
            return BinaryAccuracy()
        if getattr(loss, "name", None) == "mean_squared_error":
            raise ValueError("metric 'accuracy' needs a classification loss; use 'mae'")
        return Accuracy()
    if metric == "binary_accuracy":
        return BinaryAccuracy()
    if metric in ("mae", "mean_absolute_error"):
        return MeanAbsoluteError()
    if metric == "top_k_accuracy":
        return TopKAccuracy(5)
    if metric.startswith("top") and metric.endswith("_accuracy") and metric[3:-9].isdigit():
        return TopKAccuracy(int(metric[3:-9]))
    raise ValueError(
        "metrics may contain 'accuracy', 'top_k_accuracy', 'top<k>_accuracy', "
        f"'binary_accuracy', 'mae' or Metric objects, got {metric!r}"
    )


# --- whole-set metrics ----------------------------------------------------------------------


def _class_count(num_classes, *label_arrays):
    if num_classes is None:
        return int(max(int(a.max()) for a in label_arrays if a.size) + 1)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return int(num_classes)


def _int_labels(a, name):
    a = to_numpy(a)
    if a.ndim == 2:
        a = a.argmax(axis=1)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integer labels (N,) or scores (N, K), got {a.dtype} "
                         f"{a.shape}")  # fmt: skip
    return a.astype(np.int64)


def confusion_matrix(y_true, y_pred, num_classes=None) -> np.ndarray:
    """``cm[i, j]`` = number of samples of class ``i`` predicted as ``j`` (int64). ``y_pred``
    may be labels (N,) or scores (N, K) (arg-max taken); ``y_true`` labels or one-hot."""
    t = _int_labels(y_true, "y_true")
    p = _int_labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.shape} {p.shape}")
    k = _class_count(num_classes, t, p)
    for a, name in ((t, "y_true"), (p, "y_pred")):
        if a.size and (a.min() < 0 or a.max() >= k):
            raise ValueError(f"{name} labels must be in [0, {k}), got [{a.min()}, {a.max()}]")
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def per_class_accuracy(y_true, y_pred, num_classes=None) -> np.ndarray:
    """Recall of every class: correct predictions of class ``i`` / samples of class ``i``
    (NaN for a class with no sample)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def plot_confusion_matrix(cm, path, class_names=None, title="Confusion matrix") -> None:
    """Save ``cm`` as a PNG: counts in every cell, the diagonal (correct) in the colour scale
    of the off-diagonal errors' maximum so that the errors stay visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._files import atomic_write

    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be a square matrix, got shape {cm.shape}")
    k = cm.shape[0]
    names = [str(i) for i in range(k)] if class_names is None else [str(c) for c in class_names]
    if len(names) != k:
        raise ValueError(f"class_names must have {k} entries, got {len(names)}")
    off = cm.copy()
    np.fill_diagonal(off, 0)
    vmax = max(int(off.max()), 1)
    fig, ax = plt.subplots(figsize=(0.5 * k + 2.5, 0.5 * k + 2))
    ax.imshow(np.minimum(cm, vmax), cmap="Reds", vmin=0, vmax=vmax)
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                color = "black" if i != j else "tab:green"
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set(xlabel="predicted", ylabel="true")
    total = int(cm.sum())
    wrong = total - int(np.trace(cm))
    ax.set_title(f"{title}: {wrong} of {total} wrong", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"), suffix=".png")
    plt.close(fig)
