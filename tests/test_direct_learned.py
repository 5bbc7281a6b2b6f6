"""Direct Kolen-Pollack (dkp): DFA whose feedback learns by the Kolen-Pollack principle."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import localopt
from trainloop import train_steps
from localopt.optim import LocalOptimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4))


def data(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g), torch.randint(0, 4, (n,), generator=g)


def step(model, opt, x, y):
    return train_steps(model, x, y, opt, 1)[0]


def test_dkp_feedback_gradient_is_e_transpose_x():
    model = localopt.wrap(net(), "dkp", seed=5)
    x, y = data()
    h = torch.tanh(model[2](torch.tanh(model[0](x))))
    out = model(x)
    F.cross_entropy(out, y).backward()
    e = (torch.softmax(out, 1) - F.one_hot(y, 4)) / len(y)
    h1 = torch.tanh(model[0](x))
    for layer, inp in ((model[2], h1), (model[4], h)):
        torch.testing.assert_close(layer._buffers["localopt_feedback"].grad,
                                   e.t().detach() @ inp.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lr,wd", [(0.1, 0.1), (0.05, 0.3)])
def test_dkp_one_hidden_layer_feedback_decays_to_the_output_weight(lr, wd):
    """With one hidden layer the direct connection *is* the output layer: B gets W's gradient,
    so B - W shrinks by (1 - lr wd) per SGD step, and DKP becomes backprop."""
    torch.manual_seed(0)
    model = localopt.wrap(nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4)), "dkp",
                          seed=5)
    opt = LocalOptimizer(model, torch.optim.SGD, lr=lr, weight_decay=wd)
    x, y = data()
    step(model, opt, x, y)  # draws B lazily at the first forward
    gap = lambda: (model[2]._buffers["localopt_feedback"] - model[2].weight).norm().item()  # noqa
    for _ in range(4):
        g0 = gap()
        step(model, opt, x, y)
        assert gap() == pytest.approx(g0 * (1 - lr * wd), rel=1e-4)


def test_dkp_learns_faster_than_dfa_and_state_round_trips():
    losses = {}
    for rule, opts in (("dfa", {}), ("dkp", {"fixed_norm": False})):  # dkp as published
        model = localopt.wrap(net(), rule, seed=5, **opts)
        opt = LocalOptimizer(model, torch.optim.SGD, lr=0.5, momentum=0.9, weight_decay=1e-3)
        x, y = data(n=128)
        first = step(model, opt, x, y)
        for _ in range(40):
            losses[rule] = step(model, opt, x, y)
    assert losses["dkp"] < 0.3 * first and losses["dkp"] < 0.5 * losses["dfa"], (first, losses)
    sd = opt.state_dict()
    assert sd["localopt"]["mirror"]["state"]  # momentum buffers of the feedback
    opt2 = LocalOptimizer(model, torch.optim.SGD, lr=0.5, momentum=0.9, weight_decay=1e-3)
    opt2.load_state_dict(sd)
    for a, b in zip(opt2._mirror.state.values(), opt._mirror.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_dkp_channel_mode_conv_gradient():
    """feedback="channel": B (K, C) is shared by all positions, so its gradient is
    e^T (x summed over positions)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    localopt.wrap(model, "dkp", feedback="channel", seed=5)
    opt = LocalOptimizer(model, torch.optim.SGD, lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    out = model(x)
    F.cross_entropy(out, y).backward()
    e = ((torch.softmax(out, 1) - F.one_hot(y, 4)) / len(y)).detach()
    h = torch.relu(model[0](x)).detach()
    B = model[2]._buffers["localopt_feedback"]
    assert B.shape == (4, 6)
    torch.testing.assert_close(B.grad, e.t() @ h.sum((2, 3)), rtol=1e-4, atol=1e-6)
    opt.step()
    assert B.grad is None and all(torch.isfinite(p).all() for p in model.parameters())


def test_dkp_default_feedback_is_the_read_out_of_the_pooled_input():
    """dkp's default B on a conv input is one K x C matrix shared by every position, so it
    learns a read-out of the pooled input (grad B = e^T x summed over positions); the dense
    K x CHW matrix that diverges on ResNet-20 is an option.  On Linear inputs the two are the
    same matrix: an MLP trains bit for bit as with feedback="dense"."""
    model = localopt.wrap(conv_net(), "dkp", seed=5)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    F.cross_entropy(model(x), y).backward()
    assert model[2]._buffers["localopt_feedback"].shape == (10, 32)
    runs = []
    for opts in ({}, {"feedback": "dense"}):
        mlp = localopt.wrap(net(), "dkp", seed=5, **opts)
        opt = LocalOptimizer(mlp, torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3)
        runs.append((train_steps(mlp, *data(), opt, 3),
                     {k: t.clone() for k, t in mlp.state_dict().items()
                      if k != "localopt_rule"}))       # (that one records the options)
    assert runs[0][0] == runs[1][0]
    assert runs[0][1].keys() == runs[1][1].keys()
    assert all(torch.equal(t, runs[1][1][k]) for k, t in runs[0][1].items())


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 10))


@pytest.mark.parametrize("feedback", ["dense", "channel"])
def test_dkp_fixed_norm_signal_is_b_at_its_drawn_norm(feedback):
    """fixed_norm=True: the signal is e B n0 / ||B|| with n0 = scale sqrt(E) (dense) or
    scale sqrt(K / P) (channel, P positions sharing e B) -- the expected norm of the drawn B --
    whatever ||B|| has become; grad B is still e^T x."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 10, (8,), generator=g)
    fixed = localopt.wrap(conv_net(), "dkp", feedback=feedback, scale=0.7, fixed_norm=True,
                          seed=5)
    plain = localopt.wrap(conv_net(), "dkp", feedback=feedback, scale=0.7, fixed_norm=False,
                          seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no LocalOptimizer: the feedback is not stepped
        F.cross_entropy(fixed(x), y).backward()  # draws B
        F.cross_entropy(plain(x), y).backward()
        B = fixed[2]._buffers["localopt_feedback"]
        n0 = 0.7 * (10 ** 0.5 if feedback == "dense" else (10 / 36) ** 0.5)
        assert B.norm().item() == pytest.approx(n0, rel=0.1)  # n0: the drawn norm's expectation
        with torch.no_grad():
            B.mul_(7.0)  # as if B had grown: the signal must not
            plain[2]._buffers["localopt_feedback"].copy_(B * n0 / B.norm())
        for m in (fixed, plain):
            m.zero_grad()
            for b in (m[2]._buffers["localopt_feedback"],):
                b.grad = None
            F.cross_entropy(m(x), y).backward()
    assert fixed[0].weight.grad.abs().sum() > 0
    torch.testing.assert_close(fixed[0].weight.grad, plain[0].weight.grad, rtol=1e-5, atol=1e-7)
    # grad B: e^T x, the same for both (it does not depend on B)
    torch.testing.assert_close(fixed[2]._buffers["localopt_feedback"].grad,
                               plain[2]._buffers["localopt_feedback"].grad, rtol=1e-5, atol=1e-8)


def test_dkp_fixed_norm_rejects_non_bool():
    with pytest.raises(TypeError, match="fixed_norm"):
        localopt.wrap(net(), "dkp", fixed_norm="yes")


def test_dkp_with_plain_optimizer_warns():
    model = localopt.wrap(net(), "dkp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            step(model, opt, *data())
    assert len(w) == 1 and "LocalOptimizer" in str(w[0].message)


def _recon_error(model, x):
    """Relative error of x_hat = z B against each hooked layer's input (all but the first)."""
    seen = {}
    hooks = [s.module.register_forward_hook(lambda m, i, o, s=s: seen.__setitem__(s, i[0]))
             for s in localopt.sites(model)]
    with torch.no_grad():
        z = model(x)
    for h in hooks:
        h.remove()
    errs = []
    for s, inp in list(seen.items())[1:]:
        x_hat = s.rule._project(s, z, s.buffer("feedback"), inp.shape)
        errs.append(((x_hat - inp).norm() / inp.norm()).item())
    return sum(errs) / len(errs)


@pytest.mark.parametrize("feedback", ["dense", "channel"])
def test_bidfa_lowers_reconstruction_error(feedback):
    if feedback == "dense":
        model = net()
        x, y = data()
    else:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(6, 4))
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    localopt.wrap(model, "bidfa", feedback=feedback, drop_mean=False, seed=5)
    opt = LocalOptimizer(model, torch.optim.SGD, lr=0.0)  # weights fixed: only B learns
    step(model, opt, x, y)
    r0 = _recon_error(model, x)
    for _ in range(30):
        step(model, opt, x, y)
    r1 = _recon_error(model, x)
    assert r1 < 0.9 * r0, (r0, r1)


def test_bidfa_learns():
    model = localopt.wrap(net(), "bidfa", seed=5)
    opt = LocalOptimizer(model, torch.optim.SGD, lr=0.5, momentum=0.9, weight_decay=1e-3)
    x, y = data(n=128)
    losses = train_steps(model, x, y, opt, 41)
    assert losses[-1] < 0.8 * losses[0], losses[::10]


def _feedback_after_one_step(model, x, y):
    """Each learned B after one LocalOptimizer step with the weights held (lr 0), and the
    inputs its layer saw."""
    seen, sites = {}, [s for s in localopt.sites(model)]
    hooks = [s.module.register_forward_pre_hook(
        lambda mod, a, s=s: seen.__setitem__(s.name, a[0].detach().clone())) for s in sites]
    opt = LocalOptimizer(model, torch.optim.SGD, lr=0.0)
    z = model(x)
    F.cross_entropy(z, y).backward()
    for h in hooks:
        h.remove()
    before = {s.name: s.buffer("feedback").clone() for s in sites}
    opt.step()
    return ({s.name: s.buffer("feedback").clone() for s in sites if before[s.name].numel()},
            before, seen, z.detach())


def test_bidfa_center_takes_the_centred_least_squares_step():
    """center=True: B <- B - lr (Z_c^T (Z_c B - X_c)) / ||Z_c||^2 with Z_c, X_c the output and
    the layer input minus their batch means (inputs far from zero mean, as after a ReLU)."""
    model = localopt.wrap(net(), "bidfa", center=True, drop_mean=False, lr=0.5, seed=5)
    x, y = data()
    after, before, seen, z = _feedback_after_one_step(model, x + 3.0, y)
    assert after
    zc = z - z.mean(0)
    for name, B in after.items():
        B0, xc = before[name], seen[name] - seen[name].mean(0)
        expected = B0 - 0.5 * zc.t() @ (zc @ B0 - xc) / zc.square().sum()
        torch.testing.assert_close(B, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("copies", [1, 8])
def test_bidfa_center_leaves_b_as_it_is_when_the_output_does_not_vary(copies):
    """One sample, or copies of one: the centred output is zero, nothing to regress on -- no
    step (not the rounding error of the centred gradient over a zero normaliser)."""
    model = localopt.wrap(net(), "bidfa", center=True, drop_mean=False, lr=1.0, seed=5)
    x, y = data(n=1)
    x, y = x.repeat(copies, 1), y.repeat(copies)
    after, before, _, _ = _feedback_after_one_step(model, x, y)
    for name, B in after.items():
        assert torch.equal(B, before[name]), name


@settings(max_examples=5, deadline=None)
@given(c=st.floats(-5.0, 5.0).filter(lambda c: abs(c) > 0.1))
def test_bidfa_center_ignores_an_offset_shared_by_every_sample(c):
    """Shift a layer's input by the same vector for every sample (the first layer's bias
    moves, the second's compensates, so the output is unchanged): with center=True every B
    takes the same step; without it, the shifted layer's B does not."""
    x, y = data()
    shift = c * torch.linspace(-1.0, 1.0, 16)
    for center in (True, False):
        runs = []
        for offset in (False, True):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(10, 16), nn.Linear(16, 16), nn.Tanh(),
                                  nn.Linear(16, 4))
            if offset:
                with torch.no_grad():
                    model[0].bias += shift
                    model[1].bias -= model[1].weight @ shift
            localopt.wrap(model, "bidfa", center=center, drop_mean=False, lr=0.5, seed=5)
            runs.append(_feedback_after_one_step(model, x, y)[0])
        same = [torch.allclose(runs[0][k], runs[1][k], rtol=1e-4, atol=1e-5) for k in runs[0]]
        assert len(same) == 2 and (all(same) if center else not same[0]), (center, same)


@pytest.mark.parametrize("center", [False, True])
def test_bidfa_drop_mean_steps_then_removes_the_mean_input_direction(center):
    """drop_mean=True: the step of the rule without it (plain or centred), then B <- B (I -
    u u^T) with u the batch's mean input direction: B @ u = 0 after the step."""
    x, y = data()
    after = {}
    for drop in (False, True):
        model = localopt.wrap(net(), "bidfa", center=center, drop_mean=drop, lr=0.5, seed=5)
        after[drop], _, seen, _ = _feedback_after_one_step(model, x + 3.0, y)
    assert after[True]
    for name, B in after[True].items():
        u = seen[name].mean(0)
        u = u / u.norm()
        torch.testing.assert_close(B, after[False][name] - torch.outer(after[False][name] @ u, u),
                                   rtol=1e-4, atol=1e-6)
        assert (B @ u).abs().max() < 1e-5 * B.norm()


@pytest.mark.parametrize("bad", [{"lr": 2.5}, {"decay": -1}, {"feedback": "sparse"},
                                 {"center": True, "feedback": "channel"}])
def test_bidfa_bad_options(bad):
    with pytest.raises(ValueError, match="bidfa"):
        localopt.wrap(net(), "bidfa", **bad)


def test_bidfa_default_feedback_never_points_along_the_mean_input():
    """The default (drop_mean=True): after a step no learned B has a component along its
    layer's mean input direction, which every sample's signal would share; with the plain
    read-out (drop_mean=False) inputs far from zero mean put a large share of B there."""
    x, y = data()
    for default in (True, False):
        model = localopt.wrap(net(), "bidfa", seed=5, **({} if default else {"drop_mean": False}))
        after, _, seen, _ = _feedback_after_one_step(model, x + 3.0, y)
        assert after
        for name, B in after.items():
            u = seen[name].mean(0)
            share = (B @ (u / u.norm())).square().sum() / B.square().sum()
            assert share < 1e-8 if default else share > 0.05, (default, name, share)


def test_bidfa_channel_drop_mean_removes_the_mean_channel_direction():
    """feedback="channel": B is (outputs, channels), and u the input's mean over the batch and
    the positions, one value per channel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 4))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 3, 8, 8, generator=g) + 2.0, torch.randint(0, 4, (16,), generator=g)
    localopt.wrap(model, "bidfa", feedback="channel", drop_mean=True, seed=5)
    after, before, seen, _ = _feedback_after_one_step(model, x, y)
    assert after
    for name, B in after.items():
        u = seen[name].mean(dim=(0, 2, 3)) if seen[name].dim() == 4 else seen[name].mean(0)
        assert B.shape[1] == u.numel() and not torch.equal(B, before[name])
        assert (B @ u).abs().max() < 1e-5 * B.norm() * u.norm(), name


def test_bidfa_drop_mean_must_be_a_bool():
    with pytest.raises(TypeError, match="bidfa.*drop_mean"):
        localopt.wrap(net(), "bidfa", drop_mean=1)


@pytest.mark.parametrize("rule", ["dkp", "bidfa"])
def test_default_signal_does_not_grow_with_the_learned_feedback(rule):
    """By default (fixed_norm=True) dkp's and bidfa's signal is e B at B's drawn norm, so a
    learned B that grows (on ResNet-20: ||B|| from 3 to 1e13 under dkp, to 180 under bidfa,
    and the runs diverged or stayed at chance) sends the same signal; the published form
    (fixed_norm=False) sends c times more for c times the norm."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 10, (8,), generator=g)
    grads = {}
    for fixed in (True, False):
        model = localopt.wrap(conv_net(), rule, seed=5, **({} if fixed else {"fixed_norm": False}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no LocalOptimizer: the feedback is not stepped
            for c in (1.0, 50.0):
                if c != 1.0:
                    with torch.no_grad():
                        model[2]._buffers["localopt_feedback"].mul_(c)
                model.zero_grad()
                F.cross_entropy(model(x), y).backward()
                grads[fixed, c] = model[0].weight.grad.clone()
    torch.testing.assert_close(grads[True, 50.0], grads[True, 1.0])
    torch.testing.assert_close(grads[False, 50.0], 50.0 * grads[False, 1.0])
