"""The epochs of a parameter-server run (``--servers K``, ``parallel.param_server``).

Within an epoch the servers answer pulls and apply pushes and the workers train,
each at its own pace under ssp and asp. An epoch ends when every batch of it has
been pushed and applied; then every rank gathers the servers' parameters, and
the end of the epoch is the synchronous loop's: evaluation over every rank's test
rows, the metrics line (with the staleness histogram and the time workers were
blocked), the checkpoint (the servers' shards and optimizer state, whole, written
by server 0), and after the last epoch the weights, timeline and curves.

A checkpoint is topology-free: it resumes under another number of servers or
workers, another --sync, or as a synchronous run, and a synchronous run's
checkpoint resumes here (at its batch within the epoch).
"""

from __future__ import annotations

import time

import numpy as np

from ..data.batching import batch_bounds, epoch_permutation, share_bounds
from ..nn.optim import learning_rate, make_optimizer
from ..parallel.param_server import ServerOptimizer
from . import watchdog as wd
from .checkpoint import Checkpointer
from .files import keep_metrics
from .guards import check_finite, check_replicas_agree


def train(run, log, watch):
    """Train the parameter-server run built by ``runtime.setup.setup``; returns the
    per-epoch metrics (rank 0's view). Called by ``runtime.loop.train``."""
    from .loop import _finish, _report, sum_over

    config, grid, data, model, engine, tracer = (run.config, run.grid, run.data, run.model,
                                                 run.engine, run.tracer)
    o, out = config.optim, config.output
    world, rank, roles = grid.world, grid.world.Get_rank(), engine.roles
    opt = ServerOptimizer(engine, make_optimizer(o.optimizer, engine.shard_flat, model.ops,
                                                o.base_lr, o.momentum, o.nesterov,
                                                o.weight_decay))
    engine.attach(opt)
    with watch.op("start-up replica check"):  # every rank drew the same initial model
        check_replicas_agree(world, model.flat)
    ckpt = Checkpointer(config, model.sizes, grid)
    first_epoch, first_batch, step, carried_loss = 1, 0, 0, 0.0
    resume = run.resume
    if resume is not None:
        resume.restore_optimizer(opt, model)
        resume.release()
        first_epoch, first_batch, step = resume.epoch, resume.batch, resume.step
        carried_loss = resume.epoch_loss_sum if rank == 0 else 0.0
        ckpt.last_saved = resume.path
    engine.version_base = step  # (--rma: its windows count updates from here)
    n, n_test = data.x_train.shape[0], data.x_test.shape[0]
    bounds = batch_bounds(n, config.batch_size)
    total_steps = config.epochs * len(bounds)

    def lr_at(s):
        return learning_rate(o.lr_schedule, o.base_lr, s, total_steps)

    def check(loss, s, batch):  # a worker's guard: its loss, gradient and pulled parameters
        check_finite(model, loss, s, epoch, batch, rank, ckpt.last_saved,
                     engine.activations)

    # the waits on a checkpoint and an evaluation: the timeout and the time to write the
    # whole model and optimizer state, or to run the forward passes (as runtime.loop)
    ckpt_bytes = model.layout.numel * model.dtype.itemsize * (1 + len(opt.state()))

    def ckpt_limit():
        return watch.timeout() + ckpt_bytes / wd.WRITE_BYTES_S if watch.enabled else None

    t_lo, t_hi = share_bounds(n_test, rank, world.Get_size())  # every rank evaluates
    y_test = np.array(data.y_test[t_lo:t_hi])
    if out.metrics and rank == 0:
        keep_metrics(out.metrics, first_epoch - 1)
    history = []
    with watch.op("timeline's start barrier"):
        tracer.start(world)
    for epoch in range(first_epoch, config.epochs + 1):
        skip = first_batch if epoch == first_epoch else 0
        loss_sum = carried_loss if epoch == first_epoch else 0.0
        t0 = time.perf_counter()
        if engine.rma:  # one-sided: the servers wait while the workers pull and push
            if roles.rank == 0:
                engine.onesided.set_tickets(skip)
            world.Barrier()  # the tickets are set before anyone takes one
            if roles.is_server:
                engine.epoch_barrier()
                engine.settle(step + len(bounds) - skip, epoch, len(bounds))
            else:
                order = epoch_permutation(n, config.seed, epoch)
                loss_sum += engine.worker.work_rma(data, order, bounds, step, lr_at, check,
                                                   watch.step_time)
        elif roles.is_server:
            bar = _bar(rank == 0 and not out.quiet, len(bounds) - skip,
                       f"epoch {epoch}/{config.epochs}")
            engine.server.serve(skip, len(bounds), step, lr_at, bar.update if bar else None,
                                epoch)
            if bar:
                bar.close()
        else:
            order = epoch_permutation(n, config.seed, epoch)
            loss_sum += engine.worker.work(data, order, bounds, skip, step, check,
                                           watch.step_time)
        step += len(bounds) - skip  # one update per global batch, in every mode
        epoch_time = time.perf_counter() - t0
        trained = n - bounds[skip][0] if skip < len(bounds) else 0
        engine.gather_params()  # every rank: the servers' model after the epoch
        eval_limit = watch.timeout() + n_test / config.batch_size * (watch.slowest_step or 0) \
            if watch.enabled else None
        with tracer.span("evaluate"), \
                watch.op("evaluation", ("epoch {}", epoch), limit=eval_limit):
            test_loss, correct = engine.evaluate(data.test_features(t_lo, t_hi), y_test)
        totals = sum_over(world, [loss_sum, test_loss, correct])
        record = {"epoch": epoch, "train_loss": totals[0] / n, "test_loss": totals[1] / n_test,
                  "test_accuracy": totals[2] / n_test, "epoch_time_s": epoch_time,
                  "samples_per_s": trained / epoch_time, "lr": lr_at(step),
                  "ranks": world.Get_size()}
        with watch.op("epoch metrics gather", ("epoch {}", epoch)):
            record.update(engine.epoch_metrics())
        history.append(record)
        if rank == 0:
            _report(record, out, log)
            if not out.quiet:
                _log_consistency(record, log)
        if ckpt.due_after_epoch(epoch) or (ckpt.enabled and epoch == config.epochs):
            with tracer.span("checkpoint", step=step), \
                    watch.op("checkpoint", limit=ckpt_limit()):
                path = ckpt.save(model, opt, step, epoch + 1, 0, 0.0)
                if watch.enabled:
                    world.Barrier()  # the others wait for server 0's write here
            if path and not out.quiet:
                log(f"checkpoint {path}")
    _finish(run, history, log, watch, ckpt_limit(), label=roles.label)
    return history


def _log_consistency(record, log):
    """Rank 0: the epoch's staleness and the workers' waits, under its metrics line."""
    blocked = record["worker_blocked_s"]
    log(f"          staleness mean {record['staleness_mean']:.2f} max "
        f"{record['staleness_max']}  pushes per worker {record['worker_pushes']}  "
        f"blocked s {'/'.join(f'{b:.2f}' for b in blocked)}")


def _bar(enabled, total, desc):
    if not enabled:
        return None
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, mininterval=0.5, file=sys.stderr)

