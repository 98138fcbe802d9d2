"""The op set on the CPU: BLAS GEMMs with fused numba epilogues, no allocation.

Same interface (``base.OpSet``) and results as ``numpy_ops.NumpyOps`` (the
specification). What is different, and why it is faster:

* **GEMMs stay on BLAS**: no numba GEMM was measured
  faster than OpenBLAS here. ``weight_grad`` calls BLAS ``?gemm`` with
  ``beta = 1``, so ``dW += xᵀ·dz`` accumulates straight into the gradient
  buffer with no ``(I, O)`` temporary. Row-major trick: a C-ordered ``(I, O)``
  array is a Fortran-ordered ``(O, I)`` one, so Fortran BLAS is asked for
  ``dWᵀ += dzᵀ·x`` and every operand is passed without a copy.
* **Fused epilogues** in numba (compiled once, cached on disk): bias +
  activation in one pass over the GEMM output; activation backward + bias
  gradient in one pass over ``dy``; softmax cross-entropy writing ``dlogits``
  in place; each optimizer update one pass over the flat buffers.
* **Subnormals flushed to zero** in optimizer state: dead ReLU units leave
  momentum/Adam moments decaying geometrically into the subnormal range,
  where every multiply takes a slow micro-coded path. State values below the
  dtype's smallest normal number (1.2e-38 in float32) are stored as 0.
* **NumPy's error model** (``error_model="numpy"``): a division by zero gives
  inf/nan as in NumPy instead of a Python ZeroDivisionError check on every
  division, which kept LLVM from vectorizing the loops (AdamW over the
  benchmark MLP: 608 µs -> 137 µs, bitwise the same result).
* **Explicit dtypes**: scalars (lr, momentum, ...) are cast to the buffers'
  dtype before the kernels see them, and kernel constants are typed from the
  arrays (``a.dtype.type(1)``; a bare ``1`` would promote float32 to float64
  inside numba), so float32 math stays float32 — as in the reference under
  NumPy 2's weak-scalar rules.

tanh uses NumPy's SIMD ufunc after the numba bias pass: numba calls scalar
libm ``tanhf``, measured ~30x slower than NumPy's vectorized float32 tanh.

The kernels are serial on purpose. Measured on the 2-core development
machine, the momentum update over the 242,762 parameters of the benchmark
MLP takes ~95 µs serial (it is bound by memory bandwidth) and ~300 µs as a
``parallel=True``/``prange`` kernel on 1 or 2 threads; the epilogues are
smaller still. Threads go to BLAS, where the work is.

Shapes: B rows, I in features, O out features, C classes, N flat parameters.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..nn.functional import ACTIVATIONS, LOSS_NAMES
from .base import HostOpSet, flush_bound, grad_factor, typed

ACT_CODES = {"identity": 0, "relu": 1, "tanh": 2, "sigmoid": 3}  # the kernels' branch numbers
assert set(ACT_CODES) == set(ACTIVATIONS), "every activation needs a kernel code"

# ------------------------------------------------------------- forward epilogue


@njit(cache=True, error_model="numpy")
def bias_act(out, b, code):
    """out = act(out + b) in place.  out (B, O), b (O,).

    code 0 identity, 1 relu, 2 bias only (tanh follows as a NumPy ufunc),
    3 sigmoid, stable: with e = exp(−|z|), σ(z) = 1/(1+e) if z ≥ 0 else e/(1+e).
    """
    B, O = out.shape
    zero, one = out.dtype.type(0), out.dtype.type(1)
    if code == 1:
        for i in range(B):
            for j in range(O):
                v = out[i, j] + b[j]
                if v < zero:  # NaN stays NaN, as with np.maximum
                    v = zero
                out[i, j] = v
    elif code == 3:
        for i in range(B):
            for j in range(O):
                z = out[i, j] + b[j]
                e = np.exp(-abs(z))
                out[i, j] = one / (one + e) if z >= zero else e / (one + e)
    else:
        for i in range(B):
            for j in range(O):
                out[i, j] += b[j]


# ------------------------------------------------------------ backward epilogue


@njit(cache=True, error_model="numpy")
def act_bias_backward(dy, y, db, code):
    """dz = dy ⊙ act'(y) in place over dy;  db += Σ_rows dz.   dy, y (B, O); db (O,).

    act'(y) is written with the output y: relu [y > 0], tanh 1 − y²,
    sigmoid y(1 − y), identity 1.
    """
    B, O = dy.shape
    zero, one = dy.dtype.type(0), dy.dtype.type(1)
    if code == 0:
        for i in range(B):
            for j in range(O):
                db[j] += dy[i, j]
    elif code == 1:
        for i in range(B):
            for j in range(O):
                d = dy[i, j] if y[i, j] > zero else zero
                dy[i, j] = d
                db[j] += d
    elif code == 2:
        for i in range(B):
            for j in range(O):
                t = y[i, j]
                d = dy[i, j] * (one - t * t)
                dy[i, j] = d
                db[j] += d
    else:
        for i in range(B):
            for j in range(O):
                s = y[i, j]
                d = dy[i, j] * s * (one - s)
                dy[i, j] = d
                db[j] += d


# ------------------------------------------------------------------------ losses


@njit(cache=True, error_model="numpy")
def softmax_xent(logits, labels, scale, out, write_grad):
    """Σ_i (lse_i − z_{i,y_i}) and, if write_grad, out = scale·(softmax − onehot).

    logits, out (B, C); labels (B,). Per row: one pass for the max (and
    argmax), one storing e^(z − m) into out while summing it, one scaling.
    Also returns the number of rows whose argmax (first maximum, as
    np.argmax) equals the label, and -1 in place of that count when a label
    is outside [0, C).
    """
    B, C = logits.shape
    loss = 0.0  # float64 accumulator
    correct = 0
    for i in range(B):
        y = labels[i]
        if y < 0 or y >= C:
            return 0.0, -1
        m = logits[i, 0]
        arg = 0
        for c in range(1, C):
            if logits[i, c] > m:
                m = logits[i, c]
                arg = c
        correct += arg == y
        s = logits.dtype.type(0)
        if write_grad:  # keep e^(z − m) in out, then scale it: one exp per logit
            for c in range(C):
                e = np.exp(logits[i, c] - m)
                out[i, c] = e
                s += e
            inv = scale / s
            for c in range(C):
                out[i, c] *= inv
            out[i, y] -= scale
        else:
            for c in range(C):
                s += np.exp(logits[i, c] - m)
        loss += float(m) + float(np.log(s)) - float(logits[i, y])
    return loss, correct


@njit(cache=True, error_model="numpy")
def mse_loss(pred, labels, g, out, write_grad):
    """Σ_i (1/C) Σ_c (pred_ic − t_ic)², t = onehot(labels); out = g·(pred − t).

    The caller passes g = scale·2/C. Returns (loss_sum, n_correct) like
    ``softmax_xent`` (-1: a label out of range).
    """
    B, C = pred.shape
    one = pred.dtype.type(1)
    loss = 0.0
    correct = 0
    for i in range(B):
        y = labels[i]
        if y < 0 or y >= C:
            return 0.0, -1
        m = pred[i, 0]
        arg = 0
        row = 0.0
        for c in range(C):
            p = pred[i, c]
            if p > m:
                m = p
                arg = c
            diff = p - one if c == y else p
            row += float(diff) * float(diff)
            if write_grad:
                out[i, c] = diff * g
        correct += arg == y
        loss += row / C
    return loss, correct


# --------------------------------------------------------------------- optimizer


@njit(cache=True, error_model="numpy")
def sgd_update(p, g, lr, wd):
    """p -= lr·(g + wd·p), one pass.  p, g (N,)."""
    if wd != 0:
        for k in range(p.shape[0]):
            p[k] -= lr * (g[k] + wd * p[k])
    else:
        for k in range(p.shape[0]):
            p[k] -= lr * g[k]


@njit(cache=True, error_model="numpy")
def momentum_update(p, g, v, lr, mu, nesterov, wd, tiny):
    """v = μ·v + (g + wd·p);  p -= lr·v  (Nesterov: p -= lr·(g + wd·p + μ·v)).

    One pass over p, g, v (N,); |v| < tiny (subnormal) is stored as 0.
    """
    zero = p.dtype.type(0)
    for k in range(p.shape[0]):
        gk = g[k] + wd * p[k] if wd != zero else g[k]
        vk = mu * v[k] + gk
        if abs(vk) < tiny:
            vk = zero
        v[k] = vk
        p[k] -= lr * (gk + mu * vk if nesterov else vk)


@njit(cache=True, error_model="numpy")
def adam_update(p, g, m, v, lr_t, beta1, beta2, c1, c2, inv_bc2, eps, decay, tiny):
    """AdamW in one pass over p, g, m, v (N,):

        m = β₁m + (1−β₁)g;  v = β₂v + (1−β₂)g²          (c1 = 1−β₁, c2 = 1−β₂)
        p = p·decay − lr_t · m / (√(v·inv_bc2) + ε)      (decay = 1 − lr·wd,
                                                          lr_t = lr/(1−β₁ᵗ), inv_bc2 = 1/(1−β₂ᵗ))
    Moments below ``tiny`` (subnormal) are stored as 0.
    """
    zero, one = p.dtype.type(0), p.dtype.type(1)
    for k in range(p.shape[0]):
        gk = g[k]
        mk = beta1 * m[k] + c1 * gk
        vk = beta2 * v[k] + c2 * (gk * gk)
        if abs(mk) < tiny:
            mk = zero
        if vk < tiny:
            vk = zero
        m[k] = mk
        v[k] = vk
        pk = p[k] * decay if decay != one else p[k]
        p[k] = pk - lr_t * (mk / (np.sqrt(vk * inv_bc2) + eps))


# ------------------------------------------------------------------ the op set

_LOSS_KERNELS = {"cross_entropy": softmax_xent, "mse": mse_loss}
assert set(_LOSS_KERNELS) == set(LOSS_NAMES), "every loss needs a kernel"


class NumbaOps(HostOpSet):
    """CPU op set: BLAS GEMMs + fused numba kernels (see the module docstring)."""

    name = "numba"

    def __init__(self):
        self._gemm_beta1 = _beta1_gemms()
        self._workspace = {}  # (shape, dtype) -> scratch for the two-BLAS fallback

    # ------------------------------------------------------------ forward

    def linear_act(self, x, W, b, act, out):
        """out = act(x·W + b): x (B, I), W (I, O), b (O,) -> out (B, O)."""
        np.matmul(x, W, out=out)  # (B, O)
        return self.bias_act(out, b, act)

    def bias_act(self, z, b, act):
        """z = act(z + b) in place, one fused pass: z (B, O), b (O,)."""
        code = ACT_CODES[act]
        bias_act(z, b, code)
        if code == 2:
            np.tanh(z, out=z)
        return z

    # ----------------------------------------------------------- backward

    def act_bias_backward(self, dy, y, act, db):
        """dz = dy ⊙ act'(y) (in place over dy); db += Σ_rows dz.  dy, y (B, O)."""
        act_bias_backward(dy, dy if y is None else y, db, ACT_CODES[act])
        return dy

    def weight_grad(self, x, dz, dW):
        """dW += xᵀ·dz: x (B, I), dz (B, O) -> dW (I, O), accumulated by BLAS (beta = 1)."""
        if x.dtype != dW.dtype or dz.dtype != dW.dtype:
            dW += x.T @ dz  # mixed dtypes: the reference path
            return
        gemm = self._gemm_beta1.get(dW.dtype)
        if gemm is None or not dW.flags.c_contiguous:
            # NumPy's BLAS into a reused scratch, then one add: no allocation
            key = (dW.shape, dW.dtype)
            scratch = self._workspace.get(key)
            if scratch is None:
                scratch = self._workspace[key] = np.empty(dW.shape, dW.dtype)
            np.matmul(x.T, dz, out=scratch)  # (I, O)
            np.add(dW, scratch, out=dW)
            return
        x = np.ascontiguousarray(x)
        dz = np.ascontiguousarray(dz)
        # Column-major view: dWᵀ (O, I) += dzᵀ (O, B) · x (B, I); x enters as
        # xᵀ (I, B, Fortran order) with trans_b, so nothing is copied.
        gemm(1.0, dz.T, x.T, beta=1.0, c=dW.T, trans_b=1, overwrite_c=1)

    def input_grad(self, dz, W, out):
        """out = dz·Wᵀ: dz (B, O), W (I, O) -> out (B, I)."""
        return np.matmul(dz, W.T, out=out)

    # --------------------------------------------------------------- loss

    def _loss_rows(self, name, logits, labels, scale, out, write_grad):
        """(loss_sum, n_correct; -1: a bad label) in one fused pass; out (B, C) if write_grad."""
        factor = grad_factor(name, scale, logits.shape[1], logits.dtype)
        return _LOSS_KERNELS[name](logits, labels, factor, out, write_grad)

    # ---------------------------------------------------------- optimizer

    def sgd_step(self, p, g, lr, weight_decay):
        """p -= lr·(g + wd·p)."""
        sgd_update(p, g, *typed(p.dtype, lr, weight_decay))

    def momentum_step(self, p, g, v, lr, momentum, nesterov, weight_decay):
        """v = μ·v + (g + wd·p);  p -= lr·v   (Nesterov: p -= lr·(g + wd·p + μ·v))."""
        t_lr, t_mu, t_wd, tiny = typed(p.dtype, lr, momentum, weight_decay, flush_bound(p.dtype))
        momentum_update(p, g, v, t_lr, t_mu, bool(nesterov), t_wd, tiny)

    def _adam_update(self, p, g, m, v, s):
        """AdamW in one pass with the step's scalars ``s`` (see ``base.AdamScalars``)."""
        adam_update(p, g, m, v, *s.kernel_args(p.dtype))


def _beta1_gemms():
    """SciPy's ``?gemm`` (which takes beta = 1) by dtype, when it is safe to use.

    SciPy may bring its own OpenBLAS next to NumPy's. With one BLAS thread
    that costs nothing; with more, each library keeps its own worker threads
    spinning after a call, and alternating the two libraries in a step
    oversubscribes the cores (measured here with 2 threads: 10k instead of
    159k samples/s). So SciPy's gemm is used only when it *is* NumPy's BLAS or
    BLAS runs on one thread; otherwise ``weight_grad`` stays on NumPy's BLAS
    with a scratch buffer and one add. Without SciPy or threadpoolctl: the same.
    SciPy's BLAS gets NumPy's thread limit here, whether this loads it or an
    earlier import did after the limit was set.
    """
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        return {}

    def blas_threads():
        return {i["filepath"]: i["num_threads"] for i in threadpool_info()
                if i.get("user_api") == "blas"}

    before = blas_threads()  # NumPy's, plus SciPy's if something loaded it earlier
    try:
        from scipy.linalg import blas  # loads SciPy's own BLAS, if it has one
    except ImportError:
        return {}
    after = blas_threads()
    if before and len(set(after.values())) > 1:
        # SciPy's own BLAS, loaded just now or by an earlier import (scikit-learn's,
        # for the digits) after the run limited NumPy's: give every BLAS the limit
        threadpool_limits(limits=min(after.values()), user_api="blas")
        after = blas_threads()
    if len(after) > 1 and max(after.values()) > 1:
        return {}
    return {np.dtype(np.float32): blas.sgemm, np.dtype(np.float64): blas.dgemm}
