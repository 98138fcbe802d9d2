"""The float32 kernels of a backend against the float64 NumPy reference, on the same inputs.

The float32 kernels (numpy's own, numba's, CuPy's) get inputs rounded to
float32; the float64 reference, checked against central differences, gets the
same rounded values. Any difference is then float32 arithmetic, nothing else:
a reduction of length K errs by at most ≈ K·2^-24, so the tolerance is
``f32_tolerance(K) = (K + F32_ELEMENTWISE)·2^-24``, K summed along the chain.
``float32_backends`` picks the op sets to check.

Shapes: B rows, I in features, O out features, C classes, K a reduction length.
"""

from __future__ import annotations

import numpy as np

from ..kernels import get_ops
from ..kernels.cupy_ops import gpu_available
from ..kernels.numpy_ops import NumpyOps
from ..nn.functional import HIDDEN_ACTIVATIONS, LOSS_NAMES
from ..nn.model import MLP
from .finite_differences import KINK_MARGIN, _layer_inputs, _run_layer, rel_error
from .models import _model_case, _set_model_inputs
from .report import Result

U32 = 2.0 ** -24  # float32 unit round-off
F32_ELEMENTWISE = 8  # ulps of the elementwise steps (exp, tanh, divide, bias add) per chain
# float32 checks need no finite differences: larger, so that no tensor's ∞-norm is
# a cancellation accident of 4 rows (the error is relative to it)
F32_B, F32_I, F32_O = 32, 16, 8
F32_SIZES = (16, 12, 8, 10)
F32_MODEL_CHECKS = (("relu", "cross_entropy"), ("tanh", "mse"),
                    ("sigmoid", "cross_entropy"), ("identity", "mse"))


def f32_tolerance(k):
    """Tolerance of float32 against float64 for a chain of reductions of total length ``k``.

    A float32 dot product of length K is off by at most ≈ K·2^-24 relative to
    Σ|terms| (≈ √K·2^-24 typically, errors of random sign); the chain's
    elementwise steps add a few ulps each (``F32_ELEMENTWISE``)."""
    return (k + F32_ELEMENTWISE) * U32


def _f32(rng, size, scale=1.0):
    """Normal draws rounded to float32, held in float64: exact in both dtypes."""
    return rng.normal(scale=scale, size=size).astype(np.float32).astype(np.float64)


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
