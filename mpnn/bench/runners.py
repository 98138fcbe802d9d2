"""What the benchmark times: one training set-up per backend, stepped in blocks.

Every runner trains the 784-256-128-64-10 ReLU MLP (cross-entropy, SGD with
momentum 0.9, float32) on the dataset ``python -m mpnn.train --dataset
synthetic`` trains on (60,000 rows of MNIST's shape, in host memory), taking
its rows in the trainer's order (``BatchStream``: a fresh permutation each
epoch, global batches with the last, partial one, this replica's share).

What one step includes, on each side:

* mpnn (``numpy``, ``numba``, ``cupy``): ``mpnn.runtime.loop.train_batch``,
  the step ``mpnn.train`` runs, on a ``DataParallelEngine`` built as the
  trainer builds it: gather the batch's rows from the host arrays (a copy),
  move them to the device (CuPy only), zero the gradients, forward, loss,
  backward, the gradient sum (a no-op on one rank), the optimizer step.
* PyTorch (``torch``, ``torch-cuda``): gather the same rows from the same host
  arrays (``torch.index_select`` on tensors sharing their memory, a copy; as
  fast as NumPy's gather, where ``x[idx]`` takes 2.5x as long), move them to
  the device (CUDA only), ``zero_grad``, forward, ``CrossEntropyLoss``,
  backward, ``SGD.step``.

Neither side includes what the trainer does around its step (the per-step
NaN/inf check, the learning-rate schedule, checkpoints); both include the
permutation drawn when a runner's stream starts an epoch (once per epoch).
``run(steps)`` returns the rows this rank trained, after the device has
finished them.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from ..data.batching import batch_bounds, epoch_permutation, share_bounds
from ..runtime.trace import NULL_TRACER

SIZES = (784, 256, 128, 64, 10)
LR, MOMENTUM = 0.01, 0.9
SEED = 0  # mpnn.train's default --seed: initial weights and epoch order
TRAIN_ROWS = 60000  # the synthetic dataset's training rows (mpnn.data.datasets.SYNTHETIC_SIZE)
BACKENDS = ("numpy", "numba", "cupy", "torch", "torch-cuda")


def bench_data(rows=TRAIN_ROWS):
    """The synthetic dataset of ``mpnn.train`` with ``rows`` training rows (no test rows
    to speak of: the bench never evaluates)."""
    from ..data.datasets import load_dataset

    return load_dataset("synthetic", dtype=np.float32, progress=False, synthetic_size=(rows, 1))


class BatchStream:
    """This rank's rows of each global batch, as the trainer draws them.

    Epoch ``e`` (from 1) is ``epoch_permutation(n, seed, e)`` cut by
    ``batch_bounds`` into global batches of ``batch`` rows (the last may be
    short); replica ``rank`` of ``replicas`` takes its ``share_bounds`` of each.
    """

    def __init__(self, n, batch, rank=0, replicas=1, seed=SEED):
        self.n, self.seed, self.rank, self.replicas = n, seed, rank, replicas
        self.bounds = batch_bounds(n, batch)
        self.epoch, self.k, self.order = 0, len(self.bounds), None

    def next(self):
        """(rows (b,) int64 indices into x_train, global batch size) of the next step."""
        if self.k == len(self.bounds):
            self.epoch += 1
            self.order = epoch_permutation(self.n, self.seed, self.epoch)
            self.k = 0
        start, stop = self.bounds[self.k]
        self.k += 1
        lo, hi = share_bounds(stop - start, self.rank, self.replicas)
        return self.order[start + lo:start + hi], stop - start


class MpnnRunner:
    """mpnn's training step on ``backend``: model, optimizer, engine, rows of ``data``.

    ``batch`` is the global batch. ``dp_comm`` (the trainer's ``grid.dp_comm``)
    sums the gradient; the default, ``MPI.COMM_SELF``, is a serial run (a
    world of one: the sum is a no-op). ``rank``/``replicas`` choose this rank's
    share of each global batch (default: its place in ``dp_comm``).
    ``bucket_mb`` is ``mpnn.train``'s ``--bucket-mb``.
    """

    def __init__(self, backend, batch, data, dp_comm=MPI.COMM_SELF, bucket_mb=0.1,
                 tracer=NULL_TRACER, rank=None, replicas=None):
        from ..kernels import get_ops
        from ..nn.model import MLP
        from ..nn.optim import make_optimizer
        from ..parallel.data_parallel import DataParallelEngine

        rank = dp_comm.Get_rank() if rank is None else rank
        replicas = dp_comm.Get_size() if replicas is None else replicas
        self.name, self.batch, self.data, self.tracer = backend, batch, data, tracer
        self.ops = ops = get_ops(backend)
        self.model = MLP(SIZES, "relu", np.float32, SEED, ops=ops)
        self.optimizer = make_optimizer("sgd", self.model.flat, ops, LR, MOMENTUM)
        self.engine = DataParallelEngine(self.model, "cross_entropy", dp_comm, bucket_mb, tracer)
        self.stream = BatchStream(data.x_train.shape[0], batch, rank, replicas)
        self.step = 0

    def run(self, steps):
        from ..runtime.loop import train_batch

        trained = 0
        for _ in range(steps):
            rows, global_batch = self.stream.next()
            train_batch(self.engine, self.optimizer, self.ops, self.data, rows, global_batch, LR,
                        self.tracer, self.step)
            self.step += 1
            trained += rows.shape[0]
        self.ops.synchronize()
        return trained


class TorchRunner:
    """The same model and optimizer in PyTorch (``device`` cpu or cuda), same rows."""

    def __init__(self, batch, data, device="cpu"):
        import torch

        self.torch, self.device = torch, device
        self.name = "torch" if device == "cpu" else f"torch-{device}"
        torch.manual_seed(SEED)
        layers = []
        for i, (fan_in, fan_out) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True)):
            layers.append(torch.nn.Linear(fan_in, fan_out))
            if i < len(SIZES) - 2:
                layers.append(torch.nn.ReLU())
        self.net = torch.nn.Sequential(*layers).to(device)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=LR, momentum=MOMENTUM)
        self.loss = torch.nn.CrossEntropyLoss()  # the batch mean, as mpnn's 1/global_batch
        self.x = torch.from_numpy(data.x_train)  # (N, I) host, the dataset's own memory
        self.y = torch.from_numpy(data.y_train)  # (N,) int64
        self.stream = BatchStream(data.x_train.shape[0], batch)

    def run(self, steps):
        torch, trained = self.torch, 0
        for _ in range(steps):
            rows, _ = self.stream.next()
            idx = torch.from_numpy(rows)
            x = torch.index_select(self.x, 0, idx).to(self.device)  # (b, I)
            y = torch.index_select(self.y, 0, idx).to(self.device)  # (b,)
            self.optimizer.zero_grad()
            self.loss(self.net(x), y).backward()
            self.optimizer.step()
            trained += rows.shape[0]
        if self.device != "cpu":
            torch.cuda.synchronize()
        return trained


def make_runner(name, batch, data):
    """The runner of backend ``name`` (one of BACKENDS) at ``batch`` rows per step."""
    if name.startswith("torch"):
        return TorchRunner(batch, data, name.partition("-")[2] or "cpu")
    return MpnnRunner(name, batch, data)


def available_backends(requested):
    """``requested`` ("auto" or comma-separated names) as a list of usable backends.
    auto: numpy, numba, cupy when a GPU is usable, torch when it is installed."""
    from ..kernels.cupy_ops import gpu_available

    if requested != "auto":
        names = [b.strip() for b in requested.split(",") if b.strip()]
        bad = [b for b in names if b not in BACKENDS]
        if bad:
            raise SystemExit(f"unknown backend(s) {', '.join(bad)}; "
                             f"choose from {','.join(BACKENDS)}")
        return names
    names = ["numpy", "numba"] + (["cupy"] if gpu_available() else [])
    try:
        import torch  # noqa: F401

        names.append("torch")
    except ImportError:
        pass
    return names
