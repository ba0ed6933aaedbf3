"""pytest-benchmark suite of the zoo: forward pass and training step of each ImageNet model,
fastconv float32 / float16 and the PyTorch twin, one group per model and pass.

    PYTHONPATH=. python -m pytest bench/zoo_bench_pytest.py --benchmark-group-by=group
    ZOO_SIZE=64 ZOO_BATCH=2 PYTHONPATH=. python -m pytest bench/zoo_bench_pytest.py -k resnet18

Everything runs in the pytest process (pytest-benchmark's model), so the thread pools of Numba
and PyTorch share it: the same-run ratios of ``bench/zoo_speed.py`` (one process per
implementation, interleaved) are the reference numbers; this suite is the convenient view.
Size and batch come from ``ZOO_SIZE`` (default 224) and ``ZOO_BATCH`` (default 8).
"""

from __future__ import annotations

import os

import pytest

from bench.zoo_common import Spec, build

MODELS = ("alexnet", "vgg16", "resnet18", "googlenet")
IMPLS = (("fastconv", "float32"), ("fastconv", "float16"), ("torch", "float32"))
SIZE = int(os.environ.get("ZOO_SIZE", "224"))
BATCH = int(os.environ.get("ZOO_BATCH", "8"))

_cache: dict = {}


def _calls(model, impl, dtype):
    key = (model, impl, dtype)
    if key not in _cache:
        _cache.clear()  # one model in memory at a time (VGG-16 alone holds gigabytes)
        if impl == "torch":
            pytest.importorskip("torch")
        calls, _ = build(Spec(impl, model, BATCH, SIZE, dtype))
        _cache[key] = calls
    return _cache[key]


@pytest.mark.parametrize("impl,dtype", IMPLS, ids=[f"{i}-{d}" for i, d in IMPLS])
@pytest.mark.parametrize("mode", ["forward", "train"])
@pytest.mark.parametrize("model", MODELS)
def test_zoo(benchmark, model, mode, impl, dtype):
    fn = _calls(model, impl, dtype)[mode]
    fn()  # warm-up: compilation, workspaces
    benchmark.group = f"{model} {mode} (batch {BATCH}, {SIZE}x{SIZE})"
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=0)
