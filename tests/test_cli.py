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

REPO = Path(__file__).resolve().parent.parent


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
