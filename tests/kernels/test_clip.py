"""clip (ReLU6's kernel) end to end: bit-equal to PyTorch's clamp/hardtanh and its autograd in
float32 and float16, the special values and ``out`` on every backend (the ``backend``
fixture), validation, and the op's conformance cases (registered at the end, run over every
backend by test_kernel_interface.py). The ReLU6 layer's own tests are in
tests/nn/test_conv_layers.py."""

from __future__ import annotations

import numpy as np
import op_cases
import pytest

import fastconv as fc
from fastconv import reference as ref

SPECIAL = np.array([-np.inf, -3.5, -0.0, 0.0, 1e-3, 2.5, 6.0, 6.5, np.inf, np.nan], np.float32)


@pytest.mark.parametrize(("lo", "hi"), [(0.0, 6.0), (-1.5, 0.25), (0.1, 0.1)])
def test_matches_pytorch_bit_for_bit(torch, lo, hi, dtype):
    rng = np.random.default_rng(2)
    x = np.concatenate([SPECIAL, rng.standard_normal(200).astype(np.float32) * 4]).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    t = torch.from_numpy(x.astype(np.float32)).requires_grad_()
    ty = torch.nn.functional.hardtanh(t, lo, hi)
    ty.backward(torch.from_numpy(dy.astype(np.float32)))
    # PyTorch in float32, rounded once to the dtype: what the kernels give for half too.
    np.testing.assert_array_equal(fc.clip(x, lo, hi), ty.detach().numpy().astype(dtype))
    # PyTorch's gradient at a NaN input depends on where it sits (its vectorised loop gives 0,
    # its scalar tail dy): compared elsewhere; ours is 0 (test_special_values...).
    real = ~np.isnan(x)
    np.testing.assert_array_equal(fc.clip_backward(dy, x, lo, hi)[real],
                                  t.grad.numpy().astype(dtype)[real])  # fmt: skip


def test_relu6_is_the_default(torch):
    x = SPECIAL.copy()
    want = torch.nn.functional.relu6(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(fc.clip(x), want)


def test_special_values_against_the_reference(backend, dtype):
    x = SPECIAL.astype(dtype)
    y = fc.clip(x, 0.0, 6.0)
    np.testing.assert_array_equal(y, ref.clip(x, 0.0, 6.0).astype(dtype))
    assert np.signbit(y[2]) and np.isnan(y[-1])  # -0.0 kept (not below 0), NaN propagates
    dy = np.ones_like(x)
    # zero at and beyond the kinks and for NaN, one strictly inside
    np.testing.assert_array_equal(fc.clip_backward(dy, x, 0.0, 6.0),
                                  [0, 0, 0, 0, 1, 1, 0, 0, 0, 0])  # fmt: skip


def test_backward_writes_into_out(backend):
    x = np.linspace(-2, 8, 12, dtype=np.float32).reshape(3, 4)
    out = np.empty_like(x)
    assert fc.clip_backward(np.ones_like(x), x, 0.0, 6.0, out=out) is out
    np.testing.assert_array_equal(out, ((x > 0) & (x < 6)).astype(np.float32))


@pytest.mark.parametrize(
    ("lo", "hi", "error", "message"),
    [(1.0, 0.0, ValueError, "lo must be at most hi"), ("0", 6.0, TypeError, "lo must be a real"),
     (0.0, np.inf, ValueError, "hi must be finite"), (0.0, 1e39, ValueError, "float32")],
)  # fmt: skip
def test_bad_bounds_are_refused(lo, hi, error, message):
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(error, match=message):
        fc.clip(x, lo, hi)
    with pytest.raises(error, match=message):
        fc.clip_backward(x, x, lo, hi)


# --- conformance cases (tests/kernels/op_cases.py; run by test_kernel_interface.py) -------------


def _planes(rng, dt, n):
    return (op_cases.normal(rng, (n, 3, 4, 4), dt),)


op_cases.register(
    "clip",
    lambda x: fc.clip(x, -0.5, 0.75),
    lambda x: ref.clip(x, -0.5, 0.75),
    _planes,
    refusals=[(lambda x: fc.clip(x, 1.0, -1.0), ValueError, "lo must be at most hi")],
    any_rank=True,
)
op_cases.register(
    "clip_backward",
    lambda dy, x: fc.clip_backward(dy, x, -0.5, 0.75),
    lambda dy, x: ref.clip_backward(dy, x, -0.5, 0.75),
    lambda rng, dt, n: (*_planes(rng, dt, n), *_planes(rng, dt, n)),
    refusals=[(lambda dy, x: fc.clip_backward(dy, x[:1]), ValueError, "x must have shape")],
    any_rank=True,
)
