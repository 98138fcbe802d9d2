"""Guards that stop a run gone wrong before it can reach a checkpoint.

    check_finite          NaN/inf in the loss, a gradient or the parameters, named by
                          step and layer (NonFiniteError)
    check_replicas_agree  data-parallel replicas hold the same parameters, else the
                          diverging ranks are named
"""

from __future__ import annotations

import math
import zlib

import numpy as np
from mpi4py import MPI


class NonFiniteError(FloatingPointError):
    """A NaN or infinity in the training loss or a gradient."""


class PeerReportedError(NonFiniteError):
    """Raised by ``check_finite`` on the ranks of a forward pass whose verdict another
    rank reports (with the message): ``mpnn.train`` lets them wait for that rank's
    abort, a sweep's trial records the reporter's message (``mpnn.sweep``)."""


def _non_finite(model, tensors):
    """Names of ``tensors`` (named views) holding NaN/inf, last layer first."""
    xp = model.ops.xp
    bad = [name for name, t in tensors.items() if not bool(xp.isfinite(t).all())]
    return sorted(bad, key=lambda n: (-int(n.split(".")[1]), n))


def check_finite(model, loss_sum, step, epoch, batch, rank=0, last_checkpoint=None,
                 activations=None, comm=MPI.COMM_SELF, flat=None):
    """Raise NonFiniteError when the loss, a gradient or the parameters are not finite.

    Called after each optimizer step and before any checkpoint, so a bad state is
    never written. The fast path is one sum over the flat parameter buffer (a NaN
    or inf gradient always reaches the parameters through the update); only when
    it is not finite are the layers inspected: gradients first (the optimizer
    leaves them in place), naming the last layer in layer order first, since
    backward reaches it first; else the update itself overflowed. A non-finite
    loss is traced to the first layer whose output is not finite
    (``activations``: layer -> (B, O) array, or arrays, of the step's forward, or
    a callable returning them, asked for only then).

    comm: the ranks that compute one forward/backward pass together (a
    pipeline's stages; default this rank alone; under ZeRO every rank).
    flat: the buffers to look at (default ``model.flat``; under ZeRO this rank's
    shard, ``parallel.zero.ShardFlat``). They agree on the verdict with
    one small Allreduce per step; on a failure the rank holding the layer named
    raises, as a serial run would name it, and the others raise
    ``PeerReportedError`` (``mpnn.train`` then waits for the reporter's abort).
    """
    xp = model.ops.xp
    flat = model.flat if flat is None else flat
    loss_ok = math.isfinite(loss_sum)
    with np.errstate(over="ignore", invalid="ignore"):  # inf - inf in the sum is the signal
        total = float(xp.sum(flat.data))
    together = comm.Get_size() > 1
    failed = not (loss_ok and math.isfinite(total))
    if together:
        failed = _any(comm, failed)
    if not failed:
        return
    acts = activations() if callable(activations) else activations
    first = next((i for i in sorted(acts or {}) if not _all_finite(xp, acts[i])), None)
    bad_grads = _non_finite(model, flat.grads)
    bad_params = _non_finite(model, flat.params)
    mine = [not loss_ok, loss_sum if not loss_ok else 0.0, rank,
            BIG if first is None else first, _top_layer(bad_grads), float(bool(bad_params))]
    every = _gather_rows(comm, mine) if together else [mine]
    reporter, loss_sum, first = _reporter(every)
    if reporter is None:
        return  # the sum overflowed with finite entries: nothing is wrong
    if reporter != rank:
        raise PeerReportedError(f"non-finite values at step {step}, reported by rank "
                                f"{reporter}")
    where = f"at step {step} (epoch {epoch}, batch {batch}) on rank {rank}"
    keep = (f"the last good checkpoint {last_checkpoint} was not overwritten"
            if last_checkpoint else "no checkpoint was written")
    hint = "lower --lr, or check the data for NaN/inf"
    if any(row[0] for row in every):
        origin = (f"it first appears in the output of layer {first} (layers.{first}.weight/bias)"
                  if first is not None else "the forward pass overflowed or the data holds NaN/inf")
        raise NonFiniteError(f"training loss is {loss_sum} {where}, from finite parameters: "
                             f"{origin}; {keep}; {hint}")
    if bad_grads:
        also = f" (also {', '.join(bad_grads[1:])})" if len(bad_grads) > 1 else ""
        raise NonFiniteError(f"non-finite gradient {where}: first in {bad_grads[0]}{also}, the "
                             f"layer backward reaches first; {keep}; {hint}")
    raise NonFiniteError(f"non-finite parameters after the optimizer step {where}: "
                         f"{', '.join(bad_params)} (the update overflowed {model.dtype}); "
                         f"{keep}; {hint}")


BIG = 2**31  # "no such layer" in the gathered verdicts


def _all_finite(xp, arrays):
    arrays = arrays if isinstance(arrays, (list, tuple)) else (arrays,)
    return all(bool(xp.isfinite(a).all()) for a in arrays)


def _top_layer(names):
    """The highest layer index among ``layers.{i}.*`` names (-1 for none)."""
    return max((int(n.split(".")[1]) for n in names), default=-1)


def _any(comm, flag):
    buf = np.array([1 if flag else 0], dtype=np.int32)
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
    return bool(buf[0])


def _gather_rows(comm, row):
    buf = np.array(row, dtype=np.float64)
    every = np.empty((comm.Get_size(), buf.size), dtype=np.float64)
    comm.Allgather(buf, every)
    return [[bool(r[0]), float(r[1]), int(r[2]), int(r[3]), int(r[4]), bool(r[5])]
            for r in every]


def _reporter(every):
    """(world rank that reports, the loss, the first bad layer) from every rank's
    [loss bad, loss, rank, first bad output layer, top bad-gradient layer, bad params]:
    the serial run's order of blame: the loss (traced to the first layer whose output
    is bad), else the gradient backward reaches first, else the parameters."""
    losses = [r for r in every if r[0]]
    if losses:
        first = min(r[3] for r in every)
        if first < BIG:
            return next(r[2] for r in every if r[3] == first), losses[0][1], first
        return losses[0][2], losses[0][1], None
    grads = [r for r in every if r[4] >= 0]
    if grads:
        return max(grads, key=lambda r: r[4])[2], 0.0, None
    params = [r for r in every if r[5]]
    return (params[0][2], 0.0, None) if params else (None, 0.0, None)


def check_replicas_agree(comm, flat, when=None):
    """Every replica must hold the same parameters, at the start (``when``
    None) and at the periodic checks (``when`` says which). Names world ranks."""
    if comm.Get_size() == 1:  # one replica: nothing to compare
        return
    # host copy of a device buffer
    data = flat.data.get() if hasattr(flat.data, "get") else flat.data
    mine = np.array([zlib.crc32(np.ascontiguousarray(data).tobytes()), MPI.COMM_WORLD.Get_rank()],
                    dtype=np.int64)
    every = np.empty((comm.Get_size(), 2), dtype=np.int64)
    comm.Allgather(mine, every)
    groups = {}
    for h, r in every.tolist():
        groups.setdefault(h, []).append(r)
    if len(groups) == 1:
        return
    if when is None:
        bad = [r for h, r in every.tolist() if h != every[0, 0]]
        raise RuntimeError(f"data-parallel replicas start from different weights "
                           f"(ranks {bad} differ from rank {every[0, 1]}): "
                           "the seed or --init differs")
    sizes = sorted(len(g) for g in groups.values())
    if sizes[-1] > sizes[-2]:  # a strict majority agrees: the others diverged
        majority = max(groups.values(), key=len)
        bad = sorted(r for g in groups.values() if g is not majority for r in g)
        who = f"ranks {bad} diverged from the other replicas (ranks {majority})"
    else:
        who = "replicas disagree with no majority: " + "; ".join(
            f"ranks {g} hold crc32 {h & 0xFFFFFFFF:08x}" for h, g in groups.items())
    raise RuntimeError(f"data-parallel replicas hold different parameters {when}: {who}; each "
                       f"replica applied a different update (nondeterministic kernel, memory "
                       f"error or a bug)")
