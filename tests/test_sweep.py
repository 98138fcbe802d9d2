"""mpnn.sweep: the spec, the schedulers, the report (serial), and whole sweeps under
``mpirun -n 4`` (subprocesses): results and trial files, a failed trial recorded
while the sweep goes on, a trial equal to a standalone mpnn.train bit for bit,
--resume, and bad input refused before any trial."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mpnn.sweep.plan import Plan, estimated_flops, lower_bound
from mpnn.sweep.report import makespan, read_results, table
from mpnn.sweep.spec import SpecError, load_spec

from conftest import MPIRUN, train_cli


def _spec(tmp_path, text, name="spec.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


SMALL = """
[base]
dataset = "digits"
hidden = "16"
batch_size = 100
dtype = "float64"
[grid]
seed = [0, 1]
epochs = [3, 1]
"""


# ------------------------------------------------------------------- spec


def test_grid_is_the_product_first_key_slowest_then_hand_written_trials(tmp_path):
    trials = load_spec(_spec(tmp_path, SMALL + """
[[trial]]
optimizer = "sgd"
nesterov = true
hidden = [32, 16]
"""))
    assert [(t.options.get("seed"), t.options["epochs"]) for t in trials[:4]] == [
        (0, 3), (0, 1), (1, 3), (1, 1)]
    assert [t.id for t in trials] == ["000", "001", "002", "003", "004"]
    last = trials[4]
    assert last.options["hidden"] == [32, 16] and last.config.model.hidden == (32, 16)
    assert last.config.optim.nesterov and last.config.optim.optimizer == "sgd"
    assert "--nesterov" in last.argv and last.config.epochs == 10  # base's default
    assert trials[0].config.batch_size == 100 and trials[0].config.model.dtype == "float64"


@pytest.mark.parametrize("text, words", [
    ("[grid]\nlrr = [0.1]\n", ["trial 000", "unknown option 'lrr'", "did you mean lr?"]),
    ("[grid]\nsave = ['w.npz']\n", ["save is set by the sweep"]),
    ("[grid]\noptimizer = ['sgd', 'foo']\n", ["trial 001", "optimizer=foo", "invalid choice"]),
    ("[grid]\nlr = []\n", ["lr = []", "no trials"]),
    ("[base]\nepochs = 2\n", ["gives no trials"]),
    ("[grid]\nnesterov = [1]\n", ["nesterov is a flag"]),
    ("[grid]\nlr = 0.1\n", ["give a list"]),
    ("[grids]\nlr = [0.1]\n", ["unknown table", "grids"]),
    ("[grid\n", ["not valid TOML"]),
    ("[grid]\nhidden = [[16, 'x']]\n", ["hidden"]),
])
def test_bad_specs_are_refused_naming_the_trial_and_key(tmp_path, text, words):
    with pytest.raises(SpecError) as e:
        load_spec(_spec(tmp_path, text))
    for w in words:
        assert w in str(e.value), str(e.value)


def test_a_missing_spec_is_named(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(str(tmp_path / "none.toml"))


# ------------------------------------------------------------------ plans


def test_dynamic_hands_out_longest_first_static_round_robin(tmp_path):
    trials = load_spec(_spec(tmp_path, SMALL))  # epochs 3, 1, 3, 1
    costs = [estimated_flops(t.config) for t in trials]
    assert costs[0] == pytest.approx(3 * costs[1]) and costs[0] == costs[2]
    dynamic = Plan(trials, 2, "dynamic")
    assert [dynamic.next(g) for g in (1, 0, 0, 1, 0)] == [0, 2, 1, 3, None]
    static = Plan(trials, 2, "static")
    assert [static.next(1), static.next(1), static.next(1)] == [1, 3, None]
    assert [static.next(0), static.next(0), static.next(0)] == [0, 2, None]
    assert lower_bound([3, 1, 1, 1], 2) == 3 and lower_bound([2, 2, 2, 2], 2) == 4


def test_table_sorts_by_the_metric_and_lists_failures(tmp_path):
    trials = load_spec(_spec(tmp_path, SMALL))
    rec = [{"id": t.id, "index": t.index, "options": t.options, "status": "ok", "error": None,
            "final": {"test_accuracy": a, "test_loss": 1 - a, "train_loss": 0.5},
            "wall_s": 1.0, "start_s": 0.0, "end_s": 1.0, "group": 0, "curve": [a]}
           for t, a in zip(trials, [0.5, 0.9, 0.7, 0.1], strict=True)]
    rec[3].update(status="failed", error="boom", final={})
    lines = table(rec, trials, "test_accuracy").splitlines()
    assert [ln.split()[1] for ln in lines[1:4]] == ["001", "002", "000"]
    assert lines[-1].startswith("failed 003") and lines[-1].endswith("boom")
    by_loss = table(rec, trials, "test_loss").splitlines()
    assert [ln.split()[1] for ln in by_loss[1:4]] == ["001", "002", "000"]
    for r, speed in zip(rec, [3.0, 1.0, 2.0, 0.0], strict=True):
        r["final"]["samples_per_s"] = speed
    by_speed = table(rec, trials, "samples_per_s").splitlines()  # the fastest first
    assert [ln.split()[1] for ln in by_speed[1:4]] == ["000", "002", "001"]
    assert table(rec, trials, "train_loss").splitlines()[0].count("train_loss") == 1
    assert makespan(rec, 2) == (1.0, 2.0, 2.0, 1.0)


# ---------------------------------------------------------- whole sweeps


def sweep(*args, ranks=4, timeout=240):
    p = subprocess.run([MPIRUN, "-n", str(ranks), sys.executable, "-m", "mpnn.sweep",
                        *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    return p.returncode, p.stdout + p.stderr


MIXED = SMALL + """
[[trial]]
optimizer = "adam"
nesterov = true
[[trial]]
dp = 2
epochs = 2
seed = 7
[[trial]]
pp = 2
hidden = "32,16"
epochs = 2
optimizer = "sgd"
lr = 1e30
lr_schedule = "constant"
"""


def test_sweep_records_every_trial_and_a_failure_does_not_stop_it(tmp_path):
    spec = _spec(tmp_path, MIXED)
    out = tmp_path / "out"
    status, text = sweep(spec, "--out", out, "--group-size", 2, "--plot", out / "sweep.png",
                         "--quiet")
    assert status == 0, text
    assert "Traceback" not in text, text
    records = {r["id"]: r for r in read_results(out / "results.jsonl")}
    assert sorted(records) == [f"{k:03d}" for k in range(7)]
    assert records["004"]["status"] == "failed"
    assert "--nesterov needs --optimizer sgd" in records["004"]["error"]
    nan = records["006"]
    assert nan["status"] == "failed" and "training loss is nan" in nan["error"], nan
    ok = [r for r in records.values() if r["status"] == "ok"]
    assert len(ok) == 5 and {r["group"] for r in ok} <= {0, 1}
    assert all(r["ranks"] == 2 and len(r["curve"]) == r["options"]["epochs"] for r in ok)
    for r in ok:
        d = out / "trials" / r["id"]
        assert {p.name for p in d.iterdir()} >= {"config.json", "metrics.jsonl", "weights.npz",
                                                 "log.txt"}
        assert len((d / "metrics.jsonl").read_text().splitlines()) == r["options"]["epochs"]
        assert json.loads((d / "config.json").read_text())["options"] == r["options"]
    assert "failed 006" in text and "makespan" in text
    assert (out / "sweep.png").stat().st_size > 0


def test_a_trial_equals_a_standalone_run_bit_for_bit(tmp_path):
    """Same options, same ranks, same threads: the same code on a communicator of the
    same size, so the same additions in the same order."""
    spec = _spec(tmp_path, """
[base]
dataset = "digits"
hidden = "16,12"
batch_size = 100
dtype = "float64"
threads = 1
[[trial]]
dp = 2
epochs = 2
optimizer = "sgd"
[[trial]]
pp = 2
micro_batches = 2
epochs = 2
""")
    out = tmp_path / "out"
    status, text = sweep(spec, "--out", out, "--group-size", 2, "--quiet")
    assert status == 0, text
    for tid, opts in (("000", ["--dp", 2, "--optimizer", "sgd"]),
                      ("001", ["--pp", 2, "--micro-batches", 2])):
        ref = tmp_path / f"{tid}.npz"
        status, text = train_cli("--dataset", "digits", "--hidden", "16,12", "--batch-size", 100,
                                 "--dtype", "float64", "--threads", 1, "--epochs", 2, *opts,
                                 "--quiet", "--save", ref, ranks=2)
        assert status == 0, text
        with np.load(ref) as a, np.load(out / "trials" / tid / "weights.npz") as b:
            assert sorted(a.files) == sorted(b.files)
            for name in a.files:
                assert np.array_equal(a[name], b[name]), (tid, name)


def test_resume_skips_the_trials_already_done(tmp_path):
    spec = _spec(tmp_path, SMALL)
    out = tmp_path / "out"
    status, text = sweep(spec, "--out", out, "--quiet", "--scheduler", "static")
    assert status == 0, text
    lines = (out / "results.jsonl").read_text().splitlines()
    kept = lines[:2]
    (out / "results.jsonl").write_text("\n".join(kept) + "\n{\"torn")  # killed mid-write
    status, text = sweep(spec, "--out", out, "--resume")
    assert status == 0, text
    assert "4 trials (2 done before)" in text, text
    again = read_results(out / "results.jsonl")
    assert sorted(r["id"] for r in again) == ["000", "001", "002", "003"]
    assert [json.loads(x) for x in kept] == again[:2]  # untouched
    status, text = sweep(spec, "--out", out, "--quiet")  # not --resume: refused
    assert status == 2 and "add --resume" in text, text


def test_resume_with_identical_trials(tmp_path):
    """Repeating a trial (run-to-run variance) is allowed, and resumes trial by trial."""
    spec = _spec(tmp_path, "[base]\ndataset = 'digits'\nhidden = '8'\nepochs = 1\n"
                           "[grid]\nlr = [0.01]\n[[trial]]\nlr = 0.01\n")
    out = tmp_path / "out"
    status, text = sweep(spec, "--out", out, "--quiet", ranks=2)
    assert status == 0, text
    assert "failed 0" not in text and "trial" in text
    status, text = sweep(spec, "--out", out, "--resume", ranks=2)
    assert status == 0 and "2 trials (2 done before)" in text, text


@pytest.mark.parametrize("extra, spec_text, words", [
    (["--group-size", 3], SMALL, ["--group-size 3 does not divide the 4 MPI ranks"]),
    (["--group-size", 1], SMALL + "[[trial]]\npp = 2\n",
     ["trial 004 does not fit a group of 1 rank(s)"]),
    ([], "[grid]\nlrr = [1]\n", ["unknown option 'lrr'"]),
    ([], "[grid]\nlr = []\n", ["no trials"]),
    (["--plot", "/nonexistent/dir/x.png"], SMALL, ["--plot"]),
])
def test_bad_input_is_one_message_before_any_trial(tmp_path, extra, spec_text, words):
    spec = _spec(tmp_path, spec_text)
    out = tmp_path / "out"
    status, text = sweep(spec, "--out", out, *extra, timeout=60)
    assert status == 2, text
    assert "Traceback" not in text, text
    errors = [ln for ln in text.splitlines() if "error" in ln]
    assert len(errors) == 1, text  # once, not once per rank
    for w in words:
        assert w in errors[0], text
    assert not (out / "results.jsonl").exists()
