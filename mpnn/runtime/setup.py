"""Everything before the first training step, as one named object.

``setup(config, comm)`` builds, in order: the process grid over ``comm`` (a
serial run is a world of one), each rank's thread pools, the data (rank 0
first), the model (this rank's layers, from the seed or ``--init``), the
resume point, a warm-up that compiles every kernel, the tracer and the
engine. Every step may raise; ``mpnn.train`` runs it inside the agreed-failure
protocol (``runtime.agree``) so that one rank's failure ends every rank.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from ..data import load_dataset
from ..kernels import get_ops
from ..nn.model import MLP, Context
from ..nn.optim import make_optimizer
from ..parallel.data_parallel import DataParallelEngine
from ..parallel.grid import GridError, make_grid
from ..parallel.hierarchical import HierarchyError
from ..parallel.partition import partition_layers
from ..parallel.pipeline import PipelineEngine
from ..parallel.profile import profiled_partition
from ..parallel.tensor import TensorParallelMLP
from .config import ConfigError, resolve_backend
from .resume import load_resume
from .threads import configure_threads
from .trace import NULL_TRACER, make_tracer
from .weights import load_weights


@dataclass
class Setup:
    """What ``setup`` built; the training loop runs on it."""

    config: object  # the RunConfig
    grid: object  # parallel.grid.Grid: world, dp x pp, sub-communicators
    data: object  # data.Dataset (host arrays)
    model: object  # nn.model.MLP of this rank's layers
    engine: object  # a parallel.engine.Engine
    tracer: object
    resume: object = None  # checkpoint.Resume, or None for a new run
    threads: int = 1
    thread_warning: str | None = None
    data_note: str | None = None  # why this node's ranks hold private copies of the data

    def close(self):
        """Free the shared-memory windows (the dataset's, the hierarchical Allreduce's)
        before MPI is finalized: some MPI libraries fail MPI_Finalize over windows still
        open (MPICH's ofi netmod: "fabricclose failed"). Collective over every node's
        ranks; the data and the engine are gone afterwards, the model stays."""
        from ..data.shared import release

        if self.engine is not None:
            self.engine.close()
        release(self.data)
        self.engine = self.data = None


def setup(config, comm):
    """Build the run of ``config`` over the ranks of ``comm`` (``MPI.COMM_WORLD``,
    of size 1 for a serial run). Collective over ``comm``."""
    par = config.parallel
    try:
        grid = make_grid(comm, dp=par.dp, pp=par.pp, tp=par.tp)
    except GridError as e:
        raise ConfigError(str(e)) from None
    threads, warning = configure_threads(comm, par.threads)
    dtype = np.dtype(config.model.dtype)
    data, data_note = load_data(config, comm, dtype)
    backend = resolve_backend(config.model.backend)
    if par.zero and backend == "cupy":  # --backend auto found a GPU
        raise ConfigError(f"--zero {par.zero} exchanges host (NumPy) buffers and this run would "
                          f"use the GPU (cupy backend): add --backend numba")
    if par.servers and backend == "cupy":
        raise ConfigError("--servers exchanges host (NumPy) buffers and this run would use the "
                          "GPU (cupy backend): add --backend numba")
    if par.allreduce == "hierarchical" and backend == "cupy":
        raise ConfigError("--allreduce hierarchical sums host (NumPy) buffers in shared memory "
                          "and this run would use the GPU (cupy backend): add --backend numba")
    ops = get_ops(backend)
    sizes = [data.n_features, *config.model.hidden, data.num_classes]
    v = par.virtual_stages
    stages = layer_costs_s = None  # layer_costs_s: the profiled LayerCosts, for the log
    if grid.pp > 1 and par.partition == "profile":
        rows = config.batch_size // grid.dp // par.micro_batches  # one micro-batch
        stages, layer_costs_s = profiled_partition(sizes, grid.pp, v, rows, ops, dtype,
                                                   config.model.activation, grid.world)
    elif grid.pp > 1:
        stages = partition_layers(sizes, grid.pp * v, par.partition)
    # a rank holds only its layers: its stage, or its chunks (stages rank, rank + pp, ...)
    layers = None if not stages else stages[grid.pp_rank] if v == 1 else \
        [stages[c * grid.pp + grid.pp_rank] for c in range(v)]
    if grid.tp > 1:  # this rank's shards of those layers
        model = TensorParallelMLP(sizes, config.model.activation, dtype, config.seed,
                                  layers=layers, ops=ops, tp_comm=grid.tp_comm)
    else:
        model = MLP(sizes, config.model.activation, dtype, config.seed, layers=layers, ops=ops)
    init = config.model.init
    if init:
        model.load_state_dict(load_weights(init), source=f"--init {init}")
    resume = load_resume(config, model)  # every rank checks the file, loads its layers
    warm_up(model, config, data)
    tracer = make_tracer(config.output.trace)
    try:
        engine = make_engine(config, grid, model, stages, tracer)
    except HierarchyError as e:  # the same verdict on every rank (gathered)
        raise ConfigError(str(e)) from None
    return Setup(config, grid, data, model, engine, tracer, resume, threads, warning, data_note)


def make_engine(config, grid, model, stages=None, tracer=NULL_TRACER):
    """A data-parallel replica of the whole model, or this rank's pipeline stage
    (either with its model states sharded over its replicas under ``--zero``), or a
    parameter server or worker (``--servers``)."""
    par, loss = config.parallel, config.model.loss
    if par.servers:
        from ..parallel.param_server import ParameterServerEngine

        return ParameterServerEngine(model, loss, grid.world, par.sync, par.servers,
                                     par.staleness, par.straggler, tracer, par.rma)
    if grid.pp == 1:
        return DataParallelEngine(model, loss, grid.dp_comm, par.bucket_mb, tracer, par.zero,
                                  par.allreduce)
    return PipelineEngine(model, loss, grid, par.schedule, par.micro_batches, stages, tracer,
                          virtual_stages=par.virtual_stages, zero=par.zero,
                          bucket_mb=par.bucket_mb, allreduce=par.allreduce)


def load_data(config, comm, dtype):
    """(the Dataset, a note or None): the data in compact form (``Dataset.train_features``).

    Rank 0 loads (and downloads if needed) first; then the first rank of every
    other node (``COMM_TYPE_SHARED``) reads the files it found or fetched, so a
    shared cache is downloaded into once. A node that does not see rank 0's
    files (its own home directory) downloads them itself: downloads are atomic.
    Each node's ranks then share its leader's copy in MPI shared memory
    (``data.shared``); with ``--no-shared-data``, or where /dev/shm is too
    small (the note says so), every rank loads its own copy."""
    from mpi4py import MPI

    from ..data.shared import SharedDataError, share_on_node

    rank = comm.Get_rank()
    d = config.data

    def load():
        return load_dataset(d.dataset, data_dir=d.data_dir, dtype=dtype, download=True,
                            progress=not config.output.quiet and rank == 0, compact=True)

    if comm.Get_size() == 1:
        return load(), None
    data, error = None, None
    if rank == 0:
        try:
            data = load()
        except Exception as e:  # noqa: BLE001 - re-raised below after telling the others
            error = e
        failed = comm.bcast(error is not None, root=0)
    else:  # Ctrl-C reaches every rank: let rank 0 remove its partial download, then abort
        with _sigint_ignored():
            failed = comm.bcast(None, root=0)
    if failed:
        if rank == 0:
            raise error
        raise SystemExit(2)  # rank 0 reports the problem for everyone
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank) if d.shared else MPI.COMM_SELF
    leader = node.Get_rank() == 0
    if leader and rank != 0:
        try:
            data = load()
        except Exception as e:  # noqa: BLE001 - re-raised below once every rank knows
            error = e
    _agree(comm, error)  # a node that could not load ends the job
    if node.Get_size() == 1:
        return data, None
    note = None
    try:
        shared = share_on_node(data, node)
    except SharedDataError as e:  # (on every rank of the node)
        shared = None
        note = (f"mpnn: warning: the dataset is not shared on this node: {e}; each of its "
                f"{node.Get_size()} ranks holds its own copy (give /dev/shm more room, e.g. "
                f"docker run --shm-size 1g, or pass --no-shared-data to silence this)")
    except Exception as e:  # noqa: BLE001 - agreed below, so no rank is left waiting
        shared, error = None, e
    finally:
        node.Free()  # (the window keeps what it needs of it)
    if shared is None and error is None and not leader:
        try:
            data = load()  # a private copy after all
        except Exception as e:  # noqa: BLE001
            error = e
    _agree(comm, error)
    if shared is None:
        return data, note if leader else None
    del data  # the leader's private copy: give its pages back to the system
    _trim_heap()
    return shared, None


def _agree(comm, error):
    """Every rank learns whether any failed: this one re-raises its error, the
    others leave with status 2 (the failed rank reports)."""
    if any(comm.allgather(error is not None)):
        if error is not None:
            raise error
        raise SystemExit(2)


def _trim_heap():
    """Return freed heap memory to the system (glibc's malloc_trim; elsewhere nothing):
    the leader's private copy of the dataset was freed, but the allocator keeps the
    pages of a heap it might reuse."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored inside the block (main thread only; elsewhere unchanged)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def warm_up(model, config, data):
    """Compile (or load from numba's cache) every kernel the run will call, so
    the first epoch's time and samples/s measure training, not compilation.

    One step of a throwaway 3-layer model with the run's ops, dtype,
    activation, loss and optimizer: the same kernels on arrays of the same
    types. Rank-local, and the run's own model and data are not touched."""
    ops, m, o = model.ops, config.model, config.optim
    tiny = MLP([data.n_features, 2, 2, data.num_classes], m.activation, model.dtype, 0, ops=ops)
    x = ops.to_device(data.train_features(slice(0, 2)))  # (2, I), as the trainer's rows
    y = ops.to_device(np.array(data.y_train[:2]))  # writable, as the trainer's gathered labels
    ctx = Context()
    logits = tiny.forward(x, ctx)  # (2, C)
    dlogits = ops.xp.empty_like(logits)
    ops.loss(m.loss, logits, y, 0.5, dlogits)
    tiny.backward(dlogits, ctx, need_input_grad=True)
    ops.bias_act(ctx.outputs[1], tiny.b(1), m.activation)  # a row-parallel layer's second half
    ops.predict_stats(tiny.forward(x, ctx), y, m.loss)
    make_optimizer(o.optimizer, tiny.flat, ops, 1e-3, o.momentum, o.nesterov,
                   o.weight_decay).step(1e-3)
    ops.synchronize()
