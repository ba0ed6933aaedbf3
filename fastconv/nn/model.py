"""``Model`` (a graph of layers from the functional API) and ``Sequential`` (a chain).

Structure and execution live here: building, the forward and backward passes over the graph,
weights, summary and device moves. Training loops are in :mod:`fastconv.nn.trainer` (a mixin),
checkpoints in :mod:`fastconv.nn.saving`.

Execution: the graph's nodes run in topological order. A value is dropped as soon as its last
consumer has run; in training each layer returns a cache for its backward pass (nothing is kept
on the layers), and gradients of a value used by several layers are summed. The backward pass
skips whatever no gradient is needed for (the input's gradient in training, a frozen base below
the layers being trained).

Fusion (on unless ``model.fuse = False``): a ReLU layer whose input comes only from a Conv2D,
Dense or BatchNorm runs inside that layer's epilogue (one pass less, the same numbers); at
inference a BatchNorm2D right after a Conv2D without activation is folded into the convolution's
weights and bias (equal up to float32 rounding).
"""

from __future__ import annotations

import contextvars
import copy
from typing import NamedTuple

import numpy as np

from .. import _checks as chk
from .backend import Backend, to_numpy
from .graph import Input, SymbolicTensor, connect, trace
from .layers.base import LAYER_CLASSES, Layer, check_gradient, snake_case
from .saving import CheckpointError, save_model
from .trainer import Trainer

__all__ = ["Model", "Sequential", "Hook"]

# False while a checkpoint loader builds a model: weights are declared, not created (the loader
# checks the stored shapes, then fills them), so no memory goes to weights the file lacks.
ALLOCATE_WEIGHTS = contextvars.ContextVar("fastconv_allocate_weights", default=True)


class Hook:
    """Observer of a model's execution (the profiler's clock). Both methods get ``event`` (
    "forward", "backward", "loss_forward", "loss_backward", "update") and the layer (None for
    the loss and the update). Register with ``model.hooks.append(hook)``."""

    def begin(self, event: str, layer) -> None:
        pass

    def end(self, event: str, layer) -> None:
        pass


class Step(NamedTuple):
    """One unit of execution: a layer applied to tensors, possibly with fused followers."""

    layer: Layer
    inputs: tuple  # tensor ids
    output: int  # tensor id of what the step produces (the last fused node's output)
    fuse_relu: bool  # the following ReLU layer runs in this layer's epilogue
    folded_bn: Layer | None  # inference: BatchNorm2D folded into this Conv2D
    layers: tuple  # every layer this step covers, the step's own first
    prepared: bool = False  # inference through the layer's prepared weights (call_prepared)
    residual: bool = False  # prepared: inputs[1] is added in the epilogue (an absorbed Add)
    relu6: bool = False  # inference: the fused layer is a ReLU6 (with fuse_relu)


def _single(value, what):
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"{what}: only single-input, single-output models are supported")
        value = value[0]
    return value


class Model(Trainer):
    """A graph of layers between one input and one output (Keras's functional API).

    ::

        inp = nn.Input(shape=(1, 28, 28))
        x = nn.ReLU()(nn.BatchNorm2D()(nn.Conv2D(16, 3, padding=1, use_bias=False)(inp)))
        y = nn.Dense(10)(nn.GlobalAveragePooling2D()(x))
        model = nn.Model(inp, y, seed=0)

    Parameters
    ----------
    inputs, outputs : SymbolicTensor
        From :func:`fastconv.nn.Input` and the layers called on it. The layers are built (their
        weights created) here, in graph order, from the model's seeded generator.
    seed : int, optional
        Seeds initialisation, shuffling and dropout (one :class:`numpy.random.Generator`).
    backend : "cpu" or "gpu"
    dtype : "float32" or "float16"
    name : str
    """

    def __init__(
        self, inputs=None, outputs=None, *, seed=None, backend="cpu", dtype="float32", name=None
    ):
        self.name = name or snake_case(type(self).__name__)
        self.seed = chk.as_seed(seed)
        self.rng = np.random.default_rng(self.seed)
        self.backend = Backend(backend, dtype)
        #: kernel outputs reused across inference calls (page faults otherwise:
        #: fastconv/cpu/_outputs.py); training keeps plain allocations
        self._inference_outputs = self.backend.device.output_pool()
        self.loss = None
        self.optimizer = None
        self.metrics: list = []
        self.stop_training = False
        self.hooks: list = []
        self.fuse = True
        #: inference (predict, evaluate, forward) through weights prepared once per weights
        #: version (docs/architecture.md); False runs the unprepared path of every call
        self.prepared = True
        #: the layers' weights versions at the last inference call (see _run_forward)
        self._inference_weights = None
        self._program = None  # (plan, its inference program), see _inference_program
        self.built = False
        self.layers: list[Layer] = []
        self.input_shape = None
        self.output_shape = None
        self._tape = None
        self._grads = None
        if inputs is not None or outputs is not None:
            self._set_graph(_single(inputs, "inputs"), _single(outputs, "outputs"))

    # -- structure ------------------------------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        return self.backend.dtype

    def _set_graph(self, inp: SymbolicTensor, out: SymbolicTensor) -> None:
        nodes = trace(inp, out)
        layers: list[Layer] = []
        for node in nodes:
            if not any(node.layer is seen for seen in layers):
                layers.append(node.layer)
        _name_layers(layers)
        for node in nodes:
            layer = node.layer
            layer.rng = self.rng
            if not layer.built:
                shapes = [t.shape for t in node.inputs]
                allocate = ALLOCATE_WEIGHTS.get()
                layer.build(shapes if layer.multi_input else shapes[0], allocate=allocate)
                if allocate:
                    self._convert_weights(layer)
        self.layers = layers
        self._input, self._output, self._nodes = inp, out, nodes
        self._shapes = {inp.id: inp.shape, **{n.output.id: n.output.shape for n in nodes}}
        self._plans: dict = {}
        self._program = None  # (plan, its inference program), see _inference_program
        self.input_shape, self.output_shape = inp.shape, out.shape
        self.built = True

    def _convert_weights(self, layer: Layer) -> None:
        for name in layer.weight_names():
            dtype = layer.weight_dtype(name, self.dtype)
            layer.set_weight(name, self.backend.asarray(layer.get_weight(name), dtype))

    def _ensure_built(self, x) -> None:
        if not self.built:
            raise RuntimeError("the model has no graph; create it with Model(inputs, outputs)")

    # -- execution plan ----------------------------------------------------------------------------
    def execution_plan(self, training: bool, prepared: bool | None = None) -> list[Step]:
        """The steps a forward pass runs (fused layers grouped), in order. ``prepared``
        (inference only; None: :attr:`prepared`) plans the prepared path."""
        prepared = bool(self.prepared if prepared is None else prepared) and not training
        key = (bool(training), bool(self.fuse), prepared)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._make_plan(training, prepared)
        return plan

    def _make_plan(self, training, prepared):
        consumers: dict[int, list] = {}
        for node in self._nodes:
            for t in node.inputs:
                consumers.setdefault(t.id, []).append(node)

        def only_consumer(node, accepts):
            users = consumers.get(node.output.id, [])
            if node.output is self._output or len(users) != 1 or not accepts(users[0].layer):
                return None
            return users[0]

        def is_relu(layer):
            return layer.epilogue == "relu"

        def is_relu6(layer):
            return layer.epilogue == "relu6"

        def is_sum(layer):
            return layer.adds_inputs

        steps, absorbed = [], set()
        deferred: dict[int, Step] = {}  # id(Add node) -> the step that absorbed it
        for node in self._nodes:
            if id(node) in deferred:
                steps.append(deferred.pop(id(node)))
                continue
            if id(node) in absorbed:
                continue
            layer, last, fuse_relu, folded, relu6 = node.layer, node, False, None, False
            covered = [layer]
            if self.fuse:

                def foldable(following, head=layer):
                    return head.can_fold(following, training)

                bn = only_consumer(node, foldable)
                if bn is not None:
                    folded, last = bn.layer, bn
                    absorbed.add(id(bn))
                    covered.append(bn.layer)
                if folded is not None or layer.fuses_relu:
                    relu = only_consumer(last, is_relu)
                    # ReLU6 only where its epilogue runs: the prepared or folded inference
                    # paths (training keeps the layer: its backward needs the input).
                    if (
                        relu is None
                        and layer.fuses_relu6
                        and (folded is not None or (prepared and layer.prepares))
                    ):
                        relu = only_consumer(last, is_relu6)
                        relu6 = relu is not None
                    if relu is not None:
                        fuse_relu, last = True, relu
                        absorbed.add(id(relu))
                        covered.append(relu.layer)
                add = None
                if (
                    prepared
                    and layer.prepares
                    and not fuse_relu
                    and (folded is not None or layer.fuses_relu)
                ):
                    add = only_consumer(last, is_sum)
                    # Two distinct inputs, and not already absorbed by the other branch
                    # (a projection shortcut is a conv-BN feeding the same Add).
                    if add is not None and (
                        len(add.inputs) != 2
                        or add.inputs[0] is add.inputs[1]
                        or id(add) in absorbed
                    ):
                        add = None
                if add is not None:
                    # relu(bn(conv(x)) + shortcut) in the convolution's epilogue. The step
                    # runs where the Add ran, so the shortcut exists by then whatever the
                    # order of the branches.
                    shortcut = next(t for t in add.inputs if t is not last.output)
                    absorbed.add(id(add))
                    covered.append(add.layer)
                    last = add
                    relu = only_consumer(add, is_relu)
                    if relu is not None:
                        fuse_relu, last = True, relu
                        absorbed.add(id(relu))
                        covered.append(relu.layer)
                    deferred[id(add)] = Step(
                        layer,
                        (*(t.id for t in node.inputs), shortcut.id),
                        last.output.id,
                        fuse_relu,
                        folded,
                        tuple(covered),
                        True,
                        True,
                    )
                    continue
            steps.append(
                Step(
                    layer,
                    tuple(t.id for t in node.inputs),
                    last.output.id,
                    fuse_relu,
                    folded,
                    tuple(covered),
                    prepared and layer.prepares,
                    relu6=relu6,
                )
            )
        return steps

    # -- passes ---------------------------------------------------------------------------------
    def _run_forward(self, x, training: bool, prepared: bool | None = None):
        """Forward pass; returns ``(output, caches)`` (caches only in training). ``prepared``
        as for :meth:`execution_plan`."""
        if training:
            # The inference outputs kept for reuse (up to 512 MiB) would sit beside the
            # training step's activations: VGG-16's peak at batch 8 was 3.18 GB after one
            # predict, 2.76 GB with them dropped (2026-12-07). Those still referenced stay alive.
            self._inference_outputs.clear()
            return self._forward_steps(self.execution_plan(True), x)
        if prepared is None and self.prepared:
            seen = tuple(layer.weights_version for layer in self.layers)
            if seen != self._inference_weights:
                # The first inference call since the weights changed (a model just built or
                # loaded, a predict between training steps) runs unprepared: preparing costs
                # about one unprepared pass more (measured, batch 8: AlexNet 153 against 80 ms,
                # VGG-16 0.85-2.6 s against 0.7 s, the Dense panels packed and the weights
                # copied) and pays only from the next call with the same weights.
                self._inference_weights = seen
                prepared = False
        program = self._inference_program(self.execution_plan(False, prepared))
        with self._inference_outputs:
            return self._run_program(program, x), []

    def _inference_program(self, plan):
        """``plan`` as ``(call, single, inputs, output, frees, layer)`` per step, made once
        per plan: the step's call bound to its layer and fusions, its one input's id (None
        when it takes the list of its inputs), and the tensors whose last use it is. Worked
        out on every pass, as the training loop does, these cost ~2 us a step: at batch 1
        the deep-MNIST net's 14 steps spent 35 of its 290 us there (2026-12-07)."""
        cached = self._program
        if cached is not None and cached[0] is plan:
            return cached[1]
        last_use = {t: i for i, step in enumerate(plan) for t in step.inputs}
        program = tuple(
            (
                self._inference_call(step),
                step.inputs[0] if len(step.inputs) == 1 and not self._takes_list(step) else None,
                step.inputs,
                step.output,
                tuple(t for t in dict.fromkeys(step.inputs) if last_use[t] == i),
                step.layer,
            )
            for i, step in enumerate(plan)
        )
        self._program = (plan, program)
        return program

    @staticmethod
    def _takes_list(step):
        return step.layer.multi_input or step.residual

    @staticmethod
    def _inference_call(step):
        """``step``'s inference call: on its one input, or on the list of its inputs
        (:meth:`_takes_list`)."""
        layer, folded, fuse_relu = step.layer, step.folded_bn, step.fuse_relu
        if step.relu6:
            if step.prepared:
                return lambda x: layer.call_prepared(x, folded, True, None, relu6=True)
            return lambda x: layer.call_folded(x, folded, True, relu6=True)
        if step.prepared:
            if step.residual:
                return lambda xs: layer.call_prepared(xs[0], folded, fuse_relu, xs[1])
            return lambda x: layer.call_prepared(x, folded, fuse_relu, None)
        if folded is not None:
            return lambda x: layer.call_folded(x, folded, fuse_relu)
        if fuse_relu:
            return lambda x: layer.call(x, training=False, fuse_relu=True)[0]
        return lambda x: layer.call(x, training=False)[0]

    def _run_program(self, program, x):
        values = {self._input.id: x}
        hooks = self.hooks  # (the profiler's: each step between its hook calls)
        for call, single, inputs, output, frees, layer in program:
            for h in hooks:
                h.begin("forward", layer)
            if single is not None:
                y = call(values[single])
            else:
                y = call([values[t] for t in inputs])
            for h in hooks:
                h.end("forward", layer)
            for t in frees:
                del values[t]
            values[output] = y
        return values[self._output.id]

    def _forward_steps(self, plan, x):
        """The training forward pass over ``plan``: ``(output, caches)``. (Inference runs
        :meth:`_inference_program`; the fusions only it has, BatchNorm folding, prepared
        weights, ReLU6 and residual epilogues, are not in a training plan.)"""
        remaining: dict[int, int] = {}
        for step in plan:
            for t in step.inputs:
                remaining[t] = remaining.get(t, 0) + 1
        values = {self._input.id: x}
        caches = []
        hooks = self.hooks
        for step in plan:
            xs = [values[t] for t in step.inputs]
            for t in step.inputs:
                remaining[t] -= 1
                if remaining[t] == 0:
                    del values[t]
            arg = xs if step.layer.multi_input else xs[0]
            for h in hooks:
                h.begin("forward", step.layer)
            if step.fuse_relu:
                y, cache = step.layer.call(arg, training=True, fuse_relu=True)
            else:
                y, cache = step.layer.call(arg, training=True)
            for h in hooks:
                h.end("forward", step.layer)
            values[step.output] = y
            caches.append(cache)
        return values[self._output.id], caches

    def _run_backward(self, caches, dy, need_dx: bool, previous=None):
        """Backward pass over ``caches`` of a training forward; returns ``(dx, grads)`` with
        ``grads`` keyed by ``(layer name, weight name)`` for every trainable weight.

        ``previous``: the last pass's ``grads``, emptied here layer by layer: held to the
        end, they were a model's size at the peak (VGG-16: 528 MB). An entry of at least
        ``_MAPPED_BYTES`` goes just before its layer's backward runs (the new one then fits
        in its place), a smaller one just after: small ones live in malloc's heap, and
        dropped before the pass or before each layer's backward, their memory went to other
        arrays and glibc trimmed and refaulted its heap on every step (deep-MNIST: 5000-6000
        more page faults a step, ~10% slower; dropped after, ~1)."""
        plan = self.execution_plan(True)
        needed = {self._input.id: bool(need_dx)}  # does any wanted gradient flow through?
        for step in plan:
            own = step.layer.trainable and bool(step.layer.params)
            needed[step.output] = own or any(needed[t] for t in step.inputs)
        pending = {self._output.id: dy}
        grads: dict = {}
        n = dy.shape[0]
        hooks = self.hooks
        for i in range(len(plan) - 1, -1, -1):
            step = plan[i]
            cache, caches[i] = caches[i], None
            g = pending.pop(step.output, None)
            if g is None or not needed[step.output]:
                continue
            check_gradient(g, (n, *self._shapes[step.output]), f"gradient of {step.layer.name!r}")
            need_in = [needed[t] for t in step.inputs]
            if previous:
                _drop_previous(previous, step.layers, large=True)
            for h in hooks:
                h.begin("backward", step.layer)
            dx, layer_grads = step.layer.call_backward(cache, g, need_dx=any(need_in))
            for h in hooks:
                h.end("backward", step.layer)
            if previous:
                _drop_previous(previous, step.layers, large=False)
            for name, value in layer_grads.items():
                key = (step.layer.name, name)
                grads[key] = value if key not in grads else grads[key] + value
            if not any(need_in):
                continue
            dxs = dx if step.layer.multi_input else [dx]
            for t, d, wanted in zip(step.inputs, dxs, need_in, strict=True):
                if wanted:
                    # Out of place: layers may hand the same array to several inputs.
                    pending[t] = d if t not in pending else pending[t] + d
        return pending.get(self._input.id), grads

    def forward(self, x, training: bool = False, prepared: bool = False):
        """Run the model on a batch already on its backend and dtype. With ``training`` the
        caches are kept for :meth:`backward` (eager use; ``fit`` keeps its own).

        Inference here reads the layers' arrays on every call (``prepared=False``), so eager
        code that writes into them in place (finite differences, hand-made updates) sees its
        writes; ``predict`` and ``evaluate`` use the prepared weights."""
        self._ensure_built(x)
        chk.check_array(x, "x")
        self._check_input_shape(x, "x")
        y, caches = self._run_forward(x, training, prepared=bool(prepared))
        self._tape = (caches, tuple(y.shape)) if training else None
        return y

    def backward(self, dy, need_dx: bool = True):
        """Backpropagate ``dy`` through the last ``forward(x, training=True)``: stores the
        weight gradients (see :meth:`gradients`) and returns the input gradient, or None with
        ``need_dx=False`` (the first layers then skip computing it)."""
        if self._tape is None:
            raise RuntimeError("backward() needs a preceding forward(x, training=True)")
        (caches, y_shape), self._tape = self._tape, None
        check_gradient(dy, y_shape, "dy")
        previous, self._grads = self._grads, None  # not alive next to the new ones
        dx, self._grads = self._run_backward(caches, dy, need_dx, previous)
        return dx

    def _check_input_shape(self, x, name):
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ValueError(
                f"{name} must have per-sample shape {tuple(self.input_shape)}, got "
                f"{tuple(x.shape[1:])}"
            )

    # -- weights --------------------------------------------------------------------------------
    def trainable_weight_keys(self) -> list[tuple]:
        """``(layer name, weight name)`` of every trainable weight, in graph order."""
        return [
            (layer.name, name) for layer in self.layers if layer.trainable for name in layer.params
        ]

    def parameters(self) -> list:
        """The trainable weight arrays themselves (not copies), in graph order."""
        by_name = {layer.name: layer for layer in self.layers}
        return [by_name[lname].params[w] for lname, w in self.trainable_weight_keys()]

    def gradients(self) -> list:
        """Gradients from the last backward pass, in the order of :meth:`parameters`."""
        if self._grads is None:
            raise RuntimeError("no gradients yet; run backward() or train_on_batch()")
        out = []
        for key in self.trainable_weight_keys():
            if key not in self._grads:
                raise RuntimeError(f"layer {key[0]!r} has no gradient for {key[1]!r}; run backward")
            out.append(self._grads[key])
        return out

    def get_layer(self, name: str):
        """The layer called ``name`` (Keras's ``Model.get_layer``); a ValueError naming the
        model's layers if there is none."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        names = ", ".join(repr(layer.name) for layer in self.layers)
        raise ValueError(f"no layer named {name!r} in model {self.name!r}; its layers: {names}")

    def weight_entries(self) -> list[tuple]:
        """``(layer, weight name)`` of every weight (parameters and state), in the order of
        :meth:`get_weights`: graph order, Keras order inside a layer."""
        return [(layer, name) for layer in self.layers for name in layer.weight_names()]

    def get_weights(self) -> list:
        """Copies of every weight as NumPy arrays (see :meth:`weight_entries` for the order)."""
        self._require_built()
        return [to_numpy(layer.get_weight(name)).copy() for layer, name in self.weight_entries()]

    def set_weights(self, weights) -> None:
        """Overwrite every weight (same order and shapes as :meth:`get_weights`)."""
        self._require_built()
        entries = self.weight_entries()
        weights = list(weights)
        if len(weights) != len(entries):
            raise ValueError(f"weights must be a list of {len(entries)} arrays, got {len(weights)}")
        for i, ((layer, name), w) in enumerate(zip(entries, weights, strict=True)):
            if not chk.is_array(w):
                raise TypeError(f"weights[{i}] must be an array, got {type(w).__name__}")
            if w.dtype.kind != "f":
                raise TypeError(f"weights[{i}] must have a floating dtype, got {w.dtype}")
            current = layer.get_weight(name)
            if tuple(w.shape) != tuple(current.shape):
                raise ValueError(
                    f"weights[{i}] ({layer.name}/{name}) must have shape "
                    f"{tuple(current.shape)}, got {tuple(w.shape)}"
                )
        for (layer, name), w in zip(entries, weights, strict=True):
            current = layer.get_weight(name)
            current[...] = self.backend.asarray(w, current.dtype)
            layer.weights_changed()
        if self.optimizer is not None:
            self.optimizer.sync(self.parameters(), _flat_keys(self.trainable_weight_keys()))

    def weights_changed(self) -> None:
        """Say that weight arrays were written in place outside the library's own writers
        (``layer.params["W"][...] = ...``, an optimizer stepped by hand on
        :meth:`parameters`): every layer's prepared inference weights are rebuilt on the next
        ``predict``. The library's writers (``fit``, ``train_on_batch``, :meth:`set_weights`,
        ``load_model``...) call it themselves (docs/architecture.md, "Prepared inference")."""
        for layer in self.layers:
            layer.weights_changed()

    def count_params(self) -> int:
        """Number of parameters (trainable or frozen; moving statistics excluded), the number
        torchvision reports for the same architecture."""
        self._require_built()
        return sum(layer.count_params() for layer in self.layers)

    def _require_built(self):
        if not self.built:
            raise RuntimeError("the model is not built; call build(input_shape) or run it once")

    # -- inspection -----------------------------------------------------------------------------
    def summary(self, print_fn=print) -> str:
        """Keras-style table: layer (type), output shape, parameters, inputs; then total,
        trainable and non-trainable counts. Printed (unless ``print_fn`` is None) and returned."""
        self._require_built()
        rows = [("Layer (type)", "Output shape", "Param #", "Connected to")]
        total = trainable = 0
        for node in self._nodes:
            layer = node.layer
            count = sum(int(np.prod(layer.get_weight(n).shape)) for n in layer.weight_names())
            total += count
            if layer.trainable:
                trainable += layer.count_params()
            sources = ", ".join(t.source for t in node.inputs)
            rows.append(
                (
                    f"{layer.name} ({type(layer).__name__})",
                    _shape_text(node.output.shape),
                    f"{count:,}",
                    sources,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]

        def fmt(r):
            return "  ".join(
                (r[i].rjust(widths[i]) if i == 2 else r[i].ljust(widths[i])) for i in range(4)
            ).rstrip()

        line = "-" * (sum(widths) + 6)
        out = [f'Model: "{self.name}"', fmt(rows[0]), line, *(fmt(r) for r in rows[1:]), line]
        out += [
            f"Total params: {total:,}",
            f"Trainable params: {trainable:,}",
            f"Non-trainable params: {total - trainable:,}",
            f"Input {_shape_text(self.input_shape)}, {self.backend.name}, {self.dtype}",
        ]
        text = "\n".join(out)
        if print_fn is not None:
            print_fn(text)
        return text

    # -- config / copies -------------------------------------------------------------------------
    def get_config(self) -> dict:
        """The architecture as JSON types (what checkpoints store)."""
        self._require_built()
        index = {node.output.id: i for i, node in enumerate(self._nodes)}
        return {
            "class": type(self).__name__,
            "name": self.name,
            "dtype": self.dtype.name,
            "input_shape": list(self.input_shape),
            "input_name": self._input.name,
            "layers": [
                {"class": type(layer).__name__, "config": layer.get_config()}
                for layer in self.layers
            ],
            "nodes": [
                {
                    "layer": node.layer.name,
                    "inputs": [index.get(t.id, t.name) for t in node.inputs],
                }
                for node in self._nodes
            ],
        }

    def save(self, path, include_optimizer=True, epoch=None, extra=None) -> None:
        """Write an ``.npz`` checkpoint atomically (format in :mod:`fastconv.nn.saving`)."""
        save_model(self, path, include_optimizer=include_optimizer, epoch=epoch, extra=extra)

    def to(self, backend=None, dtype=None) -> Model:
        """A copy on ``backend`` ("cpu"/"gpu") in ``dtype`` ("float32"/"float16"): weights
        converted, generator state copied, a fresh optimizer of the same kind and settings."""
        from .backend import check_backend_name, check_dtype

        # Checked here: model_from_config would blame a bad value on the "architecture".
        if backend is not None:
            check_backend_name(backend)
        if dtype is not None:
            check_dtype(dtype)
        if not self.built:
            return self._copy_unbuilt(backend or self.backend.name, dtype or self.dtype)
        new = model_from_config(
            self.get_config(), backend or self.backend.name, dtype or self.dtype, allocate=False
        )
        new.rng.bit_generator.state = copy.deepcopy(self.rng.bit_generator.state)
        fill_weights(new, self.get_weights())
        new.fuse = self.fuse
        if self.optimizer is not None:
            new.compile(
                type(self.optimizer)(**self.optimizer.get_config()),
                type(self.loss)(**self.loss.get_config())
                if hasattr(self.loss, "get_config")
                else (type(self.loss)() if self.loss is not None else "softmax_cross_entropy"),
                self.metrics,
            )
        return new

    def _copy_unbuilt(self, backend, dtype):
        raise RuntimeError("the model is not built; call build(input_shape) or run it once")

    def __repr__(self):
        return (
            f"{type(self).__name__}({self.name!r}, {len(self.layers)} layers, "
            f"backend={self.backend.name!r}, dtype={self.dtype})"
        )


# glibc serves blocks this large with mmap whatever its dynamic threshold (at most 32 MiB on
# 64-bit): dropping one unmaps it and leaves the heap as it was.
_MAPPED_BYTES = 32 << 20


def _drop_previous(previous: dict, layers, large: bool) -> None:
    """Drop the ``previous`` gradients of ``layers`` of at least (``large``) or under
    :data:`_MAPPED_BYTES` (see :meth:`Model._run_backward`)."""
    for layer in layers:
        for name in layer.params:
            value = previous.get((layer.name, name))
            if value is not None and (value.nbytes >= _MAPPED_BYTES) == large:
                del previous[(layer.name, name)]


def _shape_text(shape) -> str:
    return "(" + ", ".join(["N", *map(str, shape)]) + ")"


def _flat_keys(keys):
    return [f"{layer}/{weight}" for layer, weight in keys]


def _name_layers(layers) -> None:
    """Give auto-named layers ``<snake>_<k>`` names; refuse duplicate explicit names."""
    taken = {layer.name for layer in layers if not layer._auto_named}
    explicit = [layer.name for layer in layers if not layer._auto_named]
    dupes = sorted({n for n in explicit if explicit.count(n) > 1})
    if dupes:
        raise ValueError(f"layer names must be unique within a model, got duplicates {dupes}")
    counts: dict[type, int] = {}
    for layer in layers:
        if not layer._auto_named:
            continue
        base = snake_case(type(layer).__name__)
        k = counts.get(type(layer), 0)
        while True:
            k += 1
            candidate = f"{base}_{k}"
            if candidate not in taken:
                break
        counts[type(layer)] = k
        layer.name = candidate
        taken.add(candidate)


class Sequential(Model):
    """A chain of layers: each layer's output is the next one's input.

    Parameters
    ----------
    layers : list of Layer
    input_shape : tuple, optional
        Per-sample input shape, e.g. ``(1, 28, 28)``: the model is built (weights created) at
        once. Without it, the model is built on its first batch (or by :meth:`build`).
    seed, backend, dtype, name
        As :class:`Model`.
    """

    def __init__(
        self,
        layers=(),
        seed=None,
        backend="cpu",
        dtype="float32",
        name=None,
        input_shape=None,
    ):
        super().__init__(seed=seed, backend=backend, dtype=dtype, name=name)
        self._chain: list[Layer] = []
        for layer in layers:
            self.add(layer)
        if input_shape is not None:
            self.build(input_shape)

    def add(self, layer: Layer) -> None:
        """Append a layer (also to a built model: the new layer is built at once)."""
        if not isinstance(layer, Layer):
            raise TypeError(f"layers must be fastconv.nn Layer objects, got {type(layer).__name__}")
        if any(layer is other for other in self._chain) and not layer.shareable:
            raise ValueError(
                f"layer {layer.name!r} appears twice; a layer with weights can appear once"
            )
        self._chain.append(layer)
        try:
            if self.built:
                self.build(self.input_shape)
            else:
                _name_layers(self._chain)
                self.layers = list(self._chain)
        except BaseException:
            # A refused layer must not stay in the chain: every later add would fail on it.
            self._chain.pop()
            if self.built:  # rewire the chain as it was (its layers are built: no new weights)
                self.build(self.input_shape)
            raise

    def build(self, input_shape) -> None:
        """Build every layer for per-sample ``input_shape`` (e.g. ``(1, 28, 28)``)."""
        if not self._chain:
            raise ValueError("the model has no layers")
        if not isinstance(input_shape, (tuple, list)):
            raise TypeError(f"input_shape must be a tuple of ints, got {input_shape!r}")
        shape = tuple(chk.as_int(s, "input_shape entries", 1) for s in input_shape)
        if self.built and shape != tuple(self.input_shape):
            raise ValueError(f"the model is built for input shape {self.input_shape}, got {shape}")
        inp = Input(shape)
        t = inp
        for layer in self._chain:
            layer._symbolic_calls = 0  # the chain is (re)wired from scratch
            t = connect(layer, t)
        self._set_graph(inp, t)

    def _ensure_built(self, x) -> None:
        if not self.built:
            self.build(tuple(x.shape[1:]))

    def get_config(self) -> dict:
        config = super().get_config()
        del config["nodes"]  # a chain
        return config

    def _copy_unbuilt(self, backend, dtype):
        """A copy of a model not built yet: the same layers (fresh, unbuilt), built on the
        copy's first batch from the same generator state."""
        layers = [type(layer)(**layer.get_config()) for layer in self._chain]
        new = Sequential(layers, backend=backend, dtype=dtype, name=self.name)
        new.rng.bit_generator.state = copy.deepcopy(self.rng.bit_generator.state)
        new.fuse = self.fuse
        if self.optimizer is not None:
            new.compile(type(self.optimizer)(**self.optimizer.get_config()), type(self.loss)())
        return new


# --- building from an architecture (checkpoints, to()) ---------------------------------------


def _layer_from_spec(spec, where):
    if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
        raise CheckpointError(f"{where}: a layer entry must be {{'class', 'config'}}, got {spec!r}")
    cls = LAYER_CLASSES.get(spec.get("class"))
    if cls is None:
        raise CheckpointError(
            f"{where}: unknown layer class {spec.get('class')!r} (user-defined layers must be "
            "registered with @fastconv.nn.register_layer before loading)"
        )
    try:
        return cls(**spec["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: bad arguments for {cls.__name__}: {e}") from None


def model_from_config(config, backend="cpu", dtype=None, allocate=True):
    """A model from :meth:`Model.get_config` output (format 2), weights fresh or, with
    ``allocate=False``, declared but not created (the loader fills them)."""
    where = "architecture"
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} must be a JSON object")
    kind = config.get("class")
    if kind not in ("Sequential", "Model"):
        raise CheckpointError(f"{where}: unknown model class {kind!r}")
    shape = config.get("input_shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(
            isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 2**31 for s in shape
        )
    ):
        raise CheckpointError(
            f"{where}: input_shape must be a list of positive ints, got {shape!r}"
        )
    specs = config.get("layers")
    if not isinstance(specs, list) or not specs:
        raise CheckpointError(f"{where}: 'layers' must be a non-empty list")
    layers = [_layer_from_spec(s, f"{where}, layer {i}") for i, s in enumerate(specs)]
    kwargs = {"backend": backend, "dtype": dtype or config.get("dtype", "float32")}
    name = config.get("name")
    if name is not None and not isinstance(name, str):
        raise CheckpointError(f"{where}: name must be a string")
    token = ALLOCATE_WEIGHTS.set(allocate)
    try:
        if kind == "Sequential":
            return Sequential(layers, name=name, input_shape=tuple(shape), **kwargs)
        return _functional(config, layers, tuple(shape), name, kwargs)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    finally:
        ALLOCATE_WEIGHTS.reset(token)


def _functional(config, layers, shape, name, kwargs):
    by_name = {layer.name: layer for layer in layers}
    if len(by_name) != len(layers):
        raise CheckpointError("architecture: layer names are not unique")
    input_name = config.get("input_name", "input")
    if not isinstance(input_name, str):
        raise CheckpointError("architecture: input_name must be a string")
    inp = Input(shape, name=input_name)
    nodes = config.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise CheckpointError("architecture: 'nodes' must be a non-empty list")
    tensors = []
    for i, node in enumerate(nodes):
        if not isinstance(node, dict) or node.get("layer") not in by_name:
            raise CheckpointError(f"architecture: node {i} names no known layer: {node!r}")
        refs = node.get("inputs")
        if not isinstance(refs, list) or not refs:
            raise CheckpointError(f"architecture: node {i} has no inputs")
        ins = []
        for r in refs:
            if r == input_name:
                ins.append(inp)
            elif isinstance(r, int) and not isinstance(r, bool) and 0 <= r < i:
                ins.append(tensors[r])
            else:  # only earlier nodes: a stored graph cannot have a cycle
                raise CheckpointError(f"architecture: node {i} has a bad input reference {r!r}")
        layer = by_name[node["layer"]]
        tensors.append(layer(ins if layer.multi_input else ins[0]))
    return Model(inp, tensors[-1], name=name, **kwargs)


def _spec_shape(layer, name):
    for spec in layer.weight_specs(layer.input_shape):
        if spec.name == name:
            return tuple(spec.shape)
    raise KeyError(name)


def fill_weights(model, arrays) -> None:
    """Set every weight of a model built with ``allocate=False`` (or any model) from NumPy
    arrays in :meth:`Model.weight_entries` order, converting backend and dtype."""
    for (layer, name), value in zip(model.weight_entries(), arrays, strict=True):
        dtype = layer.weight_dtype(name, model.dtype)
        layer.set_weight(name, model.backend.asarray(np.array(value, copy=True), dtype))
