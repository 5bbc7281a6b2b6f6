"""Pipelined training (localopt.pipeline): splitting, exactness against the single-process step
with gradient accumulation, events, and errors.  Multi-process checks run in one spawn of two
gloo processes on 127.0.0.1 (one torch thread each); every wait has a timeout and launch()
kills the processes when one fails, so nothing can hang."""
from __future__ import annotations

import os
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

import localopt
from localopt import pipeline as lp
from localopt.pipeline.events import KINDS
from localopt.models import create_model
from localopt.models.mlp import MLP

M = 4
# MLP: 0 Flatten, 1 Linear, 2 Tanh, 3 Linear, 4 Tanh | 5 Linear, 6 Tanh, 7 Linear
SPLIT = ["5"]

# (rule, schedule, split, wrap options): one optimizer step each, compared with one process
CASES = [
    ("bp", "gpipe", SPLIT, {}),
    ("fa", "1f1b", SPLIT, {}),
    ("bp", "zb", ["3", "5", "7"], {}),
    ("kp", "gpipe", SPLIT, {}),                        # learned feedback on torch's schedule
    ("dfa", "direct", SPLIT, {}),
    ("dfa", "direct", SPLIT, {"modules": ["5"]}),      # module-wise: BP inside stage 0
    ("drtp", "direct", SPLIT, {}),
    ("dkp", "direct", SPLIT, {}),
]


def _model(rule: str, opts: dict, reference: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = MLP(in_features=12, hidden=(16, 16, 16), num_classes=5)
    if rule == "drtp" and reference:
        opts = dict(opts, target="given")
    localopt.wrap(model, rule, seed=1, **opts)
    return model


def _optimizer(model_or_pipe):
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    if isinstance(model_or_pipe, lp.PipelineStep):
        return model_or_pipe.optimizer(torch.optim.SGD, **kw)
    if localopt.sites(model_or_pipe)[0].rule.learns_feedback:   # one-process reference
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return localopt.optim.LocalOptimizer(model_or_pipe, torch.optim.SGD, **kw)
    return torch.optim.SGD(model_or_pipe.parameters(), **kw)


def _reference_step(model, rule, opt, x, y):
    """One process: gradient accumulation over the same micro-batches, each loss / M (drtp:
    its signal is linear in the loss scale, so unscaled losses with the target given, then the
    gradients / M)."""
    opt.zero_grad()
    for xm, ym in zip(x.split(x.shape[0] // M), y.split(y.shape[0] // M)):
        if rule == "drtp":
            localopt.set_targets(model, ym)
            F.cross_entropy(model(xm), ym).backward()
        else:
            (F.cross_entropy(model(xm), ym) / M).backward()
    if rule == "drtp":
        for p in model.parameters():
            p.grad.div_(M)
    opt.step()


def _owned_state(model, pipe):
    """Parameters of this rank's stages and the feedback this rank uses: that of its stages'
    hooked modules except a stage's first (used by the stage below), plus the next stage's
    first (direct schedule)."""
    ids = {id(p) for p in pipe.parameters()}
    names = [n for n, p in model.named_parameters() if id(p) in ids]
    stages = pipe.module if isinstance(pipe.module, nn.ModuleList) else [pipe.module]
    mods = {id(m) for st in stages for part in st.parts for m in part.modules()}
    firsts = {id(m) for st in stages if st.index > 0 for _, m in st.entry()}
    bufs = []
    for n, m in model.named_modules():
        if m._buffers.get("localopt_feedback") is None or not m.localopt_feedback.numel():
            continue
        if (id(m) in mods and id(m) not in firsts) or \
                (pipe.schedule == "direct" and pipe.stage + 1 < pipe.num_stages and
                 n == SPLIT[pipe.stage]):
            bufs.append(f"{n}.localopt_feedback" if n else "localopt_feedback")
    return names, bufs


def _worker_exact():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 12, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    out = {"cases": {}}
    for rule, schedule, split, opts in CASES:
        model = _model(rule, opts)
        pipe = lp.build(model, split, schedule, microbatches=M, example=x[:1], timeout=30)
        opt = _optimizer(pipe)
        ref = _model(rule, opts, reference=True)
        ref_opt = _optimizer(ref)
        if rule == "dfa" and not opts:   # before training: every rank's model is the same
            logits = pipe.predict(x)
            out["predict"] = None if logits is None else (logits - model(x)).abs().max().item()
        for _ in range(2):                       # two steps: momentum and learned feedback
            opt.zero_grad()
            loss = pipe.step(x, y)
            opt.step()
            _reference_step(ref, rule, ref_opt, x, y)
        names, bufs = _owned_state(model, pipe)
        sd, rsd = model.state_dict(), ref.state_dict()
        diff = max((sd[k] - rsd[k]).abs().max().item() for k in names + bufs)
        moved = max((sd[k] - _model(rule, opts).state_dict()[k]).abs().max().item()
                    for k in names)
        kinds = {}
        for ev in pipe.events:
            kinds[ev.kind] = kinds.get(ev.kind, 0) + 1
            assert ev.end >= ev.start and ev.kind in KINDS, ev
        out["cases"][(rule, schedule, str(opts))] = {
            "diff": diff, "moved": moved, "n_params": len(names), "n_bufs": len(bufs),
            "loss": None if loss is None else float(loss), "kinds": kinds,
            "stages": pipe.stages, "fwd_mbs": sorted(e.microbatch for e in pipe.events
                                                     if e.kind == "forward")}
    # zero bubble where a stage ends in a view (ResNet: the flatten after pooling) and with
    # BatchNorm (statistics per micro-batch, as in the one-process accumulation)
    from localopt.models.resnet_cifar import CifarResNet
    xi = torch.randn(8, 3, 8, 8, generator=g)
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        nets.append(CifarResNet(8, num_classes=5))
    pipe = lp.build(nets[0], ["layers.1", "layers.2", "fc"], "zb", microbatches=M,
                    example=xi[:1], timeout=30)
    for net in nets:
        net.eval()
    logits = pipe.predict(xi)             # through the V placement: ranks 0 -> 1 -> 1 -> 0
    with torch.no_grad():
        out["resnet_predict"] = None if logits is None else \
            (logits - nets[1](xi)).abs().max().item()
    for net in nets:
        net.train()
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
    opt.zero_grad()
    pipe.step(xi, y)
    opt.step()
    ref_opt = torch.optim.SGD(nets[1].parameters(), lr=0.1)
    ref_opt.zero_grad()
    for xm, ym in zip(xi.split(2), y.split(2)):
        (F.cross_entropy(nets[1](xm), ym) / M).backward()
    ref_opt.step()
    ids = {id(p) for p in pipe.parameters()}
    sd, rsd = nets[0].state_dict(), nets[1].state_dict()
    owned = [n for n, p in nets[0].named_parameters() if id(p) in ids]
    owned += [n for n in sd if "running" in n and n.replace("running_mean", "weight")
              .replace("running_var", "weight") in owned]
    out["resnet_zb"] = (len(owned), max((sd[k] - rsd[k]).abs().max().item() for k in owned))
    # bad input across ranks
    rank = int(os.environ["RANK"])
    errors = {}
    model = _model("dfa", {})
    try:
        lp.build(model, SPLIT, "direct", microbatches=2 + rank, example=x[:1], timeout=30)
    except ValueError as exc:
        errors["microbatches"] = str(exc)
    try:
        lp.build(model, ["3", "5"], "direct", microbatches=M, example=x[:1], timeout=30)
    except ValueError as exc:
        errors["stages"] = str(exc)
    pipe = lp.build(model, SPLIT, "direct", microbatches=M, example=x[:1], timeout=30)
    try:
        pipe.step(x[:6], y[:6])
    except lp.PipelineError as exc:
        errors["divisible"] = str(exc)
    pipe.step(x, y)                             # still usable after a refused batch
    out["errors"] = errors
    return out


def _worker_dies():
    x = torch.randn(8, 12)
    y = torch.randint(0, 5, (8,))
    model = _model("dfa", {})
    pipe = lp.build(model, SPLIT, "direct", microbatches=M, example=x[:1], timeout=5)
    if int(os.environ["RANK"]) == 1:
        os._exit(3)                             # the last stage dies before sending e
    pipe.step(x, y)


@pytest.fixture(scope="module")
def exact():
    return lp.launch(_worker_exact, nprocs=2, timeout=120)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{len(c[3])}")
def test_pipelined_step_equals_single_process_accumulation(exact, case):
    rule, schedule, split, opts = case
    S = len(split) + 1
    for rank, res in enumerate(exact):
        r = res["cases"][(rule, schedule, str(opts))]
        assert r["n_params"] > 0 and r["moved"] > 1e-4, r      # the step did something
        assert r["diff"] < 1e-5, (rank, r)
        if rank == len(exact) - 1:           # every schedule: the loss on the last rank
            assert r["loss"] is not None and r["loss"] > 0, r
        else:
            assert r["loss"] is None, r
        assert r["fwd_mbs"] == sorted(list(range(M)) * len(r["stages"])), r
        assert r["kinds"]["backward"] >= M * len(r["stages"]), r
        assert r["kinds"].get("send", 0) + r["kinds"].get("recv", 0) > 0, r
    if schedule == "zb":   # zero bubble defers each micro-batch's weight gradients
        for res in exact:
            r = res["cases"][(rule, schedule, str(opts))]
            assert r["kinds"]["backward_weight"] == M * len(r["stages"]), r
    if rule == "drtp":     # the target is known everywhere: stage 0 receives nothing
        assert "recv" not in exact[0]["cases"][(rule, schedule, str(opts))]["kinds"]
    if schedule == "direct" and rule != "drtp":
        assert exact[0]["cases"][(rule, schedule, str(opts))]["n_bufs"] >= 1  # next stage's B


def test_zero_bubble_on_a_resnet_with_batchnorm_and_a_view_output(exact):
    for res in exact:
        n, diff = res["resnet_zb"]
        assert n > 4 and diff < 1e-5, res["resnet_zb"]
    assert exact[1]["resnet_predict"] < 1e-5 and exact[0]["resnet_predict"] is None


def test_predict_is_the_model_output(exact):
    assert exact[0]["predict"] is None and exact[1]["predict"] < 1e-5


def test_ranks_that_disagree_get_clear_errors(exact):
    for rank, res in enumerate(exact):
        e = res["errors"]
        assert "microbatches" in e["microbatches"] and "rank" in e["microbatches"]
        assert "gives 3 stages" in e["stages"] and "2 process" in e["stages"]
        assert "does not divide" in e["divisible"]


def test_a_dead_rank_is_named_not_waited_for():
    with pytest.raises(RuntimeError) as info:
        lp.launch(_worker_dies, nprocs=2, timeout=60, grace=15)
    msg = str(info.value)
    assert "rank 1: rank 1 exited with code 3" in msg
    assert "rank 0: " in msg and "from rank 1" in msg and "PipelineError" in msg


# -- in one process: splitting and the rule/schedule checks (before any communication) ------------
def _names(stages):
    return [st.names for st in stages]


def test_split_mlp_and_nested_sequential():
    model = MLP(in_features=12, hidden=(16, 16), num_classes=5)
    assert _names(lp.split_stages(model, ["3"])) == [["0", "1", "2"], ["3", "4", "5"]]
    nested = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(12, 8), nn.Tanh(),
                                                       nn.Linear(8, 8)), nn.Linear(8, 3))
    stages = lp.split_stages(nested, ["1.2"])
    assert _names(stages) == [["0", "1.0", "1.1"], ["1.2", "2"]]
    x = torch.randn(4, 12)
    assert torch.equal(stages[1](stages[0](x)), nested(x))


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_any_ordered_split_partitions_the_sequence_and_composes(data):
    """Split points anywhere in a nested Sequential: the stages are a partition of the opened
    sequence, in order, and compose to the model's forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(),
                          nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 4)),
                          nn.Tanh(), nn.Linear(4, 3))
    opened = ["0", "1", "2", "3.0", "3.1", "3.2", "4", "5"]
    cuts = data.draw(st.lists(st.integers(1, len(opened) - 1), unique=True, max_size=4))
    split = [opened[k] for k in sorted(cuts)]
    stages = lp.split_stages(model, split)
    assert len(stages) == len(split) + 1
    assert [n for st_ in stages for n in st_.names] == \
        (opened if any(c.startswith("3.") for c in split) else
         ["0", "1", "2", "3", "4", "5"])
    assert [st_.names[0] for st_ in stages[1:]] == split
    x = torch.randn(3, 2, 3)
    h = x
    for st_ in stages:
        h = st_(h)
    assert torch.equal(h, model(x))


def test_resnet_sequence_composes_to_forward():
    model = create_model("resnet20").eval()
    stages = lp.split_stages(model, ["layers.3", "layers.6"])
    assert stages[1].names == ["layers.3", "layers.4", "layers.5"]
    x = torch.randn(2, 3, 32, 32)
    h = x
    for st in stages:
        h = st(h)
    assert torch.allclose(h, model(x), atol=1e-6)


@pytest.mark.parametrize("split, match", [
    (["9"], "names no module"),
    (["5", "3"], "forward order"),
    (["0"], "stage 0 would be empty"),
    ("3", "list of module names"),
])
def test_bad_split_points_are_named(split, match):
    model = MLP(in_features=12, hidden=(16, 16), num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=match):
        lp.split_stages(model, split)
    assert list(model.state_dict()) == list(before)


def test_split_inside_a_non_sequential_module_is_refused():
    with pytest.raises(ValueError, match="inside 'layers.3' .BasicBlock"):
        lp.split_stages(create_model("resnet20"), ["layers.3.conv2"])
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(x + self.a(x))

    with pytest.raises(ValueError, match="names no module that the forward"):
        lp.split_stages(Residual(), ["x"])       # traced (localopt.pipeline.trace): no module x


@pytest.mark.parametrize("rule, schedule, match", [
    ("fa", "direct", "needs\\s+the gradient of the stage above"),
    ("dfa", "gpipe", "Use schedule='direct'"),
    ("bp", "pipedream", "not one of"),
])
def test_rule_schedule_mismatch_is_an_error(rule, schedule, match):
    model = _model(rule, {})
    with pytest.raises(ValueError, match=match):
        lp.build(model, SPLIT, schedule, example=torch.zeros(1, 12))
    assert localopt.is_wrapped(model) and localopt.sites(model)[0].module is model[1]


def test_direct_schedule_refuses_drtp_with_its_gate_on():
    torch.manual_seed(0)
    model = MLP(in_features=12, hidden=(16, 16, 16), num_classes=5)
    localopt.wrap(model, "drtp", seed=1, gate=True)   # the gated signal needs p_t
    with pytest.raises(ValueError, match="gate=False"):
        lp.build(model, SPLIT, "direct", example=torch.zeros(1, 12))
    assert localopt.is_wrapped(model)


def test_direct_schedule_needs_a_hooked_module_at_each_stage_start():
    model = _model("dfa", {"modules": ["3"]})        # stage 1 begins at '5', not hooked
    with pytest.raises(ValueError, match="stage 1 begins with '5'"):
        lp.build(model, SPLIT, "direct", example=torch.zeros(1, 12))


def test_direct_schedule_accepts_a_hooked_sequential_at_a_stage_start(monkeypatch):
    """Module-wise dfa naming a whole nn.Sequential: that module reads the stage input, so the
    set-up checks pass and build() goes on to the process group (missing here)."""
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(),
                          nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 5))
    localopt.wrap(model, "dfa", modules=["2"], seed=0)
    with pytest.raises(lp.PipelineError, match="torchrun"):
        lp.build(model, ["2"], "direct", example=torch.zeros(1, 12))
    with pytest.raises(ValueError, match="stage 1 begins with '2.0'"):
        lp.build(model, ["2.0"], "direct", example=torch.zeros(1, 12))
