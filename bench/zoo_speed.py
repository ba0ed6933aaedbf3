"""Forward pass and training step of the ImageNet zoo models: fastconv CPU (float32, float16)
against the PyTorch twin (CPU, float32, 2 threads), interleaved, ratios from the same run.

    python -m bench.zoo_speed                       # AlexNet, VGG-16, ResNet-18, GoogLeNet
    python -m bench.zoo_speed --models resnet18 --budget 60 --size 64      # a quick check
    python -m bench.zoo_speed --out-md docs/benchmarks.md --plot docs/zoo_speed.png

For each model, three worker processes (fastconv float32, fastconv float16, PyTorch) build the
same weights (one seed) and warm up; then one forward pass and one training step (SGD with
momentum) of each are timed in turn, round after round, until ``--budget`` seconds have passed
for that model (at least 3 rounds). The table gives medians and the ratio to PyTorch's median
(below 1 is faster). Each measurement is one command with a time budget, so it can run on a
shared machine; the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.common import check_region_target, load_average, machine_line, write_region  # noqa: E402
from bench.zoo_common import (  # noqa: E402
    LEARNING_RATE,
    NAMES,
    Spec,
    Worker,
    _reproducible,
    interleave,
    median,
    ratio_cell,
)

MODES = {"forward": "forward (inference)", "train": "training step"}


def run_model(model, args):
    specs = [Spec("torch", model, args.batch, args.size, seed=args.seed)]
    specs += [Spec("fastconv", model, args.batch, args.size, d, args.seed) for d in args.dtypes]
    workers = [Worker(s) for s in specs]
    try:
        infos = [w.ready() for w in workers]
        samples, rounds = interleave(workers, list(MODES), args.budget, args.min_rounds)
    finally:
        for w in workers:
            w.stop()
    rows = []
    for mode in MODES:
        base = median(samples[("PyTorch float32", mode)]) * 1e3
        row = {"model": model, "mode": mode, "torch_ms": base, "rounds": rounds}
        for d in args.dtypes:
            ms = median(samples[(f"fastconv {d}", mode)]) * 1e3
            row[f"fastconv_{d}_ms"] = ms
            row[f"fastconv_{d}_ratio"] = ms / base
        rows.append(row)
    return rows, infos[0]


def _rounds(rows) -> str:
    lo, hi = min(r["rounds"] for r in rows), max(r["rounds"] for r in rows)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def markdown(rows, args, infos) -> str:
    head = "| model | pass | PyTorch float32 | " + " | ".join(f"fastconv {d}" for d in args.dtypes)
    lines = [head + " |", "|---|---|---:|" + "---:|" * len(args.dtypes)]
    for r in rows:
        cells = [ratio_cell(r[f"fastconv_{d}_ms"], r["torch_ms"]) for d in args.dtypes]
        name = NAMES.get(r["model"], r["model"])
        params = infos[r["model"]]["params"]
        lines.append(
            f"| {name} ({params / 1e6:.1f}M) | {MODES[r['mode']]} | {r['torch_ms']:.0f} ms | "
            + " | ".join(cells)
            + " |"
        )
    size = args.size or 224
    lines += [
        "",
        f"Batch {args.batch}, {size}x{size}, medians of {_rounds(rows)} interleaved rounds per "
        "model; ratio = fastconv / "
        "PyTorch in the same run (below 1 is faster). Training step: SGD with momentum 0.9 at "
        f"lr {LEARNING_RATE:g} (the losses checked finite), softmax cross-entropy. Machine: "
        + machine_line()
        + ".",
        "Reproduce: `python -m bench.zoo_speed " + " ".join(args.argv) + "`",
    ]
    return "\n".join(lines)


def plot(rows, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{NAMES.get(r['model'], r['model'])}\n{r['mode']}" for r in rows]
    pos = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / len(args.dtypes)
    for i, d in enumerate(args.dtypes):
        ax.bar(
            pos + (i - (len(args.dtypes) - 1) / 2) * width,
            [r[f"fastconv_{d}_ratio"] for r in rows],
            width,
            label=f"fastconv {d}",
        )
    ax.axhline(1.0, color="k", lw=1, ls="--", label="PyTorch float32 (2 threads)")
    ax.set_xticks(pos, labels, fontsize=7)
    ax.set_ylabel("time / PyTorch's")
    ax.set_title(
        f"Zoo at {args.size or 224}x{args.size or 224}, batch {args.batch} "
        f"(same-run ratios, below 1 is faster)",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["alexnet", "vgg16", "resnet18", "googlenet"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=None, help="square input side (default 224)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    p.add_argument("--budget", type=float, default=120.0, help="seconds per model (default 120)")
    p.add_argument("--min-rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-md", help="write the table into this file's zoo-speed markers")
    p.add_argument("--plot", help="write a PNG of the ratios")
    p.add_argument("--json", help="write the rows as JSON")
    args = p.parse_args(argv)
    if args.out_md:
        check_region_target(args.out_md)
    args.argv = _reproducible(sys.argv[1:] if argv is None else list(argv))
    rows, infos = [], {}
    for model in args.models:
        print(f"{model}: timing (load average {load_average()})...", flush=True)
        model_rows, infos[model] = run_model(model, args)
        rows += model_rows
        for r in model_rows:
            cells = ", ".join(f"{d} {r[f'fastconv_{d}_ratio']:.2f}x" for d in args.dtypes)
            print(f"  {r['mode']}: PyTorch {r['torch_ms']:.0f} ms; fastconv {cells}", flush=True)
    text = markdown(rows, args, infos)
    print(text)
    if args.out_md:
        write_region(args.out_md, "zoo-speed", text)
    if args.plot:
        plot(rows, args, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
