"""Thread-safe reuse of kernel workspaces, and the guard that makes parallel launches safe.

Workspaces: a convolution needs tens of MB of float32 scratch per call; allocating it afresh
costs page faults on every step (measured: ~10% of a deep-MNIST training step), so memory is
kept between calls. The memory is kept as *arenas*, not one buffer set per layer shape: a
call checks out an arena for the duration of the call and builds its set as views into it
(``make(alloc)``), so every layer of a model runs in the same memory and what is kept is the
largest set, not the sum over the model's shapes and directions (VGG-16: 27 sets, 667 MB, all
resident, where its largest set is 60 MB; docs/benchmarks.md). An arena remembers the key of
the set it holds: the next call of the same key reuses the set as it is; another key rebuilds
the views and zeroes the arrays its ``make`` asks zeroed (a memset, tens of microseconds per
MB, where a fresh set cost page faults). Two Python threads running at once each get an arena
(the second allocates one), so no call ever sees another's scratch; the pool keeps at most
``MAX_IDLE`` idle arenas, least recently returned dropped first. Arenas are anonymous memory
maps: dropping one gives its pages back to the system (freed malloc blocks would stay in the
process), and a new one reads as zeros without being written.

Launch guard: parallel kernel launches are serialised process-wide, whatever Numba's threading
layer. ``workqueue`` is not thread-safe at all (two Python threads launching parallel kernels at
once abort the process). OpenMP is, but two threads' OpenMP teams then compete for the same
cores with spinning workers: two threads each running 200 conv calls took 0.38-0.43 s
(measured, 2 cores) in five runs, and 36.9 s in one, where serialised launches took 0.42-0.53 s
every time. Each kernel already uses every Numba thread, so taking turns loses nothing but the
overlap of the callers' Python code. Serial (non-parallel) kernels, such as the augmentation
kernels run in a background thread, need no guard.
"""

from __future__ import annotations

import math
import mmap
import threading
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np

__all__ = ["checkout", "launch_guard", "idle_workspaces", "kept_bytes", "clear"]

#: idle arenas kept; more than one is idle only after calls ran at once (threads) or nested
MAX_IDLE = 4
_ALIGN = 64  # bytes: every array of a set starts on a cache line (as aligned_empty's)

_pool_lock = threading.Lock()
_idle: OrderedDict = OrderedDict()  # serial -> Arena; order = recency
_serial = 0


class Arena:
    """Memory kept between calls, and the workspace set last built in it."""

    __slots__ = ("raw", "key", "ws", "fresh")

    def __init__(self, nbytes: int):
        self.raw = np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), np.uint8)
        self.key, self.ws = None, None
        self.fresh = True  # never used: reads as zeros


class _Sizer:
    """``alloc`` that only adds up the bytes a set needs (its arrays are stand-ins)."""

    def __init__(self):
        self.nbytes = 0

    def __call__(self, shape, dtype=np.float32, zero=False):
        shape = tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        self.nbytes += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
        return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, (0,) * len(shape))


def _build(arena: Arena, make):
    """Build ``make``'s set as views into ``arena`` (zeroing what it asks zeroed)."""
    raw, offset = arena.raw, 0
    base = (-raw.ctypes.data) % _ALIGN
    fresh = arena.fresh

    def alloc(shape, dtype=np.float32, zero=False):
        nonlocal offset
        shape = tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        start = base + offset
        offset += -(-nbytes // _ALIGN) * _ALIGN
        a = raw[start : start + nbytes].view(dtype).reshape(shape)
        if zero and not fresh:
            a.fill(0)
        return a

    ws = make(alloc)
    arena.fresh = False
    return ws


_sizes: OrderedDict = OrderedDict()  # key -> bytes its set needs (a few hundred keys kept)


def _size(key, make) -> int:
    need = _sizes.get(key)
    if need is None:
        sizer = _Sizer()
        make(sizer)
        need = _sizes[key] = sizer.nbytes + _ALIGN  # room to align the start
        while len(_sizes) > 512:
            _sizes.popitem(last=False)
    return need


@contextmanager
def checkout(key, make):
    """Yield a workspace set for ``key`` that no other call uses until this one exits.

    ``make(alloc)`` builds the set from ``alloc(shape, dtype=float32, zero=False)``, which
    returns uninitialised (or, with ``zero``, zeroed) C-contiguous arrays aligned to 64 bytes;
    it must only allocate, as it runs once more to size the set. The arena goes back to the
    pool on exit, also when the kernel raised.
    """
    global _serial
    arena = None
    with _pool_lock:
        for serial in reversed(_idle):  # the set itself, if an idle arena still holds it
            if _idle[serial].key == key:
                arena = _idle.pop(serial)
                break
    if arena is not None:
        ws = arena.ws
    else:
        with _pool_lock:
            need = _size(key, make)
            # The most recently returned arena that is large enough, else the largest.
            fits = [s for s in _idle if _idle[s].raw.nbytes >= need]
            if fits:
                arena = _idle.pop(fits[-1])
            elif _idle:
                arena = _idle.pop(max(_idle, key=lambda s: _idle[s].raw.nbytes))
        if arena is None or arena.raw.nbytes < need:
            arena = Arena(need)  # a grown arena replaces the small one, which is dropped
        arena.key, arena.ws = None, None  # not a valid set until built
        ws = arena.ws = _build(arena, make)
        arena.key = key
    try:
        yield ws
    finally:
        with _pool_lock:
            _serial += 1
            _idle[_serial] = arena
            while len(_idle) > MAX_IDLE:
                _idle.popitem(last=False)


def idle_workspaces() -> int:
    """How many arenas are idle in the pool (tests)."""
    with _pool_lock:
        return len(_idle)


def kept_bytes() -> int:
    """Bytes of memory the idle arenas hold (allocated; pages never written are not
    resident)."""
    with _pool_lock:
        return sum(arena.raw.nbytes for arena in _idle.values())


def clear() -> None:
    """Drop every idle arena (gives their memory back to the system)."""
    with _pool_lock:
        _idle.clear()


_launch_lock = threading.RLock()


def launch_guard():
    """The process-wide lock every parallel CPU kernel launch holds (see the module docstring)."""
    return _launch_lock
