"""The prepared inference path: fastconv.prepare_conv2d and Model.predict through it.

Oracles: the unprepared path (``fastconv.conv2d``, ``predict(prepared=False)``), which the
prepared one must match bit for bit (the same kernels and work items, the residual added and
rounded as the separate Add and ReLU round it), and the float64 reference.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastconv as fc
from fastconv import nn
from fastconv import reference as ref
from fastconv.models import deep_mnist_net, resnet_mnist
from fastconv.prepared import prepare_conv2d, prepare_dense, prepare_max_pool2d
from tests.conftest import assert_close

GEOMETRIES = [
    # N, C, H, F, k, stride, pad: Winograd (serial and parallel), direct, unfolded
    (1, 16, 12, 16, 3, 1, 1),
    (40, 8, 14, 8, 3, 1, 2),
    (3, 1, 11, 6, 3, 1, 1),
    (2, 4, 13, 5, 3, 2, 1),
    (2, 3, 15, 8, 7, 2, 3),
    (3, 6, 9, 7, 1, 1, 0),
]


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


def _conv_case(rng, dtype, N, C, H, F, k, stride, pad):
    x = rng.standard_normal((N, C, H, H)).astype(dtype)
    w = (rng.standard_normal((F, C, k, k)) / np.sqrt(C * k * k)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    return x, w, b


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_prepared_conv_is_conv2d_bit_for_bit(geometry, dtype, rng):
    N, C, H, F, k, stride, pad = geometry
    x, w, b = _conv_case(rng, dtype, *geometry)
    prepared = prepare_conv2d(w, b, stride, pad)
    for act in (None, "relu"):
        y = fc.conv2d(x, w, b, stride, pad, act)
        assert np.array_equal(_bits(prepared(x, act)), _bits(y))
        assert np.array_equal(_bits(prepared(x, act)), _bits(y))  # plan reused
        res = rng.standard_normal(y.shape).astype(dtype)
        unfused = fc.conv2d(x, w, b, stride, pad) + res
        if act:
            unfused = fc.relu(unfused)
        fused = prepared(x, act, residual=res)
        assert np.array_equal(_bits(fused), _bits(unfused))
        expected = ref.conv2d(x, w, b, stride, pad) + res.astype(np.float64)
        if act:
            expected = np.maximum(expected, 0.0)
        assert_close(fused, expected, dtype, k=C * k * k)


def test_prepared_conv_copies_its_weights(rng):
    x, w, b = _conv_case(rng, np.float32, 2, 8, 10, 8, 3, 1, 1)
    prepared = prepare_conv2d(w, b, 1, 1)
    before = prepared(x)
    w *= 2  # the prepared object never sees later writes to the arrays it was made from
    assert np.array_equal(prepared(x), before)


@pytest.mark.parametrize("algorithm", ["winograd4x4", "direct", "unfolded"])
def test_batch_one_serial_kernel_matches_batch_slices(rng, dtype, algorithm):
    # Batch 1 runs the serial twins, batch 40 the parallel kernels: per image the same bits.
    x, w, b = _conv_case(rng, dtype, 40, 16, 14, 16, 3, 1, 1)
    prepared = prepare_conv2d(w, b, 1, 1)
    previous = fc.set_conv_algorithm(algorithm)
    try:
        whole = prepared(x, "relu")
        for i in (0, 17, 39):
            one = prepared(x[i : i + 1], "relu")
            assert np.array_equal(_bits(one), _bits(whole[i : i + 1]))
    finally:
        fc.set_conv_algorithm(previous)


def test_one_small_image_goes_direct(rng):
    # Winograd's runs (tile columns x images) would fill under half a vector.
    x, w, b = _conv_case(rng, np.float32, 2, 16, 14, 16, 3, 1, 1)
    big = rng.standard_normal((1, 16, 40, 40)).astype(np.float32)
    fc.clear_conv_algorithm_choices()
    fc.conv2d(x[:1], w, b, 1, 1)  # 4 tile columns x 1 image
    fc.conv2d(x, w, b, 1, 1)  # 4 x 2
    fc.conv2d(big, w, b, 1, 1)  # 10 x 1
    fc.conv2d_backward(np.ones((1, 16, 14, 14), np.float32), x[:1], w, 1, 1)
    algorithms = [(c.pass_, c.x_shape[0], c.algorithm) for c in fc.conv_algorithm_choices()]
    assert algorithms == [
        ("forward", 1, "direct"),
        ("forward", 2, "winograd4x4"),
        ("forward", 1, "winograd4x4"),
        ("backward", 1, "winograd4x4"),
    ]


def test_prepared_conv_falls_back_like_conv2d(rng):
    # Values Winograd must not transform: both paths redo the call on the exact GEMM path.
    x, w, b = _conv_case(rng, np.float32, 2, 8, 10, 8, 3, 1, 1)
    x[0, 0, 3, 3] = np.inf
    x[1, 2, 5, 5] = np.nan
    prepared = prepare_conv2d(w, b, 1, 1)
    assert np.array_equal(_bits(prepared(x, "relu")), _bits(fc.conv2d(x, w, b, 1, 1, "relu")))
    w[0, 0, 0, 0] = 2.0**60
    prepared = prepare_conv2d(w, b, 1, 1)
    x = rng.standard_normal(x.shape).astype(np.float32)
    assert np.array_equal(_bits(prepared(x)), _bits(fc.conv2d(x, w, b, 1, 1)))


def test_prepared_conv_follows_the_algorithm_setting(rng):
    x, w, b = _conv_case(rng, np.float32, 2, 8, 10, 8, 3, 1, 1)
    prepared = prepare_conv2d(w, b, 1, 1)
    prepared(x)
    previous = fc.set_conv_algorithm("direct")
    try:
        assert np.array_equal(_bits(prepared(x)), _bits(fc.conv2d(x, w, b, 1, 1, None, "direct")))
    finally:
        fc.set_conv_algorithm(previous)


def test_prepared_conv_refuses_bad_input(rng):
    x, w, b = _conv_case(rng, np.float32, 2, 8, 10, 8, 3, 1, 1)
    with pytest.raises(TypeError, match="w must"):
        prepare_conv2d(w.astype(np.float64), b)
    with pytest.raises(ValueError, match="b must have length"):
        prepare_conv2d(w, b[:3])
    prepared = prepare_conv2d(w, b, 1, 1)
    with pytest.raises(ValueError, match="input channels"):
        prepared(x[:, :4])
    with pytest.raises(TypeError, match="same dtype as x"):
        prepared(x.astype(np.float16))
    with pytest.raises(TypeError, match="x must"):
        prepared([1.0])
    with pytest.raises(ValueError, match="activation"):
        prepared(x, "tanh")
    with pytest.raises(ValueError, match="residual must have"):
        prepared(x, residual=np.zeros((2, 8, 9, 10), np.float32))
    with pytest.raises(ValueError, match="residual must have"):
        prepared(x, residual=np.zeros((2, 8, 10, 10), np.float16))
    with pytest.raises(TypeError, match="residual must be"):
        prepared(x, residual=[0.0])
    assert prepared(x[:0]).shape == (0, 8, 10, 10)


# --- models --------------------------------------------------------------------------------------


def _randomise_batch_norm(model, rng):
    for layer in model.layers:
        if "moving_mean" in layer.buffers:
            C = layer.buffers["moving_mean"].shape[0]
            layer.set_weight("moving_mean", (rng.standard_normal(C) * 0.2).astype(np.float32))
            layer.set_weight("moving_variance", rng.uniform(0.5, 2.0, C).astype(np.float32))


def _same_predictions(model, x):
    a = model.predict(x, batch_size=4, prepared=True)
    b = model.predict(x, batch_size=4, prepared=False)
    assert np.array_equal(_bits(a), _bits(b))
    return a


def test_residual_add_and_relu_run_in_the_conv_epilogue():
    model = resnet_mnist(seed=0)
    steps = model.execution_plan(False)
    fused = [s for s in steps if s.residual]
    assert len(fused) == 3  # one per BasicBlock
    for step in fused:
        kinds = [type(layer).__name__ for layer in step.layers]
        assert kinds == ["Conv2D", "BatchNorm2D", "Add", "ReLU"]
        assert step.prepared and step.fuse_relu and len(step.inputs) == 2
    assert not any(s.residual for s in model.execution_plan(False, prepared=False))
    assert not any(s.prepared for s in model.execution_plan(True))


def test_train_predict_train_predict_matches_the_unprepared_path(rng):
    model = resnet_mnist(seed=0).compile(optimizer="adam", loss="softmax_cross_entropy")
    x = rng.standard_normal((8, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    model.train_on_batch(x, y)
    first = _same_predictions(model, x)
    model.train_on_batch(x, y)  # the optimizer step and the moving statistics bump versions
    second = _same_predictions(model, x)
    assert not np.array_equal(first, second)
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    third = _same_predictions(model, x)
    assert not np.array_equal(second, third)


def test_prepared_model_against_the_float64_reference(rng):
    # resnet_mnist's first block by hand in float64: conv-BN-ReLU, conv-BN + shortcut, ReLU.
    model = resnet_mnist(seed=0)
    _randomise_batch_norm(model, rng)
    x = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
    layers = {layer.name: layer for layer in model.layers}

    def conv_bn(h, conv, bn):
        c, n = layers[conv], layers[bn]
        z = ref.conv2d(h, c.params["W"], None, c.stride, c.padding)
        p, s = n.params, n.buffers
        return ref.batch_norm_inference(z, p["gamma"], p["beta"], s["moving_mean"],
                                        s["moving_variance"], n.epsilon)  # fmt: skip

    h = np.maximum(conv_bn(x, "conv1", "bn1"), 0)
    z = np.maximum(conv_bn(h, "layer1.0.conv1", "layer1.0.bn1"), 0)
    expected = np.maximum(conv_bn(z, "layer1.0.conv2", "layer1.0.bn2") + h, 0)
    # The model's inference plan by hand, up to its first fused residual step.
    values = {model._input.id: x}
    for step in model.execution_plan(False):
        xs = [values[t] for t in step.inputs]
        if step.prepared:
            residual = xs[1] if step.residual else None
            out = step.layer.call_prepared(xs[0], step.folded_bn, step.fuse_relu, residual)
        else:
            out = step.layer.call(xs if step.layer.multi_input else xs[0])[0]
        values[step.output] = out
        if step.residual:
            break
    actual = out
    assert_close(actual, expected, np.float32, k=16 * 9 * 3)


def test_set_weights_and_loading_invalidate(tmp_path, rng):
    model = resnet_mnist(seed=0)
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    before = _same_predictions(model, x)
    other = resnet_mnist(seed=1)
    _randomise_batch_norm(other, rng)
    model.set_weights(other.get_weights())
    after = _same_predictions(model, x)
    assert np.array_equal(after, other.predict(x, batch_size=4, prepared=False))
    assert not np.array_equal(before, after)
    path = tmp_path / "m.npz"
    other.save(path)
    loaded = nn.load_model(path)
    assert np.array_equal(_same_predictions(loaded, x), after)
    # set_weight on one layer (what the loader and to() use)
    conv = next(layer for layer in model.layers if layer.kind == "conv")
    conv.set_weight("W", conv.params["W"] * np.float32(0.5))
    _same_predictions(model, x)


def test_weights_are_prepared_from_the_second_call_that_sees_them(rng):
    """predict's default (prepared=None): the first call after the weights changed runs the
    unprepared path and prepares nothing (a predict between training steps would pay for a
    preparation it never reuses); the next call with the same weights prepares them."""
    model = deep_mnist_net(seed=0)
    model.compile(optimizer="adam")
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    dense = next(layer for layer in model.layers if layer.kind == "dense")
    first = model.predict(x)
    assert dense._prepared is None
    assert np.array_equal(_bits(first), _bits(model.predict(x, prepared=False)))
    second = model.predict(x)
    assert dense._prepared is not None and dense._prepared[0] == dense.weights_version
    assert np.array_equal(_bits(second), _bits(model.predict(x, prepared=True)))
    model.train_on_batch(x, rng.integers(0, 10, 4))
    after = model.predict(x)  # new weights: unprepared, nothing prepared for them
    assert dense._prepared is None or dense._prepared[0] != dense.weights_version
    assert np.array_equal(_bits(after), _bits(model.predict(x, prepared=False)))
    model.predict(x)
    assert dense._prepared[0] == dense.weights_version


def test_in_place_writes_need_weights_changed(rng):
    model = deep_mnist_net(seed=0)
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    stale = model.predict(x, prepared=True)
    model.layers[0].params["W"][...] *= 2  # not seen: the documented rule
    assert np.array_equal(model.predict(x, prepared=True), stale)
    model.layers[0].weights_changed()
    _same_predictions(model, x)
    model.layers[1].params["b"][...] += 1
    model.weights_changed()
    _same_predictions(model, x)


def test_float16_models(rng):
    model = resnet_mnist(seed=0)
    _randomise_batch_norm(model, rng)
    half = model.to(dtype="float16")
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float16)
    y = _same_predictions(half, x)
    assert y.dtype == np.float16
    deep = deep_mnist_net(seed=0).to(dtype="float16")
    _same_predictions(deep, x)


def test_predict_prepared_argument_is_checked(rng):
    model = deep_mnist_net(seed=0)
    with pytest.raises(TypeError, match="prepared must be"):
        model.predict(np.zeros((1, 1, 28, 28), np.float32), prepared="yes")


# --- Dense: weights packed once (fastconv.prepared.prepare_dense) ------------------------------

DENSE_SHAPES = [(1, 1, 1), (3, 7, 5), (8, 600, 33), (13, 1024, 50), (100, 97, 1000), (2, 1500, 4),
                (1, 1024, 50), (2, 600, 97), (1, 33, 70)]  # fmt: skip


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=str)
def test_prepared_dense_is_dense_bit_for_bit(shape, dtype, rng):
    M, K, N = shape
    x = rng.standard_normal((M, K)).astype(dtype)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(dtype)
    b = rng.standard_normal(N).astype(dtype)
    prepared = prepare_dense(w, b)
    for act in (None, "relu"):
        y = fc.dense(x, w, b, act)
        assert np.array_equal(_bits(prepared(x, act)), _bits(y))
        res = rng.standard_normal(y.shape).astype(dtype)
        separate = fc.dense(x, w, b) + res
        if act:
            separate = fc.relu(separate)
        assert np.array_equal(_bits(prepared(x, act, residual=res)), _bits(separate))
    assert np.array_equal(_bits(prepare_dense(w)(x)), _bits(fc.dense(x, w)))
    expected = x.astype(np.float64) @ w.astype(np.float64) + b
    assert_close(prepared(x), expected, dtype, k=K)


@pytest.mark.parametrize("K, N", [(1024, 50), (33, 70), (600, 97), (5, 1)])
def test_prepared_dense_rows_do_not_depend_on_the_batch(K, N, dtype, rng):
    """One or two rows take the row-by-row product (matmul_panels), more the MR-row tiles:
    every row has the same bits either way."""
    x = rng.standard_normal((11, K)).astype(dtype)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(dtype)
    b = rng.standard_normal(N).astype(dtype)
    prepared = prepare_dense(w, b)
    whole = prepared(x, "relu")
    for lo, hi in ((0, 1), (3, 5), (10, 11)):
        assert np.array_equal(_bits(prepared(x[lo:hi], "relu")), _bits(whole[lo:hi]))


def test_prepared_dense_copies_its_weights_and_refuses_bad_input(rng):
    w = rng.standard_normal((6, 4)).astype(np.float32)
    x = rng.standard_normal((2, 6)).astype(np.float32)
    prepared = prepare_dense(w)
    before = prepared(x)
    w[...] = 0
    assert np.array_equal(prepared(x), before)
    with pytest.raises(ValueError, match="w must have 7 rows"):
        prepared(np.zeros((2, 7), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        prepared(x.astype(np.float16))
    with pytest.raises(ValueError, match="residual must have"):
        prepared(x, residual=np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="activation"):
        prepared(x, "tanh")
    with pytest.raises(ValueError, match="b must have length 4"):
        prepare_dense(w, np.zeros(3, np.float32))


def test_models_predict_through_prepared_dense(rng):
    model = deep_mnist_net(seed=0)
    dense = [s for s in model.execution_plan(False) if type(s.layer).__name__ == "Dense"]
    assert dense and all(s.prepared for s in dense)
    x = rng.standard_normal((5, 1, 28, 28)).astype(np.float32)
    _same_predictions(model, x)
    model.compile(optimizer="adam", loss="softmax_cross_entropy")
    first = _same_predictions(model, x)
    model.train_on_batch(x, rng.integers(0, 10, 5))  # the step bumps the Dense versions
    assert not np.array_equal(_same_predictions(model, x), first)


def test_a_residual_add_after_dense_runs_in_its_epilogue(rng):
    inp = nn.Input(shape=(12,))
    h = nn.Dense(12, activation="relu")(inp)
    z = nn.ReLU()(nn.Add()([nn.Dense(12)(h), h]))
    model = nn.Model(inp, nn.Dense(3)(z), seed=0)
    fused = [s for s in model.execution_plan(False) if s.residual]
    assert [[type(layer).__name__ for layer in s.layers] for s in fused] == [
        ["Dense", "Add", "ReLU"]
    ]
    x = rng.standard_normal((7, 12)).astype(np.float32)
    out = _same_predictions(model, x)
    layers = [layer for layer in model.layers if type(layer).__name__ == "Dense"]
    p = [(layer.params["W"].astype(np.float64), layer.params["b"]) for layer in layers]
    h64 = np.maximum(x @ p[0][0] + p[0][1], 0)
    z64 = np.maximum(h64 @ p[1][0] + p[1][1] + h64, 0)
    assert_close(out, z64 @ p[2][0] + p[2][1], np.float32, k=24)


class _Counting(nn.Hook):
    def __init__(self):
        self.layers = []

    def begin(self, event, layer):
        self.layers.append(layer.name)


def _branchy_model():
    """An input read by three branches, a Concatenate, a residual Add absorbed into a
    convolution, a ReLU6 and a Dropout: every kind of step an inference program binds."""
    inp = nn.Input(shape=(3, 12, 12))
    a = nn.Conv2D(4, 3, padding=1, activation="relu")(inp)
    b = nn.ReLU6()(nn.BatchNorm2D()(nn.Conv2D(4, 1, use_bias=False)(inp)))
    c = nn.MaxPool2D(3, 1, padding=1)(inp)
    x = nn.Concatenate()([a, b, c])
    y = nn.BatchNorm2D()(nn.Conv2D(11, 3, padding=1, use_bias=False)(x))
    x = nn.ReLU()(nn.Add()([y, x]))
    x = nn.Dropout(0.5)(nn.Flatten()(nn.MaxPool2D(2)(x)))
    return nn.Model(inp, nn.Dense(5)(x), seed=3)


def _node_walk(model, x):
    """The graph evaluated node by node with each layer's own inference call (no plan)."""
    values = {model._input.id: x}
    for node in model._nodes:
        xs = [values[t.id] for t in node.inputs]
        y, _ = node.layer.call(xs if node.layer.multi_input else xs[0], training=False)
        values[node.output.id] = y
    return values[model._output.id]


@pytest.mark.parametrize(
    "make", [_branchy_model, lambda: resnet_mnist(seed=0)], ids=["branchy", "resnet"]
)
def test_inference_program_runs_the_plan(make, rng):
    """Inference runs the plan bound once (Model._inference_program): unfused, the layers'
    own calls node by node; fused and prepared, the unprepared fused path's bits; hooks
    see every step in order (the profiler's clock)."""
    model = make()
    x = rng.standard_normal((5, *model.input_shape)).astype(np.float32)
    model.fuse = False
    assert np.array_equal(_bits(model.predict(x)), _bits(_node_walk(model, x)))
    model.fuse = True
    assert any(s.residual for s in model.execution_plan(False, True))
    model.predict(x)  # (the first call with these weights runs unprepared)
    _same_predictions(model, x)
    hook = _Counting()
    model.hooks.append(hook)
    model.predict(x, batch_size=5)
    model.hooks.remove(hook)
    assert hook.layers == [s.layer.name for s in model.execution_plan(False, True)]


# --- max pooling validated once per input shape (fastconv.prepared.prepare_max_pool2d) --------

POOL_CASES = [  # size, stride, pad, ceil_mode, x shape
    (2, None, 0, False, (1, 16, 28, 28)),
    (2, None, 0, False, (3, 5, 7, 9)),
    (3, 2, 1, True, (2, 4, 13, 13)),
    (3, 1, (0, 1, 1, 0), False, (2, 3, 6, 5)),  # asymmetric: the op pads first
    (2, None, 0, False, (0, 3, 8, 8)),  # empty batch
]


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_prepared_max_pool_is_the_op(case, dtype, rng):
    size, stride, pad, ceil_mode, shape = case
    prepared = prepare_max_pool2d(size, stride, pad, ceil_mode)
    for _ in range(2):  # planned, then from the plan
        x = rng.standard_normal(shape).astype(dtype)
        expected = fc.max_pool2d(x, size, stride, pad, ceil_mode)
        assert np.array_equal(_bits(prepared(x)), _bits(expected))
        wide = rng.standard_normal(shape[:3] + (2 * shape[3],)).astype(dtype)
        view = wide[..., ::2]  # not C-contiguous
        assert np.array_equal(
            _bits(prepared(view)), _bits(fc.max_pool2d(view, size, stride, pad, ceil_mode))
        )


def test_prepared_max_pool_refuses_what_the_op_refuses():
    with pytest.raises(ValueError, match="pad must be at most half"):
        prepare_max_pool2d(2, 2, 2)
    prepared = prepare_max_pool2d(3, 1, 0)
    prepared(np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(ValueError):
        prepared(np.zeros((1, 1, 2, 2), np.float32))  # a window past the input
    with pytest.raises((TypeError, ValueError)):
        prepared(np.zeros((1, 4, 4), np.float32))
    with pytest.raises(TypeError):
        prepared(np.zeros((1, 1, 4, 4), np.float64))


def test_models_predict_through_prepared_max_pooling(rng):
    model = deep_mnist_net(seed=0)
    pools = [s for s in model.execution_plan(False) if type(s.layer).__name__ == "MaxPool2D"]
    assert len(pools) == 3 and all(s.prepared for s in pools)
    _same_predictions(model, rng.standard_normal((5, 1, 28, 28)).astype(np.float32))
