"""Training that diverges, runs that are interrupted or cannot write, and resumes that conflict:
each ends with a clear message and intact files, never a traceback or a silent NaN model."""

from __future__ import annotations

import builtins
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastconv.train.mnist
import fastconv_cli
from fastconv import cli
from fastconv.nn import (
    SGD,
    Callback,
    Conv2D,
    Dense,
    EarlyStopping,
    Flatten,
    Sequential,
    TerminateOnNaN,
    load_model,
)
from fastconv.nn._files import TEMP_PREFIX

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--limit-train", "300", "--val-size", "100", "--limit-test", "100", "--batch-size", "50"]
TRAIN_ONE_EPOCH = ["train-mnist", "--epochs", "1", *SMALL, "--quiet"]


def _net(seed=0):
    return Sequential([Conv2D(2, 3, activation="relu"), Flatten(), Dense(3)], seed=seed,
                      input_shape=(1, 6, 6))  # fmt: skip


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 6, 6), dtype=np.float32), rng.integers(0, 3, n)


def test_terminate_on_nan_stops_before_the_epoch_is_reported():
    x, y = _data()
    model = _net()
    model.compile(SGD(lr=0.1))
    guard = TerminateOnNaN()
    epochs_seen = []

    class Diverge(Callback):  # a weight blows up in the middle of the second epoch
        def on_batch_end(self, batch, logs=None):
            if len(epochs_seen) == 1 and batch == 3:
                self.model.layers[0].params["W"][0, 0, 0, 0] = np.inf

        def on_epoch_end(self, epoch, logs=None):
            epochs_seen.append(epoch)

    history = model.fit(x, y, epochs=5, batch_size=5, verbose=0, callbacks=[Diverge(), guard])
    assert guard.stopped[:2] == (1, 4) and not np.isfinite(guard.stopped[2])
    assert "the loss became nan at epoch 2, batch 5" in guard.message
    # the diverged epoch never reached on_epoch_end (nothing saved its weights)
    assert epochs_seen == [0] and history.epoch == [0]


def test_non_finite_inputs_are_refused_unless_allowed():
    x, y = _data()
    x[3, 0, 2, 2] = np.nan
    model = _net()
    model.compile("sgd")
    with pytest.raises(ValueError, match=r"NaN or infinite values in 1 samples \(first: \[3\]\)"):
        model.fit(x, y, verbose=0)
    model.fit(x, y, verbose=0, check_finite=False)  # the user's call
    with pytest.raises(ValueError, match="validation_data"):
        model.fit(_data()[0], y, verbose=0, validation_data=(x, y))


def test_callbacks_must_be_a_list():
    x, y = _data()
    model = _net()
    model.compile("sgd")
    with pytest.raises(TypeError, match="callbacks must be a list of Callback objects"):
        model.fit(x, y, verbose=0, callbacks=EarlyStopping())


def test_backward_names_a_wrong_dy():
    x, _ = _data(4)
    model = _net()
    model.forward(x, training=True)
    with pytest.raises(ValueError, match=r"dy must have shape \(4, 3\), got \(4, 2\)"):
        model.backward(np.zeros((4, 2), np.float32))
    layer = Dense(3)
    layer.forward(np.zeros((2, 5), np.float32), training=True)
    with pytest.raises(ValueError, match=r"dy of layer 'dense' must have shape \(2, 3\)"):
        layer.backward(np.zeros((2, 5), np.float32))


def test_optimizer_rejects_non_finite_learning_rates():
    for bad in (float("inf"), float("nan"), 0, -1):
        with pytest.raises(ValueError, match="lr must be a positive finite number"):
            SGD(lr=bad)


def test_train_mnist_stops_on_nan_and_keeps_finite_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train-mnist", "--epochs", "3", *SMALL, "--optimizer", "sgd", "--lr", "10",
                   "--seed", "0", "--out", str(out), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and "error: training stopped: the loss became nan" in err
    text = (out / "history.json").read_text() if (out / "history.json").exists() else "{}"
    json.loads(text)  # strict JSON whatever happened
    assert "NaN" not in text
    for name in ("last.npz", "best.npz"):
        if (out / name).exists():  # only epochs that ended finite were saved
            assert all(np.isfinite(w).all() for w in load_model(out / name).get_weights())


def test_history_json_is_strict_json(tmp_path):
    from fastconv.nn._files import write_json_atomic

    write_json_atomic(tmp_path / "h.json", {"loss": [1.0, float("nan"), float("inf")]})
    text = (tmp_path / "h.json").read_text()
    assert json.loads(text) == {"loss": [1.0, None, None]} and "NaN" not in text


def _run_small(out, *extra):
    return cli.main(["train-mnist", "--epochs", "1", *SMALL, "--seed", "0", "--out", str(out),
                     "--quiet", *extra])  # fmt: skip


def test_resume_refuses_conflicting_settings(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run_small(out) == 0
    capsys.readouterr()
    rc = cli.main(["train-mnist", "--epochs", "2", "--resume", "--out", str(out), "--quiet",
                   "--lr", "0.01", "--optimizer", "sgd", "--dtype", "float16"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    for flag in ("--lr 0.01 (the run being resumed used 0.001)", "--optimizer sgd",
                 "--dtype float16"):  # fmt: skip
        assert flag in err
    # the same settings (or none) resume fine, also the data limits recorded by the first run
    assert cli.main(["train-mnist", "--epochs", "2", "--resume", "--out", str(out), "--quiet",
                     "--lr", "0.001"]) == 0  # fmt: skip
    assert load_model(out / "last.npz").checkpoint_meta["epoch"] == 2


@pytest.mark.parametrize("damage", ["empty", "truncated", "text"])
def test_resume_on_a_damaged_checkpoint_is_an_error_line(tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert _run_small(out) == 0
    last = out / "last.npz"
    data = last.read_bytes()
    last.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                      "text": b"not a checkpoint\n"}[damage])  # fmt: skip
    capsys.readouterr()
    rc = cli.main(["train-mnist", "--epochs", "2", "--resume", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: checkpoint ") and str(last) in err
    assert "Traceback" not in err


def test_stale_temp_files_are_removed(tmp_path):
    """train-mnist owns its run folder: it removes what killed fastconv writers left there."""
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale = [out / f"{TEMP_PREFIX}{dead}-abcd1234.npz", out / f"{TEMP_PREFIX}{dead}-efgh_678.json"]
    for p in stale:
        p.write_bytes(b"half written")
    mine = out / f"{TEMP_PREFIX}{os.getpid()}-live1234.npz"  # a live writer's file stays
    mine.write_bytes(b"in progress")
    assert _run_small(out) == 0
    assert not any(p.exists() for p in stale) and mine.exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(TEMP_PREFIX)] == [mine.name]


def test_a_full_disk_is_an_error_line(tmp_path):
    # RLIMIT_FSIZE makes writes past 200 kB fail with EFBIG, as a full disk fails with ENOSPC.
    out = tmp_path / "run"
    program = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "from fastconv.cli import main\n"
        f"sys.exit(main({[*TRAIN_ONE_EPOCH, '--out', str(out)]!r}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "error: cannot write the run's files" in done.stderr and "Traceback" not in done.stderr
    # no temporary file left (the folder itself is gone when the run wrote nothing into it)
    assert not out.exists() or not [p for p in out.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_ctrl_c_while_importing_or_plotting_is_not_a_traceback(monkeypatch, capsys, tmp_path):
    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "fastconv.cli":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    assert fastconv_cli.main() == 130
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert "interrupted" in capsys.readouterr().err

    def plot(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastconv.train.mnist, "plot_misclassified", plot)
    assert _run_small(tmp_path / "run") == 130
    assert "interrupted" in capsys.readouterr().err


KILL_DURING_WRITE = """
import os, signal, sys
npz_syncs = 0
real_fsync = os.fsync
def fsync(fd):
    global npz_syncs
    if os.readlink(f"/proc/self/fd/{fd}").endswith(".npz"):
        npz_syncs += 1
        if npz_syncs == int(sys.argv[1]):  # written to the temporary file, not yet renamed
            os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(fd)
os.fsync = fsync
from fastconv.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_kill_during_a_checkpoint_write_then_resume_is_bit_identical(tmp_path):
    """SIGKILL while epoch 2's checkpoint is being written; --resume redoes epoch 2 from epoch
    1's files, and the run ends exactly where an uninterrupted run ends."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    train = ["train-mnist", "--epochs", "3", *SMALL, "--seed", "3", "--quiet"]

    def run(out, kill_at, *extra):
        argv = [*train, "--out", str(out), *extra]
        return subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, str(kill_at), *argv],
                              env=env, capture_output=True, text=True, timeout=300)  # fmt: skip

    straight = run(tmp_path / "straight", 0)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run(
        tmp_path / "killed", 3
    )  # epoch 1 wrote best.npz and last.npz: the 3rd is epoch 2's
    assert killed.returncode == -signal.SIGKILL
    assert load_model(tmp_path / "killed" / "last.npz").checkpoint_meta["epoch"] == 1
    assert any(p.name.startswith(TEMP_PREFIX) for p in (tmp_path / "killed").iterdir())
    resumed = run(tmp_path / "killed", 0, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "after epoch 1" in resumed.stdout
    assert not any(p.name.startswith(TEMP_PREFIX) for p in (tmp_path / "killed").iterdir())
    a = load_model(tmp_path / "straight" / "last.npz")
    b = load_model(tmp_path / "killed" / "last.npz")
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    ha, hb = (
        json.loads((tmp_path / d / "history.json").read_text()) for d in ("straight", "killed")
    )
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert ha[key] == hb[key]
    assert ha["test"] == hb["test"]
