"""One process x 2 Numba threads against 2 MPI ranks x 1 thread, on deep-MNIST train-mnist.

    .venv/bin/python -m bench.mpi_scaling [--epochs 2] [--repeats 1] [--limit-train N]

Needs the ``mpi`` extra. Runs ``fastconv train-mnist`` in both configurations, interleaved
(A B A B ...), with the same seed and settings, and prints a Markdown table: seconds per epoch
(median over the runs), validation accuracy after each epoch, the test accuracy, and the load
average before and after (other processes on the machine skew every number here). Then times
the gradient allreduce alone on 2 ranks (deep-MNIST's 123,552 float32 gradients, as
``MPIDataParallel`` sends them) for the cost model in docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARAMS = 123_552  # deep-MNIST trainable parameters


def _mpiexec():
    path = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if path is None:
        sys.exit("no mpiexec: pip install 'fastconv[mpi]'")
    return path


def _load():
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _run(config, args, out):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    train = [sys.executable, "-m", "fastconv", "train-mnist", *args, "--out", str(out)]
    if config == "1 process x 2 threads":
        env["NUMBA_NUM_THREADS"] = "2"
        cmd = train
    else:  # the strategy gives each of the 2 ranks cores / ranks = 1 thread
        env.pop("NUMBA_NUM_THREADS", None)
        cmd = [_mpiexec(), "-n", "2", *train]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{config} failed:\n{done.stdout}\n{done.stderr}")
    hist = json.loads((out / "history.json").read_text())
    return {"hist": hist, "wall": wall, "stdout": done.stdout}


def _allreduce_probe(repeats=300):
    """Under mpiexec: median seconds of one allreduce of PARAMS float32 (in place)."""
    import numpy as np

    from fastconv.nn import MPIDataParallel

    s = MPIDataParallel()
    buf = np.ones(PARAMS + 2, np.float32)
    times = []
    for _ in range(repeats):
        s._barrier("probe")
        t0 = time.perf_counter()
        s._allreduce(buf, "probe")
        times.append(time.perf_counter() - t0)
    if s.is_root:
        print(json.dumps({"median_s": statistics.median(times), "min_s": min(times)}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allreduce-probe", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.allreduce_probe:
        return _allreduce_probe()
    args = ["--epochs", str(a.epochs), "--seed", str(a.seed), "--quiet", "--overwrite"]
    if a.limit_train:  # a quick check of the script: a tenth held out
        args += ["--limit-train", str(a.limit_train), "--val-size", str(a.limit_train // 10)]
    configs = ["1 process x 2 threads", "2 ranks x 1 thread"]
    results = {c: [] for c in configs}
    load_before = _load()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            for c in configs:
                out = Path(tmp) / f"{c.split()[0]}-{i}"
                results[c].append(_run(c, args, out))
                print(f"# run {i + 1}/{a.repeats} {c}: {results[c][-1]['wall']:.0f} s", flush=True)
    load_after = _load()
    probe = subprocess.run(
        [_mpiexec(), "-n", "2", sys.executable, __file__, "--allreduce-probe"],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
    )
    print(f"\nload average before {load_before}, after {load_after}\n")
    print("| configuration | s per epoch (median) | val accuracy per epoch | test accuracy |")
    print("|---|---|---|---|")
    base = None
    for c in configs:
        times = [t for r in results[c] for t in r["hist"]["time_s"]]
        med = statistics.median(times)
        base = base or med
        val = " / ".join(f"{v:.4f}" for v in results[c][0]["hist"]["val_accuracy"])
        test = results[c][0]["hist"]["test"]["accuracy"]
        print(f"| {c} | {med:.1f} ({med / base:.2f}x) | {val} | {test:.4f} |")
    if probe.returncode == 0 and probe.stdout.strip():
        r = json.loads(probe.stdout.strip().splitlines()[-1])
        mb = (PARAMS + 2) * 4 / 1e6
        print(
            f"\nallreduce of {PARAMS:,} float32 ({mb:.2f} MB) on 2 ranks: median "
            f"{r['median_s'] * 1e3:.3f} ms, min {r['min_s'] * 1e3:.3f} ms"
        )
    else:
        print(f"\nallreduce probe failed: {probe.stderr}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
