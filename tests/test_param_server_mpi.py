"""Parameter servers and the three consistency models (``parallel.param_server``).

Under ``mpirun -n 2`` and ``-n 4``: bsp equals serial training with one server
and with several; ssp and asp with one worker are serial training exactly; the
ssp bound holds on every pull a server answered; asp records staleness when its
workers race; checkpoints resume serially and under another number of servers;
the timeline holds the pulls, pushes, waits and updates.
"""

import json
import os

import numpy as np
import pytest

from conftest import run_training, shared_dir, sub_world

BASE = ["--dataset", "digits", "--hidden", "32,16", "--epochs", "2", "--batch-size", "100",
        "--dtype", "float64", "--quiet", "--lr", "0.003"]
TOLERANCE = 1e-9


def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _max_diff(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in b)


def _on(ranks):
    """A communicator of the first ``ranks`` world ranks, or a skip when the job is smaller."""
    world = _world()
    if world.Get_size() < ranks:
        pytest.skip(f"needs {ranks} ranks (this job has {world.Get_size()})")
    return sub_world(ranks)


def _agreed(comm, ok):
    """Every rank of ``comm`` passes or none does (no rank left waiting in a later test)."""
    return all(comm.allgather(bool(ok)))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("ranks, servers, extra", [
    (2, 1, []),
    (3, 1, []),
    (3, 2, []),
    (4, 1, ["--optimizer", "sgd", "--momentum", "0.9"]),
    (4, 2, ["--batch-size", "37"]),  # uneven shares of the batch
    (4, 3, ["--batch-size", "37"]),  # one worker, three shards
])
def test_bsp_equals_serial(ranks, servers, extra):
    comm = _on(ranks)
    if comm is None:
        return
    argv = BASE + extra
    run, history = run_training(argv + ["--servers", str(servers)], comm)
    serial, serial_history = run_training(argv)
    diff = _max_diff(run.model.state_dict(), serial.model.state_dict())
    assert _agreed(comm, diff <= TOLERANCE), f"max |bsp - serial| = {diff:.3e}"
    assert history[-1]["staleness_max"] == 0
    batch = int(extra[extra.index("--batch-size") + 1]) if "--batch-size" in extra else 100
    assert history[-1]["worker_pushes"] == [len(range(0, 1437, batch))] * (ranks - servers)
    assert abs(history[-1]["test_accuracy"] - serial_history[-1]["test_accuracy"]) < 1e-12


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("sync", ["asp", "ssp"])
@pytest.mark.parametrize("servers", [1, 2])
def test_one_worker_is_serial_training(sync, servers):
    """With one worker nothing races: every pull reads the latest parameters."""
    comm = _on(servers + 1)
    if comm is None:
        return
    run, history = run_training(BASE + ["--sync", sync, "--servers", str(servers)], comm)
    serial, _ = run_training(BASE)
    diff = _max_diff(run.model.state_dict(), serial.model.state_dict())
    assert _agreed(comm, diff == 0.0), f"max |{sync} - serial| = {diff:.3e}"
    assert all(h["staleness_max"] == 0 for h in history)


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("bound", [0, 1, 3])
def test_ssp_never_exceeds_its_bound(bound):
    """A straggler makes the others wait: every pull a server answered was at most
    ``bound`` pushes ahead of the slowest worker, and some pulls did wait."""
    comm = _on(4)
    if comm is None:
        return
    argv = BASE + ["--sync", "ssp", "--staleness", str(bound), "--straggler", "1:4",
                   "--epochs", "3", "--batch-size", "32"]
    _, history = run_training(argv, comm)
    gaps = [int(g) for h in history for g in h["clock_gap_histogram"]]
    assert max(h["clock_gap_max"] for h in history) <= bound, history
    assert max(gaps) <= bound
    assert sum(h["pulls_waited"] for h in history) > 0
    assert sum(sum(h["worker_blocked_s"]) for h in history) > 0
    pushes = np.sum([h["worker_pushes"] for h in history], axis=0)  # (workers,)
    # the straggler (worker 0) was held to within the bound of the others
    assert max(pushes) - pushes[0] <= bound + 1, pushes
    assert sum(pushes) == 3 * len(range(0, 1437, 32))


@pytest.mark.mpi(min_size=3)
def test_asp_records_staleness_when_workers_race():
    comm = _on(comm_size := min(_world().Get_size(), 4))
    if comm is None:
        return
    argv = BASE + ["--sync", "asp", "--epochs", "3", "--batch-size", "32"]
    _, history = run_training(argv, comm)
    assert max(h["staleness_max"] for h in history) > 0, history
    assert sum(h["pulls_waited"] for h in history) == 0  # asp never holds a pull
    updates = sum(c for h in history for c in h["staleness_histogram"].values())
    assert updates == 3 * len(range(0, 1437, 32))  # one per global batch
    assert len(history[-1]["worker_pushes"]) == comm_size - 1
    assert history[-1]["test_accuracy"] > 0.5  # it trains


@pytest.mark.mpi(min_size=3)
def test_checkpoint_resumes_serially_and_under_other_servers():
    """bsp's epoch-1 checkpoint, resumed serially and at 2 servers, ends where the
    uninterrupted serial run ends; an asp checkpoint resumes as a synchronous run."""
    comm = _on(3)
    if comm is None:
        return
    directory = shared_dir(comm)
    argv = BASE + ["--checkpoint-dir", directory, "--checkpoint-keep", "0"]
    run_training(argv + ["--servers", "1"], comm)
    serial, _ = run_training(BASE)
    first = os.path.join(directory, "ckpt-000000015.npz")
    resumed, _ = run_training(BASE + ["--resume", first])  # serially
    d_serial = _max_diff(resumed.model.state_dict(), serial.model.state_dict())
    again, _ = run_training(BASE + ["--servers", "2", "--resume", first], comm)
    d_two = _max_diff(again.model.state_dict(), serial.model.state_dict())
    asp_dir = shared_dir(comm)
    run_training(BASE + ["--sync", "asp", "--checkpoint-dir", asp_dir, "--checkpoint-keep",
                         "0"], comm)
    sync_run, history = run_training(BASE + ["--resume",
                                            os.path.join(asp_dir, "ckpt-000000015.npz")])
    ok = d_serial <= TOLERANCE and d_two <= TOLERANCE and len(history) == 1
    assert _agreed(comm, ok), (d_serial, d_two, history)


@pytest.mark.mpi(min_size=3)
def test_timeline_holds_pulls_pushes_and_updates():
    comm = _on(3)
    if comm is None:
        return
    trace = os.path.join(shared_dir(comm), "t.json")
    run_training(BASE + ["--sync", "ssp", "--staleness", "0", "--straggler", "2:3", "--trace",
                         trace], comm)
    names = {}
    if comm.Get_rank() == 0:
        with open(trace) as f:
            events = json.load(f)
        events = events["traceEvents"] if isinstance(events, dict) else events
        for e in events:
            if e.get("ph") == "X":
                names.setdefault(e["pid"], set()).add(e["name"])
        labels = [e["args"]["name"] for e in events if e.get("name") == "process_name"]
    names = comm.bcast(names)
    if comm.Get_rank() == 0:
        assert any("server 0" in label for label in labels), labels
        assert any("worker 1" in label for label in labels), labels
    server = [n for n in names.values() if "apply" in n]
    workers = [n for n in names.values() if "forward" in n]
    assert len(server) == 1 and len(workers) == 2, names
    assert all({"pull", "push", "backward"} <= n for n in workers), workers
    assert any("blocked" in n for n in workers), workers  # ssp 0 holds the fast one


SGD = ["--optimizer", "sgd", "--momentum", "0", "--lr", "0.05"]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("servers", [1, 2])
def test_one_sided_asp_with_one_worker_is_serial_sgd(servers):
    comm = _on(servers + 1)
    if comm is None:
        return
    run, _ = run_training(BASE + SGD + ["--sync", "asp", "--rma", "--servers", str(servers)],
                          comm)
    serial, _ = run_training(BASE + SGD)
    diff = _max_diff(run.model.state_dict(), serial.model.state_dict())
    run.close()  # the windows, before MPI_Finalize
    assert _agreed(comm, diff == 0.0), f"max |asp --rma - serial| = {diff:.3e}"


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("rma", [False, True])
def test_every_push_is_applied_once(rma):
    """Racing workers: each server applied exactly the pushes the workers made (the
    windows' versions under --rma count them), and the staleness shows the race."""
    comm = _on(min(_world().Get_size(), 4))
    if comm is None:
        return
    argv = BASE + SGD + ["--epochs", "3", "--batch-size", "32"]
    run, history = run_training(argv + ["--sync", "asp"] + (["--rma"] if rma else []), comm)
    run.close()  # the windows, before MPI_Finalize
    for h in history:
        assert h["pushes_applied"] == [sum(h["worker_pushes"])], h
        assert sum(h["staleness_histogram"].values()) == len(range(0, 1437, 32)), h
    assert max(h["staleness_max"] for h in history) > 0, history
    _, serial = run_training(argv)
    # stale gradients cost a little accuracy here, not the training (serial: 0.49)
    assert history[-1]["test_accuracy"] > serial[-1]["test_accuracy"] - 0.1
