"""The PyTorch twin of a fastconv model: same graph, same weights (for comparisons and tests).

``to_torch(model)`` builds a ``torch.nn.Module`` that computes what ``model`` computes, with
the weights copied; ``copy_from_torch(module, model)`` copies a (trained or freshly initialised)
twin's weights back. PyTorch is optional: it is imported only here, and only when called.
Each layer builds its own twin (``Layer.torch_module``, ``torch_weights``, ``torch_merge``), so
layout differences live with the layer (Dense weights are ``(in, out)`` here and ``(out, in)``
in ``nn.Linear``; BatchNorm's momentum is ``1 - momentum`` in PyTorch); this module wires the
graph. Frozen BatchNorm layers are put in eval mode (they normalise with their moving
statistics, as here).

The twin runs the graph as torchvision's models do, so that time and memory compare fairly:
ReLUs work in place where their input has no other use (``ReLU(inplace=True)``), a residual
sum adds the shortcut into the branch's output in place (``out += identity``), and each
intermediate value is dropped after its last use.
"""

from __future__ import annotations

import numpy as np

from .nn.backend import to_numpy

__all__ = ["to_torch", "copy_from_torch", "module_key"]


def module_key(name: str) -> str:
    """The twin's ``layers`` key of fastconv layer ``name``: PyTorch refuses "." in module
    names, which the zoo's torchvision-style names (``layer1.0.conv1``) contain."""
    return name.replace(".", "_")


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"PyTorch is needed for this ({e}); install the pinned CPU build: "
            "pip install torch==2.13.0"
        ) from None
    return torch


def to_torch(model, copy_weights: bool = True):
    """A float32 CPU ``torch.nn.Module`` computing what ``model`` computes, weights copied.

    Dropout draws from PyTorch's own generator, so training-mode outputs differ where dropout
    is active; everything else matches to float32 rounding. ``copy_weights=False`` keeps
    PyTorch's own initial weights (the same architecture; for memory measurements, where the
    fastconv copy of the weights must not be created at all).
    """
    torch = _torch()
    model._require_built()

    keys = [module_key(layer.name) for layer in model.layers]
    if len(set(keys)) != len(keys):
        raise ValueError("layer names must stay unique with '.' read as '_' to build a twin")
    uses: dict[int, int] = {}  # tensor id -> number of nodes reading it
    for node in model._nodes:
        for t in node.inputs:
            uses[t.id] = uses.get(t.id, 0) + 1

    def private(t):
        """May a node overwrite tensor ``t``? Only if nothing else reads it, nor the caller,
        and it is no view of another value (Flatten, Dropout at inference, return those)."""
        return t.node is not None and t.node.layer.torch_fresh and uses[t.id] == 1

    # Everything the module needs is computed here: the class must not refer to ``model``,
    # or the twin would keep the fastconv model (and its weights) alive.
    inplace = {}  # a weightless layer may be shared: in place only if every use may be
    for node in model._nodes:
        ok = all(private(t) for t in node.inputs)
        inplace[node.layer.name] = inplace.get(node.layer.name, True) and ok
    modules = {}
    for layer in model.layers:
        module = layer.torch_module(torch, inplace=inplace[layer.name])
        if module is not None:
            modules[module_key(layer.name)] = module
    last_read = {}
    for i, node in enumerate(model._nodes):
        for t in node.inputs:
            last_read[t.id] = i
    graph = []  # (module key, merge or None, input ids, output id, in place, ids last read here)
    for i, node in enumerate(model._nodes):
        ids = [t.id for t in node.inputs]
        graph.append(
            (
                module_key(node.layer.name),
                node.layer.torch_merge if node.layer.multi_input else None,  # weightless
                ids,
                node.output.id,
                private(node.inputs[0]),
                sorted({t for t in ids if last_read[t] == i}),
            )
        )
    frozen_bn = [
        module_key(layer.name)
        for layer in model.layers
        if layer.kind == "norm" and not layer.trainable
    ]
    ends = (model._input.id, model._output.id)

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleDict(modules)
            self.graph = graph
            self.frozen_bn = frozen_bn
            self.input_id, self.output_id = ends

        def forward(self, x):
            values = {self.input_id: x}
            for key, merge, inputs, out, own_first, done in self.graph:
                xs = [values[t] for t in inputs]
                for t in done:  # dropped after its last use, as a plain forward() would
                    del values[t]
                y = merge(xs, own_first) if merge else self.layers[key](xs[0])
                del xs
                values[out] = y
            return values[self.output_id]

        def train(self, mode=True):
            super().train(mode)
            for key in self.frozen_bn:  # frozen BatchNorm: moving statistics, as in fastconv
                self.layers[key].eval()
            return self

    twin = Twin()
    if not copy_weights:
        return twin.train()
    with torch.no_grad():
        for layer in model.layers:
            if module_key(layer.name) not in twin.layers:
                continue
            for name, tensor, how in layer.torch_weights(twin.layers[module_key(layer.name)]):
                value = to_numpy(layer.get_weight(name)).astype(np.float32)
                tensor.copy_(torch.from_numpy(value.T.copy() if how == "T" else value))
    return twin.train()


def copy_from_torch(module, model) -> None:
    """Set ``model``'s weights from its twin ``module`` (made by :func:`to_torch`)."""
    weights = []
    for layer, name in model.weight_entries():
        twin = module.layers[module_key(layer.name)]
        pairs = {n: (t, how) for n, t, how in layer.torch_weights(twin)}
        tensor, how = pairs[name]
        value = tensor.detach().cpu().numpy()
        weights.append(value.T.copy() if how == "T" else value)
    model.set_weights(weights)
