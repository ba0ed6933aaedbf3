"""CPU backend: Numba kernels. Called only from :mod:`fastconv.ops`, after validation.

Threading layer: unless the user chose one (``NUMBA_THREADING_LAYER`` or
``NUMBA_THREADING_LAYER_PRIORITY`` in the environment, or ``numba.config.THREADING_LAYER``
assigned before this import), this module asks Numba for the OpenMP layer first, then TBB,
then ``workqueue``. On the idle 2-core machine a deep-MNIST training step took 33.9 ms with
OpenMP and 43.1 ms with ``workqueue`` (PyTorch 36 ms in the same runs): ``workqueue`` barely
ran the two threads' work in parallel (conv6 forward + backward 9.1 ms on 2 threads vs 11.9 on
one; OpenMP 5.7-6.4 ms). Trade-off (docs/kernels.md, "Optimisation log"): when other busy
processes share the cores, OpenMP's spinning threads make each parallel region wait for a
time slice (8 ms per launch measured under load, against ~50 us with ``workqueue``). So unless
the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``, this module caps GNU OpenMP's spinning
at ``GOMP_SPINCOUNT=3000`` iterations before a thread sleeps (2026-12-07, deep-MNIST training
step, two processes taking turns: alone 36.5 ms default vs 37.5 ms capped; with another busy
process on the machine 191-229 ms default vs 88 ms capped, 65 ms with
``OMP_WAIT_POLICY=passive``, which costs 12% alone). On a machine shared with busy processes
``OMP_WAIT_POLICY=passive`` or ``NUMBA_THREADING_LAYER=workqueue`` go further. OpenMP reads
these when it is first loaded: a library that loads the same OpenMP runtime before
fastconv's first parallel kernel keeps its own settings. The choice is process-wide and takes effect
only if no parallel Numba code has run yet (``numba.set_num_threads`` counts: import
``fastconv.cpu`` before calling it).
"""

import os

import numba

from .._checks import CONV_ALGORITHMS
from ..kernels import Kernels, fusable_update
from . import optim
from ._workspace import launch_guard
from .activation import ActivationKernels
from .augment import AugmentKernels
from .batchnorm import BatchNormKernels
from .conv import ConvKernels
from .dense import DenseKernels
from .global_pool import GlobalPoolKernels
from .grouped import GroupedKernels
from .im2col import UnfoldKernels
from .pool import PoolKernels


def _choose_threading_layer() -> None:
    user_chose = (
        "NUMBA_THREADING_LAYER" in os.environ
        or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ
        or numba.config.THREADING_LAYER != "default"
    )
    if not user_chose:
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        # spin briefly between parallel regions, then sleep (module docstring)
        os.environ["GOMP_SPINCOUNT"] = "3000"


# Importing the kernels launches nothing (njit compiles on first call), so this still comes
# before any fastconv parallel region.
_choose_threading_layer()

__all__ = ["KERNELS", "CpuKernels", "launch_guard"]


class CpuKernels(
    UnfoldKernels,
    ConvKernels,
    GroupedKernels,
    PoolKernels,
    BatchNormKernels,
    GlobalPoolKernels,
    DenseKernels,
    ActivationKernels,
    AugmentKernels,
    Kernels,
):
    """The Numba kernels as the :class:`~fastconv.kernels.Kernels` interface. Each kernel
    module declares its ops in a small class next to the kernels (``ActivationKernels`` in
    :mod:`.activation`...), so an op added to a module needs no line here."""

    conv_algorithms = CONV_ALGORITHMS
    conv_activations = (None, "relu", "relu6")  # ReLU6 in the stores (cpu.conv.fuses_relu6)

    # One fused parallel pass each (fastconv.cpu.optim), bit-identical to the base class's
    # array expressions, which still serve arrays the fused kernels do not take.
    def adam_update(self, p, g, m, v, c1, c2, lr_t, eps):
        if not fusable_update(p, g, m, v):
            return super().adam_update(p, g, m, v, c1, c2, lr_t, eps)
        optim.adam_update(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1),
                          c1, c2, lr_t, eps)  # fmt: skip

    def momentum_update(self, p, g, v, momentum, lr):
        if not fusable_update(p, g, v):
            return super().momentum_update(p, g, v, momentum, lr)
        optim.momentum_update(p.reshape(-1), g.reshape(-1), v.reshape(-1), momentum, lr)

    def sgd_update(self, p, g, lr):
        if not fusable_update(p, g):
            return super().sgd_update(p, g, lr)
        optim.sgd_update(p.reshape(-1), g.reshape(-1), lr)

    def nesterov_update(self, p, g, v, m, lr, mm, c):
        if not fusable_update(p, g, v):
            return super().nesterov_update(p, g, v, m, lr, mm, c)
        optim.nesterov_update(p.reshape(-1), g.reshape(-1), v.reshape(-1), m, lr, mm, c)

    def adagrad_update(self, p, g, h, lr, eps):
        if not fusable_update(p, g, h):
            return super().adagrad_update(p, g, h, lr, eps)
        optim.adagrad_update(p.reshape(-1), g.reshape(-1), h.reshape(-1), lr, eps)

    def rmsprop_update(self, p, g, h, d, c, lr, eps):
        if not fusable_update(p, g, h):
            return super().rmsprop_update(p, g, h, d, c, lr, eps)
        optim.rmsprop_update(p.reshape(-1), g.reshape(-1), h.reshape(-1), d, c, lr, eps)


KERNELS = CpuKernels()
