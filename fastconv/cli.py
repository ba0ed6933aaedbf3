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


def _add_train_mnist(subparsers):
    p = subparsers.add_parser(
        "train-mnist",
        help="train the book's deep MNIST ConvNet",
        description=(
            "Train the deep ConvNet of 'Deep Learning from Scratch' ch. 8 on MNIST. Writes "
            "best.npz, last.npz (resumable), history.json, curves.png and misclassified.png "
            "into --out."
        ),
    )
    p.add_argument("--epochs", type=_positive_int, default=20, help="epochs in total (20)")
    p.add_argument("--batch-size", type=_positive_int, default=100, help="batch size (100)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate (1e-3)")
    p.add_argument(
        "--optimizer",
        default="adam",
        choices=["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"],
        help="update rule (adam)",
    )
    p.add_argument("--backend", default="cpu", choices=["cpu", "gpu"], help="kernels (cpu)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16"],
        help="model dtype (float32); float16 is experimental for training (float32 masters)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for init, shuffling, dropout")
    p.add_argument("--out", default="runs/mnist", help="output directory (runs/mnist)")
    p.add_argument(
        "--resume", action="store_true", help="continue from OUT/last.npz (epoch granularity)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="start afresh even if OUT holds a previous run"
    )
    p.add_argument(
        "--limit-train", type=_positive_int, default=None, help="use the first N training images"
    )
    p.add_argument(
        "--limit-test", type=_positive_int, default=None, help="use the first N test images"
    )
    p.add_argument("--data", default=None, help="directory with the MNIST .gz files")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


# --- train-mnist ---------------------------------------------------------------------------------


class _RunRecorder:
    """Epoch-end bookkeeping: history.json, best.npz, last.npz (with optimizer and rng state)."""

    def __init__(self, out: Path, history: list, best: float, run_args: dict, verbose: bool):
        from .nn.callbacks import Callback

        recorder = self

        class _CB(Callback):
            def on_epoch_end(self, epoch, logs=None):
                recorder.epoch_end(self.model, epoch, logs)

        self.callback = _CB()
        self.out = out
        self.history = history
        self.best = best
        self.run_args = run_args
        self.verbose = verbose

    def epoch_end(self, model, epoch, logs):
        from .nn.callbacks import write_json_atomic

        record = {
            "epoch": epoch + 1,
            "train_loss": logs["loss"],
            "train_accuracy": logs["accuracy"],
            "test_loss": logs["val_loss"],
            "test_accuracy": logs["val_accuracy"],
            "time_s": logs.get("time"),
        }
        self.history.append(record)
        if record["test_accuracy"] > self.best:
            self.best = record["test_accuracy"]
            model.save(self.out / "best.npz", include_optimizer=False, epoch=epoch + 1)
        extra = {"history": self.history, "best_test_accuracy": self.best, "args": self.run_args}
        model.save(self.out / "last.npz", include_optimizer=True, epoch=epoch + 1, extra=extra)
        write_json_atomic(self.out / "history.json", _history_json(self.history))
        if self.verbose:
            print(
                f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} "
                f"acc {record['train_accuracy']:.4f} | test loss {record['test_loss']:.4f} "
                f"acc {record['test_accuracy']:.4f} | {record['time_s']:.1f}s",
                flush=True,
            )


def _history_json(records):
    keys = ["epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "time_s"]
    return {k: [r[k] for r in records] for k in keys}


def train_mnist(args) -> int:
    from .datasets import load_mnist
    from .models import deep_mnist_net
    from .nn import load_model, optimizers

    out = Path(args.out)
    last = out / "last.npz"
    if last.exists() and not (args.resume or args.overwrite):
        print(
            f"error: {out} holds a previous run ({last}); pass --resume to continue it or "
            "--overwrite to start afresh",
            file=sys.stderr,
        )
        return 2
    try:
        (x_train, y_train), (x_test, y_test) = load_mnist(args.data)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.limit_train:
        x_train, y_train = x_train[: args.limit_train], y_train[: args.limit_train]
    if args.limit_test:
        x_test, y_test = x_test[: args.limit_test], y_test[: args.limit_test]
    out.mkdir(parents=True, exist_ok=True)
    verbose = not args.quiet

    history: list = []
    best = -1.0
    initial_epoch = 0
    if args.resume and last.exists():
        try:
            model = load_model(last, backend=args.backend)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        meta = model.checkpoint_meta
        initial_epoch = int(meta.get("epoch") or 0)
        history = list(meta.get("extra", {}).get("history", []))[:initial_epoch]
        best = float(meta.get("extra", {}).get("best_test_accuracy", -1.0))
        if model.optimizer is None:
            model.compile(optimizers.get(args.optimizer, lr=args.lr))
        print(f"resuming from {last} after epoch {initial_epoch}", flush=True)
    else:
        if args.resume:
            print(f"no {last} to resume from; starting a new run", flush=True)
        model = deep_mnist_net(seed=args.seed)
        model.build(x_train.shape[1:])
        if args.backend != "cpu" or args.dtype != "float32":
            try:
                model = model.to(args.backend, args.dtype)
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
        model.compile(optimizers.get(args.optimizer, lr=args.lr))

    run_args = {k: v for k, v in vars(args).items() if k != "func"}
    recorder = _RunRecorder(out, history, best, run_args, verbose=True)
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
                validation_data=(x_test, y_test),
                callbacks=[recorder.callback],
                verbose=0,  # the recorder prints the per-epoch train/test line
                progress=verbose,
                initial_epoch=initial_epoch,
            )
        except KeyboardInterrupt:
            done = recorder.history[-1]["epoch"] if recorder.history else 0
            print(
                f"\ninterrupted; {last} holds epoch {done}: rerun with --resume to continue",
                file=sys.stderr,
            )
            return 130
        print(f"trained in {time.perf_counter() - t0:.1f}s")
    if recorder.history:
        best_rec = max(recorder.history, key=lambda r: r["test_accuracy"])
        print(
            f"final test accuracy {recorder.history[-1]['test_accuracy']:.4f}; best "
            f"{best_rec['test_accuracy']:.4f} (epoch {best_rec['epoch']}) -> {out / 'best.npz'}"
        )
        plot_curves(_history_json(recorder.history), out / "curves.png")
    scores = model.predict(x_test, batch_size=max(args.batch_size, 100))
    pred = np.asarray(_to_cpu(scores).argmax(axis=1))
    wrong = np.flatnonzero(pred != y_test)
    plot_misclassified(x_test, y_test, pred, wrong, out / "misclassified.png")
    print(f"wrote {out}/{{best.npz,last.npz,history.json,curves.png,misclassified.png}}")
    return 0


def _to_cpu(a):
    from .ops import to_cpu

    return to_cpu(a)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: dict, path) -> None:
    """Loss and accuracy per epoch, train and test."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = history["epoch"]
    ax_loss.plot(epochs, history["train_loss"], "o-", label="train")
    ax_loss.plot(epochs, history["test_loss"], "s-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.plot(epochs, history["train_accuracy"], "o-", label="train")
    ax_acc.plot(epochs, history["test_accuracy"], "s-", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _savefig_atomic(fig, path)
    plt.close(fig)


def plot_misclassified(x, y, pred, wrong, path, max_images: int = 50) -> None:
    """Grid of wrongly classified test digits titled ``true->pred`` (as in the book)."""
    plt = _pyplot()
    shown = wrong[:max_images]
    cols = 10
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.3), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), shown, strict=False):
        ax.imshow(x[i, 0], cmap="gray_r", interpolation="nearest")
        ax.set_title(f"{y[i]}->{pred[i]}", fontsize=9, color="red")
    fig.suptitle(f"{len(wrong)} of {len(y)} test digits misclassified (true->predicted)")
    fig.tight_layout()
    _savefig_atomic(fig, path)
    plt.close(fig)


def _savefig_atomic(fig, path):
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
