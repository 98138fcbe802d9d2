"""The op set: the interface every kernel backend implements, and the glue they share.

``OpSet`` names every op with its shapes and equation. A backend implements
the abstract methods (``numpy_ops.NumpyOps`` is the readable reference and
the specification; ``numba_ops.NumbaOps`` and ``cupy_ops.CupyOps`` are
tested against it); what is the same for all of them is written here once:

* ``loss`` and ``predict_stats``: the loss-name check, the label check's
  error, the float/int results. A backend only computes ``_loss_rows``.
* ``adam_step``: the bias corrections and the other per-step scalars
  (``AdamScalars``), computed once in Python floats, so every backend
  receives exactly the same numbers.
* ``HostOpSet``: the transfers and the synchronization of CPU backends, which
  are no-ops on NumPy arrays.

The op set (arrays are the backend's array type, ``xp``):

    linear_act(x, W, b, act, out)           out = act(x·W + b)                  (B, O)
    bias_act(z, b, act)                     z ← act(z + b), in place            (B, O)
    act_bias_backward(dy, y, act, db)       dz = dy ⊙ act'(y) over dy; db += Σ_rows dz
    weight_grad(x, dz, dW)                  dW += xᵀ·dz                          (I, O)
    input_grad(dz, W, out)                  out = dz·Wᵀ                          (B, I)
    loss(name, logits, labels, scale, out)  Σ_i loss_i; out = scale·∂(Σ_i loss_i)/∂logits
    predict_stats(logits, labels, name)     (Σ_i loss_i, rows whose argmax is the label)
    sgd_step(p, g, lr, wd)                  p ← p − lr·(g + wd·p)
    momentum_step(p, g, v, lr, μ, nest, wd) v ← μ·v + (g + wd·p); p ← p − lr·v
    adam_step(p, g, m, v, lr, β₁, β₂, ε, wd, t)   AdamW, bias-corrected
    to_device(a) / to_host(a)               a host array on the device / back
    synchronize()                           wait until queued work is done

``act`` is one of ``functional.HIDDEN_ACTIVATIONS``, the loss ``name`` one
of ``functional.LOSS_NAMES``; the derivations are in ``docs/derivations.md``.

Shapes: B rows, I in features, O out features, C classes, N flat parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import numpy as np

from ..nn.functional import LOSS_NAMES


def typed(dtype, *values):
    """``values`` cast to the buffers' dtype (a tuple), so float32 kernels stay float32.

    A Python float handed to a compiled kernel would be float64 and promote
    the whole expression; cast once here, the kernel sees the buffers' type.
    """
    t = np.dtype(dtype).type
    return tuple(t(v) for v in values)


def flush_bound(dtype):
    """The smallest normal number of ``dtype``: optimizer state below it is stored as 0.

    Dead units leave momentum and Adam moments decaying into the subnormal
    range, where every multiply is slow; the fast kernels flush them.
    """
    return np.finfo(dtype).tiny


def grad_factor(name, scale, n_classes, dtype):
    """The factor a loss kernel multiplies its per-logit gradient by, in ``dtype``.

    cross_entropy: ``scale`` (out = scale·(softmax − onehot));
    mse: ``2·scale/C`` (out = (2·scale/C)·(pred − onehot)).
    """
    assert name in LOSS_NAMES, name
    t = np.dtype(dtype).type
    return t(scale) if name == "cross_entropy" else t(2 * scale / n_classes)


class AdamScalars(NamedTuple):
    """The scalars of one AdamW step, Python floats computed once for every backend.

    With c1 = 1−β₁, c2 = 1−β₂, bc2 = 1−β₂ᵗ:

        m ← β₁m + c1·g;  v ← β₂v + c2·g²
        p ← p·decay − lr_t · m / (√(v/bc2) + ε)     decay = 1 − lr·wd,  lr_t = lr/(1−β₁ᵗ)

    (the fast kernels multiply by ``inv_bc2 = 1/bc2`` instead of dividing).
    """

    lr_t: float  # lr / (1 − β₁ᵗ): the first bias correction folded into the step
    beta1: float
    beta2: float
    c1: float  # 1 − β₁
    c2: float  # 1 − β₂
    bc2: float  # 1 − β₂ᵗ: the second bias correction
    inv_bc2: float  # 1 / (1 − β₂ᵗ)
    eps: float
    decay: float  # 1 − lr·wd: decoupled weight decay
    weight_decay: float

    @classmethod
    def at(cls, lr, beta1, beta2, eps, weight_decay, t):
        """The scalars of step ``t`` (1 for the first step)."""
        if t < 1:
            raise ValueError(f"adam_step counts steps from 1 (the bias corrections divide by "
                             f"1 − β^t); got t={t}")
        bc2 = 1 - beta2 ** t
        return cls(lr / (1 - beta1 ** t), beta1, beta2, 1 - beta1, 1 - beta2, bc2, 1 / bc2,
                   eps, 1 - lr * weight_decay, weight_decay)

    def kernel_args(self, dtype):
        """(lr_t, β₁, β₂, c1, c2, inv_bc2, ε, decay, tiny) in ``dtype``: the fused
        kernels' order."""
        return typed(dtype, self.lr_t, self.beta1, self.beta2, self.c1, self.c2, self.inv_bc2,
                     self.eps, self.decay, flush_bound(dtype))


class OpSet(ABC):
    """The interface of a kernel backend (see the module docstring for the whole op set)."""

    name: str  # the backend's name in ``kernels.BACKENDS``
    xp = None  # its array module: numpy, or cupy

    # ------------------------------------------------------------ forward

    @abstractmethod
    def linear_act(self, x, W, b, act, out):
        """out = act(x·W + b): x (B, I), W (I, O), b (O,) -> out (B, O), returned."""

    @abstractmethod
    def bias_act(self, z, b, act):
        """z = act(z + b), in place, returned: z (B, O), b (O,). The second half of
        ``linear_act``, for a product summed over ranks first (a row-parallel layer)."""

    # ----------------------------------------------------------- backward

    @abstractmethod
    def act_bias_backward(self, dy, y, act, db):
        """dz = dy ⊙ act'(y), in place over dy, returned;  db += Σ_rows dz.

        dy, y (B, O) with y the layer's output (act' is written with it); db (O,).
        """

    @abstractmethod
    def weight_grad(self, x, dz, dW):
        """dW += xᵀ·dz: x (B, I), dz (B, O) -> dW (I, O), accumulated in place."""

    @abstractmethod
    def input_grad(self, dz, W, out):
        """out = dz·Wᵀ: dz (B, O), W (I, O) -> out (B, I), returned."""

    # --------------------------------------------------------------- loss

    def loss(self, name, logits, labels, scale, out):
        """Σ_i loss_i over the rows; writes out = scale · ∂(Σ_i loss_i)/∂logits.

        logits, out (B, C); labels (B,) ints in [0, C). The trainer passes
        scale = 1/global_batch. Returns the (unscaled) loss sum as a float.
        """
        return self._checked_loss(name, logits, labels, scale, out, True)[0]

    def predict_stats(self, logits, labels, loss_name):
        """(Σ_i loss_i, number of rows whose argmax is the label) of a batch, for evaluation.

        logits (B, C), labels (B,); no gradient is written.
        """
        return self._checked_loss(loss_name, logits, labels, 1.0, logits, False)

    def _checked_loss(self, name, logits, labels, scale, out, write_grad):
        if name not in LOSS_NAMES:
            raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
        loss_sum, n_correct = self._loss_rows(name, logits, labels, scale, out, write_grad)
        if n_correct < 0:
            C = logits.shape[1]
            raise ValueError(f"labels must lie in [0, {C}) for {C} outputs; "
                             f"got min {int(labels.min())}, max {int(labels.max())}")
        return float(loss_sum), int(n_correct)

    @abstractmethod
    def _loss_rows(self, name, logits, labels, scale, out, write_grad):
        """(loss_sum, n_correct) of loss ``name`` (already checked), the backend's part of ``loss``.

        logits, out (B, C); labels (B,). If ``write_grad``, out = scale · ∂loss_sum/∂logits;
        otherwise out (then ``logits`` itself) is not written. n_correct counts
        the rows whose argmax (the first maximum, as np.argmax) is the label; it
        is -1 when a label lies outside [0, C), and ``loss`` raises.
        """

    # ---------------------------------------------------------- optimizer

    @abstractmethod
    def sgd_step(self, p, g, lr, weight_decay):
        """p ← p − lr·(g + wd·p), in place.  p, g (N,)."""

    @abstractmethod
    def momentum_step(self, p, g, v, lr, momentum, nesterov, weight_decay):
        """v ← μ·v + (g + wd·p);  p ← p − lr·v  (Nesterov: p ← p − lr·(g + wd·p + μ·v)).

        In place; p, g, v (N,).
        """

    def adam_step(self, p, g, m, v, lr, beta1, beta2, eps, weight_decay, t):
        """AdamW step ``t`` (from 1): p ← p·(1 − lr·wd) − lr · m̂ / (√v̂ + ε).

        m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ);
        in place, p, g, m, v (N,).
        """
        self._adam_update(p, g, m, v, AdamScalars.at(lr, beta1, beta2, eps, weight_decay, t))

    @abstractmethod
    def _adam_update(self, p, g, m, v, s):
        """The backend's part of ``adam_step``, with the step's ``AdamScalars`` s."""

    # -------------------------------------------------------------- transfers

    @abstractmethod
    def to_device(self, a):
        """A host NumPy array as this backend's array (the same array on the CPU)."""

    @abstractmethod
    def to_host(self, a):
        """This backend's array as a host NumPy array (the same array on the CPU)."""

    @abstractmethod
    def synchronize(self):
        """Return once queued work is done (before MPI reads the buffers)."""


class HostOpSet(OpSet):
    """An op set on host NumPy arrays: transfers are the identity, nothing is queued."""

    xp = np

    def to_device(self, a):
        return a

    def to_host(self, a):
        return a

    def synchronize(self):
        pass
