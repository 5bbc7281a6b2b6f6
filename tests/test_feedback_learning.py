"""Rules that learn their feedback (kp, wm, bfa), LocalOptimizer, and the diagnostics."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import localopt
from trainloop import train_steps
from localopt import diagnostics
from localopt.optim import KolenPollack, LocalOptimizer, WeightMirror
from localopt.rules.weight_mirror import mirror_estimate

LEARNED = ["kp", "wm", "bfa"]

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(10, 32)] + ([nn.BatchNorm1d(32)] if bn else []) + [
        nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)]
    return nn.Sequential(*layers)


def convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))


def batch(n=64, seed=1, conv=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 3, 8, 8) if conv else (n, 10), generator=g)
    return x, torch.randint(0, 4, (n,), generator=g)


def step(model, opt, x, y):
    return train_steps(model, x, y, opt, 1)[0]


def gaps(model):
    return [(s.module.weight - s.buffer("feedback")).norm().item() for s in localopt.sites(model)]


# ------------------------------------------------------------------------------ Kolen-Pollack
@settings(max_examples=12, deadline=None)
@given(lr=st.floats(0.01, 0.5), wd=st.floats(0.01, 0.5), conv=st.booleans())
def test_kp_gap_decays_by_exact_factor(lr, wd, conv):
    model = localopt.wrap(convnet() if conv else mlp(), "kp", seed=7)
    opt = KolenPollack(model, torch.optim.SGD, lr=lr, weight_decay=wd)
    x, y = batch(conv=conv)
    before = gaps(model)
    for _ in range(3):
        step(model, opt, x, y)
        after = gaps(model)
        for b, a in zip(before, after):
            assert a == pytest.approx(b * (1 - lr * wd), rel=1e-4)
        before = after


def test_kp_momentum_gap_follows_momentum_recursion():
    lr, wd, mu = 0.1, 0.2, 0.9
    model = localopt.wrap(mlp(), "kp", seed=7)
    opt = KolenPollack(model, torch.optim.SGD, lr=lr, momentum=mu, weight_decay=wd)
    x, y = batch()
    D = [(s.module.weight - s.buffer("feedback")).detach().clone() for s in localopt.sites(model)]
    V = [None] * len(D)
    for _ in range(20):
        step(model, opt, x, y)
        for i in range(len(D)):
            d = wd * D[i]
            V[i] = d if V[i] is None else mu * V[i] + d
            D[i] = D[i] - lr * V[i]
    for s, d in zip(localopt.sites(model), D):
        torch.testing.assert_close(s.module.weight - s.buffer("feedback"), d, atol=1e-5, rtol=1e-4)
    assert all(g < 0.6 * g0 for g, g0 in zip(gaps(model), gaps(localopt.wrap(mlp(), "kp", seed=7))))


def test_kp_adamw_gap_decays_by_exact_factor():
    model = localopt.wrap(mlp(), "kp", seed=7)
    opt = KolenPollack(model, torch.optim.AdamW, lr=0.01, weight_decay=0.5)
    x, y = batch()
    before = gaps(model)
    for _ in range(5):
        step(model, opt, x, y)
    for b, a in zip(before, gaps(model)):
        assert a == pytest.approx(b * (1 - 0.01 * 0.5) ** 5, rel=1e-4)


@pytest.mark.parametrize("net", [mlp, convnet])
def test_kp_started_at_w_is_backprop_forever(net):
    conv = net is convnet
    kp, bp = localopt.wrap(net(), "kp", seed=7), localopt.wrap(net(), "bp")
    for s in localopt.sites(kp):
        s.buffer("feedback").copy_(s.module.weight.detach())
    o1 = KolenPollack(kp, torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-3)
    o2 = torch.optim.SGD(bp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for i in range(8):
        x, y = batch(seed=i, conv=conv)
        assert step(kp, o1, x, y) == pytest.approx(step(bp, o2, x, y), rel=1e-6, abs=1e-7)
        for s in localopt.sites(kp):
            assert torch.equal(s.buffer("feedback"), s.module.weight.detach())
    for p, q in zip(kp.parameters(), bp.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_kp_mirror_follows_scheduler_and_param_groups():
    model = localopt.wrap(mlp(), "kp", seed=7)
    groups = [{"params": model[0].parameters(), "lr": 0.2},
              {"params": list(model[2].parameters()) + list(model[4].parameters())}]
    opt = KolenPollack(model, torch.optim.SGD, params=groups, lr=0.1, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batch()
    for k in range(3):
        g0 = gaps(model)
        lrs = [g["lr"] for g in opt.param_groups]
        step(model, opt, x, y)
        sched.step()
        factors = [lrs[0]] + [lrs[1]] * 2
        for b, a, lr in zip(g0, gaps(model), factors):
            assert a == pytest.approx(b * (1 - lr * 0.1), rel=1e-4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2 / 8, 0.1 / 8])


def test_kp_frozen_layer_keeps_its_feedback():
    model = localopt.wrap(mlp(), "kp", seed=7)
    model[2].weight.requires_grad_(False)
    opt = KolenPollack(model, torch.optim.SGD, lr=0.1, weight_decay=0.1)
    B = localopt.sites(model)[1].buffer("feedback").clone()
    step(model, opt, *batch())
    assert torch.equal(B, localopt.sites(model)[1].buffer("feedback"))


# ------------------------------------------------------------------------------ weight mirror
@pytest.mark.parametrize("layer", [nn.Linear(12, 5), nn.Conv2d(4, 6, 3, groups=2),
                                   nn.Conv1d(3, 4, 5, dilation=2)])
def test_mirror_estimate_is_unbiased(layer):
    torch.manual_seed(0)
    model = localopt.wrap(nn.Sequential(layer), "wm")
    s = localopt.sites(model)[0]
    est = sum(mirror_estimate(s, 4000) for _ in range(10)) / 10
    assert diagnostics.angle(est, layer.weight) < 4.0
    assert est.norm().item() == pytest.approx(layer.weight.norm().item(), rel=0.05)


@pytest.mark.parametrize("conv", [False, True])
def test_wm_aligns_feedback_on_fixed_layer(conv):
    model = localopt.wrap(convnet() if conv else mlp(), "wm", seed=7, lr=0.08, samples=128)
    opt = WeightMirror(model, torch.optim.SGD, lr=0.0)  # weights frozen: only mirroring
    x, y = batch(conv=conv)
    a0 = diagnostics.feedback_angles(model)
    assert min(a0.values()) > 60
    for _ in range(60):
        step(model, opt, x, y)
    a1 = diagnostics.feedback_angles(model)
    first = localopt.sites(model)[0].name  # its input needs no gradient: B unused, not mirrored
    assert a1[first] == a0[first]
    assert max(v for k, v in a1.items() if k != first) < 25, a1
    s = localopt.sites(model)[-1]  # fixed point B = W (decay = lr)
    assert s.buffer("feedback").norm().item() == pytest.approx(s.module.weight.norm().item(),
                                                                rel=0.2)


def test_wm_every_n_steps():
    model = localopt.wrap(mlp(), "wm", seed=7, every=3)
    opt = WeightMirror(model, torch.optim.SGD, lr=0.0)
    B0 = localopt.sites(model)[1].buffer("feedback").clone()
    changed = []
    for _ in range(6):
        step(model, opt, *batch())
        B = localopt.sites(model)[1].buffer("feedback")
        changed.append(not torch.equal(B, B0))
        B0 = B.clone()
    assert changed == [False, False, True, False, False, True]


@pytest.mark.parametrize("bad", [{"lr": 0}, {"samples": 0}, {"every": 1.5}, {"decay": 2},
                                 {"init": "zeros"}])
def test_wm_bad_options(bad):
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="wm"):
        localopt.wrap(model, "wm", **bad)
    assert not localopt.is_wrapped(model) and model.state_dict().keys() == before.keys()


# ------------------------------------------------------------------------------ bidirectional
def recon_loss(model, x):
    """Mean over layers of the relative reconstruction error of each layer's input."""
    errs, inputs = [], {}
    hooks = [s.module.register_forward_hook(lambda m, i, o, s=s: inputs.__setitem__(s, (i[0], o)))
             for s in localopt.sites(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for s, (xin, out) in inputs.items():
        if s is localopt.sites(model)[0]:
            continue  # the first layer's input needs no gradient: its B is not used
        m = s.module
        y = out - m.bias.view(-1, *([1] * (out.dim() - 2)))
        xh = localopt.input_grad(s, y, s.buffer("feedback"), xin.shape)
        errs.append(((xh - xin).norm() / xin.norm()).item())
    return sum(errs) / len(errs)


@pytest.mark.parametrize("conv", [False, True])
def test_bfa_lowers_reconstruction_loss(conv):
    # the plain read-out (drop_mean=False): the default's B cannot rebuild the input's share
    # along its mean direction (test_bfa_default_signal_has_no_component_along_the_mean_input)
    model = localopt.wrap(convnet() if conv else mlp(), "bfa", seed=7, lr=0.5, drop_mean=False)
    opt = LocalOptimizer(model, torch.optim.SGD, lr=0.0)
    x, y = batch(conv=conv)
    r0 = recon_loss(model, x)
    for _ in range(25):
        step(model, opt, x, y)
    r1 = recon_loss(model, x)
    # the strided conv cannot rebuild its input from a quarter of the positions: its least-
    # squares optimum is ~0.79 of the initial error here
    assert r1 < (0.85 if conv else 0.6) * r0, (r0, r1)


@pytest.mark.parametrize("conv", [False, True])
def test_bfa_drop_mean_signal_has_no_component_along_the_mean_input(conv):
    """drop_mean=True: after a step, the signal ``delta B`` of any output error has no
    component along the layer's mean input (per channel for a conv, also a grouped one), at
    every position; with the paper's plain read-out (drop_mean=False), it has."""
    x, y = batch(conv=conv)
    x = x + 2.0                                     # inputs far from zero mean
    for drop in (True, False):
        model = localopt.wrap(convnet() if conv else mlp(), "bfa", seed=7, lr=0.5,
                              drop_mean=drop)
        opt = LocalOptimizer(model, torch.optim.SGD, lr=0.0)
        inputs = {}
        hooks = [s.module.register_forward_hook(
            lambda m, i, o, s=s: inputs.__setitem__(s, (i[0].detach(), o.detach())))
            for s in localopt.sites(model)]
        step(model, opt, x, y)
        for h in hooks:
            h.remove()
        g = torch.Generator().manual_seed(3)
        for s, (xin, out) in list(inputs.items())[1:]:  # the first layer sends no signal
            u = xin.transpose(0, 1).reshape(xin.shape[1], -1).mean(1) if xin.dim() == 4 \
                else xin.mean(0)
            delta = torch.randn(out.shape, generator=g)
            dx = localopt.input_grad(s, delta, s.buffer("feedback"), xin.shape)
            along = torch.einsum("nc...,c->n...", dx, u / u.norm())
            share = along.square().sum() / dx.square().sum()
            assert share < 1e-10 if drop else share > 1e-3, (drop, s.name, share)


@pytest.mark.parametrize("conv", [False, True])
def test_bfa_default_drops_the_mean_exactly_where_the_input_is_rectified(conv):
    """drop_mean="auto" (the default): a layer whose input is non-negative (after a ReLU)
    takes the drop_mean=True feedback step, a layer with signed input (after tanh) the plain
    one, bit for bit (the weights held fixed, so each layer's B sees the same inputs in every
    run)."""
    x, y = batch(conv=conv)
    feedback = {}
    for value in ("auto", True, False):
        model = localopt.wrap(convnet() if conv else mlp(), "bfa", seed=7, lr=0.5,
                              **({} if value == "auto" else {"drop_mean": value}))
        opt = LocalOptimizer(model, torch.optim.SGD, lr=0.0)
        for _ in range(3):
            step(model, opt, x, y)
        feedback[value] = {s.name: (s.buffer("feedback").clone(), s.drops_mean)
                           for s in localopt.sites(model)}
    # mlp: Linear -> ReLU -> Linear -> Tanh -> Linear; convnet: conv -> ReLU -> conv -> BN ->
    # ReLU -> Linear (the first layer sends no signal: its B never learns)
    expected = {"2": True, "4": False} if not conv else {"2": True, "6": True}
    assert {n: d for n, (_, d) in feedback["auto"].items() if d is not None} == expected
    for name, drops in expected.items():
        B = feedback["auto"][name][0]
        assert torch.equal(B, feedback[drops][name][0]), name
        assert not torch.equal(B, feedback[not drops][name][0]), name


class _Magnitude(nn.Module):
    """``|x|``, or ``x`` itself while ``signed`` is set."""
    signed = False

    def forward(self, x):
        return x if self.signed else x.abs()


def test_bfa_default_decides_at_the_first_step_over_every_accumulated_pass():
    """drop_mean="auto": a layer decides at its first feedback step, from all the passes
    accumulated since; one negative input in any of them keeps the plain read-out.  A step
    after zero_grad(set_to_none=False) saw no input and leaves the layer undecided."""
    def model_and_opt():
        torch.manual_seed(0)
        model = localopt.wrap(nn.Sequential(nn.Linear(10, 8), _Magnitude(), nn.Linear(8, 4)),
                              "bfa", seed=7, lr=0.5)
        return model, LocalOptimizer(model, torch.optim.SGD, lr=0.0)

    x, y = batch()
    for signed, expected in (((False,), True), ((False, True), False), ((True, False), False),
                             ((False, False), True)):
        model, opt = model_and_opt()
        top = localopt.sites(model)[1]
        opt.zero_grad()
        for flag in signed:
            model[1].signed = flag
            F.cross_entropy(model(x), y).backward()
        assert top.drops_mean is None
        opt.step()
        assert top.drops_mean is expected, signed
        model[1].signed = not expected   # decided once: later inputs do not change it
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert top.drops_mean is expected, signed
    model, opt = model_and_opt()
    F.cross_entropy(model(x), y).backward()
    opt.zero_grad(set_to_none=False)
    opt.step()
    assert localopt.sites(model)[1].drops_mean is None


def test_bfa_default_equals_the_fixed_choice_on_a_rectified_or_a_signed_network():
    """A ReLU network trains with the default exactly as with drop_mean=True, a tanh network
    exactly as with drop_mean=False: weights and feedback, over several steps."""
    def final(act, **opts):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 16), act(), nn.Linear(16, 16), act(),
                              nn.Linear(16, 4))
        localopt.wrap(model, "bfa", seed=7, lr=0.5, **opts)
        opt = LocalOptimizer(model, torch.optim.SGD, lr=0.1)
        for k in range(3):
            step(model, opt, *batch(seed=k))
        return model.state_dict()

    for act, same in ((nn.ReLU, True), (nn.Tanh, False)):
        auto, fixed, other = final(act), final(act, drop_mean=same), final(act, drop_mean=not same)
        assert all(torch.equal(auto[k], fixed[k]) for k in auto), act.__name__
        assert not all(torch.equal(auto[k], other[k]) for k in auto), act.__name__


@settings(max_examples=25, deadline=None)
@given(groups=st.integers(1, 3), out_g=st.integers(1, 4), in_g=st.integers(1, 5),
       kernel=st.sampled_from([(), (1,), (3,), (2, 3)]), zero_group=st.booleans())
def test_drop_input_direction_is_the_projection_off_each_groups_direction(
        groups, out_g, in_g, kernel, zero_group):
    """drop_input_direction(B, v, groups): each group's slice of B (its outputs, its inputs)
    loses exactly its component along that group's share of v, contracted over B's input
    dimension at every kernel tap; applied twice, nothing more changes; a group whose share of
    v is zero is left as it is."""
    from localopt.rules.learned import drop_input_direction
    g = torch.Generator().manual_seed(groups * 100 + out_g * 10 + in_g)
    B = torch.randn(groups * out_g, in_g, *kernel, generator=g, dtype=torch.float64)
    v = torch.randn(groups * in_g, generator=g, dtype=torch.float64)
    if zero_group:
        v[:in_g] = 0.0
    before = B.clone()
    drop_input_direction(B, v, groups)
    for k in range(groups):
        rows, u = slice(k * out_g, (k + 1) * out_g), v[k * in_g:(k + 1) * in_g]
        Bk, B0 = B[rows].reshape(out_g, in_g, -1), before[rows].reshape(out_g, in_g, -1)
        if u.norm() == 0:
            assert torch.equal(Bk, B0)
            continue
        u = u / u.norm()
        expected = B0 - torch.einsum("ok,c->ock", torch.einsum("ock,c->ok", B0, u), u)
        torch.testing.assert_close(Bk, expected)
        assert torch.einsum("ock,c->ok", Bk, u).abs().max() < 1e-12
    once = B.clone()
    drop_input_direction(B, v, groups)
    torch.testing.assert_close(B, once)


def test_feature_sum_sums_over_every_other_dimension():
    from localopt.rules.learned import feature_sum
    x = torch.randn(4, 3, 5, 2, dtype=torch.bfloat16)
    for dim in (0, 1, -1):
        expected = x.double().movedim(dim, 0).reshape(x.shape[dim], -1).sum(1).float()
        torch.testing.assert_close(feature_sum(x, dim, torch.float32), expected)



    model = mlp()
    with pytest.raises(ValueError, match="'bfa'.*drop_mean='yes'"):
        localopt.wrap(model, "bfa", drop_mean="yes")
    with pytest.raises(TypeError, match="'bfa'.*drop_mean=1"):
        localopt.wrap(model, "bfa", drop_mean=1)
    assert not localopt.is_wrapped(model)


def test_bfa_rejects_forward_override():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2
    model = nn.Sequential(nn.Linear(3, 3), MyLinear(3, 3))
    with pytest.raises(ValueError, match="overrides forward"):
        localopt.wrap(model, "bfa")
    assert not localopt.is_wrapped(model)


# ------------------------------------------------------------------------------ LocalOptimizer
@pytest.mark.parametrize("rule", LEARNED + ["fa"])
def test_optimizer_state_round_trip(rule, tmp_path):
    opts = {"wm": {"every": 2}}.get(rule, {})

    def make():
        m = localopt.wrap(mlp(bn=True), rule, seed=7, **opts)
        return m, LocalOptimizer(m, torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-2)

    m1, o1 = make()
    for i in range(3):
        step(m1, o1, *batch(seed=i))
    torch.save({"m": m1.state_dict(), "o": o1.state_dict()}, tmp_path / "ck.pt")
    m2, o2 = make()
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    m2.load_state_dict(ck["m"])
    o2.load_state_dict(ck["o"])
    assert o2.state_dict()["localopt"]["feedback_steps"] == 3
    rng = torch.get_rng_state()
    for i in range(3, 6):
        step(m1, o1, *batch(seed=i))
    torch.set_rng_state(rng)
    for i in range(3, 6):
        step(m2, o2, *batch(seed=i))
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k


def test_optimizer_is_the_torch_optimizer():
    model = localopt.wrap(mlp(), "kp")
    opt = LocalOptimizer(model, torch.optim.Adam, lr=1e-3)
    assert isinstance(opt, torch.optim.Adam) and isinstance(opt, LocalOptimizer)
    assert type(opt).__name__ == "LocalAdam"
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    plain = torch.optim.Adam(mlp().parameters(), lr=1e-3)
    plain.load_state_dict(plain.state_dict())
    opt.load_state_dict(torch.optim.Adam(model.parameters(), lr=1e-3).state_dict())  # plain sd


def test_optimizer_errors():
    with pytest.raises(ValueError, match="wrapped"):
        LocalOptimizer(mlp(), torch.optim.SGD, lr=0.1)
    model = localopt.wrap(mlp(), "wm")
    with pytest.raises(ValueError, match="kp"):
        KolenPollack(model, torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="Optimizer subclass"):
        LocalOptimizer(model, "sgd", lr=0.1)
    sd = LocalOptimizer(model, lr=0.1).state_dict()
    kp = localopt.wrap(mlp(), "kp")
    with pytest.raises(ValueError, match="saved for rule 'wm'"):
        LocalOptimizer(kp, lr=0.1).load_state_dict(sd)


@pytest.mark.parametrize("rule", LEARNED)
def test_plain_torch_optimizer_warns_once(rule):
    model = localopt.wrap(mlp(), rule)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            step(model, opt, x, y)
    msgs = [str(m.message) for m in w]
    assert len(msgs) == 1 and "LocalOptimizer" in msgs[0] and rule in msgs[0]


@pytest.mark.parametrize("rule", LEARNED)
def test_local_optimizer_does_not_warn(rule):
    model = localopt.wrap(mlp(), rule)
    opt = LocalOptimizer(model, torch.optim.SGD, lr=0.1)
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            step(model, opt, x, y)
        model.load_state_dict(model.state_dict())
        model.double()
        model.float()
        step(model, opt, x, y)


@pytest.mark.parametrize("rule", LEARNED)
def test_end_to_end_learning(rule):
    model = localopt.wrap(mlp(), rule, seed=7)
    opt = LocalOptimizer(model, torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = batch(n=128)
    losses = train_steps(model, x, y, opt, 61)
    assert losses[-1] < 0.7 * losses[0], losses[::10]


def bn_convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8, eps=1e-12), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8, eps=1e-12), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4)).double()


@pytest.mark.parametrize("c", [4.0, 16.0])
def test_bfa_signal_does_not_shrink_as_a_batchnormed_weight_grows(c):
    """A conv followed by BatchNorm computes the same function at any scale of W, and
    backprop's input gradient is invariant to that scale; bfa's track_norm=True is too. The
    published rule (track_norm=False, the default) sends 1/c of it: its least-squares B is not
    rescaled with W (and shrinks as 1/||W|| as it learns)."""
    x, y = batch(n=16, conv=True)
    grads = {}
    for tn in (True, False):
        for scale in (1.0, c):
            model = localopt.wrap(bn_convnet(), "bfa", seed=7, track_norm=tn)
            with torch.no_grad():
                model[5].weight.mul_(scale)
            F.cross_entropy(model(x.double()), y).backward()
            grads[tn, scale] = model[0].weight.grad  # below the scaled layer
    torch.testing.assert_close(grads[True, c], grads[True, 1.0])
    torch.testing.assert_close(grads[False, c], grads[False, 1.0] / c)


def test_kp_conv_end_to_end_and_alignment():
    model = localopt.wrap(convnet(), "kp", seed=7)
    opt = KolenPollack(model, torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-2)
    x, y = batch(n=64, conv=True)
    a0 = diagnostics.feedback_angles(model)
    first = step(model, opt, x, y)
    for _ in range(40):
        last = step(model, opt, x, y)
    assert last < 0.4 * first
    a1 = diagnostics.feedback_angles(model)
    assert all(a1[k] < a0[k] - 20 for k in a0), (a0, a1)


# ------------------------------------------------------------------------------ diagnostics
def test_bp_angles_are_zero():
    model = localopt.wrap(convnet(), "bp")
    x, y = batch(conv=True)
    assert set(diagnostics.feedback_angles(model).values()) == {0.0}
    assert set(diagnostics.sign_concordance(model).values()) == {1.0}
    ua = diagnostics.update_angles(model, F.cross_entropy, x, y)
    assert len(ua) == 3 and max(ua.values()) < 1e-3


@settings(max_examples=15, deadline=None)
@given(theta=st.floats(0.5, 179.5), flips=st.integers(0, 40))
def test_constructed_feedback_angle_and_concordance(theta, flips):
    model = localopt.wrap(mlp(), "fa", seed=7)
    s = localopt.sites(model)[1]
    W = s.module.weight.detach().double()
    u = W / W.norm()
    p = torch.randn(W.shape, generator=torch.Generator().manual_seed(3), dtype=torch.double)
    p = p - (p * u).sum() * u
    p = p / p.norm()
    t = math.radians(theta)
    s.buffer("feedback").copy_(math.cos(t) * u + math.sin(t) * p)
    assert diagnostics.feedback_angles(model)[s.name] == pytest.approx(theta, abs=1e-3)
    B = W.clone().float()
    B.view(-1)[:flips] *= -1
    s.buffer("feedback").copy_(B)
    assert diagnostics.sign_concordance(model)[s.name] == pytest.approx(1 - flips / W.numel())


def test_update_angle_of_constructed_last_layer_feedback():
    """Only the second-to-last layer's input gradient depends on the last layer's B: its update
    angle is that between delta B and delta W, computed here directly."""
    model = localopt.wrap(nn.Sequential(nn.Linear(10, 6), nn.Linear(6, 4)), "fa", seed=7)
    x, y = batch()
    ua = diagnostics.update_angles(model, F.cross_entropy, x, y)
    assert ua["1"] < 1e-4  # the last layer always gets its true gradient
    with torch.no_grad():
        delta = torch.softmax(model(x), 1) - F.one_hot(y, 4).float()
        B = model[1]._buffers["localopt_feedback"]
        expected = diagnostics.angle(delta.mm(B).t().mm(x), delta.mm(model[1].weight).t().mm(x))
    assert ua["0"] == pytest.approx(expected, abs=1e-3)
    with torch.no_grad():
        B.mul_(3.0)  # 3x the feedback: 3x the first layer's step, same direction
    cmp = diagnostics.compare_to_backprop(model, F.cross_entropy, x, y)
    ratio_fa = (delta.mm(B).t().mm(x).norm() / delta.mm(model[1].weight).t().mm(x).norm()).item()
    assert cmp["update_angle"]["0"] == pytest.approx(expected, abs=1e-3)
    assert cmp["norm_ratio"]["0"] == pytest.approx(ratio_fa, rel=1e-4)
    assert cmp["norm_ratio"]["1"] == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("rule", ["kp", "bfa", "brsf"])
def test_update_angles_leave_training_state_alone(rule):
    model = localopt.wrap(nn.Sequential(mlp(bn=True), nn.Dropout(0.3)), rule, seed=7)
    opt = LocalOptimizer(model, torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = batch()
    step(model, opt, x, y)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    state = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    fb = lambda: [s.buffer("feedback") if s.has_buffer("feedback") else None  # noqa: E731
                  for s in localopt.sites(model)]
    pending = [b.grad for b in fb() if b is not None]
    rng = torch.get_rng_state()
    ua = diagnostics.update_angles(model, F.cross_entropy, x, y)
    assert len(ua) == 3 and all(0 <= v <= 180 for v in ua.values())
    assert torch.equal(rng, torch.get_rng_state())
    for (k, a), b in zip(state.items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert all(a is b.grad for a, b in zip(pending, [b for b in fb() if b is not None]))
    if rule == "bfa":
        assert all(g is not None for g in pending[1:])  # the first layer sends nothing


def test_report_is_json_ready():
    import json
    model = localopt.wrap(mlp(), "wm")
    rep = diagnostics.report(model, F.cross_entropy, *batch())
    assert set(rep) == {"feedback_angle", "sign_concordance", "update_angle", "norm_ratio"}
    assert all(r > 0 for r in rep["norm_ratio"].values())
    json.dumps(rep)


def test_update_angles_keep_user_hooks_and_remove_rule_hooks():
    """The BP pass drops localopt's hooks only: a user's output hook (part of the model's
    function) stays, so bp still gives 0 degrees; fa gives a real angle."""
    for rule, zero in (("bp", True), ("fa", False)):
        model = localopt.wrap(mlp(), rule, seed=7)
        model[2].register_forward_hook(lambda m, i, o: o * 3.0)
        ua = diagnostics.update_angles(model, F.cross_entropy, *batch())
        assert (max(ua.values()) < 1e-3) == zero, ua
        assert len(model[2]._forward_hooks) == 2  # the rule's and the user's, both restored


# ------------------------------------------------------------------------------ recipes
def test_recipes_log_and_plot_alignment(tmp_path):
    from localopt.recipes.alignment import plot_alignment
    from localopt.recipes.common import Config, apply_rule, make_optimizer, step_diagnostics
    cfg = Config(model="mlp3x1024", rule="kp", optimizer="sgd", lr=0.05, weight_decay=1e-3)
    model = apply_rule(mlp(), cfg)
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, LocalOptimizer) and isinstance(opt, torch.optim.SGD)
    x, y = batch()
    recs = []
    for i in range(3):
        step(model, opt, x, y)
        recs.append({"event": "step", "step": i + 1, **step_diagnostics(model, cfg, i + 1, x, y)})
    assert set(recs[0]["alignment"]) == {"feedback_angle", "sign_concordance", "update_angle",
                                          "norm_ratio"}
    assert list(recs[0]["alignment"]["update_angle"]) == ["0", "2", "4"]
    png = plot_alignment(recs + [{"event": "epoch", "step": 3}], tmp_path / "a.png", "t")
    assert png is not None and png.stat().st_size > 10_000
    plain = Config(model="mlp3x1024", rule="none")
    assert step_diagnostics(mlp(), plain, 1, x, y) == {}
    assert plot_alignment([{"event": "epoch", "step": 1}], tmp_path / "b.png", "t") is None
    assert not (tmp_path / "b.png").exists()
    assert type(make_optimizer(apply_rule(mlp(), Config(rule="fa")), plain)) is torch.optim.SGD


@pytest.mark.parametrize("layer,shape", [
    (nn.Linear(5, 7), (4, 3, 5)),
    (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (3, 4, 9, 9)),
    (nn.Conv1d(3, 4, 3, dilation=2, padding=2), (2, 3, 11)),
    (nn.Conv2d(3, 4, 3, padding="same", dilation=2), (2, 3, 8, 8)),
    (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 8, 8)),
    (nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (3, 8, 8)),
])
def test_bfa_reconstruction_gradient_matches_directional_derivative(layer, shape):
    from localopt.rules.bidirectional import _recon_grad
    torch.manual_seed(0)
    layer = layer.double()
    site = localopt.Site(layer, "m", None)
    x = torch.randn(shape, dtype=torch.double)
    y = layer(x).detach()
    B, D = torch.randn_like(layer.weight), torch.randn_like(layer.weight)
    loss = lambda b: 0.5 * (localopt.input_grad(site, y, b, x.shape) - x).square().sum()  # noqa
    eps = 1e-4
    fd = (loss(B + eps * D) - loss(B - eps * D)) / (2 * eps)
    g = _recon_grad(site, y, x, B)
    assert (g * D).sum().item() == pytest.approx(fd.item(), rel=1e-6)


def test_wm_warmup_mirrors_before_training():
    model = localopt.wrap(mlp(), "wm", seed=7, warmup=60, lr=0.08, samples=128)
    a0 = diagnostics.feedback_angles(model)
    WeightMirror(model, torch.optim.SGD, lr=0.1)
    a1 = diagnostics.feedback_angles(model)
    assert min(a0.values()) > 60 and max(a1.values()) < 25, (a0, a1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(batch()[0])


def test_local_optimizer_check_every_names_the_rule_step_and_tensor():
    """check_every=N: every N-th step checks gradients, weights and feedback for NaN/inf and
    raises naming the rule and the step; off (0) by default, and bad values are refused."""
    model = localopt.wrap(mlp(), "kp", seed=7)
    x, y = batch()
    with pytest.raises(ValueError, match="check_every"):
        LocalOptimizer(model, torch.optim.SGD, lr=0.1, check_every=-1)
    opt = LocalOptimizer(model, torch.optim.SGD, lr=0.1, check_every=2)
    step(model, opt, x, y)
    step(model, opt, x, y)                               # checked: all finite
    with torch.no_grad():
        model[2]._buffers["localopt_feedback"][0, 0] = float("nan")
    step(model, opt, x, y)                               # step 3: not checked
    with pytest.raises(FloatingPointError, match=r"rule 'kp' diverged: a non-finite gradient at "
                                                 r"optimizer step 4"):
        step(model, opt, x, y)                           # the NaN B reached the gradients
    model = localopt.wrap(mlp(), "kp", seed=7)
    plain = LocalOptimizer(model, torch.optim.SGD, lr=0.1)     # no check: NaN trains on
    step(model, plain, x, y)
    with torch.no_grad():
        model[2]._buffers["localopt_feedback"][0, 0] = float("nan")
    for _ in range(3):
        step(model, plain, x, y)
    assert not torch.isfinite(model[0].weight).all()


@pytest.mark.parametrize("rule", ["kp", "dkp"])
def test_mirrored_rules_warn_without_weight_decay(rule):
    """kp's W - B (dkp's random start of B) decays only under weight decay: without it the
    optimizer warns, naming the rule; with it, no warning."""
    model = localopt.wrap(mlp(), rule, seed=7)
    with pytest.warns(UserWarning, match=rf"rule '{rule}' with weight_decay=0"):
        LocalOptimizer(model, torch.optim.SGD, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LocalOptimizer(model, torch.optim.AdamW, lr=1e-3, weight_decay=0.5)
