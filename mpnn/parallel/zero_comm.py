"""ZeRO's communication: contiguous shards of the flat buffer, the bucketed
reduce-scatter of gradients and the per-layer all-gather of parameters.

Shape legend: Ψ elements in the flat buffer (a model, or one pipeline stage),
N data-parallel ranks, S = ⌈Ψ/N⌉ elements per shard.

    Shards              rank j owns [j·S, min((j+1)·S, Ψ)): one contiguous slice
    Ring                two-ended scratch in which a unit (a bucket, a layer) and
                        the next one of its sequence are alive at once
    ShardedGradSync     grad shard ← Σ_replicas grad over this rank's slice, one
                        non-blocking reduce-scatter per bucket as soon as backward
                        finishes the bucket's layers (stage 1: from the whole
                        gradient buffer; stages 2 and 3: from scratch, so no rank
                        ever holds the whole gradient)
    ParamGather         stage 3: layer i's (W, b) all-gathered from the shards just
                        before its forward (and its backward), the next layer's
                        gather started at once, the buffer reused two layers on

**Padding.** S·N ≥ Ψ: the last shard has ``S·N − Ψ`` fewer real elements
(the padding, fewer than N). Buffers that every rank exchanges whole (the
parameters' Allgather of stages 1 and 2) are allocated with S·N elements and
the model's views cover the first Ψ, so the tail is never read by a layer;
the optimizer steps only the real elements of a shard (its state has that
length) and the reduce-scatters write only real elements, so the padding
holds zeros that never enter the math.

**A collective's backward** (STYLE 12). Stage 3's gather is the forward
``W = AllGather(W_shards)``; its backward is ``dW_shard = ReduceScatter(dW)``:
the adjoint of copying a shard to every rank is summing every rank's
contribution back onto that shard. Data parallelism's Allreduce is exactly
the two in sequence (a reduce-scatter then an all-gather), which is why
ZeRO costs no more bytes than plain data parallelism at stages 1 and 2 and
1.5 times as many at stage 3 (the parameters are gathered twice).

See docs/parallelism.md#10-zero-sharded-data-parallelism.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI
from mpi4py.util.dtlib import from_numpy_dtype

from ..runtime import watchdog as wd
from ..runtime.trace import NULL_TRACER
from .data_parallel import make_buckets


class Shards:
    """How a flat buffer of ``numel`` elements is cut over ``n`` ranks; ``rank``'s slice."""

    def __init__(self, numel, n, rank):
        self.numel, self.n, self.rank = int(numel), int(n), int(rank)
        self.size = -(-self.numel // self.n)  # S = ⌈Ψ/N⌉
        self.padded = self.size * self.n
        self.lo = self.rank * self.size
        self.hi = max(self.lo, min(self.lo + self.size, self.numel))
        self.real = self.hi - self.lo  # this rank's real elements (S, or fewer on the last)

    @property
    def padding(self):
        return self.padded - self.numel

    def counts(self, start, stop):
        """How many of the elements [start, stop) each rank's shard holds (rank order)."""
        return [max(0, min(stop, (j + 1) * self.size, self.numel) - max(start, j * self.size))
                for j in range(self.n)]

    def mine(self, start, stop):
        """(a, b): this rank's part of [start, stop), in flat coordinates (a == b: none)."""
        a = min(max(start, self.lo), self.hi)
        return a, max(a, min(stop, self.hi))


class Ring:
    """Scratch for a sequence of units of which two consecutive ones may live at once.

    Unit k sits at the start of the buffer when k is even and at its end when
    odd. With ``pairs`` the buffer holds the largest pair of consecutive units,
    so a unit and its neighbour never overlap; without, only the largest unit,
    and two neighbours share it only where they fit together. ``take`` first
    evicts (through the owner's ``evict(k)``, which completes any request on
    it) the unit now at the same end (unit k itself too: a pipeline reuses a
    bucket every micro-batch), and the one at the other end if the two would
    overlap.
    """

    def __init__(self, sizes, dtype, pairs=True):
        sizes = [int(s) for s in sizes]
        together = [a + b for a, b in zip(sizes, sizes[1:], strict=False)] if pairs else []
        self.size = max(together + sizes)
        self.buf = np.zeros(self.size, dtype=dtype)
        self._at = [None, None]  # (unit, length) at the start, at the end

    @property
    def nbytes(self):
        return int(self.buf.nbytes)

    def take(self, k, n, evict):
        """A view of ``n`` elements for unit ``k`` (any unit already there is evicted)."""
        end = k % 2
        for side in (end, 1 - end):
            held = self._at[side]
            if held is not None and (side == end or held[1] + n > self.size):
                evict(held[0])
                self._at[side] = None
        self._at[end] = (k, n)
        return self.buf[:n] if end == 0 else self.buf[self.size - n:]

    def forget(self):
        self._at = [None, None]


class ShardedGradSync:
    """Reduce-scatter of the flat gradient, bucket by bucket, into ``grad_shard``.

    Buckets are made per model chunk (``make_buckets``: whole layers, reverse
    order). Each bucket is one ``Ireduce_scatter`` whose ``counts[j]`` is the
    part of the bucket in rank j's slice; this rank receives its part straight
    into its place in ``grad_shard``. (Not ``MPI.IN_PLACE``: the PyPI MPICH 5.0
    aborts on an in-place reduce-scatter of 512 KiB or more whose blocks it
    would move over each other.) Stage 1 (``scratch=False``): backward writes
    the model's whole gradient buffer and the buckets are sent from it. Stages
    2 and 3 (``scratch=True``): the model's gradient views are pointed at a
    ``Ring`` slot, bucket by bucket, before backward writes them (``begin``,
    then ``on_layer_done`` binds the next bucket as soon as one is started);
    the whole gradient buffer does not exist. The ring holds the largest
    bucket: two consecutive buckets that do not fit together wait, the
    second for the first's sum (memory before overlap: ZeRO's point).
    ``accumulate`` adds each bucket's sum to the shard instead of overwriting
    it (a pipeline's micro-batches: ``begin_step`` zeroes it), through an
    inbox per ring end.

    Every rank starts the same reduce-scatters in the same order: the order
    depends only on the layers, never on the data (a rank with no rows runs
    ``begin`` and ``on_layer_done`` all the same, or lets ``wait`` start them).
    Same interface as ``data_parallel.GradientSync``.
    """

    def __init__(self, comm, model, shards, grad_shard, bucket_mb, scratch, accumulate=False):
        self.comm, self.model, self.shards = comm, model, shards
        self.ranks = wd.group_ranks(comm, "the data-parallel group")
        self.grad_shard = grad_shard  # (S,) this rank's summed gradient
        self.scratch, self.accumulate = scratch, accumulate
        layout = model.layout
        limit = bucket_mb if bucket_mb > 0 else float("inf")  # 0: one bucket per chunk
        self.buckets, self.chunk_of = [], []
        for c, chunk in enumerate(layout.chunks):
            for b in make_buckets(layout, model.dtype.itemsize, limit, layers=chunk):
                self.buckets.append(b)
                self.chunk_of.append(c)
        self._first = {c: self.chunk_of.index(c) for c in range(len(layout.chunks))}
        self._bucket_of_layer = {b.layers[-1]: k for k, b in enumerate(self.buckets)}
        self._counts = [shards.counts(b.start, b.stop) for b in self.buckets]
        self._mine = [shards.mine(b.start, b.stop) for b in self.buckets]
        self._requests = [None] * len(self.buckets)
        self._views = [None] * len(self.buckets)  # the bucket's gradient (scratch or whole)
        self._started = set()  # buckets started since the last wait
        self.ring = None
        self._inbox = None
        if scratch:
            self.ring = Ring([b.stop - b.start for b in self.buckets], model.dtype, pairs=False)
            model.flat.grad = grad_shard[:0]  # no whole gradient buffer (an empty view)
            model.flat.grads = dict.fromkeys(model.flat.grads)  # bound bucket by bucket
        if accumulate:  # a bucket's sum lands here first, then is added to the shard
            most = max(e - a for a, e in self._mine)
            self._inbox = [np.zeros(most, model.dtype), np.zeros(most, model.dtype)]

    @property
    def nbytes(self):
        """Bytes of the scratch ring and the inboxes (0 at stage 1)."""
        ring = self.ring.nbytes if self.ring is not None else 0
        return ring + (sum(int(b.nbytes) for b in self._inbox) if self._inbox else 0)

    # ------------------------------------------------------------- interface

    def begin_step(self):
        """Before a step whose buckets accumulate (micro-batches): zero the shard."""
        if self.accumulate:
            self.grad_shard.fill(0)

    def begin(self, chunk=0):
        """Before backward over ``chunk``: bind its first bucket (scratch only)."""
        if self.scratch:
            self._bind(self._first[chunk])

    def on_layer_done(self, layer):
        """Called by ``MLP.backward`` once ``layer``'s gradients are final."""
        k = self._bucket_of_layer.get(layer)
        if k is None:
            self._progress()
            return
        self._start(k)
        if self.scratch and k + 1 < len(self.buckets) and self.chunk_of[k + 1] == self.chunk_of[k]:
            self._bind(k + 1)  # the next layer backward reaches writes here

    def wait(self):
        """Start the buckets not started since the last wait, then complete all."""
        for k in range(len(self.buckets)):
            if k not in self._started:
                if self.scratch:
                    self._bind(k)  # zeros: a rank with no rows adds nothing
                self._start(k)
        for k in range(len(self.buckets)):
            self._complete(k)
        self._started.clear()

    allreduce = wait  # the name the pipeline's step calls

    # -------------------------------------------------------------- helpers

    def _bind(self, k):
        """Point the gradient views of bucket k's layers at a zeroed ring slot."""
        b = self.buckets[k]
        view = self.ring.take(k, b.stop - b.start, self._complete)
        view.fill(0)
        self._views[k] = view
        grads, slots = self.model.flat.grads, self.model.layout.slots
        for i in b.layers:
            for name in (f"layers.{i}.weight", f"layers.{i}.bias"):
                s = slots[name]
                grads[name] = view[s.offset - b.start:s.stop - b.start].reshape(s.shape)

    def _start(self, k):
        """Non-blocking reduce-scatter of bucket k: this rank's part of the bucket,
        summed over the ranks, lands in its place in the shard (or in the inbox)."""
        b = self.buckets[k]
        self._complete(k)  # a pipeline's next micro-batch: the last sum first
        send = self._views[k] if self.scratch else self.model.flat.grad[b.start:b.stop]
        self._views[k] = send
        a, e = self._mine[k]
        recv = self._inbox[k % 2][:e - a] if self.accumulate else \
            self.grad_shard[a - self.shards.lo:e - self.shards.lo]
        self._requests[k] = self.comm.Ireduce_scatter(send, recv, self._counts[k], op=MPI.SUM)
        self._started.add(k)

    def _complete(self, k):
        """Wait for bucket k's sum (and add it to the shard, when accumulating)."""
        req = self._requests[k]
        if req is None:
            return
        with wd.watch.op("gradient reduce-scatter", ("bucket {} of {}", k + 1, len(self.buckets)),
                         ranks=self.ranks):
            req.Wait()
        self._requests[k] = None
        if self.accumulate:
            a, e = self._mine[k]
            lo = self.shards.lo
            self.grad_shard[a - lo:e - lo] += self._inbox[k % 2][:e - a]

    def _progress(self):
        """Let MPI advance started requests (MPICH progresses them inside MPI calls)."""
        started = [r for r in self._requests if r is not None]
        if started:
            MPI.Request.Testall(started)


class ParamGather:
    """Stage 3: each layer's parameters all-gathered from the shards when needed.

    ``forward(i)`` (called by ``MLP.forward`` before layer i) waits for layer
    i's gather (starting it if nobody did), points ``W(i)``/``b(i)`` at it and
    starts layer i+1's; ``backward(i)`` (before layer i's input gradient, the
    only use of W in backward) does the same walking down, prefetching layer
    i−1 where its backward needs W (not the first layer: no input gradient).
    A layer still in the ring is not gathered again (the last two layers of a
    forward serve the first two of the backward). One ``Iallgatherv`` per
    layer: rank j sends its part of the layer's span, every rank receives the
    span whole; the start order depends only on the layer order, the same on
    every rank.
    """

    def __init__(self, comm, model, shards, param_shard, tracer=NULL_TRACER):
        self.comm, self.model, self.shards, self.tracer = comm, model, shards, tracer
        self.ranks = wd.group_ranks(comm, "the data-parallel group")
        layout = model.layout
        self.layers = tuple(layout.layers)
        self.first = layout.layers[0]
        self._span, self._counts, self._displs, self._piece = {}, {}, {}, {}
        sizes = []
        for i in self.layers:
            start, stop = layout.layer_span(i)
            counts = shards.counts(start, stop)
            a, e = shards.mine(start, stop)
            self._span[i] = (start, stop)
            self._counts[i] = counts
            self._displs[i] = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
            self._piece[i] = param_shard[a - shards.lo:e - shards.lo]  # (my part,) a view
            sizes.append(stop - start)
        self.ring = Ring(sizes, model.dtype)
        self._mpi_type = from_numpy_dtype(model.dtype)
        self._requests = {}  # layer -> Iallgatherv in flight
        self._have = set()  # layers whose gathered (W, b) are in the ring and current
        self._views = {}

    @property
    def nbytes(self):
        return self.ring.nbytes

    def forward(self, i):
        self._ready(i)
        if i + 1 in self._span:
            self._start(i + 1)

    def backward(self, i):
        self._ready(i)
        if i - 1 in self._span and i - 1 != self.first:
            self._start(i - 1)

    def invalidate(self):
        """After the optimizer stepped the shards: every gathered layer is stale."""
        for i in list(self._requests):
            self._evict(i)
        self._have.clear()
        self.ring.forget()

    def _start(self, i):
        if i in self._have or i in self._requests:
            return
        start, stop = self._span[i]
        view = self.ring.take(i, stop - start, self._evict)
        self._views[i] = view
        self._requests[i] = self.comm.Iallgatherv(
            self._piece[i], [view, self._counts[i], self._displs[i], self._mpi_type])

    def _ready(self, i):
        self._start(i)
        req = self._requests.pop(i, None)
        if req is None:
            return
        with self.tracer.span("allgather", layer=i), \
                wd.watch.op("parameter gather", ("layer {}", i), ranks=self.ranks):
            req.Wait()
        self._have.add(i)
        view, (start, _) = self._views[i], self._span[i]
        params, slots = self.model.flat.params, self.model.layout.slots
        for name in (f"layers.{i}.weight", f"layers.{i}.bias"):
            s = slots[name]
            params[name] = view[s.offset - start:s.stop - start].reshape(s.shape)

    def _evict(self, i):
        req = self._requests.pop(i, None)
        if req is not None:
            with wd.watch.op("parameter gather", ("layer {}", i), ranks=self.ranks):
                req.Wait()
        self._have.discard(i)
