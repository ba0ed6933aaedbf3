"""Layer-by-layer timing of a model's training step or forward pass: the clocks, the hooks
that mark them, :func:`profile_model`, :func:`profile_forward` and :class:`ProfileResult`
(the method is described in :mod:`fastconv.profiler`)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

from ..device import GPU, device_of

__all__ = ["ProfileResult", "profile_model", "profile_forward"]

_package = sys.modules[__package__]  # fastconv.profiler, which holds the clock

# Layer kinds reported under their own name; anything else ("reshape", "merge") goes to "other".
# "depthwise" convolutions (one group per input channel) are apart from the others: MobileNets
# spend a share of their time there out of proportion to their arithmetic.
_KINDS = ("conv", "depthwise", "pool", "norm", "dense", "activation", "dropout")
#: the kinds that are convolutions (``conv_share`` sums them)
_CONV_KINDS = ("conv", "depthwise")
_TYPE_ORDER = (*_KINDS, "other", "loss", "update", "framework")


def _conv_ms(by_type_ms) -> dict:
    """``{"forward": ms, "backward": ms}`` of every convolution kind together."""
    parts = [by_type_ms[k] for k in _CONV_KINDS if k in by_type_ms]
    return {part: sum(t[part] for t in parts) for part in ("forward", "backward")}


def _type_of(layer) -> str:
    kind = getattr(layer, "kind", "other")
    return kind if kind in _KINDS else "other"


# --- clocks ------------------------------------------------------------------------------------


def _now():
    """The CPU clock, ``fastconv.profiler._now``, looked up at every call: the one place the
    profiler reads the time, so that a test substituting it there times everything here."""
    return _package._now()


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
        Convolution time (``conv`` and ``depthwise``) over the whole step, and convolution
        forward time over the layers' forward time.
    by_type : dict
        ``{type: share of the step}``, summing to 1. Types are layer kinds (``conv``,
        ``depthwise`` (DepthwiseConv2D, and Conv2D with one group per input channel), ``pool``,
        ``norm``, ``dense``, ``activation``, ``dropout``; other kinds as ``other``), ``loss``,
        ``update`` and ``framework`` (the time between hooked events).
    by_type_ms : dict
        ``{type: {"forward": ms, "backward": ms}}``; the optimizer update counts as backward.
    layers : list of dict
        ``{"name", "type", "forward_ms", "backward_ms"}`` in layer order; CPU convolution layers
        also ``"algorithm"``: ``{pass: name}`` for the passes ``forward``, ``backward`` (dx and dW)
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
        from .charts import plot_by_type

        plot_by_type(self, path)


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
        from .. import ops

        return {
            (c.pass_, c.dtype, c.x_shape, c.w_shape, c.stride, c.pad, c.algorithm): (
                c.calls,
                c.fallbacks,
            )
            for c in ops.conv_algorithm_choices()
        }

    def begin(self, event, layer):
        if layer is not None and _type_of(layer) in _CONV_KINDS:
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
                if _type_of(layer) in _CONV_KINDS and not gpu
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
    conv = _conv_ms(by_type_ms)
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
