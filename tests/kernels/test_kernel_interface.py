"""The kernel interface (fastconv.kernels) walked over every backend: the Numba kernels, the
CUDA kernels (g++ emulation of the same sources, through the GPU backend's KernelOps) and the
float64 reference. Each op of ``OPS`` runs through the public API (validation, contiguity,
empty-batch shortcuts) with the CPU device's kernel set replaced by the backend under test, in
float32 and float16, against the float64 oracle; from several threads at once; on an empty
batch; and with a kernel set that fails on any launch, to show that bad input (generic, and
the op's own refusals) is refused before a kernel is reached.

The cases live with their ops' tests: each test file beside this one registers its ops'
cases in tests/kernels/op_cases.py; ``test_every_op_has_a_case_...`` fails for an op of
``OPS`` without one.
"""

from __future__ import annotations

import threading

import numpy as np
import op_cases
import pytest
from conftest import BACKENDS, assert_close

from fastconv.kernels import OPS, Kernels, missing_ops

op_cases.import_test_modules()
CASES = op_cases.CASES


def test_every_op_has_a_case_and_every_backend_implements_the_interface():
    assert sorted(OPS) == sorted(CASES)
    for make in BACKENDS.values():
        try:
            kernel_set = make()
        except pytest.skip.Exception:
            continue
        assert isinstance(kernel_set, Kernels) and missing_ops(kernel_set) == []


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
    call, oracle, inputs, k, *_ = CASES[op]
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
def test_op_on_an_empty_batch_launches_nothing(op, on, dtype):
    """N = 0 is answered by ops itself, as in PyTorch: the oracle's shapes and values (empty
    arrays, zeros for gradients summed over the batch, NaN for statistics of nothing) in the
    op's dtypes, and no kernel reached."""
    call, oracle, inputs, *_ = CASES[op]
    on(_FAILING)
    args = inputs(np.random.default_rng(7), dtype, 0)
    if op == "gaussian_blur" and dtype == np.float16:
        return  # half planes are refused (test_op_matches_the_oracle_in_each_dtype)
    got = call(*args)
    want = oracle(*args)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert [np.shape(a) for a in got] == [np.shape(b) for b in want]
    for a, b in zip(got, want, strict=True):
        assert isinstance(a, np.ndarray)
        # statistics (1-D float32) stay float32; everything else keeps the input's dtype
        expect = np.float32 if a.ndim == 1 and a.dtype == np.float32 else args[0].dtype
        assert a.dtype == expect, (a.dtype, expect)
        np.testing.assert_array_equal(a, b)  # NaN == NaN here


@pytest.mark.parametrize("op", sorted(CASES))
def test_op_from_four_threads_at_once(op, kernels, on):
    """The same results from four threads calling at once as from one (no shared scratch)."""
    call, _, inputs, *_ = CASES[op]
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
_FAILING = _Failing()


@pytest.mark.parametrize("op", sorted(CASES))
def test_bad_input_is_refused_before_any_kernel(op, on):
    """float64 input, and an input of the wrong rank (a list where any shape is valid)
    raise a TypeError/ValueError naming an argument, in ops, for every op."""
    case = CASES[op]
    on(_FAILING)
    args = case.inputs(np.random.default_rng(7), np.float32, 2)
    with pytest.raises(TypeError, match="float64|dtype"):
        case.call(*(a.astype(np.float64) for a in args))
    if case.any_rank:  # every shape is valid: a list is the bad input there
        with pytest.raises(TypeError, match=r"\w+ must be a numpy.ndarray"):
            case.call(args[0].tolist(), *args[1:])
        return
    with pytest.raises((ValueError, TypeError), match=r"\w+ must"):
        case.call(args[0][None], *args[1:])


_REFUSALS = [(op, i) for op in sorted(CASES) for i in range(len(CASES[op].refusals))]


@pytest.mark.parametrize(("op", "index"), _REFUSALS, ids=[f"{o}-{i}" for o, i in _REFUSALS])
def test_op_refuses_its_own_bad_input_before_any_kernel(op, index, on):
    """The op-specific refusals its case lists (a bad slope, a shape that does not match...)."""
    case = CASES[op]
    bad_call, error, message = case.refusals[index]
    on(_FAILING)
    with pytest.raises(error, match=message):
        bad_call(*case.inputs(np.random.default_rng(7), np.float32, 2))
