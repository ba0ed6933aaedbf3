"""Every CPU convolution algorithm pinned explicitly, and the algorithm-selection API.

Oracles: the float64 ``fastconv.reference``. Bounds: ``tests/kernels/test_conv.py``'s
``assert_within_bound``: ``2 * n * eps32 * magnitude`` (+ half an ulp of float16 for half
results), ``magnitude`` the reference applied to absolute values; for Winograd the largest
magnitude of each tile / filter (``mixed_magnitude``) and ``WINOGRAD_TERM`` more eps32 *
magnitude (documented there and in docs/kernels.md).
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest
from test_conv import _conv_magnitude, _rand, assert_within_bound

import fastconv as fc
from fastconv import reference as ref
from fastconv.cpu import _winograd as cpu_winograd

ALGORITHMS = ("direct", "unfolded", "winograd4x4", "winograd2x2")
DTYPES = (np.float32, np.float16)


@pytest.fixture(autouse=True)
def _fresh_choices():
    previous = fc.set_conv_algorithm("auto")
    fc.clear_conv_algorithm_choices()
    yield
    fc.set_conv_algorithm(previous)


def _within(got, exact, magnitude, n_terms, dtype, what, algorithm):
    kind = what.split()[0]
    assert_within_bound(got, exact, magnitude, n_terms, dtype, what, algorithm, kind)


# Odd shapes for 3x3 stride-1 layers (every algorithm applies): channels that are not
# multiples of 8 (the micro-kernel's rows) or 16 (the vector width), 1x1 and 2x2 images,
# outputs that are not multiples of the tile (tiles crossing the border), pad 0, 1 and 2,
# batch 1 and 0.
# (N, C, F, H, W, pad)
ODD_CASES = [
    (1, 3, 13, 7, 9, 1),
    (2, 17, 9, 1, 1, 1),
    (3, 5, 4, 2, 2, 2),
    (2, 10, 3, 10, 6, 0),
    (1, 1, 1, 3, 3, 0),
    (4, 9, 17, 5, 11, 2),
    (0, 4, 5, 6, 6, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", ODD_CASES, ids=str)
def test_algorithm_matches_reference(case, algorithm, dtype):
    N, C, F, H, W, pad = case
    rng = np.random.default_rng(30)
    x, w = _rand(rng, (N, C, H, W), dtype), _rand(rng, (F, C, 3, 3), dtype)
    b = _rand(rng, (F,), dtype)
    y = fc.conv2d(x, w, b, 1, pad, "relu", algorithm=algorithm)
    assert y.dtype == dtype
    exact = ref.conv2d(x, w, b, 1, pad, "relu")
    _within(y, exact, _conv_magnitude(x, w, b, 1, pad), 9 * C + 1, dtype, "y", algorithm)
    dy = _rand(rng, y.shape, dtype)
    exact = ref.conv2d_backward(dy, x, w, 1, pad)
    mags = ref.conv2d_backward(*(np.abs(a.astype(np.float64)) for a in (dy, x, w)), 1, pad)
    P = y.shape[2] * y.shape[3]
    got = fc.conv2d_backward(dy, x, w, 1, pad, algorithm=algorithm)
    for name, g, ex, mag, n in zip(
        ("dx", "dw", "db"), got, exact, mags, (9 * F, N * P, N * P), strict=True
    ):
        assert g.dtype == dtype, name
        _within(g, ex, mag, n, dtype, name, algorithm)
    dx, dw, db = fc.conv2d_backward(dy, x, w, 1, pad, need_dx=False, algorithm=algorithm)
    assert dx is None
    _within(dw, exact[1], mags[1], N * P, dtype, "dw without dx", algorithm)
    ran = {(c.pass_, c.algorithm, c.fallbacks) for c in fc.conv_algorithm_choices()}
    passes = ("forward", "backward", "backward_weights")
    # An empty batch launches nothing (fastconv.ops returns empty results): nothing recorded.
    assert ran == ({(p, algorithm, 0) for p in passes} if N else set())


@pytest.mark.parametrize("algorithm", ["winograd4x4", "winograd2x2"])
def test_winograd_groups_and_bands(algorithm, monkeypatch):
    """Several image groups and tile-row bands per call, on several threads: the same
    numbers, bit for bit, as one group and one band on one thread (every lane computes the
    same operations; only the dW partial sums are split differently)."""
    rng = np.random.default_rng(31)
    x, w = _rand(rng, (7, 6, 13, 11), np.float32), _rand(rng, (10, 6, 3, 3), np.float32)
    b = _rand(rng, (10,), np.float32)
    dy = _rand(rng, (7, 10, 13, 11), np.float32)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        y1 = fc.conv2d(x, w, b, 1, 1, "relu", algorithm=algorithm)
        dx1, dw1, db1 = fc.conv2d_backward(dy, x, w, 1, 1, algorithm=algorithm)
        numba.set_num_threads(threads)
        monkeypatch.setattr(cpu_winograd, "_MAX_GROUP", 3)
        monkeypatch.setattr(cpu_winograd, "_TARGET_COLUMNS", 1)
        plan = cpu_winograd.make_plan(7, 6, 10, 13, 11, 4, threads, 1, 1)
        assert plan.ngroups == 3 and plan.nbands == 4  # groups of 3, 3, 1; bands of 1 row
        y2 = fc.conv2d(x, w, b, 1, 1, "relu", algorithm=algorithm)
        dx2, dw2, db2 = fc.conv2d_backward(dy, x, w, 1, 1, algorithm=algorithm)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(dx1, dx2)
    exact = ref.conv2d_backward(dy, x, w, 1, 1)
    mags = ref.conv2d_backward(*(np.abs(a.astype(np.float64)) for a in (dy, x, w)), 1, 1)
    for got in (dw1, dw2):
        _within(got, exact[1], mags[1], 7 * 13 * 11, np.float32, "dw", algorithm)
    for got in (db1, db2):
        _within(got, exact[2], mags[2], 7 * 13 * 11, np.float32, "db", algorithm)


@pytest.mark.parametrize("algorithm", ["winograd4x4", "winograd2x2"])
@pytest.mark.parametrize("F", [40, 53])
def test_winograd_filter_blocks(algorithm, F, monkeypatch):
    """Too few (group, band) items for the threads: the forward's threads share the filters
    (blocks of 16 here, the last one short, 53 not a multiple of the micro-kernel's rows);
    the same bits as one thread, for y and for dx (a forward over dy), on 1-4 threads."""
    rng = np.random.default_rng(33)
    x, w = _rand(rng, (3, 24, 7, 7), np.float32), _rand(rng, (F, 24, 3, 3), np.float32)
    b = _rand(rng, (F,), np.float32)
    dy = _rand(rng, (3, F, 7, 7), np.float32)
    threads = numba.get_num_threads()
    monkeypatch.setattr(cpu_winograd, "_MIN_BLOCK_FILTERS", 16)
    try:
        numba.set_num_threads(1)
        y1 = fc.conv2d(x, w, b, 1, 1, "relu", algorithm=algorithm)
        dx1, _, _ = fc.conv2d_backward(dy, x, w, 1, 1, algorithm=algorithm)
        for n in range(2, min(4, numba.config.NUMBA_NUM_THREADS) + 1):
            numba.set_num_threads(n)
            m = 4 if algorithm == "winograd4x4" else 2
            plan = cpu_winograd.make_plan(3, 24, F, 7, 7, m, n, 1, 1, split_filters=True)
            assert plan.nfb == n and plan.fb % 8 == 0 and (plan.nfb - 1) * plan.fb < F
            y2 = fc.conv2d(x, w, b, 1, 1, "relu", algorithm=algorithm)
            dx2, _, _ = fc.conv2d_backward(dy, x, w, 1, 1, algorithm=algorithm)
            np.testing.assert_array_equal(y1, y2)
            np.testing.assert_array_equal(dx1, dx2)
    finally:
        numba.set_num_threads(threads)
    _within(y1, ref.conv2d(x, w, b, 1, 1, "relu"), ref.conv2d(abs(x), abs(w), abs(b), 1, 1),
            9 * 24, np.float32, "y", algorithm)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_results_are_deterministic(dtype):
    rng = np.random.default_rng(32)
    x, w = _rand(rng, (5, 16, 12, 12), dtype), _rand(rng, (24, 16, 3, 3), dtype)
    dy = _rand(rng, (5, 24, 12, 12), dtype)
    for algorithm in ALGORITHMS:
        first = (fc.conv2d(x, w, None, 1, 1, algorithm=algorithm),) + fc.conv2d_backward(
            dy, x, w, 1, 1, algorithm=algorithm
        )
        again = (fc.conv2d(x, w, None, 1, 1, algorithm=algorithm),) + fc.conv2d_backward(
            dy, x, w, 1, 1, algorithm=algorithm
        )
        for a, b in zip(first, again, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("algorithm", ["winograd4x4", "winograd2x2"])
def test_winograd_falls_back_on_huge_or_nonfinite_values(algorithm):
    """Values the transforms would spread (NaN, inf) or overflow (>= 2**50) send the call to
    an exact path: the results match the reference (also its NaN pattern) and the fallback
    is counted."""
    rng = np.random.default_rng(33)
    x, w = _rand(rng, (3, 8, 9, 9), np.float32), _rand(rng, (8, 8, 3, 3), np.float32)
    x[1, 2, 4, 4] = 3e37  # finite; F(4x4)'s transforms would overflow float32
    y = fc.conv2d(x, w, None, 1, 1, algorithm=algorithm)
    exact = ref.conv2d(x, w, None, 1, 1)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(exact.astype(np.float32)))
    _within(y, exact, _conv_magnitude(x, w, None, 1, 1), 73, np.float32, "y", "direct")
    x[1, 2, 4, 4] = np.nan
    y = fc.conv2d(x, w, None, 1, 1, algorithm=algorithm)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref.conv2d(x, w, None, 1, 1)))
    dy = _rand(rng, y.shape, np.float32)
    for got, ex in zip(
        fc.conv2d_backward(dy, x, w, 1, 1, algorithm=algorithm),
        ref.conv2d_backward(dy, x, w, 1, 1),
        strict=True,
    ):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ex))
    x[1, 2, 4, 4] = 0.0
    w[3, 1, 0, 2] = np.inf
    y = fc.conv2d(x, w, None, 1, 1, algorithm=algorithm)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref.conv2d(x, w, None, 1, 1)))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(ref.conv2d(x, w, None, 1, 1)))
    counted = {(c.pass_, c.calls, c.fallbacks) for c in fc.conv_algorithm_choices()}
    assert counted == {("forward", 3, 3), ("backward", 1, 1)}


# --- the selection API ---------------------------------------------------------------------


def _layer(rng, shape=(2, 8, 6, 6), filters=8, k=3):
    x = _rand(rng, shape, np.float32)
    w = _rand(rng, (filters, shape[1], k, k), np.float32)
    return x, w


def test_per_call_argument_overrides_the_global_setting():
    rng = np.random.default_rng(34)
    x, w = _layer(rng)
    fc.set_conv_algorithm("unfolded")
    fc.conv2d(x, w, None, 1, 1, algorithm="winograd")  # alias of winograd4x4
    fc.conv2d(x, w, None, 1, 1)
    fc.conv2d(x, w, None, 1, 1, algorithm="auto")  # the per-call "auto" is the rule
    got = {(c.algorithm, c.source, c.calls) for c in fc.conv_algorithm_choices()}
    assert got == {("winograd4x4", "argument", 1), ("unfolded", "global", 1),
                   ("winograd4x4", "rule", 1)}  # fmt: skip


def test_global_setting_applies_only_where_it_can():
    rng = np.random.default_rng(35)
    assert fc.set_conv_algorithm("winograd2x2") == "auto"
    assert fc.get_conv_algorithm() == "winograd2x2"
    x, w = _layer(rng)
    fc.conv2d(x, w, None, 1, 1)
    fc.conv2d(x, w, None, 2, 1)  # stride 2: Winograd cannot run it, the rule decides
    got = [(c.stride, c.algorithm, c.source) for c in fc.conv_algorithm_choices()]
    assert got == [((1, 1), "winograd2x2", "global"), ((2, 2), "unfolded", "rule")]
    assert fc.set_conv_algorithm("auto") == "winograd2x2"


def test_auto_rule():
    rng = np.random.default_rng(36)
    shapes = [
        ((2, 8, 6, 6), 8, 3, 1, "winograd4x4"),  # 3x3 stride 1, >= 8 channels in and out
        ((2, 1, 6, 6), 16, 3, 1, "direct"),  # conv1-like: one input channel
        ((2, 16, 6, 6), 4, 3, 1, "direct"),  # few output channels
        ((2, 8, 9, 9), 8, 5, 1, "direct"),  # 5x5
        ((2, 8, 9, 9), 8, 3, 2, "unfolded"),  # stride 2
    ]
    for shape, filters, k, stride, expected in shapes:
        fc.clear_conv_algorithm_choices()
        x, w = _layer(rng, shape, filters, k)
        fc.conv2d(x, w, None, stride, 1)
        assert [c.algorithm for c in fc.conv_algorithm_choices()] == [expected], shape
    fc.clear_conv_algorithm_choices()
    x, w = _layer(rng, (2, 2, 6, 6), 8, 3)
    fc.conv2d_backward(_rand(rng, (2, 8, 6, 6), np.float32), x, w, 1, 1)
    # The direct dx product has one row per input channel: too few below 4.
    assert [c.algorithm for c in fc.conv_algorithm_choices()] == ["unfolded"]


def test_benchmark_mode_measures_once_per_shape():
    rng = np.random.default_rng(37)
    x, w = _layer(rng)
    fc.set_conv_algorithm("benchmark")
    y1 = fc.conv2d(x, w, None, 1, 1)
    y2 = fc.conv2d(x, w, None, 1, 1)
    (choice,) = fc.conv_algorithm_choices()
    assert choice.source == "measured" and choice.calls == 2
    assert choice.algorithm in ALGORITHMS
    np.testing.assert_array_equal(y1, y2)  # the cached choice: the same numbers
    exact = ref.conv2d(x, w, None, 1, 1)
    _within(y1, exact, _conv_magnitude(x, w, None, 1, 1), 73, np.float32, "y", choice.algorithm)


def test_bad_algorithms_are_rejected():
    rng = np.random.default_rng(38)
    x, w = _layer(rng)
    dy = _rand(rng, (2, 8, 6, 6), np.float32)
    with pytest.raises(TypeError, match="algorithm must be a str"):
        fc.conv2d(x, w, algorithm=4)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        fc.conv2d(x, w, algorithm="fft")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        fc.conv2d_backward(dy, x, w, 1, 1, algorithm="benchmark")  # a mode, not an algorithm
    with pytest.raises(ValueError, match="algorithm must be one of"):
        fc.set_conv_algorithm("winograd8x8")
    with pytest.raises(TypeError, match="algorithm must be a str"):
        fc.set_conv_algorithm(None)
    x5, w5 = _layer(rng, (2, 8, 9, 9), 8, 5)
    with pytest.raises(ValueError, match=r"'winograd4x4' needs a 3x3 kernel.*got a 5x5"):
        fc.conv2d(x5, w5, None, 1, 2, algorithm="winograd")
    with pytest.raises(ValueError, match=r"'winograd2x2' needs .*stride \(2, 2\)"):
        fc.conv2d(x, w, None, 2, 1, algorithm="winograd2x2")
    with pytest.raises(ValueError, match=r"pad <= 2.*pad \(3, 3\)"):
        fc.conv2d_backward(_rand(rng, (2, 8, 10, 10), np.float32), x, w, 1, 3, algorithm="winograd")
    with pytest.raises(ValueError, match="'direct' needs stride 1"):
        fc.conv2d(x, w, None, 2, 1, algorithm="direct")
    assert fc.conv_algorithm_choices() == []  # nothing ran


def test_choices_are_counted_from_many_threads():
    rng = np.random.default_rng(39)
    x, w = _layer(rng)
    expected = fc.conv2d(x, w, None, 1, 1)
    fc.clear_conv_algorithm_choices()
    errors = []

    def work():
        for _ in range(5):
            if not np.array_equal(fc.conv2d(x, w, None, 1, 1), expected):
                errors.append("mismatch")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    (choice,) = fc.conv_algorithm_choices()
    assert choice.calls == 20
