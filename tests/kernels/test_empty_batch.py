"""Empty batches (N = 0) beyond the conformance test: every op of ``OPS`` is run on an empty
batch, compared with the oracle's shapes, values and dtypes and with no kernel launched, by
tests/kernels/test_kernel_interface.py. Here: the ``need_dx=False`` variants, which the
conformance cases do not take, and the reference's own empty-batch shapes and padding rule."""

from __future__ import annotations

import numpy as np
import pytest

import fastconv as fc
from fastconv import cpu as cpu_backend
from fastconv import reference as ref
from fastconv.kernels import OPS


@pytest.fixture
def no_launch(monkeypatch):
    """Make every op of the CPU kernel set raise: an empty batch must never reach one."""
    for name in OPS:

        def fail(*args, _name=name, **kwargs):
            raise AssertionError(f"{_name} launched on an empty batch")

        monkeypatch.setattr(cpu_backend.KERNELS, name, fail)


def test_backward_without_dx_on_an_empty_batch(dtype, no_launch):
    z = np.zeros
    x, w = z((0, 3, 6, 5), dtype), z((4, 3, 3, 3), dtype)
    dx, dw, db = fc.conv2d_backward(z((0, 4, 6, 5), dtype), x, w, 1, 1, need_dx=False)
    assert dx is None and dw.shape == w.shape and db.shape == (4,)
    assert dw.dtype == db.dtype == dtype and not dw.any() and not db.any()
    d, wd = z((0, 7), dtype), z((7, 2), dtype)
    dx, dw, db = fc.dense_backward(z((0, 2), dtype), d, wd, need_dx=False)
    assert dx is None and dw.shape == (7, 2) and db.shape == (2,)
    assert dw.dtype == db.dtype == dtype and not dw.any() and not db.any()


def test_empty_batch_matches_the_reference_shapes():
    x = np.zeros((0, 2, 5, 5))
    assert ref.col2im(np.zeros((0, 18)), x.shape, 3, 3, 1, 1).shape == x.shape
    assert ref.avg_pool2d_backward(np.zeros((0, 2, 2, 2)), x.shape, 2).shape == x.shape
    assert ref.global_avg_pool2d_backward(np.zeros((0, 2)), x.shape).shape == x.shape


def test_reference_max_pool_applies_the_public_padding_rule():
    x = np.zeros((1, 1, 6, 6))
    with pytest.raises(ValueError, match="pad must be at most half the window"):
        ref.max_pool2d(x, 2, 2, 2)
    with pytest.raises(ValueError, match="pad must be at most half the window"):
        ref.max_pool2d_backward(np.zeros((1, 1, 4, 4)), x, 2, 2, 2)
    with pytest.raises(ValueError, match="pad must be at most half the window"):
        fc.max_pool2d(x.astype(np.float32), 2, 2, 2)
    assert ref.max_pool2d(x, 3, 2, 1).shape == fc.max_pool2d(x.astype(np.float32), 3, 2, 1).shape
    assert ref.avg_pool2d(x, 2, 2, 2).shape == (1, 1, 5, 5)  # padding is fine for averages
