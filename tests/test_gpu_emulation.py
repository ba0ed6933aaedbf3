"""The CUDA kernels, compiled with g++ through ``host_shim.h``, against the float64 reference.

The SAME .cu files CuPy compiles are built into a host library and launched with the CuPy
launcher's configuration (256 threads per block, capped grid, grid-stride loops). The composite
operations run through :class:`fastconv.gpu._kernel_ops.KernelOps`, i.e. the GPU backend's own
Python code, with NumPy in place of CuPy and a float32-accumulating matmul in place of cuBLAS.
Outputs are allocated NaN-filled, so an element a kernel fails to write cannot pass.
"""

from __future__ import annotations

import shutil
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastconv import _checks as chk
from fastconv import reference as ref
from fastconv.gpu import _emulation as emu
from fastconv.gpu import _source
from fastconv.gpu._kernel_ops import BATCH, ROWS, numpy_matmul_fp32_accumulate

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


@settings(max_examples=25, deadline=None)
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


# --- the CuPy glue itself, with CuPy replaced by NumPy + the emulated kernels ---------------------


class _FakeFunction:
    """What ``RawModule.get_function`` returns: called as ``fn(grid, block, args)``."""

    def __init__(self, launcher, kernel, dtype_name, calls):
        self.launcher, self.kernel, self.dtype_name = launcher, kernel, dtype_name
        self.calls = calls

    def __call__(self, grid, block, args):
        sig = _source.SIGNATURES[self.kernel]
        assert len(grid) == 1 and len(block) == 1 and len(args) == len(sig)
        c_args = []
        for code, a in zip(sig, args, strict=True):
            if code == "i":
                assert type(a) is np.int32, (self.kernel, type(a))  # exact C type for CuPy
                c_args.append(int(a))
            else:
                assert a.flags.c_contiguous
                assert a.dtype == (self.dtype_name if code in "rw" else "float32")
                c_args.append(a.ctypes.data)
        self.calls.append((self.kernel, grid[0], block[0]))
        self.launcher._fn(self.kernel, self.dtype_name)(*c_args, grid[0], block[0])


def _fake_cupy(launcher):
    calls, modules = [], []
    ctype_to_dtype = {v: k for k, v in _source.CTYPES.items()}

    class RawModule:
        def __init__(self, code, options=(), name_expressions=()):
            self.code, self.options, self.names = code, options, list(name_expressions)
            modules.append(self)

        def get_function(self, name):
            assert name in self.names, name  # only instantiated name expressions exist
            kernel, ctype = name[:-1].split("<")
            return _FakeFunction(launcher, kernel, ctype_to_dtype[ctype], calls)

    class Device:
        def __init__(self, dev=None):
            self.id = 0 if dev is None else dev
            self.attributes = {"MultiProcessorCount": 1}  # grid cap 32 blocks

    fake = types.ModuleType("cupy")
    fake.RawModule = RawModule
    fake.cuda = types.SimpleNamespace(Device=Device)
    fake.empty = emu.PoisonedNumpy.empty
    fake.ascontiguousarray = np.ascontiguousarray
    fake.matmul = numpy_matmul_fp32_accumulate
    return fake, calls, modules


def test_backend_module_and_cupy_launcher_with_fake_cupy(lib, monkeypatch):
    from fastconv import gpu
    from fastconv.gpu import _module

    fake, calls, modules = _fake_cupy(emu.EmulatedLauncher(lib))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(_module, "_modules", {})
    monkeypatch.setattr(_module, "_max_blocks", {})
    gpu._ops.cache_clear()
    try:
        rng = np.random.default_rng(10)
        for dtype in DTYPES:
            x, w = rand(rng, (3, 8, 12, 12), dtype), rand(rng, (16, 8, 3, 3), dtype)
            b = rand(rng, (16,), dtype)
            g = chk.validate_conv2d(x, w, b, 1, 1, "relu")
            y = gpu.conv2d(x, w, b, g, "relu")
            assert_close(y, ref.conv2d(x, w, b, 1, 1, "relu"), dtype, 2)
            dy = rand(rng, y.shape, dtype)
            for a, r in zip(gpu.conv2d_backward(dy, x, w, g), ref.conv2d_backward(dy, x, w, 1, 1),
                            strict=True):  # fmt: skip
                assert_close(a, r, dtype, 10)
            gp = chk.validate_pool(x, 2, None, 0, max_pool=True)
            np.testing.assert_array_equal(gpu.max_pool2d(x, gp), ref.max_pool2d(x, 2))
            assert_close(gpu.avg_pool2d(x, gp), ref.avg_pool2d(x, 2), dtype)
            x1 = rand(rng, (2, 1, 9, 9), dtype)  # C = 1: the direct kernel
            w1 = rand(rng, (4, 1, 3, 3), dtype)
            g1 = chk.validate_conv2d(x1, w1, None, 1, 1)
            assert_close(gpu.conv2d(x1, w1, None, g1, None), ref.conv2d(x1, w1, None, 1, 1), dtype)
    finally:
        gpu._ops.cache_clear()
    assert len(modules) == 1, "the RawModule must be compiled once per device"
    mod = modules[0]
    assert mod.code == _source.module_source() and mod.options == ("-std=c++17",)
    assert sorted(mod.names) == sorted(_source.name_expressions())
    assert {k for k, _, _ in calls} >= {"im2col", "col2im", "bias_act", "conv2d_direct"}
    assert all(block == 256 and 1 <= grid <= 32 for _, grid, block in calls)
    assert any(grid == 32 for _, grid, _ in calls)  # the cap was hit: grid-stride loop on the path
