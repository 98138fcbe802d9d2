"""Pipeline schedules as data, and a dry-run simulator that checks them.

A schedule is, for each of the ``p`` stages, the list of actions that stage
runs in order during one training step of ``m`` micro-batches. Actions are
small frozen dataclasses with a compact printed form::

    F3   Forward(3)      run this stage's layers on micro-batch 3
    B3   Backward(3)     backprop micro-batch 3 through this stage
    SA3  SendAct(3)      send micro-batch 3's output activations to stage s+1
    RA3  RecvAct(3)      receive micro-batch 3's input activations from stage s-1
    SG3  SendGrad(3)     send dL/d(input) of micro-batch 3 to stage s-1
    RG3  RecvGrad(3)     receive dL/d(output) of micro-batch 3 from stage s+1
    STEP Step()          gradients are final: sum them across replicas

Sends are non-blocking (``Isend``): they never wait. Receives wait for the
matching send. The three schedules:

    naive  one micro-batch at a time through the whole pipe, forward then
           backward, before the next one enters: no overlap at all.
    gpipe  all m forwards, then all m backwards (GPipe): every stage keeps the
           activations of all m micro-batches alive.
    1f1b   PipeDream-Flush: stage i runs min(p-i-1, m) warm-up forwards, then
           alternates one forward / one backward, then drains the backwards.
           Same bubble as GPipe, but at most min(p-i, m) micro-batches alive.

For GPipe and 1F1B with unit-cost forward and backward the step takes
``2(m + p - 1)`` slots of which each stage is busy ``2m``, so the bubble
(idle fraction) is ``(p - 1) / (m + p - 1)``.

``simulate(schedule)`` executes all stages in lock-step time slots (one slot
per Forward or Backward; communication is free; a message sent in slot t can
be received in slot t), matches every send with its receive, checks the data
dependencies, and returns the stage x slot grid, idle slots, the bubble and
the peak live micro-batches per stage, or a ``Deadlock`` report naming the
stage, slot and stuck action of every stage that can never proceed.
Pure Python: no MPI, no NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# ------------------------------------------------------------------ actions


@dataclass(frozen=True)
class Forward:
    mb: int

    def __str__(self):
        return f"F{self.mb}"


@dataclass(frozen=True)
class Backward:
    mb: int

    def __str__(self):
        return f"B{self.mb}"


@dataclass(frozen=True)
class SendAct:
    mb: int

    def __str__(self):
        return f"SA{self.mb}"


@dataclass(frozen=True)
class RecvAct:
    mb: int

    def __str__(self):
        return f"RA{self.mb}"


@dataclass(frozen=True)
class SendGrad:
    mb: int

    def __str__(self):
        return f"SG{self.mb}"


@dataclass(frozen=True)
class RecvGrad:
    mb: int

    def __str__(self):
        return f"RG{self.mb}"


@dataclass(frozen=True)
class Step:
    def __str__(self):
        return "STEP"


COMPUTE = (Forward, Backward)
_PARSE = {"F": Forward, "B": Backward, "SA": SendAct, "RA": RecvAct,
          "SG": SendGrad, "RG": RecvGrad}


def format_actions(actions):
    """'RA0 F0 SA0 ...': the compact printed form of one stage's list."""
    return " ".join(map(str, actions))


def parse_actions(text):
    """Inverse of ``format_actions`` (handy for writing schedules in tests)."""
    out = []
    for tok in text.split():
        if tok == "STEP":
            out.append(Step())
            continue
        head = tok.rstrip("0123456789")
        if head not in _PARSE or head == tok:
            raise ValueError(f"cannot parse action {tok!r}: expected one of "
                             f"{', '.join(k + '<mb>' for k in _PARSE)} or STEP")
        out.append(_PARSE[head](int(tok[len(head):])))
    return out


# ---------------------------------------------------------------- schedules


def _check(p, m):
    if p < 1 or m < 1:
        raise ValueError(f"a schedule needs at least one stage and one micro-batch "
                         f"(got p={p}, m={m})")


def _fwd(stage, p, mb):
    """The actions of one forward on ``stage``: receive input, compute, send output."""
    return ([RecvAct(mb)] if stage > 0 else []) + [Forward(mb)] + \
           ([SendAct(mb)] if stage < p - 1 else [])


def _bwd(stage, p, mb):
    """The actions of one backward on ``stage``: receive dL/dout, compute, send dL/din."""
    return ([RecvGrad(mb)] if stage < p - 1 else []) + [Backward(mb)] + \
           ([SendGrad(mb)] if stage > 0 else [])


def naive(p, m):
    """One micro-batch at a time: forward through all stages, backward back, next."""
    _check(p, m)
    return [[a for mb in range(m) for a in _fwd(s, p, mb) + _bwd(s, p, mb)] + [Step()]
            for s in range(p)]


def gpipe(p, m):
    """GPipe: all m forwards, then all m backwards (in micro-batch order)."""
    _check(p, m)
    return [[a for mb in range(m) for a in _fwd(s, p, mb)]
            + [a for mb in range(m) for a in _bwd(s, p, mb)] + [Step()]
            for s in range(p)]


def one_f_one_b(p, m):
    """1F1B (PipeDream-Flush): warm-up forwards, steady one-forward-one-backward, drain.

    Stage s runs w = min(p-s-1, m) warm-up forwards; then for each remaining
    micro-batch a forward of micro-batch w+k followed by the backward of k;
    then the w outstanding backwards.
    """
    _check(p, m)
    stages = []
    for s in range(p):
        w = min(p - s - 1, m)
        acts = [a for mb in range(w) for a in _fwd(s, p, mb)]
        for k in range(m - w):
            acts += _fwd(s, p, w + k) + _bwd(s, p, k)
        acts += [a for mb in range(m - w, m) for a in _bwd(s, p, mb)]
        stages.append(acts + [Step()])
    return stages


SCHEDULES = {"naive": naive, "gpipe": gpipe, "1f1b": one_f_one_b}


def make_schedule(name, p, m):
    """Every stage's action list of schedule ``name`` (see ``SCHEDULES``)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](p, m)


def analytic_bubble(p, m):
    """Idle fraction of GPipe and 1F1B with unit-cost forward and backward."""
    return (p - 1) / (m + p - 1)


# ---------------------------------------------------------------- simulator


class ScheduleError(ValueError):
    """A schedule that is malformed (a dependency broken, a message unmatched)."""


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
        width = max([len(c) for row in cells for c in row] + [len(str(len(cells[0]) - 1)) if cells and cells[0] else 1])
        n = len(cells[0]) if cells else 0
        lines = ["slot    " + " ".join(f"{t:>{width}}" for t in range(n))]
        for s, row in enumerate(cells):
            lines.append(f"stage {s:<2}" + " ".join(f"{c:>{width}}" for c in row))
        if self.deadlock is not None:
            lines.append(f"DEADLOCK at slot {self.stall_slot}: "
                         + "; ".join(map(str, self.stalls)))
        return "\n".join(lines)


def simulate(schedule, raise_on_deadlock=False):
    """Dry-run ``schedule`` (a list of per-stage action lists) in lock-step slots.

    In each slot every stage first runs its free actions (sends, receives
    whose message has been sent, Step) until it reaches a Forward/Backward
    or a receive whose message is not there yet; this is repeated over all
    stages until nothing changes, so the result does not depend on the order
    stages are visited. Then every stage at a Forward/Backward runs it (one
    slot); the others are idle. If in some slot no stage can do anything and
    not all are finished, the schedule is deadlocked: the result's
    ``deadlock``/``stalls`` name each stuck stage, its action and its index
    (``raise_on_deadlock`` raises ``ScheduleError`` with that report instead).

    Malformed schedules (a Forward before its input arrived, a Backward
    before its Forward, a send nobody receives, ...) raise ``ScheduleError``.
    """
    p = len(schedule)
    m = 1 + max([a.mb for acts in schedule for a in acts if hasattr(a, "mb")], default=-1)
    pc = [0] * p
    mailbox = set()  # (kind, src, dst, mb) sent but not yet received
    have_act = [set() for _ in range(p)]  # micro-batches whose input is here
    have_grad = [set() for _ in range(p)]  # micro-batches whose dL/dout is here
    fwd_done = [set() for _ in range(p)]
    bwd_done = [set() for _ in range(p)]
    live = [0] * p
    peak = [0] * p
    grid = [[] for _ in range(p)]
    busy = [0] * p

    def fail(s, msg):
        a = schedule[s][pc[s]]
        raise ScheduleError(f"stage {s}, action #{pc[s]} {a}: {msg}")

    def try_free(s):
        """Run stage s's next action if it is free and possible; True if it ran."""
        if pc[s] >= len(schedule[s]):
            return False
        a = schedule[s][pc[s]]
        if isinstance(a, SendAct):
            if s == p - 1:
                fail(s, "the last stage has no next stage to send activations to")
            if a.mb not in fwd_done[s]:
                fail(s, f"sends activations of micro-batch {a.mb} before its forward")
            mailbox.add(("act", s, s + 1, a.mb))
        elif isinstance(a, SendGrad):
            if s == 0:
                fail(s, "the first stage has no previous stage to send gradients to")
            if a.mb not in bwd_done[s]:
                fail(s, f"sends the input gradient of micro-batch {a.mb} before its backward")
            mailbox.add(("grad", s, s - 1, a.mb))
        elif isinstance(a, RecvAct):
            if s == 0:
                fail(s, "the first stage has no previous stage to receive from")
            key = ("act", s - 1, s, a.mb)
            if key not in mailbox:
                return False
            mailbox.remove(key)
            have_act[s].add(a.mb)
        elif isinstance(a, RecvGrad):
            if s == p - 1:
                fail(s, "the last stage has no next stage to receive gradients from")
            key = ("grad", s + 1, s, a.mb)
            if key not in mailbox:
                return False
            mailbox.remove(key)
            have_grad[s].add(a.mb)
        elif isinstance(a, Step):
            if len(bwd_done[s]) != m or live[s]:
                fail(s, f"Step before every micro-batch's backward ran "
                        f"({len(bwd_done[s])} of {m})")
        else:
            return False  # a compute action: runs in the compute phase
        pc[s] += 1
        return True

    def run_compute(s, a):
        if isinstance(a, Forward):
            if a.mb in fwd_done[s]:
                fail(s, f"micro-batch {a.mb} runs forward twice")
            if s > 0 and a.mb not in have_act[s]:
                fail(s, f"forward of micro-batch {a.mb} before its activations were received")
            fwd_done[s].add(a.mb)
            live[s] += 1
            peak[s] = max(peak[s], live[s])
        else:
            if a.mb not in fwd_done[s] or a.mb in bwd_done[s]:
                fail(s, f"backward of micro-batch {a.mb} without a pending forward")
            if s < p - 1 and a.mb not in have_grad[s]:
                fail(s, f"backward of micro-batch {a.mb} before its gradient was received")
            bwd_done[s].add(a.mb)
            live[s] -= 1

    slot = 0
    while True:
        progress = True
        while progress:  # free actions to a fixed point, over all stages
            progress = False
            for s in range(p):
                while try_free(s):
                    progress = True
        ready = [s for s in range(p) if pc[s] < len(schedule[s])
                 and isinstance(schedule[s][pc[s]], COMPUTE)]
        if not ready:
            stuck = [Stall(s, pc[s], schedule[s][pc[s]]) for s in range(p)
                     if pc[s] < len(schedule[s])]
            if stuck:
                res = SimResult(p, m, grid, busy, peak, stuck[0], stuck, slot)
                if raise_on_deadlock:
                    raise ScheduleError("deadlock at slot %d: %s\n%s" % (
                        slot, "; ".join(map(str, stuck)), res.render()))
                return res
            break
        for s in range(p):
            if s in ready:
                a = schedule[s][pc[s]]
                run_compute(s, a)
                pc[s] += 1
                grid[s].append(a)
                busy[s] += 1
            else:
                grid[s].append(None)
        slot += 1
    if mailbox:
        kind, src, dst, mb = sorted(mailbox)[0]
        raise ScheduleError(f"stage {src} sends {kind} of micro-batch {mb} to stage {dst}, "
                            f"which never receives it")
    for s in range(p):
        missing = sorted(set(range(m)) - bwd_done[s])
        if missing:
            raise ScheduleError(f"stage {s} never runs the backward of micro-batch(es) {missing}")
    return SimResult(p, m, grid, busy, peak)


@dataclass
class Timeline:
    """Times of a schedule run with real (non-unit) costs; see ``timeline``."""

    busy: list  # compute time per stage
    finish: list  # when each stage runs its last action
    starts: list  # starts[stage] = [(start, end, action), ...] of its compute actions

    @property
    def makespan(self):
        return max(self.finish) if self.finish else 0.0

    @property
    def bubble(self):
        p, total = len(self.busy), self.makespan
        return 1.0 - sum(self.busy) / (p * total) if total else 0.0


def timeline(schedule, cost):
    """Run ``schedule`` with ``cost(stage, action)`` seconds per Forward/Backward.

    Sends are free and non-blocking, a receive completes when its message was
    sent, each stage runs its actions in order: every time is fixed by those
    dependencies, so the stages can be advanced in any order. With unit cost
    this gives the same bubble as ``simulate``; with measured per-stage costs
    it predicts the bubble of an unbalanced pipeline. Raises ScheduleError if
    the schedule deadlocks (``simulate`` gives the detailed report).
    """
    p = len(schedule)
    pc, clock, busy = [0] * p, [0.0] * p, [0.0] * p
    starts = [[] for _ in range(p)]
    sent = {}
    progress = True
    while progress:
        progress = False
        for s in range(p):
            while pc[s] < len(schedule[s]):
                a = schedule[s][pc[s]]
                if isinstance(a, SendAct):
                    sent["act", s + 1, a.mb] = clock[s]
                elif isinstance(a, SendGrad):
                    sent["grad", s - 1, a.mb] = clock[s]
                elif isinstance(a, (RecvAct, RecvGrad)):
                    key = ("act" if isinstance(a, RecvAct) else "grad", s, a.mb)
                    if key not in sent:
                        break
                    clock[s] = max(clock[s], sent.pop(key))
                elif isinstance(a, COMPUTE):
                    d = float(cost(s, a))
                    starts[s].append((clock[s], clock[s] + d, a))
                    clock[s] += d
                    busy[s] += d
                pc[s] += 1
                progress = True
    stuck = [Stall(s, pc[s], schedule[s][pc[s]]) for s in range(p) if pc[s] < len(schedule[s])]
    if stuck:
        raise ScheduleError("deadlock: " + "; ".join(map(str, stuck)))
    return Timeline(busy, clock, starts)
