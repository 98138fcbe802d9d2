"""The reference op set in plain NumPy: the specification the fast backends meet.

Shapes: B rows, I in features, O out features, C classes, N flat parameters.
The interface and its equations are in ``base.py``; ``mpnn/nn/functional.py``
holds the math each op calls and ``docs/derivations.md`` its derivation.
"""

from __future__ import annotations

import numpy as np

from ..nn import functional as F
from .base import HostOpSet


class NumpyOps(HostOpSet):
    name = "numpy"

    # ------------------------------------------------------------ forward

    def linear_act(self, x, W, b, act, out):
        """out = act(x·W + b): x (B, I), W (I, O), b (O,) -> out (B, O)."""
        np.matmul(x, W, out=out)  # (B, O)
        return self.bias_act(out, b, act)

    def bias_act(self, z, b, act):
        """z = act(z + b) in place: z (B, O), b (O,)."""
        z += b
        if act == "relu":
            np.maximum(z, 0, out=z)
        elif act != "identity":
            z[...] = F.ACTIVATIONS[act][0](z)[0]
        return z

    # ----------------------------------------------------------- backward

    def act_bias_backward(self, dy, y, act, db):
        """dz = dy ⊙ act'(y) (in place over dy); db += Σ_rows dz.  dy, y (B, O)."""
        if act != "identity":
            dy[...] = F.ACTIVATIONS[act][1](dy, y)  # (B, O)
        db += dy.sum(axis=0)  # (O,)
        return dy

    def weight_grad(self, x, dz, dW):
        """dW += xᵀ·dz: x (B, I), dz (B, O) -> dW (I, O)."""
        dW += x.T @ dz

    def input_grad(self, dz, W, out):
        """out = dz·Wᵀ: dz (B, O), W (I, O) -> out (B, I)."""
        return np.matmul(dz, W.T, out=out)

    # --------------------------------------------------------------- loss

    def _loss_rows(self, name, logits, labels, scale, out, write_grad):
        """(loss_sum, n_correct) from ``functional``; out = scale · dL/dlogits (B, C)."""
        C = logits.shape[1]
        if labels.size and (labels.min() < 0 or labels.max() >= C):
            return 0.0, -1
        target = F.one_hot(labels, C, logits.dtype) if name == "mse" else labels  # (B, C) | (B,)
        loss_sum, d = F.LOSSES[name](logits, target, scale)  # d (B, C)
        if write_grad:
            out[...] = d
        return loss_sum, int((logits.argmax(axis=1) == labels).sum())

    # ---------------------------------------------------------- optimizer

    def sgd_step(self, p, g, lr, weight_decay):
        """p -= lr·(g + wd·p)."""
        if weight_decay:
            g = g + weight_decay * p
        p -= lr * g

    def momentum_step(self, p, g, v, lr, momentum, nesterov, weight_decay):
        """v = μ·v + (g + wd·p);  p -= lr·v   (Nesterov: p -= lr·(g + wd·p + μ·v))."""
        if weight_decay:
            g = g + weight_decay * p
        v *= momentum
        v += g
        p -= lr * (g + momentum * v if nesterov else v)

    def _adam_update(self, p, g, m, v, s):
        """m = β₁m + (1−β₁)g;  v = β₂v + (1−β₂)g²;  p = p·decay − lr_t · m / (√(v/bc2) + ε)."""
        m *= s.beta1
        m += s.c1 * g
        v *= s.beta2
        v += s.c2 * (g * g)
        if s.weight_decay:
            p *= s.decay
        denom = np.sqrt(v / s.bc2) + s.eps  # (N,) √v̂ + ε
        p -= s.lr_t * (m / denom)
