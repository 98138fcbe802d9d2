"""Measure what each linear layer costs a pipeline stage, for ``--partition profile``.

Shape legend: B rows (the run's micro-batch), I/O in/out features of a layer.

Per layer i, with the run's op set, dtype and activation, on random data of
the micro-batch's shape, the three pieces a pipeline schedule places::

    F  forward          h = act(x·W + b)                         linear_act        (B, O)
    B  input gradient   dz = dy ⊙ act'(h), db += Σ_rows dz;      act_bias_backward (B, O)
                        dx = dz·Wᵀ (not for layer 0: nobody      input_grad        (B, I)
                        needs dL/dx)
    W  weight gradient  dW += xᵀ·dz                              weight_grad       (I, O)

(the split of ``MLP.backward(weights=False)`` and ``backward_weight``). The
loss, the messages and the optimizer step are left out: they do not depend
on where the cuts go, or hardly. One sweep runs F, B, W of every layer in
order, each timed alone (``ops.synchronize`` before the clock stops, so a GPU
is timed too); a first sweep warms up (and compiles) and is not counted, and
each piece's cost is the median over up to ``repeats`` sweeps, fewer once
they have taken ``budget_s`` seconds (at least one).

``average_costs`` makes every rank agree: each rank profiles the whole model
at once, then one ``Allreduce`` sums the times over the world communicator
as integer nanoseconds and each rank divides by the size. Profiling on every
rank rather than on rank 0 and broadcasting costs no extra wall time, and
measures the layers while every other rank computes too, as in training
(shared cores and memory bandwidth), over more samples; integer sums are
exact whatever order the reduction adds in, so every rank gets the same bits
and so the same partition (a floating-point sum need not).
"""

from __future__ import annotations

import statistics
import time
from typing import NamedTuple

import numpy as np

from .partition import check_stages, interleaved_partition


class LayerCost(NamedTuple):
    """Seconds one micro-batch spends in one linear layer, by pipeline action."""

    forward: float  # F
    backward: float  # B: dL/dz, the bias gradient and dL/dx
    weight: float  # W: dL/dW

    @property
    def total(self):
        return self.forward + self.backward + self.weight


def profile_layers(sizes, rows, ops, dtype, activation, repeats=7, budget_s=0.25, rng=None):
    """The median F, B, W seconds of every linear layer of an MLP of ``sizes`` on
    ``rows``-row micro-batches, measured on this rank: a list of ``LayerCost``."""
    if rows < 1 or repeats < 1:
        raise ValueError(f"profiling needs at least one row per micro-batch and one repeat "
                         f"(got rows={rows}, repeats={repeats})")
    rng = rng if rng is not None else np.random.default_rng(0)
    dtype = np.dtype(dtype)
    n_layers = len(sizes) - 1

    def host(*shape, scale=1.0):
        return ops.to_device((scale * rng.standard_normal(shape)).astype(dtype))

    layers, x = [], host(rows, sizes[0])  # (B, I_0)
    for i in range(n_layers):
        n_in, n_out = sizes[i], sizes[i + 1]
        act = "identity" if i == n_layers - 1 else activation
        layer = dict(act=act, x=x, W=host(n_in, n_out, scale=np.sqrt(2.0 / n_in)),
                     b=ops.xp.zeros(n_out, dtype=dtype), dy0=host(rows, n_out),
                     h=ops.xp.empty((rows, n_out), dtype=dtype),
                     dy=ops.xp.empty((rows, n_out), dtype=dtype),
                     dx=ops.xp.empty((rows, n_in), dtype=dtype) if i > 0 else None,
                     db=ops.xp.zeros(n_out, dtype=dtype),
                     dW=ops.xp.zeros((n_in, n_out), dtype=dtype))
        layers.append(layer)
        x = layer["h"]  # the next layer reads this one's output, as in training
    for layer in layers:  # warm-up (and compilation), not measured
        _sweep_layer(ops, layer)
    samples, t0 = [], time.perf_counter()
    while len(samples) < repeats:
        samples.append([_sweep_layer(ops, layer) for layer in layers])
        if time.perf_counter() - t0 >= budget_s:
            break
    return [LayerCost(*(statistics.median(s[i][k] for s in samples) for k in range(3)))
            for i in range(n_layers)]


def _sweep_layer(ops, layer):
    """(F, B, W) seconds of one layer, each timed alone."""
    L = layer
    f = _timed(ops, ops.linear_act, L["x"], L["W"], L["b"], L["act"], L["h"])  # (B, O)
    L["dy"][...] = L["dy0"]  # a fresh upstream gradient: B overwrites it with dz

    def backward():
        dz = ops.act_bias_backward(L["dy"], L["h"], L["act"], L["db"])  # (B, O)
        if L["dx"] is not None:
            ops.input_grad(dz, L["W"], L["dx"])  # (B, I)

    b = _timed(ops, backward)
    w = _timed(ops, ops.weight_grad, L["x"], L["dy"], L["dW"])  # (I, O)
    return f, b, w


def _timed(ops, fn, *args):
    ops.synchronize()
    t0 = time.perf_counter()
    fn(*args)
    ops.synchronize()
    return time.perf_counter() - t0


def average_costs(costs, comm):
    """The mean of every rank's ``costs`` over ``comm`` (a world of one: this rank's), the
    same bits on every rank: one Allreduce of integer nanoseconds."""
    if comm.Get_size() == 1:
        return list(costs)
    from mpi4py import MPI

    ns = np.array([[round(t * 1e9) for t in c] for c in costs], dtype=np.int64)  # (L, 3)
    comm.Allreduce(MPI.IN_PLACE, ns, op=MPI.SUM)
    mean = ns / (comm.Get_size() * 1e9)
    return [LayerCost(*map(float, row)) for row in mean]


def profiled_partition(sizes, pp, virtual, rows, ops, dtype, activation, comm, **profile):
    """(stages, costs): the ``pp·virtual`` stage ranges that minimise the slowest rank
    under the measured per-layer costs, and those ``LayerCost``s, the same on every
    rank of ``comm``. Collective over ``comm``; ``profile`` goes to ``profile_layers``."""
    check_stages(len(sizes) - 1, pp * virtual, virtual)
    costs = average_costs(profile_layers(sizes, rows, ops, dtype, activation, **profile), comm)
    return interleaved_partition([c.total for c in costs], pp, virtual), costs
