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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastconv.nn import (
    L2,
    Callback,
    CheckpointError,
    Conv2D,
    CosineDecay,
    Dense,
    ExponentialDecay,
    Flatten,
    LearningRateScheduler,
    ModelCheckpoint,
    ReduceLROnPlateau,
    Sequential,
    StepDecay,
    load_model,
    optimizers,
)
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


# --- checkpoint metadata --------------------------------------------------------------------------


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


def test_metadata_of_older_versions_and_huge_numbers(tmp_path):
    path = _saved(tmp_path, epoch=2)
    meta = _meta(path)
    # older versions wrote a NaN in extra as bare NaN: it still loads where nothing compares it
    _rewrite(path, __meta__=json.dumps({**meta, "extra": {"note": float("nan")}}))
    assert np.isnan(load_model(path).checkpoint_meta["extra"]["note"])
    _rewrite(path, __meta__=json.dumps({**meta, "extra": {"best_score": float("nan")}}))
    with pytest.raises(CheckpointError, match=r"best_score'\] must be a finite number, got nan"):
        load_model(path)
    # beyond Python's 4300-digit int limit: a ValueError of the parser, not a JSON error
    _rewrite(path, __meta__='{"epoch": ' + "9" * 5000 + "}")
    with pytest.raises(CheckpointError, match="'__meta__' is not valid JSON"):
        load_model(path)
    _rewrite(path, __meta__='{"epoch": ' + "9" * 4000 + "}")
    with pytest.raises(CheckpointError, match=r"got an int of 4000 digits$"):
        load_model(path)


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


# --- NaN by the back door -------------------------------------------------------------------------


def _targets(loss, n, rng):
    if loss == "softmax_cross_entropy":
        return np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)]
    return rng.random((n, 3), dtype=np.float32)  # in [0, 1]: valid BCE and MSE targets


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "binary_cross_entropy",
                                  "mean_squared_error"])  # fmt: skip
def test_non_finite_targets_are_refused(loss):
    rng = np.random.default_rng(0)
    x, _ = _data()
    y = _targets(loss, 40, rng)
    y[5, 1] = np.nan
    model = _net()
    model.compile("sgd", loss)
    before = model.get_weights()
    with pytest.raises(
        ValueError, match=r"^y holds NaN or infinite values in 1 samples \(first: \[5\]\)"
    ):
        model.fit(x, y, verbose=0)
    yv = _targets(loss, 10, rng)
    yv[2, 0] = np.nan  # (an inf is also out of BCE's [0, 1], refused by that check first)
    with pytest.raises(ValueError, match=r"^validation_data\[1\] holds NaN or infinite"):
        model.fit(x, _targets(loss, 40, rng), verbose=0, validation_data=(x[:10], yv))
    for a, b in zip(before, model.get_weights(), strict=True):  # nothing was trained
        np.testing.assert_array_equal(a, b)


def test_inputs_beyond_float16_range_are_refused_for_a_float16_model():
    x, y = _data()
    x[2, 0, 1, 1] = 1e5  # finite in float32, inf in float16
    model = _net(dtype="float16")
    model.compile("sgd")
    msg = r"^x holds values beyond float16's range \(\|v\| > 65504\) in 1 samples \(first: \[2\]\)"
    for check_finite in (True, False):  # not a NaN check: the cast itself would make the inf
        with pytest.raises(ValueError, match=msg):
            model.fit(x, y, verbose=0, check_finite=check_finite)
    cast = r"^x holds values up to 100000, beyond float16's range"
    with pytest.raises(ValueError, match=cast):
        model.predict(x)
    with pytest.raises(ValueError, match=cast):
        model.evaluate(x, y)
    with pytest.raises(ValueError, match=cast):
        model.train_on_batch(x[:4], y[:4])
    with pytest.raises(ValueError, match=cast):  # what the augmentation loader casts with
        model._cast_for_augment(x)
    x[2, 0, 1, 1] = -6e4  # inside the range: fine
    assert np.isfinite(model.predict(x)).all()
    model.fit(x, y, verbose=0)
    # a float32 model takes any finite float32
    x[2, 0, 1, 1] = 1e30
    m32 = _net()
    m32.compile("sgd")
    assert np.isfinite(m32.predict(x)).all()


ALL_OPTIMIZERS = ["SGD", "Momentum", "Nesterov", "AdaGrad", "RMSProp", "Adam", "AdamW"]


@pytest.mark.parametrize("name", ALL_OPTIMIZERS)
def test_learning_rates_must_be_finite_and_nonzero_in_float32(name):
    cls = getattr(optimizers, name)
    for bad in (1e39, 1e-50, float("inf"), float("nan"), 0, -1, True, "0.1"):
        with pytest.raises(ValueError, match=r"lr must be a positive finite number \(in float32"):
            cls(lr=bad)
    opt = cls(lr=3e38)  # the largest float32s are fine
    with pytest.raises(ValueError, match="lr must be"):
        opt.lr = 1e39  # what schedules do
    assert opt.lr == 3e38


def test_other_hyper_parameters_must_be_finite_in_float32():
    with pytest.raises(
        ValueError, match="beta2 must be a number in .* float32 does not round to 1"
    ):
        optimizers.Adam(beta2=1 - 1e-10)
    with pytest.raises(ValueError, match="momentum must be a number in .* round to 1"):
        optimizers.Momentum(momentum=1 - 1e-9)
    with pytest.raises(ValueError, match=r"weight_decay must be a finite number >= 0 \(in float32"):
        optimizers.AdamW(weight_decay=1e39)
    with pytest.raises(ValueError, match=r"lr \* weight_decay must be finite in float32"):
        optimizers.AdamW(lr=1e30, weight_decay=1e10)
    opt = optimizers.AdamW(lr=1.0, weight_decay=1e30)
    with pytest.raises(ValueError, match=r"lr \* weight_decay"):
        opt.lr = 1e10  # a scheduled rate is checked against the decay too
    for make, match in [
        (lambda: StepDecay(2, gamma=1e39), "gamma must be a finite number"),
        (lambda: ExponentialDecay(base_lr=1e39), "base_lr must be a finite number"),
        (lambda: CosineDecay(5, min_lr=1e39), "min_lr must be a finite number"),
        (lambda: ReduceLROnPlateau(min_lr=1e39), "min_lr must be a finite number"),
        (lambda: L2(1e39), r"l2 must be a finite number >= 0 \(in float32\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            make()


def test_a_schedule_leaving_float32_raises_at_that_epoch():
    x, y = _data()
    model = _net()
    model.compile(optimizers.SGD(lr=1e-30))
    grow = ExponentialDecay(gamma=1e30, base_lr=1e-30)  # 1e-30, 1, 1e30, then 1e60
    with pytest.raises(
        ValueError, match=r"ExponentialDecay gave the learning rate 1[.0-9]*e\+60 at epoch 4"
    ):
        model.fit(x, y, epochs=5, verbose=0, callbacks=[grow])
    lrs = LearningRateScheduler(lambda epoch, lr: 1e39)
    with pytest.raises(
        ValueError, match=r"schedule gave the learning rate 1e\+39 at epoch 1; .* float32"
    ):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[lrs])


class _Poison(Callback):
    """Puts a NaN into the first weight (or the epoch's logs) at the end of one epoch, before
    the callbacks after it run."""

    def __init__(self, epoch, logs_key=None):
        super().__init__()
        self.epoch, self.logs_key = epoch, logs_key

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            if self.logs_key:
                logs[self.logs_key] = float("nan")
            else:
                self.model.layers[0].params["W"][0, 0, 0, 0] = np.nan


def test_model_checkpoint_never_writes_a_diverged_model(tmp_path):
    x, y = _data()
    model = _net()
    model.compile(optimizers.SGD(lr=0.01))
    ckpt = ModelCheckpoint(tmp_path / "ck-{epoch}.npz", save_best_only=False)
    with pytest.warns(RuntimeWarning, match=r"weight conv2d_1/W holds NaN or inf after epoch 2"):
        history = model.fit(x, y, epochs=5, verbose=0, callbacks=[_Poison(1), ckpt])
    assert history.epoch == [0, 1]  # stopped: nothing after a NaN weight could be saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck-1.npz"]
    assert "not saved over" in ckpt.refused
    # save_best_only: a NaN monitored value is not an improvement to save either
    model = _net()
    model.compile(optimizers.SGD(lr=0.01))
    best = ModelCheckpoint(tmp_path / "best.npz", monitor="loss")
    with pytest.warns(RuntimeWarning, match="the monitored loss is nan after epoch 2"):
        model.fit(x, y, epochs=3, verbose=0, callbacks=[_Poison(1, "loss"), best])
    assert load_model(tmp_path / "best.npz").checkpoint_meta["epoch"] == 1


def test_plain_fit_that_diverges_writes_only_finite_checkpoints(tmp_path):
    """No TerminateOnNaN (fit's default, as Keras): the checkpoint callback itself refuses."""
    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 6, 6), dtype=np.float32) * 10
    y = rng.random((40, 3), dtype=np.float32)
    model = Sequential([Flatten(), Dense(3)], seed=0, input_shape=(1, 6, 6))
    model.compile(optimizers.SGD(lr=1.0), "mean_squared_error")  # diverges: inf, then NaN
    ckpt = ModelCheckpoint(tmp_path / "ck-{epoch}.npz", monitor="loss", save_best_only=False)
    with (
        np.errstate(over="ignore", invalid="ignore"),  # NumPy's own warnings on the way
        pytest.warns(RuntimeWarning, match=r"ModelCheckpoint: weight dense_1/W holds NaN"),
    ):
        history = model.fit(x, y, epochs=8, batch_size=8, verbose=0, callbacks=[ckpt])
    assert len(history.epoch) < 8
    assert [p.name for p in tmp_path.iterdir()]  # the finite epochs were saved
    for path in tmp_path.iterdir():
        assert all(np.isfinite(w).all() for w in load_model(path).get_weights())


# --- arguments that fail with a message naming them -----------------------------------------------


def test_a_refused_layer_does_not_stay_in_the_model():
    model = Sequential([Flatten(), Dense(3)], input_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="Conv2D 'conv2d' expects inputs of shape"):
        model.add(Conv2D(2, 3))  # a convolution after a Dense layer
    model.add(Dense(2))  # every later add failed on the refused layer
    assert [type(layer).__name__ for layer in model.layers] == ["Flatten", "Dense", "Dense"]
    assert model.output_shape == (2,)
    assert model.predict(np.zeros((1, 1, 4, 4), np.float32)).shape == (1, 2)
    unbuilt = Sequential([Dense(3, name="d")])
    with pytest.raises(ValueError, match="layer names must be unique"):
        unbuilt.add(Dense(2, name="d"))
    unbuilt.add(Dense(2))
    assert len(unbuilt.layers) == 2


# Sizes beyond any machine's memory (terabytes), so that no test run tries to allocate them.
@pytest.mark.parametrize("layers, shape, what", [
    (lambda: [Conv2D(10**9, 3)], (64, 8, 8),
     r"Conv2D 'conv2d_1': weight W of shape \(1000000000, 64, 3, 3\) needs 2,304,0"),
    (lambda: [Flatten(), Dense(10**9)], (10**4,),
     r"Dense 'dense_1': weight W of shape \(10000, 1000000000\) needs 40,000,0"),
])  # fmt: skip
def test_weights_larger_than_memory_are_refused_before_allocating(layers, shape, what):
    more = r"[\d,]+ bytes \([\d,.]+ GiB\), more than this machine's memory"
    with pytest.raises(ValueError, match=what + more):
        Sequential(layers(), input_shape=shape)


def test_an_allocation_failure_names_the_layer(monkeypatch):
    from fastconv.nn import initializers

    def no_memory(shape, rng):
        raise MemoryError

    monkeypatch.setattr(initializers, "get", lambda name: no_memory)
    what = r"Dense 'dense_1': weight W of shape \(16, 3\) needs 192 bytes \(0.0 GiB\)"
    with pytest.raises(ValueError, match=what + ": out of memory"):
        Sequential([Flatten(), Dense(3)], input_shape=(1, 4, 4))


def test_a_per_sample_shape_no_array_can_hold_is_refused():
    from fastconv.nn import Input

    with pytest.raises(ValueError, match="more elements per sample than an array can hold"):
        Sequential([Flatten()], input_shape=(3, 2**31, 2**31))
    with pytest.raises(ValueError, match="more elements per sample"):
        Input((3, 2**31, 2**31))
    # Flatten counts in Python ints: no wrap-around to a negative size
    assert Flatten().output_shape((3, 2**30, 2**31)) == (3 * 2**61,)
    with pytest.raises(
        ValueError, match=r"Flatten 'flatten': per-sample shape .* elements, more than"
    ):
        Flatten().output_shape((2**40, 2**40))


def test_compile_and_fit_arguments_are_named():
    x, y = _data()
    model = _net()
    with pytest.raises(
        TypeError, match="^metrics must be a list of metric names or Metric objects, got int$"
    ):
        model.compile("sgd", metrics=5)
    model.compile("sgd")
    with pytest.raises(
        TypeError, match="^strategy must be None or a fastconv.nn.MPIDataParallel, got str"
    ):
        model.fit(x, y, verbose=0, strategy="mpi")
    with pytest.raises(TypeError, match="^strategy must be"):
        model.evaluate(x, y, strategy="mpi")
    with pytest.raises(TypeError, match="^shuffle must be a bool, got str$"):
        model.fit(x, y, verbose=0, shuffle="no")
    with pytest.raises(TypeError, match="^validation_split must be a number, got str$"):
        model.fit(x, y, verbose=0, validation_split="0.1")
    with pytest.raises(ValueError, match=r"^validation_split must be in \[0, 1\), got 1.5$"):
        model.fit(x, y, verbose=0, validation_split=1.5)
    history = model.fit(x, y, verbose=0, validation_split=np.float32(0.1))  # NumPy floats
    assert "val_loss" in history.history


@pytest.mark.parametrize("bad, error", [(-1, ValueError), ("a", TypeError), (1.5, TypeError),
                                        (True, TypeError)])  # fmt: skip
def test_a_bad_seed_is_named(bad, error):
    got = bad if error is ValueError else type(bad).__name__
    with pytest.raises(error, match=f"^seed must be None or an int >= 0, got {got}$"):
        Sequential([Dense(2)], seed=bad)
    x, y = _data()
    model = _net()
    model.compile("sgd")
    with pytest.raises(error, match="^seed must be None or an int >= 0"):
        model.fit(x, y, verbose=0, seed=bad)


def test_callbacks_needing_missing_log_keys_fail_before_the_first_epoch(tmp_path):
    from fastconv.nn import EarlyStopping

    x, y = _data()
    model = _net()
    model.compile("sgd")
    epochs_run = []

    class Count(Callback):
        def on_epoch_end(self, epoch, logs=None):
            epochs_run.append(epoch)

    cases = [
        (ModelCheckpoint(tmp_path / "c-{val_accuracy:.4f}.npz", save_best_only=False),
         r"ModelCheckpoint path .* cannot be formatted from the epoch logs "
         r"\(KeyError: 'val_accuracy'.*pass validation_data"),
        (ModelCheckpoint(tmp_path / "c-{epoch}-{}.npz", save_best_only=False), "IndexError"),
        (ModelCheckpoint(tmp_path / "c.npz"),
         r"ModelCheckpoint monitors 'val_accuracy', which the epoch logs will not have "
         r"\(they have \['loss', 'accuracy', 'time'\]\)"),
        (EarlyStopping(), "EarlyStopping monitors 'val_loss'"),
        (ReduceLROnPlateau(monitor="val_acc"), "ReduceLROnPlateau monitors 'val_acc'"),
        (EarlyStopping(monitor="los"), "EarlyStopping monitors 'los'"),
    ]  # fmt: skip
    for callback, match in cases:
        with pytest.raises(ValueError, match=match):
            model.fit(x, y, epochs=2, verbose=0, callbacks=[Count(), callback])
    assert epochs_run == [] and list(tmp_path.iterdir()) == []
    # with validation data the same callbacks run
    ckpt = ModelCheckpoint(tmp_path / "c-{epoch}-{val_accuracy:.4f}.npz")
    model.fit(x, y, epochs=1, verbose=0, validation_split=0.25, callbacks=[ckpt, EarlyStopping()])
    assert len(list(tmp_path.iterdir())) == 1


# --- fuzz: crafted metadata is a CheckpointError or loads, nothing else ---------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.text(max_size=8),
    st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([-1, 0, 1, 2**31, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
)  # fmt: skip
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)  # fmt: skip
_rng_states = st.one_of(
    _json,
    st.fixed_dictionaries({
        "bit_generator": st.sampled_from(["PCG64", "MT19937", "Philox", 5]),
        "state": st.one_of(_json, st.fixed_dictionaries({"state": _scalars, "inc": _scalars})),
        "has_uint32": _scalars,
        "uinteger": _scalars,
    }),
)  # fmt: skip
_records = st.dictionaries(
    st.sampled_from(["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"]),
    _scalars, max_size=6,
)  # fmt: skip
_extras = st.one_of(
    _json,
    st.fixed_dictionaries({}, optional={
        "history": st.one_of(_json, st.lists(st.one_of(_records, _scalars), max_size=3)),
        "best_score": _scalars,
        "schedule_state": st.one_of(_json, st.fixed_dictionaries(
            {"best": _scalars, "wait": _scalars, "cooldown_left": _scalars})),
        "args": st.one_of(_json, st.dictionaries(st.sampled_from(
            ["batch_size", "lr", "seed", "optimizer", "ranks", "augment"]), _json, max_size=4)),
    }),
)  # fmt: skip
_metas = st.one_of(
    _json,
    st.fixed_dictionaries({}, optional={
        "epoch": _scalars, "rng_state": _rng_states,
        "loss": st.one_of(_scalars, st.sampled_from(["mean_squared_error", "hinge"])),
        "extra": _extras,
    }),
)  # fmt: skip
# Raw texts: nesting of any depth, invalid JSON, numbers beyond Python's 4300-digit int limit.
_texts = st.one_of(
    st.integers(0, 400).map(lambda d: '{"extra": ' + "[" * d + "]" * d + "}"),
    st.integers(0, 400).map(lambda d: '{"extra": ' + '{"a":' * d + "1" + "}" * d + "}"),
    st.integers(4000, 5000).map(lambda n: '{"epoch": ' + "9" * n + "}"),
    st.text(max_size=30),
)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    model = _net()
    model.compile("adam")
    x, y = _data(8)
    model.train_on_batch(x, y)  # optimizer state to restore too
    path = tmp_path_factory.mktemp("fuzz") / "base.npz"
    model.save(path, epoch=1)
    return path.read_bytes()


# tmp_path is shared by the examples (each overwrites the file): the health check is moot.
_FUZZ_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_FUZZ_SETTINGS
@given(meta=st.one_of(_metas.map(lambda m: json.dumps(m)), _texts))
def test_fuzz_load_model_over_crafted_metadata(meta, tmp_path, checkpoint_bytes):
    path = tmp_path / "fuzz.npz"
    path.write_bytes(checkpoint_bytes)
    _rewrite(path, __meta__=meta)
    try:
        model = load_model(path)
    except CheckpointError:
        return
    # loaded: the metadata is what the loader promises
    meta = model.checkpoint_meta
    assert isinstance(meta, dict) and isinstance(meta.get("extra", {}), dict)
    epoch = meta.get("epoch")
    assert epoch is None or (type(epoch) is int and 0 <= epoch < 2**31)
