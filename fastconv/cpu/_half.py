"""float16 inside Numba kernels, through uint16 bit views.

Numba cannot type ``float16``, so fp16 arrays reach the kernels as ``uint16`` views and
the kernels convert element by element with LLVM's own ``half`` type: a bitcast plus
``fpext``/``fptrunc``. On x86 with F16C, LLVM lowers these to ``vcvtph2ps``/``vcvtps2ph``
and vectorises them, which measured about 9x faster than ``ndarray.astype``; and rounding
is IEEE round-to-nearest-even, the same as NumPy's.

Kernels are written once for both dtypes with :func:`load` and :func:`store_value`:
``load(a[i])`` gives a float32 whatever ``a`` holds, and ``store_value(a, v)`` gives what to
write into ``a`` (float32, or half bits for a uint16 array).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

__all__ = ["half_to_float", "float_to_half", "load", "store_value", "bits_view", "from_bits"]


@intrinsic
def half_to_float(typingctx, bits):
    """uint16 half bits -> float32."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def float_to_half(typingctx, value):
    """float32 -> uint16 half bits, rounding to nearest even."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(value), codegen


def load(value):
    """float32 of an array element (float32, or uint16 half bits)."""


@overload(load, inline="always")
def _load(value):
    if value == types.uint16:
        return lambda value: half_to_float(value)
    if isinstance(value, types.Float):
        return lambda value: np.float32(value)
    return None


def store_value(array, value):
    """What to write into ``array`` for the float ``value`` (rounded to half for uint16)."""


@overload(store_value, inline="always")
def _store_value(array, value):
    if array.dtype == types.uint16:
        return lambda array, value: float_to_half(np.float32(value))
    return lambda array, value: np.float32(value)


def bits_view(a: np.ndarray) -> np.ndarray:
    """The array a kernel sees: float32 as is, float16 as its uint16 bits (no copy)."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


def from_bits(a: np.ndarray, dtype) -> np.ndarray:
    """Inverse of :func:`bits_view` for a kernel's output buffer."""
    return a.view(np.float16) if np.dtype(dtype) == np.float16 else a


@njit(cache=True)
def _roundtrip_check(bits, out_bits):
    # Used by the tests: half -> float -> half must be the identity for every non-NaN pattern.
    for i in range(bits.size):
        out_bits[i] = float_to_half(half_to_float(bits[i]))
