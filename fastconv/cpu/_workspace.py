"""Thread-safe reuse of kernel workspaces, and the guard that makes parallel launches safe.

Workspaces: a convolution needs tens of MB of float32 scratch per call; allocating it afresh
costs page faults on every step (measured: ~10% of a deep-MNIST training step), so memory is
kept between calls, as *arenas*: a call checks out an arena for the duration of the call and
builds its set as views into it (``make(alloc)``). An arena remembers the key of the set it
holds, and the next call of that key reuses the set as it is. The kept arenas are bounded in
bytes (``MAX_KEPT_BYTES``, 32 MiB), not in sets: while a model's sets fit (deep-MNIST's take 3 MB)
each keeps its own arena, as one set per key did; beyond, a call takes over the least
recently used arena that is large enough, rebuilds the views and zeroes what its ``make``
asks zeroed (a memset, where a fresh set cost page faults). One set per layer shape and
direction kept them all: 27 sets, 667 MB, all resident, for VGG-16 at batch 8, whose largest
set is 60 MB (docs/benchmarks.md). Two Python threads running at once each get an arena (the
second allocates one), so no call ever sees another's scratch. Arenas are anonymous memory
maps: dropping one gives its pages back to the system (a freed malloc block would stay in the
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

import numpy as np

__all__ = ["checkout", "launch_guard", "idle_workspaces", "kept_bytes", "clear"]

#: bytes of idle arenas kept (an arena larger than this is still kept, alone)
MAX_KEPT_BYTES = 32 << 20
MAX_IDLE = 32  # idle arenas kept, at most
_ALIGN = 64  # bytes: every array of a set starts on a cache line (as aligned_empty's)

_pool_lock = threading.Lock()
_idle: OrderedDict = OrderedDict()  # serial -> Arena; order = recency
_kept = 0  # bytes of the idle arenas (kept in step with _idle, under the lock)
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


# key -> bytes its set needs (a key names one set: the same shapes every time)
_sizes: OrderedDict = OrderedDict()


def _size(key, make) -> int:
    need = _sizes.get(key)
    if need is None:
        sizer = _Sizer()
        make(sizer)
        need = _sizes[key] = sizer.nbytes + _ALIGN  # room to align the start
        while len(_sizes) > 512:
            _sizes.popitem(last=False)
    return need


class checkout:  # noqa: N801 (used as a function: ``with checkout(key, make) as ws``)
    """Yield a workspace set for ``key`` that no other call uses until this one exits.

    ``make(alloc)`` builds the set from ``alloc(shape, dtype=float32, zero=False)``, which
    returns uninitialised (or, with ``zero``, zeroed) C-contiguous arrays aligned to 64 bytes;
    it must only allocate, as it runs once more to size the set. The arena goes back to the
    pool on exit, also when the kernel raised. (A class rather than a generator, and the idle
    bytes counted as arenas come and go rather than summed: a batch-1 convolution takes one
    per call, and the generator with the sums cost 3.6 us of it.)
    """

    __slots__ = ("_arena",)

    def __init__(self, key, make):
        global _kept
        arena = None
        with _pool_lock:
            for serial in reversed(_idle):  # the set itself, if an idle arena still holds it
                if _idle[serial].key == key:
                    arena = _idle.pop(serial)
                    _kept -= arena.raw.nbytes
                    break
            if arena is None:
                need = _size(key, make)
                if _kept + need > MAX_KEPT_BYTES:
                    # Over the bound: the least recently used arena that is large enough,
                    # else a new one in the room that dropping the least recently used ones
                    # makes.
                    fits = [s for s in _idle if _idle[s].raw.nbytes >= need]
                    if fits:
                        arena = _idle.pop(fits[0])
                        _kept -= arena.raw.nbytes
                    while arena is None and _idle and _kept + need > MAX_KEPT_BYTES:
                        _kept -= _idle.popitem(last=False)[1].raw.nbytes
        if arena is None:
            arena = Arena(need)
            arena.ws = _build(arena, make)
            arena.key = key
        elif arena.key != key:
            arena.key, arena.ws = None, None  # not a valid set until built
            arena.ws = _build(arena, make)
            arena.key = key
        self._arena = arena

    def __enter__(self):
        return self._arena.ws

    def __exit__(self, *exc):
        global _serial, _kept
        arena = self._arena
        with _pool_lock:
            _serial += 1
            _idle[_serial] = arena
            _kept += arena.raw.nbytes
            # Arenas made while others were checked out (threads) can pass the bound.
            while len(_idle) > 1 and (len(_idle) > MAX_IDLE or _kept > MAX_KEPT_BYTES):
                _kept -= _idle.popitem(last=False)[1].raw.nbytes
        return False


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
    global _kept
    with _pool_lock:
        _idle.clear()
        _kept = 0
        _sizes.clear()


_launch_lock = threading.RLock()


def launch_guard():
    """The process-wide lock every parallel CPU kernel launch holds (see the module docstring)."""
    return _launch_lock
