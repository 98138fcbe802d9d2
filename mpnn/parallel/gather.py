"""The whole model from its pipeline stages: one Gatherv per flat array, to world rank 0.

Every stage holds a contiguous range of the model's layers, and its flat
buffers (parameters, and optimizer state in the same layout) are exactly the
segment of the whole model's flat buffer for those layers. Stages are
numbered in layer order and ``grid.pp_comm`` ranks them in stage order, so
concatenating the stages' buffers in rank order *is* the whole model's
buffer: one ``Gatherv`` per array rebuilds it on the first stage. Only
replica 0 takes part (every replica holds the same weights); world rank 0 is
that replica's first stage. Used by ``PipelineEngine.state_dict`` (``--save``)
and by the checkpointer.

Shapes: n_s elements on stage s, N = n_0 + ... + n_{p-1} in the whole model.

See docs/parallelism.md#8-checkpoints-across-grids.
"""

from __future__ import annotations

import numpy as np


def gather_whole(grid, arrays):
    """Each stage's flat host arrays -> the whole model's, on world rank 0.

    grid    the process grid (``mpnn.parallel.grid.Grid``; a serial run is a
            grid of one)
    arrays  name -> this stage's (n_s,) host array; the same names, in the
            same order, on every stage
    Returns name -> (N,) host array on the first stage of replica 0 (world
    rank 0), None on every other rank. Collective over replica 0's pipeline;
    the other replicas return at once. With one stage the arrays themselves
    come back (no copy, no message).
    """
    if grid.dp_rank != 0:
        return None
    if grid.pp == 1:
        return dict(arrays)
    root = grid.pp_rank == 0
    names = list(arrays)
    mine = np.array([arrays[name].size for name in names], dtype=np.int64)  # (names,)
    counts = np.empty((grid.pp, len(names)), dtype=np.int64) if root else None  # (pp, names)
    grid.pp_comm.Gather(mine, counts, root=0)
    whole = {}
    for j, name in enumerate(names):
        part = np.ascontiguousarray(arrays[name])  # (n_s,)
        if root:
            sizes = [int(c) for c in counts[:, j]]
            whole[name] = np.empty(sum(sizes), dtype=part.dtype)  # (N,)
            grid.pp_comm.Gatherv(part, [whole[name], sizes], root=0)
        else:
            grid.pp_comm.Gatherv(part, None, root=0)
    return whole if root else None
