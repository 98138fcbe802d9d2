"""Datasets as in-memory arrays: digits, mnist, fashion-mnist, synthetic.

Shape legend
    N   samples (rows)
    D   features per sample (pixels, flattened)
    C   classes

Every dataset is a :class:`Dataset` with ``x_train (N, D)`` in the requested
float dtype, ``y_train (N,)`` int64 in ``[0, C)``, and the same for the test
split. Features lie in ``[0, 1]``. With ``compact=True`` (what the trainer
loads) the images stay in their stored form: the pixels as uint8 with a
``divisor`` (255, or 16 for digits), the synthetic set as float32, and
``Dataset.train_features(rows)`` computes the features of the rows a step
gathers, bit for bit the values the float form holds (the same conversion and
division, row by row). A quarter of the float32 bytes, and the form a node
shares once in MPI shared memory (``data.shared``):

- ``digits``: scikit-learn's bundled 8x8 digits (1797 samples, D = 64,
  offline), pixels / 16. A fixed split, independent of any training seed:
  the permutation from ``numpy.random.default_rng(0)``; its first 360 rows
  are the test set, the other 1437 the training set.
- ``mnist``, ``fashion-mnist``: the four IDX files under their standard names
  (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or
  ``.gz``), images flattened to ``(N, 784)`` and divided by 255, nothing else.
  Searched in these roots, in order: the ``data_dir`` argument, ``$MPNN_DATA``,
  ``~/.cache/mpnn``, ``/usr/share/datasets`` (where Debian's
  ``dataset-fashion-mnist`` installs); in each root first ``root/<name>/``,
  then ``root`` itself, so a directory holding the four files works as
  ``data_dir`` directly. A directory is used only if it holds all four files.
  One that holds some of them is skipped (and listed) in the cache and the
  system root, but in a directory the user named (``data_dir`` or
  ``$MPNN_DATA``, or its ``<name>/``) it is an error naming the missing files
  (a symlink whose target is gone counts as present but unreadable): training
  on another copy instead would go unnoticed. A named directory holding none
  of the files is passed over, so one root can hold several datasets.
  If no directory holds all four and ``download=True``, the published files are downloaded,
  SHA-256-verified, into ``~/.cache/mpnn/<name>/`` (always the cache, never
  ``data_dir``, which may be shared or read-only; the cache is then found by
  the normal lookup). Files found on disk are validated as IDX but not
  checksummed: any directory of IDX files under these names can be trained on.
- ``synthetic``: ``synthetic_size=(n_train, n_test)`` samples (default
  60000/10000, like MNIST) of D = 784, C = 10: one random prototype per class
  plus Gaussian noise, clipped to [0, 1]. Deterministic (fixed seed), learnable,
  generated in well under a second at the default size; meant for benchmarks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .download import fetch
from .idx import DataError, load_idx_pair

__all__ = ["DATASETS", "Dataset", "load_dataset", "expand", "search_dirs", "locate_idx"]

DATASETS = ("digits", "mnist", "fashion-mnist", "synthetic")

IDX_DATASETS = ("mnist", "fashion-mnist")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SYSTEM_ROOT = Path("/usr/share/datasets")

DIGITS_SPLIT_SEED = 0
DIGITS_N_TEST = 360
SYNTHETIC_SEED = 0x5EED
SYNTHETIC_SIZE = (60000, 10000)
SYNTHETIC_FEATURES = 784
SYNTHETIC_CLASSES = 10
SYNTHETIC_NOISE = 0.5
# (training rows, test rows, features, classes) of each dataset, known without loading it
SHAPES = {"digits": (1797 - DIGITS_N_TEST, DIGITS_N_TEST, 64, 10),
          "mnist": (60000, 10000, 784, 10), "fashion-mnist": (60000, 10000, 784, 10),
          "synthetic": (*SYNTHETIC_SIZE, SYNTHETIC_FEATURES, SYNTHETIC_CLASSES)}

_FIX = ("pass --data-dir DIR (or data_dir=DIR) or set MPNN_DATA=DIR to a directory holding "
        f"the four files {', '.join(IDX_FILES)} (each plain or .gz), or DIR/<name>/ holding them")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split in memory: x (N, D) float, y (N,) int64 in [0, num_classes)."""

    name: str
    x_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    x_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)
    num_classes: int
    divisor: int | None = None  # compact: x holds integers, the features are x / divisor
    dtype: object = None  # the features' dtype (None: x's own)
    owner: object = field(default=None, repr=False, compare=False)  # holds x's memory (a window)

    def __post_init__(self):
        for split, x, y in (("train", self.x_train, self.y_train),
                            ("test", self.x_test, self.y_test)):
            if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(f"{self.name}: {split} split needs x (N, D) and y (N,), "
                                 f"got {x.shape} and {y.shape}")
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise ValueError(f"{self.name}: train has {self.x_train.shape[1]} features, "
                             f"test {self.x_test.shape[1]}")

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def feature_dtype(self):
        return np.dtype(self.dtype if self.dtype is not None else self.x_train.dtype)

    def train_features(self, rows):
        """Features (b, D) of training ``rows`` (an index array or a slice): a new array,
        except a slice of writable float-form data, which is a view (never written through)."""
        return self._features(self.x_train[rows])

    def test_features(self, start=0, stop=None):
        """Features (b, D) of test rows [start, stop)."""
        return self._features(self.x_test[start:stop])

    def _features(self, x):
        out = x.astype(self.feature_dtype, copy=False)  # (b, D)
        if not out.flags.writeable:  # a view of read-only (shared) data: kernels get a copy
            out = out.copy()
        if self.divisor is not None:
            out /= self.divisor  # as the float form: a conversion, then one division
        return out

    @property
    def nbytes(self):
        """Bytes of the four arrays as stored."""
        return sum(int(a.nbytes) for a in (self.x_train, self.y_train, self.x_test, self.y_test))

    def __repr__(self):
        return (f"Dataset({self.name!r}, train={self.x_train.shape}, test={self.x_test.shape}, "
                f"num_classes={self.num_classes}, dtype={self.feature_dtype}"
                + (f", stored as {self.x_train.dtype} / {self.divisor}" if self.divisor else "")
                + ")")


def load_dataset(name, data_dir=None, dtype=np.float32, download=True, progress=True,
                 synthetic_size=None, compact=False) -> Dataset:
    """Load dataset ``name`` (one of DATASETS) as a Dataset with features in ``dtype``.

    data_dir: a directory searched first for IDX datasets (see the module doc).
    download: fetch a missing IDX dataset from the public mirrors.
    progress: show a progress bar while downloading.
    synthetic_size: (n_train, n_test) for ``synthetic`` only.
    compact: keep the stored form (uint8 pixels and a divisor; float32 for
        synthetic) and serve features through ``train_features`` / ``test_features``.
    Raises DataError saying what is wrong and how to fix it.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise DataError(f"dtype must be a floating-point type (float32, float64), got {dtype}")
    if synthetic_size is not None and name != "synthetic":
        raise DataError(f"synthetic_size applies to the synthetic dataset only, not {name!r}")
    if name == "digits":
        data = _digits()
    elif name == "synthetic":
        data = _synthetic(SYNTHETIC_SIZE if synthetic_size is None else synthetic_size)
    else:
        data = _idx_dataset(name, data_dir, download, progress)
    data = replace(data, dtype=dtype)
    return data if compact else expand(data)


def expand(data: Dataset) -> Dataset:
    """The float form of a compact Dataset (features computed for every row)."""
    if data.divisor is None and data.x_train.dtype == data.feature_dtype:
        return replace(data, dtype=None)
    return replace(data, x_train=data.train_features(slice(None)),
                   x_test=data.test_features(), divisor=None, dtype=None, owner=None)


# -------------------------------------------------------------------------- digits


def _digits() -> Dataset:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no network

    bunch = load_digits()
    x = bunch.data.astype(np.uint8)  # (1797, 64), integers 0..16
    y = bunch.target.astype(np.int64)  # (1797,)
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(y))
    test, train = perm[:DIGITS_N_TEST], perm[DIGITS_N_TEST:]
    return Dataset("digits", x[train], y[train], x[test], y[test], num_classes=10, divisor=16)


# ----------------------------------------------------------------------- synthetic


def _synthetic(size) -> Dataset:
    try:
        n_train, n_test = (int(n) for n in size)
    except (TypeError, ValueError):
        raise DataError(f"synthetic_size must be (n_train, n_test), got {size!r}") from None
    if n_train < 1 or n_test < 1:
        raise DataError(f"synthetic_size needs at least one sample per split, got {size!r}")
    proto_seed, train_seed, test_seed = np.random.SeedSequence(SYNTHETIC_SEED).spawn(3)
    prototypes = np.random.default_rng(proto_seed).random(
        (SYNTHETIC_CLASSES, SYNTHETIC_FEATURES), dtype=np.float32)  # (C, D)

    def split(seed, n):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, SYNTHETIC_CLASSES, size=n, dtype=np.int64)  # (N,)
        x = np.empty((n, SYNTHETIC_FEATURES), dtype=np.float32)  # (N, D)
        for start in range(0, n, 2048):  # blocks keep the temporaries in cache
            block = x[start:start + 2048]  # (b, D)
            rng.standard_normal(out=block, dtype=np.float32)
            block *= SYNTHETIC_NOISE
            block += prototypes[y[start:start + 2048]]
            np.clip(block, 0, 1, out=block)
        return x, y

    x_train, y_train = split(train_seed, n_train)
    x_test, y_test = split(test_seed, n_test)
    return Dataset("synthetic", x_train, y_train, x_test, y_test, SYNTHETIC_CLASSES)


# ----------------------------------------------------------------- IDX datasets


def cache_root() -> Path:
    return Path.home() / ".cache" / "mpnn"


def _roots(data_dir):
    """[(root, how the user named it, or None)] in search order."""
    roots = []
    if data_dir is not None:
        roots.append((Path(data_dir).expanduser(), "--data-dir"))
    if os.environ.get("MPNN_DATA"):
        roots.append((Path(os.environ["MPNN_DATA"]).expanduser(), "MPNN_DATA"))
    return roots + [(cache_root(), None), (SYSTEM_ROOT, None)]


def search_dirs(name, data_dir=None):
    """The directories searched for dataset ``name``, in order."""
    dirs = []
    for root, _ in _roots(data_dir):
        for d in (root / name, root):
            if d not in dirs:
                dirs.append(d)
    return dirs


def _named_dirs(name, data_dir):
    """{directory: how the user named it} for data_dir, $MPNN_DATA and their <name>/."""
    named = {}
    for root, how in _roots(data_dir):
        if how is not None:
            for d in (root / name, root):
                named.setdefault(d, how)
    return named


def _find_files(directory: Path):
    """({stem: path} of the IDX files present in ``directory``, plain preferred
    over .gz; {stem: path} of those whose only entry is a dangling symlink)."""
    found, dangling = {}, {}
    for stem in IDX_FILES:
        candidates = (directory / stem, directory / f"{stem}.gz")
        present = [c for c in candidates if c.exists()]  # a directory: the reader says so
        links = [c for c in candidates if c.is_symlink()]
        if present:
            found[stem] = present[0]
        elif links:
            dangling[stem] = links[0]
    return found, dangling


def _partial(name, directory, how, found, dangling):
    """The DataError for a directory the user named that holds part of ``name``."""
    problems = [f"{p.name} is a dangling symlink (to {os.readlink(p)}, which does not "
                f"exist)" for p in dangling.values()]
    missing = [s for s in IDX_FILES if s not in found and s not in dangling]
    if missing:
        problems.insert(0, f"missing {', '.join(missing)} (plain or .gz)")
    expected = {p for s in IDX_FILES for p in (s, f"{s}.gz")}
    try:
        others = sorted(p.name + "/" * p.is_dir() for p in directory.iterdir()
                        if p.name not in expected and not p.name.startswith("."))
    except OSError:
        others = []
    if others:  # a misnamed file is among them
        more = f" and {len(others) - 8} more" if len(others) > 8 else ""
        problems.append(f"it also holds {', '.join(others[:8])}{more}")
    return DataError(f"{name}: {directory} (named by {how}) holds only part of the dataset: "
                     f"{'; '.join(problems)}. Fix: put all four files {', '.join(IDX_FILES)} "
                     f"there under exactly these names (each plain or .gz), or name another "
                     f"directory; no other copy is used in place of one you named")


def locate_idx(name, data_dir=None):
    """(directory holding all four files or None, notes on each place searched).

    Raises DataError when a directory the user named (data_dir, $MPNN_DATA)
    holds only some of the files; others that do are skipped and noted.
    """
    notes = []
    named = _named_dirs(name, data_dir)
    for d in search_dirs(name, data_dir):
        found, dangling = _find_files(d)
        if len(found) == len(IDX_FILES):
            return d, notes
        if (found or dangling) and d in named:
            raise _partial(name, d, named[d], found, dangling)
        if found or dangling:
            missing = ", ".join(s for s in IDX_FILES if s not in found)
            notes.append(f"{d} (incomplete: missing {missing})")
        else:
            notes.append(f"{d}")
    return None, notes


def _idx_dataset(name, data_dir, download, progress) -> Dataset:
    directory, notes = locate_idx(name, data_dir)
    if directory is None:
        searched = "\n  ".join(notes)
        if not download:
            raise DataError(f"{name}: IDX files not found; searched:\n  {searched}\n"
                            f"Downloading is disabled. Fix: {_FIX}")
        target = cache_root() / name
        try:
            directory = fetch(name, target, progress=progress)
        except DataError as e:
            raise DataError(f"{name}: IDX files not found; searched:\n  {searched}\n"
                            f"Downloading failed: {e}\nFix: connect to the internet, set "
                            f"MPNN_MIRROR to a reachable mirror, or {_FIX}") from e
    files, _ = _find_files(directory)
    x_train, y_train = _load_split(files["train-images-idx3-ubyte"],
                                   files["train-labels-idx1-ubyte"])
    x_test, y_test = _load_split(files["t10k-images-idx3-ubyte"],
                                 files["t10k-labels-idx1-ubyte"])
    if x_train.shape[1] != x_test.shape[1]:
        raise DataError(f"{directory}: training images have {x_train.shape[1]} pixels each, "
                        f"test images {x_test.shape[1]}: the files come from different datasets")
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes=10, divisor=255)


def _load_split(images_path, labels_path):
    """x (N, D) uint8 flattened pixels (the features are x / 255), y (N,) int64."""
    images, labels = load_idx_pair(images_path, labels_path, num_classes=10)
    if images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected unsigned-byte pixels (IDX code 0x08), "
                        f"found {images.dtype}")
    if len(images) == 0:
        raise DataError(f"{images_path}: holds no images (its sample count is 0)")
    if images[0].size == 0:
        raise DataError(f"{images_path}: its images have no pixels (dimensions "
                        f"{' x '.join(map(str, images.shape[1:]))})")
    return images.reshape(len(images), -1), labels  # (N, D) uint8
