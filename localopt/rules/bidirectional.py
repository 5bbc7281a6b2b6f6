"""``bfa``: bidirectional feedback alignment -- feedback trained to reconstruct the layer input
(Luo, Fu & Glass 2017)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..mechanism import CONV_TYPES, Site, input_grad, mode_padding
from .base import (FEEDBACK_INITS, FeedbackRule, check_bool, check_choice, check_number,
                   init_feedback, register_rule, scaled_to)
from .learned import (LearnsFeedback, accumulate_feedback_grad, apply_feedback_grads,
                      drop_input_direction, feature_sum, split_pending_input_sum)


@register_rule
class BFA(LearnsFeedback, FeedbackRule):
    """Bidirectional feedback alignment (after Luo, Fu & Glass, "Bidirectional backpropagation:
    towards biologically plausible error signal transmission in neural networks", 2017).

    The backward pass is feedback alignment with a learned ``B`` (W's shape)::

        dx = delta B,        dW = delta^T x   (exact local weight gradient)

    and B is trained to map each layer's output back to its input: with ``y = W x`` the
    layer's linear response on the current batch (its output minus its bias), the
    reconstruction is the transposed operation with B, ``x_hat = y B`` (a transposed
    convolution for conv layers -- the same operation that carries the error down), and B
    descends the local loss ``L_B = 1/2 ||x_hat - x||^2`` by normalised least mean squares::

        B <- B - lr (dL_B/dB / (k ||y||^2) + decay B)

    ``||y||^2`` is summed over the batch (and positions), ``k`` = kernel size / stride for a
    convolution (1 for Linear), which bounds the step's curvature so that any ``lr`` in
    ``(0, 2)`` is stable whatever the activity's scale (plain gradient descent on ``L_B``, as
    in the paper, diverges as soon as the activity grows).  The loss gradient is computed in
    the forward pass from the tensors the layer already has (``x``, its output), added to the
    pending update by the backward pass (a forward without backward changes nothing), and
    applied by :class:`localopt.optim.LocalOptimizer` after the weights' step.  Over several
    backward passes before a step (gradient accumulation) the gradients and the normalisers
    ``k ||y||^2`` are summed separately, so the step is exactly that of one batch holding
    them all; it does not depend on the task loss, so scaling the loss leaves it unchanged.
    The minimiser of ``L_B`` is a least-squares inverse of the layer on the data
    (``B = (W C W^T)^-1 W C`` for input covariance ``C``), which equals ``W`` only for an
    orthogonal W and white inputs.

    How this differs from the paper: Luo et al. train the feedback weights of a layer chain as
    one top-down network that generates the input from the target, its reconstruction error
    carried back up by the forward weights -- feedback alignment run in reverse, so each B comes
    to align with its W as each W does with its B.  A hook on one layer sees that layer only,
    and a graph with residual adds and normalisation has no top-down generative pass, so this
    rule trains each B on its own layer's reconstruction from the layer's actual output.  Its
    minimiser follows the data's covariance, not W: on ResNet-20 it stays 63-88 degrees from W
    (``results/notes/rule_stability.md``).

    ``track_norm=True`` (an option of this library, not of the paper; off by default): the
    backward uses B at W's current Frobenius norm, ``dx = delta B ||W_t|| / ||B||`` (as
    ``fa``'s ``track_norm``), so B learns the signal's direction and W sets its scale; the
    reconstruction learning is unchanged.  The idea: the least-squares inverse of a layer
    scales as ``1 / ||W||``, so where W grows (BatchNorm-followed convs do) the signal shrinks
    against backprop's.  Not a fix of bfa's failure on ResNet-20 (one-cycle SGD, peak lr 0.1:
    at the former feedback step 0.5 the training loss climbs from 2.1 to 82 around the peak;
    RESULTS.md): with it the same protocol diverges one epoch earlier, and the signal stays
    as small as the paper's rule's, since the learned B's direction (63-88 degrees from W)
    sets its size along the error (row ``bfa-track``; ``results/notes/rule_stability.md``).

    The default feedback step ``lr = 0.005`` (the step of this library's normalised update,
    which the paper's plain gradient descent lacks) is 100x below the 0.5 the library first
    used (cpu protocols, seeds 0 and 42, with the plain read-out ``drop_mean=False``;
    ``results/notes/rule_stability.md``).  On the 3x1024 MLP bfa scored 46.42, 48.05 and
    49.34% at 0.5, 0.05 and 0.005.  On ResNet-20 the step 0.5 diverged on both seeds, 0.05 on
    one (52.36% on the other), 0.005 on none (51.64 and 52.95%).  A smaller step keeps each B
    nearer its random start, i.e. nearer ``fa``, which still trains better (50.56% and
    56.88%): learning B toward the local least-squares inverse costs accuracy.  The
    classifier's B still reaches its inverse within the run (an estimate: each step shrinks
    the residual along one of the 10 output directions by about lr / 10, a time constant of
    2,000 steps), and on ResNet-20 its angle to W stays at 70-79 degrees (both seeds) where
    ``fa``'s falls to 53-55.  Rows ``bfa-lr5e-2`` and ``bfa-lr5e-1`` keep the former steps.

    ``drop_mean`` (an option of this library, not of the paper), as
    :class:`~localopt.rules.direct_learned.BiDFA`'s: after each step B loses its component
    along the layer's mean input direction (per input channel for a convolution, per group
    for a grouped one: the sum of the input over the batch and positions),
    ``B <- B (I - u u^T)`` on B's input dimension with ``u = sum_i x_i / ||sum_i x_i||``, so
    that ``delta B`` never pushes a sample along the direction every sample shares.  The
    least-squares read-out learns the samples' overall level, which varies along that
    direction, where the mean holds much of the input's energy: rectified activity (after a
    ReLU, pooled or not; 33-74% of the energy in ResNet-20's layers) but not signed activity
    (after tanh: 3-6% in the 3x1024 MLP's).  At the end of the ResNet-20 runs of the plain
    read-out (both seeds) the classifier's B lies 0.69-0.70 along its mean input (``python -m
    recipes.feedback_probe RUN``; a random B about 1/64).  So the default ``"auto"`` drops the
    direction in each layer whose input is non-negative, and keeps the plain read-out
    elsewhere (``True``/``False``: every layer).  A layer decides at its first feedback step,
    from a count summed with the normaliser (no input value seen since its first forward was
    negative: over accumulated passes and, averaged by the optimizer, over data-parallel
    ranks, so every rank decides alike), with one host read; the decision then stays
    (``Site.drops_mean``).  Cpu protocols (``results/notes/rule_stability.md``):

    * ResNet-20, where ``"auto"`` drops it in every layer that sends a signal: 56.59 and
      56.44% (seeds 0 and 42), the plain read-out 51.64 and 52.95 (row ``bfa-keep-mean``),
      ``fa`` 56.60 and 57.16;
    * 3x1024 tanh MLP, where ``"auto"`` is the plain read-out: 49.40 and 49.27; dropping the
      direction in every layer anyway costs 3 points (``drop_mean=True``: 46.12 and
      46.78; row ``bfa-drop-mean``).

    The input sum is accumulated with the normaliser, so accumulation, DDP and
    ``torch.compile`` keep the step of the whole batch.  ``drop_mean=False`` is the paper's
    read-out.

    Options:
        lr: feedback learning rate (default 0.005; stable below 2).
        decay: weight decay on B (default 0).
        init: initial ``B`` (``"xavier"`` default, as :class:`~localopt.rules.fa.FA`).
        match_norm: rescale the initial B to the Frobenius norm of W (as ``fa``).
        track_norm: send ``delta B`` with B rescaled to ``||W_t||`` (default False: the
            paper's rule, B at its learned norm).
        drop_mean: remove B's component along the mean input direction after each step:
            ``"auto"`` (default) in the layers whose input is non-negative, ``True`` in
            every layer, ``False`` in none (the paper's plain read-out).

    Plain ``nn.Linear``/``nn.ConvNd`` layers only (not subclasses that override ``forward``).
    State: buffer ``localopt_feedback`` (shape of W); its ``.grad`` holds the pending update.
    """

    name = "bfa"
    feedback_from_data = True

    def __init__(self, *, lr: float = 0.005, decay: float = 0.0, init: str = "xavier",
                 match_norm: bool = False, track_norm: bool = False,
                 drop_mean: bool | str = "auto") -> None:
        check_choice(self.name, "init", init, FEEDBACK_INITS)
        lr = check_number(self.name, "lr", lr, low=0, high=2, low_open=True, high_open=True)
        decay = check_number(self.name, "decay", decay, low=0, high=1, high_open=True)
        self.lr, self.decay, self.init = lr, decay, init
        self.match_norm = check_bool(self.name, "match_norm", match_norm)
        self.track_norm = check_bool(self.name, "track_norm", track_norm)
        if isinstance(drop_mean, str):
            check_choice(self.name, "drop_mean", drop_mean, ("auto",))
        else:
            check_bool(self.name, "drop_mean", drop_mean)
        self.drop_mean = drop_mean

    def setup(self, site: Site, generator: torch.Generator | None) -> None:
        if not site.fast:
            raise ValueError(f"localopt: rule 'bfa' supports plain Linear/Conv layers; "
                             f"'{site.name}' ({type(site.module).__name__}) overrides forward "
                             "(exclude it)")
        site.register_buffer("feedback", init_feedback(self.init, site.weight, generator,
                                                       self.match_norm))

    def feedback(self, site: Site) -> Tensor:
        B = site.buffer("feedback")
        return scaled_to(B, site.weight.detach()) if self.track_norm else B

    def forward(self, site: Site, x: Tensor, out: Tensor) -> Any:
        self.check_synced(site)
        # computed now (an in-place op after the layer may overwrite its output), accumulated
        # by the backward pass: a forward alone leaves the next feedback step unchanged
        return super().forward(site, x, out) + (self._recon(site, x, out),)

    def backward(self, site: Site, delta: Tensor, payload: Any) -> Tensor:
        *base, (g, norm) = payload
        accumulate_feedback_grad(site, g, norm)
        return super().backward(site, delta, tuple(base))

    def _recon(self, site: Site, x: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        """``(dL_B/dB, k ||y||^2)`` of this batch: the step divides their sums over the
        backward passes since the last step."""
        m, B = site.module, site.buffer("feedback")
        with torch.no_grad():
            y = out.detach()
            if m.bias is not None:
                y = y - m.bias.detach().view(-1, *([1] * (m.weight.dim() - 2)))
            k = 1.0
            if isinstance(m, CONV_TYPES):
                k = max(1.0, math.prod(m.kernel_size) / math.prod(m.stride))
            norm = y.to(torch.promote_types(y.dtype, torch.float32)).square().sum().mul_(k)
            drop = self._drops(site)
            if drop is not False:  # the input's sum per feature, accumulated with the norm
                fdim = (1 if x.dim() == B.dim() else 0) if isinstance(m, CONV_TYPES) else -1
                parts = [norm.reshape(1), feature_sum(x.detach(), fdim, norm.dtype)]
                if drop is None:  # "auto", undecided: how many input values were negative
                    parts.append((x.detach() < 0).sum(dtype=norm.dtype).reshape(1))
                norm = torch.cat(parts)
        return _recon_grad(site, y, x.detach(), B), norm

    def _drops(self, site: Site) -> bool | None:
        """Whether ``site`` drops its mean input direction (None: ``"auto"``, undecided)."""
        return site.drops_mean if self.drop_mean == "auto" else self.drop_mean

    def _decide(self, sites: list[Site]) -> None:
        """``drop_mean="auto"``: at a layer's first step, drop the mean direction from now on
        iff no input it saw had a negative value (a count summed with the normaliser, so over
        accumulated passes and, averaged by the optimizer, over data-parallel ranks: every
        rank decides alike).  One host read per step that decides, none after."""
        open_ = [s for s in sites if s.drops_mean is None and s.feedback_norm is not None
                 and s.buffer("feedback").grad is not None]
        if not open_:
            return
        dev = open_[0].feedback_norm.device
        flags = torch.stack([s.feedback_norm[[0, -1]].float().to(dev) for s in open_]).tolist()
        for s, (norm, negative) in zip(open_, flags):
            if norm > 0:  # a pending pass that saw input (not one zeroed by zero_grad)
                s.drops_mean = negative == 0
            # this step's normaliser: with the input sum where the direction is dropped
            s.feedback_norm = s.feedback_norm[:-1] if s.drops_mean else s.feedback_norm[0]

    def feedback_step(self, sites: list[Site], step: int) -> None:
        if self.drop_mean == "auto":
            self._decide(sites)
        sums = [(s, split_pending_input_sum(s)) for s in sites if self._drops(s)]
        apply_feedback_grads(sites, self.lr, self.decay)
        for s, sx in sums:
            if sx is not None:
                drop_input_direction(s.buffer("feedback"), sx, getattr(s.module, "groups", 1))


def _recon_grad(site: Site, y: Tensor, x: Tensor, B: Tensor) -> Tensor:
    """``d/dB 1/2 ||x_hat - x||^2`` for ``x_hat = input_grad(site, y, B)``: with the residual
    ``r = x_hat - x`` this is the weight gradient of the layer for input ``r`` and output error
    ``y`` (``y^T r`` for Linear), since ``<r, x_hat> = <layer_B(r), y>``."""
    m = site.module
    with torch.no_grad():
        r = input_grad(site, y, B, x.shape) - x
        if isinstance(m, torch.nn.Linear):
            return y.reshape(-1, y.shape[-1]).t().matmul(r.reshape(-1, r.shape[-1]))
        if isinstance(m, CONV_TYPES):
            if y.dim() == B.dim() - 1:  # unbatched
                y, r = y.unsqueeze(0), r.unsqueeze(0)
            nd, padding = B.dim() - 2, None
            if m.padding_mode != "zeros":  # forward: conv(pad(x, mode), padding=0)
                r = F.pad(r, mode_padding(m), mode=m.padding_mode)
                padding = [0] * nd
            elif not isinstance(m.padding, str) or m.padding == "valid":
                padding = [0] * nd if m.padding == "valid" else list(m.padding)
            if padding is not None:
                return torch.ops.aten.convolution_backward(
                    y, r, B, None, list(m.stride), padding, list(m.dilation), False, [0] * nd,
                    m.groups, (False, True, False))[1]
    with torch.enable_grad():  # padding="same": differentiate the transposed op
        Bv = B.detach().requires_grad_()
        loss = 0.5 * (input_grad(site, y, Bv, x.shape) - x).square().sum()
        return torch.autograd.grad(loss, Bv)[0]
