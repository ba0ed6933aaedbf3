"""Checkpoints: format 2 round trips (graphs, BatchNorm state, optimizer, generator), format 1
files from before the model graph, and every damaged or crafted file refused with one clear
error naming the file."""

from __future__ import annotations

import json
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fastconv import nn
from fastconv.nn import Adam, CheckpointError, load_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def residual_model(seed=0):
    inp = nn.Input(shape=(2, 8, 8))
    x = nn.ReLU()(nn.BatchNorm2D()(nn.Conv2D(4, 3, padding="same", use_bias=False)(inp)))
    y = nn.BatchNorm2D()(nn.Conv2D(4, 3, padding=1, use_bias=False)(x))
    z = nn.ReLU()(nn.Add()([x, y]))
    z = nn.Concatenate()([z, nn.MaxPool2D(3, stride=1, padding=1)(x)])
    z = nn.GlobalAveragePooling2D()(z)
    out = nn.Dense(3)(nn.Dropout(0.2)(nn.BatchNorm1D()(nn.Dense(6, activation="relu")(z))))
    return nn.Model(inp, out, seed=seed, name="residual")


def data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 2, 8, 8)).astype(np.float32), rng.integers(0, 3, n)


def test_graph_round_trip_is_bit_exact_and_resumes_identically(tmp_path):
    x, y = data()
    model = residual_model()
    model.compile(Adam(lr=0.01))
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    path = tmp_path / "m.npz"
    model.save(path, epoch=2, extra={"note": "hi"})
    loaded = load_model(path)
    assert type(loaded) is nn.Model and loaded.name == "residual"
    assert [la.name for la in loaded.layers] == [la.name for la in model.layers]
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    bn = loaded.layers[1]
    assert bn.buffers["moving_variance"].dtype == np.float32
    assert not np.allclose(bn.buffers["moving_mean"], 0)  # the running statistics came along
    assert loaded.checkpoint_meta["extra"] == {"note": "hi"}
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    loaded.fit(x, y, epochs=1, batch_size=8, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with np.load(path, allow_pickle=False) as f:
        arch = json.loads(str(f["__architecture__"][()]))
        assert arch["format"] == "fastconv.Model" and arch["version"] == 2
        assert "weights/batch_norm2d_1/moving_mean" in f.files
        assert all(f[k].dtype != object for k in f.files)


def test_format1_checkpoints_still_load_and_resume():
    """A checkpoint written by the code before the model graph (tests/fixtures)."""
    model = load_model(FIXTURES / "checkpoint_format1.npz")
    with np.load(FIXTURES / "checkpoint_format1_expected.npz") as f:
        expected = {k: f[k] for k in f.files}
    assert type(model) is nn.Sequential and model.name == "v1_fixture"
    assert model.checkpoint_meta["epoch"] == 2 and model.optimizer.iterations == 8
    # The Dense kernels changed since (accumulation order): equal to float32 rounding.
    np.testing.assert_allclose(model.predict(expected["probe"]), expected["scores"], rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    # Optimizer state and generator state came along: the next epoch matches the old code's.
    model.fit(expected["x"], expected["y"], epochs=3, batch_size=8, verbose=0, initial_epoch=2)
    after = [expected[k] for k in sorted(expected) if k.startswith("after_epoch3/")]
    for got, want in zip(model.get_weights(), after, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@nn.register_layer
class Scale(nn.Layer):
    """A user-defined layer with a weight: y = x * s."""

    kind = "other"

    def __init__(self, init=2.0, name=None, trainable=True):
        super().__init__(name, trainable)
        self.init = float(init)

    def get_config(self):
        return {"init": self.init, **super().get_config()}

    def weight_specs(self, input_shape):
        return [nn.WeightSpec("s", (1,), "ones")]

    def call(self, x, training=False):
        return x * self.params["s"], (x if training else None)

    def call_backward(self, cache, dy, need_dx=True):
        grads = {"s": (dy * cache).sum(keepdims=True).reshape(1)} if self.trainable else {}
        return dy * self.params["s"], grads


def test_user_layers_load_once_registered(tmp_path):
    model = nn.Sequential([nn.Flatten(), Scale(), nn.Dense(2)], input_shape=(1, 3, 3), seed=0)
    model.layers[1].params["s"][...] = 3.0
    model.save(tmp_path / "u.npz")
    loaded = load_model(tmp_path / "u.npz")
    assert isinstance(loaded.layers[1], Scale) and float(loaded.layers[1].params["s"][0]) == 3.0
    arch = _read(tmp_path / "u.npz")
    arch["__architecture__"] = arch["__architecture__"].replace('"Scale"', '"Unregistered"')
    _write(tmp_path / "v.npz", arch)
    with pytest.raises(CheckpointError, match="unknown layer class 'Unregistered'.*register_layer"):
        load_model(tmp_path / "v.npz")
    with pytest.raises(TypeError, match="Layer subclass"):
        nn.register_layer(int)


# --- damaged and crafted files --------------------------------------------------------------


def _saved(tmp_path, with_optimizer=True):
    x, y = data(8)
    model = residual_model()
    model.compile(Adam(lr=0.01))
    model.train_on_batch(x, y)
    path = tmp_path / "good.npz"
    model.save(path, include_optimizer=with_optimizer)
    return path


def _read(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: (str(f[k][()]) if f[k].dtype.kind == "U" else f[k]) for k in f.files}


def _write(path, entries):
    np.savez(path, **{k: (np.array(v) if isinstance(v, str) else v) for k, v in entries.items()})
    return path


def _arch(entries):
    return json.loads(entries["__architecture__"])


def _check_refused(path, pattern):
    with pytest.raises(CheckpointError, match=pattern) as exc:
        load_model(path)
    assert str(path) in str(exc.value)


def test_damaged_archives(tmp_path):
    good = _saved(tmp_path).read_bytes()
    cases = {
        "empty": (b"", "empty or a directory"),
        "text": (b"weights: [1, 2]\n", "not an .npz archive"),
        "truncated": (good[: len(good) // 2], "damaged or not an .npz archive"),
    }
    for name, (content, pattern) in cases.items():
        path = tmp_path / f"{name}.npz"
        path.write_bytes(content)
        _check_refused(path, pattern)
    # a flipped bit inside an array's data: caught by the zip CRC
    with zipfile.ZipFile(tmp_path / "good.npz") as z:
        info = z.getinfo("weights/conv2d_1/W.npy")
    flipped = bytearray(good)
    flipped[info.header_offset + 30 + len(info.filename) + 140] ^= 0x10
    (tmp_path / "flip.npz").write_bytes(bytes(flipped))
    _check_refused(tmp_path / "flip.npz", "fails its CRC check")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.npz")


def test_crafted_contents(tmp_path):
    entries = _read(_saved(tmp_path))

    def variant(name, **changes):
        e = dict(entries)
        for k, v in changes.items():
            if v is None:
                del e[k]
            else:
                e[k] = v
        return _write(tmp_path / f"{name}.npz", e)

    _check_refused(variant("no_arch", __architecture__=None), "no '__architecture__' entry")
    _check_refused(variant("bad_json", __architecture__="{oops"), "not valid JSON")
    _check_refused(
        variant("other", __architecture__=json.dumps({"format": "keras"})), "format 'keras'"
    )
    arch = _arch(entries)
    _check_refused(
        variant("v9", __architecture__=json.dumps({**arch, "version": 9})),
        "unsupported format version 9",
    )
    _check_refused(variant("missing", **{"weights/conv2d_1/W": None}), "missing.*conv2d_1/W")
    _check_refused(
        variant("shape", **{"weights/dense_1/W": np.zeros((5, 6), np.float32)}),
        r"weights/dense_1/W \(dense_1/W\) has shape \(5, 6\), expected \(8, 6\)",
    )
    _check_refused(variant("ints", **{"weights/dense_1/b": np.zeros(6, np.int64)}), "dtype int64")
    _check_refused(
        variant("opt_shape", **{"optimizer/m/dense_1/W": np.zeros((2, 2), np.float32)}),
        r"optimizer/m/dense_1/W' has shape \(2, 2\)",
    )
    _check_refused(variant("opt_missing", **{"optimizer/v/dense_1/b": None}), "dense_1/b")
    bad_layer = json.loads(json.dumps(arch))
    bad_layer["layers"][0]["config"]["kernel_size"] = "big"
    _check_refused(
        variant("bad_args", __architecture__=json.dumps(bad_layer)),
        "layer 0: bad arguments for Conv2D",
    )
    cycle = json.loads(json.dumps(arch))
    cycle["nodes"][0]["inputs"] = [3]
    _check_refused(variant("cycle", __architecture__=json.dumps(cycle)), "bad input reference 3")
    np.savez(tmp_path / "objects.npz", **{**entries, "__meta__": np.array([{"a": 1}], object)})
    with pytest.raises(CheckpointError, match="Python objects"):
        load_model(tmp_path / "objects.npz")


def test_a_crafted_architecture_allocates_nothing_before_the_shapes_are_checked(tmp_path):
    """filters=2e8 would need ~7 GB of weights: refused from the stored shapes, in little memory."""
    model = nn.Sequential([nn.Conv2D(4, 3), nn.Flatten(), nn.Dense(2)], input_shape=(2, 8, 8))
    model.save(tmp_path / "seq.npz")
    entries = _read(tmp_path / "seq.npz")
    arch = _arch(entries)
    arch["layers"][0]["config"]["filters"] = 200_000_000
    path = _write(tmp_path / "huge.npz", {**entries, "__architecture__": json.dumps(arch)})
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"conv2d_1/W.*expected \(200000000, 2, 3, 3\)"):
            load_model(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50e6
