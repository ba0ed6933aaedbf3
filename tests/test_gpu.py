"""GPU backend on a real device (marker ``gpu``), plus its CPU-checkable behaviour.

The ``gpu`` tests run the public API on CuPy arrays and compare with the float64 reference and
with the CPU backend; they are skipped, with the reason, where no usable CUDA device exists.
The unmarked tests at the top check, everywhere, how the backend reports that it cannot run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

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
        _module.convert_args("bias_grad_finish", (None, None, 1))
    with pytest.raises(ValueError, match="32-bit"):
        _module.convert_args("bias_grad_finish", (None, None, 2**31, 1))
    args = _module.convert_args("bias_grad_finish", ("partial", "db", 2, 3))
    assert args[:2] == ("partial", "db") and all(type(a) is np.int32 for a in args[2:])


# --- on a device -----------------------------------------------------------------------------

requires_gpu = pytest.mark.skipif(
    not fastconv.gpu_available(),
    reason=f"no usable GPU: {gpu.unavailable_reason()}",
)

DTYPES = (np.float32, np.float16)
HALF_EPS = 2.0**-11
# CuPy's default cuBLAS compute type for float32 is full FP32; CUPY_TF32=1 switches to TF32.
FP32_TOL = 2e-3 if int(os.environ.get("CUPY_TF32", "0") or 0) > 0 else 1e-5


def assert_close(got, want, dtype, rounding_steps=1):
    import cupy

    assert isinstance(got, cupy.ndarray)
    assert got.dtype == dtype
    got = cupy.asnumpy(got).astype(np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    scale = max(np.abs(want).max(), 1.0)
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


# --- bench/gpu_report.py (run everywhere) ------------------------------------------------------

REPORT = Path(__file__).resolve().parents[1] / "bench" / "gpu_report.py"


def test_gpu_report_dry_run_prints_the_plan(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPORT), "--out", str(tmp_path / "r"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "pytest -m gpu" in done.stdout and "conv6" in done.stdout and "pool3" in done.stdout
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


@pytest.mark.skipif(fastconv.gpu_available(), reason="checks the no-GPU exit path")
def test_gpu_report_without_a_gpu_says_why(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPORT), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "no usable GPU" in done.stderr


def test_gpu_report_markdown_renders_every_section():
    spec = importlib.util.spec_from_file_location("gpu_report", REPORT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    row = mod._row("conv1", "conv", "float16", "forward", 0.5, 1.0, 1e-3)
    assert row["ratio_torch_over_fastconv"] == 2.0
    md = mod.to_markdown(
        {
            "environment": {"device": "X"},
            "tests": {"command": "pytest -m gpu", "returncode": 0, "summary": "5 passed"},
            "layers": [row],
            "training": {"skipped": "no fastconv.models"},
        }
    )
    assert "| conv1 | float16 | forward | 0.500 | 1.000 | 2.00 |" in md
    assert "5 passed" in md and "no fastconv.models" in md
