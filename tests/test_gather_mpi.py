"""``gather_whole``: the stages' flat arrays, concatenated in stage order, on world rank 0.

    mpirun -n 4 python -m pytest --with-mpi -m mpi tests/test_gather_mpi.py

The grid of one is tested in ``test_gather.py``.
"""

import numpy as np
import pytest

from mpnn.parallel.gather import gather_whole
from mpnn.parallel.grid import make_grid

from conftest import sub_world


def _stage_arrays(dp_rank, pp_rank):
    """Stage s holds 3 + 2s elements (different lengths), in two dtypes; replicas differ
    so that the test sees which replica was gathered."""
    n, start = 3 + 2 * pp_rank, sum(3 + 2 * s for s in range(pp_rank))
    params = np.arange(start, start + n, dtype=np.float64) + 1000 * dp_rank  # (n_s,)
    return {"params": params, "m": params.astype(np.float32) / 2}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dp,pp", [(1, 2), (2, 2), (1, 4)])
def test_whole_model_on_world_rank_0(dp, pp):
    from mpi4py import MPI

    if dp * pp > MPI.COMM_WORLD.Get_size():
        pytest.skip(f"needs {dp * pp} ranks")
    comm = sub_world(dp * pp)
    if comm is None:
        return
    grid = make_grid(comm, dp, pp)
    whole = gather_whole(grid, _stage_arrays(grid.dp_rank, grid.pp_rank))
    if comm.Get_rank() == 0:
        n = sum(3 + 2 * s for s in range(pp))
        assert whole["params"].dtype == np.float64 and whole["m"].dtype == np.float32
        assert np.array_equal(whole["params"], np.arange(n, dtype=np.float64))  # replica 0's
        assert np.array_equal(whole["m"], np.arange(n, dtype=np.float32) / 2)
    else:
        assert whole is None
    comm.Free()
