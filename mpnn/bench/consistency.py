"""The consistency models side by side: bsp, ssp (S = 1, 4) and asp, with a straggler and without.

    python -m mpnn.bench.consistency [--epochs 3] [--rounds 1] [--plot FILE.png]

``mpirun -n 4 python -m mpnn.train --servers 1 --sync MODE`` (one server, three
workers, one thread per rank) on Fashion-MNIST where its IDX files are found
(else synthetic data), batch 64, the default model, and the same again with
``--straggler 1:3`` (worker 0, world rank 1, computes three times slower). For
each run: samples/s (the median over epochs), the test accuracy after each
epoch against the wall time so far, the staleness the server recorded and the
seconds the workers spent blocked. With ``--rounds R`` every configuration
runs R times, interleaved, and the figures are the median [min, max] over
rounds. ``--plot`` draws test accuracy after each epoch against the training
wall time so far (the middle round), one panel per straggler setting.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from .dp_worker import find_mpirun, train_records
from .node import available_dataset
from .report import show

MODES = {"bsp": ["--sync", "bsp"], "ssp S=1": ["--sync", "ssp", "--staleness", "1"],
         "ssp S=4": ["--sync", "ssp", "--staleness", "4"], "asp": ["--sync", "asp"]}
STRAGGLERS = {"none": [], "1:3": ["--straggler", "1:3"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpnn.bench.consistency",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--dataset", default=None, help="default: fashion-mnist where found")
    p.add_argument("--plot", metavar="FILE.png")
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def measure(epochs=3, rounds=1, ranks=4, dataset=None):
    """{"dataset", "runs": {straggler: {mode: [one dict per round]}}}; a round's dict:
    samples_per_s, curve [(seconds, accuracy) after each epoch], staleness mean and
    max, blocked seconds per worker, pushes per worker."""
    dataset = dataset or available_dataset()
    mpirun = find_mpirun()
    argv = ["--dataset", dataset, "--batch-size", "64", "--epochs", str(epochs), "--threads",
            "1", "--servers", "1", "--quiet"]
    runs = {s: {m: [] for m in MODES} for s in STRAGGLERS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for s, slow in STRAGGLERS.items():
                for m, mode in MODES.items():
                    metrics = Path(tmp) / f"{r}-{s}-{m.replace(' ', '')}.jsonl"
                    records = train_records(argv + mode + slow, metrics, ranks=ranks,
                                            mpirun=mpirun, who="mpnn.bench.consistency")
                    runs[s][m].append(_figures(records))
    return {"dataset": dataset, "epochs": epochs, "rounds": rounds, "ranks": ranks,
            "runs": runs}


def _figures(records):
    t, curve = 0.0, []
    for rec in records:
        t += rec["epoch_time_s"]
        curve.append((round(t, 3), rec["test_accuracy"]))
    hist = {}
    for rec in records:
        for k, c in rec["staleness_histogram"].items():
            hist[int(k)] = hist.get(int(k), 0) + c
    n = sum(hist.values())
    return {"samples_per_s": statistics.median(rec["samples_per_s"] for rec in records),
            "curve": curve, "accuracy": records[-1]["test_accuracy"], "seconds": t,
            "staleness_mean": sum(k * c for k, c in hist.items()) / n if n else 0.0,
            "staleness_max": max(rec["staleness_max"] for rec in records),
            "blocked_s": [round(sum(rec["worker_blocked_s"][i] for rec in records), 2)
                          for i in range(len(records[0]["worker_blocked_s"]))],
            "pushes": [sum(rec["worker_pushes"][i] for rec in records)
                       for i in range(len(records[0]["worker_pushes"]))]}


def _spread(values, fmt):
    m = statistics.median(values)
    return fmt.format(m) if len(values) == 1 else \
        f"{fmt.format(m)} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def report(result):
    print(f"consistency models at -n {result['ranks']} (1 server, {result['ranks'] - 1} workers, "
          f"{result['dataset']}, batch 64, {result['epochs']} epochs, {result['rounds']} "
          f"round(s); median [min, max] over rounds):")
    print(f"  {'straggler':9s} {'mode':8s} {'samples/s':>18s} {'x bsp':>6s} {'test acc':>16s} "
          f"{'wall s':>8s} {'staleness':>14s}  blocked s per worker; pushes per worker")
    for s, modes in result["runs"].items():
        base = statistics.median(f["samples_per_s"] for f in modes["bsp"])
        for m, rounds in modes.items():
            sps = [f["samples_per_s"] for f in rounds]
            last = rounds[len(rounds) // 2]
            stale = f"mean {last['staleness_mean']:.2f} max {last['staleness_max']}"
            print(f"  {s:9s} {m:8s} {_spread(sps, '{:,.0f}'):>18s} "
                  f"{statistics.median(sps) / base:6.2f} "
                  f"{_spread([f['accuracy'] for f in rounds], '{:.4f}'):>16s} "
                  f"{_spread([f['seconds'] for f in rounds], '{:.1f}'):>8s} "
                  f"{stale:>14s}"
                  f"  {'/'.join(f'{b:.1f}' for b in last['blocked_s'])}; {last['pushes']}")


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (s, modes) in zip(axes, result["runs"].items(), strict=True):
        for m, rounds in modes.items():
            curve = rounds[len(rounds) // 2]["curve"]  # the middle round
            ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", label=m)
        ax.set_title(f"straggler {s}" + (" (worker 0 three times slower)" if s != "none"
                                         else ""))
        ax.set_xlabel("training wall time, s (evaluation excluded)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend()
    fig.suptitle(f"{result['dataset']}, mpirun -n {result['ranks']}: 1 parameter server, "
                 f"{result['ranks'] - 1} workers, batch 64 (one point per epoch; round "
                 f"{result['rounds'] // 2 + 1} of {result['rounds']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    result = measure(args.epochs, args.rounds, args.ranks, args.dataset)
    if args.plot:
        plot(result, args.plot)
    return show(result, report, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
