"""How long a small BLAS call takes right after a Numba parallel region, and the other way
round, under several thread-pool settings (the oversubscription docs/kernels.md discusses).

    python -m bench.blas_after_numba [--rounds 30] [--shape 100x1024x50]

Each setting runs in a fresh process (the settings are environment variables read at start-up
or process-wide pool limits), all processes side by side, one measurement of each in turn,
round after round, so that load from other processes hits every setting alike. Per round a
process times:

* ``blas alone``: ``np.matmul`` on the book's first Dense layer shape (100 x 1024 x 50) after
  100 ms of sleep (every pool asleep);
* ``blas after numba``: the same call right after a Numba parallel region (``fastconv.relu``
  on 1M values, 0.1-0.3 ms);
* ``numba after blas``: that Numba region right after the BLAS call;
* ``numba alone``: the Numba region after 250 ms of sleep.

Medians in milliseconds. Settings: the defaults; ``OMP_WAIT_POLICY=passive`` (Numba's OpenMP
workers sleep at once instead of spinning); ``OPENBLAS_THREAD_TIMEOUT=4`` (OpenBLAS's workers
stop spin-yielding after 2^4 cycles instead of 2^28); BLAS limited to one thread
(threadpoolctl); both of the first two; Numba's ``workqueue`` layer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    "defaults": {},
    "OMP_WAIT_POLICY=passive": {"OMP_WAIT_POLICY": "passive"},
    "OPENBLAS_THREAD_TIMEOUT=4": {"OPENBLAS_THREAD_TIMEOUT": "4"},
    "BLAS 1 thread (threadpoolctl)": {"_BLAS_THREADS": "1"},
    "passive + THREAD_TIMEOUT=4": {"OMP_WAIT_POLICY": "passive", "OPENBLAS_THREAD_TIMEOUT": "4"},
    "NUMBA_THREADING_LAYER=workqueue": {"NUMBA_THREADING_LAYER": "workqueue"},
}
CASES = ("blas alone", "blas after numba", "numba after blas", "numba alone")


def child(shape):
    """One process: answer each line on stdin with one round of the four timings (JSON)."""
    import numpy as np

    import fastconv
    import fastconv.cpu  # noqa: F401

    if os.environ.get("_BLAS_THREADS"):
        from threadpoolctl import threadpool_limits

        threadpool_limits(int(os.environ["_BLAS_THREADS"]), user_api="blas")
    M, K, N = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((K, N)).astype(np.float32)
    out = np.empty((M, N), np.float32)
    big = rng.standard_normal(1 << 20).astype(np.float32)

    def blas():
        np.matmul(x, w, out=out)

    def numba_region():
        fastconv.relu(big)

    for _ in range(3):
        blas()
        numba_region()
    print("ready", flush=True)
    for _line in sys.stdin:
        row = {}
        for case in CASES:
            first, timed = {
                "blas alone": (None, blas),
                "blas after numba": (numba_region, blas),
                "numba after blas": (blas, numba_region),
                "numba alone": (None, numba_region),
            }[case]
            time.sleep(0.25)  # longer than OpenBLAS's default spin (2^28 cycles, ~0.1 s here)
            if first is not None:
                first()
            t0 = time.perf_counter()
            timed()
            row[case] = (time.perf_counter() - t0) * 1e3
        print(json.dumps(row), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--shape", default="100x1024x50", help="M x K x N of the BLAS call")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split("x"))
    if args.child:
        child(shape)
        return 0
    procs = {}
    for name, env in SETTINGS.items():
        full = {**os.environ, **env}
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "bench.blas_after_numba", "--child", "--shape", args.shape],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=full, cwd=ROOT,
        )  # fmt: skip
    for p in procs.values():
        assert p.stdout.readline().strip() == "ready"
    samples = {name: {c: [] for c in CASES} for name in SETTINGS}
    for _ in range(args.rounds):
        for name, p in procs.items():
            p.stdin.write("go\n")
            p.stdin.flush()
            for case, ms in json.loads(p.stdout.readline()).items():
                samples[name][case].append(ms)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    print(f"BLAS call {args.shape}, Numba region fastconv.relu(1M floats); medians of "
          f"{args.rounds} rounds, ms; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| setting | " + " | ".join(CASES) + " |")
    print("|---|" + "---|" * len(CASES))
    for name in SETTINGS:
        cells = [f"{statistics.median(samples[name][c]):.3f}" for c in CASES]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
