"""Which convolution algorithm a CPU call runs, and the record of every choice.

Algorithms (all exact up to float32 rounding; see docs/kernels.md for errors and speeds):

* ``direct``: stride 1; shifted views of stacked images (:mod:`._direct`);
* ``unfolded``: any geometry; im2col-GEMM per block of images (:mod:`._unfolded`);
* ``winograd4x4`` / ``winograd2x2``: 3x3, stride 1, pad <= 2; Winograd F(4x4,3x3) /
  F(2x2,3x3) (:mod:`._winograd`). ``winograd`` is an alias of ``winograd4x4``.

How one is chosen, in order: the call's ``algorithm=`` argument (validated: asking for an
algorithm that cannot run the layer is an error; ``"auto"`` means the rule below); else the
process-wide setting of :func:`set_global` where that algorithm applies to the layer; else,
in ``"benchmark"`` mode, the fastest applicable algorithm measured on the first call of each
shape (like cuDNN's benchmark mode; the measurement is cached per shape, so the choice, and
with it the exact rounding of the results, can differ between processes); else (``"auto"``,
the default) a fixed rule, :func:`rule`, so results never depend on timing noise.

Every call is recorded per (pass, dtype, shapes, stride, pad), algorithm and how it was
chosen, with how many calls ran it and how many fell back to an exact GEMM path because the
data or weights held values the Winograd transforms must not see (NaN, inf, or
|v| >= 2**50): :func:`choices`. All state is guarded by one lock.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

from .._checks import CONV_ALGORITHMS

__all__ = [
    "ConvAlgorithmChoice",
    "set_global",
    "get_global",
    "rule",
    "choose",
    "remember_measurement",
    "record",
    "record_key",
    "record_by_key",
    "choices",
    "clear",
]

_lock = threading.Lock()
_global = "auto"
_measured: dict = {}  # (pass, dtype, N, C, H, W, F, geometry...) -> algorithm, benchmark mode
_records: dict = {}  # key + (algorithm, source) -> [calls, fallbacks]; in order of first use


class ConvAlgorithmChoice(NamedTuple):
    """One recorded (shape, pass, algorithm) of :func:`fastconv.conv_algorithm_choices`."""

    pass_: str  # "forward", "backward" (dx, dW, db) or "backward_weights" (dW, db only)
    dtype: str  # "float32" or "float16"
    x_shape: tuple  # (N, C, H, W)
    w_shape: tuple  # (F, C, kh, kw)
    stride: tuple  # (sh, sw)
    pad: tuple  # (ph, pw)
    algorithm: str  # what ran
    source: str  # "argument", "global", "measured" or "rule"
    calls: int  # calls of this shape and pass that ran it
    fallbacks: int  # of those, how many were redone on a GEMM path (non-finite/huge values)


def set_global(name):
    """Set the process-wide algorithm (``"auto"``, ``"benchmark"`` or an algorithm name,
    already validated and canonical); returns the previous setting."""
    global _global
    with _lock:
        previous, _global = _global, name
        if name != "benchmark":
            _measured.clear()
    return previous


def get_global():
    with _lock:
        return _global


_DTYPE_NAMES: dict = {}  # np.dtype -> name (``str(dtype)`` costs tens of microseconds)


def _key(pass_, dtype, g, F):
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES.setdefault(dtype, str(dtype))
    return (pass_, name, g.N, g.C, g.H, g.W, F, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw)


def applies(name, g) -> bool:
    """Whether algorithm ``name`` can run geometry ``g``."""
    if name == "unfolded":
        return True
    if name == "direct":
        return g.sh == 1 and g.sw == 1
    return g.kh == 3 and g.kw == 3 and g.sh == 1 and g.sw == 1 and g.ph <= 2 and g.pw <= 2


def candidates(g):
    """Applicable algorithms, in a fixed order (benchmark mode times each)."""
    return tuple(name for name in CONV_ALGORITHMS if applies(name, g))


# Winograd pays once the products are large enough that saving 3/4 of the multiplies beats
# the transforms and the copies into and out of the tile layout (docs/kernels.md, "Choosing
# the algorithm"): measured on the deep-MNIST and VGG layers, it won for every layer with at
# least 8 input and 8 output channels; conv1 (1 input channel) stays direct.
_WINOGRAD_MIN_CHANNELS = 8


# Winograd's transforms run over runs of (tile column, image) values, 16 lanes a vector: a
# forward call of one image whose tile row is shorter than this leaves half the lanes or more
# idle and goes direct. Measured at batch 1 on the deep-MNIST layers (runs of 7, 4 and 2;
# serial kernels, 20th percentiles of 300 calls): direct 42-152 us, Winograd F(4x4)
# 108-215 us; at batch 4 (runs of 28, 16, 8) Winograd is level or ahead. Batches of two or
# more keep Winograd (the rule stays what tests/kernels pins for them).
_WINOGRAD_MIN_RUN = 9


def rule(g, F, pass_):
    """The ``"auto"`` choice: Winograd F(4x4) for 3x3 stride-1 layers with enough channels
    in and out (a forward call of one image needs rows of at least ``_WINOGRAD_MIN_RUN``
    tiles: a single small image goes direct), else the direct path (stride 1; backward also
    needs >= 4 input channels, as the direct dx product has one row per input channel), else
    the unfolded path."""
    if applies("winograd4x4", g) and min(g.C, F) >= _WINOGRAD_MIN_CHANNELS:
        if pass_ != "forward" or g.N > 1 or -(-g.OW // 4) >= _WINOGRAD_MIN_RUN:
            return "winograd4x4"
        return "direct"
    if g.sh == 1 and g.sw == 1 and (pass_ == "forward" or g.C >= 4):
        return "direct"
    return "unfolded"


def choose(pass_, dtype, g, F, requested):
    """``(algorithm, source)`` for a call; algorithm None means: measure now (benchmark mode,
    first call of this shape), then :func:`remember_measurement`."""
    if requested == "auto":
        return rule(g, F, pass_), "rule"
    if requested is not None:
        return requested, "argument"
    with _lock:
        mode = _global
        if mode == "benchmark":
            found = _measured.get(_key(pass_, dtype, g, F))
            return (found, "measured") if found else (None, "measured")
    if mode != "auto" and applies(mode, g):
        return mode, "global"
    return rule(g, F, pass_), "rule"


def remember_measurement(pass_, dtype, g, F, name):
    with _lock:
        _measured[_key(pass_, dtype, g, F)] = name


def record(pass_, dtype, g, F, name, source, fallback=False):
    """Count one call of ``name`` for this shape and pass."""
    record_by_key(record_key(pass_, dtype, g, F, name, source), fallback)


def record_key(pass_, dtype, g, F, name, source):
    """What :func:`record` counts a call under (a prepared plan builds it once: ~0.5 us of
    a batch-1 convolution's overhead)."""
    return _key(pass_, dtype, g, F) + (name, source)


def record_by_key(key, fallback=False):
    """:func:`record` with the key of :func:`record_key`."""
    with _lock:
        entry = _records.get(key)
        if entry is None:
            entry = _records[key] = [0, 0]
        entry[0] += 1
        entry[1] += bool(fallback)


def choices():
    """Every recorded choice, in order of first use (a list of :class:`ConvAlgorithmChoice`)."""
    with _lock:
        items = list(_records.items())
    out = []
    for key, (calls, fallbacks) in items:
        pass_, dtype, N, C, H, W, F, kh, kw, sh, sw, ph, pw, name, source = key
        out.append(
            ConvAlgorithmChoice(
                pass_,
                dtype,
                (N, C, H, W),
                (F, C, kh, kw),
                (sh, sw),
                (ph, pw),
                name,
                source,
                calls,
                fallbacks,
            )  # fmt: skip
        )
    return out


def clear():
    """Forget the recorded choices and the benchmark-mode measurements."""
    with _lock:
        _records.clear()
        _measured.clear()
