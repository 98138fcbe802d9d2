"""The schedules beyond 1F1B train the serial model: interleaved virtual stages
(--virtual-stages) and zero bubble (B and W split), at --pp 2, --pp 4 and
--dp 2 --pp 2, with Adam and SGD with momentum, a last partial batch included
(float64, max abs difference <= 1e-9); a checkpoint of an interleaved run
resumes on another grid. Run under ``mpirun -n 2`` and ``-n 4``."""

import shutil

import numpy as np
import pytest

from mpnn.runtime import checkpoint as ck
from mpnn.runtime.weights import load_weights

from conftest import run_training, shared_dir, sub_world, trained_serially

# 8 linear layers, so 4 ranks x 2 chunks each still hold one layer per stage; digits'
# 1437 rows at --batch-size 100 leave a last batch of 37 rows (19 + 18 over 2 replicas)
BASE = ["--dataset", "digits", "--hidden", "16,16,16,16,16,16,16", "--epochs", "2",
        "--batch-size", "100", "--dtype", "float64", "--quiet"]
OPTIMIZERS = {
    "adam": ["--optimizer", "adam", "--lr", "0.003", "--weight-decay", "0.01"],
    "momentum": ["--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05"],
}
GRIDS = {  # name: (ranks, options)
    "pp2": (2, ["--pp", "2", "--micro-batches", "4"]),
    "pp4": (4, ["--pp", "4", "--micro-batches", "4"]),
    "dp2xpp2": (4, ["--dp", "2", "--pp", "2", "--micro-batches", "4"]),
}
SCHEDULES = {
    "interleaved-1f1b": ["--schedule", "interleaved-1f1b", "--virtual-stages", "2"],
    "zb-h1": ["--schedule", "zb-h1"],
    "zb-h2": ["--schedule", "zb-h2"],
}
@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("grid", [pytest.param(g, marks=pytest.mark.mpi(min_size=n))
                                  for g, (n, _) in GRIDS.items()])
def test_schedule_matches_serial(grid, schedule, optimizer):
    ranks, pipe = GRIDS[grid]
    comm = sub_world(ranks)
    if comm is None:
        return
    argv = BASE + OPTIMIZERS[optimizer]
    run, history = run_training(argv + pipe + SCHEDULES[schedule], comm)
    ref, ref_history = trained_serially(argv)
    for name, value in run.model.state_dict().items():  # this rank's chunks' tensors
        diff = np.max(np.abs(value - ref[name]))
        assert diff <= 1e-9, f"{name} on rank {comm.Get_rank()}: {diff:.3e}"
    assert set(run.model.state_dict()) == {
        f"layers.{i}.{k}" for c in run.model.chunks for i in c for k in ("weight", "bias")}
    for a, b in zip(history, ref_history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-12)
        assert 0.0 <= a["bubble"] < 1.0
    assert run.engine.peak_live == run.engine.expected_peak_live  # the simulator's count
    comm.Free()


@pytest.mark.mpi(min_size=4)
def test_empty_micro_batches_under_zero_bubble_and_interleaved():
    # --batch-size 718: the last batch has 1 row, so most micro-batches are empty
    comm = sub_world(4)
    if comm is None:
        return
    argv = [a if a != "100" else "718" for a in BASE] + OPTIMIZERS["momentum"]
    ref, _ = trained_serially(argv)
    for schedule in ("zb-h2", "interleaved-1f1b"):
        extra = SCHEDULES[schedule] + ["--dp", "2", "--pp", "2", "--micro-batches", "4"]
        run, _ = run_training(argv + extra, comm)
        for name, value in run.model.state_dict().items():
            assert np.max(np.abs(value - ref[name])) <= 1e-9, (schedule, name)
    comm.Free()


@pytest.mark.mpi(min_size=2)
def test_interleaved_checkpoint_and_save_are_in_layer_order():
    # a checkpoint of an interleaved run (rank 0 holds stages 0 and 2, rank 1 stages
    # 1 and 3) holds the whole model in layer order: a serial resume ends where the
    # uninterrupted serial run ends, and --save is the serial model
    comm = sub_world(2)
    if comm is None:
        return
    d = shared_dir(comm)
    argv = BASE + OPTIMIZERS["adam"]
    inter = SCHEDULES["interleaved-1f1b"] + ["--pp", "2", "--micro-batches", "4"]
    run_training(argv + inter + ["--checkpoint-dir", f"{d}/a", "--checkpoint-every", "15",
                                 "--checkpoint-keep", "0", "--save", f"{d}/inter.npz"], comm)
    problems = []  # rank 0 checks, every rank learns the verdict (no rank left waiting)
    if comm.Get_rank() == 0:
        full, _ = trained_serially(argv)
        saved = load_weights(f"{d}/inter.npz")
        if list(saved) != list(full):
            problems.append(f"--save names {list(saved)}")
        problems += [f"--save {name}" for name in full
                     if np.max(np.abs(saved[name] - full[name])) > 1e-9]
        after_epoch_1 = ck.checkpoint_path(f"{d}/a", 15)  # 15 steps of 100 rows per epoch
        run, _ = run_training(argv + ["--checkpoint-dir", f"{d}/s", "--resume", after_epoch_1])
        problems += [f"resumed {name}" for name, value in run.model.state_dict().items()
                     if np.max(np.abs(value - full[name])) > 1e-9]
        shutil.rmtree(d)
    assert comm.bcast(problems, root=0) == []
    comm.Free()
