"""What a parameter-server run (``--servers``, ``parallel.param_server``) can take,
checked on every rank before any message (no MPI here)."""

from __future__ import annotations

SYNCS = ("bsp", "ssp", "asp")
DEFAULT_STALENESS = 2  # --sync ssp without --staleness


class PsConfigError(ValueError):
    """Options a parameter-server run cannot take."""


def check_ps_config(sync, servers, staleness, straggler, world_size, pp=1, tp=1, zero=0,
                    allreduce="flat", backend="numba", every=None, batch_size=64):
    """Raise PsConfigError for a --sync/--servers/--staleness/--straggler that cannot run."""
    if sync not in SYNCS:
        raise PsConfigError(f"unknown --sync {sync!r}; choose bsp, ssp or asp")
    if staleness is not None and staleness < 0:
        raise PsConfigError(f"--staleness {staleness}: give a number of steps >= 0")
    if staleness is not None and sync != "ssp":
        raise PsConfigError(f"--staleness bounds stale-synchronous training: add --sync ssp "
                            f"(--sync {sync} does not take it)")
    if not servers:
        if straggler is not None:
            raise PsConfigError("--straggler slows a parameter-server worker: add --servers K "
                                "(and --sync)")
        return
    if servers < 0:
        raise PsConfigError(f"--servers {servers}: give a number of server ranks >= 1")
    if world_size <= servers:
        raise PsConfigError(f"--servers {servers} leaves no worker among {world_size} rank"
                            f"{'s' if world_size > 1 else ''}: run under mpirun -n "
                            f"{servers + 1} or more, or use fewer servers")
    others = [name for name, on in (("--pp", pp > 1), ("--tp", tp > 1), ("--zero", zero),
                                    ("--allreduce hierarchical", allreduce != "flat")) if on]
    if others:
        raise PsConfigError(f"--servers holds the parameters on server ranks and workers "
                            f"compute whole-model gradients; it does not combine with "
                            f"{', '.join(others)}: drop one or the other")
    if backend == "cupy":
        raise PsConfigError("--servers exchanges host (NumPy) buffers and --backend cupy "
                            "keeps them on the GPU: use --backend numba")
    if every is not None and every.unit == "steps":
        raise PsConfigError(f"--checkpoint-every {every.n}: parameter-server runs checkpoint "
                            f"at epoch ends (workers are at different batches in between): "
                            f"give epochs, e.g. --checkpoint-every 1e")
    workers = world_size - servers
    if sync == "bsp" and batch_size < workers:
        raise PsConfigError(f"--batch-size {batch_size} is smaller than the {workers} workers: "
                            f"under --sync bsp each takes a share of every global batch; use "
                            f"--batch-size >= {workers} or fewer ranks")
    if straggler is not None:
        rank, factor = straggler
        if not servers <= rank < world_size:
            raise PsConfigError(f"--straggler {rank}:{factor:g}: world rank {rank} is not a "
                                f"worker (the workers are ranks {servers}..{world_size - 1})")


def parse_straggler(text):
    """``RANK:FACTOR`` -> (rank, factor >= 1) (argparse type)."""
    import argparse

    try:
        rank, factor = text.split(":")
        rank, factor = int(rank), float(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected RANK:FACTOR, e.g. 1:3") from None
    if rank < 0 or not factor >= 1 or factor == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: the rank must be >= 0 and the factor a "
                                         f"finite number >= 1 (3: three times slower)")
    return rank, factor
