"""Multi-host runs on one machine: two "hosts" made of network namespaces
(``mpnn/bench/netns.py``, also used by ``python -m mpnn.bench.hosts``), MPICH's
mpirun launching across them as over ssh.

Serial tests (not marked ``mpi``): each starts its own mpirun and skips, saying
why, where namespaces cannot be made (not root, no ``ip``/``unshare``, a container
without CAP_SYS_ADMIN). Ranks 0, 1 run on hostA and 2, 3 on hostB throughout.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from mpnn.bench import netns as multihost
from mpnn.bench.netns import Hosts, unavailable
from mpnn.runtime import checkpoint as ck
from mpnn.runtime.weights import load_weights

from conftest import train_cli

TWO_BY_TWO = ["-hosts", "hostA:2,hostB:2", "-n", "4"]
PYTHON = sys.executable
ENV = {"OMP_NUM_THREADS": "1"}
BASE = ["--dataset", "digits", "--hidden", "16", "--dtype", "float64", "--quiet", "--threads", "1"]
TRAIN = [*BASE, "--epochs", "1"]
TRAIN2 = [*BASE, "--epochs", "2"]
STEPS_PER_EPOCH = -(-(1797 - 360) // 64)  # digits: 1437 training samples, batch 64
# Gradient Allreduce algorithms the multi-host training must match serial with; None:
# the option is not passed (the default). Extended when mpnn grows --allreduce.
ALLREDUCE = [None, "hierarchical"]
GRIDS = {"dp4": [], "dp2-pp2": ["--dp", "2", "--pp", "2", "--micro-batches", "2"],
         "dp4-buckets": ["--bucket-mb", "0.002"]}
# the model of a grid, where it is not TRAIN's (for the serial reference too): three
# layers of more than 2 kB each, so every layer is its own bucket and the buckets'
# sums overlap backward between the hosts
MODELS = {"dp4-buckets": ["--hidden", "64,32"]}
TOLERANCE = 1e-9  # float64, another summation order than serial


def need_hosts():
    if (reason := unavailable()) is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def hosts():
    need_hosts()
    with Hosts(("hostA", "hostB")) as h:
        yield h


def allreduce_option(allreduce):
    return [] if allreduce is None else ["--allreduce", allreduce]


def max_difference(a, b):
    wa, wb = load_weights(a), load_weights(b)
    names = sorted(k for k in wb if k.startswith("layers."))
    assert names and names == sorted(k for k in wa if k.startswith("layers."))
    return max(float(np.max(np.abs(wa[k] - wb[k]))) for k in names)


_serial = {}


def serial_weights(tmp_path_factory, argv):
    """The weights of ``python -m mpnn.train argv`` run serially (cached per argv)."""
    key = tuple(argv)
    if key not in _serial:
        path = tmp_path_factory.mktemp("serial") / "W.npz"
        code, out = train_cli(*argv, "--save", path, timeout=120)
        assert code == 0, out
        _serial[key] = path
    return _serial[key]


# ------------------------------------------------------------------ the harness


def test_unavailable_says_why_without_root(monkeypatch):
    multihost.unavailable.cache_clear()
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    try:
        assert multihost.unavailable() == "network namespaces need root (euid 65534)"
    finally:
        multihost.unavailable.cache_clear()


def test_hosts_are_separate_machines(hosts):
    for i, h in enumerate(hosts.names, 1):
        r = hosts.exec(h, "hostname; getent hosts hostA hostB; ip -o -4 addr show dev eth0")
        assert r.returncode == 0, r.stderr
        name, a, b, addr = r.stdout.splitlines()
        assert name == h
        assert a.split() == [hosts.address["hostA"], "hostA"]
        assert b.split() == [hosts.address["hostB"], "hostB"]
        assert f"{hosts.subnet}.{i}/24" in addr
    ping = hosts.exec("hostA", [PYTHON, "-c", "import socket; socket.create_connection("
                                               "('hostB', 9), 2)"], timeout=10)
    assert "ConnectionRefusedError" in ping.stderr  # reached hostB, nobody listening


def test_timeout_kills_the_job_and_keeps_its_output(hosts):
    job = hosts.popen([*TWO_BY_TWO, PYTHON, "-c", "import time; print('up', flush=True); "
                       "time.sleep(600)"], env=ENV)
    deadline = time.monotonic() + 60
    while job.output().count("up") < 4:  # every rank is running, on both hosts
        assert job.poll() is None and time.monotonic() < deadline, job.output()
        time.sleep(0.1)
    with pytest.raises(multihost.Timeout) as e:
        job.wait(time.monotonic() - job.started + 1)
    assert e.value.output.count("up") == 4
    for h in hosts.names:  # nothing of the job is left on any host
        assert hosts.pids(h) == []


def test_hosts_of_a_dead_harness_are_removed(hosts):
    dead = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, timeout=30).stdout.strip()
    stale = f"{multihost.PREFIX}{dead}-0-hostA"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=30)
    try:
        multihost.reap_stale()
        assert stale not in multihost._netns_list()
        assert hosts.netns["hostA"] in multihost._netns_list()  # a live one stays
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, timeout=30)


# ------------------------------------------------------------- placement, traffic

NODES = """
import json, socket
from mpi4py import MPI
world = MPI.COMM_WORLD
node = world.Split_type(MPI.COMM_TYPE_SHARED)
rows = world.gather([world.Get_rank(), socket.gethostname(), node.allgather(world.Get_rank())])
if world.Get_rank() == 0:
    print("NODES", json.dumps(rows), flush=True)
"""
BLOCKS = [[0, "hostA", [0, 1]], [1, "hostA", [0, 1]], [2, "hostB", [2, 3]], [3, "hostB", [2, 3]]]


def nodes(output):
    lines = [x for x in output.splitlines() if x.startswith("NODES ")]
    assert len(lines) == 1, output
    return json.loads(lines[0][6:])


@pytest.mark.parametrize("placement, expected", [
    (["-hosts", "hostA:2,hostB:2"], BLOCKS),
    (["-hosts", "hostA,hostB", "-ppn", "2"], BLOCKS),
    (["-f", "HOSTFILE"], BLOCKS),
    # hydra deals plain -hosts round robin, one rank per host at a time
    (["-hosts", "hostA,hostB"], [[0, "hostA", [0, 2]], [1, "hostB", [1, 3]],
                                 [2, "hostA", [0, 2]], [3, "hostB", [1, 3]]]),
], ids=["hosts:2", "ppn", "hostfile", "round-robin"])
def test_each_hosts_shared_memory_group_is_its_own_ranks(hosts, tmp_path, placement, expected):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("hostA:2\nhostB:2\n")
    args = [str(hostfile) if a == "HOSTFILE" else a for a in placement]
    r = hosts.mpirun([*args, "-n", "4", PYTHON, "-c", NODES], timeout=60, env=ENV)
    assert r.returncode == 0, r.stdout
    assert nodes(r.stdout) == expected


ALLREDUCE_SCRIPT = """
import numpy as np
from mpi4py import MPI
world = MPI.COMM_WORLD
n = {n}
mine = np.random.default_rng(world.Get_rank()).random(n)
total = np.empty(n)
world.Allreduce(mine, total)
expected = sum(np.random.default_rng(r).random(n) for r in range(world.Get_size()))
assert np.allclose(total, expected)
if world.Get_rank() == 0:
    print("ALLREDUCE OK", flush=True)
"""


def test_traffic_between_hosts_crosses_their_links(hosts):
    """Each host's result depends on the other host's 8 MiB of random doubles, so at
    least that much must leave and enter each host's eth0 (shared memory between
    the hosts would move almost nothing: ~20 KB of start-up traffic)."""
    n = 1 << 20
    before = {h: hosts.tx_rx_bytes(h) for h in hosts.names}
    r = hosts.mpirun([*TWO_BY_TWO, PYTHON, "-c", ALLREDUCE_SCRIPT.format(n=n)],
                     timeout=60, env=ENV)
    assert r.returncode == 0 and "ALLREDUCE OK" in r.stdout, r.stdout
    for h in hosts.names:
        (tx0, rx0), (tx1, rx1) = before[h], hosts.tx_rx_bytes(h)
        assert tx1 - tx0 >= 8 * n and rx1 - rx0 >= 8 * n, (h, tx1 - tx0, rx1 - rx0)


SHARED_DATA_SCRIPT = """
import json, socket, sys
from mpi4py import MPI
from mpnn.runtime.setup import setup
from mpnn.train import parse_config
world = MPI.COMM_WORLD
run = setup(parse_config(["--dataset", "digits", "--hidden", "8", "--quiet",
                          "--allreduce", "hierarchical"]), world)
def world_ranks(group):
    return MPI.Group.Translate_ranks(group, list(range(group.Get_size())), world.Get_group())
data, sync = run.data, run.engine.sync
with open(f"{sys.argv[1]}/rank{world.Get_rank()}.json", "w") as f:  # (stdout interleaves)
    json.dump([socket.gethostname(), world_ranks(data.owner.Get_group()),
               world_ranks(sync.groups.node.Get_group()), sync.groups.nodes], f)
run.close()
"""


def test_each_host_holds_one_dataset_and_sums_its_gradients_first(hosts, tmp_path):
    """The dataset window and the hierarchical Allreduce's node group are each
    host's own ranks: 2 nodes of 2, and the cross groups span both hosts."""
    r = hosts.mpirun([*TWO_BY_TWO, PYTHON, "-c", SHARED_DATA_SCRIPT, tmp_path], timeout=60,
                     env=ENV)
    assert r.returncode == 0, r.stdout
    for rank in range(4):
        host, window, node, nodes = json.loads((tmp_path / f"rank{rank}.json").read_text())
        mine = [0, 1] if rank < 2 else [2, 3]
        assert host == ("hostA" if rank < 2 else "hostB")
        assert window == mine and node == mine and nodes == 2


# ------------------------------------------------------------------- training


@pytest.mark.parametrize("allreduce", ALLREDUCE, ids=lambda a: a or "default")
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_training_across_hosts_equals_serial(hosts, tmp_path, tmp_path_factory, grid,
                                             allreduce):
    model = MODELS.get(grid, [])
    serial = serial_weights(tmp_path_factory, [*TRAIN, *model])
    path = tmp_path / "W.npz"
    r = hosts.mpirun([*TWO_BY_TWO, PYTHON, "-m", "mpnn.train", *TRAIN, *model, *GRIDS[grid],
                      *allreduce_option(allreduce), "--save", path], timeout=120, env=ENV)
    assert r.returncode == 0, r.stdout
    assert max_difference(path, serial) <= TOLERANCE


@pytest.fixture(scope="module")
def two_host_checkpoints(hosts, tmp_path_factory):
    """The checkpoints of a 2-epoch --dp 2 --pp 2 run over both hosts, every 5 steps."""
    written = tmp_path_factory.mktemp("two-hosts") / "ck"
    r = hosts.mpirun([*TWO_BY_TWO, PYTHON, "-m", "mpnn.train", *TRAIN2, *GRIDS["dp2-pp2"],
                      "--checkpoint-dir", written, "--checkpoint-every", "5",
                      "--checkpoint-keep", "0"], timeout=120, env=ENV)
    assert r.returncode == 0, r.stdout
    return ck.list_checkpoints(str(written))


@pytest.mark.parametrize("resume_on", ["hostB-n2", "serial"])
def test_checkpoint_from_two_hosts_resumes_on_one(hosts, two_host_checkpoints, tmp_path,
                                                  tmp_path_factory, resume_on):
    """A run over both hosts "stopped" mid-epoch 2 (its checkpoint there is all that
    is left) and resumed (--resume: the newest in the directory) inside hostB at -n 2,
    or serially, ends where an uninterrupted serial run does."""
    step = {p: int(os.path.basename(p)[5:14]) for p in two_host_checkpoints}
    middle = [p for p, s in step.items() if STEPS_PER_EPOCH < s < 2 * STEPS_PER_EPOCH]
    assert middle, sorted(step.values())
    directory = tmp_path / "ck"
    directory.mkdir()
    shutil.copy(middle[0], directory)
    saved = tmp_path / "resumed.npz"
    loud = [a for a in TRAIN2 if a != "--quiet"]  # to say where it resumes from
    argv = [*loud, "--checkpoint-dir", directory, "--resume", "--save", saved]
    if resume_on == "serial":
        code, out = train_cli(*argv, timeout=120)
    else:
        r = hosts.mpirun(["-hosts", "hostB:2", "-n", "2", PYTHON, "-m", "mpnn.train", *argv],
                         timeout=120, env=ENV)
        code, out = r.returncode, r.stdout
    assert code == 0, out
    name = os.path.basename(middle[0])
    assert f"resuming from {directory / name} (step {step[middle[0]]}, epoch 2" in out, out
    assert max_difference(saved, serial_weights(tmp_path_factory, TRAIN2)) <= TOLERANCE


# ------------------------------------------------------------------ failures

CUT_BOUND = 30  # seconds from the cut to the end of every rank
# MPICH dumps a wait's pending requests after this many seconds and fails the wait after
# twice as many. It bounds every wait, so it must exceed half the longest legitimate one
# (here: start-up skew).
PROGRESS_TIMEOUT = 8
# what the ranks print when it fires: a failed nonblocking wait raises in mpi4py and
# mpnn.train says what it means; a failed blocking collective is fatal inside MPICH
# whatever the communicator's error handler, and MPICH aborts with its own words
PROGRESS_SAYS = ("stopped answering", "Progress TIMEOUT due to MPIR_CVAR_PROGRESS_TIMEOUT")
NO_DETECTION = (
    "nothing in MPI notices a host whose link goes down: MPICH 5.0.2 (UCX netmod, also ofi "
    "tcp and sockets) has no failure detection on an established connection (its UCX "
    "endpoints have no error-handling mode, so UCX keepalive is not armed) and hydra does "
    "not watch its proxies: with mpnn's watchdog off (--timeout 0) every rank spins in its "
    "collective, still running 70 s after the cut in every setting tried except "
    "MPIR_CVAR_PROGRESS_TIMEOUT")
WATCHDOG_TIMEOUT = 8  # --timeout of the watchdog case


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("env, options, bound, says", [
    pytest.param({}, ["--timeout", "0"], CUT_BOUND, (), id="no-watchdog", marks=pytest.mark.xfail(
        strict=True, raises=pytest.fail.Exception, reason=NO_DETECTION)),
    pytest.param({"MPIR_CVAR_PROGRESS_TIMEOUT": str(PROGRESS_TIMEOUT)}, ["--timeout", "0"],
                 2 * PROGRESS_TIMEOUT + 10, PROGRESS_SAYS, id="progress-timeout"),
    pytest.param({}, ["--timeout", str(WATCHDOG_TIMEOUT)], WATCHDOG_TIMEOUT + 10,
                 ("not answering",), id="watchdog"),
])
def test_cut_link_ends_the_job_with_a_message(tmp_path, env, options, bound, says):
    need_hosts()
    with Hosts(("hostA", "hostB")) as hosts:  # its own: the cut is not undone
        metrics = tmp_path / "m.jsonl"
        watchdog = options[1] != "0"
        flight = ["--checkpoint-dir", tmp_path / "ck"] if watchdog else []
        job = hosts.popen([*TWO_BY_TWO, PYTHON, "-m", "mpnn.train", *BASE, "--epochs", "100000",
                           *options, *flight, "--metrics", metrics], env={**ENV, **env})
        deadline = time.monotonic() + 90
        while not (metrics.exists() and metrics.stat().st_size > 0):  # it is training
            assert job.poll() is None, job.output()
            assert time.monotonic() < deadline, job.output()
            time.sleep(0.2)
        if watchdog:
            time.sleep(2)  # heartbeats from both hosts, before the cut
        rank_pids = [p for h in ("hostA", "hostB") for p in hosts.pids(h)
                     if _cmdline(p)[:3] == [PYTHON, "-m", "mpnn.train"]]
        assert len(rank_pids) == 4, rank_pids
        hosts.cut("hostB")
        cut = time.monotonic()
        # every rank on both sides ends; hydra's mpirun may then wait for hostB's proxy,
        # whose goodbye cannot cross the cut link, until it heals
        while any(_alive(p) for p in rank_pids):
            if time.monotonic() - cut > CUT_BOUND:
                pytest.fail(f"ranks still alive {CUT_BOUND} s after hostB's link was cut; "
                            f"output:\n{job.output()[-2000:]}")
            time.sleep(0.2)
        ended = time.monotonic() - cut
        assert ended <= bound, (ended, job.output()[-2000:])
        hosts.heal("hostB")
        try:
            r = job.wait(CUT_BOUND + (time.monotonic() - job.started))
        except multihost.Timeout as e:
            pytest.fail(f"mpirun still running {CUT_BOUND} s after its ranks ended and the link "
                        f"healed; output:\n{e.output[-2000:]}")
        assert r.returncode != 0, r.stdout
        # what the MPI error means, or the watchdog's word
        assert any(s in r.stdout for s in says), r.stdout
        if watchdog:  # hostA's ranks name hostB's as not answering
            assert "mpnn.train: watchdog: world rank " in r.stdout, r.stdout
            assert "world rank 2: not answering" in r.stdout, r.stdout
            assert "world rank 3: not answering" in r.stdout, r.stdout
