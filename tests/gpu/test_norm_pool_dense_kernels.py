"""The batch-norm, global-pooling, dense and ReLU CUDA kernels, run on the CPU through the g++
host emulation (``fastconv_testing.emulation``) and the GPU backend's own ``KernelOps`` code,
against the float64 reference. Outputs are allocated NaN-filled, so an element a kernel fails
to write cannot pass; launches with a grid smaller than the work walk the grid-stride loops.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import assert_close

from fastconv import _checks as chk
from fastconv import reference as ref
from fastconv.gpu._kernel_ops import BN_SLICES, eps_bits
from fastconv_testing import emulation as emu

pytestmark = [
    pytest.mark.gpu_emulation,
    pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to emulate CUDA"),
]


@pytest.fixture(scope="module")
def lib():
    return emu.build_library()


@pytest.fixture(params=[3, None], ids=["grid<n", "grid>=n"])
def ops(lib, request):
    return emu.emulated_ops(emu.EmulatedLauncher(lib, block=256, max_blocks=request.param))


# (shape): 4-D and 2-D; M = N*H*W above BN_SLICES (several values per slice), below it (one
# slice per value), C = 1, H = W = 1.
BN_SHAPES = [(3, 2, 10, 10), (4, 3, 5, 5), (9, 7), (2, 1, 1, 1), (2, 1, 3, 3)]


def _params(rng, shape, dtype):
    C = shape[1]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    return x, rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)


def _m(shape):
    return shape[0] * (shape[2] * shape[3] if len(shape) == 4 else 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_training_forward_backward(ops, shape, dtype, relu):
    rng = np.random.default_rng(1)
    x, gamma, beta = _params(rng, shape, dtype)
    g, eps = chk.validate_batch_norm(x, gamma, beta, 1e-5, "relu" if relu else None)
    y, mean, var = ops.batch_norm_forward(x, gamma, beta, g, eps, relu)
    want_y, want_mean, want_var = ref.batch_norm_forward(x, gamma, beta, 1e-5,
                                                         "relu" if relu else None)  # fmt: skip
    M = _m(shape)
    assert mean.dtype == var.dtype == np.float32
    assert_close(mean, want_mean, np.float32, M)
    assert_close(var, want_var, np.float32, M)
    assert_close(y, want_y, dtype, M)
    dy = rng.standard_normal(shape).astype(dtype)
    y_arg = y if relu else None
    got = ops.batch_norm_backward(dy, x, gamma, mean, var, g, eps, y_arg)
    want = ref.batch_norm_backward(dy, x, gamma, mean, var, 1e-5, y_arg)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == dtype
        assert_close(a, b, dtype, M)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (9, 7)], ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_inference_and_backward(ops, shape, dtype, relu):
    rng = np.random.default_rng(2)
    x, gamma, beta = _params(rng, shape, dtype)
    mean = rng.standard_normal(shape[1]).astype(np.float32)
    var = rng.uniform(0.1, 2, shape[1]).astype(np.float32)
    act = "relu" if relu else None
    g, eps = chk.validate_batch_norm_inference(x, gamma, beta, mean, var, 1e-3, act)
    y = ops.batch_norm_inference(x, gamma, beta, mean, var, g, eps, relu)
    assert_close(y, ref.batch_norm_inference(x, gamma, beta, mean, var, 1e-3, act), dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y_arg = y if relu else None
    dx = ops.batch_norm_inference_backward(dy, gamma, var, g, eps, y_arg)
    assert_close(dx, ref.batch_norm_inference_backward(dy, gamma, var, 1e-3, y_arg), dtype)


def test_batch_norm_is_bit_identical_for_any_grid(lib):
    """The reductions' order is fixed by the slice count, not by the launch: any grid gives
    the same bits (no atomics, no scheduling-dependent order)."""
    rng = np.random.default_rng(3)
    x, gamma, beta = _params(rng, (5, 3, 9, 8), np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    g, eps = chk.validate_batch_norm(x, gamma, beta, 1e-5, "relu")
    results = []
    for max_blocks in (1, 2, 5, None):
        ops = emu.emulated_ops(emu.EmulatedLauncher(lib, max_blocks=max_blocks))
        y, mean, var = ops.batch_norm_forward(x, gamma, beta, g, eps, True)
        grads = ops.batch_norm_backward(dy, x, gamma, mean, var, g, eps, y)
        results.append([a.tobytes() for a in (y, mean, var, *grads)])
    assert all(r == results[0] for r in results[1:])


def test_batch_norm_slices_and_grid_stride_are_exercised(lib):
    launcher = emu.EmulatedLauncher(lib, max_blocks=2)
    ops = emu.emulated_ops(launcher)
    x = np.random.default_rng(4).standard_normal((4, 3, 12, 12)).astype(np.float32)  # M = 576
    g, eps = chk.validate_batch_norm(x, np.ones(3, np.float32), np.zeros(3, np.float32), 0, None)
    ops.batch_norm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32), g, eps, False)
    by_kernel = {k: (grid, n) for k, grid, n in launcher.launches}
    assert by_kernel["bn_stats_partial"][1] == 3 * BN_SLICES  # several values per slice
    assert all(n > grid * 256 for k, (grid, n) in by_kernel.items() if k != "bn_stats_finish")


def test_batch_norm_variance_for_a_large_mean(ops):
    x = (1000.0 + 0.01 * np.random.default_rng(5).standard_normal((6, 2, 7, 7))).astype(np.float32)
    g, eps = chk.validate_batch_norm(x, np.ones(2, np.float32), np.zeros(2, np.float32), 0, None)
    _, mean, var = ops.batch_norm_forward(x, np.ones(2, np.float32), np.zeros(2, np.float32),
                                          g, eps, False)  # fmt: skip
    np.testing.assert_allclose(var, ref.batch_norm_forward(x, np.ones(2), np.zeros(2))[2],
                               rtol=1e-3)  # fmt: skip


def test_eps_travels_as_float32_bits():
    for eps in (0.0, 1e-5, 1e-3, 0.1, 3.0):
        assert np.int32(eps_bits(eps)).view(np.float32) == np.float32(eps)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 4, 1, 1), (2, 70, 4, 4)], ids=str)
def test_global_avg_pool(ops, shape, dtype):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(shape).astype(dtype)
    g = chk.validate_global_avg_pool(x)
    assert_close(ops.global_avg_pool2d(x, g), ref.global_avg_pool2d(x), dtype, g.P)
    dy = rng.standard_normal(shape[:2]).astype(dtype)
    gb = chk.validate_global_avg_pool_backward(dy, shape)
    assert_close(ops.global_avg_pool2d_backward(dy, gb),
                 ref.global_avg_pool2d_backward(dy, shape), dtype)  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_dense_forward_backward(ops, dtype, bias, relu):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((9, 20)).astype(dtype)
    w = (rng.standard_normal((20, 6)) / 4).astype(dtype)
    b = rng.standard_normal(6).astype(dtype) if bias else None
    g = chk.validate_dense(x, w, b, "relu" if relu else None)
    y = ops.dense(x, w, b, g, relu)
    # half: the GEMM output is rounded, then the bias epilogue rounds again
    assert_close(y, ref.dense(x, w, b, "relu" if relu else None), dtype, 20 * 2)
    dy = rng.standard_normal((9, 6)).astype(dtype)
    gb = chk.validate_dense_backward(dy, x, w, True)
    got = ops.dense_backward(dy, x, w, gb, True)
    for a, r in zip(got, ref.dense_backward(dy, x, w), strict=True):
        assert a.dtype == dtype
        assert_close(a, r, dtype, 20)
    assert ops.dense_backward(dy, x, w, gb, False)[0] is None


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_relu_and_gradient_bit_exact(ops, dtype):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 700)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    x.flat[:6] = [np.nan, np.inf, -np.inf, 0.0, -0.0, -1.0]
    dy.flat[:6] = [1.0, np.nan, np.inf, -np.inf, 2.0, np.inf]
    y = ops.relu(x)
    want = np.maximum(x, dtype(0))
    assert np.array_equal(np.isnan(y), np.isnan(want))
    assert np.array_equal(y[~np.isnan(y)], want[~np.isnan(want)])
    assert np.signbit(y.flat[4])  # x's bits copied: -0.0 kept, as torch.relu
    with np.errstate(invalid="ignore"):
        want_dx = dy * (x > 0)
    out = np.empty_like(dy)
    dx = ops.relu_backward(dy, x, out)
    assert dx is out
    nan = np.isnan(want_dx)
    assert np.array_equal(np.isnan(dx), nan) and np.array_equal(dx[~nan], want_dx[~nan])


# --- the fastconv.gpu wrappers and the CuPy launcher, with CuPy replaced by NumPy + emulation ----


def test_public_api_on_the_standin_cupy():
    """Every new public op on stand-in CuPy arrays: validation, the GPU backend, the launcher and
    the cuBLAS model, against the float64 reference."""
    import fastconv as fc
    from fastconv_testing import cupy_standin as _standin

    rng = np.random.default_rng(10)
    with _standin.activated() as cp:
        for dtype in (np.float32, np.float16):
            x, gamma, beta = _params(rng, (4, 3, 6, 6), dtype)
            dy = rng.standard_normal(x.shape).astype(dtype)
            xd, gd, bd, dyd = (cp.asarray(a) for a in (x, gamma, beta, dy))
            y, mean, var = fc.batch_norm_forward(xd, gd, bd, activation="relu")
            assert type(y).__module__.startswith("cupy") and mean.dtype == np.float32
            y, mean, var = y.get(), mean.get(), var.get()
            want = ref.batch_norm_forward(x, gamma, beta, 1e-5, "relu")
            for a, b in zip((y, mean, var), want, strict=True):
                assert_close(a, b, a.dtype, 144)
            grads = fc.batch_norm_backward(dyd, xd, gd, cp.asarray(mean), cp.asarray(var),
                                           y=cp.asarray(y))  # fmt: skip
            for a, b in zip(grads, ref.batch_norm_backward(dy, x, gamma, mean, var, y=y),
                            strict=True):  # fmt: skip
                assert_close(a.get(), b, dtype, 144)
            md, vd = cp.asarray(mean), cp.asarray(var)
            assert_close(fc.batch_norm_inference(xd, gd, bd, md, vd).get(),
                         ref.batch_norm_inference(x, gamma, beta, mean, var), dtype)  # fmt: skip
            assert_close(fc.batch_norm_inference_backward(dyd, gd, vd).get(),
                         ref.batch_norm_inference_backward(dy, gamma, var), dtype)  # fmt: skip
            w = rng.standard_normal((3, 2, 3, 3)).astype(dtype)
            wf, bf = fc.fold_batch_norm(cp.asarray(w), None, gd, bd, md, vd)
            for a, b in zip((wf, bf), ref.fold_batch_norm(w, None, gamma, beta, mean, var),
                            strict=True):  # fmt: skip
                assert_close(a.get(), b, dtype)
            assert_close(fc.global_avg_pool2d(xd).get(), ref.global_avg_pool2d(x), dtype, 36)
            dp = dy[:, :, 0, 0].copy()
            assert_close(fc.global_avg_pool2d_backward(cp.asarray(dp), x.shape).get(),
                         ref.global_avg_pool2d_backward(dp, x.shape), dtype)  # fmt: skip
            a2 = x.reshape(4, -1)
            w2 = (rng.standard_normal((108, 5)) / 10).astype(dtype)
            b2 = rng.standard_normal(5).astype(dtype)
            a2d, w2d = cp.asarray(a2), cp.asarray(w2)
            assert_close(fc.dense(a2d, w2d, cp.asarray(b2), "relu").get(),
                         ref.dense(a2, w2, b2, "relu"), dtype, 216)  # fmt: skip
            d2 = rng.standard_normal((4, 5)).astype(dtype)
            for a, b in zip(fc.dense_backward(cp.asarray(d2), a2d, w2d),
                            ref.dense_backward(d2, a2, w2), strict=True):  # fmt: skip
                assert_close(a.get(), b, dtype, 108)
            np.testing.assert_array_equal(fc.relu(xd).get(), np.maximum(x, dtype(0)))
            out = cp.empty(x.shape, dtype)
            assert fc.relu_backward(dyd, xd, out=out) is out
            np.testing.assert_array_equal(out.get(), dy * (x > 0))
            with pytest.raises(ValueError, match="out must not share memory with dy"):
                fc.relu_backward(dyd, xd, out=dyd)
            empty = fc.batch_norm_forward(cp.zeros((0, 3, 2, 2), dtype), gd, bd)
            assert empty[0].shape == (0, 3, 2, 2) and np.isnan(empty[1].get()).all()
            with pytest.raises(TypeError, match="gamma must be a cupy.ndarray like x"):
                fc.batch_norm_forward(xd, gamma, bd)
            with pytest.raises(TypeError, match="mean must have dtype float32"):
                fc.batch_norm_inference(xd, gd, bd, cp.asarray(mean.astype(np.float16)), vd)
        launched = {kernel for kernel, *_ in _standin.stats.launches}
    # Every wrapper reached its own CUDA kernel through the launcher (not a NumPy fallback).
    assert {"bn_stats_partial", "bn_stats_finish", "bn_apply", "bn_backward_partial",
            "bn_backward_finish", "bn_backward_apply", "bn_inference_coef", "bn_scale_grad",
            "global_avg_pool2d", "global_avg_pool2d_backward", "bias_act",
            "relu_forward"} <= launched  # fmt: skip
