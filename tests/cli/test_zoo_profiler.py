"""``fastconv profile --model NAME``: the zoo models, the PyTorch twin's breakdown measured with
torch.profiler, the chart groups and the command line's errors."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from fastconv import models
from fastconv.profiler import (
    GROUPS,
    chart_groups,
    plot_comparison,
    profile_forward,
    profile_model,
    profile_torch,
    torch_category,
)


def _cli(argv):
    from fastconv.cli import main

    return main(argv)


@pytest.mark.parametrize(
    "name,kind",
    [
        ("aten::conv2d", "conv"),
        ("autograd::engine::evaluate_function: ConvolutionBackward0", "conv"),
        ("aten::max_pool2d", "pool"),
        ("autograd::engine::evaluate_function: MaxPool2DWithIndicesBackward0", "pool"),
        ("aten::adaptive_avg_pool2d", "pool"),
        ("autograd::engine::evaluate_function: MeanBackward1", "pool"),
        ("aten::batch_norm", "norm"),
        ("autograd::engine::evaluate_function: NativeBatchNormBackward0", "norm"),
        ("aten::linear", "dense"),
        ("autograd::engine::evaluate_function: AddmmBackward0", "dense"),
        ("autograd::engine::evaluate_function: TBackward0", "dense"),
        ("aten::relu_", "activation"),
        ("aten::tanh", "activation"),
        ("autograd::engine::evaluate_function: ReluBackward0", "activation"),
        ("autograd::engine::evaluate_function: LogSoftmaxBackward0", "loss"),
        ("autograd::engine::evaluate_function: NllLossBackward0", "loss"),
        ("aten::dropout", "dropout"),
        ("aten::cat", "other"),
        ("aten::add_", "other"),
        ("autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", "other"),
    ],
)
def test_torch_categories(name, kind):
    assert torch_category(name) == kind


@pytest.mark.parametrize(
    "shapes,kind",
    [
        ([[2, 4, 8, 8], [4, 1, 3, 3], [4], [], [], [], []], "depthwise"),
        ([[2, 4, 8, 8], [8, 1, 3, 3], [], [], [], [], []], "depthwise"),  # multiplier 2
        ([[2, 4, 8, 8], [8, 2, 3, 3], [8], [], [], [], []], "conv"),  # 2 groups of 2 channels
        ([[2, 1, 8, 8], [6, 1, 5, 5], [6], [], [], [], []], "conv"),  # LeNet's first layer
        (None, "conv"),
    ],
)
def test_torch_depthwise_category_from_the_shapes(shapes, kind):
    assert torch_category("aten::conv2d", shapes) == kind


def _depthwise_model():
    from fastconv import nn

    layers = [nn.Conv2D(8, 3, padding=1), nn.DepthwiseConv2D(3, padding="same"), nn.ReLU6(),
              nn.GlobalAveragePooling2D(), nn.Dense(10)]  # fmt: skip
    return nn.Sequential(layers, input_shape=(3, 12, 12), seed=0).compile("sgd")


def test_depthwise_share_in_both_profiles(torch):
    """Depthwise convolutions are reported apart, forward and backward, by fastconv and in
    PyTorch's breakdown; the convolution shares count them."""
    model = _depthwise_model()
    rng = np.random.default_rng(0)
    x, y = rng.random((2, 3, 12, 12), dtype=np.float32), rng.integers(0, 10, 2)
    r = profile_model(model, x, y, steps=1, warmup=1)
    assert [la["type"] for la in r.layers][:3] == ["conv", "depthwise", "activation"]
    assert r.by_type["depthwise"] > 0
    assert r.conv_share == pytest.approx(r.by_type["conv"] + r.by_type["depthwise"], rel=1e-9)
    assert chart_groups(r.by_type_ms, "step")["depthwise"] > 0
    t = profile_torch(model, x, y, steps=2, warmup=1)
    assert t.by_type_ms["depthwise"]["forward"] > 0 and t.by_type_ms["depthwise"]["backward"] > 0
    assert "aten::conv2d" in t.ops["depthwise"] and "aten::conv2d" in t.ops["conv"]
    assert any("ConvolutionBackward0" in op for op in t.ops["depthwise"])
    assert any("ConvolutionBackward0" in op for op in t.ops["conv"])
    conv = sum(t.by_type_ms[k]["forward"] + t.by_type_ms[k]["backward"]
               for k in ("conv", "depthwise"))  # fmt: skip
    assert t.conv_share == pytest.approx(conv / t.step_ms, rel=1e-9)


def test_torch_breakdown_sums_to_one_and_names_its_operators(torch):
    model = models.resnet_mnist(seed=0)
    rng = np.random.default_rng(0)
    x = rng.random((4, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 4)
    r = profile_torch(model, x, y, steps=2, warmup=1)
    assert r.training and r.batch_size == 4 and r.threads == 2
    assert sum(r.by_type.values()) == pytest.approx(1.0, abs=1e-9)
    total = sum(v["forward"] + v["backward"] for v in r.by_type_ms.values())
    assert total == pytest.approx(r.step_ms, rel=1e-9)
    assert {"conv", "pool", "norm", "dense", "activation", "loss", "update"} <= set(r.by_type)
    assert "aten::conv2d" in r.ops["conv"]
    assert any("ConvolutionBackward0" in op for op in r.ops["conv"])
    assert "aten::batch_norm" in r.ops["norm"]
    # Shares themselves depend on the machine's load; only their consistency is checked.
    assert 0 < r.conv_share < 1 and 0 < r.forward_conv_share < 1
    layers_forward = sum(
        v["forward"] for k, v in r.by_type_ms.items() if k not in ("loss", "update", "framework")
    )
    conv_forward = r.by_type_ms["conv"]["forward"]
    assert r.forward_conv_share == pytest.approx(conv_forward / layers_forward, rel=1e-6)
    assert r.by_type_ms["loss"]["forward"] > 0 and r.by_type_ms["loss"]["backward"] > 0
    assert r.by_type_ms["conv"]["backward"] > 0 and r.by_type_ms["update"]["forward"] == 0
    # Every category's operators add up to the category.
    for kind, ops in r.ops.items():
        ms = r.by_type_ms[kind]
        assert sum(ops.values()) == pytest.approx(ms["forward"] + ms["backward"], rel=1e-6)

    inference = profile_torch(model, x, training=False, steps=2, warmup=1)
    assert not inference.training
    assert "loss" not in inference.by_type and "update" not in inference.by_type
    assert sum(inference.by_type.values()) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="y \\(labels\\)"):
        profile_torch(model, x, None, training=True)


def test_chart_groups_and_plot(tmp_path):
    model = models.lenet5(seed=0).compile("sgd")
    rng = np.random.default_rng(0)
    x, y = rng.random((2, 1, 32, 32), dtype=np.float32), rng.integers(0, 10, 2)
    r = profile_model(model, x, y, steps=1, warmup=1)
    for part in ("forward", "step"):
        g = chart_groups(r.by_type_ms, part)
        assert tuple(g) == GROUPS
        assert sum(g.values()) == pytest.approx(1.0, abs=1e-9)
    fwd = chart_groups(r.by_type_ms, "forward")
    forward_ms = sum(la["forward_ms"] for la in r.layers)
    conv_ms = sum(la["forward_ms"] for la in r.layers if la["type"] == "conv")
    assert fwd["conv"] == pytest.approx(conv_ms / forward_ms)
    assert fwd["BN"] == 0 and fwd["activation"] > 0  # LeNet's tanh layers
    with pytest.raises(ValueError, match="part must be"):
        chart_groups(r.by_type_ms, "backward")
    path = tmp_path / "chart.png"
    plot_comparison(r, None, path, "lenet5")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    inference = profile_forward(model, x, steps=1, warmup=0)
    assert sum(chart_groups(inference.by_type_ms, "step").values()) == pytest.approx(1.0)


# Marked torch but not skipped without it: the first CI stage checks the breakdown's absence,
# the oracle stage its contents.
@pytest.mark.torch
def test_cli_model_json_with_the_torch_breakdown(capsys, tmp_path):
    argv = ["profile", "--model", "lenet5", "--batch-size", "2", "--steps", "1", "--warmup", "0",
            "--json", "--plot", str(tmp_path / "p.png")]  # fmt: skip
    assert _cli(argv) == 0
    d = json.loads(capsys.readouterr().out.strip())
    assert d["model"] == "lenet5" and d["batch_size"] == 2 and d["training"]
    assert sum(d["by_type"].values()) == pytest.approx(1.0, abs=1e-9)
    assert [la["name"] for la in d["layers"]][:2] == ["c1", "tanh_1"]
    assert any("model: lenet5, input 1x32x32" in n for n in d["notes"])
    assert set(d["groups"]["fastconv"]) == {"forward", "training step"}
    for shares in d["groups"]["fastconv"].values():
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    assert (tmp_path / "p.png").exists()
    if importlib.util.find_spec("torch") is None:
        assert d["torch"] is None
        return
    t = d["torch"]  # measured in a process of its own, on the same batch
    assert t["training"] and t["batch_size"] == 2
    assert sum(t["by_type"].values()) == pytest.approx(1.0, abs=1e-9)
    assert 0 < t["conv_share"] < 1 and "aten::conv2d" in t["ops"]["conv"]
    assert set(d["groups"]["torch"]) == set(d["groups"]["fastconv"])
    for shares in d["groups"]["torch"].values():
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)


def test_cli_table_names_groups(capsys):
    argv = ["profile", "--model", "resnet-mnist", "--batch-size", "2", "--steps", "1",
            "--warmup", "0", "--no-torch", "--forward-only", "--input-size", "20"]  # fmt: skip
    assert _cli(argv) == 0
    out = capsys.readouterr().out
    assert "by group, fastconv:" in out and "fastconv forward (inference)" in out
    assert "input 1x20x20" in out and "PyTorch comparison skipped" in out


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--model", "deep-mnist", "--input-size", "32"], "takes 28x28 only"),
        (["--model", "alexnet", "--data", "mnist"], "--data mnist needs a model for 1x28x28"),
        (["--model", "alexnet", "--input-size", "28"], "alexnet.*'pool2'.*63x63"),
        (["--model", "lenet5", "--input-size", "0"], "--input-size must be >= 1"),
    ],
)
def test_cli_errors(argv, match):
    with pytest.raises(SystemExit, match=match):
        _cli(["profile", "--steps", "1", "--warmup", "0", "--no-torch", *argv])
