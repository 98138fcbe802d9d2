"""Shared test set-up and helpers.

Under mpirun every test process gets its share of the cores (as the product
does for itself), so the MPI passes do not oversubscribe the machine.

Helpers (plain functions, also as fixtures of the same name):

    sub_world(ranks)             a communicator of the first ``ranks`` world ranks (None elsewhere)
    shared_dir(comm)             one temporary directory every rank of ``comm`` sees
    run_training(argv, comm)     build and train ``python -m mpnn.train argv`` on ``comm``
                                 (default: a world of one); returns (run, history)
    trained_serially(argv)       (state_dict, history) of ``argv`` trained on a world of one,
                                 cached: the reference the parallel tests compare against
    train_cli(*argv, ranks=None) ``python -m mpnn.train`` in a subprocess (under mpirun
                                 with ``ranks``); returns (exit status, stdout + stderr)
"""

import os
import subprocess
import sys
import tempfile

import pytest


def pytest_configure(config):
    from mpi4py import MPI

    from mpnn.runtime.threads import configure_threads

    under_mpirun = (os.environ.get("PMI_RANK") is not None
                    or os.environ.get("OMPI_COMM_WORLD_RANK") is not None)
    configure_threads(MPI.COMM_WORLD if under_mpirun else MPI.COMM_SELF)


def sub_world(ranks):
    """A communicator of the first ``ranks`` world ranks (None on the others)."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    inside = world.Get_rank() < ranks
    sub = world.Split(0 if inside else MPI.UNDEFINED, world.Get_rank())
    return sub if inside else None


def shared_dir(comm):
    """One temporary directory every rank of ``comm`` sees (rank 0 makes it)."""
    path = tempfile.mkdtemp(prefix="mpnn-test-") if comm.Get_rank() == 0 else None
    return comm.bcast(path, root=0)


def build_run(argv, comm=None):
    """``runtime.setup.setup`` of a ``python -m mpnn.train`` command line on ``comm``
    (default ``COMM_SELF``: a world of one), validated first as the CLI does."""
    from mpi4py import MPI

    from mpnn.runtime.checkpoint import prepare_checkpoint_dir
    from mpnn.runtime.config import validate
    from mpnn.runtime.setup import setup
    from mpnn.train import parse_config

    comm = comm if comm is not None else MPI.COMM_SELF
    config = parse_config([str(a) for a in argv])
    validate(config, comm.Get_size())
    lock = prepare_checkpoint_dir(config.checkpoint, lock=comm.Get_rank() == 0)
    comm.Barrier()
    try:
        return setup(config, comm)
    finally:  # tests run one at a time in this process: no run holds the directory after
        if lock is not None:
            lock.release()


def run_training(argv, comm=None):
    """Build and train ``argv`` on ``comm`` (default: a world of one): (run, history)."""
    from mpnn.runtime.loop import train

    run = build_run(argv, comm)
    return run, train(run, log=lambda *a: None)


_serial = {}


def trained_serially(argv):
    """The serial run's trained tensors and per-epoch metrics for ``argv`` (cached)."""
    key = tuple(argv)
    if key not in _serial:
        run, history = run_training(list(argv))
        _serial[key] = run.model.state_dict(), history
    return _serial[key]


MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")


def train_cli(*argv, ranks=None, timeout=120, env=None):
    """Run ``python -m mpnn.train argv`` (under mpirun with ``ranks``), one thread per
    rank; returns (exit status, stdout + stderr)."""
    cmd = [sys.executable, "-m", "mpnn.train", *map(str, argv)]
    if ranks:
        cmd = [MPIRUN, "-n", str(ranks), *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    return p.returncode, p.stdout + p.stderr


@pytest.fixture(name="sub_world")
def _sub_world():
    return sub_world


@pytest.fixture(name="run_training")
def _run_training():
    return run_training


@pytest.fixture
def require_data():
    """Whether a missing real dataset must fail the test (CI) rather than skip it."""
    return os.environ.get("MPNN_REQUIRE_DATA") == "1"
