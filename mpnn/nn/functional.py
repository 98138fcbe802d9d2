"""Pure forward/backward pairs: the hand-derived math of an MLP.

Every function here is stateless NumPy. A forward returns its output and the
cache its backward needs; the backward takes the upstream gradient and that
cache and returns the gradients of the forward's inputs. Nothing accumulates
here: the model adds these into its flat gradient buffer (see ``model.py``).
The full derivations are in ``docs/derivations.md``.

Shape legend
    B   rows in the (micro-)batch
    I   input features of a linear layer
    O   output features of a linear layer
    C   classes (logits per row)

Batches are rows: ``x`` is ``(B, I)``, ``W`` is ``(I, O)``, ``y = x @ W + b``.
"""

from __future__ import annotations

import numpy as np

# --------------------------------------------------------------------------- linear


def linear_forward(x, W, b):
    """y = x·W + b.

    x (B, I), W (I, O), b (O,) -> y (B, O); cache = (x, W).
    """
    y = x @ W + b  # (B, O)
    return y, (x, W)


def linear_backward(dy, cache):
    """dx = dy·Wᵀ,  dW = xᵀ·dy,  db = Σ_rows dy.

    dy (B, O) -> dx (B, I), dW (I, O), db (O,).
    """
    x, W = cache
    dx = dy @ W.T  # (B, I)
    dW = x.T @ dy  # (I, O)
    db = dy.sum(axis=0)  # (O,)
    return dx, dW, db


# ----------------------------------------------------------------------- activations
# Each activation's derivative is written in terms of its *output* y, so the
# cache is y alone and a fused "bias + activation" kernel need not keep z.


def relu_forward(z):
    """y = max(z, 0).  z (B, O) -> y (B, O); cache = y."""
    y = np.maximum(z, 0)  # (B, O)
    return y, y


def relu_backward(dy, y):
    """dz = dy ⊙ [y > 0]   (the subgradient at 0 is taken as 0)."""
    return dy * (y > 0)  # (B, O)


def tanh_forward(z):
    """y = tanh(z).  cache = y."""
    y = np.tanh(z)  # (B, O)
    return y, y


def tanh_backward(dy, y):
    """dz = dy ⊙ (1 − y²)   since d tanh(z)/dz = 1 − tanh²(z)."""
    return dy * (1 - y * y)  # (B, O)


def sigmoid_forward(z):
    """y = σ(z) = 1 / (1 + e^(−z)), evaluated without overflow for large |z|."""
    e = np.exp(-np.abs(z))  # (B, O), in (0, 1]
    y = np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype, copy=False)  # (B, O)
    return y, y


def sigmoid_backward(dy, y):
    """dz = dy ⊙ y ⊙ (1 − y)   since σ'(z) = σ(z)(1 − σ(z))."""
    return dy * y * (1 - y)  # (B, O)


def identity_forward(z):
    """y = z."""
    return z, None


def identity_backward(dy, _cache):
    """dz = dy."""
    return dy


ACTIVATIONS = {
    "relu": (relu_forward, relu_backward),
    "tanh": (tanh_forward, tanh_backward),
    "sigmoid": (sigmoid_forward, sigmoid_backward),
    "identity": (identity_forward, identity_backward),
}
HIDDEN_ACTIVATIONS = tuple(ACTIVATIONS)
"""The activation names, defined here once: a model's hidden layers use one of
them (its output layer is the identity), and every op set implements each."""

# ---------------------------------------------------------------------------- losses
# Both losses return the *sum* of the per-row losses and the gradient of
# ``scale · sum``. The trainer passes ``scale = 1 / global_batch``: that is
# the one place the batch mean enters the math, so
# micro-batches and data-parallel ranks add up to the serial gradient.


def softmax_cross_entropy(logits, labels, scale=1.0):
    """Fused, stable softmax + cross-entropy: the loss and dlogits in one pass.

    logits (B, C), labels (B,) int -> (loss_sum, dlogits (B, C)).

        m_i   = max_c z_ic                         (shift: softmax is shift-invariant)
        lse_i = m_i + log Σ_c exp(z_ic − m_i)
        L     = Σ_i (lse_i − z_{i,y_i})
        dL/dz_ic = p_ic − [c = y_i],   p_ic = exp(z_ic − lse_i)

    ``dlogits = scale · (p − onehot(labels))``.
    """
    B = logits.shape[0]
    rows = np.arange(B)
    shifted = logits - logits.max(axis=1, keepdims=True)  # (B, C), max is 0
    sumexp = np.exp(shifted).sum(axis=1, keepdims=True)  # (B, 1), in [1, C]
    log_p = shifted - np.log(sumexp)  # (B, C)
    loss_sum = float(-log_p[rows, labels].sum())
    dlogits = np.exp(log_p)  # (B, C) = p
    dlogits[rows, labels] -= 1  # (B, C) = p − onehot
    dlogits *= logits.dtype.type(scale)
    return loss_sum, dlogits


def mse(pred, target, scale=1.0):
    """Mean squared error per row, summed over rows.

    pred (B, C), target (B, C) -> (loss_sum, dpred (B, C)).

        L = Σ_i (1/C) Σ_c (pred_ic − t_ic)²
        dL/dpred_ic = (2/C) (pred_ic − t_ic)

    ``dpred = scale · dL/dpred``.
    """
    C = pred.shape[1]
    diff = pred - target  # (B, C)
    loss_sum = float((diff * diff).sum() / C)
    dpred = diff * pred.dtype.type(2 * scale / C)  # (B, C)
    return loss_sum, dpred


def one_hot(labels, num_classes, dtype=np.float32):
    """labels (B,) int -> (B, C) with a 1 in each row's label column."""
    out = np.zeros((labels.shape[0], num_classes), dtype=dtype)
    out[np.arange(labels.shape[0]), labels] = 1
    return out


LOSSES = {"cross_entropy": softmax_cross_entropy, "mse": mse}
LOSS_NAMES = tuple(LOSSES)
"""The loss names, defined here once: what ``--loss`` and the op sets' ``loss`` accept."""
