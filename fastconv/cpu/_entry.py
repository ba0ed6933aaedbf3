"""Calling a compiled Numba kernel without the dispatcher's argument typing.

A Numba dispatcher types every argument on every call to pick the compiled overload. For a
kernel that takes named tuples (a plan, a geometry, a workspace) that typing costs ~4 us a
call (measured: 4.1 us for the prepared convolution's twelve arguments, 0.56 us through the
compiled entry point), as much as a batch-1 convolution's epilogue. An :class:`Entries`
keeps, for each key its caller gives, the entry point of the overload the dispatcher chose
on the first call with that key.

The key must determine the Numba type of every argument: the callers key on the plan (whose
named tuples and workspace shapes never change) and on the flags of the arrays that vary
from call to call (:func:`array_key`). A wrong key would hand an overload arguments of
another type, so the keys stay next to the calls they cover.
"""

from __future__ import annotations

__all__ = ["Entries", "array_key"]


def array_key(a):
    """What decides a NumPy array's Numba type besides its shape: dtype, dimensions,
    layout, writability, alignment."""
    f = a.flags
    return (a.dtype.num, a.ndim, f.c_contiguous, f.f_contiguous, f.writeable, f.aligned)


class Entries:
    """Compiled entry points by caller key (a plain dict: a lost race only looks one up
    twice; thread-safe otherwise, like the dispatcher)."""

    __slots__ = ("_found",)

    def __init__(self):
        self._found = {}

    def call(self, dispatcher, key, *args):
        """``dispatcher(*args)``; from the second call with ``key``, its compiled overload
        directly."""
        entry = self._found.get(key)
        if entry is not None:
            return entry(*args)
        result = dispatcher(*args)
        signature = tuple(dispatcher.typeof_pyval(a) for a in args)
        overload = dispatcher.overloads.get(signature)
        # An overload reached through a conversion has another signature: keep dispatching.
        self._found[key] = overload.entry_point if overload is not None else dispatcher
        return result
