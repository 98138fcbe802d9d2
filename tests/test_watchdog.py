"""The watchdog (``--timeout``): a rank that stops answering ends the job with a
diagnosis, the flight record, and ``--check-collectives``.

Serial tests that run ``mpirun`` themselves (wall time bounded): one rank is
stopped with SIGSTOP mid-epoch, and the others must end the job within
``--timeout`` + 10 s, naming the operation and the stopped rank; the last
checkpoint then resumes.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpnn.runtime import watchdog as wd

from conftest import MPIRUN, train_cli

TIMEOUT = 4  # --timeout of the stalled runs, seconds
BOUND = TIMEOUT + 10  # the job must end within this after the stop
BASE = ["--dataset", "digits", "--hidden", "16", "--epochs", "100000", "--threads", "1"]


def _rank_pids(marker):
    """{world rank: pid} of the python ranks whose command line holds ``marker``."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() not in argv or b"mpnn.train" not in argv:
            continue
        rank = [e for e in env if e.startswith(b"PMI_RANK=")]
        if rank and "mpirun" not in argv[0].decode(errors="replace"):
            out[int(rank[0].split(b"=")[1])] = int(d.name)
    return out


def _stalled_run(tmp_path, grid, stop_rank, ranks=4, every="20"):
    """Start a run, wait until it trains and has a checkpoint, SIGSTOP ``stop_rank``;
    (exit status, output, seconds from the stop to the end, checkpoint dir)."""
    ck = tmp_path / "ck"
    metrics = tmp_path / "m.jsonl"
    cmd = [MPIRUN, "-n", str(ranks), sys.executable, "-m", "mpnn.train", *BASE, *grid,
           "--timeout", str(TIMEOUT), "--checkpoint-dir", str(ck), "--checkpoint-every", every,
           "--metrics", str(metrics)]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    stopped = None
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.stat().st_size and list(ck.glob("ckpt-*.npz"))):
            assert job.poll() is None, job.communicate()[0]
            assert time.monotonic() < deadline, "the run never trained"
            time.sleep(0.2)
        pids = _rank_pids(str(metrics))
        assert sorted(pids) == list(range(ranks)), pids
        time.sleep(2)  # a few heartbeats: the others know the rank before it stops
        stopped = pids[stop_rank]
        os.kill(stopped, signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            out, _ = job.communicate(timeout=BOUND + 20)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            out, _ = job.communicate()
            pytest.fail(f"still running {BOUND + 20} s after rank {stop_rank} stopped:\n{out}")
        return job.returncode, out, time.monotonic() - t_stop, ck
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


@pytest.mark.parametrize("grid, stop_rank, what", [
    ([], 0, ""),  # rank 0 stopped: rank 1 reports (whatever op rank 0 left it in)
    (["--dp", "2", "--pp", "2", "--micro-batches", "2"], 1, ""),
    # parameter servers: a worker stopped under asp (the others go on until the epoch's
    # end, then wait for it); the server stopped under bsp (every worker waits in a pull)
    (["--sync", "asp"], 2, ""),
    (["--servers", "1"], 0, ""),
], ids=["data-parallel", "dp2-pp2", "asp-worker", "bsp-server"])
def test_a_stopped_rank_ends_the_job_with_a_diagnosis(tmp_path, grid, stop_rank, what):
    every = "1e" if "--sync" in grid or "--servers" in grid else "20"
    code, out, took, ck = _stalled_run(tmp_path, grid, stop_rank, every=every)
    assert code != 0, out  # (mpirun reports the stopped rank's SIGKILL, or the abort's status)
    assert "MPI_Abort(comm=" in out and f", {wd.EXIT_TIMEOUT})" in out, out
    assert took <= BOUND, f"ended {took:.1f} s after the stop (bound {BOUND} s):\n{out}"
    assert "mpnn.train: watchdog: world rank" in out and f"(timeout {TIMEOUT} s)" in out, out
    assert f"world rank {stop_rank}: not answering" in out, out
    assert what in out and " of step " in out and "flight records: " in out, out
    # the flight record of every rank that fired
    records = sorted(ck.glob("flight-rank*.json"))
    assert records and f"flight-rank{stop_rank}.json" not in [p.name for p in records], records
    record = json.loads(records[0].read_text())
    assert record["waiting"] is not None and record["ops"], record
    assert {"what", "ranks", "peer", "bytes", "seq", "start_s", "end_s"} <= set(record["ops"][-1])
    # the last checkpoint still loads and the run resumes from it (serially)
    code, resumed = train_cli("--dataset", "digits", "--hidden", "16", "--epochs", "2",
                              "--checkpoint-dir", ck, "--resume", timeout=120)
    assert code == 0, resumed
    assert "resuming from" in resumed, resumed


def test_mismatched_collective_is_named_with_both_call_sites():
    code, out = train_cli("--dataset", "digits", "--hidden", "16", "--epochs", "1", "--quiet",
                          "--check-collectives", ranks=2, env={"MPNN_TEST_MISMATCH_RANK": "1"},
                          timeout=120)
    assert code != 0, out
    assert "--check-collectives: world rank 0 calls Allreduce of 3 float64" in out, out
    assert "but world rank 1 calls Allreduce of 4 float64" in out, out
    line = next(x for x in out.splitlines() if "--check-collectives:" in x)
    assert line.count("(sum_over), called from") == 2 and line.count("(_train)") == 2, line


def test_without_the_check_the_watchdog_records_and_passes_healthy_runs(tmp_path):
    """A healthy run with the default timeout and --trace writes each rank's flight record
    beside the timeline, and exits 0."""
    trace = tmp_path / "t.json"
    code, out = train_cli("--dataset", "digits", "--hidden", "16", "--epochs", "1", "--quiet",
                          "--trace", trace, ranks=2, timeout=120)
    assert code == 0, out
    for r in (0, 1):
        record = json.loads(Path(f"{trace}.flight-rank{r}.json").read_text())
        assert record["rank"] == r and record["waiting"] is None  # (after the last wait)
        whats = {op["what"].split(" of step")[0] for op in record["ops"]}
        assert {"gradient Allreduce", "metrics sum", "timeline gather"} <= whats, whats


def test_a_long_healthy_step_does_not_trip_the_default_timeout():
    """A wide model whose steps take seconds: the default follows the step time."""
    # digits in one batch of 1437 rows through 38M parameters: seconds per step; with the
    # floor lowered to 1 s the timeout is 50 x the slowest step, not the floor
    code, out = train_cli("--dataset", "digits", "--hidden", "6144,6144", "--batch-size",
                          "1437", "--epochs", "3", "--optimizer", "sgd", ranks=2, timeout=600,
                          env={"MPNN_TEST_WATCHDOG_FLOOR_S": "1"})
    assert code == 0, out
    assert "watchdog" not in out, out
    seconds = [float(line.split("(")[-1].split(" s)")[0]) for line in out.splitlines()
               if line.startswith("epoch ") and " s)" in line]
    assert seconds and max(seconds) > 1.0, out  # the steps were longer than the floor


def test_default_timeout_follows_the_slowest_step():
    w = wd.Watch.__new__(wd.Watch)
    w.fixed, w.slowest_step, w.floor = None, None, wd.FLOOR_S
    assert w.timeout() == wd.START_S
    w.step_time(0.01)
    assert w.timeout() == wd.FLOOR_S
    w.step_time(3.0)
    w.step_time(1.0)
    assert w.timeout() == wd.STEP_FACTOR * 3.0
    w.fixed = 7.0
    assert w.timeout() == 7.0
