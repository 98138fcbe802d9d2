"""A sweep's report: the results file, the table sorted by a metric, the makespan
against its lower bound, and the picture (every trial's accuracy curve, and a
Gantt chart of which group ran which trial when).

``DIR/results.jsonl`` holds one JSON line per finished trial (``trial.run_trial``'s
record: id, options, status, error, final metrics, the accuracy curve, wall
time, start and end in seconds from the sweep's start, group, ranks),
appended and fsynced by world rank 0 as each result arrives, so a killed
sweep keeps every finished trial and ``--resume`` skips them.
"""

from __future__ import annotations

import io
import json
import os

from .plan import lower_bound
from .spec import varying


def read_results(path):
    """The records of ``path`` (none if it does not exist); a torn last line (a
    sweep killed mid-write) is ignored."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def append_result(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rewrite_results(path, records):
    """``path`` holding exactly ``records`` (atomically: a crash leaves the old file)."""
    from ..runtime.files import atomic_write

    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text.encode()))


def higher_is_better(metric):
    """Accuracy and samples/s sort highest first; losses and times lowest first."""
    return "loss" not in metric and metric != "epoch_time_s"


def table(records, trials, metric):
    """The final table: finished trials sorted by ``metric`` (best first), then the
    failed ones with their errors."""
    keys = varying(trials)  # the options that tell the trials apart (none: just the ids)
    ok = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] != "ok"]
    missing = [r for r in ok if metric not in r["final"]]
    if missing:
        known = sorted(k for k in ok[0]["final"] if isinstance(ok[0]["final"][k], int | float))
        raise ValueError(f"--metric {metric}: not in the trials' metrics; choose one of "
                         f"{', '.join(known)}")
    ok.sort(key=lambda r: r["final"][metric], reverse=higher_is_better(metric))
    also = [] if metric == "train_loss" else ["train_loss"]
    head = ["#", "trial", *keys, metric, *also, "wall s", "group"]
    rows = [[str(n), r["id"], *[_show(r["options"].get(k)) for k in keys],
             *[f"{r['final'].get(m, float('nan')):.4f}" for m in (metric, *also)],
             f"{r['wall_s']:.1f}", str(r["group"])] for n, r in enumerate(ok, 1)]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True))
             for row in [head, *rows]]
    for r in failed:
        shown = ", ".join(f"{k}={_show(r['options'].get(k))}" for k in keys)
        lines.append(f"failed {r['id']}" + (f" ({shown})" if shown else "") + f": {r['error']}")
    return "\n".join(lines)


def _show(value):
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "-" if value is None else str(value)


def makespan(records, groups):
    """(makespan, lower bound, Σ wall / groups, longest) of the records of one run."""
    if not records:
        return 0.0, 0.0, 0.0, 0.0
    span = max(r["end_s"] for r in records) - min(r["start_s"] for r in records)
    times = [r["wall_s"] for r in records]
    return span, lower_bound(times, groups), sum(times) / groups, max(times)


def plot_sweep(records, path, groups, metric="test_accuracy"):
    """Every trial's test-accuracy curve (left) and the Gantt chart of the groups (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..runtime.files import atomic_write
    from ..runtime.plots import image_format

    fig, (ax_acc, ax_gantt) = plt.subplots(1, 2, figsize=(11, 3.8),
                                           gridspec_kw={"width_ratios": [1, 1.4]})
    colors = plt.get_cmap("tab20")
    for n, r in enumerate(sorted(records, key=lambda r: r["id"])):
        c = colors(n % 20)
        if r["curve"]:
            ax_acc.plot(range(1, len(r["curve"]) + 1), r["curve"], "o-", color=c, lw=1.2,
                        ms=3, label=r["id"])
        width = r["end_s"] - r["start_s"]
        hatch = "xx" if r["status"] != "ok" else None
        ax_gantt.barh(r["group"], width, left=r["start_s"], height=0.7, color=c,
                      edgecolor="black", linewidth=0.5, hatch=hatch)
        ax_gantt.text(r["start_s"] + width / 2, r["group"], r["id"], ha="center",
                      va="center", fontsize=7)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_title(f"{len(records)} trials")
    ax_acc.grid(alpha=0.3)
    if len(records) <= 12:
        ax_acc.legend(fontsize=7, ncol=2)
    span, bound, _, _ = makespan(records, groups)
    ax_gantt.set_xlabel("seconds since the sweep started")
    ax_gantt.set_ylabel("group")
    ax_gantt.set_yticks(range(groups))
    ax_gantt.invert_yaxis()
    ax_gantt.set_title(f"makespan {span:.1f} s, lower bound {bound:.1f} s"
                       + (" (hatched: failed)" if any(r["status"] != "ok" for r in records)
                          else ""))
    ax_gantt.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=image_format(path), dpi=110)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
