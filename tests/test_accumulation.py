"""Step semantics of every rule: loss scaling, gradient accumulation, repeated backward, and
batches whose step is skipped.

* a loss scaled by ``s`` scales every gradient by ``s`` (and ``kp``/``dkp``'s feedback
  gradient; ``bfa``/``bidfa``'s least-squares update does not depend on the loss);
* micro-batches whose losses are their share of the big batch's mean (``mean / k`` for equal
  parts) accumulate to the gradients *and the optimizer step* of the big batch, feedback
  learning included;
* ``backward(retain_graph=True)`` twice accumulates twice the gradient, as autograd does;
* a forward (or forward/backward) not followed by ``step()`` leaves the next step unchanged
  once the optimizer's ``zero_grad`` ran;
* target propagation: the loss scale ``s`` acts as ``beta * s`` with ``s`` times the
  gradients, and accumulation equals the big batch for per-sample shares of its loss.

Float64 models without BatchNorm, so the comparisons are tight.  Rules that draw random
numbers per forward (``brsf``) or per step (``wm``'s mirror noise, target propagation's
feedback noise) get the same draws in both runs: every forward starts from the same random
state (the rules' own streams, buffers ``localopt_rng``, and torch's global RNG).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import localopt
from localopt.optim import LocalOptimizer, TargetProp

pytestmark = pytest.mark.usefixtures("one_thread")
HYP = settings(max_examples=4, deadline=None)
N = 12  # big-batch size

CASES = {  # id: (rule, options)
    "bp": ("bp", {}), "fa": ("fa", {}), "usf": ("usf", {}), "brsf": ("brsf", {}),
    "frsf": ("frsf", {}), "kp": ("kp", {}), "wm": ("wm", {}), "bfa": ("bfa", {}),
    "dfa": ("dfa", {}), "dfa-modules": ("dfa", {"modules": ["1"]}),
    "dfa-modules-fa": ("dfa", {"modules": ["1"], "inside": "fa"}),
    "dfa-channel": ("dfa", {"feedback": "channel"}), "bdfa": ("bdfa", {}),
    "drtp": ("drtp", {}), "drtp-given": ("drtp", {"target": "given"}),
    "dkp": ("dkp", {}), "bidfa": ("bidfa", {}), "bidfa-center": ("bidfa", {"center": True}),
    "bidfa-keep-mean": ("bidfa", {"drop_mean": False}),
    "bidfa-channel-drop-mean": ("bidfa", {"drop_mean": True, "feedback": "channel"}),
    "bfa-keep-mean": ("bfa", {"drop_mean": False}),
}
# normalised least squares: the update does not depend on the loss
LSQ = ("bfa", "bfa-keep-mean", "bidfa", "bidfa-center", "bidfa-keep-mean",
       "bidfa-channel-drop-mean")
LEARNED = ("kp", "wm", "bfa", "bfa-keep-mean", "dkp", "bidfa", "bidfa-center",
           "bidfa-keep-mean", "bidfa-channel-drop-mean")
TP_RULES = ("dtp", "sdtp", "ao-sdtp", "drl", "l-drl")


def mlp():
    return nn.Sequential(nn.Sequential(nn.Linear(6, 10), nn.Tanh()),
                         nn.Sequential(nn.Linear(10, 10), nn.Tanh()), nn.Linear(10, 4))


def convnet():
    return nn.Sequential(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh()),
                         nn.Sequential(nn.Conv2d(4, 4, 3, stride=2), nn.Tanh()),
                         nn.Sequential(nn.Flatten(), nn.Linear(36, 4)))


def tp_mlp():
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(),
                         nn.Linear(10, 4))


def tp_convnet():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(64, 4))


MODELS = {"mlp": (mlp, (6,)), "conv": (convnet, (2, 8, 8)),
          "tp-mlp": (tp_mlp, (6,)), "tp-conv": (tp_convnet, (2, 8, 8))}


def data(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = MODELS[kind][1]
    return (torch.randn((N,) + shape, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (N,), generator=g))


def model(kind, rule, seed=0, **options):
    torch.manual_seed(seed)
    m = MODELS[kind][0]().double()
    localopt.wrap(m, rule, seed=3, **options)
    m._draws = {k: v.clone() for k, v in m.state_dict().items() if k.endswith("localopt_rng")}
    return m


def same_draws(m):
    """Every forward starts from the same random state (either RNG implementation)."""
    torch.manual_seed(1234)
    with torch.no_grad():
        for k, v in m.named_buffers():
            if k in m._draws:
                v.copy_(m._draws[k])


def local(kind, case, lr=0.05):
    rule, opts = CASES[case]
    m = model(kind, rule, **opts)
    return m, LocalOptimizer(m, torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=1e-3)


def backward(m, case, x, y, scale=1.0, **kw):
    same_draws(m)
    out = m(x)
    if case == "drtp-given":
        localopt.set_targets(m, y, scale=scale)
    (F.cross_entropy(out, y) * scale).backward(**kw)


def feedback_grads(m):
    """``name: (B.grad, least-squares normaliser)`` of every feedback buffer with a grad."""
    out = {}
    for s in localopt.sites(m):
        B = s.module._buffers.get("localopt_feedback")
        if B is not None and B.grad is not None:
            out[s.name] = (B.grad.clone(), getattr(s, "feedback_norm", None))
    return out


def param_grads(m):
    return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


def close(a, b, msg=""):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=msg)


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if sa[k].is_floating_point():
            close(sa[k], sb[k], k)


def splits(cuts):
    bounds = [0, *sorted(cuts), N]
    return list(zip(bounds[:-1], bounds[1:]))


# ----------------------------------------------------------------------------- loss scale
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("case", CASES)
@HYP
@given(s=st.floats(1e-3, 1e3))
def test_scaled_loss_scales_every_gradient(case, kind, s):
    x, y = data(kind)
    (a, _), (b, _) = local(kind, case), local(kind, case)
    backward(a, case, x, y)
    backward(b, case, x, y, scale=s)
    ga, gb = param_grads(a), param_grads(b)
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        close(gb[k], s * ga[k], k)
    fa, fb = feedback_grads(a), feedback_grads(b)
    assert fa.keys() == fb.keys()
    assert bool(fa) == (case in ("dkp",) + LSQ)
    for k, ((Ga, na), (Gb, nb)) in zip(fa, zip(fa.values(), fb.values())):
        if case in LSQ:  # reconstruction of the activity: independent of the loss
            close(Gb, Ga, k)
            close(nb, na, k)
        else:
            close(Gb, s * Ga, k)


# ----------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("case", CASES)
@HYP
@given(cuts=st.sets(st.integers(1, N - 1), min_size=1, max_size=3))
def test_micro_batches_accumulate_to_the_big_batch_step(case, kind, cuts):
    x, y = data(kind)
    (big, opt_big), (acc, opt_acc) = local(kind, case), local(kind, case)
    for _ in range(2):  # the second step also checks that the first consumed everything
        opt_big.zero_grad()
        backward(big, case, x, y)
        opt_acc.zero_grad()
        for lo, hi in splits(cuts):  # loss of each: its share of the mean (mean / k if equal)
            backward(acc, case, x[lo:hi], y[lo:hi], scale=(hi - lo) / N)
        gb, ga = param_grads(big), param_grads(acc)
        assert gb.keys() == ga.keys()
        for k in gb:
            close(ga[k], gb[k], k)
        fb, fa = feedback_grads(big), feedback_grads(acc)
        assert fb.keys() == fa.keys()
        for k in fb:
            close(fa[k][0], fb[k][0], k)
            if fb[k][1] is not None:
                close(fa[k][1], fb[k][1], k)
        for m, opt in ((big, opt_big), (acc, opt_acc)):
            same_draws(m)  # wm's mirror noise
            opt.step()
        same_state(big, acc)


def test_drtp_scale_is_recovered_where_probabilities_round_to_one_hot():
    """float32, logits so large that most rows' softmax is one-hot in float32: the signal
    still scales exactly with the loss and equals the given-target signal; a batch where
    every row's error vanished exactly carries no scale and falls back to the mean (c = N)."""
    torch.manual_seed(0)
    x = torch.randn(N, 6)

    def hidden_grad(gain, target, s, y):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
        with torch.no_grad():
            m[2].weight.mul_(gain)
        localopt.wrap(m, "drtp", seed=1, target=target)
        out = m(x)
        if target == "given":
            localopt.set_targets(m, y, scale=s)
        (s * F.cross_entropy(out, y)).backward()
        return m[0].weight.grad, torch.softmax(out.detach(), 1)

    _, p = hidden_grad(200.0, "ce", 1.0, torch.zeros(N, dtype=torch.long))
    y = p.argmax(1)
    y[-2:] = (y[-2:] + 1) % 4  # two rows wrong, the rest right and mostly saturated
    assert (p.amax(1) == 1.0).sum() >= N // 2
    for s in (1.0, 0.125, 1e3):
        torch.testing.assert_close(hidden_grad(200.0, "ce", s, y)[0],
                                   hidden_grad(200.0, "given", s, y)[0], rtol=1e-5, atol=1e-9)
    _, p = hidden_grad(1e4, "ce", 1.0, torch.zeros(N, dtype=torch.long))
    y = p.argmax(1)
    assert (p.amax(1) == 1.0).all()  # e == 0 exactly on every row
    torch.testing.assert_close(hidden_grad(1e4, "ce", 0.5, y)[0],
                               hidden_grad(1e4, "given", 1.0, y)[0], rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- retain_graph
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("case", CASES)
def test_double_backward_accumulates_twice(case, kind):
    x, y = data(kind)
    (once, _), (twice, _) = local(kind, case), local(kind, case)
    backward(once, case, x, y)
    same_draws(twice)
    out = twice(x)
    loss = F.cross_entropy(out, y)
    for keep in (True, False):
        if case == "drtp-given":
            localopt.set_targets(twice, y)
        loss.backward(retain_graph=keep)
    g1, g2 = param_grads(once), param_grads(twice)
    for k in g1:
        close(g2[k], 2 * g1[k], k)
    f1, f2 = feedback_grads(once), feedback_grads(twice)
    assert f1.keys() == f2.keys()
    for k in f1:
        close(f2[k][0], 2 * f1[k][0], k)
        if f1[k][1] is not None:  # least squares: twice the data, the same update
            close(f2[k][1], 2 * f1[k][1], k)


# ----------------------------------------------------------------------------- skipped steps
def skipped_batches(m, opt, kind, set_to_none):
    """What a careful loop does with bad batches: a NaN batch detected after the forward (no
    backward), a validation forward without no_grad, a NaN loss detected after the backward
    (step skipped) -- each followed by the optimizer's zero_grad."""
    x, y = data(kind, seed=7)
    m(torch.full_like(x, float("nan")))
    opt.zero_grad(set_to_none=set_to_none)
    m(x)
    F.cross_entropy(m(torch.full_like(x, float("nan"))), y).backward()
    F.cross_entropy(m(x), y).backward()
    opt.zero_grad(set_to_none=set_to_none)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("case", LEARNED)
def test_skipped_batches_leave_no_trace(case, set_to_none):
    x, y = data("mlp")
    runs = []
    for skip in (False, True):
        m, opt = local("mlp", case)
        for t in range(3):
            if skip and t == 1:
                skipped_batches(m, opt, "mlp", set_to_none)
            opt.zero_grad(set_to_none=set_to_none)
            F.cross_entropy(m(x), y).backward()
            opt.step()
        runs.append(m)
    for (k, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values()):
        assert torch.equal(a, b), k
    assert all(torch.isfinite(p).all() for p in runs[1].parameters())


# ----------------------------------------------------------------------------- target prop
def tp(kind, rule, beta=0.5, lr=0.05, retarget=None):
    m = model(kind, rule, beta=beta)
    return m, TargetProp(m, torch.optim.SGD, lr=lr, momentum=0.9, feedback_lr=0.02,
                         feedback_iters=2, noise=0.1, retarget=retarget)


def tp_backward(m, x, y, scale=1.0, **kw):
    same_draws(m)
    (F.cross_entropy(m(x), y) * scale).backward(**kw)


@pytest.mark.parametrize("kind", ["tp-mlp", "tp-conv"])
@pytest.mark.parametrize("rule", TP_RULES)
@HYP
@given(s=st.floats(1e-2, 1e2))
def test_target_prop_loss_scale_acts_as_beta(rule, kind, s):
    """Loss ``s L`` with ``beta``: the targets of loss ``L`` with ``beta s``, and ``s`` times
    its gradients -- so a step with ``lr`` equals that run's step with ``lr s`` (SGD)."""
    x, y = data(kind)
    (a, opt_a), (b, opt_b) = tp(kind, rule, beta=0.5), tp(kind, rule, beta=0.5 * s, lr=0.05 * s)
    for _ in range(2):
        opt_a.zero_grad()
        opt_b.zero_grad()
        tp_backward(a, x, y, scale=s)
        tp_backward(b, x, y)
        ga, gb = param_grads(a), param_grads(b)
        for k in ga:
            close(ga[k], s * gb[k], k)
        for m, opt in ((a, opt_a), (b, opt_b)):
            same_draws(m)  # the feedback noise of the step
            opt.step()
        same_state(a, b)


@pytest.mark.parametrize("kind", ["tp-mlp", "tp-conv"])
@pytest.mark.parametrize("rule,retarget", [(r, None) for r in TP_RULES] + [("dtp", True)])
@HYP
@given(cuts=st.sets(st.integers(1, N - 1), min_size=1, max_size=3))
def test_target_prop_micro_batches_accumulate_to_the_big_batch_step(rule, retarget, kind, cuts):
    """Each micro-batch's loss is its share of the big batch's mean: per-sample targets are
    the big batch's, the gradients add up, and the feedback step (and ``retarget``) see the
    samples of every backward since the last step."""
    x, y = data(kind)
    (big, opt_big), (acc, opt_acc) = tp(kind, rule, retarget=retarget), tp(kind, rule,
                                                                         retarget=retarget)
    for _ in range(2):
        opt_big.zero_grad()
        tp_backward(big, x, y)
        opt_acc.zero_grad()
        for lo, hi in splits(cuts):
            tp_backward(acc, x[lo:hi], y[lo:hi], scale=(hi - lo) / N)
        gb, ga = param_grads(big), param_grads(acc)
        for k in gb:
            close(ga[k], gb[k], k)
        for m, opt in ((big, opt_big), (acc, opt_acc)):
            same_draws(m)  # the feedback noise of the step
            opt.step()
        same_state(big, acc)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("rule", ["dtp", "l-drl"])
def test_target_prop_skipped_batches_leave_no_trace(rule, set_to_none):
    x, y = data("tp-mlp")
    runs = []
    for skip in (False, True):
        m, opt = tp("tp-mlp", rule)
        for t in range(3):
            if skip and t == 1:
                skipped_batches(m, opt, "tp-mlp", set_to_none)
            opt.zero_grad(set_to_none=set_to_none)
            tp_backward(m, x, y)
            same_draws(m)
            opt.step()
        runs.append(m)
    for (k, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values()):
        if a.is_floating_point():
            assert torch.equal(a, b), k
    assert math.isfinite(sum(float(p.sum()) for p in runs[1].parameters()))
