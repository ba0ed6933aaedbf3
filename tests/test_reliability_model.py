"""The library API under misuse (issue 25): files that saving must not touch, checkpoints whose
metadata is wrong, NaN that must not sneak in through targets, half-precision casts or
hyper-parameters, and arguments that must fail with a message naming them."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from fastconv.nn import Conv2D, Dense, Flatten, Sequential
from fastconv.nn._files import TEMP_PREFIX, atomic_write


def _net(seed=0, **kwargs):
    return Sequential([Conv2D(2, 3, activation="relu"), Flatten(), Dense(3)], seed=seed,
                      input_shape=(1, 6, 6), **kwargs)  # fmt: skip


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 6, 6), dtype=np.float32), rng.integers(0, 3, n)


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


# --- saving touches only its own files ------------------------------------------------------------


def test_save_removes_no_file_it_did_not_create(tmp_path):
    dead = _dead_pid()
    theirs = [
        tmp_path / f".tmp-{dead}-notes.npz",  # the name pattern of older fastconv versions
        tmp_path / f"{TEMP_PREFIX}{dead}-abcd1234.npz",  # even a killed fastconv writer's
    ]
    for p in theirs:
        p.write_bytes(b"someone's data")
    _net().save(tmp_path / "model.npz")
    assert all(p.read_bytes() == b"someone's data" for p in theirs)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model.npz", *(p.name for p in theirs)]
    )


def test_a_failed_write_removes_its_own_temporary_file(tmp_path):
    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "x.npz", fail, suffix=".npz")
    assert list(tmp_path.iterdir()) == []
    # its name carries its own PID and a unique token
    names = []

    def record(f):
        names.append(os.path.basename(os.readlink(f"/proc/self/fd/{f.fileno()}")))

    atomic_write(tmp_path / "y.bin", record)
    own = f"{TEMP_PREFIX}{os.getpid()}-"
    assert names[0].startswith(own) and len(names[0]) == len(own) + 8
