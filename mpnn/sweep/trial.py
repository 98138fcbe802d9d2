"""One trial on one group of ranks: the engines of ``mpnn.train``, isolated failures.

``run_trial`` runs on every rank of the group (``comm``): it builds the
trial's run with ``runtime.setup`` on the group's communicator, so a trial
can itself be data- or pipeline-parallel inside the group, and trains it with
``runtime.loop.train``: the same code, options and communicator size as
``mpirun -n G python -m mpnn.train ...``, hence bitwise the same weights
(given the same thread count: ``--threads``).

It writes ``DIR/trials/<id>/``: ``config.json`` (the options and the command
line), ``metrics.jsonl`` (``--metrics``), ``weights.npz`` (``--save``) and
``log.txt``. A failure is the trial's, not the sweep's: bad option
combinations (``runtime.config.validate``), an exception during set-up, a
NaN (the guard raises on every rank of the forward pass) or any exception in
training raised on every rank of the group are caught, agreed over the group
and returned as the trial's error; the group then takes the next trial. (A
rank-local exception in the middle of a multi-rank trial would leave its
peers waiting in a collective that MPI cannot cancel; nothing in mpnn's
training raises on one rank only except through the guards.)
"""

from __future__ import annotations

import json
import os
import time

from ..data.shared import release_all
from ..runtime.agree import gather_outcome
from ..runtime.config import validate
from ..runtime.guards import PeerReportedError
from ..runtime.loop import train
from ..runtime.setup import setup
from .spec import parse_trial

BULKY = ("rank_bytes", "rank_bytes_formula", "tp_allreduce_bytes_per_step",
         "tp_allreduce_bytes_per_step_formula")


def trial_dir(out, trial):
    return os.path.join(out, "trials", trial.id)


def _agreed(comm, step):
    """(error, value): ``step()`` on every rank of ``comm`` (``runtime.agree``);
    error is the first rank's message when any rank failed (the same on every
    rank), else None. A PeerReportedError defers to the rank that reports."""
    errors, value = gather_outcome(comm, step, deferred=PeerReportedError)
    failed = [e for e in errors if e is not None]
    if failed:
        return next((str(e) for e in failed if e), "failed on another rank"), None
    return None, value


def run_trial(trial, comm, out, t0, group, threads=None):
    """Train ``trial`` on the ranks of ``comm``; the result record on comm's rank 0
    (None on the others). ``t0``: the sweep's start (``perf_counter`` after a common
    barrier); ``group``: the group's number; ``threads``: per rank, unless the trial
    sets its own."""
    rank = comm.Get_rank()
    where = trial_dir(out, trial)
    argv = list(trial.argv) + ["--quiet", "--metrics", f"{where}/metrics.jsonl",
                               "--save", f"{where}/weights.npz"]
    if threads and "threads" not in trial.options:
        argv += ["--threads", str(threads)]
    start = time.perf_counter()
    if rank == 0:
        os.makedirs(where, exist_ok=True)
        with open(f"{where}/config.json", "w") as f:
            json.dump({"id": trial.id, "options": trial.options, "argv": argv}, f, indent=1)
    if comm.Get_size() > 1:
        comm.Barrier()  # the directory exists for every rank

    def prepare():
        config = parse_trial(argv, f"trial {trial.id}")
        validate(config, comm.Get_size())
        return config

    error, config = _agreed(comm, prepare)
    run = history = None
    if error is None:
        error, run = _agreed(comm, lambda: setup(config, comm))
    if error is None:
        error, history = _agreed(comm, lambda: train(run, log=lambda *a: None))
    if run is not None:
        run.close()  # the shared windows (every rank of the group gets here)
        _free(run.grid)
    release_all()  # what a failed setup left open
    end = time.perf_counter()
    if rank != 0:
        return None
    final = {k: v for k, v in history[-1].items() if k not in BULKY} if history else {}
    result = {"id": trial.id, "index": trial.index, "options": trial.options,
              "status": "failed" if error else "ok", "error": error, "final": final,
              "curve": [r["test_accuracy"] for r in history or []],
              "wall_s": end - start, "start_s": start - t0, "end_s": end - t0,
              "group": group, "ranks": comm.Get_size()}
    _write_log(where, trial, result, history)
    return result


def _write_log(where, trial, result, history):
    lines = [f"trial {trial.id}: python -m mpnn.train {' '.join(trial.argv)}"]
    for r in history or []:
        lines.append(f"epoch {r['epoch']:3d}  train_loss {r['train_loss']:.4f}  test_loss "
                     f"{r['test_loss']:.4f}  test_acc {r['test_accuracy']:.4f}  "
                     f"{r['samples_per_s']:,.0f} samples/s")
    lines.append(f"{result['status']} in {result['wall_s']:.2f} s on group {result['group']} "
                 f"({result['ranks']} rank(s))" + (f": {result['error']}" if result["error"]
                                                    else ""))
    with open(f"{where}/log.txt", "w") as f:
        f.write("\n".join(lines) + "\n")


def _free(grid):
    """The trial's communicators (a sweep of many trials would run out of them)."""
    from mpi4py import MPI

    for c in (grid.dp_comm, grid.pp_comm, grid.tp_comm, grid.mp_comm, grid.world):
        if c is not None and c != MPI.COMM_NULL and c != MPI.COMM_SELF:
            c.Free()
