"""``python -m mpnn.schedule``: print (and optionally plot) a pipeline schedule.

    python -m mpnn.schedule --pp 4 --micro-batches 8 --schedule 1f1b
    python -m mpnn.schedule --pp 4 --micro-batches 8 --schedule gpipe --plot gpipe.png

Builds the schedule with ``mpnn.parallel.pipeline_ir``, dry-runs it with
``mpnn.parallel.simulator`` (unit cost per forward and per backward, free
communication) and prints every stage's action list, the stage x slot grid,
the simulated bubble next to the formula ``(p-1)/(m+p-1)`` and the peak
number of micro-batches whose activations are alive on each stage. No MPI is
involved.
"""

from __future__ import annotations

import argparse
import sys

from .parallel.pipeline_ir import Kind, format_actions
from .parallel.pipeline_orders import SCHEDULES, analytic_bubble, make_schedule
from .parallel.simulator import simulate, timeline


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mpnn.schedule",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, default=4, help="pipeline stages p (default 4)")
    ap.add_argument("--micro-batches", type=int, default=8,
                    help="micro-batches m per step (default 8)")
    ap.add_argument("--schedule", choices=list(SCHEDULES), default="1f1b")
    ap.add_argument("--plot", metavar="FILE.png", help="also draw the grid as a Gantt chart")
    ap.add_argument("--actions", action="store_true", help="print every stage's full action list")
    ap.add_argument("--stage-costs", metavar="F0[:B0],F1[:B1],...", default=None,
                    help="forward (and backward) cost of one micro-batch on each stage, e.g. "
                         "measured: also print the bubble of that unbalanced pipeline")
    ap.add_argument("--backward-ratio", type=float, default=2.0,
                    help="backward cost / forward cost where --stage-costs gives no B (default 2)")
    args = ap.parse_args(argv)
    if args.pp < 1 or args.micro_batches < 1:
        ap.error("--pp and --micro-batches must be positive integers")
    if args.stage_costs is not None:
        text = args.stage_costs
        try:
            pairs = [[float(v) for v in item.split(":")] for item in text.split(",")]
        except ValueError:
            ap.error(f"--stage-costs {text}: expected F or F:B numbers, comma-separated")
        if len(pairs) != args.pp or any(len(c) not in (1, 2) or min(c) <= 0 for c in pairs):
            ap.error(f"--stage-costs {text}: needs {args.pp} positive F or F:B entries, "
                     f"one per stage")
        args.stage_costs = [(c[0], c[1] if len(c) == 2 else c[0] * args.backward_ratio)
                            for c in pairs]
    return args


def plot(result, title, path):
    """Draw ``result``'s grid as a Gantt chart: one row per stage, F blue, B orange."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = {"F": "#4c72b0", "B": "#dd8452"}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * result.slots + 1.5), 0.6 * result.p + 1.4))
    for s, row in enumerate(result.grid):
        for t, a in enumerate(row):
            if a is None:
                continue
            ax.broken_barh([(t, 1)], (s - 0.4, 0.8), facecolors=colors[a.kind.value],
                           edgecolor="white")
            ax.text(t + 0.5, s, str(a.mb), ha="center", va="center", fontsize=7, color="white")
    ax.set_ylim(result.p - 0.5, -0.5)
    ax.set_xlim(0, result.slots)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_yticks(range(result.p), [f"stage {s}" for s in range(result.p)])
    ax.set_xlabel("time slot (one forward or backward)")
    ax.set_title(title)
    ax.legend(handles=[Patch(color=colors["F"], label="forward"),
                       Patch(color=colors["B"], label="backward")],
              loc="upper right", bbox_to_anchor=(1.0, -0.15), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    p, m = args.pp, args.micro_batches
    if args.plot:  # a bad image path is refused before any output
        from .runtime.files import check_output_file
        from .runtime.plots import image_format

        try:
            check_output_file("--plot", args.plot)
            image_format(args.plot, "--plot")
        except ValueError as e:
            print(f"mpnn.schedule: error: {e}", file=sys.stderr)
            return 2
    schedule = make_schedule(args.schedule, p, m)
    result = simulate(schedule)
    print(f"schedule {args.schedule}: {p} stages, {m} micro-batches")
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
    formula = analytic_bubble(p, m)
    note = "" if args.schedule != "naive" else "  (formula is GPipe/1F1B's; naive has no overlap)"
    print(f"bubble: simulated {result.bubble:.4f}   formula (p-1)/(m+p-1) = {formula:.4f}{note}")
    print("peak micro-batches in flight per stage: "
          + ", ".join(f"stage {s}: {k}" for s, k in enumerate(result.peak_live)))
    if args.stage_costs:
        costs = args.stage_costs
        tl = timeline(schedule, lambda s, a: costs[s][a.kind is Kind.BACKWARD])
        print(f"with stage costs F:B {', '.join(f'{f:g}:{b:g}' for f, b in costs)}: "
              f"makespan {tl.makespan:.4g}, bubble {tl.bubble:.4f}")
    if args.plot:
        plot(result, f"{args.schedule}  p={p}  m={m}  bubble {result.bubble:.3f}", args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
