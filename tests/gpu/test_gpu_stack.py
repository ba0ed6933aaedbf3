"""The model stack's GPU path, end to end, on the stand-in CuPy (no GPU needed).

Only the public API: ``model.to("gpu")``, ``fit``, ``predict``, ``evaluate``, ``save``,
``load_model(path, backend="gpu")`` and ``.to("gpu", "float16")``. The stand-in CuPy
(:mod:`fastconv_testing.cupy_standin`) gives NumPy-backed arrays of a distinct type that refuse
to mix with NumPy arrays (as CuPy's do), runs every RawModule launch through the g++ emulation of
the CUDA kernels and every cuBLAS call through a column-major model of cuBLAS. The oracle is the
CPU backend (Numba kernels, an independent implementation) running the same model from the
same weights: after training, weights, predictions and metrics must agree to float32 rounding.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fastconv.nn import (
    Adam,
    AvgPool2D,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    MaxPool2D,
    ReLU,
    Sequential,
    load_model,
)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ emulates the kernels")


@pytest.fixture
def cupy():
    from fastconv_testing import cupy_standin as _standin

    with _standin.activated() as cp:
        yield cp


def _is_device_array(a) -> bool:
    return type(a).__module__.startswith("cupy") and type(a).__name__ == "ndarray"


def small_net(seed=0, dropout=0.0):
    layers = [
        Conv2D(4, 3, padding=1, activation="relu"),  # C*kh*kw = 9: the direct kernel
        MaxPool2D(2),
        Conv2D(6, 3, padding=1, activation="relu"),  # K = 36: im2col + cuBLAS
        AvgPool2D(2),
        Flatten(),
        Dense(12),
        ReLU(),
    ]
    if dropout:
        layers.append(Dropout(dropout))
    layers.append(Dense(5))
    return Sequential(layers, seed=seed)


def data(n=24, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 5, n)
    return x, y


def compiled(model):
    model.compile(optimizer=Adam(lr=1e-2), loss="softmax_cross_entropy", metrics=["accuracy"])
    return model


def assert_weights_close(got, want, rtol=2e-4):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        scale = max(float(np.abs(w).max()), 1e-3)
        err = float(np.abs(g.astype(np.float64) - w).max())
        assert err <= rtol * scale, f"weights[{i}]: max error {err:.3g} > {rtol * scale:.3g}"


def test_fit_predict_evaluate_on_gpu_match_the_cpu(cupy):
    x, y = data()
    cpu = compiled(small_net())
    cpu.build(x.shape[1:])
    gpu = cpu.to("gpu")
    assert gpu.backend == "gpu" and all(_is_device_array(p) for p in gpu.parameters())
    h_cpu = cpu.fit(x, y, epochs=2, batch_size=8, verbose=0, seed=3)
    h_gpu = gpu.fit(x, y, epochs=2, batch_size=8, verbose=0, seed=3)
    assert_weights_close(gpu.get_weights(), cpu.get_weights())
    np.testing.assert_allclose(h_gpu.history["loss"], h_cpu.history["loss"], rtol=1e-4)
    p_gpu, p_cpu = gpu.predict(x), cpu.predict(x)
    p_gpu = p_gpu.get() if _is_device_array(p_gpu) else p_gpu
    np.testing.assert_allclose(p_gpu, p_cpu, rtol=1e-4, atol=1e-4)
    e_gpu, e_cpu = gpu.evaluate(x, y), cpu.evaluate(x, y)
    assert e_gpu["accuracy"] == e_cpu["accuracy"]
    assert e_gpu["loss"] == pytest.approx(e_cpu["loss"], rel=1e-4)
    # the kernels really ran through the emulated CUDA path, GEMMs included
    from fastconv_testing import cupy_standin as _standin

    kernels = {k for k, *_ in _standin.stats.launches}
    assert {"conv2d_direct", "im2col", "col2im", "max_pool2d_backward"} <= kernels
    assert _standin.stats.gemm_calls


def test_fit_on_device_arrays(cupy):
    x, y = data()
    model = compiled(small_net()).to("gpu")
    model.fit(cupy.asarray(x), cupy.asarray(y), epochs=1, batch_size=8, verbose=0)
    out = model.predict(cupy.asarray(x))
    assert _is_device_array(out) or isinstance(out, np.ndarray)


def test_save_and_load_model_on_gpu(cupy, tmp_path):
    x, y = data()
    model = compiled(small_net()).to("gpu")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = tmp_path / "gpu.npz"
    model.save(path)
    back = load_model(path, backend="gpu")
    assert back.backend == "gpu" and all(_is_device_array(p) for p in back.parameters())
    for a, b in zip(back.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

    def host(a):
        return a.get() if _is_device_array(a) else a

    np.testing.assert_array_equal(host(back.predict(x)), host(model.predict(x)))
    on_cpu = load_model(path, backend="cpu")
    np.testing.assert_allclose(on_cpu.predict(x), host(model.predict(x)), rtol=1e-4, atol=1e-4)
    # training resumes on the GPU with the restored optimizer state
    back.fit(x, y, epochs=1, batch_size=8, verbose=0)


def test_float16_inference_on_gpu(cupy):
    x, y = data()
    model = compiled(small_net())
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    half = model.to("gpu", "float16")
    assert all(p.dtype == np.float16 and _is_device_array(p) for p in half.parameters())
    out = half.predict(x)
    out = out.get() if _is_device_array(out) else out
    assert out.dtype == np.float16
    want = model.predict(x)
    scale = float(np.abs(want).max())
    assert float(np.abs(out.astype(np.float64) - want).max()) <= 1e-2 * max(scale, 1.0)
    from fastconv_testing import cupy_standin as _standin

    # half operands reached cuBLAS as CUDA_R_16F (2) with compute 32F (68): no float32 copies
    half_gemms = [c for c in _standin.stats.gemm_calls if c[3] == 2]
    assert half_gemms and all(c[2] == 68 for c in half_gemms)


def test_to_gpu_without_a_usable_gpu_says_why(monkeypatch):
    import sys

    from fastconv import gpu

    monkeypatch.setitem(sys.modules, "cupy", None)
    gpu.reset()
    try:
        with pytest.raises(RuntimeError, match="cannot use the GPU: CuPy is not installed"):
            small_net().to("gpu")
    finally:
        gpu.reset()


def test_fit_with_device_inputs_and_host_labels(cupy):
    """fit(x_on_gpu, y_on_cpu): batches of both are drawn with the same host index array, so
    the model trains exactly as the CPU one does on host arrays (labels paired with the wrong
    images would train other weights)."""
    x, y = data()
    cpu = compiled(small_net())
    cpu.build(x.shape[1:])
    gpu = cpu.to("gpu")
    cpu.fit(x, y, epochs=1, batch_size=8, verbose=0, seed=4)
    gpu.fit(cupy.asarray(x), y, epochs=1, batch_size=8, verbose=0, seed=4)
    assert_weights_close(gpu.get_weights(), cpu.get_weights())


def test_gpu_dropout_follows_the_model_seed(cupy):
    """Two runs from the same seed train identically: GPU dropout masks come from Philox keys
    drawn from the model's generator, not from CuPy's global generator."""
    x, y = data()
    runs = []
    for _ in range(2):
        model = compiled(small_net(seed=5, dropout=0.5)).to("gpu")
        model.fit(x, y, epochs=1, batch_size=8, verbose=0, seed=7)
        runs.append(model.get_weights())
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)
