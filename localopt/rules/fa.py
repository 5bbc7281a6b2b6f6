"""``fa``: feedback alignment with a fixed random feedback weight."""
from __future__ import annotations

import torch
from torch import Tensor

from ..mechanism import Site
from .base import (FEEDBACK_INITS, FeedbackRule, check_bool, check_choice, check_number,
                   init_feedback, register_rule)


@register_rule
class FA(FeedbackRule):
    """Feedback alignment (Lillicrap et al. 2014, *Nature Communications* 2016).

    Each layer sends its error backward through a fixed random matrix ``B`` (shape of W,
    drawn once at wrap time and never trained)::

        dx = delta B,    dW = delta^T x   (exact local weight gradient)

    The forward weights come to align with ``B^T``, which is why learning works.

    Options:
        init: ``"xavier"`` (default; BioTorch), ``"kaiming"``, ``"uniform"`` (U(-0.5, 0.5)
            as Lillicrap et al. 2016), ``"normal"``; or ``"weight"``: ``B = W_0``, a copy of the
            layer's weight at wrap time (or at ``localopt.reset_feedback``), fixed thereafter
            (a symmetric start: backprop at step 0, feedback alignment as W moves away
            from ``W_0``).
        match_norm: rescale B to the Frobenius norm of W at wrap time ("norm-matched").
        track_norm: rescale B to the Frobenius norm of W at every backward,
            ``B_t = B ||W_t|| / ||B||``: the direction stays fixed, the scale follows W.
        gain: a constant factor ``g > 0`` on what every layer sends back, ``dx = g delta B``
            (after ``init``/``match_norm``/``track_norm``; default 1, the papers' rule).
            This project's option, not a paper's; see "Residual networks" below.

    Why ``track_norm``.  A layer followed by batch normalisation is scale-invariant: with
    ``y = BN(x W^T)``, scaling W by ``c`` scales the error BN passes back to the layer's output by
    ``1/c``; backprop's ``delta W`` restores the factor, FA's ``delta B`` does not.  As the
    weights grow during training (they do: ResNet-20's convs grow several-fold), each
    BN-followed FA layer shrinks the signal it passes down by ``||W_0|| / ||W_t||``, and the
    factors compound with depth, so the early layers stop learning.  ``track_norm`` makes the
    sent signal scale-invariant again, as backprop's is (one norm per layer per backward,
    tensor ops only).

    Scale.  Each layer scales the error it sends back by about ``||B|| / ||W||`` relative to
    backprop, and the factors compound with depth.  Xavier B matches Xavier-initialised W (the
    papers' and BioTorch's setups), but transformers initialise W much smaller
    (``trunc_normal(0.02)``): on a timm ``vit_tiny`` (patch 4, 32x32) Xavier B is ~2.5x W in
    49 of 50 layers and the patch embedding's gradient is 3e6x backprop's, 1.03x with
    ``match_norm=True``.  :func:`localopt.wrap` warns when the product of the ratios exceeds
    100 (:func:`~localopt.rules.base.check_feedback_scale`).

    Residual networks.  Through a block ``y = x + F(x)`` backprop sends ``dL/dx = dL/dy +
    J_F^T dL/dy``; under FA the identity term stays exact and only the branch term is carried by
    the random B's (two of them in a basic block).  ``gain < 1`` scales each branch term by
    ``g^2`` (one factor per FA layer in the branch) against the identity term, i.e. it weights
    the residual stream's error toward its exact part; ``g`` also scales the whole signal
    (the classifier's B), which matters to SGD's step size but not to Muon's orthogonalised
    hidden-layer updates.  The weight gradients stay the local ``delta^T x`` of each layer.
    On a CIFAR-10 ResNet-20 with Muon, ``gain=0.25`` gained 3 points in 3 epochs, but most of
    that came from the smaller gradients of the parameters Muon leaves to SGD (a lower
    ``aux_lr`` alone gave 1.8; ``results/notes/training_quality.md``).

    State: buffer ``localopt_feedback`` (shape of W, with the gain in it) on each wrapped layer.
    """

    name = "fa"

    def __init__(self, *, init: str = "xavier", match_norm: bool = False,
                 track_norm: bool = False, gain: float = 1.0) -> None:
        check_choice(self.name, "init", init, (*FEEDBACK_INITS, "weight"))
        self.init = init
        self.match_norm = check_bool(self.name, "match_norm", match_norm)
        self.track_norm = check_bool(self.name, "track_norm", track_norm)
        self.gain = check_number(self.name, "gain", gain, low=0, low_open=True)

    def setup(self, site: Site, generator: torch.Generator | None) -> None:
        if self.init == "weight":
            B = site.weight.detach().clone()
        else:
            B = init_feedback(self.init, site.weight, generator, self.match_norm)
        if self.track_norm:   # stored at norm g: feedback() multiplies by ||W_t||
            B = B * (self.gain / B.norm().clamp_min(1e-12))
        elif self.gain != 1.0:
            B = B * self.gain
        site.register_buffer("feedback", B)

    def feedback(self, site: Site) -> Tensor:
        B = site.buffer("feedback")
        if self.track_norm:
            return B * site.weight.detach().norm().to(B.dtype)
        return B
