"""Download the published IDX files, verified by SHA-256, atomically.

Each file is streamed from the first mirror that answers into a temporary
file *in the target directory*, hashed on the way, fsynced, and renamed into
place only when its SHA-256 matches the published ``.gz`` file. On any
failure (HTTP error, dropped connection, checksum mismatch, Ctrl-C) the
temporary file is removed, so the data file itself is never partial. A
process killed outright (SIGKILL, or SIGTERM, which Python does not turn
into an exception) cannot clean up: its ``.NAME.*.part`` file is never read,
and the next fetch into that directory removes it once it is an hour stale
(a live download keeps touching its own).

A mirror that stalls or trickles is abandoned like one that fails: the
socket timeout restarts with every byte, so a transfer must also deliver
``MIN_RATE_BPS`` on average over each ``STALL_WINDOW_S`` window, response
headers included; a watchdog thread shuts the connection down when it does
not, which wakes the blocked read.

Mirrors are tried in order. ``mirrors=`` (a list of base URLs) or the
environment variable ``MPNN_MIRROR`` (base URLs separated by commas)
*replace* the built-in list, e.g. to use a local copy or an internal server.

Checksums are of the original gzip files as published (the decompressed
content is not checked here; the IDX reader validates its structure):

- MNIST: TensorFlow Datasets' ``url_checksums/mnist.txt``; the two label
  values were confirmed against files byte-identical to the originals (their
  published MD5s match).
- Fashion-MNIST: TensorFlow Datasets' ``url_checksums/fashion_mnist.txt``,
  the same values other projects list next to Zalando's published MD5s.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..runtime.files import fsync_dir
from .idx import DataError

__all__ = ["MIRRORS", "FILES", "mirrors_for", "download_file", "fetch", "remove_stale_parts"]

MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ),
}

# file name -> SHA-256 of the published .gz file (sizes for reference in comments)
FILES = {
    "mnist": {
        "train-images-idx3-ubyte.gz":  # 9912422 bytes
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz":  # 28881 bytes
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz":  # 1648877 bytes
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz":  # 4542 bytes
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz":  # 26421880 bytes
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz":  # 29515 bytes
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz":  # 4422102 bytes
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz":  # 5148 bytes
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}

_CHUNK = 1 << 16
_TIMEOUT_S = 30  # per socket operation: no byte at all for this long fails the transfer
MIN_RATE_BPS = 4096  # below this (the largest file would take ~2 h), averaged over
STALL_WINDOW_S = 60  # each window of this many seconds, the mirror is given up


def mirrors_for(name, mirrors=None):
    """The base URLs to try for dataset ``name``: ``mirrors``, else $MPNN_MIRROR, else built-in."""
    if mirrors is None and os.environ.get("MPNN_MIRROR", "").strip():
        mirrors = [m for m in os.environ["MPNN_MIRROR"].split(",") if m.strip()]
    if mirrors is None:
        mirrors = MIRRORS[name]
    if isinstance(mirrors, str):
        mirrors = [mirrors]
    return [m.strip().rstrip("/") + "/" for m in mirrors]


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download_file(url, dest, sha256, progress=True, timeout=_TIMEOUT_S) -> Path:
    """Stream ``url`` to ``dest`` if and only if its SHA-256 is ``sha256``.

    Raises DataError (HTTP or network failure, a transfer slower than
    MIN_RATE_BPS over a STALL_WINDOW_S window, incomplete body, checksum
    mismatch); ``dest`` is then untouched and no temporary file remains.
    """
    dest = Path(dest)
    try:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise DataError(f"cannot write into the download directory {dest.parent} "
                        f"({e.strerror or e}); pass --data-dir DIR with files you downloaded "
                        f"yourself, or make it writable") from e
    try:
        h, received, length = hashlib.sha256(), 0, None
        with os.fdopen(fd, "wb") as out:
            with _Watchdog(MIN_RATE_BPS, STALL_WINDOW_S) as watchdog:
                opener = urllib.request.build_opener(_HTTPHandler(watchdog),
                                                     _HTTPSHandler(watchdog))
                try:
                    with opener.open(url, timeout=timeout) as resp:
                        length = resp.headers.get("Content-Length")
                        length = int(length) if length else None
                        with tqdm(total=length, unit="B", unit_scale=True, unit_divisor=1024,
                                  desc=dest.name, disable=not progress, leave=False) as bar:
                            while chunk := resp.read1(_CHUNK):  # what has arrived
                                out.write(chunk)
                                h.update(chunk)
                                received += len(chunk)
                                watchdog.received = received
                                bar.update(len(chunk))
                except (OSError, http.client.HTTPException, ValueError) as e:
                    if watchdog.slow is not None:
                        raise _too_slow(url, watchdog) from e
                    raise DataError(f"{url}: download failed: {_describe(e)}") from e
            if watchdog.slow is not None and (length is None or received < length):
                raise _too_slow(url, watchdog)  # cut off at what looked like the end
            if length is not None and received != length:
                raise DataError(f"{url}: download failed: connection closed after {received} "
                                f"of {length} bytes")
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != sha256:
            raise DataError(f"{url}: checksum mismatch: SHA-256 {h.hexdigest()}, expected "
                            f"{sha256}; the file was discarded (corrupt transfer or a "
                            f"mirror serving different content)")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
    return dest


def _too_slow(url, watchdog):
    return DataError(f"{url}: download too slow: {watchdog.slow} bytes in "
                     f"{watchdog.window_s:g} s, under the minimum of {watchdog.min_rate} "
                     f"bytes/s, so this mirror was given up; set MPNN_MIRROR to another "
                     f"mirror, or download the files yourself and pass --data-dir DIR")


class _Watchdog:
    """Gives up a transfer that delivers under ``min_rate * window_s`` bytes in any
    window of ``window_s`` seconds (the socket timeout restarts with every byte).

    From its own thread it shuts down the sockets handed to ``watch``, which wakes
    the read blocked on them, whether in the response headers or the body, and
    records in ``slow`` how many bytes the window that fell short brought.
    """

    def __init__(self, min_rate, window_s):
        self.min_rate, self.window_s = min_rate, window_s
        self.received = 0  # body bytes so far, set by the reading thread
        self.slow = None
        self._sockets, self._lock = [], threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mpnn-download-watchdog",
                                        daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()

    def watch(self, sock):
        with self._lock:
            self._sockets.append(sock)

    def _run(self):
        start = 0
        while not self._done.wait(self.window_s):
            got = self.received - start
            if got >= self.min_rate * self.window_s:
                start += got
                continue
            with self._lock:
                self.slow = got
                for sock in self._sockets:
                    try:  # the plain socket's shutdown, also under TLS: the fd is shared
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
                    except OSError:  # closed already (a redirect's first connection)
                        pass
            return


class _Watched:
    """Mixin for an http.client connection: its socket, once connected, goes to a _Watchdog."""

    def __init__(self, *args, watchdog, **kwargs):
        super().__init__(*args, **kwargs)
        self._watchdog = watchdog

    def connect(self):
        super().connect()
        self._watchdog.watch(self.sock)


class _WatchedHTTP(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHTTPS(_Watched, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watchdog):
        super().__init__()
        self._watchdog = watchdog

    def http_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTP, watchdog=self._watchdog), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watchdog):
        super().__init__()
        self._watchdog = watchdog

    def https_open(self, req):  # the default context, as urllib's own handler uses
        return self.do_open(functools.partial(_WatchedHTTPS, watchdog=self._watchdog), req)


def _describe(e):
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return f"{e.reason}"
    if isinstance(e, http.client.IncompleteRead):
        return f"connection closed after {len(e.partial)} bytes ({e.expected} more expected)"
    return f"{type(e).__name__}: {e}"


def fetch(name, dest_dir, mirrors=None, progress=True, files=None) -> Path:
    """Make ``dest_dir`` hold every file of dataset ``name``, downloading what is missing.

    files: {file name: sha256}, default ``FILES[name]``. A file already
    present with the right checksum is kept; each missing one is tried on
    every mirror in order. Raises DataError listing each URL tried and why it
    failed.
    """
    files = FILES[name] if files is None else files
    bases = mirrors_for(name, mirrors)
    dest_dir = Path(dest_dir)
    created = not dest_dir.exists()
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the download directory {dest_dir} ({e}); pass "
                        f"--data-dir DIR with files you downloaded yourself, or set HOME") from e
    try:
        _fetch_files(name, files, bases, dest_dir, progress)
    except BaseException:
        if created and not any(dest_dir.iterdir()):
            dest_dir.rmdir()
        raise
    return dest_dir


STALE_PART_S = 3600  # a .part file untouched this long belongs to a killed download


def remove_stale_parts(directory):
    """Delete the ``.NAME.*.part`` files of downloads killed before they could
    clean up (untouched for ``STALE_PART_S``)."""
    now = time.time()
    for path in Path(directory).glob(".*.part"):
        try:
            if now - path.stat().st_mtime > STALE_PART_S:
                path.unlink()
        except OSError:  # gone already, or not ours to delete
            pass


def _fetch_files(name, files, bases, dest_dir, progress):
    remove_stale_parts(dest_dir)
    for filename, sha in files.items():
        dest = dest_dir / filename
        if dest.is_file() and sha256_of(dest) == sha:
            continue
        failures = []
        for base in bases:
            try:
                download_file(base + filename, dest, sha, progress=progress)
                break
            except DataError as e:
                failures.append(str(e))
        else:
            tried = "\n  ".join(failures)
            raise DataError(f"could not download {filename} for {name} into {dest_dir}; "
                            f"tried:\n  {tried}")
