"""Command-line interface: ``fastconv train-mnist`` (plus ``profile``/``bench`` when present).

This module parses arguments, dispatches and turns user errors into one ``error:`` line; the
programs live elsewhere: train-mnist in :mod:`fastconv.train`, profile in :mod:`fastconv.profiler`,
bench in :mod:`fastconv.benchmark`.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from .train.settings import RECIPES, parse_augment

__all__ = ["main", "build_parser"]


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _add_train_mnist(subparsers):
    p = subparsers.add_parser(
        "train-mnist",
        help="train the book's deep MNIST ConvNet",
        description=(
            "Train the deep ConvNet of 'Deep Learning from Scratch' ch. 8 on MNIST. The last "
            "--val-size training images are held out: they pick the best epoch; the test set is "
            "evaluated once, at the end, with the best epoch's weights. Writes best.npz, "
            "last.npz (resumable), history.json, curves.png, misclassified.png and "
            "confusion.png into --out. --recipe augmented adds augmentation and a cosine "
            "schedule; --ensemble K trains K members and averages them."
        ),
    )
    p.add_argument(
        "--recipe",
        default=None,
        choices=sorted(RECIPES),
        help="defaults of the settings below: book (the book's recipe, 20 epochs) or augmented "
        "(augmentation + cosine schedule, 30 epochs); explicit flags win (book)",
    )
    p.add_argument(
        "--epochs", type=_positive_int, default=None, help="epochs in total (recipe: 20 / 30)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=None, help="batch size (100)")
    p.add_argument("--lr", type=_positive_float, default=None, help="learning rate (1e-3)")
    p.add_argument(
        "--optimizer",
        default=None,
        choices=["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"],
        help="update rule (adam); adamw: Adam with decoupled --weight-decay",
    )
    p.add_argument(
        "--net", default=None, choices=["book", "bn"],
        help="book: the book's deep net; bn: the same with BatchNorm after every convolution",
    )  # fmt: skip
    p.add_argument(
        "--schedule",
        default=None,
        choices=["constant", "step", "exponential", "cosine", "plateau"],
        help="learning-rate schedule per epoch (recipe: constant / cosine)",
    )
    p.add_argument(
        "--warmup", type=_non_negative_int, default=None,
        help="cosine: epochs of linear warm-up (0)",
    )  # fmt: skip
    p.add_argument(
        "--lr-gamma", type=_positive_float, default=None,
        help="step: factor per step (0.1); exponential: factor per epoch (0.9); "
        "plateau: factor on a plateau (0.5)",
    )  # fmt: skip
    p.add_argument(
        "--lr-step", type=_positive_int, default=None,
        help="step: epochs per step (epochs/3); plateau: patience in epochs (2)",
    )  # fmt: skip
    p.add_argument(
        "--min-lr", type=_non_negative_float, default=None, help="cosine/plateau floor (0)"
    )
    p.add_argument(
        "--augment", default=None, type=_augment_spec, metavar="SPEC",
        help="training-set augmentation: 'none' or key=value pairs of "
        "fastconv.augment.RandomTransform, e.g. 'rotation=12,shift=2.5,scale=0.1' "
        "(keys: rotation, shift, scale, shear, elastic_alpha, elastic_sigma)",
    )  # fmt: skip
    p.add_argument(
        "--weight-decay", type=_non_negative_float, default=None,
        help="decoupled weight decay (needs --optimizer adamw) (0)",
    )  # fmt: skip
    p.add_argument(
        "--label-smoothing", type=_non_negative_float, default=None,
        help="label smoothing of the cross-entropy, in [0, 1) (0)",
    )  # fmt: skip
    p.add_argument(
        "--patience", type=_non_negative_int, default=None,
        help="stop when validation accuracy has not improved for N epochs (0: never)",
    )  # fmt: skip
    p.add_argument(
        "--ensemble", type=_positive_int, default=None, metavar="K",
        help="train K members (seeds SEED, SEED+1, ...; SEED defaults to 0) in OUT/member-k "
        "and report each member and their average on the test set",
    )  # fmt: skip
    p.add_argument("--backend", default="cpu", choices=["cpu", "gpu"], help="kernels (cpu)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16"],
        help="model dtype (float32); float16 is experimental for training (float32 masters)",
    )
    p.add_argument(
        "--seed", type=_seed, default=None, help="seed (>= 0) for init, shuffling, dropout"
    )
    p.add_argument(
        "--val-size",
        type=_non_negative_int,
        default=None,
        help="training images held out for validation, taken from the end (5000; 0: none, "
        "then the last epoch counts as the best)",
    )
    p.add_argument("--out", default="runs/mnist", help="output directory (runs/mnist)")
    p.add_argument(
        "--resume", action="store_true", help="continue from OUT/last.npz (epoch granularity)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="start afresh even if OUT holds a previous run"
    )
    p.add_argument(
        "--limit-train",
        type=_positive_int,
        default=None,
        help="use the first N training images (validation included)",
    )
    p.add_argument(
        "--limit-test", type=_positive_int, default=None, help="use the first N test images"
    )
    p.add_argument(
        "--data",
        default=None,
        help="directory with the four MNIST .gz files (default: $FASTCONV_DATA, the source "
        "checkout's data/mnist, else the user cache, downloading into it when needed)",
    )
    p.add_argument(
        "--no-download",
        action="store_true",
        help="fail instead of downloading MNIST when it is not found (see docs/training.md)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--distributed",
        default="auto",
        choices=["auto", "mpi", "none"],
        help="data-parallel over MPI ranks (mpiexec -n N fastconv train-mnist ...; needs the "
        "mpi extra): auto uses MPI when an MPI launcher started this process; mpi always "
        "does; none never does (docs/distributed.md)",
    )
    p.set_defaults(func=train_mnist)
    return p


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _augment_spec(text):
    try:
        parse_augment(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


def _seed(text):
    """--seed: NumPy seeds are integers >= 0 (a negative one failed inside NumPy, mid-run)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer seed >= 0, got {value}")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error_text(e: BaseException) -> str:
    """A user-caused exception as the text of one ``error:`` line."""
    if isinstance(e, MemoryError):  # NumPy's says how much; a bare one says nothing
        return f"out of memory{': ' + str(e) if str(e) else ''}"
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    return str(e) or type(e).__name__


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
