"""Where does a training step spend its time? Layer-by-layer timing of a model's training step.

:func:`profile_model` runs real training steps (``model.train_on_batch``) with a clock hook
registered on the model (:class:`fastconv.nn.Hook`): the model calls it around every layer's
forward and backward pass, the loss and the optimizer update. Consecutive clock marks split the
step into contiguous parts, so the parts add up to the step's wall time; the gaps between hooked
events (casting the batch, checking labels, computing the accuracy, Python between layers) are
reported as ``framework``. Clocks: ``time.perf_counter`` for CPU models, CUDA events
(synchronised once per step) for GPU models. Times are aggregated by layer type; the share of the
step spent in convolution is reported for the whole step and for the forward pass alone (the
book's fig. 8-14 shows the forward share). An untimed ``train_on_batch`` of the same batch runs
interleaved with the profiled steps, and the difference is reported as the profiling overhead.

Layers that the model fuses into the previous one (a ReLU into a conv's or a BatchNorm's
epilogue; at inference a BatchNorm folded into its conv) get no time of their own: it is
counted in the layer they are fused into, and a note says so.

:func:`profile_torch` measures the same breakdown for the model's PyTorch twin
(:func:`fastconv.torch_bridge.to_torch`, weights copied) with ``torch.profiler``: the step is
wrapped in ``record_function`` ranges (``fc::forward``, ``fc::loss``, ``fc::backward``,
``fc::update``), and the inclusive CPU time of each top-level operator inside a range (direct
children: ``aten::conv2d``, ``aten::batch_norm``... in the forward range; the autograd nodes
``autograd::engine::evaluate_function: ConvolutionBackward0``... in the backward range) is put
in a category by its name (:func:`torch_category`). A range's own time outside its operators
is ``framework``. ``fastconv profile --model NAME`` runs both and draws them side by side.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .device import GPU, device_of
from .nn._files import check_writable_file

__all__ = [
    "ProfileResult",
    "TorchProfileResult",
    "profile_model",
    "profile_forward",
    "profile_torch",
    "torch_category",
    "chart_groups",
    "plot_comparison",
    "add_subcommand",
]

# Layer kinds reported under their own name; anything else ("reshape", "merge") goes to "other".
_KINDS = ("conv", "pool", "norm", "dense", "activation", "dropout")
_TYPE_ORDER = (*_KINDS, "other", "loss", "update", "framework")


def _type_of(layer) -> str:
    kind = getattr(layer, "kind", "other")
    return kind if kind in _KINDS else "other"


# --- clocks ------------------------------------------------------------------------------------

#: The CPU clock: the one place the profiler reads the time, so tests can substitute a clock
#: that advances by known amounts (their assertions then hold on any machine load).
_now = time.perf_counter


class _CpuClock:
    def mark(self):
        return _now()

    def finish(self, last_mark):
        pass

    def elapsed_ms(self, start, end):
        return (end - start) * 1e3


class _GpuClock:
    """CUDA events: recording is asynchronous, so marks cost little and time the device's work."""

    def __init__(self):
        self._cuda = GPU.xp.cuda

    def mark(self):
        event = self._cuda.Event()
        event.record()
        return event

    def finish(self, last_mark):
        last_mark.synchronize()

    def elapsed_ms(self, start, end):
        return self._cuda.get_elapsed_time(start, end)


def _synchronize(x):
    device_of(x).synchronize()


# --- result ------------------------------------------------------------------------------------


@dataclass
class ProfileResult:
    """Mean per-step times of a profiled run and the shares derived from them.

    Attributes
    ----------
    step_ms : float
        Mean over the timed steps of the sum of all timed parts.
    step_ms_median : float
        Median of the same per-step totals.
    conv_share, forward_conv_share : float
        Convolution time over the whole step, and conv forward time over the layers' forward time.
    by_type : dict
        ``{type: share of the step}``, summing to 1. Types are layer kinds (``conv``, ``pool``,
        ``norm``, ``dense``, ``activation``, ``dropout``; other kinds as ``other``), ``loss``,
        ``update`` and ``framework`` (the time between hooked events).
    by_type_ms : dict
        ``{type: {"forward": ms, "backward": ms}}``; the optimizer update counts as backward.
    layers : list of dict
        ``{"name", "type", "forward_ms", "backward_ms"}`` in layer order; CPU conv layers also
        ``"algorithm"``: ``{pass: name}`` for the passes ``forward``, ``backward`` (dx and dW)
        and ``backward_weights`` (dW only, the first layer), as
        :func:`fastconv.ops.conv_algorithm_choices` recorded them.
    overhead : dict
        ``profiled_step_ms`` (wall time of a profiled step, median), ``untimed_step_ms`` (median of
        ``train_on_batch``, or of a plain forward pass in forward-only mode) and ``ratio``.
    """

    backend: str
    dtype: str
    batch_size: int
    steps: int
    warmup: int
    training: bool
    step_ms: float
    step_ms_median: float
    conv_share: float
    forward_conv_share: float
    by_type: dict
    by_type_ms: dict
    layers: list
    loss_ms: float
    update_ms: float
    overhead: dict
    framework_ms: float = 0.0
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict of every field."""
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def table(self) -> str:
        """Readable text report: per layer, per type, shares and overhead."""
        what = "training step" if self.training else "forward pass (inference mode)"
        width = max([14] + [len(la["name"]) + 2 for la in self.layers])
        has_algorithms = any(la.get("algorithm") for la in self.layers)
        lines = [
            f"{what}: backend {self.backend}, {self.dtype}, batch {self.batch_size}, "
            f"mean of {self.steps} steps after {self.warmup} warm-up",
            "",
            f"{'layer':<{width}}{'type':<12}{'forward ms':>12}{'backward ms':>13}{'share':>9}"
            + ("  algorithm (forward/backward)" if has_algorithms else ""),
        ]
        for layer in self.layers:
            total = layer["forward_ms"] + layer["backward_ms"]
            algo = _algorithm_label(layer.get("algorithm", {}))
            lines.append(
                f"{layer['name']:<{width}}{layer['type']:<12}{layer['forward_ms']:>12.3f}"
                f"{layer['backward_ms']:>13.3f}{total / self.step_ms:>9.1%}"
                + (f"  {algo}" if algo else "")
            )
        if self.training:
            lines.append(
                f"{'(loss)':<{width}}{'loss':<12}{'':>12}{'':>13}{self.by_type['loss']:>9.1%}"
            )
            lines.append(
                f"{'(update)':<{width}}{'update':<12}{'':>12}{self.update_ms:>13.3f}"
                f"{self.by_type['update']:>9.1%}"
            )
        if "framework" in self.by_type:
            lines.append(
                f"{'(framework)':<{width}}{'framework':<12}{self.framework_ms:>12.3f}{'':>13}"
                f"{self.by_type['framework']:>9.1%}"
            )
        lines += ["", f"{'type':<14}{'forward ms':>12}{'backward ms':>13}{'share':>9}"]
        for name, share in self.by_type.items():
            ms = self.by_type_ms[name]
            lines.append(f"{name:<14}{ms['forward']:>12.3f}{ms['backward']:>13.3f}{share:>9.1%}")
        oh = self.overhead
        untimed = "train_on_batch" if self.training else "untimed forward"
        lines += [
            "",
            f"step {self.step_ms:.2f} ms (median {self.step_ms_median:.2f} ms)",
            f"convolution: {self.conv_share:.1%} of the {'step' if self.training else 'pass'}, "
            f"{self.forward_conv_share:.1%} of the forward pass",
            f"profiling overhead: profiled step {oh['profiled_step_ms']:.2f} ms vs {untimed} "
            f"{oh['untimed_step_ms']:.2f} ms (medians, same run): {oh['ratio'] - 1:+.1%}",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def plot(self, path) -> None:
        """Bar chart of time per step by layer type, forward and backward side by side."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.by_type_ms)
        fwd = [self.by_type_ms[n]["forward"] for n in names]
        bwd = [self.by_type_ms[n]["backward"] for n in names]
        pos = np.arange(len(names))
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(pos - 0.2, fwd, 0.4, label="forward")
        ax.bar(pos + 0.2, bwd, 0.4, label="backward (update for 'update')")
        ax.set_xticks(pos, names)
        ax.set_ylabel("ms per step")
        mode = "training step" if self.training else "forward pass"
        ax.set_title(
            f"{mode}, {self.backend} {self.dtype}, batch {self.batch_size}: "
            f"conv {self.conv_share:.0%} (forward {self.forward_conv_share:.0%})"
        )
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


# --- profiling ---------------------------------------------------------------------------------


class _ClockHook:
    """Marks the clock at every hooked event; gaps between events are ``framework`` time."""

    def __init__(self, clock):
        self.clock = clock
        self.records = []
        self._last = None

    def start(self):
        self.records = []
        self._last = self.clock.mark()

    def begin(self, event, layer):
        now = self.clock.mark()
        self.records.append(("framework", None, self._last, now))
        self._last = now

    def end(self, event, layer):
        now = self.clock.mark()
        self.records.append((event, layer, self._last, now))
        self._last = now

    def stop(self):
        self.begin("framework", None)
        self.clock.finish(self._last)
        return [(e, la, self.clock.elapsed_ms(a, b)) for e, la, a, b in self.records]


class _AlgorithmHook:
    """Which CPU convolution algorithm each conv layer ran, per pass: the algorithm-choice
    records (:func:`fastconv.ops.conv_algorithm_choices`) whose call counts grew between the
    layer's begin and end events. Used on one untimed step, so its bookkeeping costs nothing
    in the timed ones."""

    def __init__(self):
        self.by_layer: dict = {}
        self._before = None

    @staticmethod
    def _counts():
        from . import ops

        return {
            (c.pass_, c.dtype, c.x_shape, c.w_shape, c.stride, c.pad, c.algorithm): (
                c.calls,
                c.fallbacks,
            )
            for c in ops.conv_algorithm_choices()
        }

    def begin(self, event, layer):
        if layer is not None and _type_of(layer) == "conv":
            self._before = self._counts()

    def end(self, event, layer):
        if layer is None or self._before is None:
            return
        before, self._before = self._before, None
        seen = self.by_layer.setdefault(layer.name, {})
        for key, (calls, fallbacks) in self._counts().items():
            old_calls, old_fallbacks = before.get(key, (0, 0))
            if calls > old_calls:
                name = key[-1] + (" (exact fallback)" if fallbacks > old_fallbacks else "")
                seen[key[0]] = name


def _conv_algorithms(model, step) -> dict:
    """``{layer name: {pass: algorithm}}`` of one extra, untimed step (CPU backend)."""
    hook = _AlgorithmHook()
    model.hooks.append(hook)
    try:
        step()
    finally:
        model.hooks.remove(hook)
    return hook.by_layer


def _algorithm_label(passes: dict) -> str:
    """``forward/backward`` algorithm names, ``-`` for a pass that did not run."""
    if not passes:
        return ""
    backward = passes.get("backward") or passes.get("backward_weights")
    return "/".join(name or "-" for name in (passes.get("forward"), backward) if name or backward)


def _check_args(model, x, steps, warmup):
    if not (hasattr(model, "hooks") and hasattr(model, "_run_forward")):
        raise TypeError(f"model must be a fastconv.nn.Model, got {type(model).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if getattr(x, "ndim", 0) < 2:
        raise ValueError(
            f"x must be a batch of inputs (N, ...), got shape {getattr(x, 'shape', None)}"
        )


def _run(model, x, y, steps, warmup, training):
    _check_args(model, x, steps, warmup)
    xb = model._batch(model._prepare_x(x))
    model._ensure_built(xb)
    if training:
        step = lambda: model.train_on_batch(xb, y)  # noqa: E731
    else:
        step = lambda: model._run_forward(xb, training=False)  # noqa: E731
    gpu = device_of(xb) is GPU
    clock = _GpuClock() if gpu else _CpuClock()
    hook = _ClockHook(clock)

    def profiled():
        model.hooks.append(hook)
        try:
            hook.start()
            step()
            return hook.stop()
        finally:
            model.hooks.remove(hook)

    for _ in range(warmup):
        profiled()
        step()
    _synchronize(xb)

    names = [layer.name for layer in model.layers]
    runs, walls, untimed_walls = [], [], []
    for _ in range(steps):
        start = _now()
        runs.append(profiled())
        walls.append(_now() - start)
        # Interleaved so that both see the same machine load.
        start = _now()
        step()
        _synchronize(xb)
        untimed_walls.append(_now() - start)

    algorithms = {} if gpu else _conv_algorithms(model, step)
    per_layer = {name: {"forward": 0.0, "backward": 0.0} for name in names}
    totals = {"loss_forward": 0.0, "loss_backward": 0.0, "update": 0.0, "framework": 0.0}
    step_totals = []
    for parts in runs:
        step_totals.append(sum(ms for _, _, ms in parts))
        for event, layer, ms in parts:
            if layer is not None:
                per_layer[layer.name][event] += ms / steps
            else:
                totals[event] += ms / steps
    layers = [
        {
            "name": layer.name,
            "type": _type_of(layer),
            "forward_ms": per_layer[layer.name]["forward"],
            "backward_ms": per_layer[layer.name]["backward"],
            **(
                {"algorithm": algorithms.get(layer.name, {})}
                if _type_of(layer) == "conv" and not gpu
                else {}
            ),
        }
        for layer in model.layers
    ]
    by_type_ms = {}
    for layer in layers:
        t = by_type_ms.setdefault(layer["type"], {"forward": 0.0, "backward": 0.0})
        t["forward"] += layer["forward_ms"]
        t["backward"] += layer["backward_ms"]
    if training:
        by_type_ms["loss"] = {
            "forward": totals["loss_forward"],
            "backward": totals["loss_backward"],
        }
        by_type_ms["update"] = {"forward": 0.0, "backward": totals["update"]}
    by_type_ms["framework"] = {"forward": totals["framework"], "backward": 0.0}
    by_type_ms = {k: by_type_ms[k] for k in _TYPE_ORDER if k in by_type_ms}

    step_ms = sum(v["forward"] + v["backward"] for v in by_type_ms.values())
    by_type = {k: (v["forward"] + v["backward"]) / step_ms for k, v in by_type_ms.items()}
    conv = by_type_ms.get("conv", {"forward": 0.0, "backward": 0.0})
    forward_total = sum(layer["forward_ms"] for layer in layers)
    profiled_ms = float(np.median(walls) * 1e3)
    untimed_ms = float(np.median(untimed_walls) * 1e3)
    notes = [
        f"{', '.join(la.name for la in s.layers[1:])} fused into {s.layer.name}"
        for s in model.execution_plan(training)
        if len(s.layers) > 1
    ]
    return ProfileResult(
        backend="gpu" if gpu else "cpu",
        dtype=str(np.dtype(xb.dtype)),
        batch_size=int(xb.shape[0]),
        steps=steps,
        warmup=warmup,
        training=training,
        step_ms=step_ms,
        step_ms_median=float(np.median(step_totals)),
        conv_share=(conv["forward"] + conv["backward"]) / step_ms,
        forward_conv_share=conv["forward"] / forward_total if forward_total else 0.0,
        by_type=by_type,
        by_type_ms=by_type_ms,
        layers=layers,
        loss_ms=totals["loss_forward"] + totals["loss_backward"],
        update_ms=totals["update"],
        framework_ms=totals["framework"],
        overhead={
            "profiled_step_ms": profiled_ms,
            "untimed_step_ms": untimed_ms,
            "ratio": profiled_ms / untimed_ms,
        },
        notes=notes,
    )


def profile_model(model, x, y, steps=20, warmup=3) -> ProfileResult:
    """Time ``steps`` full training steps of ``model`` on one batch, layer by layer.

    Parameters
    ----------
    model : fastconv.nn.Model
        Compiled; it is trained by the run (``2 * (steps + warmup)`` updates).
    x : ndarray (NumPy or CuPy), (N, ...)
        Input batch; cast to the model's dtype and moved to its backend if needed.
    y : ndarray
        Integer labels (or one-hot), as the model's loss takes them.
    steps, warmup : int
        Timed steps, and untimed steps run first (Numba compilation, caches, allocator).

    Returns
    -------
    ProfileResult
        Mean times per layer and type, conv shares, and the measured profiling overhead
        (profiled step vs an interleaved untimed ``train_on_batch``).
    """
    _check_args(model, x, steps, warmup)
    if getattr(model, "loss", None) is None or getattr(model, "optimizer", None) is None:
        raise ValueError("model needs a loss and an optimizer to profile a training step")
    return _run(model, x, y, steps, warmup, True)


def profile_forward(model, x, steps=20, warmup=3) -> ProfileResult:
    """Like :func:`profile_model`, but inference only (no loss or update).

    The overhead is measured against the same forward passes without the clock hook.
    """
    return _run(model, x, None, steps, warmup, False)


# --- PyTorch's twin, measured with torch.profiler ---------------------------------------------


def torch_category(op_name: str) -> str:
    """The category of a top-level PyTorch operator or autograd node, by its name.

    ``aten::conv2d`` / ``ConvolutionBackward0`` -> conv; ``*pool*`` (and ``MeanBackward1``,
    the backward of a 1x1 adaptive average pool) -> pool; ``*batch_norm*`` -> norm;
    ``aten::linear`` / ``AddmmBackward0`` / ``MmBackward0`` / ``TBackward0`` -> dense;
    ``nll``, ``log_softmax``, ``cross_entropy`` -> loss; ``relu``, ``tanh``, ``sigmoid``,
    ``softmax`` -> activation; ``dropout`` -> dropout; anything else (``add_``, ``cat``,
    ``flatten``, ``AccumulateGrad``...) -> other.
    """
    name = op_name.rsplit(": ", 1)[-1].lower()  # "autograd::engine::evaluate_function: X"
    base = name.removeprefix("aten::")
    if "conv" in base:
        return "conv"
    if "pool" in base or base in ("mean", "meanbackward1"):
        return "pool"
    if "batch_norm" in base or "batchnorm" in base:
        return "norm"
    if base in ("linear", "addmm", "matmul", "mm", "addmmbackward0", "mmbackward0", "tbackward0"):
        return "dense"
    if any(k in base for k in ("nll", "log_softmax", "logsoftmax", "cross_entropy")):
        return "loss"
    if any(k in base for k in ("relu", "tanh", "sigmoid", "threshold", "softmax")):
        return "activation"
    if "dropout" in base:
        return "dropout"
    return "other"


@dataclass
class TorchProfileResult:
    """The PyTorch twin's breakdown, in the same categories as :class:`ProfileResult`.

    ``by_type`` sums to 1; ``by_type_ms`` is ``{type: {"forward": ms, "backward": ms}}`` per
    step (loss backward under ``loss``, the optimizer step under ``update``, each range's time
    outside its operators under ``framework``); ``ops`` lists the operator names met in each
    category with their ms per step, so the mapping can be checked.
    """

    torch: str
    threads: int
    batch_size: int
    steps: int
    warmup: int
    training: bool
    step_ms: float
    conv_share: float
    forward_conv_share: float
    by_type: dict
    by_type_ms: dict
    ops: dict

    def to_dict(self) -> dict:
        return asdict(self)


def profile_torch(model, x, y=None, steps=5, warmup=2, training=True, threads=2,
                  optimizer="adam") -> TorchProfileResult:  # fmt: skip
    """Profile the PyTorch twin of ``model`` (float32, CPU) on ``x`` with ``torch.profiler``.

    Parameters
    ----------
    model : fastconv.nn.Model
        Its twin is built with :func:`fastconv.torch_bridge.to_torch` (weights copied).
    x : ndarray (N, ...)
        Cast to float32.
    y : ndarray of int, optional
        Labels; needed when ``training``.
    training : bool
        A full training step (cross-entropy, backward, optimizer step) or the forward pass in
        inference mode (``eval()``, ``no_grad``).
    threads : int
        ``torch.set_num_threads`` (the project's baseline is 2).
    optimizer : "adam" or "sgd"
        ``torch.optim.Adam(lr=1e-3)`` (as fastconv's default "adam") or plain SGD.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from .nn.backend import to_numpy
    from .torch_bridge import to_torch

    _check_args(model, x, steps, warmup)
    if training and y is None:
        raise ValueError("y (labels) is needed to profile a training step")
    torch.set_num_threads(threads)
    twin = to_torch(model)
    tx = torch.from_numpy(np.ascontiguousarray(to_numpy(x), dtype=np.float32))
    if training:
        ty = torch.from_numpy(np.asarray(to_numpy(y)).astype(np.int64))
        opt = (torch.optim.Adam(twin.parameters(), lr=1e-3) if optimizer == "adam"
               else torch.optim.SGD(twin.parameters(), lr=0.01))  # fmt: skip
        twin.train()

        def step():
            with record_function("fc::step"):
                opt.zero_grad(set_to_none=True)
                with record_function("fc::forward"):
                    out = twin(tx)
                with record_function("fc::loss"):
                    loss = torch.nn.functional.cross_entropy(out, ty)
                with record_function("fc::backward"):
                    loss.backward()
                with record_function("fc::update"):
                    opt.step()
    else:
        twin.eval()

        def step():
            with torch.no_grad(), record_function("fc::step"):
                with record_function("fc::forward"):
                    twin(tx)

    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()

    by_type_ms: dict = {}
    ops: dict = {}

    def add(kind, part, name, us):
        ms = us / 1e3 / steps
        slot = by_type_ms.setdefault(kind, {"forward": 0.0, "backward": 0.0})
        slot[part] += ms
        ops.setdefault(kind, {})
        ops[kind][name] = ops[kind].get(name, 0.0) + ms

    step_us = forward_ops_us = conv_forward_us = 0.0
    for root in (e for e in prof.events() if e.name == "fc::step"):
        step_us += root.cpu_time_total
        inside = 0.0
        for rng in root.cpu_children:
            inside += rng.cpu_time_total
            if not rng.name.startswith("fc::"):
                add("framework", "forward", rng.name, rng.cpu_time_total)  # zero_grad
                continue
            part = "backward" if rng.name in ("fc::backward", "fc::update") else "forward"
            children = 0.0
            for op in rng.cpu_children:
                children += op.cpu_time_total
                if rng.name == "fc::loss":
                    kind = "loss"
                elif rng.name == "fc::update":
                    kind = "update"
                else:
                    kind = torch_category(op.name)
                add(kind, part, op.name, op.cpu_time_total)
                if rng.name == "fc::forward":
                    forward_ops_us += op.cpu_time_total
                    conv_forward_us += op.cpu_time_total if kind == "conv" else 0.0
            add("framework", part, f"{rng.name} (outside operators)",
                rng.cpu_time_total - children)  # fmt: skip
        add("framework", "forward", "fc::step (outside ranges)", root.cpu_time_total - inside)
    by_type_ms = {k: by_type_ms[k] for k in _TYPE_ORDER if k in by_type_ms}
    step_ms = sum(v["forward"] + v["backward"] for v in by_type_ms.values())
    conv = by_type_ms.get("conv", {"forward": 0.0, "backward": 0.0})
    return TorchProfileResult(
        torch=torch.__version__,
        threads=threads,
        batch_size=int(tx.shape[0]),
        steps=steps,
        warmup=warmup,
        training=training,
        step_ms=step_ms,
        conv_share=(conv["forward"] + conv["backward"]) / step_ms,
        forward_conv_share=conv_forward_us / forward_ops_us if forward_ops_us else 0.0,
        by_type={k: (v["forward"] + v["backward"]) / step_ms for k, v in by_type_ms.items()},
        by_type_ms=by_type_ms,
        ops={k: dict(sorted(v.items(), key=lambda kv: -kv[1])) for k, v in ops.items()},
    )


# --- the book's chart: shares by layer type ------------------------------------------------------

#: the chart's categories (the book's fig. 8-14 groups); every other type is "other"
GROUPS = ("conv", "pool", "BN", "dense", "activation", "other")
_GROUP_OF = {"conv": "conv", "pool": "pool", "norm": "BN", "dense": "dense",
             "activation": "activation"}  # fmt: skip


def chart_groups(by_type_ms: dict, part: str) -> dict:
    """Shares of the six chart groups (``GROUPS``) in ``part``: "forward" (the layers' forward
    time only, as the book's figure) or "step" (everything, loss, update and framework time
    included, under "other"). Sums to 1."""
    if part not in ("forward", "step"):
        raise ValueError(f"part must be 'forward' or 'step', got {part!r}")
    ms = dict.fromkeys(GROUPS, 0.0)
    for kind, t in by_type_ms.items():
        if part == "forward":
            if kind in ("loss", "update", "framework"):
                continue
            value = t["forward"]
        else:
            value = t["forward"] + t["backward"]
        ms[_GROUP_OF.get(kind, "other")] += value
    total = sum(ms.values())
    return {k: (v / total if total else 0.0) for k, v in ms.items()}


def _bars(result) -> list:
    """(label, shares, ms) rows of one implementation's profile."""
    ms = result.by_type_ms
    if not result.training:
        return [("forward (inference)", chart_groups(ms, "step"), result.step_ms)]
    forward_ms = sum(
        v["forward"] for k, v in ms.items() if k not in ("loss", "update", "framework")
    )
    return [
        ("forward", chart_groups(ms, "forward"), forward_ms),
        ("training step", chart_groups(ms, "step"), result.step_ms),
    ]


def comparison_table(fc_result, torch_result=None) -> str:
    """Shares of the six groups, fastconv and (if given) PyTorch, per pass."""
    rows = [("fastconv " + label, g, ms) for label, g, ms in _bars(fc_result)]
    if torch_result is not None:
        rows += [("PyTorch " + label, g, ms) for label, g, ms in _bars(torch_result)]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'':<{width}}" + "".join(f"{g:>11}" for g in GROUPS) + f"{'ms':>10}"]
    for label, shares, ms in rows:
        lines.append(
            f"{label:<{width}}" + "".join(f"{shares[g]:>11.1%}" for g in GROUPS) + f"{ms:>10.1f}"
        )
    return "\n".join(lines)


_COLORS = {"conv": "#d62728", "pool": "#1f77b4", "BN": "#9467bd", "dense": "#ff7f0e",
           "activation": "#2ca02c", "other": "#7f7f7f"}  # fmt: skip


def plot_comparison(fc_result, torch_result, path, title="") -> None:
    """Horizontal stacked bars of the six groups' shares (the book's fig. 8-14), fastconv and
    PyTorch side by side (``torch_result`` may be None), one bar per pass, ms at the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"fastconv {fc_result.dtype}\n{label}", g, ms) for label, g, ms in _bars(fc_result)]
    if torch_result is not None:
        rows += [(f"PyTorch float32\n{label}", g, ms) for label, g, ms in _bars(torch_result)]
    rows = rows[::-1]  # first row on top
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(rows) + 1.3))
    for i, (_, shares, ms) in enumerate(rows):
        left = 0.0
        for g in GROUPS:
            w = shares[g]
            ax.barh(i, w, left=left, color=_COLORS[g], label=g if i == 0 else None)
            if w >= 0.06:
                ax.text(left + w / 2, i, f"{w:.0%}", ha="center", va="center", fontsize=8,
                        color="white")  # fmt: skip
            left += w
        ax.text(1.01, i, f"{ms:.0f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the time")
    ax.set_title(title, fontsize=9)
    ax.legend(ncol=len(GROUPS), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28 if
              len(rows) < 3 else -0.18), frameon=False)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --- command line ------------------------------------------------------------------------------

_MNIST_MODELS = ("deep-mnist", "resnet-mnist")


def _model_kwargs(args) -> dict:
    """Builder arguments of the ``--model`` (seed, dtype, backend, input size)."""
    kwargs = {"seed": args.seed, "dtype": args.dtype, "backend": args.backend}
    if args.input_size is not None:
        if args.model == "deep-mnist":
            raise SystemExit("fastconv profile: --input-size: the deep MNIST net takes 28x28 only")
        channels = 1 if args.model in ("lenet5", "resnet-mnist") else 3
        kwargs["input_shape"] = (channels, args.input_size, args.input_size)
    return kwargs


def _build_model(args, **overrides):
    from .models import get_model

    kwargs = {**_model_kwargs(args), **overrides}
    model = get_model(args.model, **kwargs)
    return model.compile(optimizer="adam", loss="softmax_cross_entropy")


def _inputs(args, input_shape, classes):
    if args.data == "mnist":
        if tuple(input_shape) != (1, 28, 28):
            raise SystemExit(
                f"fastconv profile: --data mnist needs a model for 1x28x28 inputs "
                f"({', '.join(_MNIST_MODELS)}); {args.model} takes {input_shape}"
            )
        from .datasets import MNISTError, load_mnist

        try:
            (x, y), _ = load_mnist(args.mnist_dir)
        except (MNISTError, OSError, ValueError) as exc:  # missing, unreadable or corrupt
            raise SystemExit(f"fastconv profile: --data mnist: {exc}") from None
        if args.batch_size > x.shape[0]:
            raise SystemExit(f"fastconv profile: --batch-size must be <= {x.shape[0]} for MNIST")
        return x[: args.batch_size], y[: args.batch_size]
    rng = np.random.default_rng(args.seed)
    x = rng.random((args.batch_size, *input_shape), dtype=np.float32)
    y = rng.integers(0, classes, args.batch_size)
    return x, y


def _torch_worker(conn, spec):
    """Profile the twin in a process of its own: Numba's OpenMP workers spin after a parallel
    region and would take the cores PyTorch's threads need (docs/profiling.md)."""
    try:
        from .models import get_model

        model = get_model(spec["model"], **spec["kwargs"])  # same seed: the same weights
        result = profile_torch(model, spec["x"], spec["y"], spec["steps"], spec["warmup"],
                               spec["training"], spec["threads"])  # fmt: skip
        conn.send(("ok", result.to_dict()))
    except Exception as exc:  # reported by the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _profile_torch_in_subprocess(args, x, y):
    import multiprocessing

    kwargs = {**_model_kwargs(args), "dtype": "float32", "backend": "cpu"}
    spec = {"model": args.model, "kwargs": kwargs, "x": x, "y": y, "steps": args.steps,
            "warmup": args.warmup, "training": not args.forward_only,
            "threads": args.torch_threads}  # fmt: skip
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_torch_worker, args=(child, spec), daemon=True)
    proc.start()
    child.close()
    try:
        status, value = parent.recv()
    except EOFError:  # killed (e.g. out of memory) before it could report
        proc.join()
        status, value = "error", f"the PyTorch process ended with code {proc.exitcode}"
    proc.join()
    if status != "ok":
        raise RuntimeError(value)
    return TorchProfileResult(**value)


def _check_memory(args, model) -> None:
    """Refuse a batch whose activations cannot fit in memory before allocating it (a large
    --input-size was a MemoryError in the middle of the first step, or the OOM killer)."""
    from ._checks import check_allocation

    itemsize = np.dtype(args.dtype).itemsize
    per_sample = sum(math.prod(shape) for shape in model._shapes.values())
    size = "x".join(map(str, model.input_shape))
    try:  # every layer's output is kept for the backward pass of a training step
        check_allocation(
            per_sample * args.batch_size * itemsize,
            f"a batch of {args.batch_size} {size} inputs through --model {args.model} (every "
            "layer's output, kept for the backward pass)",
        )
    except ValueError as exc:
        raise SystemExit(
            f"fastconv profile: {exc}; use a smaller --input-size or --batch-size"
        ) from None


def _defaults(args, model_name):
    big = model_name not in ("deep-mnist", "resnet-mnist", "lenet5")
    if args.batch_size is None:
        args.batch_size = 8 if big else 100
    if args.steps is None:
        args.steps = 5 if big else 20
    if args.warmup is None:
        args.warmup = 2 if big else 3


def _command(args) -> int:
    import importlib.util

    _defaults(args, args.model)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        raise SystemExit("fastconv profile: --batch-size and --steps must be >= 1, --warmup >= 0")
    if args.input_size is not None and args.input_size < 1:
        raise SystemExit("fastconv profile: --input-size must be >= 1")
    if args.data == "mnist" and (
        args.model not in _MNIST_MODELS or args.input_size not in (None, 28)
    ):
        raise SystemExit(  # before building a model that cannot take the data
            f"fastconv profile: --data mnist needs a model for 1x28x28 inputs "
            f"({', '.join(_MNIST_MODELS)}), got --model {args.model}"
        )
    if args.plot:  # before the run, not after it
        try:
            check_writable_file(args.plot, "--plot")
        except ValueError as exc:
            raise SystemExit(f"fastconv profile: {exc}") from None
    try:
        model = _build_model(args)
    except RuntimeError as exc:  # e.g. --backend gpu without CuPy or a CUDA device
        raise SystemExit(f"fastconv profile: {exc}") from exc
    except ValueError as exc:  # an input size the architecture cannot take, or cannot hold
        raise SystemExit(f"fastconv profile: {exc}") from exc
    _check_memory(args, model)
    x, y = _inputs(args, model.input_shape, model.output_shape[0])
    if args.forward_only:
        result = profile_forward(model, x, args.steps, args.warmup)
    else:
        result = profile_model(model, x, y, args.steps, args.warmup)
    source = "real MNIST images" if args.data == "mnist" else "random inputs (timing only)"
    result.notes.append(f"model: {args.model}, input {'x'.join(map(str, model.input_shape))}")
    result.notes.append(f"data: {source}")
    del model
    torch_result = None
    if args.no_torch:
        result.notes.append("PyTorch comparison skipped (--no-torch)")
    elif importlib.util.find_spec("torch") is None:
        result.notes.append("PyTorch is not installed: no comparison")
    else:
        try:
            torch_result = _profile_torch_in_subprocess(args, x, y)
        except RuntimeError as exc:
            result.notes.append(f"PyTorch comparison failed: {exc}")
    if args.plot:
        mode = "training step" if result.training else "inference"
        title = (f"{args.model}, batch {result.batch_size}, {mode}: conv "
                 f"{result.forward_conv_share:.0%} of fastconv's forward pass"
                 + (f", {torch_result.forward_conv_share:.0%} of PyTorch's"
                    if torch_result is not None else ""))  # fmt: skip
        plot_comparison(result, torch_result, args.plot, title)
        result.notes.append(f"plot written to {args.plot}")
    if args.json:
        out = result.to_dict()
        out["model"] = args.model
        out["torch"] = torch_result.to_dict() if torch_result is not None else None
        out["groups"] = {"fastconv": {label: g for label, g, _ in _bars(result)}}
        if torch_result is not None:
            out["groups"]["torch"] = {label: g for label, g, _ in _bars(torch_result)}
        print(json.dumps(out))
        return 0
    text = result.table()
    text += "\n\nby group, fastconv" + (" vs PyTorch" if torch_result is not None else "") + ":\n"
    text += comparison_table(result, torch_result)
    if torch_result is not None:
        text += (f"\nPyTorch {torch_result.torch} ({torch_result.threads} threads, "
                 f"torch.profiler): convolution {torch_result.conv_share:.1%} of the "
                 f"{'step' if torch_result.training else 'pass'}, "
                 f"{torch_result.forward_conv_share:.1%} of the forward pass")  # fmt: skip
    print(text)
    return 0


def add_subcommand(subparsers):
    """Add ``fastconv profile`` to an argparse ``subparsers`` object."""
    from .cli import _seed
    from .models import MODELS

    p = subparsers.add_parser(
        "profile",
        help="time a training step layer by layer; share of time in convolution",
        description="Profile a zoo model's training step (or forward pass) layer by layer, "
        "and the same model in PyTorch (when installed) with torch.profiler.",
    )
    p.add_argument("--model", choices=list(MODELS), default="deep-mnist")
    p.add_argument("--backend", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="default 100 for the MNIST models and LeNet-5, 8 for the others",
    )
    p.add_argument(
        "--input-size",
        type=int,
        default=None,
        metavar="S",
        help="SxS inputs instead of the model's default size",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps (default 20; 5 for the ImageNet models)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps first (default 3; 2 for the ImageNet models)",
    )
    p.add_argument("--forward-only", action="store_true", help="profile inference only")
    p.add_argument("--data", choices=["random", "mnist"], default="random")
    p.add_argument(
        "--mnist-dir",
        help="directory of the MNIST IDX .gz files (default: found or downloaded as load_mnist "
        "does, docs/training.md)",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed (>= 0) of weights and inputs")
    p.add_argument(
        "--no-torch",
        action="store_true",
        help="skip the PyTorch comparison (run when torch is installed)",
    )
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--plot",
        metavar="FILE",
        help="write the chart of shares by layer type (PNG), fastconv vs PyTorch",
    )
    p.set_defaults(func=_command)
    return p
