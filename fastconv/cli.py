"""Command-line interface: ``fastconv train-mnist`` (plus ``profile``/``bench`` when present)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

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


# Settings a resumed run must share with the run it continues (None: not given on the command
# line, take the saved or the default value).
_RUN_DEFAULTS = {
    "batch_size": 100,
    "lr": 1e-3,
    "optimizer": "adam",
    "dtype": "float32",
    "seed": None,
    "val_size": 5000,
    "limit_train": None,
}

# The recipes: defaults of the training settings (--flags given on the command line win). "book"
# is the book's ch. 8 recipe; "augmented" adds the CNN courses' techniques (docs/training.md
# has the runs that chose it, on the validation set only).
RECIPES = {
    "book": {
        "epochs": 20,
        "net": "book",
        "schedule": "constant",
        "warmup": 0,
        "min_lr": 0.0,
        "lr_gamma": None,
        "lr_step": None,
        "augment": "none",
        "weight_decay": 0.0,
        "label_smoothing": 0.0,
        "patience": 0,
    },
    "augmented": {
        "epochs": 30,
        "net": "book",
        "schedule": "cosine",
        "warmup": 0,
        "min_lr": 0.0,
        "lr_gamma": None,
        "lr_step": None,
        "augment": "rotation=12,shift=2.5,scale=0.1",
        "weight_decay": 0.0,
        "label_smoothing": 0.0,
        "patience": 0,
    },
}


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


_AUGMENT_KEYS = ("rotation", "shift", "scale", "shear", "elastic_alpha", "elastic_sigma")


def parse_augment(text: str) -> dict | None:
    """``'none'`` -> None; ``'rotation=12,shift=2.5'`` -> keyword arguments of
    :class:`fastconv.augment.RandomTransform` (validated). Raises ValueError."""
    from .augment import RandomTransform

    text = text.strip()
    if text in ("none", ""):
        return None
    kwargs = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _AUGMENT_KEYS:
            keys = ", ".join(_AUGMENT_KEYS)
            raise ValueError(f"expected key=value with keys {keys}; got {part!r}")
        try:
            kwargs[key] = float(value)
        except ValueError:
            raise ValueError(f"{key} must be a number, got {value!r}") from None
    RandomTransform(**kwargs)  # validates every value
    return kwargs


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


# --- train-mnist ---------------------------------------------------------------------------------


class _RunRecorder:
    """Epoch-end bookkeeping: history.json, best.npz (best validation accuracy, or the last
    epoch without validation), last.npz (with optimizer and generator state)."""

    def __init__(self, out: Path, history: list, best: float, run_args: dict, validate: bool):
        from .nn.callbacks import Callback

        recorder = self

        class _CB(Callback):
            root_only = True  # under MPI only rank 0 prints and writes

            def on_epoch_begin(self, epoch, logs=None):
                recorder.lr = self.model.optimizer.lr  # after the schedule set it

            def on_epoch_end(self, epoch, logs=None):
                recorder.epoch_end(self.model, epoch, logs)

        self.callback = _CB()
        self.out = out
        self.history = history
        self.best = best
        self.run_args = run_args
        self.validate = validate
        self.lr = None
        self.schedule = None

    def epoch_end(self, model, epoch, logs):
        from .nn._files import strict_json

        record = {
            "epoch": epoch + 1,
            "train_loss": logs["loss"],
            "train_accuracy": logs["accuracy"],
            "val_loss": logs.get("val_loss"),
            "val_accuracy": logs.get("val_accuracy"),
            "time_s": logs.get("time"),
            "lr": self.lr,
        }
        self.history.append(record)
        score = record["val_accuracy"] if self.validate else float(epoch + 1)
        if score > self.best:
            self.best = score
            model.save(self.out / "best.npz", include_optimizer=False, epoch=epoch + 1)
        extra = {"history": self.history, "best_score": self.best, "args": self.run_args}
        if hasattr(self.schedule, "get_state"):
            extra["schedule_state"] = self.schedule.get_state()
        # Checkpoints hold strict JSON: a NaN validation loss is recorded as null, as in
        # history.json (save_model refuses non-finite numbers rather than write bare NaN).
        extra = strict_json(extra)
        model.save(self.out / "last.npz", include_optimizer=True, epoch=epoch + 1, extra=extra)
        _write_history(self.out, self.history)
        val = (
            f" | val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f}"
            if self.validate
            else ""
        )
        print(
            f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.4f}{val} | {record['time_s']:.1f}s",
            flush=True,
        )


_HISTORY_KEYS = [
    "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "time_s", "lr",
]  # fmt: skip


def _history_json(records, test=None):
    data = {k: [r.get(k) for r in records] for k in _HISTORY_KEYS}
    if test is not None:
        data["test"] = test
    return data


def _write_history(out, records, test=None):
    from .nn._files import write_json_atomic

    write_json_atomic(out / "history.json", _history_json(records, test))


def _resolve_run_args(args, saved=None):
    """Fill unset settings from the resumed run (or the recipe's defaults); refuse conflicts.

    ``epochs`` may grow on resume; everything else must match the run being resumed. Runs saved
    before recipes existed count as "book" runs.
    """
    conflicts = []
    if args.recipe is None:
        args.recipe = (saved or {}).get("recipe", "book")
    elif saved is not None and args.recipe != saved.get("recipe", "book"):
        conflicts.append(
            f"--recipe {args.recipe} (the run being resumed used {saved.get('recipe', 'book')})"
        )
    recipe = RECIPES[args.recipe if args.recipe in RECIPES else "book"]
    if args.epochs is None:
        args.epochs = (saved or {}).get("epochs", recipe["epochs"])
    defaults = {**_RUN_DEFAULTS, **{k: v for k, v in recipe.items() if k != "epochs"}}
    for key, default in defaults.items():
        given = getattr(args, key)
        before = saved.get(key, default) if saved is not None else default
        if given is None:
            setattr(args, key, before)
        elif saved is not None and given != before:
            flag = "--" + key.replace("_", "-")
            conflicts.append(f"{flag} {given} (the run being resumed used {before})")
    return conflicts


def _train_mnist_options() -> dict:
    """``{dest: argparse action}`` of the train-mnist options."""
    p = _add_train_mnist(argparse.ArgumentParser().add_subparsers())
    return {a.dest: a for a in p._actions}


def _check_saved_args(saved: dict, last) -> None:
    """The settings a resumed run takes from its checkpoint must be values the command line
    would accept for the same flags (a crafted or damaged ``args`` is a CheckpointError, not
    a traceback mid-training)."""
    from .nn import CheckpointError

    options = _train_mnist_options()
    kinds = {_positive_int: int, _non_negative_int: int, _seed: int, _positive_float: float,
             _non_negative_float: float, _augment_spec: str}  # fmt: skip
    defaults = {**_RUN_DEFAULTS, **RECIPES["book"]}
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


def _check_history(history: list, last, validate: bool) -> None:
    """The per-epoch records a resumed run continues: epochs 1, 2, ... with the numbers the
    early stopping and the plots read."""
    from .nn import CheckpointError

    for i, record in enumerate(history):
        missing = [k for k in ("epoch", "train_loss", "train_accuracy") if record.get(k) is None]
        if validate and record.get("val_accuracy") is None:
            missing.append("val_accuracy")
        if missing or record["epoch"] != i + 1:
            raise CheckpointError(
                f"checkpoint {last}: history record {i} is not epoch {i + 1}'s record (missing "
                f"or wrong: {missing or ['epoch']})"
            )


def _model_fits_data(model, x_train, args) -> str | None:
    """What makes a resumed model unusable on this data, or None."""
    classes = 10
    got = f"inputs {tuple(model.input_shape)} and {model.output_shape} outputs"
    if tuple(model.input_shape) != tuple(x_train.shape[1:]) or model.output_shape != (classes,):
        return (
            f"holds a model for {got}, not for MNIST's {tuple(x_train.shape[1:])} images and "
            f"{classes} classes"
        )
    if model.dtype.name != args.dtype:
        return f"holds a {model.dtype.name} model, but its run settings say {args.dtype}"
    return None


def train_mnist(args) -> int:
    try:
        strategy = _strategy_for(args)
    except (ImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if strategy is None:
        return _train_mnist_checked(args, None)
    return _train_mnist_mpi(args, strategy)


def _train_mnist_checked(args, strategy) -> int:
    """Lock the run folder (rank 0 alone writes it), then check and train."""
    from ._runlock import RunFolderBusy, RunLock

    out = Path(args.out)
    lock = RunLock(out, command="fastconv train-mnist")

    def take():  # on rank 0; every rank gets the outcome
        if out.exists() and not out.is_dir():
            return f"--out {out} is a file, not a directory"
        try:
            note = lock.acquire()
        except RunFolderBusy as e:
            return str(e)
        except OSError as e:
            return f"cannot use --out {out}: {e.strerror or e}"
        if note:
            print(note, file=sys.stderr, flush=True)
        return None

    try:
        problem = _on_root(strategy, take)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        return _train_mnist_locked(args, strategy, out)
    finally:
        lock.release()


def _train_mnist_locked(args, strategy, out: Path) -> int:
    from .nn import CheckpointError
    from .nn._files import remove_stale_temp_files

    last = out / "last.npz"
    if _is_root(strategy):  # under the lock no other fastconv run writes here
        remove_stale_temp_files(out)
    if _on_root(strategy, last.exists) and not (args.resume or args.overwrite):
        print(
            f"error: {out} holds a previous run ({last}); pass --resume to continue it or "
            "--overwrite to start afresh",
            file=sys.stderr,
        )
        return 2
    if getattr(args, "ensemble", None):
        if strategy is not None:
            print(
                "error: --ensemble trains its members one after another in one process; under "
                "mpiexec train each member as its own run (--seed, --out) instead",
                file=sys.stderr,
            )
            return 2
        return _train_ensemble(args)
    try:
        return _train_mnist(args, out, last, strategy)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. the disk is full
        print(f"error: cannot write the run's files in {out}: {e}", file=sys.stderr)
        return 1


def _make_optimizer(args):
    from .nn import optimizers

    if args.optimizer == "adamw":
        return optimizers.AdamW(lr=args.lr, weight_decay=args.weight_decay)
    return optimizers.get(args.optimizer, lr=args.lr)


def _make_net(args):
    from .models import deep_mnist_bn_net, deep_mnist_net

    return (deep_mnist_bn_net if args.net == "bn" else deep_mnist_net)(seed=args.seed)


def _check_settings(args) -> str | None:
    """Combinations argparse cannot check; the problem, or None."""
    if args.weight_decay and args.optimizer != "adamw":
        return "--weight-decay needs --optimizer adamw (decoupled weight decay)"
    if not args.label_smoothing < 1:
        return f"--label-smoothing must be in [0, 1), got {args.label_smoothing}"
    if args.warmup and args.schedule != "cosine":
        return "--warmup needs --schedule cosine"
    if args.schedule == "cosine" and args.warmup >= args.epochs:
        return f"--warmup {args.warmup} must be below --epochs {args.epochs}"
    if args.schedule == "plateau" and not args.val_size:
        return "--schedule plateau watches the validation loss: it needs --val-size > 0"
    if args.patience and not args.val_size:
        return "--patience watches the validation accuracy: it needs --val-size > 0"
    return None


class _Patience:
    """Early stopping on validation accuracy, computed from the run's history (so that a
    resumed run counts the epochs since the best one across the interruption)."""

    def __init__(self, patience, recorder):
        from .nn.callbacks import Callback

        outer = self

        class _CB(Callback):
            def on_epoch_end(self, epoch, logs=None):
                if outer.should_stop():
                    self.model.stop_training = True

        self.callback = _CB()
        self.patience = patience
        self.recorder = recorder

    def should_stop(self) -> bool:
        accs = [r["val_accuracy"] for r in self.recorder.history]
        if not self.patience or not accs:
            return False
        since_best = len(accs) - 1 - int(np.argmax(accs))
        if since_best >= self.patience:
            print(f"early stop: no better validation accuracy for {since_best} epochs")
            return True
        return False


def _mnist_options(args) -> dict:
    # --quiet silences the download's progress bar and its notices too
    return {
        "download": not args.no_download,
        "progress": False if args.quiet else None,
    }


def _train_mnist(args, out: Path, last: Path, strategy=None) -> int:
    from .augment import RandomTransform
    from .datasets import load_mnist
    from .nn import SoftmaxCrossEntropy, TerminateOnNaN, load_model
    from .nn.callbacks import ReduceLROnPlateau, get_schedule

    model, saved = None, None
    ranks = 1 if strategy is None else strategy.size
    if args.resume and _on_root(strategy, last.exists):
        loader = load_model if strategy is None else strategy.load_model
        model = loader(last, backend=args.backend)
        # The loader checked the metadata's types; the values must also be settings this
        # command accepts, as if given on the command line.
        saved = model.checkpoint_meta.get("extra", {}).get("args") or {}
        _check_saved_args(saved, last)
        before = saved.get("ranks", 1)
        if before != ranks:
            how = "one process" if before == 1 else f"mpiexec -n {before}"
            print(
                f"error: {last} was trained with {before} MPI rank(s) and this run has {ranks}; "
                f"--resume continues a run on as many ranks as it started with (shards, "
                f"dropout streams): run it with {how}, or start afresh with --overwrite",
                file=sys.stderr,
            )
            return 2
    conflicts = _resolve_run_args(args, saved)
    if conflicts:
        print(
            "error: --resume continues a run with its own settings; these differ: "
            + "; ".join(conflicts)
            + ". Drop them, or start afresh with --overwrite.",
            file=sys.stderr,
        )
        return 2
    problem = _check_settings(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        (x_train, y_train), (x_test, y_test) = load_mnist(args.data, **_mnist_options(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.limit_train:
        x_train, y_train = x_train[: args.limit_train], y_train[: args.limit_train]
    if args.limit_test:
        x_test, y_test = x_test[: args.limit_test], y_test[: args.limit_test]
    if args.val_size >= x_train.shape[0]:
        print(
            f"error: --val-size {args.val_size} leaves no training images out of "
            f"{x_train.shape[0]}",
            file=sys.stderr,
        )
        return 2
    if model is not None:
        problem = _model_fits_data(model, x_train, args)
        if problem:
            print(f"error: {last} {problem}; start afresh with --overwrite", file=sys.stderr)
            return 2
    validation = None
    if args.val_size:
        validation = (x_train[-args.val_size :], y_train[-args.val_size :])
        x_train, y_train = x_train[: -args.val_size], y_train[: -args.val_size]
    if _is_root(strategy):
        out.mkdir(parents=True, exist_ok=True)

    history: list = []
    best = -1.0
    initial_epoch = 0
    if model is not None:
        meta = model.checkpoint_meta
        initial_epoch = int(meta.get("epoch") or 0)
        extra = meta.get("extra", {})
        history = list(extra.get("history", []))[:initial_epoch]
        _check_history(history, last, validate=bool(args.val_size))
        best = float(extra.get("best_score", -1.0))
        schedule_state = extra.get("schedule_state")
        optimizer = model.optimizer if model.optimizer is not None else _make_optimizer(args)
        model.compile(optimizer, SoftmaxCrossEntropy(args.label_smoothing))
        print(f"resuming from {last} after epoch {initial_epoch}", flush=True)
    else:
        schedule_state = None
        if args.resume:
            print(f"no {last} to resume from; starting a new run", flush=True)
        model = _make_net(args)
        if args.backend != "cpu" or args.dtype != "float32":
            try:
                model = model.to(args.backend, args.dtype)
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
        model.compile(_make_optimizer(args), SoftmaxCrossEntropy(args.label_smoothing))

    run_args = {k: v for k, v in vars(args).items() if k != "func"}
    run_args["ranks"] = ranks
    schedule = get_schedule(
        args.schedule, args.epochs, args.lr, args.warmup, args.lr_gamma, args.lr_step, args.min_lr
    )
    if isinstance(schedule, ReduceLROnPlateau) and schedule_state:
        schedule.set_state(schedule_state)
    augment_kwargs = parse_augment(args.augment)
    augment = RandomTransform(**augment_kwargs) if augment_kwargs else None
    recorder = _RunRecorder(out, history, best, run_args, validate=validation is not None)
    recorder.schedule = schedule
    patience = _Patience(args.patience, recorder)
    nan_guard = TerminateOnNaN()
    callbacks = [recorder.callback, patience.callback, nan_guard]
    if schedule is not None:
        # Before the recorder: its epoch-end update (plateau) is in the checkpoint it writes.
        callbacks.insert(0, schedule)
    if initial_epoch and patience.should_stop():
        initial_epoch = args.epochs  # stopped early before the interruption
    if initial_epoch >= args.epochs:
        print(f"nothing to do: {initial_epoch} of {args.epochs} epochs already done")
    else:
        t0 = time.perf_counter()
        try:
            model.fit(
                x_train,
                y_train,
                epochs=args.epochs,
                batch_size=args.batch_size,
                validation_data=validation,
                callbacks=callbacks,
                verbose=0,  # the recorder prints the per-epoch line
                progress=not args.quiet,
                initial_epoch=initial_epoch,
                augment=augment,
                strategy=strategy,
            )
        except KeyboardInterrupt:
            done = recorder.history[-1]["epoch"] if recorder.history else initial_epoch
            print(
                f"\ninterrupted; {last} holds epoch {done}: rerun with --resume to continue",
                file=sys.stderr,
            )
            return 130
        if nan_guard.message:
            done = recorder.history[-1]["epoch"] if recorder.history else initial_epoch
            kept = f"{last} keeps epoch {done}" if recorder.history else "no checkpoint written"
            print(f"error: {nan_guard.message}; {kept}", file=sys.stderr)
            if recorder.history and _is_root(strategy):
                plot_curves(_history_json(recorder.history), out / "curves.png")
            return 1
        print(f"trained in {time.perf_counter() - t0:.1f}s")
    if not _is_root(strategy):  # rank 0 alone tests, plots and writes
        return 0
    if not recorder.history:
        return 0
    # The test set, touched once: with the weights of the epoch the validation set chose.
    chosen = load_model(out / "best.npz", backend=args.backend)
    test = chosen.evaluate(x_test, y_test, batch_size=max(args.batch_size, 100))
    best_epoch = int(chosen.checkpoint_meta["epoch"])
    scores = chosen.predict(x_test, batch_size=max(args.batch_size, 100))
    pred = np.asarray(_to_cpu(scores).argmax(axis=1))
    test_record = {
        "epoch": best_epoch,
        "loss": test["loss"],
        "accuracy": test["accuracy"],
        "errors": int((pred != y_test).sum()),
        "per_class_accuracy": [round(float(a), 6) for a in per_class_accuracy(y_test, pred, 10)],
    }
    _write_history(out, recorder.history, test_record)
    how = "best validation accuracy" if validation is not None else "last epoch, no validation"
    print(
        f"test accuracy {test['accuracy']:.4f} (loss {test['loss']:.4f}) with epoch "
        f"{best_epoch} ({how}) -> {out / 'best.npz'}"
    )
    plot_curves(_history_json(recorder.history, test_record), out / "curves.png")
    wrong = np.flatnonzero(pred != y_test)
    plot_misclassified(x_test, y_test, pred, wrong, out / "misclassified.png")
    plot_confusion_matrix(
        confusion_matrix(y_test, pred, 10), out / "confusion.png", title="Test set"
    )
    print(
        f"wrote {out}/{{best.npz,last.npz,history.json,curves.png,misclassified.png,confusion.png}}"
    )
    return 0


# --- train-mnist over MPI ------------------------------------------------------------------------


def _strategy_for(args):
    """The MPI strategy when an MPI launcher started this process (or ``--distributed mpi``);
    None for a plain run, which never imports MPI."""
    from .nn.distributed import launcher_world_size

    size = launcher_world_size()
    if args.distributed == "none":
        if size is not None and size > 1:
            raise ValueError(
                f"--distributed none, but an MPI launcher started {size} processes: each would "
                "train alone and write the same files; drop --distributed none, or run one "
                "process"
            )
        return None
    if args.distributed == "auto" and size is None:
        return None
    from .nn.distributed import MPIDataParallel

    try:
        return MPIDataParallel()
    except ImportError as e:
        started = f"an MPI launcher started {size} processes, but " if size else ""
        raise ImportError(f"{started}{e}") from None


def _is_root(strategy) -> bool:
    return strategy is None or strategy.is_root


def _on_root(strategy, fn):
    """``fn()`` evaluated on rank 0 (which owns the output directory), on every rank."""
    if strategy is None:
        return fn()
    return strategy.broadcast_object(fn() if strategy.is_root else None)


def _train_mnist_mpi(args, strategy) -> int:
    """One rank of ``mpiexec -n N fastconv train-mnist``: every rank trains, rank 0 prints and
    writes. The other ranks' output is held back and shown only when their failure is their
    own. A rank that stops mid-training (an error, Ctrl-C, a rank that stopped answering)
    ends the whole job with MPI_Abort, since the others would wait for it forever."""
    import contextlib
    import io
    import traceback

    from .nn.distributed import DistributedError, DistributedSetupError

    line = strategy.describe(strategy.configure_threads())
    if line:
        print(line, flush=True)
    held = io.StringIO()
    with contextlib.ExitStack() as stack:
        if not strategy.is_root:
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            stack.enter_context(contextlib.redirect_stderr(held))
        try:
            rc = _train_mnist_checked(args, strategy)
        except DistributedSetupError as e:  # raised on every rank alike
            print(f"error: {e}", file=sys.stderr)
            rc = 2
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            rc = 130
        except DistributedError as e:
            print(f"error: {e}", file=sys.stderr)
            rc = 1
        except (ValueError, TypeError, OSError, MemoryError) as e:  # as main() does
            print(f"error: {_one_line(_error_text(e))}", file=sys.stderr)
            rc = 1
        except Exception:
            traceback.print_exc()
            rc = 1
    me = f"rank {strategy.rank} of {strategy.size}"
    if strategy.phase == "idle":  # stopped before training, while the others may be starting
        root_trains = strategy.withdraw()
        if root_trains and not strategy.is_root:  # rank 0 cannot say why
            _show(held.getvalue(), me)
    elif strategy.phase in ("setup", "training"):
        if rc == 130:  # Ctrl-C reaches every rank: let rank 0 say where to resume
            if not strategy.is_root:
                time.sleep(1.0)
        else:
            if not strategy.is_root:
                _show(held.getvalue(), me)
            last = Path(args.out) / "last.npz"
            resume = f"; rerun with --resume to continue from {last}" if last.exists() else ""
            print(
                f"error: {me} stopped during training: stopping every rank (MPI_Abort){resume}",
                file=sys.stderr,
                flush=True,
            )
        sys.stderr.flush()
        strategy.abort(rc)
    return rc


def _show(text, who):
    for line in text.strip().splitlines():
        print(f"[{who}] {line}", file=sys.stderr)
    sys.stderr.flush()


# --- ensembles ----------------------------------------------------------------------------------


def _train_ensemble(args) -> int:
    """``--ensemble K``: K complete runs in OUT/member-k (seeds SEED+k-1), then the average of
    their best (validation-chosen) checkpoints' probabilities on the test set."""
    import copy
    import json

    from .datasets import load_mnist
    from .nn import CheckpointError, Ensemble, load_model
    from .nn._files import write_json_atomic

    out = Path(args.out)
    k_total = args.ensemble
    base_seed = args.seed if args.seed is not None else 0
    members = [out / f"member-{k + 1}" for k in range(k_total)]
    held = [m for m in members if (m / "last.npz").exists()]
    if held and not (args.resume or args.overwrite):
        print(
            f"error: {out} holds a previous ensemble ({held[0] / 'last.npz'}); pass --resume to "
            "continue it or --overwrite to start afresh",
            file=sys.stderr,
        )
        return 2
    rows = []
    for k, member_out in enumerate(members):
        margs = copy.copy(args)
        margs.ensemble = None
        margs.seed = base_seed + k
        margs.out = str(member_out)
        print(f"== ensemble member {k + 1}/{k_total}: seed {margs.seed}, {member_out}", flush=True)
        rc = train_mnist(margs)
        if rc:
            return rc
        hist = json.loads((member_out / "history.json").read_text())
        rows.append({"member": k + 1, "seed": margs.seed, **hist["test"]})
    try:
        (_, _), (x_test, y_test) = load_mnist(args.data, **_mnist_options(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.limit_test:
        x_test, y_test = x_test[: args.limit_test], y_test[: args.limit_test]
    try:
        models = [load_model(m / "best.npz", backend=args.backend) for m in members]
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ensemble = Ensemble(models)
    probs = ensemble.predict(x_test, batch_size=1000)
    pred = probs.argmax(axis=1)
    result = ensemble.evaluate(x_test, y_test, batch_size=1000)
    result["errors"] = int((pred != y_test).sum())
    result["per_class_accuracy"] = [
        round(float(a), 6) for a in per_class_accuracy(y_test, pred, 10)
    ]
    write_json_atomic(out / "ensemble.json", {"members": rows, "ensemble": result})
    print("member  seed  epoch  test accuracy")
    for r in rows:
        print(f"{r['member']:>6}  {r['seed']:>4}  {r['epoch']:>5}  {r['accuracy']:.4f}")
    accs = [r["accuracy"] for r in rows]
    print(
        f"members: mean {np.mean(accs):.4f}, min {min(accs):.4f}, max {max(accs):.4f}; "
        f"ensemble of {k_total} (averaged probabilities): test accuracy "
        f"{result['accuracy']:.4f} (loss {result['loss']:.4f}, {result['errors']} errors)"
    )
    wrong = np.flatnonzero(pred != y_test)
    plot_misclassified(x_test, y_test, pred, wrong, out / "misclassified.png")
    plot_confusion_matrix(
        confusion_matrix(y_test, pred, 10), out / "confusion.png", title=f"Ensemble of {k_total}"
    )
    print(f"wrote {out}/{{ensemble.json,misclassified.png,confusion.png}}")
    return 0


def confusion_matrix(y_true, y_pred, k):
    from .nn.metrics import confusion_matrix as cm

    return cm(y_true, y_pred, k)


def per_class_accuracy(y_true, y_pred, k):
    from .nn.metrics import per_class_accuracy as pca

    return pca(y_true, y_pred, k)


def plot_confusion_matrix(cm, path, title):
    from .nn.metrics import plot_confusion_matrix as plot

    plot(cm, path, title=title)


def _to_cpu(a):
    from .ops import to_cpu

    return to_cpu(a)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: dict, path) -> None:
    """Loss and accuracy per epoch, train and validation; the test result as one point."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = history["epoch"]
    ax_loss.plot(epochs, history["train_loss"], "o-", label="train")
    ax_acc.plot(epochs, history["train_accuracy"], "o-", label="train")
    if any(v is not None for v in history.get("val_loss", [])):
        ax_loss.plot(epochs, history["val_loss"], "s-", label="validation")
        ax_acc.plot(epochs, history["val_accuracy"], "s-", label="validation")
    test = history.get("test")
    if test:
        ax_loss.plot([test["epoch"]], [test["loss"]], "r*", ms=12, label="test (once)")
        ax_acc.plot([test["epoch"]], [test["accuracy"]], "r*", ms=12, label="test (once)")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    title = "Accuracy" + (f" (test {test['accuracy']:.2%})" if test else "")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title=title)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _savefig_atomic(fig, path)
    plt.close(fig)


def plot_misclassified(x, y, pred, wrong, path, max_images: int = 50) -> None:
    """Grid of wrongly classified test digits titled ``true->pred`` (as in the book).

    One image of tiles in one axes rather than one axes per digit: 50 axes took ~10 s of
    matplotlib layout per plot on the shared 2-core machine, the montage a fraction of that.
    """
    plt = _pyplot()
    shown = wrong[:max_images]
    cols = 10
    rows = max(1, -(-len(shown) // cols))
    h, w = x.shape[2], x.shape[3]
    gap_x, gap_y = 4, 12  # pixels between tiles; room above each tile for its label
    canvas = np.zeros((rows * (h + gap_y), cols * (w + gap_x)), dtype=np.float32)
    fig, ax = plt.subplots(figsize=(cols * 1.1, rows * 1.3 + 0.4))
    for k, i in enumerate(shown):
        r, c = divmod(k, cols)
        top, left = r * (h + gap_y) + gap_y, c * (w + gap_x)
        canvas[top : top + h, left : left + w] = x[i, 0]
        ax.text(left + w / 2, top - 2, f"{y[i]}->{pred[i]}", ha="center", va="bottom",
                fontsize=9, color="red")  # fmt: skip
    ax.imshow(canvas, cmap="gray_r", interpolation="nearest", vmin=0, vmax=max(1.0, canvas.max()))
    ax.axis("off")
    ax.set_title(f"{len(wrong)} of {len(y)} test digits misclassified (true->predicted)")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93)
    _savefig_atomic(fig, path)
    plt.close(fig)


def _savefig_atomic(fig, path):
    from .nn._files import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"), suffix=".png")
