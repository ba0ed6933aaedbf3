"""Layers joining branches: Add (residual connections) and Concatenate (Inception)."""

from __future__ import annotations

from ... import _checks as chk
from .base import Layer, register_layer, xp_of

__all__ = ["Add", "Concatenate"]


class _Merge(Layer):
    kind = "merge"
    shareable = True
    multi_input = True
    torch_fresh = True

    def torch_module(self, torch, inplace=False):
        return None  # the twin's graph calls torch_merge on the input tensors

    def torch_merge(self, xs, own_first):
        """The twin's merge of tensors ``xs``; ``own_first``: ``xs[0]`` may be overwritten."""
        raise NotImplementedError

    def _shapes(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) < 2:
            raise ValueError(
                f"{type(self).__name__} {self.name!r} takes a list of at least two inputs"
            )
        return [tuple(int(s) for s in shape) for shape in input_shape]


@register_layer
class Add(_Merge):
    """Element-wise sum of inputs of one shape (ResNet's ``z + shortcut``). At inference a
    two-input Add after a convolution runs in that convolution's epilogue (prepared path)."""

    adds_inputs = True

    def output_shape(self, input_shape):
        shapes = self._shapes(input_shape)
        if any(shape != shapes[0] for shape in shapes):
            raise ValueError(
                f"Add {self.name!r} needs inputs of one shape, got per-sample shapes {shapes}"
            )
        return shapes[0]

    def call(self, x, training=False):
        y = x[0] + x[1]
        for more in x[2:]:
            y += more
        return y, (len(x) if training else None)

    def call_backward(self, cache, dy, need_dx=True):
        # The same array for every input: the model's backward never writes into gradients.
        return [dy] * cache, {}

    def torch_merge(self, xs, own_first):
        # torchvision's "out += identity": into the branch's own output where it may be.
        y = xs[0] if own_first else xs[0].clone()
        for more in xs[1:]:
            y += more
        return y


@register_layer
class Concatenate(_Merge):
    """Join inputs along ``axis`` (1: channels of NCHW, features of (N, F)); the other axes
    must agree."""

    def __init__(self, axis=1, name=None, trainable=True):
        super().__init__(name, trainable)
        self.axis = chk.as_int(axis, "axis", 1)

    def get_config(self):
        return {"axis": self.axis, **super().get_config()}

    def output_shape(self, input_shape):
        shapes = self._shapes(input_shape)
        a = self.axis - 1  # per-sample axis
        if any(len(shape) <= a for shape in shapes):
            raise ValueError(
                f"Concatenate {self.name!r}: axis {self.axis} out of range for per-sample "
                f"shapes {shapes}"
            )
        rest = [shape[:a] + shape[a + 1 :] for shape in shapes]
        if any(r != rest[0] for r in rest):
            raise ValueError(
                f"Concatenate {self.name!r} on axis {self.axis} needs the other axes to agree, "
                f"got per-sample shapes {shapes}"
            )
        return shapes[0][:a] + (sum(shape[a] for shape in shapes),) + shapes[0][a + 1 :]

    def call(self, x, training=False):
        y = xp_of(x).concatenate(x, axis=self.axis)
        return y, ([a.shape[self.axis] for a in x] if training else None)

    def call_backward(self, cache, dy, need_dx=True):
        bounds, start = [], 0
        for size in cache:
            bounds.append((start, start + size))
            start += size
        index = [slice(None)] * dy.ndim
        out = []
        for lo, hi in bounds:
            index[self.axis] = slice(lo, hi)
            out.append(dy[tuple(index)])
        return out, {}

    def torch_merge(self, xs, own_first):
        import torch

        return torch.cat(xs, dim=self.axis)
