"""Thread-safe reuse of kernel workspaces, and the guard that makes parallel launches safe.

Workspaces: a convolution needs tens of MB of float32 scratch per call; allocating it afresh
costs page faults on every step (measured: ~10% of a deep-MNIST training step), so buffers are
kept between calls. A buffer set is *checked out* for the duration of one call and returned
afterwards: two Python threads running the same shape at once each get their own set (the
second allocates one), so no call ever sees another's scratch. The pool keeps at most
``MAX_IDLE`` idle sets, least recently returned dropped first.

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

import threading
from collections import OrderedDict
from contextlib import contextmanager

__all__ = ["checkout", "launch_guard", "idle_workspaces", "clear"]

MAX_IDLE = 32  # a deep-MNIST training step alone uses 12 (6 layers x forward/backward)

_pool_lock = threading.Lock()
_idle: OrderedDict = OrderedDict()  # (key, serial) -> workspace; order = recency
_serial = 0


@contextmanager
def checkout(key, make):
    """Yield a workspace for ``key`` that no other call uses until this one exits.

    ``make()`` builds a new one when none is idle. The workspace is returned to the pool on
    exit, also when the kernel raised.
    """
    global _serial
    ws = None
    with _pool_lock:
        for pool_key in reversed(_idle):
            if pool_key[0] == key:
                ws = _idle.pop(pool_key)
                break
    if ws is None:
        ws = make()
    try:
        yield ws
    finally:
        with _pool_lock:
            _serial += 1
            _idle[(key, _serial)] = ws
            while len(_idle) > MAX_IDLE:
                _idle.popitem(last=False)


def idle_workspaces() -> int:
    """How many workspace sets are idle in the pool (tests)."""
    with _pool_lock:
        return len(_idle)


def clear() -> None:
    """Drop every idle workspace (frees their memory)."""
    with _pool_lock:
        _idle.clear()


_launch_lock = threading.RLock()


def launch_guard():
    """The process-wide lock every parallel CPU kernel launch holds (see the module docstring)."""
    return _launch_lock
