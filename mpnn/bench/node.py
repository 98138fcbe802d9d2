"""The dataset in a node's shared memory, measured: node memory and the gather.

    python -m mpnn.bench.node [--dataset fashion-mnist] [--ranks 4] [--rounds 3]

Memory: ``mpirun -n RANKS python -m mpnn.train --dataset DATASET --epochs 1``
with the dataset shared per node (the default) and with ``--no-shared-data``
(every rank its own compact copy), and the same command on the first 64
training and test images of the same dataset written as IDX files (the
memory of everything but the data: the same model, code and MPI). While
each runs it samples every rank's proportional set size (``Pss`` in
``/proc/PID/smaps_rollup``: a page shared by k processes counts 1/k in each,
so the sum over a node's ranks is the node's memory) every 0.1 s and reports
the steady state (the median node sum of the second half of the samples,
while it trains) and the peak: per rank and summed, and the data's share
(node sum minus the 64-image run's).

Gather: the time to build one step's features from random rows, stored as
uint8 and divided as gathered (``Dataset.train_features``) against stored as
float32 and only indexed, at batch 64 and 256: median [min, max] of
``--rounds`` rounds of 2,000 gathers each, interleaved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .dp_worker import find_mpirun
from .report import show

GATHER_BATCHES = (64, 256)
GATHERS = 2000


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpnn.bench.node",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-memory", action="store_true", help="only the gather")
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


# ------------------------------------------------------------------------ memory


def pss_kb(pid):
    """The process's Pss in kB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _ranks_of(marker):
    """PIDs of the python processes whose command line holds ``marker`` (the ranks,
    not mpirun or hydra's proxies)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in argv and b"mpnn.train" in argv and b"-m" in argv \
                and not any(b"mpirun" in a or b"hydra" in a for a in argv[:1]):
            pids.append(int(d.name))
    return sorted(pids)


def node_pss(cmd, ranks, env=None, interval=0.1, timeout=900):
    """Run ``cmd`` (an mpnn.train command line under mpirun whose arguments include a
    unique path) and sample the Pss of its ``ranks`` ranks every ``interval`` s.

    Returns {"per_rank_mb", "node_mb"} of the steady state (the sample with the
    median node sum among the second half of the samples: training, after
    start-up), and "peak_per_rank_mb", "peak_node_mb" of the largest node sum."""
    marker = next(a for a in cmd if "mpnn-bench-node" in a)
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=env)
    samples, pids, t0 = [], [], time.monotonic()
    while job.poll() is None and time.monotonic() - t0 < timeout:
        if len(pids) < ranks:
            pids = _ranks_of(marker)
        sample = [pss_kb(p) for p in pids]
        if len(pids) == ranks and all(s is not None for s in sample):
            samples.append(sample)
        time.sleep(interval)
    if job.poll() is None:
        job.kill()
    out = job.communicate()[0]
    if job.returncode != 0 or not samples:
        raise RuntimeError(f"{' '.join(cmd)} failed ({job.returncode}):\n{out[-2000:]}")
    late = sorted(samples[len(samples) // 2:], key=sum)
    steady, peak = late[len(late) // 2], max(samples, key=sum)
    return {"per_rank_mb": [kb / 1024 for kb in steady], "node_mb": sum(steady) / 1024,
            "peak_per_rank_mb": [kb / 1024 for kb in peak], "peak_node_mb": sum(peak) / 1024,
            "samples": len(samples)}


def memory(dataset="fashion-mnist", ranks=4, env=None):
    """{label: node_pss record} of the shared, private and 64-image runs (IDX datasets)."""
    mpirun = find_mpirun()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="mpnn-bench-node-") as tmp:
        tiny = _first_images(dataset, Path(tmp) / "tiny")
        runs = (("shared", ["--dataset", dataset]),
                ("private", ["--dataset", dataset, "--no-shared-data"]),
                (BASELINE, ["--dataset", "mnist", "--data-dir", str(tiny)]))
        for label, data in runs:
            metrics = os.path.join(tmp, f"{len(rows)}.jsonl")
            cmd = [mpirun, "-n", str(ranks), sys.executable, "-m", "mpnn.train", *data,
                   "--epochs", "1", "--quiet", "--threads", "1", "--metrics", metrics]
            rows[label] = node_pss(cmd, ranks, env=env)
    return rows


BASELINE = "64 images"


def _first_images(dataset, directory, n=64):
    """The first ``n`` training and test images of a 28x28, 10-class dataset as IDX
    files (synthetic's features rounded to bytes): the same model on almost no data."""
    from ..data import load_dataset, write_idx

    data = load_dataset(dataset, compact=True, progress=False)
    directory.mkdir(parents=True)
    for split, x, y in (("train", data.x_train, data.y_train), ("t10k", data.x_test, data.y_test)):
        x = x[:n] if x.dtype == np.uint8 else np.round(x[:n] * 255).astype(np.uint8)
        write_idx(directory / f"{split}-images-idx3-ubyte", x.reshape(n, 28, 28))
        write_idx(directory / f"{split}-labels-idx1-ubyte", y[:n].astype(np.uint8))
    return directory


# ------------------------------------------------------------------------ gather


def gather(dataset="fashion-mnist", rounds=3):
    """{batch: {"uint8": [s per gather...], "float32": [...]}} over ``rounds``."""
    from ..data import load_dataset

    compact = load_dataset(dataset, dtype=np.float32, compact=True, progress=False)
    whole = load_dataset(dataset, dtype=np.float32, progress=False)
    n = compact.x_train.shape[0]
    rng = np.random.default_rng(0)
    out = {}
    for batch in GATHER_BATCHES:
        rows = [rng.integers(0, n, batch) for _ in range(GATHERS)]
        times = {"uint8": [], "float32": []}
        for _ in range(rounds):
            for label, fn in (("uint8", compact.train_features), ("float32", whole.train_features)):
                t0 = time.perf_counter()
                for r in rows:
                    fn(r)
                times[label].append((time.perf_counter() - t0) / GATHERS)
        out[batch] = times
    return out


def _spread(xs, scale=1.0):
    return (f"{statistics.median(xs) * scale:.1f} [{min(xs) * scale:.1f}, "
            f"{max(xs) * scale:.1f}]")


def report(result):
    mem = result.get("memory")
    if mem:
        base = mem[BASELINE]["node_mb"]
        print(f"node memory (sum of the ranks' Pss, MB) at -n {len(mem['shared']['per_rank_mb'])}"
              f" on {result['dataset']}:")
        peak_base = mem[BASELINE]["peak_node_mb"]
        print(f"  {'run':<18} {'steady, per rank':<24} {'node':>6} {'data':>6}   "
              f"{'peak, per rank':<24} {'node':>6} {'data':>6}")
        for label, r in mem.items():
            cells = []
            for key, b in (("", base), ("peak_", peak_base)):
                per = ", ".join(f"{x:.0f}" for x in r[f"{key}per_rank_mb"])
                share = r[f"{key}node_mb"] - b if label != BASELINE else 0
                cells.append(f"{per:<24} {r[f'{key}node_mb']:>6.0f} {share:>6.0f}")
            print(f"  {label:<18} {'   '.join(cells)}")
        s, p = (mem[k]["node_mb"] - base for k in ("shared", "private"))
        print(f"  the data's share of node memory (steady): private / shared = {p / s:.1f}x")
    print(f"gather of one step's features on {result['dataset']} (us, median [min, max] of "
          f"{result['rounds']} rounds):")
    for batch, t in result["gather"].items():
        u, f = t["uint8"], t["float32"]
        ratio = [a / b for a, b in zip(u, f, strict=True)]
        print(f"  batch {batch:>4}: uint8 + divide {_spread(u, 1e6)}, float32 index "
              f"{_spread(f, 1e6)}; uint8 / float32 {_spread(ratio)}")


def available_dataset(preferred="fashion-mnist"):
    """``preferred`` where its IDX files are found here (no download), else synthetic."""
    from ..data.datasets import locate_idx

    return preferred if locate_idx(preferred)[0] is not None else "synthetic"


def measure(dataset="fashion-mnist", ranks=4, rounds=3, with_memory=True):
    result = {"dataset": dataset, "rounds": rounds,
              "gather": gather(dataset, rounds)}
    if with_memory:
        result["memory"] = memory(dataset, ranks)
    return result


def main(argv=None):
    args = parse_args(argv)
    result = measure(args.dataset, args.ranks, args.rounds, not args.no_memory)
    return show(result, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
