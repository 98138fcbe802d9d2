"""--zero's configuration checks, and the pieces of ZeRO that need no MPI job.

``validate`` refuses, with a message that says what to do, every --zero that
cannot run: serially, on a grid with one replica, with --tp, stage 3 with --pp,
stage 2 with a zero-bubble schedule, the cupy backend; ``python -m mpnn.train``
exits 2 with that message once, serially and under mpirun, no traceback.
``Shards`` cuts a buffer into contiguous padded slices, ``Ring`` keeps a unit and
its neighbour apart, and ``zero_formula`` is the ZeRO paper's table.
"""

import numpy as np
import pytest

from mpnn.parallel.zero import ZeroConfigError, check_zero_config, zero_formula
from mpnn.parallel.zero_comm import Ring, Shards
from mpnn.runtime.config import ConfigError, validate
from mpnn.train import parse_config

from conftest import train_cli

BASE = ["--dataset", "digits", "--hidden", "16,12", "--epochs", "1"]

REFUSED = {  # name: (world size, options, words the message must hold)
    "serial": (1, ["--zero", "1"],
               ["--zero 1", "a serial run has one", "mpirun -n 2", "drop --zero"]),
    "serial stage 3": (1, ["--zero", "3"], ["--zero 3", "a serial run has one"]),
    "tp": (4, ["--zero", "2", "--tp", "2"],
           ["--zero 2 with --tp 2", "not supported", "--tp without --zero"]),
    "tp x pp": (8, ["--zero", "1", "--tp", "2", "--pp", "2"], ["--zero 1 with --tp 2"]),
    "stage 3 with pp": (4, ["--zero", "3", "--pp", "2"],
                        ["--zero 3 with --pp", "use --zero 1 or 2 with --pp"]),
    "stage 2 with zb-h1": (4, ["--zero", "2", "--pp", "2", "--schedule", "zb-h1"],
                           ["--zero 2 with --schedule zb-h1", "use --zero 1", "1f1b"]),
    "stage 2 with zb-h2": (4, ["--zero", "2", "--pp", "2", "--schedule", "zb-h2"],
                           ["--zero 2 with --schedule zb-h2"]),
    "one replica": (2, ["--zero", "1", "--pp", "2"],
                    ["--zero 1", "(--pp 2 over 2 ranks) has one", "mpirun -n 4", "drop --zero"]),
    "one replica, 3 stages": (3, ["--zero", "2", "--pp", "3"],
                              ["(--pp 3 over 3 ranks) has one", "mpirun -n 6"]),
    # the refusal that holds at any rank count comes first (no advice to add ranks)
    "one replica, tp": (2, ["--zero", "1", "--tp", "2"], ["--zero 1 with --tp 2", "not supported"]),
    "one replica, zero 3 and pp": (2, ["--zero", "3", "--pp", "2"], ["--zero 3 with --pp"]),
    "cupy": (2, ["--zero", "1", "--backend", "cupy"],
             ["--zero 1", "cupy backend is not supported", "--backend numba or numpy"]),
}

ACCEPTED = {  # name: (world size, options)
    "stage 0 serially": (1, ["--zero", "0"]),
    "stage 1 at -n 2": (2, ["--zero", "1"]),
    "stage 2 at -n 2": (2, ["--zero", "2"]),
    "stage 3 at -n 4": (4, ["--zero", "3"]),
    "stage 1 with pp": (4, ["--zero", "1", "--pp", "2"]),
    "stage 2 with pp, gpipe": (4, ["--zero", "2", "--pp", "2", "--schedule", "gpipe"]),
    "stage 1 with zb-h1": (4, ["--zero", "1", "--pp", "2", "--schedule", "zb-h1"]),
    "stage 1 with zb-h2": (4, ["--zero", "1", "--pp", "2", "--schedule", "zb-h2"]),
    "stage 0 with tp": (4, ["--zero", "0", "--tp", "2"]),
    "stage 0 with cupy's check skipped": (2, ["--zero", "0", "--backend", "numpy"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_validate_refuses_a_zero_that_cannot_run(case):
    world, opts, words = REFUSED[case]
    with pytest.raises(ConfigError) as e:
        validate(parse_config(BASE + opts), world)
    msg = str(e.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert "\n" not in msg


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_validate_accepts_a_zero_that_runs(case):
    world, opts = ACCEPTED[case]
    validate(parse_config(BASE + opts), world)


def test_zero_stage_out_of_range():
    with pytest.raises(SystemExit) as e:  # argparse: usage error, status 2
        parse_config(BASE + ["--zero", "4"])
    assert e.value.code == 2
    with pytest.raises(ZeroConfigError, match="--zero 4: choose a stage from 0 to 3"):
        check_zero_config(4, 2, 2)


def test_serial_cli_refuses_zero_without_a_traceback():
    rc, out = train_cli(*BASE, "--zero", "1", timeout=60)
    assert rc == 2, out
    assert "--zero 1 shards the model states across data-parallel replicas, and a serial run " \
           "has one" in out, out
    assert "Traceback" not in out, out


def test_cli_under_mpirun_refuses_one_replica_once():
    rc, out = train_cli(*BASE, "--zero", "1", "--pp", "2", ranks=2, timeout=60)
    assert rc == 2, out
    msg = "--zero 1 shards across data-parallel replicas, and this grid (--pp 2 over 2 ranks) " \
          "has one"
    assert out.count(msg) == 1, out  # rank 0 prints it; the other rank exits quietly
    assert "Traceback" not in out, out


# ------------------------------------------------------------------ Shards

SHARDS = [(1119, 2), (1119, 3), (1119, 4), (1207, 4), (1200, 4), (1, 2), (3, 4), (2, 5),
          (7, 7)]


def _ranges(numel):
    rng = np.random.default_rng(numel)
    cuts = [(0, numel), (0, 0), (numel, numel), (0, 1), (numel - 1, numel)]
    for _ in range(40):
        a, b = sorted(int(v) for v in rng.integers(0, numel + 1, size=2))
        cuts.append((a, b))
    return cuts


@pytest.mark.parametrize(("numel", "n"), SHARDS)
def test_shards_tile_the_buffer_with_less_padding_than_ranks(numel, n):
    every = [Shards(numel, n, r) for r in range(n)]
    s = every[0]
    assert s.size == -(-numel // n)
    assert s.padded == s.size * n >= numel
    assert 0 <= s.padding < n
    assert sum(x.real for x in every) == numel
    assert every[0].lo == 0 and every[-1].hi == numel or numel < n
    for x, y in zip(every, every[1:], strict=False):
        assert x.hi == y.lo or y.real == 0  # contiguous, rank order
        assert x.real >= y.real  # only the last real ones are short
    for x in every:
        assert 0 <= x.real <= x.size
        assert x.lo == x.rank * x.size
        assert x.counts(0, numel) == [y.real for y in every]


@pytest.mark.parametrize(("numel", "n"), SHARDS)
def test_shard_counts_and_mine_agree_on_every_range(numel, n):
    every = [Shards(numel, n, r) for r in range(n)]
    for start, stop in _ranges(numel):
        counts = every[0].counts(start, stop)
        assert sum(counts) == stop - start, (start, stop, counts)
        assert all(c >= 0 for c in counts)
        for x in every:
            assert x.counts(start, stop) == counts  # every rank computes the same
            a, b = x.mine(start, stop)
            assert x.lo <= a <= b <= max(x.hi, x.lo), (x.rank, start, stop, a, b)
            assert b - a == counts[x.rank]
            if b > a:
                assert (a, b) == (max(start, x.lo), min(stop, x.hi))


def test_shards_of_1119_over_4():
    s = [Shards(1119, 4, r) for r in range(4)]
    assert [(x.lo, x.hi) for x in s] == [(0, 280), (280, 560), (560, 840), (840, 1119)]
    assert s[0].padding == 1 and s[3].real == 279
    assert s[1].counts(270, 300) == [10, 20, 0, 0]
    assert s[1].mine(270, 300) == (280, 300)
    assert s[2].mine(270, 300)[1] - s[2].mine(270, 300)[0] == 0


def test_fewer_elements_than_ranks_leaves_empty_shards():
    s = [Shards(2, 5, r) for r in range(5)]
    assert [x.real for x in s] == [1, 1, 0, 0, 0]
    assert s[0].padding == 3
    assert s[4].mine(0, 2) == (s[4].mine(0, 2)[0],) * 2


# -------------------------------------------------------------------- Ring


def _take_all(ring, sizes, order):
    """Take the units in ``order``; (the views, the evictions each take made)."""
    views, evicted = {}, []
    for k in order:
        out = []
        views[k] = ring.take(k, sizes[k], out.append)
        evicted.append(out)
    return views, evicted


@pytest.mark.parametrize("sizes", [[5, 3, 7, 2], [1, 9, 1, 9], [62, 62, 13, 100, 7],
                                   [4], [3, 3, 3]])
def test_ring_consecutive_units_never_overlap(sizes):
    ring = Ring(sizes, np.float64)
    pairs = [a + b for a, b in zip(sizes, sizes[1:], strict=False)]
    assert ring.size == max(pairs + sizes)
    assert ring.nbytes == 8 * ring.size
    for sweep in (range(len(sizes)), reversed(range(len(sizes)))):  # forward, then backward
        ring.forget()
        prev = None
        for k in sweep:
            view = ring.take(k, sizes[k], lambda j: None)
            assert view.size == sizes[k]
            assert view.base is ring.buf or view.base is ring.buf.base or view.size == 0
            if prev is not None:
                assert not np.shares_memory(view, prev), k
                view[...] = k
                prev[...] = -1
                assert (view == k).all()
            prev = view


def test_ring_take_evicts_the_unit_at_the_same_end():
    sizes = [5, 3, 7, 2]
    ring = Ring(sizes, np.float32)
    assert ring.size == 10
    views, evicted = _take_all(ring, sizes, [0, 1, 2, 3])
    assert evicted == [[], [], [0], [1]]  # unit k+2 takes unit k's end
    assert views[0].base is views[2].base and views[0].ctypes.data == ring.buf.ctypes.data
    assert views[1].ctypes.data + views[1].nbytes == ring.buf.ctypes.data + ring.buf.nbytes
    _, evicted = _take_all(ring, sizes, [3])  # a unit taken again (the next micro-batch)
    assert evicted == [[3]]
    ring.forget()
    _, evicted = _take_all(ring, sizes, [0])
    assert evicted == [[]]


def test_ring_take_evicts_the_other_end_only_when_they_would_overlap():
    sizes = [5, 1, 1, 6]  # pairs 6, 2, 7: units 0 and 3 (not neighbours) cannot both fit
    ring = Ring(sizes, np.float64)
    assert ring.size == 7
    _, evicted = _take_all(ring, sizes, [0, 3])
    assert evicted == [[], [0]]
    ring.forget()
    _, evicted = _take_all(ring, sizes, [2, 3])  # neighbours: both stay
    assert evicted == [[], []]


# ------------------------------------------------------------ zero_formula


@pytest.mark.parametrize("n", [2, 4, 8])
def test_zero_formula_float32_adam(n):
    psi = 1000 * n  # divisible: the formulas are exact
    f = [zero_formula(stage, psi, n, 4, 2) for stage in range(4)]
    assert f[0] == {"params": 4 * psi, "grads": 4 * psi, "optimizer": 8 * psi}
    assert sum(f[0].values()) == 16 * psi
    assert f[1] == {"params": 4 * psi, "grads": 4 * psi, "optimizer": 8 * psi / n}
    assert f[2] == {"params": 4 * psi, "grads": 4 * psi / n, "optimizer": 8 * psi / n}
    assert sum(f[2].values()) == 4 * psi + 12 * psi / n
    assert f[3] == {"params": 4 * psi / n, "grads": 4 * psi / n, "optimizer": 8 * psi / n}
    assert sum(f[3].values()) == 16 * psi / n


def test_zero_formula_other_optimizers_and_dtypes():
    psi, n = 1207, 4
    assert zero_formula(0, psi, n, 8, 1) == {"params": 8 * psi, "grads": 8 * psi,
                                             "optimizer": 8 * psi}  # float64 momentum
    assert zero_formula(1, psi, n, 8, 0)["optimizer"] == 0  # plain SGD keeps no state
    assert zero_formula(3, psi, 1, 4, 2) == zero_formula(0, psi, 1, 4, 2)  # one rank: no saving
