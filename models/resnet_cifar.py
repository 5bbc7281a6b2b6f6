"""CIFAR ResNets of He et al. (2016, section 4.2): 6n+2 layers.

3x3 conv stem with 16 channels, three stages of ``n`` BasicBlocks (16, 32, 64 channels; the
first block of stages 2 and 3 has stride 2), global average pooling, one linear layer.
Shortcut option ``"A"`` (the paper's CIFAR choice): identity, and where the shape changes a
strided subsample zero-padded to the new width (parameter-free).  Option ``"B"``: a 1x1 conv +
BN projection where the shape changes.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from . import register


class PadShortcut(nn.Module):
    """Option A: subsample by ``stride`` and zero-pad the channels up to ``out_ch``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, out_ch - in_ch

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        lo = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, lo, self.extra - lo))


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride == 1 and in_ch == out_ch:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_ch, out_ch, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, shortcut: str = "A",
                 widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"model option shortcut={shortcut!r}: choose 'A' or 'B'")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, in_ch = [], widths[0]
        for stage, w in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_ch, w, stride, shortcut))
                in_ch = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def pipeline_sequence(self) -> list[tuple[str, nn.Module]]:
        """``forward`` as a sequence of ``(name, module)`` pairs, for cutting the network into
        pipeline stages (:mod:`localopt.pipeline.split`): ``conv1, bn1, relu, layers, pool, fc``
        (``relu`` and ``pool`` are parameter-free stand-ins for the functional calls); stages
        can begin at any block, ``"layers.3"``."""
        return [("conv1", self.conv1), ("bn1", self.bn1), ("relu", nn.ReLU()),
                ("layers", self.layers), ("pool", GlobalPool()), ("fc", self.fc)]


class GlobalPool(nn.Module):
    """Global average pooling to ``(N, C)``, as in ``CifarResNet.forward``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _register_depth(depth: int) -> None:
    @register(f"resnet{depth}")
    def build(num_classes: int = 10, **kw) -> CifarResNet:
        return CifarResNet(depth, num_classes, **kw)
    build.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016), options: shortcut='A'|'B'."


for _d in (20, 32, 44, 56, 110):
    _register_depth(_d)
