"""The pipeline IR: actions, the compute order of each schedule, and the pass that adds messages.

A pipeline step of ``m`` micro-batches over ``p`` ranks is, for every rank,
a list of ``Action(kind, mb, chunk)``. The kind says what the rank does; the
printed form is the kind's letters followed by the micro-batch, and by
``.c`` for model chunk c > 0 (interleaved schedules)::

    F3    FORWARD     run this stage's layers on micro-batch 3
    B3    BACKWARD    backprop micro-batch 3 through this stage (dL/d(input) and,
                      unless a W of micro-batch 3 follows, the weight gradients)
    W3    WEIGHT      the weight gradients of micro-batch 3 (zero-bubble schedules)
    SA3   SEND_ACT    send micro-batch 3's output activations to the next stage
    RA3   RECV_ACT    receive micro-batch 3's input activations from the previous stage
    SG3   SEND_GRAD   send dL/d(input) of micro-batch 3 to the previous stage
    RG3   RECV_GRAD   receive dL/d(output) of micro-batch 3 from the next stage
    STEP  STEP        gradients are final: sum them across replicas
    F3.1              the forward of micro-batch 3 through this rank's chunk 1

The model is cut into ``p·V`` stages; stage ``g`` sits on rank ``g mod p`` as
its chunk ``g div p`` (``Pipe``). With V = 1 a rank is a stage.

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

3. **Every message is named by (source, destination, tag).** ``Pipe.peer``
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

Two refinements the IR carries:

- *A separate weight gradient* (zero-bubble schedules): ``W k`` after ``B k``,
  which then computes only dL/d(input), the one thing the previous stage
  waits for. W needs no message, so the pass copies it through (``_MESSAGES``
  has no entry for it); the inputs and dL/dz it needs stay alive until it
  runs, and count as live memory until then.
- *Several model chunks per rank* (virtual stages, ``Pipe(p, v)``): the lists
  are per *rank*, each compute action names its chunk, and ``Pipe.peer``
  turns (rank, chunk) into the neighbouring stage's (rank, chunk): the last
  chunk of rank p-1 feeds the next chunk of rank 0. ``Pipe.message`` names
  every message by (source, destination, tag), the tag folding in the
  sending chunk (``tags.message_tag``).

The schedules themselves (which compute runs when) are in
``mpnn.parallel.pipeline_orders``.

Pure Python: no MPI, no NumPy.

See docs/parallelism.md#6-how-a-schedule-becomes-messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .tags import message_tag


class Kind(Enum):
    """What an action does; the value is its printed prefix."""

    FORWARD = "F"
    BACKWARD = "B"
    WEIGHT = "W"
    SEND_ACT = "SA"
    RECV_ACT = "RA"
    SEND_GRAD = "SG"
    RECV_GRAD = "RG"
    STEP = "STEP"


COMPUTE = frozenset({Kind.FORWARD, Kind.BACKWARD, Kind.WEIGHT})
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
    """One thing a rank does: ``kind`` on micro-batch ``mb`` (None for STEP) through
    its model chunk ``chunk``."""

    kind: Kind
    mb: int | None = None
    chunk: int = 0

    def __str__(self):
        if self.mb is None:
            return self.kind.value
        return f"{self.kind.value}{self.mb}" + (f".{self.chunk}" if self.chunk else "")

    __repr__ = __str__  # lists of actions print as 'RA0 F0 SA0', in test failures too


STEP = Action(Kind.STEP)


@dataclass(frozen=True)
class Pipe:
    """The shape of a pipeline: ``p`` ranks holding ``v`` model chunks each, so
    ``p·v`` stages; stage ``g`` is chunk ``g // p`` of rank ``g % p``."""

    p: int
    v: int = 1

    @property
    def stages(self):
        return self.p * self.v

    def stage(self, rank, chunk=0):
        return chunk * self.p + rank

    def place(self, stage):
        """(rank, chunk) of ``stage``."""
        return stage % self.p, stage // self.p

    def is_first(self, rank, chunk=0):
        return self.stage(rank, chunk) == 0

    def is_last(self, rank, chunk=0):
        return self.stage(rank, chunk) == self.stages - 1

    def peer(self, kind, rank, chunk=0):
        """(rank, chunk) a send of ``kind`` from (rank, chunk) goes to, or a receive
        comes from; None past the first or last stage."""
        g = self.stage(rank, chunk) + _DIRECTION[kind]
        return self.place(g) if 0 <= g < self.stages else None

    def message(self, action, rank):
        """(source rank, destination rank, tag) of a send or receive ``action`` on
        ``rank``; None where it has no neighbour."""
        other = self.peer(action.kind, rank, action.chunk)
        if other is None:
            return None
        if action.kind in SENDS:
            return rank, other[0], message_tag(action.kind, action.mb, action.chunk, self.v)
        return other[0], rank, message_tag(action.kind, action.mb, other[1], self.v)


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
        body, _, chunk = tok.partition(".")
        head = body.rstrip("0123456789")
        if head not in _PARSE or head == body or (chunk and not chunk.isdigit()):
            raise ValueError(f"cannot parse action {tok!r}: expected one of "
                             f"{', '.join(k + '<mb>' for k in _PARSE)} (each with an optional "
                             f".<chunk>) or STEP")
        out.append(Action(_PARSE[head], int(body[len(head):]), int(chunk or 0)))
    return out


# ------------------------------------------------------- the communication pass


def add_communication(order, v=1):
    """Insert the sends and receives into every rank's compute order (see module doc).

    order: ``order[rank]`` = that rank's F/B/W actions, for ranks 0..p-1, with ``v``
    model chunks each. Returns new lists: before each F or B the receive it needs,
    after it the send of what it produced, both only where the neighbouring stage
    exists; W needs no message.
    """
    pipe = Pipe(len(order), v)
    lowered = []
    for r, acts in enumerate(order):
        out = []
        for a in acts:
            if a.kind not in COMPUTE:
                raise ScheduleError(f"stage {r}: {a} in a compute order; the communication "
                                    f"pass adds the messages itself")
            recv, send = _MESSAGES.get(a.kind, (None, None))
            if recv is not None and pipe.peer(recv, r, a.chunk) is not None:
                out.append(Action(recv, a.mb, a.chunk))
            out.append(a)
            if send is not None and pipe.peer(send, r, a.chunk) is not None:
                out.append(Action(send, a.mb, a.chunk))
        lowered.append(out)
    return lowered
