"""Overlapping communication with computation in one idea: sum the gradient
bucket by bucket, each bucket's non-blocking Allreduce started the moment
backward has finished writing it, while backward goes on with earlier layers.

All gradients live in one flat buffer, layer 0 first, so backward -- which
finishes the last layer first -- fills the buffer from its end. Cut it into
contiguous buckets of whole layers, walked from the end. Once backward has
written the lowest layer of a bucket, the bucket is final:
``Iallreduce(MPI.IN_PLACE, bucket, SUM)`` starts at once and returns a request,
and backward computes the next layer while the sum runs. MPICH moves a
non-blocking collective forward only while the process is inside some MPI
call, so backward pokes it with ``Request.Testall`` between layers; before the
optimizer step, ``Request.Waitall`` completes the rest. The bucket views and
their requests stay referenced until then: MPI reads and writes that memory in
the background.

The check: the bucketed sum equals one blocking Allreduce of the whole buffer,
bit for bit. Bucketing changes the message sizes, and with them the order in
which MPI may add the ranks' values, so the gradients here are rounded to a
2⁻²⁰ grid, where every order gives the same bits; the comparison then checks
exactly what bucketing can get wrong -- every element summed once, over every
rank, after backward wrote it. Then it times backward alone, the blocking step
and the overlapped one, and prints how much communication time was hidden.
That depends on who moves the bytes: between nodes the network card does,
while the ranks compute; between ranks of one node MPI copies them itself,
on the ranks' own cores inside those MPI calls, so with no spare core expect
nothing hidden, or a little lost to the pokes.

Run:  mpirun -n 4 python mpi_examples/bucketed_allreduce_overlap.py    (or -n 2)
"""

import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one BLAS thread per rank: ranks share the cores
import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()

L, B, n, per_bucket, repeats = 8, 256, 256, 2, 10  # layers, rows, width, layers per bucket
P = n * n  # gradients per layer: layer i owns grad[i*P:(i+1)*P]
rng = np.random.default_rng(rank)  # each rank its own rows of the batch
x = [rng.normal(size=(B, n)) for _ in range(L)]  # (B, n) input of layer i
dy = [rng.normal(size=(B, n)) for _ in range(L)]  # (B, n) dL/d(output of layer i)
grad = np.empty(L * P)  # the flat gradient buffer, layer 0 first

# contiguous buckets of whole layers, from the end of the buffer: (lowest layer, start, stop)
buckets = []
for top in range(L - 1, -1, -per_bucket):
    low = max(top - per_bucket + 1, 0)
    buckets.append((low, low * P, (top + 1) * P))
bucket_done_by = {low: (start, stop) for low, start, stop in buckets}


def layer_backward(i):
    """Layer i's weight gradient dW = xᵀ·dy / B into its slice, rounded to 2⁻²⁰."""
    dW = x[i].T @ dy[i] / B  # (n, n)
    grad[i * P:(i + 1) * P] = np.round(dW.ravel() * 2**20) / 2**20


def backward(overlap):
    """Layers last to first; with ``overlap``, start each bucket as soon as it is final.

    Returns the requests and the bucket views they read and write: keep both
    until the requests complete."""
    requests, views = [], []
    for i in reversed(range(L)):
        layer_backward(i)
        if not overlap:
            continue
        if i in bucket_done_by:  # the bucket's lowest layer is written: all of it is final
            start, stop = bucket_done_by[i]
            views.append(grad[start:stop])  # contiguous: MPI gets its memory directly
            requests.append(comm.Iallreduce(MPI.IN_PLACE, views[-1], op=MPI.SUM))
        MPI.Request.Testall(requests)  # let MPI progress the sums already started
    return requests, views


def overlapped_step():
    requests, views = backward(overlap=True)
    MPI.Request.Waitall(requests)  # before the optimizer step: every bucket summed
    del views  # MPI is done with the memory only now


def blocking_step():
    backward(overlap=False)
    comm.Allreduce(MPI.IN_PLACE, grad, op=MPI.SUM)


# check: the overlapped, bucketed sum == one blocking Allreduce, bit for bit
blocking_step()
expected = grad.copy()
grad[...] = np.nan  # a bucket started before backward wrote it would sum NaN
overlapped_step()
assert np.array_equal(grad, expected), "bucketed sum differs from the single Allreduce"

# time it: backward alone, then with the blocking and with the overlapped sum
steps = (lambda: backward(overlap=False), blocking_step, overlapped_step)
t = np.empty((len(steps), repeats))  # seconds of each kind of step, each repeat
for r in range(repeats):  # interleaved, so a busy moment on the machine hits every kind
    for k, step in enumerate(steps):
        comm.Barrier()
        t0 = time.perf_counter()
        step()
        t[k, r] = time.perf_counter() - t0
comm.Allreduce(MPI.IN_PLACE, t, op=MPI.MAX)  # a step lasts until its slowest rank is done
t_backward, t_blocking, t_overlapped = t.min(axis=1)  # best of the repeats: least disturbed
if rank == 0:
    mb = per_bucket * P * grad.itemsize / 1e6
    print(f"{size} ranks, {len(buckets)} buckets of {per_bucket} layers ({mb:.2f} MB each): "
          f"bucketed sum == one Allreduce, bit for bit")
    exposed_blocking, exposed_overlapped = t_blocking - t_backward, t_overlapped - t_backward
    print(f"backward {t_backward * 1e3:.1f} ms; communication adds {exposed_blocking * 1e3:.1f} ms "
          f"to the blocking step, {exposed_overlapped * 1e3:.1f} ms to the overlapped one: "
          f"{(exposed_blocking - exposed_overlapped) * 1e3:.1f} ms hidden")
