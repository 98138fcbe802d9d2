"""The whole model from its pipeline stages: one Gatherv per flat array, to world rank 0.

Every stage holds a contiguous range of the model's layers, and its flat
buffers (parameters, and optimizer state in the same layout) are exactly the
segment of the whole model's flat buffer for those layers. Stages are
numbered in layer order and ``grid.pp_comm`` ranks them in stage order, so
concatenating the stages' buffers in rank order *is* the whole model's
buffer: one ``Gatherv`` per array rebuilds it on the first stage. (Under an
interleaved schedule a rank holds several chunks, rank r the stages r, r + p,
...; then the segments are put back in layer order: ``layout``.) Only
replica 0 takes part (every replica holds the same weights); world rank 0 is
that replica's first stage, and of each stage's tensor-parallel ranks only
the first takes part, holding the stage's shards put together. Used by
``PipelineEngine.state_dict`` (``--save``) and by the checkpointer.

Shapes: n_s elements on stage s, N = n_0 + ... + n_{p-1} in the whole model.

See docs/parallelism.md#8-checkpoints-across-grids.
"""

from __future__ import annotations

import numpy as np

MAX_CHUNKS = 64  # model chunks per rank the gather can reorder (--virtual-stages)


def gather_whole(grid, arrays, layout=None):
    """Each stage's flat host arrays -> the whole model's, on world rank 0.

    grid    the process grid (``mpnn.parallel.grid.Grid``; a serial run is a
            grid of one)
    arrays  name -> this stage's (n_s,) host array; the same names, in the
            same order, on every stage (under tensor parallelism the stage's
            whole arrays, assembled on its tp rank 0: ``model.whole_stage``)
    layout  this rank's ``Layout``, needed when ranks hold several model chunks
            (interleaved schedules): the segments are then reordered by layer
    Returns name -> (N,) host array on the first stage of replica 0 (world
    rank 0), None on every other rank. Collective over replica 0's pipeline;
    the other replicas return at once. With one stage the arrays themselves
    come back (no copy, no message).
    """
    if grid.dp_rank != 0 or grid.tp_rank != 0:  # tp rank 0 holds each stage whole
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
    if layout is not None:
        whole = _in_layer_order(grid, layout, whole)
    return whole if root else None


def _in_layer_order(grid, layout, whole):
    """Reorder the rank-order concatenation ``whole`` (on the root) into the whole
    model's layout when some rank holds several chunks; collective over the pipe."""
    mine = np.full(2 * MAX_CHUNKS, -1, dtype=np.int64)  # (start, stop) of each chunk
    for c, chunk in enumerate(layout.chunks):
        mine[2 * c:2 * c + 2] = chunk.start, chunk.stop
    root = grid.pp_rank == 0
    every = np.empty((grid.pp, mine.size), dtype=np.int64) if root else None
    grid.pp_comm.Gather(mine, every, root=0)
    if not root or all(row[2] < 0 for row in every):
        return whole  # one chunk per rank: rank order is layer order
    from ..nn.params import Layout

    model = Layout(layout.sizes)
    out = {}
    for name, flat in whole.items():
        ordered, offset = np.empty_like(flat), 0  # (N,)
        for row in every:
            for start, stop in zip(row[0::2], row[1::2], strict=True):
                if start < 0:
                    break
                lo, hi = model.layer_span(int(start))[0], model.layer_span(int(stop) - 1)[1]
                ordered[lo:hi] = flat[offset:offset + hi - lo]
                offset += hi - lo
        out[name] = ordered
    return out
