"""Finite-difference gradient check of every layer, loss and the whole model.

    python -m mpnn.gradcheck [--seed 0] [--backend numpy] [--eps 1e-6]

Everything runs in float64. Each backward is compared with central finite
differences of a scalar:

* a layer or activation ``y = f(x)`` is projected on a random upstream
  gradient ``dy``, so one scalar ``φ(x) = ⟨dy, f(x)⟩`` checks the whole
  Jacobian-vector product its backward computes: ``∂φ/∂x = backward(dy)``;
* a loss is already a scalar: ``scale · loss_sum`` with ``scale = 1/B``;
* the model is checked through its own ``forward``/``backward``, the op set
  of ``--backend`` and the flat gradient buffer, with the mean loss on top.

The numerical derivative of one element is ``(φ(x + h) − φ(x − h)) / 2h``,
evaluated as ``⟨dy, f(x + h) − f(x − h)⟩ / 2h`` so that only the outputs the
element moves contribute rounding error. ReLU's kink at 0 is kept out of the
probe: inputs (pre-activations) are redrawn until none lies within
``KINK_MARGIN`` of 0, far beyond any step of size ``eps``.

The error of one tensor is ``max |analytic − numeric| / max(|analytic|, |numeric|)``
(∞-norms): the worst element's error relative to the tensor's scale, so an
entry that happens to be ~0 cannot blow up the ratio. With ``eps = 1e-6`` a
correct backward lands near 1e-10 (truncation ~eps², rounding ~1e-16/eps); a
wrong one (a missing term, a transposed factor, a lost scale) lands near 1.

Shapes: B rows, I in features, O out features, C classes.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np

from .kernels import BACKENDS, get_ops
from .nn import functional as F
from .nn.functional import HIDDEN_ACTIVATIONS, LOSS_NAMES
from .nn.model import MLP, Context

DTYPE = np.float64
EPS = 1e-6
KINK_MARGIN = 1e-3

# Explicit tolerances on the relative error above, per kind of check. A
# correct float64 backward sits 2-4 orders of magnitude below these.
TOLERANCES = {
    "layer": 1e-7,  # functional.py pairs: one op deep
    "loss": 1e-7,
    "ops": 1e-7,  # the backend's fused ops, one layer deep
    "model": 1e-6,  # several layers deep: rounding compounds a little
}

B, I, O, C = 4, 5, 3, 4  # small: every element is probed
MODEL_SIZES = (5, 6, 4, 3)  # three linear layers: input, hidden, output


@dataclass(frozen=True)
class Result:
    """The worst relative error of one gradient tensor of one check."""

    check: str  # e.g. "linear", "softmax_cross_entropy", "mlp[relu,mse]"
    tensor: str  # e.g. "dx", "layers.0.weight"
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tol)  # NaN is not ok


# ------------------------------------------------------------------ primitives


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
    tol = TOLERANCES["layer"]
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
    return [Result(name, "dz", rel_error(dz, numerical_grad(f, z, eps, dy)), TOLERANCES["layer"])]


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
    return [Result(name, grad_name, rel_error(dz, numerical_grad(f, z, eps)), TOLERANCES["loss"])]


# --------------------------------------------------------- op set checks


def check_ops_layer(ops, act, rng, eps=EPS):
    """The backend's fused layer ops: linear_act forward; act_bias_backward,
    weight_grad, input_grad backward. φ = ⟨dy, act(x·W + b)⟩."""

    def draw():
        x = rng.normal(size=(B, I))
        W = rng.normal(size=(I, O))
        b = rng.normal(size=O)
        return x, W, b, x @ W + b

    x, W, b, _ = _away_from_kink(draw) if act == "relu" else draw()
    dy = rng.normal(size=(B, O))  # (B, O)
    xd, Wd, bd = (ops.to_device(a) for a in (x, W, b))
    out = ops.xp.empty((B, O), dtype=DTYPE)
    y = ops.linear_act(xd, Wd, bd, act, out)  # (B, O)
    dW = ops.xp.zeros((I, O), dtype=DTYPE)
    db = ops.xp.zeros(O, dtype=DTYPE)
    dz = ops.act_bias_backward(ops.to_device(dy.copy()), y, act, db)  # (B, O)
    ops.weight_grad(xd, dz, dW)  # (I, O)
    dx = ops.input_grad(dz, Wd, ops.xp.empty((B, I), dtype=DTYPE))  # (B, I)
    ops.synchronize()

    def f():
        buf = ops.xp.empty((B, O), dtype=DTYPE)
        return np.array(ops.to_host(ops.linear_act(xd, Wd, bd, act, buf)), copy=True)

    check, tol = f"ops.linear_act[{act}]", TOLERANCES["ops"]
    return [Result(check, name, rel_error(ops.to_host(g), numerical_grad(f, t, eps, dy)), tol)
            for name, g, t in (("dx", dx, xd), ("dW", dW, Wd), ("db", db, bd))]


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
                   TOLERANCES["ops"])]


# ------------------------------------------------------------- model check


def _host_preactivations(model, x):
    """Every hidden pre-activation z_i = h_i·W_i + b_i of the model, on the host, flattened."""
    zs, h = [], x
    for i in model.layers:
        z = h @ model.ops.to_host(model.W(i)) + model.ops.to_host(model.b(i))  # (B, O_i)
        if i < model.n_layers - 1:
            zs.append(z.ravel())
        h = F.ACTIVATIONS[model.act(i)][0](z)[0]
    return np.concatenate(zs) if zs else np.ones(1)


def check_model(ops, activation, loss, rng, seed=0, eps=EPS):
    """The whole MLP through its forward/backward and flat gradient buffer.

    L(θ, x) = (1/B) Σ_rows loss: the loss op gets ``scale = 1/B``, backward
    accumulates into ``model.flat.grad`` (zeroed first), and every named view
    of it, and dL/dx, are compared with finite differences of L.
    """
    sizes = MODEL_SIZES
    model = MLP(sizes, activation, dtype=DTYPE, seed=seed, ops=ops)
    init_W = [ops.to_host(model.W(i)).copy() for i in model.layers]

    def draw():  # random biases too, so every path of db is non-trivial
        x = rng.normal(size=(B, sizes[0]))
        for i in model.layers:
            model.W(i)[...] = ops.to_device(init_W[i])
            model.b(i)[...] = ops.to_device(rng.normal(scale=0.5, size=sizes[i + 1]))
        return x, _host_preactivations(model, x)

    x, _ = _away_from_kink(draw) if activation == "relu" else draw()
    xd = ops.to_device(x)
    labels = ops.to_device(rng.integers(0, sizes[-1], size=B))
    scale = 1.0 / B

    model.zero_grad()
    ctx = Context()
    logits = model.forward(xd, ctx)  # (B, C)
    dlogits = ops.xp.empty_like(logits)
    ops.loss(loss, logits, labels, scale, dlogits)
    dx = model.backward(dlogits, ctx, need_input_grad=True)  # (B, sizes[0])
    ops.synchronize()
    grads = {name: ops.to_host(g).copy() for name, g in model.flat.grads.items()}
    grads["dx"] = ops.to_host(dx).copy()

    probe_ctx, scratch = Context(), ops.xp.empty_like(logits)

    def mean_loss():
        return scale * ops.loss(loss, model.forward(xd, probe_ctx), labels, scale, scratch)

    check, tol = f"mlp[{activation},{loss}]", TOLERANCES["model"]
    results = []
    for name, g in grads.items():
        target = xd if name == "dx" else model.flat.params[name]
        num = numerical_grad(mean_loss, target, eps)
        results.append(Result(check, name, rel_error(g, num), tol))
    return results


# ---------------------------------------------------------------- driver


def check_all(seed=0, backend="numpy", eps=EPS):
    """Run every check; ``backend`` is a name for ``get_ops`` or an op set object.

    Returns one ``Result`` per gradient tensor, in table order. Raises
    ImportError (from ``get_ops``) when the backend is not available.
    """
    ops = get_ops(backend) if isinstance(backend, str) else backend
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
    for act in HIDDEN_ACTIVATIONS:
        for loss in LOSS_NAMES:
            results += check_model(ops, act, loss, rng, seed, eps)
    return results


def format_table(results):
    w_check = max(len("check"), *(len(r.check) for r in results))
    w_tensor = max(len("tensor"), *(len(r.tensor) for r in results))
    lines = [f"{'check':<{w_check}}  {'tensor':<{w_tensor}}  {'rel err':>8}  {'tol':>7}  status"]
    for r in results:
        lines.append(f"{r.check:<{w_check}}  {r.tensor:<{w_tensor}}  {r.error:>8.1e}  "
                     f"{r.tol:>7.0e}  {'ok' if r.ok else 'FAIL'}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mpnn.gradcheck",
        description="Check every layer, loss and the whole model against central finite "
                    "differences in float64; exit 1 if any gradient exceeds its tolerance.")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--backend", default="numpy", choices=BACKENDS,
                   help="op set the model runs on (default numpy, the reference)")
    p.add_argument("--eps", type=float, default=EPS,
                   help=f"finite-difference half step (default {EPS:g})")
    args = p.parse_args(argv)
    if not args.eps > 0:
        p.error(f"--eps must be positive, got {args.eps}")
    try:
        results = check_all(args.seed, args.backend, args.eps)
    except (ImportError, RuntimeError) as e:  # a missing package, or no usable GPU
        print(f"gradcheck: backend {args.backend!r} is not available here: {e}. "
              f"Choose another with --backend (numpy is always there).", file=sys.stderr)
        return 2
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results)} gradients checked in float64 (eps={args.eps:g}, seed={args.seed}, "
          f"backend={args.backend}): " + (f"{len(bad)} FAILED" if bad else "all within tolerance"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
