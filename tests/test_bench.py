"""``python -m mpnn.bench``: the step it times is the trainer's, the figures'
arithmetic, tiny end-to-end runs (serial and under mpirun)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mpi4py import MPI

from mpnn.bench import dp_worker, measure, report, runners
from mpnn.bench.__main__ import main, ratio_pairs
from mpnn.data.batching import batch_bounds, epoch_permutation, share_bounds


@pytest.fixture(scope="module")
def data():
    return runners.bench_data(rows=600)


def test_step_flops():
    nominal, executed = measure.step_flops(2)
    macs = 784 * 256 + 256 * 128 + 128 * 64 + 64 * 10
    assert nominal == 6 * 2 * macs
    assert executed == nominal - 2 * 2 * 784 * 256  # no input gradient for the first layer


def test_paired_ratio_is_the_median_of_pairs():
    samples = {"a": [10.0, 20.0, 30.0], "b": [5.0, 20.0, 10.0]}
    assert measure.paired_ratios(samples, "a", "b") == [2.0, 1.0, 3.0]
    assert measure.paired_ratio(samples, "a", "b") == 2.0
    assert measure.paired_ratio(samples, "a", "b", scale=0.5) == 1.0
    assert measure.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_batch_stream_draws_the_trainers_rows(replicas):
    """Each replica's rows, step by step, are its share of the trainer's global batches,
    the last partial one included, with a fresh permutation for the next epoch."""
    n, batch = 50, 16
    streams = [runners.BatchStream(n, batch, r, replicas) for r in range(replicas)]
    for epoch in (1, 2):
        order = epoch_permutation(n, runners.SEED, epoch)
        for start, stop in batch_bounds(n, batch):
            for r, s in enumerate(streams):
                rows, global_batch = s.next()
                lo, hi = share_bounds(stop - start, r, replicas)
                assert global_batch == stop - start
                np.testing.assert_array_equal(rows, order[start + lo:start + hi])


def test_mpnn_runner_steps_like_the_trainer(data):
    """Same weights as the trainer's loop written out: permutation, gather, step, update."""
    from mpi4py import MPI

    from mpnn.kernels import get_ops
    from mpnn.nn.model import MLP
    from mpnn.nn.optim import make_optimizer
    from mpnn.parallel.data_parallel import DataParallelEngine

    batch, steps = 64, 12  # 600 rows: 10 batches (the last of 24 rows), then epoch 2
    runner = runners.MpnnRunner("numpy", batch, data)
    assert runner.run(steps) == 600 + 2 * batch

    ops = get_ops("numpy")
    model = MLP(runners.SIZES, "relu", np.float32, runners.SEED, ops=ops)
    opt = make_optimizer("sgd", model.flat, ops, runners.LR, runners.MOMENTUM)
    engine = DataParallelEngine(model, "cross_entropy", MPI.COMM_SELF, 0.1)
    done = 0
    for epoch in (1, 2):
        order = epoch_permutation(600, runners.SEED, epoch)
        for start, stop in batch_bounds(600, batch):
            if done == steps:
                break
            rows = order[start:stop]
            engine.train_step(data.x_train[rows], data.y_train[rows], 1.0 / (stop - start))
            opt.step(runners.LR)
            done += 1
    np.testing.assert_array_equal(runner.model.flat.data, model.flat.data)


def test_torch_runner_trains_the_same_rows(data):
    pytest.importorskip("torch")
    runner = runners.make_runner("torch", 64, data)
    assert runner.run(11) == 600 + 64
    assert runner.stream.epoch == 2


def test_configure_threads_sets_torchs_pool():
    torch = pytest.importorskip("torch")
    from mpnn.runtime.threads import configure_threads

    before = torch.get_num_threads()
    try:
        assert configure_threads(MPI.COMM_SELF, 1, torch=True)[0] == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
        configure_threads(MPI.COMM_SELF)


def test_ratio_pairs():
    assert ratio_pairs(["numpy", "numba", "torch"]) == [("numba", "torch"), ("numba", "numpy")]
    assert ("cupy", "torch-cuda") in ratio_pairs(["numba", "cupy", "torch-cuda"])


def test_serial_run_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = main(["--batches", "8,16", "--repeats", "2", "--block-s", "0.01", "--rows", "200",
                   "--backends", "numpy,numba", "--no-dp", "--no-wide", "--no-zero", "--no-sweep",
                   "--no-node", "--no-hosts", "--no-watchdog", "--no-consistency",
                   "--json", str(out)])
    data = json.loads(out.read_text())
    assert set(data["samples_per_s"]) == {"8", "16"}
    assert data["samples_per_s"]["8"]["numba"] > 0
    lo, hi = data["samples_per_s_range"]["8"]["numba"]
    assert lo <= data["samples_per_s"]["8"]["numba"] <= hi
    assert data["numba_step_flops"]["16"]["executed_fraction"] > 0
    assert set(data["ratios"]) == {"numba/numpy"}
    assert result["data_parallel"] is None
    assert "zero" not in result and "wide_model" not in result
    assert "node" not in result and "hosts" not in result
    text = capsys.readouterr().out
    assert "numba/numpy" in text and "[" in text  # medians with their ranges
    assert "issue" not in text.lower()


def test_targets_are_said_in_words():
    fake = {"ratios": {"numba/torch": {"64": 1.6, "256": 1.1}},
            "ratio_ranges": {"numba/torch": {"64": [1.5, 1.7], "256": [1.0, 1.2]}},
            "numba_step_flops": {}, "data_parallel": None}
    targets = report.judge_targets(fake)
    assert targets["numba/torch at batch 64"]["met"]
    assert not targets["numba/torch at batch 256"]["met"]
    assert all(t["what"] for t in targets.values())


def test_unknown_backend_is_refused():
    with pytest.raises(SystemExit, match="unknown backend"):
        main(["--backends", "numpy,fortran", "--no-dp", "--no-wide", "--no-zero", "--no-sweep",
              "--no-node", "--no-hosts", "--no-watchdog", "--no-consistency"])


def test_dp_measurement_under_mpirun():
    """The bench launches mpirun -n 2 python -m mpnn.bench.dp_worker; the replicas must agree."""
    dp = dp_worker.launch(ranks=2, repeats=2, block_s=0.01, batch=16, rows=256)
    if isinstance(dp, str) and "not found" in dp:
        pytest.skip(dp)
    assert isinstance(dp, dict), dp
    assert dp["replicas_identical"]
    assert dp["buckets"]  # the overlapped engine is the bucketed one, as mpnn.train builds it
    for mode in dp_worker.MODES:
        assert dp[mode]["per_rank_samples_s"] > 0
    assert dp["overlapped"]["efficiency"] > 0


def test_pipeline_bench_end_to_end(capsys, tmp_path):
    """python -m mpnn.bench.pipeline on a tiny model: serial and two schedules under
    mpirun -n 2, the table, and figures that hold together."""
    import json

    from mpnn.bench import pipeline

    if dp_worker.find_mpirun() is None:
        pytest.skip("mpirun not found")
    out = tmp_path / "p.json"
    assert pipeline.main(["--dataset", "digits", "--hidden", "16,16,16", "--batch-size", "64",
                          "--micro-batches", "4", "--rounds", "1",
                          "--schedules", "zb-h1,interleaved-1f1b:2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "zb-h1" in text and "interleaved-1f1b V=2" in text and "serial 1 thread" in text
    figures = json.loads(out.read_text())
    assert len(figures["serial_samples_per_s"]) == 1
    for rows in figures["runs"].values():
        (row,) = rows
        assert row["ratio"] > 0 and 0 <= row["bubble"] < 1 and 0 <= row["expected"] < 1
        assert row["error"] == pytest.approx((row["bubble"] - row["expected"]) / row["expected"])


def test_pipeline_bench_refuses_unknown_schedules():
    from mpnn.bench import pipeline

    with pytest.raises(SystemExit):
        pipeline.parse_args(["--schedules", "1f1b,zigzag"])
    with pytest.raises(SystemExit):
        pipeline.parse_args(["--schedules", "interleaved-1f1b:x"])


def test_wide_model_modes_end_to_end(capsys):
    """python -m mpnn.bench.modes on a small model: the four modes, memory that
    halves where it should, and the bytes each mode sends."""
    from mpnn.bench import modes

    if dp_worker.find_mpirun() is None:
        pytest.skip("mpirun not found")
    result = modes.measure("64,64,64", batch=32, epochs=2, rounds=1)
    modes.report(result, "64,64,64", 32)
    text = capsys.readouterr().out
    assert all(m in text for m in modes.MODES)
    serial, tp, dp, pp = (result[m] for m in modes.MODES)
    assert tp["rank_bytes"]["params"][0] < serial["rank_bytes"]["params"][0]
    assert dp["rank_bytes"]["params"] == serial["rank_bytes"]["params"] * 2  # replicas
    assert tp["sent_per_step"] == tp["tp_formula"]  # measured = the formula
    assert dp["sent_per_step"] == dp["rank_bytes"]["grads"]
    assert pp["sent_per_step"] == [32 * 64 * 4] * 2


def test_zero_bench_options_and_sizes():
    from mpnn.bench import zero

    args = zero.parse_args([])
    assert (args.rounds, args.epochs, args.wide_epochs, args.batch_size, args.no_wide,
            args.ledger) == (3, 21, 3, 256, False, False)
    assert zero.parse_args(["--no-wide", "--ledger", "--rounds", "1"]).ledger
    assert zero.n_params(zero.DEFAULT_HIDDEN) == 58_442  # 64-256-128-64-10
    assert zero.n_params(zero.WIDE_HIDDEN) == 10_572_810 >= 10_000_000
    assert zero.padding(58_442, 2) == 0 and zero.padding(58_442, 4) == 2
    assert zero.padding(10_572_810, 4) == 2


def test_zero_bench_report_of_a_fake_record(capsys):
    """The table: medians, the ratios to stage 0, MB per rank (one figure when equal)."""
    from mpnn.bench import zero

    psi = 1_000_000

    def stage(rate, p, g, o, comm):
        b = {"params": [p] * 2, "grads": [g] * 2, "optimizer": [o] * 2}
        return {"samples_per_s": [rate, rate / 2, rate * 2],
                "rank_bytes": {**b, "comm": [comm, comm + 1_000_000], "activations": [1, 1]},
                "rank_bytes_formula": b}

    fake = {"ranks": 2, "batch": 256, "rounds": 3, "models": {"8,8": {
        "params": psi, "epochs": 2, "stages": {"0": stage(1000, 4 * psi, 4 * psi, 8 * psi, 0),
                                  "3": stage(500, 2 * psi, 2 * psi, 4 * psi, 3_000_000)}}}}
    zero.report(fake)
    lines = capsys.readouterr().out.splitlines()
    assert "mpirun -n 2" in lines[0]
    assert lines[2] == "--hidden 8,8 (1,000,000 parameters), --epochs 2"
    st0, st3 = lines[4].split(), lines[5].split()
    assert st0[:4] == ["0", "1,000", "[500,", "2,000]"]
    assert st0[4:] == ["1.00", "4", "4", "8", "0/1", "16", "16", "1.00"]
    assert st3[4:] == ["0.50", "2", "2", "4", "3/4", "8", "8", "0.50"]
    zero.report("mpirun not found")
    assert "not measured (mpirun not found)" in capsys.readouterr().out


def test_zero_bench_end_to_end(capsys, tmp_path):
    """python -m mpnn.bench.zero on a tiny model: the four stages at mpirun -n 2, the
    model states shrinking stage by stage to the formula; one ledger run at -n 4 whose
    last shard is short of the padding."""
    from mpnn.bench import zero

    if dp_worker.find_mpirun() is None:
        pytest.skip("mpirun not found")
    result = zero.measure({"32,32": 2}, batch=128, rounds=1)
    zero.report(result)
    assert "--hidden 32,32 (3,466 parameters)" in capsys.readouterr().out
    stages = result["models"]["32,32"]["stages"]
    states = [zero.model_states(stages[str(s)]["rank_bytes"])[0] for s in zero.STAGES]
    assert states == [zero.model_states(stages[str(s)]["rank_bytes_formula"])[0]
                      for s in zero.STAGES]  # 3,466 over 2 ranks: no padding, equal
    psi = 3_466
    assert states == [16 * psi, 8 * psi + 8 * psi // 2, 4 * psi + 12 * psi // 2, 16 * psi // 2]
    assert all(stages[str(s)]["samples_per_s"][0] > 0 for s in zero.STAGES)
    assert stages["0"]["rank_bytes"]["comm"] == [0, 0] and stages["3"]["rank_bytes"]["comm"][0]

    led = zero.ledger(("32,32",), ranks=(4,), stages=(3,))
    zero.ledger_report(led)
    row = led["32,32"]["runs"]["4"]["3"]
    assert row["padding"] == 2 and row["ok"]  # 3,466 = 4 x 867 - 2
    assert row["diff"][-1] < 0 < row["diff"][0]
    assert "yes" in capsys.readouterr().out


def test_sweep_bench_reports_its_configurations(capsys, tmp_path):
    """The sweep benchmark's table from a fake result (the real runs are minutes), and
    the spec it writes is a valid sweep of 12 trials whose costs differ tenfold."""
    from mpnn.bench import sweep as bench_sweep
    from mpnn.sweep.plan import estimated_flops
    from mpnn.sweep.spec import load_spec

    result = {f"{n}/{g}/{s}": [(10.0 if s == "static" else 5.0, 4.5, 4.5, 4.0)] * 2
              for n, g, s in bench_sweep.CONFIGS}
    bench_sweep.report(result)
    text = capsys.readouterr().out
    assert text.count("dynamic") == 3 and "0.50 [0.50, 0.50]" in text and "1.11" in text
    assert bench_sweep.main(["--write-spec", str(tmp_path / "s.toml")]) == 0
    trials = load_spec(str(tmp_path / "s.toml"))
    costs = [estimated_flops(t.config) for t in trials]
    assert len(trials) == 12 and max(costs) == 10 * min(costs)
    assert [c == max(costs) for c in costs] == [True, False, False, False] * 3


def test_consistency_bench_runs_every_model(tmp_path, capsys):
    """python -m mpnn.bench.consistency, small: 8 runs at -n 4 on digits, one epoch."""
    from mpnn.bench import consistency

    out = tmp_path / "c.json"
    consistency.main(["--dataset", "digits", "--epochs", "1", "--plot", str(tmp_path / "c.png"),
                      "--json", str(out)])
    data = json.loads(out.read_text())
    assert set(data["runs"]) == {"none", "1:3"}
    for runs in data["runs"].values():
        assert set(runs) == {"bsp", "ssp S=1", "ssp S=4", "asp"}
        assert runs["bsp"][0]["staleness_max"] == 0
        assert all(r[0]["samples_per_s"] > 0 and len(r[0]["curve"]) == 1 for r in runs.values())
    assert (tmp_path / "c.png").stat().st_size > 0
    assert "straggler" in capsys.readouterr().out
