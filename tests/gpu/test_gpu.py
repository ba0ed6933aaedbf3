"""GPU backend on a real device (marker ``gpu``), plus its CPU-checkable behaviour.

The ``gpu`` tests run the public API on CuPy arrays and compare with the float64 reference and
with the CPU backend; they are skipped, with the reason, where no usable CUDA device exists.
The unmarked tests at the top check, everywhere, how the backend reports that it cannot run.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

import fastconv
from fastconv import gpu
from fastconv import reference as ref
from fastconv.gpu import _module

# --- availability and error reporting (run everywhere) ---------------------------------------


@pytest.fixture
def fresh_reason():
    gpu.unavailable_reason.cache_clear()
    yield
    gpu.unavailable_reason.cache_clear()


def _fake_cupy(driver=13000, runtime=13000, count=1, count_error=None):
    def get_count():
        if count_error is not None:
            raise count_error
        return count

    rt = types.SimpleNamespace(
        driverGetVersion=lambda: driver,
        runtimeGetVersion=lambda: runtime,
        getDeviceCount=get_count,
    )
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=rt))


def test_available_is_a_bool_and_never_raises():
    assert isinstance(gpu.available(), bool)
    assert isinstance(fastconv.gpu_available(), bool)


def test_missing_cupy_is_reported(monkeypatch, fresh_reason):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    assert gpu.available() is False
    with pytest.raises(RuntimeError, match="CuPy is not installed.*cupy-cuda13x"):
        fastconv.to_gpu(np.zeros(3, np.float32))


def test_old_driver_is_reported(monkeypatch, fresh_reason):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(driver=12040, runtime=13000))
    assert gpu.available() is False
    with pytest.raises(RuntimeError, match=r"driver is too old.*CUDA 12\.4.*CUDA 13\.0"):
        fastconv.to_gpu(np.zeros(3, np.float32))


@pytest.mark.parametrize(
    "fake,message",
    [
        (dict(count=0), "no CUDA device"),
        (dict(count_error=RuntimeError("cudaErrorNoDevice: no CUDA-capable device")), "no CUDA"),
        (dict(count_error=RuntimeError("cudaErrorInsufficientDriver")), "driver is too old"),
        (dict(driver=0), "no NVIDIA driver"),
    ],
)
def test_device_problems_are_reported(monkeypatch, fresh_reason, fake, message):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(**fake))
    assert gpu.available() is False
    with pytest.raises(RuntimeError, match=message):
        gpu.to_gpu(np.zeros(3, np.float32))


def test_launcher_checks_arguments_against_the_signature():
    with pytest.raises(TypeError, match="takes"):
        _module.check_args("bias_grad_finish", (None, None, 1), 0)
    with pytest.raises(TypeError, match=r"argument 0 \(partial\) must be a cupy.ndarray"):
        _module.check_args("bias_grad_finish", (np.zeros(4, np.float32), None, 2, 2), 0)
    with pytest.raises(KeyError, match="unknown kernel"):
        _module.check_args("no_such_kernel", (), 0)


# What CuPy >= 14 reports when the runtime headers are missing, and when NVRTC is.
_NO_HEADER = RuntimeError(
    "Failed to find CUDA headers. Please install CUDA toolkit headers (e.g., pip install "
    "cupy-cuda12x[ctk]) or specify CUDA_PATH environment variable."
)
_NO_FP16_H = RuntimeError(
    'fastconv.cu(1): catastrophic error: cannot open source file "cuda_fp16.h"'
)
_NO_NVRTC = ImportError('Failure finding "libnvrtc.so.13": No such file: libnvrtc.so.13')


@pytest.mark.parametrize(
    "error,message",
    [
        (_NO_HEADER, r"cannot find the CUDA headers \(cuda_fp16.h\).*fastconv\[gpu\]"),
        (_NO_FP16_H, r"cannot find the CUDA headers.*cupy-cuda13x\[ctk\].*CUDA_PATH"),
        (_NO_NVRTC, r"NVRTC \(libnvrtc\) cannot be loaded.*cuda-toolkit\[cudart,nvrtc\]==13"),
        (RuntimeError("error: expected a ;"), r"kernel module failed to compile.*expected a ;"),
    ],
)
def test_availability_compiles_the_kernels_and_says_what_is_missing(error, message):
    """gpu_available() is False, and to_gpu says which package to install, when the module
    does not compile: CuPy and a device alone are not enough (the stand-in CuPy has both)."""
    from fastconv_testing import cupy_standin as _standin

    with _standin.activated():
        assert gpu.available() is True  # compiles (the emulation) on the stand-in
        gpu.reset()
        _standin.config.compile_error = error
        assert gpu.available() is False
        with pytest.raises(RuntimeError, match=message):
            fastconv.to_gpu(np.zeros(3, np.float32))
        assert _standin.stats.modules, "the availability check must have tried to compile"


def test_cuda12_runtime_gets_the_cuda12_install_hint():
    reason = gpu._compile_problem(_NO_FP16_H, 12090)
    assert "fastconv[gpu-cuda12]" in reason and "cupy-cuda12x[ctk]" in reason
    assert "cuda-toolkit[cudart,nvrtc]==12.*" in reason


# --- on a device -----------------------------------------------------------------------------

requires_gpu = pytest.mark.skipif(
    not fastconv.gpu_available(),
    reason=f"no usable GPU: {gpu.unavailable_reason()}",
)

DTYPES = (np.float32, np.float16)
HALF_EPS = 2.0**-11
# The backend's GEMMs are pinned to CUBLAS_COMPUTE_32F in default math mode: full FP32, no TF32
# (CUPY_TF32 affects only cupy.matmul, which fastconv does not call).
FP32_TOL = 1e-5


def assert_close(got, want, dtype, rounding_steps=1):
    import cupy

    assert isinstance(got, cupy.ndarray)
    assert got.dtype == dtype
    got = cupy.asnumpy(got).astype(np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    scale = max(np.nanmax(np.abs(want)) if want.size else 0.0, 1.0)  # NaN-safe: pooling has NaN
    tol = FP32_TOL if dtype == np.float32 else (rounding_steps + 1) * HALF_EPS
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    err = np.nanmax(np.abs(got - want)) if got.size else 0.0
    assert err <= tol * scale, f"max error {err:.3g} > {tol * scale:.3g}"


def rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


MNIST_CONVS = [
    ((4, 1, 28, 28), 16, 1),
    ((4, 16, 28, 28), 16, 1),
    ((4, 16, 14, 14), 32, 1),
    ((4, 32, 14, 14), 32, 2),
    ((4, 32, 8, 8), 64, 1),
    ((4, 64, 8, 8), 64, 1),
]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,filters,pad", MNIST_CONVS)
def test_conv_layers_vs_reference_and_cpu(dtype, shape, filters, pad):
    rng = np.random.default_rng(0)
    x = rand(rng, shape, dtype)
    w = (rand(rng, (filters, shape[1], 3, 3), np.float32) / np.sqrt(9 * shape[1])).astype(dtype)
    b = rand(rng, (filters,), dtype)
    xg, wg, bg = (fastconv.to_gpu(a) for a in (x, w, b))
    y = fastconv.conv2d(xg, wg, bg, pad=pad, activation="relu")
    assert_close(y, ref.conv2d(x, w, b, 1, pad, "relu"), dtype, 2)
    assert_close(y, fastconv.conv2d(x, w, b, pad=pad, activation="relu"), dtype, 3)
    dy = rand(rng, y.shape, dtype)
    got = fastconv.conv2d_backward(fastconv.to_gpu(dy), xg, wg, pad=pad)
    want = ref.conv2d_backward(dy, x, w, 1, pad)
    for name, a, r in zip(("dx", "dw", "db"), got, want, strict=True):
        assert_close(a, r, dtype, 10 if name == "dx" else 2)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direct_max_k", [0, 10**6], ids=["gemm", "direct"])
@pytest.mark.parametrize("bias,activation", [(True, None), (False, "relu"), (False, None)])
def test_conv_paths(monkeypatch, dtype, direct_max_k, bias, activation):
    monkeypatch.setattr(gpu._ops(), "direct_max_k", direct_max_k)
    rng = np.random.default_rng(1)
    x, w = rand(rng, (3, 3, 9, 7), dtype), rand(rng, (5, 3, 3, 2), dtype)
    b = rand(rng, (5,), dtype) if bias else None
    args = [fastconv.to_gpu(a) if a is not None else None for a in (x, w, b)]
    y = fastconv.conv2d(*args, stride=(2, 1), pad=(1, 2), activation=activation)
    assert_close(y, ref.conv2d(x, w, b, (2, 1), (1, 2), activation), dtype, 2)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_im2col_col2im(dtype):
    rng = np.random.default_rng(2)
    x = rand(rng, (2, 3, 8, 7), dtype)
    cols = fastconv.im2col(fastconv.to_gpu(x), 3, 2, stride=2, pad=1)
    np.testing.assert_array_equal(cols.get(), ref.im2col(x, 3, 2, 2, 1))
    c = rand(rng, cols.shape, dtype)
    back = fastconv.col2im(fastconv.to_gpu(c), x.shape, 3, 2, stride=2, pad=1)
    assert_close(back, ref.col2im(c, x.shape, 3, 2, 2, 1), dtype)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,size,stride,pad", [((4, 16, 28, 28), 2, None, 0),
                                                   ((2, 3, 7, 9), 3, 2, 1)])  # fmt: skip
def test_pooling(dtype, shape, size, stride, pad):
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, size=shape).astype(dtype)  # ties: first maximum must win
    x.flat[5] = np.nan
    xg = fastconv.to_gpu(x)
    y = fastconv.max_pool2d(xg, size, stride, pad)
    assert_close(y, ref.max_pool2d(x, size, stride, pad), dtype, 0)
    dy = rng.integers(1, 5, size=y.shape).astype(dtype)
    dx = fastconv.max_pool2d_backward(fastconv.to_gpu(dy), xg, size, stride, pad)
    np.testing.assert_array_equal(dx.get(), ref.max_pool2d_backward(dy, x, size, stride, pad))
    x = rand(rng, shape, dtype)
    a = fastconv.avg_pool2d(fastconv.to_gpu(x), size, stride, pad)
    assert_close(a, ref.avg_pool2d(x, size, stride, pad), dtype)
    da = fastconv.avg_pool2d_backward(fastconv.to_gpu(dy), shape, size, stride, pad)
    assert_close(da, ref.avg_pool2d_backward(dy, shape, size, stride, pad), dtype)


@pytest.mark.gpu
@requires_gpu
def test_backward_is_deterministic():
    rng = np.random.default_rng(4)
    x = fastconv.to_gpu(rand(rng, (8, 16, 14, 14), np.float32))
    w = fastconv.to_gpu(rand(rng, (32, 16, 3, 3), np.float32))
    dy = fastconv.to_gpu(rand(rng, (8, 32, 14, 14), np.float32))
    first = fastconv.conv2d_backward(dy, x, w, pad=1)
    second = fastconv.conv2d_backward(dy, x, w, pad=1)
    # col2im and bias_grad are gathers with a fixed summation order: bitwise reproducible.
    assert (first[0] == second[0]).all() and (first[2] == second[2]).all()


@pytest.mark.gpu
@requires_gpu
def test_mixing_numpy_and_cupy_is_rejected():
    x = fastconv.to_gpu(np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(TypeError, match="w must be a cupy.ndarray"):
        fastconv.conv2d(x, np.zeros((1, 1, 3, 3), np.float32))


@pytest.mark.gpu
@requires_gpu
def test_large_launch_uses_capped_grid():
    # More outputs than the capped grid has threads: grid-stride loop on the real device.
    x = fastconv.to_gpu(np.ones((64, 16, 64, 64), np.float32))
    cols = fastconv.im2col(x, 3, 3, pad=1)  # 64*64*64*144 ~ 3.8e7 entries
    assert float(cols.sum()) == pytest.approx(float(ref.im2col(np.ones((1, 16, 64, 64)),
                                              3, 3, 1, 1).sum()) * 64, rel=1e-6)  # fmt: skip


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_pinned_to_fp32_accumulation(dtype):
    """K = 4096 products of values near 1: half accumulation would be off by whole units, a
    float32 accumulator is within a few half ulps of the float64 sum."""
    import cupy

    rng = np.random.default_rng(5)
    a = (1 + 0.01 * rng.standard_normal((8, 4096))).astype(dtype)
    b = (1 + 0.01 * rng.standard_normal((4096, 8))).astype(dtype)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    c = _module.gemm(cupy.asarray(a), cupy.asarray(b))
    assert c.dtype == dtype
    assert_close(c, exact, dtype, 2)
    ct = _module.gemm(cupy.asarray(np.ascontiguousarray(a.T)), cupy.asarray(b), trans_a=True)
    assert_close(ct, exact, dtype, 2)  # the TN wiring against the exact product, as NN
    # NN and TN run different cuBLAS kernels (tiling, split-K, summation order): cuBLAS does not
    # promise equal bits, only each result's rounding error. The standard bound for a sum of K
    # products in float32 (Higham, Accuracy and Stability, Thm 3.5) is
    # |fl(AB) - AB|_ij <= gamma_K (|A||B|)_ij with gamma_K = K u / (1 - K u) ~ K u, u = 2^-24,
    # so two orders differ by at most 2 K u (|A||B|)_ij; doubled again because tensor-core
    # float32 accumulation may truncate instead of rounding (error up to 2u per addition).
    # float16 results are then rounded once each: + 2^-11 (|c| + |ct|).
    k = a.shape[1]
    bound = 4 * k * 2.0**-24 * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)))
    c64, ct64 = c.get().astype(np.float64), ct.get().astype(np.float64)
    if dtype == np.float16:
        bound += 2.0**-11 * (np.abs(c64) + np.abs(ct64))
    assert (np.abs(ct64 - c64) <= bound).all(), float(np.abs(ct64 - c64).max())


@pytest.mark.gpu
@requires_gpu
def test_kernels_on_a_non_default_stream():
    """Kernels and cuBLAS follow CuPy's current stream; results equal the default stream's."""
    import cupy

    rng = np.random.default_rng(6)
    x, w = rand(rng, (4, 16, 14, 14), np.float32), rand(rng, (32, 16, 3, 3), np.float32)
    xg, wg = fastconv.to_gpu(x), fastconv.to_gpu(w)
    want = fastconv.conv2d(xg, wg, pad=1).get()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        y = fastconv.conv2d(xg, wg, pad=1)
        dx, dw, db = fastconv.conv2d_backward(y, xg, wg, pad=1)
    stream.synchronize()
    np.testing.assert_array_equal(y.get(), want)
    assert np.isfinite(dw.get()).all()


@pytest.mark.gpu
@requires_gpu
def test_device_matches_the_emulation_bit_for_bit():
    """-ftz=true and -fmad=false on the device, FTZ/DAZ and no contraction in the emulation:
    the non-GEMM kernels agree exactly (here the direct convolution, col2im and pooling)."""
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("g++ is needed for the emulation")
    from fastconv import _checks as chk
    from fastconv_testing import emulation as emu

    ops = emu.emulated_ops(emu.EmulatedLauncher(emu.build_library()), direct_max_k=10**6)
    rng = np.random.default_rng(7)
    for dtype in DTYPES:
        x, w = rand(rng, (2, 3, 11, 9), dtype), rand(rng, (4, 3, 3, 3), dtype)
        g = chk.validate_conv2d(x, w, None, 1, 1)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gpu._ops(), "direct_max_k", 10**6)
            dev = fastconv.conv2d(fastconv.to_gpu(x), fastconv.to_gpu(w), pad=1).get()
        np.testing.assert_array_equal(dev, ops.conv2d(x, w, None, g, None))
        cols = rand(rng, (2 * 11 * 9, 27), dtype)
        gc = chk.validate_col2im(cols, x.shape, 3, 3, 1, 1)
        dev = fastconv.col2im(fastconv.to_gpu(cols), x.shape, 3, 3, 1, 1).get()
        np.testing.assert_array_equal(dev, ops.col2im(cols, gc))
        gp = chk.validate_pool(x, 3, 2, 1, max_pool=False)
        dev = fastconv.avg_pool2d(fastconv.to_gpu(x), 3, 2, 1).get()
        np.testing.assert_array_equal(dev, ops.avg_pool2d(x, gp))
