"""``python -m mpnn.bench``: how fast mpnn trains, side by side with PyTorch.

Trains the 784-256-128-64-10 ReLU MLP (cross-entropy, SGD with momentum 0.9,
float32) on ``mpnn.train``'s synthetic dataset and prints, measured in one run:

* samples/s of each backend (numpy, numba, cupy when a GPU is usable) and of
  PyTorch on the CPU when it is installed, at each batch size, all with the
  same thread count. mpnn's figure is the step ``python -m mpnn.train`` runs,
  the gather of each batch's rows included, so it is the samples/s the
  trainer reports (the trainer also checks the parameters for NaN/inf after
  every step, a sum of about 40 µs: its epochs ran about 3% below this figure
  at batch 256 when measured side by side); PyTorch gathers the same rows the
  same way (see
  ``mpnn.bench.runners`` for what each side includes). The backends take
  turns within every repeat; medians over repeats with their min–max range,
  warm-up (and numba's first compile) excluded;
* the achieved GFLOP/s of a numba training step against this machine's
  float32 GEMM rate measured alongside it (BLAS sgemm of the step's largest
  shape, timed in the same interleaved rounds);
* data-parallel efficiency at ``mpirun -n 2`` with 256 rows per rank
  (``python -m mpnn.bench.dp_worker``, launched here), and how much of the
  gradient Allreduce the overlapped bucketed sum hides behind backward;
* the wide-model case (``mpnn.bench.modes``): hidden 2048 x 3 at batch 256
  trained serially and with ``--tp 2``, ``--dp 2``, ``--pp 2`` at two ranks,
  with each rank's memory and bytes sent per step;
* the ZeRO stages (``mpnn.bench.zero``): ``--zero 0`` to ``3`` at two ranks on
  the default model and a 10.6M-parameter one (hidden 1024 x 11), Adam, with
  samples/s and each rank's model-state bytes, measured and by the formula;
* the sweep (``mpnn.bench.sweep``): 12 trials whose costs differ tenfold,
  static against dynamic scheduling at -n 4 (groups of 1 and 2) and -n 2,
  makespans against the lower bound;
* one node's shared memory (``mpnn.bench.node``): node memory at -n 4 on
  Fashion-MNIST (or synthetic without it) with the dataset shared per node
  and per rank, and the gather of uint8 against float32 storage;
* the flat and the hierarchical gradient Allreduce (``mpnn.bench.hosts``):
  step time at -n 2 on this machine and, as root, step time and bytes sent
  between two network-namespace hosts per step;
* the watchdog's cost (``mpnn.bench.watchdog``): samples/s at batch 64 with
  ``--timeout 0`` against the default, serially and at two ranks;
* the targets mpnn aims for, met or missed.

FLOPs of a step: the nominal count is 6·B·Σ I·O (forward, input gradient,
weight gradient of every layer); the executed count leaves out the first
layer's input gradient, which nobody computes (2·B·784·256 of the nominal).
Both are printed; the GEMM-rate target is judged on the executed count.

    python -m mpnn.bench [--threads 1] [--repeats 9] [--batches 64,256,1024] [--json PATH]
"""

from __future__ import annotations

import argparse

from mpi4py import MPI

from ..runtime.threads import configure_threads
from . import report as out
from .dp_worker import dp_threads, launch
from .measure import GemmReference, gemm_rate, interleaved, paired_ratios, step_rate, summary
from .runners import SIZES, TRAIN_ROWS, available_backends, bench_data, make_runner


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _batch_sizes(text):
    """"64,256,1024" -> [64, 256, 1024]."""
    try:
        return [_positive_int(b.strip()) for b in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError("expected comma-separated positive batch sizes "
                                         f"such as 64,256,1024, got {text!r}") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpnn.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--threads", type=_positive_int, default=1, help="threads for every backend (default 1)")
    a("--repeats", type=_positive_int, default=9, help="timed repeats per measurement (median)")
    a("--batches", type=_batch_sizes, default="64,256,1024", help="comma-separated batch sizes")
    a("--backends", default="auto",
      help="comma-separated from numpy,numba,cupy,torch,torch-cuda (auto: all that are usable)")
    a("--block-s", type=float, default=0.15,
      help="seconds of training per timed block (sets the steps per repeat)")
    a("--rows", type=_positive_int, default=TRAIN_ROWS,
      help=f"training rows of the synthetic dataset (default {TRAIN_ROWS:,}, "
           "what mpnn.train --dataset synthetic trains on)")
    a("--bucket-mb", type=float, default=0.1,
      help="bucket size of the overlapped Allreduce in the DP measurement "
           "(default 0.1, mpnn.train's)")
    a("--no-dp", action="store_true", help="skip the mpirun -n 2 measurement")
    a("--dp-ranks", type=_positive_int, default=2, help="ranks of the DP measurement")
    a("--dp-batch", type=_positive_int, default=256, help="rows per rank in the DP measurement")
    a("--no-wide", action="store_true",
      help="skip the wide-model case (serial, --tp 2, --dp 2, --pp 2; python -m mpnn.bench.modes)")
    a("--no-zero", action="store_true",
      help="skip the ZeRO stages (--zero 0-3 at two ranks; python -m mpnn.bench.zero)")
    a("--no-sweep", action="store_true",
      help="skip the sweep's scheduling (static vs dynamic; python -m mpnn.bench.sweep)")
    a("--no-node", action="store_true",
      help="skip the shared dataset's node memory and gather (python -m mpnn.bench.node)")
    a("--no-hosts", action="store_true",
      help="skip flat vs hierarchical Allreduce on one node and two namespace hosts "
           "(python -m mpnn.bench.hosts)")
    a("--no-watchdog", action="store_true",
      help="skip the watchdog's cost (--timeout 0 vs the default; python -m "
           "mpnn.bench.watchdog)")
    a("--no-consistency", action="store_true",
      help="skip bsp/ssp/asp through a parameter server, with and without a straggler "
           "(python -m mpnn.bench.consistency)")
    a("--json", metavar="PATH", help="also write the figures as JSON")
    return p.parse_args(argv)


def ratio_pairs(backends):
    """(fast, other) pairs the table divides: each GPU/compiled backend over the others."""
    return [(fast, other) for fast in ("cupy", "numba")
            for other in ("torch-cuda", "torch", "numpy") if fast in backends and other in backends]


def main(argv=None):
    args = parse_args(argv)
    batches = args.batches
    backends = available_backends(args.backends)
    with_torch = any(b.startswith("torch") for b in backends)
    configure_threads(MPI.COMM_SELF, args.threads, torch=with_torch)
    data = bench_data(args.rows)
    out.header(args.threads, args.repeats, backends, data.x_train.shape[0])
    report = {"threads": args.threads, "repeats": args.repeats, "sizes": list(SIZES),
              "rows": data.x_train.shape[0], "backends": backends}

    gemm, square = gemm_rate(args.repeats), gemm_rate(args.repeats, (1024, 1024, 1024))
    report["gemm_gflops"] = {"1024x784x256": gemm, "1024x1024x1024": square}
    out.gemm_line(args.threads, gemm, square)

    raw = {}
    for batch in batches:
        runners = [make_runner(b, batch, data) for b in backends] + [GemmReference(batch)]
        raw[batch] = interleaved(runners, args.repeats, args.block_s)
        s = {name: summary(v) for name, v in raw[batch].items()}
        report.setdefault("samples_per_s", {})[str(batch)] = {
            n: v["median"] for n, v in s.items() if n != "gemm"}
        report.setdefault("samples_per_s_range", {})[str(batch)] = {
            n: [v["min"], v["max"]] for n, v in s.items() if n != "gemm"}
        report.setdefault("gemm_gflops_interleaved", {})[str(batch)] = \
            s["gemm"]["median"] * GemmReference.flops_per_sample / 1e9
        out.batch_line(batch, report["samples_per_s"][str(batch)],
                       report["gemm_gflops_interleaved"][str(batch)])
    report["samples_per_s_per_repeat"] = {str(b): v for b, v in raw.items()}
    report["ratios"], report["ratio_ranges"] = {}, {}
    for fast, other in ratio_pairs(backends):
        name = f"{fast}/{other}"
        for b in batches:
            r = summary(paired_ratios(raw[b], fast, other))
            report["ratios"].setdefault(name, {})[str(b)] = r["median"]
            report["ratio_ranges"].setdefault(name, {})[str(b)] = [r["min"], r["max"]]
    out.table(batches, backends, report)
    report["numba_step_flops"] = ({str(b): step_rate(raw[b], b) for b in batches}
                                  if "numba" in backends else {})
    out.step_rates(report["numba_step_flops"])

    dp = None
    if not args.no_dp and "numba" in backends:
        out.data_parallel_intro(args.dp_ranks, args.dp_batch,
                                dp_threads(args.threads, args.dp_ranks))
        dp = launch(args.dp_ranks, args.threads, args.repeats, args.block_s, args.bucket_mb,
                    args.dp_batch, args.rows)
        table_single = report["samples_per_s"].get(str(args.dp_batch), {}).get("numba")
        if isinstance(dp, dict):
            dp["main_table_single_samples_s"] = table_single
        out.data_parallel(dp, table_single)
    report["data_parallel"] = dp

    if not args.no_wide:  # one model trained serially and split three ways at two ranks
        from . import modes

        report["wide_model"] = modes.measure()
        print()
        modes.report(report["wide_model"], "2048,2048,2048", 256)

    if not args.no_zero:  # --zero 0-3 at two ranks, the default and a 10M-parameter model
        from . import zero

        report["zero"] = zero.measure()
        print()
        zero.report(report["zero"])

    if not args.no_sweep:  # load balancing: a skewed sweep, static vs dynamic
        from . import sweep

        report["sweep"] = sweep.measure()
        print()
        sweep.report(report["sweep"])

    if not args.no_node:  # the dataset once per node: node memory, the gather
        from . import node

        report["node"] = node.measure(node.available_dataset())
        print()
        node.report(report["node"])

    if not args.no_hosts:  # flat vs hierarchical: one node, two namespace hosts (root)
        from . import hosts

        report["hosts"] = hosts.measure()
        print()
        hosts.report(report["hosts"])

    if not args.no_watchdog:  # what --timeout costs at batch 64
        from . import watchdog

        report["watchdog"] = watchdog.measure()
        report["watchdog"]["parts"] = watchdog.parts(report["watchdog"])
        print()
        watchdog.report(report["watchdog"])

    if not args.no_consistency:  # the consistency models' throughput and accuracy
        from . import consistency

        report["consistency"] = consistency.measure()
        print()
        consistency.report(report["consistency"])

    report["targets"] = out.judge_targets(report)
    out.targets_section(report["targets"])
    if args.json:
        out.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
