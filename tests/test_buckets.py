"""Gradient buckets: contiguous, whole layers, in the reverse order backward finishes them.

The sums over ranks are in ``test_gradient_sync_mpi.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mpnn.nn.params import Layout
from mpnn.parallel.data_parallel import BucketedGradientSync, make_buckets

SIZES = [784, 256, 128, 64, 10]


@pytest.mark.parametrize("bucket_mb", [1e-6, 0.01, 0.05, 0.2, 1.0, 100.0])
@pytest.mark.parametrize("layers", [None, range(1, 3), range(2, 4)])
def test_buckets_tile_the_buffer_in_reverse_layer_order(bucket_mb, layers):
    layout = Layout(SIZES, layers)
    buckets = make_buckets(layout, 4, bucket_mb)
    assert buckets[0].stop == layout.numel and buckets[-1].start == 0
    for a, b in zip(buckets, buckets[1:], strict=False):
        assert a.start == b.stop  # contiguous, walking down the buffer
    order = [i for b in buckets for i in b.layers]
    assert order == list(reversed(layout.layers))  # every layer once, last first
    for b in buckets:
        lo, hi = layout.layer_span(b.layers[-1])[0], layout.layer_span(b.layers[0])[1]
        assert (b.start, b.stop) == (lo, hi)
    for b in buckets[:-1]:
        assert (b.stop - b.start) * 4 >= bucket_mb * 1e6  # only the last may be smaller
        # and it closed as soon as it was big enough
        assert (b.stop - layout.layer_span(b.layers[-1])[1]) * 4 < bucket_mb * 1e6 or \
            len(b.layers) == 1


def test_bucket_sizes_for_the_benchmark_model():
    layout = Layout(SIZES)
    assert [b.layers for b in make_buckets(layout, 4, 1e-6)] == [(3,), (2,), (1,), (0,)]
    assert [b.layers for b in make_buckets(layout, 4, 0.1)] == [(3, 2, 1), (0,)]
    assert [b.layers for b in make_buckets(layout, 4, 4.0)] == [(3, 2, 1, 0)]


def test_one_rank_sync_is_a_no_op():
    g = np.arange(10.0)
    sync = BucketedGradientSync(MPI.COMM_SELF, g, Layout([3, 2]), bucket_mb=1.0)
    sync.on_layer_done(0)
    sync.wait()
    np.testing.assert_array_equal(g, np.arange(10.0))


def test_bad_bucket_size():
    with pytest.raises(ValueError, match="--bucket-mb"):
        BucketedGradientSync(MPI.COMM_SELF, np.zeros(10), Layout([3, 2]), bucket_mb=0)
