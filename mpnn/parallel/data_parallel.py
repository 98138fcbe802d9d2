"""Data parallelism: sum the flat gradient buffer across replicas.

Every replica computes the gradient of *its share* of the global batch,
already scaled by ``1/global_batch`` (the loss's ``scale``), so the SUM over
replicas is the gradient of the global-batch mean: one buffer-based
``Allreduce`` in place over the contiguous gradient buffer. With one replica
the sync is a no-op.

    GradientSync          one blocking Allreduce after backward
    BucketedGradientSync  contiguous buckets in reverse layer order, each an
                          Iallreduce started as soon as backward finishes its
                          layers (overlapped with the rest of backward)
    DataParallelEngine    one training step of a whole-model replica: forward,
                          loss, backward, gradient sum (what the trainer and the
                          benchmark run)

See docs/parallelism.md#1-the-global-batch-is-the-unit and #5-bucket-order-and-overlap.
"""

from __future__ import annotations

import numpy as np

from ..nn.model import Context
from ..runtime import watchdog as wd
from ..runtime.trace import NULL_TRACER
from .staging import copy_from_host, copy_to_host, needs_host_staging


class GradientSync:
    """Sums a flat gradient buffer over ``comm`` (one rank: a no-op)."""

    def __init__(self, comm, grad, ops=None):
        self.comm = comm
        self.active = comm.Get_size() > 1
        self.grad = grad
        self.ops = ops
        self._host = None  # host copy of a device buffer MPI cannot read
        self.ranks = wd.group_ranks(comm, "the data-parallel group") if self.active else None

    def allreduce(self):
        """grad ← Σ_replicas grad, in place (blocking)."""
        if not self.active:
            return
        from mpi4py import MPI

        grad = self.grad
        if not isinstance(grad, np.ndarray):
            self.ops.synchronize()  # device buffers must be complete before MPI reads them
            if needs_host_staging(grad):
                if self._host is None:  # through a host copy, allocated once
                    self._host = np.empty(grad.shape, dtype=grad.dtype)
                grad = copy_to_host(grad, self._host)
        with wd.watch.op("gradient Allreduce", comm=self.comm, ranks=self.ranks,
                         nbytes=grad.nbytes, check=("Allreduce", grad.size, grad.dtype)):
            self.comm.Allreduce(MPI.IN_PLACE, grad, op=MPI.SUM)
        if grad is self._host:
            copy_from_host(self._host, self.grad)

    @property
    def host_nbytes(self):
        """Bytes of the host copy a device buffer goes through (0 without one)."""
        return int(self._host.nbytes) if self._host is not None else 0

    # The overlapped, bucketed variant hooks into backward through these two:
    def on_layer_done(self, layer):
        """Called by ``MLP.backward`` when ``layer``'s gradients are final."""

    def wait(self):
        """Finish the sum (blocking variant: do it all now)."""
        self.allreduce()


class BucketedGradientSync:
    """Overlapped, bucketed gradient sum: communication hidden behind backward.

    The flat gradient buffer is cut into contiguous buckets of whole layers,
    walked in *reverse* layer order (the last layers sit at the end of the
    buffer, and backward finishes them first), each at least ``bucket_mb``
    megabytes unless it is the last. When backward reports (``on_layer_done``)
    the lowest layer of a bucket, every layer of that bucket is final, so its
    non-blocking ``Iallreduce(IN_PLACE)`` starts at once and runs while
    backward computes the earlier layers. ``wait`` starts any bucket not yet
    started and completes them all: call it before the optimizer step.

    Same interface as ``GradientSync`` (``allreduce``, ``on_layer_done``,
    ``wait``) and the same result: each element is summed over the same
    replicas in the same way whatever bucket holds it. With gradient
    accumulation over micro-batches, pass ``on_layer_done`` only to the last
    micro-batch's backward (or to none: ``wait`` then sums everything).

    Requests and the bucket views stay referenced until their request is
    complete. With a device (CuPy) buffer the stream is synchronized before
    MPI touches a bucket; an MPI library that is not CUDA-aware gets the
    bucket through a host copy.
    """

    def __init__(self, comm, grad, layout, bucket_mb=2.0, ops=None):
        if bucket_mb <= 0:
            raise ValueError(f"--bucket-mb must be positive, got {bucket_mb}")
        self.comm = comm
        self.active = comm.Get_size() > 1
        self.grad = grad
        self.ops = ops
        self.buckets = make_buckets(layout, grad.dtype.itemsize, bucket_mb)
        self._nbytes = [(b.stop - b.start) * grad.dtype.itemsize for b in self.buckets]
        # a bucket is ready when its lowest layer (the last one backward reaches) is done
        self._bucket_of_layer = {b.layers[-1]: k for k, b in enumerate(self.buckets)}
        self._requests = [None] * len(self.buckets)
        self._host = None
        self._device = False
        self.ranks = wd.group_ranks(comm, "the data-parallel group") if self.active else None
        if self.active:
            self._device = not isinstance(grad, np.ndarray)
            if needs_host_staging(grad):
                self._host = np.empty(grad.shape, dtype=grad.dtype)

    @property
    def host_nbytes(self):
        """Bytes of the host copy a device buffer goes through (0 without one)."""
        return int(self._host.nbytes) if self._host is not None else 0

    # ------------------------------------------------------------- interface

    def on_layer_done(self, layer):
        """Called by ``MLP.backward`` when ``layer``'s gradients are final."""
        if not self.active:
            return
        k = self._bucket_of_layer.get(layer)
        if k is not None and self._requests[k] is None:
            self._start(k)
        self._progress()

    def wait(self):
        """Start the buckets not started yet, then complete every request."""
        if not self.active:
            return
        from mpi4py import MPI

        n = len(self.buckets)
        for k in range(n):
            if self._requests[k] is None:
                self._start(k)
        watch = wd.watch
        if watch.enabled:  # bucket by bucket, so a stall names its bucket
            for k, req in enumerate(self._requests):
                with watch.op("gradient Allreduce", ("bucket {} of {}", k + 1, n),
                              ranks=self.ranks, nbytes=self._nbytes[k]):
                    req.Wait()
        else:
            MPI.Request.Waitall(self._requests)
        if self._host is not None:  # the buckets tile the buffer: one copy back
            copy_from_host(self._host, self.grad)
        self._requests = [None] * len(self.buckets)

    def allreduce(self):
        """grad ← Σ_replicas grad, in place (blocking: all buckets now)."""
        self.wait()

    # -------------------------------------------------------------- helpers

    def _start(self, k):
        from mpi4py import MPI

        b = self.buckets[k]
        if self._device:
            self.ops.synchronize()  # the bucket's gradient kernels must have finished
        if self._host is not None:
            buf = copy_to_host(self.grad[b.start:b.stop], self._host[b.start:b.stop])
        else:
            buf = self.grad[b.start:b.stop]
        if wd.watch.check:  # --check-collectives: every rank starts the same bucket's sum
            wd.watch.fingerprint(self.comm, "gradient Iallreduce",
                                 ("bucket {} of {}", k + 1, len(self.buckets)), self.ranks,
                                 ("Iallreduce", buf.size, buf.dtype))
        self._requests[k] = self.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

    def _progress(self):
        """Let MPI advance the started requests (MPICH progresses non-blocking
        collectives only inside MPI calls, so poke it between layers)."""
        from mpi4py import MPI

        started = [r for r in self._requests if r is not None]
        if started:
            MPI.Request.Testall(started)


ALLREDUCES = ("flat", "hierarchical")


def make_gradient_sync(comm, model, bucket_mb=0.0, allreduce="flat"):
    """The gradient sum of ``model``'s flat buffer over ``comm``: one MPI Allreduce
    (``flat``), or shared memory inside each node then messages between nodes
    (``hierarchical``, ``parallel.hierarchical``); overlapped with backward in
    buckets when ``bucket_mb`` > 0, else one call after backward."""
    if allreduce == "hierarchical":
        from .hierarchical import HierarchicalGradientSync

        return HierarchicalGradientSync(comm, model.flat, model.layout, bucket_mb)
    if allreduce != "flat":
        raise ValueError(f"unknown --allreduce {allreduce!r}; choose one of "
                         f"{', '.join(ALLREDUCES)}")
    if bucket_mb > 0:  # overlapped with backward, bucket by bucket
        return BucketedGradientSync(comm, model.flat.grad, model.layout, bucket_mb, model.ops)
    return GradientSync(comm, model.flat.grad, model.ops)


class Bucket:
    """A contiguous range [start, stop) of the flat buffer holding ``layers``
    (in the reverse order backward finishes them)."""

    def __init__(self, start, stop, layers):
        self.start, self.stop, self.layers = start, stop, tuple(layers)

    def __repr__(self):
        return f"Bucket([{self.start}, {self.stop}), layers={self.layers})"


def make_buckets(layout, itemsize, bucket_mb, layers=None):
    """Cut ``layout``'s flat buffer into buckets of whole layers, last layer first.

    Walking the layers from the last, a bucket closes once it holds at least
    ``bucket_mb`` MB (10⁶ bytes); the buckets tile the buffer exactly (or the
    span of ``layers``, a contiguous range of its layers: one model chunk).
    """
    limit = bucket_mb * 1e6
    buckets, held, start, stop = [], [], None, None
    for i in reversed(layout.layers if layers is None else layers):
        lo, hi = layout.layer_span(i)
        if not held:
            stop = hi
        held.append(i)
        start = lo
        if (stop - start) * itemsize >= limit:
            buckets.append(Bucket(start, stop, held))
            held = []
    if held:
        buckets.append(Bucket(start, stop, held))
    return buckets


class DataParallelEngine:
    """One replica of the whole model; gradients summed over ``dp_comm``.

    ``train_step`` leaves the summed gradient of the global-batch mean loss in
    the flat gradient buffer; the caller steps the optimizer.
    """

    needs_inputs = True  # the trainer passes every replica its rows' features

    def __init__(self, model, loss, dp_comm, bucket_mb=0.0, tracer=NULL_TRACER, zero=0,
                 allreduce="flat"):
        self.model, self.loss = model, loss
        self.ops = model.ops
        self.tracer = tracer  # spans for --trace (a no-op by default)
        self.zero = None  # ZeRO: the model states sharded over dp_comm (parallel.zero)
        self._sync_span = "allreduce"
        if zero:
            from .zero import Zero

            self.zero = Zero(zero, model, dp_comm, bucket_mb, tracer=tracer)
            self.sync = self.zero.sync  # a reduce-scatter into this rank's gradient shard
            self._sync_span = "reduce-scatter"
        else:
            self.sync = make_gradient_sync(dp_comm, model, bucket_mb, allreduce)
        self.ctx = Context()
        self.dlogits = None
        # under tensor parallelism every shard computes the same loss: one reports it
        self.reports = model.reports

    def train_step(self, x, labels, scale):
        """Forward, loss (scaled by 1/global_batch), backward, gradient sum.

        x (b, I) and labels (b,) are this replica's rows; returns their loss sum."""
        model, ops, tracer, zero = self.model, self.ops, self.tracer, self.zero
        if zero is None or zero.stage == 1:  # (stages 2, 3 zero each scratch bucket they bind)
            model.zero_grad()
        loss_sum = 0.0
        if x.shape[0]:
            with tracer.span("forward", rows=int(x.shape[0])):
                logits = model.forward(x, self.ctx)  # (b, C)
                if self.dlogits is None or self.dlogits.shape != logits.shape:
                    self.dlogits = ops.xp.empty_like(logits)
                loss_sum = ops.loss(self.loss, logits, labels, scale, self.dlogits)
            with tracer.span("backward"):
                if zero is not None:
                    self.sync.begin()  # stages 2, 3: the first bucket's scratch
                model.backward(self.dlogits, self.ctx, on_layer_done=self.sync.on_layer_done)
        elif zero is not None and zero.stage == 3:  # no rows: the others' gathers all the same
            zero.idle_forward()
            zero.idle_backward()
        # bucketed: the wait for the buckets started in backward
        with tracer.span(self._sync_span):
            self.sync.wait()
        return loss_sum if self.reports else 0.0

    def evaluate(self, x, labels, chunk=2048):
        """(loss_sum, n_correct) over rows x (n, I) of this rank."""
        loss_sum, correct = 0.0, 0
        ctx = Context()
        passes = -(-x.shape[0] // chunk)
        if self.zero is not None and self.zero.stage == 3:  # every rank runs as many forward
            passes = self.zero.agree_max(passes)  # passes (each gathers every layer)
        for p in range(passes):
            s = p * chunk
            if s >= x.shape[0]:  # (ZeRO-3: this rank's rows ran out)
                self.zero.idle_forward()
                continue
            logits = self.model.forward(x[s:s + chunk], ctx)
            l, c = self.ops.predict_stats(logits, labels[s:s + chunk], self.loss)
            loss_sum, correct = loss_sum + l, correct + c
        return (loss_sum, correct) if self.reports else (0.0, 0)

    def state_dict(self):
        """The whole model's named tensors (every replica holds them all; under
        ZeRO-3 gathered to the first replica)."""
        if self.zero is not None and self.zero.stage == 3:
            return self.zero.state_dict()
        return self.model.state_dict()

    def activations(self):
        """Layer -> its output (b, O) in the last training forward, for the NaN guard."""
        return self.ctx.outputs

    def epoch_metrics(self):
        return {}

    def memory(self):
        """Bytes this rank allocated: parameters, gradients, and the activations the
        last step kept (every buffer of its context, the loss gradient's too)."""
        acts = self.ctx.nbytes() + (int(self.dlogits.nbytes) if self.dlogits is not None else 0)
        if self.zero is not None:  # the shards, and the scratch the collectives use
            return {**self.zero.memory(), "activations": acts}
        return {"params": int(self.model.flat.data.nbytes),
                "grads": int(self.model.flat.grad.nbytes),
                "comm": self.sync.host_nbytes, "activations": acts}

    def close(self):
        """Free what the gradient sum holds beyond arrays (a shared window)."""
        free = getattr(self.sync, "free", None)
        if free is not None:
            free()

    def describe(self):
        if self.zero is not None:
            return self.zero.describe()
        return self.model.describe()
