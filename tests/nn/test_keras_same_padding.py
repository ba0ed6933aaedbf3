"""Conv2D(padding="same") against Keras/TensorFlow's rule, for every stride 1-3, kernel 1-5 and
input size 5-9: the same values as the input padded by TensorFlow's rule and convolved with
"valid" padding (the float64 reference), or a ValueError where that rule pads asymmetrically.

The rule is written out here from TensorFlow's documentation (``tf.nn.convolution``, "same"):
``out = ceil(in / stride)``, ``total = max((out - 1) * stride + kernel - in, 0)``,
``before = total // 2``, ``after = total - before``, independently of the layer's code.
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


@pytest.mark.parametrize(("stride", "kernel", "size"), CASES)
def test_conv2d_same_equals_keras_or_refuses(stride, kernel, size):
    rng = np.random.default_rng(stride * 100 + kernel * 10 + size)
    # A non-square input too: the rule applies per axis (size x size+1).
    H, W = size, size + 1
    (top, bottom), (left, right) = tf_same(H, kernel, stride), tf_same(W, kernel, stride)
    layer = nn.Conv2D(3, kernel, stride=stride, padding="same", name="c")
    model = nn.Sequential([layer])
    if top != bottom or left != right:
        with pytest.raises(ValueError, match="asymmetric") as info:
            model.build((2, H, W))
        message = str(info.value)
        assert "'c'" in message and f"top {top}, bottom {bottom}" in message
        assert f"left {left}, right {right}" in message and "padding=(" in message
        return
    model.build((2, H, W))
    x = rng.standard_normal((4, 2, H, W)).astype(np.float32)
    w, b = layer.params["W"], layer.params["b"]
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    expected = ref.conv2d(padded, w, b, stride=stride, pad=0)
    got = model.predict(x, batch_size=4)
    assert got.shape == (4, 3, math.ceil(H / stride), math.ceil(W / stride))
    assert_close(got, expected, np.float32, 2 * kernel * kernel)


def test_same_is_refused_only_where_keras_pads_asymmetrically():
    """The suite above is not vacuous: both outcomes occur, and stride 1 with an odd kernel
    (the common case) always works."""
    symmetric = [c for c in CASES if tf_same(c[2], c[1], c[0]) == tf_same(c[2], c[1], c[0])[::-1]]
    assert 0 < len(symmetric) < len(CASES)
    assert all(tf_same(n, k, 1)[0] == tf_same(n, k, 1)[1] for n in range(5, 10) for k in (1, 3, 5))


def test_same_padding_survives_a_checkpoint(tmp_path):
    model = nn.Sequential([nn.Conv2D(2, 3, stride=3, padding="same")], input_shape=(1, 9, 9))
    assert model.layers[0].padding == (0, 0)  # TensorFlow pads nothing for 9 at stride 3, k 3
    path = tmp_path / "m.npz"
    model.save(path)
    again = nn.load_model(path)
    assert again.layers[0].get_config()["padding"] == "same"
    x = np.random.default_rng(0).standard_normal((2, 1, 9, 9)).astype(np.float32)
    np.testing.assert_array_equal(again.predict(x), model.predict(x))
