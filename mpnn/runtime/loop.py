"""The training loop over the Engine interface (``mpnn.parallel.engine``).

    train_batch   one optimizer step: gather this rank's rows of a global
                  batch, the engine's step, the optimizer's (what ``mpnn.train``
                  runs each step and ``mpnn.bench`` times)
    train         the epochs of a run built by ``runtime.setup``: batches in the
                  seed's order, guards, checkpoints, evaluation, metrics, the
                  saved weights, the timeline and the curves

The loop knows no parallel mode: the engine says whether it reads features
(``needs_inputs``), returns its share of the loss, and adds its own per-epoch
figures (``epoch_metrics``). Data-parallel rank r of a grid with ``dp``
replicas takes its contiguous share of every global batch; every sum over
ranks is in float64 over the whole job.

See docs/parallelism.md#1-the-global-batch-is-the-unit.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from ..data.batching import batch_bounds, epoch_permutation, share_bounds
from ..nn.optim import learning_rate, make_optimizer
from . import watchdog as wd
from .checkpoint import Checkpointer
from .files import keep_metrics
from .guards import check_finite, check_replicas_agree
from .trace import NULL_TRACER
from .weights import save_weights


def train_batch(engine, optimizer, ops, data, rows, global_batch, lr, tracer=NULL_TRACER, step=0):
    """Train on this rank's ``rows`` (indices into ``data.x_train``) of a global
    batch of ``global_batch`` rows; returns this rank's loss sum.

    The rows are gathered (and moved to the device) only where the engine
    reads features; every rank gets its labels. The gradient is scaled by
    ``1/global_batch`` here, once; the optimizer then steps with ``lr``.
    """
    x = ops.to_device(data.train_features(rows)) if engine.needs_inputs else None  # (b, I)
    labels = ops.to_device(data.y_train[rows])  # (b,)
    loss = engine.train_step(x, labels, 1.0 / global_batch)
    with tracer.span("optimizer", step=step + 1):
        optimizer.step(lr)
    return loss


def rank_label(r, pp, tp=1):
    """World rank r's place in a dp x pp x tp grid (``parallel.grid``), for the timeline."""
    where = f"dp {r // (pp * tp)}, stage {(r // tp) % pp}"
    return f"rank {r} ({where}" + (f", tp {r % tp})" if tp > 1 else ")")


LEDGER = ("params", "grads", "optimizer", "comm", "activations")


def model_state_formula(engine, model, opt):
    """The ZeRO paper's bytes of this rank's parameters, gradients and optimizer state
    (``parallel.zero.zero_formula``; stage 0 under plain data parallelism)."""
    from ..parallel.zero import zero_formula

    n_states = len(opt.state())
    if engine.zero is not None:
        return engine.zero.formula(n_states)
    return zero_formula(0, model.layout.numel, 1, model.dtype.itemsize, n_states)


def memory_record(world, memory, opt, tp_measured, tp_formula, steps, formula=None):
    """Per-rank bytes (world rank order): parameters, gradients, optimizer state,
    communication buffers and activations allocated (``engine.memory()`` and the
    optimizer's arrays), the model states' formula (``model_state_formula``), and under
    tensor parallelism the bytes the tp Allreduces summed per training step, measured
    and by ``tp_bytes_formula``. Collective over ``world``."""
    optim = sum(int(a.nbytes) for a in opt.state().values())
    f = formula or {}
    mine = np.array([memory["params"], memory["grads"], optim, memory.get("comm", 0),
                     memory["activations"], tp_measured / max(1, steps),
                     tp_formula / max(1, steps), f.get("params", 0), f.get("grads", 0),
                     f.get("optimizer", 0)], np.float64)
    every = np.empty((world.Get_size(), mine.size), np.float64)
    world.Allgather(mine, every)
    record = {"rank_bytes": {k: [int(v) for v in every[:, j]] for j, k in enumerate(LEDGER)}}
    if formula is not None:
        record["rank_bytes_formula"] = {k: [round(float(v)) for v in every[:, 7 + j]]
                                        for j, k in enumerate(("params", "grads", "optimizer"))}
    if every[:, 6].any():
        record["tp_allreduce_bytes_per_step"] = [round(float(v)) for v in every[:, 5]]
        record["tp_allreduce_bytes_per_step_formula"] = [round(float(v)) for v in every[:, 6]]
    return record


def check_replicas(engine, grid, model, when=None):
    """The replica-divergence check (``guards.check_replicas_agree``), or ZeRO's."""
    if engine.zero is not None:
        engine.zero.check_agree(when)
    else:
        check_replicas_agree(grid.dp_comm, model.flat, when)


def build_optimizer(engine, model, o):
    """The run's optimizer (``OptimConfig`` o) over the model's flat buffers, or over
    this rank's shard of them under ZeRO (``parallel.zero.ZeroOptimizer``)."""
    zero = engine.zero
    flat = model.flat if zero is None else zero.shard_flat
    opt = make_optimizer(o.optimizer, flat, model.ops, o.base_lr, o.momentum, o.nesterov,
                         o.weight_decay)
    if zero is None:
        return opt
    from ..parallel.zero import ZeroOptimizer

    return ZeroOptimizer(zero, opt)


TEST_MISMATCH = "MPNN_TEST_MISMATCH_RANK"  # test-only: this rank's metrics sum is longer


def sum_over(comm, values, what="metrics sum"):
    """Element-wise float64 sum of ``values`` over every rank of ``comm``."""
    from mpi4py import MPI

    buf = np.asarray(values, dtype=np.float64)
    if os.environ.get(TEST_MISMATCH) == str(MPI.COMM_WORLD.Get_rank()):
        buf = np.append(buf, 0.0)  # a deliberately mismatched collective (tests only)
    out = np.empty_like(buf)
    with wd.watch.op(what, comm=comm, check=("Allreduce", buf.size, "float64")):
        comm.Allreduce(buf, out, op=MPI.SUM)
    return out


def make_watch(run):
    """The run's watchdog (``runtime.watchdog.Watch``), or None with ``--timeout 0``."""
    par = run.config.parallel
    if par.timeout == 0:
        return None
    return wd.Watch(run.grid.world, par.timeout, par.check_collectives,
                    out_dir=run.config.checkpoint.directory)


def train(run, log=print):
    """Train the run built by ``runtime.setup.setup`` and return the per-epoch
    metrics (rank 0's view, identical on all ranks). A resumed run (``run.resume``)
    continues at its step, epoch and batch with its optimizer state. Every wait on
    MPI is watched (``runtime.watchdog``, ``--timeout``) unless the timeout is 0."""
    watch = make_watch(run)
    if watch is None:
        return _train(run, log, wd.NullWatch())
    previous = wd.install(watch)
    watch.start()
    try:
        history = _train(run, log, watch)
    except BaseException:
        watch.halt()  # the failure ends the job (or the sweep's trial) its own way
        raise
    finally:
        wd.install(previous)
    watch.stop()
    return history


def _train(run, log, watch):
    if run.config.parallel.servers:  # parameter servers: epochs of their own
        from .ps_loop import train as train_ps

        return train_ps(run, log, watch)
    config, grid, data, model, engine, tracer = (run.config, run.grid, run.data, run.model,
                                                 run.engine, run.tracer)
    o, out = config.optim, config.output
    world, rank = grid.world, grid.world.Get_rank()
    ops = model.ops
    with watch.op("start-up replica check"):
        check_replicas(engine, grid, model)
    base_lr = o.base_lr
    opt = build_optimizer(engine, model, o)
    formula = model_state_formula(engine, model, opt)
    ckpt = Checkpointer(config, model.sizes, grid)
    first_epoch, first_batch, step, carried_loss = 1, 0, 0, 0.0
    resume = run.resume
    if resume is not None:  # same position, optimizer state and lr step as the saved run
        resume.restore_optimizer(opt, model)
        resume.release()
        first_epoch, first_batch, step = resume.epoch, resume.batch, resume.step
        carried_loss = resume.epoch_loss_sum if rank == 0 else 0.0  # the job's sum so far
        ckpt.last_saved = resume.path

    n, n_test = data.x_train.shape[0], data.x_test.shape[0]
    bounds = batch_bounds(n, config.batch_size)
    total_steps = config.epochs * len(bounds)

    def lr_at(s):
        return learning_rate(o.lr_schedule, base_lr, s, total_steps)

    t_lo, t_hi = share_bounds(n_test, grid.dp_rank, grid.dp)
    y_test = ops.to_device(np.array(data.y_test[t_lo:t_hi]))  # (a copy: the data is read-only)
    show_bar = rank == 0 and not out.quiet
    # NaN/inf guard: ZeRO ranks each hold a slice of the parameters and gradients, so
    # the whole job agrees; otherwise the ranks of one forward pass
    guard_flat = model.flat if engine.zero is None else engine.zero.shard_flat
    guard_comm = (grid.mp_comm or grid.pp_comm) if engine.zero is None else world
    if out.metrics and rank == 0:  # one run's lines per file (a resumed run keeps its past epochs)
        keep_metrics(out.metrics, first_epoch - 1)
    history = []
    # a checkpoint's waits: the timeout and the time to write its bytes (the whole model:
    # this rank's stage times the stages, with the optimizer's state)
    ckpt_bytes = model.layout.numel * model.dtype.itemsize * (1 + len(opt.state())) * grid.pp

    def ckpt_limit():
        return watch.timeout() + ckpt_bytes / wd.WRITE_BYTES_S if watch.enabled else None

    def saved_everywhere():  # the others wait for rank 0's write here, under ckpt_limit
        if watch.enabled and world.Get_size() > 1:
            world.Barrier()
    if model.tp > 1 or engine.zero is not None:  # the memory ledger at start-up
        with watch.op("memory ledger gather"):
            start = memory_record(world, engine.memory(), opt, 0, 0, 1, formula)
        if rank == 0 and not out.quiet:
            _log_ledger(start, engine.zero, log)
    with watch.op("timeline's start barrier"):
        tracer.start(world)
    for epoch in range(first_epoch, config.epochs + 1):
        order = epoch_permutation(n, config.seed, epoch)
        t0 = time.perf_counter()
        skip = first_batch if epoch == first_epoch else 0  # batches a resumed epoch already did
        loss_sum = carried_loss if epoch == first_epoch else 0.0
        batches = _progress(bounds[skip:], show_bar, f"epoch {epoch}/{config.epochs}")
        tp_formula, steps_run = 0, 0  # bytes the tp Allreduces should sum, by the formula
        model.take_tp_bytes()
        for batch, (start, stop) in enumerate(batches, skip + 1):
            lo, hi = share_bounds(stop - start, grid.dp_rank, grid.dp)
            rows = order[start + lo:start + hi]
            tp_formula += model.tp_bytes_formula(len(rows))
            steps_run += 1
            watch.step = step + 1
            t_step = time.perf_counter()
            loss = train_batch(engine, opt, ops, data, rows, stop - start, lr_at(step), tracer,
                               step)
            loss_sum += loss
            step += 1
            # NaN/inf stops the run here, before any checkpoint can hold it
            # (agreed over the ranks of one forward pass: a pipeline's stages and shards)
            with watch.op("non-finite check"):
                check_finite(model, loss, step, epoch, batch, rank, ckpt.last_saved,
                             engine.activations, guard_comm, guard_flat)
            watch.step_time(time.perf_counter() - t_step)
            if ckpt.due_after_step(step) and batch < len(bounds):  # the epoch's end saves below
                with tracer.span("checkpoint", step=step), \
                        watch.op("checkpoint", limit=ckpt_limit()):
                    check_replicas(engine, grid, model, f"at step {step}")
                    ckpt.save(model, opt, step, epoch, batch, loss_sum)
                    saved_everywhere()
        ops.synchronize()
        epoch_time = time.perf_counter() - t0
        tp_measured = model.take_tp_bytes()  # before the evaluation's forward passes add theirs
        trained = n - bounds[skip][0] if skip < len(bounds) else 0  # rows this run trained
        # (the evaluation computes too: its limit adds the time of its forward passes, about
        # a third of a step's work per global batch of test rows)
        eval_limit = watch.timeout() + n_test / config.batch_size * (watch.slowest_step or 0) \
            if watch.enabled else None
        with tracer.span("evaluate"), \
                watch.op("evaluation", ("epoch {}", epoch), limit=eval_limit):
            # (later pipeline stages receive activations instead)
            x_test = ops.to_device(data.test_features(t_lo, t_hi)) if engine.needs_inputs \
                else None  # this rank's test rows, (t, I): made for the evaluation, then freed
            test_loss, correct = engine.evaluate(x_test, y_test)
            del x_test
        # summed over all ranks: in a pipeline only the last stages hold nonzero counts
        totals = sum_over(world, [loss_sum, test_loss, correct])
        record = {
            "epoch": epoch,
            "train_loss": totals[0] / n,
            "test_loss": totals[1] / n_test,
            "test_accuracy": totals[2] / n_test,
            "epoch_time_s": epoch_time,
            "samples_per_s": trained / epoch_time,
            "lr": lr_at(step),
            "ranks": world.Get_size(),
        }
        with watch.op("epoch metrics gather", ("epoch {}", epoch)):
            record.update(engine.epoch_metrics())  # collective (a pipeline's stage times)
            record.update(memory_record(world, engine.memory(), opt, tp_measured, tp_formula,
                                        steps_run, formula))  # collective
        history.append(record)
        if rank == 0:
            _report(record, out, log)
        with watch.op("replica check", ("epoch {}", epoch)):
            check_replicas(engine, grid, model, f"after epoch {epoch}")  # periodic check
        if ckpt.due_after_epoch(epoch) or ckpt.due_after_step(step) or \
                (ckpt.enabled and epoch == config.epochs):  # the next epoch starts at batch 0
            with tracer.span("checkpoint", step=step), \
                    watch.op("checkpoint", limit=ckpt_limit()):
                path = ckpt.save(model, opt, step, epoch + 1, 0, 0.0)
                saved_everywhere()
            if path and not out.quiet:
                log(f"checkpoint {path}")
    _finish(run, history, log, watch, ckpt_limit() if watch.enabled else None)
    return history


def _log_ledger(record, zero, log):
    """Rank 0 at start-up: each rank's model-state bytes, and ZeRO's formula."""
    measured, formula = record["rank_bytes"], record["rank_bytes_formula"]

    def mb(values):
        return "/".join(f"{v / 1e6:.3g}" for v in values)

    kinds = ("params", "grads", "optimizer", "comm")
    log("memory per rank, MB (world rank order): " + "; ".join(
        f"{k} {mb(measured[k])}" for k in kinds))
    if zero is not None:
        log(f"  ZeRO-{zero.stage} formula: " + "; ".join(
            f"{k} {mb(formula[k])}" for k in kinds[:3]))


def _report(record, out, log):
    """Rank 0: the epoch's metrics line (file) and progress line (terminal)."""
    if out.metrics:
        with open(out.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
    if out.quiet:
        return
    log(f"epoch {record['epoch']:3d}  train_loss {record['train_loss']:.4f}  "
        f"test_loss {record['test_loss']:.4f}  "
        f"test_acc {record['test_accuracy']:.4f}  "
        f"{record['samples_per_s']:,.0f} samples/s  ({record['epoch_time_s']:.2f} s)")
    if "bubble" in record:
        log("          stage busy/idle s: " + "  ".join(
            f"{b:.2f}/{i:.2f}" for b, i in zip(record["stage_busy_s"], record["stage_idle_s"],
                                              strict=True))
            + f"  bubble {record['bubble']:.3f}")


def _finish(run, history, log, watch, limit=None, label=None):
    """After the last epoch: the weights (gathered), the timeline (``label(r)``: world
    rank r's name there) and the flight record, the curves."""
    out, grid, tracer = run.config.output, run.grid, run.tracer
    rank = grid.world.Get_rank()
    with watch.op("weights gather", limit=limit):
        state = run.engine.state_dict() if out.save else None  # a pipeline gathers it
    if out.save and rank == 0:
        save_weights(out.save, state)
        if not out.quiet:
            log(f"saved weights to {out.save}")
    if tracer.enabled:  # collective: every rank's spans to rank 0
        with watch.op("timeline gather", limit=limit):
            tracer.write(out.trace, grid.world,
                         label=label or (lambda r: rank_label(r, grid.pp, grid.tp)))
        if watch.enabled:  # beside the timeline: this rank's last communication events
            watch.write_flight(f"{out.trace}.flight-rank{rank}.json")
        if rank == 0 and not out.quiet:
            log(f"wrote timeline {out.trace} (open in https://ui.perfetto.dev)")
    if out.plot and rank == 0:
        from .plots import plot_metrics, read_metrics

        records = read_metrics(out.metrics) if out.metrics else history
        if records:  # (a run resumed after its last epoch trained nothing)
            plot_metrics(records, out.plot)
            if not out.quiet:
                log(f"wrote curves {out.plot}")


def _progress(items, enabled, desc):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False, mininterval=0.5, file=sys.stderr)
