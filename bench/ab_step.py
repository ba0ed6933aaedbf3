"""The deep-MNIST training step of two source trees, measured in one run (an A/B of a change).

Each tree runs in a process of its own (its ``fastconv`` first on ``sys.path``), builds the book's
net (``deep_mnist_net(seed=0)``, Adam 1e-3, batch 100 of real-shaped random data), warms up
(Numba compilation, workspaces) and then times ``--steps`` training steps on request; the parent
asks the trees in turn, round after round, so both see the same machine load, and reports the
median time per step of each and the ratio of the medians (with the per-round ratios' range).

    python -m bench.ab_step --a /path/to/old/checkout --b . --rounds 15 --steps 10
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time


def _worker(root: str, steps: int, conn) -> None:
    sys.path.insert(0, root)  # this tree's fastconv, in this process only
    import numpy as np

    import fastconv
    from fastconv.models import deep_mnist_net

    rng = np.random.default_rng(0)
    x = rng.random((100, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 100)
    model = deep_mnist_net(seed=0).compile(optimizer="adam", loss="softmax_cross_entropy")
    for _ in range(5):  # compilation, workspaces, allocator
        model.train_on_batch(x, y)
    conn.send(fastconv.__file__)
    while conn.recv() == "run":
        start = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(x, y)
        conn.send((time.perf_counter() - start) / steps * 1e3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="the baseline source tree (its fastconv/)")
    p.add_argument("--b", required=True, help="the changed source tree")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for root in (args.a, args.b):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(root, args.steps, child), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    for name, pipe in zip("ab", pipes, strict=True):
        print(f"{name}: {pipe.recv()}")
    times = {"a": [], "b": []}
    for _ in range(args.rounds):
        for name, pipe in zip("ab", pipes, strict=True):
            pipe.send("run")
            times[name].append(pipe.recv())
    for pipe in pipes:
        pipe.send("stop")
    for proc in procs:
        proc.join(timeout=30)
    med = {k: statistics.median(v) for k, v in times.items()}
    per_round = [b / a for a, b in zip(times["a"], times["b"], strict=True)]
    print(f"a: median {med['a']:.2f} ms/step, b: median {med['b']:.2f} ms/step "
          f"({args.rounds} interleaved rounds of {args.steps} steps)")  # fmt: skip
    print(f"b/a = {med['b'] / med['a']:.3f} (per round {min(per_round):.3f}-{max(per_round):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
