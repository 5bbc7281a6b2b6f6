"""``fa``: feedback alignment with a fixed random feedback weight."""
from __future__ import annotations

import torch
from torch import Tensor

from ..mechanism import Site
from .base import FEEDBACK_INITS, FeedbackRule, check_choice, init_feedback, register_rule


@register_rule
class FA(FeedbackRule):
    """Feedback alignment (Lillicrap et al. 2014, *Nature Communications* 2016).

    Each layer sends its error backward through a fixed random matrix ``B`` (shape of W,
    drawn once at wrap time and never trained)::

        dx = delta B,    dW = delta^T x   (exact local weight gradient)

    The forward weights come to align with ``B^T``, which is why learning works.

    Options:
        init: ``"xavier"`` (default; BioTorch), ``"kaiming"``, ``"uniform"`` (U(-0.5, 0.5)
            as Lillicrap et al. 2016), ``"normal"``.
        match_norm: rescale B to the Frobenius norm of W at wrap time ("norm-matched").

    State: buffer ``localopt_feedback`` (shape of W) on each wrapped layer.
    """

    name = "fa"

    def __init__(self, *, init: str = "xavier", match_norm: bool = False) -> None:
        check_choice(self.name, "init", init, FEEDBACK_INITS)
        self.init = init
        self.match_norm = bool(match_norm)

    def setup(self, site: Site, generator: torch.Generator | None) -> None:
        site.register_buffer("feedback", init_feedback(self.init, site.weight, generator,
                                                       self.match_norm))

    def feedback(self, site: Site) -> Tensor:
        return site.buffer("feedback")
