"""A parameter-server shard in one MPI window: workers pull and push with
one-sided (passive-target) RMA, the owner takes no part in each exchange.

Shape legend: n parameters on the owner rank; every other rank holds none.

    pull(out)                     out ← p, and the version v read with it
    push(grad, lr, read_version)  p ← p − lr·g, v ← v + 1, as one atomic step;
                                  returns the staleness (updates others applied
                                  since this worker's read)
    push_unlocked(grad, lr)       the same read-modify-write done naively: it
                                  loses updates when pushes overlap (the lesson)

    OneSided                      the parameter servers' shards as windows, and the
                                  epoch's batch tickets: ``--rma``'s transport

**Progress** (MPICH 5.0.2 from PyPI, ch4, 2 ranks on one 2-core node, n = 1000
float64). Passive target is not passive here: every Lock, Get and Unlock needs
the *owner* to be inside MPI. Measured under ``mpirun -n 2``: the owner spends
5 s as below while rank 1 does Lock(SHARED), Get, Unlock (times from the start):

    owner in a NumPy/Python loop, no MPI call   Lock returns after 5.000 s
    owner in time.sleep(5)                      Lock returns after 5.000 s
    owner in Barrier or Recv                    Lock 0.0000 s, Unlock 0.0001 s
    owner computing, Iprobe every 10 ms         Lock 0.010 s, Unlock 0.020 s
    MPIR_CVAR_ASYNC_PROGRESS=1, owner computing Lock 0.004 s, Unlock 0.012 s

The same with Win.Create, Win.Allocate_shared, exclusive locks with
Accumulate, and MPIR_CVAR_NOLOCAL=1. A locked push (Accumulate + Fetch_and_op)
costs 0.015 ms with the owner in a Barrier (0.06 ms at -n 4), 5.5 ms with the
owner computing and polling every ~3 ms; async progress makes it 2.5-8 ms and
halves the owner's own compute rate (a progress thread per rank on 2 cores).
So the owner of a shard should wait in a blocking MPI call (or poll) while
workers use it; async progress is the fallback for an owner that must compute.

**One window.** The version lives in the same window, after the parameters
(8-byte aligned): one lock then covers both, so a pull reads a parameter vector
and the version that counts exactly the updates in it, with no second lock to
order against a pusher's.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI
from mpi4py.util.dtlib import from_numpy_dtype


class RmaShard:
    """``n`` parameters of ``dtype`` (float32 or float64) held by rank ``owner`` of
    ``comm`` in an MPI window, with an int64 count of the updates applied.
    Collective over ``comm``; ``initial`` (owner only, n values) fills the parameters
    (zeros by default)."""

    def __init__(self, comm, owner, n, dtype, initial=None):
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"RmaShard holds float32 or float64, not {self.dtype}")
        if not 0 <= owner < comm.Get_size():
            raise ValueError(f"owner {owner} is not a rank of a communicator of {comm.Get_size()}")
        self.comm, self.owner, self.n = comm, int(owner), int(n)
        self.is_owner = comm.Get_rank() == self.owner
        self._mpi_type = from_numpy_dtype(self.dtype)
        self._vdisp = -(-self.n * self.dtype.itemsize // 8) * 8  # the version's byte offset
        nbytes = self._vdisp + 8 if self.is_owner else 0
        self._win = MPI.Win.Allocate(nbytes, 1, comm=comm)  # disp_unit 1: byte offsets
        self._params = self._version = None
        self._step = np.empty(self.n, self.dtype)  # a push's −lr·g, alive until its Unlock
        if self.is_owner:
            mem = self._win.tomemory()
            self._params = np.frombuffer(mem, self.dtype, count=self.n)  # (n,)
            self._version = np.frombuffer(mem, np.int64, count=1, offset=self._vdisp)
            self._win.Lock(self.owner, MPI.LOCK_EXCLUSIVE)  # local stores inside an epoch
            self._params[:] = 0 if initial is None else initial
            self._version[0] = 0
            self._win.Unlock(self.owner)
        comm.Barrier()  # nobody reads before the owner wrote

    @property
    def local(self):
        """The owner's parameters in place, (n,). Other ranks' pushes write into it:
        read it when they are done (after a barrier) or between Lock/Unlock on the owner."""
        if not self.is_owner:
            raise RuntimeError(f"only the owner (rank {self.owner}) holds the parameters")
        if self._win is None:
            raise RuntimeError("the shard is closed")
        return self._params

    def _check(self, a, name):
        if a.shape != (self.n,) or a.dtype != self.dtype or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a contiguous ({self.n},) {self.dtype} array, "
                             f"not {a.shape} {a.dtype}")

    def pull(self, out):
        """out ← p (n,), read under a shared lock with the version; returns the version."""
        self._check(out, "out")
        version = np.empty(1, np.int64)
        self._win.Lock(self.owner, MPI.LOCK_SHARED)
        self._win.Get(out, self.owner, target=(0, self.n, self._mpi_type))
        self._win.Get(version, self.owner, target=(self._vdisp, 1, MPI.INT64_T))
        self._win.Unlock(self.owner)  # both Gets are complete here
        return int(version[0])

    def push(self, grad, lr, read_version):
        """p ← p − lr·g and v ← v + 1 as one step; returns v_before − read_version.

        Accumulate is atomic per element on its own, but the exclusive lock makes the
        whole vector and the version one unit: a pull sees all of an update or none."""
        self._check(grad, "grad")
        step = np.multiply(grad, -lr, out=self._step)  # (n,)
        one, before = np.ones(1, np.int64), np.empty(1, np.int64)
        self._win.Lock(self.owner, MPI.LOCK_EXCLUSIVE)
        self._win.Accumulate(step, self.owner, target=(0, self.n, self._mpi_type), op=MPI.SUM)
        self._win.Fetch_and_op(one, before, self.owner, self._vdisp, op=MPI.SUM)
        self._win.Unlock(self.owner)
        return int(before[0]) - int(read_version)

    def push_unlocked(self, grad, lr, hold=0.0):
        """The WRONG update, kept only for the lesson (mpi_examples/rma_lock.py) and its
        test: Get p and v under a *shared* lock, compute p − lr·g and v + 1 locally, Put
        them back. Two pushes that overlap both read the same p and the later Put erases
        the earlier update: updates are lost (and MPI calls such overlapping Puts
        undefined). ``hold`` seconds are slept between the read and the write, standing
        for work done in between, so that the lesson's overlaps are certain."""
        self._check(grad, "grad")
        p, v = np.empty(self.n, self.dtype), np.empty(1, np.int64)
        self._win.Lock(self.owner, MPI.LOCK_SHARED)
        self._win.Get(p, self.owner, target=(0, self.n, self._mpi_type))
        self._win.Get(v, self.owner, target=(self._vdisp, 1, MPI.INT64_T))
        self._win.Flush(self.owner)  # p and v have arrived
        if hold:
            time.sleep(hold)
        p -= lr * grad
        v += 1
        self._win.Put(p, self.owner, target=(0, self.n, self._mpi_type))
        self._win.Put(v, self.owner, target=(self._vdisp, 1, MPI.INT64_T))
        self._win.Unlock(self.owner)

    def version(self):
        """The number of updates applied so far (on any rank; under a shared lock)."""
        v = np.empty(1, np.int64)
        self._win.Lock(self.owner, MPI.LOCK_SHARED)
        self._win.Get(v, self.owner, target=(self._vdisp, 1, MPI.INT64_T))
        self._win.Unlock(self.owner)
        return int(v[0])

    def close(self):
        """Free the window (collective over ``comm``); a second call does nothing."""
        if self._win is not None:
            self._params = self._version = None  # no view may outlive the memory
            self._win.Free()
            self._win = None


class OneSided:
    """``--rma``'s transport: server j's shard (``cuts[j]``, a ``zero_comm.Shards``) in an
    ``RmaShard`` owned by world rank j, filled from ``flat`` (the whole initial
    parameters, every rank's), and a ticket counter on rank 0 that hands out the
    epoch's batches. Collective over ``world`` to build and to close."""

    def __init__(self, world, cuts, flat):
        rank = world.Get_rank()
        self.cuts = cuts
        self.shards = [RmaShard(world, j, c.real, flat.dtype,
                                flat[c.lo:c.hi] if rank == j else None)
                       for j, c in enumerate(cuts)]
        self.local = self.shards[rank].local if rank < len(cuts) else None  # a server's
        self.tickets = MPI.Win.Allocate(8 if rank == 0 else 0, 8, comm=world)
        self._one, self._got = np.ones(1, np.int64), np.empty(1, np.int64)

    def set_tickets(self, first):
        """Rank 0: the epoch's next batch is ``first`` (before anyone takes one)."""
        self.tickets.Lock(0, MPI.LOCK_EXCLUSIVE)
        np.frombuffer(self.tickets.tomemory(), np.int64, count=1)[0] = first
        self.tickets.Unlock(0)

    def take_ticket(self):
        """The next batch of the epoch (an atomic fetch-and-add on rank 0)."""
        self.tickets.Lock(0, MPI.LOCK_SHARED)
        self.tickets.Fetch_and_op(self._one, self._got, 0, 0, op=MPI.SUM)
        self.tickets.Unlock(0)
        return int(self._got[0])

    def pull(self, flat):
        """Every shard into its slice of ``flat`` (the whole buffer); the versions read."""
        return [s.pull(flat[c.lo:c.hi]) for s, c in zip(self.shards, self.cuts, strict=True)]

    def push(self, grad, lr, read):
        """Every slice of ``grad`` to its shard; the staleness on shard 0."""
        stale = [s.push(grad[c.lo:c.hi], lr, v)
                 for s, c, v in zip(self.shards, self.cuts, read, strict=True)]
        return stale[0]

    def version(self, j):
        """Shard j's updates so far (a lock epoch on it)."""
        return self.shards[j].version()

    def close(self):
        for s in self.shards:
            s.close()
        if self.tickets is not None:
            self.tickets.Free()
            self.tickets = None
