"""Batches prepared in a background thread, so that augmentation overlaps the training step.

:class:`BackgroundBatches` runs ``make_batch(b)`` for ``b = 0, 1, ...`` in one worker thread,
``depth`` batches ahead of the consumer, and yields them in order. The augmentation kernels are
serial Numba functions that release the GIL (``nogil=True``) and take no launch lock, so they
run on one core while the training step's parallel kernels run in the main thread. Results do
not depend on timing: the worker draws from its own generator, batch after batch in order.

:func:`augmented_batches` is what ``Model.fit(augment=...)`` uses: the epoch's permutation is
drawn by the caller, the augmentation generator is seeded from one number the caller draws
from the model's generator, so a resumed run (which restores that generator) augments exactly
as an uninterrupted one.
"""

from __future__ import annotations

import queue
import threading

import numpy as np

__all__ = ["BackgroundBatches", "EpochIterator", "augmented_batches", "check_transform"]

_DONE = object()


class BackgroundBatches:
    """Iterate over ``make_batch(0), ..., make_batch(n_batches - 1)`` computed in a worker
    thread at most ``depth`` batches ahead.

    An exception in the worker is raised in the consumer at the batch where it happened.
    :meth:`close` (also called when the iteration ends, is abandoned through ``with``, or the
    object is garbage collected) stops the worker after the batch it is making.
    """

    def __init__(self, make_batch, n_batches: int, depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._make = make_batch
        self._n = int(n_batches)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="fastconv-batches", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _work(self):
        try:
            for b in range(self._n):
                if self._stop.is_set():
                    return
                if not self._put((True, self._make(b))):
                    return
        except BaseException as e:  # handed to the consumer
            self._put((False, e))
            return
        self._put((True, _DONE))

    def __iter__(self):
        try:
            while True:
                ok, item = self._queue.get()
                if not ok:
                    raise item
                if item is _DONE:
                    return
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the worker and wait for it (it finishes the batch in progress)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._stop.set()
        except Exception:
            pass


def check_transform(transform):
    """``transform`` must be callable as ``transform(x_batch, rng)`` (e.g. a
    :class:`fastconv.augment.RandomTransform`)."""
    if transform is None:
        return None
    fn = getattr(transform, "transform", transform)
    if not callable(fn):
        raise TypeError(
            "augment must be callable as augment(x_batch, rng) -> batch, e.g. "
            f"fastconv.augment.RandomTransform(...), got {type(transform).__name__}"
        )
    return fn


def augmented_batches(x, y, order, batch_size, transform, seed, cast, depth: int = 2, share=None):
    """Background batches ``(transform(cast(x[idx]), rng), y[idx])`` over ``order``.

    ``seed`` seeds the epoch's augmentation generator; ``cast`` puts a batch in the dtype the
    transform and model expect (it runs in the worker too). ``share(idx)``, when given, picks
    this process's part of each batch's indices (data-parallel training augments only its
    own samples).
    """
    fn = check_transform(transform)
    rng = np.random.default_rng(seed)
    n_batches = -(-len(order) // batch_size)

    def make(b):
        idx = order[b * batch_size : (b + 1) * batch_size]
        if share is not None:
            idx = share(idx)
        xb = fn(cast(x[idx]), rng)
        return xb, y[idx]

    return BackgroundBatches(make, n_batches, depth)


class EpochIterator:
    """The batches of each epoch of ``fit``: the sample order (a permutation drawn from the
    model's generator when ``shuffle``), this process's share of each global batch (the
    strategy's), and augmentation in a background thread when ``augment`` is given.

    :meth:`epoch` yields ``(b, x_batch, y_batch, m)`` with ``m`` the global batch's size (the
    logs are its means). The generator draws happen in a fixed order (permutation, the
    strategy's ``begin_epoch``, the augmentation seed), so a resumed run, which restores the
    model's generator, sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, model, x, y, batch_size, shuffle, augment, strategy):
        self.model, self.x, self.y = model, x, y
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.strategy = strategy
        self.samples = x.shape[0]
        self.steps = -(-self.samples // batch_size)

    def epoch(self, epoch: int):
        model, strategy, bs = self.model, self.strategy, self.batch_size
        order = model.rng.permutation(self.samples) if self.shuffle else np.arange(self.samples)
        strategy.begin_epoch(model, epoch)
        loader = None
        if self.augment is not None:
            # Drawn after the permutation, from the model's generator (this rank's stream
            # under a strategy that switched it).
            seed = int(model.rng.integers(2**63 - 1))
            loader = augmented_batches(self.x, self.y, order, bs, self.augment, seed,
                                       model._cast_for_augment, share=strategy.share)  # fmt: skip
            batches = iter(loader)
        try:
            for b in range(self.steps):
                idx = order[b * bs : (b + 1) * bs]
                part = strategy.shard(idx)
                if loader is None:
                    xb, yb = model.backend.index(self.x, part), self.y[part]
                else:
                    xb, yb = next(batches)
                yield b, xb, yb, len(idx)
        finally:  # also when fit stops mid-epoch
            if loader is not None:
                loader.close()
