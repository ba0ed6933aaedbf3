"""PyTorch's own profiler on the deep MNIST net: share of a CPU training step spent in convolution.

``python -m bench.torch_profile [--steps 20] [--batch-size 100] [--threads 2] [--json]``

The PyTorch twin of ``deep_mnist_net(seed)`` (``fastconv.torch_bridge.to_torch``: the same
weights; PyTorch CPU, float32). Every step is
wrapped in ``record_function`` ranges ("train_step", "forward"), and the convolution time is the
inclusive CPU time of the top-level convolution ops: ``aten::conv2d`` in the forward pass and the
autograd node ``ConvolutionBackward0`` in the backward pass. PyTorch runs ReLU as a separate op,
while fastconv fuses it into the convolution; both shares are reported with and without ReLU.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from fastconv.benchmark import torch_train_step
from fastconv.models import deep_mnist_net
from fastconv.torch_bridge import to_torch

CONV_FORWARD = "aten::conv2d"
CONV_BACKWARD = "ConvolutionBackward0"
RELU_FORWARD = "aten::relu"
RELU_BACKWARD = "ReluBackward0"


def _total_us(events, name, contains=False):
    """Inclusive CPU time (us) over events named ``name`` (or containing it)."""
    return sum(e.cpu_time_total for e in events if (name in e.key if contains else e.key == name))


def run(steps=20, warmup=3, batch_size=100, threads=2, seed=0) -> dict:
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.random((batch_size, 1, 28, 28), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 10, batch_size))
    net = to_torch(deep_mnist_net(seed=seed))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(warmup):
        torch_train_step(net, opt, x, y)

    def step():
        with record_function("train_step"):
            net.train()
            opt.zero_grad(set_to_none=True)
            with record_function("forward"):
                out = net(x)
            loss = torch.nn.functional.cross_entropy(out, y)
            loss.backward()
            opt.step()

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    step_us = _total_us(events, "train_step")
    forward_us = _total_us(events, "forward")
    conv_fwd = _total_us(events, CONV_FORWARD)
    # Autograd nodes appear as "autograd::engine::evaluate_function: ConvolutionBackward0".
    conv_bwd = _total_us(events, "evaluate_function: " + CONV_BACKWARD, contains=True)
    relu_fwd = _total_us(events, RELU_FORWARD)
    relu_bwd = _total_us(events, "evaluate_function: " + RELU_BACKWARD, contains=True)
    # Every ReLU counts with the convolutions: the dense layer's (batch x 50 values) is
    # negligible next to the convolutions' (at least batch x 4096 values each).
    return {
        "torch": torch.__version__,
        "threads": threads,
        "batch_size": batch_size,
        "steps": steps,
        "step_ms": step_us / steps / 1e3,
        "conv_share": (conv_fwd + conv_bwd) / step_us,
        "forward_conv_share": conv_fwd / forward_us,
        "conv_plus_relu_share": (conv_fwd + conv_bwd + (relu_fwd + relu_bwd)) / step_us,
        "forward_conv_plus_relu_share": (conv_fwd + relu_fwd) / forward_us,
        "table": events.table(sort_by="cpu_time_total", row_limit=15),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="one JSON object, without the op table")
    args = p.parse_args(argv)
    r = run(args.steps, args.warmup, args.batch_size, args.threads)
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k != "table"}))
        return 0
    print(r["table"])
    print(
        f"PyTorch {r['torch']} CPU, {r['threads']} threads, batch {r['batch_size']}, "
        f"{r['steps']} steps: step {r['step_ms']:.2f} ms (under the profiler)\n"
        f"convolution: {r['conv_share']:.1%} of the training step, "
        f"{r['forward_conv_share']:.1%} of the forward pass\n"
        f"convolution + its ReLU (as fastconv fuses them): {r['conv_plus_relu_share']:.1%} of "
        f"the step, {r['forward_conv_plus_relu_share']:.1%} of the forward pass"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
