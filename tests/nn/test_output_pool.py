"""Kernel outputs reused across inference calls (fastconv/cpu/_outputs.py).

The danger of reusing memory is a caller seeing its result overwritten; the oracles are a
copy taken before the next call, the float64 reference and a model without the pool.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import fastconv as fc
from fastconv import reference as ref
from fastconv.cpu import _outputs
from fastconv.models import deep_mnist_net, resnet_mnist
from tests.conftest import assert_close

BIG = (64, 32, 32)  # 256 KiB of float32: pooled


def test_an_unreferenced_array_is_handed_out_again():
    pool = _outputs.OutputPool()
    with pool:
        a = _outputs.empty(BIG, np.float32)
        address = a.ctypes.data
        del a
        b = _outputs.empty(BIG, np.float32)
    assert b.ctypes.data == address


def test_an_array_held_or_viewed_is_never_handed_out_twice():
    pool = _outputs.OutputPool()
    with pool:
        held = _outputs.empty(BIG, np.float32)
        viewed = _outputs.empty(BIG, np.float32)
        view = viewed.reshape(-1)[:10]
        del viewed
        fresh = _outputs.empty(BIG, np.float32)
    addresses = {held.ctypes.data, view.ctypes.data, fresh.ctypes.data}
    assert len(addresses) == 3


def test_small_arrays_other_dtypes_and_no_pool():
    pool = _outputs.OutputPool()
    with pool:
        small = _outputs.empty((4, 4), np.float32)
        del small
        assert pool.nbytes == 0  # below MIN_BYTES: malloc's heap
        a = _outputs.empty(BIG, np.float32)
        address = a.ctypes.data
        del a
        half = _outputs.empty((128, 32, 32), np.float16)  # as many bytes, another dtype
        assert half.dtype == np.float16 and half.ctypes.data != address
        assert pool.nbytes == 2 * 256 * 1024
    outside = _outputs.empty(BIG, np.float32)  # no active pool: plain np.empty
    assert outside.ctypes.data != address and pool.nbytes == 2 * 256 * 1024


def test_the_pool_is_bounded():
    pool = _outputs.OutputPool(max_bytes=3 * 256 * 1024)
    with pool:
        held = [_outputs.empty(BIG, np.float32) for _ in range(6)]
    assert pool.nbytes == 3 * 256 * 1024  # the others were plain allocations
    del held
    pool = _outputs.OutputPool()
    with pool:
        held = [_outputs.empty(BIG, np.float32) for _ in range(_outputs.MAX_PER_SHAPE + 2)]
    assert pool.nbytes == _outputs.MAX_PER_SHAPE * 256 * 1024 and len(held) == 6


def test_pools_nest_and_belong_to_their_thread():
    outer, inner = _outputs.OutputPool(), _outputs.OutputPool()
    seen = []
    with outer:
        with inner:
            _outputs.empty(BIG, np.float32)
        thread = threading.Thread(target=lambda: seen.append(_outputs.empty(BIG, np.float32)))
        thread.start()
        thread.join()
        _outputs.empty(BIG, np.float32)
    assert inner.nbytes == outer.nbytes == 256 * 1024  # the thread had no pool active
    assert seen[0].shape == BIG


def test_kernel_results_survive_later_calls(rng):
    """conv2d/max_pool2d/relu/dense results kept by the caller stay what they were."""
    x = rng.standard_normal((8, 16, 32, 32)).astype(np.float32)
    w = (rng.standard_normal((16, 16, 3, 3)) / 12).astype(np.float32)
    wd = (rng.standard_normal((16 * 32 * 32, 64)) / 128).astype(np.float32)
    pool = _outputs.OutputPool()
    with pool:
        first = [fc.conv2d(x, w, None, 1, 1, "relu"), fc.max_pool2d(x, 2, 2), fc.relu(x)]
        first.append(fc.dense(first[0].reshape(8, -1), wd, None))
        copies = [a.copy() for a in first]
        for _ in range(3):  # the same shapes again, other values
            fc.conv2d(-x, w, None, 1, 1, "relu"), fc.max_pool2d(-x, 2, 2), fc.relu(-x)
    assert pool.nbytes > 0
    for kept, copy in zip(first, copies, strict=True):
        assert np.array_equal(kept, copy)
    assert_close(first[0], np.maximum(ref.conv2d(x, w, None, 1, 1), 0), np.float32, k=144)


@pytest.mark.parametrize("make", [deep_mnist_net, resnet_mnist], ids=["deep_mnist", "resnet"])
def test_predict_results_stay_valid_and_match_the_unpooled_path(make, rng):
    model = make(seed=0)
    x = rng.standard_normal((300, 1, 28, 28)).astype(np.float32)
    first = model.predict(x[:100], batch_size=100)  # one batch: the last layer's own array
    kept = first.copy()
    second = model.predict(x, batch_size=100)
    third = model.predict(x[100:200], batch_size=100)
    assert np.array_equal(first, kept)
    assert np.array_equal(second[:100], kept)
    assert np.array_equal(third, second[100:200])
    assert model._inference_outputs.nbytes > 0  # the activations were pooled
    plain = make(seed=0)
    plain._inference_outputs = _outputs.OutputPool(max_bytes=0)  # every array fresh
    assert np.array_equal(plain.predict(x, batch_size=100), second)


def test_a_training_step_drops_the_kept_inference_outputs(rng):
    """What predict kept for reuse is not held beside a training step's activations (VGG-16
    at batch 8: 3.18 against 2.76 GB at the step's peak); a result still referenced by its
    caller stays valid, and predict pools again afterwards."""
    model = deep_mnist_net(seed=0)
    model.compile("sgd", "softmax_cross_entropy")
    x = rng.standard_normal((100, 1, 28, 28)).astype(np.float32)
    scores = model.predict(x, batch_size=100)
    kept = scores.copy()
    assert model._inference_outputs.nbytes > 0
    model.train_on_batch(x, rng.integers(0, 10, 100))
    assert model._inference_outputs.nbytes == 0
    assert np.array_equal(scores, kept)
    model.predict(x, batch_size=100)
    assert model._inference_outputs.nbytes > 0


def test_concurrent_predicts_on_one_model(rng):
    model = deep_mnist_net(seed=0)
    xs = [rng.standard_normal((200, 1, 28, 28)).astype(np.float32) for _ in range(4)]
    expected = [model.predict(x, batch_size=50) for x in xs]
    got = [None] * 4

    def work(i):
        for _ in range(3):
            got[i] = model.predict(xs[i], batch_size=50)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, e in zip(got, expected, strict=True):
        assert np.array_equal(g, e)
