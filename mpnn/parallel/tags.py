"""Message tags on the pipeline communicator: the one place they are numbered.

Micro-batch k of a training step sends its activations with tag ``2k`` and
its gradient with tag ``2k + 1``; a send and the receive it feeds compute
the same tag from their kinds, so no two messages of a step between the same
two stages share one. Evaluation streams its chunks with ``EVAL_TAG``, above
them all. Every MPI library accepts tags up to 32767 (``MPI_TAG_UB`` is at
least that), which bounds the micro-batches of a step.

See docs/parallelism.md#4-message-tags.
"""

from __future__ import annotations

from .pipeline_ir import Kind

MAX_MICRO_BATCHES = 16383
EVAL_TAG = 2 * MAX_MICRO_BATCHES

_CHANNEL = {Kind.SEND_ACT: 0, Kind.RECV_ACT: 0, Kind.SEND_GRAD: 1, Kind.RECV_GRAD: 1}


def message_tag(kind, mb):
    """The tag of micro-batch ``mb``'s message of ``kind`` (a send or receive kind)."""
    assert 0 <= mb < MAX_MICRO_BATCHES, mb  # check_pipeline_config refuses more
    return 2 * mb + _CHANNEL[kind]
