"""``kp``: Kolen-Pollack learning of the feedback weights (Akrout et al. 2019)."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ..mechanism import Site
from .base import register_rule
from .fa import FA
from .learned import LearnsFeedback


@register_rule
class KP(LearnsFeedback, FA):
    """Kolen-Pollack (Kolen & Pollack 1994; Akrout, Wilson, Humphreys, Lillicrap & Tweed,
    "Deep learning without weight transport", NeurIPS 2019, eqs. 16-17).

    The backward pass is feedback alignment with a learned ``B`` (stored with W's shape, so
    the paper's ``B -> W^T`` reads ``B -> W`` here)::

        dx = delta B,        dW = delta^T x   (exact local weight gradient)

    and ``B`` receives *the same update as W*: the same gradient ``dW`` (which each synapse can
    compute locally from the pre- and post-synaptic signals, the paper's point), passed through
    the same optimizer algorithm with the same hyperparameters (current lr, momentum, weight
    decay, ...), its own optimizer state.  With plain SGD and weight decay ``lambda``::

        W <- W - lr (dW + lambda W),   B <- B - lr (dW + lambda B)
        =>  W - B  <-  (1 - lr lambda) (W - B)        (geometric decay to B = W)

    With momentum ``mu`` the difference obeys the same momentum recursion driven by
    ``lambda (W - B)`` only, and still decays; with decoupled decay (AdamW) the factor is
    exactly ``(1 - lr lambda)`` per step.  Weight decay is what makes ``B`` forget its random
    start -- without it ``W - B`` stays constant.  With ``B = W`` at the start, kp *is* backprop
    (bit for bit).  Biases have no feedback counterpart.

    Train with :class:`localopt.optim.LocalOptimizer` (or its alias
    :class:`localopt.optim.KolenPollack`): it applies the mirrored update after every step.

    Options (the initial ``B``, as :class:`~localopt.rules.fa.FA`):
        init: ``"xavier"`` (default), ``"kaiming"``, ``"uniform"``, ``"normal"``.
        match_norm: rescale the initial B to the Frobenius norm of W.

    State: buffer ``localopt_feedback`` (shape of W) on each wrapped layer.
    """

    name = "kp"
    mirrors_update = True

    def forward(self, site: Site, x: Tensor, out: Tensor) -> Any:
        self.check_synced(site)
        return super().forward(site, x, out)

    def mirrored(self, site: Site) -> list[tuple[Tensor, Tensor]]:
        return [(site.buffer("feedback"), site.module.weight)]

    def feedback_grads(self, sites: list[Site]) -> None:
        for s in sites:
            s.buffer("feedback").grad = s.module.weight.grad
