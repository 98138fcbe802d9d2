"""A pipeline stage's times per epoch: what the engine clocks, and the epoch record's figures.

``PipelineEngine`` adds into a ``StageClock`` the seconds of every F, B and W it
runs (per model chunk), of every wait for a message (idle) and of the gradient
sync. Once per epoch ``gather_stage_times`` gathers every rank's clock over the
grid, averages each stage over its replicas, and returns what ``mpnn.train
--metrics`` records: busy / idle / sync seconds per stage, the measured bubble,
and ``action_costs_s`` (the mean seconds of one F, B and W on each rank and
chunk) and ``message_latency_s`` (what one receive costs: the median of the
receives whose message had arrived), which ``python -m mpnn.schedule --costs-from`` reads to
predict this pipeline's bubble.
"""

from __future__ import annotations

import math
import time

import numpy as np

KINDS = "FBW"  # the compute actions: forward, backward (dL/dx), weight gradient


class StageClock:
    """Seconds of this rank's stage since the last ``take``.

    busy        kind ("F" | "B" | "W") -> seconds of every such action
    idle_s      waiting for a message (a receive, a send's buffer) or for the
                other stages at the step's end
    sync_s      the gradient allreduce over replicas
    step_s      whole training steps (``PipelineEngine.train_step``), so that
                what is none of the above is known: the executor's own
                overhead (dispatch, posting receives and sends, the copies
                into MPI's buffers)
    cost        kind -> per chunk [seconds, squared seconds, count] of that
                kind's actions (their mean and spread)
    gaps        seconds between one step's end and the next one's start: the
                loop's work (optimizer, guards, reading the batch), which
                delays this stage's first action
    receives    seconds of every receive that had to wait (also in idle_s)
    copies      seconds of every receive whose message had arrived (also in
                idle_s): what taking a message costs
    step_busy   compute seconds of every step: their spread beyond what the
                actions' own spreads explain is a slowdown shared by all the
                actions of a step (the machine busy elsewhere)
    """

    def __init__(self, chunks):
        self.chunks = int(chunks)
        self._reset()

    def _reset(self):
        self.busy = dict.fromkeys(KINDS, 0.0)
        self.idle_s = self.sync_s = self.step_s = 0.0
        self.cost = {k: [[0.0, 0.0, 0] for _ in range(self.chunks)] for k in KINDS}
        self.gaps, self._ended, self.step_busy = [], None, []
        self.receives, self.copies = [], []  # waits; receives that found their message
        self._busy_before = 0.0

    def timed(self, kind, chunk, t0):
        """One F, B or W on ``chunk`` that started at ``time.perf_counter()`` ``t0``."""
        seconds = time.perf_counter() - t0
        self.busy[kind] += seconds
        cell = self.cost[kind][chunk]
        cell[0] += seconds
        cell[1] += seconds * seconds
        cell[2] += 1

    def step(self, start, end):
        """A training step ran from ``start`` to ``end`` (``time.perf_counter()``)."""
        self.step_s += end - start
        if self._ended is not None:
            self.gaps.append(start - self._ended)
        self._ended = end
        busy = sum(self.busy.values())
        self.step_busy.append(busy - self._busy_before)
        self._busy_before = busy

    def received(self, seconds, arrived):
        """A receive took ``seconds``; ``arrived``: its first Test completed it (the
        message had been sent, and the time is only its copy)."""
        self.idle_s += seconds
        (self.copies if arrived else self.receives).append(seconds)

    def _jitter(self, cells, spread):
        steps = len(self.step_busy)
        if steps < 2:
            return 0.0
        per_step = np.array(self.step_busy)
        independent = sum((n / steps) * sd * sd for (_, _, n), sd in zip(cells, spread,
                                                                          strict=True))
        common = max(0.0, float(per_step.var()) - independent)
        return math.sqrt(common) / float(per_step.mean()) if per_step.mean() > 0 else 0.0

    def take(self):
        """[forward, backward, weight, idle, sync seconds, the overhead per compute
        action, the mean gap between steps, the receive cost, the lower quartile
        of the receives that waited, the step jitter, then the mean seconds of
        one F on each chunk, of one B, of one W, then their standard deviations
        (0 where none ran)] (10 + 6V,); restarts.

        The mean gap leaves out gaps over ten times the median (a checkpoint's).
        The step jitter is the relative standard deviation of a slowdown common
        to all of a step's actions: √(Var(step busy) − Σ actions' variances) /
        mean step busy (0 when independent actions explain the spread).

        The receive cost is the median time of the receives whose message had
        arrived (their first ``Test`` completed them): MPI without an
        asynchronous progress thread moves a large message inside the
        receiver's call, so even a message sent long before costs its copy
        there (a ping-pong, both sides inside MPI and copying at once,
        measures a third of it on the development machine); 0 when every
        receive waited (a stage always behind its neighbour).

        overhead per action = (step − busy − idle − sync) / compute actions: the
        executor's time between actions, spread evenly over them, which is how
        the simulator charges it (``simulator.timeline``'s ``overhead``)."""
        cells = [cell for k in KINDS for cell in self.cost[k]]
        means = [t / n if n else 0.0 for t, _, n in cells]
        spread = [math.sqrt(max(0.0, t2 / n - (t / n) ** 2)) if n else 0.0 for t, t2, n in cells]
        busy = sum(self.busy.values())
        actions = sum(n for _, _, n in cells)
        rest = max(0.0, self.step_s - busy - self.idle_s - self.sync_s)
        gaps = np.array(self.gaps)
        gap = float(gaps[gaps <= 10 * np.median(gaps)].mean()) if gaps.size else 0.0
        copy = float(np.median(self.copies)) if self.copies else 0.0
        wait = float(np.percentile(self.receives, 25)) if self.receives else 0.0
        row = [*(self.busy[k] for k in KINDS), self.idle_s, self.sync_s,
               rest / actions if actions else 0.0, gap, copy, wait,
               self._jitter(cells, spread), *means, *spread]
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
    chunk, ``action_costs_std_s``: their standard deviations,
    ``action_overhead_s``: the executor's seconds between actions per compute
    action on each rank (``StageClock.take``), ``step_start_s``: how much later
    than the earliest each stage starts a step (its mean gap between steps,
    relative), ``step_jitter``: each stage's slowdown shared by a step's
    actions (``StageClock.take``), and ``message_latency_s``: the cost of one
    receive whose message had arrived, averaged over the ranks that had such
    receives, with the pipeline's keys
    (``schedule``, ``pp``, ``virtual_stages``, ``micro_batches``) that
    ``python -m mpnn.schedule --costs-from`` reads.
    """
    v = clock.chunks
    mine = np.array([stage, *clock.take()], dtype=np.float64)
    every = np.empty((world.Get_size(), mine.size), dtype=np.float64)
    world.Allgather(mine, every)
    sums, count = np.zeros((p, mine.size - 1)), np.zeros((p, 1))
    for row in every:
        sums[int(row[0])] += row[1:]
        count[int(row[0])] += 1
    # one receive's cost: from the ranks whose messages had arrived, else (every
    # receive waited) the shortest waits, an upper bound
    copies, waits = every[:, 8][every[:, 8] > 0], every[:, 9][every[:, 9] > 0]
    latency = float(copies.mean()) if copies.size else float(waits.mean()) if waits.size else 0.0
    means = sums / count  # (p, 10 + 6v)
    fwd, bwd, wgt, idle, sync, overhead, gap, _, _, jitter = means[:, :10].T
    busy = fwd + bwd + wgt
    total = busy.sum() + idle.sum()
    per = means[:, 10:10 + 3 * v].reshape(p, 3, v)  # (p, kind, chunk)
    spread = means[:, 10 + 3 * v:].reshape(p, 3, v)  # replicas' spreads averaged
    return {"stage_busy_s": _rounded(busy), "stage_idle_s": _rounded(idle),
            "stage_sync_s": _rounded(sync), "stage_forward_s": _rounded(fwd),
            "stage_backward_s": _rounded(bwd), "stage_weight_s": _rounded(wgt),
            "bubble": float(idle.sum() / total) if total else 0.0,
            "action_costs_s": {k: [[round(float(x), 9) for x in per[r, j]]
                                   for r in range(p)] for j, k in enumerate(KINDS)},
            "action_costs_std_s": {k: [[round(float(x), 9) for x in spread[r, j]]
                                       for r in range(p)] for j, k in enumerate(KINDS)},
            "action_overhead_s": [round(float(x), 9) for x in overhead],
            "step_start_s": _relative_starts(gap),
            "step_jitter": [round(float(x), 6) for x in jitter],
            "message_latency_s": round(latency, 9), "schedule": schedule, "pp": p,
            "virtual_stages": v, "micro_batches": micro_batches}


def _relative_starts(gaps):
    """Each stage's first action after the step's start, relative to the earliest
    stage: its mean gap between steps minus the smallest (the stages leave
    the previous step together, from the step-end Barrier)."""
    low = float(np.min(gaps)) if len(gaps) else 0.0
    return [round(float(g) - low, 9) for g in gaps]


def _rounded(a):
    return [round(float(v), 6) for v in a]
