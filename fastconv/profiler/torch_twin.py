"""The PyTorch twin's breakdown, measured with ``torch.profiler``: :func:`profile_torch`, its
categories (:func:`torch_category`) and :class:`TorchProfileResult`, and the process of its own
that ``fastconv profile`` runs it in. torch is imported only when a twin is profiled."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .timing import _CONV_KINDS, _TYPE_ORDER, _check_args, _conv_ms

__all__ = ["torch_category", "TorchProfileResult", "profile_torch", "profile_torch_in_subprocess"]


def torch_category(op_name: str, input_shapes=None) -> str:
    """The category of a top-level PyTorch operator or autograd node, by its name (and for a
    convolution, by its input shapes where given: ``torch.profiler`` with ``record_shapes``).

    ``aten::conv2d`` / ``ConvolutionBackward0`` -> conv, or depthwise where the shapes show
    one group per input channel (a weight of one input channel on an input of more);
    ``*pool*`` (and ``MeanBackward1``, the backward of a 1x1 adaptive average pool) -> pool;
    ``*batch_norm*`` -> norm; ``aten::linear`` / ``AddmmBackward0`` / ``MmBackward0`` /
    ``TBackward0`` -> dense;
    ``nll``, ``log_softmax``, ``cross_entropy`` -> loss; ``relu``, ``tanh``, ``sigmoid``,
    ``softmax`` -> activation; ``dropout`` -> dropout; anything else (``add_``, ``cat``,
    ``flatten``, ``AccumulateGrad``...) -> other.
    """
    name = op_name.rsplit(": ", 1)[-1].lower()  # "autograd::engine::evaluate_function: X"
    base = name.removeprefix("aten::")
    if "conv" in base:
        return "depthwise" if _depthwise_shapes(input_shapes) else "conv"
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


def _depthwise_shapes(input_shapes) -> bool:
    """Do a convolution's input shapes ``[x, w, ...]`` show ``groups == in_channels > 1``
    (``w`` of shape ``(F, C // groups, kh, kw)`` with one input channel, ``x`` of more)?"""
    if not input_shapes or len(input_shapes) < 2:
        return False
    x, w = input_shapes[0], input_shapes[1]
    return len(x) == 4 and len(w) == 4 and w[1] == 1 and x[1] > 1


def _descendants(event):
    yield event
    for child in event.cpu_children:
        yield from _descendants(child)


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

    from ..nn.backend import to_numpy
    from ..torch_bridge import to_torch

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
    # Shapes: a depthwise convolution is an aten::conv2d like any other but for its weight.
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
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

    roots = [e for e in prof.events() if e.name == "fc::step"]
    # The autograd node of a forward operator carries its sequence number: that is how the
    # backward of a depthwise convolution (a ConvolutionBackward0 like any other) is known.
    depthwise_seq = {
        e.sequence_nr
        for root in roots
        for rng in root.cpu_children
        if rng.name == "fc::forward"
        for op in rng.cpu_children
        if torch_category(op.name, op.input_shapes) == "depthwise"
        for e in _descendants(op)
        if e.sequence_nr >= 0
    }
    step_us = forward_ops_us = conv_forward_us = 0.0
    for root in roots:
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
                    kind = torch_category(op.name, op.input_shapes)
                    if kind == "conv" and part == "backward" and op.sequence_nr in depthwise_seq:
                        kind = "depthwise"
                add(kind, part, op.name, op.cpu_time_total)
                if rng.name == "fc::forward":
                    forward_ops_us += op.cpu_time_total
                    conv_forward_us += op.cpu_time_total if kind in _CONV_KINDS else 0.0
            add("framework", part, f"{rng.name} (outside operators)",
                rng.cpu_time_total - children)  # fmt: skip
        add("framework", "forward", "fc::step (outside ranges)", root.cpu_time_total - inside)
    by_type_ms = {k: by_type_ms[k] for k in _TYPE_ORDER if k in by_type_ms}
    step_ms = sum(v["forward"] + v["backward"] for v in by_type_ms.values())
    conv = _conv_ms(by_type_ms)
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


def _torch_worker(conn, spec):
    """Profile the twin in a process of its own: Numba's OpenMP workers spin after a parallel
    region and would take the cores PyTorch's threads need (docs/profiling.md)."""
    try:
        from ..models import get_model

        model = get_model(spec["model"], **spec["kwargs"])  # same seed: the same weights
        result = profile_torch(model, spec["x"], spec["y"], spec["steps"], spec["warmup"],
                               spec["training"], spec["threads"])  # fmt: skip
        conn.send(("ok", result.to_dict()))
    except Exception as exc:  # reported by the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def profile_torch_in_subprocess(spec: dict) -> TorchProfileResult:
    """:func:`profile_torch` of the zoo model ``get_model(spec["model"], **spec["kwargs"])`` in
    a spawned process; ``spec`` also holds ``x``, ``y``, ``steps``, ``warmup``, ``training`` and
    ``threads``. A failure there is a RuntimeError here, with its message."""
    import multiprocessing

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
