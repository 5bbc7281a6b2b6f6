"""localopt.optim.Muon: torch's Muon update on weights viewed as matrices (conv kernels as
(out, in*kh*kw)), torch.optim.SGD's on the rest; param groups, state, schedulers, recipes."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import localopt
from localopt import models
from localopt.optim import Muon, muon_param_groups
from trainloop import train_steps

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


@pytest.mark.parametrize("options", [
    {},
    {"nesterov": False, "momentum": 0.9, "weight_decay": 0.01},
    {"adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.1, "ns_steps": 3},
    {"adjust_lr_fn": "original", "ns_coefficients": (3.0, -3.2, 1.2), "eps": 1e-6},
])
def test_muon_group_equals_torch_muon_on_the_flattened_weight(options):
    torch.manual_seed(0)
    conv = torch.randn(16, 8, 3, 3)                      # (out, in, kh, kw)
    ours = conv.clone().requires_grad_()
    ref = conv.clone().reshape(16, -1).requires_grad_()  # the (out, in*kh*kw) matrix
    opt = Muon([ours], lr=0.05, **options)
    ref_opt = torch.optim.Muon([ref], lr=0.05, **{"weight_decay": 0.0, **options})
    for g in _grads(conv.shape, 3):
        ours.grad, ref.grad = g.clone(), g.reshape(16, -1).clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours.detach().reshape(16, -1), ref.detach(), atol=1e-6, rtol=0)
    buf = opt.state[ours]["momentum_buffer"]
    assert buf.shape == ours.shape
    torch.testing.assert_close(buf.reshape(16, -1), ref_opt.state[ref]["momentum_buffer"],
                               atol=1e-6, rtol=0)
    assert not torch.equal(ours.detach(), conv)


def test_muon_group_of_a_matrix_equals_torch_muon_exactly():
    w = torch.randn(12, 20)
    ours, ref = w.clone().requires_grad_(), w.clone().requires_grad_()
    opt, ref_opt = Muon([ours], lr=0.02, weight_decay=0.1), torch.optim.Muon([ref], lr=0.02)
    for g in _grads(w.shape, 3):
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    assert torch.equal(ours, ref)


def test_channels_last_conv_kernels_update_as_contiguous_ones():
    w = torch.randn(16, 8, 3, 3)
    a = w.clone().requires_grad_()
    b = w.clone().to(memory_format=torch.channels_last).requires_grad_()
    oa, ob = Muon([a], lr=0.05, weight_decay=0.01), Muon([b], lr=0.05, weight_decay=0.01)
    for g in _grads(w.shape, 3):
        a.grad, b.grad = g.clone(), g.clone().to(memory_format=torch.channels_last)
        oa.step()
        ob.step()
    assert torch.equal(a, b) and b.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("options", [
    {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    {"momentum": 0.9, "nesterov": False, "weight_decay": 0.0},
    {"momentum": 0.0, "nesterov": False, "weight_decay": 1e-2},
])
def test_sgd_group_equals_torch_sgd(options):
    torch.manual_seed(0)
    shapes = [(7,), (5, 3), (4, 2, 3, 3)]
    init = [torch.randn(s) for s in shapes]
    ours = [t.clone().requires_grad_() for t in init]
    ref = [t.clone().requires_grad_() for t in init]
    opt = Muon([{"params": ours, "use_muon": False}], lr=0.1, **options)
    ref_opt = torch.optim.SGD(ref, lr=0.1, **options)
    for step in range(4):
        for i, (a, b) in enumerate(zip(ours, ref)):
            g = _grads(a.shape, 1, seed=10 * step + i)[0]
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
        if options["momentum"]:
            assert torch.equal(opt.state[a]["momentum_buffer"],
                               ref_opt.state[b]["momentum_buffer"])


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _train(model, opt, steps):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g)
    return train_steps(model, x, y, opt, steps)


def test_state_dict_round_trip():
    model = _mlp()
    opt = Muon(muon_param_groups(model), lr=0.02, momentum=0.9, weight_decay=1e-3)
    _train(model, opt, 3)
    for group in opt.param_groups:
        for p in group["params"]:
            assert opt.state[p]["momentum_buffer"].shape == p.shape
    twin = _mlp()
    twin.load_state_dict(model.state_dict())
    twin_opt = Muon(muon_param_groups(twin), lr=0.5)
    saved = io.BytesIO()   # as a checkpoint: a copy, not the live buffers
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    twin_opt.load_state_dict(torch.load(saved))
    assert [g["lr"] for g in twin_opt.param_groups] == [0.02, 0.02]
    assert _train(model, opt, 3) == _train(twin, twin_opt, 3)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_onecycle_cycles_lr_and_momentum_of_both_groups():
    model = _mlp()
    opt = Muon(muon_param_groups(model, aux={"lr": 0.1}), lr=0.02, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.02, 0.1], total_steps=10,
                                                cycle_momentum=True)
    seen = []
    for _ in range(5):
        _train(model, opt, 1)
        sched.step()
        seen.append([(g["lr"], g["momentum"]) for g in opt.param_groups])
    assert len({s[0] for s in seen}) == 5 and len({s[1] for s in seen}) == 5
    assert all(0.85 <= m <= 0.95 for s in seen for _, m in s)
    assert seen[2][1][0] == pytest.approx(5 * seen[2][0][0])   # each group's own peak


def test_muon_param_groups_on_resnet20():
    model = models.create_model("resnet20")
    muon, sgd = muon_param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in muon["params"]}
    sgd_names = {names[id(p)] for p in sgd["params"]}
    assert muon["use_muon"] and not sgd["use_muon"]
    assert "conv1.weight" in sgd_names and "fc.weight" in sgd_names
    assert muon_names == {n for n, p in model.named_parameters() if p.ndim == 4} - {"conv1.weight"}
    assert len(muon_names) == 18 and all(p.ndim == 4 for p in muon["params"])
    assert all(p.ndim == 1 for n, p in model.named_parameters() if n in sgd_names
               and n not in ("conv1.weight", "fc.weight"))
    assert len(muon_names) + len(sgd_names) == len(list(model.parameters()))
    # nothing excluded: every conv kernel and the classifier
    all_w = muon_param_groups(model, exclude=())[0]["params"]
    assert len(all_w) == 20
    with pytest.raises(ValueError, match="nope"):
        muon_param_groups(model, exclude=("first", "nope"))


def test_a_one_dimensional_parameter_in_a_muon_group_is_a_clear_error():
    w, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match=r"param group 0 .*parameter 1 has shape \(4,\).*"
                                         r"use_muon=False"):
        Muon([w, b], lr=0.02)
    opt = Muon([{"params": [w]}, {"params": [b], "use_muon": False}], lr=0.02)
    with pytest.raises(ValueError, match=r"param group 2 .*shape \(4,\)"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(4))]})
    with pytest.raises(ValueError, match="nesterov"):
        Muon([{"params": [b], "use_muon": False}], momentum=0.0)


def test_muon_with_feedback_alignment_learns():
    model = localopt.wrap(_mlp(), "fa", seed=0)
    opt = Muon(muon_param_groups(model, aux={"lr": 0.3}), lr=0.1, momentum=0.9)
    assert len(opt.param_groups[0]["params"]) == 2      # the two hidden 16x16 weights
    losses = _train(model, opt, 30)                     # 1.41 -> 0.20 (fixed seeds)
    assert losses[-1] < 0.3 * losses[0], losses


def test_recipes_build_muon():
    from localopt.recipes import common
    cfg = common.load_config(optimizer="muon", model="mlp3x1024", lr=0.03, momentum=0.9,
                             nesterov=True, weight_decay=5e-4, schedule="onecycle", epochs=2)
    model = common.apply_rule(common.build_model(cfg, 10, torch.device("cpu")), cfg)
    opt = common.make_optimizer(model, cfg)
    assert isinstance(opt, Muon)
    muon, sgd = opt.param_groups
    assert [tuple(p.shape) for p in muon["params"]] == [(1024, 1024), (1024, 1024)]
    assert (muon["lr"], sgd["lr"], muon["momentum"], sgd["nesterov"], sgd["weight_decay"]) == \
        (0.03, 0.03, 0.9, True, 5e-4)
    assert not sgd["use_muon"] and muon["adjust_lr_fn"] is None

    cfg = common.load_config(optimizer="muon", model="mlp3x1024", rule="fa", lr=0.03,
                             aux_lr=0.1, schedule="onecycle", epochs=2)
    model = common.apply_rule(models.create_model("mlp3x1024", hidden=[16, 16, 16]), cfg)
    opt = common.make_optimizer(model, cfg)
    sched = common.make_scheduler(opt, cfg, steps_per_epoch=5)
    peaks = [g["max_lr"] for g in opt.param_groups]
    assert peaks == [0.03, 0.1]
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sched.step()
    with pytest.raises(common.ConfigError, match="aux-lr"):
        common.load_config(optimizer="muon", aux_lr=-1.0)


def test_recipes_muon_with_a_rule_that_learns_feedback():
    from localopt.recipes import common
    cfg = common.load_config(optimizer="muon", model="mlp3x1024", rule="kp", lr=0.02)
    model = common.apply_rule(models.create_model("mlp3x1024", hidden=[16, 16, 16]), cfg)
    opt = common.make_optimizer(model, cfg)
    assert isinstance(opt, localopt.optim.LocalOptimizer) and isinstance(opt, Muon)
    fb = [b.clone() for n, b in model.named_buffers() if n.endswith("feedback")]
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    after = [b for n, b in model.named_buffers() if n.endswith("feedback")]
    assert fb and all(not torch.equal(a, b) for a, b in zip(fb, after))
