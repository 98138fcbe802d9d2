"""What the watchdog costs: samples/s with ``--timeout 0`` (off) against the default.

    python -m mpnn.bench.watchdog [--rounds 7]

``python -m mpnn.train --dataset synthetic --batch-size 64 --epochs 4 --threads 1``
(the default 784-256-128-64-10 model, 938 steps an epoch), serially and at
``mpirun -n 2``, with the watchdog off and on, alternating within every
round (which goes first alternates too). A run's figure is the median
samples/s of its epochs 2-4; the cost is 1 − on/off of the two runs of one
round, reported as the median [min, max] over rounds. On a shared 2-core
machine that end-to-end figure is noisier than the cost, so the bench also
prices the watchdog from its parts: the time of one ``watch.op`` (entered
and left 200,000 times, median of 5), times the operations a step runs (the
flight record of a traced ``-n 2`` run: operations / steps), over the step
time of the runs without it. The heartbeat thread wakes twice a second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from .dp_worker import find_mpirun, train_records
from .report import show

ARGV = ["--dataset", "synthetic", "--batch-size", "64", "--epochs", "4", "--threads", "1",
        "--quiet"]
SETTINGS = {"off": ["--timeout", "0"], "on": []}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpnn.bench.watchdog",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def measure(rounds=7, ranks=(1, 2)):
    """{ranks: {"off": [samples/s...], "on": [...], "cost": [1 - on/off per round]}}."""
    mpirun = find_mpirun()
    out = {n: {"off": [], "on": [], "cost": []} for n in ranks}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for n in ranks:
                got = {}
                order = ("off", "on") if r % 2 == 0 else ("on", "off")  # neither always first
                for setting in order:
                    metrics = Path(tmp) / f"{n}-{setting}-{r}.jsonl"
                    records = train_records(ARGV + SETTINGS[setting], metrics, ranks=n,
                                            mpirun=mpirun, who="mpnn.bench.watchdog")
                    got[setting] = statistics.median(r["samples_per_s"] for r in records[1:])
                    out[n][setting].append(got[setting])
                out[n]["cost"].append(1 - got["on"] / got["off"])
    return out


def op_seconds(repeats=5, n=200_000):
    """The median time of entering and leaving one watched operation."""
    import time

    from mpi4py import MPI

    from ..runtime import watchdog as wd

    w = wd.Watch(MPI.COMM_SELF, timeout=60)  # (its thread not started: only the op)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            with w.op("gradient Allreduce", ("bucket {} of {}", 2, 9), ranks="r"):
                pass
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def ops_per_step(ranks=2):
    """Watched operations per training step, from a traced run's flight record."""
    mpirun = find_mpirun()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "t.json"
        train_records([*ARGV[:4], "--epochs", "1", *ARGV[6:], "--trace", str(trace)],
                      Path(tmp) / "m.jsonl", ranks=ranks, mpirun=mpirun,
                      who="mpnn.bench.watchdog")
        record = json.loads(Path(f"{trace}.flight-rank0.json").read_text())
        return record["ops_total"] / record["step"]


def parts(result, ranks=2):
    """The cost from its parts: op time x ops per step / step time (watchdog off)."""
    op, per_step = op_seconds(), ops_per_step(ranks)
    step = 64 / statistics.median(result[ranks]["off"])
    return {"op_s": op, "ops_per_step": per_step, "step_s": step,
            "cost": op * per_step / step}


def report(result):
    print("the watchdog's cost (synthetic, batch 64, one thread per rank; median [min, max] "
          "over rounds):")
    for n, r in result.items():
        if n == "parts":
            continue
        cost = r["cost"]
        print(f"  {n} rank(s): samples/s off {statistics.median(r['off']):,.0f}, on "
              f"{statistics.median(r['on']):,.0f}; cost {statistics.median(cost):+.1%} "
              f"[{min(cost):+.1%}, {max(cost):+.1%}]")
    p = result.get("parts")
    if p:
        print(f"  from its parts at 2 ranks: {p['op_s'] * 1e6:.2f} us per watched operation x "
              f"{p['ops_per_step']:.1f} operations per step / {p['step_s'] * 1e3:.2f} ms per "
              f"step = {p['cost']:.2%}")


def main(argv=None):
    args = parse_args(argv)
    result = measure(args.rounds)
    result["parts"] = parts(result)
    return show(result, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
