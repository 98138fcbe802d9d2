"""Device buffers and MPI: when MPI can read GPU memory, and the host copies when not.

An MPI library built with CUDA support takes CuPy arrays directly; one without
it (the PyPI ``mpich`` wheel, for one) needs each message copied to host
memory first and back afterwards. The copies go into preallocated buffers, so
a training step allocates nothing. With NumPy arrays they are plain copies,
which lets the CPU tests run the staged code paths.

See docs/parallelism.md#5-bucket-order-and-overlap.
"""

from __future__ import annotations

import numpy as np


def mpi_cuda_aware():
    """Whether this MPI library takes device pointers (False when it cannot say)."""
    from mpi4py import MPI

    query = getattr(MPI, "Query_cuda_support", None)
    try:
        return bool(query()) if query is not None else False
    except Exception:
        return False


def needs_host_staging(array):
    """True when ``array`` lives on a GPU and MPI cannot read it there."""
    return not isinstance(array, np.ndarray) and not mpi_cuda_aware()


def copy_to_host(src, out):
    """Device (or host) array src into the host buffer out of its shape; returns out."""
    if src.size == 0:  # an empty micro-batch of a small last batch
        return out
    if isinstance(src, np.ndarray):
        np.copyto(out, src)
    else:
        src.get(out=out)
    return out


def copy_from_host(src, out):
    """Host array src into the device (or host) buffer out of its shape."""
    if src.size == 0:
        return
    if isinstance(out, np.ndarray):
        np.copyto(out, src)
    else:
        out.set(src)
