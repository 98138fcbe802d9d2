"""--trace: a Chrome trace-event file with one process row per rank and spans for
forward, backward, optimizer step, Allreduce and each Send/Recv wait."""

import json
import os
import shutil

import pytest
from mpi4py import MPI

from mpnn.runtime.trace import NULL_TRACER, Tracer, chrome_trace, make_tracer
from mpnn.train import main

from conftest import run_training, shared_dir

SELF = MPI.COMM_SELF


def spans(doc):
    return [e for e in doc["traceEvents"] if e["ph"] == "X"]


def test_null_tracer_records_nothing_and_costs_little():
    assert make_tracer(None) is NULL_TRACER and not NULL_TRACER.enabled
    with NULL_TRACER.span("forward", mb=1) as s:
        assert s is NULL_TRACER.span("backward")  # one shared object, nothing allocated per call
    NULL_TRACER.write("/nonexistent/never-written.json", SELF)


def test_spans_nest_and_carry_arguments():
    t = Tracer()
    t.start(SELF)
    with t.span("forward", mb=3):
        with t.span("inner"):
            pass
    t.add("recv act", t.origin + 5_000, t.origin + 7_000, mb=1)
    names = [e[0] for e in t.events]
    assert names == ["inner", "forward", "recv act"]
    doc = chrome_trace([(0, t.origin, t.events, "rank 0")])
    fwd = next(e for e in spans(doc) if e["name"] == "forward")
    inner = next(e for e in spans(doc) if e["name"] == "inner")
    assert fwd["args"] == {"mb": 3} and fwd["cat"] == "compute" and fwd["pid"] == 0
    assert fwd["ts"] <= inner["ts"] and inner["ts"] + inner["dur"] <= fwd["ts"] + fwd["dur"]
    recv = next(e for e in spans(doc) if e["name"] == "recv act")
    assert (recv["ts"], recv["dur"], recv["cat"]) == (5.0, 2.0, "comm")  # microseconds


def test_metadata_names_every_rank_row():
    doc = chrome_trace([(1, 0, [], "rank 1 (dp 0, stage 1)"), (0, 0, [], "rank 0 (dp 0, stage 0)")])
    meta = [e for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"]
    assert [(e["pid"], e["args"]["name"]) for e in meta] == [(0, "rank 0 (dp 0, stage 0)"),
                                                             (1, "rank 1 (dp 0, stage 1)")]


def test_serial_run_writes_a_trace(tmp_path):
    path = tmp_path / "t.json"
    argv = ["--dataset", "digits", "--hidden", "16", "--epochs", "1", "--batch-size", "200",
            "--quiet", "--trace", str(path)]
    assert main(argv) == 0
    doc = json.loads(path.read_text())
    names = {e["name"] for e in spans(doc)}
    assert {"forward", "backward", "allreduce", "optimizer", "evaluate", "checkpoint"} - names == \
        {"checkpoint"}  # no --checkpoint-dir: no checkpoint span
    assert sum(e["name"] == "optimizer" for e in spans(doc)) == 8  # ceil(1437 / 200) steps
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans(doc))
    # written atomically, no temporaries; beside it the watchdog's flight record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.json.flight-rank0.json"]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("grid", ["dp", "pp"])
def test_trace_has_spans_from_every_rank(grid):
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    size = world.Get_size()
    d = shared_dir(world)
    path = os.path.join(d, "trace.json")
    argv = ["--dataset", "digits", "--hidden", "16,16,16", "--epochs", "1", "--batch-size", "100",
            "--quiet", "--trace", path]
    if grid == "pp":
        argv += ["--pp", "2", "--micro-batches", "2"]
    run_training(argv, world)
    world.Barrier()
    doc = json.loads(open(path).read())
    rows = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    assert sorted(rows) == list(range(size))
    for rank in range(size):
        names = {e["name"] for e in spans(doc) if e["pid"] == rank}
        assert {"forward", "backward", "optimizer", "allreduce"} <= names, (rank, names)
        if grid == "pp":
            stage = rank % 2
            assert rows[rank] == f"rank {rank} (dp {rank // 2}, stage {stage})"
            assert ("recv grad" if stage == 0 else "recv act") in names
            assert "send wait" in names
            mbs = {e["args"]["mb"] for e in spans(doc)
                   if e["pid"] == rank and e["name"] == "forward"}
            assert mbs == {0, 1}
    world.Barrier()
    if world.Get_rank() == 0:
        shutil.rmtree(d)
