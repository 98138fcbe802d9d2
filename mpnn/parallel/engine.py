"""The Engine interface: what the training loop asks of every parallel mode.

An engine owns how one training step of a global batch is computed on this
rank and how its gradients cross ranks; the loop (``mpnn.runtime.loop``)
only calls the methods below, so a new mode (tensor parallelism, ZeRO, a
parameter server) is a new class here, not a branch in the loop.

    needs_inputs        whether ``train_step``/``evaluate`` read the features x
                        (a later pipeline stage receives activations instead;
                        the loop then passes None and skips the gather)
    train_step(x, labels, scale) -> loss_sum
                        x (b, I) and labels (b,) are this rank's rows of the
                        global batch; ``scale`` is 1/global_batch, the one place
                        the batch mean enters. Leaves the gradient of the
                        global-batch mean loss, summed over every rank that
                        holds the same parameters, in the model's flat gradient
                        buffer (the optimizer steps next). Returns this rank's
                        share of the loss sum (0.0 where no loss is computed).
    evaluate(x, labels) -> (loss_sum, n_correct)
                        forward only over this rank's test rows; ranks that do
                        not compute the loss return (0.0, 0)
    state_dict() -> dict
                        the whole model's named tensors (``layers.{i}.weight``,
                        ...) as host arrays, complete on world rank 0 ({} where
                        a rank holds none). Collective over the engine's ranks.
    activations() -> dict | None
                        layer -> its output (B, O) in the last step, or a list
                        of them (one per micro-batch), for the non-finite guard
                        to name the layer; None if not kept. Asked for only
                        when the guard has found a NaN/inf.
    epoch_metrics() -> dict
                        extra per-epoch figures (a pipeline's per-stage busy and
                        idle seconds, its measured bubble); collective over the
                        job, called once per epoch on every rank; {} if none
    describe() -> str | None
                        one start-up line saying how the work is split, or None
    memory() -> dict
                        bytes this rank allocated, from the arrays: "params",
                        "grads", "activations" (what the last step kept)
    close()             free what is not garbage-collected (a shared-memory
                        window); collective, once training is over

See docs/parallelism.md#1-the-global-batch-is-the-unit.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Engine(Protocol):
    needs_inputs: bool

    def train_step(self, x, labels, scale) -> float: ...

    def evaluate(self, x, labels) -> tuple[float, int]: ...

    def state_dict(self) -> dict: ...

    def activations(self) -> dict | None: ...

    def epoch_metrics(self) -> dict: ...

    def describe(self) -> str | None: ...

    def memory(self) -> dict: ...

    def close(self) -> None: ...
