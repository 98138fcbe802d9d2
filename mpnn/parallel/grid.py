"""The MPI process grid: ``dp`` data-parallel replicas x ``pp`` pipeline stages x
``tp`` tensor-parallel shards.

Built once at the entry point with ``Create_cart([dp, pp, tp])`` and passed
down; the math never imports MPI. The tensor-parallel ranks of one stage are
consecutive (they talk most, twice per layer pair and micro-batch), then the
stages of one pipeline: world rank ``r`` sits at coordinates
``(r // (pp·tp), (r // tp) % pp, r % tp)``. With ``tp = 1`` that is the
``(r // pp, r % pp)`` of a dp x pp grid.

    dp_comm   the ranks holding the same shard of the same stage in different
              replicas (gradient Allreduce)
    pp_comm   the ranks of one pipeline with the same shard index, in stage
              order (activation/gradient Send/Recv)
    tp_comm   the ranks sharing one stage's layers (the layers' own Allreduces)
    mp_comm   every rank of one replica (pp x tp of them: the ranks that
              compute one forward pass together)

See docs/parallelism.md#3-the-grid-which-communicator-carries-what.
"""

from __future__ import annotations

from dataclasses import dataclass


class GridError(ValueError):
    """A world size, ``--dp``, ``--pp`` and ``--tp`` that do not fit together."""


def grid_shape(world_size, dp=None, pp=1, tp=1):
    """(dp, pp) for a world of ``world_size`` ranks; ``dp`` defaults to world / (pp·tp)."""
    if pp < 1 or tp < 1 or (dp is not None and dp < 1):
        raise GridError(f"--dp, --pp and --tp must be positive integers (got dp={dp}, pp={pp}, "
                        f"tp={tp})")
    shards = "" if tp == 1 else f" x --tp {tp}"
    per = pp * tp
    if dp is None:
        if world_size % per:
            what = (f"pipelines of --pp {pp} stages" if tp == 1 else
                    f"replicas of --pp {pp} stages x --tp {tp} shards = {per} ranks")
            raise GridError(f"{world_size} MPI ranks cannot be split into {what}: run with a "
                            f"multiple of {per} ranks (mpirun -n {per * max(1, world_size // per)})"
                            f" or change --pp{'/--tp' if tp > 1 else ''}")
        dp = world_size // per
    if dp * per != world_size:
        raise GridError(f"--dp {dp} x --pp {pp}{shards} = {dp * per} ranks, but the job has "
                        f"{world_size}: run with mpirun -n {dp * per} or change "
                        f"--dp/--pp{'/--tp' if tp > 1 else ''}")
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
    tp: int = 1
    tp_rank: int = 0
    tp_comm: object = None
    mp_comm: object = None  # the replica's ranks: pp x tp


def make_grid(comm, dp=None, pp=1, tp=1):
    """Build the cartesian dp x pp x tp grid over ``comm`` (validated first)."""
    dp, pp = grid_shape(comm.Get_size(), dp, pp, tp)
    cart = comm.Create_cart([dp, pp, tp], periods=[False, False, False], reorder=False)
    dp_rank, pp_rank, tp_rank = cart.Get_coords(cart.Get_rank())
    return Grid(cart, dp, pp, dp_rank, pp_rank, cart.Sub([True, False, False]),
                cart.Sub([False, True, False]), tp, tp_rank, cart.Sub([False, False, True]),
                cart.Sub([False, True, True]))
