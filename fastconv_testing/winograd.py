"""The error magnitude of Winograd convolutions, shared by the tests' bounds and
``bench/winograd_error.py``: one definition of what "the magnitude of the terms a result mixes"
means."""

from __future__ import annotations

import numpy as np

__all__ = ["mixed_magnitude"]

_WINOGRAD_TILE = {"winograd4x4": 4, "winograd2x2": 2}


def mixed_magnitude(magnitude, kind, algorithm):
    """The magnitude that bounds Winograd's rounding error for each result.

    Winograd computes a whole m x m output tile (y; dx, a convolution of dy) from one
    transformed product, and each filter's 3x3 dW taps from one transformed 6x6 sum, so an
    element's error scales with the largest term of its tile or filter, not its own: a dW tap
    that only ever meets padding is exactly 0 for direct convolution but carries the rounding
    of its neighbours here. Tiles start at the origin of the output.
    """
    m = _WINOGRAD_TILE.get(algorithm)
    if m is None or kind in (None, "db"):
        return magnitude
    if kind == "dw":
        return np.broadcast_to(magnitude.max(axis=(2, 3), keepdims=True), magnitude.shape)
    N, F, H, W = magnitude.shape
    Hp, Wp = -(-H // m) * m, -(-W // m) * m
    padded = np.zeros((N, F, Hp, Wp))
    padded[:, :, :H, :W] = magnitude
    tiles = padded.reshape(N, F, Hp // m, m, Wp // m, m).max(axis=(3, 5))
    return np.repeat(np.repeat(tiles, m, axis=2), m, axis=3)[:, :, :H, :W]
