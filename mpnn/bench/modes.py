"""The wide-model case: one model trained serially and split three ways at two ranks.

    python -m mpnn.bench.modes [--hidden 2048,2048,2048] [--batch-size 256] [--rounds 3]

(also the last section of ``python -m mpnn.bench``). Runs ``python -m
mpnn.train`` on the bundled digits data (float32, one thread per rank, SGD),
serially and under ``mpirun -n 2`` with ``--tp 2``, ``--dp 2`` and ``--pp 2
--micro-batches 4``, every mode once per round, and prints for each the
median [min, max] over rounds of the training samples/s (of the epochs after
the first) and, from the runs' metrics, each rank's bytes of parameters,
gradients, optimizer state and activations, and the bytes each rank hands
to MPI per step:

* ``--tp``: the tp Allreduces' payload (measured; the metrics also hold the
  formula ``TensorParallelMLP.tp_bytes_formula``, and they agree);
* ``--dp``: the gradient Allreduce's payload, the whole flat gradient;
* ``--pp``: the activations (stage 0) or gradients (stage 1) of the rows of
  a step across the cut, batch x boundary width x 4 bytes.

A ring Allreduce of P bytes over N ranks sends 2(N−1)/N·P per rank; the
table gives P.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from .dp_worker import find_mpirun, train_records

MODES = {"serial": (1, []), "--tp 2": (2, ["--tp", "2"]), "--dp 2": (2, ["--dp", "2"]),
         "--pp 2": (2, ["--pp", "2", "--micro-batches", "4"])}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpnn.bench.modes",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", default="2048,2048,2048", help="hidden widths")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3, help="per run (the first is not timed)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def sent_per_step(mode, record, hidden, batch):
    """Bytes each rank hands to MPI per step (see the module docstring), per rank."""
    ranks = len(record["rank_bytes"]["params"])
    if mode == "--tp 2":
        return record["tp_allreduce_bytes_per_step"]
    if mode == "--dp 2":
        return record["rank_bytes"]["grads"]
    if mode == "--pp 2":
        return [batch * _pp_cut_width(hidden) * 4] * ranks
    return [0] * ranks


def _pp_cut_width(hidden):
    """The width of the activations between the two stages (the layers are split in
    FLOP balance: the cut's width is a hidden width; with equal widths any is it)."""
    return hidden[len(hidden) // 2] if len(set(hidden)) > 1 else hidden[0]


def measure(hidden="2048,2048,2048", batch=256, epochs=3, rounds=3):
    """{mode: {"samples_per_s": [per round], "rank_bytes": ..., "sent_per_step": [...]}}."""
    mpirun = find_mpirun()
    if mpirun is None:
        return "mpirun not found"
    widths = [int(w) for w in hidden.split(",")]
    common = ["--dataset", "digits", "--hidden", hidden, "--batch-size", str(batch), "--epochs",
              str(epochs), "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.01",
              "--dtype", "float32", "--threads", "1", "--quiet"]
    out = {mode: {"samples_per_s": []} for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for mode, (ranks, opts) in MODES.items():
                records = train_records(common + opts, Path(tmp) / f"m{r}.jsonl", ranks, mpirun,
                                        "mpnn.bench.modes")
                timed = records[1:] or records
                out[mode]["samples_per_s"].append(
                    statistics.median(rec["samples_per_s"] for rec in timed))
                last = records[-1]
                out[mode]["rank_bytes"] = last["rank_bytes"]
                out[mode]["sent_per_step"] = sent_per_step(mode, last, widths, batch)
                if mode == "--tp 2":
                    out[mode]["tp_formula"] = last["tp_allreduce_bytes_per_step_formula"]
    return out


def report(result, hidden, batch):
    """The table ``python -m mpnn.bench`` and ``mpnn.bench.modes`` print."""
    if isinstance(result, str):
        print(f"wide model: not measured ({result})")
        return
    print(f"wide model: digits, --hidden {hidden}, --batch-size {batch}, float32, SGD momentum, "
          f"one thread per rank; MB per rank (rank 0, rank 1)")
    print(f"{'mode':8s} {'samples/s':>26s} {'x serial':>9s} {'params':>13s} {'grads':>13s} "
          f"{'optimizer':>13s} {'activations':>13s} {'sent/step':>13s}")
    serial = statistics.median(result["serial"]["samples_per_s"])
    for mode, r in result.items():
        s = r["samples_per_s"]
        med = statistics.median(s)
        mb = {k: "/".join(f"{v / 1e6:.1f}" for v in vals) for k, vals in r["rank_bytes"].items()}
        sent = "/".join(f"{v / 1e6:.2f}" for v in r["sent_per_step"])
        print(f"{mode:8s} {f'{med:,.0f} [{min(s):,.0f}, {max(s):,.0f}]':>26s} "
              f"{med / serial:9.2f} {mb['params']:>13s} {mb['grads']:>13s} "
              f"{mb['optimizer']:>13s} {mb['activations']:>13s} {sent:>13s}")


def main(argv=None):
    args = parse_args(argv)
    result = measure(args.hidden, args.batch_size, args.epochs, args.rounds)
    report(result, args.hidden, args.batch_size)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
