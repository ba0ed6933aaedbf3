"""The library API under misuse (issue 25): files that saving must not touch, checkpoints whose
metadata is wrong, NaN that must not sneak in through targets, half-precision casts or
hyper-parameters, and arguments that must fail with a message naming them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastconv.nn import CheckpointError, Conv2D, Dense, Flatten, Sequential, load_model
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


# --- checkpoint metadata -------------------------------------------------------------------------


def _rewrite(path, **entries):
    """Replace entries of checkpoint ``path`` (JSON text for the JSON entries)."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays.update({k: np.array(v) for k, v in entries.items()})
    np.savez(path, **arrays)


def _saved(tmp_path, **save_kwargs):
    model = _net()
    model.compile("adam")
    path = tmp_path / "m.npz"
    model.save(path, **save_kwargs)
    return path


def _meta(path):
    with np.load(path, allow_pickle=False) as f:
        return json.loads(str(f["__meta__"][()]))


BAD_META = {
    "epoch a string": {"epoch": "abc"},
    "negative epoch": {"epoch": -1},
    "epoch a bool": {"epoch": True},
    "epoch a float": {"epoch": 1.5},
    "huge epoch": {"epoch": 2**40},
    "extra a string": {"extra": "abc"},
    "extra a list": {"extra": [1]},
    "history a string": {"extra": {"history": "abc"}},
    "history of numbers": {"extra": {"history": [1, 2]}},
    "history epoch a string": {"extra": {"history": [{"epoch": "1"}]}},
    "history loss a string": {"extra": {"history": [{"epoch": 1, "train_loss": "low"}]}},
    "best score a string": {"extra": {"best_score": "0.9"}},
    "best score a bool": {"extra": {"best_score": True}},
    "schedule state a list": {"extra": {"schedule_state": [1]}},
    "schedule state wait negative": {
        "extra": {"schedule_state": {"best": 1.0, "wait": -1, "cooldown_left": 0}}
    },
    "args a string": {"extra": {"args": "batch_size=100"}},
    "args holding an object": {"extra": {"args": {"batch_size": {"n": 1}}}},
    "rng state a string": {"rng_state": "abc"},
    "rng state of another generator": {"rng_state": {"bit_generator": "MT19937", "state": {}}},
    "rng state with bad numbers": {
        "rng_state": {
            "bit_generator": "PCG64",
            "state": {"state": -1, "inc": "x"},
            "has_uint32": 0,
            "uinteger": 0,
        }  # fmt: skip
    },
    "loss a number": {"loss": 5},
}


@pytest.mark.parametrize("change", list(BAD_META), ids=list(BAD_META))
def test_bad_metadata_is_a_checkpoint_error(tmp_path, change):
    path = _saved(tmp_path, epoch=3)
    meta = {**_meta(path), **BAD_META[change]}
    _rewrite(path, __meta__=json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"checkpoint .*m\.npz: .*'__meta__'"):
        load_model(path)


def test_metadata_that_is_not_an_object_is_a_checkpoint_error(tmp_path):
    path = _saved(tmp_path)
    for text in ("[1, 2]", '"meta"', "null"):
        _rewrite(path, __meta__=text)
        with pytest.raises(CheckpointError, match="'__meta__' must be a JSON object"):
            load_model(path)


@pytest.mark.parametrize("entry", ["__meta__", "__architecture__"])
def test_deeply_nested_json_is_a_checkpoint_error_not_a_recursion_error(tmp_path, entry):
    path = _saved(tmp_path)
    deep = "[" * 200_000 + "]" * 200_000
    _rewrite(path, **{entry: '{"extra": ' + deep + "}"})
    with pytest.raises(CheckpointError, match=rf"'{entry}' is nested 200001 levels deep"):
        load_model(path)


def test_brackets_inside_json_strings_are_not_nesting(tmp_path):
    path = _saved(tmp_path)
    text = '[[[\\"{{' * 100  # escaped quotes do not end the string
    _rewrite(path, __meta__=json.dumps({**_meta(path), "extra": {"s": text}}))
    assert load_model(path).checkpoint_meta["extra"] == {"s": text}


def test_save_refuses_metadata_that_would_not_load(tmp_path):
    model = _net()
    with pytest.raises(ValueError, match=r"extra\['x'\] is nan: checkpoints hold strict JSON"):
        model.save(tmp_path / "a.npz", extra={"x": float("nan")})
    with pytest.raises(ValueError, match=r"extra\['h'\]\[0\] is inf"):
        model.save(tmp_path / "a.npz", extra={"h": [float("inf")]})
    with pytest.raises(TypeError, match=r"extra\['x'\] must hold JSON types .* got float32"):
        model.save(tmp_path / "a.npz", extra={"x": np.float32(1)})
    with pytest.raises(TypeError, match="epoch must be None or an int"):
        model.save(tmp_path / "a.npz", epoch="3")
    with pytest.raises(ValueError, match="nested deeper than 64 levels"):
        deep: list = []
        for _ in range(100):
            deep = [deep]
        model.save(tmp_path / "a.npz", extra={"d": deep})
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    # what is accepted loads again, unchanged
    extra = {"history": [{"epoch": 1, "train_loss": 0.5, "val_loss": None}], "best_score": 0.9,
             "args": {"lr": 0.001, "seed": None}, "note": ["a", {"b": True}]}  # fmt: skip
    model.save(tmp_path / "ok.npz", epoch=1, extra=extra)
    assert load_model(tmp_path / "ok.npz").checkpoint_meta["extra"] == extra


def test_bad_arguments_to_load_model_and_to_are_named(tmp_path):
    path = _saved(tmp_path)
    with pytest.raises(ValueError, match="^dtype must be 'float32' or 'float16', got float64$"):
        load_model(path, dtype="float64")
    with pytest.raises(ValueError, match="^backend must be 'cpu' or 'gpu', got 'tpu'$"):
        load_model(path, backend="tpu")
    with pytest.raises(TypeError, match="^compile must be a bool"):
        load_model(path, compile="yes")
    with pytest.raises(ValueError, match="^dtype must be 'float32' or 'float16', got int8$"):
        _net().to(dtype="int8")
    with pytest.raises(ValueError, match="^backend must be 'cpu' or 'gpu', got 'cuda'$"):
        _net().to("cuda")


def test_plateau_state_is_strict_json_before_any_epoch():
    from fastconv.nn import ReduceLROnPlateau

    state = ReduceLROnPlateau().get_state()  # no epoch seen: best is "none yet", not inf
    assert state["best"] is None and json.loads(json.dumps(state, allow_nan=False)) == state
    other = ReduceLROnPlateau()
    other.set_state(state)
    assert other.best == float("inf") and other.get_state() == state
