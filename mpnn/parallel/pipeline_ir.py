"""The pipeline IR: actions, the compute order of each schedule, and the pass that adds messages.

A pipeline step of ``m`` micro-batches over ``p`` stages is, for every stage,
a list of ``Action(kind, mb)``. The kind says what the stage does; the printed
form is the kind's letters followed by the micro-batch::

    F3    FORWARD     run this stage's layers on micro-batch 3
    B3    BACKWARD    backprop micro-batch 3 through this stage
    SA3   SEND_ACT    send micro-batch 3's output activations to stage s+1
    RA3   RECV_ACT    receive micro-batch 3's input activations from stage s-1
    SG3   SEND_GRAD   send dL/d(input) of micro-batch 3 to stage s-1
    RG3   RECV_GRAD   receive dL/d(output) of micro-batch 3 from stage s+1
    STEP  STEP        gradients are final: sum them across replicas

How a schedule becomes messages, in three steps:

1. **A schedule says which compute runs when.** ``gpipe(p, m)`` (and the
   others in ``SCHEDULES``) returns each stage's *compute order*: only F and B
   actions, e.g. stage 1 of GPipe(3, 2) is ``F0 F1 B0 B1``. It knows nothing
   of neighbours or messages.

2. **One pass says where the messages go.** ``add_communication`` walks
   every stage's compute order and puts the receive a compute needs right
   before it and the send of what it produced right after it::

       F k  ->  RA k  F k  SA k          (no RA on the first stage, no SA on the last)
       B k  ->  RG k  B k  SG k          (no RG on the last stage, no SG on the first)

   so stage 1 of GPipe(3, 2) becomes ``RA0 F0 SA0 RA1 F1 SA1 RG0 B0 SG0 RG1 B1 SG1``.
   ``make_schedule`` runs the pass and ends every stage with ``STEP``.

3. **Every message is named by (source, destination, tag).** ``peer``
   gives the stage a send goes to or a receive comes from; the tag is
   ``mpnn.parallel.tags.message_tag(kind, mb)``: ``2k`` for micro-batch k's
   activations, ``2k + 1`` for its gradient. A send and the receive it feeds
   get the same tag by construction, so each receive names exactly the
   message it wants. The simulator (``mpnn.parallel.simulator``) matches
   messages by that triple, as MPI does, and the executor
   (``mpnn.parallel.pipeline``) posts ``Irecv``/``Isend`` with it.

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

Room to grow (not built yet):

- *A separate weight gradient* (zero-bubble schedules) is one more compute
  kind, ``W``, after the ``B`` that then computes only dL/d(input). It
  needs no message, so the pass copies it through (``_MESSAGES`` has no
  entry for it); the simulator learns its dependency (after B of the same
  micro-batch) and the executor gets one more entry in its dispatch table.
- *Several model chunks per rank* (virtual stages) make a schedule's lists
  per *rank*, with a chunk on each compute action. ``peer`` is the one place
  that turns a stage into its neighbour: it would map (rank, chunk) to the
  global stage ``chunk * p + rank`` and back, and ``message_tag`` would fold
  the chunk into the tag.

Pure Python: no MPI, no NumPy.

See docs/parallelism.md#6-how-a-schedule-becomes-messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    """What an action does; the value is its printed prefix."""

    FORWARD = "F"
    BACKWARD = "B"
    SEND_ACT = "SA"
    RECV_ACT = "RA"
    SEND_GRAD = "SG"
    RECV_GRAD = "RG"
    STEP = "STEP"


COMPUTE = frozenset({Kind.FORWARD, Kind.BACKWARD})
SENDS = frozenset({Kind.SEND_ACT, Kind.SEND_GRAD})
RECEIVES = frozenset({Kind.RECV_ACT, Kind.RECV_GRAD})

# compute kind -> (the receive it waits for, the send of what it produced)
_MESSAGES = {Kind.FORWARD: (Kind.RECV_ACT, Kind.SEND_ACT),
             Kind.BACKWARD: (Kind.RECV_GRAD, Kind.SEND_GRAD)}
# message kind -> which neighbour it talks to: activations flow down the pipe, gradients up
_DIRECTION = {Kind.SEND_ACT: +1, Kind.RECV_ACT: -1, Kind.SEND_GRAD: -1, Kind.RECV_GRAD: +1}


class ScheduleError(ValueError):
    """A schedule that is malformed (a dependency broken, a message unmatched)."""


@dataclass(frozen=True)
class Action:
    """One thing a stage does: ``kind`` on micro-batch ``mb`` (None for STEP)."""

    kind: Kind
    mb: int | None = None

    def __str__(self):
        return self.kind.value if self.mb is None else f"{self.kind.value}{self.mb}"

    __repr__ = __str__  # lists of actions print as 'RA0 F0 SA0', in test failures too


STEP = Action(Kind.STEP)


def peer(kind, stage):
    """The stage a send of ``kind`` on ``stage`` goes to, or a receive comes from.

    May be outside 0..p-1: the first stage has no previous stage, the last no next.
    """
    return stage + _DIRECTION[kind]


def format_actions(actions):
    """'RA0 F0 SA0 ...': the compact printed form of one stage's list."""
    return " ".join(map(str, actions))


_PARSE = {k.value: k for k in Kind if k is not Kind.STEP}


def parse_actions(text):
    """Inverse of ``format_actions`` (handy for writing schedules in tests)."""
    out = []
    for tok in text.split():
        if tok == "STEP":
            out.append(STEP)
            continue
        head = tok.rstrip("0123456789")
        if head not in _PARSE or head == tok:
            raise ValueError(f"cannot parse action {tok!r}: expected one of "
                             f"{', '.join(k + '<mb>' for k in _PARSE)} or STEP")
        out.append(Action(_PARSE[head], int(tok[len(head):])))
    return out


# ------------------------------------------------- schedules: compute order only


def _check(p, m):
    if p < 1 or m < 1:
        raise ValueError(f"a schedule needs at least one stage and one micro-batch "
                         f"(got p={p}, m={m})")


def _F(mb):
    return Action(Kind.FORWARD, mb)


def _B(mb):
    return Action(Kind.BACKWARD, mb)


def naive(p, m):
    """One micro-batch at a time: forward through all stages, backward back, next."""
    _check(p, m)
    return [[a for mb in range(m) for a in (_F(mb), _B(mb))] for _ in range(p)]


def gpipe(p, m):
    """GPipe: all m forwards, then all m backwards (in micro-batch order)."""
    _check(p, m)
    return [[_F(mb) for mb in range(m)] + [_B(mb) for mb in range(m)] for _ in range(p)]


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
        order = [_F(mb) for mb in range(w)]
        for k in range(m - w):
            order += [_F(w + k), _B(k)]
        order += [_B(mb) for mb in range(m - w, m)]
        stages.append(order)
    return stages


SCHEDULES = {"naive": naive, "gpipe": gpipe, "1f1b": one_f_one_b}


def compute_order(name, p, m):
    """Every stage's F/B order under schedule ``name`` (see ``SCHEDULES``)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](p, m)


# ------------------------------------------------------- the communication pass


def add_communication(order):
    """Insert the sends and receives into every stage's compute order (see module doc).

    order: ``order[stage]`` = that stage's F/B actions, for stages 0..p-1.
    Returns new lists: before each compute the receive it needs, after it the
    send of what it produced, both only where the neighbour exists.
    """
    p = len(order)
    lowered = []
    for s, acts in enumerate(order):
        out = []
        for a in acts:
            if a.kind not in COMPUTE:
                raise ScheduleError(f"stage {s}: {a} in a compute order; the communication "
                                    f"pass adds the messages itself")
            recv, send = _MESSAGES[a.kind]
            if 0 <= peer(recv, s) < p:
                out.append(Action(recv, a.mb))
            out.append(a)
            if 0 <= peer(send, s) < p:
                out.append(Action(send, a.mb))
        lowered.append(out)
    return lowered


def make_schedule(name, p, m):
    """Every stage's full action list of schedule ``name``: compute order, messages, STEP."""
    return [acts + [STEP] for acts in add_communication(compute_order(name, p, m))]


def analytic_bubble(p, m):
    """Idle fraction of GPipe and 1F1B with unit-cost forward and backward."""
    return (p - 1) / (m + p - 1)
