"""Profiler: shares are consistent, its step time agrees with an independent timing, CLI JSON."""

import importlib.util
import json

import numpy as np
import pytest

import fastconv
import fastconv.profiler
from fastconv.models import deep_mnist_net
from fastconv.nn import Dense, Layer, Sequential, register_layer
from fastconv.profiler import ProfileResult, profile_forward, profile_model

BATCH = 4


def _model(dtype="float32"):
    model = deep_mnist_net(seed=0)
    if dtype != "float32":
        model = model.to(dtype=dtype)
    return model.compile(optimizer="adam", loss="softmax_cross_entropy")


def _batch(n=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, n)


@pytest.fixture(scope="module")
def result():
    x, y = _batch()
    return profile_model(_model(), x, y, steps=2, warmup=1)


def test_shares_sum_to_one_and_match_layers(result):
    model = _model()
    model.build((1, 28, 28))
    assert result.training
    assert len(result.layers) == len(model.layers)
    assert [la["name"] for la in result.layers] == [la.name for la in model.layers]
    assert sum(result.by_type.values()) == pytest.approx(1.0, abs=1e-9)
    assert set(result.by_type) == {
        "conv", "pool", "dense", "activation", "dropout", "other", "loss", "update", "framework"
    }  # fmt: skip
    # The step is the sum of its parts: every layer's forward and backward, loss, update and
    # the framework's time between them.
    parts = sum(la["forward_ms"] + la["backward_ms"] for la in result.layers)
    total = parts + result.loss_ms + result.update_ms + result.framework_ms
    assert total == pytest.approx(result.step_ms, rel=1e-9)
    conv = [la for la in result.layers if la["type"] == "conv"]
    assert len(conv) == 6
    conv_ms = sum(la["forward_ms"] + la["backward_ms"] for la in conv)
    assert result.conv_share == pytest.approx(conv_ms / result.step_ms, rel=1e-9)
    assert result.conv_share == pytest.approx(result.by_type["conv"], rel=1e-9)
    forward_ms = sum(la["forward_ms"] for la in result.layers)
    conv_fwd = sum(la["forward_ms"] for la in conv)
    assert result.forward_conv_share == pytest.approx(conv_fwd / forward_ms, rel=1e-9)
    # relu_1 runs inside dense_1's epilogue: no time of its own, and a note says so.
    fused = {"relu_1"}
    assert "relu_1 fused into dense_1" in result.notes
    assert all(la["forward_ms"] == la["backward_ms"] == 0 for la in result.layers
               if la["name"] in fused)  # fmt: skip
    assert all(la["forward_ms"] > 0 and la["backward_ms"] > 0 for la in result.layers
               if la["name"] not in fused)  # fmt: skip
    assert 0 < result.conv_share < 1 and 0 < result.forward_conv_share < 1


def test_to_dict_is_json_with_required_keys(result):
    d = json.loads(json.dumps(result.to_dict()))
    for key in ("conv_share", "forward_conv_share", "step_ms", "by_type", "layers", "overhead"):
        assert key in d
    assert set(d["layers"][0]) == {"name", "type", "forward_ms", "backward_ms", "algorithm"}
    assert all(set(la) == {"name", "type", "forward_ms", "backward_ms"}
               for la in d["layers"] if la["type"] != "conv")  # fmt: skip
    assert d["overhead"]["ratio"] == pytest.approx(
        d["overhead"]["profiled_step_ms"] / d["overhead"]["untimed_step_ms"]
    )


def test_step_time_is_what_the_clock_saw_and_the_untimed_step_too(fake_clock):
    """With a clock that only the layers advance, the profiled step, the untimed step that it
    is interleaved with, and their ratio are exact (no wall-clock tolerance, no load)."""
    model = _sleeping_model()
    r = profile_model(model, np.zeros((1, 3), np.float32), np.zeros(1, np.int64), steps=3,
                      warmup=1)  # fmt: skip
    assert r.step_ms == pytest.approx(20.0) and r.step_ms_median == pytest.approx(20.0)
    assert r.overhead["profiled_step_ms"] == pytest.approx(20.0)
    assert r.overhead["untimed_step_ms"] == pytest.approx(20.0)
    assert r.overhead["ratio"] == pytest.approx(1.0)
    assert r.framework_ms == r.loss_ms == r.update_ms == 0


def test_training_changes_weights_like_train_on_batch():
    # The manual step is a real training step: it must update every parameter.
    x, y = _batch()
    model = _model()
    model.build((1, 28, 28))
    before = [p.copy() for p in model.parameters()]
    profile_model(model, x, y, steps=1, warmup=0)
    assert all(not np.array_equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_forward_only_profile():
    x, _ = _batch()
    r = profile_forward(_model(), x, steps=2, warmup=1)
    assert not r.training
    assert sum(r.by_type.values()) == pytest.approx(1.0, abs=1e-9)
    assert "loss" not in r.by_type and "update" not in r.by_type
    assert all(la["backward_ms"] == 0 for la in r.layers)
    forward_ms = sum(la["forward_ms"] for la in r.layers)
    conv_ms = sum(la["forward_ms"] for la in r.layers if la["type"] == "conv")
    assert r.forward_conv_share == pytest.approx(conv_ms / forward_ms)
    assert r.conv_share == pytest.approx(conv_ms / (forward_ms + r.framework_ms))


def test_table_and_plot(result, tmp_path):
    text = result.table()
    assert "conv2d_1" in text and "profiling overhead" in text and "convolution:" in text
    path = tmp_path / "profile.png"
    result.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments():
    x, y = _batch()
    with pytest.raises(ValueError, match="steps"):
        profile_model(_model(), x, y, steps=0)
    with pytest.raises(ValueError, match="warmup"):
        profile_model(_model(), x, y, warmup=-1)
    with pytest.raises(TypeError, match="model"):
        profile_model(object(), x, y)
    with pytest.raises(ValueError, match="loss and an optimizer"):
        profile_model(deep_mnist_net(seed=0), x, y)


def _cli(argv):
    from fastconv.cli import main

    return main(argv)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cli_json(capsys, dtype):
    code = _cli(["profile", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--json",
                 "--dtype", dtype])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out.strip()
    d = json.loads(out)  # exactly one JSON object
    assert d["dtype"] == dtype and d["batch_size"] == 2 and d["training"]
    for key in ("conv_share", "forward_conv_share", "step_ms", "by_type", "layers"):
        assert key in d
    assert sum(d["by_type"].values()) == pytest.approx(1.0, abs=1e-9)
    assert any("random inputs" in n for n in d["notes"])


def test_cli_mnist_data_and_plot(capsys, tmp_path):
    plot = tmp_path / "p.png"
    argv = ["profile", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--data", "mnist"]
    argv += ["--forward-only"]
    if importlib.util.find_spec("matplotlib") is not None:
        argv += ["--plot", str(plot)]
    assert _cli(argv) == 0
    out = capsys.readouterr().out
    assert "forward pass (inference mode)" in out and "data: real MNIST images" in out
    assert plot.exists() == ("--plot" in argv)


def test_cli_rejects_bad_steps():
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        _cli(["profile", "--steps", "0"])


@pytest.mark.skipif(fastconv.gpu_available(), reason="checks the message when no GPU is usable")
def test_cli_gpu_without_device_is_a_clear_error():
    with pytest.raises(SystemExit, match="fastconv profile: "):
        _cli(["profile", "--backend", "gpu", "--steps", "1"])


def test_profile_result_is_a_dataclass_roundtrip(result):
    assert ProfileResult(**result.to_dict()) == result


class FakeClock:
    """Seconds that pass only when a layer says so."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def fake_clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(fastconv.profiler, "_now", clock)
    SleepLayer.clock = clock
    yield clock
    SleepLayer.clock = None


@register_layer
class SleepLayer(Layer):
    """A layer that takes a known time on the fake clock, to check where time lands."""

    clock = None

    def __init__(self, kind="conv", forward_s=0.0, backward_s=0.0, name=None):
        super().__init__(name)
        self.kind, self.forward_s, self.backward_s = kind, forward_s, backward_s

    def call(self, x, training=False):
        self.clock.t += self.forward_s
        return x, (True if training else None)

    def call_backward(self, cache, dy, need_dx=True):
        self.clock.t += self.backward_s
        return dy, {}


def _sleeping_model():
    model = Sequential(
        # A Dense layer first, so that gradients must flow back through the sleeping layers.
        [Dense(3, name="d0"), SleepLayer("conv", 0.006, 0.012, name="c"),
         SleepLayer("pool", 0.002, 0.0, name="p"), Dense(2, name="d")],
        input_shape=(3,),
    )  # fmt: skip
    model.compile("sgd")
    return model


def test_time_is_attributed_to_the_right_layer(fake_clock):
    r = profile_model(_sleeping_model(), np.zeros((1, 3), np.float32), np.zeros(1, np.int64),
                      steps=3, warmup=0)  # fmt: skip
    d0, conv, pool, d = r.layers
    assert conv["forward_ms"] == pytest.approx(6) and conv["backward_ms"] == pytest.approx(12)
    assert pool["forward_ms"] == pytest.approx(2) and pool["backward_ms"] == 0
    assert d0["forward_ms"] == d0["backward_ms"] == d["forward_ms"] == d["backward_ms"] == 0
    assert r.by_type["conv"] == pytest.approx(18 / 20) and r.by_type["pool"] == pytest.approx(0.1)
    assert r.conv_share == pytest.approx(r.by_type["conv"])
    assert r.forward_conv_share == pytest.approx(6 / 8)
    # Each kind of layer that is missing from the model is missing from by_type.
    assert set(r.by_type) == {"conv", "pool", "dense", "loss", "update", "framework"}


@pytest.mark.parametrize("setting", ["auto", "unfolded"])
def test_each_conv_layer_reports_the_algorithm_it_ran(setting):
    # Oracle: the documented "auto" rule (Winograd F(4x4) for 3x3 stride-1 layers with at
    # least 8 input and output channels, else direct for stride 1) or the forced algorithm.
    x, y = _batch()
    previous = fastconv.set_conv_algorithm(setting)
    try:
        res = profile_model(_model(), x, y, steps=1, warmup=0)
        fwd = profile_forward(_model(), x, steps=1, warmup=0)
    finally:
        fastconv.set_conv_algorithm(previous)
    convs = [la for la in res.layers if la["type"] == "conv"]
    assert len(convs) == 6
    for i, layer in enumerate(convs):
        if setting == "unfolded":
            want = "unfolded"
        else:
            want = "direct" if i == 0 else "winograd4x4"  # conv1 has 1 input channel
        algo = layer["algorithm"]
        assert algo["forward"] == want, layer
        # The first layer needs no dx: only the weight gradient runs.
        assert set(algo) == ({"forward", "backward_weights"} if i == 0 else {"forward", "backward"})
        assert (algo.get("backward") or algo["backward_weights"]) in (want, "unfolded")
        assert f"  {want}/" in next(ln for ln in res.table().splitlines() if layer["name"] in ln)
    for layer in (la for la in fwd.layers if la["type"] == "conv"):
        assert set(layer["algorithm"]) == {"forward"}
    assert all("algorithm" not in la for la in res.layers if la["type"] != "conv")
