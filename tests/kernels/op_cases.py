"""The registry of conformance cases: one per op of :data:`fastconv.kernels.OPS`.

An op's test file registers its case with :func:`register` (tests/kernels/test_leaky_relu.py
shows how); tests/kernels/test_kernel_interface.py imports every test file beside it, so that
each registered case runs over every backend (the Numba kernels, the CUDA kernels in
emulation, the float64 reference) in both dtypes, from four threads, on an empty batch and
with bad input, and fails for an op of ``OPS`` that has no case.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple


class Case(NamedTuple):
    """How to exercise one op.

    call : the public op on the inputs (fixed non-array arguments bound), e.g.
        ``lambda x: fc.leaky_relu(x, 0.2)``
    oracle : the float64 reference on the same inputs
    inputs : ``(rng, dtype, n) -> tuple of arrays`` for a batch of ``n`` (``n`` may be 0)
    terms : how many rounded terms an output sums (the tolerance grows with it)
    refusals : ``(call on valid inputs -> None, exception, message pattern)`` triples: the
        op-specific bad input, refused before any kernel launch
    any_rank : an elementwise op (any shape valid), so a wrong rank is no bad input
    """

    call: Callable
    oracle: Callable
    inputs: Callable
    terms: int = 1
    refusals: tuple = ()
    any_rank: bool = False


#: op name -> :class:`Case`
CASES: dict[str, Case] = {}


def register(
    op: str, call, oracle, inputs, terms: int = 1, refusals=(), any_rank: bool = False
) -> None:
    """Register the conformance case of ``op`` (one per op)."""
    if op in CASES:
        raise ValueError(f"op {op!r} has two conformance cases")
    CASES[op] = Case(call, oracle, inputs, terms, tuple(refusals), any_rank)


def import_test_modules() -> None:
    """Import every test file of this folder so that their cases are registered (pytest
    imports them under their base names, which this reuses)."""
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        importlib.import_module(path.stem)


def normal(rng, shape, dtype):
    """Standard normal values of ``dtype`` (the inputs' usual draw)."""
    return rng.standard_normal(shape).astype(dtype)
