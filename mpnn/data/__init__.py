"""Data: the IDX format, dataset lookup and download, and the datasets themselves.

    from mpnn.data import load_dataset
    ds = load_dataset("fashion-mnist")   # Dataset: x_train (N, D), y_train (N,), ...

See ``datasets.py`` for where IDX files are searched and ``download.py`` for
how they are fetched and verified.
"""

from .datasets import DATASETS, Dataset, load_dataset
from .idx import DataError, load_idx_pair, read_idx, write_idx

__all__ = ["DATASETS", "Dataset", "DataError", "load_dataset", "read_idx", "write_idx",
           "load_idx_pair"]
