"""Counter-based dropout masks for the GPU: keys, kernel scalars and a NumPy twin of the kernel.

The ``dropout`` kernel (``kernels/dropout.cu``) draws its uniforms from Philox4x32-10, a pure
function of a 128-bit counter and a 64-bit key: element ``i`` reads word ``i % 4`` of
``Philox(counter=(i // 4, 0, 0, 0), key)``. A model's dropout layers take one key per training
call from the model's own NumPy generator (:func:`draw_key`), so masks follow the model's seed
(and its saved, cloned or per-rank generator state) with no generator object on the device: no
set-up per call (CuPy's ``default_rng`` builds and seeds a cuRAND XORWOW state per thread of
its launch, hundreds of thousands of states, on every construction) and nothing to store between
the forward and backward passes, which regenerate the same mask from the same key.

:func:`philox4x32_10` and :func:`dropout_reference` are the NumPy twin of the kernel, checked
against Random123's known-answer vectors; the tests hold the kernel (emulated or on a device) to
the twin bit for bit.
"""

from __future__ import annotations

import numpy as np

# Philox4x32 multipliers and Weyl key increments (Salmon et al., SC'11; Random123's philox.h).
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)
KEY_BITS = 31  # per key word: the launchers pass ints in [-(2^31 - 1), 2^31 - 1]


def draw_key(rng: np.random.Generator) -> tuple[int, int]:
    """Two 31-bit key words from ``rng`` (one draw of 62 bits): one dropout call's key."""
    k = int(rng.integers(0, 1 << (2 * KEY_BITS)))
    return k & ((1 << KEY_BITS) - 1), k >> KEY_BITS


def kernel_scalars(rate: float, dtype) -> tuple[int, int]:
    """``(keep_bits, scale_bits)``: the float32 bits of ``keep = 1 - rate`` and of the mask's
    nonzero value ``1/keep`` rounded to ``dtype`` first, as the CPU path's
    ``(u < keep).astype(dtype) * dtype(1/keep)`` rounds it."""
    keep = np.float32(1.0 - rate)
    scale = np.float32(np.dtype(dtype).type(1.0 / keep))
    return int(keep.view(np.int32)), int(scale.view(np.int32))


def philox4x32_10(counter, key) -> np.ndarray:
    """Philox4x32-10 of ``counter`` (4, ...) uint32 words under ``key`` (2 uint32 words):
    (4, ...) uint32 output words."""
    c = [np.asarray(w, dtype=np.uint64) & _MASK32 for w in counter]
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for _ in range(10):
        p0 = _M0 * c[0]
        p1 = _M1 * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c = [hi1 ^ c[1] ^ np.uint64(k0), lo1, hi0 ^ c[3] ^ np.uint64(k1), lo0]
        k0 = (k0 + _W0) & 0xFFFFFFFF
        k1 = (k1 + _W1) & 0xFFFFFFFF
    return np.stack(c).astype(np.uint32)


def uniforms(n: int, key) -> np.ndarray:
    """The kernel's ``u[i]`` for ``i < n``: float32 in [0, 1) on a 2^-24 grid."""
    groups = np.arange((n + 3) // 4, dtype=np.uint64)
    words = philox4x32_10((groups & _MASK32, groups >> np.uint64(32), 0 * groups, 0 * groups),
                          key)  # fmt: skip
    bits = words.T.reshape(-1)[:n]  # element 4g + j is word j of group g
    return (bits >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def dropout_reference(x: np.ndarray, key, rate: float) -> np.ndarray:
    """What the ``dropout`` kernel computes, in NumPy: ``x * mask`` in ``x``'s dtype."""
    keep_bits, scale_bits = kernel_scalars(rate, x.dtype)
    keep = np.int32(keep_bits).view(np.float32)
    scale = np.int32(scale_bits).view(np.float32)
    u = uniforms(x.size, key).reshape(x.shape)
    mask = np.where(u < keep, scale, np.float32(0.0)).astype(x.dtype)
    return x * mask
