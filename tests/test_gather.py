"""``gather_whole`` on a grid of one: the arrays themselves, no copy, no message
(the stages of a pipeline are in ``test_gather_mpi.py``)."""

import numpy as np
from mpi4py import MPI

from mpnn.parallel.gather import gather_whole
from mpnn.parallel.grid import make_grid


def test_grid_of_one_returns_the_arrays():
    grid = make_grid(MPI.COMM_SELF)
    arrays = {"params": np.arange(3.0), "m": np.arange(3, dtype=np.float32)}
    whole = gather_whole(grid, arrays)
    assert list(whole) == ["params", "m"]
    assert all(whole[k] is arrays[k] for k in arrays)
