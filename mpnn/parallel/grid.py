"""The MPI process grid: ``dp`` data-parallel replicas x ``pp`` pipeline stages.

Built once at the entry point with ``Create_cart([dp, pp])`` and passed down;
the math never imports MPI. Consecutive world ranks form one pipeline:
world rank ``r`` sits at coordinates ``(r // pp, r % pp)``.

    dp_comm   the ranks holding the same stage in different replicas (gradient Allreduce)
    pp_comm   the ranks of one pipeline, in stage order (activation/gradient Send/Recv)

See docs/parallelism.md#3-the-grid-which-communicator-carries-what.
"""

from __future__ import annotations

from dataclasses import dataclass


class GridError(ValueError):
    """A world size, ``--dp`` and ``--pp`` that do not fit together."""


def grid_shape(world_size, dp=None, pp=1):
    """(dp, pp) for a world of ``world_size`` ranks; ``dp`` defaults to world / pp."""
    if pp < 1 or (dp is not None and dp < 1):
        raise GridError(f"--dp and --pp must be positive integers (got dp={dp}, pp={pp})")
    if dp is None:
        if world_size % pp:
            raise GridError(f"{world_size} MPI ranks cannot be split into pipelines of "
                            f"--pp {pp} stages: run with a multiple of {pp} ranks "
                            f"(mpirun -n {pp * max(1, world_size // pp)}) or change --pp")
        dp = world_size // pp
    if dp * pp != world_size:
        raise GridError(f"--dp {dp} x --pp {pp} = {dp * pp} ranks, but the job has "
                        f"{world_size}: run with mpirun -n {dp * pp} or change --dp/--pp")
    return dp, pp


@dataclass
class Grid:
    world: object  # MPI communicator of all ranks (or None for a serial run)
    dp: int
    pp: int
    dp_rank: int
    pp_rank: int
    dp_comm: object
    pp_comm: object


def make_grid(comm, dp=None, pp=1):
    """Build the cartesian dp x pp grid over ``comm`` (validated first)."""
    dp, pp = grid_shape(comm.Get_size(), dp, pp)
    cart = comm.Create_cart([dp, pp], periods=[False, False], reorder=False)
    dp_rank, pp_rank = cart.Get_coords(cart.Get_rank())
    dp_comm = cart.Sub([True, False])
    pp_comm = cart.Sub([False, True])
    return Grid(cart, dp, pp, dp_rank, pp_rank, dp_comm, pp_comm)
