"""Message tags on the pipeline communicator: the one place they are numbered.

Micro-batch k of a training step sends its activations with tag ``2k`` and
its gradient with tag ``2k + 1``; a send and the receive it feeds compute
the same tag from their kinds, so no two messages of a step between the same
two stages share one. With V model chunks per rank (interleaved schedules)
the sending chunk c is folded in: ``2(k·V + c)`` and ``2(k·V + c) + 1``, so
the messages of different chunks between the same two ranks stay apart.
Evaluation streams its chunks with ``EVAL_TAG``, above them all. Every MPI
library accepts tags up to 32767 (``MPI_TAG_UB`` is at least that), which
bounds the micro-batches (times the chunks) of a step.

See docs/parallelism.md#4-message-tags.
"""

from __future__ import annotations

MAX_MICRO_BATCHES = 16383  # micro-batches x model chunks per rank
EVAL_TAG = 2 * MAX_MICRO_BATCHES

# by the printed kind (pipeline_ir.Kind's values): activations 0, gradients 1
_CHANNEL = {"SA": 0, "RA": 0, "SG": 1, "RG": 1}


def message_tag(kind, mb, chunk=0, chunks=1):
    """The tag of micro-batch ``mb``'s message of ``kind`` (a send or receive kind),
    sent by model chunk ``chunk`` (of ``chunks`` per rank) of its rank."""
    slot = mb * chunks + chunk
    assert 0 <= slot < MAX_MICRO_BATCHES and 0 <= chunk < chunks, (mb, chunk, chunks)
    return 2 * slot + _CHANNEL[kind.value]
