"""What augmentation costs next to a deep-MNIST training step (issue 10's goal: < 5%).

Interleaved in one run, batch 100, float32, on the CPU:

* ``step``: one training step of the book's deep net (forward, backward, Adam);
* ``affine``: the ``augmented`` recipe's RandomTransform (rotation, scale, shift) of a batch,
  parameters drawn included (what the loader thread does per batch);
* ``elastic``: the same plus elastic distortion (alpha 34, sigma 4: Simard et al.);
* ``torch``: PyTorch's equivalent of the affine warp, ``affine_grid`` + ``grid_sample``
  (bilinear, zero padding) on the same matrices, 2 threads (when PyTorch is installed);
* ``step+loader``: a training step fed by the background loader that augments the next batch
  meanwhile (what ``fit(augment=...)`` runs), against ``step`` to see what overlap leaves.

Prints median milliseconds and the ratios, with the load average; ``--json`` writes them.
Run: ``python -m bench.augment_bench [--rounds 30]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from fastconv import augment as A
from fastconv.models import deep_mnist_net
from fastconv.nn import Adam
from fastconv.nn.data import augmented_batches

RECIPE = dict(rotation=12, shift=2.5, scale=0.1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    n = args.batch
    data = rng.random((20 * n, 1, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 10, 20 * n)
    x, y = data[:n], labels[:n]
    model = deep_mnist_net(seed=0).compile(Adam(lr=1e-3))
    affine = A.RandomTransform(**RECIPE)
    elastic = A.RandomTransform(**RECIPE, elastic_alpha=34, elastic_sigma=4)
    g = np.random.default_rng(1)

    torch_warp = None
    try:
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(2)

        def torch_warp(batch, theta_np):
            # affine_grid works in [-1, 1] coordinates (align_corners=True: -1 and 1 are the
            # centres of the corner pixels); map our pixel-unit matrices there.
            h, w = batch.shape[2:]
            s_in = np.diag([(w - 1) / 2, (h - 1) / 2, 1.0])
            t = np.linalg.inv(s_in)[:2, :2] @ theta_np[:, :, :2] @ s_in[:2, :2]
            off = theta_np[:, :, :2] @ np.array([(w - 1) / 2, (h - 1) / 2]) + theta_np[:, :, 2]
            off = (off - [(w - 1) / 2, (h - 1) / 2]) / [(w - 1) / 2, (h - 1) / 2]
            th = torch.from_numpy(np.concatenate([t, off[:, :, None]], axis=2).astype(np.float32))
            grid = F.affine_grid(th, list(batch.shape), align_corners=True)
            return F.grid_sample(torch.from_numpy(batch), grid, mode="bilinear",
                                 padding_mode="zeros", align_corners=True)  # fmt: skip

        # the baseline must compute the same images
        th = A.affine_matrices(
            n, (28, 28), rotation=rng.uniform(-12, 12, n), scale=rng.uniform(0.9, 1.1, n),
            shift=rng.uniform(-2, 2, (n, 2)),
        )  # fmt: skip
        from fastconv import ops

        diff = np.abs(torch_warp(x, th).numpy() - ops.warp_bilinear(x, th)).max()
        assert diff < 1e-4, f"torch baseline differs by {diff}"
    except ImportError:
        pass

    def loader_steps(k):
        order = np.arange(k * n) % len(data)
        batches = iter(augmented_batches(data, labels, order, n, affine, 7, lambda a: a))
        t0 = time.perf_counter()
        for xb, yb in batches:
            model.train_on_batch(xb, yb)
        return (time.perf_counter() - t0) / k

    # warm-up: compile every kernel
    for _ in range(3):
        model.train_on_batch(x, y)
        affine(x, g)
        elastic(x, g)
    loader_steps(2)

    from fastconv import ops

    times = {"step": [], "affine": [], "elastic": [], "step+loader": [], "warp": []}
    th_fixed = A.affine_matrices(n, (28, 28), rotation=rng.uniform(-12, 12, n))
    if torch_warp is not None:
        times["torch"] = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        model.train_on_batch(x, y)
        times["step"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        affine(x, g)
        times["affine"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        elastic(x, g)
        times["elastic"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ops.warp_bilinear(x, th_fixed)
        times["warp"].append(time.perf_counter() - t0)
        if torch_warp is not None:
            t0 = time.perf_counter()
            torch_warp(x, th_fixed)
            times["torch"].append(time.perf_counter() - t0)
        times["step+loader"].append(loader_steps(4))
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; batch {n}; "
          f"{args.rounds} interleaved rounds; medians:")  # fmt: skip
    for k, v in med.items():
        print(f"  {k:12s} {v:8.2f} ms")
    ratios = {
        "affine/step": med["affine"] / med["step"],
        "elastic/step": med["elastic"] / med["step"],
        "step+loader/step": med["step+loader"] / med["step"],
    }
    if "torch" in med:
        ratios["warp/torch_grid_sample"] = med["warp"] / med["torch"]
    for k, v in ratios.items():
        print(f"  {k:24s} {v:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load": load, "median_ms": med, "ratios": ratios}, f, indent=1)
    return med, ratios


if __name__ == "__main__":
    main()
