"""CLI: a smoke run on a tiny subset, argument errors, and resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastconv.cli import build_parser, main
from fastconv.datasets import load_mnist
from fastconv.nn import load_model

REPO = Path(__file__).resolve().parents[2]


def test_train_mnist_smoke(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train-mnist", "--epochs", "2", "--limit-train", "400", "--limit-test", "200"]
    args += ["--val-size", "100"]
    rc = main([*args, "--batch-size", "50", "--seed", "0", "--out", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "epoch 1: train loss" in text and "val loss" in text and "test loss" not in text
    for name in ["best.npz", "last.npz", "history.json", "curves.png", "misclassified.png"]:
        assert (out / name).stat().st_size > 0, name
    hist = json.loads((out / "history.json").read_text())
    assert hist["epoch"] == [1, 2] and len(hist["val_accuracy"]) == 2
    assert all(0 <= a <= 1 for a in hist["val_accuracy"])
    last = load_model(out / "last.npz")
    assert last.checkpoint_meta["epoch"] == 2 and last.optimizer.iterations == 12
    best = load_model(out / "best.npz")
    # The validation set picks the epoch; the test set is evaluated once, with its weights.
    assert best.checkpoint_meta["epoch"] == 1 + int(np.argmax(hist["val_accuracy"]))
    assert hist["test"]["epoch"] == best.checkpoint_meta["epoch"]
    x_test = load_mnist()[1]
    assert hist["test"]["accuracy"] == pytest.approx(
        best.evaluate(x_test[0][:200], x_test[1][:200])["accuracy"]
    )
    assert f"test accuracy {hist['test']['accuracy']:.4f}" in text
    # a second run into the same directory must not silently overwrite it
    assert main([*args, "--out", str(out), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    # nothing left to do when resuming a finished run
    assert main([*args, "--out", str(out), "--quiet", "--resume"]) == 0


def test_argument_errors():
    parser = build_parser()
    for bad in (["--epochs", "0"], ["--lr", "-1"], ["--backend", "tpu"], ["--limit-train", "x"]):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["train-mnist", *bad])
        assert exc.value.code == 2
    assert main([]) == 2


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _read_history(path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_resume_after_sigkill(tmp_path):
    """Kill a run mid-training with SIGKILL, resume it, and get one continuous history."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastconv", "train-mnist", "--epochs", "3", "--batch-size", "25"]
    cmd += ["--limit-train", "1100", "--val-size", "100", "--limit-test", "100", "--seed", "1"]
    cmd += ["--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--quiet"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            hist = _read_history(out / "history.json")
            if hist and hist["epoch"] == [1]:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.15)  # into epoch 2 (40 steps: far from done)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = _read_history(out / "history.json")["epoch"]
    assert killed_at in ([1], [1, 2])  # at most the epoch in progress is lost
    load_model(out / "last.npz")  # the checkpoint survived the kill intact
    done = subprocess.run(
        [*cmd, "--resume", "--quiet"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert f"after epoch {killed_at[-1]}" in done.stdout
    hist = json.loads((out / "history.json").read_text())
    assert hist["epoch"] == [1, 2, 3]
    assert all(len(v) == 3 for k, v in hist.items() if k != "test")
    assert load_model(out / "last.npz").optimizer.iterations == 3 * 40


def test_recipe_schedule_and_ensemble(tmp_path, capsys):
    """--recipe augmented with --ensemble 2: each member a full run with its own seed, the
    ensemble's test accuracy the average of their best checkpoints; resumable."""
    from fastconv.nn import Ensemble

    out = tmp_path / "ens"
    args = ["train-mnist", "--recipe", "augmented", "--ensemble", "2", "--epochs", "2"]
    args += ["--limit-train", "250", "--val-size", "50", "--limit-test", "100", "--batch-size"]
    args += ["50", "--schedule", "step", "--lr-step", "1", "--lr-gamma", "0.5", "--seed", "3"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    result = json.loads((out / "ensemble.json").read_text())
    assert [m["seed"] for m in result["members"]] == [3, 4]
    members = []
    for k in (1, 2):
        hist = json.loads((out / f"member-{k}" / "history.json").read_text())
        assert hist["lr"] == pytest.approx([1e-3, 5e-4])  # the step schedule, per epoch
        assert hist["test"]["accuracy"] == result["members"][k - 1]["accuracy"]
        last = load_model(out / f"member-{k}" / "last.npz")
        assert last.checkpoint_meta["extra"]["args"]["augment"] == "rotation=12,shift=2.5,scale=0.1"
        members.append(load_model(out / f"member-{k}" / "best.npz"))
    (_, _), (x_test, y_test) = load_mnist()
    want = Ensemble(members).evaluate(x_test[:100], y_test[:100])
    assert result["ensemble"]["accuracy"] == pytest.approx(want["accuracy"])
    assert f"test accuracy {want['accuracy']:.4f}" in text
    assert (out / "confusion.png").stat().st_size > 0
    # refused without --resume; with it, the finished members are not retrained
    assert main([*args, "--out", str(out), "--quiet"]) == 2
    assert main([*args, "--out", str(out), "--quiet", "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert json.loads((out / "ensemble.json").read_text()) == result
    # a resumed member refuses other settings
    rc = main(["train-mnist", "--recipe", "book", "--out", str(out / "member-1"), "--resume"])
    assert rc == 2 and "--recipe book" in capsys.readouterr().err


def test_training_flag_errors(tmp_path, capsys):
    parser = build_parser()
    bad_flags = [
        ["--augment", "rotation=nan"],
        ["--augment", "twist=3"],
        ["--augment", "scale=-0.5"],
        ["--schedule", "linear"],
        ["--lr-gamma", "0"],
    ]
    for bad in bad_flags:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["train-mnist", *bad])
        assert exc.value.code == 2
    capsys.readouterr()
    base = ["train-mnist", "--limit-train", "200", "--val-size", "50", "--out", str(tmp_path)]
    assert main([*base, "--weight-decay", "0.01"]) == 2
    assert "--optimizer adamw" in capsys.readouterr().err
    assert main([*base, "--warmup", "2", "--schedule", "step"]) == 2
    assert "--schedule cosine" in capsys.readouterr().err
    assert main([*base[:-4], "--val-size", "0", "--patience", "2", "--out", str(tmp_path)]) == 2
    assert "--val-size" in capsys.readouterr().err


def test_ensemble_under_mpi_is_refused_with_what_to_do(tmp_path, capsys):
    """--ensemble trains its members one after another in one process; under mpiexec each
    rank would do that and write the same files, so it is refused on every rank."""
    from fastconv.train import mnist

    class FakeRoot:  # what train_checked asks of a strategy before training
        is_root = True

        def broadcast_object(self, value):
            return value

    args = build_parser().parse_args(
        ["train-mnist", "--ensemble", "2", "--out", str(tmp_path / "ens")]
    )
    assert mnist.train_checked(args, FakeRoot()) == 2
    err = capsys.readouterr().err
    assert "--ensemble" in err and "mpiexec" in err and "--seed" in err
    assert not (tmp_path / "ens").exists()
