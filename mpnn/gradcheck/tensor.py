"""The distributed gradient check of tensor parallelism: ``mpirun -n T python -m
mpnn.gradcheck --tp T``.

Two kinds of rows, float64, against central finite differences:

* **the operators** ``f`` and ``g`` of ``parallel.tensor`` alone, with a
  scalar summed over the T ranks (one Allreduce per evaluation, so every rank
  takes part in every probe): for f, Φ(x) = Σ_t ⟨dy_t, f(x)⟩ with x the same
  on every rank, whose gradient f's backward must give from each rank's dy_t;
  for g, Φ(y_0, …, y_{T−1}) = ⟨dy, g(y_t)⟩, probed one rank's y_t at a time,
  whose gradient with respect to y_t g's backward must give;
* **the sharded model** (``TensorParallelMLP``: column- and row-parallel pairs,
  an odd last layer replicated, widths T need not divide) against the
  *serial* model with the same weights: its shards' gradients, put together
  whole (``whole_stage``), and its input gradient against central
  differences of the serial model's loss (every rank computes the same
  differences), the whole model and a middle pipeline stage with dL/dx.

Rows are compared on rank 0; the verdict (exit status) is every rank's.

Shapes: B rows, I in features.
"""

from __future__ import annotations

import numpy as np

from ..nn.model import MLP
from ..parallel.tensor import TensorParallelMLP
from .finite_differences import EPS, B, fd_tolerance, kink_margin, numerical_grad, rel_error
from .models import _model_case, _model_name, _set_model_inputs
from .report import Result

TP_SIZES = (5, 8, 6, 7, 3)  # four layers: two column/row pairs; 7 and 6 split unevenly
TP_ODD_SIZES = (5, 8, 6, 3)  # three layers: a pair, then the output layer replicated
TP_CASES = (  # (sizes, layers, activation, loss or None for ⟨dy, h⟩, need_input_grad)
    (TP_SIZES, None, "relu", "cross_entropy", False),
    (TP_SIZES, None, "tanh", "mse", True),
    (TP_SIZES, None, "sigmoid", "cross_entropy", True),
    (TP_ODD_SIZES, None, "relu", "mse", True),
    (TP_SIZES, range(1, 3), "tanh", None, True),  # a middle stage: dL/dx through f
)


def _summed(comm, value):
    from mpi4py import MPI

    return comm.allreduce(float(value), op=MPI.SUM)


def check_f(model, rng, eps):
    """f: forward the identity, backward Σ_t dy_t."""
    comm, T = model.tp_comm, model.tp
    x = rng.normal(size=(B, 4))  # the same on every rank (same seed)
    dys = rng.normal(size=(T, B, 4))  # rank t's upstream gradient: dys[t]
    mine = dys[model.tp_rank]
    analytic = model.f_backward(mine.copy())
    numeric = numerical_grad(lambda: _summed(comm, np.sum(mine * model.f_forward(x))), x, eps)
    return [Result(f"tp{T}.op.f", "dx", rel_error(analytic, numeric), fd_tolerance(eps))]


def check_g(model, rng, eps):
    """g: forward Σ_t y_t, backward the identity, probed one rank's y_t at a time."""
    comm, T, rank = model.tp_comm, model.tp, model.tp_rank
    ys = rng.normal(size=(T, B, 4))
    dy = rng.normal(size=(B, 4))
    analytic = model.g_backward(dy.copy())
    errors = []
    for t in range(T):  # every rank evaluates every probe; only rank t's input moves
        y = ys[rank].copy()

        def objective(y=y):
            return _summed(comm, np.sum(dy * model.g_forward(y.copy())) / T)

        numeric = numerical_grad(objective, y, eps) if t == rank else None
        if t != rank:  # the other ranks join each of rank t's evaluations
            for _ in range(2 * y.size):
                objective()
        errors.append(rel_error(analytic, numeric) if t == rank else 0.0)
    from mpi4py import MPI

    worst = comm.allreduce(max(errors), op=MPI.MAX)
    return [Result(f"tp{T}.op.g", "dy_t", worst, fd_tolerance(eps))]


def check_tensor_model(ops, tp_comm, sizes, layers, activation, loss, need_input_grad, rng,
                       seed=0, eps=EPS):
    """The sharded model's gradients, put together, against the serial model's
    central differences. Collective over ``tp_comm``; rows on its rank 0."""
    serial = MLP(sizes, activation, dtype=np.float64, seed=seed, layers=layers, ops=ops)
    sharded = TensorParallelMLP(sizes, activation, np.float64, seed, layers, ops, tp_comm)
    x = _set_model_inputs([serial], B, lambda size, s=1.0: rng.normal(scale=s, size=size),
                          kink_margin(eps))
    sharded.load_state_dict(serial.state_dict())  # the same random weights and biases
    labels = ops.to_device(rng.integers(0, sizes[-1], size=B))
    dy = rng.normal(size=(B, serial.out_features))
    objective, _, xd = _model_case(serial, x, labels, dy, loss, need_input_grad)
    _, grads, _ = _model_case(sharded, x, labels, dy, loss, need_input_grad)
    flat = np.ascontiguousarray(ops.to_host(sharded.flat.grad)).astype(np.float64)
    whole = sharded.whole_stage({"grad": flat})
    if whole is None:
        return []
    numeric = {name: numerical_grad(objective, p, eps) for name, p in serial.flat.params.items()}
    analytic = serial.whole_layout.views(whole["grad"])
    if need_input_grad:
        numeric["dx"], analytic["dx"] = numerical_grad(objective, xd, eps), grads["dx"]
    check = f"tp{sharded.tp}." + _model_name(activation, loss, sizes, B, layers, need_input_grad)
    tol = fd_tolerance(eps, "model")
    return [Result(check, name, rel_error(analytic[name], numeric[name]), tol)
            for name in numeric]


def check_tensor_parallel(ops, tp_comm, seed=0, eps=EPS):
    """Every row of the distributed check, on rank 0 of ``tp_comm`` ([] elsewhere)."""
    rng = np.random.default_rng(seed)  # the same draws on every rank
    probe = TensorParallelMLP(TP_SIZES, "relu", np.float64, seed, None, ops, tp_comm)
    results = check_f(probe, rng, eps) + check_g(probe, rng, eps)
    for sizes, layers, act, loss, need_dx in TP_CASES:
        results += check_tensor_model(ops, tp_comm, sizes, layers, act, loss, need_dx, rng,
                                      seed, eps)
    return results if tp_comm.Get_rank() == 0 else []
