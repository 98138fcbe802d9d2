"""The run configuration: frozen dataclasses, one per concern, built once.

``python -m mpnn.train`` parses its command line into a ``RunConfig``
(``mpnn.train.parse_config``); setup, the engines, the checkpointer and the
training loop take it or its parts, never an argparse Namespace. Library
users build one directly::

    RunConfig(model=ModelConfig(hidden=(64, 32)), optim=OptimConfig("sgd"), epochs=3)

``validate(config, world_size)`` raises ``ConfigError`` for values or
combinations that cannot work. It only looks (files, the grid arithmetic, a
GPU); it is run on every rank before the first collective, so every rank
reaches the same verdict.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

from ..nn.functional import HIDDEN_ACTIVATIONS, LOSS_NAMES
from ..nn.optim import OPTIMIZERS


class ConfigError(ValueError):
    """An option value or combination that cannot work; the message says how to fix it."""


@dataclass(frozen=True)
class Every:
    """A checkpoint interval: every ``n`` optimizer steps, or every ``n`` epochs."""

    n: int
    unit: str  # "steps" | "epochs"

    def __str__(self):
        return f"{self.n}{'e' if self.unit == 'epochs' else ''}"


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"  # digits | mnist | fashion-mnist | synthetic
    data_dir: str | None = None  # directory holding the IDX files (or <dir>/<dataset>/)
    shared: bool = True  # one copy per node in MPI shared memory (False: one per rank)


@dataclass(frozen=True)
class ModelConfig:
    hidden: tuple = (256, 128, 64)  # hidden layer sizes; in/out sizes come from the data
    activation: str = "relu"
    loss: str = "cross_entropy"
    dtype: str = "float32"
    backend: str = "auto"  # auto | numpy | numba | cupy
    init: str | None = None  # a --save file (or checkpoint) to start from


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adam"
    lr: float | None = None  # None: the optimizer's default (base_lr)
    lr_schedule: str = "cosine"  # cosine | constant
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0

    @property
    def base_lr(self):
        """The learning rate at step 0: ``lr``, else adam 1e-3, sgd 0.05."""
        return self.lr if self.lr is not None else (1e-3 if self.optimizer == "adam" else 0.05)


@dataclass(frozen=True)
class ParallelConfig:
    dp: int | None = None  # data-parallel replicas (None: ranks / pp)
    pp: int = 1  # pipeline stages per replica
    tp: int = 1  # tensor-parallel shards of every stage's layers
    micro_batches: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedules)
    partition: str | None = None  # layers per stage, "2,1,1" (None: balanced)
    bucket_mb: float = 0.1  # overlapped gradient Allreduce buckets (0: one blocking call)
    threads: int | None = None  # BLAS/numba threads per rank (None: this rank's cores)
    zero: int = 0  # ZeRO stage: 0 replicated, 1-3 shard optimizer state, gradients, parameters
    allreduce: str = "flat"  # gradient sum: flat (one MPI Allreduce) | hierarchical (per node)
    timeout: float | None = None  # watchdog seconds for any wait on MPI (None: follows the
    #                               step time, runtime.watchdog; 0: off)
    check_collectives: bool = False  # fingerprint every collective first (debugging)
    sync: str = "bsp"  # parameter servers' consistency: bsp | ssp | asp (parallel.param_server)
    servers: int = 0  # parameter-server ranks (0: none, gradients are summed by Allreduce)
    staleness: int | None = None  # ssp: how far a worker may run ahead of the slowest
    straggler: tuple | None = None  # (world rank, factor): that worker computes slower
    rma: bool = False  # asp with plain SGD: one-sided pulls and pushes (parallel.ps_rma)


@dataclass(frozen=True)
class CheckpointConfig:
    directory: str | None = None
    every: Every | None = None  # None: every epoch when a directory is given
    keep: int = 3  # newest K kept (0: all)
    resume: str | None = None  # "latest" (newest in directory) or a file

    @property
    def interval(self):
        return self.every or (Every(1, "epochs") if self.directory else None)


@dataclass(frozen=True)
class OutputConfig:
    save: str | None = None  # trained weights (.npz)
    metrics: str | None = None  # one JSON line per epoch
    trace: str | None = None  # Chrome trace-event timeline
    plot: str | None = None  # loss/accuracy curves
    quiet: bool = False


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    epochs: int = 10
    batch_size: int = 64  # the global batch, split over the data-parallel replicas
    seed: int = 0  # initial weights and data order (the same on every rank)

    def with_(self, **parts):
        """A copy with some parts replaced: ``config.with_(output=OutputConfig(quiet=True))``."""
        return replace(self, **parts)


def validate(config, world_size):
    """Raise ConfigError for values or combinations that cannot work (the same on
    every rank; nothing is created or written)."""
    from ..parallel.pipeline_config import PipelineConfigError, check_pipeline_config

    m, o, par, out = config.model, config.optim, config.parallel, config.output
    if m.activation not in HIDDEN_ACTIVATIONS:
        raise ConfigError(f"unknown activation {m.activation!r}; choose one of "
                          f"{', '.join(HIDDEN_ACTIVATIONS)}")
    if m.loss not in LOSS_NAMES:
        raise ConfigError(f"unknown loss {m.loss!r}; choose one of {', '.join(LOSS_NAMES)}")
    if o.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {o.optimizer!r}; choose one of "
                          f"{', '.join(OPTIMIZERS)}")
    replicas = world_size // (par.pp * par.tp) if par.pp >= 1 and par.tp >= 1 else world_size
    from ..parallel.ps_config import PsConfigError, check_ps_config

    try:
        check_ps_config(par.sync, par.servers, par.staleness, par.straggler, world_size, par.pp,
                        par.tp, par.zero, par.allreduce, m.backend,
                        config.checkpoint.every, config.batch_size)
    except PsConfigError as e:
        raise ConfigError(str(e)) from None
    if par.rma and not (par.servers and par.sync == "asp" and o.optimizer == "sgd"
                        and o.momentum == 0 and o.weight_decay == 0):
        raise ConfigError("--rma pushes p <- p - lr*g one-sided, with no server code to run an "
                          "optimizer: it needs --sync asp --optimizer sgd --momentum 0 (and no "
                          "--weight-decay)")
    if par.sync != "bsp" and not par.servers:
        raise ConfigError(f"--sync {par.sync} runs through parameter servers: add --servers K")
    if par.pp == 1 and not par.servers and config.batch_size < replicas:
        who = f"{replicas} ranks" if par.tp == 1 else f"{replicas} data-parallel replicas"
        raise ConfigError(f"--batch-size {config.batch_size} is smaller than the {who}: every "
                          f"{'rank' if par.tp == 1 else 'replica'} needs at least one row of "
                          f"each global batch; use --batch-size >= {replicas} or fewer ranks")
    try:  # grid, stages, partition and micro-batches
        check_pipeline_config(world_size, par.dp, par.pp, len(m.hidden) + 1,
                              config.batch_size, par.micro_batches, par.partition,
                              par.schedule, par.virtual_stages, par.tp)
    except PipelineConfigError as e:
        raise ConfigError(str(e)) from None
    if par.tp > 1:
        from ..parallel.tensor import TensorConfigError, check_tensor_widths

        try:
            check_tensor_widths(m.hidden, par.tp)
        except TensorConfigError as e:
            raise ConfigError(str(e)) from None
    from ..parallel.zero import ZeroConfigError, check_zero_config

    try:
        check_zero_config(par.zero, world_size, replicas if par.dp is None else par.dp, par.pp,
                          par.tp, par.schedule, m.backend)
    except ZeroConfigError as e:
        raise ConfigError(str(e)) from None
    if par.timeout is not None and not (math.isfinite(par.timeout) and par.timeout >= 0):
        raise ConfigError(f"--timeout {par.timeout}: give seconds >= 0 (0 turns the watchdog off)")
    if par.check_collectives and par.timeout == 0:
        raise ConfigError("--check-collectives runs inside the watchdog, which --timeout 0 "
                          "turns off: drop one of them")
    if par.allreduce not in ("flat", "hierarchical"):
        raise ConfigError(f"unknown --allreduce {par.allreduce!r}; choose flat or hierarchical")
    if par.allreduce == "hierarchical" and par.zero:
        raise ConfigError(f"--allreduce hierarchical sums whole gradients and --zero {par.zero} "
                          f"reduce-scatters them into shards: use one or the other")
    if par.allreduce == "hierarchical" and m.backend == "cupy":
        raise ConfigError("--allreduce hierarchical sums host (NumPy) buffers in shared memory "
                          "and --backend cupy keeps them on the GPU: use --backend numba or "
                          "--allreduce flat")
    if o.lr is not None and o.lr == 0:
        raise ConfigError("--lr 0 would not train; give a positive learning rate")
    if o.lr is not None and not (math.isfinite(o.lr) and o.lr > 0):
        raise ConfigError(f"--lr {o.lr}: expected a finite number > 0")
    if o.momentum >= 1:
        raise ConfigError(f"--momentum {o.momentum} must be below 1 (0.9 is usual; "
                          f"at 1 or more the velocity grows without bound)")
    if o.nesterov and (o.optimizer != "sgd" or o.momentum == 0):
        raise ConfigError("--nesterov needs --optimizer sgd with --momentum > 0")
    _check_outputs(out)
    d = config.data
    if d.data_dir is not None and not os.path.isdir(d.data_dir):
        raise ConfigError(f"--data-dir {d.data_dir}: no such directory (it should hold the "
                          f"IDX files, or <dataset>/ with them)")
    if m.init is not None and not os.path.isfile(m.init):
        raise ConfigError(f"--init {m.init}: no such file")
    from .checkpoint import CheckpointError, check_checkpoint_config

    try:
        check_checkpoint_config(config.checkpoint, m.init)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if m.backend == "cupy":
        from ..kernels.cupy_ops import gpu_available

        if not gpu_available():
            raise ConfigError("--backend cupy needs CuPy and a usable CUDA GPU, and there is "
                              "none here; use --backend numba (or auto)")


def _check_outputs(out):
    """Every output path can be written as a file (a real test write, not os.access)."""
    from .files import check_output_file
    from .plots import image_format

    for option, path in (("--save", out.save), ("--metrics", out.metrics),
                         ("--trace", out.trace), ("--plot", out.plot)):
        if path is None:
            continue
        try:
            check_output_file(option, path)
            if option == "--plot":
                image_format(path, option)
            if option == "--metrics" and os.path.exists(path) and not os.access(path, os.W_OK):
                raise ValueError(f"--metrics {path}: the file is not writable")  # appended to
        except ValueError as e:
            raise ConfigError(str(e)) from None


def resolve_backend(name):
    """The backend to build: ``auto`` is CuPy when a GPU is usable, else numba."""
    if name != "auto":
        return name
    from ..kernels.cupy_ops import gpu_available

    return "cupy" if gpu_available() else "numba"
