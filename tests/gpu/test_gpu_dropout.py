"""GPU dropout: the Philox4x32-10 ``dropout`` kernel (emulated) and the layers that use it.

The kernel is held bit for bit to its NumPy twin (:mod:`fastconv.gpu._random`), and the twin
to Random123's known-answer vectors. On the stand-in CuPy, the model stack's dropout must build
no generator at all per call (the old path built a CuPy generator, i.e. a cuRAND state per
thread, on every forward call), follow the model's seed, and differ from step to step.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fastconv.gpu import _random
from fastconv_testing import emulation as emu

pytestmark = [
    pytest.mark.gpu_emulation,
    pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to emulate CUDA"),
]

DTYPES = (np.float32, np.float16)

# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter[4], key[2] -> out[4].
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.fixture(scope="module")
def lib():
    return emu.build_library()


@pytest.fixture(params=[2, None], ids=["grid<n", "grid>=n"])
def ops(lib, request):
    return emu.emulated_ops(emu.EmulatedLauncher(lib, max_blocks=request.param))


@pytest.mark.parametrize("counter, key, want", KAT)
def test_numpy_twin_matches_random123_known_answers(counter, key, want):
    got = _random.philox4x32_10([np.array([w], np.uint32) for w in counter], key)[:, 0]
    assert [int(v) for v in got] == list(want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 4, 5, 1027, 5000])
@pytest.mark.parametrize("key", [(0, 0), (12345, 2**31 - 1), (2**31 - 1, 7)])
def test_kernel_equals_the_numpy_twin_bit_for_bit(ops, dtype, n, key):
    """Sizes not a multiple of 4 (the last Philox group is partial), grids smaller than the
    number of groups (grid-stride loop) and keys with the top bit of a 31-bit word set."""
    x = np.random.default_rng(n).standard_normal(n).astype(dtype)
    got = ops.dropout(x, key, 0.3)
    want = _random.dropout_reference(x, key, 0.3)
    assert got.dtype == x.dtype
    bits = np.uint16 if dtype == np.float16 else np.uint32  # NaN-proof, -0.0 distinct
    np.testing.assert_array_equal(got.view(bits), want.view(bits))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_mask_keeps_the_right_share_and_scales_survivors(ops, dtype, rate):
    n = 40_000
    x = np.ones(n, dtype)
    y = ops.dropout(x, (99, 3), rate).astype(np.float64)
    keep = 1 - rate
    kept = y != 0
    # Binomial(n, keep): 5 standard deviations is a 1-in-1.7-million false alarm.
    assert abs(kept.mean() - keep) <= 5 * np.sqrt(keep * rate / n)
    assert (y[kept] == float(dtype(1 / np.float32(keep)))).all()


def test_nan_survives_a_dropped_unit_as_on_the_cpu(ops):
    """A product, not a select: NaN * 0 is NaN (the CPU path computes x * mask too)."""
    x = np.full(64, np.nan, np.float32)
    assert np.isnan(ops.dropout(x, (1, 2), 0.5)).all()


def test_keys_select_independent_masks(ops):
    x = np.ones(4096, np.float32)
    a, b = ops.dropout(x, (5, 0), 0.5), ops.dropout(x, (6, 0), 0.5)
    np.testing.assert_array_equal(a, ops.dropout(x, (5, 0), 0.5))
    agree = ((a != 0) == (b != 0)).mean()
    assert 0.45 < agree < 0.55  # independent fair coins agree half the time


def test_draw_key_takes_62_bits_from_the_generator():
    rng = np.random.default_rng(3)
    k0, k1 = _random.draw_key(rng)
    k = int(np.random.default_rng(3).integers(0, 1 << 62))
    assert (k0, k1) == (k & (2**31 - 1), k >> 31) and 0 <= k0 < 2**31 and 0 <= k1 < 2**31


# --- the model stack on the stand-in CuPy ------------------------------------------------------


@pytest.fixture
def cupy():
    from fastconv_testing import cupy_standin as _standin

    with _standin.activated() as cp:
        yield cp


def _net(seed):
    from fastconv.nn import Adam, Dense, DropConnectDense, Dropout, Flatten, Sequential

    model = Sequential(
        [Flatten(), Dense(16, activation="relu"), Dropout(0.5), DropConnectDense(8, rate=0.3),
         Dropout(0.25), Dense(3)],
        seed=seed,
    )  # fmt: skip
    model.compile(Adam(lr=1e-2), "softmax_cross_entropy")
    model.build((1, 4, 4))
    return model


def test_no_generator_is_built_per_forward_call(cupy, monkeypatch):
    """Every CuPy generator the stand-in makes goes through _Generator.__init__ (default_rng,
    Generator, seed): count them over several training steps. The dropout kernel must run
    instead, forward and backward, for both layers that drop."""
    from fastconv_testing import cupy_standin as _standin

    built = []
    original = _standin._Generator.__init__

    def counting(self, *args, **kwargs):
        built.append(args)
        original(self, *args, **kwargs)

    monkeypatch.setattr(_standin._Generator, "__init__", counting)
    model = _net(seed=0).to("gpu")
    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.standard_normal((6, 1, 4, 4)).astype(np.float32))
    y = cupy.asarray(rng.integers(0, 3, 6))
    _standin.stats.launches.clear()
    steps = 4
    for _ in range(steps):
        model.train_on_batch(x, y)
    assert built == []
    dropout_launches = [k for k, *_ in _standin.stats.launches if k == "dropout"]
    # Dropout x2 (forward + backward), DropConnectDense (W forward + dW backward), per step.
    assert len(dropout_launches) == steps * 6


def test_masks_follow_the_seed_and_change_every_step(cupy):
    from fastconv.nn import Dropout

    x = cupy.asarray(np.random.default_rng(1).standard_normal((8, 50)).astype(np.float32))

    def two_steps(seed):
        layer = Dropout(0.5)
        layer.rng = np.random.default_rng(seed)
        return [layer.call(x, training=True)[0].get() for _ in range(2)]

    a1, a2 = two_steps(7)
    b1, b2 = two_steps(7)
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)
    assert ((a1 == 0) != (a2 == 0)).any()  # a new mask at the next step
    c1, _ = two_steps(8)
    assert ((a1 == 0) != (c1 == 0)).any()
    # The mask is the kernel's for the key the seeded generator draws.
    key = _random.draw_key(np.random.default_rng(7))
    np.testing.assert_array_equal(a1, _random.dropout_reference(x.get(), key, 0.5))


def test_backward_regenerates_the_forward_mask(cupy):
    from fastconv.nn import Dropout

    layer = Dropout(0.4)
    layer.rng = np.random.default_rng(2)
    x = cupy.asarray(np.random.default_rng(2).uniform(1, 2, (5, 64)).astype(np.float16))
    y, cache = layer.call(x, training=True)
    dy = cupy.ones(x.shape, dtype=np.float16)
    dx, _ = layer.call_backward(cache, dy)
    scale = np.float16(1 / np.float32(0.6))
    np.testing.assert_array_equal(dx.get(), np.where(y.get() != 0, scale, 0).astype(np.float16))


def test_cpu_dropout_is_unchanged():
    """The CPU path still draws float32 uniforms from the model's generator and multiplies by
    the same mask as before the GPU kernel existed (saved runs reproduce)."""
    from fastconv.nn import Dropout

    x = np.random.default_rng(4).standard_normal((6, 30)).astype(np.float32)
    layer = Dropout(0.3)
    layer.rng = np.random.default_rng(11)
    y, cache = layer.call(x, training=True)
    u = np.random.default_rng(11).random(x.shape, dtype=np.float32)
    keep = np.float32(0.7)
    want = x * ((u < keep).astype(np.float32) * np.float32(1.0 / keep))
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(layer.call_backward(cache, np.ones_like(x))[0],
                                  (u < keep) * np.float32(1.0 / keep))  # fmt: skip
