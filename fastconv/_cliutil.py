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


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value

def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value

def non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value

def non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value

def seed(text):
    """--seed: NumPy seeds are integers >= 0 (a negative one failed inside NumPy, mid-run)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer seed >= 0, got {value}")
    return value


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def error_text(e: BaseException) -> str:
    """A user-caused exception as the text of one ``error:`` line."""
    if isinstance(e, MemoryError):  # NumPy's says how much; a bare one says nothing
        return f"out of memory{': ' + str(e) if str(e) else ''}"
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    return str(e) or type(e).__name__
