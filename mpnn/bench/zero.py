"""ZeRO stages side by side: speed and each rank's model-state bytes at two ranks.

    python -m mpnn.bench.zero [--rounds 3] [--batch-size 256] [--no-wide]
    python -m mpnn.bench.zero --ledger      # measured bytes vs the formula at -n 2 and -n 4

(also a section of ``python -m mpnn.bench``). Runs ``python -m mpnn.train`` on
the bundled digits data (float32, Adam, one thread per rank) under ``mpirun
-n 2`` with ``--zero 0``, ``1``, ``2`` and ``3``, every stage once per round,
on the default model (``--hidden 256,128,64``: 58,442 parameters; ``--epochs
21``, as one of its epochs is 6 steps of some 15 ms in all) and on a wide one
(``--hidden 1024 x 11``: 10,572,810; ``--epochs 3``), all at ``--batch-size
256``: about 2 minutes on the idle 2-core machine. For each it prints the
median [min, max] over rounds of the training samples/s (a run's figure: the
median of its epochs after the first), its ratio to stage 0, and, from the
runs' metrics (``rank_bytes``), each rank's MB of parameters, gradients,
optimizer state and communication buffers, the model states' total
(parameters + gradients + optimizer) with its ratio to stage 0, and the total
by the ZeRO paper's formula (``rank_bytes_formula``,
``parallel.zero.zero_formula``). For float32 Adam (4 bytes an element, two
optimizer arrays) with Ψ parameters over N ranks:

    stage 0   16Ψ               every rank holds everything
    stage 1   4Ψ + 4Ψ + 8Ψ/N    the optimizer state sharded
    stage 2   4Ψ + 12Ψ/N        the gradients too
    stage 3   16Ψ/N             the parameters too

The formula counts none of the communication buffers, which the table gives
apart ("comm", ``Zero.memory``): at stage 1 the gradient shard the
reduce-scatter receives into (4Ψ/N; backward still writes the whole
gradient, under "grads"), at stage 2 the ring that holds the largest
gradient bucket (the reduce-scatter's input: backward writes the next bucket
beside it where the two fit, else waits for its sum), at stage 3 that and a
ring of the two largest consecutive layers' parameters (each layer
all-gathered before its forward and its backward, the next one's gather
started early).

``--ledger`` checks the bytes instead of timing: one step (``--batch-size
1437``, the whole digits training set; ``--epochs 1``) of every stage at
``mpirun -n 2`` and ``-n 4`` on both models, and for each rank the measured
model-state bytes minus the formula's, which must lie within the padding:
the flat buffer is cut into N equal slices of ⌈Ψ/N⌉ elements, so the last
rank's holds padding = ⌈Ψ/N⌉·N − Ψ fewer real ones (stages 1 and 2 also
keep the whole parameters padded to ⌈Ψ/N⌉·N for the Allgather). Each of a
rank's 2 + K model-state arrays is off by at most the padding, so the check
is |measured − formula| ≤ (2 + K)·4·padding bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from .dp_worker import find_mpirun, train_records

STAGES = (0, 1, 2, 3)
DEFAULT_HIDDEN = "256,128,64"
WIDE_HIDDEN = ",".join(["1024"] * 11)  # 10,572,810 parameters on digits' 64 features
DIGITS_FEATURES, DIGITS_CLASSES, DIGITS_TRAIN = 64, 10, 1437
ITEMSIZE, ADAM_STATES = 4, 2  # float32, Adam's two moment arrays
EPOCHS = {DEFAULT_HIDDEN: 21, WIDE_HIDDEN: 3}  # per run; the first epoch is not timed
STATE_KINDS = ("params", "grads", "optimizer")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpnn.bench.zero",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=EPOCHS[DEFAULT_HIDDEN],
                   help="per run of the default model (the first is not timed)")
    p.add_argument("--wide-epochs", type=int, default=EPOCHS[WIDE_HIDDEN],
                   help="per run of the wide model (the first is not timed)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-wide", action="store_true",
                   help=f"only the default model (not --hidden {_short(WIDE_HIDDEN)})")
    p.add_argument("--ledger", action="store_true",
                   help="check the measured bytes against the formula at -n 2 and -n 4 "
                        "(one step per run) instead of timing")
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def n_params(hidden, features=DIGITS_FEATURES, classes=DIGITS_CLASSES):
    """Ψ of the MLP features-hidden-classes: every layer's weights and biases."""
    sizes = [features, *(int(w) for w in hidden.split(",")), classes]
    return sum((i + 1) * o for i, o in zip(sizes, sizes[1:], strict=False))


def padding(numel, ranks):
    """Elements the last shard lacks: ⌈Ψ/N⌉·N − Ψ."""
    return -(-numel // ranks) * ranks - numel


def _short(hidden):
    """"1024,1024,...,1024" -> "1024 x 11"; anything else unchanged."""
    widths = hidden.split(",")
    return f"{widths[0]} x {len(widths)}" if len(widths) > 3 and len(set(widths)) == 1 else hidden


def model_states(bytes_by_kind):
    """Per rank: parameters + gradients + optimizer state."""
    return [sum(v) for v in zip(*(bytes_by_kind[k] for k in STATE_KINDS), strict=True)]


def _common(hidden, batch, epochs, stage):
    return ["--dataset", "digits", "--hidden", hidden, "--batch-size", str(batch), "--epochs",
            str(epochs), "--optimizer", "adam", "--dtype", "float32", "--threads", "1", "--quiet",
            "--zero", str(stage)]


def measure(models=None, batch=256, rounds=3, ranks=2):
    """models: {hidden: epochs per run} (default ``EPOCHS``). {"models": {hidden: {"params":
    Ψ, "epochs": ..., "stages": {stage: {"samples_per_s": [per round], "rank_bytes": ...,
    "rank_bytes_formula": ...}}}}, ...}, or why not (a string). Every round runs every
    model's stages in turn."""
    models = dict(EPOCHS if models is None else models)
    mpirun = find_mpirun()
    if mpirun is None:
        return "mpirun not found"
    out = {"ranks": ranks, "batch": batch, "rounds": rounds,
           "models": {h: {"params": n_params(h), "epochs": e,
                          "stages": {str(s): {"samples_per_s": []} for s in STAGES}}
                      for h, e in models.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for hidden, epochs in models.items():
                for stage in STAGES:
                    records = train_records(_common(hidden, batch, epochs, stage),
                                            Path(tmp) / f"z{r}.jsonl", ranks, mpirun,
                                            "mpnn.bench.zero")
                    timed = records[1:] or records
                    row = out["models"][hidden]["stages"][str(stage)]
                    row["samples_per_s"].append(
                        statistics.median(rec["samples_per_s"] for rec in timed))
                    row["rank_bytes"] = records[-1]["rank_bytes"]
                    row["rank_bytes_formula"] = records[-1]["rank_bytes_formula"]
    return out


def _mb(values):
    """MB per rank: one figure when every rank holds the same, else rank 0/rank 1/..."""
    if len(set(values)) == 1:
        return f"{values[0] / 1e6:.3g}"
    return "/".join(f"{v / 1e6:.3g}" for v in values)


def report(result):
    """The table ``python -m mpnn.bench`` and ``mpnn.bench.zero`` print."""
    if isinstance(result, str):
        print(f"ZeRO: not measured ({result})")
        return
    print(f"ZeRO at mpirun -n {result['ranks']}: digits, --batch-size {result['batch']}, "
          f"float32 Adam, one thread per rank, the first epoch not timed; "
          f"median [min, max] of {result['rounds']} rounds; MB per rank (one figure: every "
          f"rank's); states = params + grads + optimizer, measured and by the formula; "
          f"x st.0 of the states: the largest rank's")
    for hidden, m in result["models"].items():
        print(f"\n--hidden {_short(hidden)} ({m['params']:,} parameters), --epochs {m['epochs']}")
        print(f"{'stage':5s} {'samples/s':>26s} {'x st.0':>7s} {'params':>8s} {'grads':>8s} "
              f"{'optim.':>8s} {'comm':>8s} {'states':>8s} {'formula':>8s} {'x st.0':>7s}")
        base = m["stages"]["0"]
        base_rate = statistics.median(base["samples_per_s"])
        base_states = max(model_states(base["rank_bytes"]))
        for stage, r in m["stages"].items():
            s, b = r["samples_per_s"], r["rank_bytes"]
            med, states = statistics.median(s), model_states(b)
            print(f"{stage:5s} {f'{med:,.0f} [{min(s):,.0f}, {max(s):,.0f}]':>26s} "
                  f"{med / base_rate:7.2f} {_mb(b['params']):>8s} {_mb(b['grads']):>8s} "
                  f"{_mb(b['optimizer']):>8s} {_mb(b['comm']):>8s} {_mb(states):>8s} "
                  f"{_mb(model_states(r['rank_bytes_formula'])):>8s} "
                  f"{max(states) / base_states:7.2f}")


def ledger(models=(DEFAULT_HIDDEN, WIDE_HIDDEN), ranks=(2, 4), stages=STAGES):
    """{hidden: {"params": Ψ, "runs": {N: {stage: {"measured", "formula", "diff": [bytes per
    rank], "padding": elements, "bound": bytes, "ok"}}}}}, or why not (a string). One step
    of every stage (the whole training set as one batch)."""
    mpirun = find_mpirun()
    if mpirun is None:
        return "mpirun not found"
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for hidden in models:
            numel = n_params(hidden)
            runs = {}
            for n in ranks:
                for stage in stages:
                    (rec,) = train_records(_common(hidden, DIGITS_TRAIN, 1, stage),
                                           Path(tmp) / "l.jsonl", n, mpirun, "mpnn.bench.zero")
                    measured = model_states(rec["rank_bytes"])
                    formula = model_states(rec["rank_bytes_formula"])
                    diff = [a - b for a, b in zip(measured, formula, strict=True)]
                    pad = padding(numel, n) if stage else 0
                    bound = (2 + ADAM_STATES) * ITEMSIZE * pad
                    runs.setdefault(str(n), {})[str(stage)] = {
                        "measured": measured, "formula": formula, "diff": diff, "padding": pad,
                        "bound": bound, "ok": all(abs(d) <= bound for d in diff)}
            out[hidden] = {"params": numel, "runs": runs}
    return out


def ledger_report(result):
    """Measured model-state bytes against the formula, rank by rank."""
    if isinstance(result, str):
        print(f"ZeRO ledger: not measured ({result})")
        return
    print("ZeRO ledger: model-state bytes per rank (params + grads + optimizer, float32 Adam), "
          "measured by mpnn.train after one step vs the ZeRO formula; diff = measured - formula "
          "(bytes, rank order), within (2+K)·4·padding = 16·padding bytes")
    print(f"{'model':>10s} {'N':>2s} {'stage':>5s} {'padding':>7s} {'measured MB':>12s} "
          f"{'formula MB':>11s} {'diff bytes':>22s} {'ok':>3s}")
    for hidden, m in result.items():
        for n, stages in m["runs"].items():
            for stage, r in stages.items():
                diff = "/".join(f"{d:+d}" for d in r["diff"])
                print(f"{_short(hidden):>10s} {n:>2s} {stage:>5s} {r['padding']:7d} "
                      f"{max(r['measured']) / 1e6:12.3f} {max(r['formula']) / 1e6:11.3f} "
                      f"{diff:>22s} {'yes' if r['ok'] else 'NO':>3s}")


def main(argv=None):
    args = parse_args(argv)
    models = {DEFAULT_HIDDEN: args.epochs, WIDE_HIDDEN: args.wide_epochs}
    if args.no_wide:
        del models[WIDE_HIDDEN]
    if args.ledger:
        result = ledger(models)
        ledger_report(result)
        ok = isinstance(result, str) or all(  # no mpirun: said, and nothing failed
            r["ok"] for m in result.values() for st in m["runs"].values() for r in st.values())
    else:
        result = measure(models, args.batch_size, args.rounds)
        report(result)
        ok = True
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
