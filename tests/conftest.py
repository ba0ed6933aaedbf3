"""Shared test fixtures and the one tolerance rule every kernel test uses."""

from __future__ import annotations

import math

import numpy as np
import pytest

DTYPES = (np.float32, np.float16)


@pytest.fixture
def rng():
    """A freshly seeded generator per test, so each test is reproducible on its own."""
    return np.random.default_rng(20261123)


@pytest.fixture(params=DTYPES, ids=lambda d: np.dtype(d).name)
def dtype(request):
    return np.dtype(request.param)


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


def pytest_collection_modifyitems(session, config, items):
    """The GPU kernel-coverage check runs after every other test of the session."""
    last = [i for i in items if i.name == "test_zz_every_kernel_in_signatures_was_exercised"]
    items[:] = [i for i in items if i not in last] + last
