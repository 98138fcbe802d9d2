"""Load balancing measured: one skewed sweep, static against dynamic scheduling.

    python -m mpnn.bench.sweep [--rounds 3] [--write-spec PATH]

The sweep (``SPEC``, printed by ``--write-spec``): 12 trials on digits,
seeds 0, 1, 2 x epochs 10, 1, 1, 1, so the costs differ tenfold and, in the
spec's order, every fourth trial is a long one (the grid's first key varies
slowest). It runs ``mpirun -n 4 python -m mpnn.sweep`` with groups of 1 (4
groups) and of 2 (2 groups, each trial data-parallel over its 2 ranks), and
``mpirun -n 2`` with groups of 1, each with ``--scheduler static``
(round-robin: trial k to group k mod groups, which stacks the three long
trials on group 0) and ``dynamic`` (longest expected first, to whichever
group asks), every configuration once per round, interleaved. From each
run's ``results.jsonl`` it takes the makespan (last end − first start) and
the lower bound max(Σ trial times / groups, longest trial) from that run's
own measured trial times, and prints the median [min, max] over rounds of
the makespan, of its ratio to the lower bound, and of dynamic's makespan
over static's in the same round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ..sweep.report import makespan, read_results
from .dp_worker import find_mpirun
from .report import show

SPEC = """# the skewed sweep of python -m mpnn.bench.sweep: costs differ tenfold
[base]
dataset = "digits"
hidden = "1024,1024"
batch_size = 64
optimizer = "adam"
[grid]
seed = [0, 1, 2]
epochs = [10, 1, 1, 1]
"""
# (ranks, group size): 4 groups of 1 and 2 of 2 at -n 4 (on a 2-core machine, 4 ranks
# share 2 cores), and 2 groups of 1 at -n 2 (one core each)
LAYOUTS = ((4, 1), (4, 2), (2, 1))
CONFIGS = [(n, g, s) for n, g in LAYOUTS for s in ("static", "dynamic")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpnn.bench.sweep",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--write-spec", metavar="PATH", help="write the sweep's spec and exit")
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def run_sweep(spec, out, ranks, group_size, scheduler, mpirun):
    """One ``mpnn.sweep`` run; (makespan, lower bound, Σ/groups, longest) from its results."""
    cmd = [mpirun, "-n", str(ranks), sys.executable, "-m", "mpnn.sweep", str(spec), "--out",
           str(out), "--group-size", str(group_size), "--scheduler", scheduler, "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise SystemExit(f"mpnn.bench.sweep: {' '.join(cmd)} failed ({proc.returncode}):\n"
                         f"{(proc.stderr or proc.stdout)[-2000:]}")
    records = read_results(Path(out) / "results.jsonl")
    failed = [r["id"] for r in records if r["status"] != "ok"]
    if failed or len(records) != 12:
        raise SystemExit(f"mpnn.bench.sweep: {len(records)} results, failed {failed}")
    return makespan(records, ranks // group_size)


def measure(rounds=3):
    """{"G/scheduler": [(makespan, bound, mean, longest) per round]}, or why not."""
    mpirun = find_mpirun()
    if mpirun is None:
        return "mpirun not found"
    out = {f"{n}/{g}/{s}": [] for n, g, s in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "skewed.toml"
        spec.write_text(SPEC)
        for r in range(rounds):
            for n, g, s in CONFIGS:
                out[f"{n}/{g}/{s}"].append(
                    run_sweep(spec, Path(tmp) / f"{r}-{n}-{g}-{s}", n, g, s, mpirun))
    return out


def _mmm(values, fmt="{:.2f}"):
    med = statistics.median(values)
    return f"{fmt.format(med)} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def report(result):
    if isinstance(result, str):
        print(f"sweep: not measured ({result})")
        return
    rounds = len(next(iter(result.values())))
    print(f"sweep: 12 trials (digits, hidden 1024,1024, seeds 0-2 x epochs 10,1,1,1); "
          f"median [min, max] of {rounds} round(s); seconds")
    print(f"{'ranks':>5s} {'groups':>7s} {'scheduler':>9s} {'makespan':>22s} "
          f"{'lower bound':>22s} {'x bound':>20s} {'x static':>20s}")
    for n, g, s in CONFIGS:
        runs = result[f"{n}/{g}/{s}"]
        static = result[f"{n}/{g}/static"]
        spans = [r[0] for r in runs]
        bounds = [r[1] for r in runs]
        x_bound = [r[0] / r[1] for r in runs]
        x_static = [a[0] / b[0] for a, b in zip(runs, static, strict=True)]
        print(f"{n:5d} {f'{n // g} of {g}':>7s} {s:>9s} {_mmm(spans, '{:.1f}'):>22s} "
              f"{_mmm(bounds, '{:.1f}'):>22s} {_mmm(x_bound):>20s} {_mmm(x_static):>20s}")


def main(argv=None):
    args = parse_args(argv)
    if args.write_spec:
        Path(args.write_spec).write_text(SPEC)
        return 0
    result = measure(args.rounds)
    return show(result, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
