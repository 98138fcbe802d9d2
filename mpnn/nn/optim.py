"""Optimizers as a few vector operations over the flat buffers.

Each optimizer updates ``flat.data`` in place from ``flat.grad`` (already the
gradient of the global-batch mean loss) through the backend's fused update
ops; its state (velocity, moments) is one flat array of the same layout.

    SGD        p ← p − lr·(g + wd·p)
    momentum   v ← μ·v + (g + wd·p);  p ← p − lr·v      (Nesterov: p ← p − lr·(g + wd·p + μ·v))
    AdamW      m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
               p ← p(1 − lr·wd) − lr · m̂/(√v̂ + ε),  m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ)
"""

from __future__ import annotations

import math

OPTIMIZERS = ("sgd", "adam")


class _FlatOptimizer:
    """What the checkpointer asks of an optimizer over a whole flat buffer (a
    sharded one, ``parallel.zero.ZeroOptimizer``, answers the same)."""

    def stage_arrays(self):
        """"params" and every state array over the buffer's whole layout."""
        return {"params": self.flat.data, **self.state()}

    def load_state(self, name, local):
        """Set state array ``name`` from a host array over the whole layout."""
        self.state()[name][...] = self.ops.to_device(local)


class SGD(_FlatOptimizer):
    """Plain SGD (momentum 0) or SGD with (optionally Nesterov) momentum."""

    def __init__(self, flat, ops, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        if nesterov and momentum <= 0:
            raise ValueError("--nesterov needs --momentum > 0")
        self.flat, self.ops = flat, ops
        self.lr, self.momentum, self.nesterov = float(lr), float(momentum), nesterov
        self.weight_decay = float(weight_decay)
        self.t = 0
        self.velocity = ops.xp.zeros_like(flat.data) if momentum else None

    def step(self, lr=None):
        lr = self.lr if lr is None else float(lr)
        self.t += 1
        if self.velocity is None:
            self.ops.sgd_step(self.flat.data, self.flat.grad, lr, self.weight_decay)
        else:
            self.ops.momentum_step(self.flat.data, self.flat.grad, self.velocity, lr,
                                   self.momentum, self.nesterov, self.weight_decay)

    def state(self):
        return {} if self.velocity is None else {"velocity": self.velocity}


class Adam(_FlatOptimizer):
    """Adam with decoupled weight decay (AdamW, Loshchilov & Hutter)."""

    def __init__(self, flat, ops, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.flat, self.ops = flat, ops
        self.lr, self.betas, self.eps = float(lr), tuple(map(float, betas)), float(eps)
        self.weight_decay = float(weight_decay)
        self.t = 0
        self.m = ops.xp.zeros_like(flat.data)
        self.v = ops.xp.zeros_like(flat.data)

    def step(self, lr=None):
        lr = self.lr if lr is None else float(lr)
        self.t += 1
        self.ops.adam_step(self.flat.data, self.flat.grad, self.m, self.v, lr,
                           self.betas[0], self.betas[1], self.eps, self.weight_decay, self.t)

    def state(self):
        return {"m": self.m, "v": self.v}


def make_optimizer(name, flat, ops, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    if name == "sgd":
        return SGD(flat, ops, lr, momentum, nesterov, weight_decay)
    if name == "adam":
        return Adam(flat, ops, lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(schedule, base_lr, step, total_steps):
    """The rate for optimizer step ``step`` (0-based) of ``total_steps``.

    constant   lr = base_lr
    cosine     lr = base_lr · ½(1 + cos(π · step / total_steps)), from base_lr down to 0
    """
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of "
                     f"{', '.join(LR_SCHEDULES)}")
