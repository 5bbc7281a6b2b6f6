"""Target propagation: ``dtp``, ``sdtp``, ``ao-sdtp``, ``drl``, ``l-drl``.

The model is a **chain of blocks** ``x_{i+1} = F_i(x_i)``, ``i = 0..n-1``, with ``x_n = y`` the
model output.  Each block is a hooked :class:`~localopt.mechanism.Site`:

* an ``nn.Sequential`` (``models.create_model("mlp3x1024")``, ``"simple_vgg"``, ...) is cut
  automatically: every ``Linear``/``ConvNd`` starts a block, and the parameter-free layers
  that follow it (activation, pooling, flatten, dropout) belong to it;
* any other model: pass ``blocks=["stem", "layer1", ...]``, names of modules that run one after
  the other, each on the previous one's output, each an ``nn.Sequential`` (or a single layer)
  holding one ``Linear``/``ConvNd`` plus parameter-free layers.  The first forward checks it.

**Targets** (computed in ``loss.backward()``, top-down, as the blocks' backward nodes run)::

    x̂_n = y - β ∂L/∂y                                  (top target)
    x̂_i = x_i + g_i(x̂_{i+1}) - g_i(x_{i+1})            (difference correction, i = n-1..1)

``g_i`` is the learned feedback mapping of block ``i`` (``x_{i+1} -> x_i``), built from the
block's type: the inverse of its shape operations (flatten -> unflatten, pooling -> nearest
upsampling), then the transposed-shape op of its layer (``Linear(out -> in)``, or the
transposed convolution with the conv's stride/padding/dilation/groups) with its own weight
``V_i`` and bias ``c_i``, then the activation that produced ``x_i`` (Lee et al. 2015 form
``g(h) = s(V h + c)``).  No target is needed for the input ``x_0``, so block 0 has no ``g``.

**Weight updates.**  The top block trains on the task loss (its exact local gradient
``∂L/∂θ_{n-1}``, as in DTP).  Every other block ``i`` gets the gradient of its local loss::

    ℓ_i = ‖x_{i+1} - x̂_{i+1}‖² / (2β)          (summed over the batch; x̂ detached)

w.r.t. its own parameters only: block ``i+1``'s backward node returns
``(x_{i+1} - x̂_{i+1}) / β`` as the gradient of its (detached) input, which autograd sends
into block ``i``'s own graph.  No gradient crosses blocks.  The ``1/β`` makes the update
scale independent of ``β`` (``x̂`` carries the task loss's batch reduction through
``∂L/∂y``), and equal to BP's where ``g`` is the transposed Jacobian.

**Variants** (``wrap(model, name, beta=...)``):

* ``dtp`` -- Lee et al. (2015), as benchmarked by Bartunov et al. (2018): the penultimate
  target comes from the gradient through the top block, ``x̂_{n-1} = x_{n-1} - β ∂L/∂x_{n-1}``
  (no learned inverse of the top block); below, difference correction.  Feedback trained by
  the DTP reconstruction loss (below).
* ``sdtp`` -- Simplified DTP (Bartunov et al. 2018): the top block also has a learned inverse,
  ``x̂_{n-1} = x_{n-1} + g_{n-1}(x̂_n) - g_{n-1}(y)``: no gradient reaches any hidden block.
* ``ao-sdtp`` -- SDTP with auxiliary output units (Bartunov et al. 2018): the top block also
  emits ``z = A x_{n-1}`` (``aux_units`` units, ``A`` fixed random, outside the task loss;
  their target is ``ẑ = z``), and ``g_{n-1}`` reads both: ``g_{n-1}(ŷ, z) = s(ŷ V + z V_z + c)``,
  so the inverse of a 10-unit output can carry more than the label.  Top block must be Linear.
* ``drl`` -- DTP with the *difference reconstruction loss* of Meulemans et al. (2020), targets
  as ``sdtp``.
* ``l-drl`` -- the layer-wise DRL of Ernoult et al. (2022, "Towards scaling difference target
  propagation by learning backprop targets"), targets as ``sdtp``; trained with several
  feedback iterations per batch.

**Feedback losses** (used by :class:`localopt.optim.TargetProp`'s step; ``ε, η ~ N(0, σ²)``;
``‖·‖²`` sums over features, then the batch mean is taken):

* DTP reconstruction (``dtp``/``sdtp``/``ao-sdtp``): ``‖g_i(F_i(x_i + ε)) - (x_i + ε)‖²``.
* DRL (``drl``): corrupt ``x̃_i = x_i + ε``, run it to the output ``ỹ = F_{n-1}∘…∘F_i(x̃_i)``,
  bring it back down with difference corrections ``r_n = ỹ``,
  ``r_j = x_j + g_j(r_{j+1}) - g_j(x_{j+1})`` (``j = n-1..i``, only ``g_i`` differentiated), loss
  ``‖r_i - x̃_i‖² / σ²``.
* L-DRL (``l-drl``): with ``y = x_{i+1} = F_i(x_i)``,
  ``-2 ε·(g_i(F_i(x_i + ε)) - g_i(y)) + ‖g_i(y + η) - g_i(y)‖²``, whose expectation
  ``σ²(‖J_g - J_F^T‖² - ‖J_F‖²)`` is minimal at ``J_{g_i} = J_{F_i}^T``: targets then
  approximate BP's (``(x_i - x̂_i)/β ≈ ∂L/∂x_i`` for small β).  Blocks with max-pooling:
  ``g`` max-unpools with pooling switches: ``g_i(F_i(x_i + ε))`` with those of the perturbed
  forward, ``g_i(y)`` and ``g_i(y + η)`` with the recorded forward's (option
  ``switches="clean"``, the default), as ScalingDTP's final code does (ernoult/scalingDTP
  re-runs the clean forward before ``g_i(y + η)``; its successor passes the clean indices
  explicitly).  ``switches="perturbed"`` gives the ``η`` term the perturbed forward's switches,
  as ScalingDTP's first release did by accident (its pooling layers keep only the latest
  indices): the mismatch of switches then also penalises ``V`` on the activity that moves
  between pooling positions, which shrinks ``‖V‖`` (``results/notes/target_prop.md`` compares both).

State: buffers ``localopt_feedback`` (``V_i``, shaped like the block layer's weight),
``localopt_feedback_bias`` (``c_i``) and for ``ao-sdtp`` ``localopt_aux``/``localopt_feedback_aux``
on each block's hooked module: saved in ``model.state_dict()``, moved by ``.to()``, never in
``model.parameters()`` (the task optimizer cannot touch them).  The forward pass records the
block inputs ``x_i`` (references the autograd graph keeps anyway) until the optimizer step.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import check_choice, check_number, register_rule
from .target_prop_base import (TargetPropRule, is_target_prop, last_inputs, last_targets,
                               randn_like, target_prop_rule)
from .target_prop_chain import Block, Trace

__all__ = ["TargetPropRule", "DTP", "SDTP", "AOSDTP", "DRL", "LDRL", "is_target_prop",
           "target_prop_rule", "last_targets", "last_inputs"]


@register_rule
class DTP(TargetPropRule):
    """``dtp``: difference target propagation (Lee et al. 2015; Bartunov et al. 2018's
    "DTP"): penultimate target from the gradient through the top block, learned inverses
    below, trained by the DTP reconstruction loss.  See :mod:`localopt.rules.target_prop`."""

    name = "dtp"
    gradient_top = True


@register_rule
class SDTP(TargetPropRule):
    """``sdtp``: simplified DTP (Bartunov et al. 2018): learned inverses for every block
    including the top one; no gradient below the top block."""

    name = "sdtp"


@register_rule
class AOSDTP(TargetPropRule):
    """``ao-sdtp``: SDTP with auxiliary output units (Bartunov et al. 2018).

    Extra option ``aux_units`` (default 128): the number of auxiliary units ``z = A x_{n-1}``
    (``A`` fixed, N(0, 1/fan_in)) that the top feedback reads beside the output."""

    name = "ao-sdtp"
    aux = True

    def __init__(self, *, beta: float = 0.1, blocks: list[str] | None = None,
                 init: str = "xavier", aux_units: int = 128) -> None:
        super().__init__(beta=beta, blocks=blocks, init=init)
        self.aux_units = check_number(self.name, "aux_units", aux_units, low=1, integer=True)


@register_rule
class DRL(TargetPropRule):
    """``drl``: DTP with the difference reconstruction loss (Meulemans et al. 2020)."""

    name = "drl"
    feedback_loss_kind = "drl"

    def _noisy_feedback_loss(self, b: Block, tr: Trace, P: dict[str, Tensor], x: Tensor,
                             noise: float, gen: torch.Generator) -> Tensor:
        """DRL: ``x̃_i = x_i + ε`` run up to ``ỹ``, brought back down by difference
        corrections with the current feedback (only ``g_i`` differentiated), compared with
        ``x̃_i``: ``‖r_i - x̃_i‖² / σ²``."""
        eps = noise * randn_like(x, gen)
        xn = x + eps
        with torch.no_grad():
            h = xn
            for blk in self._chain[b.index:]:
                h = blk.replay(h)
            r = h
            for blk in reversed(self._chain[b.index + 1:]):
                xb = tr.x[blk.index]
                ga, gx = self._g_pair(blk, r, xb, tr.x[blk.index + 1], self.feedback_params(blk))
                r = xb + ga - gx
        ga, gx = self._g_pair(b, r, x, tr.x[b.index + 1], P)
        ri = x + ga - gx
        return (ri - xn).pow(2).flatten(1).sum(1).mean() / noise ** 2


@register_rule
class LDRL(TargetPropRule):
    """``l-drl``: layer-wise difference reconstruction loss (Ernoult et al. 2022).

    Extra option ``switches`` (``"clean"`` default, or ``"perturbed"``): which max-pooling
    switches the ``η`` term of the feedback loss unpools with (module docstring)."""

    name = "l-drl"
    feedback_loss_kind = "ldrl"
    transpose_feedback = True
    feedback_first = True

    def __init__(self, *, beta: float = 0.1, blocks: list[str] | None = None,
                 init: str = "xavier", switches: str = "clean") -> None:
        super().__init__(beta=beta, blocks=blocks, init=init)
        check_choice(self.name, "switches", switches, ("clean", "perturbed"))
        self.switches = switches

    def _noisy_feedback_loss(self, b: Block, tr: Trace, P: dict[str, Tensor], x: Tensor,
                             noise: float, gen: torch.Generator) -> Tensor:
        """L-DRL: ``-2 ε·(g_i(F_i(x_i + ε)) - g_i(y)) + ‖g_i(y + η) - g_i(y)‖²`` with
        ``y = F_i(x_i)``, the pooling switches as the ``switches`` option says."""
        y = tr.x[b.index + 1]
        dx = noise * randn_like(x, gen)
        dy = noise * randn_like(y, gen)
        rec = tr.idx[b.index]
        idx_n: dict = {} if rec else None
        with torch.no_grad():
            yn = b.replay(x + dx, idx_n)
        last = idx_n if self.switches == "perturbed" else rec
        idx = {j: torch.cat([rec[j], idx_n[j], last[j]]) for j in rec if j in idx_n} if rec else None
        n = y.shape[0]
        r = self.g(b, torch.cat([y, yn, y + dy]), P, b.shapes(x), None, idx)
        r0, r_x, r_y = r[:n], r[n:2 * n], r[2 * n:]
        dr, dr_y = r_x - r0, r_y - r0
        return (-2 * (dx * dr).flatten(1).sum(1).mean()
                + dr_y.pow(2).flatten(1).sum(1).mean())

    def options(self) -> dict[str, Any]:
        return {**super().options(), "switches": self.switches}
