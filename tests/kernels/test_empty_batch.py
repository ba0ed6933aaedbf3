"""Every public op accepts an empty batch (N = 0) and returns correctly shaped results: empty
arrays, and zeros for gradients summed over the batch (issue 13). The backends are replaced
by a stub that fails on any kernel launch, so "no kernel runs on nothing" is checked too."""

from __future__ import annotations

import numpy as np
import pytest

import fastconv as fc
from fastconv import cpu as cpu_backend
from fastconv import reference as ref
from fastconv.kernels import OPS


@pytest.fixture
def no_launch(monkeypatch):
    """Make every op of the CPU kernel set raise: an empty batch must never reach one."""
    for name in OPS:

        def fail(*args, _name=name, **kwargs):
            raise AssertionError(f"{_name} launched on an empty batch")

        monkeypatch.setattr(cpu_backend.KERNELS, name, fail)


def _cases(dtype):
    z = np.zeros
    x = z((0, 3, 6, 5), dtype)
    w = z((4, 3, 3, 3), dtype)
    g = np.ones(3, dtype)
    s = np.ones(3, np.float32)
    d = z((0, 7), dtype)
    wd = z((7, 2), dtype)
    return {
        "im2col": (lambda: fc.im2col(x, 3, 3, 1, 1), [(0, 27)]),
        "col2im": (lambda: fc.col2im(z((0, 27), dtype), x.shape, 3, 3, 1, 1), [x.shape]),
        "conv2d": (lambda: fc.conv2d(x, w, g[:1].repeat(4), 1, 1, "relu"), [(0, 4, 6, 5)]),
        "conv2d_backward": (
            lambda: fc.conv2d_backward(z((0, 4, 6, 5), dtype), x, w, 1, 1),
            [x.shape, ("zeros", w.shape), ("zeros", (4,))],
        ),
        "conv2d_backward_no_dx": (
            lambda: fc.conv2d_backward(z((0, 4, 6, 5), dtype), x, w, 1, 1, need_dx=False),
            [None, ("zeros", w.shape), ("zeros", (4,))],
        ),
        "max_pool2d": (lambda: fc.max_pool2d(x, 2), [(0, 3, 3, 2)]),
        "max_pool2d_backward": (
            lambda: fc.max_pool2d_backward(z((0, 3, 3, 2), dtype), x, 2),
            [x.shape],
        ),  # fmt: skip
        "avg_pool2d": (lambda: fc.avg_pool2d(x, 3, 1, 1), [(0, 3, 6, 5)]),
        "avg_pool2d_backward": (
            lambda: fc.avg_pool2d_backward(z((0, 3, 3, 2), dtype), x.shape, 2),
            [x.shape],
        ),
        "batch_norm_forward": (
            lambda: fc.batch_norm_forward(x, g, g, activation="relu"),
            [x.shape, ("nan", (3,)), ("nan", (3,))],
        ),
        "batch_norm_inference": (lambda: fc.batch_norm_inference(x, g, g, s, s), [x.shape]),
        "batch_norm_backward": (
            lambda: fc.batch_norm_backward(x, x, g, s, s, y=x),
            [x.shape, ("zeros", (3,)), ("zeros", (3,))],
        ),
        "batch_norm_inference_backward": (
            lambda: fc.batch_norm_inference_backward(x, g, s, y=x),
            [x.shape],
        ),
        "global_avg_pool2d": (lambda: fc.global_avg_pool2d(x), [(0, 3)]),
        "global_avg_pool2d_backward": (
            lambda: fc.global_avg_pool2d_backward(z((0, 3), dtype), x.shape),
            [x.shape],
        ),
        "dense": (lambda: fc.dense(d, wd, np.ones(2, dtype), "relu"), [(0, 2)]),
        "dense_backward": (
            lambda: fc.dense_backward(z((0, 2), dtype), d, wd),
            [(0, 7), ("zeros", (7, 2)), ("zeros", (2,))],
        ),
        "relu": (lambda: fc.relu(x), [x.shape]),
        "relu_backward": (lambda: fc.relu_backward(x, x), [x.shape]),
        "leaky_relu": (lambda: fc.leaky_relu(x, 0.2), [x.shape]),
        "leaky_relu_backward": (lambda: fc.leaky_relu_backward(x, x, 0.2), [x.shape]),
        "warp_bilinear": (
            lambda: fc.warp_bilinear(x, z((0, 2, 3), np.float32), out_size=(4, 4)),
            [(0, 3, 4, 4)],
        ),
        # displacement fields: float32 whatever the model's dtype
        "gaussian_blur": (
            lambda: fc.gaussian_blur(z((0, 6, 5), np.float32), 1.0),
            [("float32", (0, 6, 5))],
        ),
    }


CASE_NAMES = list(_cases(np.float32))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_every_op_accepts_an_empty_batch(name, dtype, no_launch):
    call, expected = _cases(dtype)[name]
    result = call()
    results = result if isinstance(result, tuple) else (result,)
    assert len(results) == len(expected)
    for got, want in zip(results, expected, strict=True):
        if want is None:
            assert got is None
            continue
        kind, shape = want if isinstance(want[0], str) else ("empty", want)
        assert isinstance(got, np.ndarray) and got.shape == tuple(shape), (got, shape)
        if kind == "nan":  # batch statistics of nothing: undefined, float32
            assert got.dtype == np.float32 and np.isnan(got).all()
            continue
        if kind == "float32":
            assert got.dtype == np.float32
            continue
        assert got.dtype == dtype
        if kind == "zeros":
            assert (got == 0).all()


def test_every_public_op_is_covered():
    not_kernels = {
        "gpu_available",
        "to_gpu",
        "to_cpu",
        "set_conv_algorithm",
        "get_conv_algorithm",
        "conv_algorithm_choices",
        "clear_conv_algorithm_choices",
    }
    ops = {n for n in fc.__all__ if n not in not_kernels}
    assert ops - {"fold_batch_norm"} <= {n.removesuffix("_no_dx") for n in CASE_NAMES}


def test_empty_batch_matches_the_reference_shapes():
    x = np.zeros((0, 2, 5, 5))
    assert ref.col2im(np.zeros((0, 18)), x.shape, 3, 3, 1, 1).shape == x.shape
    assert ref.avg_pool2d_backward(np.zeros((0, 2, 2, 2)), x.shape, 2).shape == x.shape
    assert ref.global_avg_pool2d_backward(np.zeros((0, 2)), x.shape).shape == x.shape


def test_reference_max_pool_applies_the_public_padding_rule():
    x = np.zeros((1, 1, 6, 6))
    with pytest.raises(ValueError, match="pad must be at most half the window"):
        ref.max_pool2d(x, 2, 2, 2)
    with pytest.raises(ValueError, match="pad must be at most half the window"):
        ref.max_pool2d_backward(np.zeros((1, 1, 4, 4)), x, 2, 2, 2)
    with pytest.raises(ValueError, match="pad must be at most half the window"):
        fc.max_pool2d(x.astype(np.float32), 2, 2, 2)
    assert ref.max_pool2d(x, 3, 2, 1).shape == fc.max_pool2d(x.astype(np.float32), 3, 2, 1).shape
    assert ref.avg_pool2d(x, 2, 2, 2).shape == (1, 1, 5, 5)  # padding is fine for averages
