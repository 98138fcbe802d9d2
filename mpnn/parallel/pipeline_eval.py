"""Forward-only evaluation through a pipeline: ``PipelineEngine.evaluate``'s loop.

Chunks of a replica's rows flow stage to stage with blocking receives and
non-blocking sends, through every model chunk in turn; every message carries
``EVAL_TAG``, and each rank receives them in the order its neighbour sends
them, so no schedule is needed. Shapes: B rows of an evaluation chunk,
I = a model chunk's input features, O = its output features.
"""

from __future__ import annotations

import numpy as np

from ..data.batching import batch_bounds
from .pipeline_ir import Kind
from .staging import copy_from_host
from .tags import EVAL_TAG


def evaluate(engine, x, labels, chunk, slots):
    """(loss_sum, n_correct) of ``engine``'s model over x (n, I0) on the last stage,
    (0.0, 0) on the others; only the first stage reads x.

    ``slots[c]``: two micro-batch contexts of model chunk c, used in turn, so the
    next evaluation chunk's forward overlaps the previous one's send (a slot's
    sends complete before it is reused); sends go through the engine's
    ``_isend`` (staged on the host where the engine stages).
    """
    model, ops, pipe, stage, comm = engine.model, engine.ops, engine.pipe, engine.stage, engine.comm
    loss_sum, correct = 0.0, 0
    n = int(labels.shape[0])
    rows = min(chunk, n)
    inbuf = [ops.xp.empty((rows, model.chunk_features(c)[0]), model.dtype)
             for c in range(engine.v)]
    inhost = [np.empty(b.shape, model.dtype) for b in inbuf] if engine.host_staging else None
    for j, (lo, hi) in enumerate(batch_bounds(n, chunk)):
        for c in range(engine.v):
            if pipe.is_first(stage, c):
                h = x[lo:hi]
            else:
                src = pipe.peer(Kind.RECV_ACT, stage, c)[0]
                h = inbuf[c][:hi - lo]  # (B, I)
                if inhost is None:
                    comm.Recv(h, source=src, tag=EVAL_TAG)
                else:
                    comm.Recv(inhost[c][:hi - lo], source=src, tag=EVAL_TAG)
                    copy_from_host(inhost[c][:hi - lo], h)
            slot = slots[c][j % 2]
            _wait_all(slot.requests)
            slot.requests.clear()
            out = model.forward(h, slot.ctx, chunk=c)  # (B, O)
            if pipe.is_last(stage, c):
                l, k = ops.predict_stats(out, labels[lo:hi], engine.loss)
                loss_sum, correct = loss_sum + l, correct + k
            else:
                dest = pipe.peer(Kind.SEND_ACT, stage, c)[0]
                engine._isend(slot, "act", out, dest, EVAL_TAG)
    for pair in slots:
        for slot in pair:
            _wait_all(slot.requests)
    return loss_sum, correct


def _wait_all(requests):
    for req in requests:
        req.Wait()
