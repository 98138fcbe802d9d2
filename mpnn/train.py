"""``python -m mpnn.train``: parse, validate, build, train, report.

Under ``mpirun -n N`` the job trains data-parallel: every rank holds a full
replica, takes its contiguous share of each global batch, computes gradients
scaled by ``1/global_batch``, and the flat gradient buffer is summed with one
buffer-based ``Allreduce``. With ``--pp P`` the layers are split into P
pipeline stages instead (``--dp`` replicas of that pipeline). For the same
seed and global batch every grid trains the same model as a serial run, up
to floating-point summation order. A serial run is a world of one.

This module is the command line only: the options, their parsing into a
typed ``RunConfig`` (``mpnn.runtime.config``), the start-up lines, and the
two phases of failure handling (``mpnn.runtime.agree``). Configuration and
data problems are found on every rank before the first collective and end
the job with one message and exit status 2; an exception later on any rank
prints its message and aborts the whole job (``MPI.Abort``, status 1).
"""

from __future__ import annotations

import os
import signal
import sys

_early_interrupt = []  # a Ctrl-C that came while python -m mpnn.train was starting up


def _remember_interrupt(*_):
    _early_interrupt.append(True)


if __name__ == "__main__":  # Ctrl-C while the imports below run: remembered (see main)
    signal.signal(signal.SIGINT, _remember_interrupt)

import argparse
import contextlib
import io
import re

from .data import DATASETS
from .data.shared import release_all
from .kernels import BACKENDS
from .nn.functional import HIDDEN_ACTIVATIONS, LOSS_NAMES
from .nn.optim import LR_SCHEDULES, OPTIMIZERS
from .parallel.pipeline_orders import SCHEDULES
from .parallel.ps_config import DEFAULT_STALENESS, SYNCS, parse_straggler
from .runtime import watchdog
from .runtime.agree import abort_on_error, interrupted, on_every_rank
from .runtime.checkpoint import prepare_checkpoint_dir
from .runtime.config import (
    CheckpointConfig,
    DataConfig,
    Every,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    ParallelConfig,
    RunConfig,
    validate,
)
from .runtime.loop import train
from .runtime.options import nonneg_float, nonneg_int, option_type, positive_int
from .runtime.setup import setup

# ------------------------------------------------------------------ option types


_thread_count = option_type(int, lambda v: 1 <= v <= 4096, "a thread count from 1 to 4096",
                            unparsed="a positive integer")


def _hidden_sizes(text):
    if text.strip() in ("", "none"):
        return ()
    sizes = []
    for part in text.split(","):
        try:
            size = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"hidden sizes must be comma-separated positive integers like 256,128,64; "
                f"{part.strip()!r} is not an integer") from None
        if size < 1:
            raise argparse.ArgumentTypeError(f"hidden sizes must be positive, got {size}")
        sizes.append(size)
    return tuple(sizes)


def parse_every(text):
    """``200`` (steps) or ``200s``/``200steps``; ``1e``/``2epochs`` (epochs)."""
    m = re.fullmatch(r"\s*(\d+)\s*(s|steps?|e|epochs?)?\s*", text)
    if not m or int(m.group(1)) < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive number of steps (e.g. 200) or epochs (e.g. 1e), got {text!r}")
    unit = "epochs" if (m.group(2) or "s")[0] == "e" else "steps"
    return Every(int(m.group(1)), unit)


# ------------------------------------------------------------------ the parser


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m mpnn.train",
        description="Train an MLP with hand-derived backprop; under mpirun -n N, data-parallel.")
    a = p.add_argument
    a("--dataset", default="digits", choices=DATASETS,
      help="training data (default: digits, offline)")
    a("--data-dir", default=None, help="directory holding the IDX files (or <dir>/<dataset>/)")
    a("--shared-data", action=argparse.BooleanOptionalAction, default=True,
      help="one copy of the dataset per node in MPI shared memory, read by all its ranks "
           "(default; --no-shared-data: every rank loads its own)")
    a("--hidden", type=_hidden_sizes, default=(256, 128, 64), help="hidden sizes, e.g. 256,128,64")
    a("--activation", default="relu", choices=HIDDEN_ACTIVATIONS)
    a("--loss", default="cross_entropy", choices=LOSS_NAMES)
    a("--optimizer", default="adam", choices=OPTIMIZERS)
    a("--lr", type=nonneg_float, default=None, help="learning rate (default: adam 1e-3, sgd 0.05)")
    a("--lr-schedule", default="cosine", choices=LR_SCHEDULES,
      help="cosine decays the rate to 0 over the run (default)")
    a("--momentum", type=nonneg_float, default=0.9, help="SGD momentum (0 = plain SGD)")
    a("--nesterov", action="store_true", help="Nesterov momentum for SGD")
    a("--weight-decay", type=nonneg_float, default=0.0,
      help="L2 for SGD, decoupled (AdamW) for adam")
    a("--epochs", type=positive_int, default=10)
    a("--batch-size", type=positive_int, default=64, help="global batch size over all replicas")
    a("--seed", type=nonneg_int, default=0)
    a("--dtype", default="float32", choices=("float32", "float64"))
    a("--backend", default="auto", choices=BACKENDS,
      help="kernel implementation (default auto: cupy when a GPU is usable, else numba)")
    a("--bucket-mb", type=nonneg_float, default=0.1,
      help="data parallel: overlap the gradient Allreduce (under --zero: reduce-scatter) "
           "with backward in buckets of this many MB (0 = one call after backward)")
    a("--allreduce", default="flat", choices=("flat", "hierarchical"),
      help="how gradients are summed over the replicas: flat (one MPI Allreduce, default) or "
           "hierarchical (shared memory inside each node, then one Allreduce between nodes)")
    a("--timeout", type=nonneg_float, default=None, metavar="SECONDS",
      help="end the job with a diagnosis when a rank waits on MPI longer than this (default: "
           "300 s until a step is timed, then max(60 s, 50 x the slowest step); 0: off)")
    a("--check-collectives", action="store_true",
      help="debugging: check before every collective that all its ranks call the same one "
           "(operation, count, dtype, sequence number), naming both call sites if not")
    a("--threads", type=_thread_count, default=None,
      help="BLAS/numba threads per rank (default: cores on this node / ranks on this node)")
    a("--init", default=None, metavar="PATH", help="start from weights in a --save .npz file")
    a("--save", default=None, metavar="PATH", help="write the trained weights (.npz, no pickle)")
    a("--metrics", default=None, metavar="PATH",
      help="write one JSON line per epoch (a new run starts the file afresh; --resume keeps "
           "the epochs before its own)")
    a("--trace", default=None, metavar="FILE.json",
      help="write a Chrome/Perfetto timeline of every rank's forward, backward, step and messages")
    a("--plot", default=None, metavar="FILE.png", help="draw the loss and accuracy curves")
    a("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    g = p.add_argument_group("pipeline (model) parallelism")
    g.add_argument("--pp", type=int, default=1, help="pipeline stages per replica (default 1)")
    g.add_argument("--dp", type=int, default=None,
                   help="data-parallel replicas (default: ranks / (--pp x --tp))")
    g.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel shards of every stage's layers (default 1): consecutive "
                        "layers pair up, column-parallel (W split by outputs) then row-parallel "
                        "(W split by inputs, one Allreduce); a stage with an odd number of "
                        "layers keeps its last one (the output layer, in a 1-stage run) whole "
                        "on every rank; widths --tp does not divide are split unevenly, and "
                        "every hidden layer needs at least --tp features")
    g.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3), metavar="{0,1,2,3}",
                   help="ZeRO stage of data parallelism (default 0: every replica holds "
                        "everything): 1 shards the optimizer state over the replicas, 2 the "
                        "gradients too, 3 the parameters too (gathered layer by layer)")
    g.add_argument("--micro-batches", type=int, default=1,
                   help="micro-batches per global batch and replica in the pipeline (default 1)")
    g.add_argument("--schedule", default="1f1b", choices=list(SCHEDULES),
                   help="pipeline schedule (default 1f1b): naive, gpipe, 1f1b, "
                        "interleaved-1f1b (with --virtual-stages; --micro-batches a multiple "
                        "of --pp), zb-h1, zb-h2 (zero bubble: backward split into B and W); "
                        "see python -m mpnn.schedule")
    g.add_argument("--virtual-stages", type=positive_int, default=1, metavar="V",
                   help="model chunks per pipeline rank for --schedule interleaved-1f1b "
                        "(the layers are cut into pp x V stages, rank r holding r, r + pp, "
                        "...; default 1)")
    g.add_argument("--partition", default=None, metavar="N1,N2,...",
                   help="layers per stage, e.g. 2,1,1 (default: balance the estimated cost)")
    g = p.add_argument_group("parameter servers and consistency models")
    g.add_argument("--sync", default="bsp", choices=SYNCS,
                   help="consistency of parameter-server training (default bsp): bsp steps "
                        "all workers together (equal to serial training), ssp lets a worker "
                        "run up to --staleness steps ahead of the slowest, asp never waits; "
                        "ssp and asp imply --servers 1")
    g.add_argument("--servers", type=nonneg_int, default=None, metavar="K",
                   help="world ranks 0..K-1 hold shards of the parameters and the optimizer "
                        "state, the others are workers that pull parameters and push "
                        "gradients (default 0: no servers, gradients summed by Allreduce)")
    g.add_argument("--staleness", type=nonneg_int, default=None, metavar="S",
                   help="--sync ssp: the most steps a worker may be ahead of the slowest "
                        "(default 2)")
    g.add_argument("--straggler", type=parse_straggler, default=None, metavar="RANK:FACTOR",
                   help="experiments: worker RANK (a world rank) computes FACTOR times slower "
                        "(it sleeps for the extra time), e.g. 1:3")
    g.add_argument("--rma", action="store_true",
                   help="--sync asp with plain SGD: workers pull and push with MPI one-sided "
                        "communication (a shared lock and Get; an exclusive lock, Accumulate "
                        "and Fetch_and_op), the servers only waiting")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="write resumable checkpoints DIR/ckpt-<step>.npz (created if missing)")
    g.add_argument("--checkpoint-every", type=parse_every, default=None, metavar="N|Ne",
                   help="checkpoint every N optimizer steps, or every N epochs with Ne "
                        "(default: 1e); a final checkpoint is always written")
    g.add_argument("--checkpoint-keep", type=int, default=3, metavar="K",
                   help="keep the newest K checkpoints (0 keeps all; default 3)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="FILE",
                   help="continue from the newest checkpoint in --checkpoint-dir (or from FILE); "
                        "without one in the directory, start from step 0")
    return p


def config_from_args(ns):
    """The typed run configuration of a parsed command line."""
    return RunConfig(
        data=DataConfig(ns.dataset, ns.data_dir, ns.shared_data),
        model=ModelConfig(tuple(ns.hidden), ns.activation, ns.loss, ns.dtype, ns.backend, ns.init),
        optim=OptimConfig(ns.optimizer, ns.lr, ns.lr_schedule, ns.momentum, ns.nesterov,
                          ns.weight_decay),
        parallel=ParallelConfig(ns.dp, ns.pp, ns.tp, ns.micro_batches, ns.schedule,
                                ns.virtual_stages, ns.partition, ns.bucket_mb, ns.threads,
                                ns.zero, ns.allreduce, ns.timeout, ns.check_collectives,
                                ns.sync, _servers(ns), _staleness(ns), ns.straggler, ns.rma),
        checkpoint=CheckpointConfig(ns.checkpoint_dir, ns.checkpoint_every, ns.checkpoint_keep,
                                    ns.resume),
        output=OutputConfig(ns.save, ns.metrics, ns.trace, ns.plot, ns.quiet),
        epochs=ns.epochs, batch_size=ns.batch_size, seed=ns.seed)


def _servers(ns):
    """--servers, or 1 when --sync ssp/asp asks for servers without a number."""
    return ns.servers if ns.servers is not None else (1 if ns.sync != "bsp" else 0)


def _staleness(ns):
    return ns.staleness if ns.staleness is not None or ns.sync != "ssp" else DEFAULT_STALENESS


def parse_config(argv=None):
    """``RunConfig`` of a command line (argparse exits with status 2 on a bad one)."""
    return config_from_args(build_parser().parse_args(argv))


# --------------------------------------------------------------------- main


def main(argv=None):
    """``python -m mpnn.train``: returns the exit status (0, 1 training failed,
    2 bad options or files, 130 interrupted)."""
    from mpi4py import MPI  # MPI_Init: every rank must get here, or the others would hang

    signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt from here on
    comm = MPI.COMM_WORLD  # a serial run is a world of one
    try:
        if _early_interrupt:  # during the imports: now every rank can be told
            raise KeyboardInterrupt
        return _main(comm, argv)
    except KeyboardInterrupt:  # Ctrl-C: mpirun passes it to every rank
        return interrupted(comm)


def _main(comm, argv):
    rank = comm.Get_rank()
    held = []  # rank 0: the checkpoint directory's lock, released when the job ends

    def parse_and_validate():  # local checks only: no collective can be reached yet
        quiet = io.StringIO()
        with contextlib.redirect_stderr(sys.stderr if rank == 0 else quiet), \
                contextlib.redirect_stdout(sys.stdout if rank == 0 else quiet):
            config = parse_config(argv)  # usage errors and --help: printed by rank 0 only
        validate(config, comm.Get_size())
        lock = prepare_checkpoint_dir(config.checkpoint, lock=rank == 0)
        if lock is not None:
            held.append(lock)
            watchdog.at_abort(lock.release)  # its MPI_Abort skips the finally below
        return config

    try:
        # Phase 1: everything before training, in agreed steps, so every rank exits
        # together with one message and status 2 when anything is wrong, rank 0's
        # start-up lines included.
        status, config = on_every_rank(comm, parse_and_validate)
        if status is not None:
            return status
        status, run = on_every_rank(comm, lambda: setup(config, comm))  # collectives from here
        if status is not None:  # agreed on every rank: free what setup left open
            release_all()
            return status
        if run.data_note and not config.output.quiet:  # from the node's first rank
            print(run.data_note, file=sys.stderr, flush=True)
        status, _ = on_every_rank(comm, lambda: _banner(run, held) if rank == 0 else None)
        if status is not None:
            run.close()
            return status
        # Phase 2: training. An exception on any rank aborts the whole job.
        def train_then_close():
            train(run)
            run.close()  # the shared-memory windows, before MPI_Finalize
            release_all()

        return abort_on_error(comm, train_then_close, release=held)
    finally:
        for lock in held:
            lock.release()


def _banner(run, held=()):
    """Rank 0's start-up lines: what is trained where, and a resume's position."""
    config, data, model = run.config, run.data, run.model
    m, o, ck = config.model, config.optim, config.checkpoint
    for lock in held:  # what taking the checkpoint directory cleaned up
        if lock.stale:
            print(f"mpnn: took over the lock of {ck.directory} from a run that is gone "
                  f"({lock.stale})", file=sys.stderr, flush=True)
        if getattr(lock, "removed", None):
            print(f"mpnn: removed {len(lock.removed)} temporary file(s) of killed writers from "
                  f"{ck.directory}: {', '.join(lock.removed)}", file=sys.stderr, flush=True)
    if not config.output.quiet:
        if run.thread_warning:
            print(run.thread_warning, file=sys.stderr)
        shared = f", one copy per node in shared memory ({data.nbytes / 1e6:.1f} MB)" \
            if data.owner is not None else ""
        print(f"mpnn: {config.data.dataset} ({data.x_train.shape[0]} train / "
              f"{data.x_test.shape[0]} test{shared}), MLP {'-'.join(map(str, model.sizes))} "
              f"{m.activation}, {o.optimizer} lr {o.base_lr}, batch {config.batch_size}, "
              f"{run.grid.world.Get_size()} rank(s) x {run.threads} thread(s), "
              f"{model.ops.name} backend, {m.dtype}", flush=True)
        line = run.engine.describe()
        if line:
            print(f"mpnn: {line}", flush=True)
    if not ck.resume:
        return
    resume = run.resume
    if resume is None:
        print(f"mpnn: no checkpoint in {ck.directory} yet: starting at step 0",
              file=sys.stderr, flush=True)
        return
    if not config.output.quiet:
        print(f"mpnn: resuming from {resume.path} (step {resume.step}, epoch "
              f"{resume.epoch}, {resume.batch} batch(es) done in it)", flush=True)
    if resume.warnings:
        print(f"mpnn: warning: resuming with settings that differ from the checkpoint's "
              f"({'; '.join(resume.warnings)}): the run will not repeat the "
              f"uninterrupted one exactly", file=sys.stderr, flush=True)


def _run_as_command():
    """``python -m mpnn.train``: Ctrl-C is status 130 without a traceback at any
    moment, during the imports and the shutdown too (main() handles the rest). A
    Ctrl-C during the imports is acted on once MPI is up: a rank that left before
    MPI_Init would leave the others waiting there for ever."""
    try:
        status = main()
    except KeyboardInterrupt:  # before MPI was up: nothing to abort
        status = 130
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # shutdown: MPI_Finalize, atexit
    sys.exit(status)


if __name__ == "__main__":
    _run_as_command()
