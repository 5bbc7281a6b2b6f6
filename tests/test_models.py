"""The model registry: shapes, published sizes, the timm adapter, and every registered model
trained one step under every feedback-alignment-family rule."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import localopt
from localopt import models
from localopt.models.resnet_cifar import PadShortcut

pytestmark = pytest.mark.usefixtures("one_thread")

FA_FAMILY = [r for r in ("bp", "fa", "usf", "brsf", "frsf") if r in localopt.available_rules()]


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    assert out.shape == (len(x), 10)
    nn.functional.cross_entropy(out, y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", models.available_models())
def test_every_model_forward_backward_under_every_fa_rule(name):
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=10)
    # ResNets take any input size: 16x16 keeps the deep ones fast (32x32 is tested below)
    size = 16 if name.startswith("resnet") else 32
    x, y = torch.randn(2, 3, size, size), torch.arange(2)
    exact = _grads(copy.deepcopy(model), x, y)  # plain autograd
    assert set(exact) == {n for n, _ in model.named_parameters()}
    for rule in FA_FAMILY:
        wrapped = localopt.wrap(copy.deepcopy(model), rule, seed=0)
        g = _grads(wrapped, x, y)
        assert set(g) == set(exact), f"{rule}: parameters without gradient"
        assert all(torch.isfinite(t).all() for t in g.values()), rule
        differs = [n for n in g if not torch.allclose(g[n], exact[n], rtol=1e-4, atol=1e-6)]
        if rule == "bp":
            assert not differs, f"bp through hooks differs from autograd at {differs[:3]}"
        else:
            assert differs, f"{rule} left every gradient equal to backprop's"


@pytest.mark.parametrize("depth,params", [(20, 0.27e6), (32, 0.46e6), (56, 0.85e6)])
def test_cifar_resnet_sizes_match_he_et_al(depth, params):
    m = models.create_model(f"resnet{depth}")
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - params) / params < 0.02  # He et al. 2016, table 6
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) + 1 == depth  # 6n+1 conv layers + fc (option A: no shortcut convs)
    assert convs[0].kernel_size == (3, 3) and convs[0].out_channels == 16


def test_resnet_shortcut_options():
    a = models.create_model("resnet20", shortcut="A")
    b = models.create_model("resnet20", shortcut="B")
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(b) > n(a)
    assert sum(isinstance(m, PadShortcut) for m in a.modules()) == 2
    x = torch.randn(2, 16, 32, 32)
    out = PadShortcut(16, 32, 2)(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    with pytest.raises(ValueError, match="shortcut"):
        models.create_model("resnet20", shortcut="C")


def test_mlps_of_the_papers():
    for name, width in (("mlp3x1000", 1000), ("mlp3x1024", 1024)):
        m = models.create_model(name)
        linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
        assert [lin.out_features for lin in linears] == [width] * 3 + [10]
        assert linears[0].in_features == 3072
        assert sum(isinstance(mod, nn.Tanh) for mod in m.modules()) == 3
    relu = models.create_model("mlp3x1024", activation="relu", hidden=[64])
    assert sum(isinstance(mod, nn.ReLU) for mod in relu.modules()) == 1


def test_mlp_activity_normalisation():
    ln = models.create_model("mlp3x1024", hidden=[32, 16], norm="layer")
    kinds = [type(m).__name__ for m in ln]
    assert kinds == ["Flatten", "Linear", "LayerNorm", "Tanh", "Linear", "LayerNorm", "Tanh",
                     "Linear"]
    bn = models.create_model("mlp3x1024", hidden=[32], norm="batch")
    assert isinstance(bn[2], nn.BatchNorm1d) and bn(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    with pytest.raises(ValueError, match="norm='group'"):
        models.create_model("mlp3x1024", norm="group")


def test_simple_vgg_and_lenet_layouts():
    vgg = models.create_model("simple_vgg")
    assert [c.out_channels for c in vgg.modules() if isinstance(c, nn.Conv2d)] == \
        [128, 128, 256, 256, 512]
    assert vgg[-1].in_features == 512  # 32x32 pooled five times -> 1x1
    lenet = models.create_model("lenet")
    assert [c.kernel_size for c in lenet.modules() if isinstance(c, nn.Conv2d)] == [(5, 5)] * 2


def test_timm_resnets_get_a_cifar_stem():
    m = models.create_model("resnet18")
    assert isinstance(m.maxpool, nn.Identity)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert m.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 512, 4, 4)
    for name in ("resnet34", "resnet26d"):  # not registered: any timm ResNet by name
        other = models.create_model(name)
        assert isinstance(other.conv1, nn.Conv2d) and isinstance(other.maxpool, nn.Identity)
        assert other.conv1.out_channels == other.bn1.num_features
        assert other.forward_features(torch.randn(1, 3, 32, 32)).shape[-2:] == (4, 4)
    with pytest.raises(ValueError, match="--model"):
        models.create_model("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="--model 'nonesuch'"):
        models.create_model("nonesuch")


def test_init_option():
    torch.manual_seed(0)
    m = models.create_model("mlp3x1024", init="xavier")
    std = m[1].weight.std().item()
    assert abs(std - (2 / (3072 + 1024)) ** 0.5) < 1e-3
    assert not m[1].bias.any()
    with pytest.raises(ValueError, match="init"):
        models.create_model("mlp3x1024", init="nope")
    with pytest.raises(ValueError, match="bad model option"):
        models.create_model("resnet20", widht=3)
