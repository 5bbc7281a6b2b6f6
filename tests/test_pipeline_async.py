"""The direct schedule's policy (localopt.pipeline.policy) and its asynchronous variant: the
pipelined run against a one-process reference of the stated staleness, determinism, one
stage = the synchronous step, the in-flight bound, and the errors.  Multi-process checks run in
one spawn of two gloo processes (timeouts on every wait)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

import localopt
from localopt import pipeline as lp
from localopt.models.mlp import MLP
from localopt.models.resnet_cifar import CifarResNet
from localopt.pipeline.policy import DirectPolicy
from localopt.pipeline.timeline import CommCost, StageCost, simulate

M, STEPS = 4, 3
# MLP: 0 Flatten, 1 Linear, 2 Tanh, 3 Linear, 4 Tanh | 5 Linear, 6 Tanh, 7 Linear
SPLIT = ["5"]
STAGE0 = ("1.", "3.")


def _mlp(rule: str = "dfa") -> nn.Module:
    torch.manual_seed(0)
    model = MLP(in_features=12, hidden=(16, 16, 16), num_classes=5)
    localopt.wrap(model, rule, seed=1)
    return model


def _data(steps: int = STEPS):
    g = torch.Generator().manual_seed(3)
    return torch.randn(steps, 8, 12, generator=g), torch.randint(0, 5, (steps, 8), generator=g)


def _pipelined(model, split, asynchronous, xs, ys, example, **kw):
    pipe = lp.build(model, split, "direct", microbatches=M, example=example, timeout=30,
                    asynchronous=asynchronous, **kw)
    opt = pipe.optimizer(torch.optim.SGD, lr=0.1, momentum=0.9)
    losses = []
    for k in range(len(xs)):
        opt.zero_grad()
        loss = pipe.step(xs[k], ys[k])
        opt.step()
        losses.append(None if loss is None else float(loss))
    pipe.flush()
    ids = {id(p) for p in pipe.parameters()}
    state = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in ids}
    return state, losses, pipe.peak_in_flight


def _reference_async(xs, ys):
    """One process, the asynchronous schedule's math for S = 2 (stage 0 runs one stale forward:
    micro-batch 0 of step k >= 1 with its weights before the update of step k-1; stage 1, the
    last, is synchronous)."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    stage0 = [(n, p) for n, p in model.named_parameters() if n.startswith(STAGE0)]
    opt.zero_grad()
    for k in range(len(xs)):
        xm, ym = xs[k].split(2), ys[k].split(2)
        first = 0
        if k > 0:
            old = [p.detach().clone() for _, p in stage0]
            opt.step()
            opt.zero_grad()
            new = [p.detach().clone() for _, p in stage0]
            with torch.no_grad():
                for (_, p), o in zip(stage0, old):
                    p.copy_(o)
            (F.cross_entropy(model(xm[0]), ym[0]) / M).backward()     # the stale forward
            with torch.no_grad():
                for (_, p), n_ in zip(stage0, new):
                    p.copy_(n_)
            first = 1
        for m in range(first, M):
            (F.cross_entropy(model(xm[m]), ym[m]) / M).backward()
    opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _resnet():
    torch.manual_seed(0)
    net = CifarResNet(8, num_classes=5)
    localopt.wrap(net, "dfa", seed=1, modules=["layers.1", "layers.2"])
    return net


def _worker_two():
    xs, ys = _data()
    out = {}
    for name, asyn in (("async", True), ("async_again", True), ("sync", False)):
        out[name] = _pipelined(_mlp(), SPLIT, asyn, xs, ys, xs[0][:1])
    out["drtp_async"] = _pipelined(_mlp("drtp"), SPLIT, True, xs, ys, xs[0][:1])
    out["drtp_sync"] = _pipelined(_mlp("drtp"), SPLIT, False, xs, ys, xs[0][:1])
    out["bound1"] = _pipelined(_mlp(), SPLIT, False, xs, ys, xs[0][:1], max_in_flight=1)
    # module-wise dfa on a ResNet with BatchNorm: backprop inside the blocks, whose saved
    # weights the update changes after a stale forward
    g = torch.Generator().manual_seed(5)
    xi = torch.randn(STEPS, 8, 3, 8, 8, generator=g)
    out["resnet"] = [_pipelined(_resnet(), ["layers.2"], True, xi, ys, xi[0][:1])[0]
                     for _ in range(2)]
    # predict flushes: the pending backwards and the update asked for are applied first
    model = _mlp()
    pipe = lp.build(model, SPLIT, "direct", microbatches=M, example=xs[0][:1], timeout=30,
                    asynchronous=True)
    opt = pipe.optimizer(torch.optim.SGD, lr=0.1)
    opt.zero_grad()
    pipe.step(xs[0], ys[0])
    opt.step()
    logits = pipe.predict(xs[1])
    out["predict"] = None if logits is None else logits.detach().clone()
    try:
        pipe.step(xs[1], ys[1])
        pipe.step(xs[2], ys[2])                 # no opt.step() in between
    except lp.PipelineError as exc:
        out["no_step"] = str(exc)
    return out


@pytest.fixture(scope="module")
def two():
    return lp.launch(_worker_two, nprocs=2, timeout=180)


def test_asynchronous_run_is_the_stated_staleness(two):
    xs, ys = _data()
    ref = _reference_async(xs, ys)
    sync_moved = 0.0
    for res in two:
        state = res["async"][0]
        assert state, res
        for n, t in state.items():
            assert torch.allclose(t, ref[n], atol=1e-6, rtol=1e-5), n
            sync_moved = max(sync_moved, (t - res["sync"][0][n]).abs().max().item())
    assert sync_moved > 1e-5              # the stale forwards change the run


def test_asynchronous_run_is_deterministic(two):
    for res in two:
        a, b = res["async"], res["async_again"]
        assert a[1] == b[1]
        assert all(torch.equal(a[0][n], b[0][n]) for n in a[0])
        r1, r2 = res["resnet"]
        assert r1 and all(torch.equal(r1[n], r2[n]) for n in r1)


def test_in_flight_bound_is_1f1b_by_default_and_can_be_lowered(two):
    # stage 0 of 2 holds at most S - s = 2 micro-batches, the last stage and drtp one
    assert [res["async"][2] for res in two] == [2, 1]
    assert [res["sync"][2] for res in two] == [2, 1]
    assert [res["drtp_sync"][2] for res in two] == [1, 1]
    assert [res["bound1"][2] for res in two] == [1, 1]
    for res in two:                        # the bound changes the order, not the math
        assert all(torch.allclose(res["bound1"][0][n], res["sync"][0][n], atol=1e-6)
                   for n in res["sync"][0])


def test_drtp_has_no_flush_to_remove(two):
    """drtp's backward needs no message: with one micro-batch in flight the asynchronous order
    is the synchronous one."""
    for res in two:
        a, s = res["drtp_async"][0], res["drtp_sync"][0]
        assert all(torch.equal(a[n], s[n]) for n in a)


def test_predict_flushes_and_a_missing_optimizer_step_is_named(two):
    assert two[0]["predict"] is None and two[1]["predict"].shape == (8, 5)
    assert "call the pipeline optimizer's step()" in two[0]["no_step"]


def _worker_one():
    xs, ys = _data()
    return {a: _pipelined(_mlp(), [], a, xs, ys, xs[0][:1])[0] for a in (True, False)}


def test_one_stage_asynchronous_is_the_synchronous_step():
    res = lp.launch(_worker_one, nprocs=1, timeout=120)[0]
    assert all(torch.equal(res[True][n], res[False][n]) for n in res[False])


# ------------------------------------------------------------------------- single process

@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "zb"])
def test_asynchronous_backprop_schedule_is_refused(schedule):
    model = MLP(in_features=12, hidden=(16, 16, 16), num_classes=5)
    with pytest.raises(ValueError, match="asynchronous=True runs the direct schedule only"):
        lp.build(model, SPLIT, schedule, example=torch.zeros(1, 12), asynchronous=True)


def test_asynchronous_rule_that_needs_the_next_gradient_is_refused():
    model = MLP(in_features=12, hidden=(16, 16, 16), num_classes=5)
    localopt.wrap(model, "fa", seed=0)
    with pytest.raises(ValueError, match="asynchronous=True.*rule 'fa' needs the next stage"):
        lp.build(model, SPLIT, "direct", example=torch.zeros(1, 12), asynchronous=True)
    with pytest.raises(ValueError, match="asynchronous=True runs the direct schedules only"):
        simulate([StageCost(1, 1)] * 2, "1f1b", 2, asynchronous=True)


@pytest.mark.parametrize("bound", [0, -1, 1.5, True])
def test_policy_bound_below_one_is_named(bound):
    with pytest.raises(ValueError, match="max_in_flight="):
        lp.build(_mlp(), SPLIT, "direct", example=torch.zeros(1, 12), max_in_flight=bound)
    with pytest.raises(ValueError, match="max_in_flight="):
        simulate([StageCost(1, 1)] * 2, "direct", 2, max_in_flight=bound)
    with pytest.raises(ValueError, match="max_in_flight="):
        DirectPolicy(0, 2, 4, waits_for_error=True, max_in_flight=bound)


def test_policy_order_and_staleness_without_messages():
    """Every message there at once: stage 0 of 2 (bound 2, one stale forward) over two steps."""
    pol = DirectPolicy(0, 2, 2, waits_for_error=True, asynchronous=True)
    pol.available, order = 2, []
    while True:
        c = pol.candidates(flush=pol.nu == 1)
        if not c:
            break
        order.append(c[0])
        pol.done(c[0])
        if c[0] == ("F", 0, 1):
            pol.requested = 1
        if c[0] == ("F", 1, 1):
            pol.requested = 2
    assert order == [("F", 0, 0), ("F", 0, 1), ("D", 0, 0), ("F", 1, 0), ("D", 0, 1),
                     ("U", 0, -1), ("F", 1, 1), ("D", 1, 0), ("D", 1, 1), ("U", 1, -1)]
    assert pol.peak_in_flight == 2


FAST = settings(max_examples=25, deadline=None)

#: dropping the flush can cost a little time: the policy is greedy (each stage runs the first
#: ready op), and a greedy list schedule can lengthen when a constraint is removed (Graham's
#: anomalies).  Found by hypothesis: S=6, M=3, 2 steps, f=1.9375, d=0.5, latency 0.005,
#: max_in_flight=2: 24.81 against 24.56 per step (+0.99%); none in 1,500 random draws.
ANOMALY = 0.02


def test_simulated_asynchronous_can_be_slightly_slower_with_a_tight_bound():
    costs = [StageCost(1.9375, 2 * 0.5, direct=0.5)] * 6
    kw = dict(link=CommCost(latency=0.005), e_bytes=1.0, steps=2, max_in_flight=2)
    sync = simulate(costs, "direct", 3, **kw).makespan
    asyn = simulate(costs, "direct", 3, asynchronous=True, **kw).makespan
    assert sync < asyn <= sync * (1 + ANOMALY)


@FAST
@given(S=st.integers(1, 6), M=st.integers(1, 8), steps=st.integers(1, 4),
       f=st.floats(0.1, 3), d=st.floats(0.1, 3), lat=st.floats(0, 2),
       bound=st.one_of(st.none(), st.integers(1, 8)))
def test_simulated_asynchronous_is_not_slower_and_bounded(S, M, steps, f, d, lat, bound):
    """The same policy in the simulator: every op runs once, at most ``bound`` micro-batches
    in flight per stage, and dropping the flush costs no time with free updates (beyond the
    greedy order's rare anomaly, ``ANOMALY``)."""
    costs = [StageCost(f, 2 * d, direct=d)] * S
    kw = dict(link=CommCost(latency=lat), e_bytes=1.0, steps=steps, max_in_flight=bound)
    sync = simulate(costs, "direct", M, **kw)
    asyn = simulate(costs, "direct", M, asynchronous=True, **kw)
    assert asyn.makespan <= sync.makespan * (1 + ANOMALY) + 1e-9
    for r in (sync, asyn):
        for s in range(S):
            ev = sorted((e for e in r.events if e.stage == s and e.kind in
                         ("forward", "backward")), key=lambda e: e.start)
            assert sum(e.kind == "forward" for e in ev) == M * steps
            held = peak = 0
            for e in ev:
                held += 1 if e.kind == "forward" else -1
                peak = max(peak, held)
            limit = bound if bound is not None else (S - s if s < S - 1 else 1)
            assert peak <= limit
    if S == 1:
        assert asyn.makespan == pytest.approx(sync.makespan)


@pytest.mark.parametrize("bw,lat,name", [(0, 1e-5, "bandwidth_gbit"), (-1, 1e-5, "bandwidth_gbit"),
                                         ("10", 1e-5, "bandwidth_gbit"), (10, 0, "latency"),
                                         (10, float("nan"), "latency"), (10, -1e-6, "latency")])
def test_link_bandwidth_and_latency_must_be_positive(bw, lat, name):
    with pytest.raises(ValueError, match=f"{name}="):
        CommCost.of(bw, lat)


def test_a_slow_link_costs_backprop_more_than_the_direct_schedule():
    """Backprop sends an activation gradient back per micro-batch and boundary, the direct
    schedule ``e`` (here 1% of its size): over 1 Gbit/s the direct schedule loses less."""
    costs = [StageCost(1e-3, 2e-3, direct=1e-3, act_bytes=1e6)] * 4
    link = CommCost.of(1.0, 5e-5)
    assert link.per_byte == pytest.approx(8e-9)
    fast = {s: simulate(costs, s, 8, steps=2).makespan for s in ("1f1b", "direct")}
    slow = {s: simulate(costs, s, 8, steps=2, link=link, e_bytes=1e4).makespan
            for s in ("1f1b", "direct")}
    assert slow["1f1b"] / fast["1f1b"] > slow["direct"] / fast["direct"]


# ------------------------------------------------------------------------- measurement helpers

def test_peak_in_flight_counts_held_micro_batches():
    from localopt.pipeline.analysis import peak_in_flight
    ev = [(0, "forward", 0, 0, 1), (0, "forward", 1, 1, 2), (0, "backward", 0, 2, 3),
          (0, "forward", 2, 3, 4), (0, "backward", 1, 4, 5), (0, "backward", 2, 5, 6),
          (1, "forward", 0, 0, 1), (1, "backward", 0, 1, 2), (1, "backward_weight", 0, 2, 3),
          (1, "forward", 1, 3, 4), (1, "backward", 1, 4, 5), (1, "backward_weight", 1, 5, 6),
          (0, "wait", -1, 6, 7)]
    assert peak_in_flight(ev) == {0: 2, 1: 1}
    # a window that opens with two backwards of the step before: they were held already
    late = [(0, "backward", 2, 0, 1), (0, "backward", 3, 1, 2), (0, "forward", 0, 2, 3)]
    assert peak_in_flight(late) == {0: 2}


def test_bytes_per_step_per_boundary():
    from localopt.recipes.pipeline import bytes_per_step
    plan = {"splits": {"bp": ["b"], "dfa": ["b"], "drtp": ["b"], "zb": ["a", "b", "c"]},
            "profile": {"units": ["x", "a", "b", "c"], "input_bytes_per_sample": [4, 8, 16, 2]}}
    M, batch = 4, 32                                    # micro-batches of 8
    bp = bytes_per_step(plan, "1f1b", M, batch, 2)
    assert bp["activations"] == [4 * 8 * 16] and bp["activation_gradients"] == [4 * 8 * 16]
    assert bp["errors_to_stage"] == [0.0] and bp["total"] == 2 * 4 * 8 * 16
    d = bytes_per_step(plan, "dfa-async", M, batch, 2)
    assert d["activation_gradients"] == [0.0] and d["errors_to_stage"] == [4 * 8 * 10 * 4]
    assert bytes_per_step(plan, "drtp", M, batch, 2)["errors_to_stage"] == [0.0]
    zb = bytes_per_step(plan, "zb", M, batch, 2)        # V: stages 1 and 2 share process 1
    assert zb["per_boundary"] == [2 * 4 * 8 * 8, 0.0, 2 * 4 * 8 * 2]


def test_time_to_accuracy_table():
    from localopt.recipes.pipeline_report import _tta_table, time_to
    curve_bp = [[1000, 10.0, 0.30], [2000, 20.0, 0.45], [3000, 30.0, 0.50]]
    curve_d = [[1000, 5.0, 0.35], [2000, 10.0, 0.48], [3000, 15.0, 0.49]]
    assert time_to(curve_d, 0.47) == (10.0, 2000) and time_to(curve_bp, 0.6) is None
    res = {"runs": [{"label": "1f1b", "curve": curve_bp}, {"label": "dfa", "curve": curve_d}]}
    table = "\n".join(_tta_table(res))
    assert "47.0% (bp final - 3)" in table
    row = next(line for line in table.splitlines() if line.startswith("| dfa"))
    assert "10 (2k)" in row and "| 200 |" in row          # 3000 images in 15 s


def test_gpu_costs_recipe_dry_run(tmp_path, monkeypatch):
    """recipes.pipeline_gpu on the CPU (DRY=1): profile, balanced cuts, simulated schedules."""
    import json
    from localopt.recipes import pipeline_gpu
    monkeypatch.setenv("DRY", "1")
    out = tmp_path / "gpu.json"
    assert pipeline_gpu.main(["--models", "resnet20", "--stages", "2,4", "--bandwidth", "10,1",
                              "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert "one GPU cannot host" in res["meta"]["note"]
    rows = res["models"]["resnet20"]["simulated"]
    assert {r["label"] for r in rows} == {"gpipe", "1f1b", "zb", "direct", "direct-async"}
    assert {(r["S"], r["link"]) for r in rows} == {(2, "10"), (2, "1"), (4, "10"), (4, "1")}
    assert all(r["images_per_s"] > 0 for r in rows)


def test_speedup_bounds_put_the_measured_speedup_beside_its_ceilings():
    from recipes.pipeline_report import speedup_bounds

    def run(label, ips, busy, f, b):
        return {"label": label, "M": 4, "images_per_s": ips,
                "per_process": [{"busy_per_step": t} for t in busy],
                "stage_costs": [{"forward": f, "backward": b, "backward_weight": None}] * 2}
    res = {"meta": {"batch": 100, "model": "mlp3x1024"},
           "runs": [run("1f1b", 50.0, [1.0, 1.5], 1.0, 2.0), run("gpipe", 40.0, [1.0, 1.5], 1.0, 2.0),
                    run("dfa", 75.0, [1.0, 0.6], 1.0, 1.0)],
           "simulation": {"scaled": [{"S": 8, "M": 8, "label": "zb", "images_per_s": 100.0,
                                      "idle_fraction_mean": 0.1},
                                     {"S": 8, "M": 8, "label": "dfa", "images_per_s": 120.0,
                                      "idle_fraction_mean": 0.25}]}}
    (row,) = speedup_bounds(res, 4, 8)
    assert row["label"] == "dfa" and row["measured"] == pytest.approx(1.5)
    assert row["no_wait"] == pytest.approx(100 / 1.0 / 50)          # busiest process: 1.0 s
    assert row["balanced"] == pytest.approx(100 * 2 / 1.6 / 50)
    assert row["compute"] == pytest.approx(6.0 / 4.0)
    assert row["simulated"] == pytest.approx(1.2)
    assert row["simulated_no_wait"] == pytest.approx(120 / 0.75 / 100)


def test_resimulate_reproduces_the_recorded_replay_and_adds_the_wide_variant(tmp_path):
    """A committed throughput file re-simulated from its own measurements: the replay of the
    measured runs is what the file records (the simulator is deterministic), and every
    asynchronous label gains its max_in_flight=S variant at each simulated S."""
    import json
    from pathlib import Path
    from recipes.pipeline_sim import WIDE, resimulate
    src = Path(__file__).resolve().parents[1] / "results" / "pipeline" / "mlp8x1024_S2.json"

    def copy(path, to):             # one simulated S and the measured link only: fast
        d = json.loads(path.read_text())
        d["simulation"]["scaled"] = [x for x in d["simulation"]["scaled"] if x["S"] == 8]
        d["simulation"]["bandwidth"] = {"links": ["loopback"], "latency": 5e-5}
        to.write_text(json.dumps(d))
        return d

    f = tmp_path / src.name
    before = copy(src, f)
    after = resimulate(f)
    assert json.loads(f.read_text()) == after
    assert [c["simulated_images_per_s"] for c in after["simulation"]["check"]] == \
        pytest.approx([c["simulated_images_per_s"] for c in before["simulation"]["check"]])
    old = tmp_path / "old.json"        # measured before the runner's current policy
    kept = copy(src.with_name("resnet20_S2.json"), old)
    with pytest.raises(ValueError, match="no longer replays"):
        resimulate(old)
    assert json.loads(old.read_text()) == kept
    scaled = after["simulation"]["scaled"]
    for x in scaled:
        if x["label"].endswith("-async"):
            assert any(y["label"] == x["label"] + WIDE and (y["S"], y["M"]) == (x["S"], x["M"])
                       for y in scaled), x
