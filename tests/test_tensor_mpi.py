"""Tensor parallelism trains the serial model: --tp 2, --tp 4, --dp 2 --tp 2 and
--tp 2 --pp 2 (1F1B and GPipe), relu and tanh, Adam and SGD with momentum, a last
partial batch (float64, max abs difference <= 1e-9); a --tp checkpoint resumes at
--dp 4, at --pp 2 and serially; the sharded layers' parameter bytes are 1/T of the
serial ones. Run under ``mpirun -n 2`` and ``-n 4``."""

import shutil

import numpy as np
import pytest

from mpnn.parallel.tensor import COLUMN, ROW
from mpnn.runtime import checkpoint as ck

from conftest import run_training, shared_dir, sub_world, trained_serially

# 6 linear layers: three column/row pairs in one stage, or 3 | 3 (a pair and a
# replicated layer each) over two stages; 14, 10 and 9 are split unevenly by 4.
# digits' 1437 rows at --batch-size 100 leave a last batch of 37 rows
BASE = ["--dataset", "digits", "--hidden", "16,14,12,10,9", "--epochs", "2",
        "--batch-size", "100", "--dtype", "float64", "--quiet"]
OPTIMIZERS = {
    "adam": ["--optimizer", "adam", "--lr", "0.003", "--weight-decay", "0.01"],
    "momentum": ["--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05"],
}
GRIDS = {  # name: (ranks, options)
    "tp2": (2, ["--tp", "2"]),
    "tp4": (4, ["--tp", "4"]),
    "dp2xtp2": (4, ["--dp", "2", "--tp", "2"]),
    "tp2xpp2-1f1b": (4, ["--tp", "2", "--pp", "2", "--micro-batches", "3"]),
    "tp2xpp2-gpipe": (4, ["--tp", "2", "--pp", "2", "--micro-batches", "3", "--schedule",
                          "gpipe"]),
}


def _assert_serial(run, ref, comm, tol=1e-9):
    """Every rank's stage, its shards put together (collective over its tp ranks),
    equals the serial model; tp rank 0 of each stage holds the whole tensors."""
    mine = run.model.state_dict()
    assert bool(mine) == (run.grid.tp_rank == 0)
    if mine:
        assert set(mine) == {f"layers.{i}.{k}" for i in run.model.layers
                             for k in ("weight", "bias")}
    for name, value in mine.items():
        diff = np.max(np.abs(value - ref[name]))
        assert diff <= tol, f"{name} on rank {comm.Get_rank()}: {diff:.3e}"


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("grid", [pytest.param(g, marks=pytest.mark.mpi(min_size=n))
                                  for g, (n, _) in GRIDS.items()])
def test_tensor_parallel_matches_serial(grid, activation, optimizer):
    ranks, opts = GRIDS[grid]
    comm = sub_world(ranks)
    if comm is None:
        return
    argv = BASE + OPTIMIZERS[optimizer] + ["--activation", activation]
    run, history = run_training(argv + opts, comm)
    ref, ref_history = trained_serially(argv)
    _assert_serial(run, ref, comm)
    for a, b in zip(history, ref_history, strict=True):  # one tp rank reports the loss
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-9)
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-12)
    comm.Free()


@pytest.mark.mpi(min_size=4)
def test_tensor_checkpoint_resumes_on_other_grids_and_serially():
    comm = sub_world(4)
    if comm is None:
        return
    d = shared_dir(comm)
    argv = BASE + OPTIMIZERS["adam"]
    ref, _ = trained_serially(argv)
    run_training(argv + ["--tp", "4", "--checkpoint-dir", f"{d}/a", "--checkpoint-every", "15",
                         "--checkpoint-keep", "0"], comm)
    after_epoch_1 = ck.checkpoint_path(f"{d}/a", 15)  # 15 steps of 100 rows per epoch
    for opts in (["--dp", "4"], ["--pp", "2", "--dp", "2"], ["--tp", "2", "--pp", "2"]):
        tag = "".join(opts).replace("-", "")
        run, _ = run_training(argv + opts + ["--checkpoint-dir", f"{d}/{tag}",
                                             "--resume", after_epoch_1], comm)
        if run.grid.tp == 1:  # whole tensors of this rank's layers on every rank
            for name, value in run.model.state_dict().items():
                assert np.max(np.abs(value - ref[name])) <= 1e-9, (opts, name)
        else:
            _assert_serial(run, ref, comm)
    problems = []  # rank 0 resumes serially; every rank learns the verdict
    if comm.Get_rank() == 0:
        run, _ = run_training(argv + ["--checkpoint-dir", f"{d}/s", "--resume", after_epoch_1])
        problems = [name for name, value in run.model.state_dict().items()
                    if np.max(np.abs(value - ref[name])) > 1e-9]
        shutil.rmtree(d)
    assert comm.bcast(problems, root=0) == []
    comm.Free()


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_parameter_bytes_are_one_over_t(tp):
    from mpi4py import MPI

    comm = sub_world(tp)
    if comm is None:
        return
    argv = ["--dataset", "digits", "--hidden", "32,24,16", "--epochs", "1", "--quiet",
            "--tp", str(tp)]
    from conftest import build_run

    run = build_run(argv, comm)
    model = run.model
    sharded = [i for i in model.layers if model.roles[i] in (COLUMN, ROW)]
    assert sharded == list(model.layers)  # 4 layers: two pairs, all of them split
    for i in sharded:  # 32, 24, 16 are multiples of 2 and 4: exactly 1/T of the weight
        serial = model.sizes[i] * model.sizes[i + 1]
        assert model.W(i).nbytes * tp == serial * 8 // 2  # float32: 4 bytes
    total = comm.allreduce(model.flat.data.nbytes, op=MPI.SUM)
    row_biases = sum(model.sizes[i + 1] for i in sharded if model.roles[i] == ROW)
    whole = sum(a.nbytes for a in run.model.whole_layout.views(
        np.zeros(model.whole_layout.numel, np.float32)).values())
    assert total == whole + (tp - 1) * row_biases * 4  # only the row biases are copied
    report = run.engine.memory()
    assert report["params"] == model.flat.data.nbytes and report["grads"] == model.flat.grad.nbytes
    comm.Free()
