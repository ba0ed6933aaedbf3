"""The figures fastconv writes: a run's curves, its misclassified digits and confusion matrix
(``fastconv train-mnist``), and the setup shared with the profiler's charts
(:mod:`fastconv.profiler.charts`).

matplotlib is imported when a figure is drawn, never with the package.
"""

from __future__ import annotations

import numpy as np

from .nn.metrics import plot_confusion_matrix

__all__ = ["pyplot", "save_png", "plot_curves", "plot_misclassified", "plot_confusion_matrix"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: files only, never a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path, dpi: int = 100) -> None:
    """Write ``fig`` to ``path`` as PNG atomically (a temporary file renamed over it)."""
    from .nn._files import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format="png"), suffix=".png")


def plot_curves(history: dict, path) -> None:
    """Loss and accuracy per epoch, train and validation; the test result as one point.

    ``history`` holds the columns of a run's ``history.json`` (``epoch``, ``train_loss``,
    ``train_accuracy``, ``val_loss``, ``val_accuracy``) and optionally its ``test`` block.
    """
    plt = pyplot()
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
    save_png(fig, path)
    plt.close(fig)


def plot_misclassified(x, y, pred, wrong, path, max_images: int = 50) -> None:
    """Grid of wrongly classified test digits titled ``true->pred`` (as in the book).

    One image of tiles in one axes rather than one axes per digit: 50 axes took ~10 s of
    matplotlib layout per plot on the shared 2-core machine, the montage a fraction of that.
    """
    plt = pyplot()
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
    save_png(fig, path)
    plt.close(fig)
