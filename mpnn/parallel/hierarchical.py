"""Hierarchical (hybrid) gradient Allreduce: shared memory inside a node,
messages between nodes (``--allreduce hierarchical``).

The data-parallel group ``comm`` splits into nodes
(``comm.Split_type(COMM_TYPE_SHARED)``: L ranks each, the same L on every
node) and into L *cross* groups, one per local rank (``comm.Split(local
rank)``: one rank of every node). Each rank's gradient buffer is its
segment of one shared-memory window of the node (``Win.Allocate_shared``),
so every rank of the node can read every other's gradient. For each bucket
(a contiguous range of the flat buffer, ``make_buckets``), cut into L
contiguous parts:

    1. reduce in shared memory   local rank j adds part j of the node's other
                                 L - 1 gradients into its own part j
    2. Allreduce between nodes   part j summed over the cross group j (one rank
                                 per node; only Ψ/L elements leave each rank)
    3. broadcast in shared memory  every rank copies the other parts from the
                                 ranks that own them

Between the phases a node barrier (with ``Win.Sync`` on both sides: MPI's
memory model for a shared window) orders the writes before the reads. Each
element is summed once per node and then across nodes, so every rank ends
with the same bits, and the sum is the flat Allreduce's up to the order of
the additions. Between nodes only Ψ/L elements per rank enter the Allreduce:
a node's L ranks together send what one rank alone would in an Allreduce of
Ψ over the nodes (2·Ψ·(n-1)/n with a bandwidth-optimal algorithm), where an
Allreduce over all L·n ranks that ignores the nodes sends up to L times that.
(MPICH's own Allreduce may itself be node-aware: the benchmark measures.)

With ``bucket_mb > 0`` the buckets overlap backward as in
``BucketedGradientSync``: when backward finishes a bucket's lowest layer the
node's ranks meet, reduce it and start its ``Iallreduce`` between nodes; the
broadcast runs in ``wait``. One node (a single-host run) has no cross
traffic at all; one rank per node degenerates to the flat Allreduce.

See docs/parallelism.md#12-beyond-one-machine.
"""

from __future__ import annotations

import numpy as np

from ..data.batching import share_bounds
from ..runtime import watchdog as wd
from .data_parallel import make_buckets


class HierarchyError(ValueError):
    """The ranks are not spread so that a hierarchical Allreduce can run."""


class NodeGroups:
    """``comm`` cut into nodes and cross groups (collective over ``comm``).

    ``node_of`` (tests and lessons only): a function of the rank in ``comm``
    giving its node, to play several nodes inside one machine's shared memory
    (default: the real nodes, ``COMM_TYPE_SHARED``)."""

    def __init__(self, comm, node_of=None):
        from mpi4py import MPI

        rank = comm.Get_rank()
        self.node = (comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank) if node_of is None
                     else comm.Split(int(node_of(rank)), key=rank))
        self.local, self.per_node = self.node.Get_rank(), self.node.Get_size()
        counts = comm.allgather(self.per_node)  # every rank's node size
        if len(set(counts)) > 1:
            sizes = sorted(set(counts))
            self.node.Free()
            raise HierarchyError(
                f"--allreduce hierarchical needs the same number of data-parallel ranks on every "
                f"node, and nodes here hold {', '.join(map(str, sizes))} of them: place the ranks "
                f"evenly (mpirun -ppn N, or N slots per host in the hostfile) or use "
                f"--allreduce flat")
        self.cross = comm.Split(self.local, key=rank)
        self.nodes = self.cross.Get_size()
        self.node_ranks = wd.group_ranks(self.node, "this node's data-parallel ranks")
        self.cross_ranks = wd.group_ranks(self.cross, "the ranks between nodes")

    def free(self):
        """The two communicators (MPI has a few thousand; a sweep makes them per trial)."""
        self.node.Free()
        self.cross.Free()


class _LockedWindow:
    """A window inside its passive epoch: unlocked, then freed."""

    def __init__(self, win):
        self.win = win

    def Free(self):  # noqa: N802 - the name data.shared.free_window calls, as on MPI.Win
        self.win.Unlock_all()
        self.win.Free()


class HierarchicalGradientSync:
    """The gradient sum over ``comm`` through the node's shared memory, then
    between nodes; the same interface as ``data_parallel.GradientSync``
    (``on_layer_done``, ``wait``, ``allreduce``).

    ``flat``'s gradient buffer is moved into this rank's segment of the
    node's window (its values kept), so backward writes where the node's
    other ranks can read; ``bucket_mb`` 0 is one bucket, reduced in ``wait``.
    """

    def __init__(self, comm, flat, layout, bucket_mb=0.0, node_of=None):
        from mpi4py import MPI

        from ..data.shared import check_room, register

        self.comm = comm
        self.active = comm.Get_size() > 1
        self.groups = g = NodeGroups(comm, node_of)
        n, dtype = int(flat.grad.size), flat.grad.dtype
        short = check_room(g.node, g.per_node * n * dtype.itemsize, "the node's gradients")
        if any(comm.allgather(short)):  # the same verdict on every rank of the group
            g.free()
            raise HierarchyError(
                f"--allreduce hierarchical keeps each node's gradients in shared memory and "
                f"{short or 'another node has too little'}: give /dev/shm more room (docker "
                f"run --shm-size ...) or use --allreduce flat")
        self.win = MPI.Win.Allocate_shared(n * dtype.itemsize, dtype.itemsize, comm=g.node)
        self.win.Lock_all(MPI.MODE_NOCHECK)  # one passive epoch; Sync orders the accesses
        self._registered = register(_LockedWindow(self.win))
        self.segments = []  # every local rank's gradient, (Ψ,) views of the window
        for j in range(g.per_node):
            buf, _ = self.win.Shared_query(j)
            self.segments.append(np.frombuffer(buf, dtype=dtype, count=n))
        self.grad = self.segments[g.local]
        self.flat = flat
        flat.bind_grad(self.grad)
        limit = bucket_mb if bucket_mb > 0 else float("inf")
        self.buckets = make_buckets(layout, dtype.itemsize, limit)
        self.overlap = bucket_mb > 0
        self._bucket_of_layer = {b.layers[-1]: k for k, b in enumerate(self.buckets)}
        # parts[k][j]: local rank j's (start, stop) of bucket k
        self.parts = [[tuple(b.start + e for e in share_bounds(b.stop - b.start, j, g.per_node))
                       for j in range(g.per_node)] for b in self.buckets]
        self._reduced = [False] * len(self.buckets)
        self._requests = []

    @property
    def host_nbytes(self):
        return 0  # the gradient buffer itself is shared: no copy

    # ------------------------------------------------------------- interface

    def on_layer_done(self, layer):
        """Called by ``MLP.backward`` when ``layer``'s gradients are final."""
        if not (self.active and self.overlap):
            return
        k = self._bucket_of_layer.get(layer)
        if k is not None and not self._reduced[k]:
            self._reduce(k)
        if self._requests:
            from mpi4py import MPI

            MPI.Request.Testall(self._requests)

    def wait(self):
        """Reduce the buckets not reduced yet, finish the sums between nodes, and
        copy every part this rank does not own from its owner."""
        if not self.active:
            return

        for k in range(len(self.buckets)):
            if not self._reduced[k]:
                self._reduce(k)
        g, n = self.groups, len(self._requests)
        for k, req in enumerate(self._requests):
            with wd.watch.op("gradient Allreduce between nodes", ("bucket {} of {}", k + 1, n),
                             ranks=g.cross_ranks):
                req.Wait()
        self._requests = []
        self._node_barrier()  # every part's sum is final
        me, segments = self.groups.local, self.segments
        for parts in self.parts:
            for j, (lo, hi) in enumerate(parts):
                if j != me:
                    self.grad[lo:hi] = segments[j][lo:hi]
        self._node_barrier()  # nobody writes its gradient while another still reads it
        self._reduced = [False] * len(self.buckets)

    def allreduce(self):
        self.wait()

    def free(self):
        """Release the window (collective over the node); the gradient moves back into
        private memory first, so the model stays usable."""
        from ..data.shared import free_window

        self.flat.bind_grad(self.grad.copy())
        self.grad = self.segments = None
        free_window(self._registered)
        self.groups.free()

    # -------------------------------------------------------------- helpers

    def _node_barrier(self):
        self.win.Sync()
        with wd.watch.op("gradient sum's node barrier", comm=self.groups.node,
                         ranks=self.groups.node_ranks, check=("Barrier", 0, "-")):
            self.groups.node.Barrier()
        self.win.Sync()

    def _reduce(self, k):
        """Bucket k: this rank's part summed over the node, then (started) between nodes."""
        from mpi4py import MPI

        g = self.groups
        if g.per_node > 1:
            self._node_barrier()  # the node's gradients of bucket k are final
            lo, hi = self.parts[k][g.local]
            mine = self.grad[lo:hi]
            for j, seg in enumerate(self.segments):
                if j != g.local:
                    mine += seg[lo:hi]
        if g.nodes > 1:
            lo, hi = self.parts[k][g.local]
            part = self.grad[lo:hi]
            if wd.watch.check:
                wd.watch.fingerprint(g.cross, "gradient Iallreduce between nodes",
                                     ("bucket {}", k + 1), g.cross_ranks,
                                     ("Iallreduce", part.size, part.dtype))
            self._requests.append(g.cross.Iallreduce(MPI.IN_PLACE, part, op=MPI.SUM))
        self._reduced[k] = True
