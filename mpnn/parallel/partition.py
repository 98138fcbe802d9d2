"""Split an MLP's linear layers into contiguous pipeline stages.

Stage s holds layers ``range(start_s, stop_s)``; the ranges cover
``0 .. L-1`` in order and every stage holds at least one layer. The automatic
split balances an estimated per-layer cost, per row of the micro-batch::

    cost_i = 6·I·O      (forward x·W: 2·I·O FLOPs; backward xᵀ·dz and dz·Wᵀ: 4·I·O;
                         layer 0 skips dz·Wᵀ, nobody needs dL/dx: 4·I·O)
           + 4·O        (bias + activation forward, activation' + bias grad backward)

for layer i with I = sizes[i] inputs and O = sizes[i+1] outputs, and picks
the contiguous split whose most expensive stage is cheapest (the pipeline
runs at the pace of its slowest stage). With L layers and p stages the exact
answer comes from a small dynamic program over (layers, stages), O(L²·p).
Ties go to the split with the earliest stage boundaries, so every rank
computes the same partition.

``--partition 2,1,1`` overrides it: layers per stage, in order.
"""

from __future__ import annotations


class PartitionError(ValueError):
    """A partition that cannot be used with this model and ``--pp``."""


def layer_costs(sizes):
    """Estimated forward+backward cost of each linear layer, per row (see module doc)."""
    return [(4 if i == 0 else 6) * sizes[i] * sizes[i + 1] + 4 * sizes[i + 1]
            for i in range(len(sizes) - 1)]


def check_stages(n_layers, pp, virtual=1):
    """``pp`` stages (``--pp`` x ``--virtual-stages`` when ``virtual`` > 1) must each
    get a layer."""
    if pp < 1:
        raise PartitionError(f"--pp must be a positive integer (got {pp})")
    if pp > n_layers:
        if virtual > 1:
            raise PartitionError(
                f"--pp {pp // virtual} x --virtual-stages {virtual} = {pp} pipeline stages, "
                f"more than the model has linear layers ({n_layers}); every stage needs at "
                f"least one layer: use fewer virtual stages or add hidden layers with --hidden")
        raise PartitionError(f"--pp {pp} asks for more pipeline stages than the model has "
                             f"linear layers ({n_layers}); every stage needs at least one layer: "
                             f"use --pp {n_layers} or less, or add hidden layers with --hidden")


def balanced_partition(costs, pp):
    """Contiguous split of ``costs`` into ``pp`` non-empty ranges minimising the max sum."""
    n = len(costs)
    check_stages(n, pp)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    INF = float("inf")
    # best[k][j]: smallest max-stage cost putting the first j layers on k stages
    best = [[INF] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0
    for k in range(1, pp + 1):
        for j in range(k, n - (pp - k) + 1):
            for i in range(k - 1, j):  # last stage holds layers i .. j-1
                v = max(best[k - 1][i], prefix[j] - prefix[i])
                if v < best[k][j]:  # strict: keep the earliest boundary on ties
                    best[k][j], cut[k][j] = v, i
    bounds, j = [n], n
    for k in range(pp, 0, -1):
        j = cut[k][j]
        bounds.append(j)
    bounds.reverse()
    return [range(bounds[s], bounds[s + 1]) for s in range(pp)]


def parse_partition(text, n_layers, pp):
    """``"2,1,1"`` -> [range(0,2), range(2,3), range(3,4)], with errors that say what to fix."""
    try:
        counts = [int(tok) for tok in str(text).split(",")]
    except ValueError:
        raise PartitionError(f"--partition {text!r}: expected comma-separated layer counts "
                             f"per stage, such as 2,1,1") from None
    if len(counts) != pp:
        raise PartitionError(f"--partition {text} gives {len(counts)} stage(s) but the "
                             f"pipeline has {pp} (--pp, times --virtual-stages): "
                             f"give one layer count per stage")
    if min(counts) < 1:
        raise PartitionError(f"--partition {text}: every stage needs at least one layer")
    if sum(counts) != n_layers:
        raise PartitionError(f"--partition {text} places {sum(counts)} layers but the model has "
                             f"{n_layers} linear layers: the counts must sum to {n_layers}")
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges


def partition_layers(sizes, pp, override=None):
    """The layer range of every stage: ``override`` ("2,1,1") if given, else balanced."""
    n_layers = len(sizes) - 1
    check_stages(n_layers, pp)
    if override:
        return parse_partition(override, n_layers, pp)
    return balanced_partition(layer_costs(sizes), pp)


def format_partition(ranges):
    """'0-1 | 2 | 3': layers per stage, for logs."""
    return " | ".join(f"{r.start}" if len(r) == 1 else f"{r.start}-{r.stop - 1}" for r in ranges)
