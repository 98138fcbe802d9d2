"""The data-parallel measurement, a program of its own::

    mpirun -n 2 python -m mpnn.bench.dp_worker --out dp.json [--batch 256] [--bucket-mb 0.1]

Every rank loads ``mpnn.train``'s synthetic dataset and builds four set-ups,
each its own model, optimizer and ``DataParallelEngine`` as the trainer builds
them, stepped by ``runners.MpnnRunner`` (the trainer's step,
``mpnn.runtime.loop.train_batch``, the gather of each batch's rows included):

    single      rank 0 alone, ``--batch`` rows per step, while the other ranks
                sleep: the one-rank baseline (``mpnn.train --batch-size 256``)
    none        every rank its share of a global batch of ranks·batch rows,
                no gradient sum: the compute alone
    blocking    the same with one blocking Allreduce after backward
                (``--bucket-mb 0``)
    overlapped  the same with the bucketed Allreduce overlapped with backward
                (``--bucket-mb``, by default mpnn.train's 0.1): what
                ``mpirun -n 2 python -m mpnn.train`` runs

They take turns within every repeat; a block's time is the slowest rank's.
The engines' tracer (``mpnn.runtime.trace.Tracer``, what ``--trace`` records)
gives each step's "allreduce" span: the wait for the gradient sum left after
backward. Rank 0 writes every repeat's figures as JSON to ``--out``; at the
end the replicas' parameters must be identical.

``launch`` runs this under mpirun from ``python -m mpnn.bench``; ``figures``
turns its output into the medians, ranges and efficiencies the report prints.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from .measure import paired_ratios, summary
from .runners import TRAIN_ROWS, MpnnRunner, bench_data

MODES = ("single", "none", "blocking", "overlapped")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mpirun -n 2 python -m mpnn.bench.dp_worker",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, metavar="PATH", help="JSON figures (written by rank 0)")
    p.add_argument("--threads", type=int, default=1, help="BLAS/numba threads per rank")
    p.add_argument("--repeats", type=int, default=9, help="timed repeats per set-up")
    p.add_argument("--block-s", type=float, default=0.15, help="seconds per timed block")
    p.add_argument("--bucket-mb", type=float, default=0.1, help="bucket size of the overlapped sum")
    p.add_argument("--batch", type=int, default=256, help="rows per rank and step")
    p.add_argument("--rows", type=int, default=TRAIN_ROWS, help="training rows of the dataset")
    p.add_argument("--backend", default="numba", choices=("numpy", "numba", "cupy"))
    return p.parse_args(argv)


def _allreduce_waits(tracer):
    """Seconds of each "allreduce" span recorded since the last call; clears the tracer."""
    waits = [(t1 - t0) / 1e9 for name, t0, t1, _ in tracer.events if name == "allreduce"]
    tracer.events.clear()
    return waits


def _digest(model):
    return zlib.crc32(np.ascontiguousarray(model.ops.to_host(model.flat.data)).tobytes())


def main(argv=None):
    from mpi4py import MPI

    from ..parallel.grid import make_grid
    from ..runtime.threads import configure_threads
    from ..runtime.trace import Tracer

    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    threads, warning = configure_threads(comm, args.threads)
    dp_comm = make_grid(comm).dp_comm  # the trainer's: every rank a replica
    data = bench_data(args.rows)
    tracer = Tracer()
    shared = dict(backend=args.backend, data=data, tracer=tracer)
    replica = dict(batch=args.batch * size, rank=rank, replicas=size, **shared)
    runners = {"single": MpnnRunner(batch=args.batch, dp_comm=MPI.COMM_SELF, **shared),
               "none": MpnnRunner(dp_comm=MPI.COMM_SELF, **replica),
               "blocking": MpnnRunner(dp_comm=dp_comm, bucket_mb=0.0, **replica),
               "overlapped": MpnnRunner(dp_comm=dp_comm, bucket_mb=args.bucket_mb, **replica)}
    for r in runners.values():  # warm-up: every rank runs every set-up, even "single"
        r.run(5)
    one = min(_timed_block(runners["overlapped"], 1, comm) for _ in range(3))
    steps = comm.allreduce(max(5, int(args.block_s / max(one, 1e-6))), op=MPI.MAX)
    _allreduce_waits(tracer)
    result = {m: {"samples_s": [], "wait_ms": []} for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            comm.Barrier()
            t = time.perf_counter()
            trained = runners[mode].run(steps) if mode != "single" or rank == 0 else 0
            block = time.perf_counter() - t
            if mode == "single":  # the other ranks sleep (not spin) until rank 0 is done
                done = comm.Ibarrier()
                while not done.Test():
                    time.sleep(0.001)
                block = comm.bcast(block, root=0)
            else:
                block = comm.allreduce(block, op=MPI.MAX)  # the slowest rank sets the pace
            waits = _allreduce_waits(tracer)
            result[mode]["samples_s"].append(trained / block)
            result[mode]["wait_ms"].append(1e3 * float(np.median(waits)) if waits else 0.0)
    digests = comm.allgather((_digest(runners["blocking"].model),
                              _digest(runners["overlapped"].model)))
    if rank == 0:
        engine = runners["overlapped"].engine
        out = {"ranks": size, "rows_per_rank": args.batch, "threads": threads,
               "thread_warning": warning, "steps_per_block": steps, "bucket_mb": args.bucket_mb,
               "grad_mb": runners["overlapped"].model.flat.grad.nbytes / 1e6,
               "buckets": [list(b.layers) for b in getattr(engine.sync, "buckets", [])],
               "replicas_identical": len(set(digests)) == 1, **result}
        Path(args.out).write_text(json.dumps(out))


def _timed_block(runner, steps, comm):
    comm.Barrier()
    t = time.perf_counter()
    runner.run(steps)
    return time.perf_counter() - t


def figures(raw):
    """The worker's output with, per set-up, the median per-rank samples/s and its
    [min, max], the wait after backward, and the efficiency: per-rank samples/s
    over rank 0 alone, paired repeat by repeat (median and [min, max]). Adds the
    Allreduce time hidden behind backward (blocking wait minus overlapped, ms)."""
    out = {k: v for k, v in raw.items() if k not in MODES}
    for mode in MODES:
        r, s = raw[mode], summary(raw[mode]["samples_s"])
        out[mode] = {"per_rank_samples_s": s["median"],
                     "per_rank_samples_s_range": [s["min"], s["max"]],
                     "per_repeat_samples_s": r["samples_s"],
                     "wait_ms": float(np.median(r["wait_ms"]))}
        if mode != "single":
            both = {"mode": r["samples_s"], "single": raw["single"]["samples_s"]}
            e = summary(paired_ratios(both, "mode", "single"))
            out[mode]["efficiency"] = e["median"]
            out[mode]["efficiency_range"] = [e["min"], e["max"]]
    out["hidden_ms"] = out["blocking"]["wait_ms"] - out["overlapped"]["wait_ms"]
    return out


def dp_threads(threads, ranks):
    """Threads per rank: ``threads``, but never more than a rank's share of the cores."""
    from ..runtime.threads import available_cores, threads_per_rank

    return min(threads, threads_per_rank(available_cores(), ranks))


def find_mpirun():
    """The mpirun beside this Python (the PyPI mpich wheel's), else on PATH, else None."""
    here = Path(sys.executable).parent
    return next((str(p) for p in (here / "mpirun", here / "mpiexec") if p.exists()),
                shutil.which("mpirun") or shutil.which("mpiexec"))


def train_records(argv, metrics, ranks=1, mpirun=None, who="mpnn.bench"):
    """Run ``python -m mpnn.train argv --metrics metrics`` (under ``mpirun -n ranks``
    when ranks > 1), one thread per rank; its per-epoch records. A failed run ends
    the benchmark (SystemExit) with the command and its last output."""
    cmd = [sys.executable, "-m", "mpnn.train", *argv, "--metrics", str(metrics)]
    if ranks > 1:
        cmd = [mpirun, "-n", str(ranks), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise SystemExit(f"{who}: {' '.join(cmd)} failed ({proc.returncode}):\n"
                         f"{(proc.stderr or proc.stdout)[-2000:]}")
    return [json.loads(line) for line in Path(metrics).read_text().splitlines()]


def launch(ranks=2, threads=1, repeats=9, block_s=0.15, bucket_mb=0.1, batch=256,
           rows=TRAIN_ROWS, timeout_s=600):
    """Run this worker under ``mpirun -n ranks``; its ``figures``, or why not (a string)."""
    mpirun = find_mpirun()
    if mpirun is None:
        return "mpirun not found"
    n = dp_threads(threads, ranks)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dp.json"
        cmd = [mpirun, "-n", str(ranks), sys.executable, "-m", "mpnn.bench.dp_worker",
               "--out", str(out), "--threads", str(n), "--repeats", str(repeats),
               "--block-s", str(block_s), "--bucket-mb", str(bucket_mb), "--batch", str(batch),
               "--rows", str(rows)]
        env = dict(os.environ, OMP_NUM_THREADS=str(n))
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"mpirun timed out after {timeout_s} s"
        if proc.returncode != 0 or not out.exists():
            return f"mpirun failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-400:]}"
        return figures(json.loads(out.read_text()))


if __name__ == "__main__":
    main()
