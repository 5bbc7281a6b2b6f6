"""``wm``: weight mirrors (Akrout et al. 2019)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import rng
from ..mechanism import Site
from .base import (FEEDBACK_INITS, FeedbackRule, check_bool, check_choice, check_number,
                   init_feedback, register_rule)
from .learned import LearnsFeedback


@register_rule
class WM(LearnsFeedback, FeedbackRule):
    """Weight mirror (Akrout, Wilson, Humphreys, Lillicrap & Tweed, "Deep learning without
    weight transport", NeurIPS 2019, section 3, eq. 7).

    The backward pass is feedback alignment with a learned ``B`` (W's shape)::

        dx = delta B,        dW = delta^T x   (exact local weight gradient)

    In the *mirror phase* each layer is driven by its own noise, ``xi ~ N(0, I)`` (``samples``
    draws), and fires ``y = W xi`` (the layer's linear map: no bias, no input from below).
    With ``E[xi xi^T] = I`` the correlation of the layer's input and output is an unbiased
    estimate of W, and B follows it::

        W_hat = (1/n) sum_i y_i xi_i^T,          B <- (1 - decay) B + lr W_hat

    This is the paper's ``Delta B = eta_B y xi^T - lambda_WM B`` with ``eta_B = lr / n`` and
    ``lambda_WM = decay``; its fixed point is ``B = (lr / decay) W`` -- ``B = W`` with the
    default ``decay = lr``.  (The paper's noise amplitude only scales ``eta_B`` here, since
    the mirrored map is linear.)  For a convolution the noise is a batch of input patches of
    the kernel's receptive field and ``y`` the kernel's response to each, which is the
    convolution itself on noise images restricted to one output position per image, so the
    estimate is exact-in-expectation without border effects; ``groups`` are respected.

    The mirror steps run inside :class:`localopt.optim.LocalOptimizer`'s ``step`` after the
    weights' update, every ``every`` optimizer steps, for the layers whose B is used (those
    whose B carried an error in a backward pass so far -- not the first layer).  Noise is
    drawn on the layer's device by a generator from the layer's own stream (``localopt_rng``,
    :mod:`localopt.rng`), never torch's global RNG: it is saved with the model, and every
    data-parallel rank draws the same noise, so B stays identical across ranks.

    Options:
        lr: mirror learning rate (default 0.01: B tracks W over ~100 mirror steps).  When W
            moves fast, the lag costs more than the estimate's noise: on ResNet-20 with
            one-cycle SGD (peak lr 0.1, 15 epochs; RESULTS.md, rows ``wm-*``) the default
            stalls around the peak and ends 5.8 points below backprop, ``samples=200`` (noise
            of ``lr=0.05, samples=1024``, default lag) 4.2 below, ``lr=0.05, samples=320``
            (default noise, a fifth of the lag) 2.3 below, and both 1.6 below (seeds 0 and
            42; the others seed 0).
        decay: ``lambda_WM`` (default ``None``: equal to ``lr``, so B converges to W itself).
        samples: noise samples per layer per mirror step (default 64).  For a still W, B
            settles at an angle of about ``atan(sqrt(fan_in * lr / (2 * samples)))`` from W
            (the estimate's noise averaged by the moving average): 16 degrees for
            ``fan_in = 1024`` with the defaults, as measured on the 3x1024 MLP.  Each mirror
            step costs about ``2 * samples / (3 * batch)`` of a training step per layer.
        every: mirror every ``every`` optimizer steps (default 1).
        warmup: mirror steps run when the LocalOptimizer is built, before training -- the
            paper's initial mirror phase (default 0).  Without it the first ~``1 / lr`` steps
            train with a B still close to its random start (plain FA).  Costs ``warmup``
            mirror steps of every wrapped layer (cheap for convs; for a 1024x1024 Linear,
            200 steps are ~27 GFLOP).
        init: initial ``B`` (``"xavier"`` default, as :class:`~localopt.rules.fa.FA`).
        match_norm: rescale the initial B to the Frobenius norm of W (as ``fa``).

    State: buffer ``localopt_feedback`` (shape of W) on each wrapped layer.
    """

    name = "wm"
    random_stream = True

    def __init__(self, *, lr: float = 0.01, decay: float | None = None, samples: int = 64,
                 every: int = 1, warmup: int = 0, init: str = "xavier",
                 match_norm: bool = False) -> None:
        check_choice(self.name, "init", init, FEEDBACK_INITS)
        lr = check_number(self.name, "lr", lr, low=0, low_open=True)
        if decay is not None:
            decay = check_number(self.name, "decay", decay, low=0, high=1)
        samples = check_number(self.name, "samples", samples, low=1, integer=True)
        every = check_number(self.name, "every", every, low=1, integer=True)
        warmup = check_number(self.name, "warmup", warmup, low=0, integer=True)
        self.lr, self.decay, self.samples, self.every = lr, decay, samples, every
        self.warmup = warmup
        self.init = init
        self.match_norm = check_bool(self.name, "match_norm", match_norm)

    def setup(self, site: Site, generator: torch.Generator | None) -> None:
        site.register_buffer("feedback", init_feedback(self.init, site.weight, generator,
                                                       self.match_norm))

    def feedback(self, site: Site) -> Tensor:
        return site.buffer("feedback")

    def forward(self, site: Site, x: Tensor, out: Tensor) -> Any:
        self.check_synced(site)
        return super().forward(site, x, out)

    def backward(self, site: Site, delta: Tensor, payload: Any) -> Tensor:
        site.sends_feedback = True  # B carried an error: mirror it (a forward alone does not)
        return super().backward(site, delta, payload)

    @torch.no_grad()
    def feedback_step(self, sites: list[Site], step: int) -> None:
        if step % self.every:
            return
        # skip e.g. the first layer: nothing below needs its B
        self._mirror([s for s in sites if s.sends_feedback])

    def feedback_start(self, sites: list[Site]) -> None:
        for _ in range(self.warmup):  # the initial mirror phase (every layer: usage not known)
            self._mirror(sites)

    @torch.no_grad()
    def _mirror(self, sites: list[Site]) -> None:
        decay = self.lr if self.decay is None else float(self.decay)
        for s in sites:
            B = s.buffer("feedback")
            noise = rng.generator(s, B.device)
            B.mul_(1.0 - decay).add_(mirror_estimate(s, self.samples, noise).to(B.dtype),
                                     alpha=self.lr)


def mirror_estimate(site: Site, samples: int, generator: torch.Generator | None = None) -> Tensor:
    """``(1/n) sum_i (W xi_i) xi_i^T`` for ``n`` standard-normal inputs of ``site``'s layer
    (its receptive field, for a convolution), drawn from ``generator`` (a generator of the
    layer's device): an unbiased estimate of ``W``."""
    W = site.module.weight.detach()
    g = getattr(site.module, "groups", 1)
    Wg = W.reshape(g, W.shape[0] // g, -1)                      # (groups, out/g, in/g * k)
    xi = torch.randn(samples, g, Wg.shape[-1], device=W.device, dtype=W.dtype,
                     generator=generator)
    y = torch.einsum("ngk,gok->ngo", xi, Wg)
    return torch.einsum("ngo,ngk->gok", y, xi).div_(samples).reshape(W.shape)
