"""Convolution forward products on the GEMM layer (fastconv/cpu/_matmul.py): 1x1
convolutions as one product over every image's pixels (``pointwise``), and the direct and
unfolded paths' products by the packed micro-kernel (``gemm_offsets``), through
``fastconv.conv2d`` and the prepared path; a batch smaller than the thread count with the
threads sharing each image's product (``forward_split``).

Oracles: the float64 reference (``fastconv.reference.conv2d``) and NumPy's float64 product;
the unprepared path for the prepared one's bits.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

import fastconv as fc
from fastconv import reference as ref
from fastconv._checks import validate_conv
from fastconv.cpu import _direct, _half, _matmul, conv
from fastconv.cpu import prepared as cpu_prepared
from fastconv.cpu._workspace import checkout
from fastconv.prepared import prepare_conv2d
from tests.conftest import assert_close

# N, C, F, H, W: columns of one image shorter and longer than a 32-column panel, panels that
# straddle image boundaries, more filters than one 128-row block, reductions past 512 steps
SHAPES = [
    (1, 1, 1, 1, 1),
    (3, 7, 5, 7, 7),
    (9, 13, 33, 1, 1),
    (2, 16, 129, 5, 13),
    (4, 600, 9, 3, 3),
    (8, 24, 144, 14, 14),
    (1, 40, 8, 28, 28),
    (5, 3, 17, 1024, 1),
    (2, 5, 7, 33, 33),  # over POINTWISE_MAX_PIXELS: the stacked direct GEMM
]


def _case(rng, dtype, N, C, F, H, W):
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = (rng.standard_normal((F, C, 1, 1)) / np.sqrt(C)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    return x, w, b


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_pointwise_conv_against_the_float64_reference(shape, dtype, rng):
    x, w, b = _case(rng, dtype, *shape)
    for bias, act in ((b, None), (b, "relu"), (None, None)):
        y = fc.conv2d(x, w, bias, 1, 0, act)
        expected = ref.conv2d(x, w, bias, 1, 0)
        if act:
            expected = np.maximum(expected, 0.0)
        assert y.dtype == dtype and y.shape == expected.shape
        assert_close(y, expected, dtype, k=shape[1])
    rec = [c for c in fc.conv_algorithm_choices() if c.w_shape == w.shape and c.pass_ == "forward"]
    assert rec and rec[-1].algorithm == "direct"
    assert conv.is_pointwise(validate_conv(x, w, b, 1, 0).geometry()) == (
        shape[3] * shape[4] <= conv.POINTWISE_MAX_PIXELS
    )


def test_the_kernel_against_numpy_with_transposed_filters_and_residual(rng):
    """op(a) = a.T (the packing of a 1x1 convolution's dx) and the residual epilogue."""
    B, K, M, P = 3, 37, 21, 50
    a = rng.standard_normal((K, M)).astype(np.float32)  # op(a) = a.T is M x K
    b = rng.standard_normal((B, K, P)).astype(np.float32)
    res = rng.standard_normal((B, M, P)).astype(np.float32)
    bias = rng.standard_normal(M).astype(np.float32)
    out = np.empty((B, M, P), np.float32)
    _matmul.pointwise(_matmul.pack_filters(a, trans_a=True), b, out, bias, True, res)
    prod = np.matmul(a.T.astype(np.float64), b.astype(np.float64)) + bias[:, None]
    rounded = prod.astype(np.float32).astype(np.float64)  # the conv rounded, then the Add
    expected = np.maximum(rounded + res, 0.0)
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=2e-6 * np.abs(expected).max())


def test_serial_and_parallel_give_the_same_bits(rng):
    x, w, b = _case(rng, np.float32, 8, 48, 40, 9, 9)
    flt = _matmul.pack_filters(w.reshape(40, 48))
    xs = x.reshape(8, 48, 81)
    outs = []
    for serial in (True, False):
        out = np.empty((8, 40, 81), np.float32)
        _matmul.pointwise(flt, xs, out, b, True, None, serial)
        outs.append(out)
    assert numba.get_num_threads() >= 1
    assert np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32))


@pytest.mark.parametrize(
    "B, K, M, P",
    [
        (1, 1, 1, 1),
        (2, 7, 13, 50),
        (3, 600, 32, 169),
        (8, 32, 16, 784),
        (2, 24, 8, 31),
        (1, 16, 24, 4096),
    ],  # fmt: skip
    ids=str,
)
def test_rows_read_in_place_give_the_packed_bits(B, K, M, P, monkeypatch, rng):
    """Few filters (POINTWISE_IN_PLACE_MAX_M): the image's rows are read where they lie
    instead of packed, except in items that cross an image or would read past the array's
    end. Same bits as packing everything, with the residual and ReLU epilogue, 1 and 2
    threads."""
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((B, K, P)).astype(np.float32)
    res = rng.standard_normal((B, M, P)).astype(np.float32)
    bias = rng.standard_normal(M).astype(np.float32)
    flt = _matmul.pack_filters(a)
    outs = []
    for limit, serial in ((0, True), (M, True), (M, False)):
        monkeypatch.setattr(_matmul, "POINTWISE_IN_PLACE_MAX_M", limit)
        for r in (None, res):
            out = np.empty((B, M, P), np.float32)
            outs.append(_matmul.pointwise(flt, b, out, bias, True, r, serial))
    for got in outs[2:]:
        same = outs[0] if got is outs[2] or got is outs[4] else outs[1]
        assert np.array_equal(got.view(np.uint32), same.view(np.uint32))
    prod = np.matmul(a.astype(np.float64), b.astype(np.float64)) + bias[:, None]
    assert_close(outs[0], np.maximum(prod, 0.0), np.float32, k=K)


def test_non_finite_values_propagate(rng):
    x, w, b = _case(rng, np.float32, 2, 5, 4, 3, 3)
    x[1, 2, 1, 1] = np.nan
    x[0, 0, 0, 0] = np.inf
    y = fc.conv2d(x, w, b, 1, 0, "relu")  # NaN survives the ReLU; inf gives +-inf or NaN
    assert np.isnan(y[1, :, 1, 1]).all()
    expected = np.maximum(ref.conv2d(x, w, b, 1, 0), 0.0)
    finite = np.isfinite(expected)
    assert np.array_equal(np.isnan(y), np.isnan(expected))
    assert_close(y[finite], expected[finite], np.float32, k=5)


@pytest.mark.parametrize("shape", SHAPES[1:6], ids=str)
def test_prepared_pointwise_is_conv2d_bit_for_bit(shape, dtype, rng):
    x, w, b = _case(rng, dtype, *shape)
    prepared = prepare_conv2d(w, b, 1, 0)
    y = fc.conv2d(x, w, b, 1, 0)
    res = rng.standard_normal(y.shape).astype(dtype)
    for act in (None, "relu"):
        unfused = fc.conv2d(x, w, b, 1, 0, act)
        assert np.array_equal(prepared(x, act).view(np.uint8), unfused.view(np.uint8))
        separate = y + res
        if act:
            separate = fc.relu(separate)
        fused = prepared(x, act, residual=res)
        assert np.array_equal(fused.view(np.uint8), separate.view(np.uint8))


# --- the direct and unfolded paths' products: gemm_offsets or gemm_nn by map size ------------

# N, C, H, F, k, stride, pad, algorithm: K = C*k*k from 18 to 600, maps of 1 to 256 pixels
PRODUCT_CASES = [
    (1, 16, 14, 32, 3, 1, 1, "direct"),
    (3, 32, 8, 64, 3, 1, 1, "direct"),
    (2, 7, 9, 5, 3, 1, 2, "direct"),
    (1, 2, 3, 9, 3, 1, 1, "direct"),
    (4, 24, 15, 17, 5, 2, 2, "unfolded"),
    (2, 40, 6, 130, 3, 2, 0, "unfolded"),
    (5, 3, 17, 8, 7, 2, 3, "unfolded"),
]


@pytest.mark.parametrize("case", PRODUCT_CASES, ids=str)
@pytest.mark.parametrize("packed_pixels", [0, 1 << 20], ids=["gemm_nn", "packed"])
def test_forward_products_against_the_float64_reference(case, packed_pixels, dtype, rng,
                                                        monkeypatch):  # fmt: skip
    N, C, H, F, k, stride, pad, algorithm = case
    monkeypatch.setattr(conv, "PACKED_MAX_PIXELS", packed_pixels)
    x = rng.standard_normal((N, C, H, H)).astype(dtype)
    w = (rng.standard_normal((F, C, k, k)) / np.sqrt(C * k * k)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    g = validate_conv(x, w, b, stride, pad).geometry()
    assert conv._gemm_setup(g, F, algorithm == "direct", 1)[0].packed == (
        packed_pixels > 0 and C * k * k >= conv.PACKED_MIN_K
    )
    y = fc.conv2d(x, w, b, stride, pad, "relu", algorithm=algorithm)
    expected = np.maximum(ref.conv2d(x, w, b, stride, pad), 0.0)
    assert_close(y, expected, dtype, k=C * k * k)
    prepared = prepare_conv2d(w, b, stride, pad)
    previous = fc.set_conv_algorithm(algorithm)
    try:
        assert np.array_equal(prepared(x, "relu").view(np.uint8), y.view(np.uint8))
    finally:
        fc.set_conv_algorithm(previous)


def test_packed_products_with_non_finite_inputs(rng, monkeypatch):
    """The unfolded path takes any values; NaN and inf reach exactly their windows' outputs."""
    monkeypatch.setattr(conv, "PACKED_MAX_PIXELS", 1 << 20)
    x = rng.standard_normal((2, 8, 7, 7)).astype(np.float32)
    w = (rng.standard_normal((6, 8, 3, 3)) / 8).astype(np.float32)
    x[0, 3, 2, 2] = np.nan
    x[1, 0, 6, 6] = np.inf
    y = fc.conv2d(x, w, None, 2, 1, algorithm="unfolded")
    expected = ref.conv2d(x, w, None, 2, 1)
    assert np.array_equal(np.isnan(y), np.isnan(expected))
    finite = np.isfinite(expected)
    assert np.array_equal(np.isinf(y), np.isinf(expected))
    assert_close(y[finite], expected[finite], np.float32, k=72)


# --- Winograd's weight gradient on small maps: one GEMM-layer product (conv._dw_by_gemm) -----

# N, C, H, F: few tiles against many filters (2F >= N*OH*OW), pad 1 and 2
DW_CASES = [(1, 16, 5, 16, 1), (2, 24, 4, 40, 1), (3, 8, 3, 40, 2), (1, 40, 7, 64, 1)]


@pytest.mark.parametrize("case", DW_CASES, ids=str)
def test_small_map_weight_gradient_against_the_float64_reference(case, dtype, rng):
    N, C, H, F, pad = case
    x = rng.standard_normal((N, C, H, H)).astype(dtype)
    w = (rng.standard_normal((F, C, 3, 3)) / np.sqrt(9 * C)).astype(dtype)
    g = validate_conv(x, w, None, 1, pad).geometry()
    assert conv._dw_by_gemm(g, F)
    dy = rng.standard_normal((N, F, g.OH, g.OW)).astype(dtype)
    dx, dw, db = fc.conv2d_backward(dy, x, w, 1, pad, algorithm="winograd4x4")
    rdx, rdw, rdb = ref.conv2d_backward(dy, x, w, 1, pad)
    assert dw.dtype == db.dtype == dtype
    assert_close(dw, rdw, dtype, k=N * g.OH * g.OW)
    assert_close(db, rdb, dtype, k=N * g.OH * g.OW)
    assert_close(dx, rdx, dtype, k=F * 9 * 4)  # Winograd's dx: its error budget
    _, dw_only, db_only = fc.conv2d_backward(dy, x, w, 1, pad, need_dx=False,
                                              algorithm="winograd4x4")  # fmt: skip
    assert np.array_equal(dw_only.view(np.uint8), dw.view(np.uint8))
    assert np.array_equal(db_only.view(np.uint8), db.view(np.uint8))


def test_small_map_weight_gradient_with_non_finite_values(rng):
    x = rng.standard_normal((1, 16, 5, 5)).astype(np.float32)
    w = (rng.standard_normal((16, 16, 3, 3)) / 12).astype(np.float32)
    dy = rng.standard_normal((1, 16, 5, 5)).astype(np.float32)
    x[0, 3, 2, 2] = np.nan
    dy[0, 5, 0, 0] = np.inf
    _, dw, db = fc.conv2d_backward(dy, x, w, 1, 1, algorithm="winograd4x4")
    _, rdw, rdb = ref.conv2d_backward(dy, x, w, 1, 1)
    assert np.array_equal(np.isnan(dw), np.isnan(rdw))
    assert np.array_equal(np.isinf(dw), np.isinf(rdw))
    finite = np.isfinite(rdw)
    assert_close(dw[finite], rdw[finite], np.float32, k=25)
    assert np.array_equal(np.isinf(db), np.isinf(rdb))


# --- the direct and unfolded backward as two GEMM-layer products -----------------------------
# (conv._backward_by_gemm_layer)

# N, C, H, F, k, stride, pad: 8F >= N*OH*OW (many filters, small outputs), or a 1x1
# convolution with 16F >= N*OH*OW (the last two)
UNFOLDED_BACKWARD_CASES = [
    (2, 16, 7, 24, 3, 2, 1),
    (3, 5, 9, 40, 1, 2, 0),
    (1, 8, 11, 16, 5, 3, 2),
    (4, 3, 6, 50, 2, 1, 0),
    (2, 24, 6, 5, 1, 1, 0),
    (3, 40, 7, 10, 1, 1, 0),
]


@pytest.mark.parametrize(
    "case,algorithm",
    [(c, a) for c in UNFOLDED_BACKWARD_CASES for a in ("unfolded", "direct")
     if a == "unfolded" or c[5] == 1],  # the direct path needs stride 1
    ids=str,
)  # fmt: skip
def test_unfolded_backward_on_the_gemm_layer(case, algorithm, dtype, rng):
    N, C, H, F, k, stride, pad = case
    x = rng.standard_normal((N, C, H, H)).astype(dtype)
    w = (rng.standard_normal((F, C, k, k)) / np.sqrt(C * k * k)).astype(dtype)
    g = validate_conv(x, w, None, stride, pad).geometry()
    assert conv._backward_by_gemm_layer(g, F)
    dy = rng.standard_normal((N, F, g.OH, g.OW)).astype(dtype)
    dx, dw, db = fc.conv2d_backward(dy, x, w, stride, pad, algorithm=algorithm)
    rdx, rdw, rdb = ref.conv2d_backward(dy, x, w, stride, pad)
    assert dx.dtype == dw.dtype == db.dtype == dtype
    assert_close(dx, rdx, dtype, k=F * k * k)
    assert_close(dw, rdw, dtype, k=N * g.OH * g.OW)
    assert_close(db, rdb, dtype, k=N * g.OH * g.OW)
    none, dw2, db2 = fc.conv2d_backward(dy, x, w, stride, pad, need_dx=False,
                                        algorithm=algorithm)  # fmt: skip
    assert none is None
    assert np.array_equal(dw2.view(np.uint8), dw.view(np.uint8))


def test_unfolded_backward_on_the_gemm_layer_with_non_finite_values(rng):
    x = rng.standard_normal((2, 6, 7, 7)).astype(np.float32)
    w = (rng.standard_normal((32, 6, 3, 3)) / 8).astype(np.float32)
    dy = rng.standard_normal((2, 32, 4, 4)).astype(np.float32)
    x[1, 2, 3, 3] = np.nan
    dy[0, 7, 1, 1] = np.inf
    dx, dw, _ = fc.conv2d_backward(dy, x, w, 2, 1, algorithm="unfolded")
    rdx, rdw, _ = ref.conv2d_backward(dy, x, w, 2, 1)
    for got, want in ((dx, rdx), (dw, rdw)):
        assert np.array_equal(np.isnan(got), np.isnan(want))
        assert np.array_equal(np.isinf(got), np.isinf(want))
        finite = np.isfinite(want)
        assert_close(got[finite], want[finite], np.float32, k=300)


# --- a window covering the input: a Dense product (conv.is_flat) ------------------------------

FLAT_CASES = [(8, 16, 5, 120, 1), (3, 7, 4, 9, 3), (1, 1, 1, 5, 1), (2, 30, 3, 33, 2)]


@pytest.mark.parametrize(
    "case, algorithm",
    [
        (c, a)
        for c in FLAT_CASES
        for a in ("direct", "unfolded", None)
        if a != "direct" or c[4] == 1
    ],  # direct needs stride 1
    ids=str,
)
def test_a_window_covering_the_input_is_a_dense_product(case, algorithm, dtype, rng):
    N, C, H, F, stride = case
    x = rng.standard_normal((N, C, H, H)).astype(dtype)
    w = (rng.standard_normal((F, C, H, H)) / np.sqrt(C * H * H)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    g = validate_conv(x, w, b, stride, 0).geometry()
    assert conv.is_flat(g)
    for act in (None, "relu"):
        y = fc.conv2d(x, w, b, stride, 0, act, algorithm=algorithm)
        expected = ref.conv2d(x, w, b, stride, 0)
        if act:
            expected = np.maximum(expected, 0.0)
        assert y.shape == (N, F, 1, 1) and y.dtype == dtype
        assert_close(y, expected, dtype, k=C * H * H)
        prepared = prepare_conv2d(w, b, stride, 0)
        assert np.array_equal(prepared(x, act).view(np.uint8), y.view(np.uint8))
        res = rng.standard_normal(y.shape).astype(dtype)
        separate = fc.conv2d(x, w, b, stride, 0) + res
        if act:
            separate = fc.relu(separate)
        assert np.array_equal(prepared(x, act, residual=res).view(np.uint8),
                              separate.view(np.uint8))  # fmt: skip
    assert not conv.is_flat(validate_conv(x, w, b, stride, 1).geometry())  # padded: not flat


# --- fewer images than threads: the threads share each image's product (forward_split) ------

# N, C, H, W, F, k, pad: a 28x28 map (bands of rows), 8x8 maps (bands of filters), odd sizes,
# filters not a multiple of MR, a band count above the rows, two images stacked, K > 512
SPLIT_CASES = [
    (1, 16, 28, 28, 16, 3, 1),
    (1, 32, 8, 8, 64, 3, 1),
    (1, 7, 13, 9, 21, 3, 2),
    (1, 3, 5, 4, 13, 3, 1),
    (2, 5, 11, 11, 9, 5, 2),
    (1, 64, 6, 7, 12, 3, 1),  # K = 576: two reduction blocks
]


def _split_run(kernel_plan, x, w, b, relu, res, split, n_threads):
    g = validate_conv(x, w, b, 1, kernel_plan).geometry()
    F = w.shape[0]
    plan, x_layout, key, make = conv._gemm_setup(g, F, True, n_threads, split)
    plan = plan._replace(packed=True)  # (the serial oracle too, whatever the map size)
    _, wp = conv.filter_operands(w, plan)
    bias = b.astype(np.float32)
    y = np.empty((g.N, F, g.OH, g.OW), x.dtype)
    yb = _half.bits_view(y)
    rb = _half.bits_view(res) if res is not None else yb
    with checkout(key, make) as ws:
        if split:
            _direct.forward_split(_half.bits_view(x), wp, bias, relu, yb, ws, plan, x_layout, g,
                                  rb, res is not None, split)  # fmt: skip
        else:
            _direct.forward_residual_serial(_half.bits_view(x), conv._NO_FK, wp, bias, relu, yb,
                                            ws, plan, x_layout, g, rb, res is not None)  # fmt: skip
    return y


@pytest.mark.parametrize("case", SPLIT_CASES, ids=str)
@pytest.mark.parametrize(
    "split", [_direct.SPLIT_COLUMNS, _direct.SPLIT_FILTERS], ids=["rows", "filters"]
)
@pytest.mark.parametrize("n_threads", [2, 3, 5])
def test_threads_sharing_an_image_give_the_serial_bits(case, split, n_threads, dtype, rng):
    # The serial packed product (one thread, B packed) is the oracle for the bits; the bands
    # read B in place (gemm_rows): the same FMA chain per output whichever thread or path.
    N, C, H, W, F, k, pad = case
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = (rng.standard_normal((F, C, k, k)) / np.sqrt(C * k * k)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    expected = ref.conv2d(x, w, b, 1, pad)
    res = rng.standard_normal(expected.shape).astype(dtype)
    for relu, residual in ((False, None), (True, None), (True, res)):
        serial = _split_run(pad, x, w, b, relu, residual, 0, 1)
        shared = _split_run(pad, x, w, b, relu, residual, split, n_threads)
        assert np.array_equal(shared.view(np.uint8), serial.view(np.uint8))
    plain = _split_run(pad, x, w, b, False, None, split, n_threads)
    assert_close(plain, expected, dtype, k=C * k * k)


def test_batch_one_shares_the_threads_on_the_prepared_and_unprepared_paths(rng, monkeypatch):
    x = rng.standard_normal((1, 16, 28, 28)).astype(np.float32)
    w = (rng.standard_normal((16, 16, 3, 3)) / 12).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    g = validate_conv(x, w, b, 1, 1).geometry()
    assert conv.split_mode(g, 16, True, 2) == _direct.SPLIT_COLUMNS
    assert conv.split_mode(g, 16, True, 1) == 0  # one thread: nothing to share
    assert conv.split_mode(g, 16, False, 2) == 0  # the unfolded path keeps its images
    w8 = np.zeros((32, 32, 3, 3), np.float32)
    small = validate_conv(np.zeros((1, 32, 8, 8), np.float32), w8, None, 1, 1).geometry()
    assert conv.split_mode(small, 32, True, 2) == _direct.SPLIT_FILTERS  # 78 columns
    assert conv.split_mode(small, 32, True, 5) == 0  # 32 filters: not MR (8) for each of 5
    tiny = validate_conv(x[:, :, :8, :8], w, b, 1, 1).geometry()
    assert conv.split_mode(tiny, 16, True, 2) == 0  # 0.3 MFLOP: not worth a parallel region
    batch = validate_conv(np.concatenate([x, x]), w, b, 1, 1).geometry()
    assert conv.split_mode(batch, 16, True, 2) == 0  # an image a thread already
    if numba.get_num_threads() < 2:
        return  # the rest needs two threads (the test above covers the kernel on any machine)
    y = fc.conv2d(x, w, b, 1, 1, "relu", algorithm="direct")
    assert_close(y, np.maximum(ref.conv2d(x, w, b, 1, 1), 0.0), np.float32, k=144)
    prepared = prepare_conv2d(w, b, 1, 1)
    previous = fc.set_conv_algorithm("direct")
    try:
        assert np.array_equal(prepared(x, "relu").view(np.uint8), y.view(np.uint8))
        # read-only and misaligned inputs reach the compiled kernel with their own types
        frozen = x.copy()
        frozen.flags.writeable = False
        assert np.array_equal(prepared(frozen, "relu").view(np.uint8), y.view(np.uint8))
        raw = np.zeros(x.size * 4 + 1, np.uint8)
        shifted = raw[1:].view(np.float32).reshape(x.shape)
        shifted[...] = x
        assert not shifted.flags.aligned
        assert np.array_equal(prepared(shifted, "relu").view(np.uint8), y.view(np.uint8))
        assert np.array_equal(prepared(x, "relu").view(np.uint8), y.view(np.uint8))
    finally:
        fc.set_conv_algorithm(previous)


def test_split_timer_shares_while_sharing_pays_and_backs_off_under_load(monkeypatch):
    # A fake clock: each call "takes" the time the test gives it.
    now = [100.0]
    monkeypatch.setattr(conv.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(conv, "_LOAD", conv._Load())  # the process's load state, fresh
    # (the calls' gaps here stand for a burst: no warm-up after idle)
    monkeypatch.setattr(conv, "SPLIT_IDLE_S", 1e9)
    monkeypatch.setattr(conv, "SPLIT_WARM_CALLS", -1)
    timer, other = conv.SplitTimer(), conv.SplitTimer()
    kinds = []

    def call(duration, which=timer):
        def run(shared):
            kinds.append(shared)
            now[0] += duration

        which.run(run)

    call(5.0)  # first call: compiles, serial
    call(1e-3)  # serial: the reference time
    call(0.6e-3)  # shared from now on
    call(2e-3)  # one slow shared call: noise, still shared
    call(0.6e-3)
    assert kinds == [False, False, True, True, True]
    call(2e-3)
    call(2e-3)  # two in a row: back off 10 ms
    call(1e-3)
    assert kinds[-3:] == [True, True, False]
    now[0] += conv.SPLIT_BACKOFF_S[0]
    call(2e-3)
    call(2e-3)  # the load lasts: back off twice as long
    now[0] += conv.SPLIT_BACKOFF_S[0]
    call(1e-3)
    assert kinds[-3:] == [True, True, False]
    for _ in range(2):
        call(0.5e-3, other)  # another plan learns its serial time meanwhile
    call(0.5e-3, other)  # and backs off with the others (the load is the machine's)
    assert kinds[-1] is False
    now[0] += 2 * conv.SPLIT_BACKOFF_S[0]
    call(0.6e-3)  # the load is gone: shared, back-off reset
    assert kinds[-1] is True and conv._LOAD.backoff == conv.SPLIT_BACKOFF_S[0]
    call(0.3e-3, other)
    assert kinds[-1] is True


@pytest.mark.parametrize("algorithm", ["winograd4x4", "direct", "unfolded"])
def test_small_plans_on_every_thread_or_one_give_the_same_bits(algorithm, dtype, rng):
    # Between PARALLEL_MIN_FLOPS and SERIAL_CONV_FLOPS a prepared plan keeps a one-thread
    # twin (``alt``) that its timer runs under load: the results must not depend on which.
    x = rng.standard_normal((4, 16, 14, 14)).astype(dtype)
    w = (rng.standard_normal((32, 16, 3, 3)) / 12).astype(dtype)
    b = rng.standard_normal(32).astype(dtype)
    prepared = prepare_conv2d(w, b, 1, 1)
    previous = fc.set_conv_algorithm(algorithm)
    try:
        y = prepared(x, "relu")
        (plan,) = prepared._plans.values()
        g = plan.g
        flops = 2 * g.N * 32 * g.C * 9 * g.OH * g.OW
        assert cpu_prepared.PARALLEL_MIN_FLOPS <= flops < cpu_prepared.SERIAL_CONV_FLOPS
        if numba.get_num_threads() < 2:
            assert plan.alt is None  # (one thread: nothing to choose)
            return
        assert plan.alt is not None and plan.alt.serial and not plan.serial
        code = cpu_prepared.ACTIVATION_CODES["relu"]
        for which in (plan, plan.alt):
            again = cpu_prepared._conv2d_plan(x, prepared._weights, which, code, None)
            assert np.array_equal(again.view(np.uint8), y.view(np.uint8))
        assert_close(y, np.maximum(ref.conv2d(x, w, b, 1, 1), 0.0), dtype, k=144)
    finally:
        fc.set_conv_algorithm(previous)


def test_split_timer_runs_calls_back_from_idle_on_one_thread(monkeypatch):
    """A call after more than SPLIT_IDLE_S without timed calls, and the next SPLIT_WARM_CALLS
    close ones, run the serial twin: a sleeping thread's wake-up cost 5-10 ms a parallel
    region on the test host."""
    now = [100.0]
    monkeypatch.setattr(conv.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(conv, "_LOAD", conv._Load())
    timer = conv.SplitTimer()
    kinds = []

    def call(gap=1e-5, duration=1e-4):
        now[0] += gap

        def run(shared):
            kinds.append(shared)
            now[0] += duration

        timer.run(run)

    for _ in range(1 + conv.SPLIT_WARM_CALLS):
        call()  # the first call is back from idle (none before), then the warm-up
    assert not any(kinds) and len(kinds) >= 2
    call()
    assert kinds[-1] is True  # a burst: shared
    call(gap=2 * conv.SPLIT_IDLE_S)
    assert kinds[-1] is False  # back from idle
    for _ in range(conv.SPLIT_WARM_CALLS):
        call()
    assert kinds[-conv.SPLIT_WARM_CALLS - 1 :] == [False] * (conv.SPLIT_WARM_CALLS + 1)
    call()
    assert kinds[-1] is True
    call(gap=conv.SPLIT_IDLE_S / 2)  # a short pause is no idle gap
    assert kinds[-1] is True
    for _ in range(5):  # sporadic calls: always one thread
        call(gap=3 * conv.SPLIT_IDLE_S)
        assert kinds[-1] is False
