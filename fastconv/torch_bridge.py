"""The PyTorch twin of a fastconv model: same graph, same weights (for comparisons and tests).

``to_torch(model)`` builds a ``torch.nn.Module`` that computes what ``model`` computes, with
the weights copied; ``copy_from_torch(module, model)`` copies a (trained or freshly initialised)
twin's weights back. PyTorch is optional: it is imported only here, and only when called.
Layout differences handled: Dense weights are ``(in, out)`` here and ``(out, in)`` in
``nn.Linear``; BatchNorm's momentum is ``1 - momentum`` in PyTorch. Frozen BatchNorm layers are
put in eval mode (they normalise with their moving statistics, as here).
"""

from __future__ import annotations

import numpy as np

from .nn.backend import to_numpy

__all__ = ["to_torch", "copy_from_torch"]


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"PyTorch is needed for this ({e}); install the pinned CPU build: "
            "pip install torch==2.13.0"
        ) from None
    return torch


def _module_for(layer, torch):
    nn = torch.nn
    kind = type(layer).__name__
    if kind == "Conv2D":
        F, C, kh, kw = layer.params["W"].shape
        conv = nn.Conv2d(C, F, (kh, kw), layer.stride, layer.padding, bias=layer.use_bias)
        return nn.Sequential(conv, nn.ReLU()) if layer.activation == "relu" else conv
    if kind == "Dense":
        n_in, n_out = layer.params["W"].shape
        lin = nn.Linear(n_in, n_out, bias=layer.use_bias)
        return nn.Sequential(lin, nn.ReLU()) if layer.activation == "relu" else lin
    if kind in ("BatchNorm2D", "BatchNorm1D"):
        cls = nn.BatchNorm2d if kind == "BatchNorm2D" else nn.BatchNorm1d
        return cls(layer.params["gamma"].shape[0], eps=layer.epsilon, momentum=1 - layer.momentum)
    if kind == "MaxPool2D":
        return nn.MaxPool2d(layer.size, layer.stride, layer.padding)
    if kind == "AvgPool2D":
        return nn.AvgPool2d(layer.size, layer.stride, layer.padding, count_include_pad=True)
    if kind == "GlobalAveragePooling2D":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    simple = {
        "ReLU": nn.ReLU,
        "Sigmoid": nn.Sigmoid,
        "Tanh": nn.Tanh,
        "Flatten": nn.Flatten,
    }
    if kind in simple:
        return simple[kind]()
    if kind == "Softmax":
        return nn.Softmax(dim=1)
    if kind == "Dropout":
        return nn.Dropout(layer.rate)
    if kind in ("Add", "Concatenate"):
        return None  # merges are done in forward()
    raise TypeError(f"no PyTorch equivalent known for layer {layer.name!r} ({kind})")


def _core(module, torch):
    """The parameterised module inside an optional Sequential(module, ReLU)."""
    return module[0] if isinstance(module, torch.nn.Sequential) else module


def _pairs(layer, module, torch):
    """(fastconv weight name, torch tensor, transform) for every weight of ``layer``."""
    kind = type(layer).__name__
    core = _core(module, torch)
    if kind == "Conv2D":
        out = [("W", core.weight, None)]
        return out + ([("b", core.bias, None)] if layer.use_bias else [])
    if kind == "Dense":
        out = [("W", core.weight, "T")]
        return out + ([("b", core.bias, None)] if layer.use_bias else [])
    if kind in ("BatchNorm2D", "BatchNorm1D"):
        return [
            ("gamma", core.weight, None),
            ("beta", core.bias, None),
            ("moving_mean", core.running_mean, None),
            ("moving_variance", core.running_var, None),
        ]
    return []


def to_torch(model):
    """A float32 CPU ``torch.nn.Module`` computing what ``model`` computes, weights copied.

    Dropout draws from PyTorch's own generator, so training-mode outputs differ where dropout
    is active; everything else matches to float32 rounding.
    """
    torch = _torch()
    model._require_built()

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleDict()
            self.graph = []  # (layer name, kind, input refs, output id, axis)
            for layer in model.layers:
                module = _module_for(layer, torch)
                if module is not None:
                    self.layers[layer.name] = module
            for node in model._nodes:
                layer = node.layer
                self.graph.append(
                    (
                        layer.name,
                        type(layer).__name__,
                        [t.id for t in node.inputs],
                        node.output.id,
                        getattr(layer, "axis", None),
                    )
                )
            self.input_id, self.output_id = model._input.id, model._output.id

        def forward(self, x):
            values = {self.input_id: x}
            for name, kind, inputs, out, axis in self.graph:
                xs = [values[t] for t in inputs]
                if kind == "Add":
                    y = xs[0]
                    for more in xs[1:]:
                        y = y + more
                elif kind == "Concatenate":
                    y = torch.cat(xs, dim=axis)
                else:
                    y = self.layers[name](xs[0])
                values[out] = y
            return values[self.output_id]

        def train(self, mode=True):
            super().train(mode)
            for layer in model.layers:  # frozen BatchNorm: moving statistics, as in fastconv
                if type(layer).__name__.startswith("BatchNorm") and not layer.trainable:
                    self.layers[layer.name].eval()
            return self

    twin = Twin()
    with torch.no_grad():
        for layer in model.layers:
            if layer.name not in twin.layers:
                continue
            for name, tensor, how in _pairs(layer, twin.layers[layer.name], torch):
                value = to_numpy(layer.get_weight(name)).astype(np.float32)
                tensor.copy_(torch.from_numpy(value.T.copy() if how == "T" else value))
    return twin.train()


def copy_from_torch(module, model) -> None:
    """Set ``model``'s weights from its twin ``module`` (made by :func:`to_torch`)."""
    torch = _torch()
    weights = []
    for layer, name in model.weight_entries():
        pairs = {n: (t, how) for n, t, how in _pairs(layer, module.layers[layer.name], torch)}
        tensor, how = pairs[name]
        value = tensor.detach().cpu().numpy()
        weights.append(value.T.copy() if how == "T" else value)
    model.set_weights(weights)
