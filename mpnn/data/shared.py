"""One copy of the dataset per node, in MPI-3 shared memory.

Every rank of a node maps the same pages: the node's ranks
(``comm.Split_type(COMM_TYPE_SHARED)``) allocate one shared-memory window
(``MPI.Win.Allocate_shared``) whose whole size sits on the node's first rank,
the leader. The leader, which has loaded the dataset, copies its four arrays
in (at 64-byte aligned offsets); after a barrier on the node every rank,
the leader too, holds read-only NumPy views of the window (``Shared_query(0)``)
and the leader's private copy is dropped. The dataset is stored compact
(uint8 pixels and a divisor, ``Dataset.train_features``), so a node holds a
quarter of one float32 copy instead of one per rank.

Every window made here (and the hierarchical Allreduce's, ``parallel.
hierarchical``) is registered; ``release(data)`` frees one, ``release_all()``
those left (collective over each window's node, in the order they were made,
which is the same on every rank). ``mpnn.train`` frees them before MPI is
finalized, also after an agreed failure (some netmods fail ``MPI_Finalize``
over an open window); nothing frees them on garbage collection, and the
arrays are views of the window: nothing may read them after the release.
Under ``mpnn.sweep`` each group's trial shares its own window: a node holds
one copy per group on it.
The pages are in ``/dev/shm`` (tmpfs): the leader checks that it has the room
first, and otherwise every rank keeps a private copy (``SharedDataError``
says why; the caller falls back and says so), since touching a tmpfs page
beyond the file system's size kills the process with SIGBUS instead of
raising. Docker gives a container 64 MB of ``/dev/shm`` unless run with
``--shm-size``.
"""

from __future__ import annotations

import os

import numpy as np

from .datasets import Dataset

ALIGN = 64  # bytes: each array starts on a cache line
SHM_ROOT = "/dev/shm"
SHM_MARGIN = 64 * 2**20  # bytes left free for MPICH's own shared-memory segments
FIELDS = ("x_train", "y_train", "x_test", "y_test")


class SharedDataError(RuntimeError):
    """The node cannot hold the dataset in shared memory (not enough room)."""


def shm_room(path=SHM_ROOT):
    """Bytes free for unprivileged use in ``path`` (None where it cannot be told)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def layout(arrays):
    """[(offset, shape, dtype string)] of ``arrays`` packed at ALIGN-byte offsets, total bytes."""
    out, offset = [], 0
    for a in arrays:
        out.append((offset, a.shape, a.dtype.str))
        offset += -(-a.nbytes // ALIGN) * ALIGN
    return out, offset


_WINDOWS = []  # the windows not freed yet, in the order they were made


def register(win):
    _WINDOWS.append(win)
    return win


def free_window(win):
    """Free ``win`` (collective over its node) if it is still open."""
    if win in _WINDOWS:
        _WINDOWS.remove(win)
        win.Free()


def release(data):
    """Free ``data``'s shared window, if it has one (collective over the node's ranks).
    Its arrays are views of the window: nothing may read them afterwards."""
    if data is not None and data.owner is not None:
        free_window(data.owner)


def release_all():
    """Free every window still open (collective: every rank calls it at one point)."""
    while _WINDOWS:
        free_window(_WINDOWS[0])


def check_room(node, nbytes, what):
    """None, or why /dev/shm of this node cannot hold ``nbytes`` more (the leader
    looks; every rank of ``node`` gets its verdict). Collective over ``node``."""
    verdict = None
    if node.Get_rank() == 0:
        room = shm_room()
        if room is not None and room < nbytes + SHM_MARGIN:
            verdict = (f"{SHM_ROOT} has {room / 1e6:.0f} MB free and {what} needs "
                       f"{nbytes / 1e6:.0f} MB (+{SHM_MARGIN / 1e6:.0f} MB for MPI)")
    return node.bcast(verdict, root=0)


def share_on_node(data, node):
    """The Dataset ``data`` (the leader's; ignored on the others) as views of one
    shared window on the ranks of ``node`` (a ``COMM_TYPE_SHARED`` communicator).

    Collective over ``node``. Raises SharedDataError on every rank of the node
    when /dev/shm cannot hold it (the leader then keeps ``data``; the others
    must load their own)."""
    from mpi4py import MPI

    leader = node.Get_rank() == 0
    meta = None
    if leader:
        slots, total = layout([getattr(data, f) for f in FIELDS])
        meta = {"slots": slots, "total": total, "name": data.name,
                "num_classes": data.num_classes, "divisor": data.divisor, "dtype": data.dtype}
    meta = node.bcast(meta, root=0)  # small: shapes, dtypes, the name and divisor
    short = check_room(node, meta["total"], "the dataset")
    if short:
        raise SharedDataError(short)
    win = register(MPI.Win.Allocate_shared(meta["total"] if leader else 0, 1, comm=node))
    buf, _ = win.Shared_query(0)
    memory = np.frombuffer(buf, dtype=np.uint8, count=meta["total"])
    views = {}
    for f, (offset, shape, dtype) in zip(FIELDS, meta["slots"], strict=True):
        dtype = np.dtype(dtype)
        n = int(np.prod(shape)) * dtype.itemsize
        views[f] = memory[offset:offset + n].view(dtype).reshape(shape)
    if leader:
        for f in FIELDS:
            views[f][...] = getattr(data, f)
    node.Barrier()  # filled: from here the window is only read
    for v in views.values():
        v.flags.writeable = False
    return Dataset(meta["name"], **views, num_classes=meta["num_classes"],
                   divisor=meta["divisor"], dtype=meta["dtype"], owner=win)
