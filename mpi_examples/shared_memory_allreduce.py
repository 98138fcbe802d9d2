"""Shared memory in one idea: the ranks of a node can read each other's arrays,
so the node's part of an Allreduce needs no messages.

``Split_type(COMM_TYPE_SHARED)`` groups the ranks that share a node's memory.
``Win.Allocate_shared`` gives each of them a segment of one shared window,
and ``Shared_query(j)`` maps rank j's segment into every rank's address
space: a NumPy array over it is rank j's data, read in place. A
hierarchical Allreduce then runs in three phases:

    1. each of the node's L ranks adds part j of the others' buffers into its
       own part j (shared memory: loads and adds, no MPI messages)
    2. part j is summed over the nodes with an Allreduce among the ranks
       holding part j (one per node: only 1/L of the data leaves each rank)
    3. each rank copies the parts it does not own from their owners

A barrier on the node (with ``Win.Sync`` on both sides: MPI's memory model
for shared windows) separates the phases, so nobody reads a part before its
owner wrote it, or overwrites its buffer while another still reads it.

Several nodes are played inside one machine by splitting the ranks into
pairs (``Split(rank // 2)``): the shared window still works, since the pairs
are on one machine, and the "between nodes" Allreduce runs over real MPI.

The check: the result equals ``comm.Allreduce``'s on every rank, with the
values chosen as integers so that every order of addition gives the same bits.

Run:  mpirun -n 4 python mpi_examples/shared_memory_allreduce.py    (or -n 2)
"""

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
if size % 2:  # every "node" must hold as many ranks: part j has one length on each
    raise SystemExit(f"run with an even number of ranks (mpirun -n 2 or -n 4), not {size}")
node = comm.Split(rank // 2, key=rank)  # a real run: comm.Split_type(MPI.COMM_TYPE_SHARED)
local, per_node = node.Get_rank(), node.Get_size()
cross = comm.Split(local, key=rank)  # the ranks holding the same part, one per node

n = 1000
win = MPI.Win.Allocate_shared(n * 8, 8, comm=node)  # this rank's segment: n float64
segments = [np.frombuffer(win.Shared_query(j)[0], dtype=np.float64, count=n)
            for j in range(per_node)]  # every rank's segment of this node, in place
mine = segments[local]
mine[:] = np.random.default_rng(rank).integers(-1000, 1000, n)  # this rank's "gradient"
expected = mine.copy()
comm.Allreduce(MPI.IN_PLACE, expected)  # what the three phases must give


def node_barrier():
    win.Sync()
    node.Barrier()
    win.Sync()


bounds = np.linspace(0, n, per_node + 1).astype(int)  # part j: bounds[j]..bounds[j + 1]
lo, hi = bounds[local], bounds[local + 1]
win.Lock_all(MPI.MODE_NOCHECK)
node_barrier()  # every rank's data is written
for j in range(per_node):  # 1. reduce my part over the node, in shared memory
    if j != local:
        mine[lo:hi] += segments[j][lo:hi]
cross.Allreduce(MPI.IN_PLACE, mine[lo:hi])  # 2. my part over the nodes
node_barrier()  # every part is final
for j in range(per_node):  # 3. copy the other parts from their owners
    if j != local:
        mine[bounds[j]:bounds[j + 1]] = segments[j][bounds[j]:bounds[j + 1]]
node_barrier()  # nobody overwrites its buffer while another still copies from it
win.Unlock_all()

assert np.array_equal(mine, expected), f"rank {rank}: the hierarchical sum differs"
ok = comm.allreduce(1)
if rank == 0:
    nodes = size // per_node
    crossed = f"{hi - lo} of {n} elements per rank crossed" if nodes > 1 else "nothing crossed"
    print(f"{size} ranks as {nodes} node(s) x {per_node}: the hierarchical sum equals "
          f"Allreduce on all {ok} ranks; {crossed} between nodes")
win.Free()
