"""float16 <-> float32 conversion inside Numba kernels (``fastconv.cpu._half``) vs NumPy."""

from __future__ import annotations

import numpy as np
from numba import njit

from fastconv.cpu import _half

ALL_HALF_BITS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


@njit(cache=True)
def _to_float(bits, out):
    for i in range(bits.size):
        out[i] = _half.half_to_float(bits[i])


@njit(cache=True)
def _to_half(values, out):
    for i in range(values.size):
        out[i] = _half.float_to_half(values[i])


@njit(cache=True)
def _load_store(src, dst):
    # The generic helpers kernels use: load gives float32, store_value rounds for half.
    for i in range(src.size):
        dst[i] = _half.store_value(dst, _half.load(src[i]) * np.float32(2.0))


def _half_bits(values32):
    out = np.empty(values32.shape, np.uint16)
    _to_half(values32, out)
    return out


def _assert_same_half(actual_bits, values32):
    """Bits equal NumPy's rounding; NaNs may differ in payload but must stay NaN."""
    with np.errstate(over="ignore"):  # overflow to inf is the behaviour under test
        expected = values32.astype(np.float16)
    actual = actual_bits.view(np.float16)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    np.testing.assert_array_equal(actual_bits[~nan], expected.view(np.uint16)[~nan])


def test_half_to_float_every_bit_pattern():
    out = np.empty(ALL_HALF_BITS.size, np.float32)
    _to_float(ALL_HALF_BITS, out)
    expected = ALL_HALF_BITS.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    assert nan.sum() == 2 * (1 << 10) - 2  # both signs, every non-zero mantissa
    np.testing.assert_array_equal(np.isnan(out), nan)
    # Bitwise on the rest: -0.0, infinities and subnormals included.
    np.testing.assert_array_equal(out.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])


def test_round_trip_every_bit_pattern():
    out = np.empty_like(ALL_HALF_BITS)
    _half._roundtrip_check(ALL_HALF_BITS, out)
    nan = np.isnan(ALL_HALF_BITS.view(np.float16))
    np.testing.assert_array_equal(out[~nan], ALL_HALF_BITS[~nan])
    assert np.isnan(out[nan].view(np.float16)).all()


def test_float_to_half_random_bit_patterns():
    # Every float32 exponent, random mantissas: overflow, normals, subnormals, underflow, NaN.
    rng = np.random.default_rng(0)
    values = rng.integers(0, 1 << 32, size=200_000, dtype=np.uint64).astype(np.uint32)
    values = values.view(np.float32)
    _assert_same_half(_half_bits(values), values)


def test_float_to_half_rounds_to_nearest_even():
    half_values = ALL_HALF_BITS.view(np.float16)
    finite = half_values[np.isfinite(half_values)].astype(np.float32)
    finite = np.unique(finite)
    # Midpoints between consecutive halves (exact in float32) must round to the even one,
    # and values a float32 ulp either side of a midpoint to the nearer one.
    mid = ((finite[:-1].astype(np.float64) + finite[1:]) / 2).astype(np.float32)
    assert np.array_equal(mid.astype(np.float64), (finite[:-1].astype(np.float64) + finite[1:]) / 2)
    cases = np.concatenate(
        [
            mid,
            np.nextafter(mid, np.float32(np.inf)),
            np.nextafter(mid, np.float32(-np.inf)),
            finite,
        ]
    )
    _assert_same_half(_half_bits(cases), cases)
    # Spot checks with known answers, independent of NumPy.
    spot = np.array(
        [1 + 2**-11, 1 + 3 * 2**-11, 65504, 65519.99, 65520, 2**-25, 2**-24], np.float32
    )
    got = _half_bits(spot).view(np.float16).astype(np.float64)
    np.testing.assert_array_equal(got, [1.0, 1 + 2**-9, 65504, 65504, np.inf, 0.0, 2**-24])


def test_load_and_store_value_both_dtypes():
    x = np.array([1.5, -2.0, 3e-5, 40000.0, np.inf], np.float32)
    out32 = np.empty_like(x)
    _load_store(x, out32)
    np.testing.assert_array_equal(out32, 2 * x)

    xh = x.astype(np.float16)
    out16 = np.empty(x.size, np.uint16)
    _load_store(_half.bits_view(xh), out16)
    result = _half.from_bits(out16, np.float16)
    assert result.dtype == np.float16
    with np.errstate(over="ignore"):
        expected = (2 * xh.astype(np.float32)).astype(np.float16)
    np.testing.assert_array_equal(result, expected)
    assert np.isinf(result[3])  # 80000 overflows half
