"""Crash-safe file writes: a temporary file in the target's directory, fsynced, renamed over it.

A crash or SIGKILL mid-write leaves the old file intact and a temporary file behind; its name
carries the writer's PID (``.tmp-<pid>-<random><suffix>``), so the next writer in that directory
removes the leftovers of processes that no longer run (:func:`remove_stale_temp_files`).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile

__all__ = ["atomic_write", "write_json_atomic", "remove_stale_temp_files", "strict_json"]

_TEMP = re.compile(r"^\.tmp-(\d+)-")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temp_files(directory) -> list[str]:
    """Delete temporary files left in ``directory`` by writers that are no longer running."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _TEMP.match(name)
        if m and not _alive(int(m.group(1))):
            try:
                os.remove(os.path.join(directory, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def atomic_write(path, write, suffix: str = "") -> None:
    """Call ``write(binary_file)`` on a temporary file, then rename it over ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temp_files(directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".tmp-{os.getpid()}-", suffix=suffix)
    try:
        # mkstemp creates the file 0600; give it the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def strict_json(value):
    """``value`` with every non-finite float replaced by None: valid JSON (no bare NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # NumPy scalars
        return strict_json(value.item())
    return value


def write_json_atomic(path, data) -> None:
    """Write ``data`` as strict JSON (NaN and inf written as null), atomically."""
    text = json.dumps(strict_json(data), indent=1, allow_nan=False)
    atomic_write(path, lambda f: f.write(text.encode()), suffix=".json")
