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

``--partition profile`` measures the per-layer costs instead
(``parallel.profile``) and splits them here. With ``--virtual-stages V`` the
p·V stages are dealt round the ring, stage g to rank g % p as chunk g // p,
and what bounds the pipeline is a rank's load, the sum of its V chunks:
``interleaved_partition`` minimises the largest load. That is no longer a DP
over (layers, stages), since a prefix's cost is a vector of p partial loads,
so it is a depth-first branch and bound over the stage boundaries (earliest
first) that starts from the best p·V-stage split above, polished by moving
single boundaries; it prunes a prefix whose loads already exceed the best
found, or whose open ranks (those still owed a chunk) cannot take the
remaining layers without exceeding it. Searched to the end it is exact and
returns the optimum with the earliest boundaries; it stops after a fixed
number of nodes (deterministic, so every rank still agrees) and then returns
the best split found, never worse than the starting one. Up to about 20
layers and 8 stages, or 50 layers over 2 ranks x 2 chunks, it finishes;
at 50 layers and 16 stages it stops (in about 0.2 s), on random costs within 0.5 %
(2 or 4 ranks) to 7 % (8 ranks) of the lower bound total / p.
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
    if str(text) == "profile":
        raise PartitionError("--partition profile times the layers of a real run (python -m "
                             "mpnn.train --partition profile); here give layer counts per "
                             "stage, such as 2,1,1")
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


def rank_loads(costs, ranges, pp):
    """Every pipeline rank's summed cost when stage g runs on rank g % pp (its chunks)."""
    prefix = _prefix(costs)
    loads = [0] * pp
    for g, r in enumerate(ranges):
        loads[g % pp] += prefix[r.stop] - prefix[r.start]
    return loads


def interleaved_partition(costs, pp, virtual=1, max_nodes=20_000):
    """Contiguous split of ``costs`` into ``pp·virtual`` non-empty stages, stage g on rank
    g % pp, minimising the largest rank load (see the module doc); ``virtual`` 1 is
    ``balanced_partition``. ``costs`` must be non-negative."""
    if virtual == 1:
        return balanced_partition(costs, pp)
    n, n_stages = len(costs), pp * virtual
    check_stages(n, n_stages, virtual)
    prefix = _prefix(costs)
    start = _polish(prefix, [r.start for r in balanced_partition(costs, n_stages)] + [n], pp)
    bounds = _search(prefix, pp, n_stages, start, max_nodes)
    return [range(bounds[g], bounds[g + 1]) for g in range(n_stages)]


def _prefix(costs):
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    return prefix


def _loads(prefix, bounds, pp):
    """Rank loads of stage boundaries ``bounds`` (added in stage order, as ``_search`` does)."""
    loads = [0] * pp
    for g in range(len(bounds) - 1):
        loads[g % pp] += prefix[bounds[g + 1]] - prefix[bounds[g]]
    return loads


def _polish(prefix, bounds, pp):
    """Move single boundaries by one layer while the loads, sorted largest first, shrink."""
    def key(b):
        return sorted(_loads(prefix, b, pp), reverse=True)

    best, improved = key(bounds), True
    while improved:
        improved = False
        for i in range(1, len(bounds) - 1):
            for step in (-1, 1):
                b = bounds[:i] + [bounds[i] + step] + bounds[i + 1:]
                if b[i - 1] < b[i] < b[i + 1] and key(b) < best:
                    bounds, best, improved = b, key(b), True
    return bounds


def _search(prefix, pp, n_stages, bounds, max_nodes):
    """Branch and bound over stage boundaries from incumbent ``bounds`` (see the module doc)."""
    n = len(prefix) - 1
    best = {"value": max(_loads(prefix, bounds, pp)), "bounds": bounds, "found": False}
    # ranks still owed a stage once stages 0 .. g-1 are placed
    open_ranks = [sorted({h % pp for h in range(g, n_stages)}) for g in range(n_stages + 1)]
    loads, cuts, nodes = [0] * pp, [0], [0]

    def beaten(value, strict):
        # no better than the best: ties lose once a split of the search holds it
        return value > best["value"] or (strict and value >= best["value"])

    def dfs(g, j):  # stages 0 .. g-1 hold layers 0 .. j-1
        nodes[0] += 1
        if nodes[0] > max_nodes:
            return
        strict = best["found"]
        if beaten(max(loads), strict):
            return
        if g == n_stages:
            best.update(value=max(loads), bounds=cuts[:], found=True)
            return
        room = sum(max(0, best["value"] - loads[r]) for r in open_ranks[g])
        left = prefix[n] - prefix[j]
        if left > room or (strict and left >= room):
            return
        r, old = g % pp, loads[g % pp]
        last = n - (n_stages - g - 1)  # leave a layer for every later stage
        for k in range(j + 1 if g < n_stages - 1 else n, last + 1):
            loads[r] = old + (prefix[k] - prefix[j])
            if beaten(loads[r], strict):
                break  # later boundaries only add to this rank
            cuts.append(k)
            dfs(g + 1, k)
            cuts.pop()
            strict = best["found"]
        loads[r] = old

    dfs(0, 0)
    return best["bounds"]
