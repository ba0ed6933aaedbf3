"""Command-line interface: ``fastconv train-mnist`` (plus ``profile``/``bench`` when present).

This module parses arguments, dispatches and turns user errors into one ``error:`` line; the
programs live elsewhere: train-mnist in :mod:`fastconv.train`, profile in :mod:`fastconv.profiler`,
bench in :mod:`fastconv.benchmark`.
"""

from __future__ import annotations

import argparse
import os
import sys

from ._cliutil import error_text as _error_text
from ._cliutil import one_line as _one_line
from .train.options import add_train_mnist

__all__ = ["main", "build_parser"]


def _add_train_mnist(subparsers):
    """The train-mnist subcommand (its options: :mod:`fastconv.train.options`)."""
    p = add_train_mnist(subparsers)
    p.set_defaults(func=train_mnist)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastconv", description="fastconv: hand-written CNN kernels and a small layer stack"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_mnist(subparsers)
    # Owned by other modules; a missing one must not break the CLI.
    try:
        from . import profiler
    except ImportError:
        profiler = None
    if profiler is not None and hasattr(profiler, "add_subcommand"):
        profiler.add_subcommand(subparsers)
    try:
        from . import benchmark
    except ImportError:
        benchmark = None
    if benchmark is not None and hasattr(benchmark, "add_subcommand"):
        benchmark.add_subcommand(subparsers)
    return parser


def main(argv=None) -> int:
    """Run one command. Whatever a user can cause (a bad value, a missing or unwritable file, a
    damaged checkpoint, too little memory) ends in one ``error: ...`` line on stderr and a
    non-zero exit, never a traceback; ``FASTCONV_TRACEBACK=1`` shows the traceback instead
    (for reporting a bug)."""
    from .nn.saving import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # a command's own message (profile, bench): same form
        if isinstance(e.code, str) and not e.code.startswith("error: "):
            raise SystemExit(f"error: {_one_line(e.code)}") from None
        raise
    except (CheckpointError, ValueError, TypeError, OSError, MemoryError) as e:
        if os.environ.get("FASTCONV_TRACEBACK"):
            raise
        print(f"error: {_one_line(_error_text(e))}", file=sys.stderr)
        return 1


def train_mnist(args) -> int:
    """``fastconv train-mnist``: :func:`fastconv.train.mnist.train_mnist`."""
    from .train.mnist import train_mnist as run

    return run(args)
