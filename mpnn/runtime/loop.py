"""The training loop over the Engine interface (``mpnn.parallel.engine``).

    train_batch   one optimizer step: gather this rank's rows of a global
                  batch, the engine's step, the optimizer's (what ``mpnn.train``
                  runs each step and ``mpnn.bench`` times)
"""

from __future__ import annotations

from .trace import NULL_TRACER


def train_batch(engine, optimizer, ops, data, rows, global_batch, lr, tracer=NULL_TRACER, step=0):
    """Train on this rank's ``rows`` (indices into ``data.x_train``) of a global
    batch of ``global_batch`` rows; returns this rank's loss sum.

    The rows are gathered (and moved to the device) only where the engine
    reads features; every rank gets its labels. The gradient is scaled by
    ``1/global_batch`` here, once; the optimizer then steps with ``lr``.
    """
    x = ops.to_device(data.x_train[rows]) if engine.needs_inputs else None  # (b, I)
    labels = ops.to_device(data.y_train[rows])  # (b,)
    loss = engine.train_step(x, labels, 1.0 / global_batch)
    with tracer.span("optimizer", step=step + 1):
        optimizer.step(lr)
    return loss
