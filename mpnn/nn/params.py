"""One flat parameter buffer, one flat gradient buffer, named views per layer.

All parameters of a model (or of one pipeline stage) live in one contiguous
1-D array and all gradients in another of the same layout. Layers hold views
into them. Then the data-parallel gradient sum is one ``Allreduce`` (or a few
contiguous buckets), an optimizer step is a few vector operations, and a
checkpoint is one array plus this layout.

Linear layer ``i`` owns ``layers.{i}.weight`` of shape ``(I, O)`` followed by
``layers.{i}.bias`` of shape ``(O,)``; layers are laid out in order, so the
gradients of the *last* layers sit at the *end* of the buffer (the
overlapped Allreduce walks buckets from the end while backward runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Slot:
    """Where one named tensor lives inside the flat buffer."""

    name: str
    shape: tuple
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def stop(self) -> int:
        return self.offset + self.size


class Layout:
    """The ordered list of named tensors of some linear layers: one contiguous range
    of them (a model, a pipeline stage), or several (the model chunks of one rank
    under an interleaved schedule), laid out chunk after chunk."""

    def __init__(self, sizes, layers=None, shapes=None):
        """sizes: feature sizes ``[in, h1, ..., out]``; layers: the ``range`` of
        linear layers this buffer holds (default: all ``len(sizes) - 1``), or a
        list of such ranges (model chunks, in the order they are laid out);
        shapes: layer -> (weight shape, bias shape) where a layer holds less
        than its whole tensors (a tensor-parallel shard; default whole)."""
        layers = range(len(sizes) - 1) if layers is None else layers
        chunks = [layers] if isinstance(layers, range) else list(layers)
        self.sizes = tuple(int(s) for s in sizes)
        self.chunks = tuple(range(c.start, c.stop) for c in chunks)
        # every layer held, in layout order (a range when there is one chunk)
        self.layers = self.chunks[0] if len(self.chunks) == 1 else tuple(
            i for c in self.chunks for i in c)
        slots, offset = [], 0
        for i in self.layers:
            whole = ((sizes[i], sizes[i + 1]), (sizes[i + 1],))
            w_shape, b_shape = shapes[i] if shapes is not None else whole
            for name, shape in ((f"layers.{i}.weight", tuple(w_shape)),
                                (f"layers.{i}.bias", tuple(b_shape))):
                slot = Slot(name, shape, offset)
                slots.append(slot)
                offset = slot.stop
        self.slots = {s.name: s for s in slots}
        self.numel = offset

    def chunk_span(self, c):
        """(start, stop) of chunk c's tensors inside the flat buffer."""
        chunk = self.chunks[c]
        return self.layer_span(chunk.start)[0], self.layer_span(chunk.stop - 1)[1]

    def layer_span(self, i):
        """(start, stop) of layer i's weight and bias inside the flat buffer."""
        return self.slots[f"layers.{i}.weight"].offset, self.slots[f"layers.{i}.bias"].stop

    def views(self, flat):
        """Named views of ``flat`` (no copies)."""
        return {name: flat[s.offset:s.stop].reshape(s.shape) for name, s in self.slots.items()}


class FlatParams:
    """The parameter buffer ``data`` and the gradient buffer ``grad`` of one layout."""

    def __init__(self, layout: Layout, dtype=np.float32, xp=np):
        self.layout = layout
        self.dtype = np.dtype(dtype)
        self.data = xp.zeros(layout.numel, dtype=self.dtype)
        self.grad = xp.zeros(layout.numel, dtype=self.dtype)
        self.params = layout.views(self.data)
        self.grads = layout.views(self.grad)

    def zero_grad(self):
        self.grad.fill(0)

    def bind_grad(self, buffer):
        """Move the gradient into ``buffer`` (Ψ elements of this dtype, e.g. a shared-memory
        window), values kept; every named view follows."""
        if buffer.shape != self.grad.shape or buffer.dtype != self.dtype:
            raise ValueError(f"bind_grad: need a ({self.layout.numel},) {self.dtype} buffer, "
                             f"got {buffer.shape} {buffer.dtype}")
        buffer[...] = self.grad
        self.grad = buffer
        self.grads = self.layout.views(buffer)

    def state_dict(self):
        """Host copies of every named tensor (for ``--save``)."""
        return {name: _to_host(v).copy() for name, v in self.params.items()}

    def load_state_dict(self, arrays, source="weights"):
        """Copy named arrays in, checking that every name, shape and value fits.

        ``arrays`` names the whole model's tensors (a pipeline stage takes its
        own layers); a tensor of a layer the model does not have, a missing
        one, a wrong shape, values that are not real numbers, or NaN/inf are
        each a ValueError naming the tensor."""
        sizes = "-".join(map(str, self.layout.sizes))
        n_layers = len(self.layout.sizes) - 1
        known = {f"layers.{i}.{kind}" for i in range(n_layers) for kind in ("weight", "bias")}
        unknown = [n for n in arrays if n not in known]
        if unknown:
            raise ValueError(f"{source}: holds {', '.join(unknown)}, which a {sizes} model does "
                             f"not have (saved for another architecture?)")
        missing = [n for n in self.params if n not in arrays]
        if missing:
            raise ValueError(f"{source}: missing {', '.join(missing)} "
                             f"(expected tensors {', '.join(self.params)})")
        for name, view in self.params.items():
            a = np.asarray(arrays[name])
            if a.shape != view.shape:
                raise ValueError(f"{source}: {name} has shape {a.shape}, but the model "
                                 f"needs {view.shape} (sizes {sizes})")
            if a.dtype.kind not in "fiu":
                raise ValueError(f"{source}: {name} holds {a.dtype} values, not real numbers")
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise ValueError(f"{source}: {name} holds NaN or infinite values")
            with np.errstate(over="ignore"):  # checked just below
                cast = a.astype(self.dtype)  # the values the run will hold
            if not np.isfinite(cast).all():
                big = float(np.max(np.abs(a.astype(np.float64))))
                raise ValueError(f"{source}: {name} holds values too large for {self.dtype} "
                                 f"(largest magnitude {big:.3g}; {self.dtype} ends at "
                                 f"{float(np.finfo(self.dtype).max):.3g}): they would be "
                                 f"infinite; rescale them or train in float64 (--dtype)")
            view[...] = cast if isinstance(view, np.ndarray) else _to_device(view, cast)


def _to_host(a):
    return a.get() if hasattr(a, "get") else a


def _to_device(view, a):
    import cupy  # only reached with device arrays

    return cupy.asarray(a, dtype=view.dtype)
