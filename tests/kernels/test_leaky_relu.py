"""leaky_relu end to end: the kernels against PyTorch's leaky_relu and its autograd bit for
bit, the special values and ``out`` on every backend (the ``backend`` fixture), validation,
the LeakyReLU layer (numerical gradient, PyTorch twin, checkpoint), and the op's conformance
case (registered at the end, run over every backend by test_kernel_interface.py)."""

from __future__ import annotations

import numpy as np
import op_cases
import pytest
from _gradcheck import numerical_grad

import fastconv as fc
from fastconv import nn
from fastconv import reference as ref

SPECIAL = np.array([-np.inf, -3.5, -1e-3, -0.0, 0.0, 1e-3, 2.5, np.inf, np.nan], np.float32)


@pytest.mark.parametrize("alpha", [0.01, 0.3, -0.5, 0.0])
def test_matches_pytorch_bit_for_bit(torch, alpha, dtype):
    rng = np.random.default_rng(1)
    x = np.concatenate([SPECIAL, rng.standard_normal(100).astype(np.float32) * 4]).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    t = torch.from_numpy(x.astype(np.float32)).requires_grad_()
    ty = torch.nn.functional.leaky_relu(t, alpha)
    ty.backward(torch.from_numpy(dy.astype(np.float32)))
    # PyTorch in float32, rounded once to the dtype: what the kernels compute for half too.
    want_y = ty.detach().numpy().astype(dtype)
    want_dx = t.grad.numpy().astype(dtype)
    np.testing.assert_array_equal(fc.leaky_relu(x, alpha), want_y)
    np.testing.assert_array_equal(fc.leaky_relu_backward(dy, x, alpha), want_dx)


def test_special_values_against_the_reference(backend, dtype):
    x = SPECIAL.astype(dtype)
    y = fc.leaky_relu(x, 0.5)
    np.testing.assert_array_equal(y, ref.leaky_relu(x, 0.5).astype(dtype))
    assert np.signbit(y[3]) and not np.signbit(y[4])  # -0.0 -> -0.0 * 0.5, +0.0 -> +0.0
    dy = np.ones_like(x)
    np.testing.assert_array_equal(fc.leaky_relu_backward(dy, x, 0.5),
                                  [0.5, 0.5, 0.5, 0.5, 0.5, 1, 1, 1, 0.5])  # fmt: skip


def test_backward_writes_into_out_and_refuses_aliases(backend):
    x = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    dy = np.ones_like(x)
    out = np.empty_like(x)
    assert fc.leaky_relu_backward(dy, x, 0.1, out=out) is out
    np.testing.assert_array_equal(out, np.where(x > 0, 1, np.float32(0.1)))
    with pytest.raises(ValueError, match="out must not share memory with x"):
        fc.leaky_relu_backward(dy, x, 0.1, out=x)


@pytest.mark.parametrize(
    ("alpha", "error", "message"),
    [(True, TypeError, "alpha must be a real number"), ("0.1", TypeError, "alpha must be"),
     (np.nan, ValueError, "alpha must be finite"), (1e39, ValueError, "finite in float32")],
)  # fmt: skip
def test_bad_slopes_are_refused(alpha, error, message):
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(error, match=message):
        fc.leaky_relu(x, alpha)
    with pytest.raises(error, match=message):
        fc.leaky_relu_backward(x, x, alpha)
    with pytest.raises(error, match=message):
        nn.LeakyReLU(alpha)


def test_gradient_shapes_must_agree():
    with pytest.raises(ValueError, match="x must have shape"):
        fc.leaky_relu_backward(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))


def test_layer_gradient_is_the_numerical_one():
    rng = np.random.default_rng(3)
    model = nn.Sequential([nn.Dense(6), nn.LeakyReLU(0.2), nn.Dense(3)], seed=0, input_shape=(5,))
    x = rng.standard_normal((4, 5))
    layer = model.layers[1]
    h = rng.standard_normal((4, 6))
    h[np.abs(h) < 1e-2] = 0.5  # no input at the kink, where the derivative is undefined
    dy = rng.standard_normal((4, 6))
    _, cache = layer.call(h.astype(np.float32), training=True)
    dx, grads = layer.call_backward(cache, dy.astype(np.float32))
    num = numerical_grad(lambda a: ref.leaky_relu(a, 0.2), h.copy(), dy)
    np.testing.assert_allclose(dx, num, rtol=1e-5, atol=1e-6)
    assert grads == {} and model.predict(x.astype(np.float32)).shape == (4, 3)


def test_layer_twin_and_training_step_match_pytorch(torch):
    from fastconv.torch_bridge import to_torch

    rng = np.random.default_rng(4)
    inp = nn.Input((1, 8, 8))
    y = nn.LeakyReLU(0.1)(nn.Conv2D(4, 3, padding=1)(inp))
    out = nn.Dense(3)(nn.Flatten()(y))
    model = nn.Model(inp, out, seed=1).compile(nn.SGD(lr=0.1), "softmax_cross_entropy")
    x = rng.standard_normal((5, 1, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 3, 5)
    twin = to_torch(model)
    np.testing.assert_allclose(model.predict(x), twin(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    loss = torch.nn.functional.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(labels))
    loss.backward()
    model.train_on_batch(x, labels)
    with torch.no_grad():
        for p in twin.parameters():
            p -= 0.1 * p.grad
    from fastconv.torch_bridge import to_torch as again

    after = again(model)
    for a, b in zip(after.parameters(), twin.parameters(), strict=True):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_layer_checkpoint_keeps_the_slope(tmp_path):
    model = nn.Sequential([nn.LeakyReLU(0.25)], input_shape=(3,))
    model.save(tmp_path / "m.npz")
    again = nn.load_model(tmp_path / "m.npz")
    assert again.layers[0].alpha == 0.25
    x = np.array([[-4.0, 0.0, 2.0]], np.float32)
    np.testing.assert_array_equal(again.predict(x), [[-1.0, 0.0, 2.0]])


# --- conformance cases (tests/kernels/op_cases.py; run by test_kernel_interface.py) -------------


def _planes(rng, dt, n):
    return (op_cases.normal(rng, (n, 3, 4, 4), dt),)


op_cases.register(
    "leaky_relu",
    lambda x: fc.leaky_relu(x, 0.2),
    lambda x: ref.leaky_relu(x, 0.2),
    _planes,
    refusals=[(lambda x: fc.leaky_relu(x, "0.1"), TypeError, "alpha must be a real number")],
    any_rank=True,
)
op_cases.register(
    "leaky_relu_backward",
    lambda dy, x: fc.leaky_relu_backward(dy, x, 0.2),
    lambda dy, x: ref.leaky_relu_backward(dy, x, 0.2),
    lambda rng, dt, n: (*_planes(rng, dt, n), *_planes(rng, dt, n)),
    refusals=[(lambda dy, x: fc.leaky_relu_backward(dy, x[:1]), ValueError, "x must have shape")],
    any_rank=True,
)
