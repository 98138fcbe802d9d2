"""Central finite differences in float64: the step, the tolerances, the error of one tensor,
and the checks one op deep (the ``functional.py`` pairs and losses, the backend's op set).

A layer or activation ``y = f(x)`` is projected on a random upstream gradient
``dy``, so one scalar ``φ(x) = ⟨dy, f(x)⟩`` checks the whole Jacobian-vector
product its backward computes: ``∂φ/∂x = backward(dy)``; a loss is already a
scalar, ``scale · loss_sum`` with ``scale = 1/B``. The derivative of one
element is ``(φ(x + h) − φ(x − h)) / 2h``, evaluated as
``⟨dy, f(x + h) − f(x − h)⟩ / 2h`` (``numerical_grad``). ReLU's kink at 0 is
kept out of the probe: inputs are redrawn until none lies within
``kink_margin(eps)`` of 0. Tolerances: ``fd_tolerance``, derived in
``docs/derivations.md`` §9.

Shapes: B rows, I in features, O out features, C classes.
"""

from __future__ import annotations

import numpy as np

from ..nn import functional as F
from .report import Result

DTYPE = np.float64
EPS = 1e-6
KINK_MARGIN = 1e-3  # ReLU inputs stay beyond ±max(KINK_MARGIN, KINK_STEPS·eps)
KINK_STEPS = 20  # a probe moves a pre-activation by eps·|∂z/∂θ|, well below 20·eps here

# Central differences in float64, relative error of one tensor at half step h:
#   truncation  ≈ |φ'''|·h²/6 / |φ'|            → T·h²
#   round-off   ≈ u·|φ|/h / |φ'|, u = 2^-53     → R·u/h
# (T, R) bound the curvature and the |φ|/|φ'| ratio of these small problems: the
# worst seen over 1000 seeds, × 10. "op": one op deep (functional.py pairs, losses,
# the backend's ops); "model": several layers deep, where a small gradient (sigmoid's
# ≤ 1/4 per layer, a confident single row) under an O(1) loss costs digits.
FD_CONSTANTS = {"op": (100.0, 300.0), "model": (300.0, 3e4)}
MAX_TOL = 1e-3  # the accepted --eps keep every tolerance here or below: a 1% error fails
EPS_RANGE = (1e-8, 1e-3)  # where fd_tolerance(eps, "model") <= MAX_TOL

B, I, O, C = 4, 5, 3, 4  # small: every element is probed


def fd_tolerance(eps, kind="op", dtype=DTYPE):
    """Tolerance of a central-difference check with half step ``eps`` in ``dtype``:
    ``T·eps² + R·u/eps`` with (T, R) = ``FD_CONSTANTS[kind]``, u the unit round-off."""
    trunc, rounding = FD_CONSTANTS[kind]
    return trunc * eps ** 2 + rounding * (np.finfo(dtype).eps / 2) / eps


def rel_error(analytic, numeric):
    """max|a − n| / max(max|a|, max|n|): the worst error relative to the tensor's scale."""
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    if a.shape != n.shape:
        raise ValueError(f"gradient shape {a.shape} differs from its input's {n.shape}")
    scale = max(np.abs(a).max(initial=0.0), np.abs(n).max(initial=0.0))
    if not np.isfinite(scale):
        return float("nan")
    if scale == 0:
        return 0.0
    return float(np.abs(a - n).max() / scale)


def numerical_grad(f, x, eps=EPS, dy=None, to_host=np.asarray):
    """Central-difference gradient of ⟨dy, f()⟩ (or of the scalar f() if dy is None).

    ``f`` takes no arguments and reads ``x``, which is perturbed in place one
    element at a time and restored. ``f`` must return a fresh array (or a
    float), not a buffer it will overwrite. Returns a host float64 array of
    ``x``'s shape.
    """
    grad = np.zeros(x.shape, dtype=np.float64)
    for idx in np.ndindex(*x.shape):
        orig = float(x[idx])
        x[idx] = orig + eps
        plus = float(x[idx])  # a copy: on CuPy, x[idx] is a 0-d view that would follow x
        f_plus = to_host(f())
        x[idx] = orig - eps
        step = plus - float(x[idx])  # the step actually taken, ≈ 2·eps
        f_minus = to_host(f())
        x[idx] = orig
        diff = np.asarray(f_plus, dtype=np.float64) - np.asarray(f_minus, dtype=np.float64)
        grad[idx] = (diff if dy is None else np.sum(np.asarray(dy) * diff)) / step
    return grad


def kink_margin(eps):
    """How far every ReLU input stays from 0 in a check with half step ``eps``."""
    return max(KINK_MARGIN, KINK_STEPS * eps)


def _away_from_kink(draw, margin=KINK_MARGIN, tries=1000):
    """Call ``draw()`` until the pre-activations it returns (last item) avoid [−margin, margin]."""
    for _ in range(tries):
        out = draw()
        if np.abs(out[-1]).min() > margin:
            return out
    raise RuntimeError(f"could not draw inputs with every ReLU input beyond ±{margin}")


# ------------------------------------------------------- functional.py checks


def check_linear(rng, eps=EPS):
    x = rng.normal(size=(B, I))  # (B, I)
    W = rng.normal(size=(I, O))  # (I, O)
    b = rng.normal(size=O)  # (O,)
    dy = rng.normal(size=(B, O))  # (B, O)
    _, cache = F.linear_forward(x, W, b)
    dx, dW, db = F.linear_backward(dy, cache)
    f = lambda: F.linear_forward(x, W, b)[0].copy()  # noqa: E731
    tol = fd_tolerance(eps)
    return [Result("linear", name, rel_error(g, numerical_grad(f, t, eps, dy)), tol)
            for name, g, t in (("dx", dx, x), ("dW", dW, W), ("db", db, b))]


def _activation_input(rng, name):
    if name == "relu":  # |z| in [0.1, 2]: far from the kink
        return rng.choice([-1.0, 1.0], size=(B, O)) * rng.uniform(0.1, 2.0, size=(B, O))
    return rng.normal(scale=1.5, size=(B, O))


def check_activation(name, rng, eps=EPS):
    forward, backward = F.ACTIVATIONS[name]
    z = _activation_input(rng, name)  # (B, O)
    dy = rng.normal(size=(B, O))  # (B, O)
    y, cache = forward(z)
    dz = backward(dy, cache)
    f = lambda: np.array(forward(z)[0], copy=True)  # noqa: E731
    return [Result(name, "dz", rel_error(dz, numerical_grad(f, z, eps, dy)), fd_tolerance(eps))]


def _loss_inputs(rng, name):
    logits = rng.normal(scale=2.0, size=(B, C))  # (B, C)
    labels = rng.integers(0, C, size=B)  # (B,)
    if name == "mse":
        return logits, F.one_hot(labels, C, DTYPE)
    return logits, labels


def check_loss(name, rng, eps=EPS):
    """d(scale · loss_sum)/dinput against the loss's own gradient, scale = 1/B."""
    fn = {"softmax_cross_entropy": F.softmax_cross_entropy, "mse": F.mse}[name]
    grad_name = "dlogits" if name == "softmax_cross_entropy" else "dpred"
    scale = 1.0 / B
    z, target = _loss_inputs(rng, "mse" if name == "mse" else "cross_entropy")
    _, dz = fn(z, target, scale)
    f = lambda: scale * fn(z, target, scale)[0]  # noqa: E731
    return [Result(name, grad_name, rel_error(dz, numerical_grad(f, z, eps)), fd_tolerance(eps))]


# --------------------------------------------------------- op set checks


def _layer_inputs(act, margin, draw, shape=(B, I, O)):
    """x (B, I), W (I, O), b (O,) from ``draw(size)``, every ReLU input beyond ±margin."""
    rows, n_in, n_out = shape

    def inputs():
        x, W, b = draw((rows, n_in)), draw((n_in, n_out)), draw(n_out)
        return x, W, b, x @ W + b

    return (_away_from_kink(inputs, margin) if act == "relu" else inputs())[:3]


def _run_layer(ops, x, W, b, dy, act):
    """y, dx, dW, db of one fused layer on ``ops``, on the host (dtype of the inputs)."""
    xd, Wd, bd = (ops.to_device(a) for a in (x, W, b))
    y = ops.linear_act(xd, Wd, bd, act, ops.xp.empty(dy.shape, dtype=x.dtype))  # (B, O)
    dW = ops.xp.zeros(W.shape, dtype=x.dtype)  # (I, O)
    db = ops.xp.zeros(b.shape, dtype=x.dtype)  # (O,)
    dz = ops.act_bias_backward(ops.to_device(dy.copy()), y, act, db)  # (B, O)
    ops.weight_grad(xd, dz, dW)  # (I, O)
    dx = ops.input_grad(dz, Wd, ops.xp.empty(x.shape, dtype=x.dtype))  # (B, I)
    ops.synchronize()
    return {"y": ops.to_host(y), "dx": ops.to_host(dx), "dW": ops.to_host(dW),
            "db": ops.to_host(db)}, (xd, Wd, bd)


def check_ops_layer(ops, act, rng, eps=EPS):
    """The backend's fused layer ops: linear_act forward; act_bias_backward,
    weight_grad, input_grad backward. φ = ⟨dy, act(x·W + b)⟩."""
    x, W, b = _layer_inputs(act, kink_margin(eps), lambda size: rng.normal(size=size))
    dy = rng.normal(size=(B, O))  # (B, O)
    out, (xd, Wd, bd) = _run_layer(ops, x, W, b, dy, act)

    def f():
        buf = ops.xp.empty((B, O), dtype=DTYPE)
        return np.array(ops.to_host(ops.linear_act(xd, Wd, bd, act, buf)), copy=True)

    check, tol = f"ops.linear_act[{act}]", fd_tolerance(eps)
    return [Result(check, name, rel_error(out[name], numerical_grad(f, t, eps, dy)), tol)
            for name, t in (("dx", xd), ("dW", Wd), ("db", bd))]


def check_ops_loss(ops, name, rng, eps=EPS):
    """The backend's loss op: out = scale · d loss_sum / dlogits, scale = 1/B."""
    logits = ops.to_device(rng.normal(scale=2.0, size=(B, C)))
    labels = ops.to_device(rng.integers(0, C, size=B))
    scale = 1.0 / B
    d = ops.xp.empty((B, C), dtype=DTYPE)
    ops.loss(name, logits, labels, scale, d)
    scratch = ops.xp.empty((B, C), dtype=DTYPE)
    f = lambda: scale * ops.loss(name, logits, labels, scale, scratch)  # noqa: E731
    num = numerical_grad(f, logits, eps)
    return [Result(f"ops.loss[{name}]", "dlogits", rel_error(ops.to_host(d), num),
                   fd_tolerance(eps))]

