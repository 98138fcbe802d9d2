"""Whole-model and pipeline-stage checks in float64 against central differences.

The model is checked through its own ``forward``/``backward``, the op set of
``--backend`` and the flat gradient buffer, with the mean loss on top: the
3-layer model at 4, 2 and 1 rows, a model without hidden layers
(``mlp[none,…]``) and pipeline stages ``layers=range(1, …)`` with and without
the input gradient (``no_dx``); a stage that stops before the last layer has
``⟨dy, h_stop⟩`` on top instead of a loss (``mlp[act,dy]``). The tolerance is
``fd_tolerance(eps, "model")``. ``_set_model_inputs`` and ``_model_case`` serve
the float32 model check too.

Shapes: B rows, I in features, C classes.
"""

from __future__ import annotations

import numpy as np

from ..nn import functional as F
from ..nn.functional import HIDDEN_ACTIVATIONS, LOSS_NAMES
from ..nn.model import MLP, Context
from .finite_differences import (
    DTYPE,
    EPS,
    B,
    C,
    I,
    _away_from_kink,
    fd_tolerance,
    kink_margin,
    numerical_grad,
    rel_error,
)
from .report import Result

MODEL_SIZES = (5, 6, 4, 3)  # three linear layers: input, hidden, output
STAGE_CHECKS = (  # (layers, activation, loss or None for ⟨dy, h⟩, need_input_grad)
    (range(1, 3), "relu", "cross_entropy", True),  # the last stage of a pipeline
    (range(1, 3), "tanh", "mse", False),
    (range(1, 2), "sigmoid", None, True),  # a middle stage
    (range(1, 2), "relu", None, False),
)
ROW_CHECKS = ((1, "relu", "cross_entropy"), (2, "tanh", "mse"))  # (B, activation, loss)


def _host_preactivations(model, x):
    """Every hidden pre-activation z_i = h_i·W_i + b_i of the model, on the host, flattened."""
    zs, h = [], x
    for i in model.layers:
        z = h @ model.ops.to_host(model.W(i)) + model.ops.to_host(model.b(i))  # (B, O_i)
        if i < model.n_layers - 1:
            zs.append(z.ravel())
        h = F.ACTIVATIONS[model.act(i)][0](z)[0]
    return np.concatenate(zs) if zs else np.ones(1)


def _set_model_inputs(models, rows, draw, margin):
    """Random x (rows, in) and biases into every model, the first model's initial
    weights rounded to float32 (exact in every model's dtype), every ReLU input
    beyond ±margin; returns x on the host."""
    ref = models[0]
    init_W = {i: ref.ops.to_host(ref.W(i)).astype(np.float32).astype(np.float64)
              for i in ref.layers}

    def inputs():  # random biases too, so every path of db is non-trivial
        x = draw((rows, ref.in_features))
        for i in ref.layers:
            b = draw(ref.sizes[i + 1], 0.5)
            for m in models:
                m.W(i)[...] = m.ops.to_device(init_W[i].astype(m.dtype))
                m.b(i)[...] = m.ops.to_device(b.astype(m.dtype))
        return x, _host_preactivations(ref, x)

    return (_away_from_kink(inputs, margin) if ref.activation == "relu" else inputs())[0]


def _model_case(model, x, labels, dy, loss, need_input_grad):
    """The model's objective and its gradients: the mean loss (``loss``) or ⟨dy, h_stop⟩.

    Returns (objective() -> float, grads by name on the host, device x).
    """
    ops, rows = model.ops, x.shape[0]
    xd, scale = ops.to_device(x.astype(model.dtype)), 1.0 / rows
    model.zero_grad()
    ctx = Context()
    out = model.forward(xd, ctx)  # (B, sizes[stop])
    if loss is None:
        dout = ops.to_device(dy.astype(model.dtype))
    else:
        dout = ops.xp.empty_like(out)
        ops.loss(loss, out, labels, scale, dout)
    dx = model.backward(dout, ctx, need_input_grad=need_input_grad)  # (B, sizes[start]) | None
    ops.synchronize()
    if need_input_grad != (dx is not None):
        raise RuntimeError(f"MLP.backward(need_input_grad={need_input_grad}) returned {dx!r}")
    grads = {name: ops.to_host(g).astype(np.float64) for name, g in model.flat.grads.items()}
    if dx is not None:
        grads["dx"] = ops.to_host(dx).astype(np.float64)

    probe_ctx, scratch = Context(), ops.xp.empty_like(out)

    def objective():
        h = model.forward(xd, probe_ctx)
        if loss is None:
            return float(np.sum(dy * ops.to_host(h)))
        return scale * ops.loss(loss, h, labels, scale, scratch)

    return objective, grads, xd


def _model_name(act, loss, sizes, rows, layers, need_input_grad):
    hidden = act if len(sizes) > 2 else "none"
    name = f"mlp[{hidden},{loss or 'dy'}]"
    tags = [] if rows == B else [f"B={rows}"]
    if layers is not None:
        tags.append(f"layers={layers.start}:{layers.stop}")
    if not need_input_grad:
        tags.append("no_dx")
    return name + ("/" + ",".join(tags) if tags else "")


def check_model(ops, activation, loss, rng, seed=0, eps=EPS, sizes=MODEL_SIZES, rows=B,
                layers=None, need_input_grad=True):
    """The whole MLP (or a stage) through its forward/backward and flat gradient buffer.

    L(θ, x) = (1/B) Σ_rows loss: the loss op gets ``scale = 1/B``, backward
    accumulates into ``model.flat.grad`` (zeroed first), and every named view
    of it, and dL/dx, are compared with finite differences of L. ``loss=None``
    (a stage ending before the last layer): L = ⟨dy, h_stop⟩, dy random.
    """
    model = MLP(sizes, activation, dtype=DTYPE, seed=seed, layers=layers, ops=ops)
    x = _set_model_inputs([model], rows, lambda size, s=1.0: rng.normal(scale=s, size=size),
                          kink_margin(eps))
    labels = ops.to_device(rng.integers(0, sizes[-1], size=rows))
    dy = rng.normal(size=(rows, model.out_features))  # (B, sizes[stop])
    objective, grads, xd = _model_case(model, x, labels, dy, loss, need_input_grad)
    check = _model_name(activation, loss, sizes, rows, layers, need_input_grad)
    tol = fd_tolerance(eps, "model")
    return [Result(check, name, rel_error(g, numerical_grad(
                objective, xd if name == "dx" else model.flat.params[name], eps)), tol)
            for name, g in grads.items()]


def check_models(ops, rng, seed=0, eps=EPS):
    """Every model case, in table order: 4 rows × every activation and loss; 1 and 2
    rows; no hidden layer; pipeline stages with and without the input gradient."""
    results = []
    for act in HIDDEN_ACTIVATIONS:
        for loss in LOSS_NAMES:
            results += check_model(ops, act, loss, rng, seed, eps)
    for rows, act, loss in ROW_CHECKS:
        results += check_model(ops, act, loss, rng, seed, eps, rows=rows)
    for loss in LOSS_NAMES:
        results += check_model(ops, "relu", loss, rng, seed, eps, sizes=(I, C))
    for layers, act, loss, need_dx in STAGE_CHECKS:
        results += check_model(ops, act, loss, rng, seed, eps, layers=layers,
                               need_input_grad=need_dx)
    return results
