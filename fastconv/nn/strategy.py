"""How ``fit`` spreads training over processes: the one-process :class:`Strategy`.

``fit`` calls the same hooks whatever the strategy, so it has no branch for distribution:
this class is the one-process answer to each (the identity, or nothing to do), and
:class:`fastconv.nn.MPIDataParallel` overrides them to train data-parallel over MPI ranks
(docs/distributed.md).
"""

from __future__ import annotations

__all__ = ["Strategy", "LOCAL", "check_strategy"]


class Strategy:
    """Training in this process alone (the default of ``fit(strategy=None)``)."""

    #: ``share(idx)``: the part of a global batch's indices this process trains on; None for
    #: all of it (the background augmentation thread then augments every sample)
    share = None

    def begin(self, model, *, callbacks, verbose, progress, **settings):
        """Before the first epoch: returns the callbacks, ``verbose`` and ``progress`` this
        process uses (``settings``: the data and fit's arguments, for strategies that must
        agree on them)."""
        return callbacks, verbose, progress

    def begin_epoch(self, model, epoch: int) -> None:
        """After the epoch's shuffle, before its batches."""

    def shard(self, idx):
        """The indices of a global batch that this process trains on, at the step itself."""
        return idx

    def scale_loss_gradient(self, dscores):
        """This process's loss gradient, scaled to its part of the global batch's mean."""
        return dscores

    def reduce_gradients(self, model, grads: dict, logs: dict) -> dict:
        """The global batch's gradients (in ``grads``, in place) and logs."""
        return logs

    def agree_stop(self, stop: bool) -> bool:
        """Whether to stop, agreed by every process."""
        return stop

    def end_epoch(self, model) -> None:
        """At the end of an epoch, before validation and checkpoints."""

    def end(self, model) -> None:
        """After the last epoch (also one cut short)."""

    def eval_range(self, n: int) -> tuple[int, int]:
        """The samples ``[first, stop)`` of ``n`` that this process evaluates."""
        return 0, n

    def sum_over_ranks(self, *values: float) -> tuple:
        """Sums of ``values`` over the processes."""
        return values


#: the strategy of ``fit(strategy=None)``, ``evaluate`` and ``train_on_batch``
LOCAL = Strategy()


def check_strategy(strategy) -> Strategy:
    """``strategy`` (None: :data:`LOCAL`), or a TypeError saying what is expected; a string
    such as "mpi" was an AttributeError deep inside fit."""
    if strategy is None:
        return LOCAL
    if not isinstance(strategy, Strategy):
        raise TypeError(
            "strategy must be None or a fastconv.nn.MPIDataParallel, got "
            f"{type(strategy).__name__} (for MPI: strategy=MPIDataParallel())"
        )
    return strategy
