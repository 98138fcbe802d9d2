"""What ``python -m mpnn.schedule`` prints and draws beside the simulator's grid.

The bubble line with the published formula for a schedule, the zero-bubble
paper's prediction ((p-1)(F + B - k·W) idle per stage, Qi et al. 2024) next to
the simulator's measurement, the costs as text, and the Gantt chart of a
schedule (F, B, W in three colours).
"""

from __future__ import annotations

from .parallel.pipeline_ir import Kind
from .parallel.pipeline_orders import analytic_bubble

# the paper's idle time per stage: (p-1)(F + B - k·W)
_PAPER_W = {"1f1b": -1, "zb-h1": 1, "zb-h2": 2}
_PAPER_NAME = {"1f1b": "1F1B", "zb-h1": "ZB-H1", "zb-h2": "ZB-H2"}


# ------------------------------------------------------------------ the bubble in text


def paper_idle(name, p, f, b, w):
    """The zero-bubble paper's idle time per stage: (p-1)(F + B - k·W), k = -1 (1F1B,
    its backward in one piece), 1 (ZB-H1), 2 (ZB-H2); never below 0."""
    return max(0.0, (p - 1) * (f + b - _PAPER_W[name] * w))


def _effective(costs, rank):
    """(F, B, W) a zero-bubble schedule runs on ``rank`` (chunk 0: V = 1)."""
    f, b, w = costs[rank][0]
    return (f, b / 2, b / 2) if w is None else (f, b, w)


def formula_line(name, p, m, v, bubble):
    """The simulated bubble next to the published formula for ``name``."""
    if name == "interleaved-1f1b":
        return (f"bubble: simulated {bubble:.4f}   formula (p-1)/(V·m+p-1) = "
                f"{analytic_bubble(p, m, v):.4f}  (V = {v})")
    if name in _PAPER_W and name != "1f1b":
        return f"bubble: simulated {bubble:.4f}   with unit F, B, W:"
    note = "" if name != "naive" else "  (formula is GPipe/1F1B's; naive has no overlap)"
    return (f"bubble: simulated {bubble:.4f}   formula (p-1)/(m+p-1) = "
            f"{analytic_bubble(p, m):.4f}{note}")


def zero_bubble_lines(name, p, m, costs, measured_idle, measured_bubble):
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


def cost_text(costs):
    """costs[rank][chunk] = (F, B, W or None) as --stage-costs writes them."""
    def one(f, b, w):
        return f"{f:g}:{b:g}" + ("" if w is None else f":{w:g}")
    return ", ".join("/".join(one(*c) for c in chunks) for chunks in costs)


# ------------------------------------------------------------------ the Gantt chart


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
