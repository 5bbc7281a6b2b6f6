"""Direct feedback rules: dfa, bdfa, drtp and module-wise (hybrid) DFA."""
import gc
import io
import weakref

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import localopt
from trainloop import train_steps
from localopt.rules.direct_base import _Send

DIRECT = ["dfa", "bdfa", "drtp"]
HYP = settings(max_examples=15, deadline=None)
pytestmark = pytest.mark.usefixtures("one_thread")


def feedback(module):
    return module._buffers["localopt_feedback"]


def set_feedback(module, B):
    module._buffers["localopt_feedback"] = B.detach().clone()


def grads(model, x, y, loss=F.cross_entropy):
    model.zero_grad(set_to_none=True)
    loss(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


# ----------------------------------------------------------------------------- equivalence to BP
@HYP
@given(d=st.integers(1, 12), h=st.integers(1, 12), k=st.integers(1, 6), n=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_one_hidden_layer_with_b_equal_w2_is_bp(d, h, k, n, seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, k))
    x, y = torch.randn(n, d), torch.randint(0, k, (n,))
    ref = grads(net, x, y)
    localopt.wrap(net, "dfa", seed=seed)
    net(x)                                         # draws B
    assert feedback(net[2]).shape == (k, h)        # B of hidden layer 1 lives on its reader
    set_feedback(net[2], net[2].weight)            # B = W2
    assert_grads_close(grads(net, x, y), ref)
    set_feedback(net[2], -net[2].weight)           # and the signal really is e @ B
    g = grads(net, x, y)
    assert not torch.allclose(g["0.weight"], ref["0.weight"]) or ref["0.weight"].abs().max() < 1e-7


@HYP
@given(widths=st.lists(st.integers(1, 8), min_size=3, max_size=6), n=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_deep_linear_with_b_products_of_downstream_weights_is_bp(widths, n, seed):
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]
    net = nn.Sequential(*layers)
    x = torch.randn(n, widths[0])
    y = torch.randn(n, widths[-1])
    ref = grads(net, x, y, F.mse_loss)
    localopt.wrap(net, "dfa", seed=seed)
    net(x)
    for i in range(1, len(layers)):                # layer i reads h_{i-1}: B = W_L ... W_i
        P = layers[-1].weight
        for j in range(len(layers) - 2, i - 1, -1):
            P = P @ layers[j].weight
        assert feedback(layers[i]).shape == P.shape
        set_feedback(layers[i], P)
    assert_grads_close(grads(net, x, y, F.mse_loss), ref)


def test_diagnostics_of_module_wise_dfa_name_every_layer_of_the_model():
    """A wrapped module has no weight of its own: the update angles and norm ratios are those
    of the model's layers, inside the modules and between them; the top module gets exact
    backprop (0 degrees, ratio 1)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Sequential(nn.Linear(6, 7), nn.Tanh()),
                        nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 5)),
                        nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    localopt.wrap(net, "dfa", modules=["0", "1", "2"], seed=0)
    rep = localopt.diagnostics.compare_to_backprop(net, F.cross_entropy, x, y)
    assert list(rep["update_angle"]) == ["0.0", "1.0", "1.2", "2.0", "2.1"]
    for k in ("2.0", "2.1"):
        assert rep["update_angle"][k] < 1e-3 and abs(rep["norm_ratio"][k] - 1) < 1e-5
    assert rep["update_angle"]["0.0"] > 1.0
    # a layer outside the wrapped modules gets the direct signal through exact backprop: it is
    # reported too, by its name in the model
    localopt.unwrap(net)
    localopt.wrap(net, "dfa", modules=["1"], seed=0)
    rep = localopt.diagnostics.compare_to_backprop(net, F.cross_entropy, x, y)
    assert list(rep["update_angle"]) == ["0.0", "1.0", "1.2", "2.0", "2.1"]
    assert rep["update_angle"]["0.0"] > 1.0 and rep["update_angle"]["2.0"] < 1e-3


def test_hybrid_module_boundary_with_b_equal_jacobian_is_bp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Sequential(nn.Linear(6, 7), nn.Tanh()),
                        nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 5)),
                        nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    ref = grads(net, x, y)
    localopt.wrap(net, "dfa", modules=["0", "1", "2"], seed=0)
    assert [s.name for s in localopt.sites(net)] == ["0", "1", "2"]
    net(x)
    assert feedback(net[0]).numel() == 0           # its input needs no gradient: no B
    # the last module is linear: its input gradient under BP is e @ (W_b W_a)
    set_feedback(net[2], net[2][1].weight @ net[2][0].weight)
    g = grads(net, x, y)
    for k in ("1.0.weight", "1.2.weight", "2.0.weight", "2.1.bias"):  # exact BP inside + above
        torch.testing.assert_close(g[k], ref[k], atol=1e-6, rtol=1e-5)
    # module 0 receives e @ B_1 (random), not BP's signal
    assert not torch.allclose(g["0.0.weight"], ref["0.0.weight"], atol=1e-4)


def test_hybrid_inside_fa():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Sequential(nn.Linear(6, 7), nn.Tanh()),  # noqa: E731
                                 nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 5),
                                               nn.Tanh(), nn.Linear(5, 3)))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    localopt.wrap(a, "dfa", modules=["0", "1"], seed=0)                  # BP inside
    localopt.wrap(b, "dfa", modules=["0", "1"], inside="fa", seed=0)     # FA inside
    keys = sorted(k for k in b.state_dict() if "inside" in k)
    assert keys == ["0.localopt_inside_0", "1.localopt_inside_0", "1.localopt_inside_2",
                    "1.localopt_inside_4"]
    ga, gb = grads(a, x, y), grads(b, x, y)
    torch.testing.assert_close(gb["1.4.weight"], ga["1.4.weight"])     # top layer: delta = e
    assert not torch.allclose(gb["1.0.weight"], ga["1.0.weight"])      # below it: delta B_in
    for i in (0, 2, 4):                                                 # B_in = W: BP inside
        b[1]._buffers[f"localopt_inside_{i}"] = b[1][i].weight.detach().clone()
    set_feedback(b[1], feedback(a[1]))                                  # same direct B
    assert_grads_close(grads(b, x, y), ga)
    c = localopt.wrap(make(), "dfa", modules=["0", "1"], inside="fa", seed=1)
    c.load_state_dict(b.state_dict())                                   # strict round trip
    assert torch.equal(c[1]._buffers["localopt_inside_2"], b[1][2].weight)
    localopt.unwrap(b)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in b.modules()) == 0
    assert not [k for k in b.state_dict() if "localopt" in k]


# ----------------------------------------------------------------------------- signal and shapes
class Probe:
    """Records the gradient arriving at a module's input (registered before wrapping)."""

    def __init__(self, module):
        self.grad = None
        module.register_forward_pre_hook(self._hook, prepend=True)

    def _hook(self, module, args):
        if args[0].requires_grad:
            args[0].register_hook(self._store)

    def _store(self, g):
        self.grad = g


def capture_e(model):
    """The output error e (register after wrapping, so the hook sees the captured output)."""
    box = {}

    def hook(module, args, out):
        out.register_hook(lambda g: box.__setitem__("e", g))
    model.register_forward_hook(hook)
    return box


CONVNET = lambda groups: nn.Sequential(  # noqa: E731
    nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
    nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=groups), nn.BatchNorm2d(8), nn.ReLU(),
    nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


@pytest.mark.parametrize("mode", ["dense", "channel"])
@pytest.mark.parametrize("groups", [1, 2, 8])
def test_conv_signal_is_projection_of_e(mode, groups):
    torch.manual_seed(0)
    net = CONVNET(groups)
    probe = Probe(net[2])
    x = torch.randn(3, 4, 10, 10)
    localopt.wrap(net, "dfa", feedback=mode, seed=1)
    box = capture_e(net)
    F.cross_entropy(net(x), torch.tensor([0, 1, 2])).backward()
    B, e = feedback(net[2]), box["e"]
    if mode == "dense":
        assert B.shape == (5, 8 * 10 * 10)
        want = (e @ B).view(3, 8, 10, 10)
    else:
        assert B.shape == (5, 8)                  # K x C: independent of the resolution
        want = (e @ B)[:, :, None, None].expand(3, 8, 10, 10)
    torch.testing.assert_close(probe.grad, want)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("mode", ["dense", "channel"])
def test_token_inputs(per_token, mode):
    torch.manual_seed(0)

    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):                     # x: (N, T, 6)
            h = torch.tanh(self.b(torch.tanh(self.a(x))))
            return self.head(h if per_token else h.mean(1))

    net = Tok()
    probe = Probe(net.b)
    x = torch.randn(2, 5, 6)
    y = torch.randint(0, 4, (2, 5) if per_token else (2,))
    localopt.wrap(net, "dfa", feedback=mode, seed=0)
    box = capture_e(net)                           # after wrap: sees the captured output
    out = net(x)
    F.cross_entropy(out.flatten(0, -2), y.flatten()).backward()
    B, e = feedback(net.b), box["e"]
    if mode == "dense":
        want = (e.flatten(1) @ B).view(2, 5, 8)
        assert B.shape == (e[0].numel(), 5 * 8)
    elif per_token:
        want = e @ B                               # each token gets its own e_t @ B
        assert B.shape == (4, 8)
    else:
        want = (e @ B)[:, None, :].expand(2, 5, 8)
    torch.testing.assert_close(probe.grad, want)


def test_channel_mode_mismatched_positions_is_an_error():
    class Crop(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):                     # reads 5 tokens, outputs 3
            return self.head(torch.tanh(self.a(x))[:, :3])

    x = torch.randn(2, 5, 3, requires_grad=True)
    net = localopt.wrap(Crop(), "dfa", feedback="channel", seed=0)
    with pytest.raises(RuntimeError, match=r"input positions \(5,\).*positions \(3,\)"):
        net(x).sum().backward()
    localopt.unwrap(net)
    localopt.wrap(net, "dfa", feedback="dense", seed=0)  # dense handles any shapes
    net(x).sum().backward()
    assert feedback(net.a).shape == (3 * 2, 5 * 3)


@pytest.mark.parametrize("rule", DIRECT)
def test_forward_unchanged_and_unwrap(rule):
    torch.manual_seed(0)
    net = CONVNET(2)
    x = torch.randn(2, 4, 8, 8)
    ref = net(x)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    localopt.wrap(net, rule, seed=0)
    assert torch.equal(net(x), ref)
    net(x).sum().backward() if rule != "drtp" else None
    localopt.unwrap(net)
    assert net.state_dict().keys() == sd.keys()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules()) == 0
    bp = grads(net, x, torch.tensor([0, 1]))
    net2 = CONVNET(2)
    net2.load_state_dict(net.state_dict())
    assert_grads_close(grads(net2, x, torch.tensor([0, 1])), bp)


# ----------------------------------------------------------------------------- capture lifetime
def test_signal_is_dropped_after_backward_and_per_forward():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    localopt.wrap(net, "dfa", seed=0)
    x = torch.randn(4, 4, requires_grad=True)
    out = net(x)
    F.cross_entropy(out, torch.tensor([0, 1, 2, 0])).backward()
    assert net._localopt.rule._state.routed is None   # the forward's routed inputs: in the graph
    send = weakref.ref(out.grad_fn.send)
    assert type(send()) is _Send
    del out
    gc.collect()
    assert send() is None                          # freed with the graph
    # two forwards, one backward: each forward uses its own output error
    a, b = net(x[:2]), net(x[2:])
    g_sum = torch.autograd.grad(a.sum() + 2 * b.sum(), net[0].weight)[0]
    g_a = torch.autograd.grad(net(x[:2]).sum(), net[0].weight)[0]
    g_b = torch.autograd.grad(2 * net(x[2:]).sum(), net[0].weight)[0]
    torch.testing.assert_close(g_sum, g_a + g_b)


# ----------------------------------------------------------------------------- drtp
def test_drtp_ce_recovers_the_target_and_given_targets_match():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(),  # noqa
                                 nn.Linear(7, 4))
    x, y = torch.randn(6, 5), torch.randint(0, 4, (6,))
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    localopt.wrap(a, "drtp", seed=3)
    localopt.wrap(b, "drtp", seed=3, target="given")
    ga = grads(a, x, y)
    localopt.set_targets(b, y)
    gb = grads(b, x, y)
    assert_grads_close(ga, gb)
    # the signal is the target part of e: independent of the output (here: of the head)
    probe = Probe(a[4])
    with torch.no_grad():
        a[4].weight.mul_(3.0)
    F.cross_entropy(a(x), y).backward()
    B = feedback(a[4])
    centred = F.one_hot(y, 4).float() - 0.25              # the default: y* - 1/K
    torch.testing.assert_close(probe.grad, -centred @ B / 6)


@HYP
@given(k=st.integers(2, 12), n=st.integers(1, 9), seed=st.integers(0, 2**16),
       scale=st.floats(1e-3, 1e3))
def test_drtp_target_signal_is_the_centred_target_times_the_scale(k, n, seed, scale):
    """For any labels: centred, each row of the signal sums to zero over the classes (it has
    no part common to every class) and differs from the paper's -scale y* by the constant
    scale/K; uncentred, it is the paper's -scale y*."""
    y = F.one_hot(torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed)),
                  k).double()
    centred = localopt.rules.direct.DRTP(center=True).target_signal(y, scale)
    paper = localopt.rules.direct.DRTP(center=False).target_signal(y, scale)
    torch.testing.assert_close(paper, -scale * y)
    torch.testing.assert_close(centred.sum(-1), torch.zeros(n, dtype=torch.float64),
                               atol=1e-9 * scale, rtol=0)
    torch.testing.assert_close(centred - paper, torch.full_like(y, scale / k))


@pytest.mark.parametrize("target", ["ce", "given"])
def test_drtp_default_signal_has_no_class_independent_part(target):
    """center=True (default): a batch holding every class once sends a signal whose batch sum
    is zero, whatever B; the paper's -y*/c (center=False) sends -(sum_k B_k)/c in sum, the same
    push on every hidden unit at every step, which never fades."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 5), torch.arange(4)
    sums = {}
    for center in (True, False):
        net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 7), nn.ReLU(),
                            nn.Linear(7, 4))
        localopt.wrap(net, "drtp", seed=3, target=target, center=center)
        probe = Probe(net[4])
        out = net(x)
        if target == "given":
            localopt.set_targets(net, y)
        F.cross_entropy(out, y).backward()
        sums[center] = probe.grad.sum(0)
        B = feedback(net[4])
    assert sums[True].abs().max() < 1e-6, sums[True]
    torch.testing.assert_close(sums[False], -B.sum(0) / 4)


@pytest.mark.parametrize("target", ["ce", "given"])
def test_drtp_gate_sends_the_target_component_of_the_error(target):
    """gate=True: each row sends e_t y* B = -(1 - p_t) y* B / c, the published signal times
    1 - p_t: it fades as a sample is learned, under any loss scale."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 4))
    x, y = torch.randn(6, 5), torch.randint(0, 4, (6,))
    localopt.wrap(net, "drtp", seed=3, target=target, gate=True, center=False)
    probe = Probe(net[4])
    out = net(x)
    if target == "given":
        localopt.set_targets(net, y, scale=0.5)
    (0.5 * F.cross_entropy(out, y)).backward()
    p = torch.softmax(out.detach(), 1)
    gate = 1 - p[torch.arange(6), y]
    want = -(gate[:, None] * F.one_hot(y, 4).float()) @ feedback(net[4]) * 0.5 / 6
    torch.testing.assert_close(probe.grad, want)


def test_drtp_errors():
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    x = torch.randn(3, 5)
    localopt.wrap(net, "drtp", seed=0)
    with pytest.raises(RuntimeError, match="not hard-label cross-entropy"):
        F.mse_loss(net(x), torch.randn(3, 4)).backward()
    with pytest.raises(RuntimeError, match="not hard-label cross-entropy"):
        F.cross_entropy(net(x), torch.tensor([0, 1, 2]), label_smoothing=0.2).backward()
    net2 = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    localopt.wrap(net2, "drtp", target="given", seed=0)
    with pytest.raises(RuntimeError, match="set_targets"):
        net2(x).sum().backward()
    localopt.set_targets(net2, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="do not match"):
        net2(x).sum().backward()
    with pytest.raises(ValueError, match="not wrapped with rule 'drtp'"):
        localopt.set_targets(localopt.wrap(nn.Linear(2, 2), "dfa"), torch.tensor([0]))


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_of_lazy_feedback():
    torch.manual_seed(0)
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 2])
    a = localopt.wrap(CONVNET(1), "dfa", seed=5)
    sd_unrun = a.state_dict()                      # before any forward: empty placeholders
    assert sd_unrun["2.localopt_feedback"].numel() == 0
    fresh = localopt.wrap(CONVNET(1), "dfa", seed=9)
    fresh.load_state_dict(sd_unrun)                # unrun -> unrun
    ga = grads(a, x, y)                            # draws B
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = localopt.wrap(CONVNET(1), "dfa", seed=7)   # other seed, not yet drawn
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert torch.equal(feedback(b[2]), feedback(a[2]))
    assert_grads_close(grads(b, x, y), ga)
    before = feedback(b[2]).clone()
    b.load_state_dict(sd_unrun)                    # an undrawn checkpoint keeps the feedback
    assert torch.equal(feedback(b[2]), before)
    c = localopt.wrap(CONVNET(1), "dfa", seed=5)   # the same seed draws the same B
    grads(c, x, y)
    assert torch.equal(feedback(c[2]), feedback(a[2]))
    d = localopt.wrap(CONVNET(1), "dfa", feedback="channel", seed=5)
    grads(d, x, y)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        d.load_state_dict(a.state_dict())
    plain = CONVNET(1)
    plain.load_state_dict(localopt.strip_feedback(a.state_dict()))
    e = localopt.wrap(CONVNET(1).double(), "dfa", seed=5)   # B takes the layers' dtype
    grads(e, x.double(), y)
    assert feedback(e[2]).dtype == torch.float64


# ----------------------------------------------------------------------------- real models
def _train(model, x, y, steps, opt):
    return train_steps(model, x, y, opt, steps)


TRAIN_CASES = [("dfa", {}), ("bdfa", {}), ("drtp", {}), ("dfa", {"hybrid": True})]


@pytest.mark.parametrize("rule,opts", TRAIN_CASES, ids=["dfa", "bdfa", "drtp", "hybrid"])
@pytest.mark.parametrize("lib", ["timm", "torchvision"])
def test_real_models_learn(lib, rule, opts):
    torch.manual_seed(0)
    if lib == "timm":
        model = timm.create_model("test_resnet", num_classes=5)
        stages = ["layer1", "layer2", "layer3", "layer4"]
    else:   # grouped/depthwise convs, channel split and shuffle
        model = torchvision.models.shufflenet_v2_x0_5(num_classes=5)
        stages = ["stage2", "stage3", "stage4"]
    size = 32 if lib == "timm" else 16
    x, y = torch.randn(8, 3, size, size), torch.arange(8) % 4
    kw = {"modules": stages} if opts.get("hybrid") else {}
    localopt.wrap(model, rule, seed=0, **kw)
    # bounds checked over feedback seeds 0-3 (torchvision, 30 steps: ratios 0.37-0.79)
    if lib == "timm":
        opt, bound, steps = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9), 0.6, 20
    else:
        opt, bound, steps = torch.optim.Adam(model.parameters(), lr=1e-3), 0.85, 30
    losses = _train(model, x, y, steps, opt)
    assert losses[-1] < bound * losses[0], losses


def test_resnet50_224_1000_classes_bounded_memory():
    torch.manual_seed(0)
    model = timm.create_model("resnet50", num_classes=1000)
    localopt.wrap(model, "dfa", feedback="channel", seed=0)
    x = torch.randn(1, 3, 224, 224)
    F.cross_entropy(model(x), torch.tensor([3])).backward()
    n = sum(feedback(s.module).numel() for s in localopt.sites(model))
    assert n == 1000 * 24576                       # K x C per layer: 94 MB in float32
    assert model.fc.weight.grad is not None and model.conv1.weight.grad is not None
    localopt.unwrap(model)
    localopt.wrap(model, "dfa", feedback="dense", seed=0)  # GBs even at 112x112: refused
    with pytest.raises(RuntimeError, match="max_feedback_mb"):
        model(torch.randn(1, 3, 112, 112))
    assert all(feedback(s.module).numel() == 0 for s in localopt.sites(model))


# ----------------------------------------------------------------------------- bad input
class TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return {"logits": self.b(h), "feat": h}


def snapshot(model):
    return (sorted(model.state_dict()), sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
                                            for m in model.modules()))


@pytest.mark.parametrize("opts,err,match", [
    ({"feedback": "full"}, ValueError, "feedback='full'"),
    ({"init": "xavier"}, ValueError, "init='xavier'"),
    ({"scale": -1.0}, ValueError, "scale"),
    ({"output": 1.5}, TypeError, "output"),
    ({"channel_dim": 2}, ValueError, "channel_dim"),
    ({"modules": ["1", "nope"]}, ValueError, "'nope' matches no module"),
    ({"modules": ["nope"]}, ValueError, "found no layer to wrap"),
    ({"modules": ["*"]}, ValueError, "modules inside it"),
    ({"modules": [3]}, TypeError, "modules entry 3"),
    ({"target": "ce"}, TypeError, "unknown option"),
    ({"inside": "fa"}, ValueError, "needs modules"),
    ({"inside": "kp", "modules": ["1"]}, ValueError, "inside='kp'"),
])
def test_bad_options_leave_model_unchanged(opts, err, match):
    net = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Tanh(), nn.Linear(4, 2)))
    before = snapshot(net)
    with pytest.raises(err, match=match):
        localopt.wrap(net, "dfa", **opts)
    assert snapshot(net) == before


def test_outputs_must_be_named_and_loss_must_use_them():
    x = torch.randn(2, 3)
    net = localopt.wrap(TupleNet(), "dfa")
    with pytest.raises(TypeError, match="output=<index or key>"):
        net(x)
    localopt.unwrap(net)
    localopt.wrap(net, "dfa", output="nope")
    with pytest.raises(TypeError, match="output='nope'"):
        net(x)
    localopt.unwrap(net)
    localopt.wrap(net, "dfa", output="logits", seed=0)
    out = net(x)
    assert isinstance(out, dict) and set(out) == {"logits", "feat"}
    F.cross_entropy(out["logits"], torch.tensor([0, 1])).backward()
    assert net.a.weight.grad is not None
    with pytest.raises(RuntimeError, match="before the model output error was captured"):
        net(x.requires_grad_())["feat"].sum().backward()  # loss not from the named output
    seq = localopt.wrap(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), "dfa")
    h = seq[0](x.requires_grad_())                 # a layer run outside the model's forward
    with pytest.raises(RuntimeError, match="inside that forward"):
        seq[2](torch.tanh(seq[1](h))).sum().backward()
    rule = localopt.rules.get_rule("dfa")()
    localopt.wrap(nn.Linear(2, 2), rule)
    with pytest.raises(RuntimeError, match="already installed on another model"):
        localopt.wrap(nn.Linear(2, 2), rule)


@pytest.mark.parametrize("rule", ["dfa", "drtp", "dkp", "bidfa"])
def test_a_scale_that_blows_up_the_signal_is_an_error_at_the_first_forward(rule):
    """scale > 100 would send every layer 100x the output error's norm: the first forward
    (where the feedback is drawn) refuses, naming the option, and draws nothing."""
    torch.manual_seed(0)
    net = localopt.wrap(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)), rule,
                        seed=0, scale=1e3)
    with pytest.raises(ValueError, match=rf"rule '{rule}': option scale=1000 "):
        net(torch.randn(3, 5))
    assert net[2]._buffers["localopt_feedback"].numel() == 0
    localopt.wrap(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)), rule, seed=0,
                  scale=100.0)(torch.randn(3, 5))           # the limit itself is allowed
