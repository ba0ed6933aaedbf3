"""Numerical error of every CPU convolution algorithm against the float64 reference.

For each deep-MNIST layer (batch 8, random normal data scaled as He initialisation would),
each algorithm and each dtype, the largest error of y, dx and dW in two units:

* ``rel``: max |error| / max |exact| over the tensor;
* ``eps.mag``: max |error| / (eps32 * magnitude), magnitude being the reference applied to
  absolute values, widened for Winograd to the largest magnitude of each output tile /
  filter (the terms it mixes; ``tests/kernels/test_conv.py``, ``mixed_magnitude``). The tests allow
  (2 * n + WINOGRAD_TERM) of this unit for a sum of n terms (WINOGRAD_TERM = 200 for
  F(4x4,3x3), 16 for F(2x2,3x3), 0 otherwise); float16 results also half an ulp of half.

Usage::

    python -m bench.winograd_error [--trials 3]
"""

from __future__ import annotations

import argparse

import numpy as np

import fastconv as fc  # noqa: E402
from bench.conv_layers import LAYERS  # noqa: E402
from fastconv import reference as ref  # noqa: E402
from fastconv_testing.winograd import mixed_magnitude  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)
ALGORITHMS = ("direct", "winograd2x2", "winograd4x4")


def errors(algorithm, dtype, trials, batch=8, seed=0):
    """``{"y": (rel, bound), "dx": ..., "dw": ...}``: worst over layers and trials."""
    rng = np.random.default_rng(seed)
    worst = {k: [0.0, 0.0] for k in ("y", "dx", "dw")}
    for _ in range(trials):
        for _name, C, F, HW, pad in LAYERS:
            x = rng.standard_normal((batch, C, HW, HW)).astype(dtype)
            w = (rng.standard_normal((F, C, 3, 3)) * np.sqrt(2 / (9 * C))).astype(dtype)
            y = fc.conv2d(x, w, None, 1, pad, algorithm=algorithm)
            dy = rng.standard_normal(y.shape).astype(dtype)
            got = (y,) + fc.conv2d_backward(dy, x, w, 1, pad, algorithm=algorithm)[:2]
            exact = (ref.conv2d(x, w, None, 1, pad),) + ref.conv2d_backward(dy, x, w, 1, pad)[:2]
            ax, aw, ady = (np.abs(a.astype(np.float64)) for a in (x, w, dy))
            mags = (ref.conv2d(ax, aw, None, 1, pad),) + ref.conv2d_backward(ady, ax, aw, 1, pad)[
                :2
            ]
            for kind, g, e, mag in zip(("y", "dx", "dw"), got, exact, mags, strict=True):
                err = np.abs(g.astype(np.float64) - e)
                mag = mixed_magnitude(mag, kind, algorithm)
                worst[kind][0] = max(worst[kind][0], float(err.max() / np.abs(e).max()))
                ratio = err / (EPS32 * mag + 1e-300)
                worst[kind][1] = max(worst[kind][1], float(ratio.max()))
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args(argv)
    print("| algorithm | dtype | y rel | y eps.mag | dx rel | dx eps.mag | dW rel | dW eps.mag |")
    print("|---|---|---|---|---|---|---|---|")
    for algorithm in ALGORITHMS:
        for dtype in (np.float32, np.float16):
            w = errors(algorithm, dtype, args.trials)
            cells = [f"{w[k][0]:.1e} | {w[k][1]:.1f}" for k in ("y", "dx", "dw")]
            print(f"| {algorithm} | {np.dtype(dtype).name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
