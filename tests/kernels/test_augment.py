"""Augmentation kernels and API against independent oracles.

Exact oracles: the identity, ``np.rot90``, ``x[..., ::-1]``, ``np.roll`` on a zero-padded image
and slicing of a padded image. Interpolating transforms against a float64 bilinear sampler
written here from the definition; the blur against a float64 convolution; the CUDA kernels
(compiled by g++ through the host shim) against the Numba kernels, bit for bit.
"""

from __future__ import annotations

import math
import shutil
import threading
import time

import numpy as np
import op_cases
import pytest

from fastconv import augment as A
from fastconv import ops
from fastconv import reference as ref
from fastconv.nn.data import BackgroundBatches, augmented_batches

DTYPES = (np.float32, np.float16)


@pytest.fixture
def x(rng):
    return rng.standard_normal((3, 2, 7, 9)).astype(np.float32)


def padded(x, p):
    return np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))


# --- exact transforms ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_identity_returns_the_input_exactly(rng, dtype):
    x = rng.standard_normal((4, 3, 6, 5)).astype(dtype)
    x[0, 0, 2, 2] = np.nan  # never mixed into a neighbour: weight-0 pixels are not read
    x[1, 1, 0, 0] = np.inf
    y = A.affine(x)
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(A.affine(x, rotation=0.0, scale=1.0, shift=(0, 0)), x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3, -1])
def test_quarter_turns_equal_rot90(rng, dtype, k):
    x = rng.standard_normal((2, 2, 8, 8)).astype(dtype)
    np.testing.assert_array_equal(A.affine(x, rotation=90.0 * k), np.rot90(x, k, axes=(2, 3)))


def test_half_turn_of_a_rectangle_equals_rot90_twice(x):
    np.testing.assert_array_equal(A.affine(x, rotation=180.0), np.rot90(x, 2, axes=(2, 3)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_flip_equals_reversed_columns(rng, dtype):
    x = rng.standard_normal((2, 3, 5, 6)).astype(dtype)
    np.testing.assert_array_equal(A.hflip(x), x[..., ::-1])


@pytest.mark.parametrize("shift", [(2, -1), (-3, 4), (0, 1), (6, 0)])
def test_integer_shift_equals_roll_on_a_padded_image(x, shift):
    p = 8
    want = np.roll(padded(x, p), shift, axis=(2, 3))[:, :, p:-p, p:-p]
    np.testing.assert_array_equal(A.affine(x, shift=shift), want)


def test_per_sample_shifts(x):
    shifts = np.array([[1, 0], [0, -2], [-1, 3]])
    got = A.affine(x, shift=shifts)
    for n in range(3):
        want = np.roll(padded(x[n : n + 1], 4), tuple(shifts[n]), axis=(2, 3))[:, :, 4:-4, 4:-4]
        np.testing.assert_array_equal(got[n : n + 1], want)


def test_crop_equals_slicing_the_padded_image(x):
    offsets = np.array([[0, 0], [3, 5], [6, 2]])
    got = A.crop(x, offsets, (7, 9), padding=3)
    pad = padded(x, 3)
    for n, (t, left) in enumerate(offsets):
        np.testing.assert_array_equal(got[n], pad[n, :, t : t + 7, left : left + 9])
    small = A.crop(x, (1, 2), 4, padding=0)
    np.testing.assert_array_equal(small, x[:, :, 1:5, 2:6])


# --- interpolating transforms against a float64 bilinear sampler -------------------------------


def bilinear_oracle(x, theta, out_hw, flow=None):
    """float64 bilinear sampling from the definition, zero outside the image."""
    N, C, H, W = x.shape
    OH, OW = out_hw
    out = np.zeros((N, C, OH, OW))
    for n in range(N):
        for i in range(OH):
            for j in range(OW):
                sx, sy = theta[n].astype(np.float64) @ np.array([j, i, 1.0])
                if flow is not None:
                    sx += flow[n, 0, i, j]
                    sy += flow[n, 1, i, j]
                x0, y0 = math.floor(sx), math.floor(sy)
                fx, fy = sx - x0, sy - y0
                for dy, wy in ((0, 1 - fy), (1, fy)):
                    for dx, wx in ((0, 1 - fx), (1, fx)):
                        yy, xx = y0 + dy, x0 + dx
                        if 0 <= yy < H and 0 <= xx < W and wx * wy:
                            out[n, :, i, j] += wx * wy * x[n, :, yy, xx]
    return out


def rotation_oracle_point(theta_deg, H, W, i, j):
    """Where output pixel (i, j) samples for a counter-clockwise rotation about the centre."""
    t = math.radians(theta_deg)
    cx, cy = (W - 1) / 2, (H - 1) / 2
    u, v = j - cx, i - cy
    return cx + math.cos(t) * u - math.sin(t) * v, cy + math.sin(t) * u + math.cos(t) * v


def test_rotation_matrix_matches_the_geometric_definition():
    theta = A.affine_matrices(1, (9, 7), rotation=33.0)[0].astype(np.float64)
    for i, j in [(0, 0), (4, 3), (8, 6), (2, 5)]:
        want = rotation_oracle_point(33.0, 9, 7, i, j)
        np.testing.assert_allclose(theta @ [j, i, 1], want, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_general_affine_and_flow_match_the_bilinear_oracle(rng, dtype):
    x = rng.standard_normal((3, 2, 9, 11)).astype(dtype)
    theta = A.affine_matrices(
        3, (9, 11), (8, 10),
        rotation=[-25.0, 7.5, 40.0], scale=[0.8, 1.0, 1.3], shear=[0.0, 10.0, -5.0],
        shift=[[0.5, -1.25], [2.0, 0.0], [-0.3, 0.7]], flip=[False, True, False],
    )  # fmt: skip
    flow = rng.uniform(-1.5, 1.5, (3, 2, 8, 10)).astype(np.float32)
    for f in (None, flow):
        got = ops.warp_bilinear(x, theta, f, out_size=(8, 10))
        want = bilinear_oracle(x.astype(np.float64), theta, (8, 10), f)
        tol = 2e-6 if dtype == np.float32 else 2e-3
        np.testing.assert_allclose(got.astype(np.float64), want, atol=tol * 4, rtol=tol)


def test_scale_enlarges_about_the_centre(rng):
    # A single bright pixel at the centre of a 9x9 image, scaled 2x, spreads to the 3x3 block
    # around the centre with bilinear weights 1, 1/2 and 1/4.
    x = np.zeros((1, 1, 9, 9), np.float32)
    x[0, 0, 4, 4] = 1.0
    y = A.affine(x, scale=2.0)[0, 0]
    np.testing.assert_allclose(y[3:6, 3:6], [[0.25, 0.5, 0.25], [0.5, 1, 0.5], [0.25, 0.5, 0.25]])
    assert y.sum() == pytest.approx(4.0)


def test_gaussian_blur_matches_a_float64_convolution(rng):
    fields = rng.uniform(-1, 1, (4, 9, 13)).astype(np.float32)
    sigma = 1.7
    taps = ops.gaussian_taps(sigma).astype(np.float64)
    r = len(taps) // 2
    want = fields.astype(np.float64)
    for axis in (2, 1):  # rows (along W), then columns
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        p = np.pad(want, pad)
        acc = np.zeros_like(want)
        for k in range(-r, r + 1):
            sl = [slice(None)] * 3
            sl[axis] = slice(r + k, r + k + want.shape[axis])
            acc += taps[k + r] * p[tuple(sl)]
        want = acc
    np.testing.assert_allclose(ops.gaussian_blur(fields, sigma), want, atol=1e-6)
    # the taps themselves: a normalised Gaussian
    t = np.arange(-r, r + 1)
    g = np.exp(-(t**2) / (2 * sigma**2))
    np.testing.assert_allclose(taps, g / g.sum(), rtol=1e-6)


def test_gaussian_blur_matches_scipy_when_installed(rng):
    ndimage = pytest.importorskip("scipy.ndimage")
    fields = rng.uniform(-1, 1, (2, 12, 10)).astype(np.float32)
    # truncate=3: the taps' documented radius ceil(3 * sigma) (scipy's default is 4 sigma).
    want = np.stack([ndimage.gaussian_filter(f.astype(np.float64), 2.0, mode="constant",
                                             truncate=3.0)
                     for f in fields])  # fmt: skip
    np.testing.assert_allclose(ops.gaussian_blur(fields, 2.0), want, atol=1e-6)


# --- random transforms: reproducible, in range ------------------------------------------------


def test_random_transform_is_reproducible_and_parameters_stay_in_range(rng):
    x = rng.random((64, 1, 28, 28), dtype=np.float32)
    t = A.RandomTransform(rotation=15, shift=(2, 3), scale=0.1, shear=5, elastic_alpha=8)
    a = t(x, np.random.default_rng(7))
    b = t(x, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, t(x, np.random.default_rng(8)))
    p = t.draw(1000, (28, 28), np.random.default_rng(0))
    assert np.abs(p["rotation"]).max() <= 15 and np.abs(p["rotation"]).max() > 14
    assert 0.9 <= p["scale"].min() and p["scale"].max() <= 1.1
    assert np.abs(p["shift"][:, 0]).max() <= 2 and np.abs(p["shift"][:, 1]).max() <= 3
    assert np.abs(p["shear"]).max() <= 5
    assert p["noise"].shape == (1000, 2, 28, 28)


def test_random_crop_and_flip_are_exact_copies(rng):
    x = rng.standard_normal((50, 3, 8, 8)).astype(np.float32)
    t = A.RandomTransform(flip=0.5, crop=8, padding=2)
    got = t(x, np.random.default_rng(3))
    p = t.draw(50, (8, 8), np.random.default_rng(3))
    pad = padded(x, 2)
    for n in range(50):
        # the window is taken from the (flipped) content, padded
        top, left = p["offsets"][n]
        src = pad[n, :, :, ::-1] if p["flip"][n] else pad[n]
        np.testing.assert_array_equal(got[n], src[:, top : top + 8, left : left + 8])
    assert 10 < p["flip"].sum() < 40


def test_random_transform_config_round_trip():
    t = A.RandomTransform(rotation=(-5, 20), shift=2, scale=(0.9, 1.2), crop=(6, 7), padding=1)
    assert A.RandomTransform.from_config(t.get_config()).get_config() == t.get_config()


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(rotation=float("nan")), "rotation"),
        (dict(rotation="ten"), "rotation"),
        (dict(rotation=-3), "rotation"),
        (dict(scale=-0.1), "scale"),
        (dict(scale=1.5), "scale"),
        (dict(scale=(-1.0, 1.1)), "scale[0]"),
        (dict(scale=(1.2, 1.1)), "scale"),
        (dict(shift=-1), "shift"),
        (dict(shift=float("inf")), "shift"),
        (dict(shear=(0, 95)), "shear"),
        (dict(flip=1.5), "flip"),
        (dict(padding=-1, crop=4), "padding"),
        (dict(padding=2), "padding"),
        (dict(crop=0), "crop"),
        (dict(elastic_alpha=-1), "elastic_alpha"),
        (dict(elastic_sigma=0), "elastic_sigma"),
    ],
)
def test_random_transform_rejects_bad_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        A.RandomTransform(**kwargs)


def test_deterministic_functions_reject_bad_parameters(x, rng):
    with pytest.raises(ValueError, match="scale"):
        A.affine(x, scale=-1.0)
    with pytest.raises(ValueError, match="scale"):
        A.affine(x, scale=0.0)
    with pytest.raises(ValueError, match="rotation"):
        A.affine(x, rotation=float("nan"))
    with pytest.raises(ValueError, match="rotation"):
        A.affine(x, rotation=[1.0, 2.0])  # 3 samples
    with pytest.raises(ValueError, match="size"):
        A.crop(x, (0, 0), (20, 9), padding=3)  # larger than the padded 13 x 15
    with pytest.raises(ValueError, match="size"):
        A.RandomTransform(crop=16, padding=1)(x, rng)
    with pytest.raises(ValueError, match="offsets"):
        A.crop(x, (7, 0), (7, 9), padding=3)
    with pytest.raises(ValueError, match="alpha"):
        A.elastic(x, -2.0, 4.0, rng)
    with pytest.raises(TypeError, match="rng"):
        A.RandomTransform(rotation=3)(x, 42)
    with pytest.raises(TypeError, match="float64"):
        A.affine(x.astype(np.float64))


def test_warp_validates_before_the_kernel(x):
    theta = A.affine_matrices(3, (7, 9))
    with pytest.raises(ValueError, match="theta"):
        ops.warp_bilinear(x, theta[:2])
    with pytest.raises(TypeError, match="theta"):
        ops.warp_bilinear(x, theta.astype(np.float64))
    with pytest.raises(ValueError, match="flow"):
        ops.warp_bilinear(x, theta, np.zeros((3, 2, 5, 5), np.float32))
    with pytest.raises(ValueError, match="sigma"):
        ops.gaussian_blur(np.zeros((1, 4, 4), np.float32), -1.0)
    with pytest.raises(ValueError, match="fields"):
        ops.gaussian_blur(np.zeros((4, 4), np.float32), 1.0)


# --- CUDA kernels in emulation: the same bits as the Numba kernels ----------------------------


@pytest.mark.gpu_emulation
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to emulate CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_augment_kernels_equal_the_cpu_kernels_in_emulation(rng, dtype):
    from fastconv.cpu import augment as cpu_aug
    from fastconv_testing import emulation as emu

    launcher = emu.EmulatedLauncher(emu.build_library(), block=256, max_blocks=3)
    kops = emu.emulated_ops(launcher)
    x = rng.standard_normal((4, 3, 9, 11)).astype(dtype)
    t = A.RandomTransform(rotation=30, shift=2, scale=0.2, shear=10, flip=0.5, crop=(8, 10),
                          padding=1, elastic_alpha=3, elastic_sigma=2)  # fmt: skip
    p = t.draw(4, (9, 11), np.random.default_rng(5))
    theta = A.affine_matrices(4, (9, 11), (8, 10), p["rotation"], p["scale"], p["shear"],
                              p["shift"], p["flip"])  # fmt: skip
    fields = p["noise"].reshape(8, 8, 10)
    taps = ops.gaussian_taps(2.0)
    flow_gpu = kops.gaussian_blur(fields, taps)
    flow_cpu = cpu_aug.gaussian_blur(fields, taps)
    np.testing.assert_array_equal(flow_gpu, flow_cpu)
    # The templated kernel also instantiates for half planes (not used by ops, which blurs
    # float32 displacement fields): float32 sums of the same half values, one final rounding.
    half = fields.astype(np.float16)
    np.testing.assert_allclose(
        kops.gaussian_blur(half, taps).astype(np.float32),
        cpu_aug.gaussian_blur(half.astype(np.float32), taps),
        rtol=2e-3,
        atol=1e-3,
    )
    flow = flow_cpu.reshape(4, 2, 8, 10)
    for f in (None, flow):
        got = kops.warp_bilinear(x, theta, f, (8, 10))
        want = cpu_aug.warp_bilinear(x, theta, f, (8, 10))
        assert not np.isnan(got.astype(np.float32)).any()  # NaN-poisoned outputs all written
        np.testing.assert_array_equal(got, want)
    assert {k for k, _, _ in launcher.launches} == {"warp_bilinear", "blur_axis"}


# --- background batches -----------------------------------------------------------------------


def test_background_batches_in_order_and_overlapping():
    made = []

    def make(b):
        made.append(b)
        time.sleep(0.01)
        return b * 10

    it = BackgroundBatches(make, 6, depth=2)
    assert list(it) == [0, 10, 20, 30, 40, 50]
    assert made == list(range(6))


def test_background_batches_raise_the_workers_error_and_stop_early():
    def make(b):
        if b == 2:
            raise ValueError("bad batch 2")
        return b

    got = []
    with pytest.raises(ValueError, match="bad batch 2"):
        for item in BackgroundBatches(make, 5):
            got.append(item)
    assert got == [0, 1]
    started = threading.Event()

    def slow(b):
        started.set()
        return b

    loader = BackgroundBatches(slow, 10_000, depth=1)
    assert next(iter(loader)) == 0
    loader.close()  # must return (the worker stops) although 9,999 batches were never taken
    assert not loader._thread.is_alive()


def test_augmented_batches_are_reproducible(rng):
    x = rng.random((30, 1, 8, 8), dtype=np.float32)
    y = np.arange(30)
    order = rng.permutation(30)
    t = A.RandomTransform(rotation=10, shift=1)
    runs = [list(augmented_batches(x, y, order, 8, t, 123, lambda a: a)) for _ in range(2)]
    assert [b[1].tolist() for b in runs[0]] == [order[i : i + 8].tolist() for i in (0, 8, 16, 24)]
    for (xa, _), (xb, _) in zip(*runs, strict=True):
        np.testing.assert_array_equal(xa, xb)
    # the same as augmenting the batches one after the other with one generator
    g = np.random.default_rng(123)
    for b, (xa, _) in enumerate(runs[0]):
        np.testing.assert_array_equal(xa, t(x[order[b * 8 : (b + 1) * 8]], g))


# --- a real GPU (skipped without one) ---------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(
    not __import__("fastconv").gpu_available(), reason="no usable CUDA device (or no CuPy)"
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_augmentation_matches_the_cpu(rng, dtype):
    import cupy

    x = rng.standard_normal((6, 2, 12, 10)).astype(dtype)
    t = A.RandomTransform(rotation=20, shift=2, scale=0.15, shear=5, flip=0.5, crop=(11, 9),
                          padding=1, elastic_alpha=4, elastic_sigma=2)  # fmt: skip
    got = t(cupy.asarray(x), np.random.default_rng(4))
    want = t(x, np.random.default_rng(4))
    assert isinstance(got, cupy.ndarray) and got.dtype == x.dtype
    # Exactly: the kernels compile with -fmad=false (no FMA contraction) and -ftz=true, both
    # mirrored by the g++ emulation, where they give the Numba kernels' bits
    # (test_cuda_augment_kernels_equal_the_cpu_kernels_in_emulation); flushed subnormals, the
    # one pinned CPU/GPU difference, do not arise from values of order 1.
    np.testing.assert_array_equal(cupy.asnumpy(got), want)
    # A quarter turn keeps the image's shape: square planes, as in the CPU test (a 12x10 image
    # here could never equal rot90's 10x12: found by running the device tests on the stand-in).
    xs = np.ascontiguousarray(x[..., :10, :10])
    np.testing.assert_array_equal(cupy.asnumpy(A.affine(cupy.asarray(xs), rotation=90)),
                                  np.rot90(xs, 1, axes=(2, 3)))  # fmt: skip


# --- conformance cases (tests/kernels/op_cases.py; run by test_kernel_interface.py) -------------


def _warp_inputs(rng, dt, n):
    theta = np.array([[0.9, 0.2, 0.3], [-0.1, 1.1, -0.4]]) + 0 * op_cases.normal(
        rng, (n, 1, 1), np.float32
    )
    return op_cases.normal(rng, (n, 2, 6, 8), dt), theta.astype(np.float32)


op_cases.register(
    "warp_bilinear",
    lambda x, t: ops.warp_bilinear(x, t, out_size=(5, 7)),
    lambda x, t: ref.warp_bilinear(x, t, None, (5, 7)),
    _warp_inputs,
    terms=4,
)
op_cases.register(
    "gaussian_blur",
    lambda f: ops.gaussian_blur(f, 1.2),
    lambda f: ref.gaussian_blur(f, ops.gaussian_taps(1.2)),
    # displacement fields: float32 whatever the model's dtype (half planes are refused)
    lambda rng, dt, n: (op_cases.normal(rng, (n, 6, 7), np.float32),),
    terms=98,
)
