"""A pipeline stage's times per epoch: what the engine clocks, and the epoch record's figures.

``PipelineEngine`` adds into a ``StageClock`` the seconds of every F, B and W it
runs (per model chunk), of every wait for a message (idle) and of the gradient
sync. Once per epoch ``gather_stage_times`` gathers every rank's clock over the
grid, averages each stage over its replicas, and returns what ``mpnn.train
--metrics`` records: busy / idle / sync seconds per stage, the measured bubble,
and ``action_costs_s`` (the mean seconds of one F, B and W on each rank and
chunk), which ``python -m mpnn.schedule --costs-from`` reads to predict this
pipeline's bubble.
"""

from __future__ import annotations

import time

import numpy as np

KINDS = "FBW"  # the compute actions: forward, backward (dL/dx), weight gradient


class StageClock:
    """Seconds of this rank's stage since the last ``take``.

    busy        kind ("F" | "B" | "W") -> seconds of every such action
    idle_s      waiting for a message (a receive, a send's buffer)
    sync_s      the gradient allreduce over replicas
    cost        kind -> per chunk [seconds, count] of that kind's actions
    """

    def __init__(self, chunks):
        self.chunks = int(chunks)
        self._reset()

    def _reset(self):
        self.busy = dict.fromkeys(KINDS, 0.0)
        self.idle_s = self.sync_s = 0.0
        self.cost = {k: [[0.0, 0] for _ in range(self.chunks)] for k in KINDS}

    def timed(self, kind, chunk, t0):
        """One F, B or W on ``chunk`` that started at ``time.perf_counter()`` ``t0``."""
        seconds = time.perf_counter() - t0
        self.busy[kind] += seconds
        cell = self.cost[kind][chunk]
        cell[0] += seconds
        cell[1] += 1

    def take(self):
        """[forward, backward, weight, idle, sync seconds, then the mean seconds of one
        F on each chunk, of one B, of one W (0 where none ran)] (5 + 3V,); restarts."""
        means = [seconds / count if count else 0.0
                 for k in KINDS for seconds, count in self.cost[k]]
        row = [*(self.busy[k] for k in KINDS), self.idle_s, self.sync_s, *means]
        self._reset()
        return row


def gather_stage_times(world, clock, stage, p, schedule, micro_batches):
    """Per-stage compute / idle / gradient-sync seconds since the last call.

    Collective over ``world`` (all ranks of the grid): every rank sends its
    ``stage`` (of ``p``) and its ``clock.take()``; each stage's times are
    averaged over its replicas. busy = forward + backward + weight gradients
    (the loss included on the last stage), idle = waiting for a message. Also
    the measured bubble: idle / (busy + idle) over all stages, and
    ``action_costs_s``: the mean seconds of one F, B and W on each rank and
    chunk, with the pipeline's keys (``schedule``, ``pp``, ``virtual_stages``,
    ``micro_batches``) that ``python -m mpnn.schedule --costs-from`` reads.
    """
    v = clock.chunks
    mine = np.array([stage, *clock.take()], dtype=np.float64)
    every = np.empty((world.Get_size(), mine.size), dtype=np.float64)
    world.Allgather(mine, every)
    sums, count = np.zeros((p, mine.size - 1)), np.zeros((p, 1))
    for row in every:
        sums[int(row[0])] += row[1:]
        count[int(row[0])] += 1
    means = sums / count  # (p, 5 + 3v)
    fwd, bwd, wgt, idle, sync = means[:, :5].T
    busy = fwd + bwd + wgt
    total = busy.sum() + idle.sum()
    per = means[:, 5:].reshape(p, 3, v)  # (p, kind, chunk)
    return {"stage_busy_s": _rounded(busy), "stage_idle_s": _rounded(idle),
            "stage_sync_s": _rounded(sync), "stage_forward_s": _rounded(fwd),
            "stage_backward_s": _rounded(bwd), "stage_weight_s": _rounded(wgt),
            "bubble": float(idle.sum() / total) if total else 0.0,
            "action_costs_s": {k: [[round(float(x), 9) for x in per[r, j]]
                                   for r in range(p)] for j, k in enumerate(KINDS)},
            "message_latency_s": 0.0, "schedule": schedule, "pp": p,
            "virtual_stages": v, "micro_batches": micro_batches}


def _rounded(a):
    return [round(float(v), 6) for v in a]
