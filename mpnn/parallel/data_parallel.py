"""Data parallelism: sum the flat gradient buffer across replicas.

Every replica computes the gradient of *its share* of the global batch,
already scaled by ``1/global_batch`` (the loss's ``scale``), so the SUM over
replicas is the gradient of the global-batch mean: one buffer-based
``Allreduce`` in place over the contiguous gradient buffer. With one replica
the sync is a no-op.
"""

from __future__ import annotations


class GradientSync:
    """Sums a flat gradient buffer over ``comm`` (None or size 1: no-op)."""

    def __init__(self, comm, grad, ops=None):
        self.comm = comm if comm is not None and comm.Get_size() > 1 else None
        self.grad = grad
        self.ops = ops

    def allreduce(self):
        """grad ← Σ_replicas grad, in place (blocking)."""
        if self.comm is None:
            return
        from mpi4py import MPI

        if self.ops is not None:
            self.ops.synchronize()  # device buffers must be complete before MPI reads them
        self.comm.Allreduce(MPI.IN_PLACE, self.grad, op=MPI.SUM)

    # The overlapped, bucketed variant hooks into backward through these two:
    def on_layer_done(self, layer):
        """Called by ``MLP.backward`` when ``layer``'s gradients are final."""

    def wait(self):
        """Finish the sum (blocking variant: do it all now)."""
        self.allreduce()
