"""The deep MNIST ConvNet in PyTorch: the benchmark's baseline, with fastconv's weights.

Parameters are exchanged as NumPy arrays in fastconv's order and layout (layer order, ``W``
then ``b``; conv ``W`` is ``(F, C, kh, kw)`` as in PyTorch, dense ``W`` is ``(in, out)`` and
so transposed to PyTorch's ``(out, in)``), so that both frameworks start from the same
initialisation and compute the same step.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = [
    "deep_mnist_torch",
    "set_parameters",
    "get_parameters",
    "get_gradients",
    "make_optimizer",
    "train_step",
    "predict",
]

# (filters, pad) of the six 3x3 convolutions; "pool" is a 2x2 max pool.
_SPEC = [(16, 1), (16, 1), "pool", (32, 1), (32, 2), "pool", (64, 1), (64, 1), "pool"]


def deep_mnist_torch(params=None, seed=None, dropout=0.5, dtype=torch.float32):
    """The book's deep MNIST net; ``params`` (fastconv order/layout) or He init from ``seed``."""
    layers, channels = [], 1
    for item in _SPEC:
        if item == "pool":
            layers.append(nn.MaxPool2d(2))
        else:
            filters, pad = item
            layers += [nn.Conv2d(channels, filters, 3, padding=pad), nn.ReLU()]
            channels = filters
    layers += [
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 50),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(50, 10),
        nn.Dropout(dropout),
    ]
    net = nn.Sequential(*layers).to(dtype)
    if params is None:
        gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
        with torch.no_grad():
            for m in _weighted(net):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * np.sqrt(2.0 / fan_in))
                m.bias.zero_()
    else:
        set_parameters(net, params)
    return net


def _weighted(net):
    return [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]


def _to_torch_layout(module, array):
    a = np.asarray(array)
    return a.T if isinstance(module, nn.Linear) and a.ndim == 2 else a


def set_parameters(net, params):
    """Copy fastconv-ordered NumPy ``params`` into ``net`` (dense weights transposed)."""
    targets = [(m, t) for m in _weighted(net) for t in (m.weight, m.bias)]
    if len(params) != len(targets):
        raise ValueError(f"expected {len(targets)} arrays, got {len(params)}")
    with torch.no_grad():
        for (module, tensor), array in zip(targets, params, strict=True):
            a = _to_torch_layout(module, array)
            if tuple(a.shape) != tuple(tensor.shape):
                raise ValueError(f"shape mismatch: {a.shape} vs {tuple(tensor.shape)}")
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(a)))


def get_parameters(net):
    """Parameters as NumPy arrays in fastconv's order and layout."""
    return [
        _to_torch_layout(m, t.detach().cpu().numpy())
        for m in _weighted(net)
        for t in (m.weight, m.bias)
    ]


def get_gradients(net):
    """Gradients of the last backward pass, in fastconv's order and layout."""
    return [
        _to_torch_layout(m, t.grad.detach().cpu().numpy())
        for m in _weighted(net)
        for t in (m.weight, m.bias)
    ]


def make_optimizer(net, lr=1e-3):
    return torch.optim.Adam(net.parameters(), lr=lr)


def train_step(net, optimizer, x, y):
    """One training step (forward, mean softmax cross-entropy, backward, Adam); returns the loss."""
    net.train()
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def predict(net, x, batch_size=100):
    """Scores for ``x`` in eval mode, ``batch_size`` images at a time."""
    net.eval()
    return torch.cat([net(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
