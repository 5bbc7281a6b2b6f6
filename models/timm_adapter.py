"""timm ResNets on 32x32 inputs: ``timm.create_model`` plus a CIFAR stem.

The ImageNet stem (7x7 stride-2 conv, or a deep 3-conv stem, then a stride-2 max-pool) shrinks
a 32x32 image to 8x8 before the first stage.  The CIFAR stem used by most CIFAR papers is one
3x3 stride-1 conv and no max-pool; we swap exactly those two modules of the timm model and
keep everything else (blocks, norm layers, head) as timm builds it.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from . import register

__all__ = ["timm_cifar_resnet", "is_timm_resnet"]


def is_timm_resnet(name: str) -> bool:
    import timm
    return timm.is_model(name) and name.startswith(("resnet", "seresnet", "wide_resnet",
                                                    "resnext", "ecaresnet", "skresnet"))


def timm_cifar_resnet(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, num_classes=...)`` with a 3x3 stride-1 stem and no max-pool.

    Works for timm's ``ResNet`` class (resnet18/34/50, the ``d``/``t`` deep-stem variants,
    SE-/ECA-ResNets, ResNeXts...).  ``kwargs`` go to ``timm.create_model`` (``drop_rate`` ...).
    Never downloads: ``pretrained`` is refused (a new stem would not match pretrained weights).
    """
    import timm
    from timm.models.resnet import ResNet

    if kwargs.pop("pretrained", False):
        raise ValueError(f"model {name!r}: pretrained weights do not fit the CIFAR stem")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if not isinstance(model, ResNet):
        raise ValueError(f"--model {name!r}: timm builds a {type(model).__name__}, not a ResNet; "
                         "the CIFAR stem adapter supports timm's ResNet family only")
    width = model.bn1.num_features  # the stem's output width, after conv1 (plain or deep stem)
    model.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


for _name in ("resnet18",):  # any other timm ResNet (resnet34, ...) works by name too
    register(_name)(partial(timm_cifar_resnet, _name))
