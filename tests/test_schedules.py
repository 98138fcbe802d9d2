"""Pipeline schedules: the IR, the communication pass, the tags, the dry-run simulator (no MPI)."""

import pytest

from mpnn.parallel.pipeline_ir import (
    COMPUTE,
    RECEIVES,
    SENDS,
    STEP,
    Action,
    Kind,
    Pipe,
    ScheduleError,
    add_communication,
    format_actions,
    parse_actions,
)
from mpnn.parallel.pipeline_orders import analytic_bubble, compute_order, make_schedule
from mpnn.parallel.simulator import simulate, timeline
from mpnn.parallel.tags import EVAL_TAG, MAX_MICRO_BATCHES, message_tag

GRID = [(p, m) for p in (1, 2, 3, 4) for m in (1, 2, 3, 4, 8)]
# one chunk per rank, B not split (the others: test_pipeline_orders.py)
CLASSIC = ("naive", "gpipe", "1f1b")


def Forward(mb):
    return Action(Kind.FORWARD, mb)


def Backward(mb):
    return Action(Kind.BACKWARD, mb)


def SendAct(mb):
    return Action(Kind.SEND_ACT, mb)


def RecvAct(mb):
    return Action(Kind.RECV_ACT, mb)


def SendGrad(mb):
    return Action(Kind.SEND_GRAD, mb)


def RecvGrad(mb):
    return Action(Kind.RECV_GRAD, mb)


def naive(p, m):
    return make_schedule("naive", p, m)


def gpipe(p, m):
    return make_schedule("gpipe", p, m)


def one_f_one_b(p, m):
    return make_schedule("1f1b", p, m)


@pytest.mark.parametrize("name", CLASSIC)
@pytest.mark.parametrize("p,m", GRID)
def test_every_schedule_runs_to_completion(name, p, m):
    sched = make_schedule(name, p, m)
    assert len(sched) == p
    res = simulate(sched)
    assert res.ok, res.render()
    assert res.busy == [2 * m] * p  # one forward and one backward per micro-batch per stage
    for acts in sched:
        assert acts[-1] == STEP
        assert sorted(a.mb for a in acts if a.kind is Kind.FORWARD) == list(range(m))
        assert sorted(a.mb for a in acts if a.kind is Kind.BACKWARD) == list(range(m))


@pytest.mark.parametrize("p,m", GRID)
def test_bubble_matches_formula(p, m):
    for fn in (gpipe, one_f_one_b):
        res = simulate(fn(p, m))
        assert res.slots == 2 * (m + p - 1)
        assert res.bubble == pytest.approx(analytic_bubble(p, m), abs=1e-12)


@pytest.mark.parametrize("p,m", GRID)
def test_naive_has_no_overlap(p, m):
    res = simulate(naive(p, m))
    assert res.slots == 2 * p * m
    assert res.bubble == pytest.approx(1 - 1 / p)
    assert res.peak_live == [1] * p


@pytest.mark.parametrize("p,m", GRID)
def test_peak_live_micro_batches(p, m):
    assert simulate(gpipe(p, m)).peak_live == [m] * p
    assert simulate(one_f_one_b(p, m)).peak_live == [min(p - i, m) for i in range(p)]


def test_printed_form_round_trips():
    acts = one_f_one_b(3, 4)[1]
    text = format_actions(acts)
    assert text.startswith("RA0 F0 SA0 RA1 F1 SA1 RG0 B0 SG0")
    assert parse_actions(text) == acts
    assert str(STEP) == "STEP" and str(SendGrad(3)) == "SG3" and repr(RecvAct(3)) == "RA3"
    with pytest.raises(ValueError, match="cannot parse"):
        parse_actions("X3")


def test_grid_rendering():
    out = simulate(gpipe(2, 2)).render().splitlines()
    assert out[1].split()[2:] == ["F0", "F1", ".", ".", "B0", "B1"]
    assert out[2].split()[2:] == [".", "F0", "F1", "B0", "B1", "."]


def test_swapped_recv_is_a_deadlock_at_the_right_step():
    # Stage 0 waits for the gradient of micro-batch 0 before sending its activations:
    # stage 1 can never run F0, so both stall in slot 1 (after stage 0's F0 in slot 0).
    sched = gpipe(2, 2)
    acts = sched[0]
    acts.insert(acts.index(SendAct(0)), acts.pop(acts.index(RecvGrad(0))))
    res = simulate(sched)
    assert not res.ok
    assert res.stall_slot == 1
    assert res.deadlock.stage == 0 and res.deadlock.action == RecvGrad(0)
    assert res.deadlock.index == 1
    assert [(st.stage, st.action) for st in res.stalls] == [(0, RecvGrad(0)), (1, RecvAct(0))]
    text = res.render()
    assert "!RG0" in text and "!RA0" in text and "DEADLOCK at slot 1" in text
    with pytest.raises(ScheduleError, match="deadlock at slot 1"):
        simulate(sched, raise_on_deadlock=True)


def test_late_deadlock_in_1f1b_reported_mid_schedule():
    # The middle stage of 1F1B(p=3, m=4) waits for micro-batch 2's gradient before it
    # sends micro-batch 2's activations. Everything runs until that point:
    #   slot    0    1    2    3    4    5    6    7
    #   stage 0  F0   F1   F2    .    .   B0   F3 !RG1   (stage 1 never runs B1)
    #   stage 1   .   F0   F1    .   B0   F2    . !RG2   (the broken wait)
    #   stage 2   .    .   F0   B0   F1   B1    . !RA2   (RA2 is never sent)
    sched = one_f_one_b(3, 4)
    acts = sched[1]
    acts.insert(acts.index(SendAct(2)), acts.pop(acts.index(RecvGrad(2))))
    res = simulate(sched)
    assert not res.ok
    assert res.stall_slot == 7
    assert [(st.stage, st.action) for st in res.stalls] == [
        (0, RecvGrad(1)), (1, RecvGrad(2)), (2, RecvAct(2))]
    assert res.stalls[1].index == acts.index(RecvGrad(2))
    assert len(res.grid[0]) == res.stall_slot  # every slot before the stall, then the marks
    assert res.render().splitlines()[2].split()[-1] == "!RG2"


def test_malformed_schedules_raise():
    bad = [[Forward(0), SendAct(0), Backward(0), STEP],  # backward without gradient
           [RecvAct(0), Forward(0), Backward(0), SendGrad(0), STEP]]
    with pytest.raises(ScheduleError, match="before its gradient was received"):
        simulate(bad)
    unmatched = [[Forward(0), SendAct(0), SendAct(0), Backward(0), STEP], [STEP]]
    with pytest.raises(ScheduleError):
        simulate(unmatched)
    # stage 0 stops before its backward: the gradient sent to it is never received
    with pytest.raises(ScheduleError, match="stage 1 sends grad of micro-batch 0 to stage 0, "
                                            "which never receives it"):
        simulate([parse_actions("F0 SA0"), parse_actions("RA0 F0 B0 SG0 STEP")])
    with pytest.raises(ScheduleError, match="last stage has no next stage"):
        simulate([parse_actions("F0 SA0 B0 STEP")])
    with pytest.raises(ScheduleError, match="first stage has no previous stage to receive"):
        simulate([parse_actions("RA0 F0 B0 STEP")])
    with pytest.raises(ScheduleError, match="before its forward"):
        simulate([parse_actions("SA0 F0 B0 STEP"), parse_actions("RA0 F0 B0 SG0 STEP")])
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("zigzag", 2, 2)


def test_cli_prints_grid_and_bubble(capsys, tmp_path):
    from mpnn.schedule import main

    png = tmp_path / "g.png"
    assert main(["--pp", "4", "--micro-batches", "8", "--schedule", "1f1b",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "stage 0 F0 F1 F2 F3" in out
    assert "simulated 0.2727" in out and "= 0.2727" in out
    assert "stage 0: 4, stage 1: 3, stage 2: 2, stage 3: 1" in out
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("name", CLASSIC)
@pytest.mark.parametrize("p,m", GRID)
def test_timeline_with_unit_cost_agrees_with_simulator(name, p, m):
    sched = make_schedule(name, p, m)
    sim, tl = simulate(sched), timeline(sched, lambda s, a: 1)
    assert tl.makespan == sim.slots
    assert tl.bubble == pytest.approx(sim.bubble, abs=1e-12)


def test_timeline_with_uneven_costs():
    # backward twice the forward: GPipe/1F1B bubble is still (p-1)/(m+p-1) ...
    for fn in (gpipe, one_f_one_b):
        tl = timeline(fn(4, 8), lambda s, a: 2.0 if a.kind is Kind.BACKWARD else 1.0)
        assert tl.bubble == pytest.approx(analytic_bubble(4, 8))
        assert tl.makespan == pytest.approx(3 * (8 + 4 - 1))
    # ... but a slow stage sets the pace: stage 1 twice as slow as stage 0 (p=2, m=4):
    # F: 1,1,1,1 | 2,2,2,2 -> B side the same doubled; makespan = 1 + 4*2 + 4*4 + 2 = 27
    tl = timeline(gpipe(2, 4), lambda s, a: (1 + s) * (2 if a.kind is Kind.BACKWARD else 1))
    assert tl.makespan == pytest.approx(27)
    assert tl.busy == [12, 24]
    assert tl.bubble == pytest.approx(1 - 36 / 54)
    bad = gpipe(2, 2)
    bad[0].insert(bad[0].index(SendAct(0)), bad[0].pop(bad[0].index(RecvGrad(0))))
    with pytest.raises(ScheduleError, match="deadlock"):
        timeline(bad, lambda s, a: 1)


def test_cli_stage_costs(capsys):
    from mpnn.schedule import main

    assert main(["--pp", "2", "--micro-batches", "8", "--schedule", "gpipe",
                 "--stage-costs", "1:2,1:2"]) == 0
    assert "bubble 0.1111" in capsys.readouterr().out.splitlines()[-1]
    # per-stage F/B costs that differ between stages: GPipe pays for it, 1F1B much less
    out = {}
    for name in ("gpipe", "1f1b"):
        main(["--pp", "2", "--micro-batches", "8", "--schedule", name,
              "--stage-costs", "0.6:0.74,0.44:0.93"])
        out[name] = float(capsys.readouterr().out.split()[-1])
    assert out["gpipe"] == pytest.approx(0.1923, abs=1e-4)
    assert out["1f1b"] == pytest.approx(0.1187, abs=1e-3)
    with pytest.raises(SystemExit):
        main(["--pp", "2", "--stage-costs", "1"])


# ------------------------------------------------- the communication pass and tags


def _hand_inserted(name, p, m):
    """The schedules as 527ca80 built them: each schedule inserting its own messages."""
    def fwd(s, mb):
        return ([f"RA{mb}"] if s > 0 else []) + [f"F{mb}"] + ([f"SA{mb}"] if s < p - 1 else [])

    def bwd(s, mb):
        return ([f"RG{mb}"] if s < p - 1 else []) + [f"B{mb}"] + ([f"SG{mb}"] if s > 0 else [])

    stages = []
    for s in range(p):
        if name == "naive":
            acts = [a for mb in range(m) for a in fwd(s, mb) + bwd(s, mb)]
        elif name == "gpipe":
            acts = [a for mb in range(m) for a in fwd(s, mb)] + \
                   [a for mb in range(m) for a in bwd(s, mb)]
        else:
            w = min(p - s - 1, m)
            acts = [a for mb in range(w) for a in fwd(s, mb)]
            for k in range(m - w):
                acts += fwd(s, w + k) + bwd(s, k)
            acts += [a for mb in range(m - w, m) for a in bwd(s, mb)]
        stages.append(" ".join(acts + ["STEP"]))
    return stages


@pytest.mark.parametrize("name", CLASSIC)
@pytest.mark.parametrize("p,m", GRID + [(5, 3), (6, 8)])
def test_pass_reproduces_the_hand_inserted_schedules(name, p, m):
    actions = [format_actions(acts) for acts in make_schedule(name, p, m)]
    assert actions == _hand_inserted(name, p, m)


def test_pass_on_known_lists():
    assert [format_actions(a) for a in add_communication(compute_order("gpipe", 3, 2))] == [
        "F0 SA0 F1 SA1 RG0 B0 RG1 B1",
        "RA0 F0 SA0 RA1 F1 SA1 RG0 B0 SG0 RG1 B1 SG1",
        "RA0 F0 RA1 F1 B0 SG0 B1 SG1"]
    assert format_actions(make_schedule("1f1b", 4, 8)[2]) == (
        "RA0 F0 SA0 RA1 F1 SA1 RG0 B0 SG0 RA2 F2 SA2 RG1 B1 SG1 RA3 F3 SA3 RG2 B2 SG2 "
        "RA4 F4 SA4 RG3 B3 SG3 RA5 F5 SA5 RG4 B4 SG4 RA6 F6 SA6 RG5 B5 SG5 RA7 F7 SA7 "
        "RG6 B6 SG6 RG7 B7 SG7 STEP")
    assert add_communication([parse_actions("F0 B0")]) == [parse_actions("F0 B0")]  # p = 1


@pytest.mark.parametrize("name", CLASSIC)
@pytest.mark.parametrize("p,m", GRID)
def test_schedule_is_compute_order_plus_messages(name, p, m):
    order = compute_order(name, p, m)
    assert all(a.kind in COMPUTE for acts in order for a in acts)
    full = make_schedule(name, p, m)
    for s in range(p):
        assert [a for a in full[s] if a.kind in COMPUTE] == order[s]


@pytest.mark.parametrize("name", CLASSIC)
@pytest.mark.parametrize("p,m", GRID)
def test_every_send_has_one_receive_with_its_tag(name, p, m):
    sends, receives = [], []
    for s, acts in enumerate(make_schedule(name, p, m)):
        for a in acts:
            if a.kind in SENDS:
                sends.append(Pipe(p).message(a, s))
            elif a.kind in RECEIVES:
                receives.append(Pipe(p).message(a, s))
    assert all(0 <= src < p and 0 <= dst < p and abs(src - dst) == 1 for src, dst, _ in sends)
    assert len(set(sends)) == len(sends) == 2 * m * (p - 1)  # each message named once
    assert sorted(sends) == sorted(receives)


def test_pass_refuses_messages_in_a_compute_order():
    with pytest.raises(ScheduleError, match="adds the messages itself"):
        add_communication([parse_actions("F0 SA0 B0"), parse_actions("RA0 F0 B0")])


def test_peer():
    pipe = Pipe(3)  # one chunk per rank: a rank is a stage
    assert pipe.peer(Kind.SEND_ACT, 1) == (2, 0) and pipe.peer(Kind.RECV_ACT, 1) == (0, 0)
    assert pipe.peer(Kind.SEND_GRAD, 1) == (0, 0) and pipe.peer(Kind.RECV_GRAD, 1) == (2, 0)


def test_tags():
    for k in (0, 1, 7, MAX_MICRO_BATCHES - 1):
        assert message_tag(Kind.SEND_ACT, k) == message_tag(Kind.RECV_ACT, k) == 2 * k
        assert message_tag(Kind.SEND_GRAD, k) == message_tag(Kind.RECV_GRAD, k) == 2 * k + 1
    every = {message_tag(kind, k) for kind in SENDS for k in range(MAX_MICRO_BATCHES)}
    assert len(every) == 2 * MAX_MICRO_BATCHES and max(every) < EVAL_TAG <= 32767


def test_micro_batches_beyond_the_tags_are_refused():
    from mpnn.parallel.pipeline_config import PipelineConfigError, check_pipeline_config

    n = MAX_MICRO_BATCHES + 1
    with pytest.raises(PipelineConfigError, match="the message tags can number"):
        check_pipeline_config(2, None, 2, 4, 2 * n, n)
    assert check_pipeline_config(2, None, 2, 4, 2 * n, n - 1) == (1, 2)


# ------------------------------------------------- the CLI: every schedule, costs, bytes

# `python -m mpnn.schedule --pp 2 --micro-batches 6 --schedule 1f1b --actions
# --stage-costs 1:2,1:2` as printed before the zero-bubble and interleaved schedules came
OLD_1F1B = """\
schedule 1f1b: 2 stages, 6 micro-batches
stage 0: F0 SA0 F1 SA1 RG0 B0 F2 SA2 RG1 B1 F3 SA3 RG2 B2 F4 SA4 RG3 B3 F5 SA5 RG4 B4 RG5 B5 STEP
stage 1: RA0 F0 B0 SG0 RA1 F1 B1 SG1 RA2 F2 B2 SG2 RA3 F3 B3 SG3 RA4 F4 B4 SG4 RA5 F5 B5 SG5 STEP

slot     0  1  2  3  4  5  6  7  8  9 10 11 12 13
stage 0 F0 F1  . B0 F2 B1 F3 B2 F4 B3 F5 B4  . B5
stage 1  . F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5  .

slots 14, busy per stage 12, idle per stage 2, 2
bubble: simulated 0.1429   formula (p-1)/(m+p-1) = 0.1429
peak micro-batches in flight per stage: stage 0: 2, stage 1: 1
with stage costs F:B 1:2, 1:2: makespan 21, bubble 0.1429
"""


def _cli(capsys, *argv):
    from mpnn.schedule import main

    code = main(list(argv))
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def _cli_error(capsys, *argv):
    from mpnn.schedule import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


def test_cli_output_of_the_old_schedules_is_unchanged(capsys):
    out = _cli(capsys, "--pp", "2", "--micro-batches", "6", "--schedule", "1f1b", "--actions",
               "--stage-costs", "1:2,1:2")
    assert out == OLD_1F1B
    out = _cli(capsys, "--pp", "2", "--micro-batches", "6", "--schedule", "naive")
    assert ("bubble: simulated 0.5000   formula (p-1)/(m+p-1) = 0.1429  (formula is "
            "GPipe/1F1B's; naive has no overlap)\n") in out


def test_cli_zero_bubble_prints_the_paper_next_to_the_simulator(capsys):
    out = _cli(capsys, "--pp", "4", "--micro-batches", "8", "--schedule", "zb-h1")
    assert "stage 0 F0 F1 F2 F3  .  .  . B0 F4" in out and " W7\n" in out
    assert "ZB-H1 idles (p-1)(F+B-W) per stage = 3 (1F1B's (p-1)(F+B+W) = 9)" in out
    assert "predicts bubble 0.1111" in out
    assert "simulator measures idle per stage 3, 3, 3, 3: bubble 0.1111" in out
    assert "stage 0: 7, stage 1: 6, stage 2: 5, stage 3: 4  (alive from F until W)" in out
    out = _cli(capsys, "--pp", "4", "--micro-batches", "8", "--schedule", "zb-h2")
    assert "ZB-H2 idles (p-1)(F+B-2W) per stage = 0" in out and "predicts bubble 0.0000" in out
    assert "simulator measures idle per stage 3, 3, 3, 3" in out and "steady state" in out
    # with costs: what the paper predicts from them, what the timeline measures
    out = _cli(capsys, "--pp", "2", "--micro-batches", "4", "--schedule", "zb-h1",
               "--stage-costs", "1:1:1,1:1:1")
    assert "with stage costs F:B:W 1:1:1, 1:1:1: makespan 13, bubble 0.0769" in out
    assert "busy per stage 12, 12; idle per stage 1, 1" in out


def test_cli_interleaved(capsys):
    out = _cli(capsys, "--pp", "2", "--micro-batches", "4", "--schedule", "interleaved-1f1b",
               "--virtual-stages", "2")
    assert out.startswith("schedule interleaved-1f1b: 2 stages, 4 micro-batches, 2 chunks per "
                          "rank\n")
    assert "F0.1" in out and "bubble: simulated 0.1111   formula (p-1)/(V·m+p-1) = 0.1111" in out
    # per stage per chunk costs: a chunk's B runs B + W (interleaved-1f1b has no W)
    out = _cli(capsys, "--pp", "2", "--micro-batches", "4", "--schedule", "interleaved-1f1b",
               "--virtual-stages", "2", "--stage-costs", "1:2:1/2:2:2,1:2:1")
    table = [[(1, 3), (2, 4)], [(1, 3), (1, 3)]]
    tl = timeline(make_schedule("interleaved-1f1b", 2, 4, 2),
                  lambda r, a: table[r][a.chunk][a.kind is Kind.BACKWARD])
    assert (f"with stage costs F:B:W 1:2:1/2:2:2, 1:2:1/1:2:1: makespan {tl.makespan:.4g}, "
            f"bubble {tl.bubble:.4f}") in out


def test_cli_configuration_errors(capsys):
    err = _cli_error(capsys, "--schedule", "interleaved-1f1b", "--pp", "4", "--micro-batches",
                     "6", "--virtual-stages", "2")
    assert "--micro-batches 6 must be a multiple of 4" in err
    err = _cli_error(capsys, "--schedule", "1f1b", "--virtual-stages", "2")
    assert "use --virtual-stages 1 with --schedule 1f1b" in err
    err = _cli_error(capsys, "--pp", "2", "--schedule", "interleaved-1f1b", "--virtual-stages",
                     "2", "--stage-costs", "1/2/3,1")
    assert "'1/2/3' gives 3 chunks" in err
    assert "positive" in _cli_error(capsys, "--pp", "2", "--stage-costs", "1:nan,1")
    assert "--micro-batch-rows" in _cli_error(capsys, "--sizes", "8,4,2")
    assert "give --sizes" in _cli_error(capsys, "--partition", "1,1")
    assert "more pipeline stages" in _cli_error(capsys, "--pp", "4", "--sizes", "8,2",
                                                "--micro-batch-rows", "2")


def test_cli_latency(capsys):
    out = _cli(capsys, "--pp", "2", "--micro-batches", "1", "--schedule", "gpipe",
               "--stage-costs", "1:2,1:2", "--latency", "0.25")
    assert "with stage costs F:B 1:2, 1:2 and latency 0.25 s per message: makespan 6.5" in out
    assert "idle per stage 3.5, 3.5" in out
    assert "expected a finite number" in _cli_error(capsys, "--latency", "-1")


def test_timeline_message_moves_when_both_sides_are_there():
    # gpipe, 2 stages, 1 micro-batch, F = 1, B = 2; stage 1 starts the step at 5
    # (its loop was busy): the activations sent at 1 move only once it waits, so
    # they land at 5 + latency, as MPI without a progress thread delivers them
    cost = lambda s, a: 1.0 if a.kind is Kind.FORWARD else 2.0  # noqa: E731
    tl = timeline(gpipe(2, 1), cost, latency=0.25, start=[0.0, 5.0])
    # stage 1: RA 5 -> 5.25, F to 6.25, B to 8.25, SG; stage 0: RG 8.25 -> 8.5, B to 10.5
    assert tl.makespan == pytest.approx(10.5)
    assert tl.idle == pytest.approx([10.5 - 3, 10.5 - 3 - 5])  # the late start is not idle
    assert tl.bubble == pytest.approx(10 / 16)


def test_timeline_overhead_delays_but_is_neither_busy_nor_idle():
    cost = lambda s, a: 1.0 if a.kind is Kind.FORWARD else 2.0  # noqa: E731
    tl = timeline(gpipe(2, 1), cost, overhead=[0.5, 0.5])
    # stage 0: F 0-1 (+0.5), SA at 1.5; stage 1: F 1.5-2.5 (+0.5), B 3-5 (+0.5), SG at
    # 5.5; stage 0: B 5.5-7.5 (+0.5) = 8
    assert tl.makespan == pytest.approx(8.0) and tl.busy == [3.0, 3.0]
    assert tl.overhead == [1.0, 1.0] and tl.idle == pytest.approx([4.0, 4.0])
    assert tl.bubble == pytest.approx(8 / 14)


def test_expected_timeline_adds_the_idle_of_jitter():
    from mpnn.parallel.simulator import expected_timeline

    sched = make_schedule("1f1b", 2, 8)
    cost = lambda s, a: 1.0 if a.kind is Kind.FORWARD else 2.0  # noqa: E731
    tl = timeline(sched, cost)
    assert expected_timeline(sched, cost, lambda s, a: 0.0, draws=5) == \
        pytest.approx((tl.bubble, tl.makespan))
    jitter = expected_timeline(sched, cost, lambda s, a: 0.3, draws=100)
    assert jitter == expected_timeline(sched, cost, lambda s, a: 0.3, draws=100)  # seeded
    # each stage waits for the slower of its own work and its neighbour's
    assert jitter[0] > tl.bubble and jitter[1] > tl.makespan
    # a slowdown shared by a stage's actions does not average out over the step
    shared = expected_timeline(sched, cost, lambda s, a: 0.0, draws=100, jitter=[0.3, 0.3])
    assert shared[0] > jitter[0]


def _metrics(tmp_path, **last):
    """A tiny ``python -m mpnn.train --metrics`` file: two epochs, costs in the last."""
    import json

    record = {"epoch": 2, "train_loss": 0.5, "test_loss": 0.6, "test_accuracy": 0.8,
              "schedule": "1f1b", "pp": 2, "virtual_stages": 1, "micro_batches": 4,
              "action_costs_s": {"F": [[0.001], [0.002]], "B": [[0.002], [0.004]],
                                 "W": [[0], [0]]},
              "message_latency_s": 1e-4}
    record.update(last)
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"epoch": 1, "train_loss": 1.0}) + "\n" + json.dumps(record)
                    + "\n")
    return str(path)


def test_cli_costs_from_metrics(capsys, tmp_path):
    path = _metrics(tmp_path)
    f, b = [0.001, 0.002], [0.002, 0.004]
    out = _cli(capsys, "--costs-from", path)
    assert out.startswith("schedule 1f1b: 2 stages, 4 micro-batches\n")  # the file's keys
    tl = timeline(make_schedule("1f1b", 2, 4),
                  lambda r, a: b[r] if a.kind is Kind.BACKWARD else f[r], latency=1e-4)
    assert (f"with measured costs from {path} (seconds) F:B 0.001:0.002, 0.002:0.004 and "
            f"latency 0.0001 s per message: predicted step time {tl.makespan:.4g} s, "
            f"bubble {tl.bubble:.4f}") in out
    # what if: the same costs under zb-h1 (no W measured: B and W half of B each), no latency
    out = _cli(capsys, "--costs-from", path, "--schedule", "zb-h1", "--latency", "0",
               "--micro-batches", "6")
    assert out.startswith("schedule zb-h1: 2 stages, 6 micro-batches\n")
    tl = timeline(make_schedule("zb-h1", 2, 6),
                  lambda r, a: f[r] if a.kind is Kind.FORWARD else b[r] / 2)
    assert f"predicted step time {tl.makespan:.4g} s, bubble {tl.bubble:.4f}" in out
    assert "(no W: B and W half of B each)" in out and "ZB-H1 idles" in out
    # measured W's are used as they are
    path = _metrics(tmp_path, schedule="zb-h1", action_costs_s={
        "F": [[1.0], [1.0]], "B": [[1.0], [1.0]], "W": [[1.0], [1.0]]}, message_latency_s=0)
    out = _cli(capsys, "--costs-from", path)
    assert "F:B:W 1:1:1, 1:1:1: predicted step time 13 s, bubble 0.0769" in out
    assert "measured spread" not in out  # a file without action_costs_std_s


def test_cli_costs_from_spread_overhead_and_starts(capsys, tmp_path):
    from mpnn.parallel.simulator import expected_timeline

    spread = {"F": [[0.0002], [0.0004]], "B": [[0.0003], [0.0005]], "W": [[0], [0]]}
    path = _metrics(tmp_path, action_costs_std_s=spread, action_overhead_s=[2e-5, 3e-5],
                    step_start_s=[0.0003, 0.0], step_jitter=[0.05, 0.0])
    out = _cli(capsys, "--costs-from", path)
    f, b, sf, sb = [0.001, 0.002], [0.002, 0.004], [0.0002, 0.0004], [0.0003, 0.0005]
    sched = make_schedule("1f1b", 2, 4)
    kw = dict(latency=1e-4, overhead=[2e-5, 3e-5], start=[0.0003, 0.0])
    tl = timeline(sched, lambda r, a: b[r] if a.kind is Kind.BACKWARD else f[r], **kw)
    assert (f"and overhead 2e-05, 3e-05 s per action: predicted step time {tl.makespan:.4g} s, "
            f"bubble {tl.bubble:.4f}") in out
    bubble, span = expected_timeline(
        sched, lambda r, a: b[r] if a.kind is Kind.BACKWARD else f[r],
        lambda r, a: sb[r] if a.kind is Kind.BACKWARD else sf[r], jitter=[0.05, 0.0], **kw)
    assert (f"with the measured spread of every action (200 seeded draws, stages starting "
            f"0.0003, 0 s late, steps slowed by 5.0%, 0.0%): expected step time {span:.4g} s, "
            f"bubble {bubble:.4f}") in out
    # --overhead replaces the file's
    out = _cli(capsys, "--costs-from", path, "--overhead", "0")
    assert "overhead" not in out.split("predicted")[0].split("with measured")[1]
    for bad, key in ((dict(action_overhead_s=[1e-5]), "action_overhead_s"),
                     (dict(step_start_s=[0, -1]), "step_start_s"),
                     (dict(step_jitter=[0.1]), "step_jitter"),
                     (dict(action_costs_std_s={"F": [[0]], "B": [[0]], "W": [[0]]}),
                      "action_costs_std_s")):
        err = _cli_error(capsys, "--costs-from", _metrics(tmp_path, **bad))
        assert key in err
    assert "one per stage (--pp 2)" in _cli_error(capsys, "--costs-from", _metrics(tmp_path),
                                                  "--overhead", "1,2,3")


def test_cli_costs_from_errors(capsys, tmp_path):
    path = _metrics(tmp_path)
    assert "holds costs of 2 ranks x 1 chunks" in _cli_error(capsys, "--costs-from", path,
                                                             "--pp", "3")
    assert "not both" in _cli_error(capsys, "--costs-from", path, "--stage-costs", "1,1")
    assert "cannot read" in _cli_error(capsys, "--costs-from", str(tmp_path / "none.jsonl"))
    bare = tmp_path / "bare.jsonl"
    bare.write_text('{"epoch": 1}\n')
    assert "no action_costs_s" in _cli_error(capsys, "--costs-from", str(bare))
    bad = _metrics(tmp_path, action_costs_s={"F": [[1.0], [1.0]], "B": [[1.0]], "W": [[0], [0]]})
    assert "one shape" in _cli_error(capsys, "--costs-from", bad)
    bad = _metrics(tmp_path, action_costs_s={"F": [[1.0], [-1]], "B": [[1.0]], "W": [[0], [0]]})
    assert "seconds >= 0" in _cli_error(capsys, "--costs-from", bad)
    bad = _metrics(tmp_path, schedule="zigzag")
    assert "must be a schedule name" in _cli_error(capsys, "--costs-from", bad)


def test_cli_peak_bytes(capsys):
    # 2 stages of layers 8->4 and 4->2, 3 rows of float64: stage 0 keeps 3·(8+4)·8 = 288
    # bytes a micro-batch, stage 1 3·(4+2)·8 = 144; 1F1B's peaks of 2 and 1 micro-batches
    out = _cli(capsys, "--pp", "2", "--micro-batches", "4", "--schedule", "1f1b",
               "--sizes", "8,4,2", "--micro-batch-rows", "3", "--dtype", "float64")
    assert ("activation bytes of one micro-batch (3 rows, float64; layers per stage 0 | 1): "
            "stage 0: 288, stage 1: 144") in out
    assert "peak activation bytes per stage: stage 0: 576 (" in out and "stage 1: 144 (" in out
    # V = 2: stage g = chunk·p + rank, so rank 0 holds layers 0 and 2
    out = _cli(capsys, "--pp", "2", "--micro-batches", "2", "--schedule", "interleaved-1f1b",
               "--virtual-stages", "2", "--sizes", "8,4,4,4,2", "--micro-batch-rows", "1",
               "--partition", "1,1,1,1")
    assert "stage 0: 48/32, stage 1: 32/24" in out


def test_cli_plots_f_b_and_w(capsys, tmp_path):
    from mpnn.schedule_report import COLORS

    assert len(set(COLORS.values())) == 3
    for extra in ([], ["--stage-costs", "1:1:1,2:1:1"]):
        png = tmp_path / f"zb{len(extra)}.png"
        out = _cli(capsys, "--pp", "2", "--micro-batches", "4", "--schedule", "zb-h1",
                   "--plot", str(png), *extra)
        assert f"wrote {png}" in out and png.stat().st_size > 1000
