"""Shared memory within a node: the hierarchical gradient Allreduce and the
dataset held once per node.

Under ``mpirun -n 2`` and ``-n 4`` (one machine: one real node). Several nodes
are played inside it with ``NodeGroups(node_of=...)``, so the shared-memory
phases, the Allreduce between "nodes" and the copy back all run; the real
multi-host runs are in ``test_multihost.py``.
"""

import numpy as np
import pytest

from mpnn.nn.params import FlatParams, Layout
from mpnn.parallel.data_parallel import GradientSync
from mpnn.parallel.hierarchical import HierarchicalGradientSync, HierarchyError, NodeGroups

from conftest import build_run, run_training, sub_world

SIZES = [64, 40, 24, 10]
BASE = ["--dataset", "digits", "--hidden", "32,16", "--epochs", "2", "--batch-size", "100",
        "--dtype", "float64", "--quiet", "--optimizer", "adam", "--lr", "0.003"]


def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _max_diff(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in b)


def _sum_both_ways(comm, bucket_mb, node_of, seed=0):
    """(hierarchical result, flat Allreduce result) of one random gradient per rank."""
    layout = Layout(SIZES)
    flat = FlatParams(layout, np.float64)
    rng = np.random.default_rng(seed + comm.Get_rank())
    flat.grad[...] = rng.normal(size=layout.numel)
    expected = flat.grad.copy()
    GradientSync(comm, expected).allreduce()
    local = flat.grad.copy()
    sync = HierarchicalGradientSync(comm, flat, layout, bucket_mb, node_of=node_of)
    assert np.array_equal(flat.grad, local)  # moved into the window with its values
    for i in reversed(layout.layers):  # as backward reports them
        sync.on_layer_done(i)
    sync.wait()
    got = flat.grad.copy()
    sync.free()
    return got, expected, sync


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("bucket_mb", [0.0, 1e-6, 0.005, 100.0])
@pytest.mark.parametrize("nodes", ["one", "per-rank", "pairs"])
def test_hierarchical_sum_equals_allreduce(bucket_mb, nodes):
    comm = _world()
    n = comm.Get_size()
    if nodes == "pairs" and n % 2:
        pytest.skip("pairs of ranks need an even rank count")
    node_of = {"one": None, "per-rank": lambda r: r, "pairs": lambda r: r // 2}[nodes]
    for step in range(2):  # the second sum reuses every buffer and request list
        got, expected, sync = _sum_both_ways(comm, bucket_mb, node_of, seed=10 * step)
        np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-15)
        everyone = comm.allgather(got)
        for other in everyone:  # every rank ends with the same bits
            assert np.array_equal(other, got)
    g = sync.groups
    assert g.per_node * g.nodes == n
    assert g.per_node == {"one": n, "per-rank": 1, "pairs": 2}[nodes]


@pytest.mark.mpi(min_size=2)
def test_gradient_moves_into_the_window_with_its_values():
    comm = _world()
    layout = Layout(SIZES)
    flat = FlatParams(layout, np.float64)
    flat.grad[...] = np.arange(layout.numel, dtype=np.float64)
    sync = HierarchicalGradientSync(comm, flat, layout)
    assert flat.grad is sync.grad and np.array_equal(flat.grad, np.arange(layout.numel))
    w = flat.grads["layers.1.weight"]
    assert np.shares_memory(w, sync.grad)  # the named views follow the buffer
    sync.free()


@pytest.mark.mpi(min_size=4)
def test_uneven_nodes_are_refused_on_every_rank():
    comm = sub_world(4)
    if comm is None:
        return
    with pytest.raises(HierarchyError, match="same number of data-parallel ranks on every node"):
        NodeGroups(comm, node_of=lambda r: int(r == 3))  # 3 ranks on one node, 1 on the other
    comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("ranks", [2, pytest.param(4, marks=pytest.mark.mpi(min_size=4))])
@pytest.mark.parametrize("extra", [["--bucket-mb", "0"], ["--bucket-mb", "0.01"],
                                   ["--hidden", "24,16,12", "--batch-size", "718"]],
                         ids=["one-bucket", "buckets", "empty-ranks"])
def test_hierarchical_training_equals_serial(ranks, extra):
    comm = sub_world(ranks)
    if comm is None:
        return
    argv = BASE + extra
    run, _ = run_training(argv + ["--allreduce", "hierarchical"], comm)
    assert isinstance(run.engine.sync, HierarchicalGradientSync)
    serial, _ = run_training(argv)
    diff = _max_diff(run.model.state_dict(), serial.model.state_dict())
    assert diff <= 1e-9, f"max |hierarchical - serial| = {diff:.3e}"
    comm.Free()


@pytest.mark.mpi(min_size=4)
def test_hierarchical_pipeline_equals_serial():
    comm = sub_world(4)
    if comm is None:
        return
    grid = ["--dp", "2", "--pp", "2", "--micro-batches", "2", "--allreduce", "hierarchical"]
    run, _ = run_training(BASE + grid, comm)
    assert isinstance(run.engine.sync, HierarchicalGradientSync)
    serial, _ = run_training(BASE)
    whole = serial.model.state_dict()
    mine = run.model.state_dict()  # this stage's layers
    assert mine and _max_diff(mine, {k: whole[k] for k in mine}) <= 1e-9
    comm.Free()


@pytest.mark.mpi(min_size=4)
def test_hierarchical_with_played_nodes_trains_like_serial():
    """2 "nodes" x 2 ranks inside one machine: the Allreduce between nodes runs."""
    from mpnn.runtime.loop import train

    comm = sub_world(4)
    if comm is None:
        return
    argv = BASE + ["--bucket-mb", "0.01"]
    run = build_run(argv, comm)
    engine = run.engine
    engine.sync = HierarchicalGradientSync(comm, run.model.flat, run.model.layout, 0.01,
                                           node_of=lambda r: r // 2)
    assert engine.sync.groups.nodes == 2 and engine.sync.groups.per_node == 2
    train(run, log=lambda *a: None)
    serial, _ = run_training(argv)
    assert _max_diff(run.model.state_dict(), serial.model.state_dict()) <= 1e-9
    comm.Free()


# ------------------------------------------------------------ the shared dataset


@pytest.mark.mpi(min_size=2)
def test_dataset_is_one_read_only_window_per_node():
    from mpnn.data import load_dataset

    comm = _world()
    run = build_run(BASE, comm)
    data = run.data
    assert data.owner is not None, "the node's ranks should share one copy"
    assert data.divisor == 16 and data.x_train.dtype == np.uint8
    for a in (data.x_train, data.y_train, data.x_test, data.y_test):
        assert not a.flags.writeable
    ref = load_dataset("digits", dtype=np.float64)  # the float form, loaded here alone
    np.testing.assert_array_equal(data.train_features(slice(None)), ref.x_train)
    np.testing.assert_array_equal(data.test_features(), ref.x_test)
    np.testing.assert_array_equal(data.y_train, ref.y_train)
    buf, _ = data.owner.Shared_query(0)  # the whole window sits on the node's first rank
    assert len(buf) >= data.nbytes


@pytest.mark.mpi(min_size=2)
def test_private_copies_train_the_same_weights():
    comm = _world()
    shared, _ = run_training(BASE, comm)
    private, _ = run_training(BASE + ["--no-shared-data"], comm)
    assert shared.data.owner is not None and private.data.owner is None
    a, b = shared.model.state_dict(), private.model.state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.mpi(min_size=2)
def test_too_little_shared_memory_falls_back_to_private_copies(monkeypatch):
    import mpnn.data.shared as shared

    comm = _world()
    monkeypatch.setattr(shared, "shm_room", lambda path=shared.SHM_ROOT: 1000)
    run = build_run(BASE, comm)
    assert run.data.owner is None and run.data.x_train.shape == (1437, 64)
    if comm.Get_rank() == 0:
        assert "not shared on this node" in run.data_note and "--shm-size" in run.data_note
    else:
        assert run.data_note is None  # the node's first rank says it once


@pytest.mark.mpi(min_size=2)
def test_close_frees_the_windows_and_keeps_the_model():
    from mpnn.runtime.loop import train

    comm = _world()
    run = build_run(BASE + ["--epochs", "1", "--allreduce", "hierarchical"], comm)
    train(run, log=lambda *a: None)
    sync = run.engine.sync
    before = run.model.state_dict()
    run.close()
    assert run.data is None and run.engine is None and sync.segments is None
    grad = run.model.flat.grad  # back in private memory, still the model's views
    grad[...] = 1.0
    assert run.model.flat.grads["layers.0.weight"].sum() == grad[:64 * 32].sum()
    after = run.model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.mpi(min_size=2)
def test_too_little_shared_memory_for_the_gradients_is_refused(monkeypatch):
    """/dev/shm that holds the dataset but not the node's gradients: a clear refusal on
    every rank (touching the pages would kill the ranks with SIGBUS instead)."""
    import mpnn.data.shared as shared
    from mpnn.runtime.config import ConfigError

    comm = _world()
    room = {"n": 0}

    def shm_room(path=shared.SHM_ROOT):  # the dataset's check passes, the gradients' fails
        room["n"] += 1
        return 10**12 if room["n"] == 1 else 1000

    monkeypatch.setattr(shared, "shm_room", shm_room)
    with pytest.raises(ConfigError, match="keeps each node's gradients in shared memory and "
                       "/dev/shm has 0 MB free.*--shm-size.*--allreduce flat"):
        build_run(BASE + ["--allreduce", "hierarchical"], comm)
    shared.release_all()  # the dataset's window (as mpnn.train does after the refusal)
