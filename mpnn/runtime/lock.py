"""One run per checkpoint directory: an exclusive lock file, taken atomically.

    DIR/.mpnn.lock    JSON: pid, host, start time of the run holding DIR

``take_lock(directory)`` creates it with ``O_CREAT | O_EXCL`` (atomic on a
local filesystem and on NFSv3+), so of two runs started together into one
directory exactly one gets it; the other is told which run holds it. A lock
left by a run that died (killed, aborted) names a pid that no longer exists
on this host: it is taken over, and the caller is told whose it was. A lock
from another host cannot be checked from here; its message says how to
remove it. Rank 0 takes the lock (it is the one that writes checkpoints) and
releases it when the job ends; the same process taking it again is a no-op.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from .files import pid_alive

LOCK_NAME = ".mpnn.lock"


class LockError(ValueError):
    """The directory is in use by another run."""


class DirectoryLock:
    """A taken lock; ``release()`` removes the file if this process still holds it."""

    def __init__(self, path, stale=None):
        self.path = path
        self.stale = stale  # the dead run's lock taken over, as text, or None

    def release(self):
        holder = _read(self.path)
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == _host():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


def take_lock(directory):
    """Take ``directory``'s lock or raise LockError naming the run that holds it."""
    path = os.path.join(directory, LOCK_NAME)
    mine = {"pid": os.getpid(), "host": _host(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    stale = None
    for _ in range(3):  # a stale lock removed by someone else in between: try again
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder and holder.get("pid") == mine["pid"] and holder.get("host") == mine["host"]:
                return DirectoryLock(path)  # this process holds it already
            if holder and holder.get("host") == mine["host"] and not pid_alive(holder["pid"]):
                stale = (f"pid {holder['pid']} on {holder['host']}, started "
                         f"{holder.get('started', '?')}, no longer running")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            raise LockError(_in_use(directory, path, holder)) from None
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        return DirectoryLock(path, stale)
    raise LockError(_in_use(directory, path, _read(path)))


def _in_use(directory, path, holder):
    if not holder:
        return (f"--checkpoint-dir {directory} is in use by another run that is taking it "
                f"now (its lock {path} is being written): give this run another directory")
    where = f"pid {holder.get('pid')} on host {holder.get('host')}, started " \
            f"{holder.get('started', '?')}"
    return (f"--checkpoint-dir {directory} is in use by another run ({where}): wait for it to "
            f"end or give this run another directory; if that run is gone, remove {path}")


def _read(path):
    """The lock's JSON, or None when it is missing or not (yet) complete."""
    try:
        with open(path) as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _host():
    return socket.gethostname()
