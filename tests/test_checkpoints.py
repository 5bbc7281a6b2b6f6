"""Checkpoints and whole-model pickling of wrapped models; feedback on the meta device and
non-finite feedback; dense direct feedback and a new input resolution."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import localopt
from localopt.optim import LocalOptimizer, TargetProp
from localopt.rules import get_rule
from localopt.rules.target_prop import TargetPropRule

pytestmark = pytest.mark.usefixtures("one_thread")

RULES = localopt.available_rules()


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4))


def convnet() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def optimizer(model: nn.Module, rule: str):
    cls = get_rule(rule)
    if issubclass(cls, TargetPropRule):
        return TargetProp(model, torch.optim.SGD, lr=0.05, feedback_lr=0.01)
    if cls.learns_feedback:
        return LocalOptimizer(model, torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-4)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def train(model, opt, steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ feedback of another kind
@pytest.mark.parametrize("src,dst,kw", [
    ("fa", "dfa", {}),                               # B shaped like W into lazily drawn DFA
    ("dfa", "dfa", {"feedback": "channel"}),         # dense into channel DFA
    ("fa", "l-drl", {}),                             # same shapes, another meaning
    ("dfa", "bidfa", {"feedback": "channel"}),
    ("frsf", "fa", {}),                              # |M| is not a B
])
def test_feedback_of_another_kind_is_refused_at_load(src, dst, kw):
    torch.manual_seed(0)
    a = localopt.wrap(mlp(), src, seed=0)
    a(torch.randn(2, 8, requires_grad=True)).sum().backward()  # draws lazily sized feedback
    b = localopt.wrap(mlp(), dst, seed=1, **kw)
    before = snapshot(b)
    with pytest.raises(RuntimeError, match=f"saved by rule '{src}'.*strip_feedback"):
        b.load_state_dict(a.state_dict())
    assert same(snapshot(b), before)
    b.load_state_dict(localopt.strip_feedback(a.state_dict()), strict=False)  # the way out


@pytest.mark.parametrize("src,dst,opts", [("fa", "kp", {}), ("kp", "fa", {}), ("bfa", "kp", {}),
                                          ("dfa", "dkp", {"feedback": "dense"}),
                                          ("dfa", "bdfa", {}), ("dtp", "sdtp", {})])
def test_feedback_of_the_same_kind_loads_across_rules(src, dst, opts):
    """(dkp's default feedback is shared over positions, another kind than dfa's dense B.)"""
    torch.manual_seed(0)
    a = localopt.wrap(mlp(), src, seed=0)
    a(torch.randn(2, 8, requires_grad=True)).sum().backward()
    b = localopt.wrap(mlp(), dst, seed=1, **opts)
    b.load_state_dict(a.state_dict(), strict=False)
    for k, v in a.state_dict().items():
        if k in b.state_dict() and v.numel() and k != "localopt_rule":
            assert torch.equal(b.state_dict()[k], v), k


def test_undrawn_direct_feedback_checks_the_checkpoint_shape():
    """No rule record (an older checkpoint): the lazily drawn buffers still refuse a tensor
    that cannot be this model's direct feedback."""
    a = localopt.wrap(mlp(), "fa", seed=0)
    sd = {k: v for k, v in a.state_dict().items() if not k.endswith("localopt_rule")}
    b = localopt.wrap(mlp(), "dfa", seed=0)
    before = snapshot(b)
    with pytest.raises(RuntimeError, match="not a direct-feedback checkpoint"):
        b.load_state_dict(sd)
    assert same(snapshot(b), before)
    c = localopt.wrap(convnet(), "dfa", feedback="channel", seed=0)
    bad = {"2.localopt_feedback": torch.zeros(3, 5)}  # 5 != the 4 input channels of layer 2
    with pytest.raises(RuntimeError, match="'2'.*does not fit its input of 4"):
        c.load_state_dict(bad, strict=False)


def test_state_dict_records_the_rule_only_with_feedback_state():
    sd = localopt.wrap(mlp(), "fa").state_dict()
    assert "localopt_rule" in sd and sd["localopt_rule"].dtype == torch.uint8
    plain = mlp()
    plain.load_state_dict(localopt.strip_feedback(sd))  # strip_feedback removes it too
    usf = localopt.wrap(mlp(), "usf")                    # no feedback state: loads as plain
    mlp().load_state_dict(usf.state_dict())


# ------------------------------------------------------------------------------ pickling
@pytest.mark.parametrize("rule", RULES)
def test_whole_model_pickles_and_trains_after_loading(rule):
    torch.manual_seed(0)
    model = localopt.wrap(mlp(), rule, seed=0)
    train(model, optimizer(model, rule), steps=2)
    buf = io.BytesIO()
    torch.save(model, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    clone = copy.deepcopy(model)
    assert same(snapshot(loaded), snapshot(model)) and same(snapshot(clone), snapshot(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. no "B is not learning" from stale version counters
        results = []
        for m in (model, loaded, clone):
            assert localopt.is_wrapped(m) and localopt.sites(m)[0].module is not None
            train(m, optimizer(m, rule), steps=2, seed=1)
            results.append(snapshot(m))
    assert same(results[1], results[0]) and same(results[2], results[0])


@pytest.mark.parametrize("rule", ["kp", "dtp"])
def test_deepcopy_hooks_act_on_the_copy(rule):
    """Hooks were closures over the original rule: a copy's load/forward updated the original."""
    torch.manual_seed(0)
    model = localopt.wrap(mlp(), rule, seed=0)
    clone = copy.deepcopy(model)
    x, y = torch.randn(4, 8), torch.randint(0, 4, (4,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # kp: "B is not learning" if the copy was not re-synced
        F.cross_entropy(clone(x), y).backward()  # dtp: the copy's forward checks its own chain
        F.cross_entropy(model(x), y).backward()
        clone.load_state_dict(model.state_dict())  # bumps the copy's weight versions
        F.cross_entropy(clone(x), y).backward()
    assert localopt.sites(clone)[0].rule is not localopt.sites(model)[0].rule


# ----------------------------------------------------------- meta device, non-finite feedback
@pytest.mark.parametrize("rule", ["fa", "kp", "frsf", "dfa", "dtp", "l-drl"])
def test_meta_device_feedback_is_reported_then_redrawn(rule):
    with torch.device("meta"):
        model = localopt.wrap(mlp(), rule, seed=3)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    ref = localopt.wrap(mlp(), rule, seed=3)           # built on the CPU, same feedback seed
    model.load_state_dict(localopt.strip_feedback(ref.state_dict()), strict=False)
    x, y = torch.randn(4, 8), torch.randint(0, 4, (4,))
    with pytest.raises(RuntimeError, match=r"layer '\w+'.*meta device.*reset_feedback"):
        model(x)
    assert localopt.reset_feedback(model, seed=3) is model
    assert same(snapshot(model), snapshot(ref))
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_a_full_checkpoint_replaces_meta_feedback():
    with torch.device("meta"):
        model = localopt.wrap(mlp(), "fa")
    model.to_empty(device="cpu")
    model.load_state_dict(localopt.wrap(mlp(), "fa", seed=0).state_dict())
    model(torch.randn(2, 8))


def test_non_finite_feedback_is_reported_once_per_change(monkeypatch):
    model = localopt.wrap(mlp(), "fa", seed=0)
    sd = model.state_dict()
    sd["2.localopt_feedback"][1, 1] = float("nan")
    model.load_state_dict(sd)
    with pytest.raises(RuntimeError, match=r"localopt_feedback of layer '2'.*non-finite"):
        model(torch.randn(2, 8))
    localopt.reset_feedback(model, seed=0)
    calls = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: calls.append(1) or real(t))
    for _ in range(3):
        model(torch.randn(2, 8))
    assert len(calls) == 3  # one check (one per buffer) after the redraw, none per step
    model.double()          # new buffer tensors: checked again once
    model(torch.randn(2, 8, dtype=torch.float64))
    model(torch.randn(2, 8, dtype=torch.float64))
    assert len(calls) == 6


def test_reset_feedback_errors():
    with pytest.raises(ValueError, match="not wrapped"):
        localopt.reset_feedback(mlp())
    with pytest.raises(TypeError, match="seed"):
        localopt.reset_feedback(localopt.wrap(mlp(), "fa"), seed=0.5)
    with torch.device("meta"):
        model = localopt.wrap(mlp(), "fa")
    with pytest.raises(RuntimeError, match="to_empty"):
        localopt.reset_feedback(model)


# ------------------------------------------------------------ dense DFA, new input resolution
def test_dense_direct_feedback_refuses_a_new_input_resolution():
    torch.manual_seed(0)
    model = localopt.wrap(convnet(), "dfa", seed=0)
    y = torch.tensor([0, 1])
    F.cross_entropy(model(torch.randn(2, 3, 8, 8)), y).backward()
    with pytest.raises(RuntimeError, match=r"layer '2'.*256 values.*144.*feedback='channel'"):
        model(torch.randn(2, 3, 6, 6))
    localopt.reset_feedback(model, seed=0)  # redrawn for the new shape at the next forward
    F.cross_entropy(model(torch.randn(2, 3, 6, 6)), y).backward()
    chan = localopt.wrap(convnet(), "dfa", feedback="channel", seed=0)
    for size in (8, 6):  # channel feedback is shared over positions: any resolution
        F.cross_entropy(chan(torch.randn(2, 3, size, size)), y).backward()
