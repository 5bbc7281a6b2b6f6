"""Sign-symmetric feedback: ``usf``, ``brsf``, ``frsf`` (Liao, Leibo & Poggio 2016)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import rng
from ..mechanism import Site
from .base import (FEEDBACK_INITS, FeedbackRule, _fans, check_bool, check_choice, check_number,
                   feedback_magnitude, init_feedback, register_rule, scaled_to)

_SCALES = ("xavier", "kaiming", "norm", "none")


def _sign_scale(scale, weight: Tensor):
    if not isinstance(scale, str):
        return float(scale)
    fan_in, fan_out = _fans(weight)
    if scale == "xavier":
        return math.sqrt(2.0 / (fan_in + fan_out))
    if scale == "kaiming":
        return math.sqrt(2.0 / fan_in)
    if scale == "norm":  # ||B||_F = ||W||_F
        return weight.detach().norm() / math.sqrt(weight.numel())
    return 1.0


@register_rule
class USF(FeedbackRule):
    """Uniform sign-concordant feedback (uSF), Liao, Leibo & Poggio 2016; at ImageNet scale
    Xiao et al. 2018::

        B = s * sign(W)   (recomputed from the current W every forward)
        dx = delta B,     dW = delta^T x

    Options:
        scale: ``"xavier"`` (default): ``s = sqrt(2 / (fan_in + fan_out))``, the scaling
            Xiao et al. 2018 and BioTorch use against exploding signals; ``"kaiming"``:
            ``sqrt(2 / fan_in)``; ``"norm"``: ``||W||_F / sqrt(numel W)`` so that
            ``||B|| = ||W||``; ``"none"`` (``s = 1``, the paper's plain sign); or a float.
    """

    name = "usf"
    scale_remedy = "scale='norm'"

    def __init__(self, *, scale: "str | float" = "xavier") -> None:
        if isinstance(scale, str):
            check_choice(self.name, "scale", scale, _SCALES)
        else:
            scale = check_number(self.name, "scale", scale, low=0, low_open=True)
        self.scale = scale

    def feedback(self, site: Site) -> Tensor:
        W = site.weight.detach()
        return torch.sign(W) * _sign_scale(self.scale, W)


@register_rule
class BRSF(FeedbackRule):
    """Batchwise random-magnitude sign-concordant feedback (brSF), Liao et al. 2016::

        B = |M_t| * sign(W),   M_t redrawn every forward pass (each mini-batch)

    ``|M_t|`` has the magnitude distribution of ``init`` (default ``"xavier"``, as BioTorch:
    ``|U(-a, a)|`` = ``a U(0, 1)``; ``"normal"``: ``|N(0, 1/fan_in)|``), drawn on the layer's
    device from the layer's own stream (``localopt_rng``) by
    :func:`localopt.rng.counter_uniform`: one operator, so ``torch.compile`` traces it
    without a graph break; torch's global RNG is untouched, the stream is saved with the
    model, and every data-parallel rank draws the same ``M_t``.

    ``track_norm=True``: ``B_t = B ||W_t|| / ||B||`` at every backward, the scale of
    :class:`~localopt.rules.fa.FA`'s option of that name (why: its docstring; a BN-followed
    layer's signal otherwise shrinks as W grows).
    """

    name = "brsf"
    random_stream = True
    redraws_feedback = True  # B is new every forward: no fixed scale to check at wrap

    def feedback_format(self) -> str:
        return self.name  # its state is a random stream, not a B

    def __init__(self, *, init: str = "xavier", track_norm: bool = False) -> None:
        check_choice(self.name, "init", init, FEEDBACK_INITS)
        self.init = init
        self.track_norm = check_bool(self.name, "track_norm", track_norm)

    def feedback(self, site: Site) -> Tensor:
        W = site.weight.detach()
        u = rng.counter_uniform(site, tuple(W.shape), W.device)
        B = feedback_magnitude(self.init, W, u).to(W.dtype) * torch.sign(W)
        if self.track_norm:
            return scaled_to(B, W)
        return B


@register_rule
class FRSF(FeedbackRule):
    """Fixed random-magnitude sign-concordant feedback (frSF), Liao et al. 2016::

        B = |M| * sign(W),   M drawn once at wrap time (buffer ``localopt_feedback`` = |M|)

    Options: ``init`` (``"xavier"`` default, as :class:`~localopt.rules.fa.FA`); ``match_norm``:
    rescale M to the Frobenius norm of W at wrap time; ``track_norm``: ``B_t = B ||W_t|| /
    ||B||`` at every backward (as :class:`~localopt.rules.fa.FA`'s option of that name).
    """

    name = "frsf"

    def __init__(self, *, init: str = "xavier", match_norm: bool = False,
                 track_norm: bool = False) -> None:
        check_choice(self.name, "init", init, FEEDBACK_INITS)
        self.init = init
        self.match_norm = check_bool(self.name, "match_norm", match_norm)
        self.track_norm = check_bool(self.name, "track_norm", track_norm)

    def feedback_format(self) -> str:
        return self.name  # its buffer is |M|, not a B

    def setup(self, site: Site, generator: torch.Generator | None) -> None:
        M = init_feedback(self.init, site.weight, generator, self.match_norm)
        site.register_buffer("feedback", M.abs_())

    def feedback(self, site: Site) -> Tensor:
        W = site.weight.detach()
        B = site.buffer("feedback") * torch.sign(W)
        if self.track_norm:
            return scaled_to(B, W)
        return B
