"""What the commands share: argparse value types and the one-line form of a user's error.

A leaf module (it imports nothing of fastconv), so the CLI, the training programs and the
profiler's command can all use it without an import circle.
"""

from __future__ import annotations

import argparse

import numpy as np

__all__ = [
    "positive_int", "positive_float", "non_negative_float", "non_negative_int", "seed",
    "one_line", "error_text",
]  # fmt: skip


def _number(convert, ok, expected: str, out_of_range: str | None = None):
    """An argparse type: ``convert(text)`` if ``ok`` accepts it, else an ArgumentTypeError
    saying what was expected (``out_of_range``: its wording for a number outside the range)."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            shown = value if convert is int else text
            raise argparse.ArgumentTypeError(f"expected {out_of_range or expected}, got {shown}")
        return value

    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0 and np.isfinite(v), "a positive number")
non_negative_float = _number(
    float, lambda v: v >= 0 and np.isfinite(v), "a number >= 0", "a finite number >= 0"
)
#: --seed: NumPy seeds are integers >= 0 (a negative one failed inside NumPy, mid-run)
seed = _number(int, lambda v: v >= 0, "an integer seed >= 0")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def error_text(e: BaseException) -> str:
    """A user-caused exception as the text of one ``error:`` line."""
    if isinstance(e, MemoryError):  # NumPy's says how much; a bare one says nothing
        return f"out of memory{': ' + str(e) if str(e) else ''}"
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    return str(e) or type(e).__name__
