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
import os

from ._files import write_json_atomic

__all__ = [
    "Callback",
    "History",
    "ModelCheckpoint",
    "EarlyStopping",
    "LearningRateScheduler",
    "CSVLogger",
    "JSONLogger",
    "TerminateOnNaN",
]


class Callback:
    def __init__(self):
        self.model = None

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
    stores the optimizer state and epoch, for resuming."""

    def __init__(
        self,
        path,
        monitor="val_accuracy",
        save_best_only=True,
        mode="auto",
        include_optimizer=False,
    ):
        super().__init__(monitor, mode)
        self.path = os.fspath(path)
        self.save_best_only = bool(save_best_only)
        self.include_optimizer = bool(include_optimizer)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.save_best_only:
            value = self._value(logs)
            if not self._improved(value):
                return
            self.best = value
        path = self.path.format(epoch=epoch + 1, **logs)
        self.model.save(path, include_optimizer=self.include_optimizer, epoch=epoch + 1)


class EarlyStopping(_Monitor):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience``
    epochs; with ``restore_best_weights`` the best epoch's weights are put back at the end."""

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

    def on_train_begin(self, logs=None):
        self.best = -math.inf if self.mode == "max" else math.inf
        self.wait = 0
        self.best_weights = None
        self.best_epoch = None
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
        if not lr > 0 or not math.isfinite(lr):
            raise ValueError(f"schedule returned an invalid learning rate {lr!r}")
        self.model.optimizer.lr = lr


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
