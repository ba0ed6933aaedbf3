"""``padding="same"`` against Keras/TensorFlow's rule, for every stride 1-3, kernel 1-5 and
input size 5-9 (and a non-square input): Conv2D, DepthwiseConv2D, MaxPool2D and AvgPool2D give
the values TensorFlow defines, including where its padding is asymmetric.

The rule is written out here from TensorFlow's documentation (``tf.nn.convolution``, "same"):
``out = ceil(in / stride)``, ``total = max((out - 1) * stride + kernel - in, 0)``,
``before = total // 2``, ``after = total - before``, independently of the layer's code. The
convolutions are compared with the float64 reference on the input padded by that rule (with
"valid" padding); the poolings with windows clipped to the input, as TensorFlow's "same"
pooling computes them (the max over the window's input cells, the mean over them: padding
never counts in Keras's average).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from conftest import assert_close

from fastconv import nn
from fastconv import reference as ref


def tf_same(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


CASES = list(itertools.product(range(1, 4), range(1, 6), range(5, 10)))


def _input(stride, kernel, size, channels=2):
    rng = np.random.default_rng(stride * 100 + kernel * 10 + size)
    # A non-square input too: the rule applies per axis (size x size+1).
    H, W = size, size + 1
    return rng, rng.standard_normal((4, channels, H, W)).astype(np.float32)


def _tf_padded(x, kernel, stride):
    (top, bottom), (left, right) = (tf_same(n, kernel, stride) for n in x.shape[2:])
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right))), (top, bottom, left, right)


@pytest.mark.parametrize(("stride", "kernel", "size"), CASES)
def test_conv2d_same_equals_keras(stride, kernel, size):
    rng, x = _input(stride, kernel, size)
    H, W = x.shape[2:]
    layer = nn.Conv2D(3, kernel, stride=stride, padding="same", name="c")
    model = nn.Sequential([layer], input_shape=(2, H, W))
    w, b = layer.params["W"], layer.params["b"]
    b[...] = rng.standard_normal(3).astype(np.float32)
    padded, pads = _tf_padded(x, kernel, stride)
    assert layer.pads == pads
    expected = ref.conv2d(padded, w, b, stride=stride, pad=0)
    got = model.predict(x, batch_size=4)
    assert got.shape == (4, 3, math.ceil(H / stride), math.ceil(W / stride))
    assert_close(got, expected, np.float32, 2 * kernel * kernel)


@pytest.mark.parametrize(("stride", "kernel", "size"), CASES[::3])
def test_depthwise_same_equals_keras(stride, kernel, size):
    """One case in three: the padding is the convolutions' shared code, checked in full above."""
    rng, x = _input(stride, kernel, size, channels=3)
    layer = nn.DepthwiseConv2D(kernel, stride, padding="same", depth_multiplier=2)
    model = nn.Sequential([layer], input_shape=x.shape[1:])
    w, b = layer.params["W"], layer.params["b"]
    padded, _ = _tf_padded(x, kernel, stride)
    # Output channel 2c + j reads input channel c alone: a convolution per input channel.
    expected = np.concatenate(
        [ref.conv2d(padded[:, c : c + 1], w[2 * c : 2 * c + 2], b[2 * c : 2 * c + 2], stride, 0)
         for c in range(3)], axis=1)  # fmt: skip
    assert_close(model.predict(x, batch_size=4), expected, np.float32, kernel * kernel)


def tf_same_pool(x, kernel, stride, how):
    """TensorFlow's "same" pooling by its definition: the max or mean of each window's input
    cells (windows placed by the rule above, clipped to the input), in float64."""
    N, C, H, W = x.shape
    (top, _), (left, _) = tf_same(H, kernel, stride), tf_same(W, kernel, stride)
    OH, OW = math.ceil(H / stride), math.ceil(W / stride)
    out = np.empty((N, C, OH, OW))
    for i, j in itertools.product(range(OH), range(OW)):
        r0, c0 = i * stride - top, j * stride - left
        window = x[:, :, max(r0, 0) : r0 + kernel, max(c0, 0) : c0 + kernel].astype(np.float64)
        out[:, :, i, j] = window.max(axis=(2, 3)) if how == "max" else window.mean(axis=(2, 3))
    return out


@pytest.mark.parametrize("cls,how", [(nn.MaxPool2D, "max"), (nn.AvgPool2D, "avg")])
@pytest.mark.parametrize(("stride", "kernel", "size"), CASES)
def test_pool_same_equals_keras(cls, how, stride, kernel, size):
    _, x = _input(stride, kernel, size)
    x = -np.abs(x) - 1  # all negative: a zero padding that won a max would show
    model = nn.Sequential([cls(kernel, stride, padding="same")], input_shape=x.shape[1:])
    assert_close(model.predict(x, batch_size=4), tf_same_pool(x, kernel, stride, how),
                 np.float32, kernel * kernel)  # fmt: skip


def test_the_cases_include_asymmetric_padding():
    """The suite above is not vacuous: both symmetric and asymmetric cases occur, and stride 1
    with an odd kernel (the common case) is symmetric."""
    asymmetric = [c for c in CASES if tf_same(c[2], c[1], c[0]) != tf_same(c[2], c[1], c[0])[::-1]]
    assert 0 < len(asymmetric) < len(CASES)
    assert all(tf_same(n, k, 1)[0] == tf_same(n, k, 1)[1] for n in range(5, 10) for k in (1, 3, 5))


def test_same_padding_survives_a_checkpoint(tmp_path):
    """The config keeps "same" (not the pads of one input size); the asymmetric case too."""
    for size, pads in ((9, (0, 0)), (8, (0, 1, 0, 1))):
        layers = [nn.Conv2D(2, 3, stride=3, padding="same"), nn.MaxPool2D(2, padding="same"),
                  nn.AvgPool2D(3, 2, padding="same")]  # fmt: skip
        model = nn.Sequential(layers, input_shape=(1, size, size))
        assert model.layers[0].padding == pads  # TensorFlow's, for k 3 at stride 3
        path = tmp_path / f"m{size}.npz"
        model.save(path)
        again = nn.load_model(path)
        assert [la.get_config()["padding"] for la in again.layers] == ["same"] * 3
        assert again.layers[2].count_include_pad is False
        x = np.random.default_rng(0).standard_normal((2, 1, size, size)).astype(np.float32)
        np.testing.assert_array_equal(again.predict(x), model.predict(x))
