"""Sequential: gradients end to end, training, checkpoints, weights, callbacks, fp16, errors."""

import json

import numpy as np
import pytest
from _gradcheck import numeric_grad_entries, sample_indices

from fastconv.models import deep_mnist_net
from fastconv.nn import (
    Adam,
    AvgPool2D,
    Callback,
    Conv2D,
    CSVLogger,
    Dense,
    Dropout,
    EarlyStopping,
    Flatten,
    JSONLogger,
    LearningRateScheduler,
    MaxPool2D,
    ModelCheckpoint,
    ReLU,
    Sequential,
    SoftmaxCrossEntropy,
    load_model,
)


def tiny_net(seed=0, dropout=0.0):
    return Sequential(
        [
            Conv2D(4, 3, padding=1, activation="relu"),
            MaxPool2D(2),
            Conv2D(6, 3, stride=1, padding=0),
            ReLU(),
            AvgPool2D(2),
            Flatten(),
            Dense(8),
            ReLU(),
            Dropout(dropout),
            Dense(3, kernel_initializer="glorot_uniform"),
        ],
        seed=seed,
    )


def toy_data(n=60, seed=0):
    """Three classes that differ by where a bright blob sits: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 0.1, (n, 1, 10, 10)).astype(np.float32)
    for i, label in enumerate(y):
        x[i, 0, 1 + 3 * label : 4 + 3 * label, 2:8] += 1.0
    return x, y.astype(np.int64)


# --- loss ------------------------------------------------------------------------------------


def test_softmax_cross_entropy_value_and_gradient():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((5, 4)).astype(np.float32) * 3
    y = np.array([0, 3, 1, 1, 2])
    loss = SoftmaxCrossEntropy()
    value = loss.forward(s, y)
    s64 = s.astype(np.float64)
    logp = s64 - np.log(np.exp(s64).sum(1, keepdims=True))
    assert value == pytest.approx(-logp[np.arange(5), y].mean(), rel=1e-6)
    d = loss.backward()
    onehot = np.eye(4)[y]
    np.testing.assert_allclose(d, (np.exp(logp) - onehot) / 5, rtol=1e-5, atol=1e-7)
    # one-hot targets give the same value; huge scores stay finite (log-sum-exp)
    assert loss.forward(s, onehot.astype(np.float32)) == pytest.approx(value, rel=1e-6)
    assert np.isfinite(loss.forward(s * 1e4, y))
    # numerical gradient of the loss itself
    eps = 1e-2
    for idx in [(0, 0), (2, 1), (4, 3)]:
        sp, sm = s.copy(), s.copy()
        sp[idx] += eps
        sm[idx] -= eps
        num = (loss.forward(sp, y) - loss.forward(sm, y)) / (2 * eps)
        assert d[idx] == pytest.approx(num, rel=2e-2, abs=1e-4)


def test_loss_label_errors():
    s = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        SoftmaxCrossEntropy().forward(s, np.array([0, 1, 4]))
    with pytest.raises(ValueError, match="3 labels"):
        SoftmaxCrossEntropy().forward(s, np.array([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        SoftmaxCrossEntropy().forward(s, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(RuntimeError, match="forward"):
        SoftmaxCrossEntropy().backward()


# --- model gradients and training -------------------------------------------------------------


def test_model_gradients_match_finite_differences():
    """Whole-model backward (loss included) against central differences of the loss."""
    model = tiny_net(seed=3)
    model.compile("sgd")
    x, y = toy_data(8, seed=1)
    model.build(x.shape[1:])
    scores = model.forward(x, training=True)
    model.loss.forward(scores, y)
    model.backward(model.loss.backward())
    rng = np.random.default_rng(0)

    def loss_value():
        return np.array(model.loss.forward(model.forward(x), y))

    for p, g in zip(model.parameters(), model.gradients(), strict=True):
        idx = sample_indices(p.shape, 4, rng)
        num = numeric_grad_entries(loss_value, p, np.array(1.0), idx, eps=2e-4)
        ana = np.array([g[i] for i in idx], dtype=np.float64)
        np.testing.assert_allclose(ana, num, rtol=5e-2, atol=2e-3)


def test_backward_without_input_gradient_keeps_parameter_gradients():
    """need_dx=False (what train_on_batch uses) skips the first conv's dx only."""
    model = tiny_net(seed=3)
    model.compile("sgd")
    x, y = toy_data(8, seed=1)
    model.loss.forward(model.forward(x, training=True), y)
    dx = model.backward(model.loss.backward())
    assert dx.shape == x.shape
    full = [g.copy() for g in model.gradients()]
    model.loss.forward(model.forward(x, training=True), y)
    assert model.backward(model.loss.backward(), need_dx=False) is None
    for a, b in zip(model.gradients(), full, strict=True):
        np.testing.assert_array_equal(a, b)
    # Without need_dx no layer computes a gradient nobody asked for, whatever the first layer.
    net = Sequential([Flatten(), Dense(3)], seed=0)
    net.compile("sgd")
    net.loss.forward(net.forward(x, training=True), y)
    assert net.backward(net.loss.backward(), need_dx=False) is None
    net.loss.forward(net.forward(x, training=True), y)
    assert net.backward(net.loss.backward()).shape == x.shape


def test_fit_learns_and_history_is_recorded():
    x, y = toy_data(90)
    model = tiny_net(seed=1)
    model.compile(Adam(lr=0.01))
    before = model.evaluate(x, y)
    batches = []

    class CountBatches(Callback):
        def on_batch_end(self, batch, logs=None):
            batches.append(batch)

    hist = model.fit(
        x, y, epochs=8, batch_size=32, validation_data=(x, y), verbose=0, callbacks=[CountBatches()]
    )
    after = model.evaluate(x, y)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] >= 0.9
    assert hist.epoch == list(range(8))
    assert set(hist.history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(batches) == 8 * 3  # 90 samples / 32 -> 3 batches (last one partial)
    assert hist.history["val_accuracy"][-1] == pytest.approx(after["accuracy"])
    assert model.predict(x, batch_size=7).shape == (90, 3)


def test_fit_visits_every_sample_once_per_epoch():
    x, y = toy_data(25)
    x[:, 0, 0, 0] = np.arange(25)  # tag each sample
    model = tiny_net()
    model.compile("sgd")
    seen = []
    original = model._train_step  # the step fit runs (data checked once, per fit)

    def spy(xb, yb):
        seen.extend(xb[:, 0, 0, 0].astype(int).tolist())
        return original(xb, yb)

    model._train_step = spy
    model.fit(x, y, epochs=2, batch_size=10, verbose=0, seed=5)
    assert sorted(seen[:25]) == list(range(25)) and sorted(seen[25:]) == list(range(25))
    assert seen[:25] != list(range(25))  # shuffled


def test_seeded_models_are_reproducible():
    x, y = toy_data(30)
    a, b = tiny_net(seed=7, dropout=0.3), tiny_net(seed=7, dropout=0.3)
    for m in (a, b):
        m.compile("adam")
        m.fit(x, y, epochs=2, batch_size=10, verbose=0)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)


# --- the book's network -----------------------------------------------------------------------


def test_deep_mnist_net_shapes_and_param_count():
    model = deep_mnist_net(seed=0)
    assert model.built and model.input_shape == (1, 28, 28)  # built at construction
    scores = model.predict(np.zeros((2, 1, 28, 28), np.float32))
    assert scores.shape == (2, 10)
    shapes = [w.shape for w in model.get_weights()]
    assert shapes == [
        (16, 1, 3, 3), (16,), (16, 16, 3, 3), (16,), (32, 16, 3, 3), (32,), (32, 32, 3, 3), (32,),
        (64, 32, 3, 3), (64,), (64, 64, 3, 3), (64,), (1024, 50), (50,), (50, 10), (10,),
    ]  # fmt: skip
    convs = [(1, 16), (16, 16), (16, 32), (32, 32), (32, 64), (64, 64)]
    expected = sum(cin * cout * 9 + cout for cin, cout in convs) + 1024 * 50 + 50 + 50 * 10 + 10
    assert model.count_params() == expected == 123_552
    text = model.summary(print_fn=None)
    assert "123,552" in text
    for shape in ["16, 28, 28", "32, 16, 16", "32, 8, 8", "64, 4, 4", "(N, 1024)"]:
        assert shape in text
    convs = [layer for layer in model.layers if layer.kind == "conv"]
    assert [c.padding for c in convs] == [(1, 1)] * 3 + [(2, 2)] + [(1, 1)] * 2
    assert all(c.activation == "relu" for c in convs)
    # He init: std sqrt(2 / fan_in), biases zero
    w6 = model.get_weights()[10]
    assert w6.std() == pytest.approx(np.sqrt(2 / (64 * 9)), rel=0.05)
    assert not model.get_weights()[11].any()


# --- weights and checkpoints --------------------------------------------------------------


def test_set_weights_round_trip_and_errors():
    x, _ = toy_data(4)
    a, b = tiny_net(seed=1), tiny_net(seed=2)
    a.build(x.shape[1:])
    b.build(x.shape[1:])
    b.set_weights(a.get_weights())
    np.testing.assert_array_equal(a.predict(x), b.predict(x))
    weights = a.get_weights()
    with pytest.raises(ValueError, match="list of 8 arrays"):
        b.set_weights(weights[:-1])
    with pytest.raises(ValueError, match=r"weights\[0\] \(conv2d_1/W\) must have shape \(4, 1, 3"):
        b.set_weights([np.zeros((4, 1, 3, 2), np.float32)] + weights[1:])
    with pytest.raises(TypeError, match=r"weights\[1\] must have a floating dtype"):
        b.set_weights([weights[0], np.zeros(4, np.int32)] + weights[2:])
    with pytest.raises(RuntimeError, match="not built"):
        tiny_net().set_weights(weights)


def test_save_load_is_bit_exact_and_resumes_training(tmp_path):
    x, y = toy_data(40)
    model = tiny_net(seed=4, dropout=0.2)
    model.compile(Adam(lr=0.005))
    model.fit(x, y, epochs=2, batch_size=10, verbose=0)
    path = tmp_path / "ckpt.npz"
    model.save(path, include_optimizer=True, epoch=2, extra={"note": "hi"})
    loaded = load_model(path)
    for wa, wb in zip(model.get_weights(), loaded.get_weights(), strict=True):
        assert wa.dtype == wb.dtype
        np.testing.assert_array_equal(wa, wb)
    assert loaded.checkpoint_meta["epoch"] == 2 and loaded.checkpoint_meta["extra"] == {
        "note": "hi"
    }
    assert type(loaded.optimizer) is Adam and loaded.optimizer.iterations == 8
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    # same optimizer state and generator state: further training matches exactly
    model.fit(x, y, epochs=1, batch_size=10, verbose=0)
    loaded.fit(x, y, epochs=1, batch_size=10, verbose=0)
    for wa, wb in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    # nothing in the file needs pickle
    with np.load(path, allow_pickle=False) as data:
        arch = json.loads(str(data["__architecture__"][()]))
        assert arch["layers"][0]["class"] == "Conv2D"
        assert all(data[k].dtype != object for k in data.files)


def test_checkpoint_errors(tmp_path):
    model = tiny_net()
    with pytest.raises(RuntimeError, match="not built"):
        model.save(tmp_path / "a.npz")
    model.build((1, 10, 10))
    with pytest.raises(ValueError, match=".npz"):
        model.save(tmp_path / "a.pkl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a fastconv checkpoint"):
        load_model(tmp_path / "other.npz")
    model.save(tmp_path / "a.npz")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_to_float16_inference_agrees_with_float32():
    x, y = toy_data(200, seed=3)
    model = tiny_net(seed=2)
    model.compile(Adam(lr=0.01))
    model.fit(x[:120], y[:120], epochs=6, batch_size=20, verbose=0)
    half = model.to(dtype="float16")
    assert half.dtype == np.float16 and all(p.dtype == np.float16 for p in half.parameters())
    assert model.dtype == np.float32 and model.parameters()[0].dtype == np.float32
    s32 = model.predict(x[120:])
    s16 = half.predict(x[120:])
    assert s16.dtype == np.float16
    np.testing.assert_allclose(
        s16.astype(np.float32), s32, rtol=2e-2, atol=2e-2 * np.abs(s32).max()
    )
    acc32 = model.evaluate(x[120:], y[120:])["accuracy"]
    acc16 = half.evaluate(x[120:], y[120:])["accuracy"]
    assert acc32 > 0.9 and abs(acc32 - acc16) <= 0.002 + 1 / 80  # at most one of 80 digits differs
    # the copy is independent of the original
    half.parameters()[0][...] = 0
    assert model.parameters()[0].any()


# --- callbacks ------------------------------------------------------------------------------


class _StubModel:
    def __init__(self):
        self.stop_training = False
        self.weights = [np.zeros(1)]
        self.optimizer = type("O", (), {"lr": 0.1})()

    def get_weights(self):
        return [w.copy() for w in self.weights]

    def set_weights(self, weights):
        self.weights = [w.copy() for w in weights]


def test_early_stopping_patience_and_restore():
    stub = _StubModel()
    cb = EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    cb.set_model(stub)
    cb.on_train_begin()
    losses = [1.0, 0.5, 0.6, 0.55]  # best at epoch 1, then two epochs without improvement
    for epoch, loss in enumerate(losses):
        stub.weights = [np.array([float(epoch)])]
        cb.on_epoch_end(epoch, {"val_loss": loss})
        assert stub.stop_training == (epoch == 3)
    cb.on_train_end()
    assert cb.best_epoch == 1 and cb.stopped_epoch == 3
    np.testing.assert_array_equal(stub.weights[0], [1.0])
    acc = EarlyStopping(monitor="val_accuracy", patience=0)
    acc.set_model(_StubModel())
    acc.on_train_begin()
    acc.on_epoch_end(0, {"val_accuracy": 0.5})
    acc.on_epoch_end(1, {"val_accuracy": 0.6})  # accuracy: higher is better
    assert not acc.model.stop_training
    acc.on_epoch_end(2, {"val_accuracy": 0.6})
    assert acc.model.stop_training
    with pytest.raises(KeyError, match="validation_data"):
        acc.on_epoch_end(3, {"loss": 1.0})


def test_early_stopping_stops_fit():
    x, y = toy_data(30)
    model = tiny_net()
    model.compile("sgd")
    stop = EarlyStopping(monitor="loss", patience=0, min_delta=1e9)  # never "improves" enough
    hist = model.fit(x, y, epochs=10, batch_size=10, verbose=0, callbacks=[stop])
    assert hist.epoch == [0, 1]


def test_model_checkpoint_saves_only_improvements(tmp_path):
    model = tiny_net()
    model.build((1, 10, 10))
    path = tmp_path / "best.npz"
    cb = ModelCheckpoint(path, monitor="val_accuracy", save_best_only=True)
    cb.set_model(model)
    saved_epochs = []
    for epoch, acc in enumerate([0.5, 0.4, 0.7, 0.7]):
        model.parameters()[0][...] = epoch
        cb.on_epoch_end(epoch, {"val_accuracy": acc})
        saved_epochs.append(load_model(path).checkpoint_meta["epoch"])
    assert saved_epochs == [1, 1, 3, 3]
    assert (load_model(path).get_weights()[0] == 2).all()
    every = ModelCheckpoint(tmp_path / "e{epoch:02d}.npz", save_best_only=False)
    every.set_model(model)
    every.on_epoch_end(0, {})
    every.on_epoch_end(1, {})
    assert (tmp_path / "e01.npz").exists() and (tmp_path / "e02.npz").exists()


def test_scheduler_and_loggers(tmp_path):
    x, y = toy_data(20)
    model = tiny_net()
    model.compile(Adam(lr=0.01))
    lrs = []

    class RecordLR(Callback):
        def on_epoch_end(self, epoch, logs=None):
            lrs.append(self.model.optimizer.lr)

    sched = LearningRateScheduler(lambda epoch, lr: 0.01 * 0.5**epoch)
    csv_path, json_path = tmp_path / "log.csv", tmp_path / "log.json"
    model.fit(
        x,
        y,
        epochs=3,
        batch_size=10,
        verbose=0,
        validation_data=(x, y),
        callbacks=[sched, RecordLR(), CSVLogger(csv_path), JSONLogger(json_path)],
    )
    assert lrs == pytest.approx([0.01, 0.005, 0.0025])
    rows = csv_path.read_text().strip().splitlines()
    assert rows[0].split(",")[:2] == ["epoch", "accuracy"] and len(rows) == 4
    data = json.loads(json_path.read_text())
    assert data["epoch"] == [0, 1, 2] and len(data["val_accuracy"]) == 3


# --- bad input ------------------------------------------------------------------------------


def test_user_input_errors():
    x, y = toy_data(10)
    model = tiny_net()
    with pytest.raises(RuntimeError, match="compile"):
        model.fit(x, y, verbose=0)
    model.compile("adam")
    with pytest.raises(ValueError, match="10 entries"):
        model.fit(x, y[:5], verbose=0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        model.fit(x, np.full(10, 3), verbose=0)
    with pytest.raises(ValueError, match="per-sample shape"):
        model.predict(np.zeros((2, 1, 9, 9), np.float32))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        model.predict([[1, 2]])
    with pytest.raises(TypeError, match="batch_size"):
        model.predict(x, batch_size=2.5)
    with pytest.raises(ValueError, match="validation_data"):
        model.fit(x, y, validation_data=x, verbose=0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        model.compile("newton")
    with pytest.raises(ValueError, match="backend"):
        Sequential([Dense(2)], backend="tpu")
    with pytest.raises(ValueError, match="dtype"):
        model.to(dtype="float64")
    with pytest.raises(TypeError, match="Layer"):
        Sequential([lambda v: v])
    # uint8 images are accepted and cast per batch, with a warning about their scale
    with pytest.warns(UserWarning, match="uint8: values are cast to float32 unscaled"):
        assert model.predict((x * 255).astype(np.uint8)).dtype == np.float32


# --- GPU (skipped where no usable CUDA device exists) -------------------------------------------


@pytest.mark.gpu
def test_gpu_model_matches_cpu_and_trains(tmp_path):
    import fastconv
    from fastconv._checks import is_cupy_array

    if not fastconv.gpu_available():
        from fastconv import gpu

        pytest.skip(f"no usable GPU: {gpu.unavailable_reason()}")
    x, y = toy_data(60)
    cpu = tiny_net(seed=5)
    cpu.compile(Adam(lr=0.01))
    cpu.build(x.shape[1:])
    dev = cpu.to("gpu")
    assert dev.backend.name == "gpu" and is_cupy_array(dev.parameters()[0])
    np.testing.assert_allclose(
        fastconv.to_cpu(dev.predict(x)), cpu.predict(x), rtol=1e-4, atol=1e-4
    )
    for m in (cpu, dev):
        m.rng = np.random.default_rng(0)
        for layer in m.layers:
            layer.rng = m.rng
    a = cpu.train_on_batch(x, y)
    b = dev.train_on_batch(x, y)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    for wc, wg in zip(cpu.get_weights(), dev.get_weights(), strict=True):
        np.testing.assert_allclose(wg, wc, rtol=1e-3, atol=1e-5)
    # The same code path on the CPU reaches 100% after 10 epochs (0.73 after 5).
    dev.fit(x, y, epochs=10, batch_size=20, verbose=0)
    assert dev.evaluate(x, y)["accuracy"] > 0.9
    dev.save(tmp_path / "g.npz")
    back = load_model(tmp_path / "g.npz")
    np.testing.assert_array_equal(back.get_weights()[0], dev.get_weights()[0])
    half = dev.to(dtype="float16")
    s16 = fastconv.to_cpu(half.predict(x)).astype(np.float32)
    s32 = fastconv.to_cpu(dev.predict(x))
    np.testing.assert_allclose(s16, s32, rtol=2e-2, atol=2e-2 * np.abs(s32).max())


def test_resumed_fit_equals_uninterrupted_fit(tmp_path):
    """Checkpoint after epoch 1 (weights, optimizer, generator), resume: same as never stopping."""
    x, y = toy_data(40)
    straight = tiny_net(seed=9, dropout=0.3)
    straight.compile(Adam(lr=0.01))
    straight.fit(x, y, epochs=3, batch_size=10, verbose=0)
    first = tiny_net(seed=9, dropout=0.3)
    first.compile(Adam(lr=0.01))
    first.fit(x, y, epochs=1, batch_size=10, verbose=0)
    first.save(tmp_path / "last.npz", include_optimizer=True, epoch=1)
    resumed = load_model(tmp_path / "last.npz")
    resumed.fit(x, y, epochs=3, batch_size=10, verbose=0, initial_epoch=1)
    for a, b in zip(straight.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
