"""Deterministic batching shared by every rank.

Every rank computes the same permutation of the training set for an epoch
(from the seed and the epoch number, no communication), cuts it into global
batches (the last, partial one included), and a data-parallel replica takes
its contiguous share of each global batch, as even as possible: with ``n``
rows over ``k`` replicas, the first ``n % k`` replicas get one row more.
"""

from __future__ import annotations

import numpy as np


def epoch_permutation(n, seed, epoch):
    """The order of the ``n`` training rows in ``epoch`` (same on every rank)."""
    rng = np.random.default_rng([int(seed), int(epoch), 0x6D706E6E])
    return rng.permutation(n)


def batch_bounds(n, batch_size):
    """(start, stop) of each global batch over ``n`` rows; the last may be short."""
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def share_bounds(n, index, parts):
    """(start, stop) of part ``index`` of ``n`` rows split into ``parts``
    contiguous, as-even-as-possible pieces (the first ``n % parts`` one larger)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)
