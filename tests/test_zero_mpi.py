"""ZeRO trains the serial model: stages 1, 2 and 3 at -n 2 and -n 4 with SGD,
momentum, Nesterov and AdamW, a last batch of 3 rows (a rank with none at -n 4),
a parameter count the rank counts do not divide, buckets smaller than a layer;
--zero 1 and 2 at --dp 2 --pp 2 (1F1B, GPipe, interleaved 1F1B, and zb-h1 at
stage 1). float64, max abs difference <= 1e-9. The memory ledger equals the
bytes the arrays hold (numpy's tracemalloc domain) and the ZeRO formula within
the padding. Run under ``mpirun -n 2`` and ``-n 4``."""

import gc
import tracemalloc

import numpy as np
import pytest

from mpnn.nn.model import MLP
from mpnn.nn.optim import make_optimizer
from mpnn.parallel.data_parallel import DataParallelEngine
from mpnn.parallel.zero import ZeroOptimizer, zero_formula

from conftest import run_training, sub_world, trained_serially

# 64-13-11-9-10 on digits: 1,207 parameters (odd: neither 2 nor 4 divides them);
# 1437 training rows at --batch-size 239 leave a last batch of 3 rows
BASE = ["--dataset", "digits", "--hidden", "13,11,9", "--epochs", "2", "--batch-size", "239",
        "--dtype", "float64", "--quiet", "--bucket-mb", "0.0005"]
OPTIMIZERS = {
    "sgd": ["--optimizer", "sgd", "--momentum", "0", "--lr", "0.05"],
    "momentum": ["--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05"],
    "nesterov": ["--optimizer", "sgd", "--momentum", "0.9", "--nesterov", "--lr", "0.05",
                 "--weight-decay", "0.01"],
    "adamw": ["--optimizer", "adam", "--lr", "0.003", "--weight-decay", "0.01"],
}
PIPELINES = {  # --dp 2 --pp 2 at -n 4
    "1f1b": ["--micro-batches", "3"],
    "gpipe": ["--micro-batches", "3", "--schedule", "gpipe"],
    "interleaved": ["--micro-batches", "4", "--schedule", "interleaved-1f1b",
                    "--virtual-stages", "2"],
}


def _assert_serial(run, history, argv, tol=1e-9):
    """The trained model (gathered to world rank 0) and the per-epoch metrics equal
    the serial run's."""
    ref, ref_history = trained_serially(argv)
    state = run.engine.state_dict()  # collective; whole on world rank 0
    if run.grid.world.Get_rank() == 0:
        assert set(state) == set(ref)
        for name in ref:
            diff = np.max(np.abs(state[name] - ref[name]))
            assert diff <= tol, f"{name}: {diff:.3e}"
    for a, b in zip(history, ref_history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-9)
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-12)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("ranks", [2, pytest.param(4, marks=pytest.mark.mpi(min_size=4))])
def test_zero_matches_serial(ranks, stage, optimizer):
    comm = sub_world(ranks)
    if comm is None:
        return
    argv = BASE + OPTIMIZERS[optimizer]
    run, history = run_training(argv + ["--zero", str(stage)], comm)
    assert run.engine.zero.stage == stage
    _assert_serial(run, history, argv)
    comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_one_bucket_matches_serial(stage):
    """--bucket-mb 0: one reduce-scatter of the whole buffer after backward."""
    comm = sub_world(2)
    if comm is None:
        return
    argv = [a if a != "0.0005" else "0" for a in BASE] + OPTIMIZERS["adamw"]
    run, history = run_training(argv + ["--zero", str(stage)], comm)
    assert len(run.engine.sync.buckets) == 1
    _assert_serial(run, history, BASE + OPTIMIZERS["adamw"])
    comm.Free()


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("optimizer", ["adamw", "nesterov"])
@pytest.mark.parametrize("schedule", sorted(PIPELINES))
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_with_pipeline_matches_serial(stage, schedule, optimizer):
    comm = sub_world(4)
    if comm is None:
        return
    argv = BASE + OPTIMIZERS[optimizer]
    opts = ["--dp", "2", "--pp", "2", *PIPELINES[schedule], "--zero", str(stage)]
    run, history = run_training(argv + opts, comm)
    assert run.engine.zero.stage == stage
    _assert_serial(run, history, argv)
    comm.Free()


@pytest.mark.mpi(min_size=4)
def test_zero1_with_zero_bubble_schedule_matches_serial():
    comm = sub_world(4)
    if comm is None:
        return
    argv = BASE + OPTIMIZERS["adamw"]
    opts = ["--dp", "2", "--pp", "2", "--micro-batches", "3", "--schedule", "zb-h1",
            "--zero", "1"]
    run, history = run_training(argv + opts, comm)
    _assert_serial(run, history, argv)
    comm.Free()


@pytest.mark.mpi(min_size=2)
def test_zero3_evaluation_with_uneven_rows_matches_one_rank():
    """ZeRO-3 evaluates in as many forward passes on every rank (each gathers every
    layer): a rank whose rows run out runs gather-only passes, and the sums equal a
    whole model's."""
    comm = sub_world(2)
    if comm is None:
        return
    sizes, rank = [8, 7, 5, 3], comm.Get_rank()
    x = np.random.default_rng(1).normal(size=(11, 8))
    labels = np.arange(11) % 3
    whole = DataParallelEngine(MLP(sizes, dtype=np.float64, seed=3), "cross_entropy",
                               sub_world_self())
    ref = whole.evaluate(x, labels, chunk=2)
    engine = DataParallelEngine(MLP(sizes, dtype=np.float64, seed=3), "cross_entropy", comm,
                                zero=3)
    rows = slice(0, 9) if rank == 0 else slice(9, 11)  # 5 passes of 2 rows against 1
    loss, correct = engine.evaluate(x[rows], labels[rows], chunk=2)
    totals = comm.allreduce(np.array([loss, correct]))
    assert totals[0] == pytest.approx(ref[0], rel=1e-12)
    assert totals[1] == ref[1]
    comm.Free()


def sub_world_self():
    from mpi4py import MPI

    return MPI.COMM_SELF


# ------------------------------------------------------------------ ledger

DEFAULT = [64, 256, 128, 64, 10]  # the default hidden widths on digits
WIDE = [784, *[1024] * 10, 10]  # 10.3M parameters


def _numpy_bytes():
    gc.collect()
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)])
    return sum(s.size for s in snap.statistics("filename"))


def _build(sizes, stage, optimizer, comm, dtype):
    """A model, its engine and optimizer, as ``runtime.loop`` builds them."""
    model = MLP(sizes, dtype=dtype, seed=0)
    engine = DataParallelEngine(model, "cross_entropy", comm, 0.1, zero=stage)
    flat = model.flat if engine.zero is None else engine.zero.shard_flat
    opt = make_optimizer(optimizer, flat, model.ops, 1e-3, momentum=0.9)
    if engine.zero is not None:
        opt = ZeroOptimizer(engine.zero, opt)
    return model, engine, opt


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("sizes", [DEFAULT, WIDE], ids=["default", "wide"])
@pytest.mark.parametrize("ranks", [2, pytest.param(4, marks=pytest.mark.mpi(min_size=4))])
def test_ledger_equals_the_arrays_and_the_formula(ranks, sizes, stage, optimizer):
    """What ``engine.memory()`` and the optimizer's state report is what numpy holds
    for them (every allocation through numpy's tracemalloc domain, after the whole
    model built first has been sharded and freed), and it equals the ZeRO paper's
    formula within the padding."""
    comm = sub_world(ranks)
    if comm is None:
        return
    dtype = np.float32
    tracemalloc.start()
    before = _numpy_bytes()
    model, engine, opt = _build(sizes, stage, optimizer, comm, dtype)
    held = _numpy_bytes() - before
    memory = engine.memory()
    optim = sum(a.nbytes for a in opt.state().values())
    tracemalloc.stop()
    assert memory["activations"] == 0  # before any step
    assert memory["params"] + memory["grads"] + optim + memory["comm"] == held
    n_states = {"adam": 2, "sgd": 1}[optimizer]
    numel = model.layout.numel
    formula = zero_formula(stage, numel, ranks if stage else 1, 4, n_states)
    padding = -(-numel // ranks) * ranks - numel if stage else 0
    for kind, measured in (("params", memory["params"]), ("grads", memory["grads"]),
                           ("optimizer", optim)):
        states = n_states if kind == "optimizer" else 1
        assert abs(measured - formula[kind]) <= padding * 4 * states, (kind, measured, formula)
    if stage == 0:
        assert memory["comm"] == 0
    comm.Free()


# 64-400-400-10 in float64: layer 1's 160,400 parameters are a 1.28 MB bucket, far
# beyond the 512 KiB at which the PyPI MPICH aborts an in-place reduce-scatter
WIDE_BUCKETS = ["--dataset", "digits", "--hidden", "400,400", "--epochs", "1", "--batch-size",
                "239", "--dtype", "float64", "--quiet"] + OPTIMIZERS["adamw"]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("ranks", [2, pytest.param(4, marks=pytest.mark.mpi(min_size=4))])
def test_zero_with_buckets_of_megabytes_matches_serial(ranks, stage):
    comm = sub_world(ranks)
    if comm is None:
        return
    run, history = run_training(WIDE_BUCKETS + ["--zero", str(stage)], comm)
    assert max(b.stop - b.start for b in run.engine.sync.buckets) * 8 > 2**20
    _assert_serial(run, history, WIDE_BUCKETS)
    comm.Free()


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_with_pipeline_and_buckets_of_megabytes_matches_serial(stage):
    comm = sub_world(4)
    if comm is None:
        return
    opts = ["--dp", "2", "--pp", "2", "--micro-batches", "2", "--zero", str(stage)]
    run, history = run_training(WIDE_BUCKETS + opts, comm)
    _assert_serial(run, history, WIDE_BUCKETS)
    comm.Free()
