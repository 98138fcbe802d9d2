"""The schedules of pipeline_orders (interleaved, zero-bubble) and the timed simulator (no MPI).

The classic schedules' IR, pass and CLI are tested in test_schedules.py.
"""

from collections import Counter

import pytest

from mpnn.parallel.pipeline_ir import (
    COMPUTE,
    RECEIVES,
    SENDS,
    Kind,
    Pipe,
    ScheduleError,
    parse_actions,
)
from mpnn.parallel.pipeline_orders import (
    SCHEDULES,
    ScheduleConfigError,
    analytic_bubble,
    check_schedule,
    make_schedule,
)
from mpnn.parallel.simulator import simulate, timeline

ZERO_BUBBLE = ("zb-h1", "zb-h2")


def shapes():
    """(name, p, m, v) of every schedule over p 1..5, m 1..12, V 1..3 where it runs."""
    out = []
    for name in SCHEDULES:
        for p in range(1, 6):
            for m in range(1, 13):
                for v in (1, 2, 3) if name == "interleaved-1f1b" else (1,):
                    try:
                        check_schedule(name, p, m, v)
                    except ScheduleConfigError:
                        continue
                    out.append((name, p, m, v))
    return out


SHAPES = shapes()


def unit(rank, action):
    return 1


def one_f_one_b_costs(rank, action):
    """1F1B's backward does B and W in one piece: F = 1, B = 2 (= B + W of zb-h1)."""
    return 2 if action.kind is Kind.BACKWARD else 1


# ------------------------------------------------------------------ completion


def test_the_grid_covers_every_schedule():
    assert {name for name, *_ in SHAPES} == set(SCHEDULES)
    assert ("interleaved-1f1b", 4, 8, 3) in SHAPES and ("interleaved-1f1b", 4, 6, 2) not in SHAPES


@pytest.mark.parametrize("name,p,m,v", SHAPES)
def test_every_schedule_runs_to_completion(name, p, m, v):
    sched = make_schedule(name, p, m, v)
    res = simulate(sched)
    assert res.ok, res.render()
    per_unit = 3 if name in ZERO_BUBBLE else 2
    assert res.busy == [per_unit * m * v] * p
    units = sorted((mb, c) for mb in range(m) for c in range(v))
    for acts in sched:
        for kind in (Kind.FORWARD, Kind.BACKWARD):
            assert sorted((a.mb, a.chunk) for a in acts if a.kind is kind) == units
        weights = sorted((a.mb, a.chunk) for a in acts if a.kind is Kind.WEIGHT)
        assert weights == (units if name in ZERO_BUBBLE else [])


@pytest.mark.parametrize("name,p,m,v", SHAPES)
def test_every_send_has_exactly_one_receive(name, p, m, v):
    pipe = Pipe(p, v)
    sends, receives = Counter(), Counter()
    for rank, acts in enumerate(make_schedule(name, p, m, v)):
        for a in acts:
            if a.kind in SENDS or a.kind in RECEIVES:
                key = pipe.message(a, rank)
                assert key is not None, (rank, a)
                (sends if a.kind in SENDS else receives)[key] += 1
    assert sends == receives
    assert set(sends.values()) <= {1}  # each (src, dst, tag) names one message
    assert sum(sends.values()) == 2 * m * (p * v - 1)  # activations + gradients per boundary


# ------------------------------------------------------------------ bubbles


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_unit_cost_bubble_of_gpipe_1f1b_and_interleaved(p, k):
    m = k * p
    for name in ("gpipe", "1f1b"):
        assert simulate(make_schedule(name, p, m)).bubble == pytest.approx(
            (p - 1) / (m + p - 1), abs=1e-12)
    for v in (1, 2, 3):
        sched = make_schedule("interleaved-1f1b", p, m, v)
        res = simulate(sched)
        assert res.bubble == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-12)
        assert res.bubble == pytest.approx(analytic_bubble(p, m, v), abs=1e-12)
        assert timeline(sched, unit).bubble == pytest.approx(res.bubble, abs=1e-12)


@pytest.mark.parametrize("p", [2, 3, 4, 5, 6])
def test_zb_h1_idles_a_third_of_1f1b(p):
    for m in (p, p + 1, 2 * p, 3 * p):
        zb = timeline(make_schedule("zb-h1", p, m), unit)  # F = B = W = 1
        base = timeline(make_schedule("1f1b", p, m), one_f_one_b_costs)  # F = 1, B + W = 2
        assert base.busy == zb.busy == [3.0 * m] * p
        assert base.idle == [3.0 * (p - 1)] * p  # (p-1)(F+B+W)
        assert zb.idle == [1.0 * (p - 1)] * p  # (p-1)(F+B-W): a third
        assert zb.makespan < base.makespan


@pytest.mark.parametrize("p", [2, 3, 4, 5, 6])
def test_zb_h2_has_no_idle_slot_in_its_steady_state(p):
    for m in (p, p + 1, 2 * p, 3 * p):
        res = simulate(make_schedule("zb-h2", p, m))
        for s, row in enumerate(res.grid):
            kinds = [a.kind if a is not None else None for a in row]
            first_b = kinds.index(Kind.BACKWARD)
            last_f = len(kinds) - 1 - kinds[::-1].index(Kind.FORWARD)
            assert None not in kinds[first_b:last_f + 1], (m, s, res.render())


# ------------------------------------------------------------------ memory


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5, 6])
def test_peak_live_of_1f1b_and_zb_h1(p):
    for m in (p, 2 * p, 3 * p):
        assert simulate(make_schedule("1f1b", p, m)).peak_live == [p - s for s in range(p)]
        peak = simulate(make_schedule("zb-h1", p, m)).peak_live
        assert all(k <= (p - s) + (p - 1) for s, k in enumerate(peak)), peak


# ------------------------------------------------------------------ configuration


def test_check_schedule_errors():
    with pytest.raises(ScheduleConfigError, match="--micro-batches 6 must be a multiple of 4"):
        check_schedule("interleaved-1f1b", 4, 6, 2)
    for name in ("naive", "gpipe", "1f1b", "zb-h1", "zb-h2"):
        with pytest.raises(ScheduleConfigError, match="--virtual-stages 2 .* only "
                                                      "interleaved-1f1b"):
            check_schedule(name, 2, 4, 2)
        check_schedule(name, 2, 4, 1)
    with pytest.raises(ScheduleConfigError, match="unknown schedule"):
        make_schedule("zigzag", 2, 2)
    with pytest.raises(ScheduleConfigError, match="at least one"):
        check_schedule("1f1b", 2, 4, 0)


# ------------------------------------------------------------------ the timed simulator


def test_timeline_latency_on_messages_between_ranks():
    # GPipe p=2, m=1: F0 (1) | latency | F0 (1), B0 (2) | latency | B0 (2)
    sched = make_schedule("gpipe", 2, 1)
    tl = timeline(sched, one_f_one_b_costs, latency=0.25)
    assert tl.latency == 0.25
    assert tl.makespan == pytest.approx(6.5)
    assert tl.busy == [3.0, 3.0] and tl.idle == pytest.approx([3.5, 3.5])
    assert [(t0, t1, str(a)) for t0, t1, a in tl.starts[1]] == [(1.25, 2.25, "F0"),
                                                                (2.25, 4.25, "B0")]
    # every receive pays the latency, even of a message sent long before (MPI moves
    # it inside the receiver's Wait): GPipe p=2, m=2, unit costs, latency 0.5
    #   stage 0: F0 0-1 F1 1-2 | RG0 max(2, 5) + .5 | B0 5.5-6.5 | RG1 max(6.5, 6) + .5 | B1 7-8
    #   stage 1: RA0 1 + .5 | F0 1.5-2.5 | RA1 max(2.5, 2) + .5 | F1 3-4 | B0 4-5 | B1 5-6
    tl = timeline(make_schedule("gpipe", 2, 2), unit, latency=0.5)
    assert [(t0, str(a)) for t0, _, a in tl.starts[1]] == [(1.5, "F0"), (3.0, "F1"),
                                                           (4.0, "B0"), (5.0, "B1")]
    assert tl.makespan == pytest.approx(8.0)
    # naive waits for every message anyway: its 2(p-1)m hops each add the latency once;
    # the others pay at least that
    for name, p, m in (("naive", 3, 2), ("gpipe", 4, 8), ("1f1b", 4, 8)):
        sched = make_schedule(name, p, m)
        base = timeline(sched, unit).makespan
        hops = 2 * (p - 1) * (m if name == "naive" else 1)
        late = timeline(sched, unit, latency=0.5).makespan
        if name == "naive":
            assert late == pytest.approx(base + 0.5 * hops)
        else:
            assert late > base + 0.5 * hops


def test_timeline_messages_within_a_rank_are_free():
    sched = make_schedule("interleaved-1f1b", 1, 2, 3)  # chunk to chunk on rank 0
    assert any(a.kind in SENDS for a in sched[0])
    assert timeline(sched, unit, latency=10.0).makespan == timeline(sched, unit).makespan == 12


def test_timeline_keeps_its_defaults():
    tl = timeline(make_schedule("1f1b", 3, 4), unit)
    assert tl.latency == 0.0 and tl.peak_bytes is None
    assert tl.peak_live == [3, 2, 1] and tl.finish[0] == tl.makespan == 12
    assert tl.idle == [4.0, 4.0, 4.0]
    with pytest.raises(ScheduleError, match="deadlock"):
        timeline([parse_actions("RG0 F0 SA0 B0 STEP"), parse_actions("RA0 F0 B0 SG0 STEP")], unit)


def _replayed_peak(sched, size):
    """Peak bytes per rank from simulate's grid, an independent walk of the same rule."""
    res = simulate(sched)
    split = [{(a.mb, a.chunk) for a in acts if a.kind is Kind.WEIGHT} for acts in sched]
    peaks = []
    for rank, row in enumerate(res.grid):
        held = peak = 0
        for a in row:
            if a is None:
                continue
            if a.kind is Kind.FORWARD:
                held += size(rank, a.chunk)
                peak = max(peak, held)
            elif a.kind is Kind.WEIGHT or (a.mb, a.chunk) not in split[rank]:
                held -= size(rank, a.chunk)
        assert held == 0
        peaks.append(peak)
    return peaks


@pytest.mark.parametrize("name,p,m,v", [("1f1b", 2, 4, 1), ("gpipe", 3, 5, 1), ("naive", 2, 3, 1),
                                        ("zb-h1", 4, 8, 1), ("zb-h2", 3, 6, 1),
                                        ("interleaved-1f1b", 2, 4, 2),
                                        ("interleaved-1f1b", 3, 6, 3)])
def test_timeline_peak_live_and_bytes(name, p, m, v):
    sched = make_schedule(name, p, m, v)

    def size(rank, chunk):
        return 1000 ** chunk * (rank + 1)

    tl = timeline(sched, unit, unit_bytes=size)
    assert tl.peak_live == simulate(sched).peak_live
    assert tl.peak_bytes == _replayed_peak(sched, size)
    # the peaks follow each rank's order, not the costs
    slow = timeline(sched, lambda r, a: 1 + 3 * r + (a.kind is Kind.WEIGHT), latency=0.3,
                    unit_bytes=size)
    assert slow.peak_bytes == tl.peak_bytes and slow.peak_live == tl.peak_live


def test_timeline_bytes_of_1f1b():
    tl = timeline(make_schedule("1f1b", 2, 4), unit, unit_bytes=lambda r, c: 100 * (r + 1))
    assert tl.peak_live == [2, 1] and tl.peak_bytes == [200, 200]


def test_timeline_costs_see_split_backwards():
    seen = []
    timeline(make_schedule("zb-h1", 2, 2), lambda r, a: seen.append(a.kind) or 1)
    assert Counter(seen) == {Kind.FORWARD: 4, Kind.BACKWARD: 4, Kind.WEIGHT: 4}
    assert all(k in COMPUTE for k in seen)
