"""Fused optimizer updates on the GPU (``kernels/optim.cu``), emulated: one launch per parameter,
bit-identical to the CPU's fused kernels (themselves bit-identical to the array expressions).

Values stay in the normal float32 range: the device flushes subnormals (-ftz=true), the CPU
does not (the pinned difference of docs/gpu.md).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fastconv import ops
from fastconv_testing import emulation as emu

pytestmark = [
    pytest.mark.gpu_emulation,
    pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to emulate CUDA"),
]

SHAPES = [(1,), (7, 3), (64, 3, 5, 5), (1031,)]


@pytest.fixture(scope="module")
def lib():
    return emu.build_library()


@pytest.fixture(params=[2, None], ids=["grid<n", "grid>=n"])
def kops(lib, request):
    return emu.emulated_ops(emu.EmulatedLauncher(lib, max_blocks=request.param))


def _state(rng, shape):
    p = rng.standard_normal(shape).astype(np.float32)
    m = rng.standard_normal(shape).astype(np.float32)
    v = np.abs(rng.standard_normal(shape)).astype(np.float32) + np.float32(1e-3)
    return p, m, v


def _grad(rng, shape, step):
    scale = 10.0 ** ((step % 5) - 2)  # 0.01 .. 100: the update's terms at different magnitudes
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
def test_adam_kernel_is_bit_identical_to_the_cpu(kops, shape):
    rng = np.random.default_rng(1)
    cpu = _state(rng, shape)
    dev = [a.copy() for a in cpu]
    for step in range(1, 5):
        g = _grad(rng, shape, step)
        lr_t = 1e-3 * np.sqrt(1 - 0.999**step) / (1 - 0.9**step)
        ops.adam_update(cpu[0], g, cpu[1], cpu[2], 0.9, 0.999, lr_t, 1e-7)
        c1, c2 = np.float32(1 - 0.9), np.float32(1 - 0.999)
        kops.adam_update(dev[0], g, dev[1], dev[2], c1, c2, np.float32(lr_t), np.float32(1e-7))
        for a, b in zip(dev, cpu, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", SHAPES)
def test_momentum_kernel_is_bit_identical_to_the_cpu(kops, shape):
    rng = np.random.default_rng(2)
    p, v, _ = _state(rng, shape)
    q, w = p.copy(), v.copy()
    for step in range(4):
        g = _grad(rng, shape, step)
        ops.momentum_update(p, g, v, 0.9, 0.01)
        kops.fused_momentum(q, g, w, np.float32(0.9), np.float32(0.01))
        np.testing.assert_array_equal(q, p)
        np.testing.assert_array_equal(w, v)


def test_half_instantiations_update_in_float32_and_round_once(kops):
    """p and g in half, state in float32: the float32 update of the widened values, rounded to
    half once (the optimizer itself passes float32 master weights; this instantiation exists
    as every kernel's does)."""
    rng = np.random.default_rng(3)
    p32, m, v = _state(rng, (300,))
    p = p32.astype(np.float16)
    g = _grad(rng, (300,), 3).astype(np.float16)
    want_p, want_m, want_v = p.astype(np.float32), m.copy(), v.copy()
    ops.adam_update(want_p, g.astype(np.float32), want_m, want_v, 0.9, 0.999, 1e-3, 1e-7)
    # The kernel itself: the optimizers' own path (float32 master weights) never takes half.
    kops.fused_adam(p, g, m, v, np.float32(0.1), np.float32(1 - 0.999), np.float32(1e-3),
                    np.float32(1e-7))  # fmt: skip
    np.testing.assert_array_equal(p, want_p.astype(np.float16))
    np.testing.assert_array_equal(m, want_m)
    np.testing.assert_array_equal(v, want_v)
    q = p32.astype(np.float16)
    w = np.zeros(300, np.float32)
    want_q, want_w = q.astype(np.float32), w.copy()
    ops.momentum_update(want_q, g.astype(np.float32), want_w, 0.9, 0.01)
    kops.fused_momentum(q, g, w, np.float32(0.9), np.float32(0.01))
    np.testing.assert_array_equal(q, want_q.astype(np.float16))
    np.testing.assert_array_equal(w, want_w)


@pytest.fixture
def cupy():
    from fastconv_testing import cupy_standin as _standin

    with _standin.activated() as cp:
        yield cp


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Momentum"])
def test_optimizers_take_one_launch_per_parameter_and_match_the_cpu(cupy, name):
    """Through the public optimizer on the stand-in CuPy: each parameter costs exactly one
    fused launch per step (no elementwise temporaries), with the CPU's bits."""
    from fastconv.nn import optimizers
    from fastconv_testing import cupy_standin as _standin

    rng = np.random.default_rng(4)
    shapes = [(16, 3, 3, 3), (16,), (40, 10)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    dev_params = [cupy.asarray(p) for p in params]
    cpu_opt, dev_opt = getattr(optimizers, name)(lr=1e-2), getattr(optimizers, name)(lr=1e-2)
    kernel = "momentum_update" if name == "Momentum" else "adam_update"
    for step in range(3):
        grads = [_grad(rng, s, step) for s in shapes]
        _standin.stats.launches.clear()
        dev_opt.step(dev_params, [cupy.asarray(g) for g in grads])
        cpu_opt.step(params, grads)
        launched = [k for k, *_ in _standin.stats.launches]
        assert launched == [kernel] * len(shapes)
        for d, c in zip(dev_params, params, strict=True):
            np.testing.assert_array_equal(d.get(), c)


def test_non_contiguous_parameters_fall_back_to_the_expressions(cupy):
    from fastconv_testing import cupy_standin as _standin

    rng = np.random.default_rng(5)
    base = rng.standard_normal((6, 8)).astype(np.float32)
    p = cupy.asarray(base).T  # a transposed view: the kernel's flat indexing would be wrong
    g = cupy.asarray(rng.standard_normal((8, 6)).astype(np.float32))
    m, v = cupy.zeros((8, 6), np.float32), cupy.zeros((8, 6), np.float32)
    _standin.stats.launches.clear()
    ops.adam_update(p, g, m, v, 0.9, 0.999, 1e-3, 1e-7)
    assert not [k for k, *_ in _standin.stats.launches if k == "adam_update"]
    want_p = base.T.copy()
    want_m, want_v = np.zeros((8, 6), np.float32), np.zeros((8, 6), np.float32)
    ops.adam_update(want_p, g.get(), want_m, want_v, 0.9, 0.999, 1e-3, 1e-7)
    np.testing.assert_array_equal(p.get(), want_p)
