"""Fully connected networks of the feedback-alignment literature (inputs flattened)."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from . import register

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "sigmoid": nn.Sigmoid}
#: activity normalisation of the hidden layers, between each Linear and its activation
NORMS = {"none": None, "layer": nn.LayerNorm, "batch": nn.BatchNorm1d}


class MLP(nn.Sequential):
    """``Flatten -> [Linear -> (norm) -> act] * len(hidden) -> Linear(num_classes)``.

    ``norm``: activity normalisation of each hidden layer before its activation: ``"none"``
    (default), ``"layer"`` (LayerNorm, Ba et al. 2016) or ``"batch"`` (BatchNorm1d, Ioffe &
    Szegedy 2015)."""

    def __init__(self, in_features: int = 3 * 32 * 32, hidden: Sequence[int] = (1024,) * 3,
                 num_classes: int = 10, activation: str = "tanh", norm: str = "none") -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"model option activation={activation!r}: choose one of "
                             f"{', '.join(ACTIVATIONS)}")
        if norm not in NORMS:
            raise ValueError(f"model option norm={norm!r}: choose one of {', '.join(NORMS)}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if NORMS[norm] is not None:
                layers.append(NORMS[norm](h))
            layers.append(ACTIVATIONS[activation]())
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


@register("mlp3x1000")
def mlp3x1000(num_classes: int = 10, **kw) -> MLP:
    """3 hidden layers of 1000 tanh units: the CIFAR-10 network of Nøkland (2016, DFA)."""
    kw.setdefault("hidden", (1000,) * 3)
    return MLP(num_classes=num_classes, **kw)


@register("mlp3x1024")
def mlp3x1024(num_classes: int = 10, **kw) -> MLP:
    """3 hidden layers of 1024 tanh units: the fully connected CIFAR-10 network of
    Bartunov et al. (2018)."""
    kw.setdefault("hidden", (1024,) * 3)
    return MLP(num_classes=num_classes, **kw)
