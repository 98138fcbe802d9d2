"""Weights files: the trained model's named tensors as an .npz (``--save``, ``--init``).

    layers.{i}.weight (in, out)   layers.{i}.bias (out,)

Written atomically (temporary file, fsync, rename) and read with
``allow_pickle=False``: no pickle either way. ``--init`` also reads a
checkpoint (``runtime.checkpoint``: the same tensors plus optimizer state and
meta): its checksum is verified and its weights are taken, nothing else.
"""

from __future__ import annotations

import numpy as np

from .config import ConfigError
from .files import atomic_write


def save_weights(path, arrays):
    """Write ``arrays`` (name -> host array) as an .npz atomically."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_weights(path):
    """Named arrays of a ``--save`` file (never unpickles); ConfigError if unreadable."""
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # zipfile, format and pickle-refusal errors alike
        raise ConfigError(f"--init {path}: not a readable mpnn weights file ({e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):  # a lone .npy array (or a text file)
        raise ConfigError(f"--init {path}: not an .npz of named tensors (layers.0.weight, ...) "
                          f"as --save writes")
    with z:
        is_checkpoint = {"meta", "sha256"} <= set(z.files)
        if not is_checkpoint:
            try:
                return {name: z[name] for name in z.files}
            except Exception as e:
                raise ConfigError(f"--init {path}: not a readable mpnn weights file "
                                  f"({e})") from None
    from .checkpoint import CheckpointError, read_checkpoint

    try:
        return read_checkpoint(path).params  # verified; its optimizer state is not used
    except CheckpointError as e:
        raise ConfigError(f"--init {path}: {e}") from None
