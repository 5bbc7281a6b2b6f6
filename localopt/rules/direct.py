"""Direct feedback rules: ``dfa``, ``bdfa``, ``drtp`` -- and module-wise (hybrid) DFA.

Every hidden unit receives the *output* error (or the target) through its own fixed random
matrix, instead of the error backpropagated through the layers above it.

Where the signal enters
-----------------------
``localopt.wrap(model, "dfa")`` hooks each selected layer (``nn.Linear``/``nn.ConvNd``) -- or,
with ``modules=[...]``, each named module -- and the model itself:

* the **model output** ``z`` is routed through :func:`~localopt.mechanism.from_output`: the
  first step of the backward receives ``e = dL/dz`` (shape ``(N, K)``, or ``(N, *P, K)`` for
  per-position outputs such as tokens ``(N, T, K)``), computes every hooked layer's signal
  and sends it to that layer's input as an ordinary autograd gradient -- no tensor hooks and
  no state between forward and backward, so ``torch.compile`` traces the model into one graph
  (after the first forward, which draws ``B``).  ``loss.backward()`` is unchanged;
* a hooked layer ``y = f_W(x)`` receiving the error ``delta = dL/dy`` computes its exact
  *local* parameter gradients from ``delta`` (autograd, as for every rule), and sends
  backward, as the gradient of its input ``x``, the direct projection (dense mode)::

      dx = e_flat @ B        B: (E, D) fixed, E = numel(e) / N, D = numel(x) / N

  instead of ``delta @ W``.  Everything between that input and the hooked layer below it
  (activations, norms, pooling, residual additions) keeps its exact derivative.

For an MLP ``h_l = f(a_l), a_l = W_l h_{l-1}`` this is Nøkland's (2016) DFA exactly: layer
``l+1`` sends ``B_{l+1}^T e`` to ``h_l``, the activation's backward multiplies by ``f'(a_l)``,
so ``delta a_l = (B e) * f'(a_l)`` (the feedback matrix of hidden layer ``l`` is stored on the
layer that *reads* ``h_l``); the layer that produces the output receives ``delta = e`` and
trains on its true gradient.  With ``B = W_2`` on a one-hidden-layer net, or ``B_l`` the
product of the downstream weights in a deep linear net, DFA equals backprop (tested).
In a residual network the gradient at a block's input is the sum of the direct signals of
the hooked layers that read it, through the exact shortcut paths.  A layer whose input needs
no gradient (the first layer) gets no feedback matrix.

Module-wise / hybrid DFA (Han et al. 2020): ``modules=["layers.0", "layers.1", ...]`` (names,
``fnmatch`` patterns or module types) hooks those modules instead of layers: inside a module
the error flows by exact backprop (``inside="bp"``, default) or by feedback alignment
(``inside="fa"``: every Linear/Conv inside sends ``delta B_in`` with a fixed Glorot-uniform
``B_in`` shaped like its W, stored on the module as ``localopt_inside_<path>``), and each
module's *input* gradient is ``e_flat @ B``.  A
module's update therefore needs only ``e`` -- not the modules above it -- which is what makes
the scheme model-parallel.  Layers outside the named modules keep exact backprop (so the
classifier after the last module trains on ``e`` and sends ``W^T e`` to the last module).

Feedback shapes and memory (float32, 4 bytes per entry)
-------------------------------------------------------
* ``feedback="dense"`` (default): ``B`` of shape ``(E, D)``, one random weight per (error
  component, input unit) -- Nøkland's DFA for any layer.  ``E*D`` entries per layer: 10 x
  16*32*32 = 164k for a CIFAR ResNet-20 block input, but 1000 x 64*56*56 = 2e8 (800 MB) for
  an ImageNet ResNet-50 layer -- use ``"channel"`` there.
* ``feedback="channel"`` (memory-bounded): ``B`` of shape ``(K, C)``, ``C`` the input's
  channel/feature size; the signal ``e @ B`` is shared by every spatial position (conv
  inputs ``(N, C, *S)``) or token (``(N, T, C)``) of the input.  When the output itself has
  per-position errors ``e: (N, *P, K)`` with ``P`` equal to the input's positions (token
  models), each position gets its own ``e_p @ B``.  ``K*C`` entries per layer (1000 x 64 for
  that ResNet-50 layer); a 224x224 timm ``resnet50`` with 1000 classes needs 94 MB in all.

``B`` is drawn lazily at the first forward pass with gradients (its shape depends on the
input and output shapes), all pending layers at once, each on the CPU from its layer's own
stream (``localopt_rng``, seeded at wrap time by ``seed=`` of :func:`localopt.wrap`; see
:mod:`localopt.rng`), so the draw is reproducible, independent of the device, and the same
on every data-parallel rank (``DistributedDataParallel`` broadcasts the stream at start-up).
Before that the buffers ``localopt_feedback`` are empty placeholders, filled in place (same
tensor); ``state_dict()`` works at any time and loading a checkpoint fills them (see
:func:`localopt.wrap`).  ``max_feedback_mb`` (default
1024) bounds the total; exceeding it is an error naming the largest layers.

Cost
----
Per hooked layer the backward still computes the exact weight gradient, but the transposed
op ``delta W`` (a matmul / transposed convolution as large as the forward) becomes the
projection ``e B``: ``N*E*D`` multiply-adds in dense mode (``E`` = 10 for CIFAR), ``N*K*C``
in channel mode (then a broadcast) -- a 3x3 convolution with 64 output channels costs ~60x
fewer.  What remains is the weight gradient, the exact backward of activations/norms, and the
hooks' per-layer Python overhead; so DFA beats BP where compute dominates (CPU) and is on par
with BP-through-hooks where kernel launches dominate (small models on a GPU).  Measured
ratios: ``results/notes/direct_feedback.md``.

Scaling
-------
``B`` entries have standard deviation ``scale / sqrt(F)``, ``F`` the number of input units
that receive the projection of one error vector (``D`` in dense mode; ``C`` times the number
of broadcast positions in channel mode), so that ``E||e B||^2 = ||e||^2``: every layer gets a
signal of the norm of the output error, the order of magnitude of BP's signal below the last
layer.  ``init="uniform"`` (default) draws ``U(-sqrt(3) s, sqrt(3) s)``, ``"normal"`` draws
``N(0, s^2)``, ``s = scale / sqrt(F)``.

The rules
---------
* ``dfa`` -- Nøkland, *Direct Feedback Alignment Provides Learning in Deep Neural Networks*,
  NeurIPS 2016; projected signal ``e``.
* ``bdfa`` -- binary DFA (Han & Yoo, *Efficient Convolutional Neural Network Training with
  Direct Feedback Alignment*, ICLR 2019 submission, arXiv:1901.01986): sign-valued feedback
  ``B = s * sign(R)``, entries ``+-s`` with ``s = scale / sqrt(F)``.  (The paper also proposes
  a feedback initialisation derived from the patterns of the random matrices; its exact recipe
  is not reproduced here.)
* ``drtp`` -- direct random target projection (Frenkel, Lefebvre & Bol, *Learning without
  feedback*, Frontiers in Neuroscience 2021): the projected signal is the target, not the
  error: ``dx = (-y* / c) @ B`` (by default with ``y*`` centred, ``y* - 1/K``: see
  :class:`DRTP`) with ``y*`` the one-hot target and ``c`` the normaliser of the
  cross-entropy error ``e = (softmax(z) - y*) / c`` (``c = R``, the number of error rows ``N``
  or ``N*T``, for the plain batch mean; ``R k`` for ``loss / k``), i.e. the target part of the
  error, so it scales with the loss like every gradient.  (Frenkel writes ``B^T y*``; ``B`` is
  symmetric random, so the sign convention only fixes which of ``B``, ``-B`` is used.)  With
  ``gate=True`` (an option) each row's signal is scaled by ``1 - p_t``, i.e. the target
  component of the error is projected (see :class:`DRTP`).  The output layer still trains on
  its true gradient.  ``target="ce"`` (default) recovers ``y*``
  and ``c`` from the captured error of a hard-label ``F.cross_entropy`` on the named output,
  any reduction or scale (see :class:`DRTP`); another loss, or soft labels, raise.
  ``target="given"``: call ``localopt.set_targets(model, y, scale=s)`` (class indices or
  ``(N, K)`` targets; ``s`` the loss scale beyond the batch mean) before each backward.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import check_bool, check_choice, register_rule
from .direct_base import DirectRule

__all__ = ["DirectRule", "DFA", "BDFA", "DRTP", "set_targets"]


@register_rule
class DFA(DirectRule):
    """Direct feedback alignment (Nøkland 2016); module-wise DFA with ``modules=[...]``
    (Han et al. 2020).  See :mod:`localopt.rules.direct` for the exact math.

    Options:
        feedback: ``"dense"`` (default; B: (E, D)) or ``"channel"`` (B: (K, C), shared over
            positions; memory-bounded).
        init: ``"uniform"`` (default) or ``"normal"``; entries have std ``scale / sqrt(F)``.
        scale: multiplier of the feedback (default 1.0).
        output: index or key of the output tensor the loss uses, for models returning a
            tuple/list/dict.
        modules: names (``fnmatch`` patterns) or types of the modules that receive the direct
            signal at their input (module-wise DFA).
        inside: with ``modules``: ``"bp"`` (default; exact backprop inside each module) or
            ``"fa"`` (feedback alignment inside each module).
        channel_dim: feature axis of the inputs for ``feedback="channel"`` (default: 1 for
            convs and 4-D/5-D inputs of modules, -1 for Linear and 2-D/3-D inputs).
        max_feedback_mb: bound on the total feedback memory (default 1024).

    State: buffer ``localopt_feedback`` on each hooked module (empty until the first forward).
    """

    name = "dfa"


@register_rule
class BDFA(DirectRule):
    """Binary DFA (Han & Yoo 2019): DFA with sign-valued feedback ``B = s * sign(R)``,
    ``s = scale / sqrt(F)``.  Options as :class:`DFA` (``init`` is ignored)."""

    name = "bdfa"
    binary = True


@register_rule
class DRTP(DirectRule):
    """Direct random target projection (Frenkel et al. 2021): the projected signal is the
    target, ``dx = (-u/c) @ B``, ``c`` the loss's normaliser and ``u`` the one-hot target
    ``y*`` centred, ``u = y* - 1/K`` (``center=True``, the default) or ``u = y*`` as in the
    paper (``center=False``).

    Why centred by default: the paper's signal has a part common to every sample,
    ``-(1/K) sum_k B_k / c``, which is the batch mean of ``-y* B / c`` over balanced classes.
    It carries no information about the sample, never fades, and pushes every hidden unit
    (its bias, BatchNorm's shift, and through ``delta x^T`` its weights) along one fixed
    direction at every step.  Frenkel et al. trained tanh/sigmoid networks, which saturate;
    with ReLU and BatchNorm nothing stops the drift.  On ResNet-20 (the table's cpu protocol, lr
    1e-3) the paper's form diverged (training loss 2.2 -> 9.4 in epochs 5-9).  At a constant
    lr of 3e-3 it diverged within 350 steps, where the centred form trained (the row
    ``drtp-published`` keeps the paper's form).  ``u = y* - 1/K`` is ``-c e`` for an output at
    chance (``p = 1/K``), so it is still known from the target alone, before the forward ends.

    ``gate=True`` (an option of this library, not of the paper; off by default): each row's
    signal is the error's component along ``u``, ``dx = P(e) @ B`` with ``P(e) = u (e . u) /
    ||u||^2`` -- with ``center=False`` and a hard-label cross-entropy ``-(1 - p_t) y* / c``,
    the published signal times how far the sample still is from its target.  Its size fades
    as a sample is learned.  It does not stop ResNet-20's divergence (at a constant lr of 0.02
    both the paper's and the gated signal diverged within 100 steps), so it stays off.  Its
    price: the gate needs ``p_t``, so the hidden layers wait for the output, as ``dfa``'s do;
    without it the signal is known from the target alone, before the forward pass ends (what
    :mod:`localopt.pipeline`'s direct schedule sends).

    Options ``center``, ``gate`` (above) and ``target`` (besides those of :class:`DFA`):

    * ``"ce"`` (default): for a hard-label cross-entropy loss on the output, with any
      reduction and scale (``F.cross_entropy(z, y) / k`` for gradient accumulation, ``sum``
      reduction, a loss scaler), read from the captured error ``e = (softmax(z) - y*) / c``:
      ``y*`` is one-hot at each row's most negative error, and the batch's ``c`` is recovered
      as ``sum p / sum e`` over the non-target entries (in float64; there ``e = p / c``
      exactly up to rounding, also where ``p`` is nearly one-hot).  Rows whose error vanished
      (``p`` one-hot in ``e``'s precision) carry no scale and are left out; when every row
      has, ``c = R`` (the unscaled mean over the ``R`` error rows).  So the signal scales with
      the loss, and micro-batches with losses ``mean / k`` accumulate to the whole batch's.
      If ``softmax(z) - c e`` is not one-hot (another loss, or soft labels: label smoothing
      and a loss scale cannot be told apart in ``e``) the backward raises.
    * ``"given"``: ``localopt.set_targets(model, y, scale=s)`` before each backward (class
      indices, or one-hot/soft targets of any loss); the signal is ``-s u / R`` -- the
      target part of ``s`` times a mean-reduced loss's error.  Pass the loss's scale as
      ``s``: ``1/k`` for ``loss / k`` over ``k`` equal micro-batches (``n_i / N`` for a
      micro-batch of ``n_i`` of ``N`` samples), ``R`` for a ``sum`` reduction.
    """

    name = "drtp"

    def __init__(self, *, target: str = "ce", center: bool = True, gate: bool = False,
                 feedback: str = "dense", init: str = "uniform", scale: float = 1.0,
                 output: "int | str | None" = None, modules: Any = None,
                 channel_dim: "int | None" = None, max_feedback_mb: float = 1024.0,
                 inside: str = "bp") -> None:
        check_choice(self.name, "target", target, ("ce", "given"))
        self.center = check_bool(self.name, "center", center)
        self.gate = check_bool(self.name, "gate", gate)
        super().__init__(feedback=feedback, init=init, scale=scale, output=output,
                         modules=modules, channel_dim=channel_dim,
                         max_feedback_mb=max_feedback_mb, inside=inside)
        self.target = target
        self.needs_output = target == "ce"

    def _direction(self, y: Tensor) -> Tensor:
        """``u``: the targets, centred over the classes with ``center=True``."""
        return y - y.mean(-1, keepdim=True) if self.center else y

    def target_signal(self, y: Tensor, scale: Tensor | float) -> Tensor:
        """The projected signal from the targets ``y`` (one-hot or soft, shaped like the
        output): ``-scale * u`` with ``u = y - mean_k(y)`` (``center=True``) or ``u = y``
        (the paper's); ``scale`` is ``1/c``, the loss's normaliser (``1/R`` for a batch mean
        over ``R`` error rows).  What every stage of :mod:`localopt.pipeline` computes from
        the labels alone."""
        return self._direction(y) * (-scale)

    def gated_signal(self, y: Tensor, e: Tensor) -> Tensor:
        """``gate=True``: the error's component along the target direction ``u`` (as in
        :meth:`target_signal`), row by row: ``u (e . u) / ||u||^2``."""
        u = self._direction(y)
        return u * ((e * u).sum(-1, keepdim=True) /
                    u.square().sum(-1, keepdim=True).clamp_min(1e-30))

    def give_targets(self, targets: Tensor, scale: float) -> bool:
        """Hold ``(targets, scale)`` for the next backward pass (``target="given"``; see
        :func:`set_targets`, which checks them); False when the rule is not installed."""
        if self._state is None:
            return False
        self._state.targets = (targets.detach(), float(scale))
        return True

    def source(self, e: Tensor, out: Tensor | None) -> Tensor:
        if self.target == "ce":
            onehot, c = _ce_target(out, e)
            if self.gate:
                return self.gated_signal(onehot, e.detach().reshape(onehot.shape).double()) \
                    .to(e.dtype).reshape(e.shape)
            return self.target_signal(onehot, 1.0 / c).to(e.dtype).reshape(e.shape)
        K = e.shape[-1]
        R = e.numel() // K
        st = self._state
        given, st.targets = (st.targets if st is not None else None), None
        if given is None:
            raise RuntimeError("localopt: rule 'drtp' with target='given': call "
                               "localopt.set_targets(model, y) before each backward")
        y, scale = given
        if not torch.is_floating_point(y):
            y = F.one_hot(y.long(), K)
        if y.shape != e.shape:
            raise RuntimeError(f"localopt: rule 'drtp': targets of shape {tuple(y.shape)} "
                               f"do not match the output {tuple(e.shape)} (give class "
                               "indices or one-hot/soft targets shaped like the output)")
        y = y.to(device=e.device, dtype=e.dtype)
        if self.gate:  # the error's projection on the target, row by row
            return self.gated_signal(y, e)
        return self.target_signal(y, scale / R)


def _ce_target(z: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
    """The one-hot target ``y*`` (float64, ``(R, K)``) and the loss's normaliser ``c`` (a 0-d
    float64 tensor) from the output ``z`` and its error ``e = (softmax(z) - y*) / c`` under a
    hard-label cross-entropy of any scale (see :class:`DRTP`).  Tensor ops only (no sync)."""
    K = e.shape[-1]
    R = e.numel() // K
    e2 = e.detach().reshape(-1, K).double()
    p = torch.softmax(z.detach().reshape(-1, K).double(), -1)
    # the target: the most negative error; among ties (zeros where p rounded to one-hot or
    # underflowed) the most probable class
    t = torch.where(e2 == e2.amin(-1, keepdim=True), p, -1.0).argmax(-1, keepdim=True)
    off = torch.ones_like(e2, dtype=torch.bool).scatter_(-1, t, False)
    live = (e2 > 0).any(-1, keepdim=True)          # rows whose error did not vanish
    num = torch.where(off & live, p, 0.0).sum()
    den = torch.where(off & live, e2, 0.0).sum()
    c = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny),
                    torch.full_like(den, float(R)))
    onehot = torch.zeros_like(e2).scatter_(-1, t, 1.0)
    tol = max(1e-3, 4 * torch.finfo(e.dtype).eps)
    torch._assert_async((p - c * e2 - onehot).abs().amax() <= tol,
                        "localopt: rule 'drtp' (target='ce'): softmax(z) - c e is not a one-hot "
                        "target for any loss scale c: the loss is not hard-label cross-entropy "
                        "on the output. Use target='given' with localopt.set_targets(model, y, "
                        "scale=...)")
    return onehot, c


def set_targets(model: nn.Module, targets: Tensor, scale: float = 1.0) -> None:
    """Give ``drtp`` (``target="given"``) the targets of the next backward pass: class indices
    ``(N,)``/``(N, T)`` or one-hot/soft targets shaped like the output.  The hidden layers
    receive ``-scale * y* / R`` (``R`` error rows): ``scale`` is the factor the loss carries
    beyond a batch mean (``1/k`` for ``loss / k`` gradient accumulation over ``k``
    micro-batches; see :class:`DRTP`)."""
    from ..wrap import wrapping
    rec = wrapping(model)
    if rec is None or not isinstance(rec.rule, DRTP):
        raise ValueError("localopt.set_targets: this model is not wrapped with rule 'drtp'")
    if not isinstance(targets, Tensor):
        raise TypeError(f"localopt.set_targets: targets must be a Tensor, got "
                        f"{type(targets).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"localopt.set_targets: scale={scale!r} must be a positive number")
    if not rec.rule.give_targets(targets, scale):
        raise ValueError("localopt.set_targets: this model is not wrapped with rule 'drtp'")
