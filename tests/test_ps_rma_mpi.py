"""``RmaShard``: a pull reads the initial parameters and version 0; locked pushes
from every rank (the owner's own included) apply every update, exactly, and each
pull sees parameters and version from the same moment; naive pushes lose updates.

    mpirun -n 2 python -m pytest --with-mpi -m mpi tests/test_ps_rma_mpi.py    (and -n 4)

float64 with small-integer (or binary-fraction) values, so every order of the
updates gives the same bits and the comparisons are exact. Each rank runs its part
inside ``_agree``: a failure on one rank is exchanged by an allgather and raised on
all, so none is left waiting in a collective (a rank waiting in the allgather is
inside MPI, so the others' RMA still completes).
"""

import numpy as np
import pytest
from mpi4py import MPI

from mpnn.parallel.ps_rma import RmaShard

N = 1001  # odd: the float32 version sits after 4 padding bytes


def _agree(comm, part):
    """Run ``part()`` on every rank of ``comm``; return its value, or raise everywhere
    if it failed on any rank (with every rank's error)."""
    try:
        value, error = part(), None
    except Exception as e:  # noqa: BLE001 -- reported to every rank below
        value, error = None, f"rank {comm.Get_rank()}: {type(e).__name__}: {e}"
    errors = [e for e in comm.allgather(error) if e]
    if errors:
        pytest.fail("\n".join(errors))
    return value


def test_serial_shard_on_comm_self():
    """A world of one: the owner pulls and pushes its own shard; bad input is refused."""
    shard = RmaShard(MPI.COMM_SELF, 0, 3, np.float64, initial=np.array([1.0, 2.0, 3.0]))
    out = np.empty(3)
    assert shard.pull(out) == 0 and out.tolist() == [1.0, 2.0, 3.0]
    assert shard.push(np.array([1.0, 2.0, 4.0]), 0.5, read_version=0) == 0
    assert shard.push(np.ones(3), 1.0, read_version=0) == 1  # one update since the read
    assert shard.local.tolist() == [-0.5, 0.0, 0.0] and shard.version() == 2
    shard.push_unlocked(np.ones(3), 1.0)  # alone, the naive push is still an update
    assert shard.pull(out) == 3 and out.tolist() == [-1.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="contiguous"):
        shard.pull(np.empty(3, np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        shard.push(np.ones(6)[::2], 1.0, 0)
    shard.close()
    shard.close()
    with pytest.raises(RuntimeError, match="closed"):
        _ = shard.local
    with pytest.raises(ValueError, match="float32 or float64"):
        RmaShard(MPI.COMM_SELF, 0, 3, np.int32)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("owner", ["first", "last"])
def test_pull_reads_initial_parameters(dtype, owner):
    comm = MPI.COMM_WORLD
    rank, owner = comm.Get_rank(), 0 if owner == "first" else comm.Get_size() - 1
    initial = np.arange(N, dtype=dtype) + 0.5  # (N,)
    shard = RmaShard(comm, owner, N, dtype, initial=initial if rank == owner else None)

    def part():
        out = np.empty(N, dtype)
        assert shard.pull(out) == 0 and shard.version() == 0
        assert np.array_equal(out, initial)
        if rank == owner:
            assert np.array_equal(shard.local, initial)
        else:
            with pytest.raises(RuntimeError, match="only the owner"):
                _ = shard.local

    _agree(comm, part)
    shard.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("owner_pushes", [True, False])
def test_locked_push_applies_every_update(owner_pushes):
    """Every pusher pulls then pushes g (lr 1/4) M times. After: p = p₀ − P·g/4 and
    v = P (P pushes in all); the versions seen before each update are 0..P−1, each
    once; and every pull, taken while others push, has p = p₀ − v·g/4 exactly."""
    comm, M, lr, owner = MPI.COMM_WORLD, 40, 0.25, 0
    rank = comm.Get_rank()
    pushers = [r for r in range(comm.Get_size()) if owner_pushes or r != owner]
    total = M * len(pushers)
    p0 = np.arange(N, dtype=np.float64)  # (N,)
    g = np.arange(N) % 7 + 1.0  # (N,) the same on every pusher
    shard = RmaShard(comm, owner, N, np.float64, initial=p0 if rank == owner else None)

    def part():
        before = []  # the version each of this rank's updates was applied to
        out = np.empty(N)
        for _ in range(M if rank in pushers else 0):
            read = shard.pull(out)
            assert np.array_equal(out, p0 - read * lr * g), f"pull at version {read} torn"
            staleness = shard.push(g, lr, read)
            assert 0 <= staleness <= total - 1
            before.append(read + staleness)
        return before

    before = _agree(comm, part)
    seen = sorted(v for vs in comm.allgather(before) for v in vs)

    def check():
        assert seen == list(range(total))
        out = np.empty(N)
        assert shard.pull(out) == total and shard.version() == total
        assert np.array_equal(out, p0 - total * lr * g)
        if rank == owner:
            assert np.array_equal(shard.local, out)

    _agree(comm, check)
    shard.close()


def _naive_round(comm, M, owner=0):
    """Every rank pushes ones M times with ``push_unlocked``; returns the updates
    that survived (−p[0])."""
    shard = RmaShard(comm, owner, N, np.float64)

    def part():
        for _ in range(M):
            shard.push_unlocked(np.ones(N), 1.0, hold=0.001)

    _agree(comm, part)
    comm.Barrier()  # every push is done

    def count():
        out = np.empty(N)
        version = shard.pull(out)
        applied = -out[0]  # (racing Puts may even tear the vector: element 0 counts)
        assert applied == int(applied)
        assert 1 <= applied <= M * comm.Get_size() and 1 <= version <= M * comm.Get_size()
        return int(applied)

    applied = _agree(comm, count)
    shard.close()
    return applied


@pytest.mark.mpi(min_size=2)
def test_unlocked_push_loses_updates():
    """Every rank (the owner too, so that -n 2 has two pushers) pushes ones M times
    with the naive read-modify-write, holding 1 ms between its read and its write:
    the pushes overlap and fewer than P updates survive. Up to 3 rounds, so a round
    that happened not to overlap cannot fail the test."""
    comm, M = MPI.COMM_WORLD, 20
    total = M * comm.Get_size()
    rounds = []
    for _ in range(3):
        rounds.append(_naive_round(comm, M))
        if rounds[-1] < total:
            return
    pytest.fail(f"the naive push lost no update in 3 rounds of {total} pushes: {rounds}")
