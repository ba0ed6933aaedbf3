"""Grouped, depthwise and dilated convolution, asymmetric padding in convolution and pooling,
and average pooling without the padding in its divisor (issue 22): every backend (the
``backend`` fixture: Numba, the CUDA kernels in emulation, the float64 reference) against the
float64 reference, which is written independently as a sum over kernel taps and checked here
against PyTorch and numerical gradients; validation; and the depthwise ops' conformance cases.
"""

from __future__ import annotations

import numpy as np
import op_cases
import pytest
from _gradcheck import numerical_grad
from conftest import assert_close

import fastconv as fc
from fastconv import reference as ref

# (C, F, groups, kernel, stride, pad, dilation): depthwise (groups == C, multiplier 1 and 2),
# grouped (ResNeXt), dilated, asymmetric (Keras "same" at stride 2: the extra row after).
CONVS = [
    (4, 4, 4, 3, 1, 1, 1),
    (3, 6, 3, 3, 2, (0, 1, 0, 1), 1),
    (5, 5, 5, 5, 2, (1, 2, 2, 1), (1, 2)),
    (2, 2, 2, 3, 1, 2, 2),
    (4, 6, 2, 3, 1, (0, 1, 1, 0), 1),
    (6, 9, 3, 2, 1, 1, (2, 1)),
    (4, 4, 1, 3, 2, (1, 2, 0, 1), 2),
    (3, 4, 1, 1, 1, (1, 0, 0, 1), 1),
    (8, 8, 2, 3, (1, 2), (2, 0, 1, 1), (2, 2)),
]


def _conv_inputs(rng, dtype, case, n=2, h=9, w=8):
    C, F, G, k, *_ = case
    x = rng.standard_normal((n, C, h, w)).astype(dtype)
    wt = (rng.standard_normal((F, C // G, k, k)) / k).astype(dtype)
    return x, wt, rng.standard_normal(F).astype(dtype)


def _kw(case):
    _, _, G, _, stride, pad, dilation = case
    return {"stride": stride, "pad": pad, "groups": G, "dilation": dilation}


@pytest.mark.parametrize("case", CONVS, ids=str)
def test_conv_features_match_the_reference(backend, case, dtype, rng):
    x, w, b = _conv_inputs(rng, dtype, case)
    kw = _kw(case)
    k = w.shape[1] * w.shape[2] * w.shape[3]
    y = fc.conv2d(x, w, b, activation="relu", **kw)
    assert_close(y, ref.conv2d(x, w, b, activation="relu", **kw), dtype, k)
    dy = rng.standard_normal(y.shape).astype(dtype)
    got = fc.conv2d_backward(dy, x, w, **kw)
    want = ref.conv2d_backward(dy, x, w, **kw)
    terms = (k * w.shape[0] // case[2], dy.shape[0] * dy.shape[2] * dy.shape[3], dy[0, 0].size * 2)
    for a, e, t in zip(got, want, terms, strict=True):
        assert a.dtype == dtype and a.shape == e.shape
        assert_close(a, e, dtype, t)


@pytest.mark.parametrize("case", CONVS, ids=str)
def test_reference_matches_pytorch(torch, case, rng):
    x, w, b = (a.astype(np.float64) for a in _conv_inputs(rng, np.float64, case))
    kw = _kw(case)
    t, bo, left, r = fc._checks.as_pads(kw["pad"])
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    padded = torch.nn.functional.pad(tx, (left, r, t, bo))
    ty = torch.nn.functional.conv2d(padded, tw, tb, stride=kw["stride"], groups=kw["groups"],
                                    dilation=kw["dilation"])  # fmt: skip
    np.testing.assert_allclose(ref.conv2d(x, w, b, **kw), ty.detach().numpy(), rtol=1e-12,
                               atol=1e-12)  # fmt: skip
    dy = rng.standard_normal(ty.shape)
    ty.backward(torch.tensor(dy))
    dx, dw, db = ref.conv2d_backward(dy, x, w, **kw)
    for ours, theirs in ((dx, tx.grad), (dw, tw.grad), (db, tb.grad)):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-12, atol=1e-11)


def test_reference_gradient_is_the_numerical_one(rng):
    case = (4, 8, 4, 3, 2, (0, 1, 1, 0), (1, 2))
    x, w, b = (a.astype(np.float64) for a in _conv_inputs(rng, np.float64, case, h=7, w=8))
    kw = _kw(case)
    dy = rng.standard_normal(ref.conv2d(x, w, b, **kw).shape)
    dx, dw, db = ref.conv2d_backward(dy, x, w, **kw)
    num_dx = numerical_grad(lambda a: ref.conv2d(a, w, b, **kw), x.copy(), dy)
    num_dw = numerical_grad(lambda a: ref.conv2d(x, a, b, **kw), w.copy(), dy)
    np.testing.assert_allclose(dx, num_dx, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dw, num_dw, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db, dy.sum(axis=(0, 2, 3)))


def test_small_groups_run_the_direct_grouped_kernel(backend, rng):
    x, w, b = _conv_inputs(rng, np.float32, (6, 9, 3, 3, 1, 0, 1))
    np.testing.assert_array_equal(
        fc.grouped_conv2d(x, w, b, 2, (1, 0, 1, 0), None, 3, 2),
        fc.conv2d(x, w, b, 2, (1, 0, 1, 0), groups=3, dilation=2),
    )


@pytest.mark.parametrize(("C", "groups"), [(24, 24), (32, 8), (64, 2)])
def test_grouped_kernels_on_model_shapes(C, groups, rng):
    """MobileNet (depthwise), ResNeXt-like (4 channels a group) and 32 a group (a GEMM per
    group); stride 1 and 2, 3x3, pad 1, above the serial threshold (the parallel path)."""
    for stride in (1, 2):
        x = rng.standard_normal((3, C, 20, 20)).astype(np.float32)
        w = rng.standard_normal((C, C // groups, 3, 3)).astype(np.float32)
        kw = {"stride": stride, "pad": 1, "groups": groups}
        y = fc.conv2d(x, w, **kw)
        k = w[0].size
        assert_close(y, ref.conv2d(x, w, **kw), np.float32, k)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        got = fc.conv2d_backward(dy, x, w, **kw)
        want = ref.conv2d_backward(dy, x, w, **kw)
        terms = (k * C // groups, 3 * y[0, 0].size, 3 * y[0, 0].size)
        for a, e, t in zip(got, want, terms, strict=True):
            assert_close(a, e, np.float32, t)


@pytest.mark.parametrize("dilation", [2, (3, 2)])
def test_dilated_stride_one_goes_through_the_phases(backend, dilation, dtype, rng):
    """Space-to-batch (the input's dilation phases as a batch) against the reference, with
    groups too large for the direct kernel, asymmetric pads and a size not a multiple."""
    x = rng.standard_normal((2, 34, 11, 9)).astype(dtype)
    w = (rng.standard_normal((34, 17, 3, 3)) / 9).astype(dtype)
    kw = {"stride": 1, "pad": (2, 1, 0, 3), "groups": 2, "dilation": dilation}
    y = fc.conv2d(x, w, activation="relu", **kw)
    assert_close(y, ref.conv2d(x, w, activation="relu", **kw), dtype, 153)
    dy = rng.standard_normal(y.shape).astype(dtype)
    got = fc.conv2d_backward(dy, x, w, **kw)
    want = ref.conv2d_backward(dy, x, w, **kw)
    for a, e, t in zip(got, want, (153 * 17, 2 * y[0, 0].size, 2 * y[0, 0].size), strict=True):
        assert_close(a, e, dtype, t)


# --- pooling ------------------------------------------------------------------------------------

POOLS = [  # (size, stride, pad, count_include_pad)
    (2, 2, (0, 1, 0, 1), True),
    (2, 2, (0, 1, 0, 1), False),
    (3, 2, (1, 1, 0, 1), False),
    (3, 1, 1, False),
    (3, (1, 2), (0, 1, 1, 1), True),
]


@pytest.mark.parametrize("case", POOLS, ids=str)
def test_asymmetric_pooling_matches_the_reference(backend, case, dtype, rng):
    size, stride, pad, include = case
    x = rng.standard_normal((2, 3, 7, 6)).astype(dtype)
    y = fc.max_pool2d(x, size, stride, pad)
    np.testing.assert_array_equal(y, ref.max_pool2d(x, size, stride, pad).astype(dtype))
    dy = rng.standard_normal(y.shape).astype(dtype)
    # overlapping windows add gradients: rounded sums of up to 4 terms
    assert_close(fc.max_pool2d_backward(dy, x, size, stride, pad),
                 ref.max_pool2d_backward(dy, x, size, stride, pad), dtype, 4)  # fmt: skip
    a = fc.avg_pool2d(x, size, stride, pad, count_include_pad=include)
    assert_close(a, ref.avg_pool2d(x, size, stride, pad, count_include_pad=include), dtype, 9)
    dy = rng.standard_normal(a.shape).astype(dtype)
    got = fc.avg_pool2d_backward(dy, x.shape, size, stride, pad, count_include_pad=include)
    want = ref.avg_pool2d_backward(dy, x.shape, size, stride, pad, count_include_pad=include)
    assert_close(got, want, dtype, 9)


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_average_without_padding_matches_pytorch(torch, ceil_mode, rng):
    x = rng.standard_normal((2, 3, 7, 6))
    t = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.avg_pool2d(t, 3, 2, 1, ceil_mode=ceil_mode, count_include_pad=False)
    ours = ref.avg_pool2d(x, 3, 2, 1, ceil_mode, count_include_pad=False)
    np.testing.assert_allclose(ours, ty.detach().numpy(), rtol=1e-12)
    dy = rng.standard_normal(ours.shape)
    ty.backward(torch.tensor(dy))
    got = ref.avg_pool2d_backward(dy, x.shape, 3, 2, 1, ceil_mode, count_include_pad=False)
    np.testing.assert_allclose(got, t.grad.numpy(), rtol=1e-12)
    y32 = fc.avg_pool2d(x.astype(np.float32), 3, 2, 1, ceil_mode, count_include_pad=False)
    assert_close(y32, ty.detach().numpy(), np.float32, 9)


def test_asymmetric_pooling_reference_matches_pytorch_padding(torch, rng):
    """PyTorch has no asymmetric pooling: pad explicitly (-inf for max), then pool."""
    x = rng.standard_normal((2, 3, 7, 6))
    t = torch.nn.functional.pad(torch.tensor(x), (1, 0, 0, 1), value=-float("inf"))
    want = torch.nn.functional.max_pool2d(t, 2, 2).numpy()
    np.testing.assert_array_equal(ref.max_pool2d(x, 2, 2, (0, 1, 1, 0)), want)
    t = torch.nn.functional.pad(torch.tensor(x), (1, 0, 0, 1))
    want = torch.nn.functional.avg_pool2d(t, 2, 2).numpy()
    np.testing.assert_allclose(ref.avg_pool2d(x, 2, 2, (0, 1, 1, 0)), want, rtol=1e-12)


# --- bad input ----------------------------------------------------------------------------------


def _bad_calls():
    x = np.zeros((2, 4, 6, 6), np.float32)
    w = np.zeros((4, 2, 3, 3), np.float32)
    V, T = ValueError, TypeError
    yield "groups-divide", lambda: fc.conv2d(x, w, groups=3), V, "groups must divide"
    yield "groups-zero", lambda: fc.conv2d(x, w, groups=0), V, "groups must be >= 1"
    yield "groups-float", lambda: fc.conv2d(x, w, groups=2.0), T, "groups must be an int"
    yield "groups-w", lambda: fc.conv2d(x, w, groups=4), V, r"w must have 1 input channels"
    yield "dilation-zero", lambda: fc.conv2d(x, w, groups=2, dilation=0), V, "dilation must be"
    yield "dilation-big", lambda: fc.conv2d(x, w, groups=2, dilation=4), V, "exceeds the padded"
    yield "pad-float", lambda: fc.conv2d(x, w, pad=1.5, groups=2), T, "pad must be an int"
    yield "pad-triple", lambda: fc.conv2d(x, w, pad=(1, 1, 1), groups=2), V, "pad must be an int"
    yield "pad-negative", lambda: fc.conv2d(x, w, pad=(0, -1, 0, 0), groups=2), V, r"pad\[1\]"
    yield "grouped-w", lambda: fc.grouped_conv2d(x, w, groups=4), V, "w must have 1 input channels"
    w1 = np.zeros((4, 1, 3, 3), np.float32)
    wino = lambda: fc.conv2d(x, w1, groups=4, algorithm="winograd")  # noqa: E731
    yield "grouped-algorithm", wino, V, "direct grouped"
    yield "maxpool-pad", lambda: fc.max_pool2d(x, 2, 2, (0, 2, 0, 0)), V, "at most half"
    yield "avgpool-pad", lambda: fc.avg_pool2d(x, 2, 2, (2, 0, 0, 0), count_include_pad=False), \
        V, "at most half"  # fmt: skip
    yield "pool-ceil-asym", lambda: fc.max_pool2d(x, 2, 2, (0, 1, 0, 1), True), V, "ceil_mode"
    yield "count_include_pad", lambda: fc.avg_pool2d(x, 2, count_include_pad=1), T, \
        "count_include_pad must be a bool"  # fmt: skip


BAD = list(_bad_calls())


@pytest.mark.parametrize(("call", "error", "message"), [c[1:] for c in BAD],
                         ids=[c[0] for c in BAD])  # fmt: skip
def test_bad_arguments_are_refused_before_any_kernel(backend, call, error, message):
    with pytest.raises(error, match=message):
        call()


# --- conformance cases (tests/kernels/op_cases.py; run by test_kernel_interface.py) -------------


def _grouped_inputs(rng, dt, n):
    r = op_cases.normal
    return r(rng, (n, 4, 7, 6), dt), r(rng, (6, 2, 3, 3), dt), r(rng, (6,), dt)


op_cases.register(
    "grouped_conv2d",
    lambda x, w, b: fc.grouped_conv2d(x, w, b, 2, (0, 1, 1, 0), "relu", 2, (1, 2)),
    lambda x, w, b: ref.grouped_conv2d(x, w, b, 2, (0, 1, 1, 0), "relu", 2, (1, 2)),
    _grouped_inputs,
    terms=18,
    refusals=[
        (lambda x, w, b: fc.grouped_conv2d(x, w, b, groups=3), ValueError, "groups must divide")
    ],  # fmt: skip
)
op_cases.register(
    "grouped_conv2d_backward",
    lambda x, w, b: fc.grouped_conv2d_backward(x[:, ::-1].copy(), x, w[:4], 1, 1, True, 2),
    lambda x, w, b: ref.grouped_conv2d_backward(x[:, ::-1].copy(), x, w[:4], 1, 1, 2),
    _grouped_inputs,
    terms=100,
    refusals=[
        (
            lambda x, w, b: fc.grouped_conv2d_backward(x, x, w[:4], 2, groups=2),
            ValueError,
            "dy must have shape",
        )
    ],  # fmt: skip
)


# 3x3 stride-2 grouped forward on four phase planes (cpu/grouped.py): odd and even sizes,
# every pad parity (asymmetric included), depthwise and groups of 3, serial and parallel
S2K3_CASES = [
    (2, 4, 9, 4, 4, (1, 1, 1, 1)),
    (1, 6, 8, 6, 6, (0, 1, 0, 1)),
    (3, 6, 7, 12, 2, (1, 0, 1, 0)),
    (2, 8, 12, 8, 8, (0, 0, 0, 0)),
    (1, 3, 3, 3, 3, (1, 1, 0, 1)),
    (4, 48, 31, 48, 48, (1, 1, 1, 1)),
]


@pytest.mark.parametrize("case", S2K3_CASES, ids=str)
def test_stride_two_3x3_grouped_forward_on_phase_planes(backend, case, dtype, rng):
    N, C, H, F, groups, pads = case
    x = rng.standard_normal((N, C, H, H + 1)).astype(dtype)
    w = rng.standard_normal((F, C // groups, 3, 3)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    x[0, 0, 1, 1] = np.nan  # reaches exactly the outputs whose windows hold it
    for act in (None, "relu"):
        y = fc.grouped_conv2d(x, w, b, 2, pads, act, groups)
        want = ref.grouped_conv2d(x, w, b, 2, pads, act, groups)
        assert y.shape == want.shape
        assert np.array_equal(np.isnan(y), np.isnan(want))
        finite = ~np.isnan(want)
        assert_close(y[finite], want[finite], dtype, 9 * C // groups)
