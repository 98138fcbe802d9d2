"""``python -m mpnn.bench.pipeline``: pipeline schedules side by side with serial training.

Runs ``python -m mpnn.train`` serially (one thread) and under ``mpirun -n 2
... --pp 2`` with each schedule, on the same model, data and global batch,
one thread per rank, for ``--rounds`` rounds (serial first, then every
schedule, in every round: a noisy machine slows the runs of a round alike).
For each schedule it prints the median [min, max] over the rounds of:

* throughput over the same round's serial throughput (training samples/s of
  the epochs, as ``mpnn.train`` reports them);
* the measured bubble (each stage's waits over its compute plus waits, from
  the run's ``--metrics``);
* the bubble the timed simulator expects from the same run's measurements
  (``mpnn.schedule_costs.predict_run``: mean costs, their spreads, the
  shared per-step slowdown, the receive cost, the overhead, the stage
  starts; what ``python -m mpnn.schedule --costs-from`` prints), and the
  relative error of the measurement against it.

    python -m mpnn.bench.pipeline [--hidden 512,...] [--batch-size 1024]
        [--micro-batches 8] [--rounds 3] [--schedules 1f1b,zb-h1,...]
        [--partition profile] [--json PATH]

A schedule name may carry its model chunks per rank after a colon:
``interleaved-1f1b:2`` runs ``--virtual-stages 2``. Takes minutes: every run
is a whole epoch of MNIST by default (``MPNN_DATA``; ``--dataset`` takes any
of ``mpnn.train``'s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from ..parallel.pipeline_orders import SCHEDULES
from ..schedule_costs import predict_run
from .dp_worker import find_mpirun, train_records

DEFAULT_SCHEDULES = "1f1b,zb-h1,zb-h2,interleaved-1f1b:2,gpipe"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpnn.bench.pipeline",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="mnist", help="mpnn.train's --dataset (default mnist)")
    a("--hidden", default=",".join(["512"] * 8), help="hidden widths (default 512 x 8)")
    a("--batch-size", type=int, default=1024, help="global batch (default 1024)")
    a("--micro-batches", type=int, default=8, help="micro-batches per step (default 8)")
    a("--epochs", type=int, default=1, help="epochs per run (default 1)")
    a("--rounds", type=int, default=3, help="rounds of every run (median, range; default 3)")
    a("--schedules", default=DEFAULT_SCHEDULES,
      help=f"comma-separated, NAME[:V] (default {DEFAULT_SCHEDULES})")
    a("--partition", default=None, metavar="SPEC",
      help="mpnn.train's --partition for every pipeline run (default: its FLOP balance; "
           "'profile' times the layers first)")
    a("--json", metavar="PATH", help="also write every run's figures as JSON")
    args = p.parse_args(argv)
    args.runs = []
    for item in args.schedules.split(","):
        name, _, v = item.strip().partition(":")
        if name not in SCHEDULES or (v and not v.isdigit()):
            p.error(f"--schedules: {item!r} is not NAME[:V] with NAME one of "
                    f"{', '.join(SCHEDULES)}")
        args.runs.append((name, int(v) if v else 1))
    if min(args.rounds, args.batch_size, args.micro_batches, args.epochs) < 1:
        p.error("--rounds, --batch-size, --micro-batches and --epochs must be positive")
    return args


def _last(argv, metrics, ranks=1, mpirun=None):
    """One mpnn.train run; the last record of its metrics."""
    return train_records(argv, metrics, ranks, mpirun, "mpnn.bench.pipeline")[-1]


def _spread(values, fmt):
    return f"{fmt(statistics.median(values))} [{fmt(min(values))}, {fmt(max(values))}]"


def main(argv=None):
    args = parse_args(argv)
    mpirun = find_mpirun()
    if mpirun is None:
        raise SystemExit("mpnn.bench.pipeline: mpirun not found (pip install mpich)")
    common = ["--dataset", args.dataset, "--hidden", args.hidden, "--batch-size",
              str(args.batch_size), "--optimizer", "sgd", "--momentum", "0", "--lr", "0.01",
              "--threads", "1", "--quiet", "--epochs", str(args.epochs)]
    print(f"mpnn.bench.pipeline: {args.dataset}, --hidden {args.hidden}, --batch-size "
          f"{args.batch_size}, {args.micro_batches} micro-batches, 1 thread per rank, "
          f"{args.rounds} round(s)"
          + (f", --partition {args.partition}" if args.partition else ""), flush=True)
    serial, runs = [], {f"{n}:{v}": [] for n, v in args.runs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            serial.append(_last(common, Path(tmp) / f"serial{r}.jsonl")["samples_per_s"])
            for name, v in args.runs:
                path = Path(tmp) / f"{name}-{v}-{r}.jsonl"
                extra = ["--pp", "2", "--micro-batches", str(args.micro_batches),
                         "--schedule", name] + (["--virtual-stages", str(v)] if v > 1 else [])
                if args.partition:
                    extra += ["--partition", args.partition]
                record = _last(common + extra, path, ranks=2, mpirun=mpirun)
                pred = predict_run(path)
                runs[f"{name}:{v}"].append({
                    "ratio": record["samples_per_s"] / serial[-1],
                    "samples_per_s": record["samples_per_s"], "bubble": record["bubble"],
                    "expected": pred["expected"], "mean_cost_bubble": pred["bubble"],
                    "error": (record["bubble"] - pred["expected"]) / pred["expected"]
                    if pred["expected"] else 0.0})
            print(f"  round {r + 1} done", flush=True)
    print(f"serial 1 thread: {_spread(serial, lambda x: f'{x:,.0f}')} samples/s")
    print(f"{'--schedule':22s} {'x serial':>18s} {'bubble':>21s} {'expected':>21s} "
          f"{'error':>24s}")
    for key, rows in runs.items():
        name, v = key.split(":")
        label = name + (f" V={v}" if v != "1" else "")
        col = {k: [row[k] for row in rows] for k in rows[0]}
        print(f"{label:22s} {_spread(col['ratio'], lambda x: f'{x:.2f}'):>18s} "
              f"{_spread(col['bubble'], lambda x: f'{x:.3f}'):>21s} "
              f"{_spread(col['expected'], lambda x: f'{x:.3f}'):>21s} "
              f"{_spread(col['error'], lambda x: f'{x:+.0%}'):>24s}")
    if args.json:
        Path(args.json).write_text(json.dumps({"serial_samples_per_s": serial, "runs": runs},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
