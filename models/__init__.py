"""Model zoo for the recipes: a name -> builder registry.

``create_model("resnet20")`` builds a registered model; any timm ResNet name that is not
registered here (``"resnet50d"``, ...) is built by :func:`models.timm_adapter.timm_cifar_resnet`
with a CIFAR stem.  ``available_models()`` lists the registered names.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

__all__ = ["register", "create_model", "available_models", "init_weights"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make ``builder(num_classes=..., **options)`` available as ``name``."""
    def deco(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder
    return deco


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def init_weights(model: nn.Module, scheme: str) -> nn.Module:
    """Re-initialise every Conv/Linear weight: ``"default"`` (keep PyTorch's), ``"xavier"``
    (Glorot normal, as BioTorch's configs), ``"kaiming"`` (He normal, fan-out).  Biases -> 0."""
    if scheme == "default":
        return model
    fns = {"xavier": nn.init.xavier_normal_,
           "kaiming": lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")}
    if scheme not in fns:
        raise ValueError(f"model option init={scheme!r}: choose one of default, {', '.join(fns)}")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fns[scheme](m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def create_model(name: str, num_classes: int = 10, init: str = "default",
                 **options: Any) -> nn.Module:
    """Build model ``name`` for ``num_classes`` classes on 3x32x32 inputs.

    ``options`` go to the builder (e.g. ``shortcut="B"`` for the CIFAR ResNets,
    ``hidden=[512, 512]`` for the MLPs); ``init`` re-initialises weights (:func:`init_weights`).
    """
    if name in _REGISTRY:
        builder = _REGISTRY[name]
    else:
        from .timm_adapter import is_timm_resnet, timm_cifar_resnet
        if not is_timm_resnet(name):
            raise ValueError(f"--model {name!r} is not a registered model nor a timm ResNet; "
                             f"registered: {', '.join(available_models())}")
        builder = lambda num_classes, **kw: timm_cifar_resnet(name, num_classes, **kw)  # noqa: E731
    try:
        model = builder(num_classes=num_classes, **options)
    except TypeError as e:
        raise ValueError(f"model {name!r}: bad model option(s) {sorted(options)}: {e}") from None
    return init_weights(model, init)


# Registration on import (keep at the bottom: the modules import `register` from here).
from . import mlp, resnet_cifar, convnets, timm_adapter  # noqa: E402,F401
