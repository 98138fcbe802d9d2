"""One run per checkpoint directory, and a resume never mixes two runs' checkpoints
there: the lock, branch refusal and what pruning keeps."""

import json
import os
import socket
import subprocess
import sys

import pytest

from mpnn.runtime import checkpoint as ck
from mpnn.runtime.lock import LOCK_NAME, LockError, take_lock

from conftest import train_cli

RUN = ["--dataset", "digits", "--hidden", "16", "--batch-size", "200", "--quiet",
       "--optimizer", "sgd", "--lr", "0.05"]  # 8 steps per epoch


def steps(d):
    return [int(os.path.basename(p)[5:14]) for p in ck.list_checkpoints(str(d))]


def dead_pid():
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)


# ------------------------------------------------------------------ the lock


def test_lock_is_exclusive_and_reentrant(tmp_path):
    lock = take_lock(str(tmp_path))
    assert take_lock(str(tmp_path)).path == lock.path  # this process already holds it
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_live_lock_of_another_run_is_refused_naming_it(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps(
            {"pid": other.pid, "host": socket.gethostname(), "started": "then"}))
        with pytest.raises(LockError, match=f"in use by another run \\(pid {other.pid} on host "):
            take_lock(str(tmp_path))
    finally:
        other.kill()
        other.wait()


def test_lock_of_another_host_says_how_to_remove_it(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(LockError, match=f"if that run is gone, remove .*{LOCK_NAME}"):
        take_lock(str(tmp_path))


def test_stale_lock_of_a_dead_run_is_taken_over_and_named(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    pid = dead_pid()
    (d / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                           "started": "2026-01-01 00:00:00"}))
    stale = d / f".ckpt-000000004.npz.{pid}.tmp"  # its checkpoint write, cut short
    stale.write_bytes(b"partial")
    rc, out = train_cli(*RUN, "--epochs", "1", "--checkpoint-dir", d)
    assert rc == 0, out
    assert f"took over the lock of {d} from a run that is gone (pid {pid}" in out, out
    assert f"removed 1 temporary file(s) of killed writers from {d}: {stale.name}" in out, out
    assert sorted(os.listdir(d)) == ["ckpt-000000008.npz"]  # the lock released at the end


def test_two_runs_started_together_into_one_directory(tmp_path):
    d = tmp_path / "ck"
    cmd = [sys.executable, "-m", "mpnn.train", *RUN, "--epochs", "3", "--checkpoint-dir", str(d)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    jobs = [subprocess.Popen(cmd + ["--seed", str(s)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env) for s in (1, 2)]
    outs = [j.communicate(timeout=120)[0] for j in jobs]
    codes = sorted(j.returncode for j in jobs)
    assert codes == [0, 2], outs
    loser = outs[[j.returncode for j in jobs].index(2)]
    assert "is in use by another run" in loser or "already holds" in loser, loser
    assert steps(d) == [8, 16, 24]  # one run's checkpoints, none replaced by the other's


# ------------------------------------------------------------- branches, pruning


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A run checkpointed every 4 steps (steps 4 ... 24), all kept."""
    d = tmp_path_factory.mktemp("long") / "ck"
    rc, out = train_cli(*RUN, "--epochs", "3", "--checkpoint-dir", d, "--checkpoint-every", "4",
                  "--checkpoint-keep", "0")
    assert rc == 0, out
    return d


def test_resume_from_an_older_step_is_refused_not_mixed(long_run):
    before = steps(long_run)
    rc, out = train_cli(*RUN, "--epochs", "3", "--lr", "0.01", "--checkpoint-dir", long_run,
                  "--resume", ck.checkpoint_path(str(long_run), 8), "--checkpoint-every", "6")
    assert rc == 2, out
    assert "holds 4 checkpoint(s) after step 8 (newest ckpt-000000024.npz)" in out, out
    assert "give this run a new --checkpoint-dir" in out
    assert steps(long_run) == before  # nothing pruned, nothing written


def test_resume_of_another_directory_into_a_used_one_is_refused(long_run, tmp_path):
    other = tmp_path / "other"
    rc, out = train_cli(*RUN, "--epochs", "1", "--checkpoint-dir", other)
    assert rc == 0, out
    rc, out = train_cli(*RUN, "--epochs", "3", "--checkpoint-dir", other,
                  "--resume", ck.checkpoint_path(str(long_run), 8))
    assert rc == 2 and "holds 1 checkpoint(s) of another run (newest ckpt-000000008.npz)" in out


def test_branch_into_a_new_directory_keeps_its_own_and_the_start(long_run, tmp_path):
    new = tmp_path / "branch"
    start = ck.checkpoint_path(str(long_run), 8)
    rc, out = train_cli(*RUN, "--epochs", "3", "--lr", "0.01", "--checkpoint-dir", new,
                  "--resume", start, "--checkpoint-every", "6", "--checkpoint-keep", "2")
    assert rc == 0, out
    assert steps(new) == [18, 24]  # the newest two of its own 12, 18, 24
    assert os.path.exists(start)


def test_continuing_in_its_own_directory_prunes_only_older_steps(tmp_path):
    d = tmp_path / "ck"
    rc, out = train_cli(*RUN, "--epochs", "1", "--checkpoint-dir", d, "--checkpoint-every", "3")
    assert rc == 0 and steps(d) == [3, 6, 8], out
    rc, out = train_cli(*RUN, "--epochs", "2", "--checkpoint-dir", d, "--checkpoint-every", "3",
                  "--resume")
    assert rc == 0, out
    assert steps(d) == [12, 15, 16]  # keep 3: this run's newest
