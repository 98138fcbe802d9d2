"""Gradient check of every layer, loss and the whole model, in float64 and float32.

    python -m mpnn.gradcheck [--seed 0] [--backend numpy] [--eps 1e-6]

Two sections, one table, one verdict (exit status 0, or 1 if any row fails).

**float64 against central differences.** Each backward is compared with
central finite differences of a scalar:

* a layer or activation ``y = f(x)`` is projected on a random upstream
  gradient ``dy``, so one scalar ``φ(x) = ⟨dy, f(x)⟩`` checks the whole
  Jacobian-vector product its backward computes: ``∂φ/∂x = backward(dy)``;
* a loss is already a scalar: ``scale · loss_sum`` with ``scale = 1/B``;
* the model is checked through its own ``forward``/``backward``, the op set
  of ``--backend`` and the flat gradient buffer, with the mean loss on top:
  the 3-layer model at 4, 2 and 1 rows, a model without hidden layers
  (``mlp[none,…]``) and pipeline stages ``layers=range(1, …)`` with and
  without the input gradient (``no_dx``); a stage that stops before the
  last layer has ``⟨dy, h_stop⟩`` on top instead of a loss (``mlp[act,dy]``).

The numerical derivative of one element is ``(φ(x + h) − φ(x − h)) / 2h``,
evaluated as ``⟨dy, f(x + h) − f(x − h)⟩ / 2h`` so that only the outputs the
element moves contribute rounding error. ReLU's kink at 0 is kept out of the
probe: inputs (pre-activations) are redrawn until none lies within
``kink_margin(eps) = max(1e-3, 20·eps)`` of 0, beyond what a step moves them.

**float32 against the float64 reference.** The float32 kernels of a backend
(numpy's own, numba's, CuPy's) get inputs rounded to float32; the float64
NumPy reference, checked above, gets the same rounded values. Any difference
is then float32 arithmetic, nothing else.

The error of one tensor is ``max |a − r| / max(|a|, |r|)`` (∞-norms): the
worst element's error relative to the tensor's scale, so an entry that
happens to be ~0 cannot blow up the ratio. The tolerances follow from the
step and the dtype (``fd_tolerance``, ``f32_tolerance``; derivation in
``docs/derivations.md`` §9). A wrong backward (a missing term, a transposed
factor, a lost scale) lands near 1, and 1% off is still 10× above every
tolerance at every accepted ``--eps``.

Shapes: B rows, I in features, O out features, C classes, K a reduction length.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np

from .kernels import BACKENDS, get_ops
from .kernels.cupy_ops import gpu_available
from .kernels.numpy_ops import NumpyOps
from .nn import functional as F
from .nn.functional import HIDDEN_ACTIVATIONS, LOSS_NAMES
from .nn.model import MLP, Context
from .runtime.options import nonneg_int, option_type

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
U32 = 2.0 ** -24  # float32 unit round-off
F32_ELEMENTWISE = 8  # ulps of the elementwise steps (exp, tanh, divide, bias add) per chain

B, I, O, C = 4, 5, 3, 4  # small: every element is probed
MODEL_SIZES = (5, 6, 4, 3)  # three linear layers: input, hidden, output
# float32 checks need no finite differences: larger, so that no tensor's ∞-norm is
# a cancellation accident of 4 rows (the error is relative to it)
F32_B, F32_I, F32_O = 32, 16, 8
F32_SIZES = (16, 12, 8, 10)
STAGE_CHECKS = (  # (layers, activation, loss or None for ⟨dy, h⟩, need_input_grad)
    (range(1, 3), "relu", "cross_entropy", True),  # the last stage of a pipeline
    (range(1, 3), "tanh", "mse", False),
    (range(1, 2), "sigmoid", None, True),  # a middle stage
    (range(1, 2), "relu", None, False),
)
ROW_CHECKS = ((1, "relu", "cross_entropy"), (2, "tanh", "mse"))  # (B, activation, loss)
F32_MODEL_CHECKS = (("relu", "cross_entropy"), ("tanh", "mse"),
                    ("sigmoid", "cross_entropy"), ("identity", "mse"))


def fd_tolerance(eps, kind="op", dtype=DTYPE):
    """Tolerance of a central-difference check with half step ``eps`` in ``dtype``:
    ``T·eps² + R·u/eps`` with (T, R) = ``FD_CONSTANTS[kind]``, u the unit round-off."""
    trunc, rounding = FD_CONSTANTS[kind]
    return trunc * eps ** 2 + rounding * (np.finfo(dtype).eps / 2) / eps


def f32_tolerance(k):
    """Tolerance of float32 against float64 for a chain of reductions of total length ``k``.

    A float32 dot product of length K is off by at most ≈ K·2^-24 relative to
    Σ|terms| (≈ √K·2^-24 typically, errors of random sign); the chain's
    elementwise steps add a few ulps each (``F32_ELEMENTWISE``)."""
    return (k + F32_ELEMENTWISE) * U32


@dataclass(frozen=True)
class Result:
    """The worst relative error of one tensor of one check."""

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


def _f32(rng, size, scale=1.0):
    """Normal draws rounded to float32, held in float64: exact in both dtypes."""
    return rng.normal(scale=scale, size=size).astype(np.float32).astype(np.float64)


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


# -------------------------------------------------- float32 against float64


def check_f32_layer(ops, act, rng):
    """The backend's fused layer in float32 against the float64 reference, same inputs.

    W ~ N(0, 1/I), like the model's init: z = x·W + b stays O(1), unsaturated.
    K = I + 1 (forward: x·W + b) + B (db, dW: sums over rows) + O (dx = dz·Wᵀ)."""
    rows, n_in, n_out = F32_B, F32_I, F32_O
    x, W, b = _layer_inputs(act, KINK_MARGIN, lambda size: _f32(
        rng, size, n_in ** -0.5 if size == (n_in, n_out) else 1.0), (rows, n_in, n_out))
    dy = _f32(rng, (rows, n_out))  # (B, O)
    want, _ = _run_layer(NumpyOps(), x, W, b, dy, act)
    got, _ = _run_layer(ops, *(a.astype(np.float32) for a in (x, W, b, dy)), act)
    check, tol = f"f32.{ops.name}.linear_act[{act}]", f32_tolerance(n_in + 1 + rows + n_out)
    return [Result(check, name, rel_error(got[name], want[name]), tol) for name in want]


def check_f32_loss(ops, name, rng):
    """The backend's loss in float32 against float64: the loss sum (K = C + B: a
    softmax sum per row, then a sum over rows) and dlogits (K = C)."""
    rows, n_classes = F32_B, F32_SIZES[-1]
    logits = _f32(rng, (rows, n_classes), 2.0)  # (B, C)
    labels = rng.integers(0, n_classes, size=rows)  # (B,)
    out = {}
    for o, dtype in ((NumpyOps(), np.float64), (ops, np.float32)):
        d = o.xp.empty((rows, n_classes), dtype=dtype)
        loss = o.loss(name, o.to_device(logits.astype(dtype)), o.to_device(labels), 1 / rows, d)
        o.synchronize()
        out[dtype] = (np.array([loss]), o.to_host(d))
    (want_loss, want_d), (got_loss, got_d) = out[np.float64], out[np.float32]
    check = f"f32.{ops.name}.loss[{name}]"
    return [Result(check, "loss", rel_error(got_loss, want_loss),
                   f32_tolerance(n_classes + rows)),
            Result(check, "dlogits", rel_error(got_d, want_d), f32_tolerance(n_classes))]


def check_f32_model(ops, activation, loss, rng, seed=0, sizes=F32_SIZES, rows=F32_B):
    """The whole float32 model on the backend against the float64 reference model.

    K: the forward's Σ(I_i + 1), the loss's C, the backward's Σ O_i (input
    gradients down to dx) and B (dW, db)."""
    ref = MLP(sizes, activation, dtype=np.float64, seed=seed, ops=NumpyOps())
    m32 = MLP(sizes, activation, dtype=np.float32, seed=seed, ops=ops)
    x = _set_model_inputs([ref, m32], rows, lambda size, s=1.0: _f32(rng, size, s), KINK_MARGIN)
    labels = rng.integers(0, sizes[-1], size=rows)  # (B,)
    want = _model_case(ref, x, labels, None, loss, True)[1]
    got = _model_case(m32, x, ops.to_device(labels), None, loss, True)[1]
    k = sum(sizes[:-1]) + len(sizes) - 1 + sizes[-1] + sum(sizes[1:]) + rows
    check, tol = f"f32.{ops.name}.mlp[{activation},{loss}]", f32_tolerance(k)
    return [Result(check, name, rel_error(got[name], want[name]), tol) for name in want]


def check_float32(ops, rng, seed=0):
    """The float32 section for one op set, in table order."""
    results = []
    for act in HIDDEN_ACTIVATIONS:
        results += check_f32_layer(ops, act, rng)
    for loss in LOSS_NAMES:
        results += check_f32_loss(ops, loss, rng)
    for act, loss in F32_MODEL_CHECKS:
        results += check_f32_model(ops, act, loss, rng, seed)
    return results


# ---------------------------------------------------------------- driver


def float32_backends(backend):
    """The op sets whose float32 kernels are checked, and why any other was not.

    An explicit backend (a name other than numpy, or an op set object): that
    one. numpy, the default: numpy's float32 path and every compiled backend
    usable here (numba when it imports, cupy when a GPU answers)."""
    if not isinstance(backend, str):
        return [backend], []
    if backend != "numpy":
        return [get_ops(backend)], []
    found, skipped = [NumpyOps()], []
    try:
        found.append(get_ops("numba"))
    except ImportError as e:
        skipped.append(f"numba (it does not import: {e})")
    if gpu_available():
        found.append(get_ops("cupy"))
    else:
        skipped.append("cupy (no usable CuPy and CUDA GPU here)")
    return found, skipped


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


def _section(check):
    """The table section of a check: functional.py, the op set, the model, float32 per backend."""
    if check.startswith("f32."):
        return check.split(".")[1]
    return "ops" if check.startswith("ops.") else "mlp" if check.startswith("mlp[") else ""


def format_table(results):
    """One row per tensor, a blank line between sections, the largest err/tol last."""
    w_check = max(len("check"), *(len(r.check) for r in results))
    w_tensor = max(len("tensor"), *(len(r.tensor) for r in results))
    lines = [f"{'check':<{w_check}}  {'tensor':<{w_tensor}}  {'rel err':>8}  {'tol':>8}  status"]
    for prev, r in zip([None, *results], results, strict=False):
        if prev is not None and _section(prev.check) != _section(r.check):
            lines.append("")
        lines.append(f"{r.check:<{w_check}}  {r.tensor:<{w_tensor}}  {r.error:>8.1e}  "
                     f"{r.tol:>8.1e}  {'ok' if r.ok else 'FAIL'}")
    worst = max(results, key=lambda r: np.inf if np.isnan(r.error) else r.error / r.tol)
    lines.append(f"\nlargest rel err / tol: {worst.error / worst.tol:.2g} "
                 f"({worst.check} {worst.tensor})")
    return "\n".join(lines)


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
    p.add_argument("--eps", type=_eps, default=EPS,
                   help=f"finite-difference half step in [{EPS_RANGE[0]:g}, {EPS_RANGE[1]:g}] "
                        f"(default {EPS:g}); the tolerances follow it")
    args = p.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
