"""Training callbacks with Keras hook names.

Hooks: ``on_train_begin(logs)``, ``on_train_end(logs)``, ``on_epoch_begin(epoch, logs)``,
``on_epoch_end(epoch, logs)``, ``on_batch_end(batch, logs)``. ``logs`` at epoch end holds
``loss``, ``accuracy`` (training, averaged over the epoch's batches, dropout on) and, with
validation data, ``val_loss`` and ``val_accuracy``. A callback stops training by setting
``self.model.stop_training = True``.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import os
import warnings

import numpy as np

from ._files import strict_json, write_json_atomic

__all__ = [
    "Callback",
    "CallbackList",
    "ProgressLogger",
    "History",
    "ModelCheckpoint",
    "ResumableCheckpoint",
    "EarlyStopping",
    "LearningRateScheduler",
    "CSVLogger",
    "JSONLogger",
    "TerminateOnNaN",
    "LRSchedule",
    "StepDecay",
    "ExponentialDecay",
    "CosineDecay",
    "ReduceLROnPlateau",
    "SCHEDULES",
    "get_schedule",
]


class Callback:
    """Base class: every hook does nothing. ``model`` and ``params`` are set by ``fit``."""

    def __init__(self):
        self.model = None
        self.params: dict = {}

    def set_model(self, model):
        self.model = model

    def on_train_begin(self, logs=None):
        pass

    def on_train_end(self, logs=None):
        pass

    def on_epoch_begin(self, epoch, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_batch_end(self, batch, logs=None):
        pass


class CallbackList:
    """Callbacks called in order, each hook once for all; ``params`` (the fit's epochs, steps
    per epoch, samples, batch size) is given to each callback as ``callback.params``."""

    def __init__(self, callbacks, model, params: dict):
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            cb.params = params
            cb.set_model(model)

    def on_train_begin(self):
        for cb in self.callbacks:
            cb.on_train_begin()

    def on_train_end(self):
        for cb in self.callbacks:
            cb.on_train_end()

    def on_epoch_begin(self, epoch):
        for cb in self.callbacks:
            cb.on_epoch_begin(epoch)

    def on_epoch_end(self, epoch, logs):
        for cb in self.callbacks:
            cb.on_epoch_end(epoch, logs)

    def on_batch_end(self, batch, logs):
        for cb in self.callbacks:
            cb.on_batch_end(batch, logs)


class ProgressLogger(Callback):
    """What ``fit(verbose=...)`` shows: a progress bar per epoch with the running means of the
    logs (``bar``), and a summary line per epoch (``line``).

    ``line`` may also be a callable ``line(epoch, logs) -> str`` that makes the epoch's line
    (``epoch`` 0-based), for a program with its own format.
    """

    def __init__(self, bar: bool = True, line=True):
        super().__init__()
        self.bar, self.line = bar, line
        self._bar = None

    def _close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_epoch_begin(self, epoch, logs=None):
        self._close()
        self._sums, self._seen = {}, 0
        if self.bar:
            from tqdm.auto import tqdm

            p = self.params
            self._bar = tqdm(total=p["steps"], desc=f"Epoch {epoch + 1}/{p['epochs']}",
                             unit="batch", leave=False, dynamic_ncols=True)  # fmt: skip

    def on_batch_end(self, batch, logs=None):
        if self._bar is None:
            return
        p = self.params
        m = min(p["batch_size"], p["samples"] - batch * p["batch_size"])  # the last may be short
        for k, v in (logs or {}).items():
            self._sums[k] = self._sums.get(k, 0.0) + v * m
        self._seen += m
        self._bar.update(1)
        if batch % 20 == 0 or batch == p["steps"] - 1:
            self._bar.set_postfix({k[:8]: f"{v / self._seen:.4f}" for k, v in self._sums.items()})

    def on_epoch_end(self, epoch, logs=None):
        self._close()
        if callable(self.line):
            print(self.line(epoch, logs), flush=True)
        elif self.line:
            parts = " - ".join(f"{k} {v:.4f}" for k, v in logs.items() if k != "time")
            print(f"epoch {epoch + 1}/{self.params['epochs']} - {parts} - {logs['time']:.1f}s")

    def on_train_end(self, logs=None):
        self._close()


class TerminateOnNaN(Callback):
    """Stop training at the first batch whose loss is NaN or infinite.

    The diverged epoch is then not reported to ``on_epoch_end`` (see ``Model.fit``), so
    checkpoint callbacks keep the last finite weights. ``stopped`` holds ``(epoch, batch,
    loss)`` of the batch that stopped training, or None.
    """

    def __init__(self):
        super().__init__()
        self.stopped = None
        self._epoch = 0

    def on_train_begin(self, logs=None):
        self.stopped = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.stopped = (self._epoch, batch, float(loss))
            self.model.stop_training = True

    @property
    def message(self) -> str | None:
        if self.stopped is None:
            return None
        epoch, batch, loss = self.stopped
        return (
            f"training stopped: the loss became {loss} at epoch {epoch + 1}, batch {batch + 1} "
            "(diverged: try a smaller learning rate)"
        )


class History(Callback):
    """Records ``epoch`` (list of epoch indices) and ``history`` (metric name -> list)."""

    def __init__(self):
        super().__init__()
        self.epoch: list[int] = []
        self.history: dict[str, list] = {}

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(value)


def _log_keys(callback):
    """The keys the model's epoch logs will have (set by ``fit``), or None outside fit."""
    return getattr(callback.model, "epoch_log_keys", None)


def _check_log_key(callback, key, what) -> None:
    """At train begin: a monitored key the logs will not have fails now, not after an epoch."""
    keys = _log_keys(callback)
    if keys is not None and key not in keys:
        hint = "; pass validation_data to fit() to get val_* metrics" if "val_" in key else ""
        raise ValueError(
            f"{type(callback).__name__} {what} {key!r}, which the epoch logs will not have "
            f"(they have {list(keys)}){hint}"
        )


def _mode_for(monitor: str, mode: str) -> str:
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode != "auto":
        return mode
    return "max" if "acc" in monitor else "min"


class _Monitor(Callback):
    def __init__(self, monitor, mode, min_delta=0.0):
        super().__init__()
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be a str, got {type(monitor).__name__}")
        self.monitor = monitor
        self.mode = _mode_for(monitor, mode)
        self.min_delta = abs(float(min_delta))
        self.best = -math.inf if self.mode == "max" else math.inf

    def on_train_begin(self, logs=None):
        _check_log_key(self, self.monitor, "monitors")

    def _value(self, logs):
        if not logs or self.monitor not in logs:
            raise KeyError(
                f"{type(self).__name__} monitors {self.monitor!r}, which is not in the logs "
                f"{sorted(logs or {})}; pass validation_data to fit() to get val_* metrics"
            )
        return float(logs[self.monitor])

    def _improved(self, value):
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta


class ModelCheckpoint(_Monitor):
    """Save the model to ``path`` (``.npz``) at the end of each epoch, or only on improvement
    of ``monitor`` when ``save_best_only``. ``path`` may contain ``{epoch}`` (1-based) and any
    log key, e.g. ``"ckpt-{epoch:02d}-{val_accuracy:.4f}.npz"``. ``include_optimizer`` also
    stores the optimizer state and epoch, for resuming. ``initial_value_threshold`` (as in
    Keras) is the value an epoch must beat to be saved with ``save_best_only``: the best value of
    a run being continued, so that its best checkpoint is only replaced by a better epoch.

    Never writes a diverged model: when the weights (or, with ``save_best_only``, the monitored
    value) are NaN or infinite at the end of an epoch, nothing is saved, a RuntimeWarning says
    so, ``refused`` holds the message, and training stops (NaN weights stay NaN: nothing later
    could be saved either). The last checkpoint written stays the last finite one.
    """

    def __init__(
        self,
        path,
        monitor="val_accuracy",
        save_best_only=True,
        mode="auto",
        include_optimizer=False,
        initial_value_threshold=None,
    ):
        super().__init__(monitor, mode)
        self.path = os.fspath(path)
        self.save_best_only = bool(save_best_only)
        self.include_optimizer = bool(include_optimizer)
        if initial_value_threshold is not None:
            value = initial_value_threshold
            if not (_is_real(value) and math.isfinite(value)):
                raise ValueError(f"initial_value_threshold must be a finite number, got {value!r}")
            self.best = float(value)
        self.refused = None

    def on_train_begin(self, logs=None):
        if self.save_best_only:
            _check_log_key(self, self.monitor, "monitors")
        keys = _log_keys(self)
        if keys is None:
            return
        try:  # the path with every field the logs will have: a KeyError now, not after epoch 1
            path = self.path.format(epoch=1, **{k: 0.5 for k in keys})
        except (KeyError, IndexError, ValueError) as e:
            hint = (
                "; pass validation_data to fit() to get val_* metrics" if "val_" in str(e) else ""
            )
            raise ValueError(
                f"ModelCheckpoint path {self.path!r} cannot be formatted from the epoch logs "
                f"({type(e).__name__}: {e}; fields: 'epoch' and {list(keys)}){hint}"
            ) from None
        if not path.endswith(".npz"):
            raise ValueError(f"ModelCheckpoint path must end with .npz, got {self.path!r}")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.save_best_only:
            value = self._value(logs)
            if not math.isfinite(value):
                return _refuse(self, epoch, f"the monitored {self.monitor} is {value}")
            if not self._improved(value):
                return
        bad = _first_non_finite_weight(self.model)
        if bad is not None:
            return _refuse(self, epoch, f"weight {bad} holds NaN or inf")
        if self.save_best_only:
            self.best = value
        path = self.path.format(epoch=epoch + 1, **logs)
        self.model.save(path, include_optimizer=self.include_optimizer, epoch=epoch + 1)


def _refuse(callback, epoch, what) -> None:
    """A checkpoint callback's refusal to save a diverged model: ``refused`` set, a
    RuntimeWarning, training stopped."""
    callback.refused = (
        f"{type(callback).__name__}: {what} after epoch {epoch + 1}; not saved over "
        f"{callback.path!r} and training stopped (add TerminateOnNaN() to stop at the first bad "
        "batch)"
    )
    warnings.warn(callback.refused, RuntimeWarning, stacklevel=2)
    callback.model.stop_training = True


class ResumableCheckpoint(Callback):
    """After every epoch, everything a run needs to continue: the model with its optimizer
    state and the epoch, and the run's history, in one ``.npz`` written atomically.

    After epoch ``e`` (0-based) a record is appended to :attr:`history`: ``epoch`` (``e + 1``),
    the logs (each key ``k`` of ``columns`` under the name ``columns[k]``, None where the logs
    lack it; without ``columns``, every log key under its own name) and ``lr``, the learning
    rate the epoch trained with. Then the model is saved to ``path`` with its optimizer,
    ``epoch=e + 1`` and ``extra={"history": history, **extra}`` as strict JSON (NaN and inf as
    null); a callable value of ``extra`` is called at every save, so that it can record the
    state of other callbacks (``{"best_score": lambda: checkpoint.best}``). Then, with
    ``history_path``, the history is rewritten column by column (:meth:`history_columns`) as
    JSON: after the checkpoint, so the file never runs ahead of the checkpoint.

    To continue a run: ``model = load_model(path)``, ``initial_epoch = callback.restore(model)``
    and ``model.fit(..., initial_epoch=initial_epoch, callbacks=[..., callback])``. Unlike
    Keras's ``BackupAndRestore``, the file stays when training ends: it is the run's last state,
    from which a later run can train further epochs.

    As :class:`ModelCheckpoint`, it never saves weights that hold NaN or inf: it warns, sets
    ``refused`` and stops training, and the file keeps the last finite epoch. Under MPI only
    rank 0 writes.
    """

    root_only = True

    def __init__(self, path, history_path=None, columns=None, extra=None):
        super().__init__()
        self.path = os.fspath(path)
        if not self.path.endswith(".npz"):
            raise ValueError(f"ResumableCheckpoint path must end with .npz, got {self.path!r}")
        self.history_path = None if history_path is None else os.fspath(history_path)
        self.columns = None if columns is None else dict(columns)
        self.extra = dict(extra or {})
        self.history: list[dict] = []
        self.refused = None
        self._lr = None

    def restore(self, model) -> int:
        """Continue the history of the checkpoint ``model`` was loaded from (a file this
        callback wrote); returns the number of finished epochs, fit's ``initial_epoch``."""
        meta = getattr(model, "checkpoint_meta", None) or {}
        epoch = int(meta.get("epoch") or 0)
        # A history longer than the checkpoint's epoch is cut: the epochs after it are redone.
        self.history = list(meta.get("extra", {}).get("history", []))[:epoch]
        return epoch

    def history_columns(self) -> dict:
        """The history as ``{"epoch": [...], name: [...], ..., "lr": [...]}``."""
        if self.columns is not None:
            names = ["epoch", *self.columns.values(), "lr"]
        else:
            names = list(dict.fromkeys(k for record in self.history for k in record))
        return {k: [record.get(k) for record in self.history] for k in names}

    def on_epoch_begin(self, epoch, logs=None):
        self._lr = self.model.optimizer.lr  # after a schedule earlier in the list set it

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        bad = _first_non_finite_weight(self.model)
        if bad is not None:
            return _refuse(self, epoch, f"weight {bad} holds NaN or inf")
        if self.columns is not None:
            values = {name: logs.get(key) for key, name in self.columns.items()}
        else:
            values = dict(logs)
        self.history.append({"epoch": epoch + 1, **values, "lr": self._lr})
        extra = {"history": self.history}
        for key, value in self.extra.items():
            extra[key] = value() if callable(value) else value
        # Checkpoints hold strict JSON (save refuses a NaN rather than write bare NaN): a NaN
        # validation loss is recorded as null, as in the history file.
        self.model.save(self.path, include_optimizer=True, epoch=epoch + 1,
                        extra=strict_json(extra))  # fmt: skip
        if self.history_path is not None:
            write_json_atomic(self.history_path, self.history_columns())


def _first_non_finite_weight(model):
    """``"layer/weight"`` of the first weight holding NaN or inf, or None."""
    from .backend import array_module

    for layer, name in model.weight_entries():
        w = layer.get_weight(name)
        if not bool(array_module(w).isfinite(w).all()):
            return f"{layer.name}/{name}"
    return None


class EarlyStopping(_Monitor):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience``
    epochs; with ``restore_best_weights`` the best epoch's weights are put back at the end.

    :meth:`get_state` / :meth:`set_state` carry the count across a resume: after
    ``set_state``, the next ``fit`` continues from that state instead of starting afresh (the
    best weights of an earlier fit are not kept: ``restore_best_weights`` restores only those
    seen since).
    """

    def __init__(
        self,
        monitor="val_loss",
        patience=0,
        min_delta=0.0,
        mode="auto",
        restore_best_weights=False,
    ):
        super().__init__(monitor, mode, min_delta)
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an int >= 0, got {patience!r}")
        self.patience = patience
        self.restore_best_weights = bool(restore_best_weights)
        self.best_weights = None
        self.best_epoch = None
        self.stopped_epoch = None
        self.wait = 0
        self._resumed = False

    def get_state(self) -> dict:
        """``best`` (None until a finite value was seen), ``best_epoch`` (0-based, or None) and
        ``wait`` (epochs since the best), as JSON types."""
        best = self.best if math.isfinite(self.best) else None
        return {"best": best, "best_epoch": self.best_epoch, "wait": self.wait}

    def set_state(self, state: dict) -> None:
        """Continue from ``state`` (:meth:`get_state` of an earlier run) at the next ``fit``."""
        best = state["best"]
        if best is None:
            best = -math.inf if self.mode == "max" else math.inf
        self.best = float(best)
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])
        self.wait = _count(state["wait"], "wait", 0)
        self._resumed = True

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if not self._resumed:
            self.best = -math.inf if self.mode == "max" else math.inf
            self.wait = 0
            self.best_epoch = None
        self._resumed = False  # one resume per set_state: a later fit starts afresh
        self.best_weights = None
        self.stopped_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        value = self._value(logs)
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_weights = [w.copy() for w in self.model.get_weights()]
            return
        self.wait += 1
        # As Keras: stop after `patience` epochs without improvement (patience 0: the first).
        if self.wait >= max(self.patience, 1):
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.restore_best_weights and self.best_weights is not None:
            self.model.set_weights(self.best_weights)


class LearningRateScheduler(Callback):
    """Set ``optimizer.lr = schedule(epoch, lr)`` at the start of every epoch (0-based)."""

    def __init__(self, schedule):
        super().__init__()
        if not callable(schedule):
            raise TypeError("schedule must be callable as schedule(epoch, lr) -> lr")
        self.schedule = schedule

    def on_epoch_begin(self, epoch, logs=None):
        lr = float(self.schedule(epoch, self.model.optimizer.lr))
        self.model.optimizer.lr = _checked_lr(lr, epoch, "schedule")


# Learning rates and factors end up as float32 in the updates: finite there, not just in float64.
_F32_MAX = float(np.finfo(np.float32).max)


def _checked_lr(lr, epoch, what) -> float:
    """A learning rate a schedule produced for ``epoch`` (0-based), or a ValueError with it."""
    lr = float(lr)
    if not lr > 0 or not lr <= _F32_MAX or float(np.float32(lr)) == 0.0:
        raise ValueError(
            f"{what} gave the learning rate {lr!r} at epoch {epoch + 1}; it must be a positive "
            "finite number in float32"
        )
    return lr


def _number(value, name, low=None, high=None, low_open=False, high_open=False):
    ok = _is_real(value) and math.isfinite(value)
    ok = ok and abs(value) <= _F32_MAX
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}, "
        hi = "inf)" if high is None else f"{high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {lo or '(-inf, '}{hi}, got {value!r}")
    return float(value)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _count(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class LRSchedule(Callback):
    """Base of the learning-rate schedules: before every epoch, ``optimizer.lr`` is set to
    :meth:`lr_at` (a closed form of the 0-based epoch and ``base_lr``).

    ``base_lr`` defaults to the optimizer's learning rate when training begins; pass it when
    resuming from a checkpoint, whose optimizer holds an already decayed rate. A value that is
    not a positive finite number raises ValueError naming the epoch and the value.
    """

    def __init__(self, base_lr=None):
        super().__init__()
        self.base_lr = None if base_lr is None else _number(base_lr, "base_lr", 0, low_open=True)
        self._base = self.base_lr

    def on_train_begin(self, logs=None):
        self._base = self.base_lr if self.base_lr is not None else self.model.optimizer.lr

    def lr_at(self, epoch: int) -> float:
        raise NotImplementedError

    def on_epoch_begin(self, epoch, logs=None):
        lr = _checked_lr(self.lr_at(epoch), epoch, type(self).__name__)
        self.model.optimizer.lr = lr


class StepDecay(LRSchedule):
    """``lr = base_lr * gamma ** (epoch // step_size)``."""

    def __init__(self, step_size, gamma=0.1, base_lr=None):
        super().__init__(base_lr)
        self.step_size = _count(step_size, "step_size", 1)
        self.gamma = _number(gamma, "gamma", 0, low_open=True)

    def lr_at(self, epoch):
        return self._base * self.gamma ** (epoch // self.step_size)


class ExponentialDecay(LRSchedule):
    """``lr = base_lr * gamma ** epoch``."""

    def __init__(self, gamma=0.95, base_lr=None):
        super().__init__(base_lr)
        self.gamma = _number(gamma, "gamma", 0, low_open=True)

    def lr_at(self, epoch):
        return self._base * self.gamma**epoch


class CosineDecay(LRSchedule):
    """Linear warm-up, then half a cosine from ``base_lr`` down to ``min_lr``.

    Epochs ``0 .. warmup_epochs - 1``: ``lr = base_lr * (epoch + 1) / (warmup_epochs + 1)``.
    Then, with ``p = (epoch - warmup_epochs) / (epochs - warmup_epochs)`` (at most 1):
    ``lr = min_lr + (base_lr - min_lr) * (1 + cos(pi * p)) / 2`` (Loshchilov & Hutter's SGDR
    without restarts). Past ``epochs`` the rate stays ``min_lr``, which then must be > 0.
    """

    def __init__(self, epochs, warmup_epochs=0, min_lr=0.0, base_lr=None):
        super().__init__(base_lr)
        self.epochs = _count(epochs, "epochs", 1)
        self.warmup_epochs = _count(warmup_epochs, "warmup_epochs", 0)
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs must be < epochs ({self.epochs}), got {self.warmup_epochs}"
            )
        self.min_lr = _number(min_lr, "min_lr", 0)

    def lr_at(self, epoch):
        w = self.warmup_epochs
        if epoch < w:
            return self._base * (epoch + 1) / (w + 1)
        p = min(1.0, (epoch - w) / (self.epochs - w))
        return self.min_lr + (self._base - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` when ``monitor`` has not improved by more than
    ``min_delta`` for ``patience`` epochs (then wait ``cooldown`` epochs), never below
    ``min_lr``. :meth:`get_state` / :meth:`set_state` carry its counters across a resume."""

    def __init__(
        self, monitor="val_loss", factor=0.5, patience=3, min_delta=0.0, cooldown=0, min_lr=0.0,
        mode="auto",
    ):  # fmt: skip
        super().__init__()
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be a str, got {type(monitor).__name__}")
        self.monitor = monitor
        self.mode = _mode_for(monitor, mode)
        self.factor = _number(factor, "factor", 0, 1, low_open=True, high_open=True)
        self.patience = _count(patience, "patience", 0)
        self.min_delta = _number(min_delta, "min_delta", 0)
        self.cooldown = _count(cooldown, "cooldown", 0)
        self.min_lr = _number(min_lr, "min_lr", 0)
        self.reset()

    def on_train_begin(self, logs=None):
        _check_log_key(self, self.monitor, "monitors")

    def reset(self):
        self.best = -math.inf if self.mode == "max" else math.inf
        self.wait = 0
        self.cooldown_left = 0

    def get_state(self) -> dict:
        """The counters as JSON types (strict JSON: ``best`` is None until a finite value was
        seen, rather than an infinity)."""
        best = self.best if math.isfinite(self.best) else None
        return {"best": best, "wait": self.wait, "cooldown_left": self.cooldown_left}

    def set_state(self, state: dict) -> None:
        best = state["best"]
        if best is None:
            best = -math.inf if self.mode == "max" else math.inf
        self.best = float(best)
        self.wait = int(state["wait"])
        self.cooldown_left = int(state["cooldown_left"])

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.monitor not in logs:
            raise KeyError(
                f"ReduceLROnPlateau monitors {self.monitor!r}, which is not in the logs "
                f"{sorted(logs)}; pass validation data to fit() to get val_* metrics"
            )
        value = float(logs[self.monitor])
        better = (
            value > self.best + self.min_delta
            if self.mode == "max"
            else value < self.best - self.min_delta
        )
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.wait = 0
        if better:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait > self.patience:
            opt = self.model.optimizer
            new = max(opt.lr * self.factor, self.min_lr)
            if new < opt.lr:
                opt.lr = _checked_lr(new, epoch + 1, "ReduceLROnPlateau")
                self.cooldown_left = self.cooldown
            self.wait = 0


#: names accepted by :func:`get_schedule` (and ``fastconv train-mnist --schedule``)
SCHEDULES = ("constant", "step", "exponential", "cosine", "plateau")


def get_schedule(name, epochs, base_lr, warmup_epochs=0, gamma=None, step_size=None, min_lr=0.0):
    """A schedule callback by name (None for "constant")."""
    if name == "constant":
        if warmup_epochs:
            raise ValueError("warmup_epochs needs the cosine schedule")
        return None
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {name!r}")
    if warmup_epochs and name != "cosine":
        raise ValueError("warmup_epochs needs the cosine schedule")
    if name == "step":
        return StepDecay(step_size or max(1, epochs // 3), gamma or 0.1, base_lr=base_lr)
    if name == "exponential":
        return ExponentialDecay(gamma or 0.9, base_lr=base_lr)
    if name == "cosine":
        return CosineDecay(epochs, warmup_epochs, min_lr, base_lr=base_lr)
    return ReduceLROnPlateau("val_loss", gamma or 0.5, patience=step_size or 2, min_lr=min_lr)


class CSVLogger(Callback):
    """Append one row per epoch (``epoch`` then the log keys) to a CSV file."""

    def __init__(self, path, append=False):
        super().__init__()
        self.path = os.fspath(path)
        self.append = bool(append)
        self._keys = None

    def on_train_begin(self, logs=None):
        if not self.append and os.path.exists(self.path):
            os.remove(self.path)
        self._keys = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        new_file = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        if self._keys is None:
            self._keys = sorted(logs)
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new_file:
                writer.writerow(["epoch", *self._keys])
            writer.writerow([epoch, *(logs.get(k, "") for k in self._keys)])


class JSONLogger(Callback):
    """Keep ``{"epoch": [...], metric: [...]}`` in a JSON file, rewritten atomically each epoch."""

    def __init__(self, path, append=False):
        super().__init__()
        self.path = os.fspath(path)
        self.append = bool(append)
        self.data: dict[str, list] = {}

    def on_train_begin(self, logs=None):
        self.data = {"epoch": []}
        if self.append and os.path.exists(self.path):
            with open(self.path) as f:
                self.data = json.load(f)

    def on_epoch_end(self, epoch, logs=None):
        self.data.setdefault("epoch", []).append(epoch)
        for key, value in (logs or {}).items():
            self.data.setdefault(key, []).append(float(value))
        write_json_atomic(self.path, self.data)
