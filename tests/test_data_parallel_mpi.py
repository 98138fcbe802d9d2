"""The project's central test: data-parallel training equals serial training.

For the same seed and global batch, every rank count must produce the same
weights as a serial run, up to floating-point summation order (float64:
max abs difference <= 1e-9), the last partial batch included.
Run under ``mpirun -n 2`` and ``-n 4`` with ``pytest --with-mpi``.
"""

import numpy as np
import pytest

from conftest import build_run, run_training, sub_world

# digits: 1437 training rows, so --batch-size 100 leaves a last batch of 37 rows,
# which 4 ranks share as 10, 9, 9, 9.
BASE = ["--dataset", "digits", "--hidden", "32,16", "--epochs", "2", "--batch-size", "100",
        "--dtype", "float64", "--quiet"]
OPTIMIZERS = {
    "sgd": ["--optimizer", "sgd", "--momentum", "0", "--lr", "0.2"],
    "nesterov": ["--optimizer", "sgd", "--momentum", "0.9", "--nesterov", "--lr", "0.05",
                 "--weight-decay", "1e-4"],
    "adam": ["--optimizer", "adam", "--lr", "0.003", "--weight-decay", "0.01"],
}


def weights(argv, comm=None):
    """Trained weights and per-epoch metrics of ``argv`` on ``comm`` (default: serial)."""
    run, history = run_training(argv, comm)
    return run.model.state_dict(), history


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("ranks", [2, pytest.param(4, marks=pytest.mark.mpi(min_size=4))])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_data_parallel_weights_match_serial(ranks, optimizer):
    argv = BASE + OPTIMIZERS[optimizer]
    comm = sub_world(ranks)
    if comm is None:
        return  # this rank is not part of the ranks-sized job
    parallel, hist_par = weights(argv, comm)
    serial, hist_ser = weights(argv)
    assert parallel.keys() == serial.keys()
    for name in serial:
        diff = np.max(np.abs(parallel[name] - serial[name]))
        assert diff <= 1e-9, f"{name}: max |parallel - serial| = {diff:.3e} at {ranks} ranks"
    # the weights moved, so the comparison is not vacuous
    assert not np.allclose(serial["layers.0.weight"], run_init(argv)["layers.0.weight"])
    # reduced metrics agree too (summation order only)
    for a, b in zip(hist_par, hist_ser, strict=True):
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-12)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
    comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("bucket_mb", ["0", "1e-6", "0.1"])
def test_ranks_with_no_rows_of_the_last_batch(bucket_mb):
    # --batch-size 718: the last global batch of digits' 1437 rows has 1 row, so
    # every rank but rank 0 has nothing to compute in that step; it must still
    # take part in every gradient sum (each bucket's collective, in order).
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    argv = [a if a != "100" else "718" for a in BASE] + OPTIMIZERS["sgd"] + [
        "--hidden", "24,16,12", "--bucket-mb", bucket_mb]
    parallel, _ = weights(argv, comm)
    serial, _ = weights(argv)
    for name in serial:
        diff = np.max(np.abs(parallel[name] - serial[name]))
        assert diff <= 1e-9, f"{name}: {diff:.3e} with --bucket-mb {bucket_mb}"


def run_init(argv):
    return build_run(argv).model.state_dict()


@pytest.mark.mpi(min_size=2)
def test_every_rank_reports_same_metrics():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    _, history = run_training(BASE + OPTIMIZERS["adam"] + ["--epochs", "1"], comm)
    record = np.array([history[-1]["train_loss"], history[-1]["test_accuracy"]])
    gathered = np.empty((comm.Get_size(), 2))
    comm.Allgather(record, gathered)
    assert np.all(gathered == gathered[0])
