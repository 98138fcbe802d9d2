"""Contiguous layer partitioning for pipeline stages."""

import itertools
import time

import numpy as np
import pytest

from mpnn.parallel.partition import (
    PartitionError,
    balanced_partition,
    format_partition,
    interleaved_partition,
    layer_costs,
    parse_partition,
    partition_layers,
    rank_loads,
)


def brute_force(costs, pp):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), pp - 1):
        b = (0, *cuts, n)
        v = max(sum(costs[b[s]:b[s + 1]]) for s in range(pp))
        best = v if best is None else min(best, v)
    return best


def brute_force_ranks(costs, pp, virtual):
    """(smallest largest rank load, the earliest boundaries reaching it) over every split
    into pp·virtual stages, stage g on rank g % pp."""
    n, best = len(costs), None
    for cuts in itertools.combinations(range(1, n), pp * virtual - 1):  # lexicographic
        b = (0, *cuts, n)
        loads = [0] * pp
        for g in range(pp * virtual):
            loads[g % pp] += sum(costs[b[g]:b[g + 1]])
        if best is None or max(loads) < best[0]:
            best = (max(loads), list(b))
    return best


def bounds(ranges):
    return [r.start for r in ranges] + [ranges[-1].stop]


@pytest.mark.parametrize("costs", [[5, 1, 1, 1], [1, 2, 3, 4, 5, 6], [7, 7, 7], [1, 100, 1, 1, 100],
                                   [3, 1, 4, 1, 5, 9, 2, 6]])
def test_balanced_is_optimal_and_contiguous(costs):
    for pp in range(1, len(costs) + 1):
        ranges = balanced_partition(costs, pp)
        assert len(ranges) == pp
        assert ranges[0].start == 0 and ranges[-1].stop == len(costs)
        assert all(len(r) >= 1 for r in ranges)
        assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:], strict=False))
        assert max(sum(costs[i] for i in r) for r in ranges) == brute_force(costs, pp)


def test_default_mlp_split():
    sizes = [784, 256, 128, 64, 10]
    costs = layer_costs(sizes)
    assert costs[0] == 4 * 784 * 256 + 4 * 256  # no input gradient for layer 0
    assert costs[1] == 6 * 256 * 128 + 4 * 128
    # the first layer dominates: it gets a stage of its own
    assert partition_layers(sizes, 2) == [range(0, 1), range(1, 4)]
    assert partition_layers(sizes, 4) == [range(i, i + 1) for i in range(4)]
    assert format_partition(partition_layers(sizes, 2)) == "0 | 1-3"


def test_override():
    sizes = [8, 8, 8, 8, 8]
    assert partition_layers(sizes, 3, "2,1,1") == [range(0, 2), range(2, 3), range(3, 4)]
    assert parse_partition(" 1, 3", 4, 2) == [range(0, 1), range(1, 4)]


@pytest.mark.parametrize("text,match", [("2,1", "gives 2 stage"), ("2,2,1", "must sum to 4"),
                                        ("3,0,1", "at least one layer"),
                                        ("2,x,1", "comma-separated"),
                                        ("1,1,1", "must sum to 4")])
def test_override_errors(text, match):
    with pytest.raises(PartitionError, match=match):
        partition_layers([8, 8, 8, 8, 8], 3, text)


def test_more_stages_than_layers():
    with pytest.raises(PartitionError, match="more pipeline stages than the model has"):
        partition_layers([8, 8, 8], 3)
    with pytest.raises(PartitionError, match="positive"):
        partition_layers([8, 8, 8], 0)


# ------------------------------------------------ chunks of interleaved schedules


@pytest.mark.parametrize("seed", range(40))
def test_interleaved_is_optimal_with_earliest_boundaries(seed):
    # small integer costs (zeros too) make many ties: the search must find the optimum
    # and, among optimal splits, the one with the earliest boundaries
    rng = np.random.default_rng(seed)
    pp, virtual = int(rng.integers(1, 4)), int(rng.integers(2, 4))
    n = int(rng.integers(pp * virtual, 12))
    costs = [int(c) for c in rng.integers(0, 6, n)]
    ranges = interleaved_partition(costs, pp, virtual)
    assert len(ranges) == pp * virtual and all(len(r) >= 1 for r in ranges)
    value, earliest = brute_force_ranks(costs, pp, virtual)
    assert bounds(ranges) == earliest
    assert max(rank_loads(costs, ranges, pp)) == value


def test_interleaved_loads_are_per_rank_sums():
    costs = [5, 1, 1, 1, 1, 5]
    # stages 0 | 1 | 2-3 | 4-5 deal ranks 0, 1, 0, 1: loads 5 + 2 and 1 + 6
    assert rank_loads(costs, [range(0, 1), range(1, 2), range(2, 4), range(4, 6)], 2) == [7, 7]
    ranges = interleaved_partition(costs, 2, 2)
    assert max(rank_loads(costs, ranges, 2)) == 7 == sum(costs) // 2
    # the best 4-stage split ignores which rank a stage lands on and does worse here
    flat = balanced_partition(costs, 4)
    assert max(sum(costs[i] for i in r) for r in flat) == 5
    assert max(rank_loads(costs, flat, 2)) > 7


def test_interleaved_ties_take_the_earliest_boundaries():
    assert interleaved_partition([1] * 4, 2, 2) == [range(i, i + 1) for i in range(4)]
    # six equal layers over 2 ranks x 2 chunks: loads 3 and 3; first optimum in order
    ranges = interleaved_partition([1] * 6, 2, 2)
    assert bounds(ranges) == [0, 1, 2, 4, 6]
    assert ranges == interleaved_partition([1.0] * 6, 2, 2)  # same answer, int or float
    # one rank: every split loads it with everything; the earliest is one layer per stage
    assert bounds(interleaved_partition([3, 1, 2], 1, 2)) == [0, 1, 3]


def test_interleaved_v1_is_balanced():
    costs = [3, 1, 4, 1, 5, 9, 2, 6]
    for pp in range(1, 5):
        assert interleaved_partition(costs, pp) == balanced_partition(costs, pp)


def test_interleaved_search_is_bounded_and_never_worse_than_balanced():
    # 50 layers into 16 stages is past what the search finishes: it stops after
    # max_nodes and returns its best, no worse than the polished balanced split
    rng = np.random.default_rng(0)
    costs = list(rng.uniform(1.0, 10.0, 50))
    for pp, virtual in [(4, 4), (8, 2), (2, 8)]:
        t0 = time.perf_counter()
        ranges = interleaved_partition(costs, pp, virtual)
        assert time.perf_counter() - t0 < 5.0
        assert bounds(ranges)[0] == 0 and bounds(ranges)[-1] == 50
        assert all(len(r) >= 1 for r in ranges) and len(ranges) == pp * virtual
        worst = max(rank_loads(costs, ranges, pp))
        assert worst <= max(rank_loads(costs, balanced_partition(costs, pp * virtual), pp))
        assert worst <= 1.1 * sum(costs) / pp  # within 10 % of the lower bound
        # a smaller node budget still returns a valid, deterministic split
        assert interleaved_partition(costs, pp, virtual, max_nodes=50) == \
            interleaved_partition(costs, pp, virtual, max_nodes=50)


def test_interleaved_errors():
    with pytest.raises(PartitionError, match="more than the model has linear layers"):
        interleaved_partition([1, 1, 1], 2, 2)
