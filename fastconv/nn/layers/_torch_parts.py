"""Small ``torch.nn`` modules the layers' PyTorch twins need where PyTorch has no layer of
their own: padding with a value on each side, and average pooling over a window's input cells
only with asymmetric padding. torch is imported by the caller (:func:`torch_parts`)."""

from __future__ import annotations

import functools
from types import SimpleNamespace

__all__ = ["torch_parts"]


@functools.cache
def torch_parts(torch) -> SimpleNamespace:
    """The module classes, defined once per ``torch`` module."""
    F = torch.nn.functional

    def as_torch_pad(pads):
        top, bottom, left, right = pads
        return (left, right, top, bottom)  # F.pad's order: last axis first

    class Pad(torch.nn.Module):
        """Pad ``(top, bottom, left, right)`` with ``value`` (-inf before a max pool)."""

        def __init__(self, pads, value):
            super().__init__()
            self.pads = as_torch_pad(pads)
            self.value = float(value)

        def forward(self, x):
            return F.pad(x, self.pads, value=self.value)

        def extra_repr(self):
            return f"pads={self.pads}, value={self.value}"

    class AvgPoolOverInput(torch.nn.Module):
        """Average pooling that divides by the window's input cells (Keras's "same"),
        with padding ``(top, bottom, left, right)``: the zero-padded input's window sums over
        the padded map of ones' window sums (the two pools share their divisor, which cancels)."""

        def __init__(self, size, stride, pads, ceil_mode):
            super().__init__()
            self.pads = as_torch_pad(pads)
            self.pool = torch.nn.AvgPool2d(size, stride, 0, ceil_mode=ceil_mode)

        def forward(self, x):
            ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
            sums = self.pool(F.pad(x, self.pads))
            return sums / self.pool(F.pad(ones, self.pads))

    return SimpleNamespace(Pad=Pad, AvgPoolOverInput=AvgPoolOverInput)
