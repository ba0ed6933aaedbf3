"""Shared machinery of the zoo benchmarks (``bench/zoo_speed.py``, ``zoo_memory.py``,
``zoo_scaling.py``): one process per implementation, timed round-robin.

Each implementation runs in a process of its own (:class:`Worker`): Numba's OpenMP workers and
PyTorch's pool spin-wait after a parallel region, and in one process they would take the cores
the other needs. A worker builds its model once (fastconv from the zoo builder and a seed;
PyTorch: the twin of the same fastconv model, weights copied, the fastconv copy then freed),
runs untimed warm-up calls (Numba compilation, allocators), and then times single calls on
request, so the parent can interleave implementations call by call: every implementation sees
the same machine load, and ratios come from the same run.

The training step is SGD with momentum 0.9 (lr 0.01) on the softmax cross-entropy, in both:
the usual optimizer for these ImageNet models, and one float32 state buffer per weight in
either library. PyTorch runs channels_last with the foreach update, its fastest setting here.
Inputs are random (timing does not depend on pixel values).
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: display names of the zoo models in the tables
NAMES = {
    "alexnet": "AlexNet",
    "vgg16": "VGG-16",
    "resnet18": "ResNet-18",
    "resnet34": "ResNet-34",
    "googlenet": "GoogLeNet",
    "lenet5": "LeNet-5",
}


@dataclass(frozen=True)
class Spec:
    """One implementation of one model, batch and size."""

    impl: str  # "fastconv" or "torch"
    model: str  # a key of fastconv.models.MODELS
    batch: int
    size: int | None = None  # square input side; None: the model's default
    dtype: str = "float32"  # fastconv only; the PyTorch twin is float32
    seed: int = 0
    threads: int = 2  # PyTorch's threads; Numba uses every core it is given
    modes: tuple = ("forward", "train")
    # PyTorch: copy fastconv's initial weights (equal work), or build the architecture only
    # and keep PyTorch's initialisation (memory: no fastconv weights in the process at all)
    copy_weights: bool = True

    @property
    def label(self) -> str:
        if self.impl == "torch":
            return "PyTorch float32"
        return f"fastconv {self.dtype}"


def memory_kb() -> dict:
    """VmRSS and VmHWM (peak resident set since start or the last :func:`reset_peak`), kB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _model_kwargs(spec: Spec, dtype: str) -> dict:
    kwargs = {"seed": spec.seed, "dtype": dtype}
    if spec.size is not None:
        channels = 1 if spec.model in ("lenet5", "resnet-mnist", "deep-mnist") else 3
        kwargs["input_shape"] = (channels, spec.size, spec.size)
    return kwargs


def build(spec: Spec):
    """``(calls, info)``: ``calls[mode]()`` runs one forward pass or one training step."""
    from fastconv.models import get_model
    from fastconv.nn.model import ALLOCATE_WEIGHTS

    dtype = "float32" if spec.impl == "torch" else spec.dtype
    architecture_only = spec.impl == "torch" and not spec.copy_weights
    token = ALLOCATE_WEIGHTS.set(not architecture_only)
    try:
        model = get_model(spec.model, **_model_kwargs(spec, dtype))
    finally:
        ALLOCATE_WEIGHTS.reset(token)
    rng = np.random.default_rng(spec.seed)
    x = rng.random((spec.batch, *model.input_shape), dtype=np.float32)
    y = rng.integers(0, model.output_shape[0], spec.batch)
    info = {"input_shape": list(model.input_shape)}
    info["params"] = sum(
        int(np.prod(s.shape))
        for layer in model.layers
        for s in layer.weight_specs(layer.input_shape)
        if s.trainable
    )
    if spec.impl == "fastconv":
        return _fastconv_calls(model, x.astype(spec.dtype), y), info
    if spec.impl == "torch":
        return _torch_calls(model, x, y, spec.threads, spec.copy_weights), info
    raise ValueError(f"impl must be 'fastconv' or 'torch', got {spec.impl!r}")


# SGD with momentum 0.9 at this rate, for both libraries. At 0.01, VGG-16 (no BatchNorm) on
# the fixed random batch diverged to NaN weights by its fourth step (2026-12-07), and every
# later step timed NaN arithmetic, in fastconv on the exact fallback paths that non-finite
# data takes (Winograd refuses it): a 3 s step became 9-10 s. Hence also _finite.
LEARNING_RATE = 1e-4


def _finite(loss):
    """``loss``; raises if it is not finite (the weights diverged: timings past this point
    would measure NaN arithmetic and fastconv's fallbacks for non-finite data)."""
    if not math.isfinite(loss):
        raise RuntimeError(
            f"training loss {loss}: the weights diverged, and the timings would measure NaN "
            f"arithmetic; lower LEARNING_RATE ({LEARNING_RATE}) in bench/zoo_common.py"
        )
    return loss


def _fastconv_calls(model, x, y):
    from fastconv.nn import Momentum

    model.compile(Momentum(lr=LEARNING_RATE, momentum=0.9), "softmax_cross_entropy")
    return {
        "forward": lambda: model.predict(x, batch_size=len(x)),
        "train": lambda: _finite(model.train_on_batch(x, y)["loss"]),
    }


def _torch_calls(model, x, y, threads, copy_weights):
    import torch

    from fastconv.torch_bridge import to_torch

    torch.set_num_threads(threads)
    # PyTorch at its best on this CPU: channels_last activations and weights (oneDNN's blocked
    # kernels without reorders per layer) and the foreach SGD update (one kernel per step over
    # all parameters instead of one per tensor).
    twin = to_torch(model, copy_weights=copy_weights).to(memory_format=torch.channels_last)
    tx = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    ty = torch.from_numpy(y.astype(np.int64))
    opt = torch.optim.SGD(twin.parameters(), lr=LEARNING_RATE, momentum=0.9, foreach=True)

    def forward():
        twin.eval()
        with torch.no_grad():
            return twin(tx)

    def train():
        twin.train()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(twin(tx), ty)
        loss.backward()
        opt.step()
        return _finite(loss.item())

    return {"forward": forward, "train": train}


def workspace_bytes() -> int:
    """Bytes held by fastconv's idle CPU conv workspaces (kept between calls for reuse)."""
    from fastconv.cpu import _workspace

    return _workspace.kept_bytes()


def _serve(conn, spec: Spec):
    try:
        import fastconv.models  # noqa: F401  (libraries first: their RSS is the baseline)

        if spec.impl == "torch":
            import torch  # noqa: F401
        rss_start = memory_kb()["VmRSS"]
        calls, info = build(spec)
        gc.collect()  # the PyTorch worker's fastconv model (weights copied to the twin)
        info["rss_built_kb"] = memory_kb()["VmRSS"]
        info["rss_start_kb"] = rss_start
        for mode in spec.modes:  # warm-up: compilation, first-touch allocations
            calls[mode]()
        conn.send(("ready", info))
        while True:
            command, arg = conn.recv()
            if command == "stop":
                break
            if command == "time":
                start = time.perf_counter()
                calls[arg]()
                conn.send(("ok", time.perf_counter() - start))
            elif command == "peak":  # peak RSS over `arg` training steps
                gc.collect()
                before = memory_kb()["VmRSS"]
                ok = reset_peak()
                for _ in range(arg):
                    calls["train"]()
                out = {"rss_before_kb": before, **memory_kb(), "reset": ok}
                if spec.impl == "fastconv":
                    from fastconv.cpu import _workspace

                    out["workspace_bytes"] = workspace_bytes()
                    _workspace.clear()  # what dropping the kept workspaces gives back (mmaps)
                    gc.collect()
                    out["rss_without_workspaces_kb"] = memory_kb()["VmRSS"]
                conn.send(("ok", out))
    except Exception as exc:  # reported to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


class Worker:
    """A process serving one :class:`Spec` (see the module docstring)."""

    def __init__(self, spec: Spec):
        self.spec = spec
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, spec), daemon=True)
        self.process.start()
        child.close()
        self.info = None

    def _receive(self):
        try:
            status, value = self.conn.recv()
        except EOFError:
            self.process.join()
            raise RuntimeError(
                f"{self.spec.label} worker died (exit code {self.process.exitcode}; out of memory?)"
            ) from None
        if status == "error":
            raise RuntimeError(f"{self.spec.label}: {value}")
        return value

    def ready(self):
        self.info = self._receive()
        return self.info

    def time(self, mode: str) -> float:
        self.conn.send(("time", mode))
        return self._receive()

    def peak(self, steps: int = 1) -> dict:
        self.conn.send(("peak", steps))
        return self._receive()

    def stop(self):
        try:
            self.conn.send(("stop", None))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def interleave(workers, modes, budget_s: float, min_rounds: int = 3, max_rounds: int = 15):
    """Time one call per worker and mode, round-robin, until ``budget_s`` seconds have passed
    (at least ``min_rounds``, at most ``max_rounds`` rounds). Returns ``{(label, mode): [s]}``
    and the number of rounds."""
    samples = {(w.spec.label, m): [] for w in workers for m in modes}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        for mode in modes:
            for w in workers:
                samples[(w.spec.label, mode)].append(w.time(mode))
        rounds += 1
    return samples, rounds


def median(values) -> float:
    return float(np.median(values))


def as_dict(spec: Spec) -> dict:
    return asdict(spec)


def ratio_cell(ms: float, base_ms: float) -> str:
    return f"{ms:.0f} ms ({ms / base_ms:.2f}x)"


def _reproducible(argv) -> list:
    """The command's arguments without ``--json FILE`` (a scratch output), for the docs."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--json":
            skip = True
        elif not a.startswith("--json="):
            out.append(a)
    return out
