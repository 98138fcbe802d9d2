"""Data-parallel and pipeline training on CuPy end where serial NumPy training ends.

Every rank trains the digits MLP in float64 on the GPU, through the library's
own pieces (``make_grid``, ``MLP``, the engines, ``make_optimizer``, the
trainer's step ``runtime.loop.train_batch``), twice per set-up: with every
message staged through host buffers (what an MPI library without CUDA support,
such as the PyPI ``mpich`` wheel, needs) and with device buffers handed to MPI
directly (only where the library says it is CUDA-aware; skipped otherwise).
The weights each rank ends with must equal a serial NumPy run's within 1e-9,
and a pipeline's gathered ``state_dict`` on rank 0 must be the whole serial
model. Run (see the top of tests/test_gpu.py for the whole GPU session)::

    mpirun -n 2 python -m pytest --with-mpi -m mpi tests/test_gpu_mpi.py
    mpirun -n 4 python -m pytest --with-mpi -m mpi tests/test_gpu_mpi.py   (+ 4 stages, 2 x 2)

Without a usable GPU every test skips, saying so.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpnn.kernels.cupy_ops import gpu_available

pytestmark = pytest.mark.skipif(not gpu_available(),
                                reason="no usable GPU: CuPy is not installed or no CUDA device "
                                       "answers (the GPU acceptance tests need one)")

HIDDEN, SEED, LR, EPOCHS = [24, 16, 12], 3, 0.05, 2
BATCH, MICRO_BATCHES = 100, 4  # digits' 1437 rows end with 37: 19 + 18 rows, 5,5,5,4 + 5,5,4,4
PATHS = ["host-staged", "direct"]
_data, _serial = {}, {}


def digits():
    if not _data:
        from mpnn.data import load_dataset

        _data["digits"] = load_dataset("digits", dtype=np.float64)
    return _data["digits"]


def train(backend, comm, dp=1, pp=1, schedule="1f1b", bucket_mb=0.0):
    """Train on ``comm`` as a dp x pp grid; returns (this rank's tensors, the engine)."""
    from mpnn.data.batching import batch_bounds, epoch_permutation, share_bounds
    from mpnn.kernels import get_ops
    from mpnn.nn.model import MLP
    from mpnn.nn.optim import make_optimizer
    from mpnn.parallel.data_parallel import DataParallelEngine
    from mpnn.parallel.grid import make_grid
    from mpnn.parallel.partition import partition_layers
    from mpnn.parallel.pipeline import PipelineEngine
    from mpnn.runtime.loop import train_batch

    data, ops = digits(), get_ops(backend)
    sizes = [data.n_features, *HIDDEN, data.num_classes]
    grid = make_grid(comm, dp=dp, pp=pp)
    stages = partition_layers(sizes, pp) if pp > 1 else None
    model = MLP(sizes, "relu", np.float64, SEED, layers=stages[grid.pp_rank] if stages else None,
                ops=ops)
    if pp == 1:
        engine = DataParallelEngine(model, "cross_entropy", grid.dp_comm, bucket_mb)
    else:
        engine = PipelineEngine(model, "cross_entropy", grid, schedule, MICRO_BATCHES, stages)
    opt = make_optimizer("sgd", model.flat, ops, LR, momentum=0.9)
    n = data.x_train.shape[0]
    for epoch in range(1, EPOCHS + 1):
        order = epoch_permutation(n, SEED, epoch)
        for start, stop in batch_bounds(n, BATCH):
            lo, hi = share_bounds(stop - start, grid.dp_rank, grid.dp)
            train_batch(engine, opt, ops, data, order[start + lo:start + hi], stop - start, LR)
    ops.synchronize()
    return model.state_dict(), engine


def serial():
    """The serial NumPy run's weights (every rank computes them; cached)."""
    if not _serial:
        from mpi4py import MPI

        from mpnn.nn.model import MLP

        _serial.update(train("numpy", MPI.COMM_SELF)[0])
        data = digits()
        init = MLP([data.n_features, *HIDDEN, data.num_classes], "relu", np.float64, SEED)
        # the weights moved, so agreeing with them is not vacuous
        assert not np.allclose(_serial["layers.0.weight"], init.state_dict()["layers.0.weight"])
    return _serial


def world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """How device buffers reach MPI: through host copies, or directly."""
    from mpnn.parallel import staging

    if request.param == "direct":
        if not staging.mpi_cuda_aware():
            pytest.skip("this MPI library is not CUDA-aware: device buffers always go "
                        "through host copies (the host-staged case covers it)")
    else:  # staging.mpi_cuda_aware is the one place the library asks
        monkeypatch.setattr(staging, "mpi_cuda_aware", lambda: False)
    return request.param


def check_against_serial(stage, where):
    ref = serial()
    assert stage, f"{where}: no tensors"
    for name, value in stage.items():
        diff = float(np.max(np.abs(np.asarray(value) - ref[name])))
        assert diff <= 1e-9, f"{name} on {where}: max |cupy - serial numpy| = {diff:.2e}"


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("bucket_mb", [0.0, 0.001], ids=["blocking", "bucketed"])
def test_data_parallel_on_cupy_equals_serial_numpy(path, bucket_mb):
    comm = world()
    stage, _ = train("cupy", comm, dp=comm.Get_size(), bucket_mb=bucket_mb)
    check_against_serial(stage, f"replica {comm.Get_rank()} ({path})")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("schedule", ["naive", "gpipe", "1f1b"])
@pytest.mark.parametrize("grid", ["pp", "dp2xpp2"])
def test_pipeline_on_cupy_equals_serial_numpy(path, schedule, grid):
    comm = world()
    size = comm.Get_size()
    if grid == "dp2xpp2" and size != 4:
        pytest.skip("the 2 x 2 grid needs mpirun -n 4")
    if grid == "pp" and size > len(HIDDEN) + 1:
        pytest.skip(f"{size} stages for {len(HIDDEN) + 1} layers: run with -n 2 or -n 4")
    dp, pp = (2, 2) if grid == "dp2xpp2" else (1, size)
    stage, engine = train("cupy", comm, dp=dp, pp=pp, schedule=schedule)
    full = engine.state_dict()  # collective: the whole model on world rank 0
    check_against_serial(stage, f"rank {comm.Get_rank()}, {grid} {schedule} ({path})")
    if comm.Get_rank() == 0:
        assert sorted(full) == sorted(serial())
        check_against_serial(full, f"the gathered model, {grid} {schedule} ({path})")
