"""Faults end cleanly and bad input is a clear error: every case runs the real
command line (under ``mpirun`` where it matters) in a subprocess with a time limit,
and checks the message the user sees and the non-zero exit status.

These tests start their own ``mpirun``, so they belong to the serial pass.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mpnn.data import write_idx
from mpnn.runtime import checkpoint as ck

from conftest import build_run

MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")
FAST = ["--dataset", "digits", "--hidden", "16", "--epochs", "1", "--quiet"]
LIMIT = 90  # seconds for a case that must fail fast (imports dominate on a loaded machine)


def cli(*argv, ranks=None, timeout=LIMIT, code=None, cwd=None, env=None):
    """Run ``python -m mpnn.train`` (or ``python -c code``) under mpirun with ``ranks``.
    Returns (exit status, stdout + stderr, seconds)."""
    cmd = [sys.executable, *(["-c", code] if code else ["-m", "mpnn.train"]), *map(str, argv)]
    if ranks:
        cmd = [MPIRUN, "-n", str(ranks), *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1", MPNN_DATA="/nonexistent",
               MPNN_MIRROR="http://127.0.0.1:9/", **(env or {}))  # offline: no download
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    return p.returncode, p.stdout + p.stderr, time.monotonic() - t0


def idx_dir(root, name, images=50, labels=None, magic=False, truncate=False, side=28,
            as_dir=False):
    """A directory of the four MNIST-named IDX files, optionally broken."""
    d = root / name
    d.mkdir()
    rng = np.random.default_rng(0)
    if as_dir:  # a directory where the training images file should be
        (d / "train-images-idx3-ubyte.gz").mkdir()
    else:
        write_idx(d / "train-images-idx3-ubyte",
                  rng.integers(0, 255, (images, 28, side)).astype(np.uint8))
    write_idx(d / "train-labels-idx1-ubyte",
              rng.integers(0, 10, (labels or images,)).astype(np.uint8))
    write_idx(d / "t10k-images-idx3-ubyte", rng.integers(0, 255, (20, 28, side)).astype(np.uint8))
    write_idx(d / "t10k-labels-idx1-ubyte", rng.integers(0, 10, (20,)).astype(np.uint8))
    images_file = d / "train-images-idx3-ubyte"
    raw = images_file.read_bytes() if not as_dir else b""
    if magic:
        images_file.write_bytes(b"PK\x03\x04" + raw[4:])
    if truncate:
        images_file.write_bytes(raw[:len(raw) // 2])
    return d


# (case id, argv builder given tmp_path, ranks, message shown once, exit status)
CASES = [
    ("missing-data-file", lambda t: ["--dataset", "mnist", "--data-dir", t], 2,
     "mnist: IDX files not found; searched:", 2),
    ("wrong-magic-idx",
     lambda t: ["--dataset", "mnist", "--data-dir", idx_dir(t, "m", magic=True)], 2,
     "train-images-idx3-ubyte: not an IDX file: the magic number 0x504b0304", 2),
    ("truncated-idx",
     lambda t: ["--dataset", "mnist", "--data-dir", idx_dir(t, "m", truncate=True)], 2,
     "found 19592: the file is truncated", 2),
    ("label-count",
     lambda t: ["--dataset", "mnist", "--data-dir", idx_dir(t, "m", labels=49)], 2,
     "holds 50 images but", 2),
    ("non-numeric-lr", lambda t: ["--lr", "fast"], 2,
     "argument --lr: expected a number, got 'fast'", 2),
    ("non-numeric-batch", lambda t: ["--batch-size", "64k"], 2,
     "argument --batch-size: expected a positive integer, got '64k'", 2),
    ("negative-lr", lambda t: ["--lr", "-0.1"], None, "expected a finite number >= 0, got -0.1", 2),
    ("negative-epochs", lambda t: ["--epochs", "-3"], None,
     "expected a positive integer, got -3", 2),
    ("zero-batch", lambda t: ["--batch-size", "0"], None, "expected a positive integer, got 0", 2),
    ("negative-micro-batches", lambda t: ["--pp", "2", "--micro-batches", "-1"], 2,
     "--micro-batches must be a positive integer (got -1)", 2),
    ("negative-checkpoint-every", lambda t: ["--checkpoint-every", "-5"], None,
     "expected a positive number of steps (e.g. 200) or epochs (e.g. 1e), got '-5'", 2),
    ("hidden-not-integer", lambda t: ["--hidden", "256,12.5"], 2, "'12.5' is not an integer", 2),
    ("hidden-word", lambda t: ["--hidden", "big"], None, "'big' is not an integer", 2),
    ("world-not-dp-times-pp", lambda t: ["--dp", "3", "--pp", "1"], 4,
     "--dp 3 x --pp 1 = 3 ranks, but the job has 4", 2),
    ("world-not-multiple-of-pp", lambda t: ["--pp", "2", "--hidden", "16,16"], 3,
     "3 MPI ranks cannot be split into pipelines of --pp 2 stages", 2),
    ("more-stages-than-layers", lambda t: ["--pp", "4"], 4,
     "--pp 4 asks for more pipeline stages than the model has linear layers (2)", 2),
    ("batch-smaller-than-ranks", lambda t: ["--batch-size", "3"], 4,
     "--batch-size 3 is smaller than the 4 ranks", 2),
    ("batch-smaller-than-ranks-x-micro-batches",
     lambda t: ["--pp", "2", "--hidden", "16,16", "--micro-batches", "8", "--batch-size", "12"], 4,
     "--batch-size 12 over 2 data-parallel replica(s) gives a replica 6 row(s) per step, fewer "
     "than --micro-batches 8", 2),
    ("unwritable-checkpoint-dir", lambda t: ["--checkpoint-dir", "/proc/mpnn-checkpoints"], 2,
     "--checkpoint-dir /proc/mpnn-checkpoints: cannot write there", 2),
    ("checkpoint-dir-under-a-file", lambda t: ["--checkpoint-dir", _file(t) / "ck"], 2,
     "cannot write there (Not a directory)", 2),
    ("unwritable-metrics-path", lambda t: ["--metrics", _file(t) / "m.jsonl"], 2,
     "m.jsonl: directory", 2),
    ("metrics-dir-missing", lambda t: ["--metrics", t / "no" / "m.jsonl"], 2, "does not exist", 2),
    ("trace-dir-missing", lambda t: ["--trace", t / "no" / "t.json"], None, "--trace", 2),
    ("corrupt-checkpoint", lambda t: ["--checkpoint-dir", _corrupt_checkpoint(t), "--resume"], 2,
     "ckpt-000000023.npz: unreadable, truncated or not an .npz", 2),
    ("missing-resume-file", lambda t: ["--resume", t / "nope.npz"], 2, "nope.npz: no such file", 2),
    ("save-path-is-a-directory", lambda t: ["--save", t], 2, "is a directory; give a file name", 2),
    ("trace-under-proc", lambda t: ["--trace", "/proc/t.json"], 2,
     "--trace /proc/t.json: directory /proc is not writable", 2),
    ("plot-unknown-format", lambda t: ["--plot", t / "c.xyz"], 2,
     "matplotlib cannot write .xyz", 2),
    ("hierarchical-with-zero", lambda t: ["--allreduce", "hierarchical", "--zero", "1"], 2,
     "--allreduce hierarchical sums whole gradients and --zero 1 reduce-scatters them", 2),
    ("unknown-allreduce", lambda t: ["--allreduce", "ring"], None,
     "argument --allreduce: invalid choice: 'ring'", 2),
    ("data-dir-missing", lambda t: ["--dataset", "mnist", "--data-dir", t / "typo"], 2,
     "typo: no such directory", 2),
    ("idx-is-a-directory",
     lambda t: ["--dataset", "mnist", "--data-dir", idx_dir(t, "m", as_dir=True)], 2,
     "train-images-idx3-ubyte.gz: is a directory, not an IDX file", 2),
    ("idx-images-without-pixels",
     lambda t: ["--dataset", "mnist", "--data-dir", idx_dir(t, "m", side=0)], 2,
     "train-images-idx3-ubyte: its images have no pixels (dimensions 28 x 0)", 2),
    ("idx-without-samples",
     lambda t: ["--dataset", "mnist", "--data-dir", idx_dir(t, "m", images=0)], 2,
     "train-images-idx3-ubyte: holds no images", 2),
    ("init-with-nan", lambda t: ["--init", _weights(t, nan=True)], 2,
     "layers.0.weight holds NaN or infinite values", 2),
    ("init-other-architecture", lambda t: ["--init", _weights(t, extra=True)], 2,
     "holds layers.2.weight, which a 64-16-10 model does not have", 2),
    # found by the independent attack (issue 16): each failed, hung or lost work before
    ("checkpoint-without-meta-step", lambda t: ["--resume", _crafted(t, drop="step")], 2,
     "meta.step is missing, expected an integer from 0 to 999999999", 2),
    ("checkpoint-step-beyond-names", lambda t: ["--resume", _crafted(t, step=10**9)], 2,
     "meta.step is 1000000000, expected an integer from 0 to 999999999", 2),
    ("checkpoint-negative-batch", lambda t: ["--resume", _crafted(t, batch=-1)], 2,
     "meta.batch is -1, expected an integer >= 0", 2),
    ("resume-momentum-0-with-momentum", lambda t: ["--optimizer", "sgd", "--momentum", "0.9",
                                                   "--resume", _crafted(t, sgd=True)], 2,
     "optimizer state none, but this run's optimizer keeps ['velocity']", 2),
    ("init-too-large-for-float32", lambda t: ["--init", _weights(t, huge=True)], 2,
     "layers.0.weight holds values too large for float32 (largest magnitude 1e+300", 2),
    ("threads-too-many", lambda t: ["--threads", "100000000000000000000"], 2,
     "argument --threads: expected a thread count from 1 to 4096", 2),
    ("save-empty", lambda t: ["--save", ""], 2, "--save '': give a file name", 2),
    ("resume-empty", lambda t: ["--resume", ""], 2, "--resume '': give a file", 2),
    ("metrics-fifo", lambda t: ["--metrics", _fifo(t)], 2, "is a FIFO", 2),
    ("checkpoint-dir-of-another-run", lambda t: ["--checkpoint-dir", _finished_run(t)], 2,
     "already holds 1 checkpoint(s) of an earlier run (newest ckpt-000000023.npz): "
     "add --resume", 2),
]


def _weights(tmp_path, nan=False, extra=False, huge=False):
    """A --save file for FAST's model, broken as asked."""
    state = build_run(FAST).model.state_dict()
    if nan:
        state["layers.0.weight"][3, 4] = np.nan
    if huge:  # finite in float64, infinite once the run casts it to float32
        state["layers.0.weight"] = state["layers.0.weight"].astype(np.float64)
        state["layers.0.weight"][0, 0] = 1e300
    if extra:
        state["layers.2.weight"] = np.zeros((10, 10))
    path = tmp_path / "w.npz"
    np.savez(path, **state)
    return path


def _crafted(tmp_path, drop=None, sgd=False, **meta):
    """A checkpoint of FAST that passes its checksum, its meta edited as asked."""
    d = tmp_path / "ck-crafted"
    extra = ["--optimizer", "sgd", "--momentum", "0"] if sgd else []
    rc, out, _ = cli(*FAST, *extra, "--checkpoint-dir", d)
    assert rc == 0, out
    c = ck.read_checkpoint(str(d / "ckpt-000000023.npz"))
    c.meta.update(meta)
    if drop:
        del c.meta[drop]
    path = tmp_path / "crafted.npz"
    ck.write_checkpoint(str(path), c.params, c.optim, c.meta)
    return path


def _fifo(tmp_path):
    f = tmp_path / "fifo"
    os.mkfifo(f)
    return f


def _finished_run(tmp_path):
    d = tmp_path / "ck-done"
    rc, out, _ = cli(*FAST, "--checkpoint-dir", d, "--checkpoint-keep", "1")
    assert rc == 0, out
    return d


def _file(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("not a directory")
    return f


def _corrupt_checkpoint(tmp_path):
    d = tmp_path / "ck"
    rc, out, _ = cli(*FAST, "--checkpoint-dir", d)
    assert rc == 0, out
    path = d / "ckpt-000000023.npz"
    path.write_bytes(path.read_bytes()[:1000])  # truncated, as by a crash in a naive writer
    return d


@pytest.mark.parametrize("name, argv, ranks, message, status", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(tmp_path, name, argv, ranks, message, status):
    rc, out, seconds = cli(*FAST, *argv(tmp_path), ranks=ranks)
    assert rc == status, out
    assert message in out, out
    if ranks:  # one message for the whole job, not one per rank
        assert out.count(message) == 1, out
    assert "Traceback" not in out, out


# --------------------------------------------------------------- faults


INJECT = """
import sys
import mpnn.runtime.loop as loop
import mpnn.train as t
from mpi4py import MPI

real = loop.check_finite

def failing(model, loss, step, *a, **k):
    if MPI.COMM_WORLD.Get_rank() == 2 and step == 12:
        raise RuntimeError("injected failure in the middle of epoch 1")
    return real(model, loss, step, *a, **k)

loop.check_finite = failing
sys.exit(t.main(sys.argv[1:]))
"""
RUN = ["--dataset", "digits", "--hidden", "32,16", "--batch-size", "16", "--quiet"]


def test_exception_on_one_rank_ends_the_job_naming_it(tmp_path):
    d = tmp_path / "ck"
    rc, out, seconds = cli(*RUN, "--epochs", "2", "--checkpoint-dir", d, "--checkpoint-every", "5",
                           ranks=4, code=INJECT, timeout=120)
    assert rc != 0, out
    assert ("mpnn.train: error on rank 2: "
            "RuntimeError: injected failure in the middle of epoch 1") in out
    assert seconds < 60, f"took {seconds:.0f} s"
    assert ck.latest_checkpoint(str(d)) == str(d / "ckpt-000000010.npz")  # the last complete one
    rc, out, _ = cli(*RUN, "--epochs", "2", "--checkpoint-dir", d, "--resume",
                     "--save", tmp_path / "w.npz")
    assert rc == 0, out  # ... and a new run resumes from it


def _rank_pid(marker, rank):
    """PID of the process of world rank ``rank`` whose command line holds ``marker``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmdline and b"mpnn.train" in cmdline \
                and f"PMI_RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the rank's process through /proc")
def test_sigkill_of_one_rank_ends_the_job_and_the_last_checkpoint_loads(tmp_path):
    d = tmp_path / "ck-sigkill"
    cmd = [MPIRUN, "-n", "4", sys.executable, "-m", "mpnn.train", *RUN, "--epochs", "500",
           "--checkpoint-dir", str(d), "--checkpoint-every", "20"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(ck.list_checkpoints(str(d))) < 2:  # training is under way
            assert job.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        pid = _rank_pid(str(d), 2)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        out, _ = job.communicate(timeout=30)
        seconds = time.monotonic() - killed
    finally:
        if job.poll() is None:  # only our own job's process group
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode != 0, out
    assert seconds < 30
    if "BAD TERMINATION" in out:  # MPICH's hydra names the killed process
        assert "Killed (signal 9)" in out or "EXIT CODE: 9" in out, out
    latest = ck.latest_checkpoint(str(d))
    c = ck.read_checkpoint(latest)  # complete and verified
    assert c.meta["step"] % 20 == 0 and c.meta["step"] >= 40
    # and a run resumes from it (everything before the first collective, on one rank)
    run = build_run(RUN + ["--epochs", "500", "--checkpoint-dir", str(d), "--resume"])
    model, resume = run.model, run.resume
    assert resume.path == latest and resume.step == c.meta["step"]
    np.testing.assert_array_equal(model.state_dict()["layers.0.weight"],
                                  c.params["layers.0.weight"])


def test_non_finite_loss_under_mpirun_stops_with_step_and_layer(tmp_path):
    d = tmp_path / "ck"
    rc, out, _ = cli("--dataset", "digits", "--hidden", "32,16", "--epochs", "2", "--optimizer",
                     "sgd", "--lr", "1e30", "--lr-schedule", "constant", "--quiet",
                     "--checkpoint-dir", d, "--checkpoint-every", "1", ranks=2)
    assert rc != 0
    assert ("NonFiniteError: training loss is nan at step 2 (epoch 1, batch 2) on rank" in out
            and "output of layer 1" in out), out
    assert f"the last good checkpoint {d / 'ckpt-000000001.npz'} was not overwritten" in out
    assert os.listdir(d) == ["ckpt-000000001.npz"]
    ck.read_checkpoint(str(d / "ckpt-000000001.npz"))


def test_non_finite_loss_in_a_pipeline_names_the_layer_once():
    # the stage that computes the loss does not hold the layer where the NaN first
    # appears: the stages agree, and the one holding that layer reports, once
    rc, out, _ = cli("--dataset", "digits", "--hidden", "32,16", "--epochs", "2", "--optimizer",
                     "sgd", "--lr", "1e30", "--lr-schedule", "constant", "--quiet", "--pp", "2",
                     ranks=2)
    assert rc == 1, out
    assert out.count("NonFiniteError") == 1, out
    assert ("training loss is nan at step 2 (epoch 1, batch 2)" in out
            and "it first appears in the output of layer 1 (layers.1.weight/bias)" in out), out


def test_a_failure_in_the_start_up_lines_ends_every_rank(tmp_path):
    # rank 0 alone prints the start-up lines; a non-UTF-8 directory name with a strict
    # encoding makes that print fail on rank 0 only: the others must not wait for it
    d = os.fsencode(tmp_path) + b"/ck-\xff"
    rc, out, _ = cli(*FAST, "--checkpoint-dir", os.fsdecode(d), ranks=2)
    assert rc == 0, out  # first a normal run writes its checkpoint
    loud = [a for a in FAST if a != "--quiet"]  # the start-up lines name the directory
    rc, out, seconds = cli(*loud, "--epochs", "2", "--checkpoint-dir", os.fsdecode(d),
                           "--resume", ranks=2, env={"PYTHONIOENCODING": "utf-8:strict"})
    assert rc == 2 and seconds < LIMIT, out
    assert "UnicodeEncodeError" in out and "Traceback" not in out, out


def test_help_is_printed_once_under_mpirun():
    rc, out, _ = cli("--help", ranks=2)
    assert rc == 0 and out.count("usage: python -m mpnn.train") == 1, out


def test_the_error_line_is_never_lost_before_the_abort(tmp_path):
    for trial in range(3):  # it was lost in about 1 of 25 aborts
        rc, out, _ = cli(*RUN, "--epochs", "2", ranks=4, code=INJECT, timeout=120)
        assert rc != 0
        assert "injected failure in the middle of epoch 1" in out, (trial, out)


@pytest.mark.parametrize("delay", [0.4, 0.8, 1.5])  # after the interpreter started
def test_ctrl_c_while_starting_is_130_without_a_traceback(delay):
    # Ctrl-C at the terminal: the signal reaches mpirun and, through it, every rank,
    # here while they import (the first second) and set up
    cmd = [MPIRUN, "-n", "2", sys.executable, "-m", "mpnn.train", *FAST]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    time.sleep(delay)
    job.send_signal(signal.SIGINT)
    try:
        out, _ = job.communicate(timeout=60)
    finally:
        if job.poll() is None:  # only our own job's process group, ranks included
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode in (130, 0), out  # 0: it finished before the signal
    assert "Traceback" not in out and "BAD TERMINATION" not in out, out


def test_ctrl_c_during_shutdown_is_130_without_a_traceback(tmp_path):
    # a finished run's shutdown (MPI_Finalize): ends quietly, whatever the timing
    marker = tmp_path / "done"
    code = (f"import sys, time, pathlib, mpnn.train as t\n"
            f"status = t.main(sys.argv[1:])\n"
            f"pathlib.Path({str(marker)!r}).touch()\n"
            f"t.signal.signal(t.signal.SIGINT, lambda *_: t.os._exit(130))\n"
            f"time.sleep(5)\n"
            f"sys.exit(status)\n")
    cmd = [MPIRUN, "-n", "2", sys.executable, "-c", code, *FAST]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    try:
        out, _ = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 130, out
    assert "Traceback" not in out and "BAD TERMINATION" not in out, out
