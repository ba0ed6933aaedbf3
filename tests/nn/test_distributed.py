"""Data-parallel training over MPI (MPIDataParallel, ``mpiexec -n 2 fastconv train-mnist``).

The MPI runs need the ``mpi`` extra (mpi4py and an ``mpiexec``) and carry the ``mpi`` marker;
they are skipped without it, except in CI's oracle stage, where ``FASTCONV_REQUIRE_ORACLES=1``
turns the skip into a failure (tests/conftest.py). The oracle for
two ranks is the same training in this process, which never imports MPI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastconv.cli import main
from fastconv.nn import MPIDataParallel, load_model
from fastconv.nn.distributed import launcher_world_size

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "tests" / "distributed"
sys.path.insert(0, str(SCRIPTS))

import cases  # noqa: E402
from conftest import need_oracle  # noqa: E402


def _mpiexec() -> str:
    """The mpiexec next to this Python (where the mpich wheel puts it), else on PATH."""
    missing = None
    if importlib.util.find_spec("mpi4py") is None:
        missing = "mpi4py is not installed"
    path = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if missing is None and path is None:
        missing = "no mpiexec found"
    if missing:
        need_oracle("mpi", missing)
    return path


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "FASTCONV_MPI_TIMEOUT"):
        env.pop(var, None)
    env.update(extra)
    return env


def _run_ranks(script, out, n=2, timeout=300):
    cmd = [_mpiexec(), "-n", str(n), sys.executable, str(SCRIPTS / script), str(out)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


# --- without MPI --------------------------------------------------------------------------------


def test_nothing_imports_mpi_without_a_strategy():
    code = (
        "import sys; import fastconv, fastconv.nn, fastconv.cli; from fastconv import nn; "
        "import numpy as np; m = nn.Sequential([nn.Flatten(), nn.Dense(2)], seed=0, "
        "input_shape=(3,)).compile('sgd'); m.fit(np.ones((4, 3), np.float32), np.array([0, 1, "
        "0, 1]), verbose=0); fastconv.cli.build_parser(); print('mpi4py' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_strategy_without_mpi4py_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    with pytest.raises(ImportError, match=r"MPIDataParallel needs mpi4py.*fastconv\[mpi\]"):
        MPIDataParallel()


def test_cli_under_a_launcher_without_mpi4py(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setenv("PMI_SIZE", "2")
    assert main(["train-mnist", "--out", "unused", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "an MPI launcher started 2 processes" in err and "fastconv[mpi]" in err
    assert main(["train-mnist", "--distributed", "none", "--out", "unused"]) == 2
    assert "--distributed none, but an MPI launcher started 2" in capsys.readouterr().err
    assert not Path("unused").exists()


@pytest.mark.parametrize(
    "env, size",
    [
        ({}, None),
        ({"PMI_SIZE": "4"}, 4),
        ({"OMPI_COMM_WORLD_SIZE": "3"}, 3),
        ({"PMI_SIZE": "x"}, None),
    ],
)
def test_launcher_world_size(monkeypatch, env, size):
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert launcher_world_size() == size


# --- two ranks against one process --------------------------------------------------------------


def _rank_results(out, name, n=2):
    results = [cases.load(out / f"{name}_rank{r}.npz") for r in range(n)]
    for r, (weights, _) in enumerate(results[1:], start=1):
        for i, (a, b) in enumerate(zip(results[0][0], weights, strict=True)):
            assert np.array_equal(a, b), f"{name}: rank {r} weight {i} differs from rank 0's"
    return results[0]


@pytest.mark.mpi
def test_two_ranks_train_like_one_process(tmp_path):
    """Global batch B on 2 ranks = batch B in one process, same seed, within float32 rounding
    (float16 rounding for the half model), for every case; every rank ends identical."""
    _run_ranks("run_equivalence.py", tmp_path)
    for case, spec in cases.CASES.items():
        weights, history = _rank_results(tmp_path, case)
        expected, expected_history = cases.train(case)
        half = spec[3] == "float16"
        tol = 4 * float(np.finfo(np.float16).eps) if half else 2e-6
        for i, (a, e) in enumerate(zip(weights, expected, strict=True)):
            assert a.dtype == e.dtype
            scale = max(1.0, float(np.abs(e).max()))
            np.testing.assert_allclose(
                a.astype(np.float64), e, rtol=tol, atol=tol * scale, err_msg=f"{case} weight {i}"
            )
        keys = (
            "loss",
            "accuracy",
            "top2_accuracy",
            "val_loss",
            "val_accuracy",
            "val_top2_accuracy",
        )
        for key in keys:  # averaged over the ranks
            np.testing.assert_allclose(
                history[key], expected_history[key], rtol=tol, atol=tol, err_msg=f"{case} {key}"
            )
    # BatchNorm statistics per rank (the default): the ranks agree with each other (moving
    # statistics averaged) but not with one process, whose batches normalise over 16 samples.
    local, _ = _rank_results(tmp_path, "local_bn")
    model = cases.bn_model(seed=0).compile(cases.nn.Momentum(lr=0.05))
    x, y = cases.data()
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    gap = max(float(np.abs(a - e).max()) for a, e in zip(local, model.get_weights(), strict=True))
    assert gap > 1e-4
    # Augmentation: each rank augments its own share with its own generator; the ranks end
    # identical and a second run with the same seed gives the same weights.
    augmented = [_rank_results(tmp_path, name)[0] for name in ("augment_a", "augment_b")]
    for a, b in zip(*augmented, strict=True):
        assert np.array_equal(a, b)
    # Dropout: each rank draws its own masks; reproducible with one seed, and a resumed run
    # continues exactly.
    streams = [cases.load(tmp_path / f"dropout_stream_rank{r}.npz")[0][0] for r in range(2)]
    assert not np.array_equal(streams[0], streams[1])
    first, _ = _rank_results(tmp_path, "dropout_a")
    for name in ("dropout_b", "dropout_resumed"):
        again, _ = _rank_results(tmp_path, name)
        for a, b in zip(first, again, strict=True):
            assert np.array_equal(a, b), name


@pytest.mark.mpi
def test_bad_input_is_refused_on_every_rank(tmp_path):
    _run_ranks("run_bad_input.py", tmp_path, timeout=120)  # a hang raises TimeoutExpired
    reports = []
    for r in range(2):
        lines = (tmp_path / f"rank{r}.txt").read_text().splitlines()
        reports.append(dict(line.split(": ", 1) for line in lines))
    expected = {
        "batch_smaller_than_ranks": "batch_size=1 is smaller than the 2 ranks",
        "last_batch_too_small": "last batch of every epoch holds 1 sample(s)",
        "different_model": "rank 1 has weight dense_1/W of shape (100, 17)",
        "different_data": "rank 1 has different training data",
        "different_settings": "rank 1 calls fit with batch_size=32 (rank 0: 16)",
    }
    for name, phrase in expected.items():
        for r in range(2):
            assert reports[r][name].startswith("DistributedSetupError: "), (name, r)
            assert phrase in reports[r][name], (name, r, reports[r][name])
    assert "rank(s) [1] of 2 stopped before training" in reports[0]["rank_withdraws"]
    assert reports[1]["rank_withdraws"] == "no error"
    assert reports[0]["valid"] == reports[1]["valid"] == "no error"


@pytest.mark.mpi
def test_an_uncaught_error_on_one_rank_ends_the_job():
    """The others wait in a collective for the failed rank: the job ends (MPI_Abort) with the
    error. The script's collective timeout is an hour, so only the abort ends it before
    subprocess.run's limit (a hang would raise TimeoutExpired here)."""
    cmd = [_mpiexec(), "-n", "2", sys.executable, str(SCRIPTS / "run_rank_raises.py")]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "RuntimeError: a failure on rank 1 only" in done.stderr
    assert "rank 1 of 2: uncaught RuntimeError during distributed training" in done.stderr


# --- the command line: a hung rank, a killed rank, resume ---------------------------------------


def _children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rank_pid(launcher_pid, rank):
    """PID of MPI rank ``rank`` below the launcher (MPICH sets PMI_RANK in each rank)."""
    todo, seen = [launcher_pid], set()
    while todo:
        pid = todo.pop()
        for kid in _children(pid):
            if kid in seen:
                continue
            seen.add(kid)
            todo.append(kid)
            try:
                environ = Path(f"/proc/{kid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                f"PMI_RANK={rank}".encode() in environ
                and b"python" in Path(f"/proc/{kid}/cmdline").read_bytes().lower()
            ):
                return kid
    return None


def _epochs(out):
    try:
        return json.loads((out / "history.json").read_text())["epoch"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def _interrupt_rank1(cmd, out, sig, env, after_epoch):
    """Start ``cmd``; once ``after_epoch`` is in the history, send ``sig`` to rank 1 and return
    (return code, seconds from the signal to the launcher's exit, stderr)."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and after_epoch not in _epochs(out):
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        pid = _rank_pid(proc.pid, 1)
        assert pid is not None, "rank 1 not found"
        os.kill(pid, sig)
        t0 = time.monotonic()
        proc.wait(timeout=60)
        return proc.returncode, time.monotonic() - t0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.mpi
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds ranks through /proc")
def test_cli_hung_or_killed_rank_stops_the_job_and_resume_continues(tmp_path):
    mpiexec = _mpiexec()
    out = tmp_path / "run"
    args = ["train-mnist", "--limit-train", "600", "--val-size", "100", "--limit-test", "100"]
    args += ["--batch-size", "50", "--seed", "1", "--quiet", "--out", str(out)]
    ranks = [mpiexec, "-n", "2", sys.executable, "-m", "fastconv", *args]

    # A rank that stops answering (SIGSTOP): rank 0 gives up after FASTCONV_MPI_TIMEOUT and
    # ends the job with a message naming what it waited for.
    rc, seconds, err = _interrupt_rank1(
        [*ranks, "--epochs", "40"], out, signal.SIGSTOP, _env(FASTCONV_MPI_TIMEOUT="3"), 1
    )
    assert rc != 0 and seconds < 20, (rc, seconds, err)
    assert "no answer from the other ranks for 3 s while" in err, err
    assert "rerun with --resume" in err, err
    stopped_at = _epochs(out)[-1]
    load_model(out / "last.npz")  # intact

    # A rank killed outright: the launcher ends the job within seconds.
    rc, seconds, err = _interrupt_rank1(
        [*ranks, "--epochs", "40", "--resume"], out, signal.SIGKILL, _env(), stopped_at + 1
    )
    assert rc != 0 and seconds < 20, (rc, seconds, err)
    killed_at = _epochs(out)[-1]
    assert killed_at > stopped_at
    load_model(out / "last.npz")

    # Resuming on another number of ranks is refused.
    alone = subprocess.run(
        [sys.executable, "-m", "fastconv", *args, "--epochs", "40", "--resume"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert alone.returncode == 2
    assert "was trained with 2 MPI rank(s) and this run has 1" in alone.stderr

    # Resume on 2 ranks continues from the last checkpoint to the end.
    done = subprocess.run(
        [*ranks, "--epochs", str(killed_at + 1), "--resume"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout
    assert f"after epoch {killed_at}" in text
    assert "MPI: 2 ranks on 1 node(s)" in text and "Numba threads per rank: 1" in text
    assert text.count("test accuracy") == 1  # only rank 0 prints
    hist = json.loads((out / "history.json").read_text())
    assert hist["epoch"] == list(range(1, killed_at + 2))
    assert all(len(v) == killed_at + 1 for k, v in hist.items() if k != "test")
    last = load_model(out / "last.npz")
    assert last.checkpoint_meta["epoch"] == killed_at + 1
    assert last.optimizer.iterations == (killed_at + 1) * 10  # 500 images / 50 per step
