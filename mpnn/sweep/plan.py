"""Which group trains which trial: costs, the two schedulers, the lower bound.

**Cost.** A trial's expected work is the floating-point operations of its
training and evaluation, from its options alone (``estimated_flops``): an
MLP of Ψ weights costs about 2Ψ flops per row forward and 4Ψ backward
(dW and dx each a GEMM as large as the forward's), so

    cost ≈ epochs · (6Ψ · n_train + 2Ψ · n_test)

with n_train, n_test the dataset's rows (``data.datasets.SHAPES``, known
without loading it). Batch size, optimizer and learning rate change the
time per flop little for this model and are ignored; a trial that is itself
data- or pipeline-parallel inside its group divides its time, not its
work, so groups of one size compare by work.

**Dynamic** (``--scheduler dynamic``, the default): one queue, longest
expected trial first (LPT, Graham 1969: within 4/3 of the best makespan
for exact costs), handed to whichever group asks first, that is, finishes
first. **Static** (``--scheduler static``): trial k of the spec's order goes
to group k mod G, fixed before anything runs: what a job array or a
hand-split sweep does.

**Lower bound.** No schedule of measured trial times t_i on G groups ends
before max(Σ t_i / G, max t_i): the work must be done, and the longest
trial runs on one group.
"""

from __future__ import annotations

from ..data.datasets import SHAPES

SCHEDULERS = ("dynamic", "static")


def model_params(config):
    """Ψ: the weights and biases of the trial's MLP (input and classes from its dataset)."""
    _, _, features, classes = SHAPES[config.data.dataset]
    sizes = [features, *config.model.hidden, classes]
    return sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))


def estimated_flops(config):
    """The expected floating-point operations of training and evaluating ``config``."""
    n_train, n_test, _, _ = SHAPES[config.data.dataset]
    psi = model_params(config)
    return config.epochs * (6 * psi * n_train + 2 * psi * n_test)


class Plan:
    """The trials left to hand out, per scheduler; ``next(group)`` gives the index of
    the trial that group trains next, or None when it is done."""

    def __init__(self, trials, groups, scheduler="dynamic"):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of "
                             f"{', '.join(SCHEDULERS)}")
        self.scheduler, self.groups = scheduler, groups
        self.cost = {t.index: estimated_flops(t.config) for t in trials}
        order = [t.index for t in trials]
        if scheduler == "dynamic":  # longest expected first; ties in the spec's order
            self._queue = sorted(order, key=lambda k: (-self.cost[k], k))
        else:  # round-robin in the spec's order, fixed in advance
            self._per_group = {g: order[g::groups] for g in range(groups)}

    def next(self, group):
        if self.scheduler == "dynamic":
            return self._queue.pop(0) if self._queue else None
        mine = self._per_group[group]
        return mine.pop(0) if mine else None

    def left(self):
        if self.scheduler == "dynamic":
            return len(self._queue)
        return sum(len(v) for v in self._per_group.values())


def lower_bound(times, groups):
    """max(Σ times / groups, max times): no schedule on ``groups`` groups ends sooner."""
    times = list(times)
    return max(sum(times) / groups, max(times)) if times else 0.0
