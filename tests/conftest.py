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
    "onnx": ("pip install -e '.[onnx]'", ("onnx",)),
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
    # A spec without an origin is a namespace package: tests/onnx itself, found on sys.path
    # through tests/ when the real package is missing.
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
