"""Pipeline (and DP x PP) training equals serial training.

For the same seed and global batch, 2- and 4-stage pipelines and a 2 x 2
DP x PP grid, under every schedule, must end with the weights of a serial run
(float64: max abs difference <= 1e-9), the last partial batch included; the
``--save`` file holds the whole model, gathered from the stages, in exactly the
serial format. Run with::

    mpirun -n 4 python -m pytest --with-mpi tests/test_pipeline_mpi.py

Tests needing fewer ranks than the job has split COMM_WORLD and leave the
other ranks out. The last tests here run without MPI (the serial pass).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mpnn.parallel.pipeline_config import PipelineConfigError, check_pipeline_config
from mpnn.runtime.weights import load_weights

from conftest import build_run, run_training, sub_world, trained_serially

# digits: 1437 training rows; --batch-size 100 leaves a last batch of 37 rows, which
# 2 replicas share as 19 + 18 and 4 micro-batches split as 5, 5, 5, 4.
BASE = ["--dataset", "digits", "--hidden", "24,16,12", "--epochs", "2", "--batch-size", "100",
        "--dtype", "float64", "--quiet", "--optimizer", "sgd", "--momentum", "0", "--lr", "0.2"]
SCHEDULES = ["naive", "gpipe", "1f1b"]


def weights(argv, comm=None):
    """This rank's trained tensors, the per-epoch metrics and the grid of ``argv`` on
    ``comm`` (default: a world of one)."""
    run, history = run_training(argv, comm)
    return run.model.state_dict(), history, run.grid


def check_against_serial(comm, argv, tmp_path, pipe):
    """Train with ``pipe`` options on ``comm``; compare stage weights, saved file, metrics."""
    save, metrics = tmp_path / "pipe.npz", tmp_path / "pipe.jsonl"
    stage, hist_pipe, grid = weights(argv + pipe + ["--save", str(save),
                                                         "--metrics", str(metrics)], comm)
    ref, hist_ref = trained_serially(argv)
    # every rank: its stage's tensors equal the serial model's
    for name, value in stage.items():
        diff = np.max(np.abs(value - ref[name]))
        assert diff <= 1e-9, f"{name} on stage {grid.pp_rank}, replica {grid.dp_rank}: {diff:.3e}"
    # the weights moved, so the comparison is not vacuous
    init = build_run(argv).model.state_dict()
    assert not np.allclose(ref["layers.0.weight"], init["layers.0.weight"])
    # metrics reduced over the pipeline's last stages equal the serial ones, on every rank
    for a, b in zip(hist_pipe, hist_ref, strict=True):
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-12)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-9)
        assert len(a["stage_busy_s"]) == len(a["stage_idle_s"]) == grid.pp
        assert 0.0 <= a["bubble"] < 1.0
    if comm.Get_rank() == 0:  # --save: the whole model, in the serial format
        saved = load_weights(save)
        assert list(saved) == list(ref)
        for name in ref:
            assert saved[name].shape == ref[name].shape and saved[name].dtype == ref[name].dtype
            assert np.max(np.abs(saved[name] - ref[name])) <= 1e-9, name
        lines = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert [r["epoch"] for r in lines] == [1, 2]
        assert {"stage_busy_s", "stage_idle_s", "stage_forward_s", "stage_backward_s",
                "bubble"} <= set(lines[0])


GRIDS = {  # name: (ranks, pipeline options)
    "pp2": (2, ["--pp", "2", "--micro-batches", "4"]),
    "pp4": (4, ["--pp", "4", "--micro-batches", "3", "--partition", "1,1,1,1"]),
    "dp2xpp2": (4, ["--dp", "2", "--pp", "2", "--micro-batches", "4", "--partition", "3,1"]),
}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("grid", [pytest.param(g, marks=pytest.mark.mpi(min_size=n))
                                  for g, (n, _) in GRIDS.items()])
def test_pipeline_matches_serial(grid, schedule, tmp_path):
    ranks, pipe = GRIDS[grid]
    comm = sub_world(ranks)
    if comm is None:
        return
    check_against_serial(comm, BASE, tmp_path, pipe + ["--schedule", schedule])
    comm.Free()


@pytest.mark.mpi(min_size=4)
def test_empty_micro_batches_in_a_tiny_last_batch(tmp_path):
    # --batch-size 718: the last global batch has 1 row; over 2 replicas and 4
    # micro-batches, seven of the eight micro-batches of that step are empty.
    comm = sub_world(4)
    if comm is None:
        return
    argv = [a if a != "100" else "718" for a in BASE]
    check_against_serial(comm, argv, tmp_path,
                         ["--dp", "2", "--pp", "2", "--micro-batches", "4", "--schedule", "1f1b"])
    comm.Free()


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_executor_live_micro_batches_match_simulator(schedule):
    from mpnn.parallel.engine import Engine
    from mpnn.parallel.pipeline import PipelineEngine
    from mpnn.parallel.pipeline_orders import make_schedule
    from mpnn.parallel.simulator import simulate

    comm = sub_world(4)
    if comm is None:
        return
    p, m = 4, 6
    run = build_run(BASE + ["--pp", "4", "--micro-batches", str(m)], comm)
    grid, data, model = run.grid, run.data, run.model
    stages = [range(i, i + 1) for i in range(4)]
    engine = PipelineEngine(model, "cross_entropy", grid, schedule, m, stages)
    engine.train_step(data.train_features(slice(0, 50)), data.y_train[:50], 1 / 50)
    expected = m if schedule == "gpipe" else min(p - grid.pp_rank, m)
    simulated = simulate(make_schedule(schedule, p, m)).peak_live[grid.pp_rank]
    assert engine.peak_live == expected == simulated
    # the Engine interface the training loop uses
    assert isinstance(engine, Engine)
    assert set(engine.activations()) == set(model.layers)  # every layer of this stage
    assert engine.describe() == (f"pipeline dp 1 x pp 4, {schedule} schedule, "
                                 f"6 micro-batch(es), layers per stage 0 | 1 | 2 | 3")
    metrics = engine.epoch_metrics()  # collective over the grid's ranks
    assert len(metrics["stage_busy_s"]) == 4 and 0.0 <= metrics["bubble"] < 1.0
    assert min(metrics["stage_forward_s"]) > 0.0
    # what the timed simulator needs besides the mean costs (mpnn.schedule --costs-from)
    assert metrics["message_latency_s"] > 0.0  # a ping-pong of a micro-batch's rows
    assert len(metrics["action_overhead_s"]) == len(metrics["step_start_s"]) == 4
    assert min(metrics["action_overhead_s"]) > 0.0 and metrics["step_start_s"] == [0.0] * 4
    assert set(metrics["action_costs_std_s"]) == set("FBW")  # one step: no gap between steps
    comm.Free()


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_host_staged_messages_match_direct(schedule):
    # The GPU path with an MPI library that cannot read device memory sends and
    # receives through host buffers. Forced on here with NumPy arrays, it must give
    # bitwise the direct path's gradients, loss and evaluation; the later stages
    # get no features at all (x=None), only activations.
    from mpnn.data.batching import share_bounds
    from mpnn.parallel.partition import partition_layers
    from mpnn.parallel.pipeline import PipelineEngine

    comm = sub_world(4)
    if comm is None:
        return
    m = 3
    argv = BASE + ["--dp", "2", "--pp", "2", "--micro-batches", str(m)]
    results = []
    for staging in (False, True):
        run = build_run(argv, comm)
        grid, data, model = run.grid, run.data, run.model
        stages = partition_layers(model.sizes, 2, None)
        engine = PipelineEngine(model, "cross_entropy", grid, schedule, m, stages,
                                host_staging=staging)
        assert engine.host_staging is staging and engine.needs_inputs == (grid.pp_rank == 0)
        steps = []
        # the second step reuses every buffer; the third has 5 rows: 3 + 2 over the
        # replicas, so one of replica 1's three micro-batches is empty
        for rows in (37, 37, 5):
            lo, hi = share_bounds(rows, grid.dp_rank, 2)
            x = data.train_features(slice(lo, hi)) if engine.needs_inputs else None
            loss = engine.train_step(x, data.y_train[lo:hi], 1.0 / rows)
            steps.append((loss, model.flat.grad.copy()))
        x_test = data.test_features(0, 300) if engine.needs_inputs else None
        steps.append(engine.evaluate(x_test, data.y_test[:300], chunk=128))
        results.append(steps)
    direct, staged = results
    for (l0, g0), (l1, g1) in zip(direct[:3], staged[:3], strict=True):
        assert l0 == l1 and np.array_equal(g0, g1)
    assert np.any(direct[0][1] != 0) and np.any(direct[2][1] != 0)
    assert direct[3] == staged[3]
    if grid.pp_rank == 1:  # the last stage holds the evaluation counts
        assert staged[3][1] > 0
    comm.Free()


# ------------------------------------------------------------ without MPI


@pytest.mark.parametrize("kwargs,match", [
    (dict(world=4, dp=None, pp=3), "cannot be split into pipelines"),
    (dict(world=4, dp=3, pp=2), "mpirun -n 6"),
    (dict(world=5, dp=None, pp=5), "more pipeline stages than the model has"),
    (dict(world=4, dp=2, pp=2, batch_size=7), "fewer than --micro-batches 4"),
    (dict(world=2, dp=None, pp=2, partition="2,1"), "must sum to 4"),
    (dict(world=2, dp=None, pp=1, micro_batches=2), "use it with --pp 2"),
])
def test_config_errors(kwargs, match):
    cfg = dict(n_layers=4, batch_size=100, micro_batches=4, partition=None) | kwargs
    with pytest.raises(PipelineConfigError, match=match):
        check_pipeline_config(cfg["world"], cfg["dp"], cfg["pp"], cfg["n_layers"],
                              cfg["batch_size"], cfg["micro_batches"], cfg["partition"])


def test_config_ok():
    assert check_pipeline_config(4, None, 2, 4, 8, 4) == (2, 2)


@pytest.mark.skipif(os.environ.get("PMI_RANK") is not None, reason="spawns its own mpirun")
def test_cli_errors_are_collective_and_clear():
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [mpirun, "-n", "2", sys.executable, "-m", "mpnn.train", "--dataset", "digits",
           "--hidden", "16", "--epochs", "1", "--quiet", "--pp", "3"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2
    out = p.stdout + p.stderr
    assert out.count("cannot be split into pipelines of --pp 3 stages") == 1, out
    p = subprocess.run(cmd[:-1] + ["2", "--micro-batches", "200"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 2 and "fewer than --micro-batches 200" in p.stdout + p.stderr
