"""``fa``: feedback alignment with a fixed random feedback weight."""
from __future__ import annotations

import torch
from torch import Tensor

from ..mechanism import Site
from .base import (FEEDBACK_INITS, FeedbackRule, check_bool, check_choice, init_feedback,
                   register_rule)


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

    Scale.  Each layer scales the error it sends back by about ``||B|| / ||W||`` relative to
    backprop, and the factors compound with depth.  Xavier B matches Xavier-initialised W (the
    papers' and BioTorch's setups), but transformers initialise W much smaller
    (``trunc_normal(0.02)``): on a timm ``vit_tiny`` (patch 4, 32x32) Xavier B is ~2.5x W in
    49 of 50 layers and the patch embedding's gradient is 3e6x backprop's, 1.03x with
    ``match_norm=True``.  :func:`localopt.wrap` warns when the product of the ratios exceeds
    100 (:func:`~localopt.rules.base.check_feedback_scale`).

    State: buffer ``localopt_feedback`` (shape of W) on each wrapped layer.
    """

    name = "fa"

    def __init__(self, *, init: str = "xavier", match_norm: bool = False) -> None:
        check_choice(self.name, "init", init, FEEDBACK_INITS)
        self.init = init
        self.match_norm = check_bool(self.name, "match_norm", match_norm)

    def setup(self, site: Site, generator: torch.Generator | None) -> None:
        site.register_buffer("feedback", init_feedback(self.init, site.weight, generator,
                                                       self.match_norm))

    def feedback(self, site: Site) -> Tensor:
        return site.buffer("feedback")
