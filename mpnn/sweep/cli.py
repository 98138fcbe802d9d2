"""``mpirun -n N python -m mpnn.sweep SPEC.toml --out DIR --group-size G``.

Every rank reads and checks the spec before any trial (``prepare``: an
unknown option or value, an empty grid, a group size that does not divide
the world or does not fit a trial's own dp x pp x tp, an unusable --out or
--plot: one message, status 2). Then the world is split into N/G groups
(``Comm.Split``), world rank 0 coordinates from a thread (``coordinate.Coordinator``)
while leading group 0, and every group trains the trials it is handed
(``trial.run_trial``) until none is left. Rank 0 shows a progress bar over
trials, appends each result to ``DIR/results.jsonl``, and at the end prints
the table sorted by ``--metric``, the makespan against its lower bound, and
draws ``--plot``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass

from ..parallel.grid import GridError, grid_shape
from ..runtime.agree import interrupted, on_every_rank
from .plan import SCHEDULERS, Plan
from .report import append_result, makespan, plot_sweep, read_results, rewrite_results, table
from .spec import SpecError, load_spec

METRICS = ("test_accuracy", "test_loss", "train_loss", "samples_per_s", "epoch_time_s")
PROG = "mpnn.sweep"


def build_parser():
    p = argparse.ArgumentParser(prog="python -m mpnn.sweep",
                                description="Run many trainings at once over groups of ranks, "
                                            "trials handed to whichever group is free.")
    p.add_argument("spec", metavar="SPEC.toml",
                   help="[base] options, [grid] lists (their product), [[trial]] tables")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="DIR/results.jsonl and DIR/trials/<id>/ (config, metrics, weights, log)")
    p.add_argument("--group-size", type=int, default=1, metavar="G",
                   help="ranks per trial (default 1); must divide the world")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="dynamic",
                   help="dynamic (default): the longest expected trial left to the group that "
                        "asks first; static: trial k to group k mod groups, fixed in advance")
    p.add_argument("--metric", default="test_accuracy", choices=METRICS,
                   help="sort the final table by this (loss: lowest first)")
    p.add_argument("--plot", metavar="PATH", help="draw the accuracy curves and the Gantt chart")
    p.add_argument("--resume", action="store_true",
                   help="skip the trials DIR/results.jsonl already holds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@dataclass
class Sweep:
    """What ``prepare`` found: the options, every trial, the records already done."""

    args: argparse.Namespace
    trials: list
    done: dict  # trial index -> its record in DIR/results.jsonl (--resume)

    @property
    def results_path(self):
        return os.path.join(self.args.out, "results.jsonl")


def prepare(argv, world_size, rank=0):
    """Parse and check everything (no collective); the same verdict on every rank."""
    err = io.StringIO()
    with contextlib.redirect_stderr(sys.stderr if rank == 0 else err), \
            contextlib.redirect_stdout(sys.stdout if rank == 0 else io.StringIO()):
        args = build_parser().parse_args(argv)
    g = args.group_size
    if g < 1 or world_size % g:
        fits = g * max(1, world_size // g)
        raise SpecError(f"--group-size {g} does not divide the {world_size} MPI ranks: give a "
                        f"divisor of {world_size}, or run with mpirun -n {fits}")
    trials = load_spec(args.spec)
    for t in trials:
        par = t.config.parallel
        try:
            grid_shape(g, par.dp, par.pp, par.tp)
        except GridError as e:
            raise SpecError(f"{args.spec}: trial {t.id} does not fit a group of {g} rank(s): "
                            f"{e}; change --group-size or the trial's dp/pp/tp") from None
    try:
        os.makedirs(args.out, exist_ok=True)  # (a --plot under it is checked next)
    except OSError as e:
        raise SpecError(f"--out {args.out}: cannot create it ({e.strerror or e})") from None
    if args.plot:
        from ..runtime.files import check_output_file
        from ..runtime.plots import image_format

        try:
            check_output_file("--plot", args.plot)
            image_format(args.plot, "--plot")
        except ValueError as e:
            raise SpecError(str(e)) from None
    try:
        os.makedirs(os.path.join(args.out, "trials"), exist_ok=True)
    except OSError as e:
        raise SpecError(f"--out {args.out}: cannot write there ({e.strerror or e})") from None
    records = read_results(os.path.join(args.out, "results.jsonl"))
    if records and not args.resume:
        raise SpecError(f"--out {args.out} already holds the results of {len(records)} "
                        f"trial(s): add --resume to skip them, or give a new --out")
    by_id = {t.id: t for t in trials}
    done = {}
    for r in records:
        t = by_id.get(r["id"])
        if t is None or t.key() != json.dumps(r["options"], sort_keys=True):
            raise SpecError(f"--out {args.out} holds trial {r['id']} with options that this "
                            f"spec does not give at that place (another spec?): use a new --out")
        done[t.index] = r
    return Sweep(args, trials, done)


def main(argv=None):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    try:
        return _main(comm, argv)
    except KeyboardInterrupt:
        return interrupted(comm, PROG)


def _main(comm, argv):
    from ..runtime.threads import configure_threads
    from .coordinate import Coordinator, ask, share, wait_buffer
    from .trial import run_trial

    rank, size = comm.Get_rank(), comm.Get_size()
    status, sweep = on_every_rank(comm, lambda: prepare(argv, size, rank), prog=PROG)
    if status is not None:
        return status
    args = sweep.args
    g = args.group_size
    n_groups, color = size // g, rank // g
    group = comm.Split(color, rank)
    ctl = comm.Dup()  # the coordinator's messages, apart from every trial's
    threads, _ = configure_threads(comm)  # this rank's share of its node's cores
    warm_up_trials(sweep.trials)  # imports, data files, numba: before the clock starts
    pending = [t for t in sweep.trials if t.index not in sweep.done]
    plan = Plan(pending, n_groups, args.scheduler)
    records = list(sweep.done.values())
    coordinator = bar = None
    if rank == 0:
        if args.resume:  # the records kept, whole lines only (a killed sweep may leave half)
            rewrite_results(sweep.results_path, records)
        if not args.quiet:
            print(f"mpnn.sweep: {len(sweep.trials)} trials ({len(sweep.done)} done before), "
                  f"{n_groups} group(s) of {g} rank(s), {args.scheduler} scheduler",
                  flush=True)
            from tqdm import tqdm

            bar = tqdm(total=len(pending), desc="trials", file=sys.stderr, mininterval=0.5)

        def on_result(record):
            append_result(sweep.results_path, record)
            records.append(record)
            if bar is not None:
                what = (f"{args.metric} {record['final'][args.metric]:.4f}"
                        if record["status"] == "ok" else f"FAILED: {record['error']}")
                bar.write(f"trial {record['id']} {what} ({record['wall_s']:.1f} s, group "
                          f"{record['group']})")
                bar.update(1)

        coordinator = Coordinator(ctl, plan, n_groups, on_result)
        coordinator.start()
    wait_buffer(comm.Ibarrier())  # (polled: a blocking MPICH wait spins its core)
    t0 = time.perf_counter()  # every rank's clock from here: start and end times line up
    result = None
    while True:
        k = None
        if group.Get_rank() == 0:
            k = coordinator.own_next(result) if rank == 0 else ask(ctl, color, result)
        k = share(group, k)
        if k is None:
            break
        result = run_trial(sweep.trials[k], group, args.out, t0, color, threads)
    status = 0
    if rank == 0:
        coordinator.finish()
        if bar is not None:
            bar.close()
        status = _report(sweep, records, n_groups)
    ctl.Free()
    group.Free()
    return share(comm, status)  # polled: the done ranks must not spin beside a last trial


def warm_up_trials(trials):
    """Load each dataset the trials use once (its imports: scikit-learn's take seconds;
    its files into the page cache) and compile every kernel they will call
    (``runtime.setup.warm_up``, once per distinct backend, dtype, activation, loss and
    optimizer), so a rank's first trial does not carry those into its measured cost.
    Failures are left to the trials themselves to report."""
    import numpy as np

    from ..data.datasets import SHAPES, load_dataset

    for name, where in {(t.config.data.dataset, t.config.data.data_dir) for t in trials}:
        try:
            load_dataset(name, data_dir=where, download=False, progress=False)
        except Exception:  # noqa: BLE001 - the trial reports a missing dataset
            pass
    from ..kernels import get_ops
    from ..nn.model import MLP
    from ..runtime.config import resolve_backend
    from ..runtime.setup import warm_up

    seen = set()
    for t in trials:
        c = t.config
        m, o = c.model, c.optim
        key = (m.backend, m.dtype, m.activation, m.loss, o.optimizer, bool(o.momentum),
               o.nesterov, c.data.dataset)
        if key in seen:
            continue
        seen.add(key)
        try:
            ops = get_ops(resolve_backend(m.backend))
        except Exception:  # noqa: BLE001 - the trial itself will report it
            continue
        _, _, features, classes = SHAPES[c.data.dataset]
        rows = _Rows(np.zeros((2, features), m.dtype), np.arange(2) % classes, classes)
        warm_up(MLP([features, 2, classes], m.activation, np.dtype(m.dtype), 0, ops=ops), c, rows)


@dataclass
class _Rows:
    """Two rows of the dataset's shape: what ``warm_up`` reads of a Dataset."""

    x_train: object
    y_train: object
    num_classes: int

    @property
    def n_features(self):
        return self.x_train.shape[1]

    def train_features(self, rows):
        return self.x_train[rows]


def _report(sweep, records, n_groups):
    args = sweep.args
    this_run = [r for r in records if r["index"] not in sweep.done]
    print(table(records, sweep.trials, args.metric), flush=True)
    span, bound, mean, longest = makespan(this_run, n_groups)
    failed = sum(r["status"] != "ok" for r in records)
    print(f"mpnn.sweep: {len(records)} trial(s), {failed} failed; makespan {span:.1f} s, lower "
          f"bound {bound:.1f} s (work {mean:.1f} s per group, longest trial {longest:.1f} s): "
          f"{span / bound if bound else 1:.2f}x; results in {sweep.results_path}", flush=True)
    if args.plot:
        plot_sweep(records, args.plot, n_groups, args.metric)
        print(f"mpnn.sweep: wrote {args.plot}", flush=True)
    return 1 if records and failed == len(records) else 0
