"""Every bad argument to the public API fails with a ValueError/TypeError that names it.

Numba kernels do no bounds checks, so these checks are what stands between a wrong shape
and an out-of-bounds read; each case goes through ``import fastconv``, never a backend.
"""

from __future__ import annotations

import numpy as np
import op_cases
import pytest

import fastconv as fc

f32, f16 = np.float32, np.float16
x = np.zeros((2, 3, 6, 6), f32)  # N, C, H, W
w = np.zeros((4, 3, 3, 3), f32)  # F, C, kh, kw
b = np.zeros(4, f32)
dy_conv = np.zeros((2, 4, 4, 4), f32)  # conv2d(x, w) output
dy_pool = np.zeros((2, 3, 3, 3), f32)  # max/avg pool 2x2 output
cols = np.zeros((2 * 4 * 4, 3 * 3 * 3), f32)  # im2col(x, 3, 3)


def _cases():
    """(id, call, exception, pattern the message must match)."""
    V, T = ValueError, TypeError
    for name, f in [("max_pool2d", fc.max_pool2d), ("avg_pool2d", fc.avg_pool2d)]:
        yield f"{name}-float64", lambda f=f: f(x.astype(np.float64)), T, "x must have dtype"
        yield f"{name}-int", lambda f=f: f(x.astype(np.int32)), T, "x must have dtype"
        yield f"{name}-ndim", lambda f=f: f(x[0]), V, "x must be 4-dimensional"
        yield f"{name}-list", lambda f=f: f(x.tolist()), T, "x must be a numpy.ndarray"
        yield f"{name}-stride0", lambda f=f: f(x, 2, 0), V, r"stride must be >= 1"
        yield f"{name}-stride-bool", lambda f=f: f(x, 2, True), T, "stride must be an int"
        yield f"{name}-stride-float", lambda f=f: f(x, 2, 1.5), T, "stride must be an int"
        yield f"{name}-stride-triple", lambda f=f: f(x, 2, (1, 1, 1)), V, "stride must be"
        yield f"{name}-pad-neg", lambda f=f: f(x, 2, 2, -1), V, r"pad must be >= 0"
        yield f"{name}-pad-pair-neg", lambda f=f: f(x, 2, 2, (0, -1)), V, r"pad\[1\] must be"
        yield f"{name}-size0", lambda f=f: f(x, 0), V, r"size must be >= 1"
        yield f"{name}-size-bool", lambda f=f: f(x, True), T, "size must be an int"
        yield f"{name}-window-too-big", lambda f=f: f(x, 7), V, "window height 7 exceeds"
        yield f"{name}-window-w-too-big", lambda f=f: f(x, (2, 9), 1, 1), V, "window width 9"
        yield (
            f"{name}-no-rows",
            lambda f=f: f(np.zeros((2, 3, 0, 6), f32), 2, 2, 1),
            V,
            "x must have",
        )
    yield "max_pool2d-pad-gt-half", lambda: fc.max_pool2d(x, 2, 2, 2), V, "pad must be at most"

    mpb = fc.max_pool2d_backward
    yield "max_pool2d_backward-dy-shape", lambda: mpb(dy_pool[:, :2], x), V, "dy must have shape"
    yield "max_pool2d_backward-dy-dtype", lambda: mpb(dy_pool.astype(f16), x), T, "dy must have"
    yield "max_pool2d_backward-dy-float64", lambda: mpb(dy_pool.astype(float), x), T, "dy must"
    yield "max_pool2d_backward-dy-ndim", lambda: mpb(dy_pool[0], x), V, "dy must be 4-dim"
    yield "max_pool2d_backward-x-list", lambda: mpb(dy_pool, x.tolist()), T, "x must be a numpy"
    yield "max_pool2d_backward-dy-list", lambda: mpb(dy_pool.tolist(), x), T, "dy must be a"
    yield "max_pool2d_backward-stride-bool", lambda: mpb(dy_pool, x, 2, False), T, "stride must"
    yield "max_pool2d_backward-pad-neg", lambda: mpb(dy_pool, x, 2, 2, -1), V, "pad must be >= 0"
    yield "max_pool2d_backward-too-big", lambda: mpb(dy_pool, x, 8), V, "window height 8"

    apb = fc.avg_pool2d_backward
    yield "avg_pool2d_backward-dy-shape", lambda: apb(dy_pool, (2, 3, 8, 8)), V, "dy must have"
    yield "avg_pool2d_backward-xshape-len", lambda: apb(dy_pool, (2, 3, 6)), V, "x_shape must be"
    yield "avg_pool2d_backward-xshape-int", lambda: apb(dy_pool, 6), V, "x_shape must be"
    yield "avg_pool2d_backward-xshape-0", lambda: apb(dy_pool, (2, 0, 6, 6)), V, r"x_shape\[1\]"
    yield "avg_pool2d_backward-xshape-float", lambda: apb(dy_pool, (2, 3, 6.0, 6)), T, "x_shape"
    yield "avg_pool2d_backward-dy-float64", lambda: apb(dy_pool.astype(float), x.shape), T, "dy"
    yield "avg_pool2d_backward-dy-int", lambda: apb(dy_pool.astype(int), x.shape), T, "dy must"
    yield "avg_pool2d_backward-dy-ndim", lambda: apb(dy_pool[0], x.shape), V, "dy must be 4-dim"
    yield "avg_pool2d_backward-stride0", lambda: apb(dy_pool, x.shape, 2, 0), V, "stride must be"
    yield "avg_pool2d_backward-pad-neg", lambda: apb(dy_pool, x.shape, 2, 2, -1), V, "pad must"
    yield "avg_pool2d_backward-too-big", lambda: apb(dy_pool, x.shape, 7), V, "window height 7"
    yield "avg_pool2d_backward-dy-list", lambda: apb(dy_pool.tolist(), x.shape), T, "dy must be"

    yield "im2col-float64", lambda: fc.im2col(x.astype(float), 3, 3), T, "x must have dtype"
    yield "im2col-int", lambda: fc.im2col(x.astype(np.int64), 3, 3), T, "x must have dtype"
    yield "im2col-ndim", lambda: fc.im2col(x[0], 3, 3), V, "x must be 4-dimensional"
    yield "im2col-list", lambda: fc.im2col(x.tolist(), 3, 3), T, "x must be a numpy"
    yield "im2col-kh0", lambda: fc.im2col(x, 0, 3), V, "kh must be >= 1"
    yield "im2col-kw-bool", lambda: fc.im2col(x, 3, True), T, "kw must be an int"
    yield "im2col-stride0", lambda: fc.im2col(x, 3, 3, 0), V, "stride must be >= 1"
    yield "im2col-stride-bool", lambda: fc.im2col(x, 3, 3, True), T, "stride must be an int"
    yield "im2col-pad-neg", lambda: fc.im2col(x, 3, 3, 1, -1), V, "pad must be >= 0"
    yield "im2col-too-big", lambda: fc.im2col(x, 9, 3, 1, 1), V, "kernel height 9 exceeds"

    c2i = fc.col2im
    yield "col2im-float64", lambda: c2i(cols.astype(float), x.shape, 3, 3), T, "cols must have"
    yield "col2im-ndim", lambda: c2i(cols[None], x.shape, 3, 3), V, "cols must be 2-dim"
    yield "col2im-list", lambda: c2i(cols.tolist(), x.shape, 3, 3), T, "cols must be a numpy"
    yield "col2im-shape", lambda: c2i(cols[:, :-1], x.shape, 3, 3), V, "cols must have shape"
    yield "col2im-channels", lambda: c2i(cols, (2, 4, 6, 6), 3, 3), V, "cols must have shape"
    yield "col2im-xshape-len", lambda: c2i(cols, (2, 3, 6), 3, 3), V, "x_shape must be a 4-tuple"
    yield "col2im-xshape-neg", lambda: c2i(cols, (2, 3, -6, 6), 3, 3), V, r"x_shape\[2\]"
    yield "col2im-xshape-bool", lambda: c2i(cols, (2, True, 6, 6), 3, 3), T, r"x_shape\[1\]"
    yield "col2im-stride0", lambda: c2i(cols, x.shape, 3, 3, 0), V, "stride must be >= 1"
    yield "col2im-pad-neg", lambda: c2i(cols, x.shape, 3, 3, 1, -2), V, "pad must be >= 0"
    yield "col2im-too-big", lambda: c2i(cols, x.shape, 3, 9), V, "kernel width 9 exceeds"

    cv = fc.conv2d
    yield "conv2d-x-float64", lambda: cv(x.astype(float), w), T, "x must have dtype"
    yield "conv2d-x-int", lambda: cv(x.astype(np.int8), w), T, "x must have dtype"
    yield "conv2d-w-float64", lambda: cv(x, w.astype(float)), T, "w must have dtype"
    yield "conv2d-w-mixed", lambda: cv(x, w.astype(f16)), T, "w must have the same dtype"
    yield "conv2d-b-mixed", lambda: cv(x, w, b.astype(f16)), T, "b must have the same dtype"
    yield "conv2d-x-ndim", lambda: cv(x[0], w), V, "x must be 4-dimensional"
    yield "conv2d-w-ndim", lambda: cv(x, w[0]), V, "w must be 4-dimensional"
    yield "conv2d-b-ndim", lambda: cv(x, w, b[None]), V, "b must be 1-dimensional"
    yield "conv2d-channels", lambda: cv(x, w[:, :2]), V, "w must have 3 input channels"
    yield "conv2d-w-empty", lambda: cv(x, w[:, :, :0]), V, "w must have kernel height and width"
    yield "conv2d-b-len", lambda: cv(x, w, b[:3]), V, "b must have length 4"
    yield "conv2d-x-list", lambda: cv(x.tolist(), w), T, "x must be a numpy"
    yield "conv2d-w-list", lambda: cv(x, w.tolist()), T, "w must be a numpy"
    yield "conv2d-b-list", lambda: cv(x, w, b.tolist()), T, "b must be a numpy"
    yield "conv2d-stride0", lambda: cv(x, w, None, 0), V, "stride must be >= 1"
    yield "conv2d-stride-bool", lambda: cv(x, w, None, True), T, "stride must be an int"
    yield "conv2d-pad-neg", lambda: cv(x, w, None, 1, -1), V, "pad must be >= 0"
    yield "conv2d-too-big", lambda: cv(x[:, :, :2], w), V, "kernel height 3 exceeds"
    yield "conv2d-activation", lambda: cv(x, w, activation="tanh"), V, "activation must be"

    cb = fc.conv2d_backward
    yield "conv2d_backward-dy-shape", lambda: cb(dy_conv[:, :3], x, w), V, "dy must have shape"
    yield "conv2d_backward-dy-mixed", lambda: cb(dy_conv.astype(f16), x, w), T, "dy must have"
    yield "conv2d_backward-dy-ndim", lambda: cb(dy_conv[0], x, w), V, "dy must be 4-dim"
    yield "conv2d_backward-dy-list", lambda: cb(dy_conv.tolist(), x, w), T, "dy must be a numpy"
    yield "conv2d_backward-x-float64", lambda: cb(dy_conv, x.astype(float), w), T, "x must have"
    yield "conv2d_backward-w-mixed", lambda: cb(dy_conv, x, w.astype(f16)), T, "w must have the"
    yield "conv2d_backward-channels", lambda: cb(dy_conv, x, w[:, :1]), V, "w must have 3 input"
    yield "conv2d_backward-stride-bool", lambda: cb(dy_conv, x, w, True), T, "stride must be"
    yield "conv2d_backward-pad-neg", lambda: cb(dy_conv, x, w, 1, -1), V, "pad must be >= 0"
    yield "conv2d_backward-stride-dy", lambda: cb(dy_conv, x, w, 2), V, "dy must have shape"
    yield "conv2d-algorithm-type", lambda: cv(x, w, algorithm=1), T, "algorithm must be a str"
    yield "conv2d-algorithm-name", lambda: cv(x, w, algorithm="fft"), V, "algorithm must be one"
    w5 = np.zeros((4, 3, 5, 5), f32)
    wino5 = lambda: cv(x, w5, None, 1, 1, algorithm="winograd")  # noqa: E731
    yield "conv2d-algorithm-5x5", wino5, V, "needs a 3x3 kernel"
    yield "conv2d_backward-algorithm", lambda: cb(dy_conv, x, w, algorithm="x"), V, "algorithm"
    dy2 = np.zeros((2, 4, 2, 2), f32)
    direct2 = lambda: cb(dy2, x, w, 2, algorithm="direct")  # noqa: E731
    yield "conv2d_backward-algorithm-stride", direct2, V, "needs stride 1"
    sa = fc.set_conv_algorithm
    yield "set_conv_algorithm-type", lambda: sa(None), T, "algorithm must be a str"
    yield "set_conv_algorithm-name", lambda: sa("fastest"), V, "algorithm must be one of"

    # The batch-norm, global-pooling, dense and ReLU ops: one or two cases each here; their
    # full lists are in tests/kernels/test_batchnorm.py, test_global_pool.py and test_dense_relu.py.
    g3, s3 = np.ones(3, f32), np.ones(3, np.float32)
    yield "batch_norm_forward-x-int", lambda: fc.batch_norm_forward(x.astype(int), g3, g3), T, "x"
    yield "batch_norm_forward-gamma", lambda: fc.batch_norm_forward(x, g3[:2], g3), V, "gamma"
    yield "batch_norm_inference-mean", lambda: fc.batch_norm_inference(
        x, g3, g3, s3.astype(f16), s3), T, "mean must have dtype float32"  # fmt: skip
    yield "batch_norm_backward-dy", lambda: fc.batch_norm_backward(
        x[:1], x, g3, s3, s3), V, "dy must have shape"  # fmt: skip
    yield "batch_norm_inference_backward-var", lambda: fc.batch_norm_inference_backward(
        x, g3, s3[:1]), V, "var must have shape"  # fmt: skip
    yield "fold_batch_norm-w", lambda: fc.fold_batch_norm(w[0], None, g3, g3, s3, s3), V, "w must"
    yield "global_avg_pool2d-ndim", lambda: fc.global_avg_pool2d(x[0]), V, "x must be 4-dim"
    yield "global_avg_pool2d_backward-dy", lambda: fc.global_avg_pool2d_backward(
        x, x.shape), V, "dy must be 2-dim"  # fmt: skip
    x2, w2 = np.zeros((2, 5), f32), np.zeros((5, 3), f32)
    yield "dense-w-rows", lambda: fc.dense(x2, w2[:4]), V, "w must have 5 rows"
    yield "dense_backward-dy", lambda: fc.dense_backward(x2, x2, w2), V, "dy must have shape"
    yield "relu-float64", lambda: fc.relu(x.astype(float)), T, "x must have dtype"
    yield "relu_backward-y", lambda: fc.relu_backward(x, x[:1]), V, "y must have shape"
    theta = np.zeros((2, 2, 3), f32)
    yield "warp_bilinear-theta-shape", lambda: fc.warp_bilinear(x, theta[:1]), V, "theta must"
    yield "warp_bilinear-theta-half", lambda: fc.warp_bilinear(x, theta.astype(f16)), T, "theta"
    yield "warp_bilinear-out-size", lambda: fc.warp_bilinear(x, theta, out_size=0), V, "out_size"
    planes = np.zeros((2, 5, 5), f32)
    yield "gaussian_blur-sigma", lambda: fc.gaussian_blur(planes, 0.0), V, "sigma must be"
    yield "gaussian_blur-half", lambda: fc.gaussian_blur(planes.astype(f16), 1.0), T, "fields"
    yield "gaussian_blur-ndim", lambda: fc.gaussian_blur(planes[0], 1.0), V, "fields must be 3"


CASES = list(_cases())


@pytest.mark.parametrize(
    ("call", "exc", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_argument_is_rejected(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_every_public_kernel_is_covered():
    """Each public function has bad-argument cases here, or is a kernel op with refusals in
    its conformance case (tests/kernels/op_cases.py, run by test_kernel_interface.py)."""
    op_cases.import_test_modules()
    no_arguments = ("get_conv_algorithm", "conv_algorithm_choices", "clear_conv_algorithm_choices")
    kernels = {
        n for n in fc.__all__ if n not in ("gpu_available", "to_gpu", "to_cpu", *no_arguments)
    }
    covered = {c[0].split("-")[0] for c in CASES}
    covered |= {op for op, case in op_cases.CASES.items() if case.refusals}
    assert kernels <= covered, kernels - covered


def test_valid_calls_pass():
    # The fixtures above are valid as given: each rejection is due to the one thing changed.
    fc.max_pool2d_backward(dy_pool, x)
    fc.avg_pool2d_backward(dy_pool, x.shape)
    fc.col2im(cols, x.shape, 3, 3)
    fc.conv2d_backward(dy_conv, x, w)
    assert fc.conv2d(x, w, b).shape == dy_conv.shape
    assert fc.im2col(x, 3, 3).shape == cols.shape


def test_to_cpu_rejects_non_arrays():
    with pytest.raises(TypeError, match="x must be a numpy.ndarray"):
        fc.to_cpu([1.0])


def test_remembered_pool_geometries_still_refuse_what_differs_only_in_type():
    """Pooling remembers validated geometries by argument; True == 1 and 2.0 == 2 must not
    reach a remembered answer."""
    x = np.zeros((1, 2, 6, 6), np.float32)
    assert fc.max_pool2d(x, 1, 1).shape == (1, 2, 6, 6)
    assert fc.max_pool2d(x, 2, 2, ceil_mode=False).shape == (1, 2, 3, 3)
    with pytest.raises(TypeError, match="size"):
        fc.max_pool2d(x, True, 1)
    with pytest.raises(TypeError, match="stride"):
        fc.max_pool2d(x, 2, 2.0)
    with pytest.raises(TypeError, match="ceil_mode"):
        fc.max_pool2d(x, 2, 2, ceil_mode=0)
    with pytest.raises(ValueError, match="half the window"):
        fc.avg_pool2d(x, 2, 2, (2, 0), count_include_pad=False)
    assert fc.avg_pool2d(x, 2, 2, (1, 0)).shape == (1, 2, 4, 3)
