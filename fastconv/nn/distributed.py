"""Synchronous data-parallel training over MPI: :class:`MPIDataParallel` (``pip install
"fastconv[mpi]"``; docs/distributed.md).

Horovod's scheme on mpi4py: every rank (process) holds the whole model; rank 0's weights, state
and generator are broadcast when training starts; every global batch is split over the ranks;
each rank runs forward and backward on its share, and the gradients are summed with
``Allreduce`` on contiguous float32 buckets, so every rank applies the same update and the
weights stay identical without ever being sent again.

The global batch size and learning rate mean what they mean in one process: rank ``r`` scales
its loss gradient by ``m_r / m`` (its share of the ``m`` samples), so the summed gradient is the
gradient of the mean loss over the whole batch. With ``sync_batch_norm`` the BatchNorm batch
statistics are also computed over the whole batch (two extra small allreduces per layer per
step), and two ranks then reproduce one process within float32 rounding; by default they are
per rank (as PyTorch's DDP), and the moving statistics are averaged over the ranks at the end of
every epoch.

Nothing here imports MPI until a strategy is created: without the ``mpi`` extra the rest of
fastconv never touches it. Every wait on the other ranks has a deadline (``timeout``): a rank
that died or hangs turns into a :class:`DistributedError` naming what was being waited for,
instead of a silent deadlock. A rank killed outright is normally handled sooner by the launcher
(``mpiexec`` ends the whole job within about a second).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import tempfile
import time
import weakref

import numpy as np

from .backend import to_numpy
from .strategy import Strategy

__all__ = [
    "MPIDataParallel",
    "DistributedError",
    "DistributedSetupError",
    "launcher_world_size",
    "import_mpi",
]

INSTALL_HINT = (
    "install the extra: pip install 'fastconv[mpi]' (mpi4py and MPICH from wheels), or on a "
    "cluster mpi4py built against the cluster's own MPI (see docs/distributed.md)"
)

# Variables MPI launchers set in every process they start: Open MPI, MPICH/Intel MPI (Hydra,
# and Slurm's PMI-2), MVAPICH.
_LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")

DEFAULT_TIMEOUT = 600.0  # seconds; FASTCONV_MPI_TIMEOUT overrides
ABORT_GRACE_S = 0.5  # seconds a rank's flushed output has to reach the launcher (abort)
_SPIN_S = 0.01  # poll without sleeping this long before backing off to 1 ms sleeps


_TRAINING = weakref.WeakSet()  # strategies whose ranks may be waiting on this one
_previous_excepthook = None


def _abort_on_uncaught(kind, value, tb):
    """An exception no one caught while the other ranks may wait in a collective for this one:
    print it, then end the whole job (as ``python -m mpi4py`` does) instead of leaving them
    waiting for the timeout."""
    _previous_excepthook(kind, value, tb)
    for strategy in list(_TRAINING):
        if strategy.phase in ("setup", "training"):
            print(
                f"rank {strategy.rank} of {strategy.size}: uncaught {kind.__name__} during "
                "distributed training: stopping every rank (MPI_Abort)",
                file=sys.stderr,
                flush=True,
            )
            strategy.abort(1)


def _watch_uncaught(strategy) -> None:
    global _previous_excepthook
    if _previous_excepthook is None:
        _previous_excepthook = sys.excepthook
        sys.excepthook = _abort_on_uncaught
    _TRAINING.add(strategy)


class DistributedError(RuntimeError):
    """A rank stopped answering (died, hangs, or left training early). The communicator is
    unusable afterwards: end the process, or call :meth:`MPIDataParallel.abort`."""


class DistributedSetupError(ValueError):
    """The ranks cannot train together (different models, data or settings; a batch too
    small to split). Raised identically on every rank, before any training step."""


def launcher_world_size() -> int | None:
    """How many processes an MPI launcher started, read from the variables it sets
    (``PMI_SIZE``, ``OMPI_COMM_WORLD_SIZE``, ``MV2_COMM_WORLD_SIZE``); None when this process
    was not started by a launcher fastconv recognises. Does not import MPI."""
    for var in _LAUNCHER_SIZE_VARS:
        value = os.environ.get(var)
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                continue
    return None


def import_mpi():
    """``mpi4py.MPI`` (initialising MPI), or an ImportError saying how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError(
            f"MPIDataParallel needs mpi4py and an MPI library: {INSTALL_HINT} ({e})"
        ) from e
    return MPI


def _timeout_from_env() -> float:
    text = os.environ.get("FASTCONV_MPI_TIMEOUT")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"FASTCONV_MPI_TIMEOUT must be a number of seconds, got {text!r}"
        ) from None
    if not value > 0 or not np.isfinite(value):
        raise ValueError(f"FASTCONV_MPI_TIMEOUT must be positive seconds, got {text!r}")
    return value


class _Bucket:
    """One contiguous float32 buffer holding several gradients (and, in the first bucket, this
    rank's share of the batch loss and metrics)."""

    def __init__(self, entries, extra):
        self.entries = []  # (key, shape, offset, size)
        offset = 0
        for key, shape in entries:
            size = int(np.prod(shape, dtype=np.int64))
            self.entries.append((key, shape, offset, size))
            offset += size
        self.buffer = np.zeros(offset + extra, np.float32)


class MPIDataParallel(Strategy):
    """Synchronous data parallelism over MPI ranks, for :meth:`Model.fit`.

    ::

        # mpiexec -n 4 python train.py
        strategy = nn.MPIDataParallel()
        model.fit(x, y, batch_size=256, epochs=10, strategy=strategy)  # 64 samples per rank

    Every rank must build the same model, load the same data and call ``fit`` with the same
    settings; that is checked (a fingerprint compared over the ranks) before training, and a
    difference raises :class:`DistributedSetupError` on every rank. Rank 0's weights, BatchNorm
    state, optimizer state and generator are then broadcast. Each global batch of ``m`` samples
    is split into contiguous shares of ``m // p`` or ``m // p + 1`` samples; the logs (loss,
    accuracy, validation) are means over the whole batch or data set, identical on every rank.
    Only rank 0 prints and shows progress; callbacks that write files (ModelCheckpoint,
    CSVLogger, JSONLogger, or any with ``root_only = True``) run on rank 0 only, the others on
    every rank (they see identical logs; a stop requested on any rank stops all of them).

    Dropout: the model's generator shuffles (identically on every rank); each rank draws its
    dropout masks from its own stream, seeded from the shared generator, the epoch and the
    rank, so a run is reproducible for a given number of ranks and a resumed run continues
    exactly as an uninterrupted one.

    Parameters
    ----------
    comm : mpi4py communicator, optional
        ``MPI.COMM_WORLD`` by default.
    sync_batch_norm : bool
        Compute BatchNorm batch statistics over the whole global batch (exact equivalence with
        one process, two small allreduces per layer per step) instead of per rank.
    bucket_mb : float
        Largest gradient bucket in MiB (25, as PyTorch's DDP); each bucket is one allreduce.
    timeout : float, optional
        Seconds to wait for the other ranks at any point before raising
        :class:`DistributedError` (default: ``FASTCONV_MPI_TIMEOUT`` or 600). It must exceed
        the longest stretch one rank works alone (rank 0 writing checkpoints and plots).
    """

    def __init__(self, comm=None, sync_batch_norm=False, bucket_mb=25.0, timeout=None):
        MPI = import_mpi()
        self.MPI = MPI
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(f"comm must be an mpi4py Intracomm, got {type(comm).__name__}")
        if not isinstance(sync_batch_norm, (bool, np.bool_)):
            raise TypeError(f"sync_batch_norm must be a bool, got {type(sync_batch_norm).__name__}")
        ok = isinstance(bucket_mb, (int, float)) and not isinstance(bucket_mb, bool)
        if not ok or not 0 < bucket_mb < np.inf:
            raise ValueError(f"bucket_mb must be a positive number, got {bucket_mb!r}")
        if timeout is None:
            timeout = _timeout_from_env()
        ok = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
        if not ok or not 0 < timeout < np.inf:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.sync_batch_norm = bool(sync_batch_norm)
        self.bucket_bytes = int(bucket_mb * (1 << 20))
        self.timeout = float(timeout)
        #: "idle" -> "setup" -> "training" -> "done"; "refused" after a DistributedSetupError
        self.phase = "idle"
        self._buckets: list[_Bucket] = []
        self._fraction = 1.0
        self._shared_rng_state = None
        self._synchronised: list = []
        self._epoch = 0
        self._step = 0

    @property
    def is_root(self) -> bool:
        """True on rank 0, the rank that prints and writes files."""
        return self.rank == 0

    def __repr__(self):
        return (
            f"MPIDataParallel(rank {self.rank} of {self.size}, "
            f"sync_batch_norm={self.sync_batch_norm})"
        )

    # -- waiting with a deadline ------------------------------------------------------------------
    def _wait(self, request, what: str) -> None:
        """Complete a non-blocking MPI request, or raise DistributedError after ``timeout``.

        Spins briefly (the usual wait is a few microseconds to milliseconds), then polls every
        millisecond so a rank waiting for a slower one gives the core back.
        """
        if request.Test():
            return
        start = time.monotonic()
        while not request.Test():
            waited = time.monotonic() - start
            if waited > _SPIN_S:
                if waited > self.timeout:
                    raise DistributedError(
                        f"rank {self.rank} of {self.size}: no answer from the other ranks for "
                        f"{self.timeout:g} s while {what}: a rank died, hangs or left training "
                        "(the job cannot continue; see docs/distributed.md)"
                    )
                time.sleep(0.001)

    def _allreduce(self, buf, what, op=None) -> None:
        op = self.MPI.SUM if op is None else op
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=op), what)

    def _barrier(self, what) -> None:
        self._wait(self.comm.Ibarrier(), what)

    def _allgather_object(self, obj, what):
        self._barrier(what)  # everyone is here: the blocking call below cannot hang
        return self.comm.allgather(obj)

    def broadcast_object(self, obj, what="receiving rank 0's decision"):
        """Rank 0's ``obj`` (any picklable value) on every rank."""
        self._barrier(what)
        return self.comm.bcast(obj if self.is_root else None, root=0)

    def _bcast_bytes(self, data: bytes | None, what) -> bytes:
        """Rank 0's bytes on every rank, as a buffer (no pickle size limits)."""
        n = np.array([len(data) if self.is_root else 0], np.int64)
        self._wait(self.comm.Ibcast(n, root=0), what)
        buf = np.frombuffer(data, np.uint8).copy() if self.is_root else np.empty(n[0], np.uint8)
        self._wait(self.comm.Ibcast(buf, root=0), what)
        return buf.tobytes()

    def abort(self, code: int = 1) -> None:
        """End every rank of the job (``MPI_Abort``): the way out after a DistributedError.
        The rank's output is flushed and given ``ABORT_GRACE_S`` to reach the launcher first:
        MPICH's launcher tears the job down at the abort and drops what it has not yet
        forwarded (seen in CI: rank 0's last error line, the one naming ``--resume``, lost in
        about one run in ten)."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(int(code))

    # -- joining or skipping training --------------------------------------------------------------
    def _vote(self, training: bool) -> np.ndarray:
        """Every rank says whether it reached training; returns the flags of all ranks."""
        mine = np.array([1 if training else 0], np.int32)
        flags = np.zeros(self.size, np.int32)
        self._wait(self.comm.Iallgather(mine, flags), "waiting for every rank to start training")
        return flags

    def withdraw(self) -> bool:
        """Call on a rank that will not reach ``fit`` (it failed to load its data, say) while
        the others may be starting it: they then raise DistributedSetupError instead of
        waiting. Returns whether rank 0 was starting to train (then this rank's reason is the
        one to report)."""
        flags = self._vote(training=False)
        self.phase = "refused"
        return bool(flags[0])

    # -- setup -------------------------------------------------------------------------------------
    def begin(
        self,
        model,
        *,
        x,
        y,
        validation,
        batch_size,
        epochs,
        initial_epoch,
        shuffle,
        callbacks,
        verbose,
        progress,
    ):
        """Called by ``fit`` before the first epoch: agree, broadcast, plan the buckets.

        Returns the callbacks, ``verbose`` and ``progress`` this rank uses.
        """
        flags = self._vote(training=True)
        if not flags.all():
            self.phase = "refused"
            missing = [int(r) for r in np.flatnonzero(flags == 0)]
            raise DistributedSetupError(
                f"rank(s) {missing} of {self.size} stopped before training (see their error "
                "message); the other ranks stop too"
            )
        self.phase = "setup"
        _watch_uncaught(self)
        try:
            self._agree(model, x, y, validation, batch_size, epochs, initial_epoch, shuffle)
            self._check_split(x.shape[0], batch_size)
        except DistributedSetupError:
            self.phase = "refused"
            raise
        self._broadcast_state(model)
        self._plan_buckets(model)
        if self.sync_batch_norm:
            self._synchronise_batch_norm(model)
        self._epoch, self._step = initial_epoch, 0
        self._shared_rng_state = None
        self.phase = "training"
        if not self.is_root:
            callbacks = [cb for cb in callbacks if not _root_only(cb)]
            verbose, progress = 0, False
        return callbacks, verbose, progress

    def _fingerprint(self, model, x, y, validation, settings) -> dict:
        from .. import __version__

        weights = [
            [
                f"{layer.name}/{name}",
                list(layer.get_weight(name).shape),
                str(layer.get_weight(name).dtype),
            ]
            for layer, name in model.weight_entries()
        ]
        opt = model.optimizer
        return {
            "fastconv version": __version__,
            "parameter shapes": weights,
            "model architecture": json.dumps(model.get_config(), sort_keys=True),
            "trainable weights": [f"{a}/{b}" for a, b in model.trainable_weight_keys()],
            "optimizer": json.dumps([type(opt).__name__, opt.get_config()], sort_keys=True),
            "loss": type(model.loss).__name__,
            "fit settings": json.dumps(settings, sort_keys=True),
            "training data": _data_digest(x, y),
            "validation data": None if validation is None else _data_digest(*validation),
            "strategy": [self.sync_batch_norm, self.bucket_bytes],
        }

    def _agree(self, model, x, y, validation, batch_size, epochs, initial_epoch, shuffle):
        settings = {
            "batch_size": batch_size,
            "epochs": epochs,
            "initial_epoch": initial_epoch,
            "shuffle": bool(shuffle),
        }
        mine = self._fingerprint(model, x, y, validation, settings)
        everyone = self._allgather_object(mine, "comparing the ranks' models before training")
        problems = []
        for r, theirs in enumerate(everyone[1:], start=1):
            for key, value in everyone[0].items():
                if theirs.get(key) != value:
                    problems.append(_describe(key, value, theirs.get(key), r))
        if problems:
            raise DistributedSetupError(
                f"the {self.size} ranks cannot train together; compared with rank 0: "
                + "; ".join(problems)
            )

    def _check_split(self, n, batch_size):
        p = self.size
        if batch_size < p:
            raise DistributedSetupError(
                f"batch_size={batch_size} is smaller than the {p} ranks: batch_size is the "
                f"global batch, split over the ranks, and every rank needs at least one sample "
                f"of every batch; use batch_size >= {p}"
            )
        last = n % batch_size
        if last and last < p:
            raise DistributedSetupError(
                f"the last batch of every epoch holds {last} sample(s) ({n} samples, "
                f"batch_size={batch_size}), fewer than the {p} ranks; choose a batch size that "
                f"divides {n} or leaves at least {p}, or drop {last} samples"
            )

    def _broadcast_state(self, model) -> None:
        what = "broadcasting rank 0's weights"
        for layer, name in model.weight_entries():
            w = layer.get_weight(name)
            host = np.ascontiguousarray(to_numpy(w))
            self._wait(self.comm.Ibcast(host.view(np.uint8), root=0), what)  # exact bits
            if not self.is_root:
                w[...] = model.backend.asarray(host, w.dtype)
                layer.weights_changed()
        opt = model.optimizer
        state = (model.rng.bit_generator.state, opt.state_dict())
        rng_state, opt_state = self.broadcast_object(state, "broadcasting rank 0's optimizer")
        if not self.is_root:
            model.rng.bit_generator.state = rng_state
            keys = [f"{a}/{b}" for a, b in model.trainable_weight_keys()]
            opt.load_state_dict(opt_state, model.parameters(), keys)

    def _plan_buckets(self, model) -> None:
        """Gradients in reverse graph order (the order backward produces them), packed into
        buckets of at most ``bucket_mb``; the first bucket also carries the metrics."""
        by_name = {layer.name: layer for layer in model.layers}
        entries = [
            ((lname, wname), tuple(by_name[lname].params[wname].shape))
            for lname, wname in reversed(model.trainable_weight_keys())
        ]
        limit = max(1, self.bucket_bytes // 4)
        groups, current, used = [], [], 0
        for key, shape in entries:
            size = int(np.prod(shape, dtype=np.int64))
            if current and used + size > limit:
                groups.append(current)
                current, used = [], 0
            current.append((key, shape))
            used += size
        groups.append(current)
        # The first bucket's tail carries the step's logs: the loss and each compiled metric.
        self._n_logs = 1 + len(model._metric_list())
        self._buckets = [_Bucket(g, self._n_logs if i == 0 else 0) for i, g in enumerate(groups)]

    # -- per epoch and per step (called by fit and train_on_batch) ---------------------------------
    def begin_epoch(self, model, epoch: int) -> None:
        """After the epoch's shuffle: switch the model's generator to this rank's dropout stream
        (seeded from the shared state, the epoch and the rank; the shared state comes back at
        the end of the epoch, so the shuffles match a one-process run without dropout)."""
        self._epoch = epoch
        bit_generator = model.rng.bit_generator
        shared = bit_generator.state
        self._shared_rng_state = shared
        digest = hashlib.blake2b(repr(shared).encode(), digest_size=16).digest()
        words = [int.from_bytes(digest, "little"), int(epoch), self.rank]
        own = type(bit_generator)(np.random.SeedSequence(words))
        bit_generator.state = own.state

    def share(self, idx):
        """This rank's contiguous share of a global batch's sample indices (no side effects:
        the background augmentation thread calls it ahead of the step)."""
        m = len(idx)
        return idx[m * self.rank // self.size : m * (self.rank + 1) // self.size]

    def shard(self, idx):
        """:meth:`share`, at the step that trains on it (records the share's fraction)."""
        part = self.share(idx)
        self._fraction = len(part) / len(idx)
        self._step += 1
        return part

    def scale_loss_gradient(self, dscores):
        """The loss gradient of this rank's share, scaled to its part of the global mean."""
        if self._fraction == 1.0:
            return dscores
        return (dscores * np.float32(self._fraction)).astype(dscores.dtype, copy=False)

    def reduce_gradients(self, model, grads: dict, logs: dict) -> dict:
        """Sum the ranks' (already scaled) gradients in place in ``grads`` and return the global
        batch's mean of each log (loss and metrics). Gradients come back as float32."""
        if len(logs) != self._n_logs:
            raise RuntimeError(
                f"{len(logs)} step logs to reduce ({sorted(logs)}), planned for {self._n_logs}: "
                "compile the model before fit(strategy=...)"
            )
        names = list(logs)
        what = f"summing the gradients of step {self._step} (epoch {self._epoch + 1})"
        requests = []
        for i, bucket in enumerate(self._buckets):
            buf = bucket.buffer
            for key, _, offset, size in bucket.entries:
                g = grads.get(key)
                if g is None:
                    raise RuntimeError(f"no gradient for {key[0]}/{key[1]} to reduce")
                buf[offset : offset + size] = to_numpy(g).reshape(-1)  # float16 -> float32 here
            if i == 0:
                tail = buf[len(buf) - len(names) :]
                tail[:] = [logs[k] * self._fraction for k in names]
            requests.append(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM))
        for request in requests:
            self._wait(request, what)
        for bucket in self._buckets:
            for key, shape, offset, size in bucket.entries:
                grads[key] = model.backend.asarray(
                    bucket.buffer[offset : offset + size].reshape(shape), np.float32
                )
        first = self._buckets[0].buffer
        tail = first[len(first) - len(names) :]
        return {k: float(v) for k, v in zip(names, tail, strict=True)}

    def agree_stop(self, stop: bool) -> bool:
        """True on every rank if a callback asked any rank to stop."""
        flag = np.array([1 if stop else 0], np.int32)
        self._allreduce(flag, "agreeing whether to stop", op=self.MPI.MAX)
        return bool(flag[0])

    def end_epoch(self, model) -> None:
        """At the end of an epoch, before validation and checkpoints: the shared generator
        back, BatchNorm moving statistics averaged, and the ranks checked to be identical."""
        self._restore_rng(model)
        self._average_buffers(model)
        self._verify_identical(model)

    def end(self, model) -> None:
        """After the last epoch (also one cut short by a callback)."""
        if self._restore_rng(model):  # cut short mid-epoch: end_epoch did not run
            self._average_buffers(model)
        self._release_batch_norm()
        self.phase = "done"

    def _restore_rng(self, model) -> bool:
        if self._shared_rng_state is None:
            return False
        model.rng.bit_generator.state = self._shared_rng_state
        self._shared_rng_state = None
        return True

    def _average_buffers(self, model) -> None:
        """Per-rank BatchNorm sees different batches; its moving statistics are averaged (with
        ``sync_batch_norm`` they are already identical, and averaging leaves them so)."""
        entries = [
            (layer, name)
            for layer in model.layers
            for name, value in layer.buffers.items()
            if value is not None and value.dtype.kind == "f"
        ]
        if not entries or self.size == 1:
            return
        flat = np.concatenate(
            [to_numpy(layer.buffers[name]).astype(np.float64).ravel() for layer, name in entries]
        )
        self._allreduce(flat, "averaging the BatchNorm statistics")
        flat /= self.size
        offset = 0
        for layer, name in entries:
            buf = layer.buffers[name]
            size = int(np.prod(buf.shape, dtype=np.int64))
            buf[...] = model.backend.asarray(
                flat[offset : offset + size].reshape(buf.shape), buf.dtype
            )
            layer.weights_changed()
            offset += size

    def _verify_identical(self, model) -> None:
        """Compare a digest of the weights and optimizer state over the ranks. They stay
        identical when every rank gets the same allreduce result, which MPI recommends but
        does not promise; if they drifted, rank 0's are broadcast again (with a warning)."""
        h = hashlib.blake2b(digest_size=16)
        for w in model.get_weights():
            h.update(np.ascontiguousarray(w).tobytes())
        for key, value in sorted(model.optimizer.state_dict().items()):
            h.update(key.encode())
            h.update(np.ascontiguousarray(value).tobytes())
        digests = self._allgather_object(h.hexdigest(), "comparing the ranks' weights")
        if len(set(digests)) > 1:
            if self.is_root:
                import warnings

                warnings.warn(
                    "MPIDataParallel: the ranks' weights drifted apart (the MPI library's "
                    "allreduce gave ranks different roundings); rank 0's were broadcast again",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self._broadcast_state(model)

    # -- evaluation --------------------------------------------------------------------------------
    def eval_range(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share ``[start, stop)`` of ``n`` evaluation samples."""
        return n * self.rank // self.size, n * (self.rank + 1) // self.size

    def sum_over_ranks(self, *values: float) -> tuple:
        """Each value summed over the ranks (float64)."""
        buf = np.array(values, np.float64)
        self._allreduce(buf, "summing the evaluation results")
        return tuple(float(v) for v in buf)

    # -- threads and checkpoints for the command line ----------------------------------------------
    def configure_threads(self) -> dict:
        """Numba threads for this rank: the cores it may run on, shared by the ranks of its
        node whose cores overlap its own (a launcher that binds each rank to its own cores
        makes that 1), at least 1. ``NUMBA_NUM_THREADS`` in the environment wins. Returns
        ``{host, cores, sharing, threads}``."""
        import numba

        from .. import cpu  # noqa: F401  (chooses the threading layer before any launch)

        if hasattr(os, "sched_getaffinity"):
            mine = sorted(os.sched_getaffinity(0))
        else:  # macOS, Windows
            mine = list(range(os.cpu_count() or 1))
        self._barrier("starting")
        local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
        try:
            sets = local.allgather(mine)
        finally:
            local.Free()
        sharing = sum(1 for s in sets if set(s) & set(mine))
        threads = max(1, len(mine) // max(sharing, 1))
        if "NUMBA_NUM_THREADS" in os.environ:
            threads = numba.get_num_threads()
        else:
            threads = min(threads, numba.config.NUMBA_NUM_THREADS)
            numba.set_num_threads(threads)
        return {
            "host": socket.gethostname(),
            "cores": len(mine),
            "sharing": sharing,
            "threads": threads,
        }

    def describe(self, info: dict) -> str | None:
        """One line about the job (on rank 0; None elsewhere), from every rank's
        :meth:`configure_threads` result."""
        everyone = self._allgather_object(info, "describing the job")
        if not self.is_root:
            return None
        hosts = sorted({i["host"] for i in everyone})
        threads = sorted({i["threads"] for i in everyone})
        lib = " ".join(self.MPI.Get_library_version().splitlines()[0].split())
        t = str(threads[0]) if len(threads) == 1 else f"{threads[0]}-{threads[-1]}"
        return (
            f"MPI: {self.size} ranks on {len(hosts)} node(s) ({lib}); Numba threads per rank: "
            f"{t} (rank 0: {info['cores']} cores shared by {info['sharing']} rank(s))"
        )

    def load_model(self, path, backend="cpu"):
        """Rank 0 loads and validates checkpoint ``path``; the other ranks get its bytes (no
        shared file system needed). Errors are raised on every rank."""
        from .loading import load_model
        from .saving import CheckpointError

        what = f"receiving {path} from rank 0"
        error = None
        if self.is_root:
            try:
                model = load_model(path, backend=backend)
                with open(path, "rb") as f:
                    data = f.read()
            except (CheckpointError, OSError) as e:
                error = (type(e).__name__, str(e))
        error = self.broadcast_object(error, what)
        if error is not None:
            kind, message = error
            raise (FileNotFoundError if kind == "FileNotFoundError" else CheckpointError)(message)
        data = self._bcast_bytes(data if self.is_root else None, what)
        if self.is_root:
            return model
        fd, tmp = tempfile.mkstemp(suffix=".npz", prefix="fastconv-rank-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return load_model(tmp, backend=backend)
        finally:
            os.remove(tmp)

    # -- synchronised BatchNorm --------------------------------------------------------------------
    def _synchronise_batch_norm(self, model) -> None:
        """Give every BatchNorm layer this strategy's sum over ranks as its reduction hook:
        its training statistics (and their gradients) are then the global batch's."""
        for layer in model.layers:
            if layer.kind == "norm":
                layer.reduction = self._allreduce
                self._synchronised.append(layer)

    def _release_batch_norm(self) -> None:
        for layer in self._synchronised:
            layer.reduction = None
        self._synchronised = []


def _root_only(callback) -> bool:
    from .callbacks import CSVLogger, JSONLogger, ModelCheckpoint

    return bool(getattr(callback, "root_only", False)) or isinstance(
        callback, (ModelCheckpoint, CSVLogger, JSONLogger)
    )


def _data_digest(x, y) -> list:
    """Shape, dtype and a digest of up to 64 evenly spaced samples of ``x`` and of all of
    ``y``: enough to tell different data sets apart without hashing all of ``x``."""
    n = x.shape[0]
    rows = np.unique(np.linspace(0, n - 1, min(n, 64)).astype(np.int64))
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(to_numpy(x[rows])).tobytes())
    h.update(np.ascontiguousarray(to_numpy(y)).tobytes())
    return [list(x.shape), str(x.dtype), list(y.shape), str(y.dtype), h.hexdigest()]


def _describe(key, ours, theirs, rank) -> str:
    if key == "parameter shapes":
        if len(ours) != len(theirs):
            return f"rank {rank} has {len(theirs)} weights, rank 0 has {len(ours)}"
        for a, b in zip(ours, theirs, strict=True):
            if a != b:
                return (
                    f"rank {rank} has weight {b[0]} of shape {tuple(b[1])} ({b[2]}) where rank "
                    f"0 has {a[0]} of shape {tuple(a[1])} ({a[2]}): a different model"
                )
    if key in ("training data", "validation data"):
        return f"rank {rank} has different {key} (shape, dtype or values)"
    if key == "fit settings":
        a, b = json.loads(ours), json.loads(theirs)
        diff = ", ".join(f"{k}={b.get(k)!r} (rank 0: {a.get(k)!r})" for k in a if a[k] != b.get(k))
        return f"rank {rank} calls fit with {diff}"
    if key == "fastconv version":
        return f"rank {rank} runs fastconv {theirs}, rank 0 runs {ours}"
    return f"rank {rank} has a different {key}"
