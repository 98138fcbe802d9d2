"""The MLP: linear layers over one flat parameter buffer, forward and backward
over a contiguous range of layers (the whole model, or one pipeline stage).

Shape legend: B rows, I/O in/out features of a layer, C classes.

Layer i computes ``h_{i+1} = act_i(h_i · W_i + b_i)``; every hidden layer uses
the model's activation and the last layer is the identity (it produces
logits; the loss applies softmax or compares with one-hot targets).

The model knows nothing of MPI. Data parallelism happens outside it (the
gradient buffer is summed across replicas); pipeline parallelism builds one
``MLP`` per stage with ``layers=range(start, stop)``.
"""

from __future__ import annotations

import numpy as np

from ..kernels import get_ops
from .functional import HIDDEN_ACTIVATIONS  # re-exported: the --activation choices
from .params import FlatParams, Layout


def init_layer(sizes, i, activation, seed, dtype):
    """Initial (W, b) of linear layer ``i``, identical whatever rank draws it.

    Each layer has its own stream ``SeedSequence(seed).spawn(L)[i]``, so a
    pipeline stage draws only its layers and still starts exactly where the
    serial model starts. W ~ N(0, std²) with He std = √(2/I) before a ReLU and
    Glorot std = √(2/(I+O)) otherwise (tanh, sigmoid, identity, the output
    layer); b = 0. Drawn in float64, then rounded to ``dtype``.
    """
    n_layers = len(sizes) - 1
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(n_layers)[i])
    fan_in, fan_out = sizes[i], sizes[i + 1]
    if activation == "relu" and i < n_layers - 1:
        std = np.sqrt(2.0 / fan_in)
    else:
        std = np.sqrt(2.0 / (fan_in + fan_out))
    W = rng.normal(0.0, std, size=(fan_in, fan_out)).astype(dtype)
    b = np.zeros(fan_out, dtype=dtype)
    return W, b


class Context:
    """Activations of one micro-batch between its forward and its backward.

    The buffers are kept and reused by the next micro-batch of the same size,
    so a training step allocates nothing once warm.
    """

    def __init__(self):
        self.inputs = None  # h_start (B, sizes[start]) as given to forward
        self.outputs = {}  # layer i -> h_{i+1} (B, sizes[i+1])
        self.grads = {}  # layer i -> dh_i scratch (B, sizes[i])
        self.rows = 0

    def buffer(self, store, i, shape, ops, dtype):
        buf = store.get(i)
        if buf is None or buf.shape != shape:
            buf = store[i] = ops.xp.empty(shape, dtype=dtype)
        return buf


class MLP:
    """Multilayer perceptron over flat buffers.

    sizes       feature sizes ``[in, h1, ..., out]``
    activation  hidden activation (relu, tanh, sigmoid, identity)
    layers      range of linear layers held here (default all): a pipeline stage
    """

    def __init__(self, sizes, activation="relu", dtype=np.float32, seed=0,
                 layers=None, ops=None):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"layer sizes must be at least two positive integers, got {sizes}")
        if activation not in HIDDEN_ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of "
                             f"{', '.join(HIDDEN_ACTIVATIONS)}")
        if layers is not None and not (layers.step == 1
                                       and 0 <= layers.start < layers.stop <= len(sizes) - 1):
            raise ValueError(f"layers must be range(start, stop) with 0 <= start < stop <= "
                             f"{len(sizes) - 1} (the model's linear layers), got {layers}")
        self.sizes = sizes
        self.activation = activation
        self.dtype = np.dtype(dtype)
        self.ops = ops if ops is not None else get_ops("numpy")
        self.layout = Layout(sizes, layers)
        self.layers = self.layout.layers
        self.n_layers = len(sizes) - 1
        self.flat = FlatParams(self.layout, self.dtype, xp=self.ops.xp)
        for i in self.layers:
            W, b = init_layer(sizes, i, activation, seed, self.dtype)
            self.flat.params[f"layers.{i}.weight"][...] = self.ops.to_device(W)
            self.flat.params[f"layers.{i}.bias"][...] = self.ops.to_device(b)

    # ---------------------------------------------------------------- views

    def W(self, i):
        return self.flat.params[f"layers.{i}.weight"]

    def b(self, i):
        return self.flat.params[f"layers.{i}.bias"]

    def act(self, i):
        """Activation after layer i: the model's for hidden layers, identity last."""
        return "identity" if i == self.n_layers - 1 else self.activation

    @property
    def in_features(self):
        return self.sizes[self.layers.start]

    @property
    def out_features(self):
        return self.sizes[self.layers.stop]

    # -------------------------------------------------------------- compute

    def forward(self, x, ctx=None):
        """x (B, sizes[start]) -> h_stop (B, sizes[stop]); keeps activations in ctx."""
        ctx = ctx if ctx is not None else Context()
        ctx.inputs, ctx.rows = x, x.shape[0]
        h = x
        for i in self.layers:
            out = ctx.buffer(ctx.outputs, i, (x.shape[0], self.sizes[i + 1]), self.ops, self.dtype)
            h = self.ops.linear_act(h, self.W(i), self.b(i), self.act(i), out)  # (B, O_i)
        return h

    def backward(self, dout, ctx, need_input_grad=False, on_layer_done=None):
        """Accumulate parameter gradients from dout = dL/dh_stop (B, sizes[stop]).

        Walks the layers in the reverse order of ``forward``. ``dout`` is
        overwritten (it becomes dL/dz of the last layer). Gradients are added
        into ``self.flat.grad``: call ``zero_grad`` first. ``on_layer_done(i)``
        is called once layer i's gradients are final (overlapped Allreduce).
        Returns dL/dh_start (B, sizes[start]) when ``need_input_grad``.
        """
        grads = self.flat.grads
        dh = dout
        for i in reversed(self.layers):
            h_in = ctx.inputs if i == self.layers.start else ctx.outputs[i - 1]
            dz = self.ops.act_bias_backward(dh, ctx.outputs[i], self.act(i),
                                            grads[f"layers.{i}.bias"])  # (B, O_i)
            self.ops.weight_grad(h_in, dz, grads[f"layers.{i}.weight"])  # (I_i, O_i)
            if i > self.layers.start or need_input_grad:
                out = ctx.buffer(ctx.grads, i, (ctx.rows, self.sizes[i]), self.ops, self.dtype)
                dh = self.ops.input_grad(dz, self.W(i), out)  # (B, I_i)
            if on_layer_done is not None:
                on_layer_done(i)
        return dh if need_input_grad else None

    def zero_grad(self):
        self.flat.zero_grad()

    # ------------------------------------------------------------ weights

    def state_dict(self):
        return self.flat.state_dict()

    def load_state_dict(self, arrays, source="weights"):
        self.flat.load_state_dict(arrays, source)
