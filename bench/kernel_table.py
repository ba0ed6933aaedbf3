"""One markdown table of every deep-MNIST kernel: fastconv fp32/fp16 and NumPy vs PyTorch CPU.

Usage::

    python -m bench.kernel_table [--out docs/benchmarks.md] [--repeats 15] [--ref-repeats 3]

Layers are those of the book's deep MNIST ConvNet (ch. 8) at batch 100: conv1..conv6 with
their fused bias+ReLU forward and their (dx, dw, db) backward, and the three 2x2 max-pool
layers. Each entry is the median of ``--repeats`` timed calls after two warm-up calls (the
slow float64 NumPy reference gets ``--ref-repeats``). Implementations are timed in
interleaved rounds, so load from other processes on a shared machine hits them alike, and
every ratio is against PyTorch (fp32, 2 threads) measured in the same run; below 1 is faster.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import fastconv  # noqa: E402
from bench.common import check_region_target, deep_mnist_layers, machine_line, write_region
from fastconv import reference as ref  # noqa: E402

try:
    import torch
except ImportError:  # the table still compares fastconv with NumPy
    torch = None

BATCH = 100
IMPLS = ("torch", "fastconv fp32", "fastconv fp16", "numpy f64")


@dataclass(frozen=True)
class Layer:
    name: str
    kind: str  # "conv" or "pool"
    C: int  # input channels
    H: int  # input height = width
    F: int = 0  # conv filters
    pad: int = 0  # conv padding

    @property
    def x_shape(self):
        return (BATCH, self.C, self.H, self.H)

    def describe(self) -> str:
        if self.kind == "conv":
            return f"{self.C}@{self.H}x{self.H} -> {self.F}, 3x3 pad {self.pad}"
        return f"{self.C}@{self.H}x{self.H}, 2x2/2"


# The deep MNIST net (book ch. 8), read from deep_mnist_net(): shapes follow from the 28x28
# input, conv4 has pad 2.
LAYERS = [Layer(m.name, m.kind, m.C, m.H, m.F, m.pad) for m in deep_mnist_layers()]


def make_calls(layer: Layer, seed: int = 0) -> dict[str, dict[str, Callable[[], object]]]:
    """``{impl: {"forward": fn, "backward": fn}}`` on fixed random data for ``layer``."""
    rng = np.random.default_rng(seed)
    x64 = rng.standard_normal(layer.x_shape)
    calls: dict[str, dict[str, Callable[[], object]]] = {}
    if layer.kind == "conv":
        w64 = rng.standard_normal((layer.F, layer.C, 3, 3)) * np.sqrt(2.0 / (9 * layer.C))
        b64 = rng.standard_normal(layer.F) * 0.1
        out = layer.H + 2 * layer.pad - 2
        dy64 = rng.standard_normal((BATCH, layer.F, out, out))
        p = layer.pad
        for impl, dtype in (("fastconv fp32", np.float32), ("fastconv fp16", np.float16)):
            x, w, b, dy = (a.astype(dtype) for a in (x64, w64, b64, dy64))
            calls[impl] = {
                "forward": lambda x=x, w=w, b=b: fastconv.conv2d(x, w, b, 1, p, "relu"),
                "backward": lambda x=x, w=w, dy=dy: fastconv.conv2d_backward(dy, x, w, 1, p),
            }
        calls["numpy f64"] = {
            "forward": lambda: ref.conv2d(x64, w64, b64, 1, p, "relu"),
            "backward": lambda: ref.conv2d_backward(dy64, x64, w64, 1, p),
        }
        if torch is not None:
            # PyTorch at its best here: channels_last tensors (oneDNN's blocked kernels without
            # a reorder around each call), as a channels_last model runs them.
            cl = torch.channels_last
            xt, wt, dyt = (
                torch.from_numpy(a.astype(np.float32)).contiguous(memory_format=cl)
                for a in (x64, w64, dy64)
            )
            bt = torch.from_numpy(b64.astype(np.float32))
            conv_bwd = torch.ops.aten.convolution_backward
            calls["torch"] = {
                "forward": lambda: torch.relu(torch.nn.functional.conv2d(xt, wt, bt, padding=p)),
                "backward": lambda: conv_bwd(
                    dyt, xt, wt, [layer.F], [1, 1], [p, p], [1, 1], False, [0, 0], 1, [True] * 3
                ),
            }
    else:
        dy64 = rng.standard_normal((BATCH, layer.C, layer.H // 2, layer.H // 2))
        for impl, dtype in (("fastconv fp32", np.float32), ("fastconv fp16", np.float16)):
            x, dy = x64.astype(dtype), dy64.astype(dtype)
            calls[impl] = {
                "forward": lambda x=x: fastconv.max_pool2d(x, 2),
                "backward": lambda x=x, dy=dy: fastconv.max_pool2d_backward(dy, x, 2),
            }
        calls["numpy f64"] = {
            "forward": lambda: ref.max_pool2d(x64, 2),
            "backward": lambda: ref.max_pool2d_backward(dy64, x64, 2),
        }
        if torch is not None:
            xt, dyt = (
                torch.from_numpy(a.astype(np.float32)).contiguous(memory_format=torch.channels_last)
                for a in (x64, dy64)
            )
            # Training runs the forward that records argmax indices and the backward using them.
            _, idx = torch.ops.aten.max_pool2d_with_indices(xt, [2, 2], [2, 2])
            calls["torch"] = {
                "forward": lambda: torch.ops.aten.max_pool2d_with_indices(xt, [2, 2], [2, 2]),
                "backward": lambda: torch.ops.aten.max_pool2d_with_indices_backward(
                    dyt, xt, [2, 2], [2, 2], [0, 0], [1, 1], False, idx
                ),
            }
    return calls


STATS = {"median": statistics.median, "min": min}


def time_layer(
    layer: Layer, repeats: int, ref_repeats: int, stat: str = "median"
) -> dict[tuple[str, str], float]:
    """Seconds per (impl, pass): ``stat`` of interleaved rounds after two warm-up calls."""
    calls = make_calls(layer)
    samples: dict[tuple[str, str], list[float]] = {}
    for impl, passes in calls.items():
        for pass_, fn in passes.items():
            for _ in range(2 if impl != "numpy f64" else 1):
                fn()  # compile, warm caches and allocator
            samples[(impl, pass_)] = []
    for r in range(repeats):
        order = list(samples)
        order = order[r % len(order) :] + order[: r % len(order)]  # rotate who goes first
        for key in order:
            if key[0] == "numpy f64" and r >= ref_repeats:
                continue
            t0 = time.perf_counter()
            calls[key[0]][key[1]]()
            samples[key].append(time.perf_counter() - t0)
    return {key: STATS[stat](ts) for key, ts in samples.items()}


def _cell(t: float | None, base: float | None) -> str:
    if t is None:
        return "n/a"
    ms = f"{t * 1e3:.2f} ms"
    return f"{ms} ({t / base:.2f}x)" if base else ms


def build_table(
    repeats: int, ref_repeats: int, layers=LAYERS, log=print, stat: str = "median"
) -> str:
    base_impl = "torch" if torch is not None else None
    shown = [i for i in IMPLS if i != "torch" or torch is not None]
    head = (
        ["layer", "shape (batch 100)", "pass"]
        + [f"{i} (x torch)" if base_impl and i != base_impl else i for i in shown]
        + ["fastconv algorithm"]
    )
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    totals: dict[tuple[str, str], float] = {}
    for layer in layers:
        log(f"timing {layer.name} ...")
        fastconv.clear_conv_algorithm_choices()
        t = time_layer(layer, repeats, ref_repeats, stat)
        ran = {c.pass_: c.algorithm for c in fastconv.conv_algorithm_choices()}
        for pass_ in ("forward", "backward", "fwd+bwd"):
            row = [layer.name, layer.describe(), pass_]
            vals = {}
            for impl in shown:
                if pass_ == "fwd+bwd":
                    vals[impl] = t[(impl, "forward")] + t[(impl, "backward")]
                else:
                    vals[impl] = t[(impl, pass_)]
                if pass_ == "fwd+bwd":
                    key = (layer.kind, impl)
                    totals[key] = totals.get(key, 0.0) + vals[impl]
            base = vals.get(base_impl) if base_impl else None
            row += [_cell(vals[i], None if i == base_impl else base) for i in shown]
            if layer.kind != "conv":
                row.append("")
            elif pass_ == "fwd+bwd":
                row.append(
                    " / ".join(dict.fromkeys(ran.get(p, "?") for p in ("forward", "backward")))
                )
            else:
                row.append(ran.get(pass_, "?"))
            rows.append("| " + " | ".join(row) + " |")
    for kind, label in (("conv", "all conv"), ("pool", "all pool")):
        if any(k[0] == kind for k in totals):
            base = totals.get((kind, base_impl)) if base_impl else None
            row = [f"**{label}**", "", "fwd+bwd"]
            row += [_cell(totals[(kind, i)], None if i == base_impl else base) for i in shown]
            row.append("")
            rows.append("| " + " | ".join(row) + " |")
    notes = (
        f"{stat.capitalize()} of {repeats} interleaved calls after warm-up "
        f"({ref_repeats} for NumPy); fwd+bwd is the sum of forward and backward; "
        "ratio = time / PyTorch time in the same run "
        "(below 1 is faster than PyTorch). Conv forward includes bias + ReLU (fused in fastconv); "
        "fastconv runs its default per-shape algorithm (`fastconv.set_conv_algorithm`); "
        "conv backward returns dx, dw, db; PyTorch pooling is the training pair "
        "`max_pool2d_with_indices` + its backward.\n\n"
        f"Machine: {machine_line()}."
    )
    return "\n".join(rows) + "\n\n" + notes + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, help="markdown file whose kernel-table region to replace"
    )
    parser.add_argument(
        "--repeats", type=int, default=15, help="timed calls per entry (default 15)"
    )
    parser.add_argument(
        "--ref-repeats", type=int, default=3, help="timed calls for the NumPy reference (default 3)"
    )
    parser.add_argument(
        "--stat",
        choices=sorted(STATS),
        default="median",
        help="median (default) or min of the timed calls; min resists load from other processes",
    )
    parser.add_argument("--layers", nargs="*", help="only these layers, e.g. pool1 conv2")
    args = parser.parse_args(argv)
    if args.out:
        check_region_target(args.out)
    if args.repeats < 1 or args.ref_repeats < 1:
        parser.error("--repeats and --ref-repeats must be >= 1")
    layers = LAYERS
    if args.layers:
        unknown = set(args.layers) - {l.name for l in LAYERS}
        if unknown:
            parser.error(
                f"unknown layers {sorted(unknown)}; choose from {[l.name for l in LAYERS]}"
            )
        layers = [l for l in LAYERS if l.name in args.layers]
    if torch is not None:
        torch.set_num_threads(2)
    table = build_table(
        args.repeats,
        min(args.ref_repeats, args.repeats),
        layers,
        log=lambda m: print(m, file=sys.stderr),
        stat=args.stat,
    )
    print(table)
    if args.out:
        write_region(args.out, "kernel-table", table)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
