"""The driver: ``check_all`` runs every section in table order, ``main`` is
``python -m mpnn.gradcheck [--seed 0] [--backend numpy] [--eps 1e-6]``.

Exit status: 0 if every tensor is within its tolerance, 1 if not, 2 for a bad
option or an unusable backend.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from ..kernels import BACKENDS, get_ops
from ..nn.functional import HIDDEN_ACTIVATIONS, LOSS_NAMES
from ..runtime.options import nonneg_int, option_type, positive_int
from .finite_differences import (
    EPS,
    EPS_RANGE,
    check_activation,
    check_linear,
    check_loss,
    check_ops_layer,
    check_ops_loss,
)
from .float32 import check_float32, float32_backends
from .models import check_models
from .report import format_table


def check_all(seed=0, backend="numpy", eps=EPS, float32=None):
    """Run every check; ``backend`` is a name for ``get_ops`` or an op set object.

    ``float32``: the op sets whose float32 kernels are checked (default
    ``float32_backends(backend)``; ``[]``: none). Returns one ``Result`` per
    tensor, in table order. Raises ImportError or RuntimeError (from
    ``get_ops``) when the backend is not available.
    """
    ops = get_ops(backend) if isinstance(backend, str) else backend
    if float32 is None:
        float32 = float32_backends(backend)[0]
    rng = np.random.default_rng(seed)
    results = check_linear(rng, eps)
    for act in HIDDEN_ACTIVATIONS:
        results += check_activation(act, rng, eps)
    for loss in ("softmax_cross_entropy", "mse"):
        results += check_loss(loss, rng, eps)
    for act in HIDDEN_ACTIVATIONS:
        results += check_ops_layer(ops, act, rng, eps)
    for loss in LOSS_NAMES:
        results += check_ops_loss(ops, loss, rng, eps)
    results += check_models(ops, rng, seed, eps)
    for ops32 in float32:
        results += check_float32(ops32, rng, seed)
    return results


_eps = option_type(
    float, lambda v: EPS_RANGE[0] <= v <= EPS_RANGE[1],
    f"a step in [{EPS_RANGE[0]:g}, {EPS_RANGE[1]:g}]: central differences in float64 err by "
    f"~eps² (truncation, too large above {EPS_RANGE[1]:g}) plus ~2^-53·|f|/eps (round-off, "
    f"too large below {EPS_RANGE[0]:g})", unparsed="a number")


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mpnn.gradcheck",
        description="Check every layer, loss and the whole model against central finite "
                    "differences in float64, and the float32 kernels against the float64 "
                    "reference; exit 1 if any tensor exceeds its tolerance.")
    p.add_argument("--seed", type=nonneg_int,
                   default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--backend", default="numpy", choices=BACKENDS,
                   help="op set the model runs on (default numpy, the reference; then the "
                        "float32 section covers numpy, numba and cupy, where usable)")
    p.add_argument("--tp", type=positive_int, default=1, metavar="T",
                   help="check tensor parallelism instead, under mpirun -n T: the f and g "
                        "operators and the sharded model against central differences of the "
                        "serial one (T up to 6, the narrowest hidden layer of the check)")
    p.add_argument("--eps", type=_eps, default=EPS,
                   help=f"finite-difference half step in [{EPS_RANGE[0]:g}, {EPS_RANGE[1]:g}] "
                        f"(default {EPS:g}); the tolerances follow it")
    args = p.parse_args(argv)
    if args.tp > 1:
        return _main_tensor(args)
    try:
        ops = get_ops(args.backend)
        float32, skipped = float32_backends(args.backend)
    except (ImportError, RuntimeError) as e:  # a missing package, or no usable GPU
        print(f"gradcheck: backend {args.backend!r} is not available here: {e}. "
              f"Choose another with --backend (numpy is always there).", file=sys.stderr)
        return 2
    results = check_all(args.seed, ops, args.eps, float32)
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    names = ", ".join(o.name for o in float32) or "none"
    print(f"\n{len(results)} tensors checked, seed {args.seed}: float64 vs central differences "
          f"(eps={args.eps:g}, backend {args.backend}), float32 vs float64 ({names}): "
          + (f"{len(bad)} FAILED" if bad else "all within tolerance"))
    for note in skipped:
        print(f"float32 kernels not checked: {note}")
    return 1 if bad else 0


def _main_tensor(args):
    """``--tp T``: the distributed check over MPI.COMM_WORLD; every rank returns the
    verdict (0 all within tolerance, 1 not, 2 a world that is not T ranks)."""
    from mpi4py import MPI

    from .tensor import TP_SIZES, check_tensor_parallel

    world = MPI.COMM_WORLD
    narrowest = min(TP_SIZES[1:-1])
    if world.Get_size() != args.tp or args.tp > narrowest:
        if world.Get_rank() == 0:
            why = (f"it runs on {world.Get_size()} rank(s)" if world.Get_size() != args.tp else
                   f"its model's narrowest hidden layer has {narrowest} features")
            print(f"gradcheck: --tp {args.tp} needs mpirun -n {args.tp} with --tp at most "
                  f"{narrowest}, but {why}", file=sys.stderr)
        return 2
    try:
        ops = get_ops(args.backend)
    except (ImportError, RuntimeError) as e:  # a missing package, or no usable GPU
        if world.Get_rank() == 0:
            print(f"gradcheck: backend {args.backend!r} is not available here: {e}. "
                  f"Choose another with --backend (numpy is always there).", file=sys.stderr)
        return 2
    results = check_tensor_parallel(ops, world, args.seed, args.eps)
    status = 0
    if world.Get_rank() == 0:
        print(format_table(results))
        bad = [r for r in results if not r.ok]
        print(f"\n{len(results)} tensors checked, seed {args.seed}, --tp {args.tp}: the f and "
              f"g operators and the sharded model (shards put together) vs central differences "
              f"of the serial model (eps={args.eps:g}, backend {args.backend}): "
              + (f"{len(bad)} FAILED" if bad else "all within tolerance"))
        status = 1 if bad else 0
    return world.bcast(status, root=0)
