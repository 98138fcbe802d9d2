"""``python -m mpnn.train``: parse, validate, build, train, report.

Under ``mpirun -n N`` the job trains data-parallel: every rank holds a full
replica, takes its contiguous share of each global batch, computes gradients
scaled by ``1/global_batch``, and the flat gradient buffer is summed with one
buffer-based ``Allreduce``. Evaluation is sharded over the ranks and the
counts are reduced. For the same seed and global batch every rank count
trains the same model as a serial run, up to floating-point summation order.

Failure is loud and collective: configuration and data problems are found on
every rank before the first collective and end the job with one message and
exit status 2; an exception later on any rank prints its message and aborts
the whole job (``MPI.Abort``) instead of leaving the other ranks waiting.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time

import numpy as np

from .runtime.checkpoint import Checkpointer, add_checkpoint_options, check_checkpoint_options, load_resume
from .data import DATASETS, load_dataset
from .data.batching import batch_bounds, epoch_permutation, share_bounds
from .runtime.files import atomic_write, check_output_file, keep_metrics
from .runtime.guards import check_finite, check_replicas_agree
from .kernels import BACKENDS, get_ops
from .nn.model import HIDDEN_ACTIVATIONS, MLP
from .nn.optim import OPTIMIZERS, make_optimizer
from .parallel.data_parallel import DataParallelEngine
from .parallel.grid import GridError, make_grid
from .parallel.partition import format_partition, partition_layers
from .parallel.pipeline import PipelineConfigError, PipelineEngine, check_pipeline_config
from .parallel.schedules import SCHEDULES
from .plot import image_format
from .runtime.threads import configure_threads
from .runtime.trace import NULL_TRACER, make_tracer

LOSSES = ("cross_entropy", "mse")


class ConfigError(ValueError):
    """An option value or combination that cannot work; the message says how to fix it."""


# ------------------------------------------------------------------ options


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _nonneg_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _hidden_sizes(text):
    if text.strip() in ("", "none"):
        return []
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
    return sizes


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m mpnn.train",
        description="Train an MLP with hand-derived backprop; under mpirun -n N, data-parallel.")
    a = p.add_argument
    a("--dataset", default="digits", choices=DATASETS, help="training data (default: digits, offline)")
    a("--data-dir", default=None, help="directory holding the IDX files (or <dir>/<dataset>/)")
    a("--hidden", type=_hidden_sizes, default=[256, 128, 64], help="hidden sizes, e.g. 256,128,64")
    a("--activation", default="relu", choices=HIDDEN_ACTIVATIONS)
    a("--loss", default="cross_entropy", choices=LOSSES)
    a("--optimizer", default="adam", choices=OPTIMIZERS)
    a("--lr", type=_nonneg_float, default=None, help="learning rate (default: adam 1e-3, sgd 0.05)")
    a("--lr-schedule", default="cosine", choices=("constant", "cosine"),
      help="cosine decays the rate to 0 over the run (default)")
    a("--momentum", type=_nonneg_float, default=0.9, help="SGD momentum (0 = plain SGD)")
    a("--nesterov", action="store_true", help="Nesterov momentum for SGD")
    a("--weight-decay", type=_nonneg_float, default=0.0,
      help="L2 for SGD, decoupled (AdamW) for adam")
    a("--epochs", type=_positive_int, default=10)
    a("--batch-size", type=_positive_int, default=64, help="global batch size over all replicas")
    a("--seed", type=_nonneg_int, default=0)
    a("--dtype", default="float32", choices=("float32", "float64"))
    a("--backend", default="auto", choices=BACKENDS,
      help="kernel implementation (default auto: cupy when a GPU is usable, else numba)")
    a("--bucket-mb", type=_nonneg_float, default=0.1,
      help="data parallel: overlap the gradient Allreduce with backward in buckets of "
           "this many MB (0 = one blocking Allreduce after backward)")
    a("--threads", type=_positive_int, default=None,
      help="BLAS/numba threads per rank (default: cores on this node / ranks on this node)")
    a("--init", default=None, metavar="PATH", help="start from weights in a --save .npz file")
    a("--save", default=None, metavar="PATH", help="write the trained weights (.npz, no pickle)")
    a("--metrics", default=None, metavar="PATH", help="write one JSON line per epoch (a new run starts the file afresh; --resume keeps the epochs before its own)")
    a("--trace", default=None, metavar="FILE.json",
      help="write a Chrome/Perfetto timeline of every rank's forward, backward, step and messages")
    a("--plot", default=None, metavar="FILE.png", help="draw the loss and accuracy curves")
    a("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    a("--pp", type=int, default=1, help="pipeline stages per replica (default 1)")
    a("--dp", type=int, default=None, help="data-parallel replicas (default: ranks / --pp)")
    a("--micro-batches", type=int, default=1,
      help="micro-batches per global batch and replica in the pipeline (default 1)")
    a("--schedule", default="1f1b", choices=list(SCHEDULES),
      help="pipeline schedule (default 1f1b); see python -m mpnn.schedule")
    a("--partition", default=None, metavar="N1,N2,...",
      help="layers per stage, e.g. 2,1,1 (default: balance the estimated cost)")
    add_checkpoint_options(p)  # --checkpoint-dir --checkpoint-every --checkpoint-keep --resume
    return p


def validate(args, world_size):
    """Raise ConfigError for option combinations that cannot work (same on every rank)."""
    if args.pp == 1 and args.batch_size < world_size:
        raise ConfigError(f"--batch-size {args.batch_size} is smaller than the {world_size} "
                          f"ranks: every rank needs at least one row of each global batch; "
                          f"use --batch-size >= {world_size} or fewer ranks")
    try:  # grid, stages, partition and micro-batches (pipeline.py)
        check_pipeline_config(world_size, args.dp, args.pp, len(args.hidden) + 1,
                              args.batch_size, args.micro_batches, args.partition)
    except PipelineConfigError as e:
        raise ConfigError(str(e)) from None
    if args.lr is not None and args.lr == 0:
        raise ConfigError("--lr 0 would not train; give a positive learning rate")
    if args.momentum >= 1:
        raise ConfigError(f"--momentum {args.momentum} must be below 1 (0.9 is usual; "
                          f"at 1 or more the velocity grows without bound)")
    if args.nesterov and (args.optimizer != "sgd" or args.momentum == 0):
        raise ConfigError("--nesterov needs --optimizer sgd with --momentum > 0")
    for option, path in (("--save", args.save), ("--metrics", args.metrics),
                         ("--trace", args.trace), ("--plot", args.plot)):
        if path:
            try:
                check_output_file(option, path)
                if option == "--plot":
                    image_format(path, option)
                if option == "--metrics" and os.path.exists(path) and not os.access(path, os.W_OK):
                    raise ValueError(f"--metrics {path}: the file is not writable")  # appended to
            except ValueError as e:
                raise ConfigError(str(e)) from None
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise ConfigError(f"--data-dir {args.data_dir}: no such directory (it should hold the "
                          f"IDX files, or <dataset>/ with them)")
    if args.init and not os.path.isfile(args.init):
        raise ConfigError(f"--init {args.init}: no such file")
    check_checkpoint_options(args)  # and creates --checkpoint-dir
    if args.backend == "cupy":
        from .kernels.cupy_ops import gpu_available

        if not gpu_available():
            raise ConfigError("--backend cupy needs CuPy and a usable CUDA GPU, and there is "
                              "none here; use --backend numba (or auto)")


def resolve_backend(args):
    """The backend to build: ``auto`` is CuPy when a GPU is usable, else numba."""
    if args.backend != "auto":
        return args.backend
    from .kernels.cupy_ops import gpu_available

    return "cupy" if gpu_available() else "numba"


def default_lr(args):
    return args.lr if args.lr is not None else (1e-3 if args.optimizer == "adam" else 0.05)


# ------------------------------------------------------------ weights files


def save_weights(path, arrays):
    """Write ``arrays`` as an .npz (no pickle) atomically: temp file, fsync, rename."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_weights(path):
    """Named arrays of a ``--save`` file (never unpickles)."""
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # zipfile, format and pickle-refusal errors alike
        raise ConfigError(f"--init {path}: not a readable mpnn weights file ({e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):  # a lone .npy array (or a text file)
        raise ConfigError(f"--init {path}: not an .npz of named tensors (layers.0.weight, ...) "
                          f"as --save writes")
    try:
        with z:
            return {name: z[name] for name in z.files}
    except Exception as e:
        raise ConfigError(f"--init {path}: not a readable mpnn weights file ({e})") from None


# ------------------------------------------------------------ the training step


# ------------------------------------------------------------------ helpers


def make_engine(args, grid, model, tracer=NULL_TRACER):
    """A data-parallel replica of the whole model, or this rank's pipeline stage."""
    if grid is None or grid.pp == 1:
        return DataParallelEngine(model, args.loss, grid.dp_comm if grid is not None else None,
                                  args.bucket_mb, tracer)
    stages = partition_layers(model.sizes, grid.pp, args.partition)
    return PipelineEngine(model, args.loss, grid, args.schedule, args.micro_batches, stages,
                          tracer)


def _sum_over(comm, values):
    """Element-wise float64 sum of ``values`` over ``comm`` (serial: unchanged)."""
    buf = np.asarray(values, dtype=np.float64)
    if comm is None or comm.Get_size() == 1:
        return buf
    from mpi4py import MPI

    out = np.empty_like(buf)
    comm.Allreduce(buf, out, op=MPI.SUM)
    return out


def lr_at(args, base_lr, step, total_steps):
    if args.lr_schedule == "constant":
        return base_lr
    return base_lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))


# --------------------------------------------------------------------- run


def load_data(args, comm, dtype):
    """Rank 0 loads (and downloads if needed) first; the others then read the
    files it found or fetched, so a shared cache is downloaded into once. A
    rank that does not see rank 0's files (a node with its own home
    directory) downloads them itself: downloads are atomic, so ranks of one
    node fetching the same file at once still leave one whole file."""
    rank = comm.Get_rank() if comm is not None else 0
    load = lambda download: load_dataset(args.dataset, data_dir=args.data_dir, dtype=dtype,  # noqa: E731
                                         download=download, progress=not args.quiet and rank == 0)
    if comm is None or comm.Get_size() == 1:
        return load(True)
    data, error = None, None
    if rank == 0:
        try:
            data = load(True)
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
    return data if rank == 0 else load(True)


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


def setup(args, comm, validated=False):
    """Grid, threads, data, model: everything before training (validates first
    unless the caller already did, as ``main`` does on every rank)."""
    world = comm.Get_size() if comm is not None else 1
    if not validated:
        validate(args, world)
    try:
        grid = make_grid(comm, dp=args.dp, pp=args.pp) if comm is not None else None
    except GridError as e:
        raise ConfigError(str(e)) from None
    threads, warning = configure_threads(comm, args.threads)
    dtype = np.dtype(args.dtype)
    data = load_data(args, comm, dtype)
    ops = get_ops(resolve_backend(args))
    sizes = [data.n_features, *args.hidden, data.num_classes]
    layers = None  # a pipeline stage holds only its layers (same initial values as serial)
    if grid is not None and grid.pp > 1:
        layers = partition_layers(sizes, grid.pp, args.partition)[grid.pp_rank]
    model = MLP(sizes, args.activation, dtype, args.seed, layers=layers, ops=ops)
    if args.init:
        model.load_state_dict(load_weights(args.init), source=f"--init {args.init}")
    warm_up(model, args, data)
    return grid, data, model, threads, warning


def warm_up(model, args, data):
    """Compile (or load from numba's cache) every kernel the run will call, so
    the first epoch's time and samples/s measure training, not compilation.

    One step of a throwaway 3-layer model with the run's ops, dtype,
    activation, loss and optimizer: the same kernels on arrays of the same
    types. Rank-local, and the run's own model and data are not touched."""
    from .nn.model import Context

    ops = model.ops
    tiny = MLP([data.n_features, 2, 2, data.num_classes], args.activation, model.dtype, 0, ops=ops)
    x = ops.to_device(data.x_train[:2])  # (2, I), as the trainer's gathered rows
    y = ops.to_device(data.y_train[:2])
    ctx = Context()
    logits = tiny.forward(x, ctx)  # (2, C)
    dlogits = ops.xp.empty_like(logits)
    ops.loss(args.loss, logits, y, 0.5, dlogits)
    tiny.backward(dlogits, ctx, need_input_grad=True)
    ops.predict_stats(tiny.forward(x, ctx), y, args.loss)
    make_optimizer(args.optimizer, tiny.flat, ops, 1e-3, args.momentum, args.nesterov,
                   args.weight_decay).step(1e-3)
    ops.synchronize()


def train(args, comm=None, grid=None, data=None, model=None, log=print, resume=None):
    """Train and return the per-epoch metrics (rank 0's view, identical on all ranks).

    resume: a ``checkpoint.Resume`` from ``load_resume`` (which loaded the
    weights): continue at its step, epoch and batch with its optimizer state.
    """
    dp_comm = grid.dp_comm if grid is not None else None
    dp, dp_rank = (grid.dp, grid.dp_rank) if grid is not None else (1, 0)
    rank = comm.Get_rank() if comm is not None else 0
    ops = model.ops
    tracer = make_tracer(args.trace)
    engine = make_engine(args, grid, model, tracer)
    check_replicas_agree(dp_comm, model.flat)
    base_lr = default_lr(args)
    opt = make_optimizer(args.optimizer, model.flat, ops, base_lr, args.momentum,
                         args.nesterov, args.weight_decay)
    ckpt = Checkpointer(args, model.sizes, comm, grid)
    first_epoch, first_batch, step, carried_loss = 1, 0, 0, 0.0
    if resume is not None:  # same position, optimizer state and lr step as the saved run
        resume.restore_optimizer(opt, model)
        first_epoch, first_batch, step = resume.epoch, resume.batch, resume.step
        carried_loss = resume.epoch_loss_sum if rank == 0 else 0.0  # the job's sum so far
        ckpt.last_saved = resume.path

    n = data.x_train.shape[0]
    bounds = batch_bounds(n, args.batch_size)
    total_steps = args.epochs * len(bounds)
    t_lo, t_hi = share_bounds(data.x_test.shape[0], dp_rank, dp)
    # later pipeline stages receive activations instead of the features
    x_test = ops.to_device(data.x_test[t_lo:t_hi]) if engine.needs_inputs else None
    y_test = ops.to_device(data.y_test[t_lo:t_hi])
    show_bar = rank == 0 and not args.quiet
    if args.metrics and rank == 0:  # one run's lines per file (a resumed run keeps its past epochs)
        keep_metrics(args.metrics, first_epoch - 1)
    history = []
    tracer.start(comm)
    for epoch in range(first_epoch, args.epochs + 1):
        order = epoch_permutation(n, args.seed, epoch)
        t0 = time.perf_counter()
        skip = first_batch if epoch == first_epoch else 0  # batches a resumed epoch already did
        loss_sum = carried_loss if epoch == first_epoch else 0.0
        batches = _progress(bounds[skip:], show_bar, f"epoch {epoch}/{args.epochs}")
        for batch, (start, stop) in enumerate(batches, skip + 1):
            lo, hi = share_bounds(stop - start, dp_rank, dp)
            rows = order[start + lo:start + hi]
            x = ops.to_device(data.x_train[rows]) if engine.needs_inputs else None  # (b, I)
            y = ops.to_device(data.y_train[rows])  # (b,)
            loss = engine.train_step(x, y, 1.0 / (stop - start))
            loss_sum += loss
            with tracer.span("optimizer", step=step + 1):
                opt.step(lr_at(args, base_lr, step, total_steps))
            step += 1
            # NaN/inf stops the run here, before any checkpoint can hold it
            check_finite(model, loss, step, epoch, batch, rank, ckpt.last_saved,
                         engine.ctx.outputs if isinstance(engine, DataParallelEngine) else None)
            if ckpt.due_after_step(step) and batch < len(bounds):  # the epoch's end saves below
                with tracer.span("checkpoint", step=step):
                    check_replicas_agree(dp_comm, model.flat, f"at step {step}")
                    ckpt.save(model, opt, step, epoch, batch, loss_sum)
        ops.synchronize()
        epoch_time = time.perf_counter() - t0
        trained = n - bounds[skip][0] if skip < len(bounds) else 0  # rows this run trained
        with tracer.span("evaluate"):
            test_loss, correct = engine.evaluate(x_test, y_test)
        # summed over all ranks: in a pipeline only the last stages hold nonzero counts
        totals = _sum_over(comm, [loss_sum, test_loss, correct])
        record = {
            "epoch": epoch,
            "train_loss": totals[0] / n,
            "test_loss": totals[1] / data.x_test.shape[0],
            "test_accuracy": totals[2] / data.x_test.shape[0],
            "epoch_time_s": epoch_time,
            "samples_per_s": trained / epoch_time,
            "lr": lr_at(args, base_lr, step, total_steps),
            "ranks": comm.Get_size() if comm is not None else 1,
        }
        if isinstance(engine, PipelineEngine):  # collective: every stage's busy/idle seconds
            record.update(engine.stage_times(grid.world))
        history.append(record)
        if rank == 0:
            if args.metrics:
                with open(args.metrics, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if not args.quiet:
                log(f"epoch {epoch:3d}  train_loss {record['train_loss']:.4f}  "
                    f"test_loss {record['test_loss']:.4f}  "
                    f"test_acc {record['test_accuracy']:.4f}  "
                    f"{record['samples_per_s']:,.0f} samples/s  ({epoch_time:.2f} s)")
                if "bubble" in record:
                    log("          stage busy/idle s: " + "  ".join(
                        f"{b:.2f}/{i:.2f}" for b, i in zip(record["stage_busy_s"],
                                                           record["stage_idle_s"]))
                        + f"  bubble {record['bubble']:.3f}")
        check_replicas_agree(dp_comm, model.flat, f"after epoch {epoch}")  # periodic check
        if ckpt.due_after_epoch(epoch) or ckpt.due_after_step(step) or \
                (ckpt.enabled and epoch == args.epochs):  # the next epoch starts at batch 0
            with tracer.span("checkpoint", step=step):
                path = ckpt.save(model, opt, step, epoch + 1, 0, 0.0)
            if path and not args.quiet:
                log(f"checkpoint {path}")
    state = engine.state_dict() if args.save else None  # a pipeline gathers it to rank 0
    if args.save and rank == 0:
        save_weights(args.save, state)
        if not args.quiet:
            log(f"saved weights to {args.save}")
    if tracer.enabled:  # collective: every rank's spans to rank 0
        pp = grid.pp if grid is not None else 1
        tracer.write(args.trace, comm, label=lambda r: f"rank {r} (dp {r // pp}, stage {r % pp})")
        if rank == 0 and not args.quiet:
            log(f"wrote timeline {args.trace} (open in https://ui.perfetto.dev)")
    if args.plot and rank == 0:
        from .plot import plot_metrics, read_metrics

        records = read_metrics(args.metrics) if args.metrics else history
        if records:  # (a run resumed after its last epoch trained nothing)
            plot_metrics(records, args.plot)
            if not args.quiet:
                log(f"wrote curves {args.plot}")
    return history


def _progress(items, enabled, desc):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False, mininterval=0.5, file=sys.stderr)


def _world():
    """COMM_WORLD, or None when mpi4py is missing (serial run)."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def _on_every_rank(comm, rank, step):
    """Run ``step()`` on every rank and agree on the outcome before going on.

    Returns (None, result) when it succeeded everywhere. Otherwise rank 0
    prints each distinct message once (naming the ranks when not all failed)
    and every rank gets (exit status, None): the job ends together instead of
    some ranks waiting in a collective the failed ones never reach.
    """
    error, result = None, None
    try:
        result = step()
    except SystemExit as e:  # argparse already printed usage and the problem
        error = e.code or 0
    except Exception as e:  # noqa: BLE001 - reported to the user, then exit
        error = f"{type(e).__name__}: {e}" if not isinstance(e, (ValueError, OSError)) else str(e)
    errors = comm.allgather(error) if comm is not None and comm.Get_size() > 1 else [error]
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return None, result
    codes = [e for _, e in failed if isinstance(e, int)]
    if len(codes) == len(failed):
        return max(codes), None
    if rank == 0:
        messages = {}
        for r, e in failed:
            if not isinstance(e, int):
                messages.setdefault(e, []).append(r)
        for message, ranks in messages.items():
            where = "" if len(failed) == len(errors) else f" (rank {', '.join(map(str, ranks))})"
            print(f"mpnn.train: error{where}: {message}", file=sys.stderr, flush=True)
    return 2, None


def main(argv=None):
    """``python -m mpnn.train``: returns the exit status (0, 1 training failed,
    2 bad options or files, 130 interrupted)."""
    comm = _world()
    try:
        return _main(comm, argv)
    except KeyboardInterrupt:  # Ctrl-C: mpirun passes it to every rank
        rank = comm.Get_rank() if comm is not None else 0
        print(f"mpnn.train: interrupted on rank {rank}; ending the job (checkpoints already "
              f"written stay)", file=sys.stderr, flush=True)
        if comm is not None and comm.Get_size() > 1:
            comm.Abort(130)  # a rank waiting in a collective would never hear of it
        return 130


def _main(comm, argv):
    rank = comm.Get_rank() if comm is not None else 0
    world = comm.Get_size() if comm is not None else 1
    parser = build_parser()

    def parse_and_validate():  # local checks only: no collective can be reached yet
        with contextlib.redirect_stderr(sys.stderr if rank == 0 else io.StringIO()):
            args = parser.parse_args(argv)  # usage errors are printed by rank 0 only
        validate(args, world)
        return args

    def build():  # grid, data, model, resume file: collectives from here on
        state = setup(args, comm, validated=True)
        return state, load_resume(args, state[2])  # every rank checks the file, loads its layers

    # Phase 1: everything before training, in two agreed steps, so every rank
    # exits together with one message and status 2 when anything is wrong.
    status, args = _on_every_rank(comm, rank, parse_and_validate)
    if status is not None:
        return status
    status, built = _on_every_rank(comm, rank, build)
    if status is not None:
        return status
    state, resume = built
    grid, data, model, threads, warning = state
    if rank == 0 and not args.quiet:
        if warning:
            print(warning, file=sys.stderr)
        world = comm.Get_size() if comm is not None else 1
        print(f"mpnn: {args.dataset} ({data.x_train.shape[0]} train / {data.x_test.shape[0]} test), "
              f"MLP {'-'.join(map(str, model.sizes))} {args.activation}, {args.optimizer} "
              f"lr {default_lr(args)}, batch {args.batch_size}, {world} rank(s) x "
              f"{threads} thread(s), {model.ops.name} backend, {args.dtype}", flush=True)
        if grid is not None and grid.pp > 1:
            stages = partition_layers(model.sizes, grid.pp, args.partition)
            print(f"mpnn: pipeline dp {grid.dp} x pp {grid.pp}, {args.schedule} schedule, "
                  f"{args.micro_batches} micro-batch(es), layers per stage "
                  f"{format_partition(stages)}", flush=True)
    if rank == 0 and args.resume:
        if resume is None:
            print(f"mpnn: no checkpoint in {args.checkpoint_dir} yet: starting at step 0",
                  file=sys.stderr, flush=True)
        else:
            if not args.quiet:
                print(f"mpnn: resuming from {resume.path} (step {resume.step}, epoch "
                      f"{resume.epoch}, {resume.batch} batch(es) done in it)", flush=True)
            if resume.warnings:
                print(f"mpnn: warning: resuming with settings that differ from the checkpoint's "
                      f"({'; '.join(resume.warnings)}): the run will not repeat the "
                      f"uninterrupted one exactly", file=sys.stderr, flush=True)
    # Phase 2: training. An exception on any rank aborts the whole job.
    try:
        train(args, comm, grid, data, model, resume=resume)
    except Exception as e:  # noqa: BLE001
        print(f"mpnn.train: error on rank {rank}: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)
        if comm is not None and comm.Get_size() > 1:
            comm.Abort(1)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
