"""The general max-pool forward kernel (``cpu/pool.py``: separable row and column passes over
blocks of planes) bit for bit against independent oracles.

Two oracles: the float64 reference (``fastconv.reference.max_pool2d``) for finite inputs, and
:func:`_first_winner_bits`, a NumPy loop over each window's cells in row-major order that keeps
the first winner under the kernel's rule (``_wins``: greater, or NaN over a number) and returns
its bits: NaN payloads, the sign of a zero maximum and -inf windows are all checked bit for bit.
Every case goes through the public ``fastconv.max_pool2d`` (validation, asymmetric padding and
the serial/parallel choice included); the last tests call the kernels directly on many planes.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

import fastconv
from fastconv import reference as ref
from fastconv._checks import as_pads
from fastconv.cpu import pool as cpu_pool
from fastconv.cpu._half import bits_view, from_bits

BITS = {np.dtype(np.float32): np.uint32, np.dtype(np.float16): np.uint16}

# Quiet NaNs with different payloads and signs.
NANS = {
    np.dtype(np.float32): np.array(
        [0x7FC00000, 0xFFC00001, 0x7FC12345, 0xFFD00F00], np.uint32
    ).view(np.float32),
    np.dtype(np.float16): np.array([0x7E00, 0xFE01, 0x7E5A, 0xFF03], np.uint16).view(np.float16),
}
# Signalling float32 NaNs, which the general kernel only compares and copies (not for float16:
# the conversion to float32 quiets them, as it did in the window loop this kernel replaced).
SIGNALLING = np.array([0x7FA00003, 0xFF812345, 0x7F800001], np.uint32).view(np.float32)

SIZES = [(1, 1), (7, 7), (13, 13), (28, 28), (7, 13), (13, 1), (1, 7), (28, 13)]


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(BITS[a.dtype])


def _windows_of(size, stride, pad):
    kh, kw = (size, size) if isinstance(size, int) else size
    stride = (kh, kw) if stride is None else stride
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    return kh, kw, sh, sw, as_pads(pad)


def _first_winner_bits(x, size, stride, pad, out_hw):
    """Bits of each window's first maximum, in row-major order over its input cells (padding
    cells are skipped: the window is clipped to the input), under ``_wins``: a cell replaces the
    running maximum when greater, or when it is NaN and the maximum is not."""
    kh, kw, sh, sw, (top, _, left, _) = _windows_of(size, stride, pad)
    N, C, H, W = x.shape
    OH, OW = out_hw
    values = x.astype(np.float32)  # exact for float16; NaN stays NaN
    bits = _bits(x)
    best = np.zeros((N, C, OH, OW), np.float32)
    best_bits = np.zeros((N, C, OH, OW), bits.dtype)
    seen = np.zeros((OH, OW), bool)
    for i in range(kh):
        rows = np.arange(OH) * sh - top + i
        for j in range(kw):
            cols = np.arange(OW) * sw - left + j
            inside = ((rows >= 0) & (rows < H))[:, None] & ((cols >= 0) & (cols < W))[None, :]
            r, c = np.clip(rows, 0, H - 1), np.clip(cols, 0, W - 1)
            v = values[:, :, r][:, :, :, c]
            with np.errstate(invalid="ignore"):
                wins = inside & (~seen | (v > best) | (np.isnan(v) & ~np.isnan(best)))
            best = np.where(wins, v, best)
            best_bits = np.where(wins, bits[:, :, r][:, :, :, c], best_bits)
            seen |= inside
    assert seen.all(), "a window without an input cell"
    return best_bits


def _inputs(kind, shape, dtype, rng, general=True):
    """``general``: whether the general kernel runs. The 2x2 stride-2 kernels' NaN is a sum of
    the window (it quiets a signalling NaN, and LLVM may reorder the operands): they get NaNs of
    one payload."""
    if kind == "finite":
        return rng.standard_normal(shape).astype(dtype)
    if kind == "ties":
        # -1, -0.0, +0.0, 1: nearly every window has a tie, many between zeros of either sign.
        x = rng.integers(-1, 2, size=shape).astype(dtype)
        x[x == 0] = np.where(rng.random((x == 0).sum()) < 0.5, -0.0, 0.0)
        return x
    if kind == "nan":
        x = rng.standard_normal(shape).astype(dtype)
        x[rng.random(shape) < 0.1] = 0.0
        x[rng.random(shape) < 0.1] = -0.0
        nans = NANS[np.dtype(dtype)]
        if not general:
            nans = nans[:1]
        elif np.dtype(dtype) == np.float32:
            nans = np.concatenate([nans, SIGNALLING])
        where = rng.random(shape) < 0.15
        x[where] = rng.choice(nans, where.sum())
        return x
    if kind == "-inf":
        x = np.full(shape, -np.inf, dtype)
        x.reshape(-1)[:: max(1, x.size // 5)] = NANS[np.dtype(dtype)][0]
        return x
    raise ValueError(kind)


def _check(x, size, stride, pad, ceil_mode=False):
    y = fastconv.max_pool2d(x, size, stride, pad, ceil_mode=ceil_mode)
    assert y.dtype == x.dtype
    with np.errstate(invalid="ignore"):  # float64 of a signalling NaN
        expected = ref.max_pool2d(x, size, stride, pad, ceil_mode=ceil_mode)
    assert y.shape == expected.shape
    oracle = _first_winner_bits(x, size, stride, pad, y.shape[2:])
    np.testing.assert_array_equal(_bits(y), oracle)
    if np.isfinite(x).all():
        # The independent float64 reference: same values (and, with no zeros, same bits).
        np.testing.assert_array_equal(y, expected.astype(x.dtype))
        if (x != 0).all():
            np.testing.assert_array_equal(_bits(y), _bits(expected.astype(x.dtype)))
    else:
        # NaN wherever the reference has one; elsewhere the same values.
        np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
        finite = ~np.isnan(expected)
        np.testing.assert_array_equal(y[finite], expected[finite].astype(x.dtype))
    return y


def _square_geometries():
    for k in range(1, 6):
        for s in range(1, 4):
            for p in range(k // 2 + 1):
                for ceil_mode in (False, True):
                    yield k, s, p, ceil_mode


GEOMETRIES = list(_square_geometries())


def _valid(shape, size, stride, pad, ceil_mode):
    try:
        ref.max_pool2d(np.zeros((1, 1, *shape), np.float32), size, stride, pad, ceil_mode=ceil_mode)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(
    ("size", "stride", "pad", "ceil_mode"),
    GEOMETRIES,
    ids=[f"k{k}s{s}p{p}{'c' * c}" for k, s, p, c in GEOMETRIES],
)
def test_square_windows(size, stride, pad, ceil_mode, dtype, rng):
    checked = 0
    for hw in SIZES:
        if not _valid(hw, size, stride, pad, ceil_mode):
            continue
        # 2x2 stride-2 unpadded windows take their own kernels (but not in ceil mode on odd
        # sizes, where the last windows are clipped).
        general = (size, stride, pad) != (2, 2, 0) or (ceil_mode and (hw[0] % 2 or hw[1] % 2))
        for batch in [(1, 1), (2, 3)]:
            for kind in ("finite", "ties", "nan", "-inf"):
                x = _inputs(kind, (*batch, *hw), dtype, rng, general)
                _check(x, size, stride, pad, ceil_mode)
                checked += 1
    assert checked


RECT = [
    ((2, 3), (1, 2), (1, 1), False),
    ((2, 3), (1, 2), (1, 1), True),
    ((3, 1), (3, 1), (1, 0), True),
    ((1, 4), (2, 3), (0, 2), False),
    ((5, 2), (2, 1), (2, 1), True),
    ((4, 5), (3, 2), (1, 2), False),
    # asymmetric padding (top, bottom, left, right): the extra side added as -inf by the op
    ((3, 3), 1, (0, 1, 1, 0), False),
    ((3, 3), 2, (1, 0, 0, 1), False),
    ((5, 4), (1, 3), (2, 1, 0, 2), False),
    ((2, 2), 1, (1, 0, 1, 0), False),
    ((4, 3), (3, 2), (0, 2, 1, 1), False),
]


@pytest.mark.parametrize(("size", "stride", "pad", "ceil_mode"), RECT)
def test_rectangular_windows_and_asymmetric_pads(size, stride, pad, ceil_mode, dtype, rng):
    checked = 0
    for hw in SIZES:
        if not _valid(hw, size, stride, pad, ceil_mode):
            continue
        for kind in ("finite", "ties", "nan", "-inf"):
            _check(_inputs(kind, (2, 3, *hw), dtype, rng), size, stride, pad, ceil_mode)
            checked += 1
    assert checked


def test_first_nan_of_the_window_wins(dtype):
    # Row-major order, not column-major: in the 3x3 window the NaN of row 0 (column 2) comes
    # before the NaN of row 1 (column 0), which a column pass first would pick.
    nans = NANS[np.dtype(dtype)]
    x = np.zeros((1, 1, 3, 3), dtype)
    x[0, 0, 0, 2] = nans[1]
    x[0, 0, 1, 0] = nans[2]
    y = fastconv.max_pool2d(x, 3, 1, 0)
    assert _bits(y)[0, 0, 0, 0] == _bits(nans[1:2])[0]
    # The same with signed zeros: +0.0 at (0, 2) comes before -0.0 at (1, 0) and ties with it.
    x = np.full((1, 1, 3, 3), -1, dtype)
    x[0, 0, 0, 2] = 0.0
    x[0, 0, 1, 0] = -0.0
    assert _bits(fastconv.max_pool2d(x, 3, 1, 0))[0, 0, 0, 0] == 0
    x[0, 0, 0, 2], x[0, 0, 1, 0] = -0.0, 0.0
    assert _bits(fastconv.max_pool2d(x, 3, 1, 0))[0, 0, 0, 0] == _bits(np.array([-0.0], dtype))[0]


def test_all_negative_infinity(dtype):
    for size, stride, pad, ceil_mode in [(3, 1, 1, False), (3, 2, 0, True), (5, 3, 2, True)]:
        x = np.full((2, 3, 13, 13), -np.inf, dtype)
        y = _check(x, size, stride, pad, ceil_mode)
        assert (y == -np.inf).all()


# Many planes: several blocks of planes per call (the last one partial), and calls large enough
# for the parallel kernel (fastconv.cpu.pool.SERIAL_POOL_VALUES).
MANY = [
    ((3, 50, 7, 7), 3, 1, 1, False),
    ((2, 60, 14, 14), 3, 2, 0, True),
    ((2, 33, 28, 28), 3, 1, 1, False),
    ((1, 7, 112, 112), 3, 2, 0, True),
    ((2, 20, 55, 55), 3, 2, 0, False),
    ((4, 9, 27, 27), 3, 2, 1, True),
]


@pytest.mark.parametrize(("shape", "size", "stride", "pad", "ceil_mode"), MANY)
def test_many_planes(shape, size, stride, pad, ceil_mode, dtype, rng):
    for kind in ("finite", "ties", "nan"):
        _check(_inputs(kind, shape, dtype, rng), size, stride, pad, ceil_mode)


@pytest.mark.parametrize(("shape", "size", "stride", "pad", "ceil_mode"), MANY[:3])
def test_parallel_and_serial_kernels_agree(shape, size, stride, pad, ceil_mode, dtype, rng):
    # The kernels directly: the parallel one on a call the public op would run serially too.
    x = _inputs("nan", shape, dtype, rng)
    y = fastconv.max_pool2d(x, size, stride, pad, ceil_mode=ceil_mode)
    planes = bits_view(x).reshape(-1, *shape[2:])  # as the kernels take it: half as uint16
    args = (size, size, stride, stride, pad, pad)
    for kernel in (cpu_pool._max_forward, cpu_pool._max_forward_serial):
        out = np.empty((planes.shape[0], *y.shape[2:]), planes.dtype)
        kernel(planes, out, *args)
        np.testing.assert_array_equal(_bits(from_bits(out, dtype)).reshape(y.shape), _bits(y))


@njit(cache=False)
def _picks(values):
    n = values.size
    taken = np.empty((n, n), np.float32)
    expected = np.empty((n, n), np.float32)
    for i in range(n):
        for j in range(n):
            v, b = values[i], values[j]
            taken[i, j] = cpu_pool._pick(v, b)
            expected[i, j] = v if cpu_pool._wins(v, b) else b
    return taken, expected


def test_pick_is_the_wins_rule():
    # The kernel's two-comparison select against the three-comparison rule, on every pair,
    # bit for bit (so -0.0/+0.0 and NaN payloads count).
    values = np.array(
        [0x7FC00000, 0xFFC00001, 0x7FA00003, 0x7F800000, 0xFF800000, 0x00000000, 0x80000000,
         0x3F800000, 0xBF800000, 0x00000001, 0x80000001, 0x7F7FFFFF, 0xFF7FFFFF],
        np.uint32,
    ).view(np.float32)  # fmt: skip
    taken, expected = _picks(values)
    np.testing.assert_array_equal(taken.view(np.uint32), expected.view(np.uint32))


# --- backward: the routing after the forward's maxima -----------------------------------------


def _first_winner_backward(x, dy, size, stride, pad):
    """dx of a window-by-window argmax (the first winner under ``_wins``, row-major in the
    clipped window), each window's gradient added in float32 in output order: the order of
    PyTorch's scatter and of the kernel this oracle checks."""
    kh, kw, sh, sw, (top, _, left, _) = _windows_of(size, stride, pad)
    N, C, H, W = x.shape
    OH, OW = dy.shape[2:]
    values = x.astype(np.float32)
    grads = dy.astype(np.float32)
    dx = np.zeros((N, C, H, W), np.float32)
    for n in range(N):
        for c in range(C):
            plane = values[n, c]
            for oh in range(OH):
                for ow in range(OW):
                    best, where = None, None
                    for i in range(kh):
                        h = oh * sh - top + i
                        for j in range(kw):
                            w = ow * sw - left + j
                            if not (0 <= h < H and 0 <= w < W):
                                continue
                            v = plane[h, w]
                            if best is None or v > best or (np.isnan(v) and not np.isnan(best)):
                                best, where = v, (h, w)
                    dx[n, c][where] = np.float32(dx[n, c][where] + grads[n, c, oh, ow])
    return dx.astype(x.dtype)


@pytest.mark.parametrize("kind", ["finite", "ties", "nan", "-inf"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
@pytest.mark.parametrize(
    "size,stride,pad,ceil_mode,hw",
    [(3, 1, 1, False, (13, 13)), (3, 2, 0, True, (13, 13)), (3, 2, 1, False, (8, 9)),
     (2, 1, 0, False, (7, 5)), (5, 3, 2, True, (11, 7)), ((3, 2), (1, 2), (1, 0), False, (9, 6)),
     (3, 3, 0, True, (4, 7)), (3, 1, 1, False, (1, 1))],
)  # fmt: skip
def test_backward_routes_like_the_window_argmax(kind, dtype, size, stride, pad, ceil_mode, hw, rng):
    """Bits of the general backward against the window-by-window argmax: overlapping windows
    (stride < size), ceil mode, padding, ties between zeros of either sign, NaN and -inf
    windows, float32 and float16; then a batch large enough for the parallel kernel, whose
    first images must have the bits of the same images alone (serial)."""
    x = _inputs(kind, (2, 3, *hw), dtype, rng)
    y = fastconv.max_pool2d(x, size, stride, pad, ceil_mode=ceil_mode)
    dy = rng.standard_normal(y.shape).astype(dtype)
    with np.errstate(invalid="ignore"):
        dx = fastconv.max_pool2d_backward(dy, x, size, stride, pad, ceil_mode=ceil_mode)
        want = _first_winner_backward(x, dy, size, stride, pad)
    np.testing.assert_array_equal(_bits(dx), _bits(want))
    big = np.concatenate([x, _inputs(kind, (-(-65536 // (3 * x[0, 0].size)), 3, *hw), dtype, rng)])
    big_dy = np.concatenate([dy, rng.standard_normal((big.shape[0] - 2, *dy.shape[1:]))]).astype(
        dtype
    )
    assert big.size >= cpu_pool.SERIAL_POOL_VALUES
    with np.errstate(invalid="ignore"):
        dx_big = fastconv.max_pool2d_backward(big_dy, big, size, stride, pad, ceil_mode=ceil_mode)
    np.testing.assert_array_equal(_bits(dx_big[:2]), _bits(dx))


def test_backward_refuses_planes_beyond_its_int32_positions(monkeypatch, rng):
    """Positions are int32 and the scatter unchecked: a plane over the bound is refused with a
    ValueError naming it (the bound lowered here; the real one is 2**31 pixels)."""
    x = rng.standard_normal((1, 2, 9, 9)).astype(np.float32)
    dy = np.ones((1, 2, 4, 4), np.float32)
    monkeypatch.setattr(cpu_pool, "MAX_ROUTE_PIXELS", 80)
    with pytest.raises(ValueError, match="9x9 = 81 pixels"):
        fastconv.max_pool2d_backward(dy, x, 3, 2)
    monkeypatch.setattr(cpu_pool, "MAX_ROUTE_PIXELS", 81)
    dx = fastconv.max_pool2d_backward(dy, x, 3, 2)
    assert dx.shape == x.shape
