"""The callbacks a resumable run is built from (``fastconv train-mnist`` uses them): the
resumable checkpoint, the best checkpoint of a continued run, early stopping across a resume,
and the epoch line of a program's own format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastconv import nn
from fastconv.nn import (
    SGD,
    Callback,
    Conv2D,
    Dense,
    EarlyStopping,
    Flatten,
    ModelCheckpoint,
    ProgressLogger,
    ResumableCheckpoint,
    Sequential,
    StepDecay,
    load_model,
)

COLUMNS = {"loss": "train_loss", "accuracy": "train_accuracy", "val_loss": "val_loss",
           "val_accuracy": "val_accuracy", "time": "time_s"}  # fmt: skip


def _net(seed=0):
    model = Sequential([Conv2D(2, 3, activation="relu"), Flatten(), Dense(3)], seed=seed,
                       input_shape=(1, 6, 6))  # fmt: skip
    return model.compile(SGD(lr=0.1))


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 6, 6), dtype=np.float32), rng.integers(0, 3, n)


def _fit(model, callbacks, epochs, initial_epoch=0, validation=True):
    x, y = _data()
    val = _data(20, seed=1) if validation else None
    return model.fit(x, y, epochs=epochs, batch_size=10, verbose=0, callbacks=callbacks,
                     validation_data=val, initial_epoch=initial_epoch)  # fmt: skip


# --- ResumableCheckpoint --------------------------------------------------------------------------


def test_resumable_checkpoint_writes_the_run_state_and_its_history(tmp_path):
    last, hist = tmp_path / "last.npz", tmp_path / "history.json"
    calls = []
    extra = {"args": {"seed": 0}, "calls": lambda: len(calls)}
    ckpt = ResumableCheckpoint(last, hist, COLUMNS, extra=extra)

    class Count(Callback):  # state that changes during training, read at every save
        def on_epoch_end(self, epoch, logs=None):
            calls.append(epoch)

    model = _net()
    _fit(model, [StepDecay(1, 0.5), Count(), ckpt], epochs=2)
    saved = load_model(last)
    meta = saved.checkpoint_meta
    assert meta["epoch"] == 2 and saved.optimizer.iterations == 8
    assert list(meta["extra"]) == ["history", "args", "calls"]
    assert meta["extra"]["args"] == {"seed": 0} and meta["extra"]["calls"] == 2
    records = meta["extra"]["history"]
    assert [r["epoch"] for r in records] == [1, 2]
    assert list(records[0]) == ["epoch", *COLUMNS.values(), "lr"]
    assert [r["lr"] for r in records] == pytest.approx([0.1, 0.05])  # the rate each epoch used
    assert records == ckpt.history
    assert records[1]["train_loss"] == pytest.approx(model.history.history["loss"][1])
    columns = json.loads(hist.read_text())
    assert list(columns) == ["epoch", *COLUMNS.values(), "lr"] and columns["epoch"] == [1, 2]
    assert columns == ckpt.history_columns()
    for wa, wb in zip(model.get_weights(), saved.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)


def test_resumable_checkpoint_continues_a_run_bit_identically(tmp_path):
    straight = _net()
    _fit(straight, [ResumableCheckpoint(tmp_path / "a.npz", columns=COLUMNS)], epochs=3)
    first = ResumableCheckpoint(tmp_path / "b.npz", columns=COLUMNS)
    _fit(_net(), [first], epochs=1)
    resumed = load_model(tmp_path / "b.npz")
    ckpt = ResumableCheckpoint(tmp_path / "b.npz", columns=COLUMNS)
    assert ckpt.restore(resumed) == 1 and [r["epoch"] for r in ckpt.history] == [1]
    _fit(resumed, [ckpt], epochs=3, initial_epoch=1)
    for wa, wb in zip(straight.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    a = load_model(tmp_path / "a.npz").checkpoint_meta["extra"]["history"]
    b = load_model(tmp_path / "b.npz").checkpoint_meta["extra"]["history"]
    assert [{k: v for k, v in r.items() if k != "time_s"} for r in a] == [
        {k: v for k, v in r.items() if k != "time_s"} for r in b
    ]


def test_restore_cuts_a_history_longer_than_the_checkpoint(tmp_path):
    model = _net()
    records = [{"epoch": k, "train_loss": 1.0} for k in (1, 2, 3)]
    model.save(tmp_path / "c.npz", epoch=2, extra={"history": records})
    ckpt = ResumableCheckpoint(tmp_path / "c.npz")
    assert ckpt.restore(load_model(tmp_path / "c.npz")) == 2
    assert ckpt.history == records[:2]
    assert ckpt.restore(_net()) == 0 and ckpt.history == []  # a model from no checkpoint


def test_resumable_checkpoint_without_columns_records_every_log_key(tmp_path):
    ckpt = ResumableCheckpoint(tmp_path / "c.npz", tmp_path / "h.json")
    _fit(_net(), [ckpt], epochs=1, validation=False)
    assert list(ckpt.history[0]) == ["epoch", "loss", "accuracy", "time", "lr"]
    assert list(json.loads((tmp_path / "h.json").read_text())) == list(ckpt.history[0])


def test_missing_columns_are_null_and_nan_is_strict_json(tmp_path):
    class NanValLoss(Callback):  # a diverged validation loss, as a log value
        def on_epoch_end(self, epoch, logs=None):
            logs["val_loss"] = float("nan")

    ckpt = ResumableCheckpoint(tmp_path / "c.npz", tmp_path / "h.json", COLUMNS)
    _fit(_net(), [NanValLoss(), ckpt], epochs=1)
    text = (tmp_path / "h.json").read_text()
    assert "NaN" not in text and json.loads(text)["val_loss"] == [None]
    extra = load_model(tmp_path / "c.npz").checkpoint_meta["extra"]
    assert extra["history"][0]["val_loss"] is None
    ckpt = ResumableCheckpoint(tmp_path / "d.npz", tmp_path / "h2.json", COLUMNS)
    _fit(_net(), [ckpt], epochs=1, validation=False)
    assert json.loads((tmp_path / "h2.json").read_text())["val_accuracy"] == [None]


def test_the_history_file_is_written_after_the_checkpoint(tmp_path, monkeypatch):
    """The history file never runs ahead of the checkpoint a resume starts from."""
    import fastconv.nn.callbacks as callbacks_mod

    order = []
    real_save, real_write = nn.Model.save, callbacks_mod.write_json_atomic
    monkeypatch.setattr(nn.Model, "save", lambda self, path, **kw: (
        order.append("npz"), real_save(self, path, **kw)))  # fmt: skip
    monkeypatch.setattr(callbacks_mod, "write_json_atomic", lambda path, data: (
        order.append("json"), real_write(path, data)))  # fmt: skip
    _fit(_net(), [ResumableCheckpoint(tmp_path / "c.npz", tmp_path / "h.json")], epochs=2)
    assert order == ["npz", "json", "npz", "json"]


def test_resumable_checkpoint_never_saves_non_finite_weights(tmp_path):
    ckpt = ResumableCheckpoint(tmp_path / "c.npz", tmp_path / "h.json")

    class Blowup(Callback):  # the weights diverge at the end of the second epoch
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.model.layers[2].params["W"][0, 0] = np.nan

    model = _net()
    with pytest.warns(RuntimeWarning, match=r"ResumableCheckpoint: weight dense_1/W holds NaN"):
        history = _fit(model, [Blowup(), ckpt], epochs=4)
    assert "after epoch 2" in ckpt.refused and history.epoch == [0, 1]  # training stopped
    assert load_model(tmp_path / "c.npz").checkpoint_meta["epoch"] == 1
    assert [r["epoch"] for r in ckpt.history] == [1]
    assert json.loads((tmp_path / "h.json").read_text())["epoch"] == [1]


def test_resumable_checkpoint_arguments_and_rank():
    with pytest.raises(ValueError, match="must end with .npz"):
        ResumableCheckpoint("last.ckpt")
    assert ResumableCheckpoint.root_only  # under MPI rank 0 alone writes


# --- ModelCheckpoint of a continued run -----------------------------------------------------------


def test_model_checkpoint_initial_value_threshold(tmp_path):
    path = tmp_path / "best.npz"
    ckpt = ModelCheckpoint(path, monitor="val_accuracy", initial_value_threshold=1.0)
    _fit(_net(), [ckpt], epochs=2)
    assert not path.exists() and ckpt.best == 1.0  # nothing beats a perfect earlier epoch
    ckpt = ModelCheckpoint(path, monitor="val_loss", initial_value_threshold=1e9)
    _fit(_net(), [ckpt], epochs=1)
    assert path.exists() and ckpt.best < 1e9
    for bad in (float("nan"), float("inf"), "0.5", True):
        with pytest.raises(ValueError, match="initial_value_threshold must be a finite number"):
            ModelCheckpoint(path, initial_value_threshold=bad)


# --- EarlyStopping across a resume ----------------------------------------------------------------


class Scripted(Callback):
    """Replace the monitored value with a scripted one per epoch."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def on_epoch_end(self, epoch, logs=None):
        logs["val_accuracy"] = self.values[epoch]


def test_early_stopping_state_continues_the_count():
    values = [0.5, 0.7, 0.6, 0.65, 0.7, 0.9]
    straight = EarlyStopping("val_accuracy", patience=3)
    history = _fit(_net(), [Scripted(values), straight], epochs=6)
    assert history.epoch == [0, 1, 2, 3, 4] and straight.stopped_epoch == 4
    # the same run stopped after epoch 3 and resumed with the state it had then
    first = EarlyStopping("val_accuracy", patience=3)
    _fit(_net(), [Scripted(values), first], epochs=3)
    state = first.get_state()
    assert state == {"best": 0.7, "best_epoch": 1, "wait": 1}
    json.dumps(state)  # JSON types
    resumed = EarlyStopping("val_accuracy", patience=3)
    resumed.set_state(state)
    history = _fit(_net(), [Scripted(values), resumed], epochs=6, initial_epoch=3)
    assert history.epoch == [3, 4] and resumed.stopped_epoch == 4 and resumed.wait == 3
    # set_state serves one fit: the next starts afresh
    history = _fit(_net(), [Scripted(values), resumed], epochs=6)
    assert history.epoch == [0, 1, 2, 3, 4]


def test_early_stopping_state_before_any_value():
    stop = EarlyStopping("val_loss")
    assert stop.get_state() == {"best": None, "best_epoch": None, "wait": 0}
    stop.set_state(stop.get_state())
    assert stop.best == np.inf
    with pytest.raises(ValueError, match="wait must be an int >= 0"):
        stop.set_state({"best": 1.0, "best_epoch": 0, "wait": -1})


# --- ProgressLogger with a program's own line -----------------------------------------------------


def test_progress_logger_line_of_a_callable(capsys):
    seen = []

    def line(epoch, logs):
        seen.append(sorted(logs))
        return f"epoch {epoch + 1}: loss {logs['loss']:.4f}"

    _fit(_net(), [ProgressLogger(bar=False, line=line)], epochs=2, validation=False)
    out = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in out] == ["epoch 1", "epoch 2"]
    assert seen[0] == ["accuracy", "loss", "time"]
