"""``Ensemble``: several trained models voting by averaged probabilities."""

from __future__ import annotations

import numpy as np

from . import losses as losses_mod
from .backend import to_numpy

__all__ = ["Ensemble"]


class Ensemble:
    """Average the output probabilities of ``models`` (softmax of each member's scores, or
    sigmoid for members trained with binary cross-entropy): the committee of Ciresan et al.
    (2012) and of most MNIST records.

    ``predict`` and ``evaluate`` work like a model's. Members may live on different backends
    and dtypes; their probabilities are averaged in float32 on the host.

    Parameters
    ----------
    models : list of Model
        Built models with the same input and output shapes.
    weights : list of float, optional
        Non-negative member weights (normalised); equal by default.
    """

    def __init__(self, models, weights=None):
        from .model import Model

        if isinstance(models, Model) or not isinstance(models, (list, tuple)):
            raise TypeError(f"models must be a list of Model objects, got {type(models).__name__}")
        if not models:
            raise ValueError("models must hold at least one model")
        for i, m in enumerate(models):
            if not isinstance(m, Model):
                raise TypeError(f"models[{i}] must be a Model, got {type(m).__name__}")
            if not m.built:
                raise ValueError(f"models[{i}] is not built")
            if tuple(m.input_shape) != tuple(models[0].input_shape):
                raise ValueError(
                    f"models[{i}] takes inputs {tuple(m.input_shape)}, models[0] "
                    f"{tuple(models[0].input_shape)}"
                )
            if tuple(m.output_shape) != tuple(models[0].output_shape):
                raise ValueError(
                    f"models[{i}] has outputs {tuple(m.output_shape)}, models[0] "
                    f"{tuple(models[0].output_shape)}"
                )
        self.models = list(models)
        self._loss_fns = [m.loss or losses_mod.SoftmaxCrossEntropy() for m in self.models]
        kinds = {type(f).__name__ for f in self._loss_fns}
        if len(kinds) != 1 or not hasattr(self._loss_fns[0], "probabilities"):
            raise ValueError(f"members must share a probabilistic loss, got {sorted(kinds)}")
        if isinstance(self._loss_fns[0], losses_mod.MeanSquaredError):
            raise ValueError("an ensemble averages probabilities; regression members have none")
        if weights is None:
            w = np.full(len(models), 1.0 / len(models))
        else:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (len(models),) or not np.all(np.isfinite(w)) or (w < 0).any():
                raise ValueError(
                    f"weights must be {len(models)} finite numbers >= 0, got {weights!r}"
                )
            if w.sum() <= 0:
                raise ValueError("weights must not all be 0")
            w = w / w.sum()
        self.weights = w

    @property
    def input_shape(self):
        return self.models[0].input_shape

    @property
    def output_shape(self):
        return self.models[0].output_shape

    def member_probabilities(self, x, batch_size: int = 100) -> list:
        """Each member's probabilities, float32 NumPy ``(N, K)``."""
        return [
            to_numpy(m.predict(x, batch_size=batch_size, probabilities=True)).astype(np.float32)
            for m in self.models
        ]

    def predict(self, x, batch_size: int = 100, probabilities: bool = True):
        """The weighted average of the members' probabilities, float32 NumPy ``(N, K)``."""
        if probabilities is not True:
            raise ValueError("an Ensemble predicts averaged probabilities (probabilities=True)")
        probs = self.member_probabilities(x, batch_size)
        out = np.zeros_like(probs[0])
        for w, p in zip(self.weights, probs, strict=True):
            out += np.float32(w) * p
        return out

    def evaluate(self, x, y, batch_size: int = 100) -> dict:
        """``{"loss", "accuracy"}`` of the averaged probabilities: the cross-entropy
        ``-mean log p[y]`` (binary cross-entropy for sigmoid members) and the accuracy."""
        p = self.predict(x, batch_size)
        y = to_numpy(np.asarray(y) if isinstance(y, (list, tuple)) else y)
        n = p.shape[0]
        self._loss_fns[0].check_targets(y, n, self.output_shape, "y")
        tiny = np.float32(1e-12)
        if isinstance(self._loss_fns[0], losses_mod.BinaryCrossEntropy):
            t = y.astype(np.float32)
            q = np.clip(p, tiny, 1 - tiny)
            loss = float(-(t * np.log(q) + (1 - t) * np.log(1 - q)).mean())
            acc = float(((p > 0.5) == (t > 0.5)).mean())
            return {"loss": loss, "accuracy": acc}
        labels = y.argmax(axis=1) if y.ndim == 2 else y
        loss = float(-np.log(np.maximum(p[np.arange(n), labels], tiny)).mean())
        acc = float((p.argmax(axis=1) == labels).mean())
        return {"loss": loss, "accuracy": acc}

    def __len__(self):
        return len(self.models)

    def __repr__(self):
        return f"Ensemble({len(self.models)} models)"
