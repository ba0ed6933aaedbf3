"""Crash-safe file writes: a temporary file in the target's directory, fsynced, renamed over it.

A crash or SIGKILL mid-write leaves the old file intact and a temporary file behind. Its name
says who wrote it: ``.fastconv-tmp-<pid>-<random 8><suffix>`` (:data:`TEMP_PREFIX`, the
writer's PID and :func:`tempfile.mkstemp`'s unique token). A writer removes only the temporary
file it created itself, never anything else in the directory: the directory may belong to
somebody else, and a ``.tmp-<pid>-*`` of theirs is none of our business. Leftovers of killed
writers are removed by :func:`remove_stale_temp_files`, which only the owner of a directory
calls (``fastconv train-mnist`` on its run folder, under the folder's lock).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile

__all__ = [
    "atomic_write", "write_json_atomic", "remove_stale_temp_files", "strict_json", "TEMP_PREFIX",
    "pid_alive", "check_writable_file",
]  # fmt: skip

#: how every temporary file written here starts
TEMP_PREFIX = ".fastconv-tmp-"
# Exactly what atomic_write creates: the prefix, a PID, mkstemp's 8-character token, a suffix.
_TEMP = re.compile(r"^" + re.escape(TEMP_PREFIX) + r"(\d+)-[a-z0-9_]{8}(\.[A-Za-z0-9]+)?$")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (``os.kill(pid, 0)``)."""
    if pid == os.getpid():
        return True
    if pid <= 0:  # 0 and negatives name process groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OverflowError:  # not a PID this system can have
        return False
    return True


def remove_stale_temp_files(directory) -> list[str]:
    """Delete the temporary files that :func:`atomic_write` left in ``directory`` in processes
    that no longer run; nothing else. For the owner of ``directory`` only (a run folder under
    its lock): a PID is only meaningful on this machine."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _TEMP.match(name)
        if m and not pid_alive(int(m.group(1))):
            try:
                os.remove(os.path.join(directory, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def atomic_write(path, write, suffix: str = "") -> None:
    """Call ``write(binary_file)`` on a temporary file, then rename it over ``path``.

    On any failure (also Ctrl-C) the temporary file is removed; no other file is touched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=suffix)
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


def check_writable_file(path, what: str) -> None:
    """Refuse, before any work, an output file that cannot be written: a directory, a folder
    that does not exist or is not writable, a read-only file (a failed write after a long run
    loses the run). Raises ValueError naming ``what`` (e.g. ``"--plot"``)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{what} {path}: is a directory, not a file")
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: the folder {folder} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path}: the file is not writable")


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
