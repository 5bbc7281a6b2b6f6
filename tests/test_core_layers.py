"""Gradient properties of the FA-family rules on single layers (hypothesis over layer configs).

For a wrapped layer ``y = layer(x)`` receiving the error ``G = dL/dy``:
  * the forward is bitwise what the unwrapped layer computes;
  * ``dW``/``db`` equal autograd's local gradients for that error (B does not enter them);
  * ``dx`` equals the explicit computation with B: autograd through the same layer with B
    in place of W;
  * with ``B = W`` every rule reproduces autograd's gradients.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import localopt
from localopt.rng import preserved_streams

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5),
       torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}
FB_RULES = ["bp", "fa", "usf", "brsf", "frsf"]


def _grads(layer, x, G):
    """(out, dx, {name: grad}) of sum(layer(x) * G)."""
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    params = [p for p in layer.parameters()]
    gs = torch.autograd.grad(out, [x] + params, G)
    return out.detach(), gs[0], gs[1:]


def _with_weight(layer, B):
    ref = copy.deepcopy(layer)
    if localopt.is_wrapped(ref):
        localopt.unwrap(ref)
    with torch.no_grad():
        ref.weight.copy_(B)
    return ref


def _feedback_used(rule, layer):
    """The B the rule uses on its next forward (brsf: by replaying its random stream)."""
    site = localopt.sites(layer)[0]
    with preserved_streams([site]):
        return site.rule.feedback(site)


def _check_layer(layer, x, dtype, rule):
    layer = layer.to(dtype)
    x = x.to(dtype)
    plain = copy.deepcopy(layer)
    with torch.no_grad():
        G = torch.randn(plain(x).shape, dtype=torch.float64).to(dtype)
    out0, dx_bp, gp_bp = _grads(plain, x, G)

    localopt.wrap(layer, rule, seed=0)
    B = _feedback_used(rule, layer)
    out1, dx, gp = _grads(layer, x, G)
    # forward bitwise unchanged
    assert torch.equal(out0, out1)
    # parameter gradients: exact local ones for the received error
    for a, b in zip(gp, gp_bp):
        torch.testing.assert_close(a, b, **TOL[dtype])
    # input gradient: explicit computation with B
    _, dx_ref, _ = _grads(_with_weight(plain, B), x, G)
    torch.testing.assert_close(dx, dx_ref, **TOL[dtype])
    if rule == "bp":
        torch.testing.assert_close(dx, dx_bp, **TOL[dtype])
    return layer


dtypes = st.sampled_from([torch.float64, torch.float32, torch.bfloat16])


@settings(max_examples=40, deadline=None)
@given(inf=st.integers(1, 9), outf=st.integers(1, 9), lead=st.lists(st.integers(1, 3), max_size=2),
       bias=st.booleans(), dtype=dtypes, rule=st.sampled_from(FB_RULES), seed=st.integers(0, 99))
def test_linear_properties(inf, outf, lead, bias, dtype, rule, seed):
    torch.manual_seed(seed)
    layer = nn.Linear(inf, outf, bias=bias)
    x = torch.randn(*lead, inf)
    _check_layer(layer, x, dtype, rule)


@st.composite
def conv_configs(draw):
    nd = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    k = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    pad = draw(st.sampled_from(["int", "same", "valid", "tuple"]))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    if pad == "same":
        stride = (1,) * nd  # torch requires stride 1 for 'same'
        padding = "same"
    elif pad == "valid":
        padding = "valid"
    elif pad == "int":
        padding = draw(st.integers(0, 2))
    else:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(nd))
    size = tuple(draw(st.integers(5, 7)) for _ in range(nd))
    batch = draw(st.sampled_from([None, 1, 2]))
    return dict(nd=nd, cin=cin, cout=cout, k=k, stride=stride, padding=padding, dil=dil,
                groups=groups, bias=draw(st.booleans()), mode=mode, size=size, batch=batch)


CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@settings(max_examples=60, deadline=None)
@given(cfg=conv_configs(), dtype=dtypes, rule=st.sampled_from(FB_RULES), seed=st.integers(0, 99))
def test_conv_properties(cfg, dtype, rule, seed):
    torch.manual_seed(seed)
    if cfg["mode"] != "zeros" and cfg["padding"] in ("valid", 0):
        cfg["padding"] = 1
    if cfg["mode"] != "zeros" and isinstance(cfg["padding"], tuple):
        cfg["padding"] = tuple(min(p, 1) for p in cfg["padding"])  # reflect needs pad < size
    layer = CONVS[cfg["nd"]](cfg["cin"], cfg["cout"], cfg["k"], stride=cfg["stride"],
                             padding=cfg["padding"], dilation=cfg["dil"], groups=cfg["groups"],
                             bias=cfg["bias"], padding_mode=cfg["mode"])
    shape = (cfg["cin"],) + cfg["size"]
    if cfg["batch"]:
        shape = (cfg["batch"],) + shape
    _check_layer(layer, torch.randn(shape), dtype, rule)


@settings(max_examples=40, deadline=None)
@given(cfg=conv_configs(), seed=st.integers(0, 99))
def test_mode_padding_is_the_pad_the_layer_applies(cfg, seed):
    """``mode_padding`` (the input gradient's and bfa's transposed pad) is the pad of the
    layer's own forward: padding then convolving without padding gives the layer's output."""
    from localopt.mechanism import mode_padding
    torch.manual_seed(seed)
    mode = "reflect" if cfg["mode"] == "zeros" else cfg["mode"]
    padding = cfg["padding"]
    if padding in ("valid", 0) or isinstance(padding, tuple):
        padding = (1,) * cfg["nd"] if isinstance(padding, tuple) else 1
    layer = CONVS[cfg["nd"]](cfg["cin"], cfg["cout"], cfg["k"], stride=cfg["stride"],
                             padding=padding, dilation=cfg["dil"], groups=cfg["groups"],
                             bias=cfg["bias"], padding_mode=mode).double()
    x = torch.randn((2, cfg["cin"]) + cfg["size"], dtype=torch.float64)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[cfg["nd"]]
    out = conv(F.pad(x, mode_padding(layer), mode=mode), layer.weight, layer.bias,
               layer.stride, 0, layer.dilation, layer.groups)
    torch.testing.assert_close(out, layer(x))


def test_depthwise_and_asymmetric_same():
    torch.manual_seed(0)
    dw = nn.Conv2d(4, 8, 3, padding=1, groups=4)
    _check_layer(dw, torch.randn(2, 4, 6, 6), torch.float64, "fa")
    even = nn.Conv2d(3, 5, (4, 2), padding="same", dilation=(1, 3))  # asymmetric 'same'
    _check_layer(even, torch.randn(2, 3, 7, 8), torch.float64, "fa")


@pytest.mark.parametrize("rule", ["bp", "fa", "usf", "frsf"])
def test_feedback_equal_to_weight_reproduces_backprop(rule):
    """With B = W, every rule gives autograd's gradients exactly (to float64 rounding).
    (brsf redraws B every batch: covered against its explicit draw in the property tests.)"""
    torch.manual_seed(1)
    layer = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    G = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    _, dx_bp, gp_bp = _grads(layer, x, G)
    localopt.wrap(layer, rule, **({"scale": 0.25} if rule == "usf" else {}))
    with torch.no_grad():
        if rule == "usf":  # B = s * sign(W) equals W when |W| = s
            layer.weight.copy_(0.25 * torch.sign(layer.weight))
        elif rule == "fa":
            layer.localopt_feedback.copy_(layer.weight)
        elif rule == "frsf":  # B = |M| sign(W) = W when M = |W|
            layer.localopt_feedback.copy_(layer.weight.abs())
    if rule == "usf":
        _, dx_bp, gp_bp = _grads(_with_weight(layer, layer.weight), x, G)
    _, dx, gp = _grads(layer, x, G)
    torch.testing.assert_close(dx, dx_bp, rtol=1e-10, atol=1e-12)
    for a, b in zip(gp, gp_bp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fa_input_grad_differs_from_bp():
    """Guard against a mechanism that silently falls back to backprop."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 5).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    G = torch.randn(3, 5, dtype=torch.float64)
    _, dx_bp, _ = _grads(layer, x, G)
    localopt.wrap(layer, "fa", seed=0)
    _, dx, _ = _grads(layer, x, G)
    assert not torch.allclose(dx, dx_bp)
    torch.testing.assert_close(dx, G @ layer.localopt_feedback)


def _small_layer(kind):
    """A float64 Linear(6, 5) or Conv2d(3, 4, 3) and an input for it, seed 0."""
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(6, 5).double(), torch.randn(3, 6, dtype=torch.float64)
    return nn.Conv2d(3, 4, 3, padding=1).double(), torch.randn(2, 3, 5, 5, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fa_track_norm_follows_the_weight_scale(kind):
    """``track_norm``: dx = delta B ||W_t|| / ||B|| at every backward, so scaling W by c scales
    the sent signal by c (as backprop's does) while the direction of B stays fixed."""
    layer, x = _small_layer(kind)
    G = torch.randn_like(layer(x))
    plain = copy.deepcopy(layer)
    localopt.wrap(plain, "fa", seed=0)
    localopt.wrap(layer, "fa", seed=0, track_norm=True)
    B = plain.localopt_feedback
    for c in (1.0, 3.0):
        with torch.no_grad():
            layer.weight.mul_(c)
        _, dx, gp = _grads(layer, x, G)
        scaled = _with_weight(plain, B * (layer.weight.norm() / B.norm()))
        _, dx_ref, gp_ref = _grads(scaled, x, G)
        torch.testing.assert_close(dx, dx_ref, **TOL[torch.float64])
        torch.testing.assert_close(gp[0], _grads(_with_weight(plain, layer.weight), x, G)[2][0],
                                   **TOL[torch.float64])
    _, dx_plain, _ = _grads(plain, x, G)
    assert not torch.allclose(dx, dx_plain)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("opts", [{}, {"init": "weight"}, {"track_norm": True},
                                  {"match_norm": True}])
@pytest.mark.parametrize("gain", [0.25, 3.0])
def test_fa_gain_scales_the_sent_signal_only(kind, opts, gain):
    """``gain``: dx = g delta B with B as without the gain (same seed, same options), and the
    weight and bias gradients are the exact local ones, unchanged."""
    layer, x = _small_layer(kind)
    G = torch.randn_like(layer(x))
    plain = copy.deepcopy(layer)
    localopt.wrap(plain, "fa", seed=0, **opts)
    localopt.wrap(layer, "fa", seed=0, gain=gain, **opts)
    out, dx, gp = _grads(layer, x, G)
    out_ref, dx_ref, gp_ref = _grads(plain, x, G)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(dx, gain * dx_ref, **TOL[torch.float64])
    for g, r in zip(gp, gp_ref):
        torch.testing.assert_close(g, r)
    assert not torch.allclose(dx, dx_ref)


@pytest.mark.parametrize("rule", ["frsf", "brsf"])
def test_sign_symmetry_track_norm_follows_the_weight_scale(rule):
    """frSF/brSF ``track_norm``: B_t = |M| sign(W) ||W_t|| / ||B||, so the sent signal keeps the
    plain rule's direction and scales with W (the plain rule's does not: its |M| is fixed or
    drawn independently of W)."""
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    G = torch.randn_like(layer(x))
    plain, tracked = copy.deepcopy(layer), copy.deepcopy(layer)
    localopt.wrap(plain, rule, seed=0)
    localopt.wrap(tracked, rule, seed=0, track_norm=True)
    dx = {}
    for c in (1.0, 3.0):
        p, t = copy.deepcopy(plain), copy.deepcopy(tracked)   # same stream state: same |M_t|
        with torch.no_grad():
            p.weight.mul_(c)
            t.weight.mul_(c)
        dx["plain", c] = _grads(p, x, G)[1]
        dx["tracked", c] = _grads(t, x, G)[1]
    torch.testing.assert_close(dx["plain", 3.0], dx["plain", 1.0], **TOL[torch.float64])
    torch.testing.assert_close(dx["tracked", 3.0], 3.0 * dx["tracked", 1.0], **TOL[torch.float64])
    ratio = dx["tracked", 1.0].norm() / dx["plain", 1.0].norm()
    torch.testing.assert_close(dx["tracked", 1.0], ratio * dx["plain", 1.0], **TOL[torch.float64])
    assert not torch.isclose(ratio, torch.ones((), dtype=ratio.dtype), rtol=1e-2)
    if rule == "frsf":   # the ratio is ||W|| / ||B||, B = |M| sign(W)
        B = plain.localopt_feedback * torch.sign(plain.weight)
        torch.testing.assert_close(ratio, layer.weight.norm() / B.norm(), **TOL[torch.float64])


def test_fa_init_weight_starts_as_backprop_then_keeps_w0():
    """``init="weight"``: B = W_0, so the first backward is backprop's; after W moves, dx
    still goes through W_0."""
    torch.manual_seed(0)
    layer, x = nn.Conv2d(3, 4, 3, padding=1).double(), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    G = torch.randn_like(layer(x))
    _, dx_bp, _ = _grads(layer, x, G)
    w0 = layer.weight.detach().clone()
    localopt.wrap(layer, "fa", init="weight")
    _, dx, _ = _grads(layer, x, G)
    torch.testing.assert_close(dx, dx_bp, **TOL[torch.float64])
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight))
    _, dx_moved, _ = _grads(layer, x, G)
    torch.testing.assert_close(dx_moved, _grads(_with_weight(layer, w0), x, G)[1],
                               **TOL[torch.float64])
    assert not torch.allclose(dx_moved, _grads(_with_weight(layer, layer.weight), x, G)[1])


class ScaledConv(nn.Conv2d):
    """A subclass that changes the forward: weight standardisation + output scaling."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return 2.0 * F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PaddedSameConv(nn.Conv2d):
    """timm-style Conv2dSame: pads the input dynamically, convolves with padding 0."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 2, 0, 1)), self.weight, self.bias, self.stride, 0,
                        self.dilation, self.groups)


class ViewLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x).view(-1)


@pytest.mark.parametrize("make", [lambda: ScaledConv(3, 4, 3, padding=1),
                                  lambda: PaddedSameConv(3, 4, (2, 4)),
                                  lambda: ViewLinear(5, 3)])
def test_subclasses_that_override_forward(make):
    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(2, 3, 6, 6) if isinstance(layer, nn.Conv2d) else torch.randn(4, 5)
    wrapped = _check_layer(layer, x, torch.float64, "fa")
    assert localopt.summary(wrapped).rows[0]["path"] == "forward-vjp"


def test_plain_subclass_keeps_fast_path():
    layer = nn.modules.linear.NonDynamicallyQuantizableLinear(4, 3)
    localopt.wrap(layer, "fa")
    assert localopt.summary(layer).rows[0]["path"] == "fast"


class LinearReLU(nn.Linear):
    """A subclass whose last op saves its output for backward (relu)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_subclass_whose_last_op_saves_its_output():
    torch.manual_seed(0)
    _check_layer(LinearReLU(4, 6), torch.randn(3, 4), torch.float64, "fa")
