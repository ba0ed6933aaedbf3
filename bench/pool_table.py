"""Max-pool forward: the separable kernel (``fastconv.cpu.pool._max_forward``) against the
window loop it replaced, on GoogLeNet's and AlexNet's pooling layers, and GoogLeNet's forward
pass with one kernel or the other.

The window loop (one scalar loop over each output's clipped window, as on branch main before
``maxpool``) is copied here, compiled without caching, and swapped into the pooling module for
the "old" calls, so both run in the same process, interleaved call by call, through the public
``fastconv.max_pool2d`` (its output allocation included). Medians; ratio = old / new. The
outputs are checked bit for bit first.

    python -m bench.pool_table --threads 2 --reps 21 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from numba import njit, prange

from .common import machine_line

# (x shape, size, stride, pad, ceil_mode): GoogLeNet's maxpool1-3 (3x3/2 ceil), its inception
# branches' 3x3/1/1 pools (28x28, 14x14, 7x7), AlexNet's first pool, a batch-1 call (serial).
CASES = [
    ((8, 64, 112, 112), 3, 2, 0, True),
    ((8, 192, 56, 56), 3, 2, 0, True),
    ((8, 480, 28, 28), 3, 2, 0, True),
    ((8, 192, 28, 28), 3, 1, 1, False),
    ((8, 480, 14, 14), 3, 1, 1, False),
    ((8, 832, 7, 7), 3, 1, 1, False),
    ((8, 96, 55, 55), 3, 2, 0, False),
    ((1, 16, 28, 28), 3, 1, 1, False),
]


def _window_loop_kernels():
    """The window-loop forward (parallel and serial), as it was before the separable kernel."""
    from fastconv.cpu._half import store_value
    from fastconv.cpu.pool import _clip, _window_argmax

    def forward(x, out, kh, kw, sh, sw, ph, pw):
        P, H, W = x.shape
        OH, OW = out.shape[1], out.shape[2]
        for p in prange(P):
            plane = x[p]
            for oh in range(OH):
                hs, he = _clip(oh * sh - ph, kh, H)
                for ow in range(OW):
                    ws, we = _clip(ow * sw - pw, kw, W)
                    best, _, _ = _window_argmax(plane, hs, he, ws, we)
                    out[p, oh, ow] = store_value(out, best)

    return njit(parallel=True)(forward), njit(forward)


def _median_ms(times):
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=21, help="interleaved calls per layer")
    parser.add_argument("--rounds", type=int, default=5, help="GoogLeNet predict rounds (0: none)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    args = parser.parse_args(argv)

    import numba

    import fastconv
    import fastconv.models
    from fastconv.cpu import pool

    numba.set_num_threads(args.threads)
    new = (pool._max_forward, pool._max_forward_serial)
    old = _window_loop_kernels()

    def use(kernels):
        pool._max_forward, pool._max_forward_serial = kernels

    rng = np.random.default_rng(0)
    print(machine_line(args.threads))
    print(f"fastconv.max_pool2d, {args.dtype}, {args.threads} threads, medians of {args.reps} "
          "interleaved calls, ms")  # fmt: skip
    print("| input (N, C, H, W) | window | old (window loop) | new (separable) | old/new |")
    print("|---|---|---:|---:|---:|")
    try:
        for shape, size, stride, pad, ceil_mode in CASES:
            x = rng.standard_normal(shape).astype(args.dtype)

            def call(x=x, size=size, stride=stride, pad=pad, ceil_mode=ceil_mode):
                return fastconv.max_pool2d(x, size, stride, pad, ceil_mode=ceil_mode)

            results = []
            for kernels in (old, new):
                use(kernels)
                results.append(call().copy())
            if not np.array_equal(results[0].view(np.uint8), results[1].view(np.uint8)):
                raise AssertionError(f"old and new kernels differ on {shape}")
            times = {"old": [], "new": []}
            for _ in range(args.reps):
                for name, kernels in (("old", old), ("new", new)):
                    use(kernels)
                    start = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - start)
            t_old, t_new = _median_ms(times["old"]), _median_ms(times["new"])
            window = f"{size}x{size}/{stride}" + (f"/p{pad}" if pad else "")
            window += " ceil" if ceil_mode else ""
            print(f"| {shape} | {window} | {t_old:.3f} | {t_new:.3f} | {t_old / t_new:.1f}x |")

        if args.rounds:
            model = fastconv.models.googlenet(seed=0, dtype=args.dtype)
            x = rng.standard_normal((8, 3, 224, 224)).astype(args.dtype)
            for kernels in (old, new):
                use(kernels)
                model.predict(x, batch_size=8)
            times = {"old": [], "new": []}
            for _ in range(args.rounds):
                for name, kernels in (("old", old), ("new", new)):
                    use(kernels)
                    start = time.perf_counter()
                    model.predict(x, batch_size=8)
                    times[name].append(time.perf_counter() - start)
            t_old, t_new = _median_ms(times["old"]), _median_ms(times["new"])
            print(f"\nGoogLeNet predict, batch 8, 224x224, {args.rounds} interleaved rounds: "
                  f"old {t_old:.1f} ms, new {t_new:.1f} ms (median), old/new "
                  f"{t_old / t_new:.2f}x; per round old "
                  f"{[round(t * 1e3, 1) for t in times['old']]}, new "
                  f"{[round(t * 1e3, 1) for t in times['new']]}")  # fmt: skip
    finally:
        use(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
