"""One-sided updates in one idea: a read-modify-write through an MPI window is
only an update if nobody else can write between the read and the write.

Rank 0 owns a parameter shard p (and a version counter v) in a window
(``Win.Allocate``); the other ranks are workers that update it with RMA, rank 0
taking no part in each exchange (passive target). Each worker pushes K times
the gradient g = 1 with lr = 1, so after W workers p must be −W·K and v = W·K.

    naive   Lock(SHARED); Get p, v; Flush; ...work...; Put p − g, v + 1; Unlock
    locked  pull p, v (shared lock); ...work...;
            Lock(EXCLUSIVE); Accumulate(−g, SUM); Fetch_and_op(+1); Unlock

The naive worker holds a shared lock, which lets the others in: two workers
read the same p, and the later Put erases the earlier one's update (MPI even
calls such overlapping Puts undefined). The locked worker sends the *change*
instead of the new value, under an exclusive lock, so no update is lost, and
Fetch_and_op tells it how many others were applied since its read (staleness).

The "...work..." is a 1 ms sleep, standing for a worker's backward pass.
Without it the read-to-write gap is a few microseconds and whether two
workers overlap is up to the OS scheduler; with it the naive run loses
updates on every run. (A sleep, not a busy loop: the ranks share two cores.)

Rank 0 waits in a Barrier while the workers push: with this MPICH, passive
target still needs the owner inside MPI to grant a lock (a rank that only
computes stalls every Lock until its next MPI call).

The check: the locked run applies all W·K updates (p and v exact: small
integers in float64); the naive run must lose some, or the lesson showed nothing.

Run:  mpirun -n 4 python mpi_examples/rma_lock.py    (3 or more ranks)
"""

import time

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
if size < 3:  # one worker alone never overlaps anybody
    raise SystemExit(f"run with 3 or more ranks (mpirun -n 4), not {size}")
n, K, work = 100, 30, 0.001  # parameters, pushes per worker, seconds between read and write
workers = size - 1

win = MPI.Win.Allocate((n + 1) * 8 if rank == 0 else 0, 8, comm=comm)  # p: n float64, v: 1 int64
if rank == 0:
    mem = win.tomemory()
    p, v = np.frombuffer(mem, np.float64, count=n), np.frombuffer(mem, np.int64, offset=8 * n)
g = np.ones(n)  # (n,) every worker's gradient


def naive_push():
    q, u = np.empty(n), np.empty(1, np.int64)
    win.Lock(0, MPI.LOCK_SHARED)
    win.Get(q, 0, target=(0, n, MPI.DOUBLE))
    win.Get(u, 0, target=(n, 1, MPI.INT64_T))
    win.Flush(0)  # q and u have arrived
    time.sleep(work)  # the backward pass
    q -= g
    u += 1
    win.Put(q, 0, target=(0, n, MPI.DOUBLE))
    win.Put(u, 0, target=(n, 1, MPI.INT64_T))
    win.Unlock(0)


def locked_push():
    """Returns the staleness: the updates others applied between this read and this write."""
    q, read, before = np.empty(n), np.empty(1, np.int64), np.empty(1, np.int64)
    win.Lock(0, MPI.LOCK_SHARED)  # pull
    win.Get(q, 0, target=(0, n, MPI.DOUBLE))
    win.Get(read, 0, target=(n, 1, MPI.INT64_T))
    win.Unlock(0)
    time.sleep(work)  # the backward pass (on q)
    win.Lock(0, MPI.LOCK_EXCLUSIVE)  # push
    win.Accumulate(-g, 0, target=(0, n, MPI.DOUBLE), op=MPI.SUM)
    win.Fetch_and_op(np.ones(1, np.int64), before, 0, n, op=MPI.SUM)
    win.Unlock(0)
    return int(before[0] - read[0])


def run(push):
    """Every worker pushes K times; rank 0 returns (p[0], v) after, the workers their staleness."""
    if rank == 0:
        win.Lock(0, MPI.LOCK_EXCLUSIVE)  # local stores inside an epoch
        p[:], v[0] = 0.0, 0
        win.Unlock(0)
    comm.Barrier()  # the shard is reset
    stale = [push() for _ in range(K)] if rank else []
    comm.Barrier()  # rank 0 waits here, inside MPI, while the workers push
    if rank == 0:
        win.Lock(0, MPI.LOCK_SHARED)
        result = p.copy(), int(v[0])
        win.Unlock(0)
        return result
    return stale


pushed = workers * K
naive = run(naive_push)
locked = run(locked_push)
stale = comm.gather(locked if rank else [], root=0)
ok = True
if rank == 0:
    (p_naive, v_naive), (p_locked, v_locked) = naive, locked
    applied = int(-p_naive[0])
    print(f"{workers} workers x {K} pushes = {pushed}")
    print(f"naive  (shared lock, Get/Put):    applied {applied}, version {v_naive}: "
          f"lost {pushed - applied} updates")
    print(f"locked (exclusive, Accumulate):   applied {int(-p_locked[0])}, version {v_locked}: "
          f"lost {pushed - int(-p_locked[0])}; mean staleness "
          f"{np.mean([s for ss in stale for s in ss]):.2f}")
    ok = (np.array_equal(p_locked, np.full(n, -float(pushed))) and v_locked == pushed
          and applied < pushed)
ok = comm.bcast(ok, root=0)
win.Free()
if not ok:
    raise SystemExit("the locked run lost updates, or the naive run lost none")
