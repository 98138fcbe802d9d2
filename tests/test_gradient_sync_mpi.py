"""Overlapped bucketed Allreduce == the single blocking Allreduce.

Under ``mpirun -n N python -m pytest --with-mpi`` (N = 2, 4); the bucket
arithmetic is tested serially in ``test_buckets.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpnn.kernels import get_ops
from mpnn.nn.model import MLP, Context
from mpnn.nn.params import Layout
from mpnn.parallel.data_parallel import BucketedGradientSync, GradientSync

SIZES = [784, 256, 128, 64, 10]


def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("bucket_mb", [1e-6, 0.1, 0.5, 100.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bucketed_equals_single_allreduce(bucket_mb, dtype):
    comm = _world()
    layout = Layout(SIZES)
    rng = np.random.default_rng(100 + comm.Get_rank())
    local = rng.normal(size=layout.numel).astype(dtype)
    ints = rng.integers(-1000, 1000, size=layout.numel).astype(dtype)  # exact in any order

    for data, exact in ((local, False), (ints, True)):
        expected = data.copy()
        GradientSync(comm, expected).allreduce()
        got = data.copy()
        sync = BucketedGradientSync(comm, got, layout, bucket_mb=bucket_mb)
        for i in reversed(layout.layers):  # as backward reports them
            sync.on_layer_done(i)
        sync.wait()
        if exact:
            np.testing.assert_array_equal(got, expected)
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-6 if dtype == np.float32 else 1e-14)


@pytest.mark.mpi(min_size=2)
def test_wait_alone_sums_everything_and_resets():
    """No backward on this rank (an empty share of the batch): wait starts all."""
    comm = _world()
    layout = Layout(SIZES)
    g = np.full(layout.numel, comm.Get_rank() + 1.0)
    sync = BucketedGradientSync(comm, g, layout, bucket_mb=0.05)
    n = comm.Get_size()
    for step in range(3):  # requests are renewed every step
        g[...] = comm.Get_rank() + 1.0
        if step == 1:
            sync.on_layer_done(3)
        sync.wait()
        np.testing.assert_array_equal(g, n * (n + 1) / 2)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_overlapped_backward_equals_serial_gradient(backend):
    """Each rank takes its contiguous share of one global batch; after the
    overlapped sum every rank holds the serial full-batch gradient."""
    comm = _world()
    rank, size = comm.Get_rank(), comm.Get_size()
    ops = get_ops(backend)
    rng = np.random.default_rng(5)
    B = 8 * size + 3  # uneven shares
    x = rng.normal(size=(B, SIZES[0]))
    labels = rng.integers(0, SIZES[-1], size=B)

    def grad_of(rows, sync=None):
        model = MLP(SIZES, dtype=np.float64, seed=1, ops=ops)
        model.zero_grad()
        if len(rows):
            ctx = Context()
            logits = model.forward(x[rows], ctx)
            d = np.empty_like(logits)
            ops.loss("cross_entropy", logits, labels[rows], 1.0 / B, d)
            hook = None
            if sync is not None:
                sync = sync(model)
                hook = sync.on_layer_done
            model.backward(d, ctx, on_layer_done=hook)
        elif sync is not None:
            sync = sync(model)
        if sync is not None:
            sync.wait()
        return model.flat.grad

    serial = grad_of(np.arange(B))
    share = np.array_split(np.arange(B), size)[rank]
    summed = grad_of(share, lambda m: BucketedGradientSync(comm, m.flat.grad, m.layout, 0.1, ops))
    np.testing.assert_allclose(summed, serial, rtol=1e-11, atol=1e-14)
    blocking = grad_of(share, lambda m: GradientSync(comm, m.flat.grad, ops))
    np.testing.assert_allclose(summed, blocking, rtol=1e-13, atol=1e-16)
