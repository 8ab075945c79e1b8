"""One writer per run directory: a lock file naming its holder.

Two ``lite-llm train`` processes writing one run directory interleave ``metrics.jsonl`` and
delete each other's checkpoints, and the loser may still report success.  So a run takes
``<run>/.lock`` before it writes anything: a JSON file with the holder's pid, host and start
time, created with ``os.link`` from a complete temporary file (atomic: the lock never exists
half-written, and of two racing processes exactly one links it).  A lock whose holder is a
dead process on this host is stale: it is said so and taken over.  A lock held from another
host cannot be checked from here and is never taken over silently.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Callable

from ..errors import CheckpointError

LOCK_NAME = ".lock"


class RunLockedError(CheckpointError):
    """Another live process holds the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The holder recorded in ``run_dir``'s lock, or None when there is no lock."""
    try:
        return json.loads((Path(run_dir) / LOCK_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as held by an unknown process


def _is_stale(holder: dict[str, Any]) -> bool:
    """Whether the lock's holder is a process of this host that is no longer running."""
    pid, host = holder.get("pid"), holder.get("host")
    return host == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def _in_use(run_dir: Path, holder: dict[str, Any]) -> RunLockedError:
    pid, host = holder.get("pid"), holder.get("host")
    who = f"pid {pid} on host {host} since {holder.get('started', '?')}" if holder else "an unknown process (the lock file is unreadable)"
    return RunLockedError(
        f"run directory {run_dir} is in use by {who}; wait for that run to finish or stop it (if it is gone, delete {run_dir / LOCK_NAME})"
    )


def check_unlocked(run_dir: str | os.PathLike) -> None:
    """Raise :class:`RunLockedError` when a live process (or one this host cannot check) holds
    ``run_dir``'s lock; a stale lock passes (it is taken over by whoever then takes the lock).
    What every rank of a distributed run checks before its process group forms, so that all
    refuse alike; rank 0 then takes the lock."""
    holder = read_lock(run_dir)
    if holder is not None and not _is_stale(holder):
        raise _in_use(Path(run_dir), holder)


class RunLock:
    """``with RunLock(run_dir, say=print):`` holds ``run_dir`` for this process.

    ``say`` receives the one-line notice when a stale lock is taken over."""

    def __init__(self, run_dir: str | os.PathLike, *, say: Callable[[str], None] | None = None) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self.say = say or (lambda message: None)
        self.held = False

    def acquire(self) -> "RunLock":
        self.dir.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp = self.dir / f".lock.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(me))
        try:
            for _ in range(2):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    self._clear_if_stale()
            raise RunLockedError(f"run directory {self.dir} is locked by another process that appeared while it was being taken over; try again")
        finally:
            tmp.unlink(missing_ok=True)

    def _clear_if_stale(self) -> None:
        holder = read_lock(self.dir)
        if holder is None:
            return
        if _is_stale(holder):
            self.say(f"taking over a stale lock on {self.dir}: its holder, pid {holder['pid']} (started {holder.get('started', '?')}), is no longer running")
            self.path.unlink(missing_ok=True)
            return
        raise _in_use(self.dir, holder)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
