"""``--partition profile``: per-layer F/B/W timings, agreed over ranks, and the split.

The serial tests check what is timed (the run's dtype and activation, layer
0 without an input gradient, the warm-up sweep left out, the time budget);
the MPI tests that every rank gets the same costs and stages, and that a
pipeline cut that way trains the serial weights (float64, <= 1e-9). Run with::

    mpirun -n 2 python -m pytest --with-mpi tests/test_profile_mpi.py
"""

import math
import time

import numpy as np
import pytest
from mpi4py import MPI

from mpnn.kernels import get_ops
from mpnn.kernels.numpy_ops import NumpyOps
from mpnn.parallel.partition import PartitionError, rank_loads
from mpnn.parallel.profile import LayerCost, average_costs, profile_layers, profiled_partition

from conftest import build_run, run_training, sub_world

SIZES = [20, 16, 8, 4]


class CountingOps(NumpyOps):
    """NumPy ops that record what the profiler asks of them."""

    def __init__(self):
        self.calls = []

    def linear_act(self, x, W, b, act, out):
        self.calls.append(("F", x.shape, act, x.dtype))
        return super().linear_act(x, W, b, act, out)

    def input_grad(self, dz, W, out):
        self.calls.append(("dx", out.shape))
        return super().input_grad(dz, W, out)


def test_costs_per_layer():
    costs = profile_layers(SIZES, 8, get_ops("numpy"), np.float32, "relu", repeats=3)
    assert len(costs) == 3 and all(isinstance(c, LayerCost) for c in costs)
    for c in costs:
        assert all(math.isfinite(t) and t >= 0.0 for t in c)
        assert c.total == c.forward + c.backward + c.weight


def test_run_dtype_activation_and_no_input_gradient_for_layer_0():
    ops = CountingOps()
    profile_layers(SIZES, 8, ops, np.float64, "tanh", repeats=2, budget_s=10.0)
    forward = [c for c in ops.calls if c[0] == "F"]
    # one warm-up sweep and two measured ones, each through every layer in order
    assert forward == 3 * [("F", (8, 20), "tanh", np.float64), ("F", (8, 16), "tanh", np.float64),
                           ("F", (8, 8), "identity", np.float64)]
    # dL/dx of layers 1 and 2 only: (B, I) with I = 16, 8; never (B, 20) for layer 0
    assert {c[1] for c in ops.calls if c[0] == "dx"} == {(8, 16), (8, 8)}


def test_budget_bounds_the_sweeps():
    ops = CountingOps()
    t0 = time.perf_counter()
    profile_layers([64, 64, 64], 16, ops, np.float32, "relu", repeats=1000, budget_s=0.0)
    assert time.perf_counter() - t0 < 2.0
    assert sum(c[0] == "F" for c in ops.calls) == 2 * 2  # warm-up + one measured sweep


def test_default_mlp_profile_is_quick():
    # about 5 ms on an idle core; the bound leaves room for a loaded machine
    t0 = time.perf_counter()
    stages, costs = profiled_partition([784, 256, 128, 64, 10], 2, 1, 32, get_ops("numpy"),
                                       np.float32, "relu", MPI.COMM_SELF)
    assert time.perf_counter() - t0 < 2.0
    assert len(costs) == 4 and len(stages) == 2
    assert stages[0].start == 0 and stages[-1].stop == 4 and stages[0].stop == stages[1].start


def test_serial_agreement_is_the_identity_and_bad_shapes_fail():
    costs = [LayerCost(1.0, 2.0, 3.0), LayerCost(0.5, 0.25, 0.125)]
    assert average_costs(costs, MPI.COMM_SELF) == costs
    with pytest.raises(PartitionError, match="more than the model has linear layers"):
        profiled_partition(SIZES, 2, 2, 8, get_ops("numpy"), np.float32, "relu", MPI.COMM_SELF)
    with pytest.raises(ValueError, match="one row per micro-batch"):
        profile_layers(SIZES, 0, get_ops("numpy"), np.float32, "relu")


# ---------------------------------------------------------------- under MPI


@pytest.mark.mpi(min_size=2)
def test_ranks_agree_on_the_mean():
    comm = sub_world(2)
    if comm is None:
        return
    r = comm.Get_rank()
    mine = [LayerCost(1e-3 * (r + 1), 2e-6 * (r + 1), 0.0), LayerCost(3e-5, 1e-4 * r, 7e-9)]
    mean = average_costs(mine, comm)
    assert [t for c in mean for t in c] == pytest.approx([1.5e-3, 3e-6, 0.0, 3e-5, 0.5e-4, 7e-9],
                                                       abs=1e-9)
    assert len(set(map(tuple, comm.allgather(mean)))) == 1
    comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("virtual", [1, 2])
def test_every_rank_gets_the_same_partition(virtual):
    comm = sub_world(2)
    if comm is None:
        return
    sizes = [784, 256, 128, 128, 64, 10]
    stages, costs = profiled_partition(sizes, 2, virtual, 32, get_ops("numpy"), np.float32,
                                       "relu", comm)
    assert len(stages) == 2 * virtual and len(costs) == 5
    assert len({(tuple(stages), tuple(costs)) for stages, costs in
                comm.allgather((stages, costs))}) == 1
    loads = rank_loads([c.total for c in costs], stages, 2)
    assert min(loads) > 0.0
    comm.Free()


BASE = ["--dataset", "digits", "--hidden", "24,20,16,12", "--epochs", "2", "--batch-size",
        "100", "--dtype", "float64", "--quiet", "--optimizer", "sgd", "--momentum", "0",
        "--lr", "0.2"]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("pipe", [
    ["--micro-batches", "4"],
    ["--micro-batches", "4", "--virtual-stages", "2", "--schedule", "interleaved-1f1b"],
], ids=["1f1b", "interleaved"])
def test_profiled_pipeline_trains_the_serial_weights(pipe):
    comm = sub_world(2)
    if comm is None:
        return
    run, _ = run_training(BASE + ["--pp", "2", "--partition", "profile"] + pipe, comm)
    stages = run.engine.stages
    assert len(stages) == 2 * (2 if "--virtual-stages" in pipe else 1)
    assert len({tuple(s) for s in comm.allgather(stages)}) == 1
    ref, _ = run_training(BASE)
    init = build_run(BASE).model.state_dict()
    for name, value in run.model.state_dict().items():
        assert np.max(np.abs(value - ref.model.state_dict()[name])) <= 1e-9, name
    ref_w = ref.model.state_dict()["layers.0.weight"]
    assert not np.allclose(ref_w, init["layers.0.weight"])  # the weights moved
    comm.Free()
