"""Size each rank's BLAS and numba thread pools to the cores it owns.

Ranks on one node share its cores: with ``n`` ranks per node (found with
``COMM_TYPE_SHARED``) each gets ``cores // n`` threads (at least 1). More
threads than that oversubscribe the cores, and BLAS spin-waiting turns that
into a several-fold slowdown, so it is worth a warning with the numbers.
"""

from __future__ import annotations

import os


def available_cores():
    """Cores this process may run on (affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def ranks_on_node(comm):
    """How many ranks of ``comm`` share this node (1 without MPI)."""
    if comm.Get_size() == 1:
        return 1
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_size()
    finally:
        node.Free()


def threads_per_rank(cores, ranks):
    """cores // ranks, at least 1."""
    return max(1, cores // max(1, ranks))


def oversubscription_warning(cores, ranks, threads):
    """A warning line when ranks x threads exceeds the cores, else None."""
    if ranks * threads <= cores:
        return None
    fix = (f"run at most {cores} ranks on this node, with --threads 1" if ranks > cores
           else f"use --threads {threads_per_rank(cores, ranks)} or fewer ranks")
    return (f"warning: {ranks} ranks on this node x {threads} threads each = "
            f"{ranks * threads} threads on {cores} cores; expect a large slowdown ({fix})")


def configure_threads(comm, threads=None, *, torch=False):
    """Limit BLAS (threadpoolctl) and numba to ``threads`` (default: this rank's
    share of the node's cores); with ``torch=True`` also PyTorch's intra-op pool
    (imported first, so its OpenMP runtime is limited too), for a side-by-side
    at the same thread count. Returns (threads, warning or None)."""
    cores, ranks = available_cores(), ranks_on_node(comm)
    n = threads if threads else threads_per_rank(cores, ranks)
    if torch:
        import torch as _torch

        _torch.set_num_threads(n)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    return n, oversubscription_warning(cores, ranks, n)
