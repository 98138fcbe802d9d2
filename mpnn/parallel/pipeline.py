"""Pipeline parallelism: run one stage's schedule with non-blocking Send/Recv.

Each rank of a pipeline holds a contiguous range of the MLP's layers (a stage
``MLP(..., layers=range(a, b))``, which starts from exactly the serial
weights). A training step cuts this replica's rows of the global batch into
``m`` micro-batches (as even as possible, the first ``rows % m`` one row
larger; every stage computes the same split, so a receiver always knows how
many rows arrive) and runs the stage's action list (``make_schedule`` of
``pipeline_ir.py``: the schedule's compute order with the messages added)
through a dispatch table keyed by the action's kind::

    RA k    wait for micro-batch k's input         (Irecv posted at step start)
    F k     h_out = stage(h_in); the last stage computes the loss and
            dL/dlogits · 1/global_batch right away (the only place the
            batch mean enters: ``scale`` from the caller)
    SA k    Isend h_out to the next stage           (buffer kept until done)
    RG k    wait for dL/dh_out of micro-batch k
    B k     accumulate this stage's parameter gradients, dL/dh_in
    SG k    Isend dL/dh_in to the previous stage
    STEP    all gradients are final: finish the sends, sum over replicas

Every message travels on the pipeline communicator to or from the stage
``pipeline_ir.peer`` names, with the tag of ``tags.message_tag``, so every
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

Shapes: B rows of a micro-batch, I = sizes[start] (stage input),
O = sizes[stop] (stage output).

See docs/parallelism.md#6-how-a-schedule-becomes-messages.
"""

from __future__ import annotations

import time

import numpy as np

from ..data.batching import batch_bounds, share_bounds
from ..nn.model import Context
from ..nn.params import Layout
from ..runtime.trace import NULL_TRACER
from .data_parallel import GradientSync
from .gather import gather_whole
from .partition import format_partition
from .pipeline_ir import RECEIVES, Kind, peer
from .pipeline_orders import make_schedule
from .simulator import simulate
from .staging import copy_from_host, copy_to_host, needs_host_staging
from .tags import EVAL_TAG, message_tag

# the receive buffers a message kind lands in
_INBOX = {Kind.RECV_ACT: "act", Kind.RECV_GRAD: "grad"}


class _MicroBatch:
    """One micro-batch's activations (a model Context) and the sends reading from them."""

    def __init__(self):
        self.ctx = Context()
        self.requests = []  # Isend requests whose buffers live in ctx (or in host)
        self.host = {}  # staged sends: "act" | "grad" -> host copy of the rows sent


class PipelineEngine:
    """Runs this rank's stage of a pipeline schedule; the engine of ``mpnn.train``.

    model       the stage's ``MLP(..., layers=stages[pp_rank])``
    loss        loss name (the last stage computes it)
    grid        the process grid (pp_comm: the pipeline; dp_comm: the same stage's
                replicas; world: every rank, for the per-epoch stage times)
    schedule    naive | gpipe | 1f1b
    stages      layer range of every stage (for ``describe``)
    tracer      records forward/backward/recv/send-wait/allreduce spans for --trace
    host_staging  send/receive through host buffers (default: when the
                arrays live on a GPU and MPI is not CUDA-aware)
    """

    def __init__(self, model, loss, grid, schedule="1f1b", micro_batches=1, stages=None,
                 tracer=NULL_TRACER, host_staging=None):
        self.model, self.loss, self.ops = model, loss, model.ops
        self.tracer = tracer
        self.grid, self.comm, self.world = grid, grid.pp_comm, grid.world
        self.dp_rank = grid.dp_rank
        self.stage, self.p, self.m = grid.pp_rank, grid.pp, int(micro_batches)
        self.schedule = schedule
        self.stages = list(stages) if stages is not None else None
        self.is_first, self.is_last = self.stage == 0, self.stage == self.p - 1
        self.needs_inputs = self.is_first  # only the first stage reads the batch's features
        plan = make_schedule(schedule, self.p, self.m)
        sim = simulate(plan, raise_on_deadlock=True)
        self.actions = plan[self.stage]
        self.expected_peak_live = sim.peak_live[self.stage]
        self.sync = GradientSync(grid.dp_comm, model.flat.grad, self.ops)
        self.dispatch = {Kind.FORWARD: self._forward, Kind.BACKWARD: self._backward,
                         Kind.SEND_ACT: self._send_act, Kind.RECV_ACT: self._receive,
                         Kind.SEND_GRAD: self._send_grad, Kind.RECV_GRAD: self._receive,
                         Kind.STEP: self._step}
        xp, dt = self.ops.xp, model.dtype
        I, O = model.in_features, model.out_features
        # per micro-batch receive buffers (rows grow on demand): inputs and dL/d(outputs)
        self._act_in = [xp.empty((0, I), dt) for _ in range(self.m)]  # (B, I)
        self._grad_in = [xp.empty((0, O), dt) for _ in range(self.m)]  # (B, O)
        self._inbox = {"act": self._act_in, "grad": self._grad_in}
        self.host_staging = bool(needs_host_staging(model.flat.grad) if host_staging is None
                                 else host_staging)
        # staging: where the messages land before their copy to the device
        self._inbox_host = {"act": [np.empty((0, I), dt) for _ in range(self.m)],
                            "grad": [np.empty((0, O), dt) for _ in range(self.m)]}
        self._free = []  # recycled _MicroBatch objects
        self._live = {}  # micro-batch -> _MicroBatch between its Forward and Backward
        self._grad_out = {}  # micro-batch -> _MicroBatch whose dL/dh_in awaits SendGrad
        self._recv = {}  # ("act"|"grad", k) -> Irecv request
        # the step in progress: micro-batch row bounds, inputs, labels, 1/global_batch, loss
        self._bounds, self._x, self._labels, self._scale, self._loss_sum = [], None, None, 0.0, 0.0
        self.peak_live = 0  # most micro-batches alive at once in the last step
        self.forward_s = self.backward_s = self.idle_s = self.sync_s = 0.0  # seconds

    # ------------------------------------------------------------- one step

    def train_step(self, x, labels, scale):
        """One global batch: x (b, I0) and labels (b,) are this replica's rows.

        Only the first stage reads x (``needs_inputs``; the others may pass
        None). Leaves the gradient of the global-batch mean loss in the stage's flat
        gradient buffer (summed over replicas); returns the loss sum of these
        rows on the last stage and 0.0 on the others.
        """
        self.model.zero_grad()
        b = int(labels.shape[0])
        self._bounds = [share_bounds(b, k, self.m) for k in range(self.m)]
        self._x, self._labels, self._scale = x, labels, scale
        self._loss_sum = 0.0
        self.peak_live = 0
        self._post_receives()
        for action in self.actions:
            self.dispatch[action.kind](action)
        assert not self._live and not self._recv, "schedule left work behind"
        assert self.peak_live == self.expected_peak_live, (
            f"stage {self.stage}: {self.peak_live} live micro-batches, "
            f"simulator says {self.expected_peak_live}")
        return self._loss_sum

    def _rows(self, k):
        lo, hi = self._bounds[k]
        return hi - lo

    def _buffer(self, pool, k, rows, xp=None):
        """Rows [0, rows) of micro-batch k's receive buffer (contiguous)."""
        if pool[k].shape[0] < rows:
            pool[k] = (xp or self.ops.xp).empty((rows, pool[k].shape[1]), self.model.dtype)
        return pool[k][:rows]

    def _post_receives(self):
        """Post every receive of the step up front into its preallocated buffer
        (the host buffer when staging; ``_receive`` copies it over)."""
        for a in self.actions:
            if a.kind not in RECEIVES:
                continue
            kind, rows = _INBOX[a.kind], self._rows(a.mb)
            buf = self._buffer(self._inbox[kind], a.mb, rows)
            if self.host_staging:
                buf = self._buffer(self._inbox_host[kind], a.mb, rows, np)
            self._recv[kind, a.mb] = self.comm.Irecv(buf, source=peer(a.kind, self.stage),
                                                     tag=message_tag(a.kind, a.mb))

    def _isend(self, mb, kind, rows, dest, tag):
        """Isend ``rows`` (B, F) held by ``mb`` (a _MicroBatch); the request joins
        ``mb.requests`` (and the staged host copy stays in ``mb.host``)."""
        self.ops.synchronize()  # the kernels writing rows must have finished
        if self.host_staging:
            host = mb.host.get(kind)  # (B', F): each kind has one width F
            if host is None or host.shape[0] < rows.shape[0]:
                host = mb.host[kind] = np.empty(rows.shape, self.model.dtype)
            rows = copy_to_host(rows, host[:rows.shape[0]])
        mb.requests.append(self.comm.Isend(rows, dest=dest, tag=tag))

    def _landed(self, kind, k):
        """After micro-batch k's receive completed: staged data onto the device."""
        if self.host_staging:
            rows = self._rows(k)
            copy_from_host(self._inbox_host[kind][k][:rows], self._inbox[kind][k][:rows])

    def _wait(self, requests, timed=True):
        """Wait for requests; the time counts as this stage's idle time."""
        t0 = time.perf_counter()
        for req in requests:
            req.Wait()
        if timed:
            self.idle_s += time.perf_counter() - t0

    # ---------------------------------------------------- the dispatch table

    def _receive(self, a):
        kind = _INBOX[a.kind]
        with self.tracer.span(f"recv {kind}", mb=a.mb):
            self._wait([self._recv.pop((kind, a.mb))])
        self._landed(kind, a.mb)

    def _forward(self, a):
        k = a.mb
        lo, hi = self._bounds[k]
        x = self._x[lo:hi] if self.is_first else self._act_in[k][:hi - lo]  # (B, I)
        mb = self._free.pop() if self._free else _MicroBatch()
        if mb.requests:
            with self.tracer.span("send wait"):
                self._wait(mb.requests)  # its previous sends must be done before reuse
        mb.requests.clear()
        t0 = time.perf_counter()
        with self.tracer.span("forward", mb=k):
            out = self.model.forward(x, mb.ctx)  # (B, O)
            if self.is_last and hi > lo:
                dlogits = self._buffer(self._grad_in, k, hi - lo)  # (B, C)
                self._loss_sum += self.ops.loss(self.loss, out, self._labels[lo:hi],
                                                self._scale, dlogits)
        self.forward_s += time.perf_counter() - t0
        self._live[k] = mb
        self.peak_live = max(self.peak_live, len(self._live))

    def _send_act(self, a):
        mb = self._live[a.mb]
        out = mb.ctx.outputs[self.model.layers.stop - 1]  # (B, O), read by Backward too
        self._isend(mb, "act", out, peer(a.kind, self.stage), message_tag(a.kind, a.mb))

    def _backward(self, a):
        k = a.mb
        mb = self._live.pop(k)
        dout = self._grad_in[k][:self._rows(k)]  # (B, O), received or from the loss
        t0 = time.perf_counter()
        if self._rows(k):
            with self.tracer.span("backward", mb=k):
                self.model.backward(dout, mb.ctx, need_input_grad=not self.is_first)
        self.backward_s += time.perf_counter() - t0
        if self.is_first:
            self._free.append(mb)  # activations released right after the backward
        else:
            self._grad_out[k] = mb  # released once SendGrad has its buffer

    def _send_grad(self, a):
        mb = self._grad_out.pop(a.mb)
        rows = self._rows(a.mb)
        start = self.model.layers.start
        dh = mb.ctx.grads[start][:rows] if rows else \
            self.ops.xp.empty((0, self.model.in_features), self.model.dtype)  # (B, I)
        self._isend(mb, "grad", dh, peer(a.kind, self.stage), message_tag(a.kind, a.mb))
        self._free.append(mb)  # reused only after its requests complete (see _forward)

    def _step(self, a):
        with self.tracer.span("send wait"):
            for mb in self._free:
                self._wait(mb.requests)
                mb.requests.clear()
        t0 = time.perf_counter()
        with self.tracer.span("allreduce"):
            self.sync.allreduce()
        self.sync_s += time.perf_counter() - t0

    # ----------------------------------------------------------- evaluation

    def evaluate(self, x, labels, chunk=2048):
        """Forward-only through the pipeline over this replica's rows x (n, I0).

        Only the first stage reads x (the others may pass None). Chunks flow
        stage to stage (the next chunk's forward overlaps the previous
        chunk's send). Returns (loss_sum, n_correct) on the last stage,
        (0.0, 0) on the others.
        """
        loss_sum, correct = 0.0, 0
        n = int(labels.shape[0])
        slots = [_MicroBatch(), _MicroBatch()]  # double-buffered outputs
        shape = (min(chunk, n), self.model.in_features)
        inbuf = self.ops.xp.empty(shape, self.model.dtype)
        inhost = np.empty(shape, self.model.dtype) if self.host_staging else None
        for j, (lo, hi) in enumerate(batch_bounds(n, chunk)):
            if self.is_first:
                h = x[lo:hi]
            else:
                h = inbuf[:hi - lo]
                if inhost is None:
                    self.comm.Recv(h, source=self.stage - 1, tag=EVAL_TAG)
                else:
                    self.comm.Recv(inhost[:hi - lo], source=self.stage - 1, tag=EVAL_TAG)
                    copy_from_host(inhost[:hi - lo], h)
            slot = slots[j % 2]
            self._wait(slot.requests, timed=False)
            slot.requests.clear()
            out = self.model.forward(h, slot.ctx)  # (B, O)
            if self.is_last:
                l, c = self.ops.predict_stats(out, labels[lo:hi], self.loss)
                loss_sum, correct = loss_sum + l, correct + c
            else:
                self._isend(slot, "act", out, self.stage + 1, EVAL_TAG)
        for slot in slots:
            self._wait(slot.requests, timed=False)
        return loss_sum, correct

    # -------------------------------------------------------------- weights

    def state_dict(self):
        """The whole model's named tensors on the replica-0 first stage ({} elsewhere).

        Collective over the pipeline of replica 0 (``gather_whole``): the
        stages' flat parameter buffers, concatenated in stage order, are the
        whole model's flat buffer; its layout names the tensors.
        """
        self.ops.synchronize()
        flat = np.ascontiguousarray(self.ops.to_host(self.model.flat.data))  # (n_s,)
        whole = gather_whole(self.grid, {"params": flat})
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

    def describe(self):
        """The start-up line: grid, schedule, micro-batches, layers per stage."""
        line = (f"pipeline dp {self.grid.dp} x pp {self.p}, {self.schedule} schedule, "
                f"{self.m} micro-batch(es)")
        if self.stages is not None:
            line += f", layers per stage {format_partition(self.stages)}"
        return line

    # -------------------------------------------------------------- metrics

    def epoch_metrics(self):
        """``stage_times`` over every rank of the grid: collective, once per epoch."""
        return self.stage_times(self.world)

    def stage_times(self, world):
        """Per-stage compute / idle / gradient-sync seconds since the last call.

        Collective over ``world`` (all ranks of the grid); each stage's times
        are averaged over its replicas. busy = forward + backward (the loss
        included on the last stage), idle = waiting for a message. Also the
        measured bubble: idle / (busy + idle) over all stages. The forward and
        backward seconds per micro-batch can be fed to ``python -m
        mpnn.schedule --stage-costs`` to predict the bubble of this pipeline.
        """
        mine = np.array([self.stage, self.forward_s, self.backward_s, self.idle_s, self.sync_s],
                        dtype=np.float64)
        self.forward_s = self.backward_s = self.idle_s = self.sync_s = 0.0
        every = np.empty((world.Get_size(), mine.size), dtype=np.float64)
        world.Allgather(mine, every)
        sums, count = np.zeros((self.p, mine.size - 1)), np.zeros((self.p, 1))
        for row in every:
            sums[int(row[0])] += row[1:]
            count[int(row[0])] += 1
        fwd, bwd, idle, sync = (sums / count).T
        busy = fwd + bwd
        total = busy.sum() + idle.sum()
        return {"stage_busy_s": _rounded(busy), "stage_idle_s": _rounded(idle),
                "stage_sync_s": _rounded(sync), "stage_forward_s": _rounded(fwd),
                "stage_backward_s": _rounded(bwd),
                "bubble": float(idle.sum() / total) if total else 0.0}


def _rounded(a):
    return [round(float(v), 6) for v in a]

