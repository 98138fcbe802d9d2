"""The costs and bytes ``python -m mpnn.schedule`` prices a schedule with.

``--stage-costs`` text and a ``python -m mpnn.train --metrics`` file become
costs[rank][chunk] = (F, B, W or None); ``cost_function`` turns them into the
timed simulator's cost(rank, action) and ``unit_bytes`` gives the activation
bytes one micro-batch keeps on a chunk. ``COSTS_HELP`` (the CLI's epilog)
says what the numbers mean.
"""

from __future__ import annotations

import json
import math

from .parallel.pipeline_ir import Kind
from .parallel.pipeline_orders import SCHEDULES

ITEMSIZE = {"float32": 4, "float64": 8}
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

# ------------------------------------------------------------------ reading costs


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
    costs[rank][chunk] = (F, B, W or None); what else the run measured, a dict:
    ``latency`` (seconds per message), ``overhead`` (the executor's seconds per
    compute action, per rank), ``start`` (each rank's step start after the
    earliest), ``spread`` (spread[rank][chunk] = standard deviations of F, B,
    W), ``jitter`` (each rank's relative slowdown shared by a step), each None
    in files of runs that did not record it; and the pipeline keys."""
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

    def grid(key, table=table, name="action_costs_s"):
        rows = table.get(key)
        ok = (isinstance(rows, list) and rows and all(isinstance(r, list) and r for r in rows)
              and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                      and math.isfinite(x) and x >= 0 for r in rows for x in r))
        if not ok:
            raise ValueError(f"--costs-from {path}: {name}[{key!r}] must be a list per "
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

    def per_rank(key):  # absent in files of older runs: None
        values = record.get(key)
        if values is not None and not (
                isinstance(values, list) and len(values) == len(costs)
                and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                        and math.isfinite(x) and x >= 0 for x in values)):
            raise ValueError(f"--costs-from {path}: {key} must be seconds >= 0, one per rank "
                             f"({len(costs)}), got {values!r}")
        return values

    overhead, start = per_rank("action_overhead_s"), per_rank("step_start_s")
    jitter = per_rank("step_jitter")
    spread = None
    if isinstance(record.get("action_costs_std_s"), dict):
        sd = [grid(k, record["action_costs_std_s"], "action_costs_std_s") for k in "FBW"]
        if [len(r) for r in sd[0]] != shape or any([len(r) for r in g] != shape for g in sd):
            raise ValueError(f"--costs-from {path}: action_costs_std_s must have the shape "
                             f"of action_costs_s")
        spread = [[tuple(g[r][c] for g in sd) for c in range(shape[0])] for r in range(len(f))]
    keys = {k: record[k] for k in DEFAULTS if record.get(k) is not None}
    if keys.get("schedule", "1f1b") not in SCHEDULES or not all(
            isinstance(keys[k], int) and not isinstance(keys[k], bool) for k in keys
            if k != "schedule"):
        raise ValueError(f"--costs-from {path}: schedule, pp, virtual_stages and micro_batches "
                         f"must be a schedule name and integers, got {keys}")
    measured = {"latency": float(latency), "overhead": overhead, "start": start,
                "spread": spread, "jitter": jitter}
    return costs, measured, keys


# ------------------------------------------------------------------ pricing a schedule


def cost_function(costs, schedule):
    """cost(rank, action) of the timed simulator from costs[rank][chunk] = (F, B, W or
    None) (see COSTS_HELP): a split B costs B, an unsplit one B + W; with no W
    measured a split B and its W cost B/2 each."""
    return _per_action(costs, schedule, lambda b: b / 2, lambda b, w: b + w)


def spread_function(spread, schedule):
    """The standard deviation of each action's cost, as ``cost_function`` prices it,
    from spread[rank][chunk] = (sF, sB, sW): a split B has sB, an unsplit one
    √(sB² + sW²) (B and W drawn independently); with no W measured (a run
    without split backward) a split B and its W have sB/√2 each."""
    return _per_action(spread, schedule, lambda b: b / math.sqrt(2), math.hypot)


def _per_action(table, schedule, halve, join):
    """value(rank, action) from table[rank][chunk] = (F, B, W or None/0): F for a
    forward; for a backward split off a W (or that W), B (or W), or halve(B)
    when no W was measured; for an unsplit backward join(B, W)."""
    split = [{(a.mb, a.chunk) for a in acts if a.kind is Kind.WEIGHT} for acts in schedule]

    def value(rank, a):
        f, b, w = table[rank][a.chunk]
        if a.kind is Kind.FORWARD:
            return f
        if a.kind is Kind.WEIGHT or (a.mb, a.chunk) in split[rank]:
            return halve(b) if not w else (w if a.kind is Kind.WEIGHT else b)
        return join(b, w or 0.0)
    return value


def predict_run(path, draws=200):
    """What the timed simulator predicts for the run whose ``--metrics`` file is
    ``path``, with everything it measured: {"bubble": from the mean costs,
    "expected": over ``draws`` seeded draws with the measured spreads (the
    mean-cost one when the file has none), "step_s": the expected step time}.
    The figures ``python -m mpnn.schedule --costs-from`` prints."""
    from .parallel.pipeline_orders import make_schedule
    from .parallel.simulator import expected_timeline, timeline

    costs, extras, keys = read_costs(path)
    schedule = make_schedule(keys.get("schedule", "1f1b"), len(costs),
                             keys.get("micro_batches", 8), len(costs[0]))
    price = cost_function(costs, schedule)
    kw = dict(latency=extras["latency"], overhead=extras["overhead"], start=extras["start"])
    tl = timeline(schedule, price, **kw)
    expected, span = tl.bubble, tl.makespan
    if extras["spread"] is not None:
        expected, span = expected_timeline(schedule, price,
                                           spread_function(extras["spread"], schedule),
                                           draws=draws, jitter=extras["jitter"], **kw)
    return {"bubble": tl.bubble, "expected": expected, "step_s": span}


def unit_bytes(sizes, layers, rows, itemsize, p):
    """bytes(rank, chunk) one micro-batch keeps on that chunk (see COSTS_HELP)."""
    def size(rank, chunk):
        span = layers[chunk * p + rank]
        return rows * (sizes[span.start] + sum(sizes[i + 1] for i in span)) * itemsize
    return size

