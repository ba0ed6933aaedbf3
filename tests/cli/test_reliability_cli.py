"""The command line under misuse: run folders that two runs cannot share, resumes of checkpoints
that do not fit, and every user mistake ending in one ``error:`` line (issue 25).

Runs train on tiny MNIST subsets (300 images, one or two epochs); the two-process test runs the
real ``fastconv`` CLI in subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fastconv.train.mnist
from fastconv import cli
from fastconv._runlock import LOCK_NAME, RunFolderBusy, RunLock
from fastconv.nn import Dense, Flatten, Sequential, load_model

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
SMALL = ["--limit-train", "300", "--val-size", "100", "--limit-test", "100", "--batch-size", "50"]


def _train(out, *extra, epochs=1):
    return cli.main(["train-mnist", "--epochs", str(epochs), *SMALL, "--seed", "0",
                     "--out", str(out), "--quiet", *extra])  # fmt: skip


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


def _one_error_line(err: str) -> str:
    """The stderr of a refused command: exactly one line, ``error: ...``, no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    return lines[0]


# --- run folders ----------------------------------------------------------------------------------

# Run A pauses after its first epoch (its checkpoint written) until the test says go, so that
# run B starts while A certainly holds the folder.
PAUSED_RUN = """
import sys, time
from pathlib import Path
from fastconv import cli
from fastconv.nn import ResumableCheckpoint
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
real = ResumableCheckpoint.on_epoch_end
def on_epoch_end(self, epoch, logs=None):
    real(self, epoch, logs)
    ready.touch()
    deadline = time.monotonic() + 300
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
ResumableCheckpoint.on_epoch_end = on_epoch_end
sys.exit(cli.main(sys.argv[3:]))
"""


def test_two_runs_into_one_folder_the_second_is_refused(tmp_path):
    out = tmp_path / "run"
    ready, go = tmp_path / "ready", tmp_path / "go"
    argv = ["train-mnist", "--epochs", "2", *SMALL, "--seed", "0", "--quiet", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, str(ready), str(go), *argv],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the first run never finished its first epoch"
            time.sleep(0.1)
        assert (out / LOCK_NAME).exists()
        for extra in (["--overwrite"], ["--resume"]):  # neither may write into a live run
            second = subprocess.run([sys.executable, "-m", "fastconv", *argv, *extra], env=ENV,
                                    capture_output=True, text=True, timeout=300)  # fmt: skip
            assert second.returncode == 2
            line = _one_error_line(second.stderr)
            assert f"{out} is in use by another run: fastconv train-mnist (pid {first.pid}" in line
    finally:
        go.touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    # the first run's results are its own, complete and consistent
    hist = json.loads((out / "history.json").read_text())
    assert hist["epoch"] == [1, 2] and hist["test"]["epoch"] in (1, 2)
    assert load_model(out / "last.npz").checkpoint_meta["epoch"] == 2
    assert not (out / LOCK_NAME).exists()


def test_a_stale_lock_of_a_dead_process_is_replaced_with_a_note(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale = {"pid": _dead_pid(), "host": socket.gethostname(), "command": "fastconv train-mnist"}
    (out / LOCK_NAME).write_text(json.dumps(stale))
    assert _train(out) == 0
    err = capsys.readouterr().err
    assert f"note: replaced the stale lock of {out}" in err and f"pid {stale['pid']}" in err
    assert not (out / LOCK_NAME).exists() and (out / "last.npz").exists()


def test_a_lock_of_another_machine_is_not_broken(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_NAME
    lock.write_text(json.dumps({"pid": 1234, "host": "elsewhere", "started": "2026-01-01"}))
    assert _train(out) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "pid 1234 on elsewhere, started 2026-01-01" in line and f"delete {lock}" in line
    assert lock.exists() and not (out / "last.npz").exists()
    # --ensemble locks its folder too, before training any member
    assert cli.main(["train-mnist", "--ensemble", "2", *SMALL, "--out", str(out)]) == 2
    assert "in use by another run" in _one_error_line(capsys.readouterr().err)


def test_the_lock_is_released_on_errors_and_ctrl_c(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    # an error exit before anything is written: no lock, and no empty folder left behind
    assert _train(out, "--val-size", "5000") == 2
    assert not out.exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastconv.train.mnist, "plot_misclassified", interrupted)
    assert _train(out) == 130
    assert not (out / LOCK_NAME).exists() and (out / "last.npz").exists()


def test_run_lock_detects_a_reused_pid_and_gives_back_a_lock_it_did_not_read(tmp_path):
    lock = RunLock(tmp_path, "test")
    # our own (live) PID, but a start time that is not ours: the PID was reused
    record = {"pid": os.getpid(), "host": lock.host, "proc_start": -1}
    Path(lock.path).write_text(json.dumps(record))
    assert "no longer runs" in lock.acquire()
    lock.release()
    assert not os.path.exists(lock.path)
    # a live holder (this process, its real start time) is busy
    other = RunLock(tmp_path, "test")
    other.acquire()
    with pytest.raises(RunFolderBusy, match=r"in use by another run: test \(pid"):
        RunLock(tmp_path, "test").acquire()
    # replacing a stale lock re-checks what it moved aside: another run's fresh lock goes back
    _, raw = other._read()
    Path(other.path).write_text(json.dumps({"pid": 1, "host": "x"}))
    assert other._break(raw) is False
    assert json.loads(Path(other.path).read_text()) == {"pid": 1, "host": "x"}
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]  # nothing left aside
    other.release()  # not its lock any more: left alone
    assert os.path.exists(other.path)


def test_an_unreadable_lock_is_reported_after_a_short_wait(tmp_path, monkeypatch):
    import fastconv._runlock as runlock

    monkeypatch.setattr(runlock, "_UNREADABLE_WAIT_S", 0.1)
    Path(tmp_path / LOCK_NAME).write_text("")  # created, never written (a crash in between)
    with pytest.raises(RunFolderBusy, match="cannot be read; if no run uses that folder"):
        RunLock(tmp_path).acquire()


def test_weights_diverging_at_an_epoch_end_are_an_error_line(tmp_path, capsys, monkeypatch):
    """An epoch whose last update leaves NaN weights behind a finite loss: neither checkpoint
    takes it, training stops, and the run ends with one error line, its files at epoch 1."""
    import fastconv.nn.callbacks as callbacks

    real, checks = callbacks._first_non_finite_weight, []

    def diverged_after_epoch_1(model):  # epoch 1: best.npz, then last.npz; then NaN
        checks.append(model)
        return "conv2d_1/W" if len(checks) > 2 else real(model)

    monkeypatch.setattr(callbacks, "_first_non_finite_weight", diverged_after_epoch_1)
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="weight conv2d_1/W holds NaN or inf after epoch 2"):
        assert _train(out, epochs=3) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "after epoch 2" in line and line.endswith(f"{out / 'last.npz'} keeps epoch 1")
    assert load_model(out / "last.npz").checkpoint_meta["epoch"] == 1
    assert json.loads((out / "history.json").read_text())["epoch"] == [1]


def test_out_that_is_a_file_is_an_error_line(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert _train(target) == 2
    assert "is a file, not a directory" in _one_error_line(capsys.readouterr().err)
    assert target.read_text() == "x"


# --- --resume of checkpoints that are valid but unusable ------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One real one-epoch run, copied by each test that damages it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _train(out) == 0
    return out


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, **entries):
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays.update({k: np.array(v) for k, v in entries.items()})
    np.savez(path, **arrays)


def _resume(out):
    return cli.main(["train-mnist", "--epochs", "2", "--resume", "--out", str(out), "--quiet"])


def test_resume_of_another_models_checkpoint_is_an_error_line(finished_run, tmp_path, capsys):
    out = _copy_run(finished_run, tmp_path / "run")
    last = out / "last.npz"
    meta = load_model(last).checkpoint_meta
    other = Sequential([Flatten(), Dense(5)], input_shape=(1, 28, 28), seed=0)
    other.compile("adam")
    other.save(last, epoch=meta["epoch"], extra=meta["extra"])  # the run's own metadata
    capsys.readouterr()
    assert _resume(out) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{last} holds a model for inputs (1, 28, 28) and (5,) outputs, not for MNIST" in line
    assert "start afresh with --overwrite" in line


BAD_RUN_META = {
    "epoch a string": lambda m: m.update(epoch="abc"),
    "negative epoch": lambda m: m.update(epoch=-1),
    "extra a string": lambda m: m.update(extra="abc"),
    "history a string": lambda m: m["extra"].update(history="abc"),
    "history without its epochs": lambda m: m["extra"].update(history=[{"train_loss": 1.0}]),
    "best score a string": lambda m: m["extra"].update(best_score="high"),
    "batch size a string": lambda m: m["extra"]["args"].update(batch_size="abc"),
    "batch size zero": lambda m: m["extra"]["args"].update(batch_size=0),
    "unknown optimizer": lambda m: m["extra"]["args"].update(optimizer="lion"),
    "negative seed": lambda m: m["extra"]["args"].update(seed=-5),
    "ranks a string": lambda m: m["extra"]["args"].update(ranks="2"),
    "augment a number": lambda m: m["extra"]["args"].update(augment=12),
    "augment out of range": lambda m: m["extra"]["args"].update(augment="rotation=1e308"),
}


@pytest.mark.parametrize("change", list(BAD_RUN_META), ids=list(BAD_RUN_META))
def test_resume_with_bad_metadata_is_an_error_line(finished_run, tmp_path, capsys, change):
    out = _copy_run(finished_run, tmp_path / "run")
    last = out / "last.npz"
    with np.load(last, allow_pickle=False) as f:
        meta = json.loads(str(f["__meta__"][()]))
    BAD_RUN_META[change](meta)
    _rewrite(last, __meta__=json.dumps(meta))
    before = last.read_bytes()
    capsys.readouterr()
    assert _resume(out) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: checkpoint {last}: ")
    assert last.read_bytes() == before  # nothing trained, nothing written


# --- one error line for whatever a user can cause -------------------------------------------------


def _run(argv, capsys):
    """``fastconv ARGV`` in this process, as the console script ends it: ``(exit code, stderr)``
    (a SystemExit with a message prints it and exits 1, as Python does)."""
    capsys.readouterr()
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            rc = 1
        else:
            rc = e.code
    return rc, capsys.readouterr().err


PROFILE = ["profile", "--no-torch", "--steps", "1", "--warmup", "0"]


@pytest.mark.parametrize("argv, message", [
    ([*PROFILE, "--data", "mnist", "--mnist-dir", "/no/such/dir"],
     "error: fastconv profile: --data mnist: MNIST file /no/such/dir/train-images-idx3-ubyte.gz "
     "is missing"),
    ([*PROFILE, "--plot", "/no/such/dir/p.png"],
     "error: fastconv profile: --plot /no/such/dir/p.png: the folder /no/such/dir does not exist"),
    ([*PROFILE, "--plot", "/"], "error: fastconv profile: --plot /: is a directory"),
    ([*PROFILE, "--model", "alexnet", "--input-size", "100000"],
     "error: fastconv profile: Dense 'fc6': weight W of shape (2498400256, 4096) needs "
     "40,933,789,794,304 bytes"),
    ([*PROFILE, "--model", "resnet18", "--input-size", "20000"],
     "error: fastconv profile: a batch of 8 3x20000x20000 inputs through --model resnet18 "
     "(every layer's output, kept for the backward pass) needs"),
    (["train-mnist", "--data", "/no/such/dir", "--out", "OUT"],
     "error: MNIST file /no/such/dir/train-images-idx3-ubyte.gz is missing"),
])  # fmt: skip
def test_user_mistakes_are_one_error_line_before_any_work(argv, message, capsys, tmp_path):
    argv = [str(tmp_path / "run") if a == "OUT" else a for a in argv]
    t0 = time.perf_counter()
    rc, err = _run(argv, capsys)
    assert rc == 1 and _one_error_line(err).startswith(message), err
    assert time.perf_counter() - t0 < 30  # refused up front, not after a run
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["train-mnist", "--seed", "-1"], "argument --seed: expected an integer seed >= 0, got -1"),
    (["profile", "--seed", "-1"], "argument --seed: expected an integer seed >= 0, got -1"),
    (["train-mnist", "--augment", "rotation=1e308"],
     "argument --augment: rotation must lie within [-360.0, 360.0], got 1e+308"),
    (["train-mnist", "--augment", "elastic_alpha=1,elastic_sigma=1e308"],
     "argument --augment: elastic_sigma must be <= 1000.0, got 1e+308"),
    (["train-mnist", "--augment", "shift=1e300"],
     "argument --augment: shift must be <= 1000000.0, got 1e+300"),
])  # fmt: skip
def test_bad_flag_values_are_usage_errors(argv, message, capsys):
    rc, err = _run(argv, capsys)
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(f": error: {message}")


@pytest.mark.parametrize("exc, line", [
    (ValueError("bad value\nsecond line"), "error: bad value second line"),
    (TypeError("bad type"), "error: bad type"),
    (FileNotFoundError(2, "No such file or directory", "/x/y"),
     "error: No such file or directory: /x/y"),
    (PermissionError(13, "Permission denied", "/x"), "error: Permission denied: /x"),
    (MemoryError(), "error: out of memory"),
    (MemoryError("Unable to allocate 3 GiB"), "error: out of memory: Unable to allocate 3 GiB"),
])  # fmt: skip
def test_the_top_level_handler_maps_user_errors_to_one_line(exc, line, capsys, monkeypatch):
    def command(args):
        raise exc

    monkeypatch.setattr(cli, "train_mnist", command)
    monkeypatch.setattr(cli, "_add_train_mnist", _with_func(cli._add_train_mnist, command))
    rc, err = _run(["train-mnist"], capsys)
    assert rc == 1 and _one_error_line(err) == line
    monkeypatch.setenv("FASTCONV_TRACEBACK", "1")  # for bug reports: the traceback
    with pytest.raises(type(exc)):
        cli.main(["train-mnist"])


def _with_func(add, func):
    def wrapped(subparsers):
        p = add(subparsers)
        p.set_defaults(func=func)
        return p

    return wrapped


def test_a_real_cli_error_exits_non_zero_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastconv", *PROFILE, "--plot",
                           str(tmp_path / "no" / "p.png")],
                          env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1
    assert "does not exist" in _one_error_line(done.stderr)
