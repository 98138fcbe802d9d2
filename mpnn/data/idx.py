"""The IDX file format (MNIST, Fashion-MNIST): a strict reader and a writer.

Layout, all integers big-endian::

    offset  bytes        meaning
    0       2            0x00 0x00
    2       1            dtype code (table below)
    3       1            ndim, the number of dimensions (>= 1)
    4       4 * ndim     the dimensions, unsigned 32-bit each
    4+4*ndim  prod(dims) * itemsize   the data, row-major, big-endian items

    code  0x08 ubyte  0x09 byte  0x0B short (i2)  0x0C int (i4)
          0x0D float (f4)  0x0E double (f8)

So MNIST's training images are ``(60000, 28, 28)`` ubyte after a 16-byte
header, and its labels ``(60000,)`` ubyte after an 8-byte header. A file may
be gzip-compressed (the published files are); the reader recognises gzip by
its content, and the writer compresses when the name ends with ``.gz``.

The reader insists that the payload holds exactly ``prod(dims)`` items: a
truncated download or trailing bytes are errors, never silently reshaped.
Every problem raises :class:`DataError` naming the file, the problem and the
fix.
"""

from __future__ import annotations

import gzip
import math
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np

__all__ = ["DataError", "read_idx", "write_idx", "load_idx_pair", "IDX_DTYPES"]


class DataError(ValueError):
    """A dataset could not be found, read or verified; the message says how to fix it."""


# dtype code -> big-endian NumPy dtype, and back (by kind and size).
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {(dt.kind, dt.itemsize): code for code, dt in IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_NDIM = 64 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 32  # NumPy's limit
_REDOWNLOAD = "delete it and download again"


def _open(path: Path):
    """Open ``path`` for reading, through gzip when its content is gzip."""
    f = open(path, "rb")
    head = f.read(2)
    f.seek(0)
    if head == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=f, mode="rb"), f
    if path.name.endswith(".gz"):
        f.close()
        raise DataError(f"{path}: the name ends with .gz but the file is not gzip-compressed "
                        f"(it starts with {head!r}); {_REDOWNLOAD}")
    return f, f


def _read_exact(f, n):
    """Read up to n bytes into a writable buffer, in chunks: a header that claims
    more data than the file holds costs no more memory than the file."""
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(min(1 << 22, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf, len(buf)


def _count_rest(f):
    """Number of bytes left in f (read in chunks, so a huge tail costs no memory)."""
    total = 0
    while chunk := f.read(1 << 20):
        total += len(chunk)
    return total


def read_idx(path) -> np.ndarray:
    """Read an IDX file (plain or gzip) into a native-byte-order array of shape dims.

    Raises DataError naming the file when the magic number, dtype code,
    dimensions, payload size or gzip stream is wrong.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not an IDX file")
    if not path.exists() and path.is_symlink():
        raise DataError(f"{path}: a dangling symlink (to {os.readlink(path)}, which does not "
                        f"exist); point it at the IDX file or replace it with the file")
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file (a pipe, socket or device?); an IDX "
                        f"file is read from disk")
    try:
        stream, raw = _open(path)
        with raw, stream:
            return _parse(stream, path)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: corrupt gzip stream ({e}); {_REDOWNLOAD}") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e}); check that it "
                        f"is readable") from e


def _parse(f, path: Path) -> np.ndarray:
    magic = f.read(4)
    if len(magic) < 4:
        raise DataError(f"{path}: only {len(magic)} bytes, too short for the 4-byte IDX magic "
                        f"number: the file is truncated; {_REDOWNLOAD}")
    if magic[:2] != b"\x00\x00":
        raise DataError(f"{path}: not an IDX file: the magic number 0x{magic.hex()} should "
                        f"start with two zero bytes (is it an HTML error page or another "
                        f"format?); {_REDOWNLOAD}")
    code, ndim = magic[2], magic[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X} {IDX_DTYPES[c].name}" for c in IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02X} in the magic number "
                        f"0x{magic.hex()} (known: {known})")
    if ndim == 0:
        raise DataError(f"{path}: the IDX header declares 0 dimensions; an IDX file holds "
                        f"at least one")
    if ndim > _MAX_NDIM:
        raise DataError(f"{path}: the IDX header declares {ndim} dimensions, more than the "
                        f"{_MAX_NDIM} a NumPy array can have (the magic number 0x{magic.hex()} "
                        f"is damaged, or this is not an IDX file); {_REDOWNLOAD}")
    header = 4 + 4 * ndim
    dims_bytes = f.read(4 * ndim)
    if len(dims_bytes) < 4 * ndim:
        raise DataError(f"{path}: the header declares {ndim} dimensions ({header} bytes) but "
                        f"the file ends after {4 + len(dims_bytes)} bytes: the file is "
                        f"truncated; {_REDOWNLOAD}")
    dims = tuple(int(d) for d in np.frombuffer(dims_bytes, dtype=">u4"))
    dtype = IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    what = f"{'x'.join(map(str, dims))} {dtype.name.lstrip('>')}"
    buf, got = _read_exact(f, expected)
    if got < expected:
        raise DataError(f"{path}: expected {expected} bytes of data ({what}) after the "
                        f"{header}-byte header, found {got}: the file is truncated; "
                        f"{_REDOWNLOAD}")
    extra = _count_rest(f)
    if extra:
        raise DataError(f"{path}: expected {expected} bytes of data ({what}) after the "
                        f"{header}-byte header, found {expected + extra}: {extra} trailing "
                        f"bytes, so the header and the data disagree; {_REDOWNLOAD}")
    array = np.frombuffer(buf, dtype=dtype).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def write_idx(path, array) -> Path:
    """Write ``array`` as an IDX file (gzip when ``path`` ends with ``.gz``).

    The dtype must be one IDX knows (uint8, int8, int16, int32, float32,
    float64). The file appears atomically (temporary file, then rename), and
    gzip output is reproducible (no timestamp, no embedded name).
    """
    path = Path(path)
    array = np.asarray(array)
    code = _CODES.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise DataError(f"{path}: IDX cannot store dtype {array.dtype}; use one of "
                        f"{', '.join(dt.name.lstrip('>') for dt in IDX_DTYPES.values())}")
    if array.ndim == 0 or array.ndim > 255:
        raise DataError(f"{path}: IDX stores 1 to 255 dimensions, got {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise DataError(f"{path}: cannot write the file ({e.strerror or e}); check that "
                        f"{path.parent} exists and is writable") from e
    try:
        with os.fdopen(fd, "wb") as f:
            if path.name.endswith(".gz"):
                with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
                    gz.write(header)
                    gz.write(payload)
            else:
                f.write(header)
                f.write(payload)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_idx_pair(images_path, labels_path, num_classes=None):
    """Read an images file and its labels file and check that they belong together.

    Returns ``images`` with shape ``(N, ...)`` as stored and ``labels`` ``(N,)``
    int64. Checks: labels are a 1-D integer array, one label per image, each in
    ``[0, num_classes)`` (or non-negative when num_classes is None).
    """
    images, labels = read_idx(images_path), read_idx(labels_path)
    if labels.ndim != 1 or labels.dtype.kind not in "ui":
        raise DataError(f"{labels_path}: a labels file holds one integer per sample, but this "
                        f"one has shape {labels.shape} and dtype {labels.dtype}; is it an "
                        f"images file?")
    if images.ndim < 2:
        raise DataError(f"{images_path}: an images file holds (N, ...) samples, but this one "
                        f"has shape {images.shape}; is it a labels file?")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
                        f"{labels.shape[0]} labels: the files do not belong together (mixed "
                        f"train/test or different datasets?)")
    labels = labels.astype(np.int64)
    if labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            bound = f"[0, {num_classes})" if num_classes is not None else "[0, inf)"
            raise DataError(f"{labels_path}: labels must lie in {bound}, found values from "
                            f"{lo} to {hi}")
    return images, labels
