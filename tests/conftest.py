"""Shared test set-up.

Under mpirun every test process gets its share of the cores (as the product
does for itself), so the MPI passes do not oversubscribe the machine.
"""

import os

import pytest


def pytest_configure(config):
    from mpnn.runtime.threads import configure_threads

    comm = None
    if os.environ.get("PMI_RANK") is not None or os.environ.get("OMPI_COMM_WORLD_RANK") is not None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    configure_threads(comm)


@pytest.fixture
def require_data():
    """Whether a missing real dataset must fail the test (CI) rather than skip it."""
    return os.environ.get("MPNN_REQUIRE_DATA") == "1"
