"""``fastconv train-mnist``: the book's deep ConvNet trained on MNIST (docs/training.md).

One run is ``Model.fit`` with the library's callbacks, writing into ``--out``:

- :class:`~fastconv.nn.ModelCheckpoint` keeps ``best.npz``, the epoch with the best validation
  accuracy (every epoch without validation, when the last one counts as the best);
- :class:`~fastconv.nn.ResumableCheckpoint` keeps ``last.npz`` (optimizer and generator state,
  the epoch, and in ``extra`` the history, the best score, the run's settings and the plateau
  schedule's counters: everything ``--resume`` needs), then ``history.json``;
- a :class:`~fastconv.nn.ProgressLogger` prints the epoch lines; ``--patience`` is an
  :class:`~fastconv.nn.EarlyStopping` on the validation accuracy, continued from the history
  on resume; :class:`~fastconv.nn.TerminateOnNaN` stops a diverged run.

Then the test set is evaluated once, with ``best.npz``, and the plots are drawn
(:mod:`fastconv.plots`). The run folder is locked (:mod:`fastconv._runlock`); under MPI, rank 0
alone writes it (:mod:`fastconv.train.ranks`); ``--ensemble`` is :mod:`fastconv.train.ensemble`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from ..plots import plot_confusion_matrix, plot_curves, plot_misclassified
from .options import check_saved_args
from .ranks import is_root, on_root, run_rank, strategy_for
from .settings import (
    check_settings,
    mnist_options,
    parse_augment,
    resolve_run_args,
)

__all__ = ["train_mnist"]

#: the epoch logs as the run's records name them (history.json's columns, with epoch and lr)
COLUMNS = {"loss": "train_loss", "accuracy": "train_accuracy", "val_loss": "val_loss",
           "val_accuracy": "val_accuracy", "time": "time_s"}  # fmt: skip


def train_mnist(args) -> int:
    """Run ``fastconv train-mnist`` with parsed ``args``; the exit code."""
    try:
        strategy = strategy_for(args)
    except (ImportError, ValueError) as e:
        return _error(e, 2)
    if strategy is None:
        return train_checked(args, None)
    return run_rank(train_checked, args, strategy)


def _error(message, rc: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return rc


def train_checked(args, strategy) -> int:
    """Lock the run folder (rank 0 alone writes it), then check and train."""
    from .._runlock import RunFolderBusy, RunLock

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
        problem = on_root(strategy, take)
        if problem:
            return _error(problem, 2)
        return _train_locked(args, strategy, out)
    finally:
        lock.release()


def _train_locked(args, strategy, out: Path) -> int:
    from ..nn import CheckpointError
    from ..nn._files import remove_stale_temp_files

    last = out / "last.npz"
    if is_root(strategy):  # under the lock no other fastconv run writes here
        remove_stale_temp_files(out)
    if on_root(strategy, last.exists) and not (args.resume or args.overwrite):
        return _error(
            f"{out} holds a previous run ({last}); pass --resume to continue it or "
            "--overwrite to start afresh",
            2,
        )
    if getattr(args, "ensemble", None):
        if strategy is not None:
            return _error(
                "--ensemble trains its members one after another in one process; under "
                "mpiexec train each member as its own run (--seed, --out) instead",
                2,
            )
        from .ensemble import train_ensemble

        return train_ensemble(args, train_member=train_mnist)
    try:
        return _train(args, out, last, strategy)
    except (CheckpointError, FileNotFoundError) as e:
        return _error(e, 1)
    except OSError as e:  # e.g. the disk is full
        return _error(f"cannot write the run's files in {out}: {e}", 1)


def _make_optimizer(args):
    from ..nn import optimizers

    if args.optimizer == "adamw":
        return optimizers.AdamW(lr=args.lr, weight_decay=args.weight_decay)
    return optimizers.get(args.optimizer, lr=args.lr)


def _make_net(args):
    from ..models import deep_mnist_bn_net, deep_mnist_net

    return (deep_mnist_bn_net if args.net == "bn" else deep_mnist_net)(seed=args.seed)


def _check_history(history: list, last, validate: bool) -> None:
    """The per-epoch records a resumed run continues: epochs 1, 2, ... with the numbers the
    early stopping and the plots read."""
    from ..nn import CheckpointError

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


def _epoch_line(epoch, logs) -> str:
    val = f" | val loss {logs['val_loss']:.4f} acc {logs['val_accuracy']:.4f}" if (
        "val_accuracy" in logs) else ""  # fmt: skip
    return (
        f"epoch {epoch + 1}: train loss {logs['loss']:.4f} acc {logs['accuracy']:.4f}{val} | "
        f"{logs['time']:.1f}s"
    )


def _early_stop_note(since_best: int) -> None:
    print(f"early stop: no better validation accuracy for {since_best} epochs")


def _train(args, out: Path, last: Path, strategy=None) -> int:
    from ..datasets import load_mnist
    from ..nn import load_model

    model, saved = None, None
    ranks = 1 if strategy is None else strategy.size
    if args.resume and on_root(strategy, last.exists):
        loader = load_model if strategy is None else strategy.load_model
        model = loader(last, backend=args.backend)
        # The loader checked the metadata's types; the values must also be settings this
        # command accepts, as if given on the command line.
        saved = model.checkpoint_meta.get("extra", {}).get("args") or {}
        check_saved_args(saved, last)
        before = saved.get("ranks", 1)
        if before != ranks:
            how = "one process" if before == 1 else f"mpiexec -n {before}"
            return _error(
                f"{last} was trained with {before} MPI rank(s) and this run has {ranks}; "
                f"--resume continues a run on as many ranks as it started with (shards, "
                f"dropout streams): run it with {how}, or start afresh with --overwrite",
                2,
            )
    conflicts = resolve_run_args(args, saved)
    if conflicts:
        return _error(
            "--resume continues a run with its own settings; these differ: "
            + "; ".join(conflicts)
            + ". Drop them, or start afresh with --overwrite.",
            2,
        )
    problem = check_settings(args)
    if problem:
        return _error(problem, 2)
    try:
        (x_train, y_train), (x_test, y_test) = load_mnist(args.data, **mnist_options(args))
    except ValueError as e:
        return _error(e, 1)
    if args.limit_train:
        x_train, y_train = x_train[: args.limit_train], y_train[: args.limit_train]
    if args.limit_test:
        x_test, y_test = x_test[: args.limit_test], y_test[: args.limit_test]
    if args.val_size >= x_train.shape[0]:
        return _error(
            f"--val-size {args.val_size} leaves no training images out of {x_train.shape[0]}", 2
        )
    if model is not None:
        problem = _model_fits_data(model, x_train, args)
        if problem:
            return _error(f"{last} {problem}; start afresh with --overwrite", 2)
    validation = None
    if args.val_size:
        validation = (x_train[-args.val_size :], y_train[-args.val_size :])
        x_train, y_train = x_train[: -args.val_size], y_train[: -args.val_size]
    if is_root(strategy):
        out.mkdir(parents=True, exist_ok=True)

    run_args = {k: v for k, v in vars(args).items() if k != "func"}
    run_args["ranks"] = ranks
    run = _Run(args, out, validation is not None, run_args)
    if model is not None:
        model = run.resume(model)
    else:
        if args.resume:
            print(f"no {last} to resume from; starting a new run", flush=True)
        model = _make_net(args)
        if args.backend != "cpu" or args.dtype != "float32":
            try:
                model = model.to(args.backend, args.dtype)
            except RuntimeError as e:
                return _error(e, 1)
        model.compile(_make_optimizer(args), _loss(args))
    rc = run.fit(model, x_train, y_train, validation, strategy)
    if rc is not None or not is_root(strategy):  # rank 0 alone tests, plots and writes
        return rc or 0
    if not run.checkpoint.history:
        return 0
    return _test_and_plot(args, out, run.checkpoint, validation is not None, x_test, y_test)


def _loss(args):
    from ..nn import SoftmaxCrossEntropy

    return SoftmaxCrossEntropy(args.label_smoothing)


class _Run:
    """One run's callbacks, and the state they continue from on resume."""

    def __init__(self, args, out: Path, validate: bool, run_args: dict):
        from ..nn import EarlyStopping, ResumableCheckpoint

        self.args, self.out, self.validate = args, out, validate
        self.last = out / "last.npz"
        extra = {"best_score": self._best_score, "args": run_args}
        self.checkpoint = ResumableCheckpoint(self.last, out / "history.json", COLUMNS, extra)
        self.early = None
        if args.patience:
            self.early = EarlyStopping("val_accuracy", patience=args.patience, mode="max")
        self.best = None  # the best.npz ModelCheckpoint, made with the other callbacks
        self.initial_epoch, self.best_score, self.schedule_state = 0, None, None

    def _best_score(self) -> float:
        """The score of best.npz's epoch, as last.npz records it: its validation accuracy, or
        without validation its number (every epoch is the best)."""
        return self.best.best if self.validate else float(len(self.checkpoint.history))

    def resume(self, model):
        """Continue the run ``model`` was loaded from: its history, best score, schedule
        counters, early-stopping count and optimizer. Returns the model, compiled."""
        self.initial_epoch = self.checkpoint.restore(model)
        _check_history(self.checkpoint.history, self.last, validate=bool(self.args.val_size))
        extra = model.checkpoint_meta.get("extra", {})
        self.best_score = float(extra.get("best_score", -1.0))
        self.schedule_state = extra.get("schedule_state")
        accs = [r["val_accuracy"] for r in self.checkpoint.history]
        if self.early is not None and accs:
            i = int(np.argmax(accs))  # the first best, as EarlyStopping counts
            self.early.set_state({"best": accs[i], "best_epoch": i, "wait": len(accs) - 1 - i})
        optimizer = model.optimizer if model.optimizer is not None else _make_optimizer(self.args)
        model.compile(optimizer, _loss(self.args))
        print(f"resuming from {self.last} after epoch {self.initial_epoch}", flush=True)
        return model

    def _callbacks(self) -> list:
        """In order: the schedule (the checkpoint records the rate it set, and its epoch-end
        update), best.npz, last.npz and history.json, the epoch line (after the files), the
        early stopping."""
        from ..nn import ModelCheckpoint, ProgressLogger
        from ..nn.callbacks import ReduceLROnPlateau, get_schedule

        args = self.args
        schedule = get_schedule(args.schedule, args.epochs, args.lr, args.warmup,
                                args.lr_gamma, args.lr_step, args.min_lr)  # fmt: skip
        if isinstance(schedule, ReduceLROnPlateau) and self.schedule_state:
            schedule.set_state(self.schedule_state)
        # ModelCheckpoint formats its path with the epoch logs: a brace in --out is literal.
        best_path = str(self.out / "best.npz").replace("{", "{{").replace("}", "}}")
        if self.validate:
            self.best = ModelCheckpoint(best_path, monitor="val_accuracy", mode="max",
                                        initial_value_threshold=self.best_score)  # fmt: skip
        else:  # the last epoch counts as the best: every epoch is saved
            self.best = ModelCheckpoint(best_path, save_best_only=False)
        if hasattr(schedule, "get_state"):
            self.checkpoint.extra["schedule_state"] = schedule.get_state
        callbacks = [] if schedule is None else [schedule]
        callbacks += [self.best, self.checkpoint, ProgressLogger(bar=False, line=_epoch_line)]
        return callbacks if self.early is None else [*callbacks, self.early]

    def fit(self, model, x_train, y_train, validation, strategy) -> int | None:
        """Train the epochs left; an exit code when the run ends here, else None."""
        from ..augment import RandomTransform
        from ..nn import TerminateOnNaN

        args, early, history = self.args, self.early, self.checkpoint.history
        callbacks = self._callbacks()
        augment_kwargs = parse_augment(args.augment)
        nan_guard = TerminateOnNaN()
        if self.initial_epoch and early is not None and early.wait >= early.patience:
            _early_stop_note(early.wait)  # stopped early before the interruption
            self.initial_epoch = args.epochs
        if self.initial_epoch >= args.epochs:
            print(f"nothing to do: {self.initial_epoch} of {args.epochs} epochs already done")
            return None
        t0 = time.perf_counter()
        try:
            model.fit(
                x_train,
                y_train,
                epochs=args.epochs,
                batch_size=args.batch_size,
                validation_data=validation,
                callbacks=[*callbacks, nan_guard],
                verbose=0,  # the callbacks print the epoch line
                progress=not args.quiet,
                initial_epoch=self.initial_epoch,
                augment=RandomTransform(**augment_kwargs) if augment_kwargs else None,
                strategy=strategy,
            )
        except KeyboardInterrupt:
            done = history[-1]["epoch"] if history else self.initial_epoch
            print(
                f"\ninterrupted; {self.last} holds epoch {done}: rerun with --resume to continue",
                file=sys.stderr,
            )
            return 130
        # diverged: a NaN loss, or (an epoch's last update) weights that no checkpoint takes
        stopped = nan_guard.message or self.best.refused or self.checkpoint.refused
        if stopped:
            done = history[-1]["epoch"] if history else self.initial_epoch
            kept = f"{self.last} keeps epoch {done}" if history else "no checkpoint written"
            print(f"error: {stopped}; {kept}", file=sys.stderr)
            if history and is_root(strategy):
                plot_curves(self.checkpoint.history_columns(), self.out / "curves.png")
            return 1
        if early is not None and early.stopped_epoch is not None:
            _early_stop_note(early.wait)
        print(f"trained in {time.perf_counter() - t0:.1f}s")
        return None


def _test_and_plot(args, out: Path, checkpoint, validate: bool, x_test, y_test) -> int:
    """The test set, touched once: with the weights of the epoch the validation set chose."""
    from ..nn import load_model
    from ..nn._files import write_json_atomic
    from ..nn.metrics import confusion_matrix, per_class_accuracy
    from ..ops import to_cpu

    chosen = load_model(out / "best.npz", backend=args.backend)
    test = chosen.evaluate(x_test, y_test, batch_size=max(args.batch_size, 100))
    best_epoch = int(chosen.checkpoint_meta["epoch"])
    scores = chosen.predict(x_test, batch_size=max(args.batch_size, 100))
    pred = np.asarray(to_cpu(scores).argmax(axis=1))
    test_record = {
        "epoch": best_epoch,
        "loss": test["loss"],
        "accuracy": test["accuracy"],
        "errors": int((pred != y_test).sum()),
        "per_class_accuracy": [round(float(a), 6) for a in per_class_accuracy(y_test, pred, 10)],
    }
    history = {**checkpoint.history_columns(), "test": test_record}
    write_json_atomic(out / "history.json", history)
    how = "best validation accuracy" if validate else "last epoch, no validation"
    print(
        f"test accuracy {test['accuracy']:.4f} (loss {test['loss']:.4f}) with epoch "
        f"{best_epoch} ({how}) -> {out / 'best.npz'}"
    )
    plot_curves(history, out / "curves.png")
    wrong = np.flatnonzero(pred != y_test)
    plot_misclassified(x_test, y_test, pred, wrong, out / "misclassified.png")
    plot_confusion_matrix(
        confusion_matrix(y_test, pred, 10), out / "confusion.png", title="Test set"
    )
    print(
        f"wrote {out}/{{best.npz,last.npz,history.json,curves.png,misclassified.png,confusion.png}}"
    )
    return 0
