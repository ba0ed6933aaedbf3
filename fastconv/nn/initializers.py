"""Weight initializers; fans come from the weight shape: Dense (in, out), Conv (F, C, kh, kw).

Every initializer takes ``(shape, rng)`` with ``rng`` a :class:`numpy.random.Generator` and returns
a float32 NumPy array, so that a seeded model is reproducible whatever backend it later moves to.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "he_normal",
    "he_uniform",
    "glorot_normal",
    "glorot_uniform",
    "zeros",
    "ones",
    "get",
    "fans",
]


def fans(shape) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a Dense ``(in, out)`` or Conv ``(F, C, kh, kw)`` weight."""
    shape = tuple(shape)
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 4:
        receptive = shape[2] * shape[3]
        return shape[1] * receptive, shape[0] * receptive
    raise ValueError(f"shape must be (in, out) or (F, C, kh, kw), got {shape}")


def _normal(shape, rng, std):
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)


def _uniform(shape, rng, limit):
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


def he_normal(shape, rng):
    """N(0, 2/fan_in): the book's "He" init for ReLU nets."""
    fan_in, _ = fans(shape)
    return _normal(shape, rng, np.sqrt(2.0 / fan_in))


def he_uniform(shape, rng):
    """U(-sqrt(6/fan_in), +sqrt(6/fan_in))."""
    fan_in, _ = fans(shape)
    return _uniform(shape, rng, np.sqrt(6.0 / fan_in))


def glorot_normal(shape, rng):
    """N(0, 2/(fan_in+fan_out)) (Xavier)."""
    fan_in, fan_out = fans(shape)
    return _normal(shape, rng, np.sqrt(2.0 / (fan_in + fan_out)))


def glorot_uniform(shape, rng):
    """U(-sqrt(6/(fan_in+fan_out)), +sqrt(6/(fan_in+fan_out)))."""
    fan_in, fan_out = fans(shape)
    return _uniform(shape, rng, np.sqrt(6.0 / (fan_in + fan_out)))


def zeros(shape, rng=None):
    """All zeros (biases, BatchNorm's beta and moving mean)."""
    return np.zeros(shape, np.float32)


def ones(shape, rng=None):
    """All ones (BatchNorm's gamma and moving variance)."""
    return np.ones(shape, np.float32)


#: initializers a user may choose for a kernel (weight matrix or filters)
KERNEL_INITIALIZERS = ("he_normal", "he_uniform", "glorot_normal", "glorot_uniform")

_BY_NAME = {
    "he_normal": he_normal,
    "he_uniform": he_uniform,
    "glorot_normal": glorot_normal,
    "glorot_uniform": glorot_uniform,
    "zeros": zeros,
    "ones": ones,
}


def get(name: str):
    """The initializer called ``name``."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"initializer must be one of {sorted(_BY_NAME)}, got {name!r}") from None


def check_kernel_initializer(name) -> str:
    if name not in KERNEL_INITIALIZERS:
        raise ValueError(
            f"kernel_initializer must be one of {sorted(KERNEL_INITIALIZERS)}, got {name!r}"
        )
    return name
