"""The reference op set in plain NumPy: the specification the fast backends meet.

Shapes: B rows, I in features, O out features, C classes. See
``mpnn/functional.py`` for the derivations each op implements.
"""

from __future__ import annotations

import numpy as np

from ..nn import functional as F


class NumpyOps:
    name = "numpy"
    xp = np

    # ------------------------------------------------------------ forward

    def linear_act(self, x, W, b, act, out):
        """out = act(x·W + b): x (B, I), W (I, O), b (O,) -> out (B, O)."""
        np.matmul(x, W, out=out)  # (B, O)
        out += b
        if act == "relu":
            np.maximum(out, 0, out=out)
        elif act != "identity":
            out[...] = F.ACTIVATIONS[act][0](out)[0]
        return out

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

    def loss(self, name, logits, labels, scale, out):
        """Sum of per-row losses; out = scale · dL/dlogits (B, C)."""
        if name == "mse":
            target = F.one_hot(labels, logits.shape[1], logits.dtype)
            loss_sum, d = F.mse(logits, target, scale)
        else:
            loss_sum, d = F.softmax_cross_entropy(logits, labels, scale)
        out[...] = d
        return loss_sum

    def predict_stats(self, logits, labels, loss_name):
        """(loss_sum, n_correct) of a batch, for evaluation."""
        d = np.empty_like(logits)
        loss_sum = self.loss(loss_name, logits, labels, 1.0, d)
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

    def adam_step(self, p, g, m, v, lr, beta1, beta2, eps, weight_decay, t):
        """AdamW: p ← p·(1 − lr·wd) − lr · m̂ / (√v̂ + ε), with bias-corrected m̂, v̂."""
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * (g * g)
        if weight_decay:
            p *= 1 - lr * weight_decay
        step = lr / (1 - beta1 ** t)
        denom = np.sqrt(v / (1 - beta2 ** t)) + eps
        p -= step * (m / denom)

    # -------------------------------------------------------------- misc

    def to_device(self, a):
        return a

    def to_host(self, a):
        return a

    def synchronize(self):
        pass
