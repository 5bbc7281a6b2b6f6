"""Small plain convnets used by the target-propagation literature on CIFAR-10."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from . import register
from .mlp import ACTIVATIONS


def _act(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"model option activation={name!r}: choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class LeNet(nn.Sequential):
    """LeNet-style: [conv5x5 (pad 2) -> act -> maxpool 3/2] per entry of ``channels``, then
    ``Linear(hidden) -> act -> Linear(num_classes)`` -- the CIFAR-10 convnet of Meulemans et al.
    (2020) and Ernoult et al. (2022): channels 32-64, hidden 512, ELU."""

    def __init__(self, num_classes: int = 10, channels: Sequence[int] = (32, 64),
                 hidden: int = 512, activation: str = "elu", image_size: int = 32) -> None:
        layers: list[nn.Module] = []
        c, s = 3, image_size
        for out in channels:
            layers += [nn.Conv2d(c, out, 5, 1, 2), _act(activation), nn.MaxPool2d(3, 2)]
            c, s = out, (s - 3) // 2 + 1
        layers += [nn.Flatten(), nn.Linear(c * s * s, hidden), _act(activation),
                   nn.Linear(hidden, num_classes)]
        super().__init__(*layers)


class SimpleVGG(nn.Sequential):
    """[conv3x3 (pad 1) -> act -> maxpool 2/2] per entry of ``channels`` (default
    128-128-256-256-512, ELU: 32x32 -> 1x1), then ``Linear(num_classes)``: the "simple VGG" of
    Ernoult et al. (2022)."""

    def __init__(self, num_classes: int = 10,
                 channels: Sequence[int] = (128, 128, 256, 256, 512),
                 activation: str = "elu", image_size: int = 32) -> None:
        layers: list[nn.Module] = []
        c, s = 3, image_size
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, 1, 1), _act(activation), nn.MaxPool2d(2, 2)]
            c, s = out, s // 2
        layers += [nn.Flatten(), nn.Linear(c * s * s, num_classes)]
        super().__init__(*layers)


@register("lenet")
def lenet(num_classes: int = 10, **kw) -> LeNet:
    return LeNet(num_classes, **kw)


@register("simple_vgg")
def simple_vgg(num_classes: int = 10, **kw) -> SimpleVGG:
    return SimpleVGG(num_classes, **kw)
