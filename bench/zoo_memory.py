"""Peak memory (RSS) of a training step: fastconv CPU against the PyTorch twin; and what the
GPU path's unfolded matrices would need.

    python -m bench.zoo_memory                        # AlexNet, VGG-16, ResNet-18, GoogLeNet
    python -m bench.zoo_memory --models resnet18 --size 64                  # a quick check
    python -m bench.zoo_memory --out-md docs/benchmarks.md
    python -m bench.zoo_memory --gpu-estimate vgg16 --batch 128   # no GPU needed

Each implementation runs alone in a fresh process, one after the other: it imports its
libraries (the RSS then is its baseline), builds the model, runs one forward pass and one
training step (warm-up: compilation, workspaces, allocator), resets the peak RSS
(``/proc/self/clear_refs``), runs ``--steps`` training steps and reads VmHWM. Reported: that
peak, the resident memory before the step (weights, optimizer state, kept workspaces), and the
peak over the library baseline ("model + step"), whose ratio to PyTorch's is the goal's measure
(the libraries themselves differ: PyTorch's process also imports fastconv to copy the weights).

``--gpu-estimate`` sizes the buffers the GPU backend (``fastconv/gpu/_kernel_ops.py``)
allocates per convolution for a whole batch, from the model's layer shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.common import check_region_target, load_average, machine_line, write_region  # noqa: E402
from bench.zoo_common import (  # noqa: E402
    NAMES,
    Spec,
    Worker,
    _reproducible,
)

MB = 1024.0  # kB per MiB


def measure(spec: Spec, steps: int) -> dict:
    # The PyTorch process builds the twin from the architecture alone: a fastconv copy of the
    # weights, freed, could leave heap pages that PyTorch's peak would then include.
    w = Worker(Spec(**{**spec.__dict__, "modes": ("forward", "train"), "copy_weights": False}))
    try:
        info = w.ready()
        peak = w.peak(steps)
    finally:
        w.stop()
    if not peak["reset"]:
        raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs): Linux >= 4.0 needed")
    return {
        "label": spec.label,
        "params": info["params"],
        "libs_mb": info["rss_start_kb"] / MB,
        "before_mb": peak["rss_before_kb"] / MB,
        "peak_mb": peak["VmHWM"] / MB,
        "step_mb": (peak["VmHWM"] - info["rss_start_kb"]) / MB,
        "workspace_mb": peak.get("workspace_bytes", 0) / 2**20,
        "workspace_resident_mb": (
            (peak["VmRSS"] - peak["rss_without_workspaces_kb"]) / MB
            if "rss_without_workspaces_kb" in peak
            else 0.0
        ),
    }


def markdown(results, args) -> str:
    lines = [
        "| model | implementation | libraries | resident before the step | peak during the step "
        "| model + step (peak - libraries) | vs PyTorch | conv workspaces kept: allocated "
        "(resident) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, rows in results.items():
        base = next(r for r in rows if r["label"].startswith("PyTorch"))["step_mb"]
        for r in rows:
            ws = ""
            if r["label"].startswith("fastconv"):
                resident = max(0.0, r["workspace_resident_mb"])  # RSS noise can be negative
                ws = f"{r['workspace_mb']:.0f} MB ({resident:.0f} MB)"
            lines.append(
                f"| {NAMES.get(model, model)} | {r['label']} | {r['libs_mb']:.0f} MB | "
                f"{r['before_mb']:.0f} MB | {r['peak_mb']:.0f} MB | {r['step_mb']:.0f} MB | "
                f"{r['step_mb'] / base:.2f}x | {ws} |"
            )
    size = args.size or 224
    lines += [
        "",
        f"Training step (SGD with momentum), batch {args.batch}, {size}x{size}; each row a "
        f"fresh process; peak = VmHWM over {args.steps} step(s) after a warm-up step. "
        "Machine: " + machine_line() + ".",
        "Reproduce: `python -m bench.zoo_memory " + " ".join(args.argv) + "`",
    ]
    return "\n".join(lines)


def gpu_estimate(model_name: str, batch: int, dtype_bytes: int = 4, chunk_mib: int = 512) -> str:
    """Per-convolution GPU buffers (``fastconv/gpu/_kernel_ops.py``) for a whole batch, and
    with the batch cut into chunks whose unfolded matrix fits ``chunk_mib`` (the bound main's
    GPU backend adopted, ``WORKSPACE_BYTES``; taken from the backend when it has one).

    Forward: ``cols (n, K, P)`` unless ``K <= DIRECT_MAX_K``, plus the output ``y (N, F, P)``.
    Backward: ``dy_rows (n*P, F)``, ``cols (n*P, K)`` and ``dcols (n*P, K)`` per chunk of ``n``
    images, and ``dx`` for the whole batch.
    """
    from fastconv.gpu import _kernel_ops
    from fastconv.models import get_model
    from fastconv.nn.model import ALLOCATE_WEIGHTS

    chunk_bytes = getattr(_kernel_ops, "WORKSPACE_BYTES", chunk_mib << 20)
    token = ALLOCATE_WEIGHTS.set(False)  # shapes only
    try:
        model = get_model(model_name)
    finally:
        ALLOCATE_WEIGHTS.reset(token)
    gib = 2.0**30 / dtype_bytes
    rows, worst = [], (0.0, 0.0, "")
    for node in model._nodes:
        layer = node.layer
        if type(layer).__name__ != "Conv2D":
            continue
        C, H, W = node.inputs[0].shape
        F, OH, OW = node.output.shape
        K, P = C * layer.kernel_size[0] * layer.kernel_size[1], OH * OW
        n = max(1, min(batch, chunk_bytes // (K * P * dtype_bytes)))
        direct = K <= _kernel_ops.DIRECT_MAX_K
        cost = {}
        for label, m in (("whole", batch), ("chunked", n)):
            fwd = (0 if direct else m * K * P) + batch * F * P
            bwd = m * P * F + 2 * m * P * K + batch * C * H * W
            cost[label] = (fwd / gib, bwd / gib)
        rows.append((layer.name, C, H, F, K, P, n, cost))
        worst = max(worst, (cost["whole"][1], cost["chunked"][1], layer.name))
    out = [
        f"{model_name}, batch {batch}, {8 * dtype_bytes}-bit: transient GPU buffers per "
        f"convolution (GiB), whole batch / in chunks of {chunk_bytes >> 20} MiB of unfolded images",
        "| layer | C | H | F | K = C*kh*kw | P = OH*OW | images per chunk | forward, whole | "
        "backward, whole | forward, chunked | backward, chunked |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, C, H, F, K, P, n, cost in rows:
        (fw, bw), (fc, bc) = cost["whole"], cost["chunked"]
        out.append(
            f"| {name} | {C} | {H} | {F} | {K} | {P} | {n} | {fw:.2f} | {bw:.2f} | {fc:.2f} | "
            f"{bc:.2f} |"
        )
    out.append(
        f"largest backward: {worst[2]}, {worst[0]:.1f} GiB for the whole batch, "
        f"{worst[1]:.1f} GiB in chunks"
    )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["alexnet", "vgg16", "resnet18", "googlenet"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=None, help="square input side (default 224)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    p.add_argument("--steps", type=int, default=1, help="training steps measured (default 1)")
    p.add_argument("--out-md", help="write the table into this file's zoo-memory markers")
    p.add_argument("--json", help="write the results as JSON")
    p.add_argument(
        "--gpu-estimate", metavar="MODEL", help="print the GPU path's buffers for MODEL and exit"
    )
    args = p.parse_args(argv)
    if args.out_md:
        check_region_target(args.out_md)
    args.argv = _reproducible(sys.argv[1:] if argv is None else list(argv))
    if args.gpu_estimate:
        print(gpu_estimate(args.gpu_estimate, args.batch))
        return 0
    results = {}
    for model in args.models:
        rows = []
        for spec in [Spec("torch", model, args.batch, args.size)] + [
            Spec("fastconv", model, args.batch, args.size, d) for d in args.dtypes
        ]:
            print(
                f"{model}, {spec.label}: measuring (load average {load_average()})...", flush=True
            )
            rows.append(measure(spec, args.steps))
            r = rows[-1]
            print(f"  peak {r['peak_mb']:.0f} MB, model + step {r['step_mb']:.0f} MB", flush=True)
        results[model] = rows
    text = markdown(results, args)
    print(text)
    if args.out_md:
        write_region(args.out_md, "zoo-memory", text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
