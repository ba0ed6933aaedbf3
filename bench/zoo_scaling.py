"""How the cost grows: ResNet-18's time per image against the batch size (1, 8, 32, 128) at
224x224 and against the image size (32, 64, 128, 224) at batch 8, fastconv CPU float32 against
the PyTorch twin (CPU, 2 threads), forward pass and training step, interleaved.

    python -m bench.zoo_scaling                           # both sweeps, default budgets
    python -m bench.zoo_scaling --batches 1 8 --sizes 32 64 --budget 20      # a quick check
    python -m bench.zoo_scaling --out-md docs/benchmarks.md --plot docs/zoo_scaling.png

Every configuration gets two worker processes (fastconv, PyTorch) timed round-robin until
``--budget`` seconds have passed (at least 3 rounds); the tables give the median time per image
and fastconv / PyTorch. A training configuration is skipped, with a note, when the machine has
less memory available than ``--min-free-gb`` (two ResNet-18 training processes at batch 128 hold
several GB each).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.common import check_region_target, load_average, machine_line, write_region  # noqa: E402
from bench.zoo_common import (  # noqa: E402
    Spec,
    Worker,
    _reproducible,
    interleave,
    median,
)


def available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def run(model, batch, size, modes, args):
    specs = [
        Spec("torch", model, batch, size, modes=tuple(modes)),
        Spec("fastconv", model, batch, size, "float32", modes=tuple(modes)),
    ]
    workers = [Worker(s) for s in specs]
    try:
        for w in workers:
            w.ready()
        samples, rounds = interleave(workers, modes, args.budget, args.min_rounds)
    finally:
        for w in workers:
            w.stop()
    out = {}
    for mode in modes:
        t = median(samples[("PyTorch float32", mode)]) * 1e3 / batch
        f = median(samples[("fastconv float32", mode)]) * 1e3 / batch
        out[mode] = {
            "torch_ms_per_image": t,
            "fastconv_ms_per_image": f,
            "ratio": f / t,
            "rounds": rounds,
        }
    return out


def sweep(kind, values, args, notes):
    rows = []
    for v in values:
        batch, size = (v, 224) if kind == "batch" else (args.sweep_batch, v)
        modes = ["forward"]
        if batch in args.train_batches or kind == "size":
            if available_gb() >= args.min_free_gb or batch <= 8:
                modes.append("train")
            else:
                notes.append(
                    f"training at batch {batch}, {size}x{size} skipped: "
                    f"{available_gb():.1f} GB available < --min-free-gb {args.min_free_gb}"
                )
        print(
            f"{args.model} batch {batch}, {size}x{size}: {modes} "
            f"(load average {load_average()})...",
            flush=True,
        )
        result = run(args.model, batch, size, modes, args)
        for mode, r in result.items():
            print(
                f"  {mode}: {r['fastconv_ms_per_image']:.1f} vs "
                f"{r['torch_ms_per_image']:.1f} ms/image ({r['ratio']:.2f}x)",
                flush=True,
            )
        rows.append({"batch": batch, "size": size, **result})
    return rows


def table(rows, key, label) -> str:
    lines = [
        f"| {label} | forward: fastconv ms/image | PyTorch | ratio | training: fastconv "
        "ms/image | PyTorch | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = []
        for mode in ("forward", "train"):
            if mode in r:
                m = r[mode]
                cells += [
                    f"{m['fastconv_ms_per_image']:.1f}",
                    f"{m['torch_ms_per_image']:.1f}",
                    f"{m['ratio']:.2f}x",
                ]
            else:
                cells += ["skipped", "", ""]
        lines.append(f"| {r[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(batch_rows, size_rows, path, model):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    for ax, rows, key, xlabel in (
        (axes[0], batch_rows, "batch", "batch size (224x224)"),
        (axes[1], size_rows, "size", "image side (batch 8)"),
    ):
        for mode, style in (("forward", "-"), ("train", "--")):
            pts = [r for r in rows if mode in r]
            if not pts:
                continue
            xs = [r[key] for r in pts]
            ax.plot(
                xs,
                [r[mode]["fastconv_ms_per_image"] for r in pts],
                "o" + style,
                color="C3",
                label=f"fastconv {mode}",
            )
            ax.plot(
                xs,
                [r[mode]["torch_ms_per_image"] for r in pts],
                "s" + style,
                color="C0",
                label=f"PyTorch {mode}",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([r[key] for r in rows], [str(r[key]) for r in rows])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms per image")
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"{model}: time per image, fastconv float32 vs PyTorch float32 (2 threads)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batches", nargs="*", type=int, default=[1, 8, 32, 128])
    p.add_argument(
        "--train-batches",
        nargs="*",
        type=int,
        default=[1, 8, 32, 128],
        help="batch sizes whose training step is timed too",
    )
    p.add_argument("--sizes", nargs="*", type=int, default=[32, 64, 128, 224])
    p.add_argument("--sweep-batch", type=int, default=8, help="batch of the size sweep")
    p.add_argument("--budget", type=float, default=60.0, help="seconds per configuration")
    p.add_argument("--min-rounds", type=int, default=3)
    p.add_argument("--min-free-gb", type=float, default=12.0)
    p.add_argument("--out-md", help="write the tables into this file's zoo-scaling markers")
    p.add_argument("--plot", help="write a PNG of both sweeps")
    p.add_argument("--json", help="write the results as JSON")
    args = p.parse_args(argv)
    if args.out_md:
        check_region_target(args.out_md)
    args.argv = _reproducible(sys.argv[1:] if argv is None else list(argv))
    notes = []
    batch_rows = sweep("batch", args.batches, args, notes)
    size_rows = sweep("size", args.sizes, args, notes)
    text = "\n".join(
        [
            f"{args.model}, time per image against the batch size (224x224):",
            "",
            table(batch_rows, "batch", "batch"),
            "",
            f"{args.model}, time per image against the image size (batch {args.sweep_batch}):",
            "",
            table(size_rows, "size", "side"),
            "",
            "Medians of interleaved rounds (at least 3, budget "
            f"{args.budget:.0f} s per configuration); ratio = fastconv / PyTorch in the same run. "
            "Machine: " + machine_line() + ".",
            *[f"Note: {n}." for n in notes],
            "Reproduce: `python -m bench.zoo_scaling " + " ".join(args.argv) + "`",
        ]
    )
    print(text)
    if args.out_md:
        write_region(args.out_md, "zoo-scaling", text)
    if args.plot:
        plot(batch_rows, size_rows, args.plot, args.model)
    if args.json:
        Path(args.json).write_text(json.dumps({"batch": batch_rows, "size": size_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
