"""Whole-model behaviour of wrap/unwrap: selection, checkpoints, devices/dtypes, autocast,
in-place code, bad input, and end-to-end learning on timm and torchvision ResNets."""
import copy
import io

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import localopt
from localopt.optim import BatchManhattan
from trainloop import train_steps

RULES = ["bp", "fa", "usf", "brsf", "frsf"]


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 3))


class Residual(nn.Module):
    """In-place residual code as found in torchvision/timm."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.short = nn.Conv2d(3, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        out = self.conv1(x)
        out = F.relu(self.bn(out), inplace=True)
        out = self.conv2(out)
        out += self.short(x)
        out.relu_()
        return self.fc(out.mean((2, 3)))


def grads(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._load_state_dict_pre_hooks)
               for m in model.modules())


# ---------------------------------------------------------------------------- selection/summary
def test_summary_and_selection():
    model = Residual()
    localopt.wrap(model, "fa", exclude=["fc", nn.Conv1d])
    s = localopt.summary(model)
    assert [r["name"] for r in s.rows] == ["conv1", "conv2", "short"]
    assert s.rows[0]["feedback"] == (6, 3, 3, 3) and s.rows[0]["rule"] == "fa"
    text = str(s)
    assert "conv2" in text and "fc" not in text.split("\n", 2)[2] and "3 layer(s)" in text
    localopt.unwrap(model)
    localopt.wrap(model, "usf", include="conv*")
    assert [r["name"] for r in localopt.summary(model).rows] == ["conv1", "conv2"]


def test_excluded_layer_keeps_exact_backprop():
    torch.manual_seed(0)
    model = mlp().double()
    x, y = torch.randn(5, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    ref = grads(model, x, y)
    localopt.wrap(model, "fa", exclude="4")  # last layer on BP
    g = grads(model, x, y)
    torch.testing.assert_close(g["4.weight"], ref["4.weight"])  # top layer: true gradient
    torch.testing.assert_close(g["2.weight"], ref["2.weight"])  # its input grad is exact BP too
    assert not torch.allclose(g["0.weight"], ref["0.weight"])  # below an FA layer: differs


def test_feedback_not_in_parameters_and_follows_to():
    model = mlp()
    n_params = len(list(model.parameters()))
    localopt.wrap(model, "fa")
    assert len(list(model.parameters())) == n_params
    model.to(torch.float64)
    assert model[0].localopt_feedback.dtype == torch.float64
    x, y = torch.randn(4, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    g = grads(model, x, y)
    assert all(v.dtype == torch.float64 and torch.isfinite(v).all() for v in g.values())


# ---------------------------------------------------------------------------- unwrap
@pytest.mark.parametrize("rule", RULES)
def test_unwrap_restores_exact_backprop(rule):
    torch.manual_seed(0)
    model = Residual()
    x, y = torch.randn(3, 3, 6, 6), torch.tensor([0, 1, 3])
    keys, n_hooks = list(model.state_dict()), hook_counts(model)
    ref = grads(model, x, y)
    localopt.wrap(model, rule)
    if rule != "bp":
        assert any(not torch.equal(a, ref[n]) for n, a in grads(model, x, y).items())
    localopt.unwrap(model)
    for n, g in grads(model, x, y).items():
        assert torch.equal(g, ref[n]), n
    assert list(model.state_dict()) == keys and hook_counts(model) == n_hooks
    assert not localopt.is_wrapped(model)
    localopt.wrap(model, rule)  # can be wrapped again


# ---------------------------------------------------------------------------- checkpoints
def _train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(6, 3, 6, 6, generator=g)
        y = torch.randint(0, 4, (6,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("rule", ["fa", "frsf", "usf"])
def test_checkpoint_resume_is_bitwise(rule):
    torch.manual_seed(0)
    model = localopt.wrap(Residual(), rule, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train(model, opt, 3, seed=0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 3, seed=1)
    # resume into a fresh model wrapped with a *different* feedback draw
    fresh = localopt.wrap(Residual(), rule, seed=2)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    buf.seek(0)
    ck = torch.load(buf)
    fresh.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    _train(fresh, opt2, 3, seed=1)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n


def test_plain_checkpoint_loads_into_wrapped_and_back():
    torch.manual_seed(0)
    plain = Residual()
    wrapped = localopt.wrap(Residual(), "fa", seed=0)
    B = wrapped.conv1.localopt_feedback.clone()
    wrapped.load_state_dict(plain.state_dict())  # strict: feedback kept
    assert torch.equal(wrapped.conv1.weight, plain.conv1.weight)
    assert torch.equal(wrapped.conv1.localopt_feedback, B)
    other = Residual()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        other.load_state_dict(wrapped.state_dict())
    other.load_state_dict(localopt.strip_feedback(wrapped.state_dict()))
    assert torch.equal(other.fc.weight, plain.fc.weight)


def test_feedback_shape_mismatch_leaves_model_unchanged():
    a = localopt.wrap(Residual(), "fa")
    b = localopt.wrap(Residual(), "fa")
    sd = a.state_dict()
    sd["conv2.localopt_feedback"] = torch.zeros(6, 6, 1, 1)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(RuntimeError, match="conv2"):
        b.load_state_dict(sd)
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_stray_feedback_keys_rejected_before_loading():
    a = localopt.wrap(Residual(), "fa")
    b = localopt.wrap(Residual(), "usf")  # usf keeps no feedback state
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(RuntimeError, match="strip_feedback"):
        b.load_state_dict(a.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())


def test_deepcopy_of_wrapped_model_is_independent():
    model = localopt.wrap(Residual(), "fa")
    clone = copy.deepcopy(model)
    x, y = torch.randn(2, 3, 5, 5), torch.tensor([0, 1])
    g1, g2 = grads(model, x, y), grads(clone, x, y)
    assert all(torch.equal(g1[n], g2[n]) for n in g1)
    with torch.no_grad():
        clone.conv2.localopt_feedback.zero_()
    g3 = grads(clone, x, y)
    assert torch.equal(grads(model, x, y)["conv1.weight"], g1["conv1.weight"])
    assert not torch.equal(g3["conv1.weight"], g1["conv1.weight"])  # clone's own B is used
    localopt.unwrap(clone)
    assert localopt.is_wrapped(model)


# ---------------------------------------------------------------------------- modes & precision
def test_no_grad_and_eval_forward_unchanged():
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        ref = model(x)
    localopt.wrap(model, "fa")
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert torch.equal(model(x).detach(), ref)


def test_frozen_layer_still_passes_feedback():
    torch.manual_seed(0)
    model = mlp().double()
    model[2].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    localopt.wrap(model, "fa")
    x, y = torch.randn(4, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    g = grads(model, x, y)
    assert "2.weight" not in g and torch.isfinite(g["0.weight"]).all()


def _autocast_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    model = Residual()
    x, y = torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 3])
    plain = _autocast_grads(model, x, y)
    localopt.wrap(model, "bp")  # the mechanism under autocast == autograd under autocast
    for n, g in _autocast_grads(model, x, y).items():
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, plain[n], rtol=1e-2, atol=1e-5)
    localopt.unwrap(model)
    localopt.wrap(model, "fa")
    ref = grads(model, x, y)  # fp32 FA
    for n, g in _autocast_grads(model, x, y).items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), n
        if n == "conv1.bias":  # feeds a BatchNorm: its true gradient is 0 up to rounding
            continue
        cos = F.cosine_similarity(g.flatten(), ref[n].flatten(), dim=0)
        assert cos > 0.95, (n, cos)


def test_bf16_model():
    model = localopt.wrap(mlp(), "usf").to(torch.bfloat16)
    x, y = torch.randn(4, 8, dtype=torch.bfloat16), torch.tensor([0, 1, 2, 0])
    g = grads(model, x, y)
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v).all() for v in g.values())


def test_token_inputs_and_weight_sharing():
    """3-D inputs to Linear, and a layer called twice in one forward."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 5).double()
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    G = torch.randn(2, 7, 5, dtype=torch.float64)
    localopt.wrap(lin, "fa", seed=0)
    B = lin.localopt_feedback
    (gx,) = torch.autograd.grad(lin(lin(x)), x, G)
    torch.testing.assert_close(gx, G @ B @ B)


# ---------------------------------------------------------------------------- bad input
def _snapshot(model):
    return (list(model.state_dict()), hook_counts(model), localopt.is_wrapped(model),
            [sorted(m.__dict__) for m in model.modules()])


@pytest.mark.parametrize("call, err, match", [
    (lambda m: localopt.wrap(m, "nope"), ValueError, "unknown rule 'nope'"),
    (lambda m: localopt.wrap(m, "fa", bogus=1), TypeError, r"unknown option\(s\) \['bogus'\]"),
    (lambda m: localopt.wrap(m, "fa", init="gauss"), ValueError, "init='gauss'"),
    (lambda m: localopt.wrap(m, "usf", scale="huge"), ValueError, "scale='huge'"),
    (lambda m: localopt.wrap(m, "fa", exclude="convv*"), ValueError, "'convv\\*' matches no"),
    (lambda m: localopt.wrap(m, "fa", include=nn.Conv3d), ValueError, "found no layer"),
    (lambda m: localopt.wrap(m, "fa", unsupported="skip"), ValueError, "unsupported='skip'"),
    (lambda m: localopt.unwrap(m), ValueError, "not wrapped"),
    (lambda m: localopt.wrap(m, "bp", seed=0, include=[3]), TypeError, "selector 3"),
])
def test_bad_input_leaves_model_unchanged(call, err, match):
    model = Residual()
    before = _snapshot(model)
    with pytest.raises(err, match=match):
        call(model)
    assert _snapshot(model) == before


def test_wrap_twice_and_nested():
    model = localopt.wrap(Residual(), "fa")
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="already wrapped with rule 'fa'"):
        localopt.wrap(model, "usf")
    outer = nn.Sequential(model)
    with pytest.raises(RuntimeError, match="module '0' is already wrapped as part"):
        localopt.wrap(outer, "fa")
    assert _snapshot(model) == before


def test_uncovered_weight_layers_are_an_error_or_explicit_bp():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.up = nn.ConvTranspose1d(8, 8, 2)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            x = self.attn(x, x, x)[0]
            x = self.up(x.transpose(1, 2)).transpose(1, 2)
            return self.head(x.mean(1))

    model = Net()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"'attn' \(MultiheadAttention\).*'up' \(ConvTranspose1d\)"):
        localopt.wrap(model, "fa")
    assert _snapshot(model) == before
    localopt.wrap(model, "fa", unsupported="bp")
    s = localopt.summary(model)
    assert [r["name"] for r in s.rows] == ["head"]  # attn.out_proj is not hooked
    assert ("attn", "MultiheadAttention") in s.kept_bp and "bp (unsupported)" in str(s)
    model(torch.randn(2, 4, 8)).sum().backward()
    localopt.unwrap(model)
    localopt.wrap(model, "fa", exclude=["attn", "up"])
    assert [r["name"] for r in localopt.summary(model).rows] == ["head"]


def test_setup_failure_rolls_back(monkeypatch):
    from localopt.rules.fa import FA
    calls = []

    def failing_setup(self, site, gen):
        calls.append(site.name)
        if len(calls) == 2:
            raise RuntimeError("boom")
        site.register_buffer("feedback", torch.zeros_like(site.weight))

    monkeypatch.setattr(FA, "setup", failing_setup)
    model = Residual()
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        localopt.wrap(model, "fa")
    assert _snapshot(model) == before


def test_non_tensor_output_is_a_clear_error():
    class TupleLinear(nn.Linear):
        def forward(self, x):
            return (super().forward(x),)

    model = nn.Sequential(TupleLinear(3, 3))
    localopt.wrap(model, "fa")
    with pytest.raises(TypeError, match="module '0' .*returned tuple"):
        model(torch.randn(2, 3, requires_grad=True))


# ---------------------------------------------------------------------------- Batch Manhattan
def test_batch_manhattan_update():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5))
    opt = BatchManhattan([p], lr=0.1, momentum=0.5, weight_decay=0.01)
    p0 = p.detach().clone()
    g1 = torch.randn(5)
    p.grad = g1.clone()
    opt.step()
    d1 = torch.sign(g1) + 0.01 * p0
    torch.testing.assert_close(p.detach(), p0 - 0.1 * d1)
    p1, g2 = p.detach().clone(), torch.randn(5) * 100
    p.grad = g2.clone()
    opt.step()
    v2 = 0.5 * d1 + torch.sign(g2) + 0.01 * p1
    torch.testing.assert_close(p.detach(), p1 - 0.1 * v2)
    sd = opt.state_dict()
    opt2 = BatchManhattan([nn.Parameter(p.detach().clone())], lr=0.1, momentum=0.5)
    opt2.load_state_dict(sd)
    torch.testing.assert_close(opt2.state_dict()["state"][0]["momentum_buffer"], v2)
    with pytest.raises(ValueError, match="lr"):
        BatchManhattan([p], lr=-1)


# ---------------------------------------------------------------------------- end to end
def _fit(model, steps=20, lr=0.05, opt_cls=torch.optim.SGD, **opt_kw):
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    return train_steps(model, x, y, opt_cls(model.parameters(), lr=lr, **opt_kw), steps)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("arch", ["timm", "torchvision"])
def test_resnet18_trains_with_every_rule(rule, arch):
    torch.manual_seed(0)
    if arch == "timm":
        model = timm.create_model("resnet18", num_classes=10)
    else:
        model = torchvision.models.resnet18(num_classes=10)
    localopt.wrap(model, rule, exclude="fc", seed=0)
    losses = _fit(model, momentum=0.9)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.usefixtures("one_thread")
def test_batch_manhattan_trains_with_sign_symmetry():
    torch.manual_seed(0)
    model = localopt.wrap(timm.create_model("resnet18", num_classes=10), "usf", exclude="fc")
    losses = _fit(model, lr=1e-3, opt_cls=BatchManhattan, momentum=0.9)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_feedback_seed_does_not_repeat_the_weights_of_the_same_seed(seed):
    """``torch.manual_seed(s); build; wrap(seed=s)``: the first layer's random feedback must not
    be drawn from the same stream as its weights (it was: B parallel to W)."""
    from localopt import diagnostics
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 5))
    localopt.wrap(m, "fa", seed=seed)
    assert all(45 < a < 135 for a in diagnostics.feedback_angles(m).values())
    m2 = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 5))
    localopt.wrap(m2, "fa", seed=seed)  # same seed, same feedback
    assert torch.equal(m[0].localopt_feedback, m2[0].localopt_feedback)
