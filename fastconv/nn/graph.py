"""Symbolic tensors and the graph they build: the functional API's construction side.

``Input(shape)`` starts a graph; calling a layer on symbolic tensors validates the wiring (shapes
checked at once, with the layers named) and returns the layer's output tensor. :func:`trace`
turns the graph between a model's input and output into nodes in execution order.
"""

from __future__ import annotations

import itertools
import math
import numbers

import numpy as np

__all__ = ["SymbolicTensor", "Node", "Input", "connect", "trace", "MAX_ELEMENTS"]

#: the most elements one array can have (NumPy indexes with intp)
MAX_ELEMENTS = int(np.iinfo(np.intp).max)

_ids = itertools.count()


class Node:
    """One application of a layer: its input tensors and its output tensor."""

    __slots__ = ("layer", "inputs", "output")

    def __init__(self, layer, inputs):
        self.layer = layer
        self.inputs = tuple(inputs)
        self.output = None

    def __repr__(self):
        return f"Node({self.layer.name!r}, inputs={[t.source for t in self.inputs]})"


class SymbolicTensor:
    """A batch flowing through a graph under construction: its per-sample ``shape`` (batch
    dimension excluded) and the :class:`Node` that produces it (None for an ``Input``)."""

    __slots__ = ("shape", "node", "name", "id")

    def __init__(self, shape, node=None, name=None):
        self.shape = tuple(int(s) for s in shape)
        self.node = node
        self.name = name
        self.id = next(_ids)

    @property
    def source(self) -> str:
        """Name of what produces this tensor: a layer, or the input."""
        return self.node.layer.name if self.node is not None else self.name

    def __repr__(self):
        return f"SymbolicTensor(shape={(None, *self.shape)}, from={self.source!r})"


def Input(shape, name: str = "input") -> SymbolicTensor:
    """The input of a functional model: per-sample ``shape``, e.g. ``(1, 28, 28)``."""
    if not isinstance(shape, (tuple, list)) or not shape:
        raise ValueError(f"shape must be a non-empty tuple of sizes (no batch size), got {shape!r}")
    for i, s in enumerate(shape):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1:
            raise ValueError(f"shape[{i}] must be a positive int, got {s!r} (in {tuple(shape)})")
    if math.prod(int(s) for s in shape) > MAX_ELEMENTS:
        raise ValueError(
            f"shape {tuple(shape)} has more elements per sample than an array can hold "
            f"({MAX_ELEMENTS:,})"
        )
    if not isinstance(name, str) or not name or "/" in name:
        raise TypeError(f"name must be a non-empty str without '/', got {name!r}")
    return SymbolicTensor(shape, None, name)


def _describe(tensors) -> str:
    return ", ".join(f"{t.source} {t.shape}" for t in tensors)


def connect(layer, inputs) -> SymbolicTensor:
    """Apply ``layer`` to symbolic ``inputs``: check the wiring, return the output tensor."""
    items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    kind = f"{type(layer).__name__} {layer.name!r}"
    if layer.multi_input:
        if not isinstance(inputs, (list, tuple)) or len(items) < 2:
            raise ValueError(f"{kind} takes a list of at least two tensors")
        shape = [t.shape for t in items]
    else:
        if len(items) != 1:
            raise ValueError(f"{kind} takes one tensor, got {len(items)}")
        shape = items[0].shape
    if layer._symbolic_calls and not layer.shareable:
        raise ValueError(
            f"{kind} is already used in a graph; a layer with weights can appear once "
            "(shared weights are not supported): create another layer"
        )
    try:
        out_shape = layer.output_shape(shape)
    except ValueError as e:
        raise ValueError(f"{e} (inputs: {_describe(items)})") from None
    if layer.built and layer.input_shape != (list(shape) if layer.multi_input else shape):
        raise ValueError(
            f"{kind} was built for per-sample shape {layer.input_shape}, got {_describe(items)}"
        )
    node = Node(layer, items)
    node.output = SymbolicTensor(out_shape, node)
    layer._symbolic_calls += 1
    return node.output


def trace(inp: SymbolicTensor, out: SymbolicTensor) -> list[Node]:
    """The nodes between ``inp`` and ``out`` in execution (topological) order.

    Depth-first from the output, inputs in argument order, so a chain keeps its order and the
    result is deterministic. Raises ValueError for a cycle, a tensor that depends on another
    input (e.g. from another model's graph), or an input the output does not use.
    """
    for what, t in (("inputs", inp), ("outputs", out)):
        if not isinstance(t, SymbolicTensor):
            raise TypeError(f"{what} must be a symbolic tensor (from nn.Input), got {t!r}")
    if inp.node is not None:
        raise ValueError(
            f"inputs must be a tensor made by nn.Input, got the output of {inp.source!r}"
        )
    order: list[Node] = []
    state: dict[int, int] = {}  # id(node) -> 1 on the current path, 2 done
    used_input = False
    stack = [(out, False)]
    while stack:
        tensor, expanded = stack.pop()
        node = tensor.node
        if node is None:
            if tensor is not inp:
                raise ValueError(
                    f"the output depends on input {tensor.name!r}, which is not this model's "
                    f"input {inp.name!r} (a tensor from another graph?)"
                )
            used_input = True
            continue
        key = id(node)
        if expanded:
            state[key] = 2
            order.append(node)
            continue
        if state.get(key) == 2:
            continue
        if state.get(key) == 1:
            raise ValueError(f"the graph has a cycle through layer {node.layer.name!r}")
        state[key] = 1
        stack.append((tensor, True))
        stack.extend((t, False) for t in reversed(node.inputs))
    if not order:
        raise ValueError("the model has no layers: its output is its input")
    if not used_input:
        raise ValueError(f"input {inp.name!r} is not used to compute the output")
    return order
