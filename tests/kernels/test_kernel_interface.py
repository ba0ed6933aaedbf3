"""The kernel interface (fastconv.kernels) walked over every backend: the Numba kernels, the
CUDA kernels (g++ emulation of the same sources, through the GPU backend's KernelOps) and the
float64 reference. Each op of ``OPS`` runs through the public API (validation, contiguity,
empty-batch shortcuts) with the CPU device's kernel set replaced by the backend under test, in
float32 and float16, against the float64 oracle; from several threads at once; and with a kernel
set that fails on any launch, to show that bad input is refused before a kernel is reached.

A new op needs one entry in ``CASES``; ``test_every_op_has_a_case`` fails until it has one.
"""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
from conftest import assert_close

import fastconv as fc
from fastconv import cpu, device, ops
from fastconv import reference as ref
from fastconv.kernels import OPS, Kernels


def _emulated():
    if shutil.which("g++") is None:
        pytest.skip("g++ is needed to emulate the CUDA kernels")
    from fastconv_testing import emulation as emu

    # A plain NumPy module: the public API's arrays are plain NumPy arrays here.
    return emu.emulated_ops(emu.EmulatedLauncher(emu.build_library()), xp=np)


BACKENDS = {
    "numba": lambda: cpu.KERNELS,
    "cuda-emulated": _emulated,
    "reference": lambda: ref.KERNELS,
}


# The emulated CUDA kernels carry the gpu_emulation marker: the sanitizer run
# (tests/gpu/test_gpu_sanitize.py) selects them, and every kernel of the sources must run there.
@pytest.fixture(
    params=[pytest.param(b, marks=pytest.mark.gpu_emulation) if "cuda" in b else b
            for b in BACKENDS],
    scope="module",
)  # fmt: skip
def kernels(request):
    return BACKENDS[request.param]()


@pytest.fixture
def on(monkeypatch):
    """Run the public API on NumPy arrays with the given kernel set behind the CPU device."""

    def use(kernel_set):
        monkeypatch.setattr(type(device.CPU), "kernels", property(lambda self: kernel_set))

    return use


def _r(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# op -> (call(rng, dtype, N) -> results, oracle(the same inputs) -> float64 results, terms k).
# Each call draws its inputs from rng, so the oracle sees the same ones from a copy of rng.
def _conv_inputs(rng, dtype, n):
    return _r(rng, (n, 3, 7, 6), dtype), _r(rng, (4, 3, 3, 3), dtype), _r(rng, (4,), dtype)


def _bn_inputs(rng, dtype, n):
    x = _r(rng, (n, 3, 4, 5), dtype)
    gamma, beta = _r(rng, (3,), dtype), _r(rng, (3,), dtype)
    mean, var = _r(rng, (3,), np.float32), np.abs(_r(rng, (3,), np.float32)) + 0.5
    return x, gamma, beta, mean, var


def _bn_batch_inputs(rng, dtype, n):
    """As _bn_inputs, with the batch's own statistics (what the training backward takes)."""
    x, gamma, beta, _, _ = _bn_inputs(rng, dtype, n)
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(0, 2, 3)), x64.var(axis=(0, 2, 3))
    return x, gamma, beta, mean.astype(np.float32), var.astype(np.float32)


CASES = {
    "im2col": (
        lambda x: fc.im2col(x, 3, 3, 2, 1),
        lambda x: ref.im2col(x, 3, 3, 2, 1),
        lambda rng, dt, n: (_r(rng, (n, 2, 7, 6), dt),),
        1,
    ),
    "col2im": (
        lambda c: fc.col2im(c, (c.shape[0] // 12, 2, 7, 6), 3, 3, 2, 1),
        lambda c: ref.col2im(c, (c.shape[0] // 12, 2, 7, 6), 3, 3, 2, 1),
        lambda rng, dt, n: (_r(rng, (n * 12, 18), dt),),
        4,
    ),
    "conv2d": (
        lambda x, w, b: fc.conv2d(x, w, b, 1, 1, "relu"),
        lambda x, w, b: ref.conv2d(x, w, b, 1, 1, "relu"),
        _conv_inputs,
        27,
    ),
    "conv2d_backward": (
        lambda dy, x, w: fc.conv2d_backward(dy, x, w, 1, 1),
        lambda dy, x, w: ref.conv2d_backward(dy, x, w, 1, 1),
        lambda rng, dt, n: (_r(rng, (n, 4, 7, 6), dt), *_conv_inputs(rng, dt, n)[:2]),
        200,
    ),
    "max_pool2d": (
        lambda x: fc.max_pool2d(x, 3, 2, 1, ceil_mode=True),
        lambda x: ref.max_pool2d(x, 3, 2, 1, ceil_mode=True),
        lambda rng, dt, n: (_r(rng, (n, 2, 7, 6), dt),),
        1,
    ),
    "max_pool2d_backward": (
        lambda dy, x: fc.max_pool2d_backward(dy, x, 2),
        lambda dy, x: ref.max_pool2d_backward(dy, x, 2),
        lambda rng, dt, n: (_r(rng, (n, 2, 3, 3), dt), _r(rng, (n, 2, 7, 6), dt)),
        1,
    ),
    "avg_pool2d": (
        lambda x: fc.avg_pool2d(x, 3, 1, 1),
        lambda x: ref.avg_pool2d(x, 3, 1, 1),
        lambda rng, dt, n: (_r(rng, (n, 2, 7, 6), dt),),
        9,
    ),
    "avg_pool2d_backward": (
        lambda dy: fc.avg_pool2d_backward(dy, (dy.shape[0], 2, 7, 6), 3, 1, 1),
        lambda dy: ref.avg_pool2d_backward(dy, (dy.shape[0], 2, 7, 6), 3, 1, 1),
        lambda rng, dt, n: (_r(rng, (n, 2, 7, 6), dt),),
        9,
    ),
    "batch_norm_forward": (
        lambda x, ga, be, m, v: fc.batch_norm_forward(x, ga, be, activation="relu"),
        lambda x, ga, be, m, v: ref.batch_norm_forward(x, ga, be, 1e-5, "relu"),
        _bn_inputs,
        100,
    ),
    "batch_norm_inference": (
        lambda x, ga, be, m, v: fc.batch_norm_inference(x, ga, be, m, v, activation="relu"),
        lambda x, ga, be, m, v: ref.batch_norm_inference(x, ga, be, m, v, 1e-5, "relu"),
        _bn_inputs,
        4,
    ),
    "batch_norm_backward": (
        lambda x, ga, be, m, v: fc.batch_norm_backward(x[::-1].copy(), x, ga, m, v),
        lambda x, ga, be, m, v: ref.batch_norm_backward(x[::-1].copy(), x, ga, m, v),
        _bn_batch_inputs,
        100,
    ),
    "batch_norm_inference_backward": (
        lambda x, ga, be, m, v: fc.batch_norm_inference_backward(x, ga, v, y=x[::-1].copy()),
        lambda x, ga, be, m, v: ref.batch_norm_inference_backward(x, ga, v, y=x[::-1].copy()),
        _bn_inputs,
        4,
    ),
    "global_avg_pool2d": (
        fc.global_avg_pool2d,
        ref.global_avg_pool2d,
        lambda rng, dt, n: (_r(rng, (n, 3, 5, 4), dt),),
        20,
    ),
    "global_avg_pool2d_backward": (
        lambda dy: fc.global_avg_pool2d_backward(dy, (dy.shape[0], 3, 5, 4)),
        lambda dy: ref.global_avg_pool2d_backward(dy, (dy.shape[0], 3, 5, 4)),
        lambda rng, dt, n: (_r(rng, (n, 3), dt),),
        1,
    ),
    "dense": (
        lambda x, w, b: fc.dense(x, w, b, "relu"),
        lambda x, w, b: ref.dense(x, w, b, "relu"),
        lambda rng, dt, n: (_r(rng, (n, 13), dt), _r(rng, (13, 7), dt), _r(rng, (7,), dt)),
        13,
    ),
    "dense_backward": (
        fc.dense_backward,
        ref.dense_backward,
        lambda rng, dt, n: (_r(rng, (n, 7), dt), _r(rng, (n, 13), dt), _r(rng, (13, 7), dt)),
        13,
    ),
    "relu": (fc.relu, ref.relu, lambda rng, dt, n: (_r(rng, (n, 3, 4, 4), dt),), 1),
    "relu_backward": (
        fc.relu_backward,
        ref.relu_backward,
        lambda rng, dt, n: (_r(rng, (n, 3, 4, 4), dt), _r(rng, (n, 3, 4, 4), dt)),
        1,
    ),
    "leaky_relu": (
        lambda x: fc.leaky_relu(x, 0.2),
        lambda x: ref.leaky_relu(x, 0.2),
        lambda rng, dt, n: (_r(rng, (n, 3, 4, 4), dt),),
        1,
    ),
    "leaky_relu_backward": (
        lambda dy, x: fc.leaky_relu_backward(dy, x, 0.2),
        lambda dy, x: ref.leaky_relu_backward(dy, x, 0.2),
        lambda rng, dt, n: (_r(rng, (n, 3, 4, 4), dt), _r(rng, (n, 3, 4, 4), dt)),
        1,
    ),
    "warp_bilinear": (
        lambda x, t: ops.warp_bilinear(x, t, out_size=(5, 7)),
        lambda x, t: ref.warp_bilinear(x, t, None, (5, 7)),
        lambda rng, dt, n: (
            _r(rng, (n, 2, 6, 8), dt),
            (np.array([[0.9, 0.2, 0.3], [-0.1, 1.1, -0.4]]) + 0 * _r(rng, (n, 1, 1), np.float32))
            .astype(np.float32),
        ),
        4,
    ),
    "gaussian_blur": (
        lambda f: ops.gaussian_blur(f, 1.2),
        lambda f: ref.gaussian_blur(f, ops.gaussian_taps(1.2)),
        lambda rng, dt, n: (_r(rng, (n, 6, 7), np.float32),),
        98,
    ),
}


def test_every_op_has_a_case_and_every_backend_implements_the_interface():
    assert set(OPS) == set(CASES)
    for make in BACKENDS.values():
        try:
            kernel_set = make()
        except pytest.skip.Exception:
            continue
        assert isinstance(kernel_set, Kernels) and not type(kernel_set).__abstractmethods__


def _compare(got, want, dtype, k):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        # Batch statistics are float32 in every model dtype; everything else keeps the dtype.
        expect = np.float32 if a.ndim == 1 and a.dtype == np.float32 else dtype
        assert_close(a, b, expect, k)


@pytest.mark.parametrize("op", sorted(CASES))
def test_op_matches_the_oracle_in_each_dtype(op, kernels, on, dtype):
    call, oracle, inputs, k = CASES[op]
    on(kernels)
    args = inputs(np.random.default_rng(7), dtype, 3)
    if op == "gaussian_blur" and dtype == np.float16:
        # Displacement fields are float32 only: half planes are refused, not blurred.
        with pytest.raises(TypeError, match="float32"):
            call(args[0].astype(np.float16))
        return
    _compare(call(*args), oracle(*args), dtype, k)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the oracle's statistics of nothing
@pytest.mark.parametrize("op", sorted(CASES))
def test_op_on_an_empty_batch_launches_nothing(op, on):
    """N = 0 is answered by ops itself: shapes right, no kernel reached."""
    call, oracle, inputs, _ = CASES[op]
    on(_FAILING)
    args = inputs(np.random.default_rng(7), np.float32, 0)
    got = call(*args)
    want = oracle(*args)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert [np.shape(a) for a in got] == [np.shape(b) for b in want]


@pytest.mark.parametrize("op", sorted(CASES))
def test_op_from_four_threads_at_once(op, kernels, on):
    """The same results from four threads calling at once as from one (no shared scratch)."""
    call, _, inputs, _ = CASES[op]
    on(kernels)
    args = [inputs(np.random.default_rng(s), np.float32, 4) for s in range(4)]
    alone = [call(*a) for a in args]
    results = [None] * 4
    barrier = threading.Barrier(4)

    def work(i):
        barrier.wait()
        results[i] = call(*args[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(results, alone, strict=True):
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,),
                        strict=True):  # fmt: skip
            np.testing.assert_array_equal(x, y)


class _Failing(Kernels):
    """Every op raises: what validation refuses must never reach a kernel set."""


for _name in OPS:
    setattr(_Failing, _name, lambda self, *a, _n=_name, **k: pytest.fail(f"{_n} was launched"))
_Failing.__abstractmethods__ = frozenset()
_FAILING = _Failing()


@pytest.mark.parametrize("op", sorted(CASES))
def test_bad_input_is_refused_before_any_kernel(op, on):
    """float64 input, and an input of the wrong rank, raise a TypeError/ValueError naming an
    argument, in ops, for every op."""
    call, _, inputs, _ = CASES[op]
    on(_FAILING)
    args = inputs(np.random.default_rng(7), np.float32, 2)
    with pytest.raises(TypeError, match="float64|dtype"):
        call(*(a.astype(np.float64) for a in args))
    if "relu" in op:  # any rank: a list is the bad input there
        with pytest.raises(TypeError, match=r"\w+ must be a numpy.ndarray"):
            call(args[0].tolist(), *args[1:])
        return
    with pytest.raises((ValueError, TypeError), match=r"\w+ must"):
        call(args[0][None], *args[1:])
