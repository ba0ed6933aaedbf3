"""MPI rank handling of ``mpiexec -n N fastconv train-mnist``: which strategy a process uses,
which rank owns the output folder, and how one rank's failure ends the job."""

from __future__ import annotations

import sys
import time
from pathlib import Path

__all__ = ["strategy_for", "is_root", "on_root", "run_rank"]


def strategy_for(args):
    """The MPI strategy when an MPI launcher started this process (or ``--distributed mpi``);
    None for a plain run, which never imports MPI."""
    from ..nn.distributed import launcher_world_size

    size = launcher_world_size()
    if args.distributed == "none":
        if size is not None and size > 1:
            raise ValueError(
                f"--distributed none, but an MPI launcher started {size} processes: each would "
                "train alone and write the same files; drop --distributed none, or run one "
                "process"
            )
        return None
    if args.distributed == "auto" and size is None:
        return None
    from ..nn.distributed import MPIDataParallel

    try:
        return MPIDataParallel()
    except ImportError as e:
        started = f"an MPI launcher started {size} processes, but " if size else ""
        raise ImportError(f"{started}{e}") from None


def is_root(strategy) -> bool:
    """Whether this process owns the output folder (rank 0, or the only process)."""
    return strategy is None or strategy.is_root


def on_root(strategy, fn):
    """``fn()`` evaluated on rank 0 (which owns the output directory), on every rank."""
    if strategy is None:
        return fn()
    return strategy.broadcast_object(fn() if strategy.is_root else None)


def run_rank(train, args, strategy) -> int:
    """``train(args, strategy)`` on one rank: every rank trains, rank 0 prints and writes. The
    other ranks' output is held back and shown only when their failure is their own. A rank
    that stops mid-training (an error, Ctrl-C, a rank that stopped answering) ends the whole
    job with MPI_Abort, since the others would wait for it forever."""
    import contextlib
    import io
    import traceback

    from .._cliutil import error_text, one_line
    from ..nn.distributed import DistributedError, DistributedSetupError

    line = strategy.describe(strategy.configure_threads())
    if line:
        print(line, flush=True)
    held = io.StringIO()
    with contextlib.ExitStack() as stack:
        if not strategy.is_root:
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            stack.enter_context(contextlib.redirect_stderr(held))
        try:
            rc = train(args, strategy)
        except DistributedSetupError as e:  # raised on every rank alike
            print(f"error: {e}", file=sys.stderr)
            rc = 2
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            rc = 130
        except DistributedError as e:
            print(f"error: {e}", file=sys.stderr)
            rc = 1
        except (ValueError, TypeError, OSError, MemoryError) as e:  # as cli.main does
            print(f"error: {one_line(error_text(e))}", file=sys.stderr)
            rc = 1
        except Exception:
            traceback.print_exc()
            rc = 1
    me = f"rank {strategy.rank} of {strategy.size}"
    if strategy.phase == "idle":  # stopped before training, while the others may be starting
        root_trains = strategy.withdraw()
        if root_trains and not strategy.is_root:  # rank 0 cannot say why
            _show(held.getvalue(), me)
    elif strategy.phase in ("setup", "training"):
        if rc == 130:  # Ctrl-C reaches every rank: let rank 0 say where to resume
            if not strategy.is_root:
                time.sleep(1.0)
        else:
            if not strategy.is_root:
                _show(held.getvalue(), me)
            last = Path(args.out) / "last.npz"
            resume = f"; rerun with --resume to continue from {last}" if last.exists() else ""
            print(
                f"error: {me} stopped during training: stopping every rank (MPI_Abort){resume}",
                file=sys.stderr,
                flush=True,
            )
        sys.stderr.flush()
        strategy.abort(rc)
    return rc


def _show(text, who):
    for line in text.strip().splitlines():
        print(f"[{who}] {line}", file=sys.stderr)
    sys.stderr.flush()
