"""``fastconv train-mnist --ensemble K``: K complete runs and the average of their best models."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..plots import plot_confusion_matrix, plot_misclassified
from .settings import mnist_options

__all__ = ["train_ensemble"]


def train_ensemble(args, train_member) -> int:
    """K complete runs in OUT/member-k (seeds SEED+k-1), each ``train_member(member_args)`` (the
    one-run program, :func:`fastconv.train.mnist.train_mnist`), then the average of their best
    (validation-chosen) checkpoints' probabilities on the test set; the exit code."""
    import copy
    import json

    from ..datasets import load_mnist
    from ..nn import CheckpointError, Ensemble, load_model
    from ..nn._files import write_json_atomic
    from ..nn.metrics import confusion_matrix, per_class_accuracy

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
        rc = train_member(margs)
        if rc:
            return rc
        hist = json.loads((member_out / "history.json").read_text())
        rows.append({"member": k + 1, "seed": margs.seed, **hist["test"]})
    try:
        (_, _), (x_test, y_test) = load_mnist(args.data, **mnist_options(args))
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
