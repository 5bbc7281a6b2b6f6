"""Every rule trains under bf16 autocast the usual way: forward (and loss) inside
``torch.autocast("cpu", dtype=torch.bfloat16)``, backward and optimizer step outside."""
from __future__ import annotations

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
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 4))


def optimizer(model: nn.Module, rule: str) -> torch.optim.Optimizer:
    """The optimizer each rule trains with: TargetProp, LocalOptimizer or a plain one."""
    cls = get_rule(rule)
    if issubclass(cls, TargetPropRule):
        return TargetProp(model, torch.optim.SGD, lr=0.05, feedback_lr=0.01, noise=0.05)
    if cls.learns_feedback:
        return LocalOptimizer(model, torch.optim.SGD, lr=0.05)
    return torch.optim.SGD(model.parameters(), lr=0.05)


@pytest.mark.parametrize("rule", RULES)
def test_rule_trains_under_bf16_autocast(rule):
    torch.manual_seed(0)
    model = localopt.wrap(mlp(), rule, seed=0)
    opt = optimizer(model, rule)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g)
    feedback_dtypes = {n: b.dtype for n, b in model.named_buffers()}
    losses = []
    for _ in range(12):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = F.cross_entropy(out, y)
        assert out.dtype == torch.bfloat16  # autocast really ran the layers in bf16
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32, n
            assert torch.isfinite(p.grad).all(), n
        opt.step()
        losses.append(loss.item())
    for n, b in model.named_buffers():  # the feedback keeps its dtype and stays finite
        assert b.dtype == feedback_dtypes[n], n
        if b.is_floating_point():
            assert torch.isfinite(b).all(), n
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(losses[-3:]) / 3 < losses[0], losses


@pytest.mark.parametrize("rule", ["dtp", "l-drl"])
def test_target_prop_targets_are_float32_under_autocast(rule):
    """bf16 activations, fp32 targets: the target step beta * dL/dy is not rounded away."""
    torch.manual_seed(0)
    model = localopt.wrap(mlp(), rule, seed=0, beta=1e-3)
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    from localopt.rules.target_prop import last_inputs, last_targets
    xs, ts = last_inputs(model), last_targets(model)
    assert ts[-1].dtype == torch.float32 and xs[-1].dtype == torch.bfloat16
    e = (torch.softmax(xs[-1].float(), -1) - F.one_hot(y, 4)) / len(y)   # dL/dy
    # the step is ~1e-4 where a bf16 target could only move by a multiple of its ulp (~4e-3)
    torch.testing.assert_close(ts[-1] - xs[-1].float(), -1e-3 * e, rtol=2e-2, atol=1e-7)
    for t in ts[1:]:
        assert t is None or t.dtype == torch.float32
