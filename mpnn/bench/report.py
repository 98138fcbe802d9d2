"""What the benchmark prints and writes: the table, the JSON file, the targets.

Every figure is a median over repeats with its min–max range next to it
(ratios: the median and range of the per-repeat ratios). The targets are the
speed mpnn aims for on a CPU, each judged on this run's figures and said in
words next to its number.
"""

from __future__ import annotations

import json
from pathlib import Path

from .runners import MOMENTUM, SIZES

# name (also the JSON key) -> (goal, what it is)
TARGETS = {
    "numba/torch at batch 64": (1.5, "numba's samples/s over PyTorch's, batch 64, same threads"),
    "numba/torch at batch 256": (1.2, "numba's samples/s over PyTorch's, batch 256, same threads"),
    "step/GEMM rate at batch 1024": (0.70, "a numba step's executed FLOP rate over BLAS "
                                           "sgemm's at batch 1024"),
    "DP -n 2 per-rank efficiency": (0.85, "per-rank samples/s at mpirun -n 2 (overlapped "
                                          "sum) over one rank's"),
}


def header(threads, repeats, backends, n_rows):
    print(f"mpnn bench: MLP {'-'.join(map(str, SIZES))}, relu, cross-entropy, SGD momentum "
          f"{MOMENTUM}, float32, {threads} thread(s) everywhere; backends {', '.join(backends)}.")
    print(f"Data: mpnn.train's synthetic dataset ({n_rows:,} rows of MNIST's shape in host "
          "memory, a fresh order each epoch). Every step gathers its batch's rows from it: mpnn "
          "runs the trainer's own step (mpnn.runtime.loop.train_batch), PyTorch gathers the same "
          "rows from the same arrays.")
    print(f"Medians of {repeats} repeats [min–max]; ratios paired repeat by repeat (each pair "
          "timed back to back); warm-up excluded.", flush=True)


def _range(median, lo, hi, spec, unit=""):
    """``median`` with its [min–max] range, e.g. "1.23x [1.20–1.25]"."""
    return f"{median:{spec}}{unit} [{lo:{spec}}–{hi:{spec}}]"


def gemm_line(threads, gemm, square):
    print(f"float32 GEMM rate (NumPy BLAS sgemm, {threads} thread(s)): {gemm:.1f} GFLOP/s "
          f"at 1024x784 @ 784x256 (the step's largest), {square:.1f} at 1024^3", flush=True)


def batch_line(batch, medians, gemm_gflops):
    print(f"  batch {batch}: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in medians.items())
          + f"; sgemm ({batch}x784 @ 784x256) {gemm_gflops:.1f} GFLOP/s", flush=True)


def table(batches, backends, report):
    """samples/s per backend and batch, then the ratios, each with its range."""
    col = 27
    print("\nsamples/s".ljust(18) + "".join(f"batch {b}".rjust(col) for b in batches))
    for name in backends:
        cells = (_range(report["samples_per_s"][str(b)][name],
                        *report["samples_per_s_range"][str(b)][name], ",.0f") for b in batches)
        print(f"{name:17s}" + "".join(c.rjust(col) for c in cells))
    for name, by_batch in report["ratios"].items():
        cells = (_range(by_batch[str(b)], *report["ratio_ranges"][name][str(b)], ".2f", "x")
                 for b in batches)
        print(f"{name:17s}" + "".join(c.rjust(col) for c in cells))


def step_rates(flops):
    if not flops:
        return
    print("\nnumba training step: GFLOP/s and fraction of the sgemm rate measured alongside it")
    for b, f in flops.items():
        print(f"  batch {int(b):5d}: executed {f['executed_gflops']:6.1f} = "
              f"{_range(f['executed_fraction'], *f['executed_fraction_range'], '5.1%')} of "
              f"{f['gemm_gflops']:.1f}; nominal 6·B·ΣIO {f['nominal_gflops']:6.1f} = "
              f"{f['nominal_fraction']:5.1%}")


def data_parallel_intro(ranks, batch, threads):
    print(f"\ndata parallel: mpirun -n {ranks} python -m mpnn.bench.dp_worker, {batch} rows per "
          f"rank, numba, {threads} thread(s) per rank ...", flush=True)


def data_parallel(dp, main_table_single):
    """The per-rank samples/s of each set-up, its efficiency and the hidden Allreduce."""
    if isinstance(dp, str):
        print(f"  skipped: {dp}")
        return
    if dp.get("thread_warning"):
        print(f"  {dp['thread_warning']}")
    s = dp["single"]
    print(f"  single rank, batch {dp['rows_per_rank']}, measured in the same job while the other "
          f"rank sleeps: {_range(s['per_rank_samples_s'], *s['per_rank_samples_s_range'], ',.0f')}"
          f" samples/s" + (f" (main table: {main_table_single:,.0f})" if main_table_single else ""))
    for mode, label in (("overlapped", f"overlapped bucketed ({dp['bucket_mb']} MB buckets)"),
                        ("blocking", "one blocking Allreduce"),
                        ("none", "no gradient sum (compute only)")):
        r = dp[mode]
        print(f"  per rank, {label:38s} "
              f"{_range(r['per_rank_samples_s'], *r['per_rank_samples_s_range'], ',.0f')} "
              f"samples/s = {_range(r['efficiency'], *r['efficiency_range'], '.1%')}   "
              f"wait after backward {r['wait_ms']:.3f} ms")
    blocking, exposed = dp["blocking"]["wait_ms"], dp["overlapped"]["wait_ms"]
    print(f"  Allreduce of {dp['grad_mb']:.2f} MB: {blocking:.3f} ms blocking, {exposed:.3f} ms "
          f"left after backward when overlapped (buckets {dp['buckets']}): "
          f"{dp['hidden_ms']:.3f} ms hidden behind backward"
          + (f" ({dp['hidden_ms'] / blocking:.0%})" if blocking > 0 else ""))
    if not dp["replicas_identical"]:
        print("  ERROR: the replicas ended with different parameters")


def judge_targets(report):
    """{name: {value, range, target, met, what}} for the targets this run measured."""
    targets = {}

    def add(name, value, value_range):
        goal, what = TARGETS[name]
        targets[name] = {"value": float(value), "range": list(value_range), "target": goal,
                         "met": bool(value >= goal), "what": what}

    ratios, ranges = report["ratios"].get("numba/torch", {}), report["ratio_ranges"]
    for b in ("64", "256"):
        if b in ratios:
            add(f"numba/torch at batch {b}", ratios[b], ranges["numba/torch"][b])
    flops = report["numba_step_flops"]
    if "1024" in flops:
        add("step/GEMM rate at batch 1024", flops["1024"]["executed_fraction"],
            flops["1024"]["executed_fraction_range"])
    dp = report["data_parallel"]
    if isinstance(dp, dict) and dp["ranks"] == 2:
        add("DP -n 2 per-rank efficiency", dp["overlapped"]["efficiency"],
            dp["overlapped"]["efficiency_range"])
    return targets


def targets_section(targets):
    if not targets:
        return
    print("\ntargets: the speed mpnn aims for on a CPU")
    for t in targets.values():
        print(f"  {t['what']:70s} {_range(t['value'], *t['range'], '.2f')} "
              f"(target {t['target']:.2f}): {'met' if t['met'] else 'MISSED'}")


def write_json(path, report):
    Path(path).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")


def show(result, report, json_path=None):
    """A sub-benchmark's end: ``report(result)`` printed, the figures as JSON if asked."""
    report(result)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))
    return 0
