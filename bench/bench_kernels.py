"""pytest-benchmark suite over the deep-MNIST layers (batch 100).

Run: ``PYTHONPATH=. python -m pytest bench/bench_kernels.py --benchmark-group-by=group``

Each layer x pass (conv forward with fused bias+ReLU, conv backward, 2x2 max-pool forward and
backward) is one benchmark group holding fastconv fp32, fastconv fp16 and PyTorch fp32
(skipped when torch is missing), so pytest-benchmark's table compares them side by side.
The layer definitions and the calls are shared with ``bench/kernel_table.py``; the float64
NumPy reference is left to that script, being too slow for many rounds.
"""

from __future__ import annotations

import pytest

from bench.kernel_table import LAYERS, make_calls

IMPLS = ("fastconv fp32", "fastconv fp16", "torch")

_calls_cache: dict[str, dict] = {}


def _calls(layer):
    # Building the data once per layer keeps collection fast and the inputs identical.
    if layer.name not in _calls_cache:
        _calls_cache[layer.name] = make_calls(layer)
    return _calls_cache[layer.name]


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(2)  # the baseline the project compares with


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", ["forward", "backward"])
@pytest.mark.parametrize("layer", LAYERS, ids=[layer.name for layer in LAYERS])
def test_kernel(benchmark, layer, pass_, impl):
    calls = _calls(layer)
    if impl not in calls:
        pytest.skip(f"{impl} is not installed")
    fn = calls[impl][pass_]
    fn()  # compile and warm up outside the timed rounds
    benchmark.group = f"{layer.name} {pass_} ({layer.describe()})"
    benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=1)
