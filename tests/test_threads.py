"""Thread guard arithmetic: each rank's share of the node's cores, and the
oversubscription warning."""

from __future__ import annotations

import pytest
from mpi4py import MPI

from mpnn.runtime.threads import (
    available_cores,
    configure_threads,
    oversubscription_warning,
    threads_per_rank,
)


@pytest.mark.parametrize("cores,ranks,expected", [
    (2, 1, 2), (2, 2, 1), (2, 4, 1), (16, 4, 4), (16, 3, 5), (1, 1, 1), (8, 0, 8), (64, 7, 9),
])
def test_threads_per_rank(cores, ranks, expected):
    assert threads_per_rank(cores, ranks) == expected


@pytest.mark.parametrize("cores,ranks,threads", [
    (2, 1, 2), (2, 2, 1), (16, 4, 4), (16, 3, 5), (4, 1, 1),
])
def test_no_warning_within_the_cores(cores, ranks, threads):
    assert oversubscription_warning(cores, ranks, threads) is None


def test_warning_names_the_numbers_and_the_fix():
    msg = oversubscription_warning(2, 2, 2)
    assert msg is not None
    assert "2 ranks" in msg and "2 threads" in msg and "4 threads on 2 cores" in msg
    assert "--threads 1" in msg


def test_warning_when_ranks_alone_exceed_the_cores():
    msg = oversubscription_warning(2, 4, 1)
    assert "4 threads on 2 cores" in msg and "--threads 1" in msg


def test_configure_threads_serial_default_and_override():
    from threadpoolctl import threadpool_info

    n, warning = configure_threads(MPI.COMM_SELF)
    assert n == threads_per_rank(available_cores(), 1) and warning is None
    n, warning = configure_threads(MPI.COMM_SELF, threads=1)
    assert n == 1 and warning is None
    assert all(i["num_threads"] == 1 for i in threadpool_info() if i.get("user_api") == "blas")
    configure_threads(MPI.COMM_SELF)  # leave the default for the other tests
