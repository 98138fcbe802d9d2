"""ZeRO in one idea: an Allreduce is a reduce-scatter then an all-gather, and
the optimizer step fits between the two.

Data parallelism sums the flat gradient over the ranks (``Allreduce``) and
then every rank runs the same optimizer step on the same numbers, each
keeping the whole optimizer state. Split the sum: ``Reduce_scatter_block``
leaves rank j the sum of its own contiguous slice only, and ``Allgather``
would hand every rank every slice. The update of an element needs only that
element's summed gradient and its own optimizer state, so rank j can step
its slice alone -- keeping the momentum of its slice only, 1/N of it -- and
all-gather the *updated parameters* instead of the summed gradients. Same
bytes on the wire, same result, N times less optimizer state (ZeRO stage 1;
stage 2 drops the whole gradient too, stage 3 the whole parameters).

The buffer is padded to a multiple of N so every slice has the same length
(the regular collectives need it); the padding is zeros, and the step is
given only the real elements of a slice, so it never enters the math.

The check: three steps of SGD with momentum, sharded, give bitwise the
parameters of the replicated steps (with 2 ranks a + b is the same in
either collective; with more, MPI may add in another order, so the
gradients are rounded to a 2⁻²⁰ grid where every order gives the same bits).

Run:  mpirun -n 4 python mpi_examples/zero_sharded_step.py    (or -n 2)
"""

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()

numel, lr, mu, steps = 1001, 0.1, 0.9, 3  # 1001: no rank count here divides it
shard = -(-numel // size)  # S = ceil(numel / N): every slice the same length
lo, hi = rank * shard, min((rank + 1) * shard, numel)  # this rank's real elements
start = np.random.default_rng(0).normal(size=numel)  # the same start on every rank


def gradient(step):
    """This rank's gradient of its rows at ``step``, rounded to 2⁻²⁰ (see above)."""
    g = np.random.default_rng([step, rank]).normal(size=numel)
    return np.round(g * 2**20) / 2**20


# replicated: Allreduce, then the whole step on every rank, the whole velocity on each
theta, velocity = start.copy(), np.zeros(numel)
for t in range(steps):
    g = gradient(t)
    comm.Allreduce(MPI.IN_PLACE, g, op=MPI.SUM)
    velocity = mu * velocity + g
    theta -= lr * velocity

# sharded: reduce-scatter, step the slice, all-gather the parameters
padded = np.zeros(shard * size)  # (S·N,) the parameters, padded
padded[:numel] = start
mine = padded[lo:hi]  # a view: the step writes the slice in place
v_mine = np.zeros(hi - lo)  # the velocity of this slice only
g_padded, g_mine = np.zeros(shard * size), np.empty(shard)
for t in range(steps):
    g_padded[:numel] = gradient(t)
    comm.Reduce_scatter_block(g_padded, g_mine, op=MPI.SUM)  # Σ_ranks of my slice
    v_mine[...] = mu * v_mine + g_mine[:hi - lo]  # the real elements only
    mine -= lr * v_mine
    comm.Allgather(MPI.IN_PLACE, padded)  # every slice to every rank

assert np.array_equal(padded[:numel], theta), "the sharded step differs from the replicated one"
assert not padded[numel:].any(), "the padding entered the math"
total = comm.allreduce(v_mine.size)
if rank == 0:
    print(f"{size} ranks, {numel} parameters in slices of {shard} "
          f"({shard * size - numel} of padding): {steps} sharded momentum steps == replicated, "
          f"bit for bit; velocity held per rank {v_mine.size} of {numel} "
          f"(all ranks together {total}: each element once)")
