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


class NonFiniteError(FloatingPointError):
    """A NaN or infinity in the training loss or a gradient."""


def _non_finite(model, tensors):
    """Names of ``tensors`` (named views) holding NaN/inf, last layer first."""
    xp = model.ops.xp
    bad = [name for name, t in tensors.items() if not bool(xp.isfinite(t).all())]
    return sorted(bad, key=lambda n: (-int(n.split(".")[1]), n))


def check_finite(model, loss_sum, step, epoch, batch, rank=0, last_checkpoint=None,
                 activations=None):
    """Raise NonFiniteError when this rank's loss, gradient or parameters are not finite.

    Called after each optimizer step and before any checkpoint, so a bad state is
    never written. The fast path is one sum over the flat parameter buffer (a NaN
    or inf gradient always reaches the parameters through the update); only when
    it is not finite are the layers inspected: gradients first (the optimizer
    leaves them in place), naming the last layer in layer order first, since
    backward reaches it first; else the update itself overflowed. A non-finite
    loss is traced to the first layer whose output (``activations``: layer ->
    (B, O) array of the step's forward, when the engine keeps them) is not finite.
    """
    xp = model.ops.xp
    loss_ok = math.isfinite(loss_sum)
    with np.errstate(over="ignore", invalid="ignore"):  # inf - inf in the sum is the signal
        total = float(xp.sum(model.flat.data))
    if loss_ok and math.isfinite(total):
        return
    where = f"at step {step} (epoch {epoch}, batch {batch}) on rank {rank}"
    keep = (f"the last good checkpoint {last_checkpoint} was not overwritten"
            if last_checkpoint else "no checkpoint was written")
    hint = "lower --lr, or check the data for NaN/inf"
    if not loss_ok:
        first = next((i for i in sorted(activations or {})
                      if not bool(xp.isfinite(activations[i]).all())), None)
        origin = (f"it first appears in the output of layer {first} (layers.{first}.weight/bias)"
                  if first is not None else "the forward pass overflowed or the data holds NaN/inf")
        raise NonFiniteError(f"training loss is {loss_sum} {where}, from finite parameters: "
                             f"{origin}; {keep}; {hint}")
    bad = _non_finite(model, model.flat.grads)
    if bad:
        also = f" (also {', '.join(bad[1:])})" if len(bad) > 1 else ""
        raise NonFiniteError(f"non-finite gradient {where}: first in {bad[0]}{also}, the layer "
                             f"backward reaches first; {keep}; {hint}")
    bad = _non_finite(model, model.flat.params)
    if bad:
        raise NonFiniteError(f"non-finite parameters after the optimizer step {where}: "
                             f"{', '.join(bad)} (the update overflowed {model.dtype}); {keep}; "
                             f"{hint}")
    # the sum overflowed with finite entries: nothing is wrong


def check_replicas_agree(comm, flat, when=None):
    """Every replica must hold the same parameters, at the start (``when``
    None) and at the periodic checks (``when`` says which). Names world ranks."""
    if comm.Get_size() == 1:  # one replica: nothing to compare
        return
    from mpi4py import MPI

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
