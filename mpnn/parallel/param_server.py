"""Parameter servers: K ranks hold the parameters and the optimizer state, the rest compute.

World ranks 0..K-1 are the servers; server k holds the k-th contiguous shard of
the flat parameter buffer (``zero_comm.Shards``) and the optimizer state of that
shard. Ranks K..N-1 are the W = N - K workers; each holds the whole model to
compute with, but never steps it. A worker's step:

    pull    send "pull" to every server; each replies with its shard's version
            (the updates it has applied) and its parameters, received in place
            into the worker's flat buffer
    compute forward and backward on its rows (the batch the pull assigned)
    push    send every server its slice of the gradient and the versions read

A server answers pulls and applies pushes, one message at a time, in the order
they arrive (``MPI.ANY_SOURCE``). When it answers a pull is the consistency model:

    bsp     bulk-synchronous: every worker takes its share of each global batch
            (as data parallelism does); a server sums one step's W pushes in
            worker order and steps its shard once, and answers a pull for step s
            only once it has applied step s - 1. Equal to serial training.
    ssp     stale-synchronous (Ho et al., 2013): a worker's clock is the pushes it
            has made; a pull from a worker at clock c waits while c exceeds the
            slowest worker's clock by more than S (``--staleness``)
    asp     asynchronous: every pull is answered at once

Under ssp and asp a worker computes a whole global batch (``--batch-size`` rows,
the gradient of their mean), server 0 handing the epoch's batches out in order to
whichever worker asks next, and every push is one optimizer step at the servers.
So every mode makes one update per global batch and sees every sample once per
epoch; they differ in which parameters each gradient was computed on. With one
worker, ssp and asp are serial training exactly.

Versions: a pull returns the version of each shard it read, a push carries them
back, and the server records each update's staleness: the updates it applied
between that read and this push (0 under bsp). Server 0 hands out the batches, so
one worker's pull goes to server 0 first and to the others once it is granted a
batch (under ssp the others hold it too, until their own view of the clocks
allows it: the bound holds on every shard).

    Roles             who is a server, who a worker
    ServerShard       one server: its shard, optimizer, versions and clocks; ``serve``
    Worker            one worker's pulls, pushes and epoch of batches; ``work``
    ParameterServerEngine  the Engine of both roles (``parallel.engine``)
    ServerOptimizer   what the checkpointer and resume see of the sharded optimizer

See docs/parallelism.md#13-consistency-models-parameter-servers.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI
from mpi4py.util.dtlib import from_numpy_dtype

from ..data.batching import share_bounds
from ..runtime import watchdog as wd
from ..runtime.trace import NULL_TRACER
from .data_parallel import DataParallelEngine
from .ps_config import DEFAULT_STALENESS
from .zero import ShardFlat, ShardOptimizer
from .zero_comm import Shards

PULL, PUSH = 0, 1
DONE = -1  # the batch of a pull's reply when the epoch has none left
TAG_REQUEST, TAG_GRAD, TAG_REPLY, TAG_PARAMS = 41, 42, 43, 44
# a request: (kind, clock, read version, batch, shard 0's version read); a reply:
# (version, batch, waited)
REQUEST, REPLY = 5, 3


class Roles:
    """World ranks 0..servers-1 serve, the others work (``index``: which of them)."""

    def __init__(self, world, servers):
        self.world, self.servers = world, int(servers)
        self.rank, self.size = world.Get_rank(), world.Get_size()
        self.workers = self.size - self.servers
        self.is_server = self.rank < self.servers
        self.index = self.rank if self.is_server else self.rank - self.servers

    def label(self, r):
        """World rank r's role, for the timeline."""
        return f"rank {r} (server {r})" if r < self.servers else \
            f"rank {r} (worker {r - self.servers})"


def _histogram(values):
    return {int(v): int(c) for v, c in zip(*np.unique(np.asarray(values, np.int64),
                                                     return_counts=True), strict=True)}


class ServerShard:
    """Server k: its shard of the parameters and of the optimizer state, the versions
    (updates applied; absolute, as steps), the workers' clocks (pushes received) and
    the figures of the epoch. ``serve`` answers and applies until the epoch is over."""

    def __init__(self, engine, optimizer):
        self.e, self.opt = engine, optimizer
        self.k, sh = engine.roles.index, engine.shards
        self.flat = engine.shard_flat
        w = engine.roles.workers
        # bsp: each worker's gradient kept apart, summed in worker order (reproducible);
        # ssp, asp receive a push straight into the shard's gradient
        self.parts = np.zeros((w if engine.sync == "bsp" else 0, sh.real), self.flat.dtype)
        self.clocks = np.zeros(w, np.int64)  # pushes received from each worker
        self.reads = np.zeros(w, np.int64)  # the version each worker's last push read
        self.applied = self.rma_seen = 0  # pushes applied in the epoch; --rma: versions seen
        self.version = 0
        self.request = np.zeros(REQUEST, np.int64)
        self.reply = np.zeros(REPLY, np.int64)
        self.staleness, self.gaps, self.waits, self.apply_s = [], [], 0, 0.0

    def serve(self, first, n_batches, step, lr_at, progress=None, epoch=0):
        """One epoch from batch ``first`` of ``n_batches`` (the run at ``step``): returns
        when every push of the epoch is applied and (server 0) every worker was told
        the epoch is over. ``progress(1)`` after each update."""
        e, w = self.e, self.e.roles.workers
        self.version, self.epoch_step, self.first, self.n_batches = step, step, first, n_batches
        self.next_batch = first  # ssp, asp: the next batch server 0 hands out
        self.epoch = epoch
        self.staleness, self.gaps, self.waits, self.apply_s = [], [], 0, 0.0
        expected = (n_batches - first) * (w if e.sync == "bsp" else 1)
        applied, self.told_done, self.arrived = 0, set(), set()
        deferred = []  # pulls that wait: (worker, clock)
        status = MPI.Status()
        while applied < expected or (self.k == 0 and len(self.told_done) < w) or deferred:
            wd.watch.step = self.version  # (what the watchdog's messages name)
            with wd.watch.op("wait for a worker's pull or push", ranks=e.ranks):
                e.world.Recv(self.request, MPI.ANY_SOURCE, TAG_REQUEST, status)
            src = status.Get_source()
            kind, clock, read, self.batch, read0 = (int(v) for v in self.request)
            i = src - e.roles.servers
            if kind == PULL:
                if not self._try(i, clock, waited=False):
                    deferred.append((i, clock))
                    self.waits += 1
                continue
            part = self.parts[i] if e.sync == "bsp" else self.flat.grad
            with wd.watch.op("gradient push", peer=f"from world rank {src}", nbytes=part.nbytes):
                e.world.Recv(part, src, TAG_GRAD)
            self.clocks[i] += 1
            self.reads[i] = read
            applied += self._push(i, lr_at, progress, read0)
            deferred = [(j, c) for j, c in deferred if not self._try(j, c, waited=True)]
        self.applied = applied
        return applied

    def _try(self, i, clock, waited):
        """Answer worker i's pull if its turn has come; False: it waits."""
        batch = self._answer(clock)
        if batch is None:
            return False
        self._send(i, batch, waited)
        if batch == DONE:
            self.told_done.add(i)
        return True

    def _answer(self, clock):
        """The batch to give a pull at ``clock`` now (DONE: none left; servers other
        than 0 answer 0), or None: it waits."""
        e = self.e
        if e.sync == "bsp":  # clock: the step the worker will compute
            batch = self.first + clock - self.epoch_step
            if self.k == 0 and batch >= self.n_batches:
                return DONE
            if self.version != clock:  # step clock - 1 is not applied yet
                return None
            return batch if self.k == 0 else 0
        if self.k == 0 and self.next_batch >= self.n_batches:
            return DONE
        gap = clock - int(self.clocks.min())  # ahead of the slowest worker by this much
        if e.sync == "ssp" and gap > e.staleness:
            return None
        self.gaps.append(gap)
        if self.k != 0:
            return 0
        self.next_batch += 1
        return self.next_batch - 1

    def _send(self, i, batch, waited):
        e = self.e
        self.reply[:] = (self.version, batch, 1 if waited else 0)
        dest = i + e.roles.servers
        with wd.watch.op("pull reply", peer=f"to world rank {dest}", nbytes=self.flat.data.nbytes):
            e.world.Send(self.reply, dest, TAG_REPLY)
            e.world.Send(self.flat.data, dest, TAG_PARAMS)

    def _push(self, i, lr_at, progress, read0):
        """Worker i's gradient is in: apply it (ssp, asp) or, once the step's W are in,
        their sum in worker order (bsp). Returns the pushes this applied. The update's
        learning rate: at the step the gradient was computed from (the version of shard
        0 it read; bsp: this step), the same on every shard."""
        e = self.e
        grad = self.flat.grad
        if e.sync == "bsp":
            self.arrived.add(i)
            if len(self.arrived) < e.roles.workers:
                return 0
            grad[...] = self.parts[0]
            for p in self.parts[1:]:
                grad += p
            self.staleness.extend(self.version - int(r) for r in self.reads)
            self.arrived = set()
            pushes = e.roles.workers
        else:  # (received into it)
            self.staleness.append(self.version - int(self.reads[i]))
            pushes = 1
        t0 = time.perf_counter_ns()
        self.opt.step(lr_at(self.version if e.sync == "bsp" else read0))
        self.version += 1
        t1 = time.perf_counter_ns()
        e.tracer.add("apply", t0, t1, step=self.version)
        self.apply_s += (t1 - t0) / 1e9
        e.check_shard(self.version, self.epoch, self.batch + 1)
        if progress is not None:
            progress(1)
        return pushes

    def figures(self):
        """This epoch's server figures (for ``ParameterServerEngine.epoch_metrics``)."""
        e = self.e
        if e.rma:  # the pushes the workers applied to this shard's window this epoch
            total = e.onesided.version(self.k)
            self.applied, self.rma_seen = total - self.rma_seen, total
        return {"applied": self.applied,
                "staleness": _histogram(self.staleness), "gaps": _histogram(self.gaps),
                "waits": self.waits, "apply_s": self.apply_s}


class Worker:
    """One worker: pulls into the model's flat buffer, computes with a one-rank
    data-parallel engine, pushes slices of its gradient."""

    def __init__(self, engine):
        self.e = e = engine
        k = e.roles.servers
        self.cuts = [Shards(e.shards.numel, k, j) for j in range(k)]  # every server's slice
        # (K, 5) each: a push's headers stay untouched until its sends complete, while
        # the next pull's go out
        self.pull_heads = np.zeros((k, REQUEST), np.int64)
        self.push_heads = np.zeros((k, REQUEST), np.int64)
        self.replies = np.zeros((k, REPLY), np.int64)  # (K, 3)
        self.pending = []  # the last push's send requests
        self.receives = {}  # server -> its reply's two receive requests
        self.clock = 0  # pushes made (ssp, asp)
        self.reset()

    def reset(self):
        self.pushes, self.blocked_s, self.pull_s, self.compute_s = 0, 0.0, 0.0, 0.0
        self.staleness = []  # --rma: each push's staleness (shard 0), from Fetch_and_op

    def pull(self, clock, step):
        """Pull for ``clock``; returns (batch or DONE, the versions read (K,))."""
        e, k = self.e, self.e.roles.servers
        t0 = time.perf_counter_ns()
        self.replies[:, 2] = 0
        self._ask(0, clock, step)
        batch = int(self.replies[0, 1])
        if batch != DONE and k > 1:
            for j in range(1, k):
                self._ask(j, clock, step, wait=False)
            self._wait(list(range(1, k)), step)
        t1 = time.perf_counter_ns()
        waited = bool(self.replies[:, 2].any())
        e.tracer.add("blocked" if waited else "pull", t0, t1, step=step + 1)
        self.pull_s += (t1 - t0) / 1e9
        if waited:
            self.blocked_s += (t1 - t0) / 1e9
        return batch, self.replies[:, 0].copy()

    def _ask(self, j, clock, step, wait=True):
        e, cut = self.e, self.cuts[j]
        flat = e.model.flat.data
        self.receives[j] = [e.world.Irecv(self.replies[j], j, TAG_REPLY),
                          e.world.Irecv(flat[cut.lo:cut.hi], j, TAG_PARAMS)]
        self.pull_heads[j] = (PULL, clock, 0, 0, 0)
        with wd.watch.op("pull request", peer=f"to server rank {j}"):
            e.world.Send(self.pull_heads[j], j, TAG_REQUEST)
        if wait:
            self._wait([j], step)

    def _wait(self, servers, step):
        reqs = [r for j in servers for r in self.receives[j]]
        with wd.watch.op("parameter pull",
                         peer=f"from server rank{'s' if len(servers) > 1 else ''} "
                              f"{', '.join(map(str, servers))}"):
            MPI.Request.Waitall(reqs)

    def push(self, read, batch, step):
        """Send every server its slice of the gradient, with the version read from it."""
        e, grad = self.e, self.e.model.flat.grad
        self.pending = []
        for j, cut in enumerate(self.cuts):
            self.push_heads[j] = (PUSH, self.clock, read[j], batch, read[0])
            self.pending += [e.world.Isend(self.push_heads[j], j, TAG_REQUEST),
                             e.world.Isend(grad[cut.lo:cut.hi], j, TAG_GRAD)]
        self.clock += 1
        self.pushes += 1

    def finish_push(self, step):
        """Wait for the last push's sends (before backward rewrites the gradient)."""
        if self.pending:
            t0 = time.perf_counter_ns()
            with wd.watch.op("gradient push", peer="to the servers"):
                MPI.Request.Waitall(self.pending)
            self.e.tracer.add("push", t0, time.perf_counter_ns(), step=step)
            self.pending = []

    def work(self, data, order, bounds, first, step, check, on_step=None):
        """One epoch's batches from ``first``: returns this worker's loss sum."""
        e = self.e
        loss_sum, done = 0.0, 0
        while True:
            s = step + done  # the step this worker computes (bsp: everyone's)
            wd.watch.step = s + 1
            clock = s if e.sync == "bsp" else self.clock
            batch, read = self.pull(clock, s)
            self.finish_push(s)
            if batch == DONE:
                break
            start, stop = bounds[batch]
            if e.sync == "bsp":  # this worker's share of the global batch
                lo, hi = share_bounds(stop - start, e.roles.index, e.roles.workers)
                rows = order[start + lo:start + hi]
            else:
                rows = order[start:stop]
            loss = self._compute(data, rows, stop - start, on_step)
            check(loss, s + 1, batch + 1)
            self.push(read, batch, s + 1)
            loss_sum += loss
            done += 1
        self.finish_push(step + done)
        return loss_sum

    def _compute(self, data, rows, global_batch, on_step):
        """Forward and backward over ``rows`` (the gradient of their share of a global
        batch's mean); the straggler's compute then takes FACTOR times as long."""
        t0 = time.perf_counter()
        loss = self.e.local.train_step(data.train_features(rows), data.y_train[rows],
                                       1.0 / global_batch)  # features (b, I)
        if self.e.straggler_factor > 1:  # the experiment's slow worker
            time.sleep((time.perf_counter() - t0) * (self.e.straggler_factor - 1))
        spent = time.perf_counter() - t0
        self.compute_s += spent
        if on_step is not None:
            on_step(spent)
        return loss

    def work_rma(self, data, order, bounds, step, lr_at, check, on_step=None):
        """One epoch with one-sided pulls and pushes (asp, plain SGD): take a batch
        ticket, pull every shard under its shared lock, compute, push every slice
        under its exclusive lock; then the epoch's barrier. Returns the loss sum."""
        e, one = self.e, self.e.onesided
        loss_sum, done = 0.0, 0
        while True:
            wd.watch.step = step + done + 1
            batch = one.take_ticket()
            if batch >= len(bounds):
                break
            t0 = time.perf_counter_ns()
            read = one.pull(e.model.flat.data)
            e.tracer.add("pull", t0, time.perf_counter_ns(), step=step + done + 1)
            self.pull_s += (time.perf_counter_ns() - t0) / 1e9
            start, stop = bounds[batch]
            loss = self._compute(data, order[start:stop], stop - start, on_step)
            check(loss, step + done + 1, batch + 1)
            t1 = time.perf_counter_ns()
            # the update's index: the version of shard 0 its gradient was computed from
            self.staleness.append(one.push(e.model.flat.grad, lr_at(e.version_base + read[0]),
                                           read))
            e.tracer.add("push", t1, time.perf_counter_ns(), step=step + done + 1)
            self.pushes += 1
            loss_sum += loss
            done += 1
        e.epoch_barrier()
        return loss_sum

    def figures(self):
        return {"pushes": self.pushes, "blocked_s": self.blocked_s, "pull_s": self.pull_s,
                "compute_s": self.compute_s, "staleness": _histogram(self.staleness)}


class ParameterServerEngine:
    """The Engine (``parallel.engine``) of a parameter-server run, on a server or a
    worker. The loop of such a run is ``runtime.ps_loop``: it calls ``serve`` on
    servers and ``work`` on workers each epoch, then ``gather_params`` so that every
    rank evaluates the servers' model. ``train_step`` is a worker's local step."""

    needs_inputs = True

    def __init__(self, model, loss, world, sync, servers, staleness=None, straggler=None,
                 tracer=NULL_TRACER, rma=False):
        self.model, self.world, self.tracer = model, world, tracer
        self.sync = sync
        self.staleness = int(staleness if staleness is not None else DEFAULT_STALENESS)
        self.roles = Roles(world, servers)
        self.ranks = wd.group_ranks(world, "the parameter-server job")
        r = self.roles
        numel = model.layout.numel
        # servers hold shards; a worker's shard is empty (its optimizer state too)
        self.shards = Shards(numel, r.servers, r.index) if r.is_server else Shards(numel, 1, 1)
        sh = self.shards
        params = model.flat.data[sh.lo:sh.hi].copy() if r.is_server else model.flat.data[:0]
        self.onesided = None
        self.version_base = 0  # --rma: the run's step when the windows' versions were 0
        if rma:  # one window per server holds its shard; workers pull and push one-sided
            from .ps_rma import OneSided

            self.onesided = OneSided(world, [Shards(numel, r.servers, j)
                                             for j in range(r.servers)], model.flat.data)
            if r.is_server:
                params = self.onesided.local  # the window's memory, in place
        self.shard_flat = ShardFlat(model.layout, sh, params, np.zeros(sh.real, model.dtype))
        self.local = DataParallelEngine(model, loss, MPI.COMM_SELF, 0.0, tracer)
        self.straggler_factor = straggler[1] if straggler and straggler[0] == r.rank else 1.0
        self.server = self.worker = None
        if not r.is_server:
            self.worker = Worker(self)

    @property
    def rma(self):
        return self.onesided is not None

    def attach(self, optimizer):
        """The run's optimizer over ``shard_flat`` (built by the loop): a server's."""
        if self.roles.is_server:
            self.server = ServerShard(self, optimizer)

    # ------------------------------------------------------------ the Engine

    def train_step(self, x, labels, scale):
        """A worker's forward and backward (no sum: its gradient is pushed)."""
        return self.local.train_step(x, labels, scale)

    def evaluate(self, x, labels):
        return self.local.evaluate(x, labels)

    def state_dict(self):
        """The servers' model, whole on every rank (collective)."""
        self.gather_params()
        return self.model.state_dict()

    def activations(self):
        return self.local.activations()

    def epoch_metrics(self):
        """The epoch's figures of every server and worker (collective, the same on every rank):
        staleness histograms, clock gaps served, waits, and per worker its pushes and
        the seconds it spent blocked, pulling and computing."""
        mine = self.server.figures() if self.server else self.worker.figures()
        every = self.world.allgather(mine)  # (every rank's history is the same)
        if self.worker:
            self.worker.reset()
        k = self.roles.servers
        servers, workers = every[:k], every[k:]
        hist = dict(servers[0]["staleness"])  # every server applies every push: 0 speaks
        if self.rma:  # the workers measured it, each push on shard 0
            hist = {}
            for f in workers:
                for v, c in f["staleness"].items():
                    hist[v] = hist.get(v, 0) + c
        gaps = [max(f["gaps"], default=0) for f in servers]
        n = sum(hist.values())
        return {
            "sync": self.sync, "servers": k,
            "staleness_histogram": {str(s): c for s, c in sorted(hist.items())},
            "staleness_mean": sum(s * c for s, c in hist.items()) / n if n else 0.0,
            "staleness_max": max(hist, default=0),
            "clock_gap_max": max(gaps, default=0),
            "clock_gap_histogram": {str(s): c for s, c in sorted(servers[0]["gaps"].items())},
            "pulls_waited": sum(f["waits"] for f in servers),
            "pushes_applied": [f["applied"] for f in servers],  # per server
            "worker_pushes": [f["pushes"] for f in workers],
            "worker_blocked_s": [round(f["blocked_s"], 4) for f in workers],
            "worker_pull_s": [round(f["pull_s"], 4) for f in workers],
            "worker_compute_s": [round(f["compute_s"], 4) for f in workers],
        }

    def describe(self):
        r, sh = self.roles, Shards(self.model.layout.numel, self.roles.servers, 0)
        bound = f", staleness bound {self.staleness}" if self.sync == "ssp" else ""
        return (f"parameter servers ({self.sync}{bound}): {r.servers} server"
                f"{'s' if r.servers > 1 else ''} (world ranks 0-{r.servers - 1}) of "
                f"{sh.size:,} of the {sh.numel:,} parameters each, {r.workers} worker"
                f"{'s' if r.workers > 1 else ''}")

    def memory(self):
        if self.roles.is_server:
            s = self.server
            return {"params": int(self.shard_flat.data.nbytes),
                    "grads": int(self.shard_flat.grad.nbytes),
                    "comm": int(s.parts.nbytes) if s else 0, "activations": 0}
        return self.local.memory()

    def close(self):
        """Free the one-sided windows (collective)."""
        if self.onesided is not None:
            self.onesided.close()
        self.onesided = None

    # ------------------------------------------------------ one-sided (--rma)

    def epoch_barrier(self):
        """Servers wait here (inside MPI, so the workers' one-sided calls progress)
        while workers pull and push; a worker joins when the batches ran out."""
        # (a server's wait is the whole epoch: the workers' own waits here watch for a
        # rank that stopped; limit 0, none of its own)
        with wd.watch.op("epoch's barrier (one-sided pulls and pushes meanwhile)",
                         comm=self.world, ranks=self.ranks,
                         limit=0 if self.roles.is_server else None):
            self.world.Ibarrier().Wait()

    def settle(self, step, epoch, batches):
        """--rma, a server after the epoch's barrier: its window's memory as the last
        Accumulate left it (a lock epoch on itself), checked for NaN/inf before the
        gather and any checkpoint (the workers applied the updates; no server saw them)."""
        self.onesided.version(self.roles.index)
        self.check_shard(step, epoch, batches)

    # ---------------------------------------------------------- the epochs

    def gather_params(self):
        """Every rank's flat parameters <- the servers' shards (collective)."""
        r, sh = self.roles, self.shards
        counts, displs = self.gather_layout()
        flat = self.model.flat.data
        send = self.shard_flat.data if r.is_server else flat[:0]
        with wd.watch.op("parameter gather", comm=self.world, ranks=self.ranks,
                         check=("Allgatherv", int(sh.numel), flat.dtype)):
            self.world.Allgatherv(send, [flat, counts, displs, from_numpy_dtype(flat.dtype)])

    def gather_layout(self):
        """(counts, displacements) of a gather of the servers' shards, world rank order
        (a worker contributes nothing)."""
        r = self.roles
        cuts = [Shards(self.shards.numel, r.servers, j) for j in range(r.servers)]
        return [c.real for c in cuts] + [0] * r.workers, [c.lo for c in cuts] + [0] * r.workers

    def check_shard(self, step, epoch, batch):
        """A server's non-finite guard: its shard after an update (names the layer)."""
        from ..runtime.guards import check_finite

        check_finite(self.model, 0.0, step, epoch, batch, self.roles.rank, None, None,
                     MPI.COMM_SELF, self.shard_flat)


class ServerOptimizer(ShardOptimizer):
    """The run's optimizer as the checkpointer and resume see it (``zero.ShardOptimizer``):
    a server steps its shard; ``stage_arrays`` gathers the whole parameters and state
    to world rank 0 (a server). A worker holds an empty shard, so every rank has the
    same state names."""

    def __init__(self, engine, inner):
        super().__init__(engine.shards, inner)
        self.e = engine

    def stage_arrays(self):
        e = self.e
        whole = {"params": self._gather(e.shard_flat.data)}
        for name, a in self.inner.state().items():
            whole[name] = self._gather(a)
        return whole if e.roles.rank == 0 else None

    def _gather(self, part):
        e, r = self.e, self.e.roles
        counts, displs = e.gather_layout()
        out = np.empty(e.shards.numel, part.dtype) if r.rank == 0 else None
        recv = [out, counts, displs, from_numpy_dtype(part.dtype)] if r.rank == 0 else None
        e.world.Gatherv(np.ascontiguousarray(part), recv, root=0)
        return out
