"""Training techniques against closed forms, hand-computed steps and PyTorch (when installed):
schedules, AdamW, regularisers, DropConnect, label smoothing, BCE, MSE, metrics, ensembles,
and fit(augment=...) reproducibility and resumption."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastconv import nn
from fastconv.augment import RandomTransform
from fastconv.nn import losses, metrics

# --- schedules ----------------------------------------------------------------------------------


class _Opt:
    def __init__(self, lr):
        self.lr = lr


class _FakeModel:
    def __init__(self, lr):
        self.optimizer = _Opt(lr)


def lrs(schedule, epochs, lr=0.1):
    schedule.set_model(_FakeModel(lr))
    schedule.on_train_begin()
    out = []
    for e in range(epochs):
        schedule.on_epoch_begin(e)
        out.append(schedule.model.optimizer.lr)
    return out


def test_schedules_follow_their_closed_forms():
    np.testing.assert_allclose(
        lrs(nn.StepDecay(3, 0.5), 8), [0.1 * 0.5 ** (e // 3) for e in range(8)], rtol=1e-12
    )
    np.testing.assert_allclose(
        lrs(nn.ExponentialDecay(0.9), 6), [0.1 * 0.9**e for e in range(6)], rtol=1e-12
    )
    got = lrs(nn.CosineDecay(10, warmup_epochs=2, min_lr=0.001), 12)
    want = []
    for e in range(12):
        if e < 2:
            want.append(0.1 * (e + 1) / 3)
        else:
            p = min(1.0, (e - 2) / 8)
            want.append(0.001 + (0.1 - 0.001) * (1 + math.cos(math.pi * p)) / 2)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[2] == pytest.approx(0.1) and got[10] == got[11] == pytest.approx(0.001)
    # base_lr given: independent of the optimizer's (already decayed) rate, as after a resume
    assert lrs(nn.ExponentialDecay(0.5, base_lr=1.0), 3, lr=1e-9) == [1.0, 0.5, 0.25]


def test_schedule_yielding_a_bad_rate_raises_at_that_epoch_with_the_value():
    # cosine to 0 and beyond its epochs: the rate becomes 0 at epoch 5 (index 4)
    sched = nn.CosineDecay(4)
    sched.set_model(_FakeModel(0.1))
    sched.on_train_begin()
    for e in range(4):
        sched.on_epoch_begin(e)
    with pytest.raises(ValueError, match=r"0\.0 at epoch 5"):
        sched.on_epoch_begin(4)
    cb = nn.LearningRateScheduler(lambda epoch, lr: lr if epoch < 2 else float("nan"))
    cb.set_model(_FakeModel(0.1))
    cb.on_epoch_begin(1)
    with pytest.raises(ValueError, match="nan at epoch 3"):
        cb.on_epoch_begin(2)
    cb = nn.LearningRateScheduler(lambda epoch, lr: -0.5)
    cb.set_model(_FakeModel(0.1))
    with pytest.raises(ValueError, match="-0.5 at epoch 1"):
        cb.on_epoch_begin(0)


def test_schedule_arguments_are_checked():
    for bad in (lambda: nn.StepDecay(0), lambda: nn.ExponentialDecay(-1.0),
                lambda: nn.CosineDecay(5, warmup_epochs=5), lambda: nn.CosineDecay(5, min_lr=-1),
                lambda: nn.ReduceLROnPlateau(factor=1.5)):  # fmt: skip
        with pytest.raises(ValueError):
            bad()


def test_reduce_on_plateau_and_its_state():
    cb = nn.ReduceLROnPlateau("val_loss", factor=0.5, patience=1, min_lr=0.02)
    cb.set_model(_FakeModel(0.1))
    seen = []
    for e, v in enumerate([1.0, 0.9, 0.95, 0.97, 0.96, 0.8, 0.85, 0.86, 0.9, 0.9]):
        cb.on_epoch_end(e, {"val_loss": v})
        seen.append(cb.model.optimizer.lr)
    # two epochs without improvement halve the rate; never below min_lr
    assert seen == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.025, 0.025, 0.02])
    state = cb.get_state()
    other = nn.ReduceLROnPlateau("val_loss", factor=0.5, patience=1, min_lr=0.02)
    other.set_state(state)
    assert other.get_state() == state


# --- optimizers and regularisers --------------------------------------------------------------


def test_adamw_matches_a_hand_computed_step():
    rng = np.random.default_rng(0)
    p = rng.standard_normal((3, 4)).astype(np.float32)
    grads = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(3)]
    lr, b1, b2, wd = 0.01, 0.9, 0.99, 0.1
    opt = nn.AdamW(lr=lr, beta1=b1, beta2=b2, weight_decay=wd)
    w = p.copy()
    ref = p.astype(np.float64)
    m = np.zeros_like(ref)
    v = np.zeros_like(ref)
    for t, g in enumerate(grads, start=1):
        opt.step([w], [g])
        g = g.astype(np.float64)
        ref = ref * (1 - lr * wd)  # decoupled: not through the moments
        m += (1 - b1) * (g - m)
        v += (1 - b2) * (g * g - v)
        ref -= lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + 1e-7)
    np.testing.assert_allclose(w, ref, rtol=2e-6, atol=1e-7)
    # weight_decay 0 is Adam exactly
    a, b = p.copy(), p.copy()
    nn.AdamW(lr=lr, weight_decay=0.0).step([a], [grads[0]])
    nn.Adam(lr=lr).step([b], [grads[0]])
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="weight_decay"):
        nn.AdamW(weight_decay=-1)


def test_adamw_matches_pytorch(torch):
    rng = np.random.default_rng(1)
    p = rng.standard_normal((5, 3)).astype(np.float32)
    grads = [rng.standard_normal((5, 3)).astype(np.float32) for _ in range(5)]
    w = p.copy()
    opt = nn.AdamW(lr=0.01, weight_decay=0.05)
    tp = torch.tensor(p.copy(), requires_grad=True)
    topt = torch.optim.AdamW([tp], lr=0.01, weight_decay=0.05, eps=1e-7)
    for g in grads:
        opt.step([w], [g])
        tp.grad = torch.tensor(g)
        topt.step()
    # eps sits inside the bias correction in PyTorch, outside in the book's form: ~1e-7 apart
    np.testing.assert_allclose(w, tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def small_dense_model(seed=0, **dense_kwargs):
    return nn.Sequential(
        [nn.Flatten(), nn.Dense(5, **dense_kwargs), nn.ReLU(), nn.Dense(3)],
        seed=seed,
        input_shape=(1, 3, 3),
    )


def test_l1_l2_regularizers_add_penalty_and_gradient():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    reg = nn.L1L2(l1=0.01, l2=0.05)
    plain = small_dense_model().compile(nn.SGD(lr=0.1))
    regd = small_dense_model(kernel_regularizer=reg, bias_regularizer=nn.L2(0.2))
    regd.compile(nn.SGD(lr=0.1))
    w0 = [w.copy() for w in plain.get_weights()]
    np.testing.assert_array_equal(w0[0], regd.get_weights()[0])  # same initialisation
    logs_plain = plain.train_on_batch(x, y)
    logs_reg = regd.train_on_batch(x, y)
    W, b = w0[0].astype(np.float64), w0[1].astype(np.float64)
    penalty = 0.01 * np.abs(W).sum() + 0.05 * (W**2).sum() + 0.2 * (b**2).sum()
    assert logs_reg["loss"] - logs_plain["loss"] == pytest.approx(penalty, rel=1e-5)
    # SGD: W1 = W0 - lr (dW + l1 sign(W0) + 2 l2 W0)
    dW = (w0[0] - plain.get_weights()[0]) / 0.1
    want = W - 0.1 * (dW + 0.01 * np.sign(W) + 2 * 0.05 * W)
    np.testing.assert_allclose(regd.get_weights()[0], want, rtol=1e-5, atol=1e-6)
    want_b = b - 0.1 * ((w0[1] - plain.get_weights()[1]) / 0.1 + 2 * 0.2 * b)
    np.testing.assert_allclose(regd.get_weights()[1], want_b, rtol=1e-5, atol=1e-6)
    # other layers untouched by the penalty
    np.testing.assert_allclose(regd.get_weights()[2], plain.get_weights()[2], rtol=1e-6)


def test_regularizers_survive_a_checkpoint(tmp_path):
    model = small_dense_model(kernel_regularizer=nn.L2(0.01)).compile("sgd")
    model.save(tmp_path / "m.npz")
    back = nn.load_model(tmp_path / "m.npz")
    reg = back.layers[1].regularizers["W"]
    assert (reg.l1, reg.l2) == (0.0, 0.01)
    with pytest.raises(ValueError, match="regularizer"):
        nn.Dense(3, kernel_regularizer="l3")
    with pytest.raises(ValueError, match="use_bias"):
        nn.Dense(3, use_bias=False, bias_regularizer=nn.L2())


# --- DropConnect ------------------------------------------------------------------------------


def test_drop_connect_masks_weights_in_training_only():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    layer = nn.DropConnectDense(5, rate=0.4)
    layer.rng = np.random.default_rng(11)
    layer.forward(x)  # builds
    W, b = layer.params["W"].astype(np.float64), layer.params["b"].astype(np.float64)
    # the mask the layer will draw: the next numbers of its generator
    mirror = np.random.default_rng()
    mirror.bit_generator.state = layer.rng.bit_generator.state
    keep = mirror.random(W.shape, dtype=np.float32) < np.float32(0.6)
    y = layer.forward(x, training=True)
    Wm = W * keep / 0.6
    np.testing.assert_allclose(y, x @ Wm + b, rtol=1e-5, atol=1e-5)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = layer.backward(dy)
    np.testing.assert_allclose(dx, dy @ Wm.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.grads["W"], (x.T @ dy) * keep / 0.6, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.grads["b"], dy.sum(axis=0), rtol=1e-5, atol=1e-5)
    assert 0.3 < keep.mean() < 0.9
    # inference: the mean network
    np.testing.assert_allclose(layer.forward(x), x @ W + b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rate"):
        nn.DropConnectDense(3, rate=1.0)


# --- losses -----------------------------------------------------------------------------------


def test_label_smoothing_against_the_hand_formula_and_gradient():
    rng = np.random.default_rng(4)
    s = rng.standard_normal((6, 4)).astype(np.float32)
    y = rng.integers(0, 4, 6)
    e = 0.2
    q = np.full((6, 4), e / 4)
    q[np.arange(6), y] += 1 - e
    s64 = s.astype(np.float64)
    logp = s64 - s64.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    loss = losses.SoftmaxCrossEntropy(label_smoothing=e)
    assert loss.forward(s, y) == pytest.approx(-(q * logp).sum() / 6, rel=1e-6)
    np.testing.assert_allclose(loss.backward(), (np.exp(logp) - q) / 6, atol=1e-7)
    # one-hot targets smooth the same way
    onehot = np.eye(4, dtype=np.float32)[y]
    assert loss.forward(s, onehot) == pytest.approx(-(q * logp).sum() / 6, rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.SoftmaxCrossEntropy(label_smoothing=1.0)


def test_losses_match_pytorch(torch):
    F = torch.nn.functional
    rng = np.random.default_rng(5)
    s = rng.standard_normal((7, 5)).astype(np.float32)
    cases = [
        (losses.SoftmaxCrossEntropy(0.1), rng.integers(0, 5, 7),
         lambda t, y: F.cross_entropy(t, torch.tensor(y), label_smoothing=0.1)),
        (losses.BinaryCrossEntropy(), (rng.random((7, 5)) > 0.5).astype(np.float32),
         lambda t, y: F.binary_cross_entropy_with_logits(t, torch.tensor(y))),
        (losses.MeanSquaredError(), rng.standard_normal((7, 5)).astype(np.float32),
         lambda t, y: F.mse_loss(t, torch.tensor(y))),
    ]  # fmt: skip
    for loss, y, torch_loss in cases:
        t = torch.tensor(s, requires_grad=True)
        want = torch_loss(t, y)
        want.backward()
        assert loss.forward(s, y) == pytest.approx(want.item(), rel=1e-5), loss
        np.testing.assert_allclose(loss.backward(), t.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_bce_and_mse_hand_formulas_and_extreme_logits():
    s = np.array([[50.0, -50.0, 0.0], [3.0, -1.0, 100.0]], np.float32)
    y = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], np.float32)
    s64 = s.astype(np.float64)
    p = 1 / (1 + np.exp(-s64))
    want = -(y * np.log(np.maximum(p, 1e-300)) + (1 - y) * np.log(np.maximum(1 - p, 1e-300)))
    bce = losses.BinaryCrossEntropy()
    assert bce.forward(s, y) == pytest.approx(want.mean(), rel=1e-6)
    np.testing.assert_allclose(bce.backward(), (p - y) / 6, atol=1e-8)
    mse = losses.MeanSquaredError()
    t = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert mse.forward(s, t) == pytest.approx(((s64 - t) ** 2).mean())
    np.testing.assert_allclose(mse.backward(), 2 * (s64 - t) / 6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bce.forward(s, y * 2)
    with pytest.raises(ValueError, match="shape"):
        mse.forward(s, t[:, :2])


def test_multilabel_and_regression_models_train():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((64, 1, 3, 3)).astype(np.float32)
    flat = x.reshape(64, 9)
    y_multi = np.stack([flat[:, 0] > 0, flat[:, 4] > 0, flat[:, 8] > 0], axis=1).astype(np.float32)
    model = small_dense_model(seed=1).compile(nn.Adam(lr=0.05), loss="bce")
    first = model.evaluate(x, y_multi)
    model.fit(x, y_multi, epochs=30, batch_size=16, verbose=0)
    after = model.evaluate(x, y_multi)
    assert set(after) == {"loss", "accuracy"} and after["loss"] < first["loss"] / 2
    assert after["accuracy"] > 0.9
    probs = model.predict(x, probabilities=True)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-model.predict(x).astype(np.float64))),
                               rtol=1e-5)  # fmt: skip
    y_reg = (flat[:, :3] * [1.0, -2.0, 0.5]).astype(np.float32)
    reg = small_dense_model(seed=2).compile(nn.Adam(lr=0.02), loss="mse", metrics=["mae"])
    start = reg.evaluate(x, y_reg)
    reg.fit(x, y_reg, epochs=40, batch_size=16, verbose=0)
    end = reg.evaluate(x, y_reg)
    assert set(end) == {"loss", "mae"} and end["loss"] < start["loss"] / 4
    with pytest.raises(ValueError, match="not probabilities"):
        reg.predict(x, probabilities=True)


# --- metrics ----------------------------------------------------------------------------------


def test_top_k_per_class_and_confusion_matrix():
    scores = np.array(
        [[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.2, 0.5, 0.3]], np.float32
    )
    y = np.array([2, 0, 1, 0])
    assert metrics.top_k_accuracy(scores, y, 1) == 0.25
    assert metrics.top_k_accuracy(scores, y, 2) == 0.75  # 0.2 is last in the fourth row
    assert metrics.top_k_accuracy(scores, y, 3) == 1.0
    # top-1 is arg-max accuracy on random data
    rng = np.random.default_rng(7)
    s = rng.standard_normal((200, 10)).astype(np.float32)
    yy = rng.integers(0, 10, 200)
    assert metrics.top_k_accuracy(s, yy, 1) == metrics.accuracy(s, yy)
    ranks = (s > s[np.arange(200), yy][:, None]).sum(1)
    assert metrics.top_k_accuracy(s, yy, 3) == (ranks < 3).mean()
    cm = metrics.confusion_matrix(yy, s, 10)
    loop = np.zeros((10, 10), int)
    for t, p in zip(yy, s.argmax(1), strict=True):
        loop[t, p] += 1
    np.testing.assert_array_equal(cm, loop)
    pca = metrics.per_class_accuracy(yy, s.argmax(1), 10)
    for c in range(10):
        assert pca[c] == pytest.approx((s.argmax(1)[yy == c] == c).mean())
    assert np.isnan(metrics.per_class_accuracy([0, 0], [0, 1], 3)[2])
    with pytest.raises(ValueError, match="y_pred"):
        metrics.confusion_matrix([0, 1], [0, 5], 3)


def test_compile_metrics_and_confusion_plot(tmp_path):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((20, 1, 3, 3)).astype(np.float32)
    y = rng.integers(0, 3, 20)
    model = small_dense_model().compile("adam", metrics=["accuracy", "top2_accuracy"])
    logs = model.train_on_batch(x, y)
    assert set(logs) == {"loss", "accuracy", "top2_accuracy"}
    ev = model.evaluate(x, y, batch_size=7)
    s = model.predict(x)
    assert ev["top2_accuracy"] == pytest.approx(metrics.top_k_accuracy(s, y, 2))
    hist = model.fit(x, y, epochs=1, batch_size=10, verbose=0, validation_data=(x, y))
    assert "val_top2_accuracy" in hist.history
    with pytest.raises(ValueError, match="metrics"):
        small_dense_model().compile("adam", metrics=["f1"])
    metrics.plot_confusion_matrix(metrics.confusion_matrix(y, s, 3), tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


# --- ensembles --------------------------------------------------------------------------------


def test_ensemble_averages_member_probabilities():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((30, 1, 3, 3)).astype(np.float32)
    y = rng.integers(0, 3, 30)
    members = [small_dense_model(seed=s).compile("adam") for s in range(3)]
    ens = nn.Ensemble(members)
    manual = np.zeros((30, 3))
    for m in members:
        s = m.predict(x).astype(np.float64)
        e = np.exp(s - s.max(1, keepdims=True))
        manual += e / e.sum(1, keepdims=True) / 3
    np.testing.assert_allclose(ens.predict(x), manual, rtol=1e-5, atol=1e-7)
    ev = ens.evaluate(x, y)
    assert ev["accuracy"] == pytest.approx((manual.argmax(1) == y).mean())
    assert ev["loss"] == pytest.approx(-np.log(manual[np.arange(30), y]).mean(), rel=1e-5)
    weighted = nn.Ensemble(members, weights=[2, 1, 1]).predict(x)
    probs = [m.predict(x, probabilities=True) for m in members]
    np.testing.assert_allclose(weighted, 0.5 * probs[0] + 0.25 * (probs[1] + probs[2]),
                               rtol=1e-5, atol=1e-7)  # fmt: skip
    with pytest.raises(ValueError, match="outputs"):
        nn.Ensemble([members[0], nn.Sequential([nn.Flatten(), nn.Dense(4)], input_shape=(1, 3, 3))])
    with pytest.raises(ValueError, match="weights"):
        nn.Ensemble(members, weights=[1, -1, 1])
    with pytest.raises(TypeError, match="list"):
        nn.Ensemble(members[0])


# --- fit(augment=...) -------------------------------------------------------------------------


def conv_model(seed):
    return nn.Sequential(
        [nn.Conv2D(3, 3, padding=1, activation="relu"), nn.MaxPool2D(2), nn.Flatten(),
         nn.Dense(3)],
        seed=seed, input_shape=(1, 8, 8),
    ).compile(nn.Adam(lr=0.01))  # fmt: skip


def test_fit_with_augmentation_is_reproducible_and_resumable(tmp_path):
    rng = np.random.default_rng(10)
    x = rng.random((40, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 3, 40)
    aug = RandomTransform(rotation=10, shift=1, scale=0.1)
    a, b = conv_model(0), conv_model(0)
    a.fit(x, y, epochs=2, batch_size=16, verbose=0, augment=aug)
    b.fit(x, y, epochs=2, batch_size=16, verbose=0, augment=aug)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    plain = conv_model(0)
    plain.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert not np.array_equal(plain.get_weights()[0], a.get_weights()[0])
    # interrupted after epoch 1, resumed from the checkpoint: the same weights as uninterrupted
    c = conv_model(0)
    c.fit(x, y, epochs=1, batch_size=16, verbose=0, augment=aug)
    c.save(tmp_path / "c.npz", epoch=1)
    d = nn.load_model(tmp_path / "c.npz")
    d.fit(x, y, epochs=2, batch_size=16, verbose=0, augment=aug, initial_epoch=1)
    for wa, wd in zip(a.get_weights(), d.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wd)
    with pytest.raises(TypeError, match="augment"):
        conv_model(0).fit(x, y, augment="rotate")


# --- transfer learning example ----------------------------------------------------------------


def test_transfer_learning_example_freezes_then_fine_tunes(monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "transfer_learning.py"
    spec = importlib.util.spec_from_file_location("transfer_learning", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    calls = []
    real_fit = nn.Sequential.fit

    def spy_fit(self, x, y, **kwargs):
        conv = example.conv_layers(self)
        before = [w.copy() for layer in conv for w in layer.params.values()]
        head = self.layers[-1].params["W"].copy()
        out = real_fit(self, x, y, **kwargs)
        after = [w for layer in conv for w in layer.params.values()]
        calls.append(
            (
                len(x),
                all(not layer.trainable for layer in conv),
                any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True)),
                not np.array_equal(head, self.layers[-1].params["W"]),
            )
        )
        return out

    monkeypatch.setattr(nn.Sequential, "fit", spy_fit)
    r = example.run(base_images=200, base_epochs=1, shots=3, head_epochs=2, finetune_epochs=1,
                    limit_test=300, verbose=False)  # fmt: skip
    base, head, tune, scratch = calls
    assert base[0] == 200 and head[0] == tune[0] == scratch[0] == 15  # 3 shots x 5 digits
    assert head[1] and not head[2] and head[3]  # frozen base unchanged, new head trained
    assert not tune[1] and tune[2]  # unfrozen: the base moves when fine-tuned
    assert r["base_unchanged_while_frozen"]
    for key in ("base_accuracy_0_4", "head_only", "fine_tuned", "from_scratch"):
        assert 0.0 <= r[key] <= 1.0


def test_deep_mnist_bn_net_structure_and_one_step():
    from fastconv.models import deep_mnist_bn_net

    model = deep_mnist_bn_net(seed=0)
    convs = [(16, 1), (16, 16), (32, 16), (32, 32), (64, 32), (64, 64)]
    n_conv = sum(f * c * 9 for f, c in convs)  # no conv biases: BatchNorm's beta replaces them
    n_bn = 2 * sum(f for f, _ in convs)
    assert model.count_params() == n_conv + n_bn + (64 * 4 * 4 * 50 + 50) + (50 * 10 + 10)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("BatchNorm2D") == 6 and kinds[-1] == "Dense"
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    model.compile("adam")
    logs = model.train_on_batch(x, np.arange(4))
    assert np.isfinite(logs["loss"]) and model.predict(x).shape == (4, 10)
