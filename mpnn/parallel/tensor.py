"""Tensor (intra-layer) parallelism: each linear layer split over the ``tp`` ranks
of a stage, in Megatron-LM's pairing, with the backward of every collective
derived by hand.

Inside each model chunk (the whole model, a pipeline stage, or one of a
rank's interleaved chunks) consecutive layers pair up::

    column-parallel layer i   W_i split by output features: rank t holds
                              W_i[:, O_t] (I, O_t) and b_i[O_t]; its input x
                              (B, I) is whole on every rank, its output
                              h_t = act(x·W_t + b_t) (B, O_t) is the rank's shard
    row-parallel layer i+1    W_{i+1} split by input features: rank t holds
                              W[O_t, :] (O_t, O'); y = Σ_t h_t·W_t is summed
                              with one Allreduce over the tp ranks, then the
                              (whole, replicated) bias and the activation:
                              out = act(y + b) (B, O'), whole on every rank

so the hidden activations between the two stay sharded and a pair costs two
Allreduces per micro-batch: y forward, dL/dx of the column layer backward.
A chunk with an odd number of layers *replicates its last one* (every rank
holds it whole and computes it identically), so a chunk always begins and
ends with whole activations: the model's output layer is row-parallel when
its chunk has an even number of layers and replicated otherwise, and a
pipeline stage sends and receives whole activations.

Widths that T does not divide are split as evenly as possible (the first
``O mod T`` ranks one feature more, as ``data.batching.share_bounds`` cuts
rows); every split width must be at least 1, so every hidden layer needs at
least T features (``check_tensor_widths``).

The communication is two conjugate operators (docs/parallelism.md section 9
derives them):

    f   before a column-parallel layer: forward the identity (x is already
        whole on every rank); backward an Allreduce, dL/dx = Σ_t dL/dx_t,
        because x feeds every rank's shard and a variable used in several
        places gets the sum of the gradients of its uses
    g   after a row-parallel product: forward an Allreduce, y = Σ_t y_t;
        backward the identity, dL/dy_t = dL/dy, because ∂y/∂y_t = 1

Data parallelism sums each shard's gradient over the replicas of the same
shard (``grid.dp_comm``); the replicated tensors (row-parallel biases,
replicated layers) get identical gradients on every tp rank, so they need
no sum over tp.

Checkpoints stay whole: ``whole_stage`` gathers the shards of a flat buffer
(parameters or optimizer state) into the stage's whole layout on tp rank 0,
``local_of`` cuts a rank's shards out of it, so a checkpoint moves between
any dp x tp x pp grids and serial runs.

Shapes: B rows, I/O in/out features of a layer, O_t this rank's share of a
split width.
"""

from __future__ import annotations

import numpy as np

from ..data.batching import share_bounds
from ..nn.model import MLP
from ..nn.params import Layout
from ..runtime import watchdog as wd
from .staging import copy_from_host, copy_to_host, needs_host_staging

COLUMN, ROW, REPLICATED = "column", "row", "replicated"


class TensorConfigError(ValueError):
    """A --tp that the layer widths or the grid cannot take."""


def tensor_roles(chunks):
    """layer -> COLUMN | ROW | REPLICATED: consecutive layers of each chunk paired,
    an odd chunk's last layer replicated."""
    roles = {}
    for chunk in chunks:
        layers = list(chunk)
        for k in range(0, len(layers) - 1, 2):
            roles[layers[k]], roles[layers[k + 1]] = COLUMN, ROW
        if len(layers) % 2:
            roles[layers[-1]] = REPLICATED
    return roles


def check_tensor_widths(hidden, tp):
    """Every hidden width at least ``tp`` (a column-parallel layer's output is always
    a hidden width); raises TensorConfigError naming the layer otherwise."""
    if tp < 1:
        raise TensorConfigError(f"--tp must be a positive integer (got {tp})")
    for i, width in enumerate(hidden):
        if width < tp:
            raise TensorConfigError(
                f"--tp {tp} cannot split layer {i} (its {width} output features) {tp} ways: "
                f"every rank needs at least one feature; use --tp {min(hidden)} or less "
                f"(any --tp up to the narrowest hidden layer, {min(hidden)}, works; widths it "
                f"does not divide are split unevenly)")


def shard_shapes(sizes, roles, rank, tp):
    """layer -> (weight shape, bias shape) of ``rank``'s shard."""
    shapes = {}
    for i, role in roles.items():
        I, O = sizes[i], sizes[i + 1]
        if role == COLUMN:
            lo, hi = share_bounds(O, rank, tp)
            shapes[i] = ((I, hi - lo), (hi - lo,))
        elif role == ROW:
            lo, hi = share_bounds(I, rank, tp)
            shapes[i] = ((hi - lo, O), (O,))
        else:
            shapes[i] = ((I, O), (O,))
    return shapes


def shard_slices(sizes, roles, rank, tp):
    """name -> the index of ``rank``'s part in the whole tensor (a tuple of slices)."""
    out = {}
    for i, role in roles.items():
        w, b = f"layers.{i}.weight", f"layers.{i}.bias"
        if role == COLUMN:
            lo, hi = share_bounds(sizes[i + 1], rank, tp)
            out[w], out[b] = (slice(None), slice(lo, hi)), (slice(lo, hi),)
        elif role == ROW:
            lo, hi = share_bounds(sizes[i], rank, tp)
            out[w], out[b] = (slice(lo, hi), slice(None)), (slice(None),)
        else:
            out[w], out[b] = (slice(None), slice(None)), (slice(None),)
    return out


class TensorParallelMLP(MLP):
    """This rank's shards of a stage's (or the whole model's) linear layers.

    The MLP itself (``forward``, ``backward`` with split and
    ``on_layer_done``, ``backward_weight``, ``flat`` over its shards,
    ``layout``, ``chunk_features`` of the whole activations it takes and
    gives), with its per-layer hooks overridden: the layer's own forward and
    the f and g around it. So the data-parallel and pipeline engines run it
    unchanged; the tp Allreduces happen inside. Starts from exactly the serial weights: each
    layer is drawn whole from its seed stream and this rank keeps its part.

    tp_comm   the stage's tensor-parallel ranks (``grid.tp_comm``)
    """

    def __init__(self, sizes, activation="relu", dtype=np.float32, seed=0, layers=None,
                 ops=None, tp_comm=None):
        self.tp_comm = tp_comm
        self.tp, self.tp_rank = tp_comm.Get_size(), tp_comm.Get_rank()
        self._tp_ranks = wd.group_ranks(tp_comm, "this stage's tensor-parallel ranks")
        self.reports = self.tp_rank == 0  # one rank of the stage reports the loss
        self.tp_bytes = 0  # bytes the tp Allreduces summed since the last take_tp_bytes
        self._host = {}  # host twins of device buffers, for an MPI without CUDA support
        super().__init__(sizes, activation, dtype, seed, layers, ops)

    # ---------------------------------------------------- the MLP's hooks

    def _local_layout(self):
        self.roles = tensor_roles(self.chunks)
        check_tensor_widths([self.sizes[i + 1] for i, r in self.roles.items() if r == COLUMN],
                            self.tp)
        self.part = shard_slices(self.sizes, self.roles, self.tp_rank, self.tp)  # name -> index
        return Layout(self.sizes, list(self.chunks),
                      shard_shapes(self.sizes, self.roles, self.tp_rank, self.tp))

    def _local_tensors(self, i, W, b):
        return (np.ascontiguousarray(W[self.part[f"layers.{i}.weight"]]),
                np.ascontiguousarray(b[self.part[f"layers.{i}.bias"]]))

    def whole_stage(self, arrays):
        """Every tp rank's flat host arrays (``layout``) -> the stage's whole ones
        (``whole_layout``) on tp rank 0, None on the others. Collective over
        ``tp_comm``: one Gatherv per array (the shards differ in size when T does
        not divide a width)."""
        whole = {} if self.tp_rank == 0 else None
        layouts = [Layout(self.sizes, list(self.chunks),
                          shard_shapes(self.sizes, self.roles, t, self.tp))
                   for t in range(self.tp)]
        counts = [lay.numel for lay in layouts]
        for name, local in arrays.items():
            local = np.ascontiguousarray(local)
            if self.tp_rank != 0:
                self.tp_comm.Gatherv(local, None, root=0)
                continue
            every = np.empty(sum(counts), local.dtype)
            self.tp_comm.Gatherv(local, [every, counts], root=0)
            out = np.empty(self.whole_layout.numel, local.dtype)
            views = self.whole_layout.views(out)
            offset = 0
            for t, lay in enumerate(layouts):  # every rank's split parts
                mine = every[offset:offset + lay.numel]
                offset += lay.numel
                part = shard_slices(self.sizes, self.roles, t, self.tp)
                for slot_name, view in lay.views(mine).items():
                    views[slot_name][part[slot_name]] = view
            views_0 = layouts[0].views(every[:counts[0]])  # the replicated ones: rank 0's
            for i, role in self.roles.items():
                if role != COLUMN:
                    for kind in ("weight", "bias") if role == REPLICATED else ("bias",):
                        key = f"layers.{i}.{kind}"
                        views[key][...] = views_0[key]
            whole[name] = out
        return whole

    def local_of(self, whole):
        """The stage's whole flat host array -> this rank's shards (``layout``)."""
        out = np.empty(self.layout.numel, whole.dtype)
        views, mine = self.whole_layout.views(whole), self.layout.views(out)
        for name, view in mine.items():
            view[...] = views[name][self.part[name]]
        return out

    # -------------------------------------------------------- the operators

    def _allreduce(self, buf):
        """buf ← Σ_tp buf, in place (the forward of g, the backward of f)."""
        from mpi4py import MPI

        self.tp_bytes += buf.nbytes
        if buf.size == 0:  # an empty micro-batch: every tp rank has the same rows
            return buf
        self.ops.synchronize()
        staged = None
        if not (isinstance(buf, np.ndarray) or not needs_host_staging(buf)):
            staged = self._host.get(buf.shape)
            if staged is None:
                staged = self._host[buf.shape] = np.empty(buf.shape, buf.dtype)
            copy_to_host(buf, staged)
        target = buf if staged is None else staged
        with wd.watch.op("tensor-parallel Allreduce", comm=self.tp_comm, ranks=self._tp_ranks,
                         nbytes=target.nbytes, check=("Allreduce", target.size, target.dtype)):
            self.tp_comm.Allreduce(MPI.IN_PLACE, target, op=MPI.SUM)
        if staged is not None:
            copy_from_host(staged, buf)
        return buf

    def f_forward(self, x):
        """f, forward: the identity (x is whole on every tp rank)."""
        return x

    def f_backward(self, dx):
        """f, backward: dL/dx = Σ_t dL/dx_t (x fed every rank's shard)."""
        return self._allreduce(dx)

    def g_forward(self, y):
        """g, forward: y = Σ_t y_t (the row-parallel partial products)."""
        return self._allreduce(y)

    def g_backward(self, dy):
        """g, backward: dL/dy_t = dL/dy, the identity (∂y/∂y_t = 1)."""
        return dy

    # ----------------------------------------------- the MLP's per-layer hooks

    def _layer_forward(self, i, h, out):
        """A row-parallel layer: y_t = h_t·W_t (B, O), g (the sum), then bias and
        activation; a column-parallel one (after f, the identity) or a replicated
        one: the MLP's fused layer on the whole input."""
        if self.roles[i] == ROW:
            self.ops.xp.matmul(h, self.W(i), out=out)
            return self.ops.bias_act(self.g_forward(out), self.b(i), self.act(i))
        return self.ops.linear_act(self.f_forward(h), self.W(i), self.b(i), self.act(i), out)

    def _output_grad(self, i, dh):
        """Into a row-parallel layer's backward through g's (the identity)."""
        return self.g_backward(dh) if self.roles[i] == ROW else dh

    def _input_grad(self, i, dx):
        """Out of a column-parallel layer's backward through f's (the sum)."""
        return self.f_backward(dx) if self.roles[i] == COLUMN else dx

    # ------------------------------------------------------------ weights

    def state_dict(self):
        """The stage's whole named tensors on tp rank 0 ({} on the others).
        Collective over ``tp_comm``."""
        flat = np.ascontiguousarray(self.ops.to_host(self.flat.data))
        whole = self.whole_stage({"params": flat})
        if whole is None:
            return {}
        return {name: v.copy() for name, v in self.whole_layout.views(whole["params"]).items()}

    def load_state_dict(self, arrays, source="weights"):
        """Whole named tensors in (checked as ``FlatParams.load_state_dict`` checks
        them), this rank's shards kept."""
        from ..nn.params import FlatParams

        whole = FlatParams(self.whole_layout, self.dtype)  # host, checked on the way in
        whole.load_state_dict(arrays, source)
        self.flat.data[...] = self.ops.to_device(self.local_of(whole.data))

    # ------------------------------------------------------------ reports

    def describe(self):
        """The start-up line: each layer's role and this rank's parameter bytes."""
        roles = ", ".join(f"{i} {self.roles[i]}" for i in self.layers)
        mb = self.flat.data.nbytes / 1e6
        whole = self.whole_layout.numel * self.dtype.itemsize / 1e6
        line = (f"tensor parallel tp {self.tp}: layers {roles}; this rank holds {mb:.3g} MB "
                f"of parameters of its layers' {whole:.3g} MB")
        if all(self.roles[i] == REPLICATED for i in self.layers):
            line += (" (nothing split here: a lone layer stays whole; give each stage two or "
                     "more layers with --partition to pair them)")
        return line

    def take_tp_bytes(self):
        """Bytes the tp Allreduces summed since the last call; restarts the count."""
        n, self.tp_bytes = self.tp_bytes, 0
        return n

    def tp_bytes_formula(self, rows):
        """Bytes the tp Allreduces sum for one micro-batch of ``rows`` through the
        chunks: per pair, y (B, O of the row layer) forward and dL/dx (B, I of the
        column layer) backward, unless the column layer is the model's first
        (nobody needs dL/dx there)."""
        total = 0
        for i, role in self.roles.items():
            if role == ROW:
                total += rows * self.sizes[i + 1]
            elif role == COLUMN and i > 0:
                total += rows * self.sizes[i]
        return total * self.dtype.itemsize
