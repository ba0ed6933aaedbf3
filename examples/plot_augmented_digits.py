"""Draw docs/augmented_digits.png: MNIST digits and random augmentations of them.

Rows: eight training digits. Columns: the original, four draws of the ``augmented`` recipe's
transform (rotation +-12 deg, scale 0.9-1.1, shift +-2.5 px), two of elastic distortion
(Simard et al.: alpha 34, sigma 4) and one of everything at once. Seeded: reruns draw the same.

    python examples/plot_augmented_digits.py [OUT.png]
"""

from __future__ import annotations

import sys

import numpy as np

from fastconv.augment import RandomTransform
from fastconv.datasets import load_mnist


def main(path="docs/augmented_digits.png"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (x, y), _ = load_mnist()
    rng = np.random.default_rng(0)
    digits = x[[np.flatnonzero(y == d)[0] for d in (0, 1, 2, 3, 4, 5, 7, 9)]]
    columns = [("original", None)]
    columns += [("affine", RandomTransform(rotation=12, shift=2.5, scale=0.1))] * 4
    columns += [("elastic", RandomTransform(elastic_alpha=34, elastic_sigma=4))] * 2
    columns += [("both", RandomTransform(rotation=12, shift=2.5, scale=0.1, shear=8,
                                          elastic_alpha=34, elastic_sigma=4))]  # fmt: skip
    tiles = [digits if t is None else t(digits, rng) for _, t in columns]
    h, w, gap = 28, 28, 3
    canvas = np.ones((len(digits) * (h + gap), len(columns) * (w + gap)), np.float32)
    for c, batch in enumerate(tiles):
        for r in range(len(digits)):
            canvas[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = (
                1.0 - batch[r, 0]
            )
    fig, ax = plt.subplots(figsize=(len(columns) * 0.62, len(digits) * 0.62 + 0.35))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for c, (name, _) in enumerate(columns):
        ax.text(c * (w + gap) + w / 2, -3, name, ha="center", va="bottom", fontsize=7)
    ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.94)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
