"""The flat and the hierarchical gradient Allreduce side by side: step time on
one node, and step time and bytes between hosts on two.

    python -m mpnn.bench.hosts [--rounds 2] [--no-hosts]

Every run is ``python -m mpnn.train --dataset synthetic --batch-size 256
--threads 1`` (the default 784-256-128-64-10 model: 242,762 float32
parameters, 0.97 MB of gradient per step) with ``--allreduce flat`` or
``hierarchical`` and ``--bucket-mb 0.1`` (overlapped buckets, the default) or
``0`` (one call after backward), the configurations interleaved in every
round. Across hosts two more: both with MPICH's Allreduce forced to recursive
doubling for every rank alike ("rd": ``MPIR_CVAR_ALLREDUCE_COMPOSITION=2``,
``MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM=recursive_doubling`` and
``MPIR_CVAR_IALLREDUCE_INTRA_ALGORITHM=sched_recursive_doubling`` for the
buckets' nonblocking sums), an algorithm that ignores the nodes, as a flat
Allreduce of another MPI may. Step time: the
global batch over the run's samples/s, median [min, max] over rounds and
epochs.

One node: ``mpirun -n 2`` on this machine (a rank per core).

Two hosts (root only: network namespaces, ``mpnn.bench.netns``): 2 hosts x 2
ranks, ``mpirun -hosts hostA:2,hostB:2``. The bytes sent between hosts are
the hosts' ``eth0`` transmit counters, read before and after each run; each
configuration runs for 1 and for 2 epochs and the difference over one
epoch's steps is the bytes per step (start-up, connection set-up and the
evaluation's few bytes cancel or vanish). Beside them the ideal: a
bandwidth-optimal Allreduce of the Ψ-element gradient between 2 nodes sends
Ψ·4 bytes from each (a reduce-scatter and an all-gather of halves).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from .dp_worker import find_mpirun, train_records
from .report import show

BATCH = 256
ROWS = 60000  # the synthetic dataset's training rows
STEPS_PER_EPOCH = -(-ROWS // BATCH)
PARAMS = 784 * 256 + 256 + 256 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
# MPICH's own Allreduce picked for all ranks alike, ignoring the nodes (recursive doubling:
# every rank exchanges the whole buffer with partners at distance 1, 2, ...)
NODE_UNAWARE = {"MPIR_CVAR_ALLREDUCE_COMPOSITION": "2",
                "MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "recursive_doubling",
                "MPIR_CVAR_IALLREDUCE_INTRA_ALGORITHM": "sched_recursive_doubling"}
# (label, --allreduce, --bucket-mb, environment); one node runs the first four
CONFIGS = [("flat 0.1", "flat", "0.1", {}), ("hierarchical 0.1", "hierarchical", "0.1", {}),
           ("flat 0", "flat", "0", {}), ("hierarchical 0", "hierarchical", "0", {}),
           ("flat 0.1 rd", "flat", "0.1", NODE_UNAWARE),
           ("hierarchical 0.1 rd", "hierarchical", "0.1", NODE_UNAWARE)]
HOSTS = ("hostA", "hostB")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpnn.bench.hosts",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-hosts", action="store_true", help="only the one-node runs")
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def _argv(allreduce, bucket_mb, epochs):
    return ["--dataset", "synthetic", "--batch-size", str(BATCH), "--epochs", str(epochs),
            "--threads", "1", "--quiet", "--allreduce", allreduce, "--bucket-mb", bucket_mb]


def _step_times(records):
    return [BATCH / r["samples_per_s"] for r in records]


def one_node(rounds=2):
    """{config: [step seconds...]} at mpirun -n 2 on this machine."""
    mpirun = find_mpirun()
    out = {label: [] for label, *_ in CONFIGS[:4]}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for label, a, b, _ in CONFIGS[:4]:
                metrics = Path(tmp) / f"{a}{b}{r}.jsonl"
                records = train_records(_argv(a, b, 2), metrics, ranks=2, mpirun=mpirun,
                                        who="mpnn.bench.hosts")
                out[label] += _step_times(records)
    return out


def two_hosts(rounds=2):
    """{config: {"step_s": [...], "bytes_per_step": [...]}} at 2 hosts x 2 ranks, or
    the reason it cannot run here (a string)."""
    from .netns import Hosts, unavailable

    why = unavailable()
    if why:
        return why
    out = {label: {"step_s": [], "bytes_per_step": []} for label, *_ in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp, Hosts(HOSTS) as hosts:
        def run(a, b, env, epochs, tag):
            metrics = Path(tmp) / f"{tag}.jsonl"
            before = sum(hosts.tx_rx_bytes(h)[0] for h in HOSTS)
            p = hosts.mpirun(["-hosts", ",".join(f"{h}:2" for h in HOSTS), "-n", "4",
                              sys.executable, "-m", "mpnn.train", *_argv(a, b, epochs),
                              "--metrics", str(metrics)], timeout=900,
                             env={"OMP_NUM_THREADS": "1", **env})
            if p.returncode != 0:
                raise SystemExit(f"mpnn.bench.hosts: the 2-host run failed ({p.returncode}):\n"
                                 f"{p.stdout[-2000:]}")
            sent = sum(hosts.tx_rx_bytes(h)[0] for h in HOSTS) - before
            return sent, [json.loads(x) for x in metrics.read_text().splitlines()]

        for r in range(rounds):
            for k, (label, a, b, env) in enumerate(CONFIGS):
                short, _ = run(a, b, env, 1, f"{k}-{r}s")
                long, records = run(a, b, env, 2, f"{k}-{r}l")
                cell = out[label]
                cell["bytes_per_step"].append((long - short) / len(HOSTS) / STEPS_PER_EPOCH)
                cell["step_s"] += _step_times(records)
    return out


def _spread(xs, scale=1.0, fmt=".2f"):
    return (f"{statistics.median(xs) * scale:{fmt}} [{min(xs) * scale:{fmt}}, "
            f"{max(xs) * scale:{fmt}}]")


def report(result):
    print(f"gradient sum, flat vs hierarchical ({PARAMS:,} float32 parameters, "
          f"{PARAMS * 4 / 1e6:.2f} MB; batch {BATCH}; median [min, max]):")
    node = result["one_node"]
    flat = statistics.median(node["flat 0.1"])
    print("  one node, mpirun -n 2:")
    for k, v in node.items():
        print(f"    {k:<18} step {_spread(v, 1e3)} ms   x flat 0.1: "
              f"{statistics.median(v) / flat:.2f}")
    hosts = result.get("two_hosts")
    if isinstance(hosts, str):
        print(f"  two hosts: not run ({hosts})")
        return
    if hosts is None:
        return
    ideal = PARAMS * 4
    flat_b = statistics.median(hosts["flat 0.1"]["bytes_per_step"])
    flat_t = statistics.median(hosts["flat 0.1"]["step_s"])
    print(f"  2 hosts x 2 ranks (ideal: {ideal / 1e3:.0f} kB sent per host and step):")
    for k, v in hosts.items():
        b, t = v["bytes_per_step"], v["step_s"]
        print(f"    {k:<18} sent per host and step {_spread(b, 1e-3, '.0f')} kB "
              f"({statistics.median(b) / ideal:.2f}x ideal, {statistics.median(b) / flat_b:.2f}"
              f"x flat 0.1); step {_spread(t, 1e3)} ms ({statistics.median(t) / flat_t:.2f}x)")


def measure(rounds=2, with_hosts=True):
    result = {"one_node": one_node(rounds)}
    if with_hosts:
        result["two_hosts"] = two_hosts(rounds)
    return result


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = measure(args.rounds, not args.no_hosts)
    return show(result, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
