"""Pipeline schedules: which compute runs when, on every rank (no messages yet).

A schedule returns each rank's *compute order*: its F, B (and W) actions in the
order it runs them. ``make_schedule`` lowers that to the full action lists
(``pipeline_ir.add_communication`` inserts the sends and receives, STEP ends
each list), which the simulator checks and the executor runs.

    naive             one micro-batch at a time through the whole pipe; no overlap
    gpipe             all m forwards, then all m backwards: m micro-batches alive
    1f1b              PipeDream-Flush: p-s-1 warm-up forwards on stage s, then one
                      forward / one backward, then the drain; at most p-s alive
    interleaved-1f1b  Megatron-LM's interleaved 1F1B: every rank holds V model
                      chunks (stage g = chunk·p + rank, layers cut into p·V stages),
                      micro-batches go round the ring V times in groups of p; the
                      bubble shrinks V-fold. Needs m divisible by p.
    zb-h1             zero bubble (Qi et al. 2024, "Zero Bubble Pipeline
                      Parallelism"), handcrafted schedule 1: the backward split into
                      B (dL/d input, what the previous stage waits for) and W (the
                      weight gradients, which nobody waits for); deferred W's fill
                      the drain. 1F1B's in-flight activations: p-s micro-batches
                      between F and B on stage s.
    zb-h2             zero bubble schedule 2: more warm-up forwards (up to 2(p-s)-1
                      between F and B) fill the warm-up bubble as well, so no stage
                      idles in the steady state.

Memory, honestly counted: in an MLP a deferred W needs the layer inputs and
dL/dz, as much as the activations themselves, so the simulator and the executor
count a micro-batch alive from its F until its W. Both zero-bubble schedules
defer at most p-1 W's: their peak is p-s + p-1 on stage s for ZB-H1 (1F1B: p-s),
more for ZB-H2.

The zero-bubble orders are built by list scheduling in unit time slots (F, B and
W one slot each, a message there one slot after it was sent): each slot a stage
runs the oldest B it can (it is on the critical path), else the next F if its
input is here and the memory limit allows, else its oldest pending W. That is
the paper's construction with its memory limits; ``simulator.simulate`` then
confirms the bubble: with equal F, B and W, ZB-H1 idles (p-1)(F+B-W) per stage,
a third of 1F1B's (p-1)(F+B+W) (its B does both), which is also the least any
schedule of one step can: stage p-1 cannot start before p-1 forwards have
passed. ZB-H2 ties it with unit costs and gains when F is cheaper than B + W.

Bubbles with unit costs (the simulator reproduces them; tested):

    gpipe, 1f1b         (p - 1) / (m + p - 1)
    interleaved-1f1b    (p - 1) / (V·m + p - 1)
    naive               (p - 1) / p

Pure Python: no MPI, no NumPy.

See docs/parallelism.md#6-how-a-schedule-becomes-messages.
"""

from __future__ import annotations

from .pipeline_ir import STEP, Action, Kind, add_communication


class ScheduleConfigError(ValueError):
    """A schedule asked for with a shape it cannot run; says what would fit."""


def _F(mb, chunk=0):
    return Action(Kind.FORWARD, mb, chunk)


def _B(mb, chunk=0):
    return Action(Kind.BACKWARD, mb, chunk)


def _W(mb, chunk=0):
    return Action(Kind.WEIGHT, mb, chunk)


# ------------------------------------------------------------------ the schedules


def naive(p, m, v=1):
    """One micro-batch at a time: forward through all stages, backward back, next."""
    return [[a for mb in range(m) for a in (_F(mb), _B(mb))] for _ in range(p)]


def gpipe(p, m, v=1):
    """GPipe: all m forwards, then all m backwards (in micro-batch order)."""
    return [[_F(mb) for mb in range(m)] + [_B(mb) for mb in range(m)] for _ in range(p)]


def one_f_one_b(p, m, v=1):
    """1F1B (PipeDream-Flush): warm-up forwards, steady one-forward-one-backward, drain.

    Stage s runs w = min(p-s-1, m) warm-up forwards; then for each remaining
    micro-batch a forward of micro-batch w+k followed by the backward of k;
    then the w outstanding backwards.
    """
    stages = []
    for s in range(p):
        w = min(p - s - 1, m)
        order = [_F(mb) for mb in range(w)]
        for k in range(m - w):
            order += [_F(w + k), _B(k)]
        order += [_B(mb) for mb in range(m - w, m)]
        stages.append(order)
    return stages


def interleaved_1f1b(p, m, v=2):
    """Megatron-LM's interleaved 1F1B over ``v`` chunks per rank.

    Rank r's k-th forward is micro-batch ``(k // pv)·p + k % p`` through chunk
    ``(k // p) % v`` (groups of p micro-batches go through chunk 0, then chunk
    1, ...); its k-th backward is the same micro-batch through chunk
    ``v - 1 - (k // p) % v`` (the chunks in reverse). Rank r runs
    ``min((p - r - 1)·2 + (v - 1)·p, m·v)`` warm-up forwards, then alternates
    one forward and one backward, then drains the backwards.
    """
    total = m * v

    def unit(k, backward):
        group, within = divmod(k, p * v)
        chunk = within // p
        return group * p + within % p, (v - 1 - chunk) if backward else chunk

    stages = []
    for r in range(p):
        w = min((p - r - 1) * 2 + (v - 1) * p, total)
        order = [_F(*unit(k, False)) for k in range(w)]
        for k in range(total - w):
            order += [_F(*unit(w + k, False)), _B(*unit(k, True))]
        order += [_B(*unit(k, True)) for k in range(total - w, total)]
        stages.append(order)
    return stages


def zero_bubble(p, m, in_flight, deferred):
    """Unit-time list scheduling with B and W split (see module doc).

    in_flight[s]: the most micro-batches between their F and their B on stage s;
    deferred[s]: the most whose W waits (a stage with more runs a W first).
    Each slot, each stage runs: a W if too many wait, else the oldest B it can,
    else the next F if its input is here and ``in_flight`` allows, else the
    oldest waiting W, else nothing. Messages arrive one slot after they are sent.
    """
    order = [[] for _ in range(p)]
    next_f = [0] * p
    has_input = [set(range(m)) if s == 0 else set() for s in range(p)]  # F may run
    b_ready = [[] for _ in range(p)]  # micro-batches whose B may run, oldest first
    w_waiting = [[] for _ in range(p)]
    flying = [0] * p
    done = 0
    while done < p * m:
        arrivals = []  # messages of this slot, usable from the next one
        for s in range(p):
            k = next_f[s]
            if len(w_waiting[s]) > deferred[s]:
                order[s].append(_W(w_waiting[s].pop(0)))
                done += 1
            elif b_ready[s]:
                mb = b_ready[s].pop(0)
                order[s].append(_B(mb))
                w_waiting[s].append(mb)
                flying[s] -= 1
                if s > 0:
                    arrivals.append(("grad", s - 1, mb))
            elif k < m and k in has_input[s] and flying[s] < in_flight[s]:
                order[s].append(_F(k))
                next_f[s] += 1
                flying[s] += 1
                arrivals.append(("act", s + 1, k) if s < p - 1 else ("grad", s, k))
            elif w_waiting[s]:
                order[s].append(_W(w_waiting[s].pop(0)))
                done += 1
        for what, s, mb in arrivals:
            if what == "act":
                has_input[s].add(mb)
            else:
                b_ready[s].append(mb)
        b_ready = [sorted(q) for q in b_ready]
    return order


def zb_h1(p, m, v=1):
    """ZB-H1: 1F1B's in-flight activations (p - s micro-batches between F and B on
    stage s), up to p - 1 W's deferred to fill the drain."""
    return zero_bubble(p, m, [p - s for s in range(p)], [p - 1] * p)


def zb_h2(p, m, v=1):
    """ZB-H2: up to 2(p - s) - 1 micro-batches in flight (more warm-up forwards fill
    the warm-up bubble), up to p - 1 W's deferred to fill the drain."""
    return zero_bubble(p, m, [2 * (p - s) - 1 for s in range(p)], [p - 1] * p)


SCHEDULES = {"naive": naive, "gpipe": gpipe, "1f1b": one_f_one_b,
             "interleaved-1f1b": interleaved_1f1b, "zb-h1": zb_h1, "zb-h2": zb_h2}
INTERLEAVED = frozenset({"interleaved-1f1b"})  # the schedules that take --virtual-stages


def check_schedule(name, p, m, v=1):
    """ScheduleConfigError when schedule ``name`` cannot run ``m`` micro-batches over
    ``p`` ranks with ``v`` chunks each; says which values fit."""
    if name not in SCHEDULES:
        raise ScheduleConfigError(f"unknown schedule {name!r}; choose one of "
                                  f"{', '.join(SCHEDULES)}")
    if p < 1 or m < 1 or v < 1:
        raise ScheduleConfigError(f"a schedule needs at least one stage, one micro-batch "
                                  f"and one chunk per rank (got p={p}, m={m}, v={v})")
    if name in INTERLEAVED:
        if m % p:
            raise ScheduleConfigError(
                f"--schedule {name} sends the micro-batches round the ring in groups of "
                f"--pp {p}: --micro-batches {m} must be a multiple of {p} (e.g. "
                f"{p * max(1, round(m / p))})")
    elif v != 1:
        raise ScheduleConfigError(
            f"--virtual-stages {v} holds several model chunks per rank, which only "
            f"{', '.join(sorted(INTERLEAVED))} schedules; use --virtual-stages 1 with "
            f"--schedule {name}")


def compute_order(name, p, m, v=1):
    """Every rank's F/B/W order under schedule ``name`` (see ``SCHEDULES``)."""
    check_schedule(name, p, m, v)
    return SCHEDULES[name](p, m, v)


def make_schedule(name, p, m, v=1):
    """Every rank's full action list of schedule ``name``: compute order, messages, STEP."""
    return [acts + [STEP] for acts in add_communication(compute_order(name, p, m, v), v)]


def analytic_bubble(p, m, v=1):
    """Idle fraction of GPipe and 1F1B (v = 1) and interleaved 1F1B with unit-cost
    forward and backward: (p - 1) / (v·m + p - 1)."""
    return (p - 1) / (v * m + p - 1)
