"""Shared test fixtures, the one tolerance rule every kernel test uses, and the oracle markers.

Oracles the README's install leaves out (PyTorch, MPI, NVRTC, ONNX Runtime) are reached only
through :func:`need_oracle` (or the ``torch`` and ``onnx`` fixtures, which call it), and every
test that needs one carries its marker (``torch``, ``mpi``, ``nvrtc``, ``onnx``). Without the
package such a test is skipped with a reason naming it; CI's oracle stage installs them, sets
``FASTCONV_REQUIRE_ORACLES=1`` (a skip becomes a failure) and runs
``-m "torch or mpi or nvrtc or onnx"``. A test skipped for an
oracle without carrying its marker would run in neither stage: it fails instead.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil

import numpy as np
import pytest
from hypothesis import settings

from fastconv import nn

# CI draws the same examples on every run (a red run must be reproducible and cannot come from
# a lucky draw); a developer's runs keep exploring new ones.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

#: marker -> (what to install, the words a skip reason of that oracle contains)
ORACLES = {
    "torch": ("pip install torch==2.13.0 (pinned CPU build)", ("'torch'", "needs torch")),
    "mpi": ("pip install -e '.[mpi]'", ("mpi4py", "mpiexec")),
    "nvrtc": ("pip install -e '.[gpu-check]'", ("libnvrtc",)),
    "onnx": ("pip install -e '.[onnx]'", ("needs onnx", "'onnx'", "'onnxruntime'")),
}


def oracles_required() -> bool:
    """True in CI's oracle stage: a missing oracle is a failure, not a skip."""
    env = os.environ
    return env.get("FASTCONV_REQUIRE_ORACLES") == "1" or env.get("FASTCONV_REQUIRE_MPI") == "1"


def need_oracle(marker: str, missing: str | None) -> None:
    """Skip (fail, in the oracle stage) with ``missing`` and how to install the oracle."""
    if missing is None:
        return
    message = f"{missing}: {ORACLES[marker][0]}"
    if oracles_required():
        pytest.fail(f"the oracle stage requires it, but {message}")
    pytest.skip(message)


@pytest.fixture(scope="session")
def torch():
    """PyTorch, the comparison oracle; a test asking for it is marked ``torch``."""
    found = importlib.util.find_spec("torch") is not None
    need_oracle("torch", None if found else "needs torch, the comparison oracle")
    import torch

    return torch


@pytest.fixture(scope="session")
def onnx():
    """The onnx package, with ONNX Runtime (the oracle of the ONNX tests) present too; a test
    asking for it (or for ``ort``) is marked ``onnx``."""
    # A spec without an origin is a namespace package (a folder named onnx on sys.path),
    # not the package: the real one is missing.
    missing = [
        m
        for m in ("onnx", "onnxruntime")
        if getattr(importlib.util.find_spec(m), "origin", None) is None
    ]
    need_oracle("onnx", f"needs {' and '.join(missing)}" if missing else None)
    import onnx

    return onnx


@pytest.fixture(scope="session")
def ort(onnx):
    """ONNX Runtime, the oracle the ONNX tests compare with."""
    import onnxruntime

    return onnxruntime


DTYPES = (np.float32, np.float16)


@pytest.fixture
def rng():
    """A freshly seeded generator per test, so each test is reproducible on its own."""
    return np.random.default_rng(20261123)


@pytest.fixture(params=DTYPES, ids=lambda d: np.dtype(d).name)
def dtype(request):
    return np.dtype(request.param)


def _emulated_kernels():
    if shutil.which("g++") is None:
        pytest.skip("g++ is needed to emulate the CUDA kernels")
    from fastconv_testing import emulation as emu

    # A plain NumPy module: the public API's arrays are plain NumPy arrays here.
    return emu.emulated_ops(emu.EmulatedLauncher(emu.build_library()), xp=np)


def _numba_kernels():
    from fastconv import cpu

    return cpu.KERNELS


def _reference_kernels():
    from fastconv import reference

    return reference.KERNELS


#: every backend of the kernel interface: name -> its kernel set (fastconv.kernels.Kernels)
BACKENDS = {
    "numba": _numba_kernels,
    "cuda-emulated": _emulated_kernels,
    "reference": _reference_kernels,
}


# The emulated CUDA kernels carry the gpu_emulation marker: the sanitizer run
# (tests/gpu/test_gpu_sanitize.py) selects them, and every kernel of the sources must run there.
@pytest.fixture(
    params=[pytest.param(b, marks=pytest.mark.gpu_emulation) if "cuda" in b else b
            for b in BACKENDS],
    scope="module",
)  # fmt: skip
def kernels(request):
    """Each backend's kernel set in turn."""
    return BACKENDS[request.param]()


@pytest.fixture
def on(monkeypatch):
    """``on(kernel_set)``: run the public API on NumPy arrays with ``kernel_set`` behind the
    CPU device (validation and dispatch unchanged)."""
    from fastconv import device

    def use(kernel_set):
        monkeypatch.setattr(type(device.CPU), "kernels", property(lambda self: kernel_set))

    return use


@pytest.fixture
def backend(kernels, on):
    """A kernel test that takes ``backend`` runs the public API (``fastconv.relu(x)``...) over
    every backend: the Numba kernels, the CUDA kernels in emulation, the float64 reference."""
    on(kernels)
    return kernels


def tolerance(dtype, k: int = 1) -> float:
    """Relative tolerance for a result of ``dtype`` computed from sums of ``k`` terms.

    Two error sources: rounding the result to ``dtype`` (half an ulp, doubled for slack) and
    float32 accumulation of ``k`` terms, whose error grows like ``sqrt(k)`` ulps for random
    data (4x for slack). float32 with k=576 gives ~1.2e-5, float16 ~2e-3.
    """
    store_eps = np.finfo(dtype).eps
    acc_eps = np.finfo(np.float32).eps
    return float(store_eps + 4 * acc_eps * math.sqrt(max(k, 1)))


def assert_close(actual, expected, dtype, k: int = 1):
    """Compare a kernel result with a float64 reference, with :func:`tolerance`.

    The absolute part is scaled by the largest reference magnitude, since sums that cancel
    carry the rounding error of their largest terms, not of their small result.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    assert actual.dtype == np.dtype(dtype), f"dtype {actual.dtype} != {np.dtype(dtype)}"
    tol = tolerance(dtype, k)
    finite = expected[np.isfinite(expected)]
    scale = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    np.testing.assert_allclose(
        actual.astype(np.float64), expected, rtol=tol, atol=tol * scale, equal_nan=True
    )


def distinct_values(shape, rng, dtype=np.float32):
    """Values with no ties, exactly representable in float16: a scaled random permutation.

    Negative and positive, so a max that wrongly lets zero padding win is caught.
    """
    n = math.prod(shape)
    assert n <= 4096, "float16 represents integers exactly only up to 2048"
    values = (rng.permutation(n) - n // 2) / 4.0
    return values.reshape(shape).astype(dtype)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(session, config, items):
    """Tests that use the ``torch`` (``onnx``) fixture carry the ``torch`` (``onnx``) marker;
    the GPU kernel-coverage check runs after every other test of the session."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "torch" in fixtures:
            item.add_marker(pytest.mark.torch)
        if "onnx" in fixtures:  # also through the ``ort`` fixture, which asks for it
            item.add_marker(pytest.mark.onnx)
    last = [i for i in items if i.name == "test_zz_every_kernel_in_signatures_was_exercised"]
    items[:] = [i for i in items if i not in last] + last


def pytest_deselected(items):
    # Remembered for the kernel-coverage gate: a run that deselected an emulation test is no
    # full run (tests/gpu/test_gpu_emulation.py).
    _DESELECTED.extend(items)


_DESELECTED: list = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip naming an oracle on a test without that oracle's marker is an error: CI's first
    stage lacks the oracle and its second stage selects by marker, so the test would never run."""
    report = yield
    if report.skipped and call.when in ("setup", "call"):
        reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else "").lower()
        for marker, (_, words) in ORACLES.items():
            if any(w in reason for w in words) and item.get_closest_marker(marker) is None:
                report.outcome = "failed"
                report.longrepr = (
                    f"{item.nodeid} was skipped for a missing oracle ({reason!r}) but does not "
                    f"carry the '{marker}' marker, so no CI stage would run it"
                )
    return report


# --- the ONNX tests (tests/onnx_io): ONNX Runtime as the oracle, models whose every weight
# matters. Here rather than in a conftest.py of their own: a second module named "conftest"
# would shadow this one for the tests that import helpers from it.


@pytest.fixture(scope="session")
def run_ort(ort):
    """``run_ort(model, x)``: the first output of ONNX Runtime on ``x``; ``model`` is a path, the
    bytes of a model or a ModelProto."""

    def run(model, x):
        if hasattr(model, "SerializeToString"):
            model = model.SerializeToString()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(
            str(model) if not isinstance(model, bytes) else model,
            options,
            providers=["CPUExecutionProvider"],
        )
        return session.run(None, {session.get_inputs()[0].name: x})[0]

    return run


def randomize_state(model, rng) -> None:
    """Random biases, BatchNorm scales, shifts and moving statistics: a model fresh from its
    initialisers has zero biases and the identity BatchNorm, which would hide a swapped mean
    and variance or a lost bias. Kernels keep their He-normal values."""
    weights = []
    for (_, name), w in zip(model.weight_entries(), model.get_weights(), strict=True):
        if name in ("moving_variance", "gamma"):
            w = rng.uniform(0.5, 1.5, w.shape)
        elif name in ("b", "beta", "moving_mean"):
            w = 0.1 * rng.standard_normal(w.shape)
        weights.append(np.asarray(w, np.float32))
    model.set_weights(weights)


def assert_logits_close(actual, expected, rtol=1e-4):
    """Within ``rtol`` relative to the largest expected magnitude (logits near zero carry the
    rounding error of the large terms that cancelled in them)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _every_layer_model(seed=0):
    """One model with every exported layer and option: ceil-mode pools with padding, strides,
    non-square kernels, a bias-free convolution, a three-way sum, a concatenation, BatchNorm1D,
    DropConnectDense, and every activation."""
    inp = nn.Input((3, 15, 12))  # the ceil-mode windows run past the padded edge
    x = nn.Conv2D(8, (3, 1), stride=(2, 1), padding=(1, 0), activation="relu", name="c1")(inp)
    a = nn.MaxPool2D(3, 2, padding=1, ceil_mode=True, name="maxc")(x)
    b = nn.AvgPool2D(3, 2, padding=1, ceil_mode=True, name="avgc")(x)
    y = nn.Concatenate(name="cat")([a, b])
    y = nn.BatchNorm2D(epsilon=1e-3, momentum=0.8, name="bn")(
        nn.Conv2D(8, 3, padding="same", use_bias=False, name="c3")(y)
    )
    y = nn.LeakyReLU(0.2, name="leaky")(y)
    z = nn.Sigmoid(name="sig")(nn.Conv2D(8, 1, name="c4")(y))
    w = nn.Tanh(name="tanh")(nn.Conv2D(8, 1, name="c5")(y))
    s = nn.Add(name="sum3")([y, z, w])
    g = nn.GlobalAveragePooling2D(name="gap")(s)
    f = nn.Flatten(name="flat")(nn.MaxPool2D(2, name="pool")(s))
    h = nn.Concatenate(name="cat2")([g, f])
    h = nn.Dense(12, use_bias=False, name="d1")(nn.Dropout(0.3, name="drop")(h))
    h = nn.ReLU(name="relu")(nn.BatchNorm1D(name="bn1d")(h))
    h = nn.DropConnectDense(6, rate=0.4, activation="relu", name="dc")(h)
    out = nn.Softmax(name="softmax")(nn.Dense(5, name="d2")(h))
    return nn.Model(inp, out, seed=seed, name="every_layer")


@pytest.fixture(name="every_layer_model")
def _every_layer_model_fixture():
    """The builder of a model with every exported layer (``every_layer_model(seed)``)."""
    return _every_layer_model


@pytest.fixture(name="randomize_state")
def _randomize_state():
    return randomize_state


@pytest.fixture(name="assert_logits_close")
def _assert_logits_close():
    return assert_logits_close
