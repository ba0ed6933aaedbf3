"""What is alive at the peak of a zoo model's training step, layer by layer.

    python -m bench.zoo_memory_breakdown --model vgg16 --batch 8
    python -m bench.zoo_memory_breakdown --models alexnet vgg16 resnet18 googlenet \
        --out-md docs/benchmarks.md          # one fresh process per model, tables in the docs
    python -m bench.zoo_memory_breakdown --model resnet18 --size 64 --events   # the timeline

The step is the one ``bench/zoo_memory.py`` measures (SGD with momentum, a warm-up forward
pass and training step first), run with a :class:`fastconv.nn.Hook` around every layer's
forward and backward, the loss and the update. At the start of each event the hook reads the
resident set (VmRSS) and resets the peak (VmHWM, ``/proc/self/clear_refs``), so the peak of
each event, and of each gap between events, is known; ``tracemalloc`` (NumPy reports its
allocations to it) gives the traced part of each event's temporaries.

At the start of each event the hook also sorts every array alive into one category, reading
the pass's own variables from the interpreter's frames (``Model._run_forward``,
``_run_backward``, ``Trainer._train_step``: nothing in the model changes for the trace). An
array counts once, under the first category that holds it (arrays that are views of one buffer
count once), and by its *resident* pages (``mincore``), so the categories add up to RSS:

* weights; optimizer state (momentum, float32 master copies);
* gradients of the previous step (``model._grads``, kept for ``model.gradients()``) and the
  gradients held by this step's backward pass so far;
* forward caches alive (what each layer kept for its backward pass; in the backward pass,
  those of the layers not yet run, plus the running layer's), forward activations not in a
  cache, pending gradients (of values whose consumers' backward ran, the running layer's
  output gradient included), the batch, scores and loss state;
* per-layer kept buffers (ndarray attributes of the layers other than weights, e.g. Conv2D's
  ReLU-gradient buffer, prepared inference weights); kept convolution workspaces (the idle
  sets of ``fastconv/cpu/_workspace.py``: allocated and resident);
* the running event's temporaries: the event's peak RSS minus its RSS at the start (traced:
  what NumPy allocated, tracemalloc's peak minus its current at the start);
* the rest: RSS at the start minus the library baseline and the categories: Numba's compiled
  code and compiler state (kept in malloc'd memory: executable mappings hold ~1 MB), Python
  objects, and the free bytes ``malloc`` keeps in its arenas (``malloc_info``; resident where
  they were touched), given in the table.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import mmap
import os
import re
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np

from bench.common import check_region_target, load_average, machine_line, write_region  # noqa: E402
from bench.zoo_common import (
    NAMES,
    Spec,
    _model_kwargs,
    _reproducible,
    memory_kb,
    reset_peak,
)

MiB = float(2**20)
PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.fopen.restype = ctypes.c_void_p
_libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
_libc.fclose.argtypes = [ctypes.c_void_p]
_libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]

CATEGORIES = (
    ("weights", "weights"),
    ("optimizer", "optimizer state"),
    ("prev_grads", "gradients of the previous step (model._grads)"),
    ("grads", "gradients held (this step)"),
    ("caches", "forward caches alive"),
    ("activations", "forward activations not in a cache"),
    ("pending", "pending gradients (incl. the running layer's dy)"),
    ("batch", "batch, scores, loss state"),
    ("layer_buffers", "per-layer kept buffers"),
    ("workspaces", "kept conv workspaces (idle pool)"),
)


# --- reading memory -------------------------------------------------------------------------------


def resident_bytes(addr: int, nbytes: int) -> int:
    """Resident bytes of ``[addr, addr + nbytes)`` (whole pages, ``mincore``)."""
    if nbytes <= 0:
        return 0
    start = addr - addr % PAGE
    pages = (addr + nbytes - start + PAGE - 1) // PAGE
    vec = np.zeros(pages, np.uint8)
    if _libc.mincore(ctypes.c_void_p(start), pages * PAGE, vec.ctypes.data) != 0:
        return nbytes  # not a mapping mincore knows: count it whole
    return int(np.count_nonzero(vec & 1)) * PAGE


def malloc_free_bytes() -> int:
    """Free bytes glibc's malloc holds in its arenas (every arena, ``malloc_info``)."""
    with tempfile.NamedTemporaryFile(suffix=".xml") as tmp:
        fp = _libc.fopen(tmp.name.encode(), b"w")
        if not fp:
            return 0
        _libc.malloc_info(0, fp)
        _libc.fclose(fp)
        text = Path(tmp.name).read_text()
    # The last <total type="fast"/"rest"> pair is the sum over every arena.
    tail = text[text.rfind("</heap>") :]
    pattern = r'<total type="(?:fast|rest)" count="\d+" size="(\d+)"'
    return sum(int(m) for m in re.findall(pattern, tail))


# --- finding the arrays ---------------------------------------------------------------------------


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def arrays_in(obj, out: list, seen: set, depth: int = 0) -> list:
    """Every ndarray reachable from ``obj`` through containers and plain objects (not
    through layers, models or modules)."""
    if depth > 8 or id(obj) in seen:
        return out
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        out.append(obj)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            arrays_in(v, out, seen, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            arrays_in(v, out, seen, depth + 1)
    elif isinstance(obj, (str, bytes, int, float, complex, bool, type(None), type)):
        pass
    else:
        from fastconv.nn.layers.base import Layer
        from fastconv.nn.model import Model

        if isinstance(obj, (Layer, Model)) or type(obj).__module__ == "builtins":
            return out
        fields = getattr(obj, "__dict__", None)
        if fields is not None:
            arrays_in(fields, out, seen, depth + 1)
        for slot in getattr(type(obj), "__slots__", ()):
            arrays_in(getattr(obj, slot, None), out, seen, depth + 1)
    return out


def _frame_locals(names=("_run_forward", "_run_backward", "_train_step")) -> dict:
    out = {}
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in names and frame.f_code.co_name not in out:
            # Python 3.11 keeps the dict f_locals fills on the frame, holding the arrays it
            # names until the frame ends: copy it, then empty it, so that the trace keeps
            # nothing alive (no trace function runs, so nothing writes it back).
            seen = frame.f_locals
            out[frame.f_code.co_name] = dict(seen)
            seen.clear()
        frame = frame.f_back
    return out


def sources(model, event: str = "") -> dict:
    """``{category: [objects]}`` at this moment of the step (see the module docstring); at
    the update, ``model._grads`` holds this step's gradients."""
    from fastconv.cpu import _workspace

    frames = _frame_locals()
    fwd, bwd, step = (frames.get(k, {}) for k in ("_run_forward", "_run_backward", "_train_step"))
    opt = model.optimizer
    grads = bwd.get("grads")
    if event == "update":
        grads = model._grads
    src = {
        "weights": [(layer.params, layer.buffers) for layer in model.layers],
        "optimizer": [opt.state, opt._master],
        "prev_grads": [
            model._grads if model._grads is not grads else None,
            bwd.get("previous"),  # emptied layer by layer as the backward pass goes
        ],
        "grads": [grads],
        "caches": [fwd.get("caches"), bwd.get("caches"), bwd.get("cache")],
        "activations": [fwd.get("values"), fwd.get("xs")],
        "pending": [bwd.get("pending"), bwd.get("g"), bwd.get("dy"), step.get("dscores")],
        "batch": [step.get("x"), step.get("y"), step.get("scores"), model.loss.__dict__],
        "layer_buffers": [
            {k: v for k, v in layer.__dict__.items() if k not in ("params", "buffers")}
            for layer in model.layers
        ],
        "workspaces": [list(_workspace._idle.values())],
    }
    return src


def composition(model, event: str = "") -> dict:
    """``{category: (allocated bytes, resident bytes)}``, each buffer counted once."""
    counted: set = set()
    out = {}
    for key, objs in sources(model, event).items():
        allocated = resident = 0
        for a in arrays_in(objs, [], set()):
            root = _root(a)
            addr = root.__array_interface__["data"][0]
            ident = (addr, root.nbytes)
            if ident in counted or root.nbytes == 0:
                continue
            counted.add(ident)
            allocated += root.nbytes
            resident += resident_bytes(addr, root.nbytes)
        out[key] = (allocated, resident)
    return out


# --- the hook -------------------------------------------------------------------------------------


class Tracer:
    """A :class:`fastconv.nn.Hook`: per event, RSS at the start, peak RSS, traced temporaries,
    and the composition at the start."""

    def __init__(self, model):
        self.model = model
        self.events: list = []
        self._open = None

    def begin(self, event, layer):
        gap_peak = memory_kb()["VmHWM"] * 1024  # the gap since the last event's end
        if self.events:
            self.events[-1]["gap_peak"] = gap_peak
        comp = composition(self.model, event)
        rest = {"malloc_free": malloc_free_bytes()}
        gc.collect(0)
        reset_peak()
        rss = memory_kb()["VmRSS"] * 1024
        tracemalloc.reset_peak()
        traced = tracemalloc.get_traced_memory()[0]
        self._open = {
            "event": event,
            "layer": None if layer is None else layer.name,
            "kind": None if layer is None else type(layer).__name__,
            "rss": rss,
            "traced": traced,
            "composition": comp,
            "rest": rest,
        }

    def end(self, event, layer):
        peak = memory_kb()["VmHWM"] * 1024
        current, traced_peak = tracemalloc.get_traced_memory()
        e = self._open
        e["peak"] = peak
        e["traced_temp"] = traced_peak - e["traced"]
        e["rss_end"] = memory_kb()["VmRSS"] * 1024
        e["gap_peak"] = 0
        self.events.append(e)
        reset_peak()


def workspace_split() -> tuple:
    """(allocated, resident) bytes of the idle workspace sets."""
    from fastconv.cpu import _workspace

    alloc = res = 0
    for a in arrays_in(list(_workspace._idle.values()), [], set()):
        root = _root(a)
        alloc += root.nbytes
        res += resident_bytes(root.__array_interface__["data"][0], root.nbytes)
    return alloc, res


def trace_step(model_name: str, batch: int, size, dtype: str, seed: int = 0) -> dict:
    """Build, warm up and trace one training step (in this process)."""
    import fastconv.models  # noqa: F401  (the libraries first: their RSS is the baseline)

    libs = memory_kb()["VmRSS"] * 1024
    from fastconv.models import get_model
    from fastconv.nn import Momentum

    spec = Spec("fastconv", model_name, batch, size, dtype, seed)
    model = get_model(model_name, **_model_kwargs(spec, dtype))
    rng = np.random.default_rng(seed)
    x = rng.random((batch, *model.input_shape), dtype=np.float32).astype(dtype)
    y = rng.integers(0, model.output_shape[0], batch)
    model.compile(Momentum(lr=0.01, momentum=0.9), "softmax_cross_entropy")
    model.predict(x, batch_size=len(x))  # the warm-up of bench/zoo_memory.py
    model.train_on_batch(x, y)
    gc.collect()
    before = memory_kb()["VmRSS"] * 1024
    reset_peak()
    model.train_on_batch(x, y)  # untraced: the peak bench/zoo_memory.py would report
    untraced_peak = memory_kb()["VmHWM"] * 1024
    gc.collect()
    tracer = Tracer(model)
    tracemalloc.start()
    model.hooks.append(tracer)
    reset_peak()
    try:
        model.train_on_batch(x, y)
        tail_peak = memory_kb()["VmHWM"] * 1024  # after the last event
    finally:
        model.hooks.remove(tracer)
        tracemalloc.stop()
    events = tracer.events
    events[-1]["gap_peak"] = tail_peak
    peak_i = max(range(len(events)), key=lambda i: max(events[i]["peak"], events[i]["gap_peak"]))
    return {
        "model": model_name,
        "batch": batch,
        "size": size or 224,
        "dtype": dtype,
        "libs": libs,
        "before": before,
        "untraced_peak": untraced_peak,
        "step_peak": max(max(e["peak"], e["gap_peak"]) for e in events),
        "peak_index": peak_i,
        "events": events,
        "workspaces_end": workspace_split(),
        "machine": machine_line(),
    }


# --- reports --------------------------------------------------------------------------------------


def _mb(b) -> str:
    return f"{b / MiB:.0f}"


def peak_table(r: dict) -> str:
    e = r["events"][r["peak_index"]]
    where = f"{e['event']} of `{e['layer']}` ({e['kind']})" if e["layer"] else e["event"]
    in_gap = e["gap_peak"] > e["peak"]
    if in_gap:
        where = f"just after the {where}"
    peak = max(e["peak"], e["gap_peak"])
    lines = [
        f"**{NAMES.get(r['model'], r['model'])}**, {r['dtype']}, batch {r['batch']}, "
        f"{r['size']}x{r['size']}: step peak {_mb(r['step_peak'])} MB RSS "
        f"({_mb(r['step_peak'] - r['libs'])} MB over the {_mb(r['libs'])} MB library baseline; "
        f"{_mb(r['untraced_peak'] - r['libs'])} MB in the same step untraced), "
        f"reached during the {where}.",
        "",
        "| at the peak | allocated MB | resident MB |",
        "|---|---:|---:|",
    ]
    total_res = 0
    for key, label in CATEGORIES:
        alloc, res = e["composition"][key]
        total_res += res
        if alloc >= MiB / 2:
            lines.append(f"| {label} | {_mb(alloc)} | {_mb(res)} |")
    temp = peak - e["rss"]
    lines.append(
        f"| the running {e['event']}'s temporaries (traced by NumPy: {_mb(e['traced_temp'])}) "
        f"| | {_mb(temp)} |"
    )
    rest = e["rss"] - r["libs"] - total_res
    lines.append(
        "| rest: Numba's compiled code and compiler state, Python objects, malloc's free "
        f"blocks ({_mb(e['rest']['malloc_free'])} MB of them) | | {_mb(rest)} |"
    )
    lines.append(f"| **peak over the library baseline** | | **{_mb(peak - r['libs'])}** |")
    return "\n".join(lines)


def timeline(r: dict) -> str:
    lines = [
        "| event | layer | RSS at start MB | peak MB | traced temp MB | caches MB | grads MB "
        "| pending MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for i, e in enumerate(r["events"]):
        c = e["composition"]
        mark = " **(peak)**" if i == r["peak_index"] else ""
        lines.append(
            f"| {e['event']}{mark} | {e['layer'] or ''} | {_mb(e['rss'])} | "
            f"{_mb(max(e['peak'], e['gap_peak']))} | {_mb(e['traced_temp'])} | "
            f"{_mb(c['caches'][1])} | {_mb(c['grads'][1] + c['prev_grads'][1])} | "
            f"{_mb(c['pending'][1])} |"
        )
    return "\n".join(lines)


def _child(args, model) -> dict:
    """One model in a fresh process (``--model``), its results read back as JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        cmd = [sys.executable, "-m", "bench.zoo_memory_breakdown", "--model", model,
               "--batch", str(args.batch), "--dtype", args.dtype, "--json", tmp.name]  # fmt: skip
        if args.size:
            cmd += ["--size", str(args.size)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(Path(tmp.name).read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="trace this model in this process")
    p.add_argument("--models", nargs="+", help="trace each in a fresh process")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=None, help="square input side (default 224)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--events", action="store_true", help="also print the event timeline")
    p.add_argument("--out-md", help="write the tables between the zoo-memory-breakdown markers")
    p.add_argument("--json", help="write the results as JSON")
    p.add_argument("--from-json", help="render the tables of an earlier --json instead")
    args = p.parse_args(argv)
    if args.out_md:
        check_region_target(args.out_md)
    argv_text = _reproducible(sys.argv[1:] if argv is None else list(argv))
    if args.from_json:
        loaded = json.loads(Path(args.from_json).read_text())
        results = loaded if isinstance(loaded, list) else [loaded]
        argv_text = [a for a in argv_text if not a.startswith("--from-json")]
        argv_text = [a for a in argv_text if a != args.from_json and a != args.out_md]
        argv_text = [a for a in argv_text if a != "--out-md"]
        argv_text += ["--models", *(r["model"] for r in results)]
    elif args.model:
        results = [trace_step(args.model, args.batch, args.size, args.dtype)]
    else:
        results = []
        for model in args.models or ["alexnet", "vgg16", "resnet18", "googlenet"]:
            print(f"{model}: tracing (load average {load_average()})...", flush=True)
            results.append(_child(args, model))
    if args.json:
        Path(args.json).write_text(json.dumps(results if not args.model else results[0]))
    parts = [peak_table(r) + ("\n\n" + timeline(r) if args.events else "") for r in results]
    text = "\n\n".join(parts)
    text += (
        "\n\nOne training step (SGD with momentum) after a warm-up forward pass and step; "
        f"Machine: {results[0].get('machine') or machine_line()}.\n"
        "Reproduce: `python -m bench.zoo_memory_breakdown " + " ".join(argv_text) + "`"
    )
    print(text)
    if args.out_md:
        write_region(args.out_md, "zoo-memory-breakdown", text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
