"""Model parallelism in one idea: split the layers over two ranks and pass
activations forward and gradients backward with point-to-point messages.

A two-layer network ``y = relu(x·W1)·W2`` is cut in two: rank 0 owns W1, rank 1
owns W2. For each of M micro-batches rank 0 computes ``h = relu(x·W1)`` and
``Send``s h to rank 1; rank 1 ``Recv``s it into a buffer it preallocated (it
knows the shape from the layer sizes and the micro-batch rows), computes the
loss and ``dh = dL/dh``, and ``Send``s dh back; rank 0 ``Recv``s dh and
finishes its backward. Gradients of all micro-batches are summed, each scaled
by 1/(global batch), so the result equals one full-batch step. This is the
simplest ("naive") schedule -- one micro-batch in flight at a time, so one rank
always waits; GPipe and 1F1B (see ``python -m mpnn.schedule``) overlap them.
Tags keep activations (tag 2·mb) and gradients (tag 2·mb+1) apart.

Run:  mpirun -n 2 python mpi_examples/pipeline_two_stage.py
"""

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
if comm.Get_size() != 2:
    raise SystemExit("run with exactly two ranks: "
                     "mpirun -n 2 python mpi_examples/pipeline_two_stage.py")
rank = comm.Get_rank()

N, I, H, O, M = 32, 6, 8, 3, 4  # batch rows, sizes, micro-batches
rows = N // M
rng = np.random.default_rng(0)  # both ranks draw the same data and weights
x, y = rng.normal(size=(N, I)), rng.normal(size=(N, O))
W1, W2 = rng.normal(size=(I, H)) / np.sqrt(I), rng.normal(size=(H, O)) / np.sqrt(H)

h = np.empty((rows, H))  # the message buffer: activations forward, gradients backward
if rank == 0:
    dW1 = np.zeros_like(W1)
    for mb in range(M):
        xm = x[mb * rows:(mb + 1) * rows]
        h[...] = np.maximum(xm @ W1, 0)  # (rows, H)
        mask = h > 0
        comm.Send(h, dest=1, tag=2 * mb)  # activations ->
        comm.Recv(h, source=1, tag=2 * mb + 1)  # <- dL/dh
        dW1 += xm.T @ (h * mask)  # (I, H)
else:
    dW2, loss = np.zeros_like(W2), 0.0
    for mb in range(M):
        comm.Recv(h, source=0, tag=2 * mb)  # activations of micro-batch mb
        out = h @ W2  # (rows, O)
        diff = out - y[mb * rows:(mb + 1) * rows]
        loss += 0.5 * (diff ** 2).sum() / N
        dout = diff / N  # 1/(global batch): micro-batches sum to the full-batch gradient
        dW2 += h.T @ dout  # (H, O)
        dh = np.ascontiguousarray(dout @ W2.T)  # (rows, H)
        comm.Send(dh, dest=0, tag=2 * mb + 1)

# check against one process computing the full batch at once
hs = np.maximum(x @ W1, 0)
d = (hs @ W2 - y) / N
if rank == 0:
    assert np.allclose(dW1, x.T @ ((d @ W2.T) * (hs > 0))), "stage 0: dW1 differs"
    print("stage 0: dW1 matches the full-batch gradient")
else:
    assert np.allclose(dW2, hs.T @ d), "stage 1: dW2 differs"
    print(f"stage 1: loss {loss:.4f}, dW2 matches the full-batch gradient")
