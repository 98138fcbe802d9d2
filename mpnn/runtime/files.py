"""Files a run writes: atomically, checked before any work.

    atomic_write(path, write)       temporary file next to path, fsync, rename, fsync the directory
    fsync_dir(directory)            make a rename durable (best effort)
    check_output_file(option, path) before training: path can be written as a file
    keep_metrics(path, epochs)      a resumed run keeps its --metrics lines of epochs before its own
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile


def atomic_write(path, write):
    """Call ``write(fileobj)`` on a temporary file next to ``path``; flush, fsync,
    rename over ``path``, fsync the directory. Nothing is left behind on failure."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # mode as umask allows
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def fsync_dir(directory):
    """Make the rename durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_file(option, path):
    """Before any work: ``path`` can be written as a file (by ``atomic_write``).

    Refuses a directory (or a path ending in a separator), a missing parent
    directory, and one where a real test write fails (``os.access`` says yes
    to root, and to filesystems such as /proc). Raises ValueError."""
    if str(path).endswith(os.sep) or os.path.isdir(path):
        raise ValueError(f"{option} {path}: is a directory; give a file name in it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{option} {path}: directory {folder} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"{option} {path}: directory {folder} is not writable "
                         f"({e.strerror or e})") from None


def keep_metrics(path, epochs):
    """Truncate a --metrics file to its records of epochs 1..``epochs`` (a resumed
    run rewrites the later ones); 0 empties it."""
    kept = []
    if epochs > 0 and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line).get("epoch", 0) <= epochs:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except ValueError:
                    continue
    with open(path, "w") as f:
        f.writelines(kept)
