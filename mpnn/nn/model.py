"""The MLP: linear layers over one flat parameter buffer, forward and backward
over a contiguous range of layers (the whole model, or one pipeline stage), or
over each of several such ranges (the model chunks of one rank under an
interleaved pipeline schedule).

Shape legend: B rows, I/O in/out features of a layer, C classes.

Layer i computes ``h_{i+1} = act_i(h_i · W_i + b_i)``; every hidden layer uses
the model's activation and the last layer is the identity (it produces
logits; the loss applies softmax or compares with one-hot targets).

The model knows nothing of MPI. Data parallelism happens outside it (the
gradient buffer is summed across replicas); pipeline parallelism builds one
``MLP`` per stage with ``layers=range(start, stop)`` (or a list of ranges: the
rank's chunks, each run with ``chunk=c``).

The backward can be split in two, as zero-bubble pipelines need: with
``weights=False`` it computes dL/dz of every layer, the bias gradients and
dL/d(input) (what the previous stage waits for) and keeps (input, dL/dz) of
each layer in the context; ``backward_weight`` then adds dW = inputᵀ·dL/dz.
The sum is the same as the joined backward's, term by term.
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
        self.pending = []  # (layer, input, dL/dz) a split backward left for backward_weight
        self.rows = 0

    def nbytes(self):
        """Bytes of the buffers this context holds (every layer's output and input
        gradient; its inputs are the caller's)."""
        return int(sum(a.nbytes for store in (self.outputs, self.grads) for a in store.values()))

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
        chunks = [] if layers is None else [layers] if isinstance(layers, range) else layers
        for c in chunks:
            n = len(sizes) - 1
            if not (isinstance(c, range) and c.step == 1 and 0 <= c.start < c.stop <= n):
                raise ValueError(f"layers must be range(start, stop) with 0 <= start < stop <= "
                                 f"{len(sizes) - 1} (the model's linear layers), or a list of "
                                 f"such ranges, got {layers}")
        self.sizes = sizes
        self.activation = activation
        self.dtype = np.dtype(dtype)
        self.ops = ops if ops is not None else get_ops("numpy")
        self.whole_layout = Layout(sizes, layers)  # this rank's layers, whole tensors
        self.layers = self.whole_layout.layers
        self.chunks = self.whole_layout.chunks
        self.n_layers = len(sizes) - 1
        self.layout = self._local_layout()
        self.flat = FlatParams(self.layout, self.dtype, xp=self.ops.xp)
        for i in self.layers:
            W, b = self._local_tensors(i, *init_layer(sizes, i, activation, seed, self.dtype))
            self.flat.params[f"layers.{i}.weight"][...] = self.ops.to_device(W)
            self.flat.params[f"layers.{i}.bias"][...] = self.ops.to_device(b)

    # The hooks a model that holds only part of each tensor (tensor parallelism,
    # ``parallel.tensor``) overrides; here a rank holds its layers whole.

    tp = 1  # ranks sharing each layer
    reports = True  # this rank reports the loss (one per forward pass)
    # where a layer's parameters are fetched from before use (ZeRO-3's gathers,
    # ``parallel.zero_comm.ParamGather``: ``forward(i)``, ``backward(i)``); None: held here
    fetch = None

    def describe(self):
        """A start-up line on how this rank holds its layers, or None (whole)."""
        return None

    def take_tp_bytes(self):
        """Bytes summed over tensor-parallel ranks since the last call (none here)."""
        return 0

    def tp_bytes_formula(self, rows):
        """Bytes the tensor-parallel sums of one batch of ``rows`` should be (none)."""
        return 0

    def _width(self, i, side):
        """This rank's input (side 0) or output (side 1) features of layer i."""
        return self.layout.slots[f"layers.{i}.weight"].shape[side]

    def _layer_forward(self, i, h, out):
        """out = layer i's output (B, O_i) from its input h."""
        return self.ops.linear_act(h, self.W(i), self.b(i), self.act(i), out)

    def _output_grad(self, i, dh):
        """dL/d(layer i's output) as layer i's backward takes it."""
        return dh

    def _input_grad(self, i, dx):
        """dL/d(layer i's input) from this rank's part of it."""
        return dx

    def _local_layout(self):
        """The layout of this rank's flat buffers."""
        return self.whole_layout

    def _local_tensors(self, i, W, b):
        """This rank's part of layer i's whole (W, b)."""
        return W, b

    def whole_stage(self, arrays):
        """name -> this rank's flat host array (parameters or optimizer state, in
        ``layout``) to name -> the array over ``whole_layout`` (its layers' whole
        tensors), where that is assembled; here the arrays themselves."""
        return arrays

    def local_of(self, whole):
        """A flat host array over ``whole_layout`` to this rank's part (``layout``)."""
        return whole

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
        return self.sizes[self.chunks[0].start]

    @property
    def out_features(self):
        return self.sizes[self.chunks[-1].stop]

    def chunk_features(self, chunk):
        """(I, O): the input and output features of model chunk ``chunk``."""
        c = self.chunks[chunk]
        return self.sizes[c.start], self.sizes[c.stop]

    # -------------------------------------------------------------- compute

    def forward(self, x, ctx=None, chunk=0):
        """x (B, sizes[start]) -> h_stop (B, sizes[stop]) through model chunk ``chunk``
        (the only one, unless the model holds several); keeps activations in ctx."""
        ctx = ctx if ctx is not None else Context()
        ctx.inputs, ctx.rows = x, x.shape[0]
        h = x
        for i in self.chunks[chunk]:
            if self.fetch is not None:
                self.fetch.forward(i)  # W_i, b_i gathered (and layer i+1's started)
            out = ctx.buffer(ctx.outputs, i, (x.shape[0], self._width(i, 1)), self.ops,
                             self.dtype)
            h = self._layer_forward(i, h, out)  # (B, O_i)
        return h

    def backward(self, dout, ctx, need_input_grad=False, on_layer_done=None, chunk=0,
                 weights=True):
        """Accumulate parameter gradients from dout = dL/dh_stop (B, sizes[stop]).

        Walks the layers of model chunk ``chunk`` in the reverse order of
        ``forward``. ``dout`` is overwritten (it becomes dL/dz of the last layer).
        Gradients are added into ``self.flat.grad``: call ``zero_grad`` first.
        ``on_layer_done(i)`` is called once layer i's gradients are final
        (overlapped Allreduce). Returns dL/dh_start (B, sizes[start]) when
        ``need_input_grad``. With ``weights=False`` the weight gradients are left
        for ``backward_weight(ctx, chunk)``: the inputs and dL/dz they need stay in
        ``ctx`` (and alive) until then.
        """
        grads = self.flat.grads
        layers = self.chunks[chunk]
        dh = dout
        ctx.pending = []
        for i in reversed(layers):
            h_in = ctx.inputs if i == layers.start else ctx.outputs[i - 1]
            dz = self.ops.act_bias_backward(self._output_grad(i, dh), ctx.outputs[i],
                                            self.act(i), grads[f"layers.{i}.bias"])  # (B, O_i)
            if weights:
                self.ops.weight_grad(h_in, dz, grads[f"layers.{i}.weight"])  # (I_i, O_i)
            else:
                ctx.pending.append((i, h_in, dz))  # for backward_weight
            if i > layers.start or need_input_grad:
                if self.fetch is not None:
                    self.fetch.backward(i)  # W_i gathered again (and layer i-1's started)
                out = ctx.buffer(ctx.grads, i, (ctx.rows, self._width(i, 0)), self.ops,
                                 self.dtype)
                dh = self._input_grad(i, self.ops.input_grad(dz, self.W(i), out))  # (B, I_i)
            if on_layer_done is not None:
                on_layer_done(i)
        return dh if need_input_grad else None

    def backward_weight(self, ctx):
        """dW_i += h_inᵀ·dz_i for the layers a ``backward(..., weights=False)`` left,
        in the same reverse layer order (so the gradient buffer's sums are the
        joined backward's). (I_i, O_i) each."""
        grads = self.flat.grads
        for i, h_in, dz in ctx.pending:
            self.ops.weight_grad(h_in, dz, grads[f"layers.{i}.weight"])  # (I_i, O_i)
        ctx.pending = []

    def zero_grad(self):
        self.flat.zero_grad()

    # ------------------------------------------------------------ weights

    def state_dict(self):
        return self.flat.state_dict()

    def load_state_dict(self, arrays, source="weights"):
        self.flat.load_state_dict(arrays, source)
