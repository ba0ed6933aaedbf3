"""The CUDA kernels, compiled with g++ through ``host_shim.h``, against the float64 reference.

The SAME .cu files CuPy compiles are built into a host library and launched with the CuPy
launcher's configuration (256 threads per block, capped grid, grid-stride loops). The composite
operations run through :class:`fastconv.gpu._kernel_ops.KernelOps`, i.e. the GPU backend's own
Python code, with NumPy in place of CuPy and a float32-accumulating matmul in place of cuBLAS.
Outputs are allocated NaN-filled, so an element a kernel fails to write cannot pass.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastconv import _checks as chk
from fastconv import reference as ref
from fastconv.gpu import _source
from fastconv.gpu._kernel_ops import BATCH, ROWS
from fastconv_testing import emulation as emu

pytestmark = [
    pytest.mark.gpu_emulation,
    pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to emulate CUDA"),
]

DTYPES = (np.float32, np.float16)
HALF_EPS = 2.0**-11  # unit roundoff of float16


@pytest.fixture(scope="session")
def lib():
    return emu.build_library()


@pytest.fixture(params=[3, None], ids=["grid<n", "grid>=n"])
def launcher(lib, request):
    """max_blocks=3: 768 threads walk larger problems in several grid-stride steps;
    None: one thread per output, surplus threads in the last block must do nothing."""
    return emu.EmulatedLauncher(lib, block=256, max_blocks=request.param)


@pytest.fixture
def ops(launcher):
    return emu.emulated_ops(launcher)


def rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def assert_close(got, want, dtype, rounding_steps=1):
    """float32: 1e-5 of the output scale (fp32 sums of a few hundred terms);
    float16: ``rounding_steps`` half-precision roundings of the output scale (+1 for slack)."""
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape
    assert not np.isnan(got).any(), "NaN in output: an element was never written"
    scale = max(np.abs(want).max(), 1.0)
    tol = 1e-5 if dtype == np.float32 else (rounding_steps + 1) * HALF_EPS
    err = np.abs(got - want).max()
    assert err <= tol * scale, f"max error {err:.3g} > {tol * scale:.3g}"


GEOMETRIES = [
    # (N, C, H, W), (kh, kw), stride, pad
    ((2, 3, 7, 7), (3, 3), 1, 1),
    ((2, 2, 9, 8), (3, 2), 2, (2, 1)),
    ((1, 4, 6, 6), (2, 2), (2, 1), 0),
    ((2, 1, 5, 5), (5, 5), 1, 2),
]


# --- im2col / col2im ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,kernel,stride,pad", GEOMETRIES)
def test_im2col_both_layouts(ops, dtype, shape, kernel, stride, pad):
    x = rand(np.random.default_rng(0), shape, dtype)
    g = chk.validate_im2col(x, *kernel, stride, pad)
    want = ref.im2col(x, *kernel, stride, pad)
    np.testing.assert_array_equal(ops.im2col(x, g, ROWS), want)  # pure copies: exact
    batch = ops.im2col(x, g, BATCH)
    assert batch.shape == (g.N, g.C * g.kh * g.kw, g.OH * g.OW)
    np.testing.assert_array_equal(batch, want.reshape(g.N, g.OH * g.OW, -1).transpose(0, 2, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,kernel,stride,pad", GEOMETRIES)
def test_col2im_gather_both_layouts(ops, dtype, shape, kernel, stride, pad):
    rng = np.random.default_rng(1)
    g = chk.window_geometry(shape, kernel, stride, pad)
    cols = rand(rng, (g.N * g.OH * g.OW, g.C * g.kh * g.kw), dtype)
    want = ref.col2im(cols, shape, *kernel, stride, pad)
    steps = g.kh * g.kw  # fp32 accumulation, one final half rounding: loose bound on overlap
    assert_close(ops.col2im(cols, g, ROWS), want, dtype, 1 if dtype == np.float16 else steps)
    batch = np.ascontiguousarray(cols.reshape(g.N, g.OH * g.OW, -1).transpose(0, 2, 1))
    assert_close(ops.col2im(batch, g, BATCH), want, dtype)


def test_col2im_is_the_adjoint_of_im2col(ops):
    rng = np.random.default_rng(2)
    x = rand(rng, (2, 3, 8, 7), np.float32)
    g = chk.validate_im2col(x, 3, 3, 2, 1)
    c = rand(rng, (g.N * g.OH * g.OW, g.C * 9), np.float32)
    lhs = np.vdot(ops.im2col(x, g).astype(np.float64), c)
    rhs = np.vdot(x.astype(np.float64), ops.col2im(c, g))
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)


# --- convolution ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["direct", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_conv2d_forward(launcher, path, dtype, bias, activation):
    ops = emu.emulated_ops(launcher, direct_max_k=10**6 if path == "direct" else 0)
    rng = np.random.default_rng(3)
    x, w = rand(rng, (2, 3, 7, 6), dtype), rand(rng, (4, 3, 3, 3), dtype)
    b = rand(rng, (4,), dtype) if bias else None
    g = chk.validate_conv2d(x, w, b, 1, 1, activation)
    y = ops.conv2d(x, w, b, g, activation)
    assert y.dtype == dtype
    # GEMM path rounds to half after the matmul and again after the bias: two roundings.
    assert_close(y, ref.conv2d(x, w, b, 1, 1, activation), dtype, rounding_steps=2)
    if activation == "relu":
        assert (y >= 0).all()


# The deep MNIST layers (batch 2): conv1 takes the direct path (C*kh*kw = 9), the rest GEMM.
MNIST_CONVS = [
    ((2, 1, 28, 28), 16, 1),
    ((2, 16, 28, 28), 16, 1),
    ((2, 16, 14, 14), 32, 1),
    ((2, 32, 14, 14), 32, 2),
    ((2, 32, 8, 8), 64, 1),
    ((2, 64, 8, 8), 64, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,filters,pad", MNIST_CONVS)
def test_deep_mnist_layers_forward_backward(ops, dtype, shape, filters, pad):
    rng = np.random.default_rng(4)
    x = rand(rng, shape, dtype)
    w = (rand(rng, (filters, shape[1], 3, 3), np.float32) / np.sqrt(9 * shape[1])).astype(dtype)
    b = rand(rng, (filters,), dtype)
    g = chk.validate_conv2d(x, w, b, 1, pad, "relu")
    assert_close(ops.conv2d(x, w, b, g, "relu"), ref.conv2d(x, w, b, 1, pad, "relu"), dtype, 2)
    dy = rand(rng, (g.N, filters, g.OH, g.OW), dtype)
    got = ops.conv2d_backward(dy, x, w, g)
    want = ref.conv2d_backward(dy, x, w, 1, pad)
    for name, a, r in zip(("dx", "dw", "db"), got, want, strict=True):
        assert a.dtype == dtype, name
        # dx: half GEMM output rounded, then up to 9 of those summed by col2im, rounded again.
        assert_close(a, r, dtype, rounding_steps=10 if name == "dx" else 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_backward_without_dx(ops, dtype):
    rng = np.random.default_rng(6)
    x = rand(rng, (2, 3, 9, 8), dtype)
    w = rand(rng, (4, 3, 3, 3), dtype)
    g = chk.validate_conv2d(x, w, None, 1, 1)
    dy = rand(rng, (g.N, 4, g.OH, g.OW), dtype)
    dx, dw, db = ops.conv2d_backward(dy, x, w, g, need_dx=False)
    assert dx is None
    _, dw_full, db_full = ops.conv2d_backward(dy, x, w, g)
    np.testing.assert_array_equal(dw, dw_full)
    np.testing.assert_array_equal(db, db_full)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_in_chunks_of_images_matches_one_pass(launcher, dtype):
    """A batch whose unfolded buffer exceeds the workspace bound is convolved in chunks of
    images (2, 2, 1 here): the same forward values, and gradients equal to the reference."""
    rng = np.random.default_rng(12)
    x, w = rand(rng, (5, 3, 6, 7), dtype), rand(rng, (4, 3, 3, 3), dtype)
    b = rand(rng, (4,), dtype)
    g = chk.validate_conv2d(x, w, b, 1, 1, "relu")
    per_image = 27 * 6 * 7 * np.dtype(dtype).itemsize
    whole = emu.emulated_ops(launcher, direct_max_k=0)
    chunked = emu.emulated_ops(launcher, direct_max_k=0, workspace_bytes=2 * per_image)
    assert chunked._chunks(g, np.dtype(dtype).itemsize) == [(0, 2), (2, 4), (4, 5)]
    np.testing.assert_array_equal(
        chunked.conv2d(x, w, b, g, "relu"), whole.conv2d(x, w, b, g, "relu")
    )
    dy = rand(rng, (5, 4, 6, 7), dtype)
    got = chunked.conv2d_backward(dy, x, w, g)
    for a, r in zip(got, ref.conv2d_backward(dy, x, w, 1, 1), strict=True):
        assert_close(a, r, dtype, rounding_steps=10)
    dx, dw, db = chunked.conv2d_backward(dy, x, w, g, need_dx=False)
    assert dx is None
    np.testing.assert_array_equal(dw, got[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,kernel,stride,pad", GEOMETRIES)
def test_conv2d_backward_geometries(ops, dtype, shape, kernel, stride, pad):
    rng = np.random.default_rng(5)
    x = rand(rng, shape, dtype)
    w = rand(rng, (3, shape[1], *kernel), dtype)
    g = chk.validate_conv2d(x, w, None, stride, pad)
    dy = rand(rng, (g.N, 3, g.OH, g.OW), dtype)
    got = ops.conv2d_backward(dy, x, w, g)
    want = ref.conv2d_backward(dy, x, w, stride, pad)
    for a, r in zip(got, want, strict=True):
        assert_close(a, r, dtype, rounding_steps=g.kh * g.kw + 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,F,P", [(3, 2, 1), (1, 5, 7), (2, 3, 300), (4, 16, 784)])
def test_bias_grad_two_pass_reduction(ops, dtype, N, F, P):
    dy = rand(np.random.default_rng(9), (N, F, P), dtype)
    db = ops.bias_grad(dy, N, F, P)
    assert db.dtype == dtype
    assert_close(db, dy.astype(np.float64).sum(axis=(0, 2)), dtype)


# --- pooling --------------------------------------------------------------------------------------

POOLS = [
    # shape, size, stride, pad
    ((2, 3, 8, 8), 2, None, 0),  # the MNIST pool
    ((2, 2, 7, 9), 3, 2, 1),  # overlapping windows with padding
    ((1, 2, 6, 5), (3, 2), 1, (1, 1)),  # heavy overlap, non-square
    ((1, 1, 5, 5), 2, 3, 0),  # gaps between windows
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,size,stride,pad", POOLS)
def test_max_pool_forward_backward_with_ties(ops, dtype, shape, size, stride, pad):
    rng = np.random.default_rng(6)
    # Small integers make ties common, so "first maximum, row-major" is really tested.
    x = rng.integers(-2, 3, size=shape).astype(dtype)
    g = chk.validate_pool(x, size, stride, pad, max_pool=True)
    np.testing.assert_array_equal(ops.max_pool2d(x, g), ref.max_pool2d(x, size, stride, pad))
    dy = rng.integers(1, 5, size=(g.N, g.C, g.OH, g.OW)).astype(dtype)
    # integer dy: sums are exact in both precisions, so the routing must match exactly
    np.testing.assert_array_equal(
        ops.max_pool2d_backward(dy, x, g), ref.max_pool2d_backward(dy, x, size, stride, pad)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_nan_propagates_and_takes_the_gradient(ops, dtype):
    x = np.arange(32, dtype=dtype).reshape(1, 2, 4, 4)
    x[0, 0, 0, 1] = np.nan
    x[0, 0, 1, 0] = np.nan  # second NaN in the same window: the first one gets dy
    x[0, 1, 3, 3] = np.nan
    g = chk.validate_pool(x, 2, None, 0, max_pool=True)
    y = ops.max_pool2d(x, g)
    np.testing.assert_array_equal(y, ref.max_pool2d(x, 2))
    assert np.isnan(y[0, 0, 0, 0]) and np.isnan(y[0, 1, 1, 1])
    dy = np.arange(1, 9, dtype=dtype).reshape(1, 2, 2, 2)
    dx = ops.max_pool2d_backward(dy, x, g)
    np.testing.assert_array_equal(dx, ref.max_pool2d_backward(dy, x, 2))
    assert dx[0, 0, 0, 1] == 1 and dx[0, 0, 1, 0] == 0


def test_max_pool_padding_never_wins(ops):
    x = -np.ones((1, 1, 4, 4), np.float32) * 5  # all real pixels below the zero of padding
    g = chk.validate_pool(x, 3, 2, 1, max_pool=True)
    np.testing.assert_array_equal(ops.max_pool2d(x, g), np.full((1, 1, 2, 2), -5, np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,size,stride,pad", POOLS)
def test_avg_pool_forward_backward(ops, dtype, shape, size, stride, pad):
    rng = np.random.default_rng(7)
    x = rand(rng, shape, dtype)
    g = chk.validate_pool(x, size, stride, pad, max_pool=False)
    assert_close(ops.avg_pool2d(x, g), ref.avg_pool2d(x, size, stride, pad), dtype)
    dy = rand(rng, (g.N, g.C, g.OH, g.OW), dtype)
    want = ref.avg_pool2d_backward(dy, shape, size, stride, pad)
    assert_close(ops.avg_pool2d_backward(dy, g), want, dtype)


# --- launch configuration and randomized geometry ------------------------------------------------


def test_grid_stride_loop_is_exercised(lib):
    launcher = emu.EmulatedLauncher(lib, block=256, max_blocks=3)
    ops = emu.emulated_ops(launcher, direct_max_k=0)
    rng = np.random.default_rng(8)
    x, w = rand(rng, (2, 4, 10, 10), np.float32), rand(rng, (5, 4, 3, 3), np.float32)
    g = chk.validate_conv2d(x, w, None, 1, 1)
    ops.conv2d_backward(rand(rng, (2, 5, 10, 10), np.float32), x, w, g)
    big = [(k, grid, n) for k, grid, n in launcher.launches if n > grid * 256]
    assert {k for k, _, _ in big} >= {"im2col", "col2im"}, launcher.launches
    assert all(grid <= 3 for _, grid, _ in launcher.launches)


def test_launcher_rejects_wrong_arguments(lib):
    launcher = emu.EmulatedLauncher(lib)
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(TypeError, match="takes"):
        launcher("max_pool2d", 4, x, x, 1)
    with pytest.raises(TypeError, match="C-contiguous"):
        launcher("max_pool2d", 4, x[..., ::2], x, *([1] * 12))


@settings(max_examples=int(os.environ.get("FASTCONV_HYPOTHESIS_MAX_EXAMPLES", "25")), deadline=None)
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    k=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    s=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    p=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    seed=st.integers(0, 2**16),
)
def test_random_geometry_conv_and_pool(lib, n, c, h, w, k, s, p, seed):
    ops = emu.emulated_ops(emu.EmulatedLauncher(lib, max_blocks=2), direct_max_k=0)
    rng = np.random.default_rng(seed)
    x = rand(rng, (n, c, h, w), np.float32)
    wt = rand(rng, (2, c, *k), np.float32)
    try:
        g = chk.validate_conv2d(x, wt, None, s, p)
    except ValueError:
        return  # kernel larger than the padded input: rejected before any launch
    dy = rand(rng, (n, 2, g.OH, g.OW), np.float32)
    assert_close(ops.conv2d(x, wt, None, g, None), ref.conv2d(x, wt, None, s, p), np.float32)
    got, want = ops.conv2d_backward(dy, x, wt, g), ref.conv2d_backward(dy, x, wt, s, p)
    for a, r in zip(got, want, strict=True):
        assert_close(a, r, np.float32)
    if 2 * p[0] <= k[0] and 2 * p[1] <= k[1]:
        gp = chk.validate_pool(x, k, s, p, max_pool=True)
        np.testing.assert_array_equal(ops.max_pool2d(x, gp), ref.max_pool2d(x, k, s, p))
        dyp = rand(rng, (n, c, gp.OH, gp.OW), np.float32)
        want = ref.max_pool2d_backward(dyp, x, k, s, p)
        assert_close(ops.max_pool2d_backward(dyp, x, gp), want, np.float32)


# --- the CuPy glue itself: fastconv.gpu on the stand-in CuPy (NumPy memory, emulated kernels) ---


@pytest.fixture
def standin():
    from fastconv_testing import cupy_standin as _standin

    with _standin.activated() as cp:
        yield cp


def test_backend_module_and_cupy_launcher_on_the_standin(standin):
    from fastconv import gpu
    from fastconv.gpu import _module
    from fastconv_testing import cupy_standin as sd

    cp = standin
    kernels = gpu.kernels()
    rng = np.random.default_rng(10)
    for _ in range(2):  # a second round must reuse the module and every function
        for dtype in DTYPES:
            x, w = rand(rng, (3, 8, 12, 12), dtype), rand(rng, (16, 8, 3, 3), dtype)
            b = rand(rng, (16,), dtype)
            g = chk.validate_conv2d(x, w, b, 1, 1, "relu")
            y = kernels.conv2d(cp.asarray(x), cp.asarray(w), cp.asarray(b), g, "relu")
            assert_close(y.get(), ref.conv2d(x, w, b, 1, 1, "relu"), dtype, 2)
            dy = rand(rng, y.shape, dtype)
            got = kernels.conv2d_backward(cp.asarray(dy), cp.asarray(x), cp.asarray(w), g)
            for a, r in zip(got, ref.conv2d_backward(dy, x, w, 1, 1), strict=True):
                assert_close(a.get(), r, dtype, 10)
            gp = chk.validate_pool(x, 2, None, 0, max_pool=True)
            np.testing.assert_array_equal(kernels.max_pool2d(cp.asarray(x), gp).get(),
                                          ref.max_pool2d(x, 2))  # fmt: skip
            x1, w1 = rand(rng, (2, 1, 9, 9), dtype), rand(rng, (4, 1, 3, 3), dtype)  # direct
            g1 = chk.validate_conv2d(x1, w1, None, 1, 1)
            y1 = kernels.conv2d(cp.asarray(x1), cp.asarray(w1), None, g1, None)
            assert_close(y1.get(), ref.conv2d(x1, w1, None, 1, 1), dtype)
        if _ == 0:
            functions_after_first_round = sd.stats.get_function
    assert len(sd.stats.modules) == 1, "the RawModule must be compiled once per device"
    mod = sd.stats.modules[0]
    assert mod.code == _source.module_source() and mod.options == _source.NVRTC_OPTIONS
    assert sorted(mod.name_expressions) == sorted(_source.name_expressions())
    # get_function once per (device, kernel, dtype), never per launch
    assert sd.stats.get_function == functions_after_first_round == len(_module._functions)
    assert len(sd.stats.launches) >= 2 * sd.stats.get_function  # each function reused
    kernels = {k for k, *_ in sd.stats.launches}
    assert kernels >= {"im2col", "col2im", "bias_act", "conv2d_direct", "max_pool2d"}
    assert all(block == 256 and 1 <= grid <= 32 for _, _, grid, block, _ in sd.stats.launches)
    assert any(grid == 32 for _, _, grid, _, _ in sd.stats.launches)  # cap hit: grid-stride
    # Every GEMM: compute type CUBLAS_COMPUTE_32F (68) on a handle in CUBLAS_DEFAULT_MATH (0),
    # and for float16 the operands stay half (CUDA_R_16F = 2): no float32 copies, no TF32.
    assert {(name, math, compute) for name, math, compute, _, _ in sd.stats.gemm_calls} == {
        ("gemmEx", 0, 68),
        ("gemmStridedBatchedEx", 0, 68),
    }
    assert {dt for *_, dt, _ in sd.stats.gemm_calls} == {0, 2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True),
                                             (True, True)])  # fmt: skip
def test_cublas_gemm_wiring_against_numpy(standin, dtype, trans_a, trans_b):
    """_module.gemm's m/n/k, leading dimensions and transposes, through a column-major model
    of cublasGemmEx that reads the raw pointers (a wrong one gives a wrong result or an
    out-of-allocation error)."""
    from fastconv.gpu import _module

    cp = standin
    rng = np.random.default_rng(11)
    M, K, N = 5, 7, 3
    a = rand(rng, (K, M) if trans_a else (M, K), dtype)
    b = rand(rng, (N, K) if trans_b else (K, N), dtype)
    c = _module.gemm(cp.asarray(a), cp.asarray(b), trans_a=trans_a, trans_b=trans_b)
    want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    assert c.dtype == dtype and c.shape == (M, N)
    assert_close(c.get(), want, dtype)
    batch = rand(rng, (4, K, N), dtype)
    cb = _module.gemm(cp.asarray(rand(rng, (M, K), dtype)), cp.asarray(batch))
    assert cb.shape == (4, M, N)


def test_cublas_model_bites(standin):
    """The stand-in's cuBLAS is not a NumPy matmul in disguise: a leading dimension or a
    transpose flag that is off reads other memory and the result changes or is refused."""
    from fastconv.gpu import _module

    cp, cublas = standin, standin.cuda.cublas
    rng = np.random.default_rng(12)
    a, b = (cp.asarray(rand(rng, (4, 4), np.float32)) for _ in range(2))
    c = cp.empty((4, 4), dtype=np.float32)
    h = _module._cublas_handle(0)
    one, zero = _module._ONE.ctypes.data, _module._ZERO.ctypes.data

    def call(transa, lda):
        cublas.gemmEx(h, transa, 0, 4, 4, 4, one, b.data.ptr, 0, lda, a.data.ptr, 0, 4, zero,
                      c.data.ptr, 0, 4, 68, -1)  # fmt: skip
        return c.get().copy()

    right = call(0, 4)
    np.testing.assert_allclose(right, (a @ b).get(), rtol=1e-6)
    assert not np.allclose(call(1, 4), right)  # transpose flag off
    with pytest.raises(RuntimeError, match="outside every device allocation"):
        call(0, 5)  # a leading dimension too large walks past the end of b
    with pytest.raises(ValueError, match="lda"):
        call(0, 3)  # too small: cuBLAS refuses it


def test_gemms_follow_cupys_current_stream(standin):
    """The backend's cuBLAS handle is re-bound to CuPy's current stream: a convolution on a
    non-blocking stream runs its GEMMs there, ordered with its kernels. The stand-in refuses a
    GEMM on a handle bound to another stream (a race on a GPU), shown on a raw call."""
    from fastconv.gpu import _module

    cp, cublas = standin, standin.cuda.cublas
    rng = np.random.default_rng(14)
    x, w = rand(rng, (2, 8, 6, 6), np.float32), rand(rng, (4, 8, 3, 3), np.float32)
    g = chk.validate_conv2d(x, w, None, 1, 1)
    ops = __import__("fastconv").gpu.kernels()
    want = ops.conv2d(cp.asarray(x), cp.asarray(w), None, g, None).get()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        y = ops.conv2d(cp.asarray(x), cp.asarray(w), None, g, None)
        dx, dw, _ = ops.conv2d_backward(cp.asarray(want), cp.asarray(x), cp.asarray(w), g)
        h = _module._cublas_handle(0)
        assert cublas.getStream(h) == stream.ptr != 0
    np.testing.assert_array_equal(y.get(), want)
    # Back on the default stream, the next GEMM re-binds the handle.
    ops.conv2d(cp.asarray(x), cp.asarray(w), None, g, None)
    assert cublas.getStream(h) == 0
    a = cp.asarray(rand(rng, (4, 4), np.float32))
    with stream, pytest.raises(RuntimeError, match="would race the kernels"):
        cublas.gemmEx(h, 0, 0, 4, 4, 4, _module._ONE.ctypes.data, a.data.ptr, 0, 4, a.data.ptr,
                      0, 4, _module._ZERO.ctypes.data, a.data.ptr, 0, 4, 68, -1)  # fmt: skip


def test_launch_arguments_are_checked(standin):
    from fastconv.gpu import _module

    cp = standin
    x = cp.zeros((1, 1, 4, 4), dtype=np.float32)
    y = cp.empty((1, 1, 2, 2), dtype=np.float32)
    geom = [1, 1, 4, 4, 2, 2, 2, 2, 0, 0, 2, 2]
    _module.launch("max_pool2d", 4, x, y, *geom)
    with pytest.raises(TypeError, match=r"takes 14 arguments"):
        _module.launch("max_pool2d", 4, x, y, 1)
    with pytest.raises(TypeError, match=r"argument 0 \(x\) must be a cupy.ndarray, got a numpy"):
        _module.launch("max_pool2d", 4, np.zeros((1, 1, 4, 4), np.float32), y, *geom)
    with pytest.raises(TypeError, match=r"argument 1 \(y\) must be a C-contiguous float32.*16"):
        _module.launch("max_pool2d", 4, x, y.astype(np.float16), *geom)
    with pytest.raises(TypeError, match=r"argument 0 \(x\).*non-contiguous"):
        _module.launch("max_pool2d", 4, cp.zeros((1, 1, 4, 8), np.float32)[..., ::2], y, *geom)
    with pytest.raises(TypeError, match=r"argument 1 \(partial\) must be a C-contiguous float32"):
        _module.launch("bias_grad_partial", 2, x, x.astype(np.float16), 1, 1, 16, 2)
    with pytest.raises(ValueError, match=r"argument 4 \(H\) = 2147483648 exceeds"):
        _module.launch("max_pool2d", 4, x, y, 1, 1, 2**31, *geom[3:])
    with pytest.raises(TypeError, match=r"argument 2 \(N\) must be an int"):
        _module.launch("max_pool2d", 4, x, y, 1.0, *geom[1:])
    with standin.cuda.Device(1):
        x1 = cp.zeros((1, 1, 4, 4), dtype=np.float32)
    with pytest.raises(TypeError, match=r"argument 0 \(x\) .* on device 0, got .* on device 1"):
        _module.launch("max_pool2d", 4, x1, y, *geom)


def test_signatures_are_read_from_every_global_kernel_of_the_sources():
    """SIGNATURES is the __global__ declarations of the .cu files, without a compiler: every
    kernel there (a launch-time name lookup), parameters of the five known kinds, unique names."""
    import re

    declared = re.findall(r"__global__\s+void\s+(\w+)", _source.module_source())
    assert list(_source.SIGNATURES) == declared and len(declared) == len(set(declared))
    assert _source.SIGNATURES["relu_backward"] == "rrwi"  # (dy, y, dx, n)
    for kernel in _source.SIGNATURES:
        params = _source.kernel_params(kernel)
        assert len({name for _, name in params}) == len(params), kernel


def test_a_kernel_parameter_of_another_type_is_refused(monkeypatch):
    original = _source.read

    def read(name):
        text = original(name)
        return text.replace("int n)", "double n)", 1) if name == "activation.cu" else text

    monkeypatch.setattr(_source, "read", read)
    with pytest.raises(ValueError, match="relu_forward in activation.cu: parameters must be"):
        _source._read_signatures()


@pytest.mark.parametrize(
    "geometry,message",
    [
        (chk.Geometry(1, 1, 2**31 - 2, 4, 3, 3, 1, 1, 1, 1, 2**31 - 2, 4), "height"),
        (chk.Geometry(1, 1, 4, 8, 3, 3, 1, 2**31 - 8, 1, 1, 4, 1), "width"),
        (chk.Geometry(1, 1, 70000, 70000, 50000, 50000, 1, 1, 0, 0, 20001, 20001), "window"),
    ],
)
def test_geometries_beyond_32_bit_indices_are_refused(ops, geometry, message):
    x = np.zeros((1, 1, 1, 1), np.float32)  # never read: refused before any launch
    with pytest.raises(ValueError, match=f"{message}.*32-bit index range"):
        ops.max_pool2d(x, geometry)
    with pytest.raises(ValueError, match="32-bit index range"):
        ops.im2col(x, geometry)


def test_ftz_pins_the_cpu_gpu_difference_on_subnormals(ops):
    """The device flushes float32 subnormals to zero (-ftz=true, forced by CuPy); so does the
    emulation. The CPU backend and the float64 reference keep them: a pinned difference, only
    for |values| < 1.2e-38. float16 is unaffected (every half value is a normal float)."""
    import fastconv

    tiny = np.float32(1e-39)  # subnormal in float32
    assert tiny != 0 and abs(tiny) < np.finfo(np.float32).tiny
    x = np.full((1, 1, 2, 2), tiny, np.float32)
    g = chk.validate_pool(x, 2, None, 0, max_pool=False)
    assert ops.avg_pool2d(x, g)[0, 0, 0, 0] == 0  # FTZ: flushed on the device and emulation
    assert fastconv.avg_pool2d(x, 2)[0, 0, 0, 0] == pytest.approx(1e-39, rel=1e-3)  # CPU: kept
    w = np.ones((1, 1, 1, 1), np.float32)
    gc = chk.validate_conv2d(x, w, None, 1, 0)
    assert (ops.conv2d(x, w, None, gc, None) == 0).all()  # direct kernel: 1e-39 * 1 flushed
    h = np.full((1, 1, 2, 2), np.float16(2.0**-24), np.float16)  # the smallest half subnormal
    assert (ops.max_pool2d(h, g) == h[..., :1, :1]).all()


def test_no_fma_contraction_in_the_emulation(lib):
    """-fmad=false on the device, -ffp-contract=off here: a*b+c rounds twice on both sides.
    With a = b = 1 + 2^-12 and c = -(1 + 2^-11): the exact product 1 + 2^-11 + 2^-24 rounds (a
    tie, to even) to 1 + 2^-11, so the result is 0; a fused multiply-add would give 2^-24."""
    ops = emu.emulated_ops(emu.EmulatedLauncher(lib), direct_max_k=10**6)
    x = np.array([[[[1 + 2.0**-12]]]], np.float32)
    w = np.array([[[[1 + 2.0**-12]]]], np.float32)
    b = np.array([-(1 + 2.0**-11)], np.float32)
    g = chk.validate_conv2d(x, w, b, 1, 0)
    # conv2d_direct computes acc = b; acc += x * w: one multiply, one add.
    assert ops.conv2d(x, w, b, g, None)[0, 0, 0, 0] == 0.0


def test_zz_every_kernel_in_signatures_was_exercised(request):
    """Runs last in the session (tests/conftest.py): every kernel x dtype of SIGNATURES
    (including kernels added later) must have been launched by the emulation tests of the
    session, in any library build. Enforced on full runs of tests/ (every test file collected,
    nothing deselected), such as the README's test command; a subset may not cover all.
    ``FASTCONV_REQUIRE_FULL_RUN=1`` (CI's first stage) makes a run that is not full a failure,
    so the gate cannot be skipped unseen."""
    from conftest import _DESELECTED

    tests = Path(__file__).resolve().parents[1]
    collected = {item.path.resolve() for item in request.session.items}
    missing_files = {p.resolve() for p in tests.rglob("test_*.py")} - collected
    names = sorted(str(p.relative_to(tests)) for p in missing_files)
    some = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    parts = [f"{len(missing_files)} test file(s) not collected ({some})"] if missing_files else []
    parts += [f"{len(_DESELECTED)} test(s) deselected"] if _DESELECTED else []
    if parts:
        why = "kernel coverage is checked on full runs of tests/; this run had " + ", ".join(parts)
        if os.environ.get("FASTCONV_REQUIRE_FULL_RUN") == "1":
            pytest.fail(f"FASTCONV_REQUIRE_FULL_RUN=1, but {why}")
        pytest.skip(why)
    missing = {(k, d) for k in _source.SIGNATURES for d in _source.CTYPES} - emu.KernelLibrary.seen
    assert not missing, f"kernels never run by the emulation tests: {sorted(missing)}"


def test_emulation_library_cache_is_private(tmp_path, monkeypatch):
    """Issue 13: the library is never loaded from a directory another user could write (the old
    predictable /tmp path); a group/world-writable cache is refused for a private temp dir."""
    import stat

    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(tmp_path / "mine"))
    d = emu.cache_dir()
    assert d == tmp_path / "mine" / "gpu-emulation"
    assert stat.S_IMODE(d.stat().st_mode) & 0o077 == 0
    shared = tmp_path / "shared" / "gpu-emulation"
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(tmp_path / "shared"))
    with pytest.raises(PermissionError, match="not private"):
        emu._check_private(shared)
    d = emu.cache_dir()
    assert d != shared and stat.S_IMODE(d.stat().st_mode) & 0o077 == 0
