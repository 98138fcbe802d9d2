"""Checkpoints across process grids, and the periodic replica check.

A run saved at ``--dp 2 --pp 2`` resumes at ``--pp 4``, at ``--dp 4`` and
serially and ends with the uninterrupted run's weights (float64, <= 1e-12;
bitwise on the same grid). Run under ``mpirun -n 2`` and ``-n 4`` with
``pytest --with-mpi``.
"""

import os
import shutil

import numpy as np
import pytest

from mpnn.runtime import checkpoint as ck
from mpnn.runtime.guards import check_replicas_agree
from mpnn.runtime.weights import load_weights

from conftest import run_training, shared_dir, sub_world

# digits: 1437 rows, batch 100: 15 steps per epoch, the last batch 37 rows
BASE = ["--dataset", "digits", "--hidden", "24,16,12", "--epochs", "2", "--batch-size", "100",
        "--dtype", "float64", "--quiet", "--optimizer", "adam", "--lr", "0.003",
        "--weight-decay", "0.01"]


def run(argv, comm):
    """Train ``argv`` on ``comm`` (None: a world of one); (history, model)."""
    built, history = run_training(argv, comm)
    return history, built.model


def max_diff(a, b):
    wa, wb = load_weights(a), load_weights(b)
    return max(float(np.max(np.abs(wa[k] - wb[k]))) for k in wb if k.startswith("layers."))


@pytest.mark.mpi(min_size=4)
def test_saved_at_dp2_pp2_resumes_at_pp4_dp4_and_serially():
    comm = sub_world(4)
    if comm is None:
        return
    d = shared_dir(comm)
    full = os.path.join(d, "full.npz")
    run(BASE + ["--dp", "2", "--pp", "2", "--micro-batches", "2", "--checkpoint-dir", f"{d}/a",
                "--checkpoint-every", "5", "--checkpoint-keep", "0", "--save", full], comm)
    at = {"same": 20, "pp4": 5, "dp4": 20}  # mid-epoch 2, mid-epoch 1, mid-epoch 2
    grids = {"same": ["--dp", "2", "--pp", "2", "--micro-batches", "2"], "pp4": ["--pp", "4"],
             "dp4": ["--dp", "4"]}
    for name, grid in grids.items():
        run(BASE + grid + ["--checkpoint-dir", f"{d}/{name}", "--resume",
                           ck.checkpoint_path(f"{d}/a", at[name]),
                           "--save", f"{d}/{name}.npz"], comm)
    serial = os.path.join(d, f"serial-{comm.Get_rank()}.npz")  # every rank resumes on its own
    run(BASE + ["--checkpoint-dir", os.path.join(d, f"s{comm.Get_rank()}"), "--resume",
                ck.checkpoint_path(f"{d}/a", 10), "--save", serial], None)
    comm.Barrier()
    assert max_diff(full, f"{d}/same.npz") == 0.0, "same grid must resume bitwise"
    for name in ("pp4", "dp4"):
        assert max_diff(full, f"{d}/{name}.npz") <= 1e-12, name
    assert max_diff(full, serial) <= 1e-12
    assert max_diff(full, ck.checkpoint_path(f"{d}/a", 5)) > 1e-3  # training moved the weights
    comm.Barrier()
    if comm.Get_rank() == 0:
        shutil.rmtree(d)
    comm.Free()


@pytest.mark.mpi(min_size=2)
def test_pipeline_checkpoint_gathers_the_serial_state():
    """Stages send parameters *and* optimizer state: the file equals a serial run's."""
    comm = sub_world(2)
    if comm is None:
        return
    d = shared_dir(comm)
    argv = BASE + ["--epochs", "1", "--checkpoint-every", "7", "--checkpoint-keep", "0"]
    run(argv + ["--pp", "2", "--micro-batches", "3", "--checkpoint-dir", f"{d}/pipe"], comm)
    try:  # (a failed assert on rank 0 must not leave rank 1 waiting in the barrier)
        if comm.Get_rank() == 0:
            run(argv + ["--checkpoint-dir", f"{d}/serial"], None)
            pipe = ck.read_checkpoint(ck.checkpoint_path(f"{d}/pipe", 7))
            ser = ck.read_checkpoint(ck.checkpoint_path(f"{d}/serial", 7))
            assert pipe.meta["grid"] == {"dp": 1, "pp": 2, "tp": 1, "zero": 0}
            assert ser.meta["grid"] == {"dp": 1, "pp": 1, "tp": 1, "zero": 0}
            for key in ("step", "epoch", "batch", "optimizer_t", "config"):
                assert pipe.meta[key] == ser.meta[key], key
            assert pipe.meta["epoch_loss_sum"] == pytest.approx(ser.meta["epoch_loss_sum"],
                                                                rel=1e-12)
            for name in ser.params:
                np.testing.assert_allclose(pipe.params[name], ser.params[name], rtol=0,
                                           atol=1e-12)
            for name in ("m", "v"):
                np.testing.assert_allclose(pipe.optim[name], ser.optim[name], rtol=0,
                                           atol=1e-12)
            shutil.rmtree(d)
    finally:
        comm.Barrier()
    comm.Free()


@pytest.mark.mpi(min_size=2)
def test_diverged_replica_is_named():
    from mpi4py import MPI

    from mpnn.nn.model import MLP

    world = MPI.COMM_WORLD
    size = world.Get_size()
    model = MLP([5, 4, 3], seed=1)
    check_replicas_agree(world, model.flat, "after epoch 1")  # all equal: passes
    if world.Get_rank() == 1:
        model.flat.data[3] += 1e-7
    with pytest.raises(RuntimeError) as e:
        check_replicas_agree(world, model.flat, "after epoch 3")
    msg = str(e.value)
    assert "data-parallel replicas hold different parameters after epoch 3" in msg
    if size > 2:
        others = [r for r in range(size) if r != 1]
        assert f"ranks [1] diverged from the other replicas (ranks {others})" in msg
    else:
        assert "no majority" in msg
        assert "ranks [0] hold crc32" in msg and "ranks [1] hold crc32" in msg


@pytest.mark.mpi(min_size=2)
def test_training_stops_when_a_replica_diverges(monkeypatch):
    """A replica whose update differs is caught at the next epoch end, before its checkpoint."""
    import mpnn.runtime.loop as mt

    comm = sub_world(2)
    if comm is None:
        return
    real = mt.make_optimizer

    def drifting(*a, **kw):
        opt = real(*a, **kw)
        step = opt.step

        def drift(lr=None):
            step(lr)
            if comm.Get_rank() == 1 and opt.t == 4:
                opt.flat.data[0] += 1e-9  # a silent single-element difference
        opt.step = drift
        return opt

    monkeypatch.setattr(mt, "make_optimizer", drifting)
    d = shared_dir(comm)
    with pytest.raises(RuntimeError, match="hold different parameters after epoch 1: replicas "
                                           "disagree with no majority"):
        run(BASE + ["--epochs", "1", "--checkpoint-dir", d], comm)
    assert os.listdir(d) == []  # nothing was checkpointed from the diverged state
    comm.Barrier()
    if comm.Get_rank() == 0:
        shutil.rmtree(d)
    comm.Free()
