"""Rules draw their randomness from their own streams (``localopt_rng``), never from torch's
global RNG: a wrapped model consumes the global RNG exactly as its unwrapped twin does (same
data, same dropout masks), and a saved state resumes the rule's randomness bit-exactly."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import localopt
from localopt import rng
from localopt.rules.target_prop import is_target_prop

pytestmark = pytest.mark.usefixtures("one_thread")

RULES = localopt.available_rules()
OPTIONS = {"wm": {"warmup": 2}}   # wm: also its initial mirror phase


def make_model() -> nn.Module:
    """Dropout after every hidden block (target propagation: in a later block too)."""
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Dropout(0.25),
                         nn.Linear(12, 12), nn.Tanh(), nn.Dropout(0.25), nn.Linear(12, 4))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    if localopt.is_wrapped(model) and is_target_prop(model):
        return localopt.optim.TargetProp(model, torch.optim.SGD, lr=0.05, feedback_lr=0.01,
                                         noise=0.1)
    if localopt.is_wrapped(model) and localopt.sites(model)[0].rule.learns_feedback:
        return localopt.optim.LocalOptimizer(model, torch.optim.SGD, lr=0.05, momentum=0.9)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def train(model, opt, steps: int, seen: list | None = None) -> None:
    """``steps`` steps on data drawn from the global RNG; ``seen`` collects the global RNG
    state at every dropout call."""
    hooks, inside = [], [False]   # only the model's own forward (not a rule's replays)
    if seen is not None:
        def record(mod, args):
            if inside[0] and torch.is_grad_enabled():
                seen.append(torch.get_rng_state())
        hooks = [m.register_forward_pre_hook(record) for m in model.modules()
                 if isinstance(m, nn.Dropout)]
        hooks.append(model.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)))
        hooks.append(model.register_forward_hook(lambda *a: inside.__setitem__(0, False)))
    for _ in range(steps):
        x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for h in hooks:
        h.remove()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("rule", RULES)
def test_global_rng_is_consumed_as_by_the_unwrapped_twin(rule):
    torch.manual_seed(0)
    model = localopt.wrap(make_model(), rule, seed=3, **OPTIONS.get(rule, {}))
    opt = make_optimizer(model)
    seen: list = []
    train(model, opt, 3, seen)
    after = torch.rand(4)

    torch.manual_seed(0)
    twin = make_model()
    twin_opt = make_optimizer(twin)
    seen_twin: list = []
    train(twin, twin_opt, 3, seen_twin)
    assert len(seen) == len(seen_twin) == 6
    for i, (a, b) in enumerate(zip(seen, seen_twin)):  # same dropout masks
        assert torch.equal(a, b), f"dropout call {i}: the global RNG was drawn from"
    assert torch.equal(after, torch.rand(4))


@pytest.mark.parametrize("rule", ["fa", "dfa", "brsf", "dtp"])
def test_wrap_without_seed_draws_the_global_rng_once(rule):
    torch.manual_seed(0)
    model = make_model()
    localopt.wrap(model, rule)
    after_wrap = torch.get_rng_state()
    torch.manual_seed(0)
    make_model()
    torch.randint(0, 2**62, (1,))   # one draw
    assert torch.equal(after_wrap, torch.get_rng_state())
    # the seed came from that draw: the same global state gives the same rule randomness
    torch.manual_seed(0)
    again = localopt.wrap(make_model(), rule)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("rule", RULES)
def test_saved_state_resumes_bit_exactly(rule):
    torch.manual_seed(0)
    model = localopt.wrap(make_model(), rule, seed=3, **OPTIONS.get(rule, {}))
    opt = make_optimizer(model)
    train(model, opt, 2)
    saved = state(model), copy.deepcopy(opt.state_dict()), torch.get_rng_state()
    train(model, opt, 3)
    expected = state(model)

    torch.manual_seed(1)   # another model, another rule seed: everything comes from the state
    fresh = localopt.wrap(make_model(), rule, seed=4, **OPTIONS.get(rule, {}))
    fresh_opt = make_optimizer(fresh)
    fresh.load_state_dict(saved[0])
    fresh_opt.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    train(fresh, fresh_opt, 3)
    got = state(fresh)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


@pytest.mark.parametrize("rule", ["brsf", "wm", "dfa", "l-drl"])
def test_stream_is_state_of_each_site(rule):
    torch.manual_seed(0)
    model = localopt.wrap(make_model(), rule, seed=3)
    keys = [k for k in model.state_dict() if k.endswith("localopt_" + rng.BUFFER)]
    assert len(keys) == len(localopt.sites(model))
    seeds = {int(model.state_dict()[k][0]) for k in keys}
    assert len(seeds) == len(keys)  # one stream per site
    before = {k: model.state_dict()[k].clone() for k in keys}
    train(model, make_optimizer(model), 1)
    assert any(int(model.state_dict()[k][1]) > int(before[k][1]) for k in keys)
    assert all(int(model.state_dict()[k][0]) == int(before[k][0]) for k in keys)


def test_brsf_redraws_every_forward_and_replays_from_its_state():
    torch.manual_seed(0)
    layer = localopt.wrap(nn.Linear(5, 3), "brsf", seed=0)
    site = localopt.sites(layer)[0]
    saved = layer.localopt_rng.clone()
    B1, B2 = site.rule.feedback(site), site.rule.feedback(site)
    assert not torch.equal(B1, B2)
    assert torch.equal(torch.sign(B1), torch.sign(layer.weight.detach()))
    with torch.no_grad():
        layer.localopt_rng.copy_(saved)   # written from outside: re-read
    assert torch.equal(site.rule.feedback(site), B1)


def test_stream_uniform_is_one_traceable_draw_per_call():
    from localopt import rng
    layer = localopt.wrap(nn.Linear(300, 200), "brsf", seed=0)
    site = localopt.sites(layer)[0]
    saved = layer.localopt_rng.clone()
    u1 = rng.counter_uniform(site, (200, 300), torch.device("cpu"))
    u2 = rng.counter_uniform(site, (200, 300), torch.device("cpu"))
    assert layer.localopt_rng[1] == saved[1] + 2 and not torch.equal(u1, u2)
    assert ((u1 >= 0) & (u1 < 1)).all() and abs(u1.mean().item() - 0.5) < 0.01
    with torch.no_grad():
        layer.localopt_rng.copy_(saved)
    assert torch.equal(rng.counter_uniform(site, (200, 300), torch.device("cpu")), u1)


def test_accelerator_counter_hash_is_uniform_and_deterministic():
    # The no-host-read path used on accelerators, run here on CPU tensors.
    from localopt import rng
    state = torch.tensor([rng.mix(7, 0), 3])
    u = rng._counter_bits(state, 100_000)
    assert torch.equal(u, rng._counter_bits(state.clone(), 100_000))
    assert ((u > 0) & (u < 1)).all()
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.02
    nxt = rng._counter_bits(torch.tensor([rng.mix(7, 0), 4]), 100_000)
    assert abs(torch.corrcoef(torch.stack([u, nxt]))[0, 1].item()) < 0.02
