"""Pipeline timelines: the event simulation (hand-computable schedules), the figures, and a
two-process smoke run of ``recipes.pipeline``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localopt.pipeline.analysis import best_split, speedups
from localopt.pipeline.timeline import CommCost, StageCost, deepen, idle_fractions, simulate

REPO = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=25, deadline=None)


def per_stage(events, S):
    return [[e for e in events if e.stage == s] for s in range(S)]


@FAST
@given(S=st.integers(1, 6), M=st.integers(1, 10))
def test_gpipe_bubble_with_unit_costs(S, M):
    """F = B = 1, free messages: 2 (M + S - 1) per step, every stage idle (S-1)/(M+S-1)."""
    r = simulate([StageCost(1.0, 1.0)] * S, "gpipe", M)
    assert r.makespan == pytest.approx(2 * (M + S - 1))
    assert r.idle_fraction == pytest.approx([(S - 1) / (M + S - 1)] * S)
    assert r.images_per_s == pytest.approx(M / r.makespan)


@FAST
@given(S=st.integers(1, 5), extra=st.integers(0, 6))
def test_1f1b_has_the_gpipe_bubble_and_order(S, extra):
    """1F1B reorders, it does not shrink the bubble: same makespan with unit costs; stage s
    runs min(M, S-s) forwards before its first backward."""
    M = S + extra
    r = simulate([StageCost(1.0, 1.0)] * S, "1f1b", M)
    assert r.makespan == pytest.approx(2 * (M + S - 1))
    for s, ev in enumerate(per_stage(r.events, S)):
        kinds = [e.kind for e in ev if e.kind in ("forward", "backward")]
        assert kinds.index("backward") == min(M, S - s)


def test_messages_posted_early_cost_one_hop_per_boundary():
    """drtp (receives posted at the step start): stage s starts s hops later, then runs F, D
    back to back: makespan 2M + (S-1)(F + latency + bytes * per_byte)."""
    S, M = 3, 4
    r = simulate([StageCost(1.0, 9.0, direct=1.0, act_bytes=100)] * S, "drtp", M,
                 link=CommCost(latency=0.25, per_byte=0.001))
    assert r.makespan == pytest.approx(2 * M + (S - 1) * 1.35)


def test_late_receives_meet_the_sender_as_in_gloo():
    """torch's GPipe posts each receive when it needs it, and a gloo transfer starts only when
    both sides are there: S=2, M=2, F=B=1, delay d.  Stage 1: F0 at 1+d, posts F1's receive
    at 2+d, act_1 (sent at 2) arrives 2+2d.  Stage 0 waits for both sends before posting B0's
    receive (2+2d); grad_0 leaves stage 1 at 4+2d, arrives 4+3d; B1's receive is posted at
    5+3d, grad_1 (sent 5+2d) arrives 5+4d: makespan 6+4d."""
    d = 0.25
    r = simulate([StageCost(1.0, 1.0)] * 2, "gpipe", 2, link=CommCost(latency=d))
    assert r.makespan == pytest.approx(6 + 4 * d)
    b0 = [e.start for e in r.events if e.stage == 0 and e.kind == "backward"]
    assert b0 == pytest.approx([4 + 3 * d, 5 + 4 * d])


@FAST
@given(S=st.integers(1, 6), extra=st.integers(0, 6))
def test_direct_with_free_e_has_no_bubble_in_backward(S, extra):
    """Direct rules: a stage's backward needs only its forward and e.  With e free, F = D = 1
    and M >= S, the only idle time of every stage is the (S-1)-forward fill: the last stage
    never waits after its first forward, every stage ends with the last one, and the
    backward costs 1, not the backprop 5."""
    M = S + extra
    r = simulate([StageCost(1.0, 5.0, direct=1.0)] * S, "direct", M)
    assert r.makespan == pytest.approx(S - 1 + 2 * M)
    assert r.idle_fraction == pytest.approx([(S - 1) / (S - 1 + 2 * M)] * S)
    for s, ev in enumerate(per_stage(r.events, S)):
        assert [e.microbatch for e in ev if e.kind == "backward"] == list(range(M))
        assert max(e.end for e in ev) == pytest.approx(r.makespan)
    last = per_stage(r.events, S)[-1]
    assert [e.kind for e in last if e.kind != "wait"] == ["forward", "backward"] * M
    assert [e.start for e in last if e.kind == "wait"] == [0.0] * (S > 1)


def test_direct_stage_runs_ready_backwards_between_forwards():
    """localopt's order below the last stage: after each forward, the pending backwards whose
    e has arrived; e_0 reaches stage 0 at 2 (F on stage 1 ends at 2): F0 F1 D0 F2 D1 ..."""
    r = simulate([StageCost(1.0, 1.0, direct=1.0)] * 2, "direct", 4)
    s0 = [(e.kind[0], e.microbatch) for e in r.events if e.stage == 0 and e.kind != "wait"]
    assert s0 == [("f", 0), ("f", 1), ("b", 0), ("f", 2), ("b", 1), ("f", 3), ("b", 2),
                  ("b", 3)]


def test_direct_waits_for_a_slow_e_and_drtp_does_not():
    S, M = 2, 2
    costs = [StageCost(1.0, 2.0, direct=1.0)] * S
    slow = CommCost(latency=10.0)
    d = simulate(costs, "direct", M, e_link=slow)
    # stage 1: F0 1-2, D0 2-3, F1 3-4, D1 4-5; e_0 reaches stage 0 at 12, e_1 at 14
    assert d.makespan == pytest.approx(15.0)
    assert [(e.kind, e.start) for e in d.events if e.stage == 0 and e.kind != "forward"] == [
        ("wait", 2.0), ("backward", 12.0), ("wait", 13.0), ("backward", 14.0)]
    t = simulate(costs, "drtp", M, e_link=slow)
    # drtp needs no e: stage 0 F0 D0 F1 D1 (0-4), stage 1 F0 at 1-2, D0, F1 at 3-4, D1 4-5
    assert t.makespan == pytest.approx(5.0)
    assert [e.kind for e in t.events if e.stage == 0] == ["forward", "backward"] * 2


def test_direct_beats_backprop_when_backward_is_cheaper_and_zb_fills_bubbles():
    costs = [StageCost(1.0, 2.0, backward_input=1.0, backward_weight=1.0, direct=1.2)] * 4
    t = {s: simulate(costs, s, 8).makespan for s in ("gpipe", "1f1b", "zb", "direct")}
    assert t["zb"] < t["1f1b"] == t["gpipe"]
    assert t["direct"] < t["zb"]


@FAST
@given(S=st.integers(1, 4), M=st.integers(1, 6), steps=st.integers(1, 3),
       schedule=st.sampled_from(["gpipe", "1f1b", "direct", "drtp", "zb"]),
       f=st.floats(0.1, 3), b=st.floats(0.1, 3), lat=st.floats(0, 2))
def test_idle_fractions_add_up(S, M, steps, schedule, f, b, lat):
    """Per stage: events never overlap, busy + waits + gaps = the run, and the idle fraction
    is 1 - busy / makespan; the optimizer step of step k precedes step k+1."""
    if schedule == "1f1b":
        M = max(M, S)
    costs = [StageCost(f, b, direct=b / 2, act_bytes=1.0, step=0.1)] * S
    r = simulate(costs, schedule, M, link=CommCost(latency=lat), e_bytes=1.0, steps=steps)
    total = r.makespan * steps
    for s, ev in enumerate(per_stage(r.events, S)):
        for a, c in zip(ev, ev[1:]):
            assert c.start >= a.end - 1e-9
        busy = sum(e.end - e.start for e in ev if e.kind != "wait")
        assert 1 - busy / total == pytest.approx(r.idle_fraction[s], abs=1e-9)
        assert busy == pytest.approx(steps * (M * (f + (b if schedule in ("gpipe", "1f1b", "zb")
                                                       else b / 2)) + 0.1))
        assert [e.kind for e in ev if e.kind == "step"] == ["step"] * steps
    assert idle_fractions(r.events, S, total, 0.0) == pytest.approx(r.idle_fraction)


def test_zb_follows_torch_order_and_splits_the_backward():
    S, M = 2, 4
    r = simulate([StageCost(1.0, 2.0, backward_input=0.5)] * S, "zb", M)
    for ev in per_stage(r.events, S):
        assert sum(e.kind == "forward" for e in ev) == 2 * M        # two virtual stages
        w = [e.end - e.start for e in ev if e.kind == "backward_weight"]
        i = [e.end - e.start for e in ev if e.kind == "backward"]
        assert w == pytest.approx([0.75] * 2 * M) and i == pytest.approx([0.25] * 2 * M)


def test_deepen_keeps_the_per_stage_or_the_total_cost():
    costs = [StageCost(3.0, 6.0, direct=4.0, act_bytes=8.0, step=1.0),
             StageCost(1.0, 2.0, direct=1.0, act_bytes=0.0, step=0.0)]
    blocks = deepen(costs, 8)
    assert len(blocks) == 8 and blocks[0].forward == 2.0 and blocks[0].direct == 2.5
    assert blocks[0].act_bytes == 8.0
    finer = deepen(costs, 8, "finer")
    assert sum(c.backward for c in finer) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="assumption"):
        deepen(costs, 4, "wider")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="schedule='pipedream'"):
        simulate([StageCost(1, 1)], "pipedream", 2)
    with pytest.raises(ValueError, match="zb needs 4 virtual"):
        simulate([StageCost(1, 1)] * 2, "zb", 2, virtual_costs=[StageCost(1, 1)])


def test_plots_write_pngs(tmp_path):
    from localopt.recipes.plots import plot_timeline, plot_timelines
    r = {s: simulate([StageCost(1.0, 2.0)] * 3, s, 4).events for s in ("gpipe", "zb", "direct")}
    p = plot_timeline(r["direct"], tmp_path / "one.png", title="direct")
    q = plot_timelines(r, tmp_path / "all.png", title="S=3, M=4")
    for f in (p, q):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recipe_two_processes_smoke(tmp_path):
    """recipes.pipeline end to end on a tiny MLP: 2 processes on loopback, a torch schedule and
    the direct one, 2 timed steps; JSON, timeline, simulation and the generated report."""
    out = tmp_path / "tiny.json"
    cmd = [sys.executable, "-m", "localopt.recipes.pipeline", "--model", "mlp3x1024",
           "--model-options", '{"hidden": [16, 16]}', "--stages", "2", "--microbatches", "2",
           "--schedules", "gpipe,dfa", "--split", "3", "--steps", "2", "--warmup", "1",
           "--batch", "8",
           "--json", str(out), "--timeline", str(tmp_path), "--simulate", "4",
           "--timeout", "30", "--run-timeout", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=150,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert [(r["label"], r["M"]) for r in res["runs"]] == [("gpipe", 2), ("dfa", 2)]
    for r in res["runs"]:
        assert r["images_per_s"] > 0
        assert len(r["idle_fraction"]) == 2 and all(0 <= x <= 1 for x in r["idle_fraction"])
        assert len(r["stage_costs"]) == 2 and all(c["forward"] > 0 for c in r["stage_costs"])
        for proc in r["per_process"]:     # each process materialised its stage only
            assert 0 < proc["parameter_bytes"] < proc["model_parameter_bytes"], proc
            assert proc["state_bytes"] > proc["parameter_bytes"], proc
    assert res["splits"] == {"bp": ["3"], "dfa": ["3"]}
    assert {c["label"] for c in res["simulation"]["check"]} == {"gpipe", "dfa"}
    assert {(s["S"], s["label"]) for s in res["simulation"]["scaled"]} == {(4, "gpipe"),
                                                                           (4, "dfa")}
    for f in res["files"].values():
        assert Path(f).read_bytes()[:4] == b"\x89PNG"
    from localopt.recipes.pipeline import main
    readme = tmp_path / "PROJECT.md"
    readme.write_text("intro\n<!-- pipeline:begin -->\nstale\n<!-- pipeline:end -->\nrest\n")
    assert main(["--report", str(tmp_path), "--readme", str(readme)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "--schedules gpipe,dfa" in text and "| dfa | 2 |" in text
    block = readme.read_text()            # the project README's headline block is rewritten
    assert block.startswith("intro\n<!-- pipeline:begin -->") and block.endswith("rest\n")
    assert "stale" not in block and "Generated by" in block and "| gpipe | dfa |" in block


def test_split_balances_the_slowest_stage_and_the_v_placement():
    cost, ok = [6.0, 0.1, 3.0, 0.1, 3.0, 0.1], [True] * 6
    assert best_split(cost, ok, 2) == [2]                  # 6.1 | 6.2
    assert best_split(cost, [True, True, False, True, True, True], 2) == [1]   # 6 | 6.3
    # V placement (processes 0,1,1,0): the first and last stage share a process
    assert best_split([1.0] * 8, [True] * 8, 4, [0, 1, 1, 0]) == [2, 4, 6]
    with pytest.raises(ValueError, match="cannot cut"):
        best_split([1.0, 1.0], [True, False], 3)


def test_speedups_are_over_the_fastest_backprop_schedule():
    rows = [{"S": 8, "M": 8, "label": "gpipe", "images_per_s": 100.0},
            {"S": 8, "M": 8, "label": "zb", "images_per_s": 125.0},
            {"S": 8, "M": 8, "label": "dfa", "images_per_s": 200.0}]
    (s,) = speedups(rows)
    assert (s["label"], s["over"]) == ("dfa", "zb")
    assert s["speedup"] == pytest.approx(1.6) and s["over_gpipe"] == pytest.approx(2.0)


def test_the_library_timeline_needs_no_matplotlib():
    """Drawing lives in recipes.plots: importing localopt.pipeline never loads matplotlib."""
    code = ("import sys, localopt.pipeline, localopt.pipeline.timeline, "
            "localopt.pipeline.analysis; print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


@pytest.mark.parametrize("S,M", [(4, 4), (8, 8), (3, 6)])
def test_steady_window_amortises_the_asynchronous_fill_only(S, M):
    """``warmup``: the timed window of a long training.  The asynchronous schedule fills the
    pipeline once, so its steady step is shorter than the 4-step average (which pays the fill
    and the drain) yet never shorter than its busiest stage's work; a flushing schedule
    fills at every step, so both estimators agree; one stage is the synchronous step."""
    c = [StageCost(1.0, 3.0, direct=1.5, step=0.25)] * S
    kw = dict(asynchronous=True, max_in_flight=S)
    total = simulate(c, "direct", M, steps=4, **kw).makespan
    steady = simulate(c, "direct", M, steps=12, warmup=3, **kw).makespan
    busiest = M * (1.0 + 1.5) + 0.25
    assert busiest - 1e-9 <= steady < total
    for sched in ("direct", "1f1b"):
        a = simulate(c, sched, M, steps=4).makespan
        assert simulate(c, sched, M, steps=12, warmup=3).makespan == pytest.approx(a, rel=1e-3)
    one = simulate(c[:1], "direct", M, steps=10, warmup=2, **kw).makespan
    assert one == pytest.approx(busiest)


def test_bad_warmup_is_named():
    c = [StageCost(1.0, 1.0)] * 2
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="warmup"):
            simulate(c, "direct", 2, steps=6, warmup=bad)
    with pytest.raises(ValueError, match="warmup=3"):
        simulate(c, "direct", 2, steps=4, warmup=3)
