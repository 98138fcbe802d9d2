"""Files a run writes: atomically, checked before any work.

    atomic_write(path, write)       temporary file next to path, fsync, rename, fsync the directory
    temp_path(path, pid)            the temporary name atomic_write uses: .NAME.PID.tmp
    remove_stale_temps(directory)   temporary files of killed writers (their process is gone)
    fsync_dir(directory)            make a rename durable (best effort)
    check_output_file(option, path) before training: path can be written as a file, the
                                    way it will be written (temporary name, rename)
    keep_metrics(path, epochs)      a resumed run keeps its --metrics lines of epochs before its own
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat

NAME_MAX = 255  # bytes in one file name (Linux, macOS)
PID_DIGITS = 7  # Linux pids are below 2**22 (pid_max), so at most 7 digits
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def temp_path(path, pid=None):
    """The temporary file ``atomic_write`` writes before renaming it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.join(folder, f".{os.path.basename(path)}.{pid or os.getpid()}.tmp")


def atomic_write(path, write):
    """Call ``write(fileobj)`` on a temporary file next to ``path``; flush, fsync,
    rename over ``path``, fsync the directory. Nothing is left behind on failure."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = temp_path(path)
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
    """Before any work: ``path`` can be written the way it will be (by ``atomic_write``:
    a temporary file in its directory, renamed over it).

    Refuses an empty name, a directory (or a path ending in a separator), a
    missing parent directory, an existing file that is not a regular file (a
    FIFO would block the run, /dev/full fails, and a rename would replace a
    device node), an immutable or append-only file (the rename fails), a name
    whose temporary name is too long, and a directory where a real test write
    of that temporary name fails (``os.access`` says yes to root, and to
    filesystems such as /proc). Raises ValueError saying what to do."""
    if not str(path):
        raise ValueError(f"{option} '': give a file name")
    if str(path).endswith(os.sep) or os.path.isdir(path):
        raise ValueError(f"{option} {path}: is a directory; give a file name in it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{option} {path}: directory {folder} does not exist")
    if os.path.lexists(path):
        _check_existing(option, path)
    name = os.path.basename(path)
    longest = len(os.fsencode(f".{name}.{'0' * PID_DIGITS}.tmp"))
    if longest > NAME_MAX:
        spare = NAME_MAX - (longest - len(os.fsencode(name)))
        raise ValueError(f"{option} {path}: the file name is too long: it is written through "
                         f"the temporary name .NAME.PID.tmp, which must fit in {NAME_MAX} "
                         f"bytes; use a name of at most {spare} bytes")
    probe = temp_path(path, "0" * PID_DIGITS)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.remove(probe)
    except FileExistsError:
        pass  # another run's probe of the same name: the directory takes files
    except OSError as e:
        raise ValueError(f"{option} {path}: directory {folder} is not writable "
                         f"({e.strerror or e})") from None


def _check_existing(option, path):
    """An existing ``path`` must be a regular file that a rename may replace."""
    try:
        st = os.stat(path)
    except OSError as e:  # a dangling symlink, or no permission to look
        raise ValueError(f"{option} {path}: exists but cannot be used ({e.strerror or e}); "
                         f"remove it or give another name") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else
                "a character device" if stat.S_ISCHR(st.st_mode) else
                "a block device" if stat.S_ISBLK(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise ValueError(f"{option} {path}: is {kind}; mpnn writes its outputs as regular "
                         f"files (atomically, through a rename), so give a file name")
    flags = _inode_flags(path)
    if flags & (0x10 | 0x20):  # FS_IMMUTABLE_FL, FS_APPEND_FL
        kind, letter = ("immutable", "i") if flags & 0x10 else ("append-only", "a")
        raise ValueError(f"{option} {path}: the file is {kind} (chattr +{letter}), so it "
                         f"cannot be replaced; give another name, or run chattr -{letter} on it")


def _inode_flags(path):
    """Linux inode flags of ``path`` (FS_IOC_GETFLAGS), 0 where they cannot be read."""
    try:
        import array
        import fcntl
    except ImportError:  # not POSIX
        return 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return 0
    try:
        buf = array.array("l", [0])
        fcntl.ioctl(fd, 0x80086601, buf)  # FS_IOC_GETFLAGS
        return int(buf[0])
    except OSError:  # a filesystem without inode flags
        return 0
    finally:
        os.close(fd)


def remove_stale_temps(directory):
    """Remove ``atomic_write``'s temporary files in ``directory`` whose writer is dead
    (a process killed mid-write, say by SIGKILL); returns their names. Only files of
    that exact pattern, and only when no process of that pid exists on this host."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for n in names:
        m = _TEMP.match(n)
        if m and not pid_alive(int(m.group("pid"))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, n))
                removed.append(n)
    return removed


def pid_alive(pid):
    """Whether a live process with this pid exists on this host (a zombie, killed
    but not yet reaped by its parent, is not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc to ask: it exists
    return state not in ("Z", "X")


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
