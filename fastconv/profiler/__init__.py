"""Where does a training step spend its time? Layer-by-layer timing of a model's training step.

:func:`profile_model` runs real training steps (``model.train_on_batch``) with a clock hook
registered on the model (:class:`fastconv.nn.Hook`): the model calls it around every layer's
forward and backward pass, the loss and the optimizer update. Consecutive clock marks split the
step into contiguous parts, so the parts add up to the step's wall time; the gaps between hooked
events (casting the batch, checking labels, computing the accuracy, Python between layers) are
reported as ``framework``. Clocks: ``time.perf_counter`` for CPU models, CUDA events
(synchronised once per step) for GPU models. Times are aggregated by layer type; the share of the
step spent in convolution is reported for the whole step and for the forward pass alone (the
book's fig. 8-14 shows the forward share). An untimed ``train_on_batch`` of the same batch runs
interleaved with the profiled steps, and the difference is reported as the profiling overhead.

Layers that the model fuses into the previous one (a ReLU into a conv's or a BatchNorm's
epilogue; at inference a BatchNorm folded into its conv) get no time of their own: it is
counted in the layer they are fused into, and a note says so.

:func:`profile_torch` measures the same breakdown for the model's PyTorch twin
(:func:`fastconv.torch_bridge.to_torch`, weights copied) with ``torch.profiler``: the step is
wrapped in ``record_function`` ranges (``fc::forward``, ``fc::loss``, ``fc::backward``,
``fc::update``), and the inclusive CPU time of each top-level operator inside a range (direct
children: ``aten::conv2d``, ``aten::batch_norm``... in the forward range; the autograd nodes
``autograd::engine::evaluate_function: ConvolutionBackward0``... in the backward range) is put
in a category by its name (:func:`torch_category`). A range's own time outside its operators
is ``framework``. ``fastconv profile --model NAME`` runs both and draws them side by side.

The parts: :mod:`~fastconv.profiler.timing` (clocks, hooks, :func:`profile_model`,
:func:`profile_forward`, :class:`ProfileResult`), :mod:`~fastconv.profiler.torch_twin`
(:func:`profile_torch`), :mod:`~fastconv.profiler.charts` (the book's groups, the charts) and
:mod:`~fastconv.profiler.command` (``fastconv profile``). Everything public is importable from
here.
"""

import time

from .charts import GROUPS, chart_groups, comparison_table, plot_comparison
from .command import add_subcommand
from .timing import ProfileResult, profile_forward, profile_model
from .torch_twin import TorchProfileResult, profile_torch, torch_category

#: The CPU clock: the one place the profiler reads the time, so tests can substitute a clock
#: that advances by known amounts (their assertions then hold on any machine load). The timing
#: code reads it through this package at every call, so substituting it here works.
_now = time.perf_counter

__all__ = [
    "ProfileResult",
    "TorchProfileResult",
    "profile_model",
    "profile_forward",
    "profile_torch",
    "torch_category",
    "chart_groups",
    "comparison_table",
    "GROUPS",
    "plot_comparison",
    "add_subcommand",
]
