"""Parameter-server options: what ``validate`` refuses (with what to do instead), what
``--sync`` implies, and whole runs under mpirun: the exit status and the message of a
bad option on every rank, a non-finite update ending the job, a straggler's run.

The equality with serial training and the consistency bounds are in
``test_param_server_mpi.py``.
"""

import json

import pytest

from mpnn.parallel.ps_config import DEFAULT_STALENESS
from mpnn.runtime.config import ConfigError, validate
from mpnn.train import parse_config

from conftest import train_cli

BASE = ["--dataset", "digits", "--hidden", "16,12", "--epochs", "1", "--quiet", "--threads", "1"]

REFUSED = {  # name: (world size, options, words the message must hold)
    "serial asp": (1, ["--sync", "asp"], ["--servers 1 leaves no worker", "mpirun -n 2"]),
    "all servers": (3, ["--servers", "3"], ["--servers 3 leaves no worker", "mpirun -n 4"]),
    "ssp without servers": (2, ["--sync", "ssp", "--servers", "0"],
                            ["--sync ssp runs through parameter servers", "--servers K"]),
    "staleness without ssp": (3, ["--sync", "asp", "--staleness", "2"],
                              ["--staleness", "add --sync ssp"]),
    "straggler without servers": (2, ["--straggler", "1:3"], ["add --servers K"]),
    "straggler is a server": (3, ["--sync", "asp", "--straggler", "0:3"],
                              ["world rank 0 is not a worker", "ranks 1..2"]),
    "straggler beyond the job": (3, ["--sync", "asp", "--straggler", "5:3"],
                                 ["world rank 5 is not a worker"]),
    "pp": (4, ["--servers", "1", "--pp", "2"], ["does not combine with --pp"]),
    "zero": (4, ["--servers", "1", "--zero", "1"], ["does not combine with --zero"]),
    "cupy": (3, ["--servers", "1", "--backend", "cupy"], ["--backend numba"]),
    "step checkpoints": (3, ["--sync", "asp", "--checkpoint-dir", "unused", "--checkpoint-every",
                             "10"], ["checkpoint at epoch ends", "--checkpoint-every 1e"]),
    "rma with adam": (3, ["--sync", "asp", "--rma"], ["--rma", "--optimizer sgd --momentum 0"]),
    "rma with bsp": (3, ["--servers", "1", "--rma", "--optimizer", "sgd", "--momentum", "0"],
                     ["needs --sync asp"]),
    "bsp batch below workers": (4, ["--servers", "1", "--batch-size", "2"],
                                ["--batch-size 2 is smaller than the 3 workers"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_validate_refuses_what_cannot_run(case):
    world, opts, words = REFUSED[case]
    with pytest.raises(ConfigError) as e:
        validate(parse_config(BASE + opts), world)
    msg = str(e.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


@pytest.mark.parametrize("opts, servers, staleness", [
    ([], 0, None),
    (["--sync", "asp"], 1, None),
    (["--sync", "ssp"], 1, DEFAULT_STALENESS),
    (["--sync", "ssp", "--staleness", "0", "--servers", "2"], 2, 0),
    (["--servers", "2"], 2, None),  # bsp through servers
])
def test_sync_implies_servers_and_a_bound(opts, servers, staleness):
    par = parse_config(BASE + opts).parallel
    assert (par.servers, par.staleness) == (servers, staleness)
    validate(parse_config(BASE + opts), 4)


@pytest.mark.parametrize("text", ["3", "a:2", "1:0.5", "-1:2", "1:inf"])
def test_straggler_must_be_rank_and_factor(text):
    with pytest.raises(SystemExit):
        parse_config(BASE + ["--straggler", text])


def test_a_refused_option_ends_every_rank_with_one_message():
    code, out = train_cli(*BASE, "--sync", "asp", "--straggler", "0:2", ranks=3)
    assert code == 2, out
    assert out.count("world rank 0 is not a worker") == 1, out
    assert "Traceback" not in out


@pytest.mark.parametrize("rma", [[], ["--rma"]], ids=["messages", "rma"])
def test_a_non_finite_update_ends_the_job_with_its_message(tmp_path, rma):
    """An update that overflows (lr 1e300) ends the job, named by step and layer: the
    server that applied it, or under --rma the first rank that sees it (a worker's
    pull, or a server's check at the epoch's end)."""
    code, out = train_cli(*BASE, "--sync", "asp", "--optimizer", "sgd", "--momentum", "0",
                          "--lr", "1e300", "--checkpoint-dir", tmp_path / "ck", *rma, ranks=3,
                          timeout=120)
    assert code == 1, out
    who = "on rank " if rma else "on rank 0: "
    assert f"error {who}" in out, out
    what = "NonFiniteError: " if rma else \
        "NonFiniteError: non-finite parameters after the optimizer step at step "
    assert what in out and " at step " in out and "(epoch 1, batch" in out, out
    assert "Traceback" not in out
    assert not list((tmp_path / "ck").glob("ckpt-*.npz"))  # nothing bad was saved


def test_a_straggler_run_reports_its_waits(tmp_path):
    metrics = tmp_path / "m.jsonl"
    code, out = train_cli(*BASE, "--sync", "ssp", "--staleness", "0", "--straggler", "1:3",
                          "--epochs", "2", "--metrics", metrics, ranks=3)
    assert code == 0, out
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert r["sync"] == "ssp" and r["servers"] == 1 and r["clock_gap_max"] == 0
        assert r["worker_blocked_s"][1] > 0  # the fast worker waited for the straggler
        assert abs(r["worker_pushes"][0] - r["worker_pushes"][1]) <= 1
