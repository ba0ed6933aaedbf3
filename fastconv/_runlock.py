"""An exclusive lock on a run folder, so that two runs cannot write into one folder at once.

``fastconv train-mnist --out DIR`` checks at start-up whether ``DIR`` holds a previous run; two
runs started together both pass that check and then overwrite each other's checkpoints and
history epoch by epoch. The lock closes that window: the first thing a run does is create
``DIR/.fastconv-run.lock`` with ``O_CREAT | O_EXCL`` (atomic on local file systems and on NFSv3+:
exactly one creator succeeds), holding JSON ``{pid, host, token, started, command}``; it is
removed when the run ends, also on an exception or Ctrl-C.

A run killed with SIGKILL (or a crash of the machine) leaves its lock behind. Such a lock is
*stale* when it names this machine and a PID that no longer runs (``os.kill(pid, 0)``), or a
PID that now belongs to a younger process (its start time, from ``/proc``, differs from the one
recorded): the next run replaces it and says so. A lock from another machine cannot be checked
from here; the message names the machine and the file to delete if that run is gone.

Replacing a stale lock is a rename (atomic) to a private name, then a check that the renamed
file is the stale one that was read; if another run took the folder in between, its lock is
put back (``os.link``, which fails rather than overwrite) and the folder counts as busy.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time

from .nn._files import pid_alive

__all__ = ["RunLock", "RunFolderBusy", "LOCK_NAME"]

LOCK_NAME = ".fastconv-run.lock"
_UNREADABLE_WAIT_S = 2.0  # a lock just created is empty until its creator writes it


class RunFolderBusy(RuntimeError):
    """Another run holds the folder's lock (or the lock cannot be read)."""


def _process_start(pid: int):
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or None
    where that cannot be read: it tells a reused PID from the process that wrote a lock."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        # the command name (field 2) is in parentheses and may hold spaces: split after it
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


class RunLock:
    """The lock of run folder ``directory`` (created if needed, and removed again on release
    if nothing else was written into it).

    ``acquire()`` returns a note to show (a stale lock was replaced) or None, and raises
    :class:`RunFolderBusy` when a live run holds the folder; ``release()`` removes the lock if
    it is still this object's. Also a context manager (acquire on enter, release on exit).
    """

    def __init__(self, directory, command: str = "fastconv"):
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self.command = command
        self.host = socket.gethostname()
        self.token = secrets.token_hex(8)
        self.held = False
        self._made_directory = False

    # -- reading a holder ----------------------------------------------------------------------
    def _read(self):
        """``(holder dict or None if unreadable, raw bytes or None if the file is gone)``."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(4096)
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(raw)
        except ValueError:
            return None, raw
        ok = (
            isinstance(holder, dict)
            and isinstance(holder.get("pid"), int)
            and not isinstance(holder.get("pid"), bool)
            and isinstance(holder.get("host"), str)
        )
        return (holder if ok else None), raw

    def _stale(self, holder) -> bool:
        if holder["host"] != self.host:
            return False  # another machine's PIDs mean nothing here
        pid = holder["pid"]
        if not pid_alive(pid):
            return True
        recorded = holder.get("proc_start")
        current = _process_start(pid)
        return recorded is not None and current is not None and current != recorded

    @staticmethod
    def _describe(holder) -> str:
        started = holder.get("started")
        when = f", started {started}" if isinstance(started, str) else ""
        command = holder.get("command")
        what = f"{command} " if isinstance(command, str) else ""
        return f"{what}(pid {holder['pid']} on {holder['host']}{when})"

    def _break(self, raw) -> bool:
        """Remove the stale lock whose bytes are ``raw``; False if it was not that one."""
        aside = f"{self.path}.stale-{os.getpid()}-{self.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another run replaced it first
            return False
        try:
            with open(aside, "rb") as f:
                moved = f.read(4096)
            if moved == raw:
                return True
            # A run took the folder between our read and our rename: give its lock back.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            return False
        finally:
            os.remove(aside)

    # -- acquire / release ---------------------------------------------------------------------
    def acquire(self) -> str | None:
        self._made_directory = not os.path.isdir(self.directory)
        os.makedirs(self.directory, exist_ok=True)
        notes = []
        deadline = time.monotonic() + _UNREADABLE_WAIT_S
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, raw = self._read()
                if raw is None:  # removed while we looked: try again
                    continue
                if holder is None:
                    if time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                    raise RunFolderBusy(
                        f"{self.directory} is locked by {self.path}, which cannot be read; if "
                        "no run uses that folder, delete the file"
                    ) from None
                if self._stale(holder):
                    if self._break(raw):
                        notes.append(
                            f"note: replaced the stale lock of {self.directory} left by "
                            f"{self._describe(holder)}, which no longer runs"
                        )
                    continue
                where = (
                    ""
                    if holder["host"] == self.host
                    else f"; it runs on another machine: if it is gone, delete {self.path}"
                )
                raise RunFolderBusy(
                    f"{self.directory} is in use by another run: {self._describe(holder)}; "
                    f"wait for it to end or choose another --out{where}"
                ) from None
            self._write(fd)
            self.held = True
            return "\n".join(notes) or None

    def _write(self, fd) -> None:
        record = {
            "pid": os.getpid(),
            "host": self.host,
            "token": self.token,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": self.command,
            "proc_start": _process_start(os.getpid()),
        }
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:  # e.g. a full disk: leave no half-written lock behind
            os.remove(self.path)
            raise

    def release(self) -> None:
        """Remove the lock if this object holds it (and it is still this object's file)."""
        if not self.held:
            return
        self.held = False
        holder, _ = self._read()
        if holder is not None and holder.get("token") == self.token:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        if self._made_directory:  # a run that failed before writing leaves no empty folder
            try:
                os.rmdir(self.directory)
            except OSError:  # not empty: the run's files
                pass

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False
