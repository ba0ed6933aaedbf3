"""Batch normalisation over the batch (and spatial) axes, with moving statistics."""

from __future__ import annotations

import numbers

import numpy as np

from ... import ops
from ..backend import array_module, to_numpy
from .base import Layer, WeightSpec, register_layer
from .conv import spatial_shape

__all__ = ["BatchNorm2D", "BatchNorm1D"]


def _real(value, name, ok, expected):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


class _BatchNorm(Layer):
    """Shared by BatchNorm2D (statistics per channel over N, H, W) and BatchNorm1D (per
    feature over N).

    Training normalises with the batch mean and biased variance and updates the moving
    statistics as ``moving = momentum * moving + (1 - momentum) * batch_stat`` with the
    *unbiased* batch variance, as PyTorch (its momentum is our ``1 - momentum``). Inference, and
    training of a frozen layer (``trainable = False``, as in Keras), use the moving statistics.
    Weights in Keras order: gamma, beta (trainable), moving_mean, moving_variance (float32 in
    every model dtype).
    """

    kind = "norm"
    fuses_relu = True
    #: set by a data-parallel strategy (``MPIDataParallel(sync_batch_norm=True)``) while it
    #: trains: ``reduction(sums, what)`` sums a float64 array over the processes in place, and
    #: the training statistics are then those of the global batch
    reduction = None

    def __init__(self, momentum=0.9, epsilon=1e-5, name=None, trainable=True):
        super().__init__(name, trainable)
        self.momentum = _real(momentum, "momentum", lambda v: 0 <= v < 1, "a number in [0, 1)")
        self.epsilon = _real(
            epsilon, "epsilon", lambda v: 0 < v < np.inf, "a positive finite number"
        )

    def get_config(self):
        return {"momentum": self.momentum, "epsilon": self.epsilon, **super().get_config()}

    def _channels(self, input_shape) -> int:
        raise NotImplementedError

    def weight_specs(self, input_shape):
        C = self._channels(input_shape)
        return [
            WeightSpec("gamma", (C,), "ones"),
            WeightSpec("beta", (C,), "zeros"),
            WeightSpec("moving_mean", (C,), "zeros", trainable=False, dtype="float32"),
            WeightSpec("moving_variance", (C,), "ones", trainable=False, dtype="float32"),
        ]

    def call(self, x, training=False, fuse_relu=False):
        act = "relu" if fuse_relu else None
        gamma, beta = self.params["gamma"], self.params["beta"]
        mm, mv = self.buffers["moving_mean"], self.buffers["moving_variance"]
        if training and self.trainable and self.reduction is not None:
            return self._call_synchronised(x, fuse_relu)
        if training and self.trainable:
            y, mean, var = ops.batch_norm_forward(x, gamma, beta, self.epsilon, activation=act)
            count = x.size // x.shape[1]
            if count:  # an empty batch has no statistics (NaN): nothing to fold in
                self.weights_changed()  # the moving statistics change in place
                m = np.float32(self.momentum)
                mm *= m
                mm += (1 - m) * mean
                mv *= m
                mv += ((1 - m) * np.float32(count / (count - 1))) * var
            return y, ("batch", x, mean, var, y if fuse_relu else None)
        y = ops.batch_norm_inference(x, gamma, beta, mm, mv, self.epsilon, activation=act)
        return y, (
            ("moving", None, None, mv.copy(), y if fuse_relu else None) if training else None
        )

    def call_backward(self, cache, dy, need_dx=True):
        if cache[0] == "sync":
            return self._backward_synchronised(cache, dy, need_dx)
        mode, x, mean, var, y = cache
        gamma = self.params["gamma"]
        if mode == "moving":  # frozen: a fixed affine map, no weight gradients
            return ops.batch_norm_inference_backward(dy, gamma, var, self.epsilon, y=y), {}
        dx, dgamma, dbeta = ops.batch_norm_backward(dy, x, gamma, mean, var, self.epsilon, y=y)
        return dx, {"gamma": dgamma, "beta": dbeta}

    # -- synchronised statistics (the global batch's, through ``reduction``) --------------------

    def _call_synchronised(self, x, fuse_relu):
        xp = array_module(x)
        axes = _axes(x)
        x32 = x.astype(np.float32, copy=False)
        count = x.size // x.shape[1]
        # Sums in float64: E[x^2] - E[x]^2 over the global batch without catastrophic cancellation.
        sums = np.concatenate([to_numpy(x32.sum(axis=axes, dtype=np.float64)),
                               to_numpy((x32 * x32).sum(axis=axes, dtype=np.float64)),
                               [float(count)]])  # fmt: skip
        self.reduction(sums, f"synchronising BatchNorm {self.name!r}")
        c, total = x.shape[1], sums[-1]
        if total < 2:
            raise ValueError(f"BatchNorm {self.name!r} needs more than 1 value per channel")
        mean = sums[:c] / total
        var = np.maximum(sums[c : 2 * c] / total - mean * mean, 0.0)
        mean32 = xp.asarray(mean.astype(np.float32))
        var32 = xp.asarray(var.astype(np.float32))
        act = "relu" if fuse_relu else None
        gamma, beta = self.params["gamma"], self.params["beta"]
        y = ops.batch_norm_inference(x, gamma, beta, mean32, var32, self.epsilon, activation=act)
        m = np.float32(self.momentum)
        mm, mv = self.buffers["moving_mean"], self.buffers["moving_variance"]
        self.weights_changed()  # the moving statistics change in place
        mm *= m
        mm += (1 - m) * mean32
        mv *= m
        mv += ((1 - m) * np.float32(total / (total - 1))) * var32
        return y, ("sync", x, mean32, var32, y if fuse_relu else None, total)

    def _backward_synchronised(self, cache, dy, need_dx):
        _, x, mean, var, y, total = cache
        xp = array_module(x)
        if y is not None:  # fused ReLU
            dy = dy * (y > 0)
        axes = _axes(x)
        inv = 1.0 / xp.sqrt(var + np.float32(self.epsilon))
        xhat = (x.astype(np.float32) - _per_channel(mean, x)) * _per_channel(inv, x)
        d = dy.astype(np.float32)
        dbeta = d.sum(axis=axes)  # this process's part; the strategy sums the weight gradients
        dgamma = (d * xhat).sum(axis=axes)
        grads = {"gamma": dgamma.astype(x.dtype), "beta": dbeta.astype(x.dtype)}
        if not need_dx:
            return None, grads
        c = x.shape[1]
        sums = np.concatenate([to_numpy(dbeta), to_numpy(dgamma)]).astype(np.float64)
        self.reduction(sums, f"synchronising BatchNorm {self.name!r} gradients")
        g_beta = xp.asarray(sums[:c].astype(np.float32))
        g_gamma = xp.asarray(sums[c:].astype(np.float32))
        gamma = self.params["gamma"].astype(np.float32)
        n = np.float32(total)
        dx = _per_channel(gamma * inv / n, x) * (
            n * d - _per_channel(g_beta, x) - xhat * _per_channel(g_gamma, x)
        )
        return dx.astype(x.dtype), grads

    # PyTorch's momentum weighs the batch statistic: ours is its complement.
    torch_fresh = True
    _torch_class = "BatchNorm2d"

    def torch_module(self, torch, inplace=False):
        cls = getattr(torch.nn, self._torch_class)
        return cls(self.declared_shape("gamma")[0], eps=self.epsilon, momentum=1 - self.momentum)

    def torch_weights(self, module) -> list:
        return [("gamma", module.weight, None), ("beta", module.bias, None),
                ("moving_mean", module.running_mean, None),
                ("moving_variance", module.running_var, None)]  # fmt: skip


@register_layer
class BatchNorm2D(_BatchNorm):
    """Batch normalisation of ``(N, C, H, W)`` inputs, per channel over N, H and W.

    Parameters
    ----------
    momentum : float in [0, 1)
        Weight of the old moving statistics (Keras's convention; PyTorch's 0.1 is our 0.9).
    epsilon : float > 0
        Added to the variance.
    """

    folds_into_conv = True

    def fold_into(self, w, b):
        """The weights ``(w, b)`` of a preceding convolution with this layer folded in, with its
        moving statistics (inference)."""
        p, s = self.params, self.buffers
        return ops.fold_batch_norm(w, b, p["gamma"], p["beta"], s["moving_mean"],
                                   s["moving_variance"], self.epsilon)  # fmt: skip

    def _channels(self, input_shape):
        return spatial_shape(input_shape, self)[0]

    def output_shape(self, input_shape):
        return spatial_shape(input_shape, self)


@register_layer
class BatchNorm1D(_BatchNorm):
    """Batch normalisation of ``(N, features)`` inputs (after Dense), per feature over N."""

    _torch_class = "BatchNorm1d"

    def _channels(self, input_shape):
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 1:
            raise ValueError(
                f"BatchNorm1D {self.name!r} expects inputs of shape (N, features), got "
                f"per-sample shape {shape}"
            )
        return shape[0]

    def output_shape(self, input_shape):
        return (self._channels(input_shape),)


def _axes(x):
    """The axes a channel's statistics run over: N (and H, W)."""
    return (0,) if x.ndim == 2 else (0, 2, 3)


def _per_channel(v, x):
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))
