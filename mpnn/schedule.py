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
import json
import math
import sys

from .parallel.partition import PartitionError, format_partition, partition_layers
from .parallel.pipeline_ir import Kind, format_actions
from .parallel.pipeline_orders import (
    SCHEDULES,
    ScheduleConfigError,
    analytic_bubble,
    check_schedule,
    make_schedule,
)
from .parallel.simulator import simulate, timeline
from .runtime.options import nonneg_float

ITEMSIZE = {"float32": 4, "float64": 8}
# the paper's idle time per stage: (p-1)(F + B - k·W)
_PAPER_W = {"1f1b": -1, "zb-h1": 1, "zb-h2": 2}
_PAPER_NAME = {"1f1b": "1F1B", "zb-h1": "ZB-H1", "zb-h2": "ZB-H2"}
DEFAULTS = {"pp": 4, "micro_batches": 8, "schedule": "1f1b", "virtual_stages": 1}

COSTS_HELP = """\
costs: F:B:W are the seconds (or any unit) of one micro-batch's forward, input
  gradient dL/dx, and weight gradient on a stage. A schedule that does not split
  the backward (no W) runs B+W in its B. Without W (F:B, or W 0 in a metrics
  file whose schedule had none), B is the whole backward: a zero-bubble
  schedule's B and W then take half of it each (an MLP's backward is two GEMMs
  of one size, dz·Wt and xt·dz). Without B, B = F x --backward-ratio.

bytes: one micro-batch on a chunk keeps its layers' activations from its F
  until its last backward action (its W if it has one, else its B):
  R x (inputs of the chunk's first layer + the outputs of each of its layers)
  x itemsize, for R = --micro-batch-rows. That is what the layers cache: each
  linear layer its input x, each activation its output y (the next layer's
  input), the last its logits. The layers are cut into p x V stages as
  mpnn.train cuts them (balanced estimated cost, or --partition); stage g is
  chunk g // p of rank g % p.
"""


# ------------------------------------------------------------------ options


def _entry(text, option):
    """'F[:B[:W]]' -> [F] or [F, B] or [F, B, W], positive finite numbers."""
    try:
        values = [float(v) for v in text.split(":")]
    except ValueError:
        raise ValueError(f"{option}: expected F[:B[:W]] numbers, got {text!r}") from None
    if len(values) > 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{option}: {text!r} is not F, F:B or F:B:W positive numbers")
    return values


def parse_stage_costs(text, p, v, ratio):
    """``--stage-costs`` -> costs[rank][chunk] = (F, B, W or None): one F[:B[:W]] per
    stage, or per stage per chunk with '/' between chunks when v > 1."""
    option = f"--stage-costs {text}"
    stages = text.split(",")
    if len(stages) != p:
        raise ValueError(f"{option}: needs {p} positive F[:B[:W]] entries, one per stage "
                         f"(--pp {p}), comma-separated")
    costs = []
    for item in stages:
        chunks = [_entry(c, option) for c in item.split("/")]
        if len(chunks) not in (1, v):
            raise ValueError(f"{option}: {item!r} gives {len(chunks)} chunks; give one "
                             f"F[:B[:W]] per stage or, with --virtual-stages {v}, {v} of them "
                             f"separated by '/'")
        full = [(c[0], c[1] if len(c) > 1 else c[0] * ratio, c[2] if len(c) > 2 else None)
                for c in chunks]
        costs.append(full * v if len(full) == 1 else full)
    return costs


def read_costs(path):
    """The last record of a ``python -m mpnn.train --metrics`` file: its per-action
    costs[rank][chunk] = (F, B, W or None), message latency, and the pipeline keys."""
    try:
        with open(path) as f:
            lines = [line for line in f if line.strip()]
    except OSError as e:
        raise ValueError(f"--costs-from {path}: cannot read it ({e.strerror})") from None
    if not lines:
        raise ValueError(f"--costs-from {path}: empty; expected the JSON lines of "
                         f"python -m mpnn.train --metrics")
    try:
        record = json.loads(lines[-1])
    except ValueError as e:
        raise ValueError(f"--costs-from {path}: the last line is not a JSON record ({e})") from None
    table = record.get("action_costs_s") if isinstance(record, dict) else None
    if not isinstance(table, dict):
        raise ValueError(f"--costs-from {path}: the last record has no action_costs_s; "
                         f"write one with a pipeline run, mpirun -n P python -m mpnn.train "
                         f"--pp P --metrics FILE")

    def grid(key):
        rows = table.get(key)
        ok = (isinstance(rows, list) and rows and all(isinstance(r, list) and r for r in rows)
              and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                      and math.isfinite(x) and x >= 0 for r in rows for x in r))
        if not ok:
            raise ValueError(f"--costs-from {path}: action_costs_s[{key!r}] must be a list per "
                             f"rank of seconds >= 0 per chunk, got {rows!r}")
        return rows

    f, b, w = grid("F"), grid("B"), grid("W")
    shape = [len(r) for r in f]
    if [len(r) for r in b] != shape or [len(r) for r in w] != shape or len(set(shape)) != 1:
        raise ValueError(f"--costs-from {path}: action_costs_s F, B and W must all be "
                         f"ranks x chunks of one shape")
    costs = [[(f[r][c], b[r][c], w[r][c] or None) for c in range(shape[0])]
             for r in range(len(f))]
    latency = record.get("message_latency_s", 0.0)
    if isinstance(latency, bool) or not isinstance(latency, (int, float)) \
            or not (math.isfinite(latency) and latency >= 0):
        raise ValueError(f"--costs-from {path}: message_latency_s must be seconds >= 0, "
                         f"got {latency!r}")
    keys = {k: record[k] for k in DEFAULTS if record.get(k) is not None}
    if keys.get("schedule", "1f1b") not in SCHEDULES or not all(
            isinstance(keys[k], int) and not isinstance(keys[k], bool) for k in keys
            if k != "schedule"):
        raise ValueError(f"--costs-from {path}: schedule, pp, virtual_stages and micro_batches "
                         f"must be a schedule name and integers, got {keys}")
    return costs, float(latency), keys


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
    args.measured = None
    if args.costs_from is not None:
        if args.stage_costs is not None:
            ap.error("give --stage-costs or --costs-from, not both")
        try:
            costs, latency, keys = read_costs(args.costs_from)
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
        args.measured = costs
        if args.latency is None:
            args.latency = latency
    for k, value in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, value)
    if args.latency is None:
        args.latency = 0.0
    if args.pp < 1 or args.micro_batches < 1:
        ap.error("--pp and --micro-batches must be positive integers")
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


# ------------------------------------------------------------------ the model


def cost_function(costs, schedule):
    """cost(rank, action) of the timed simulator from costs[rank][chunk] = (F, B, W or
    None) (see COSTS_HELP): a split B costs B, an unsplit one B + W."""
    split = [{(a.mb, a.chunk) for a in acts if a.kind is Kind.WEIGHT} for acts in schedule]

    def cost(rank, a):
        f, b, w = costs[rank][a.chunk]
        if a.kind is Kind.FORWARD:
            return f
        if a.kind is Kind.WEIGHT or (a.mb, a.chunk) in split[rank]:
            return b / 2 if w is None else (w if a.kind is Kind.WEIGHT else b)
        return b if w is None else b + w
    return cost


def unit_bytes(sizes, layers, rows, itemsize, p):
    """bytes(rank, chunk) one micro-batch keeps on that chunk (see COSTS_HELP)."""
    def size(rank, chunk):
        span = layers[chunk * p + rank]
        return rows * (sizes[span.start] + sum(sizes[i + 1] for i in span)) * itemsize
    return size


def paper_idle(name, p, f, b, w):
    """The zero-bubble paper's idle time per stage: (p-1)(F + B - k·W), k = -1 (1F1B,
    its backward in one piece), 1 (ZB-H1), 2 (ZB-H2); never below 0."""
    return max(0.0, (p - 1) * (f + b - _PAPER_W[name] * w))


def _effective(costs, rank):
    """(F, B, W) a zero-bubble schedule runs on ``rank`` (chunk 0: V = 1)."""
    f, b, w = costs[rank][0]
    return (f, b / 2, b / 2) if w is None else (f, b, w)


def _zero_bubble_lines(name, p, m, costs, measured_idle, measured_bubble):
    """What the paper predicts for ``name`` with costs per rank, next to the measurement."""
    per = [_effective(costs, r) for r in range(p)]
    idle = [paper_idle(name, p, *c) for c in per]
    work = [m * sum(c) for c in per]
    bubble = sum(idle) / (sum(idle) + sum(work)) if sum(idle) + sum(work) else 0.0
    k = {1: "-W", 2: "-2W"}[_PAPER_W[name]]
    alike = len(set(per)) == 1
    fbw = "F:B:W " + (":".join(f"{x:g}" for x in per[0]) if alike else "per stage")
    onef = ", ".join(f"{paper_idle('1f1b', p, *c):.4g}" for c in (per[:1] if alike else per))
    return [f"  zero-bubble paper, {fbw}: {_PAPER_NAME[name]} idles (p-1)(F+B{k}) per stage = "
            + ", ".join(f"{x:.4g}" for x in (idle[:1] if alike else idle))
            + f" (1F1B's (p-1)(F+B+W) = {onef}): predicts bubble {bubble:.4f}"
            + ("" if alike else " (the paper takes the stages alike)"),
            "  simulator measures idle per stage "
            + ", ".join(f"{x:.4g}" for x in measured_idle) + f": bubble {measured_bubble:.4f}"
            + ("" if name == "zb-h1" else "  (the paper's ZB-H2 count is the steady state of "
               "back-to-back steps; this is one step, see --help)")]


# ------------------------------------------------------------------ output


COLORS = {Kind.FORWARD: "#4c72b0", Kind.BACKWARD: "#dd8452", Kind.WEIGHT: "#55a868"}
LABELS = {Kind.FORWARD: "forward F", Kind.BACKWARD: "backward B (dL/dx only where a W follows)",
          Kind.WEIGHT: "weight gradient W"}


def plot(bars, p, title, xlabel, path):
    """A Gantt chart of ``bars`` = [(stage, start, length, action)]: one row per stage,
    F, B, W in three colours, each bar labelled with its micro-batch (and .chunk)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    end = max([t + d for _, t, d, _ in bars], default=1.0)
    unit = min([d for _, _, d, _ in bars if d > 0], default=1.0)
    fig, ax = plt.subplots(figsize=(min(40.0, max(6.0, 0.35 * end / unit + 1.5)), 0.6 * p + 1.4))
    for s, t, d, a in bars:
        ax.broken_barh([(t, d)], (s - 0.4, 0.8), facecolors=COLORS[a.kind], edgecolor="white")
        ax.text(t + d / 2, s, str(a)[len(a.kind.value):], ha="center", va="center",
                fontsize=7, color="white")
    ax.set_ylim(p - 0.5, -0.5)
    ax.set_xlim(0, end)
    ax.xaxis.get_major_locator().set_params(integer=xlabel.startswith("time slot"))
    ax.set_yticks(range(p), [f"stage {s}" for s in range(p)])
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    kinds = [k for k in COLORS if any(a.kind is k for _, _, _, a in bars)]
    ax.legend(handles=[Patch(color=COLORS[k], label=LABELS[k]) for k in kinds],
              loc="upper right", bbox_to_anchor=(1.0, -0.15), ncol=len(kinds), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cost_text(costs):
    def one(f, b, w):
        return f"{f:g}:{b:g}" + ("" if w is None else f":{w:g}")
    return ", ".join("/".join(one(*c) for c in chunks) for chunks in costs)


def _formula_line(name, p, m, v, bubble):
    if name == "interleaved-1f1b":
        return (f"bubble: simulated {bubble:.4f}   formula (p-1)/(V·m+p-1) = "
                f"{analytic_bubble(p, m, v):.4f}  (V = {v})")
    if name in _PAPER_W and name != "1f1b":
        return f"bubble: simulated {bubble:.4f}   with unit F, B, W:"
    note = "" if name != "naive" else "  (formula is GPipe/1F1B's; naive has no overlap)"
    return (f"bubble: simulated {bubble:.4f}   formula (p-1)/(m+p-1) = "
            f"{analytic_bubble(p, m):.4f}{note}")


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
    print(_formula_line(name, p, m, v, result.bubble))
    zero_bubble = name in ("zb-h1", "zb-h2")
    if zero_bubble:
        ones = [[(1.0, 1.0, 1.0)]] * p
        for line in _zero_bubble_lines(name, p, m, ones, result.idle, result.bubble):
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
    if costs or args.latency:
        price = cost_function(costs, schedule) if costs else (lambda r, a: 1)
        tl = timeline(schedule, price, args.latency)
        label = "F:B" if all(w is None for c in costs or [] for _, _, w in c) else "F:B:W"
        source = (f"measured costs from {args.costs_from} (seconds) {label} "
                  if args.measured else f"stage costs {label} " if costs else "unit costs")
        lat = f" and latency {args.latency:g} s per message" if args.latency else ""
        if split and costs and any(w is None for c in costs for _, _, w in c):
            lat += " (no W: B and W half of B each)"
        step = (f"predicted step time {tl.makespan:.4g} s" if args.measured
                else f"makespan {tl.makespan:.4g}")
        print(f"with {source}{_cost_text(costs) if costs else ''}{lat}: {step}, "
              f"bubble {tl.bubble:.4f}")
        if args.measured or args.latency or v > 1 or split or label == "F:B:W":
            print(f"  busy per stage {', '.join(f'{b:.4g}' for b in tl.busy)}; "
                  f"idle per stage {', '.join(f'{x:.4g}' for x in tl.idle)}")
        if zero_bubble and costs:
            for line in _zero_bubble_lines(name, p, m, costs, tl.idle, tl.bubble):
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
