"""Optimizers against the book's update rules, written out independently here in float64."""

import numpy as np
import pytest

from fastconv.nn import SGD, AdaGrad, Adam, Momentum, Nesterov, RMSProp
from fastconv.nn import optimizers as opt_mod


def book_steps(name, p, grads, **hp):
    """The book's ``common/optimizer.py`` rules, applied to float64 copies."""
    p = p.astype(np.float64).copy()
    lr = hp["lr"]
    v = np.zeros_like(p)
    h = np.zeros_like(p)
    m = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        if name == "sgd":
            p -= lr * g
        elif name == "momentum":
            v = hp["momentum"] * v - lr * g
            p += v
        elif name == "nesterov":
            mu = hp["momentum"]
            v *= mu
            v -= lr * g
            p += mu * mu * v
            p -= (1 + mu) * lr * g
        elif name == "adagrad":
            h += g * g
            p -= lr * g / (np.sqrt(h) + 1e-7)
        elif name == "rmsprop":
            h = hp["decay_rate"] * h + (1 - hp["decay_rate"]) * g * g
            p -= lr * g / (np.sqrt(h) + 1e-7)
        elif name == "adam":
            b1, b2 = hp["beta1"], hp["beta2"]
            lr_t = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
            m += (1 - b1) * (g - m)
            v += (1 - b2) * (g**2 - v)
            p -= lr_t * m / (np.sqrt(v) + 1e-7)
    return p


CASES = [
    ("sgd", SGD, dict(lr=0.1)),
    ("momentum", Momentum, dict(lr=0.05, momentum=0.8)),
    ("nesterov", Nesterov, dict(lr=0.05, momentum=0.9)),
    ("adagrad", AdaGrad, dict(lr=0.1)),
    ("rmsprop", RMSProp, dict(lr=0.01, decay_rate=0.9)),
    ("adam", Adam, dict(lr=0.01, beta1=0.8, beta2=0.95)),
]


@pytest.mark.parametrize("name,cls,hp", CASES, ids=[c[0] for c in CASES])
def test_matches_book_rule_over_several_steps(name, cls, hp):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    grads = [
        (rng.standard_normal(w.shape).astype(np.float32), rng.standard_normal(4).astype(np.float32))
        for _ in range(4)
    ]
    expected_w = book_steps(name, w, [g[0] for g in grads], **hp)
    expected_b = book_steps(name, b, [g[1] for g in grads], **hp)
    opt = cls(**hp)
    w_id = id(w)
    for gw, gb in grads:
        opt.step([w, b], [gw, gb])
    assert id(w) == w_id and w.dtype == np.float32  # updated in place
    np.testing.assert_allclose(w, expected_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b, expected_b, rtol=1e-5, atol=1e-6)
    assert opt.iterations == 4


def test_adam_first_step_by_hand():
    # t=1: m = 0.1 g, v = 0.001 g^2, lr_t = lr*sqrt(0.001)/0.1, so the step is ~lr*sign(g).
    p = np.array([1.0, -2.0], np.float32)
    g = np.array([0.5, -4.0], np.float32)
    Adam(lr=0.001).step([p], [g])
    lr_t = 0.001 * np.sqrt(1 - 0.999) / (1 - 0.9)
    expected = np.array([1.0, -2.0]) - lr_t * (0.1 * g) / (np.sqrt(0.001 * g**2) + 1e-7)
    np.testing.assert_allclose(p, expected, rtol=1e-6)
    np.testing.assert_allclose(p, [0.999, -1.999], atol=1e-6)


def test_float16_params_keep_float32_master_copy():
    # 1e-4 steps on a half value of 1.0 (spacing ~1e-3) would round away without a master copy.
    p = np.ones(3, np.float16)
    g = np.ones(3, np.float16)
    opt = SGD(lr=1e-4)
    for _ in range(50):
        opt.step([p], [g])
    assert p.dtype == np.float16
    np.testing.assert_allclose(p.astype(np.float64), 1 - 50e-4, atol=1e-3)
    assert abs(float(opt._master["0"][0]) - (1 - 50e-4)) < 1e-6


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(5).astype(np.float32) for _ in range(6)]
    p1 = rng.standard_normal(5).astype(np.float32)
    p2 = p1.copy()
    a = Adam(lr=0.01)
    for g in grads[:3]:
        a.step([p1], [g])
    state = a.state_dict()
    p2[...] = p1
    b = Adam(lr=0.01)
    b.load_state_dict(state, [p2])
    for g in grads[3:]:
        a.step([p1], [g])
        b.step([p2], [g])
    np.testing.assert_array_equal(p1, p2)
    assert b.iterations == 6


def test_errors_and_lookup():
    with pytest.raises(ValueError, match="lr"):
        SGD(lr=0)
    with pytest.raises(ValueError, match="momentum"):
        Momentum(momentum=1.5)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        opt_mod.get("lbfgs")
    assert isinstance(opt_mod.get("Adam", lr=0.1), Adam) and opt_mod.get("adam", lr=0.1).lr == 0.1
    p = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="same length"):
        SGD().step([p], [])
    with pytest.raises(ValueError, match="shape"):
        SGD().step([p], [np.zeros(4, np.float32)])


# --- the fused CPU updates: bit-identical to the NumPy expressions they replace --------------


def _adam_expressions(p, g, m, v, beta1, beta2, lr_t, eps):
    m += np.float32(1 - beta1) * (g - m)
    v += np.float32(1 - beta2) * (g * g - v)
    p -= np.float32(lr_t) * m / (np.sqrt(v) + np.float32(eps))


def _momentum_expressions(p, g, v, momentum, lr):
    v *= np.float32(momentum)
    v -= np.float32(lr) * g
    p += v


@pytest.mark.parametrize("shape", [(0,), (1,), (7, 3), (64, 3, 5, 5), (100003,)])
def test_fused_updates_are_bit_identical_to_the_expressions(shape):
    from fastconv import ops

    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    arrays[2] = np.abs(arrays[2])  # v >= 0
    p0, m0, v0 = arrays
    fused = [a.copy() for a in (p0, m0, v0)]
    plain = [a.copy() for a in (p0, m0, v0)]
    for step in range(1, 4):
        g = (rng.standard_normal(shape) * 10.0 ** rng.integers(-4, 3)).astype(np.float32)
        lr_t = 1e-3 * np.sqrt(1 - 0.999**step) / (1 - 0.9**step)
        ops.adam_update(*fused[:1], g, *fused[1:], 0.9, 0.999, lr_t, 1e-7)
        _adam_expressions(plain[0], g, plain[1], plain[2], 0.9, 0.999, lr_t, 1e-7)
        for a, b in zip(fused, plain, strict=True):
            np.testing.assert_array_equal(a, b)
    p, v = p0.copy(), m0.copy()
    q, w = p0.copy(), m0.copy()
    for _ in range(3):
        g = rng.standard_normal(shape).astype(np.float32)
        ops.momentum_update(p, g, v, 0.9, 0.01)
        _momentum_expressions(q, g, w, 0.9, 0.01)
        np.testing.assert_array_equal(p, q)
        np.testing.assert_array_equal(v, w)


def test_fused_updates_fall_back_for_other_layouts_and_propagate_nan():
    from fastconv import ops

    rng = np.random.default_rng(2)
    base = rng.standard_normal((6, 8)).astype(np.float32)
    p = base.T  # not C-contiguous: the expressions run, with the same result
    g = rng.standard_normal((8, 6)).astype(np.float32)
    m, v = np.zeros((8, 6), np.float32), np.zeros((8, 6), np.float32)
    want = [p.copy(), m.copy(), v.copy()]
    ops.adam_update(p, g, m, v, 0.9, 0.999, 1e-3, 1e-7)
    _adam_expressions(want[0], g, want[1], want[2], 0.9, 0.999, 1e-3, 1e-7)
    for a, b in zip((p, m, v), want, strict=True):
        np.testing.assert_array_equal(a, b)
    p = np.ones(4, np.float32)
    g = np.array([1.0, np.nan, np.inf, -1.0], np.float32)
    ops.momentum_update(p, g, np.zeros(4, np.float32), 0.9, 0.1)
    assert np.isnan(p[1]) and np.isinf(p[2]) and np.isfinite(p[[0, 3]]).all()


# The array expressions the optimizers ran before their fused kernels, copied verbatim (float32
# scalars, the same operation order): the kernels must give the same bits.


def _sgd_expressions(p, g, lr):
    p -= np.float32(lr) * g


def _nesterov_expressions(p, g, v, momentum, lr):
    m, lr = np.float32(momentum), np.float32(lr)
    v *= m
    v -= lr * g
    p += (m * m) * v
    p -= ((1 + m) * lr) * g


def _adagrad_expressions(p, g, h, lr, eps):
    h += g * g
    p -= np.float32(lr) * g / (np.sqrt(h) + np.float32(eps))


def _rmsprop_expressions(p, g, h, decay_rate, lr, eps):
    d = np.float32(decay_rate)
    h *= d
    h += (1 - d) * g * g
    p -= np.float32(lr) * g / (np.sqrt(h) + np.float32(eps))


_FUSED = {  # name: (fused op, expressions, number of state arrays, hyper-parameters)
    "sgd": ("sgd_update", _sgd_expressions, 0, (0.01,)),
    "nesterov": ("nesterov_update", _nesterov_expressions, 1, (0.9, 0.01)),
    "adagrad": ("adagrad_update", _adagrad_expressions, 1, (0.01, 1e-7)),
    "rmsprop": ("rmsprop_update", _rmsprop_expressions, 1, (0.99, 0.01, 1e-7)),
}


@pytest.mark.parametrize("name", sorted(_FUSED))
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 3), (64, 3, 5, 5), (100003,)])
def test_fused_sgd_nesterov_adagrad_rmsprop_are_bit_identical(name, shape):
    from fastconv import ops

    op_name, expressions, n_state, hp = _FUSED[name]
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(shape).astype(np.float32)
    state0 = [np.abs(rng.standard_normal(shape)).astype(np.float32) for _ in range(n_state)]
    fused = [p0.copy(), *(s.copy() for s in state0)]
    plain = [p0.copy(), *(s.copy() for s in state0)]
    for _ in range(3):
        # Gradients over many magnitudes, with NaN, inf and signed zeros where there is room.
        g = (rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 4, size=shape)).astype(
            np.float32
        )
        specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30, 3e38], np.float32)
        if g.size > 2 * specials.size:
            g.flat[-specials.size :] = specials
        with np.errstate(all="ignore"):  # inf * 0, inf / inf: NaN on purpose
            getattr(ops, op_name)(fused[0], g, *fused[1:], *hp)
            expressions(plain[0], g, *plain[1:], *hp)
        for a, b in zip(fused, plain, strict=True):
            # Bits, not values: NaN payloads and signed zeros included.
            np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("cls", [SGD, Nesterov, AdaGrad, RMSProp])
def test_optimizer_steps_run_the_fused_updates(cls, monkeypatch):
    from fastconv import ops

    name = {"SGD": "sgd", "Nesterov": "nesterov", "AdaGrad": "adagrad", "RMSProp": "rmsprop"}
    op_name = _FUSED[name[cls.__name__]][0]
    calls = []
    real = getattr(ops, op_name)
    monkeypatch.setattr(ops, op_name, lambda *a: calls.append(1) or real(*a))
    p = np.ones((3, 4), np.float32)
    cls(lr=0.1).step([p], [np.full((3, 4), 0.5, np.float32)])
    assert calls == [1]
