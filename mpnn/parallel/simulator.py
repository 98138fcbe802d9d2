"""Dry runs of a pipeline schedule: deadlocks, the stage x slot grid, the bubble.

``simulate(schedule)`` executes all stages of a schedule (``make_schedule``
of ``mpnn.parallel.pipeline_ir``: one action list per stage) in lock-step
time slots: one slot per Forward or Backward, communication is free, a
message sent in slot t can be received in slot t. It matches every send with
its receive by (source, destination, tag), as MPI does, checks the data
dependencies, and returns the stage x slot grid, idle slots, the bubble and
the peak live micro-batches per stage, or a deadlock report (``Stall``) naming
the stage, slot and stuck action of every stage that can never proceed.

``timeline(schedule, cost, latency, unit_bytes, overhead, start)`` runs the
same lists with real per-action costs, a latency per message between ranks,
the executor's overhead per action and each stage's start, and predicts
the step time (makespan), each rank's busy and idle time, the bubble, and the
peak live activations per rank, in micro-batches and (given the bytes one
micro-batch holds on each chunk) in bytes.

``expected_timeline`` averages ``timeline`` over costs drawn around their
means with their measured spread: a pipeline waits for the slower of two
neighbours, so jitter adds idle time that mean costs do not show.

Pure Python: no MPI, no NumPy.

See docs/parallelism.md#6-how-a-schedule-becomes-messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .pipeline_ir import COMPUTE, RECEIVES, SENDS, Kind, Pipe, ScheduleError

# what the simulator says about a message that has no neighbour to go to / come from
_NO_PEER = {Kind.SEND_ACT: "the last stage has no next stage to send activations to",
            Kind.SEND_GRAD: "the first stage has no previous stage to send gradients to",
            Kind.RECV_ACT: "the first stage has no previous stage to receive from",
            Kind.RECV_GRAD: "the last stage has no next stage to receive gradients from"}
_PAYLOAD = {Kind.SEND_ACT: "act", Kind.SEND_GRAD: "grad"}


@dataclass
class Stall:
    stage: int
    index: int  # position of the stuck action in the stage's list
    action: object

    def __str__(self):
        return f"stage {self.stage} stuck at action #{self.index} {self.action}"


@dataclass
class SimResult:
    p: int
    m: int
    grid: list  # grid[stage][slot] = compute action or None (idle)
    busy: list  # compute slots per stage
    peak_live: list  # most micro-batches with activations alive, per stage
    deadlock: Stall | None = None  # first stuck stage (None: ran to completion)
    stalls: list = field(default_factory=list)  # every stuck stage
    stall_slot: int | None = None  # the slot in which nothing could proceed

    @property
    def slots(self):
        return len(self.grid[0]) if self.grid else 0

    @property
    def idle(self):
        """Idle slots per stage (up to the makespan)."""
        return [self.slots - b for b in self.busy]

    @property
    def bubble(self):
        """Idle fraction of the p x slots grid."""
        total = self.p * self.slots
        return sum(self.idle) / total if total else 0.0

    @property
    def ok(self):
        return self.deadlock is None

    def render(self):
        """The stage x slot grid: ``F0 F1 B0 ...``, ``.`` idle, ``!RG0`` where it stalls."""
        cells = [[str(a) if a is not None else "." for a in row] for row in self.grid]
        if self.deadlock is not None:
            for row in cells:
                row.append(".")
            for st in self.stalls:
                cells[st.stage][-1] = f"!{st.action}"
        slot_width = len(str(len(cells[0]) - 1)) if cells and cells[0] else 1
        width = max([len(c) for row in cells for c in row] + [slot_width])
        n = len(cells[0]) if cells else 0
        lines = ["slot    " + " ".join(f"{t:>{width}}" for t in range(n))]
        for s, row in enumerate(cells):
            lines.append(f"stage {s:<2}" + " ".join(f"{c:>{width}}" for c in row))
        if self.deadlock is not None:
            lines.append(f"DEADLOCK at slot {self.stall_slot}: "
                         + "; ".join(map(str, self.stalls)))
        return "\n".join(lines)


def simulate(schedule, raise_on_deadlock=False):
    """Dry-run ``schedule`` (a list of per-rank action lists) in lock-step slots.

    In each slot every rank first runs its free actions (sends, receives
    whose message has been sent, STEP) until it reaches a compute action (F,
    B, W) or a receive whose message is not there yet; this is repeated over
    all ranks until nothing changes, so the result does not depend on the
    order ranks are visited. Then every rank at a compute action runs it (one
    slot); the others are idle. If in some slot no rank can do anything and
    not all are finished, the schedule is deadlocked: the result's
    ``deadlock``/``stalls`` name each stuck rank, its action and its index
    (``raise_on_deadlock`` raises ``ScheduleError`` with that report instead).

    The number of model chunks per rank is read from the actions. A micro-batch
    is alive on its rank from its F until its W (when the rank's list has one
    for it) or else its B: that is the peak the executor's counter reports.

    Malformed schedules (a Forward before its input arrived, a Backward
    before its Forward, a W before its B, a send nobody receives, ...) raise
    ``ScheduleError``.
    """
    p = len(schedule)
    units = [a for acts in schedule for a in acts if a.mb is not None]
    m = 1 + max([a.mb for a in units], default=-1)
    pipe = Pipe(p, 1 + max([a.chunk for a in units], default=0))
    split = [{(a.mb, a.chunk) for a in acts if a.kind is Kind.WEIGHT} for acts in schedule]
    chunks = [sorted({a.chunk for a in acts if a.mb is not None}) or [0] for acts in schedule]
    pc = [0] * p
    mailbox = {}  # (src, dst, tag) -> the send, until it is received
    arrived = {Kind.RECV_ACT: [set() for _ in range(p)],  # (mb, chunk) whose input is here
               Kind.RECV_GRAD: [set() for _ in range(p)]}  # ... whose dL/dout is here
    fwd_done = [set() for _ in range(p)]
    bwd_done = [set() for _ in range(p)]
    w_done = [set() for _ in range(p)]
    produced = {Kind.SEND_ACT: fwd_done, Kind.SEND_GRAD: bwd_done}
    live = [0] * p
    peak = [0] * p
    grid = [[] for _ in range(p)]
    busy = [0] * p

    def fail(s, msg):
        a = schedule[s][pc[s]]
        raise ScheduleError(f"stage {s}, action #{pc[s]} {a}: {msg}")

    def name(mb, chunk):
        return f"micro-batch {mb}" + (f" (chunk {chunk})" if chunk else "")

    def try_free(s):
        """Run rank s's next action if it is free and possible; True if it ran."""
        if pc[s] >= len(schedule[s]):
            return False
        a = schedule[s][pc[s]]
        if a.kind in SENDS:
            key = pipe.message(a, s)
            if key is None:
                fail(s, _NO_PEER[a.kind])
            if (a.mb, a.chunk) not in produced[a.kind][s]:
                fail(s, f"sends activations of {name(a.mb, a.chunk)} before its forward"
                     if a.kind is Kind.SEND_ACT else
                     f"sends the input gradient of {name(a.mb, a.chunk)} before its backward")
            mailbox[key] = a
        elif a.kind in RECEIVES:
            key = pipe.message(a, s)
            if key is None:
                fail(s, _NO_PEER[a.kind])
            if key not in mailbox:
                return False
            del mailbox[key]
            arrived[a.kind][s].add((a.mb, a.chunk))
        elif a.kind is Kind.STEP:
            expected = m * len(chunks[s])
            if len(bwd_done[s]) != expected or live[s]:
                fail(s, f"Step before every micro-batch's backward ran "
                        f"({len(bwd_done[s])} of {expected})")
        else:
            return False  # a compute action: runs in the compute phase
        pc[s] += 1
        return True

    def forward(s, unit):
        if unit in fwd_done[s]:
            fail(s, f"{name(*unit)} runs forward twice")
        if not pipe.is_first(s, unit[1]) and unit not in arrived[Kind.RECV_ACT][s]:
            fail(s, f"forward of {name(*unit)} before its activations were received")
        fwd_done[s].add(unit)
        live[s] += 1
        peak[s] = max(peak[s], live[s])

    def backward(s, unit):
        if unit not in fwd_done[s] or unit in bwd_done[s]:
            fail(s, f"backward of {name(*unit)} without a pending forward")
        if not pipe.is_last(s, unit[1]) and unit not in arrived[Kind.RECV_GRAD][s]:
            fail(s, f"backward of {name(*unit)} before its gradient was received")
        bwd_done[s].add(unit)
        if unit not in split[s]:
            live[s] -= 1

    def weight(s, unit):
        if unit not in bwd_done[s] or unit in w_done[s]:
            fail(s, f"weight gradient of {name(*unit)} without a pending backward")
        w_done[s].add(unit)
        live[s] -= 1

    run_compute = {Kind.FORWARD: forward, Kind.BACKWARD: backward, Kind.WEIGHT: weight}

    slot = 0
    while True:
        progress = True
        while progress:  # free actions to a fixed point, over all ranks
            progress = False
            for s in range(p):
                while try_free(s):
                    progress = True
        ready = [s for s in range(p) if pc[s] < len(schedule[s])
                 and schedule[s][pc[s]].kind in COMPUTE]
        if not ready:
            stuck = [Stall(s, pc[s], schedule[s][pc[s]]) for s in range(p)
                     if pc[s] < len(schedule[s])]
            if stuck:
                res = SimResult(p, m, grid, busy, peak, stuck[0], stuck, slot)
                if raise_on_deadlock:
                    raise ScheduleError(f"deadlock at slot {slot}: "
                                        f"{'; '.join(map(str, stuck))}\n{res.render()}")
                return res
            break
        for s in range(p):
            if s in ready:
                a = schedule[s][pc[s]]
                run_compute[a.kind](s, (a.mb, a.chunk))
                pc[s] += 1
                grid[s].append(a)
                busy[s] += 1
            else:
                grid[s].append(None)
        slot += 1
    if mailbox:
        what, src, dst, mb = min((_PAYLOAD[a.kind], src, dst, a.mb)
                                 for (src, dst, _), a in mailbox.items())
        raise ScheduleError(f"stage {src} sends {what} of micro-batch {mb} to stage {dst}, "
                            f"which never receives it")
    for s in range(p):
        expected = {(mb, c) for mb in range(m) for c in chunks[s]}
        missing = sorted({mb for mb, _ in expected - bwd_done[s]})
        if missing:
            raise ScheduleError(f"stage {s} never runs the backward of micro-batch(es) {missing}")
        pending = sorted(split[s] - w_done[s])
        if pending:
            raise ScheduleError(f"stage {s} never runs the weight gradient of {pending}")
    return SimResult(p, m, grid, busy, peak)


@dataclass
class Timeline:
    """Times of a schedule run with real (non-unit) costs; see ``timeline``.

    Per rank: ``busy`` and ``idle`` seconds (idle up to the makespan), ``peak_live``
    micro-batches alive at once and, given ``unit_bytes``, ``peak_bytes``.
    """

    busy: list  # compute time per stage
    finish: list  # when each stage runs its last action
    starts: list  # starts[stage] = [(start, end, action), ...] of its compute actions
    peak_live: list = field(default_factory=list)  # most (mb, chunk) alive at once, per rank
    peak_bytes: list | None = None  # most activation bytes alive at once (given unit_bytes)
    latency: float = 0.0  # seconds each message between ranks took
    overhead: list | None = None  # per rank: seconds charged between its actions
    start: list | None = None  # per rank: when it began the step

    @property
    def makespan(self):
        """The predicted step time: when the last rank finishes."""
        return max(self.finish) if self.finish else 0.0

    @property
    def idle(self):
        """Idle (waiting) seconds per rank up to the makespan: neither computing
        nor spending the executor's overhead."""
        zeros = [0.0] * len(self.busy)
        return [max(0.0, self.makespan - b - o - t0) for b, o, t0
                in zip(self.busy, self.overhead or zeros, self.start or zeros, strict=True)]

    @property
    def bubble(self):
        """Idle over idle plus busy, summed over the ranks: what ``mpnn.train``
        measures (without overhead: 1 − Σ busy / (p · makespan))."""
        idle = sum(self.idle)
        total = idle + sum(self.busy)
        return idle / total if total else 0.0


def timeline(schedule, cost, latency=0.0, unit_bytes=None, overhead=None, start=None):
    """Run ``schedule`` with ``cost(stage, action)`` seconds per compute action (F, B, W).

    Sends are free and non-blocking; a message between ranks moves once both
    sides are at it and then takes ``latency`` seconds: the receive completes
    at max(its stage's clock, the send's time) + latency. That is how MPI
    without an asynchronous progress thread behaves (MPICH's shared-memory
    path copies a large message inside the receiver's Wait), and what
    ``mpnn.train`` measures: every receive costs its copy, even of a message
    sent long before. A message between two chunks of one rank is free. Each
    stage runs its actions in order, from ``start[stage]`` (default 0): every
    time is fixed by those dependencies, so the stages can be advanced in any
    order. With unit cost and no latency this gives the same bubble as
    ``simulate``; with measured per-stage costs it predicts the step time and
    bubble of an unbalanced pipeline. ``cost`` is asked about the action as the
    schedule has it: a B is only dL/d(input) where the rank's list has a W for
    its (mb, chunk), else the whole backward. ``overhead[stage]`` seconds
    (default none) follow each compute action on that stage: the executor's
    own time between actions (dispatch, posting messages), measured by
    ``mpnn.train`` as ``action_overhead_s``; it delays what follows but is
    neither busy nor idle.

    Memory: a (mb, chunk) is alive on its rank from its F until its W if the
    rank's list has one for it, else its B (the rule ``simulate`` counts by).
    The result's ``peak_live`` is the most alive at once per rank; with
    ``unit_bytes(rank, chunk)``, the bytes one micro-batch keeps on that chunk
    (its activations, from F until the last backward action), ``peak_bytes``
    is the most bytes alive at once per rank. Both depend only on each rank's
    order, not on the costs. Raises ScheduleError if the schedule deadlocks
    (``simulate`` gives the detailed report).
    """
    p = len(schedule)
    pipe = Pipe(p, 1 + max([a.chunk for acts in schedule for a in acts], default=0))
    split = [{(a.mb, a.chunk) for a in acts if a.kind is Kind.WEIGHT} for acts in schedule]
    pc, busy, spent = [0] * p, [0.0] * p, [0.0] * p
    clock = [float(t) for t in start] if start is not None else [0.0] * p
    extra = [float(x) for x in overhead] if overhead is not None else [0.0] * p
    live, peak = [0] * p, [0] * p
    held, peak_bytes = [0] * p, [0] * p
    starts = [[] for _ in range(p)]
    sent = {}  # (src, dst, tag) -> when it arrives at dst
    progress = True
    while progress:
        progress = False
        for s in range(p):
            while pc[s] < len(schedule[s]):
                a = schedule[s][pc[s]]
                if a.kind in SENDS:
                    key = pipe.message(a, s)
                    sent[key] = clock[s]
                elif a.kind in RECEIVES:
                    key = pipe.message(a, s)
                    if key not in sent:
                        break
                    moved = latency if key[0] != key[1] else 0.0
                    clock[s] = max(clock[s], sent.pop(key)) + moved
                elif a.kind in COMPUTE:
                    d = float(cost(s, a))
                    starts[s].append((clock[s], clock[s] + d, a))
                    clock[s] += d + extra[s]
                    busy[s] += d
                    spent[s] += extra[s]
                    size = unit_bytes(s, a.chunk) if unit_bytes is not None else 0
                    if a.kind is Kind.FORWARD:
                        live[s] += 1
                        held[s] += size
                        peak[s] = max(peak[s], live[s])
                        peak_bytes[s] = max(peak_bytes[s], held[s])
                    elif a.kind is Kind.WEIGHT or (a.mb, a.chunk) not in split[s]:  # last
                        live[s] -= 1
                        held[s] -= size
                pc[s] += 1
                progress = True
    stuck = [Stall(s, pc[s], schedule[s][pc[s]]) for s in range(p) if pc[s] < len(schedule[s])]
    if stuck:
        raise ScheduleError("deadlock: " + "; ".join(map(str, stuck)))
    return Timeline(busy, clock, starts, peak, peak_bytes if unit_bytes is not None else None,
                    float(latency), spent if overhead is not None else None,
                    [float(t) for t in start] if start is not None else None)


def expected_timeline(schedule, cost, spread, draws=200, seed=0, jitter=None, **kwargs):
    """The mean bubble and makespan of ``timeline`` over ``draws`` seeded runs.

    In each run stage s is slowed by a factor ``max(0, N(1, jitter[s]²))``
    shared by all its actions (default 1: none), and every compute action
    costs that factor times ``max(0, N(cost(stage, action), spread(stage,
    action)²))`` seconds, drawn independently. A pipeline waits for the
    slower of two neighbours, so both kinds of variation add idle time that
    mean costs do not show; the shared one adds more, because it does not
    average out over a step's actions. The same answer every time (seeded).
    Returns (bubble, makespan); with zero spread and jitter, ``timeline``'s.
    """
    import random

    rng = random.Random(seed)
    shared = list(jitter) if jitter is not None else [0.0] * len(schedule)
    bubbles, spans = [], []
    for _ in range(draws):
        scale = [max(0.0, rng.gauss(1.0, j)) for j in shared]

        def drawn(s, a, scale=scale):
            return scale[s] * max(0.0, rng.gauss(cost(s, a), spread(s, a)))
        tl = timeline(schedule, drawn, **kwargs)
        bubbles.append(tl.bubble)
        spans.append(tl.makespan)
    return sum(bubbles) / draws, sum(spans) / draws
