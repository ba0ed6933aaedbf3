"""What the ONNX tests share: ONNX Runtime as the oracle, and models whose every weight matters.

Every test that runs a graph compares with ONNX Runtime (CPUExecutionProvider, all graph
optimisations), an implementation independent of fastconv's kernels.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastconv import nn


@pytest.fixture(scope="session")
def run_ort(ort):
    """``run_ort(model, x)``: the first output of ONNX Runtime on ``x``; ``model`` is a path, the
    bytes of a model or a ModelProto."""

    def run(model, x):
        if hasattr(model, "SerializeToString"):
            model = model.SerializeToString()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(
            str(model) if not isinstance(model, bytes) else model,
            options,
            providers=["CPUExecutionProvider"],
        )
        return session.run(None, {session.get_inputs()[0].name: x})[0]

    return run


def randomize_state(model, rng) -> None:
    """Random biases, BatchNorm scales, shifts and moving statistics: a model fresh from its
    initialisers has zero biases and the identity BatchNorm, which would hide a swapped mean
    and variance or a lost bias. Kernels keep their He-normal values."""
    weights = []
    for (_, name), w in zip(model.weight_entries(), model.get_weights(), strict=True):
        if name in ("moving_variance", "gamma"):
            w = rng.uniform(0.5, 1.5, w.shape)
        elif name in ("b", "beta", "moving_mean"):
            w = 0.1 * rng.standard_normal(w.shape)
        weights.append(np.asarray(w, np.float32))
    model.set_weights(weights)


def assert_logits_close(actual, expected, rtol=1e-4):
    """Within ``rtol`` relative to the largest expected magnitude (logits near zero carry the
    rounding error of the large terms that cancelled in them)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _every_layer_model(seed=0):
    """One model with every exported layer and option: ceil-mode pools with padding, strides,
    non-square kernels, a bias-free convolution, a three-way sum, a concatenation, BatchNorm1D,
    DropConnectDense, and every activation."""
    inp = nn.Input((3, 15, 12))  # the ceil-mode windows run past the padded edge
    x = nn.Conv2D(8, (3, 1), stride=(2, 1), padding=(1, 0), activation="relu", name="c1")(inp)
    a = nn.MaxPool2D(3, 2, padding=1, ceil_mode=True, name="maxc")(x)
    b = nn.AvgPool2D(3, 2, padding=1, ceil_mode=True, name="avgc")(x)
    y = nn.Concatenate(name="cat")([a, b])
    y = nn.BatchNorm2D(epsilon=1e-3, momentum=0.8, name="bn")(
        nn.Conv2D(8, 3, padding="same", use_bias=False, name="c3")(y)
    )
    y = nn.LeakyReLU(0.2, name="leaky")(y)
    z = nn.Sigmoid(name="sig")(nn.Conv2D(8, 1, name="c4")(y))
    w = nn.Tanh(name="tanh")(nn.Conv2D(8, 1, name="c5")(y))
    s = nn.Add(name="sum3")([y, z, w])
    g = nn.GlobalAveragePooling2D(name="gap")(s)
    f = nn.Flatten(name="flat")(nn.MaxPool2D(2, name="pool")(s))
    h = nn.Concatenate(name="cat2")([g, f])
    h = nn.Dense(12, use_bias=False, name="d1")(nn.Dropout(0.3, name="drop")(h))
    h = nn.ReLU(name="relu")(nn.BatchNorm1D(name="bn1d")(h))
    h = nn.DropConnectDense(6, rate=0.4, activation="relu", name="dc")(h)
    out = nn.Softmax(name="softmax")(nn.Dense(5, name="d2")(h))
    return nn.Model(inp, out, seed=seed, name="every_layer")


@pytest.fixture(name="every_layer_model")
def _every_layer_model_fixture():
    """The builder of a model with every exported layer (``every_layer_model(seed)``)."""
    return _every_layer_model


@pytest.fixture(name="randomize_state")
def _randomize_state():
    return randomize_state


@pytest.fixture(name="assert_logits_close")
def _assert_logits_close():
    return assert_logits_close
