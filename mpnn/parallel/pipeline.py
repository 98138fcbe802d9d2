"""Pipeline parallelism: run one rank's schedule with non-blocking Send/Recv.

Each rank of a pipeline holds a contiguous range of the MLP's layers (a stage
``MLP(..., layers=range(a, b))``, which starts from exactly the serial
weights), or, under an interleaved schedule, V such ranges (model chunks: the
stages rank, rank + p, ...; ``pipeline_ir.Pipe``). A training step cuts this
replica's rows of the global batch into ``m`` micro-batches (as even as
possible, the first ``rows % m`` one row larger; every stage computes the same
split, so a receiver always knows how
many rows arrive) and runs the stage's action list (``make_schedule`` of
``pipeline_orders.py``: the schedule's compute order with the messages added)
through a dispatch table keyed by the action's kind::

    RA k    wait for micro-batch k's input         (Irecv posted at step start)
    F k     h_out = stage(h_in); the last stage computes the loss and
            dL/dlogits · 1/global_batch right away (the only place the
            batch mean enters: ``scale`` from the caller)
    SA k    Isend h_out to the next stage           (buffer kept until done)
    RG k    wait for dL/dh_out of micro-batch k
    B k     accumulate this stage's parameter gradients, dL/dh_in; when the
            schedule has a W for k: only dL/dh_in and the bias gradients,
            keeping (input, dL/dz) of every layer for the W
    W k     the weight gradients dW += inputᵀ·dL/dz of micro-batch k
    SG k    Isend dL/dh_in to the previous stage
    STEP    all gradients are final: finish the sends, sum over replicas

and then waits for every stage to finish (``_wait_all_stages``: a Barrier
on the pipeline, the tail of the bubble, timed as idle)
(each action on its model chunk: ``F3.1`` runs chunk 1). A micro-batch's
context (its activations) is taken from a pool at its F and returns to it
once its last backward action ran and its sends have their buffers.

Every message travels on the pipeline communicator to or from the rank
``Pipe.message`` names, with the tag of ``tags.message_tag``, so every
receive names exactly the message it wants. Only uppercase, buffer-based
mpi4py calls; every receive buffer is preallocated from the layer sizes and
the micro-batch rows.

On a GPU (CuPy arrays) with an MPI library that cannot read device memory
(the PyPI ``mpich`` wheel, for one), messages are *staged on the host*: a
send waits for the stream, copies the device rows into a host buffer owned
by the micro-batch (kept until the Isend completes) and sends that; a
receive lands in a preallocated host buffer and is copied to the device
buffer when its Wait returns. ``host_staging`` forces the choice (the CPU
tests run the staged path with NumPy arrays).

Shapes: B rows of a micro-batch, I = sizes[start] (a chunk's input),
O = sizes[stop] (its output).

The stage's per-epoch times are clocked in ``pipeline_metrics.StageClock``
and gathered by ``pipeline_metrics.gather_stage_times``; the forward-only
evaluation loop is ``pipeline_eval.evaluate``.

See docs/parallelism.md#6-how-a-schedule-becomes-messages.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from ..data.batching import share_bounds
from ..nn.model import Context
from ..nn.params import Layout
from ..runtime import watchdog as wd
from ..runtime.trace import NULL_TRACER
from .data_parallel import make_gradient_sync
from .gather import gather_whole
from .partition import format_partition
from .pipeline_eval import evaluate
from .pipeline_ir import RECEIVES, Kind, Pipe
from .pipeline_metrics import StageClock, gather_stage_times
from .pipeline_orders import make_schedule
from .simulator import simulate
from .staging import copy_from_host, copy_to_host, needs_host_staging

# the receive buffers a message kind lands in
_INBOX = {Kind.RECV_ACT: "act", Kind.RECV_GRAD: "grad"}


class _MicroBatch:
    """One micro-batch's activations (a model Context) and the sends reading from them."""

    def __init__(self):
        self.ctx = Context()
        self.requests = []  # Isend requests whose buffers live in ctx (or in host)
        self.host = {}  # staged sends: "act" | "grad" -> host copy of the rows sent


class PipelineEngine:
    """Runs this rank's part of a pipeline schedule; the engine of ``mpnn.train``.

    model       the rank's ``MLP(..., layers=...)``: its stage, or its chunks
    loss        loss name (the last stage computes it)
    grid        the process grid (pp_comm: the pipeline; dp_comm: the same stage's
                replicas; world: every rank, for the per-epoch stage times)
    schedule    a name of ``pipeline_orders.SCHEDULES``
    stages      layer range of every stage, p·V of them (for ``describe``)
    virtual_stages  model chunks per rank (interleaved schedules)
    tracer      records forward/backward/recv/send-wait/allreduce spans for --trace
    host_staging  send/receive through host buffers (default: when the
                arrays live on a GPU and MPI is not CUDA-aware)
    """

    def __init__(self, model, loss, grid, schedule="1f1b", micro_batches=1, stages=None,
                 tracer=NULL_TRACER, host_staging=None, virtual_stages=1, zero=0, bucket_mb=0.1,
                 allreduce="flat"):
        self.model, self.loss, self.ops = model, loss, model.ops
        self.tracer = tracer
        self.grid, self.comm, self.world = grid, grid.pp_comm, grid.world
        self.dp_rank = grid.dp_rank
        self.stage, self.p, self.m = grid.pp_rank, grid.pp, int(micro_batches)
        self.v = int(virtual_stages)
        self.pipe = Pipe(self.p, self.v)
        self.schedule = schedule
        self.stages = list(stages) if stages is not None else None
        self.is_first = self.pipe.is_first(self.stage)
        self.is_last = self.pipe.is_last(self.stage, self.v - 1)
        self.needs_inputs = self.is_first  # only the first stage reads the batch's features
        plan = make_schedule(schedule, self.p, self.m, self.v)
        sim = simulate(plan, raise_on_deadlock=True)
        self.actions = plan[self.stage]
        self.expected_peak_live = sim.peak_live[self.stage]
        self._split = {(a.mb, a.chunk) for a in self.actions if a.kind is Kind.WEIGHT}
        self.zero = None  # ZeRO over the stage's replicas (parallel.zero)
        self._sync_span = "allreduce"
        if zero:  # stage 1: the step's gradient reduce-scattered; stage 2: each backward's
            from .zero import Zero

            self.zero = Zero(zero, model, grid.dp_comm, bucket_mb, accumulate=zero == 2,
                             tracer=tracer)
            self.sync = self.zero.sync
            self._sync_span = "reduce-scatter"
        else:
            # the step's accumulated gradient, summed after the last backward
            self.sync = make_gradient_sync(grid.dp_comm, model, 0.0, allreduce)
        self._scratch = zero == 2  # backward writes bucket scratch, summed as it goes
        # under tensor parallelism every shard computes the same loss: one reports it
        self.reports = model.reports
        self.dispatch = {Kind.FORWARD: self._forward, Kind.BACKWARD: self._backward,
                         Kind.WEIGHT: self._weight,
                         Kind.SEND_ACT: self._send_act, Kind.RECV_ACT: self._receive,
                         Kind.SEND_GRAD: self._send_grad, Kind.RECV_GRAD: self._receive,
                         Kind.STEP: self._step}
        # receive buffers per (kind, micro-batch, chunk), rows grown on demand:
        # inputs (B, I_c) and dL/d(outputs) (B, O_c); host twins when staging
        self._inbox = {"act": {}, "grad": {}}
        self._inbox_host = {"act": {}, "grad": {}}
        self.host_staging = bool(needs_host_staging(model.flat.grad) if host_staging is None
                                 else host_staging)
        self._free = []  # recycled _MicroBatch objects
        self._live = {}  # (mb, chunk) -> _MicroBatch between its F and its B
        self._grad_out = {}  # (mb, chunk) -> _MicroBatch whose dL/dh_in awaits SendGrad
        self._await_w = {}  # (mb, chunk) -> _MicroBatch whose W has not run
        self._recv = {}  # ("act"|"grad", mb, chunk) -> Irecv request
        # the step in progress: micro-batch row bounds, inputs, labels, 1/global_batch, loss
        self._bounds, self._x, self._labels, self._scale, self._loss_sum = [], None, None, 0.0, 0.0
        self.peak_live = 0  # most micro-batches alive at once in the last step
        self.clock = StageClock(self.v)  # seconds per kind of work since the last epoch_metrics
        # for the watchdog's messages: the pipeline's ranks as world ranks
        self._pipe_ranks = wd.group_ranks(self.comm, "this pipeline")
        self._world_of = wd.world_ranks(self.comm)

    # ------------------------------------------------------------- one step

    def train_step(self, x, labels, scale):
        """One global batch: x (b, I0) and labels (b,) are this replica's rows.

        Only the first stage reads x (``needs_inputs``; the others may pass
        None). Leaves the gradient of the global-batch mean loss in the rank's flat
        gradient buffer (summed over replicas); returns the loss sum of these
        rows on the last stage and 0.0 on the others.
        """
        if self._scratch:
            self.sync.begin_step()  # the shard accumulates every micro-batch's sums
        else:
            self.model.zero_grad()
        b = int(labels.shape[0])
        self._bounds = [share_bounds(b, k, self.m) for k in range(self.m)]
        self._x, self._labels, self._scale = x, labels, scale
        self._loss_sum = 0.0
        self.peak_live = 0
        start = time.perf_counter()
        self._post_receives()
        for action in self.actions:
            self.dispatch[action.kind](action)
        if self.p > 1:  # the stages finish apart: wait for the last (idle, as in the simulator)
            with self.tracer.span("step wait"):
                self._wait_all_stages()
        self.clock.step(start, time.perf_counter())
        assert not (self._live or self._recv or self._await_w), "schedule left work behind"
        assert self.peak_live == self.expected_peak_live, (
            f"stage {self.stage}: {self.peak_live} live micro-batches, "
            f"simulator says {self.expected_peak_live}")
        return self._loss_sum if self.reports else 0.0

    def _rows(self, k):
        lo, hi = self._bounds[k]
        return hi - lo

    def _width(self, kind, chunk):
        """Features of a message of ``kind`` into ``chunk``: its input or its output."""
        I, O = self.model.chunk_features(chunk)
        return I if kind == "act" else O

    def _buffer(self, kind, key, rows, host=False):
        """Rows [0, rows) of the receive buffer of ``kind`` for (mb, chunk) ``key``."""
        pool = (self._inbox_host if host else self._inbox)[kind]
        buf = pool.get(key)
        if buf is None or buf.shape[0] < rows:
            xp = np if host else self.ops.xp
            buf = pool[key] = xp.empty((rows, self._width(kind, key[1])), self.model.dtype)
        return buf[:rows]

    def _post_receives(self):
        """Post every receive of the step up front into its preallocated buffer
        (the host buffer when staging; ``_receive`` copies it over)."""
        for a in self.actions:
            if a.kind not in RECEIVES:
                continue
            kind, rows, key = _INBOX[a.kind], self._rows(a.mb), (a.mb, a.chunk)
            buf = self._buffer(kind, key, rows, host=self.host_staging)
            src, _, tag = self.pipe.message(a, self.stage)
            self._recv[kind, a.mb, a.chunk] = self.comm.Irecv(buf, source=src, tag=tag)

    def _isend(self, mb, kind, rows, dest, tag):
        """Isend ``rows`` (B, F) held by ``mb`` (a _MicroBatch); the request joins
        ``mb.requests`` (and the staged host copy stays in ``mb.host``)."""
        self.ops.synchronize()  # the kernels writing rows must have finished
        if self.host_staging:
            slot = (kind, rows.shape[1])  # (B', F): chunks may differ in width F
            host = mb.host.get(slot)
            if host is None or host.shape[0] < rows.shape[0]:
                host = mb.host[slot] = np.empty(rows.shape, self.model.dtype)
            rows = copy_to_host(rows, host[:rows.shape[0]])
        mb.requests.append(self.comm.Isend(rows, dest=dest, tag=tag))

    def _landed(self, kind, key):
        """After a receive completed: staged data onto the device."""
        if self.host_staging:
            rows = self._rows(key[0])
            copy_from_host(self._inbox_host[kind][key][:rows], self._buffer(kind, key, rows))

    def _wait(self, requests):
        """Wait for a micro-batch's sends; the time counts as this stage's idle time."""
        if not requests:
            return
        t0 = time.perf_counter()
        with wd.watch.op("completion of this stage's sends", ranks=self._pipe_ranks):
            for req in requests:
                req.Wait()
        self.clock.idle_s += time.perf_counter() - t0

    def _wait_all_stages(self):
        """Wait for every stage of the pipeline to finish the step, the time as idle.

        The run agrees on finiteness over the pipeline right after every step
        (``runtime.guards.check_finite``), so no stage starts the next step
        before the slowest finished this one: that wait happens anyway, and
        here it is counted as what it is, the tail of the step's bubble (a
        first stage of 1F1B idles while the last one runs its last
        backwards). Measured this way the bubble is the simulator's, which
        counts every stage's idle time up to the step's makespan.
        """
        t0 = time.perf_counter()
        with wd.watch.op("end-of-step barrier", comm=self.comm, ranks=self._pipe_ranks,
                         check=("Barrier", 0, "-")):
            self.comm.Barrier()
        self.clock.idle_s += time.perf_counter() - t0

    def _release(self, key, mb):
        """Back to the pool once nothing of (mb, chunk) ``key`` is pending."""
        if key not in self._grad_out and key not in self._await_w:
            self._free.append(mb)  # reused only after its sends complete (_take_context)

    def _take_context(self):
        """A pooled _MicroBatch whose sends have all completed (the most recently
        freed first: its buffers are the likeliest in cache), else a new one.

        Never waits: a send completes only once its receiver has taken the
        message, so waiting here would make this stage's next forward depend
        on the neighbour's progress, a dependency the schedule does not have
        (measured: up to 1.8 ms per forward under interleaved 1F1B). The
        pool grows to the contexts the schedule keeps alive plus those whose
        sends are in flight, within the first steps, and stays that size.
        """
        for i in range(len(self._free) - 1, -1, -1):
            mb = self._free[i]
            if not mb.requests or MPI.Request.Testall(mb.requests):
                mb.requests.clear()
                return self._free.pop(i)
        return _MicroBatch()

    # ---------------------------------------------------- the dispatch table

    def _receive(self, a):
        kind = _INBOX[a.kind]
        with self.tracer.span(f"recv {kind}", mb=a.mb):
            req = self._recv.pop((kind, a.mb, a.chunk))
            t0 = time.perf_counter()
            arrived = req.Test()  # the message was there: this call copied it
            if not arrived:
                src = self.pipe.message(a, self.stage)[0]
                what = "receive of activations" if kind == "act" else "receive of gradients"
                with wd.watch.op(what, ("micro-batch {}", a.mb), ranks=self._pipe_ranks,
                                 peer=f"from world rank {self._world_of[src]}"):
                    req.Wait()
            self.clock.received(time.perf_counter() - t0, arrived)
        self._landed(kind, (a.mb, a.chunk))

    def _forward(self, a):
        k, c = a.mb, a.chunk
        lo, hi = self._bounds[k]
        first = self.pipe.is_first(self.stage, c)
        x = self._x[lo:hi] if first else self._buffer("act", (k, c), hi - lo)  # (B, I)
        mb = self._take_context()
        t0 = time.perf_counter()
        with self.tracer.span("forward", mb=k):
            out = self.model.forward(x, mb.ctx, chunk=c)  # (B, O)
            if self.pipe.is_last(self.stage, c) and hi > lo:
                dlogits = self._buffer("grad", (k, c), hi - lo)  # (B, C)
                self._loss_sum += self.ops.loss(self.loss, out, self._labels[lo:hi],
                                                self._scale, dlogits)
        self.clock.timed("F", c, t0)
        self._live[k, c] = mb
        self.peak_live = max(self.peak_live, len(self._live) + len(self._await_w))

    def _send_act(self, a):
        mb = self._live[a.mb, a.chunk]
        out = mb.ctx.outputs[self.model.chunks[a.chunk].stop - 1]  # (B, O), read by B too
        _, dest, tag = self.pipe.message(a, self.stage)
        self._isend(mb, "act", out, dest, tag)

    def _backward(self, a):
        key = (a.mb, a.chunk)
        mb = self._live.pop(key)
        rows = self._rows(a.mb)
        dout = self._buffer("grad", key, rows)  # (B, O), received or from the loss
        first = self.pipe.is_first(self.stage, a.chunk)
        split = key in self._split
        t0 = time.perf_counter()
        done = None
        if self._scratch:  # ZeRO-2: each bucket reduce-scattered once backward has it
            self.sync.begin(a.chunk)
            done = self.sync.on_layer_done
        if rows:
            with self.tracer.span("backward", mb=a.mb):
                self.model.backward(dout, mb.ctx, need_input_grad=not first, chunk=a.chunk,
                                    weights=not split, on_layer_done=done)
        elif done is not None:  # an empty micro-batch: the same reduce-scatters, of zeros
            for i in reversed(self.model.chunks[a.chunk]):
                done(i)
        self.clock.timed("B", a.chunk, t0)
        if split:
            self._await_w[key] = mb  # its inputs and dL/dz stay for the W
        if not first:
            self._grad_out[key] = mb  # released once SendGrad has its buffer
        self._release(key, mb)

    def _weight(self, a):
        key = (a.mb, a.chunk)
        mb = self._await_w.pop(key)
        t0 = time.perf_counter()
        if self._rows(a.mb):
            with self.tracer.span("weight", mb=a.mb):
                self.model.backward_weight(mb.ctx)
        self.clock.timed("W", a.chunk, t0)
        self._release(key, mb)

    def _send_grad(self, a):
        key = (a.mb, a.chunk)
        mb = self._grad_out.pop(key)
        rows = self._rows(a.mb)
        start = self.model.chunks[a.chunk].start
        dh = mb.ctx.grads[start][:rows] if rows else \
            self.ops.xp.empty((0, self.model.sizes[start]), self.model.dtype)  # (B, I)
        _, dest, tag = self.pipe.message(a, self.stage)
        self._isend(mb, "grad", dh, dest, tag)
        self._release(key, mb)

    def _step(self, a):
        with self.tracer.span("send wait"):
            for mb in self._free:
                self._wait(mb.requests)
                mb.requests.clear()
        t0 = time.perf_counter()
        with self.tracer.span(self._sync_span):
            self.sync.allreduce()
        self.clock.sync_s += time.perf_counter() - t0

    # ----------------------------------------------------------- evaluation

    def evaluate(self, x, labels, chunk=2048):
        """Forward-only through the pipeline over this replica's rows x (n, I0).

        Only the first stage reads x (the others may pass None). Chunks of rows
        flow stage to stage, through every model chunk in turn (the next chunk's
        forward overlaps the previous one's send); every message of the
        evaluation carries ``EVAL_TAG``, and each rank receives them in the order
        its neighbour sends them. Returns (loss_sum, n_correct) on the last
        stage, (0.0, 0) on the others.
        """
        slots = [[_MicroBatch(), _MicroBatch()] for _ in range(self.v)]  # double-buffered
        loss_sum, correct = evaluate(self, x, labels, chunk, slots)
        return (loss_sum, correct) if self.reports else (0.0, 0)

    # -------------------------------------------------------------- weights

    def state_dict(self):
        """The whole model's named tensors on the replica-0 first stage ({} elsewhere).

        Collective over the pipeline of replica 0 (``gather_whole``): the
        stages' flat parameter buffers, put in layer order, are the whole
        model's flat buffer; its layout names the tensors.
        """
        self.ops.synchronize()
        flat = np.ascontiguousarray(self.ops.to_host(self.model.flat.data))  # (n_s,)
        stage = self.model.whole_stage({"params": flat})  # tp shards put together
        whole = gather_whole(self.grid, stage, self.model.whole_layout)
        if whole is None:
            return {}
        views = Layout(self.model.sizes).views(whole["params"])
        return {name: v.copy() for name, v in views.items()}

    def activations(self):
        """Layer -> this stage's outputs of that layer in the last step, one (B, O)
        array per micro-batch context (each holds the last forward it ran), for the
        non-finite guard to name the layer where a NaN first appears."""
        outputs = {}
        for mb in self._free:
            for i, a in mb.ctx.outputs.items():
                outputs.setdefault(i, []).append(a)
        return outputs

    def memory(self):
        """Bytes this rank allocated: parameters, gradients, and the activations of
        every pooled micro-batch context and receive buffer."""
        acts = sum(mb.ctx.nbytes() + sum(h.nbytes for h in mb.host.values())
                   for mb in self._free)
        acts += sum(b.nbytes for pool in (self._inbox, self._inbox_host) for kind in pool.values()
                    for b in kind.values())
        if self.zero is not None:
            return {**self.zero.memory(), "activations": int(acts)}
        return {"params": int(self.model.flat.data.nbytes),
                "grads": int(self.model.flat.grad.nbytes), "comm": 0, "activations": int(acts)}

    def close(self):
        """Free what the gradient sum holds beyond arrays (a shared window)."""
        free = getattr(self.sync, "free", None)
        if free is not None:
            free()

    def describe(self):
        """The start-up line: grid, schedule, micro-batches, layers per stage."""
        line = (f"pipeline dp {self.grid.dp} x pp {self.p}, {self.schedule} schedule, "
                f"{self.m} micro-batch(es)")
        if self.v > 1:
            line += f", {self.v} virtual stages per rank"
        if self.stages is not None:
            line += f", layers per stage {format_partition(self.stages)}"
        held = self.model.describe()
        if held is not None:
            line += f"; {held} (this stage)"
        if self.zero is not None:
            line += f"; {self.zero.describe()} (this stage)"
        return line

    # -------------------------------------------------------------- metrics

    def epoch_metrics(self):
        """``stage_times`` over every rank of the grid: collective, once per epoch."""
        return self.stage_times(self.world)

    def stage_times(self, world):
        """Per-stage busy / idle / gradient-sync seconds, the measured bubble, the
        mean F, B, W seconds per rank and chunk since the last call and what one
        receive costs: collective over ``world``
        (``pipeline_metrics.gather_stage_times``)."""
        return gather_stage_times(world, self.clock, self.stage, self.p, self.schedule, self.m)
