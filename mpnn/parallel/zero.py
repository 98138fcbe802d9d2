"""ZeRO (Rajbhandari et al., 2020): data parallelism that shards the model states.

Plain data parallelism (``--zero 0``) keeps on every one of N replicas the
whole parameters, gradients and optimizer state of Ψ parameters. ``--zero``
cuts all three along the flat buffer, rank j owning one contiguous slice
(``zero_comm.Shards``):

    stage 1   optimizer state sharded: the gradient is reduce-scattered (rank j
              receives the sum of its slice), rank j steps its slice of the
              parameters, and an Allgather rebuilds the whole parameters
    stage 2   gradients sharded too: each bucket is reduce-scattered as soon as
              backward finishes its layers, out of a scratch ring; no rank ever
              holds the whole gradient
    stage 3   parameters sharded too: each layer's (W, b) are all-gathered just
              before its forward and again before its backward, the next
              layer's gather started early, the buffer reused two layers on

Every stage trains the same weights as plain data parallelism (a sum over
replicas of the same values, in another grouping: equal to serial training
to floating-point summation order). Per rank, for b bytes per element and K
optimizer arrays (Adam 2, momentum 1, SGD 0), the model states take
(``zero_formula``)::

    stage 0   (2 + K)·b·Ψ              float32 Adam: 16Ψ
    stage 1   2·b·Ψ + K·b·Ψ/N                        4Ψ + 4Ψ + 8Ψ/N
    stage 2   b·Ψ + (1 + K)·b·Ψ/N                    4Ψ + 12Ψ/N
    stage 3   (2 + K)·b·Ψ/N                          16Ψ/N

plus the communication scratch (stage 2: the two largest consecutive
gradient buckets; stage 3: that and the two largest consecutive layers).
``Zero.memory`` reports what is allocated, summed from the arrays.

    Zero            one rank's shards, the gradient reduce-scatter, the parameter
                    gathers, the whole-model views for checkpoints and --save
    ZeroOptimizer   an optimizer (``nn.optim``) stepping this rank's shard, then
                    rebuilding the parameters (stages 1, 2)

See docs/parallelism.md#10-zero-sharded-data-parallelism.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI
from mpi4py.util.dtlib import from_numpy_dtype

from ..runtime import watchdog as wd
from ..runtime.guards import check_replicas_agree
from ..runtime.trace import NULL_TRACER
from .zero_comm import ParamGather, ShardedGradSync, Shards

ZERO_STAGES = (0, 1, 2, 3)
SPLIT_BACKWARD = ("zb-h1", "zb-h2")  # schedules whose W runs apart from its B


class ZeroConfigError(ValueError):
    """A --zero stage that this grid, schedule or backend cannot run."""


def check_zero_config(zero, world_size, dp, pp=1, tp=1, schedule="1f1b", backend="numba"):
    """Raise ZeroConfigError for a --zero that cannot run (before any message).

    dp: data-parallel replicas of the grid (its ranks / (pp x tp))."""
    if zero not in ZERO_STAGES:
        raise ZeroConfigError(f"--zero {zero}: choose a stage from 0 to 3")
    if zero == 0:
        return
    if world_size == 1:
        raise ZeroConfigError(f"--zero {zero} shards the model states across data-parallel "
                              f"replicas, and a serial run has one: run under mpirun -n 2 or "
                              f"more, or drop --zero")
    if tp > 1:
        raise ZeroConfigError(f"--zero {zero} with --tp {tp}: sharding a tensor-parallel shard "
                              f"again is not supported; use --zero with --dp/--pp, or --tp "
                              f"without --zero")
    if zero == 3 and pp > 1:
        raise ZeroConfigError("--zero 3 with --pp: every micro-batch of a stage needs the "
                              "stage's parameters, so sharding them would gather them twice per "
                              "micro-batch; use --zero 1 or 2 with --pp")
    if zero == 2 and pp > 1 and schedule in SPLIT_BACKWARD:
        raise ZeroConfigError(f"--zero 2 with --schedule {schedule}: a zero-bubble schedule "
                              f"computes a micro-batch's weight gradients apart from the rest "
                              f"of its backward, so no bucket is final at one point; use --zero "
                              f"1, or a schedule with a whole backward (1f1b, gpipe, "
                              f"interleaved-1f1b)")
    if dp == 1:
        raise ZeroConfigError(f"--zero {zero} shards across data-parallel replicas, and this "
                              f"grid (--pp {pp}{f' x --tp {tp}' if tp > 1 else ''} over "
                              f"{world_size} ranks) has one: add ranks (mpirun -n "
                              f"{2 * world_size}) or drop --zero")
    if backend == "cupy":
        raise ZeroConfigError(f"--zero {zero} exchanges host (NumPy) buffers; the cupy backend "
                              f"is not supported with it: use --backend numba or numpy")


def zero_formula(stage, numel, n, itemsize, n_states):
    """The ZeRO paper's bytes per rank of parameters, gradients and optimizer state
    for ``numel`` (Ψ) parameters over ``n`` ranks, ``itemsize`` bytes each and
    ``n_states`` optimizer arrays (Adam 2, momentum 1, plain SGD 0)."""
    one = itemsize * numel
    return {"params": one / (n if stage >= 3 else 1),
            "grads": one / (n if stage >= 2 else 1),
            "optimizer": n_states * one / (n if stage >= 1 else 1)}


class ShardFlat:
    """What the optimizer and the guards see of one rank's shard: ``data`` and
    ``grad`` (its real elements) and, for naming a bad layer, the part of each
    named tensor that falls in the shard (1-D views)."""

    def __init__(self, layout, shards, data, grad):
        self.data, self.grad, self.layout = data, grad, layout
        self.dtype = data.dtype
        self.params, self.grads = {}, {}
        for name, s in layout.slots.items():
            a, e = shards.mine(s.offset, s.stop)
            if e > a:
                self.params[name] = data[a - shards.lo:e - shards.lo]
                self.grads[name] = grad[a - shards.lo:e - shards.lo]


class Zero:
    """One rank's ZeRO state over ``comm`` (the data-parallel ranks of its stage).

    model       the rank's MLP (its stage); built whole, then sharded here: at
                stage 3 its whole parameter buffer is dropped after this rank's
                slice is copied out
    bucket_mb   the gradient buckets (``--bucket-mb``; 0: one per model chunk)
    accumulate  a pipeline's micro-batches add into the gradient shard
    """

    def __init__(self, stage, model, comm, bucket_mb=0.1, accumulate=False, tracer=NULL_TRACER):
        check_replicas_agree(comm, model.flat)  # the same start, checked while it is whole
        self.stage, self.model, self.comm, self.tracer = int(stage), model, comm, tracer
        flat, layout = model.flat, model.layout
        sh = self.shards = Shards(layout.numel, comm.Get_size(), comm.Get_rank())
        self.root = comm.Get_rank() == 0
        if self.stage < 3:  # whole parameters, padded so the Allgather has equal counts
            self.padded = np.zeros(sh.padded, flat.dtype)  # (S·N,)
            self.padded[:sh.numel] = flat.data
            flat.data = self.padded[:sh.numel]  # (Ψ,) the model's views: the tail unseen
            flat.params = layout.views(flat.data)
            params = self.padded[sh.lo:sh.hi]  # (real,) this rank's slice, in place
        else:
            self.padded = None
            params = flat.data[sh.lo:sh.hi].copy()  # (real,) the only copy this rank keeps
            flat.data = params[:0]  # no whole parameter buffer (an empty view)
            flat.params = dict.fromkeys(flat.params)  # bound layer by layer when gathered
        self.param_shard = params
        grad = np.zeros(sh.real, flat.dtype)  # (real,) what the reduce-scatters deliver
        self.sync = ShardedGradSync(comm, model, sh, grad, bucket_mb, scratch=self.stage >= 2,
                                    accumulate=accumulate)
        self.grad_shard = grad
        self.shard_flat = ShardFlat(layout, sh, params, grad)
        self.gather = None
        if self.stage == 3:
            self.gather = ParamGather(comm, model, sh, params, tracer)
            model.fetch = self.gather

    # ------------------------------------------------------------ the step

    def after_step(self):
        """After the optimizer stepped this rank's slice: rebuild the parameters
        (stages 1, 2: one Allgather in place) or mark the gathered ones stale (3)."""
        if self.gather is not None:
            self.gather.invalidate()
            return
        with self.tracer.span("allgather"), \
                wd.watch.op("parameter Allgather", comm=self.comm, ranks=self.sync.ranks,
                            check=("Allgather", self.padded.size, self.padded.dtype)):
            self.comm.Allgather(MPI.IN_PLACE, self.padded)

    def idle_forward(self):
        """Stage 3, no rows: the gathers the other ranks' forward starts, in order."""
        for i in self.model.layers:
            self.gather.forward(i)

    def idle_backward(self):
        """Stage 3, no rows: the gathers and reduce-scatters of a backward, in order."""
        first = self.model.layers[0]
        self.sync.begin()
        for i in reversed(self.model.layers):
            if i != first:
                self.gather.backward(i)
            self.sync.on_layer_done(i)

    def agree_max(self, n):
        """The largest ``n`` over the ranks (how many forward passes to run)."""
        buf = np.array([n], np.int64)
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
        return int(buf[0])

    # ------------------------------------------------- whole-model views

    def gather_slices(self, part):
        """This rank's (real,) host slice -> the whole (Ψ,) array on rank 0 of
        ``comm`` (None elsewhere): one Gatherv."""
        sh = self.shards
        counts = sh.counts(0, sh.numel)
        displs = [j * sh.size for j in range(sh.n)]
        part = np.ascontiguousarray(part)
        whole = np.empty(sh.numel, part.dtype) if self.root else None
        recv = [whole, counts, displs, from_numpy_dtype(part.dtype)] if self.root else None
        self.comm.Gatherv(part, recv, root=0)
        return whole

    def whole_params(self):
        """The stage's whole flat parameters on rank 0 of ``comm`` (None elsewhere)."""
        if self.stage < 3:
            return self.model.flat.data.copy() if self.root else None
        return self.gather_slices(self.param_shard)

    def state_dict(self):
        """Named whole-model tensors on rank 0 of ``comm``, {} elsewhere (collective)."""
        whole = self.whole_params()
        if whole is None:
            return {}
        return {name: v.copy() for name, v in self.model.layout.views(whole).items()}

    # -------------------------------------------------------------- checks

    def check_agree(self, when):
        """The replica check of ``runtime.guards``: at stages 1 and 2 every rank holds
        the whole parameters (its slice stepped, the rest received) and they must be
        equal; at stage 3 each parameter lives on one rank only, so there is no copy
        to compare, and the ranks must agree on the shard layout instead."""
        if self.stage < 3:
            check_replicas_agree(self.comm, self.model.flat, when)
            return
        sh = self.shards
        mine = np.array([sh.numel, sh.size, self.param_shard.size], np.int64)
        every = np.empty((sh.n, 3), np.int64)
        self.comm.Allgather(mine, every)
        expected = [(sh.numel, sh.size, n) for n in sh.counts(0, sh.numel)]
        bad = [j for j in range(sh.n) if tuple(int(v) for v in every[j]) != expected[j]]
        if bad:
            at = when or "at the start"
            raise RuntimeError(f"ZeRO-3 ranks disagree on the shard layout {at}: data-parallel "
                               f"ranks {bad} hold slices of another buffer (a bug)")

    # -------------------------------------------------------------- ledger

    def memory(self):
        """Bytes this rank allocated for the model states and ZeRO's buffers."""
        params = self.padded.nbytes if self.padded is not None else self.param_shard.nbytes
        comm = self.sync.nbytes + (self.gather.nbytes if self.gather is not None else 0)
        if self.stage == 1:  # the whole gradient is backward's; the shard, the reduce-scatter's
            grads, comm = self.model.flat.grad.nbytes, comm + self.grad_shard.nbytes
        else:
            grads = self.grad_shard.nbytes
        return {"params": int(params), "grads": int(grads), "comm": int(comm)}

    def formula(self, n_states):
        return zero_formula(self.stage, self.shards.numel, self.shards.n,
                            self.model.dtype.itemsize, n_states)

    def describe(self):
        sh = self.shards
        return (f"ZeRO-{self.stage} over {sh.n} data-parallel ranks: {sh.numel:,} parameters "
                f"per replica, {sh.size:,} per shard"
                + (f" ({sh.padding} of padding on the last)" if sh.padding else ""))


class ShardOptimizer:
    """An ``nn.optim`` optimizer over one rank's shard of the flat buffer (``shards``,
    a ``zero_comm.Shards``), as the checkpointer and resume see it: ``t`` and
    ``state`` are the inner optimizer's, ``load_state`` takes this rank's slice of a
    whole (Ψ,) array. ``stage_arrays`` (the whole arrays, gathered) is the sharding's."""

    def __init__(self, shards, inner):
        self.shards, self.inner = shards, inner

    @property
    def t(self):
        return self.inner.t

    @t.setter
    def t(self, value):
        self.inner.t = int(value)

    def step(self, lr=None):
        self.inner.step(lr)

    def state(self):
        return self.inner.state()

    def load_state(self, name, local):
        """Take this rank's slice of the whole (Ψ,) state array ``local``."""
        sh = self.shards
        self.inner.state()[name][...] = local[sh.lo:sh.hi]


class ZeroOptimizer(ShardOptimizer):
    """An ``nn.optim`` optimizer over this rank's shard (``Zero.shard_flat``), then
    ``Zero.after_step``. Its state has the shard's real length; ``state`` names
    this rank's slices, ``stage_arrays`` the whole stage's (gathered to rank 0)."""

    def __init__(self, zero, inner):
        super().__init__(zero.shards, inner)
        self.zero = zero

    def step(self, lr=None):
        self.inner.step(lr)
        self.zero.after_step()

    def stage_arrays(self):
        """"params" and every state array of the whole stage on rank 0 of the
        data-parallel group (host arrays), None on the other ranks (collective)."""
        whole = {"params": self.zero.whole_params()}
        for name, a in self.inner.state().items():
            whole[name] = self.zero.gather_slices(a)
        return whole if self.zero.root else None
