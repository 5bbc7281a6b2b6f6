"""``bp``: exact backpropagation through the rule mechanism."""
from __future__ import annotations

from torch import Tensor

from ..mechanism import Site
from .base import FeedbackRule, register_rule


@register_rule
class BP(FeedbackRule):
    """Backpropagation: the feedback weight is the forward weight itself, ``B = W``.

    ``dx = delta W`` -- the gradient autograd computes.  It runs through the same hooks as
    every other rule, so ``localopt.wrap(model, "bp")`` measures what the mechanism costs.
    """

    name = "bp"
    computes_true_gradient = True

    def __init__(self) -> None:
        pass

    def feedback(self, site: Site) -> Tensor:
        return site.weight.detach()
