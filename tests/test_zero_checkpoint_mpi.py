"""ZeRO's checkpoints, timeline and guards.

A checkpoint holds the whole model whatever the stage: one written at --zero 3 on
4 ranks resumes at --zero 0 on 2 ranks and serially, one written at --zero 0 or
serially resumes at --zero 3 and --zero 2, one written at --zero 1/2 --dp 2 --pp 2
(1F1B, interleaved 1F1B, zb-h1) resumes serially (float64, <= 1e-9 from the
uninterrupted serial run); on the same grid a resumed run is bitwise the
uninterrupted one, optimizer state included, and every file holds the whole
model's parameters and optimizer state and the grid it was written on.
--trace names the reduce-scatters and all-gathers on every rank; the NaN/inf guard
stops every stage with plain data parallelism's message, naming the layer whose
shard went bad on another rank; the replica check finds a rank whose copy of a
slice it does not own diverged. Run under ``mpirun -n 2`` and ``-n 4``.
"""

import json
import re
import shutil

import numpy as np
import pytest

from mpnn.nn.model import MLP
from mpnn.nn.params import Layout
from mpnn.runtime import checkpoint as ck
from mpnn.runtime import guards, loop
from mpnn.runtime.guards import NonFiniteError, PeerReportedError
from mpnn.runtime.weights import load_weights, save_weights

from conftest import build_run, run_training, shared_dir, sub_world, trained_serially

# 64-13-11-9-10 on digits: 1,207 parameters (odd: 2 and 4 ranks leave padding);
# 1437 rows at --batch-size 239: 7 steps per epoch, the last batch 3 rows (at -n 4
# one rank has none); buckets of 0.0005 MB (62 float64) are smaller than a layer
BASE = ["--dataset", "digits", "--hidden", "13,11,9", "--epochs", "2", "--batch-size", "239",
        "--dtype", "float64", "--quiet", "--bucket-mb", "0.0005"]
SIZES = [64, 13, 11, 9, 10]
STEPS = 7  # per epoch
OPTIMIZERS = {
    "adam": ["--optimizer", "adam", "--lr", "0.003", "--weight-decay", "0.01"],
    "momentum": ["--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05"],
}
EVERY5 = ["--checkpoint-every", "5", "--checkpoint-keep", "0"]  # steps 5, 10 and the last, 14


def first(comm, n):
    """The first ``n`` ranks of ``comm`` (None on the others); collective over ``comm``."""
    from mpi4py import MPI

    inside = comm.Get_rank() < n
    sub = comm.Split(0 if inside else MPI.UNDEFINED, comm.Get_rank())
    return sub if inside else None


def resume(argv, comm, src, step, d, name):
    """Train ``argv`` on ``comm`` (None: serially) from ``src``'s checkpoint at ``step``;
    returns the path of its --save file."""
    save = f"{d}/{name}.npz"
    run_training(argv + ["--checkpoint-dir", f"{d}/{name}", "--resume",
                         ck.checkpoint_path(src, step), "--save", save], comm)
    return save


def max_diff(path, ref):
    w = load_weights(path)
    assert set(w) == set(ref)
    return max(float(np.max(np.abs(w[k] - ref[k]))) for k in ref)


def finish(comm, d):
    comm.Barrier()
    if comm.Get_rank() == 0:
        shutil.rmtree(d)
    comm.Free()


# ---------------------------------------------------- across grids and stages


@pytest.mark.mpi(min_size=4)
def test_zero3_checkpoint_resumes_at_zero0_and_serially():
    comm = sub_world(4)
    if comm is None:
        return
    d = shared_dir(comm)
    argv = BASE + OPTIMIZERS["adam"]
    ref, _ = trained_serially(argv)
    run_training(argv + ["--zero", "3", "--checkpoint-dir", f"{d}/a", *EVERY5,
                         "--save", f"{d}/full.npz"], comm)
    two = first(comm, 2)
    if two is not None:  # mid-epoch 1: the 3-row batch still ahead
        resume(argv + ["--zero", "0"], two, f"{d}/a", 5, d, "zero0")
        two.Free()
    serial = resume(argv, None, f"{d}/a", 10, d, f"serial{comm.Get_rank()}")  # mid-epoch 2
    comm.Barrier()
    assert max_diff(f"{d}/full.npz", ref) <= 1e-9
    assert max_diff(f"{d}/zero0.npz", ref) <= 1e-9
    assert max_diff(serial, ref) <= 1e-9
    assert max_diff(ck.checkpoint_path(f"{d}/a", 5), ref) > 1e-3  # training moved the weights
    finish(comm, d)


@pytest.mark.mpi(min_size=4)
def test_zero0_and_serial_checkpoints_resume_at_zero3_and_zero2():
    comm = sub_world(4)
    if comm is None:
        return
    d = shared_dir(comm)
    argv = BASE + OPTIMIZERS["momentum"]
    ref, _ = trained_serially(argv)
    two = first(comm, 2)
    if two is not None:
        run_training(argv + ["--zero", "0", "--checkpoint-dir", f"{d}/dp2", *EVERY5], two)
    comm.Barrier()
    resume(argv + ["--zero", "3"], comm, f"{d}/dp2", 5, d, "zero3")
    if comm.Get_rank() == 0:
        run_training(argv + ["--checkpoint-dir", f"{d}/serial", *EVERY5])
    comm.Barrier()
    if two is not None:
        resume(argv + ["--zero", "2"], two, f"{d}/serial", 10, d, "zero2")
        two.Free()
    comm.Barrier()
    assert max_diff(f"{d}/zero3.npz", ref) <= 1e-9
    assert max_diff(f"{d}/zero2.npz", ref) <= 1e-9
    finish(comm, d)


_serial_checkpoints = {}


def serial_checkpoint(argv, step):
    """The checkpoint a serial run of ``argv`` writes at ``step`` (cached, this rank)."""
    key = tuple(argv)
    if key not in _serial_checkpoints:
        import tempfile

        d = tempfile.mkdtemp(prefix="mpnn-test-serial-")
        run_training(argv + ["--checkpoint-dir", d, *EVERY5])
        _serial_checkpoints[key] = {s: ck.read_checkpoint(ck.checkpoint_path(d, s))
                                    for s in (5, 10, 14)}
        shutil.rmtree(d)
    return _serial_checkpoints[key][step]


def assert_whole_checkpoint(c, stage, dp, pp=1):
    """A checkpoint file holds the whole model: every tensor, optimizer arrays of
    the whole model's length, and the grid it was written on."""
    full = Layout(SIZES)
    assert set(c.params) == set(full.slots)
    for name, slot in full.slots.items():
        assert c.params[name].shape == slot.shape, name
    assert c.optim, "the optimizer state is missing"
    for name, a in c.optim.items():
        assert a.shape == (full.numel,), (name, a.shape)
    assert c.meta["grid"] == {"dp": dp, "pp": pp, "tp": 1, "zero": stage}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize(("ranks", "stage", "optimizer"), [
    *((2, stage, opt) for stage in (1, 2, 3) for opt in sorted(OPTIMIZERS)),
    *(pytest.param(4, stage, "adam", marks=pytest.mark.mpi(min_size=4)) for stage in (2, 3)),
])
def test_same_grid_resume_is_bitwise(ranks, stage, optimizer):
    """(at -n 4 the last batch's 3 rows leave rank 3 none: an idle step)"""
    comm = sub_world(ranks)
    if comm is None:
        return
    d = shared_dir(comm)
    argv = BASE + OPTIMIZERS[optimizer] + ["--zero", str(stage)]
    run_training(argv + ["--checkpoint-dir", f"{d}/a", *EVERY5, "--save", f"{d}/full.npz"], comm)
    again = resume(argv, comm, f"{d}/a", 10, d, "b")  # its checkpoints: 14 only
    comm.Barrier()
    full, res = load_weights(f"{d}/full.npz"), load_weights(again)
    for name in full:
        assert np.array_equal(full[name], res[name]), f"{name} differs after resuming"
    a, b = (ck.read_checkpoint(ck.checkpoint_path(f"{d}/{x}", 14)) for x in "ab")
    assert set(a.optim) == set(b.optim) == ({"m", "v"} if optimizer == "adam" else {"velocity"})
    for name in a.optim:
        assert np.array_equal(a.optim[name], b.optim[name]), f"optimizer state {name} differs"
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name
    for key in ("step", "epoch", "batch", "optimizer_t", "epoch_loss_sum"):
        assert a.meta[key] == b.meta[key], key
    # the files are the whole model's, the serial run's to summation order
    serial_argv = BASE + OPTIMIZERS[optimizer]
    for step in (5, 10, 14):
        c = ck.read_checkpoint(ck.checkpoint_path(f"{d}/a", step))
        assert_whole_checkpoint(c, stage, dp=ranks)
        s = serial_checkpoint(serial_argv, step)
        assert set(c.optim) == set(s.optim)
        for name in s.optim:
            assert np.max(np.abs(c.optim[name] - s.optim[name])) <= 1e-9, (step, name)
        for name in s.params:
            assert np.max(np.abs(c.params[name] - s.params[name])) <= 1e-9, (step, name)
        assert c.meta["optimizer_t"] == s.meta["optimizer_t"] == step
    finish(comm, d)


SCHEDULES = {  # --dp 2 --pp 2 at -n 4
    "1f1b": ["--micro-batches", "3"],
    "interleaved": ["--micro-batches", "4", "--schedule", "interleaved-1f1b",
                    "--virtual-stages", "2"],
    "zb-h1": ["--micro-batches", "3", "--schedule", "zb-h1"],
}


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize(("stage", "schedule"), [(1, "1f1b"), (2, "1f1b"), (2, "interleaved"),
                                                 (1, "zb-h1")])
def test_zero_pipeline_checkpoint_resumes_serially_and_on_its_grid(stage, schedule):
    comm = sub_world(4)
    if comm is None:
        return
    d = shared_dir(comm)
    argv = BASE + OPTIMIZERS["adam"]
    ref, _ = trained_serially(argv)
    grid = ["--dp", "2", "--pp", "2", *SCHEDULES[schedule], "--zero", str(stage)]
    run_training(argv + grid + ["--checkpoint-dir", f"{d}/a", *EVERY5,
                                "--save", f"{d}/full.npz"], comm)
    same = resume(argv + grid, comm, f"{d}/a", 10, d, "same")
    serial = resume(argv, None, f"{d}/a", 5, d, f"serial{comm.Get_rank()}")
    comm.Barrier()
    assert max_diff(f"{d}/full.npz", ref) <= 1e-9
    assert max_diff(serial, ref) <= 1e-9
    assert max_diff(same, load_weights(f"{d}/full.npz")) == 0.0, "same grid must resume bitwise"
    assert_whole_checkpoint(ck.read_checkpoint(ck.checkpoint_path(f"{d}/a", 5)), stage, 2, 2)
    finish(comm, d)


# ------------------------------------------------------------------- --trace


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_trace_names_the_zero_collectives_on_every_rank(stage):
    comm = sub_world(2)
    if comm is None:
        return
    d = shared_dir(comm)
    path = f"{d}/trace.json"
    run_training(BASE + OPTIMIZERS["adam"] + ["--epochs", "1", "--zero", str(stage),
                                               "--trace", path], comm)
    comm.Barrier()
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e["ph"] == "X"]
    for rank in range(2):
        mine = [e for e in events if e["pid"] == rank]
        names = [e["name"] for e in mine]
        gathers = [e for e in mine if e["name"] == "allgather"]
        if stage == 0:  # plain data parallelism: one Allreduce per step, nothing gathered
            assert names.count("allreduce") == STEPS, rank
            assert "reduce-scatter" not in names and not gathers, rank
            continue
        assert "allreduce" not in names, rank
        assert names.count("reduce-scatter") == STEPS, (rank, names)
        if stage < 3:  # the parameters' Allgather after each optimizer step
            assert len(gathers) == STEPS, rank
            assert all("layer" not in e.get("args", {}) for e in gathers)
        else:  # per layer: each step's forward, the backward's where the ring no longer
            # holds it (the forward's last two layers serve the backward; the first
            # layer's backward needs no W), and the evaluation's one forward
            per_layer = {}
            for e in gathers:
                per_layer[e["args"]["layer"]] = per_layer.get(e["args"]["layer"], 0) + 1
            assert per_layer == {0: STEPS + 1, 1: 2 * STEPS + 1, 2: STEPS + 1, 3: STEPS + 1}, \
                (rank, per_layer)
    finish(comm, d)


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("stage", [1, 2])
def test_trace_of_a_zero_pipeline_names_the_collectives_on_every_rank(stage):
    comm = sub_world(4)
    if comm is None:
        return
    d = shared_dir(comm)
    path = f"{d}/trace.json"
    run_training(BASE + OPTIMIZERS["adam"] + ["--epochs", "1", "--dp", "2", "--pp", "2",
                                               *SCHEDULES["1f1b"], "--zero", str(stage),
                                               "--trace", path], comm)
    comm.Barrier()
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e["ph"] == "X"]
    for rank in range(4):
        names = [e["name"] for e in events if e["pid"] == rank]
        assert names.count("reduce-scatter") == STEPS, (rank, names)  # each step's, per stage
        assert names.count("allgather") == STEPS, (rank, names)
        assert "allreduce" not in names, rank
    finish(comm, d)


# ------------------------------------------------------------ the NaN guard


def _stop_message(argv, comm):
    """The NonFiniteError messages training ``argv`` on ``comm`` stops with: (the
    reporting rank's, or None; every rank's, None where it did not report). The
    other ranks of the forward pass raise PeerReportedError (``runtime.guards``)."""
    message = None
    with np.errstate(all="ignore"):
        try:
            run_training(argv, comm)
        except PeerReportedError:
            pass
        except NonFiniteError as e:
            message = str(e)
    every = comm.allgather(message)
    return next((m for m in every if m is not None), None), every


def _huge_init(path):
    """Weights whose layer 1 outputs ~1e300 and layer 2 overflows (relu: all positive)."""
    m = MLP(SIZES, dtype=np.float64, seed=0)
    state = m.state_dict()
    for i in (1, 2):
        state[f"layers.{i}.weight"][...] = 1e300
    save_weights(path, state)


GUARD_GRIDS = {  # name: (ranks, options, the --zero stages it runs)
    "dp2": (2, [], (1, 2, 3)),
    "dp4": (4, [], (1, 2, 3)),
    "dp2xpp2": (4, ["--dp", "2", "--pp", "2", "--micro-batches", "3"], (1, 2)),
}


def _anyrank(message):
    return re.sub(r" on rank \d+", " on rank R", message)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("cause", ["lr", "init"])
@pytest.mark.parametrize("grid", [pytest.param(g, marks=pytest.mark.mpi(min_size=n))
                                  for g, (n, _, _) in GUARD_GRIDS.items()])
def test_non_finite_run_stops_on_every_stage_with_the_zero0_message(grid, cause):
    ranks, opts, stages = GUARD_GRIDS[grid]
    comm = sub_world(ranks)
    if comm is None:
        return
    d = shared_dir(comm)
    if cause == "lr":  # the weights grow until the loss is nan
        argv = BASE + ["--optimizer", "sgd", "--lr", "1e30", "--lr-schedule", "constant"]
    else:  # layer 2's output overflows at step 1
        if comm.Get_rank() == 0:
            _huge_init(f"{d}/huge.npz")
        comm.Barrier()
        argv = BASE + OPTIMIZERS["momentum"] + ["--init", f"{d}/huge.npz"]
    argv += opts
    plain, every = _stop_message(argv + ["--zero", "0"], comm)
    # every replica raises (a pipeline's stage that holds the layer), naming itself
    assert plain is not None
    assert {_anyrank(m) for m in every if m is not None} == {_anyrank(plain)}, every
    assert sum(m is not None for m in every) == ranks // (2 if "pp" in grid else 1), every
    assert plain.startswith("training loss is nan at step "), plain
    assert "from finite parameters: it first appears in the output of layer" in plain, plain
    if cause == "init":
        assert _anyrank(plain).startswith(
            "training loss is nan at step 1 (epoch 1, batch 1) on rank R, from finite "
            "parameters: it first appears in the output of layer 2 (layers.2.weight/bias)"), plain
    for stage in stages:
        message, every = _stop_message(argv + ["--zero", str(stage)], comm)
        assert message == plain, f"--zero {stage}: {message!r}"
        assert sum(m is not None for m in every) == 1, every  # one rank reports
    finish(comm, d)


def _guard_messages(run, comm, flat):
    """Every rank's NonFiniteError message from the guard over its shard ``flat`` at
    step 5 (None on the ranks that do not report: they raise PeerReportedError)."""
    message = None
    try:
        guards.check_finite(run.model, 1.5, 5, 1, 5, comm.Get_rank(), None, None, comm, flat)
    except PeerReportedError:
        pass
    except NonFiniteError as e:
        message = str(e)
    return comm.allgather(message)


def _whole_message(idx, step=5):
    """The message a whole model (serial, or any --zero 0 replica) gives for NaN
    gradients at the flat indices ``idx``, carried into the parameters."""
    m = MLP(SIZES, dtype=np.float64, seed=0)
    m.flat.grad[...] = 0.1
    m.flat.grad[list(idx)] = np.nan
    m.flat.data[...] += m.flat.grad
    with pytest.raises(NonFiniteError) as e:
        guards.check_finite(m, 1.5, step, 1, step, rank=0)
    return str(e.value)


# at -n 2 a shard holds 604 elements: rank 0 [0, 604), rank 1 [604, 1207);
# layers.0.weight is [0, 832), layers.0.bias [832, 845), layers.2.weight [999, 1098).
# case: (flat indices of the NaN gradients, the rank that reports)
CASES = {
    "layer 0, rank 0's part": ([5], 0),
    "layer 0, rank 1's part": ([700], 1),
    "layer 0 bias (rank 1)": ([840], 1),
    "layer 2 (rank 1)": ([1000], 1),
    "layer 0 on both ranks": ([600, 700], 0),  # a tie: the first rank holding it
}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_guard_names_a_layer_in_one_ranks_gradient_shard(stage, case):
    comm = sub_world(2)
    if comm is None:
        return
    run = build_run(BASE + OPTIMIZERS["adam"] + ["--zero", str(stage)], comm)
    zero, rank = run.engine.zero, comm.Get_rank()
    sh, flat = zero.shards, zero.shard_flat
    assert (sh.size, sh.lo) == (604, 604 * rank)
    flat.grad[...] = 0.1
    idx, owner = CASES[case]
    mine = [i for i in idx if sh.lo <= i < sh.hi]
    flat.grad[[i - sh.lo for i in mine]] = np.nan
    flat.data[...] += flat.grad
    every = _guard_messages(run, comm, flat)
    reporters = [r for r, m in enumerate(every) if m is not None]
    assert reporters == [owner], every
    expected = _whole_message(idx).replace("on rank 0", f"on rank {owner}")
    assert every[owner] == expected
    comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_guard_names_the_layer_backward_reaches_first_across_ranks(stage):
    """NaN in layer 0 on rank 0 and in layer 2 on rank 1: rank 1 reports layer 2,
    as a whole model would; a whole model adds "(also layers.0.weight)", which the
    reporter, holding only its shard, does not know (as a pipeline stage does not)."""
    comm = sub_world(2)
    if comm is None:
        return
    run = build_run(BASE + OPTIMIZERS["adam"] + ["--zero", str(stage)], comm)
    zero, rank = run.engine.zero, comm.Get_rank()
    sh, flat = zero.shards, zero.shard_flat
    flat.grad[...] = 0.1
    flat.grad[5 - sh.lo if rank == 0 else 1000 - sh.lo] = np.nan
    flat.data[...] += flat.grad
    every = _guard_messages(run, comm, flat)
    assert every[0] is None and every[1] is not None, every
    whole = _whole_message([5, 1000]).replace("on rank 0", "on rank 1")
    assert "first in layers.2.weight (also layers.0.weight)" in whole
    assert every[1].startswith(whole.split(" (also")[0]), every[1]
    comm.Free()


# ---------------------------------------------------------- replica check


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("ranks", [2, pytest.param(4, marks=pytest.mark.mpi(min_size=4))])
def test_replica_check_names_a_rank_whose_unowned_slice_diverged(ranks, stage):
    comm = sub_world(ranks)
    if comm is None:
        return
    run, _ = run_training(BASE + OPTIMIZERS["adam"] + ["--epochs", "1", "--zero", str(stage)],
                          comm)
    zero = run.engine.zero
    zero.check_agree("at step 5")  # healthy
    assert zero.shards.lo > 0 or comm.Get_rank() == 0
    if comm.Get_rank() == 1:  # index 0 is rank 0's to step: rank 1 only received it
        run.model.flat.data[0] += 1e-3
    with pytest.raises(RuntimeError) as e:
        zero.check_agree("at step 5")
    msg = str(e.value)
    assert "data-parallel replicas hold different parameters at step 5" in msg
    if ranks == 2:  # no majority: both named with their checksums
        assert "ranks [1] hold crc32" in msg and "ranks [0] hold crc32" in msg, msg
    else:
        assert "ranks [1] diverged from the other replicas (ranks [0, 2, 3])" in msg, msg
    assert comm.allgather(msg) == [msg] * ranks  # every rank raises the same
    comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("ranks", [2, pytest.param(4, marks=pytest.mark.mpi(min_size=4))])
def test_replica_check_passes_a_healthy_zero3_run_and_names_a_bad_layout(ranks):
    comm = sub_world(ranks)
    if comm is None:
        return
    run, _ = run_training(BASE + OPTIMIZERS["adam"] + ["--epochs", "1", "--zero", "3"], comm)
    zero = run.engine.zero
    zero.check_agree("at step 5")
    loop.check_replicas(run.engine, run.grid, run.model, "after epoch 1")
    if comm.Get_rank() == 1:  # a slice of another length: the layout is not the ranks' own
        zero.param_shard = zero.param_shard[:-1]
    with pytest.raises(RuntimeError, match=r"ZeRO-3 ranks disagree on the shard layout at step "
                                           r"5: data-parallel ranks \[1\] hold slices"):
        zero.check_agree("at step 5")
    comm.Free()

