"""The options of ``fastconv train-mnist`` (argument definitions and value types), and the check
that a resumed run's recorded settings are values these options accept."""

from __future__ import annotations

import argparse

from .._cliutil import non_negative_float, non_negative_int, positive_float, positive_int, seed
from .settings import RECIPES, RUN_DEFAULTS, parse_augment

__all__ = ["add_train_mnist", "augment_spec", "check_saved_args"]


def augment_spec(text):
    try:
        parse_augment(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


def add_train_mnist(subparsers):
    """Add the ``train-mnist`` subcommand and its options to ``subparsers``; its parser."""
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
        "--epochs", type=positive_int, default=None, help="epochs in total (recipe: 20 / 30)"
    )
    p.add_argument("--batch-size", type=positive_int, default=None, help="batch size (100)")
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (1e-3)")
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
        "--warmup", type=non_negative_int, default=None,
        help="cosine: epochs of linear warm-up (0)",
    )  # fmt: skip
    p.add_argument(
        "--lr-gamma", type=positive_float, default=None,
        help="step: factor per step (0.1); exponential: factor per epoch (0.9); "
        "plateau: factor on a plateau (0.5)",
    )  # fmt: skip
    p.add_argument(
        "--lr-step", type=positive_int, default=None,
        help="step: epochs per step (epochs/3); plateau: patience in epochs (2)",
    )  # fmt: skip
    p.add_argument(
        "--min-lr", type=non_negative_float, default=None, help="cosine/plateau floor (0)"
    )
    p.add_argument(
        "--augment", default=None, type=augment_spec, metavar="SPEC",
        help="training-set augmentation: 'none' or key=value pairs of "
        "fastconv.augment.RandomTransform, e.g. 'rotation=12,shift=2.5,scale=0.1' "
        "(keys: rotation, shift, scale, shear, elastic_alpha, elastic_sigma)",
    )  # fmt: skip
    p.add_argument(
        "--weight-decay", type=non_negative_float, default=None,
        help="decoupled weight decay (needs --optimizer adamw) (0)",
    )  # fmt: skip
    p.add_argument(
        "--label-smoothing", type=non_negative_float, default=None,
        help="label smoothing of the cross-entropy, in [0, 1) (0)",
    )  # fmt: skip
    p.add_argument(
        "--patience", type=non_negative_int, default=None,
        help="stop when validation accuracy has not improved for N epochs (0: never)",
    )  # fmt: skip
    p.add_argument(
        "--ensemble", type=positive_int, default=None, metavar="K",
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
        "--seed", type=seed, default=None, help="seed (>= 0) for init, shuffling, dropout"
    )
    p.add_argument(
        "--val-size",
        type=non_negative_int,
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
        type=positive_int,
        default=None,
        help="use the first N training images (validation included)",
    )
    p.add_argument(
        "--limit-test", type=positive_int, default=None, help="use the first N test images"
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
    return p


def check_saved_args(saved: dict, last) -> None:
    """The settings a resumed run takes from its checkpoint must be values the command line
    would accept for the same flags (a crafted or damaged ``args`` is a CheckpointError, not
    a traceback mid-training)."""
    from ..nn import CheckpointError

    # the train-mnist options, {dest: argparse action}, as the command line parses them
    parser = add_train_mnist(argparse.ArgumentParser().add_subparsers())
    options = {a.dest: a for a in parser._actions}
    kinds = {positive_int: int, non_negative_int: int, seed: int, positive_float: float,
             non_negative_float: float, augment_spec: str}  # fmt: skip
    defaults = {**RUN_DEFAULTS, **RECIPES["book"]}
    for key, value in saved.items():
        action = options.get(key)
        if key == "ranks":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            problem = None if ok else "expected a positive integer"
        elif action is None or key not in (*defaults, "recipe", "epochs"):
            continue  # recorded for the record only (--out, --quiet...): not reused
        elif value is None:  # only where None is the default (not given: no limit...)
            nullable = key in defaults and defaults[key] is None
            problem = None if nullable else "expected a value"
        elif action.choices is not None:
            problem = None if value in action.choices else f"expected one of {action.choices}"
        else:
            kind = kinds.get(action.type)
            if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
                problem = "expected an integer"
            elif kind is float and not (isinstance(value, (int, float))
                                        and not isinstance(value, bool)):  # fmt: skip
                problem = "expected a number"
            elif kind is str and not isinstance(value, str):
                problem = "expected a string"
            else:
                try:
                    action.type(str(value))
                    problem = None
                except argparse.ArgumentTypeError as e:
                    problem = str(e)
        if problem:
            raise CheckpointError(
                f"checkpoint {last}: the recorded setting {key}={value!r} is not valid ({problem})"
            )
