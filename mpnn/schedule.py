"""``python -m mpnn.schedule``: print (and optionally plot) a pipeline schedule.

    python -m mpnn.schedule --pp 4 --micro-batches 8 --schedule 1f1b
    python -m mpnn.schedule --pp 4 --micro-batches 8 --schedule gpipe --plot gpipe.png
    python -m mpnn.schedule --pp 4 --micro-batches 8 --schedule interleaved-1f1b --virtual-stages 2
    python -m mpnn.schedule --pp 2 --micro-batches 8 --schedule zb-h1 --stage-costs 1:1:1,1:1:1
    python -m mpnn.schedule --costs-from run.jsonl --schedule zb-h1      # measured costs, what if
    python -m mpnn.schedule --pp 2 --sizes 784,512,256,10 --micro-batch-rows 32 --dtype float32

Builds the schedule with ``mpnn.parallel.pipeline_orders``, dry-runs it with
``mpnn.parallel.simulator`` (unit cost per F, B and W, free communication) and
prints every stage's action list, the stage x slot grid, the simulated bubble
next to the published formula for that schedule and the peak number of
micro-batches whose activations are alive on each stage. With costs
(``--stage-costs``, ``--costs-from``) and ``--latency`` it also runs the timed
simulator and predicts the step time and bubble; with ``--sizes`` and
``--micro-batch-rows`` the peak activation bytes per stage. No MPI is involved.

This module is the command line (its options and ``main``); ``mpnn.schedule_costs``
reads and prices the costs and bytes, ``mpnn.schedule_report`` writes the
bubble lines and draws the Gantt chart.

The published formulas, with unit costs:

    gpipe, 1f1b        (p-1)/(m+p-1)
    interleaved-1f1b   (p-1)/(V·m+p-1)
    naive              none: one micro-batch in the pipe at a time, (p-1)/p idle
    zb-h1, zb-h2       the zero-bubble paper (Qi et al. 2024, section 2) counts idle
                       time per stage with F, B, W costs: 1F1B with its backward in
                       one piece idles (p-1)(F+B+W), ZB-H1 (p-1)(F+B-W), ZB-H2
                       (p-1)(F+B-2W). That is its accounting of one step with all
                       stages alike and messages free; for ZB-H2 the steady state of
                       back-to-back steps whose optimizer step does not synchronise
                       the stages (its post-validation), so the next step's warm-up
                       fills this step's drain. One step that ends in STEP, as
                       simulated here, also idles in its own warm-up.
"""

from __future__ import annotations

import argparse
import math
import sys

from .parallel.partition import PartitionError, format_partition, partition_layers
from .parallel.pipeline_ir import Kind, format_actions
from .parallel.pipeline_orders import SCHEDULES, ScheduleConfigError, check_schedule, make_schedule
from .parallel.simulator import expected_timeline, simulate, timeline
from .runtime.options import nonneg_float
from .schedule_costs import (
    COSTS_HELP,
    DEFAULTS,
    ITEMSIZE,
    cost_function,
    parse_stage_costs,
    read_costs,
    spread_function,
    unit_bytes,
)
from .schedule_report import cost_text, formula_line, plot, zero_bubble_lines

# ------------------------------------------------------------------ options

MC_DRAWS = 200  # runs of the timed simulator behind the expected bubble (--costs-from)


def _sizes(text):
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer widths such as "
                                         f"784,512,10, got {text!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected at least two positive widths (inputs, "
                                         f"..., outputs), got {text!r}")
    return sizes


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _overheads(text):
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, comma-separated, got {text!r}") \
            from None
    if not all(math.isfinite(x) and x >= 0 for x in values):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return values


def parse_args(argv=None):
    epilog = __doc__[__doc__.index("The published formulas"):] + "\n" + COSTS_HELP
    ap = argparse.ArgumentParser(prog="python -m mpnn.schedule",
                                 description=__doc__.split("\n\n")[0], epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, default=None, help="pipeline stages p (default 4)")
    ap.add_argument("--micro-batches", type=int, default=None,
                    help="micro-batches m per step (default 8)")
    ap.add_argument("--schedule", choices=list(SCHEDULES), default=None,
                    help="the pipeline schedule (default 1f1b)")
    ap.add_argument("--virtual-stages", type=int, default=None, metavar="V",
                    help="model chunks per rank, for interleaved-1f1b (default 1)")
    ap.add_argument("--plot", metavar="FILE.png", help="also draw the grid as a Gantt chart "
                    "(in seconds when costs are given)")
    ap.add_argument("--actions", action="store_true", help="print every stage's full action list")
    ap.add_argument("--stage-costs", metavar="F0[:B0[:W0]],F1...", default=None,
                    help="cost of one micro-batch's F, B, W on each stage, e.g. measured ('/' "
                         "between chunks with --virtual-stages > 1: 1:2:1/1:2:1,...): also "
                         "predict the step time and bubble of that pipeline (see costs below)")
    ap.add_argument("--backward-ratio", type=float, default=2.0,
                    help="backward cost / forward cost where --stage-costs gives no B (default 2)")
    ap.add_argument("--latency", type=nonneg_float, default=None, metavar="S",
                    help="seconds added to every message between ranks (default 0, or the "
                         "--costs-from file's)")
    ap.add_argument("--overhead", type=_overheads, default=None, metavar="S[,S1,...]",
                    help="seconds the executor spends between actions, charged after every "
                         "compute action (one value, or one per stage; default 0, or the "
                         "--costs-from file's action_overhead_s)")
    ap.add_argument("--costs-from", metavar="METRICS.jsonl", default=None,
                    help="the costs measured by python -m mpnn.train --metrics (its last "
                         "record's action_costs_s, message_latency_s, and schedule, pp, "
                         "virtual_stages, micro_batches unless given here)")
    ap.add_argument("--sizes", type=_sizes, default=None, metavar="784,512,...,10",
                    help="layer widths: with --micro-batch-rows also the peak activation bytes "
                         "per stage (see bytes below)")
    ap.add_argument("--micro-batch-rows", type=_positive, default=None, metavar="R",
                    help="rows of one micro-batch, for the bytes")
    ap.add_argument("--dtype", choices=list(ITEMSIZE), default="float32",
                    help="for the bytes (default float32)")
    ap.add_argument("--partition", default=None, metavar="N1,N2,...",
                    help="layers per stage (p x V of them), as mpnn.train takes it (default: "
                         "balance the estimated cost)")
    args = ap.parse_args(argv)
    args.measured = args.spread = args.start = args.jitter = None
    if args.costs_from is not None:
        if args.stage_costs is not None:
            ap.error("give --stage-costs or --costs-from, not both")
        try:
            costs, extras, keys = read_costs(args.costs_from)
        except ValueError as e:
            ap.error(str(e))
        keys.setdefault("pp", len(costs))
        keys.setdefault("virtual_stages", len(costs[0]))
        for k, value in keys.items():
            if getattr(args, k) is None:
                setattr(args, k, value)
        if (len(costs), len(costs[0])) != (args.pp, args.virtual_stages):
            ap.error(f"--costs-from {args.costs_from} holds costs of {len(costs)} ranks x "
                     f"{len(costs[0])} chunks; it cannot price --pp {args.pp} with "
                     f"--virtual-stages {args.virtual_stages}")
        args.measured, args.spread, args.start = costs, extras["spread"], extras["start"]
        args.jitter = extras["jitter"]
        if args.latency is None:
            args.latency = extras["latency"]
        if args.overhead is None:
            args.overhead = extras["overhead"]
    for k, value in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, value)
    if args.latency is None:
        args.latency = 0.0
    if args.pp < 1 or args.micro_batches < 1:
        ap.error("--pp and --micro-batches must be positive integers")
    if args.overhead is not None:
        if len(args.overhead) == 1:
            args.overhead = args.overhead * args.pp
        if len(args.overhead) != args.pp:
            ap.error(f"--overhead gives {len(args.overhead)} values; give one, or one per "
                     f"stage (--pp {args.pp})")
    try:
        check_schedule(args.schedule, args.pp, args.micro_batches, args.virtual_stages)
    except ScheduleConfigError as e:
        ap.error(str(e))
    if args.stage_costs is not None:
        try:
            args.stage_costs = parse_stage_costs(args.stage_costs, args.pp,
                                                 args.virtual_stages, args.backward_ratio)
        except ValueError as e:
            ap.error(str(e))
    if (args.sizes is None) != (args.micro_batch_rows is None):
        ap.error("the peak bytes need both --sizes and --micro-batch-rows")
    args.layers = None
    if args.sizes is not None:
        try:
            args.layers = partition_layers(args.sizes, args.pp * args.virtual_stages,
                                           args.partition)
        except PartitionError as e:
            v = args.virtual_stages
            ap.error(f"{e}" + (f" ({args.pp} x {v} = {args.pp * v} stages)" if v > 1 else ""))
    elif args.partition is not None:
        ap.error("--partition cuts the layers of --sizes; give --sizes and --micro-batch-rows")
    return args


# ------------------------------------------------------------------ output


def main(argv=None):
    args = parse_args(argv)
    p, m, v, name = args.pp, args.micro_batches, args.virtual_stages, args.schedule
    if args.plot:  # a bad image path is refused before any output
        from .runtime.files import check_output_file
        from .runtime.plots import image_format

        try:
            check_output_file("--plot", args.plot)
            image_format(args.plot, "--plot")
        except ValueError as e:
            print(f"mpnn.schedule: error: {e}", file=sys.stderr)
            return 2
    schedule = make_schedule(name, p, m, v)
    result = simulate(schedule)
    chunks = f", {v} chunks per rank" if v > 1 else ""
    print(f"schedule {name}: {p} stages, {m} micro-batches{chunks}")
    if args.actions:
        for s, acts in enumerate(schedule):
            print(f"stage {s}: {format_actions(acts)}")
        print()
    print(result.render())
    if not result.ok:
        return 1
    print()
    print(f"slots {result.slots}, busy per stage {result.busy[0]}, "
          f"idle per stage {', '.join(map(str, result.idle))}")
    print(formula_line(name, p, m, v, result.bubble))
    zero_bubble = name in ("zb-h1", "zb-h2")
    if zero_bubble:
        ones = [[(1.0, 1.0, 1.0)]] * p
        for line in zero_bubble_lines(name, p, m, ones, result.idle, result.bubble):
            print(line)
    split = any(a.kind is Kind.WEIGHT for acts in schedule for a in acts)
    print("peak micro-batches in flight per stage: "
          + ", ".join(f"stage {s}: {k}" for s, k in enumerate(result.peak_live))
          + ("  (alive from F until W)" if split else ""))
    costs = args.stage_costs or args.measured
    size = None
    if args.sizes is not None:
        size = unit_bytes(args.sizes, args.layers, args.micro_batch_rows,
                          ITEMSIZE[args.dtype], p)
        print(f"activation bytes of one micro-batch ({args.micro_batch_rows} rows, {args.dtype}; "
              f"layers per stage {format_partition(args.layers)}): "
              + ", ".join(f"stage {r}: " + "/".join(str(size(r, c)) for c in range(v))
                          for r in range(p)))
        peak = timeline(schedule, lambda r, a: 1, unit_bytes=size).peak_bytes
        print("peak activation bytes per stage: "
              + ", ".join(f"stage {r}: {b} ({b / 2**20:.3g} MiB)" for r, b in enumerate(peak)))
    tl = None
    if costs or args.latency or args.overhead:
        price = cost_function(costs, schedule) if costs else (lambda r, a: 1)
        tl = timeline(schedule, price, args.latency, overhead=args.overhead, start=args.start)
        label = "F:B" if all(w is None for c in costs or [] for _, _, w in c) else "F:B:W"
        source = (f"measured costs from {args.costs_from} (seconds) {label} "
                  if args.measured else f"stage costs {label} " if costs else "unit costs")
        lat = f" and latency {args.latency:g} s per message" if args.latency else ""
        if args.overhead and any(args.overhead):
            lat += (" and overhead " + ", ".join(f"{x:.3g}" for x in args.overhead)
                    + " s per action")
        if split and costs and any(w is None for c in costs for _, _, w in c):
            lat += " (no W: B and W half of B each)"
        step = (f"predicted step time {tl.makespan:.4g} s" if args.measured
                else f"makespan {tl.makespan:.4g}")
        print(f"with {source}{cost_text(costs) if costs else ''}{lat}: {step}, "
              f"bubble {tl.bubble:.4f}")
        if args.measured or args.latency or args.overhead or v > 1 or split \
                or label == "F:B:W":
            print(f"  busy per stage {', '.join(f'{b:.4g}' for b in tl.busy)}; "
                  f"idle per stage {', '.join(f'{x:.4g}' for x in tl.idle)}")
        if args.spread is not None:
            expected, span = expected_timeline(
                schedule, price, spread_function(args.spread, schedule), draws=MC_DRAWS,
                jitter=args.jitter, latency=args.latency, overhead=args.overhead,
                start=args.start)
            starts = ("" if not args.start or not any(args.start) else
                      ", stages starting " + ", ".join(f"{t:.3g}" for t in args.start) + " s late")
            if args.jitter and any(args.jitter):
                starts += ", steps slowed by " + ", ".join(f"{j:.1%}" for j in args.jitter)
            print(f"  with the measured spread of every action ({MC_DRAWS} seeded draws{starts}): "
                  f"expected step time {span:.4g} s, bubble {expected:.4f}  <- compare with "
                  f"the run's measured bubble")
        if zero_bubble and costs:
            for line in zero_bubble_lines(name, p, m, costs, tl.idle, tl.bubble):
                print(line)
    if args.plot:
        title = f"{name}  p={p}  m={m}" + (f"  V={v}" if v > 1 else "")
        if tl is not None:
            bars = [(s, t0, t1 - t0, a) for s, row in enumerate(tl.starts) for t0, t1, a in row]
            plot(bars, p, f"{title}  bubble {tl.bubble:.3f}", "time (the costs' unit)", args.plot)
        else:
            bars = [(s, t, 1, a) for s, row in enumerate(result.grid)
                    for t, a in enumerate(row) if a is not None]
            plot(bars, p, f"{title}  bubble {result.bubble:.3f}",
                 "time slot (one F, B or W)", args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
