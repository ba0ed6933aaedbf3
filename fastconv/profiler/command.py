"""``fastconv profile``: the subcommand's arguments and what it runs (docs/profiling.md)."""

from __future__ import annotations

import json
import math

import numpy as np

from ..nn._files import check_writable_file
from .charts import _bars, comparison_table, plot_comparison
from .timing import profile_forward, profile_model
from .torch_twin import profile_torch_in_subprocess

__all__ = ["add_subcommand"]

_MNIST_MODELS = ("deep-mnist", "resnet-mnist")


def _model_kwargs(args) -> dict:
    """Builder arguments of the ``--model`` (seed, dtype, backend, input size)."""
    kwargs = {"seed": args.seed, "dtype": args.dtype, "backend": args.backend}
    if args.input_size is not None:
        if args.model == "deep-mnist":
            raise SystemExit("fastconv profile: --input-size: the deep MNIST net takes 28x28 only")
        channels = 1 if args.model in ("lenet5", "resnet-mnist") else 3
        kwargs["input_shape"] = (channels, args.input_size, args.input_size)
    return kwargs


def _build_model(args, **overrides):
    from ..models import get_model

    kwargs = {**_model_kwargs(args), **overrides}
    model = get_model(args.model, **kwargs)
    return model.compile(optimizer="adam", loss="softmax_cross_entropy")


def _inputs(args, input_shape, classes):
    if args.data == "mnist":
        if tuple(input_shape) != (1, 28, 28):
            raise SystemExit(
                f"fastconv profile: --data mnist needs a model for 1x28x28 inputs "
                f"({', '.join(_MNIST_MODELS)}); {args.model} takes {input_shape}"
            )
        from ..datasets import MNISTError, load_mnist

        try:
            (x, y), _ = load_mnist(args.mnist_dir)
        except (MNISTError, OSError, ValueError) as exc:  # missing, unreadable or corrupt
            raise SystemExit(f"fastconv profile: --data mnist: {exc}") from None
        if args.batch_size > x.shape[0]:
            raise SystemExit(f"fastconv profile: --batch-size must be <= {x.shape[0]} for MNIST")
        return x[: args.batch_size], y[: args.batch_size]
    rng = np.random.default_rng(args.seed)
    x = rng.random((args.batch_size, *input_shape), dtype=np.float32)
    y = rng.integers(0, classes, args.batch_size)
    return x, y


def _profile_torch_in_subprocess(args, x, y):
    kwargs = {**_model_kwargs(args), "dtype": "float32", "backend": "cpu"}
    spec = {"model": args.model, "kwargs": kwargs, "x": x, "y": y, "steps": args.steps,
            "warmup": args.warmup, "training": not args.forward_only,
            "threads": args.torch_threads}  # fmt: skip
    return profile_torch_in_subprocess(spec)


def _check_memory(args, model) -> None:
    """Refuse a batch whose activations cannot fit in memory before allocating it (a large
    --input-size was a MemoryError in the middle of the first step, or the OOM killer)."""
    from .._checks import check_allocation

    itemsize = np.dtype(args.dtype).itemsize
    per_sample = sum(math.prod(shape) for shape in model._shapes.values())
    size = "x".join(map(str, model.input_shape))
    try:  # every layer's output is kept for the backward pass of a training step
        check_allocation(
            per_sample * args.batch_size * itemsize,
            f"a batch of {args.batch_size} {size} inputs through --model {args.model} (every "
            "layer's output, kept for the backward pass)",
        )
    except ValueError as exc:
        raise SystemExit(
            f"fastconv profile: {exc}; use a smaller --input-size or --batch-size"
        ) from None


def _defaults(args, model_name):
    big = model_name not in ("deep-mnist", "resnet-mnist", "lenet5")
    if args.batch_size is None:
        args.batch_size = 8 if big else 100
    if args.steps is None:
        args.steps = 5 if big else 20
    if args.warmup is None:
        args.warmup = 2 if big else 3


def _command(args) -> int:
    import importlib.util

    _defaults(args, args.model)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        raise SystemExit("fastconv profile: --batch-size and --steps must be >= 1, --warmup >= 0")
    if args.input_size is not None and args.input_size < 1:
        raise SystemExit("fastconv profile: --input-size must be >= 1")
    if args.data == "mnist" and (
        args.model not in _MNIST_MODELS or args.input_size not in (None, 28)
    ):
        raise SystemExit(  # before building a model that cannot take the data
            f"fastconv profile: --data mnist needs a model for 1x28x28 inputs "
            f"({', '.join(_MNIST_MODELS)}), got --model {args.model}"
        )
    if args.plot:  # before the run, not after it
        try:
            check_writable_file(args.plot, "--plot")
        except ValueError as exc:
            raise SystemExit(f"fastconv profile: {exc}") from None
    try:
        model = _build_model(args)
    except RuntimeError as exc:  # e.g. --backend gpu without CuPy or a CUDA device
        raise SystemExit(f"fastconv profile: {exc}") from exc
    except ValueError as exc:  # an input size the architecture cannot take, or cannot hold
        raise SystemExit(f"fastconv profile: {exc}") from exc
    _check_memory(args, model)
    x, y = _inputs(args, model.input_shape, model.output_shape[0])
    if args.forward_only:
        result = profile_forward(model, x, args.steps, args.warmup)
    else:
        result = profile_model(model, x, y, args.steps, args.warmup)
    source = "real MNIST images" if args.data == "mnist" else "random inputs (timing only)"
    result.notes.append(f"model: {args.model}, input {'x'.join(map(str, model.input_shape))}")
    result.notes.append(f"data: {source}")
    del model
    torch_result = None
    if args.no_torch:
        result.notes.append("PyTorch comparison skipped (--no-torch)")
    elif importlib.util.find_spec("torch") is None:
        result.notes.append("PyTorch is not installed: no comparison")
    else:
        try:
            torch_result = _profile_torch_in_subprocess(args, x, y)
        except RuntimeError as exc:
            result.notes.append(f"PyTorch comparison failed: {exc}")
    if args.plot:
        mode = "training step" if result.training else "inference"
        title = (f"{args.model}, batch {result.batch_size}, {mode}: conv "
                 f"{result.forward_conv_share:.0%} of fastconv's forward pass"
                 + (f", {torch_result.forward_conv_share:.0%} of PyTorch's"
                    if torch_result is not None else ""))  # fmt: skip
        plot_comparison(result, torch_result, args.plot, title)
        result.notes.append(f"plot written to {args.plot}")
    if args.json:
        out = result.to_dict()
        out["model"] = args.model
        out["torch"] = torch_result.to_dict() if torch_result is not None else None
        out["groups"] = {"fastconv": {label: g for label, g, _ in _bars(result)}}
        if torch_result is not None:
            out["groups"]["torch"] = {label: g for label, g, _ in _bars(torch_result)}
        print(json.dumps(out))
        return 0
    text = result.table()
    text += "\n\nby group, fastconv" + (" vs PyTorch" if torch_result is not None else "") + ":\n"
    text += comparison_table(result, torch_result)
    if torch_result is not None:
        text += (f"\nPyTorch {torch_result.torch} ({torch_result.threads} threads, "
                 f"torch.profiler): convolution {torch_result.conv_share:.1%} of the "
                 f"{'step' if torch_result.training else 'pass'}, "
                 f"{torch_result.forward_conv_share:.1%} of the forward pass")  # fmt: skip
    print(text)
    return 0


def add_subcommand(subparsers):
    """Add ``fastconv profile`` to an argparse ``subparsers`` object."""
    from .._cliutil import seed as _seed
    from ..models import MODELS

    p = subparsers.add_parser(
        "profile",
        help="time a training step layer by layer; share of time in convolution",
        description="Profile a zoo model's training step (or forward pass) layer by layer, "
        "and the same model in PyTorch (when installed) with torch.profiler.",
    )
    p.add_argument("--model", choices=list(MODELS), default="deep-mnist")
    p.add_argument("--backend", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="default 100 for the MNIST models and LeNet-5, 8 for the others",
    )
    p.add_argument(
        "--input-size",
        type=int,
        default=None,
        metavar="S",
        help="SxS inputs instead of the model's default size",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps (default 20; 5 for the ImageNet models)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps first (default 3; 2 for the ImageNet models)",
    )
    p.add_argument("--forward-only", action="store_true", help="profile inference only")
    p.add_argument("--data", choices=["random", "mnist"], default="random")
    p.add_argument(
        "--mnist-dir",
        help="directory of the MNIST IDX .gz files (default: found or downloaded as load_mnist "
        "does, docs/training.md)",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed (>= 0) of weights and inputs")
    p.add_argument(
        "--no-torch",
        action="store_true",
        help="skip the PyTorch comparison (run when torch is installed)",
    )
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--plot",
        metavar="FILE",
        help="write the chart of shares by layer type (PNG), fastconv vs PyTorch",
    )
    p.set_defaults(func=_command)
    return p
