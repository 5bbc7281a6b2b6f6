"""Direct feedback rules that learn their feedback: ``dkp`` (direct Kolen-Pollack, Webster, Choi
& Ahn 2020) and ``bidfa`` (bidirectional DFA, after Luo, Fu & Glass 2017)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..mechanism import Site
from .base import check_bool, check_number, register_rule
from .direct import DFA
from .learned import (LearnsFeedback, accumulate_feedback_grad, anchor, apply_feedback_grads,
                      drop_input_direction, feature_sum, split_pending_input_sum)


@register_rule
class DKP(LearnsFeedback, DFA):
    """Direct Kolen-Pollack (Webster, Choi & Ahn, "Learning the connections in direct feedback
    alignment", 2020).

    The backward pass is DFA's (see :mod:`localopt.rules.direct`): a hooked layer reading
    ``x`` sends ``dx = e B`` (``e`` the output error, ``B`` of shape ``(E, D)`` dense or
    ``(K, C)`` channel-shared).  ``B`` is learned by the Kolen-Pollack principle: it receives
    the gradient that a direct forward connection from ``x`` to the output would receive,
    which each synapse computes from its own pre- and post-synaptic signals::

        grad B = d<e B, x>/dB = e^T x          (dense; summed over positions for "channel")

    and is stepped with its layer's optimizer settings (same algorithm, lr, momentum, weight
    decay, its own optimizer state) by :class:`localopt.optim.LocalOptimizer` -- as the
    authors' code steps ``B`` in the same optimizer as the weights.  Weight decay is what makes
    ``B`` forget its random start.

    ``fixed_norm=True`` (the default; an option of this library, not of the paper --
    ``fixed_norm=False`` is the published rule): the signal uses ``B`` at
    the Frobenius norm it was drawn with, ``dx = e B n_0 / ||B||`` with ``n_0 = scale
    sqrt(E)`` (dense; ``scale sqrt(K / P)`` for ``"channel"`` with ``P`` shared positions), so
    ``B`` learns only the signal's direction; ``grad B`` is unchanged.  Why: nothing in the
    forward pass depends on ``B``, so the error never answers its growth, and only weight
    decay bounds it (at ``-E[e^T x] / decay``); on a ResNet-20, whose residual stream feeds
    large inputs ``x``, ``||B||`` grows by orders of magnitude and the training diverges
    (RESULTS.md, row ``dkp-published``: ``||B||`` from 3 to 1e13, loss 23 after epoch 2 at a
    learning rate below 2e-4, 1e29 at the end).

    ``feedback="channel"`` (the default; an option of :class:`~localopt.rules.direct.DFA`,
    whose own default is ``"dense"``): on an input with positions (a conv layer's ``C x H x
    W``) one ``K x C`` matrix is shared by every position, so ``grad B = sum over positions
    of e^T x`` is the gradient of a linear read-out of the *pooled* input -- what a
    globally pooled network's classifier reads, through the identity shortcuts, from every
    point of a residual stream.  The dense ``B`` (``K x C H W``) learns a read-out of every
    pixel instead: its signal ``e B`` is a mix of the inputs' spatial patterns, the weight
    updates it drives add up over positions and samples, and on ResNet-20 the training
    diverges (row ``dkp-dense``: loss 2.8 -> 14.7 by epoch 4) where the channel form trains
    above ``dfa`` (rows ``dkp``, ``dfa``; ``results/notes/rule_stability.md``).  On inputs
    without positions (``Linear`` layers, MLPs) the two are the same matrix, bit for bit.
    Other options as :class:`~localopt.rules.direct.DFA`.
    """

    name = "dkp"
    feedback_from_data = True
    mirrors_update = True

    def __init__(self, *, fixed_norm: bool = True, feedback: str = "channel",
                 init: str = "uniform", scale: float = 1.0, output: "int | str | None" = None,
                 modules: Any = None, channel_dim: "int | None" = None,
                 max_feedback_mb: float = 1024.0, inside: str = "bp") -> None:
        super().__init__(feedback=feedback, init=init, scale=scale, output=output,
                         modules=modules, channel_dim=channel_dim,
                         max_feedback_mb=max_feedback_mb, inside=inside)
        self.fixed_norm = check_bool(self.name, "fixed_norm", fixed_norm)

    def forward(self, site: Site, x: Tensor, out: Tensor) -> Any:
        self.check_synced(site)
        return super().forward(site, x, out) + (x.detach(),)

    def send(self, site: Site, src: Tensor, payload: Any) -> Tensor:
        *base, x = payload
        B = site.buffer("feedback")
        if self.fixed_norm:
            shape, dtype = base
            Bn = self.at_drawn_norm(site, B, x.shape, src.dim())
            dx = self._project(site, src, Bn, shape).to(dtype)
        else:
            dx = super().send(site, src, tuple(base))
        with torch.enable_grad():
            Bv = B.detach().requires_grad_()
            proj = self._project(site, src.detach(), Bv, x.shape)
            g = torch.autograd.grad(proj, Bv, x.to(proj.dtype))[0].to(B.dtype)
        accumulate_feedback_grad(site, g)
        return dx

    def mirrored(self, site: Site) -> list[tuple[Tensor, Tensor]]:
        w = anchor(site)
        return [] if w is None else [(site.buffer("feedback"), w)]


@register_rule
class BiDFA(LearnsFeedback, DFA):
    """Bidirectional direct feedback alignment (after Luo, Fu & Glass, "Bidirectional
    backpropagation: towards biologically plausible error signal transmission in neural
    networks", 2017): DFA whose feedback is trained to reconstruct each hooked layer's input
    from the network output.

    The backward pass is DFA's, ``dx = e B``.  The same projection applied to the (detached)
    output ``z`` of the forward reconstructs the input ``x`` of every hooked layer,
    ``x_hat = z B``, and B descends ``L_B = 1/2 ||x_hat - x||^2`` by normalised least
    mean squares (as :class:`~localopt.rules.bidirectional.BFA`)::

        B <- B - lr (dL_B/dB / (P ||z||^2) + decay B)

    with ``||z||^2`` summed over the batch and ``P`` the number of input positions that share
    one projection (``feedback="channel"``; 1 for ``"dense"``), so any ``lr`` in ``(0, 2)`` is
    stable.  It is computed in the backward pass, from the ``x`` and ``z`` of the forward
    (so a forward without backward changes nothing; over several backward passes the
    gradients and the normalisers are summed separately, so accumulation gives exactly the
    step of one batch holding them all, whatever the loss scale) and applied by
    :class:`localopt.optim.LocalOptimizer`.  ``B`` thus learns the linear read-out of each
    layer's activity from the output, which correlates with how the output depends on it.

    ``fixed_norm=True`` (default; an option of this library, as :class:`DKP`'s): the signal
    uses ``B`` at the Frobenius norm it was drawn with, ``dx = e B n_0 / ||B||``, so B learns
    the signal's direction only.  Why: the least-squares read-out has the scale of the
    activity over the output, ``||B|| ~ ||x|| / ||z||``, not that of a gradient; on a
    ResNet-20 (16,384 inputs per sample at the residual stream, 10 logits) the published form
    (``fixed_norm=False, drop_mean=False``) sends signals 26 to 21,000 times backprop's norm
    and the training stays at chance (RESULTS.md, row ``bidfa-published``).

    ``center=True`` (an option of this library, not of the paper; dense feedback only): B
    reads out the input's deviation from its batch mean from the output's deviation from its
    batch mean, ``x - mean(x) ~ (z - mean(z)) B`` -- the least-squares regression with an
    intercept, whose minimiser is ``Cov(z)^-1 Cov(z, x)``::

        B <- B - lr (sum_i (z_i - m_z)^T (r_i - mean(r)) / sum_i ||z_i - m_z||^2 + decay B)

    with ``r_i = z_i B - x_i``.  Why: without an intercept B also fits the mean activity, a
    direction shared by every sample, and the signal ``e B`` pushes each sample along it; in
    the ResNet-20 runs of the plain rule 11-53% (seed 0) and 38-98% (seed 42, which stalls
    at 27%) of each learned B's energy lies along its layer's mean-input direction, against
    at most 1% for ``dfa``'s random B (``python -m recipes.feedback_probe RUN``).  The step
    needs the sums ``sum z_i``, ``sum x_i``, ``N`` of every backward pass since the last step;
    they are accumulated (and averaged over DDP ranks) with the normaliser, so gradient
    accumulation still gives exactly the step of one batch holding them all.  A batch whose
    outputs do not vary (one sample) leaves B as it is.  Not a fix, so off by default: on
    ResNet-20, seed 42, with ``drop_mean=False``, it ends at 31.93% (the plain rule 27.25,
    ``dfa`` 38.35; row ``bidfa-center``), and its B still lies 19-64% along the mean, since
    the activity also *varies* along it (samples differ in overall level): a read-out learns
    that level with or without the intercept.

    ``drop_mean=True`` (default; an option of this library, not of the paper): after each
    step, B loses its component along the layer's mean input direction of the batches since
    the last step, ``B <- B (I - u u^T)`` with ``u = sum_i x_i / ||sum_i x_i||`` (``"channel"``:
    the sum also over the positions that share B, one value per channel), so the signal
    ``e B`` never pushes a sample along the direction every sample shares.  Why: the samples'
    overall level varies along that direction (9-49% of the inputs' spread about their mean
    in the ResNet-20 runs of the plain read-out), so a read-out of the input from the output
    learns that level, with or without ``center``; in the plain read-out's ResNet-20 runs
    11-98% of each B's energy ended along it, and the seed where it was largest stalled at
    27.25% (``dfa``: 38.35).  With the default, ResNet-20's cpu protocol (15 epochs) gives
    37.93% and 36.37% on seeds 0 and 42 (``dfa``: 36.42 and 38.35; the plain read-out,
    ``drop_mean=False``: 35.78 and 27.25, row ``bidfa-keep-mean``).  ``sum_i x_i`` is
    accumulated with the normaliser, so accumulation and DDP still give exactly the step of
    the whole batch.  Combines with ``center``.

    Options: ``lr`` (default 0.5), ``decay`` (default 0), ``fixed_norm`` (default True),
    ``center`` (default False), ``drop_mean`` (default True), and those of
    :class:`~localopt.rules.direct.DFA`.
    """

    name = "bidfa"
    feedback_from_data = True
    needs_output = True  # the detached output z reaches send() with the error

    def __init__(self, *, lr: float = 0.5, decay: float = 0.0, fixed_norm: bool = True,
                 center: bool = False, drop_mean: bool = True,
                 feedback: str = "dense", init: str = "uniform", scale: float = 1.0,
                 output: "int | str | None" = None, modules: Any = None,
                 channel_dim: "int | None" = None, max_feedback_mb: float = 1024.0) -> None:
        lr = check_number(self.name, "lr", lr, low=0, high=2, low_open=True, high_open=True)
        decay = check_number(self.name, "decay", decay, low=0, high=1, high_open=True)
        super().__init__(feedback=feedback, init=init, scale=scale, output=output,
                         modules=modules, channel_dim=channel_dim,
                         max_feedback_mb=max_feedback_mb)
        self.lr, self.decay = float(lr), float(decay)
        self.fixed_norm = check_bool(self.name, "fixed_norm", fixed_norm)
        self.center = check_bool(self.name, "center", center)
        self.drop_mean = check_bool(self.name, "drop_mean", drop_mean)
        if self.center and self.feedback != "dense":
            raise ValueError(f"localopt: rule 'bidfa': option center=True supports "
                             f"feedback='dense' only, not feedback={self.feedback!r}")

    def forward(self, site: Site, x: Tensor, out: Tensor) -> Any:
        self.check_synced(site)
        return super().forward(site, x, out) + (x.detach(),)

    def source(self, e: Tensor, out: Tensor | None) -> Any:
        """DFA's error, with the detached output ``z`` and ``||z||^2`` (once per backward)."""
        zz = out.to(torch.promote_types(out.dtype, torch.float32)).square().sum()
        return super().source(e, out), out, zz

    def send(self, site: Site, src: Any, payload: Any) -> Tensor:
        # In the backward pass, from the payload and the output that the autograd edge
        # carries: no state outside the graph, so torch.compile keeps it.
        (e, z, zz), (*base, x) = src, payload
        B = site.buffer("feedback")
        if self.fixed_norm:
            shape, dtype = base
            dx = self._project(site, e, self.at_drawn_norm(site, B, x.shape, e.dim()),
                               shape).to(dtype)
        else:
            dx = super().send(site, e, tuple(base))
        positions = self._shared_positions(site, x.shape, z.dim())
        with torch.enable_grad():
            Bv = B.detach().requires_grad_()
            x_hat = self._project(site, z.to(B.dtype), Bv, x.shape)
            loss = 0.5 * (x_hat - x.to(x_hat.dtype)).square().sum()
            g = torch.autograd.grad(loss, Bv)[0]
        # the sums center / drop_mean need, accumulated with the normaliser
        if self.center:
            n = x.shape[0]
            stats = torch.cat([zz.reshape(1), zz.new_full((1,), n),
                               z.reshape(n, -1).sum(0).to(zz.dtype),
                               x.reshape(n, -1).sum(0).to(zz.dtype)])
            accumulate_feedback_grad(site, g, stats)
        elif self.drop_mean:
            dense = self.feedback == "dense"   # B's inputs: every value, or every channel
            sx = feature_sum(x.flatten(1) if dense else x,
                             1 if dense else self._feature_dim(site, x.dim()), zz.dtype)
            accumulate_feedback_grad(site, g, torch.cat([(zz * positions).reshape(1), sx]))
        else:
            accumulate_feedback_grad(site, g, zz * positions)
        return dx

    def feedback_step(self, sites: list[Site], step: int) -> None:
        sums = [(s, _center_pending(s) if self.center else split_pending_input_sum(s))
                for s in sites] if self.center or self.drop_mean else []
        apply_feedback_grads(sites, self.lr, self.decay)
        if self.drop_mean:
            for s, sx in sums:
                if sx is not None:
                    drop_input_direction(s.buffer("feedback"), sx)


@torch.no_grad()
def _center_pending(site: Site) -> "Tensor | None":
    """Turn the pending uncentred gradient ``sum z_i^T r_i`` and the statistics ``[sum
    ||z_i||^2, N, sum z_i, sum x_i]`` of ``center=True`` into the centred gradient and
    normaliser, ``G - s_z^T (s_z B - s_x) / N`` and ``sum ||z_i||^2 - ||s_z||^2 / N``, and
    return ``sum x_i`` (None when no step is pending)."""
    B = site.buffer("feedback")
    G, st = B.grad, site.feedback_norm
    if G is None or st is None:
        return None
    E = B.shape[0]
    sz, sx = st[2:2 + E].to(B.dtype), st[2 + E:].to(B.dtype)
    n = st[1].clamp_min(1.0)
    norm = st[0] - sz.to(st.dtype).square().sum() / n
    # outputs that do not vary over the batch (a single sample): nothing to regress on, and
    # the centred gradient is rounding error -- no step rather than rounding / ~0
    varies = norm > 1e-6 * st[0]
    B.grad = torch.where(varies, G - torch.outer(sz, sz @ B - sx) / n.to(B.dtype), 0.0)
    site.feedback_norm = torch.where(varies, norm, 1.0)
    return sx
