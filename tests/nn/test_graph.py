"""The functional model graph: wiring checks, execution order, gradients through branches,
freezing, fusion, hooks, and agreement with the same network in PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
from _gradcheck import numeric_grad_entries, sample_indices

from fastconv import nn
from fastconv.nn import Adam

RTOL, ATOL = 3e-2, 3e-3


def block_model(seed=0, bn=True, width=4):
    """Conv-BN-ReLU, a residual block whose input is used twice, a Concatenate, GAP, Dense."""
    inp = nn.Input(shape=(2, 7, 7))
    x = nn.Conv2D(width, 3, padding=1, use_bias=not bn)(inp)
    x = nn.ReLU()(nn.BatchNorm2D()(x) if bn else x)
    y = nn.Conv2D(width, 3, padding=1, use_bias=not bn)(x)
    y = nn.BatchNorm2D()(y) if bn else y
    z = nn.ReLU()(nn.Add()([x, y]))  # residual: x is used by the conv and by Add
    z = nn.Concatenate()([z, nn.AvgPool2D(3, stride=1, padding=1)(x)])
    z = nn.GlobalAveragePooling2D()(z)
    return nn.Model(inp, nn.Dense(3)(z), seed=seed)


def _data(n=6, seed=0, shape=(2, 7, 7)):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *shape)).astype(np.float32), rng.integers(0, 3, n)


# --- construction ----------------------------------------------------------------------------


def test_the_issue_example_builds_trains_and_summarises():
    inp = nn.Input(shape=(1, 28, 28))
    x = nn.Conv2D(16, 3, padding=1, use_bias=False)(inp)
    x = nn.BatchNorm2D()(x)
    x = nn.ReLU()(x)
    y = nn.BatchNorm2D()(nn.Conv2D(16, 3, padding=1, use_bias=False)(x))
    z = nn.ReLU()(nn.Add()([x, y]))
    z = nn.GlobalAveragePooling2D()(z)
    out = nn.Dense(10)(z)
    model = nn.Model(inp, out, seed=0)
    assert model.built and model.output_shape == (10,)
    model.set_weights(model.get_weights())  # built at construction: no data needed
    # Keras order: W then b; gamma, beta, moving_mean, moving_variance
    entries = [f"{layer.name}/{name}" for layer, name in model.weight_entries()]
    assert entries[:5] == [
        "conv2d_1/W",
        "batch_norm2d_1/gamma",
        "batch_norm2d_1/beta",
        "batch_norm2d_1/moving_mean",
        "batch_norm2d_1/moving_variance",
    ]
    assert model.count_params() == 144 + 32 + 2304 + 32 + 170
    text = model.summary(print_fn=None)
    assert "Trainable params: 2,682" in text and "Non-trainable params: 64" in text
    assert "relu_1, batch_norm2d_2" in text  # Add's inputs
    model.compile(Adam(lr=0.01))
    x_batch = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    logs = model.train_on_batch(x_batch, np.arange(8))
    assert np.isfinite(logs["loss"])


def test_wiring_errors_name_layers_and_shapes():
    inp = nn.Input(shape=(3, 8, 8))
    a = nn.Conv2D(4, 3, padding=1, name="a")(inp)
    b = nn.Conv2D(5, 3, padding=1, name="b")(inp)
    with pytest.raises(
        ValueError, match=r"Add 'plus'.*\(4, 8, 8\).*\(5, 8, 8\).*inputs: a \(4, 8, 8\), b"
    ):
        nn.Add(name="plus")([a, b])
    c = nn.Conv2D(4, 3, name="c")(inp)  # 6x6
    with pytest.raises(
        ValueError, match=r"Concatenate 'cat'.*axes to agree.*\(4, 8, 8\), \(4, 6, 6\)"
    ):
        nn.Concatenate(name="cat")([a, c])
    with pytest.raises(ValueError, match="takes a list of at least two"):
        nn.Add()(a)
    with pytest.raises(ValueError, match="takes one tensor"):
        nn.ReLU()([a, b])
    other = nn.Input(shape=(3, 8, 8), name="other")
    with pytest.raises(ValueError, match="depends on input 'other'.*another graph"):
        nn.Model(inp, nn.Conv2D(2, 1)(other))
    layer = nn.Conv2D(2, 1, name="once")
    layer(inp)
    with pytest.raises(ValueError, match="'once' is already used in a graph.*shared weights"):
        layer(a)
    relu = nn.ReLU()  # weightless layers may appear several times
    nn.Model(inp, relu(nn.Add()([relu(a), a])))
    with pytest.raises(ValueError, match="spatial|exceeds the padded input"):
        nn.Conv2D(1, 9)(inp)
    with pytest.raises(ValueError, match="no layers"):
        nn.Model(inp, inp)
    with pytest.raises(ValueError, match=r"shape\[1\] must be a positive int"):
        nn.Input(shape=(3, 0, 8))
    with pytest.raises(ValueError, match="unique"):
        nn.Model(inp, nn.Conv2D(2, 1, name="x")(nn.Conv2D(2, 1, name="x")(inp)))
    with pytest.raises(ValueError, match=r"Dense 'd'.*add a Flatten"):
        nn.Dense(3, name="d")(inp)
    with pytest.raises(ValueError, match="made by nn.Input"):
        nn.Model(a, nn.ReLU()(a))


def test_a_cycle_is_refused():
    inp = nn.Input(shape=(2,))
    a = nn.Dense(2, name="a")(inp)
    b = nn.Dense(2, name="b")(a)
    a.node.inputs = (b,)  # only reachable by tampering with the graph
    with pytest.raises(ValueError, match="cycle through layer"):
        nn.Model(inp, b)


def test_an_alexnet_on_small_images_names_the_layer_that_breaks():
    model = nn.Sequential([nn.Conv2D(8, 11, stride=4), nn.MaxPool2D(3, stride=2),
                           nn.Conv2D(8, 5, padding=2), nn.MaxPool2D(3, stride=2)])  # fmt: skip
    with pytest.raises(ValueError, match=r"MaxPool2D 'max_pool2d_2' on input \(8, 2, 2\)"):
        model.build((3, 28, 28))


# --- gradients -------------------------------------------------------------------------------


def _check_model_gradients(model, x, rng, n_entries=6, eps=2e-3):
    y = model.forward(x, training=True)
    r = rng.standard_normal(y.shape)
    dx = model.backward(r.astype(np.float32))
    grads = dict(zip(model.trainable_weight_keys(), model.gradients(), strict=True))

    def fn():
        return model.forward(x, training=True)

    targets = [("x", x, dx)] + [
        (f"{lname}/{w}", model.layers[[la.name for la in model.layers].index(lname)].params[w],
         grads[(lname, w)])
        for lname, w in model.trainable_weight_keys()
    ]  # fmt: skip
    for name, arr, grad in targets:
        idx = sample_indices(arr.shape, n_entries, rng)
        num = numeric_grad_entries(fn, arr, r, idx, eps)
        ana = np.array([grad[i] for i in idx], dtype=np.float64)
        np.testing.assert_allclose(ana, num, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("bn", [False, True], ids=["plain", "batchnorm"])
def test_residual_and_concat_model_gradients_match_finite_differences(bn):
    rng = np.random.default_rng(1)
    model = block_model(seed=2, bn=bn)
    x, _ = _data(6, seed=3)
    # Away from the ReLU kinks: a shifted input keeps pre-activations clear of zero often
    # enough; the tolerance covers the rest.
    _check_model_gradients(model, x, rng)


def test_merge_layer_gradients_are_exact():
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((2, 3, 4, 4)).astype(np.float32) for _ in range(2))
    add = nn.Add()
    add.forward([a, b], training=True)
    da, db = add.backward(np.ones_like(a))
    assert np.array_equal(da, np.ones_like(a)) and np.array_equal(db, np.ones_like(b))
    cat = nn.Concatenate()
    y = cat.forward([a, b[:, :2]], training=True)
    assert y.shape == (2, 5, 4, 4) and np.array_equal(y[:, 3:], b[:, :2])
    g = rng.standard_normal(y.shape).astype(np.float32)
    ga, gb = cat.backward(g)
    assert np.array_equal(ga, g[:, :3]) and np.array_equal(gb, g[:, 3:])


def test_gradients_of_a_value_used_twice_are_summed():
    inp = nn.Input(shape=(3,))
    h = nn.Dense(3, name="h")(inp)
    out = nn.Add()([h, h])  # d/dh = 2 dy
    model = nn.Model(inp, out, seed=0)
    x = np.ones((2, 3), np.float32)
    model.forward(x, training=True)
    dy = np.ones((2, 3), np.float32)
    dx = model.backward(dy)
    w = model.layers[0].params["W"]
    np.testing.assert_allclose(dx, 2 * dy @ w.T, rtol=1e-6)
    np.testing.assert_allclose(model.gradients()[0], 2 * x.T @ dy, rtol=1e-6)


# --- freezing, fusion, hooks -------------------------------------------------------------------


def test_frozen_layers_keep_their_weights_and_batchnorm_its_statistics():
    x, y = _data(12, seed=4)
    model = block_model(seed=1)
    base = model.layers[:2]  # conv2d_1, batch_norm2d_1
    for layer in base:
        layer.trainable = False
    before = [w.copy() for w in model.get_weights()]
    entries = model.weight_entries()
    model.compile(Adam(lr=0.05))
    assert ("conv2d_1", "W") not in model.trainable_weight_keys()
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    after = model.get_weights()
    for (layer, name), b, a in zip(entries, before, after, strict=True):
        frozen = layer in base
        assert np.array_equal(a, b) == frozen, f"{layer.name}/{name}"
    text = model.summary(print_fn=None)
    # conv2d_1 (4*2*9) and batch_norm2d_1 (gamma, beta) frozen, plus both moving statistics
    assert f"Non-trainable params: {72 + 8 + 2 * 8}" in text
    # A frozen BatchNorm normalises with its moving statistics even in training (Keras).
    bn = model.layers[1]
    xb = model.layers[0].call(x, training=False)[0]
    expect = bn.call(xb, training=False)[0]
    np.testing.assert_array_equal(bn.call(xb, training=True)[0], expect)


def test_the_backward_pass_stops_at_a_frozen_base():
    model = nn.Sequential([nn.Conv2D(3, 3, name="base"), nn.Flatten(), nn.Dense(2, name="head")],
                          input_shape=(1, 5, 5), seed=0)  # fmt: skip
    model.layers[0].trainable = False
    events = []

    class Record(nn.Hook):
        def begin(self, event, layer):
            events.append((event, layer.name if layer is not None else None))

    model.hooks.append(Record())
    model.compile("sgd")
    model.train_on_batch(np.ones((2, 1, 5, 5), np.float32), np.array([0, 1]))
    assert ("backward", "head") in events and ("backward", "base") not in events
    assert events.index(("loss_forward", None)) < events.index(("backward", "head"))
    assert events[-1] == ("update", None)


def test_fused_and_unfused_execution_agree():
    x, y = _data(8, seed=5)
    fused, plain = block_model(seed=3), block_model(seed=3)
    plain.fuse = False
    assert any(s.fuse_relu for s in fused.execution_plan(True))
    assert any(s.folded_bn is not None for s in fused.execution_plan(False))
    assert not any(len(s.layers) > 1 for s in plain.execution_plan(False))
    for m in (fused, plain):
        m.compile(Adam(lr=0.01))
        m.fit(x, y, epochs=2, batch_size=4, verbose=0)
    for a, b in zip(fused.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # inference: BatchNorm folded into the convolution, equal to float32 rounding
    np.testing.assert_allclose(fused.predict(x), plain.predict(x), rtol=1e-4, atol=1e-5)


def test_batchnorm_needs_more_than_one_value_per_channel():
    model = nn.Sequential([nn.Dense(3), nn.BatchNorm1D()], input_shape=(4,))
    model.compile("sgd", loss="softmax_cross_entropy")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model.train_on_batch(np.ones((1, 4), np.float32), np.array([0]))
    assert model.predict(np.ones((1, 4), np.float32)).shape == (1, 3)  # inference is fine


def test_sequential_grows_after_build_and_layers_can_be_added_lazily():
    model = nn.Sequential([nn.Flatten()])
    model.add(nn.Dense(4))
    assert not model.built and [la.name for la in model.layers] == ["flatten_1", "dense_1"]
    model.predict(np.zeros((2, 2, 3), np.float32))
    assert model.built and model.input_shape == (2, 3)
    w = model.get_weights()
    model.add(nn.Dense(2))
    assert model.output_shape == (2,) and np.array_equal(model.get_weights()[0], w[0])


# --- against PyTorch -----------------------------------------------------------------------------


def test_same_predictions_and_training_step_as_the_pytorch_twin(torch):
    from fastconv.torch_bridge import copy_from_torch, to_torch

    torch.manual_seed(0)
    model = block_model(seed=0)
    twin = to_torch(model)
    for module in twin.modules():  # PyTorch's own initialisation, BN statistics included
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.reset_parameters()
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.5, 0.5)
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    copy_from_torch(twin, model)
    x, y = _data(8, seed=6)
    twin.eval()
    with torch.no_grad():
        expect = twin(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.predict(x), expect, rtol=1e-4, atol=1e-5)
    # One SGD step in training mode (batch statistics, running-statistics update).
    twin.train()
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(y))
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.compile(nn.SGD(lr=0.1))
    logs = model.train_on_batch(x, y)
    assert logs["loss"] == pytest.approx(loss.item(), rel=1e-5)
    back = block_model(seed=9)
    copy_from_torch(twin, back)
    for (layer, name), got, want in zip(model.weight_entries(), model.get_weights(),
                                        back.get_weights(), strict=True):  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"{layer.name}/{name}")


def test_a_small_resnet_learns_mnist_digits():
    from fastconv.datasets import load_mnist

    (x, y), (xt, yt) = load_mnist()
    x, y, xt, yt = x[:3000], y[:3000], xt[:1000], yt[:1000]
    inp = nn.Input(shape=(1, 28, 28))
    h = nn.ReLU()(nn.BatchNorm2D()(nn.Conv2D(8, 3, stride=2, padding=1, use_bias=False)(inp)))
    r = nn.BatchNorm2D()(
        nn.Conv2D(8, 3, padding=1, use_bias=False)(
            nn.ReLU()(nn.BatchNorm2D()(nn.Conv2D(8, 3, padding=1, use_bias=False)(h)))
        )
    )
    h = nn.ReLU()(nn.Add()([h, r]))
    h = nn.ReLU()(nn.BatchNorm2D()(nn.Conv2D(16, 3, stride=2, padding=1, use_bias=False)(h)))
    out = nn.Dense(10)(nn.GlobalAveragePooling2D()(h))
    model = nn.Model(inp, out, seed=0)
    model.compile(Adam(lr=0.01))
    model.fit(x, y, epochs=3, batch_size=32, verbose=0)  # 282 steps
    scores = model.evaluate(xt, yt)
    # Chance is 0.1 and ln(10) = 2.30. The trajectory (Adam at 0.01, BatchNorm, 3,000 samples)
    # depends on float32 summation order: 0.775 on 2 Numba threads, 0.817 on 1 (measured), so
    # the bound leaves room for that and still fails a network that does not learn.
    assert scores["accuracy"] > 0.7 and scores["loss"] < 1.0, scores


@pytest.mark.parametrize("layer_cls", ["BatchNorm2D", "BatchNorm1D"])
def test_batchnorm_layers_track_pytorchs_running_statistics(torch, layer_cls):
    """Five training steps, then inference: outputs, input gradients and the running mean and
    (unbiased) variance equal PyTorch's BatchNorm with momentum 1 - ours."""
    rng = np.random.default_rng(11)
    shape = (6, 3, 5, 4) if layer_cls == "BatchNorm2D" else (7, 5)
    layer = getattr(nn, layer_cls)(momentum=0.8, epsilon=1e-3)
    tmod = (torch.nn.BatchNorm2d if layer_cls == "BatchNorm2D" else torch.nn.BatchNorm1d)(
        shape[1], eps=1e-3, momentum=0.2
    ).double()
    x0 = rng.standard_normal(shape).astype(np.float32)
    layer.forward(x0)  # build
    gamma = rng.uniform(0.5, 1.5, shape[1]).astype(np.float32)
    beta = rng.standard_normal(shape[1]).astype(np.float32)
    layer.params["gamma"][...], layer.params["beta"][...] = gamma, beta
    with torch.no_grad():
        tmod.weight.copy_(torch.from_numpy(gamma.astype(np.float64)))
        tmod.bias.copy_(torch.from_numpy(beta.astype(np.float64)))
    for step in range(5):
        x = (rng.standard_normal(shape) * (step + 1) + step).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        y = layer.forward(x, training=True)
        dx = layer.backward(dy)
        tx = torch.from_numpy(x.astype(np.float64)).requires_grad_()
        ty = tmod.train()(tx)
        ty.backward(torch.from_numpy(dy.astype(np.float64)))
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(layer.grads["gamma"], tmod.weight.grad.numpy(), rtol=1e-4,
                                   atol=1e-4)  # fmt: skip
        tmod.zero_grad()
    np.testing.assert_allclose(layer.buffers["moving_mean"], tmod.running_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(layer.buffers["moving_variance"], tmod.running_var.numpy(),
                               rtol=1e-5)  # fmt: skip
    x = rng.standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        want = tmod.eval()(torch.from_numpy(x.astype(np.float64))).numpy()
    np.testing.assert_allclose(layer.forward(x), want, rtol=1e-4, atol=1e-5)
