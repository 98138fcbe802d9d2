"""Tensor parallelism without MPI ranks: the pairing, the shards, the width check,
and a one-rank sharded model equal to the MLP (see test_tensor_mpi.py for T > 1)."""

import numpy as np
import pytest
from mpi4py import MPI

from mpnn.data.batching import share_bounds
from mpnn.nn.model import MLP, Context
from mpnn.parallel.tensor import (
    COLUMN,
    REPLICATED,
    ROW,
    TensorConfigError,
    TensorParallelMLP,
    check_tensor_widths,
    shard_shapes,
    shard_slices,
    tensor_roles,
)


def test_layers_pair_inside_each_chunk():
    assert tensor_roles([range(0, 4)]) == {0: COLUMN, 1: ROW, 2: COLUMN, 3: ROW}
    # an odd chunk keeps its last layer whole: the output layer of a 3-layer model
    assert tensor_roles([range(0, 3)]) == {0: COLUMN, 1: ROW, 2: REPLICATED}
    # pipeline stages (or interleaved chunks) pair on their own: no pair crosses a cut
    assert tensor_roles([range(0, 3), range(3, 5)]) == {
        0: COLUMN, 1: ROW, 2: REPLICATED, 3: COLUMN, 4: ROW}


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 5])
def test_shards_tile_every_tensor_exactly_once(tp):
    sizes = [9, 7, 6, 10, 5, 3]  # 7, 6, 10, 5 split unevenly by most tp
    roles = tensor_roles([range(0, 5)])
    for i, role in roles.items():
        W = np.zeros((sizes[i], sizes[i + 1]), int)
        b = np.zeros(sizes[i + 1], int)
        for t in range(tp):
            shapes, part = shard_shapes(sizes, roles, t, tp)[i], shard_slices(sizes, roles, t, tp)
            assert W[part[f"layers.{i}.weight"]].shape == shapes[0]
            assert b[part[f"layers.{i}.bias"]].shape == shapes[1]
            W[part[f"layers.{i}.weight"]] += 1
            b[part[f"layers.{i}.bias"]] += 1
        copies = 1 if role == COLUMN else tp  # a row layer's bias is whole on every rank
        assert (W == (tp if role == REPLICATED else 1)).all()
        assert (b == copies).all()
        if role == COLUMN:  # split by output features as share_bounds cuts rows
            assert [shard_shapes(sizes, roles, t, tp)[i][0][1] for t in range(tp)] == [
                hi - lo for lo, hi in (share_bounds(sizes[i + 1], t, tp) for t in range(tp))]


def test_too_narrow_a_hidden_layer_is_refused_with_what_works():
    check_tensor_widths([8, 5, 6], 5)
    with pytest.raises(TensorConfigError, match=r"--tp 6 cannot split layer 1 \(its 5 output "
                                                 r"features\) 6 ways.*use --tp 5 or less"):
        check_tensor_widths([8, 5, 6], 6)
    from mpnn.runtime.config import ConfigError, validate
    from mpnn.train import parse_config

    with pytest.raises(ConfigError, match=r"--tp 4 cannot split layer 1 \(its 3 output"):
        validate(parse_config(["--dataset", "digits", "--hidden", "32,3", "--tp", "4"]), 4)


def test_ranks_that_do_not_fit_the_grid_are_refused():
    from mpnn.runtime.config import ConfigError, validate
    from mpnn.train import parse_config

    with pytest.raises(ConfigError, match=r"3 MPI ranks cannot be split into replicas of "
                                          r"--pp 1 stages x --tp 2 shards = 2 ranks"):
        validate(parse_config(["--dataset", "digits", "--tp", "2"]), 3)
    with pytest.raises(ConfigError, match=r"--dp 2 x --pp 1 x --tp 2 = 4 ranks, but the job "
                                          r"has 6"):
        validate(parse_config(["--dataset", "digits", "--tp", "2", "--dp", "2"]), 6)


@pytest.mark.parametrize("sizes", [(6, 5, 4, 3), (6, 5, 4, 7, 3)])
def test_one_shard_is_the_mlp(sizes):
    # T = 1: the sharded model's arithmetic is the MLP's, op for op (row layers: the
    # matmul, a no-op Allreduce, then bias and activation; bitwise the fused op here)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 6))
    ref = MLP(sizes, "tanh", np.float64, seed=3)
    tp = TensorParallelMLP(sizes, "tanh", np.float64, 3, tp_comm=MPI.COMM_SELF)
    assert np.array_equal(ref.flat.data, tp.flat.data)  # the serial initial weights
    outs = []
    for model in (ref, tp):
        ctx = Context()
        out = model.forward(x, ctx)
        model.zero_grad()
        dx = model.backward(np.ones_like(out), ctx, need_input_grad=True)
        outs.append((out.copy(), dx.copy(), model.flat.grad.copy()))
    for a, b in zip(*outs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)


def test_whole_stage_and_local_of_round_trip_on_one_rank():
    model = TensorParallelMLP((6, 5, 4, 3), "relu", np.float64, 1, tp_comm=MPI.COMM_SELF)
    whole = model.whole_stage({"p": model.flat.data.copy()})["p"]
    assert np.array_equal(whole, MLP((6, 5, 4, 3), "relu", np.float64, 1).flat.data)
    assert np.array_equal(model.local_of(whole), model.flat.data)
    assert model.state_dict().keys() == MLP((6, 5, 4, 3)).state_dict().keys()


def test_timeline_labels_name_the_grid_position():
    from mpnn.runtime.loop import rank_label

    assert rank_label(5, 2) == "rank 5 (dp 2, stage 1)"  # dp x pp, as before
    # -n 8 --dp 2 --pp 2 --tp 2: world rank 5 sits at (1, 0, 1)
    assert rank_label(5, 2, 2) == "rank 5 (dp 1, stage 0, tp 1)"
    assert rank_label(1, 1, 2) == "rank 1 (dp 0, stage 0, tp 1)"
