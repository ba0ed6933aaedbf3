"""Transfer learning on MNIST: reuse a convolutional base trained on digits 0-4 for digits 5-9.

1. Train the book's deep net on digits 0-4 (many labelled images).
2. Copy its convolutional base into a new net with a fresh head for digits 5-9, freeze the base
   (``layer.trainable = False``) and train only the head on a few labelled images per class.
3. Unfreeze the base and fine-tune everything with a 10x smaller learning rate.
4. Compare with the same net trained from scratch on the same few images for as many epochs.

Accuracies are measured on the test images of digits 5-9. Run from a source checkout::

    python examples/transfer_learning.py                 # the run in docs/training.md
    python examples/transfer_learning.py --shots 5 --base-epochs 1   # quicker

docs/training.md ("Transfer learning") has the results of the default run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fastconv.datasets import load_mnist
from fastconv.nn import (
    Adam,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    MaxPool2D,
    ReLU,
    Sequential,
)


def build_net(num_classes: int, seed: int) -> Sequential:
    """The book's deep net (ch. 8) with ``num_classes`` outputs: a convolutional base (six
    3x3 convolutions, three poolings) and a head Dense(50)-ReLU-Dropout-Dense(classes)."""

    def conv(filters, pad):
        return Conv2D(filters, 3, padding=pad, activation="relu")

    base = [conv(16, 1), conv(16, 1), MaxPool2D(2), conv(32, 1), conv(32, 2), MaxPool2D(2),
            conv(64, 1), conv(64, 1), MaxPool2D(2), Flatten()]  # fmt: skip
    head = [Dense(50), ReLU(), Dropout(0.5), Dense(num_classes)]
    return Sequential([*base, *head], seed=seed, input_shape=(1, 28, 28))


def conv_layers(model):
    return [layer for layer in model.layers if isinstance(layer, Conv2D)]


def copy_base(src, dst) -> None:
    """Copy the convolutional base's weights from ``src`` into ``dst`` (same architecture)."""
    for a, b in zip(conv_layers(src), conv_layers(dst), strict=True):
        for name in a.weight_names():
            b.get_weight(name)[...] = a.get_weight(name)


def set_base_trainable(model, trainable: bool) -> None:
    for layer in conv_layers(model):
        layer.trainable = trainable


def few_shot(x, y, digits, shots, rng):
    """``shots`` random training images of each digit in ``digits``, labels renumbered 0.."""
    picks = [rng.choice(np.flatnonzero(y == d), shots, replace=False) for d in digits]
    idx = rng.permutation(np.concatenate(picks))
    return x[idx], np.searchsorted(digits, y[idx])


def subset(x, y, digits):
    keep = np.isin(y, digits)
    return x[keep], np.searchsorted(digits, y[keep])


def run(
    base_images=20000,
    base_epochs=3,
    shots=10,
    head_epochs=30,
    finetune_epochs=20,
    lr=1e-3,
    seed=0,
    limit_test=None,
    verbose=True,
    data=None,
) -> dict:
    """Run the four stages; returns the test accuracies and timings (see the module doc)."""
    say = print if verbose else (lambda *a, **k: None)
    (x_train, y_train), (x_test, y_test) = load_mnist(data)
    if limit_test:
        x_test, y_test = x_test[:limit_test], y_test[:limit_test]
    old, new = np.arange(5), np.arange(5, 10)
    rng = np.random.default_rng(seed)
    xa, ya = subset(x_train, y_train, old)
    xa, ya = xa[:base_images], ya[:base_images]
    xs, ys = few_shot(x_train, y_train, new, shots, rng)
    xt, yt = subset(x_test, y_test, new)
    xt_old, yt_old = subset(x_test, y_test, old)
    batch = min(100, len(xs))
    out = {"shots_per_class": shots, "labelled_images": len(xs)}

    t0 = time.perf_counter()
    base = build_net(5, seed).compile(Adam(lr=lr))
    base.fit(xa, ya, epochs=base_epochs, batch_size=100, verbose=0)
    out["base_accuracy_0_4"] = base.evaluate(xt_old, yt_old, batch_size=1000)["accuracy"]
    out["base_seconds"] = time.perf_counter() - t0
    say(f"base on digits 0-4 ({len(xa)} images, {base_epochs} epochs): test accuracy on 0-4 "
        f"{out['base_accuracy_0_4']:.4f}")  # fmt: skip

    model = build_net(5, seed + 1)
    copy_base(base, model)
    set_base_trainable(model, False)
    model.compile(Adam(lr=lr))
    frozen = [w.copy() for layer in conv_layers(model) for w in layer.params.values()]
    model.fit(xs, ys, epochs=head_epochs, batch_size=batch, verbose=0)
    after = [w for layer in conv_layers(model) for w in layer.params.values()]
    out["base_unchanged_while_frozen"] = all(
        np.array_equal(a, b) for a, b in zip(frozen, after, strict=True)
    )
    out["head_only"] = model.evaluate(xt, yt, batch_size=1000)["accuracy"]
    say(f"frozen base + new head ({len(xs)} images of 5-9, {head_epochs} epochs): "
        f"{out['head_only']:.4f}")  # fmt: skip

    set_base_trainable(model, True)
    model.compile(Adam(lr=lr / 10))
    model.fit(xs, ys, epochs=finetune_epochs, batch_size=batch, verbose=0)
    out["fine_tuned"] = model.evaluate(xt, yt, batch_size=1000)["accuracy"]
    say(f"then fine-tuned at lr {lr / 10:g} ({finetune_epochs} epochs): {out['fine_tuned']:.4f}")

    scratch = build_net(5, seed + 1).compile(Adam(lr=lr))
    scratch.fit(xs, ys, epochs=head_epochs + finetune_epochs, batch_size=batch, verbose=0)
    out["from_scratch"] = scratch.evaluate(xt, yt, batch_size=1000)["accuracy"]
    say(f"from scratch on the same images ({head_epochs + finetune_epochs} epochs): "
        f"{out['from_scratch']:.4f}")  # fmt: skip
    out["seconds"] = time.perf_counter() - t0
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-images", type=int, default=20000, help="images of 0-4 for the base")
    p.add_argument("--base-epochs", type=int, default=3)
    p.add_argument("--shots", type=int, default=10, help="labelled images per digit 5-9")
    p.add_argument("--head-epochs", type=int, default=30)
    p.add_argument("--finetune-epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-test", type=int, default=None)
    args = p.parse_args(argv)
    return run(**{k: v for k, v in vars(args).items()})


if __name__ == "__main__":
    main()
