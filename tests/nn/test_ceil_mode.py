"""``ceil_mode`` pooling (GoogLeNet's pools): output sizes, CPU kernels and the CUDA sources
(through the g++ emulation) against the float64 reference, and the reference against PyTorch."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import assert_close

import fastconv as fc
from fastconv import _checks as chk
from fastconv import ops
from fastconv import reference as ref

# shape, size, stride, pad: each has a last window running past the bottom/right edge
CEIL_CASES = [
    ((2, 3, 8, 8), 3, 2, 0),  # GoogLeNet's 3x3/2 pool on an even size: 4 windows, not 3
    ((2, 2, 7, 9), 2, 2, 0),  # 2x2/2 on odd sizes: must not take the unclipped 2x2 fast path
    ((1, 2, 10, 6), 3, 2, 1),  # padded: the overhang is past the padding
    ((1, 1, 5, 7), (3, 2), (2, 3), (1, 0)),  # non-square
    ((1, 2, 6, 6), 3, 1, 1),  # stride 1: ceil changes nothing (GoogLeNet's branch pools)
]


def torch_out(n, k, s, p):
    # PyTorch's pooling_output_shape with ceil_mode=True, written out independently.
    out = int(np.ceil((n + 2 * p - k) / s)) + 1
    return out - 1 if (out - 1) * s >= n + p else out


@pytest.mark.parametrize("n", range(3, 30))
@pytest.mark.parametrize("k,s,p", [(3, 2, 0), (2, 2, 0), (3, 2, 1), (3, 3, 1), (5, 4, 2)])
def test_output_size_is_pytorchs(n, k, s, p):
    g = chk.window_geometry((1, 1, n, n), (k, k), s, p, "window", ceil_mode=True)
    assert g.OH == g.OW == torch_out(n, k, s, p)
    floor = chk.window_geometry((1, 1, n, n), (k, k), s, p, "window")
    assert g.OH - floor.OH in (0, 1)
    # Every window starts inside the input or its leading padding: none is empty.
    assert (g.OH - 1) * s - p < n


@pytest.mark.parametrize("shape,size,stride,pad", CEIL_CASES)
def test_cpu_kernels_match_the_reference(dtype, shape, size, stride, pad):
    rng = np.random.default_rng(3)
    # Small integers: ties are common, so the first-maximum routing is checked too.
    x = rng.integers(-3, 4, size=shape).astype(dtype)
    y = ops.max_pool2d(x, size, stride, pad, ceil_mode=True)
    want = ref.max_pool2d(x, size, stride, pad, ceil_mode=True)
    floor = ref.max_pool2d(x, size, stride, pad)
    assert y.dtype == dtype and y.shape == want.shape
    if stride != 1:
        assert want.shape[2:] > floor.shape[2:] or want.shape[3] > floor.shape[3]
    np.testing.assert_array_equal(y, want)
    dy = rng.integers(1, 5, size=y.shape).astype(dtype)
    np.testing.assert_array_equal(
        ops.max_pool2d_backward(dy, x, size, stride, pad, ceil_mode=True),
        ref.max_pool2d_backward(dy, x, size, stride, pad, ceil_mode=True),
    )
    xf = rng.standard_normal(shape).astype(dtype)
    a = ops.avg_pool2d(xf, size, stride, pad, ceil_mode=True)
    assert_close(a, ref.avg_pool2d(xf, size, stride, pad, ceil_mode=True), dtype, k=9)
    dyf = rng.standard_normal(a.shape).astype(dtype)
    assert_close(
        ops.avg_pool2d_backward(dyf, shape, size, stride, pad, ceil_mode=True),
        ref.avg_pool2d_backward(dyf, shape, size, stride, pad, ceil_mode=True),
        dtype,
        k=9,
    )


def test_overhanging_window_is_clipped_and_averaged_over_its_inside():
    x = np.arange(1, 26, dtype=np.float32).reshape(1, 1, 5, 5)
    # 2x2/2 on 5x5: the third window of each row/column holds only the last row/column.
    y = ops.max_pool2d(x, 2, 2, 0, ceil_mode=True)
    assert y.shape == (1, 1, 3, 3)
    assert y[0, 0, 2, 2] == 25 and y[0, 0, 0, 2] == 10
    a = ops.avg_pool2d(x, 2, 2, 0, ceil_mode=True)
    assert a[0, 0, 2, 2] == 25  # one cell inside: divisor 1, not 4
    assert a[0, 0, 0, 2] == (5 + 10) / 2


def test_default_is_floor_and_bad_ceil_mode_is_a_type_error():
    x = np.zeros((1, 1, 8, 8), np.float32)
    assert ops.max_pool2d(x, 3, 2).shape == (1, 1, 3, 3)
    assert ops.max_pool2d(x, 3, 2, ceil_mode=True).shape == (1, 1, 4, 4)
    for bad in (1, "yes", None):
        with pytest.raises(TypeError, match="ceil_mode must be a bool"):
            ops.max_pool2d(x, 3, 2, ceil_mode=bad)
        with pytest.raises(TypeError, match="ceil_mode must be a bool"):
            ops.avg_pool2d_backward(np.zeros((1, 1, 4, 4), np.float32), x.shape, 3, 2, 0, bad)
    # The gradient's shape is checked against the ceil-mode output size.
    with pytest.raises(ValueError, match=r"dy must have shape \(1, 1, 4, 4\)"):
        ops.max_pool2d_backward(np.zeros((1, 1, 3, 3), np.float32), x, 3, 2, ceil_mode=True)


@pytest.mark.parametrize("shape,size,stride,pad", CEIL_CASES)
def test_reference_matches_pytorch(torch, shape, size, stride, pad):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape)
    tx = torch.tensor(x, requires_grad=True)
    for name in ("max", "avg"):
        fn = getattr(torch.nn.functional, f"{name}_pool2d")
        ty = fn(tx, size, stride, pad, ceil_mode=True)
        dy = rng.standard_normal(tuple(ty.shape))
        (gx,) = torch.autograd.grad(ty, tx, torch.tensor(dy))
        want_y = getattr(ref, f"{name}_pool2d")(x, size, stride, pad, ceil_mode=True)
        if name == "max":
            want_dx = ref.max_pool2d_backward(dy, x, size, stride, pad, ceil_mode=True)
        else:
            want_dx = ref.avg_pool2d_backward(dy, shape, size, stride, pad, ceil_mode=True)
        np.testing.assert_allclose(want_y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(want_dx, gx.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to emulate CUDA")
@pytest.mark.parametrize("shape,size,stride,pad", CEIL_CASES)
def test_cuda_sources_in_ceil_mode(shape, size, stride, pad):
    from fastconv_testing import emulation as emu

    gops = emu.emulated_ops(emu.EmulatedLauncher(emu.build_library(), block=256, max_blocks=3))
    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float16):
        x = rng.integers(-3, 4, size=shape).astype(dtype)
        g = chk.validate_pool(x, size, stride, pad, max_pool=True, ceil_mode=True)
        np.testing.assert_array_equal(
            gops.max_pool2d(x, g), ref.max_pool2d(x, size, stride, pad, ceil_mode=True)
        )
        dy = rng.integers(1, 5, size=(g.N, g.C, g.OH, g.OW)).astype(dtype)
        np.testing.assert_array_equal(
            gops.max_pool2d_backward(dy, x, g),
            ref.max_pool2d_backward(dy, x, size, stride, pad, ceil_mode=True),
        )
        xf = rng.standard_normal(shape).astype(dtype)
        assert_close(gops.avg_pool2d(xf, g), ref.avg_pool2d(xf, size, stride, pad, True), dtype, 9)
        dyf = rng.standard_normal((g.N, g.C, g.OH, g.OW)).astype(dtype)
        want = ref.avg_pool2d_backward(dyf, shape, size, stride, pad, ceil_mode=True)
        assert_close(gops.avg_pool2d_backward(dyf, g), want, dtype, 9)


def test_public_names_unchanged():
    # ceil_mode is an addition: positional calls written before it keep their meaning.
    x = np.random.default_rng(0).standard_normal((1, 1, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(fc.max_pool2d(x, 3, 2, 1), ref.max_pool2d(x, 3, 2, 1))
