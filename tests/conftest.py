"""Shared test set-up and helpers.

Under mpirun every test process gets its share of the cores (as the product
does for itself), so the MPI passes do not oversubscribe the machine.

Helpers (plain functions, also as fixtures of the same name):

    sub_world(ranks)             a communicator of the first ``ranks`` world ranks (None elsewhere)
    shared_dir(comm)             one temporary directory every rank of ``comm`` sees
    run_training(argv, comm)     build and train ``python -m mpnn.train argv`` on ``comm``
                                 (default: a world of one); returns (run, history)
"""

import os
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
    if comm.Get_rank() == 0:
        prepare_checkpoint_dir(config.checkpoint)
    comm.Barrier()
    return setup(config, comm)


def run_training(argv, comm=None):
    """Build and train ``argv`` on ``comm`` (default: a world of one): (run, history)."""
    from mpnn.runtime.loop import train

    run = build_run(argv, comm)
    return run, train(run, log=lambda *a: None)


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
