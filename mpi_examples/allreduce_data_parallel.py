"""Data parallelism in one idea: every rank computes the gradient of its share of
the batch, and one Allreduce(SUM) turns those into the gradient of the whole batch.

Each rank holds the same weights w of a linear least-squares model
``loss = 1/(2N) Σ (x·w - y)²`` over a global batch of N rows. Rank r takes its
contiguous slice of rows, computes ``g_r = x_rᵀ(x_r·w - y_r) / N`` (scaled by
the *global* batch size, not its own), and ``Allreduce(IN_PLACE, g, SUM)`` leaves
``Σ_r g_r`` -- exactly the full-batch gradient -- on every rank. Every replica
then takes the same step, so the weights stay identical without ever being sent.
The buffer-based uppercase ``Allreduce`` sends the array's memory directly
(the lowercase ``allreduce`` would pickle it).

Run:  mpirun -n 4 python mpi_examples/allreduce_data_parallel.py
"""

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()

N, D, steps, lr = 64, 5, 50, 0.1
rng = np.random.default_rng(0)  # the same data and initial weights on every rank
x = rng.normal(size=(N, D))
y = x @ np.arange(1.0, D + 1) + 0.01 * rng.normal(size=N)
w = np.zeros(D)

lo, hi = rank * N // size, (rank + 1) * N // size  # this rank's contiguous rows
x_r, y_r = x[lo:hi], y[lo:hi]

g = np.empty(D)
for _ in range(steps):
    g[...] = x_r.T @ (x_r @ w - y_r) / N  # local share, scaled by 1/N (global)
    comm.Allreduce(MPI.IN_PLACE, g, op=MPI.SUM)  # g = full-batch gradient everywhere
    w -= lr * g

# check: the same as one process doing full-batch gradient descent
w_serial = np.zeros(D)
for _ in range(steps):
    w_serial -= lr * x.T @ (x @ w_serial - y) / N
assert np.allclose(w, w_serial, atol=1e-12)
if rank == 0:
    print(f"{size} ranks, rows per rank ~{N // size}: w = {np.round(w, 3)}  (serial max diff "
          f"{np.abs(w - w_serial).max():.1e})")
