"""ReLU6 as a convolution's fused activation (``conv2d(..., activation="relu6")``), and
MobileNet's conv-BN-ReLU6 steps fused at inference.

Oracles: the unfused ops (the convolution, then ``fastconv.clip(y, 0, 6)``), which the fused
epilogue must match bit for bit (0 and 6 are exact in float16 and rounding is monotonic), on
every backend; the float64 reference; the model with the ReLU6 layers left unfused.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastconv as fc
from fastconv import nn
from fastconv import reference as ref
from fastconv.nn.layers import activation as activation_layers
from fastconv.prepared import prepare_conv2d
from tests.conftest import assert_close

# N, C, H, F, k, stride, pad, groups, algorithm: every CPU path that fuses the clamp (direct,
# unfolded, pointwise, the threads sharing one image, depthwise at stride 1 and 2) and those
# that fuse the ReLU and clamp after (Winograd, the flat product)
CASES = [
    (2, 8, 9, 6, 1, 1, 0, 1, None),
    (2, 8, 9, 6, 3, 1, 1, 1, "direct"),
    (2, 8, 9, 6, 3, 2, 1, 1, "unfolded"),
    (2, 8, 9, 6, 3, 1, 1, 1, "winograd4x4"),
    (1, 16, 28, 16, 3, 1, 1, 1, "direct"),
    (3, 4, 5, 7, 5, 1, 0, 1, None),
    (2, 8, 9, 8, 3, 1, 1, 8, None),
    (2, 8, 10, 16, 3, 2, 1, 8, None),
]


def _case(rng, dtype, N, C, H, F, k, groups):
    x = (rng.standard_normal((N, C, H, H)) * 4).astype(dtype)
    x[0, 0, 0, 0] = np.nan
    w = rng.standard_normal((F, C // groups, k, k)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    return x, w, b


@pytest.mark.parametrize("case", CASES, ids=str)
def test_relu6_epilogue_is_conv_then_clip(backend, case, dtype, rng):
    N, C, H, F, k, stride, pad, groups, algorithm = case
    x, w, b = _case(rng, dtype, N, C, H, F, k, groups)
    if backend is not fc.cpu.KERNELS:
        algorithm = None  # (named algorithms are the CPU's)
    fused = fc.conv2d(x, w, b, stride, pad, "relu6", algorithm, groups=groups)
    plain = fc.conv2d(x, w, b, stride, pad, None, algorithm, groups=groups)
    assert np.array_equal(fused.view(np.uint8), fc.clip(plain, 0.0, 6.0).view(np.uint8))
    assert 0 < np.count_nonzero(fused == 6) < fused.size  # both bounds reached
    assert np.isnan(fused).any()  # NaN kept
    expected = np.clip(ref.conv2d(x, w, b, stride, pad, groups=groups), 0.0, 6.0)
    finite = ~np.isnan(expected)
    assert np.array_equal(np.isnan(fused), ~finite)
    assert_close(np.where(finite, fused, 0), np.where(finite, expected, 0), dtype,
                 k=C // groups * k * k)  # fmt: skip


def test_prepared_relu6_and_its_limits(rng):
    x, w, b = _case(rng, np.float32, 2, 8, 9, 6, 1, 1)
    prepared = prepare_conv2d(w, b, 1, 0)
    expected = fc.conv2d(x, w, b, 1, 0, "relu6")
    assert np.array_equal(prepared(x, "relu6").view(np.uint8), expected.view(np.uint8))
    with pytest.raises(ValueError, match="relu6.*no residual"):
        prepared(x, "relu6", residual=np.zeros_like(expected))
    with pytest.raises(ValueError, match="None, 'relu' or 'relu6'"):
        fc.conv2d(x, w, b, activation="relu8")
    with pytest.raises(ValueError, match="None, 'relu' or 'relu6'"):
        prepared(x, "tanh")


def _mobile_block(seed):
    # MobileNetV2's inverted residual without the Add: conv-BN-ReLU6 (3x3/2), expansion
    # 1x1-BN-ReLU6, depthwise 3x3-BN-ReLU6, projection 1x1-BN
    rng = np.random.default_rng(seed)
    inp = nn.Input((3, 16, 16))
    y = nn.Conv2D(8, 3, stride=2, padding=1, use_bias=False)(inp)
    y = nn.ReLU6()(nn.BatchNorm2D()(y))
    y = nn.Conv2D(24, 1, use_bias=False)(y)
    y = nn.ReLU6()(nn.BatchNorm2D()(y))
    y = nn.DepthwiseConv2D(3, 1, 1, use_bias=False)(y)
    y = nn.ReLU6()(nn.BatchNorm2D()(y))
    y = nn.BatchNorm2D()(nn.Conv2D(8, 1, use_bias=False)(y))
    model = nn.Model(inp, nn.Flatten()(y), seed=seed)
    for layer in model.layers:  # moving statistics away from (0, 1), outputs past 6
        if isinstance(layer, nn.BatchNorm2D):
            C = layer.params["gamma"].shape[0]
            layer.set_weight("moving_mean", (rng.standard_normal(C) * 0.3).astype(np.float32))
            layer.set_weight("gamma", (1 + 3 * rng.random(C)).astype(np.float32))
    return model


def test_conv_bn_relu6_steps_fuse_at_inference_with_the_same_bits(rng):
    x = (rng.standard_normal((4, 3, 16, 16)) * 3).astype(np.float32)
    fused, plain = _mobile_block(1), _mobile_block(1)
    for prepared in (True, False):
        steps = fused.execution_plan(False, prepared)
        assert sum(step.relu6 for step in steps) == 3
        assert not any(step.relu6 for step in fused.execution_plan(True))  # training keeps them
    original = activation_layers.ReLU6.epilogue
    activation_layers.ReLU6.epilogue = None  # the unfused oracle: separate clip passes
    try:
        assert not any(step.relu6 for step in plain.execution_plan(False, True))
        expected = {p: plain.predict(x, prepared=p) for p in (True, False)}
    finally:
        activation_layers.ReLU6.epilogue = original
    for prepared in (True, False):
        got = fused.predict(x, prepared=prepared)
        assert np.array_equal(got.view(np.uint8), expected[prepared].view(np.uint8))
    unfused_forward = fused.forward(x, training=False)  # the layer by layer path
    assert_close(got, unfused_forward.astype(np.float64), np.float32, k=200)
