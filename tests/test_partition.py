"""Contiguous layer partitioning for pipeline stages."""

import itertools

import pytest

from mpnn.parallel.partition import (
    PartitionError,
    balanced_partition,
    format_partition,
    layer_costs,
    parse_partition,
    partition_layers,
)


def brute_force(costs, pp):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), pp - 1):
        b = (0, *cuts, n)
        v = max(sum(costs[b[s]:b[s + 1]]) for s in range(pp))
        best = v if best is None else min(best, v)
    return best


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
