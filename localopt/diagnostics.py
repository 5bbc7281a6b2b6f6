"""Per-layer diagnostics: how close a rule's backward pass is to backprop.

* :func:`feedback_angles` -- angle between each layer's feedback ``B`` and its weight ``W``
  (``B`` has W's shape here, so this is the papers' angle between ``B`` and ``W^T``);
* :func:`sign_concordance` -- fraction of entries where ``sign(B) = sign(W)``;
* :func:`update_angles` -- angle between the gradient the rule gives each weight and the true
  backprop gradient on the same batch, from a second pass with the hooks off
  (:func:`compare_to_backprop` adds the ratio of their norms).  Nothing of the
  training state changes: ``.grad`` is untouched (``torch.autograd.grad``), BatchNorm running
  statistics and every other non-feedback buffer are restored, torch's RNG is forked (both
  passes start from the same RNG state, so dropout draws the same masks), and pending
  feedback updates (``B.grad`` of the feedback buffers) are stashed and put back.

Angles are in degrees, computed as ``2 atan2(|u - v|, |u + v|)`` for the unit vectors
``u, v`` (float32 vectors; exactly 0 for equal directions and accurate near 0 and 180
degrees, unlike ``acos`` of the cosine); a zero vector gives ``nan``.  All functions return ``{layer name: value}`` for the wrapped layers
they apply to, with one host synchronisation per call.  :func:`feedback_angles` and
:func:`sign_concordance` cover the feedback-alignment family (rules with a per-layer
``B`` of W's shape: ``bp``, ``fa``, ``usf``, ``brsf``, ``frsf``, ``kp``, ``wm``, ``bfa``);
direct rules (``dfa``, ...) project the output error with a ``B`` that has no weight of the
same shape to compare with and are skipped there -- :func:`update_angles` covers every rule.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .mechanism import Site
from .rules.base import FeedbackRule
from .rng import preserved_streams
from .wrap import hooks_disabled
from .wrap import sites as _sites

__all__ = ["angle", "feedback_angles", "sign_concordance", "update_angles",
           "compare_to_backprop", "report"]


def _angles(pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    out = []
    for a, b in pairs:
        a = a.detach().flatten().float()
        b = b.detach().flatten().to(a.device, torch.float32)
        u, v = a / a.norm(), b / b.norm()
        out.append(2 * torch.atan2((u - v).norm().double(), (u + v).norm().double()).cpu())
    return torch.stack(out) * (180.0 / math.pi) if out else torch.zeros(0, dtype=torch.double)


def angle(a: Tensor, b: Tensor) -> float:
    """Angle in degrees between two tensors seen as vectors (``nan`` if one is zero)."""
    return _angles([(a, b)]).item()


def _name(s: Site) -> str:
    return s.name or "(root)"


def _feedback_pairs(model: nn.Module) -> list[tuple[Site, Tensor, Tensor]]:
    rows = []
    with torch.random.fork_rng(devices=_cuda_devices(model)), torch.no_grad(), \
            preserved_streams(_sites(model)):
        for s in _sites(model):
            if isinstance(s.rule, FeedbackRule):
                rows.append((s, s.rule.feedback(s), s.module.weight))
    return rows


def feedback_angles(model: nn.Module) -> dict[str, float]:
    """Angle (degrees) between each layer's feedback ``B`` and its weight ``W``."""
    rows = _feedback_pairs(model)
    vals = _angles([(B, W) for _, B, W in rows]).tolist()
    return {_name(s): v for (s, _, _), v in zip(rows, vals)}


def sign_concordance(model: nn.Module) -> dict[str, float]:
    """Fraction of the entries of each layer's ``B`` whose sign equals that of ``W``."""
    rows = _feedback_pairs(model)
    if not rows:
        return {}
    vals = torch.stack([(torch.sign(B) == torch.sign(W.detach())).double().mean().cpu()
                        for _, B, W in rows]).tolist()
    return {_name(s): v for (s, _, _), v in zip(rows, vals)}


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


@contextlib.contextmanager
def _preserved(model: nn.Module, site_list: list[Site]):
    """Restore non-feedback buffers and set aside the pending feedback-learning signals (the
    feedback buffers' ``.grad``, least-squares normalisers, target-propagation traces:
    :meth:`~localopt.Rule.take_pending_feedback`)."""
    feedback = {id(t) for site in site_list for _, t in site.state_buffers()}
    saved = [(buf, buf.clone()) for buf in model.buffers() if id(buf) not in feedback]
    rule = site_list[0].rule if site_list else None
    pending = rule.take_pending_feedback(site_list) if rule is not None else None
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)), preserved_streams(site_list):
            yield
    finally:
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
        if rule is not None:
            rule.restore_pending_feedback(site_list, pending)


def _site_weights(model: nn.Module, site_list: list[Site]) -> list[tuple[str, Tensor]]:
    """(name, weight) of every wrapped layer.  Module-wise rules (a wrapped *module* has no
    weight of its own, e.g. module-wise DFA): every layer of the model with a weight matrix /
    kernel, by its name in the model -- the layers inside the wrapped modules and those between
    them, which receive the direct signal through exact backprop."""
    if all(isinstance(getattr(s.module, "weight", None), Tensor) for s in site_list):
        return [(_name(s), s.module.weight) for s in site_list]
    return [(name, m.weight) for name, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() >= 2]


def _rule_and_bp_grads(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], x: Any, y: Any):
    site_list = _sites(model)
    named = _site_weights(model, site_list)
    weights = [w for _, w in named]

    def grads() -> list[Tensor | None]:
        with torch.enable_grad(), torch.random.fork_rng(devices=_cuda_devices(model)):
            loss = loss_fn(model(x), y)
            return list(torch.autograd.grad(loss, weights, allow_unused=True))

    with _preserved(model, site_list):
        g_rule = grads()
        with hooks_disabled(model):
            g_bp = grads()
    keep = [i for i, (a, b) in enumerate(zip(g_rule, g_bp)) if a is not None and b is not None]
    return [named[i][0] for i in keep], [g_rule[i] for i in keep], [g_bp[i] for i in keep]


def update_angles(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], x: Any, y: Any
                  ) -> dict[str, float]:
    """Angle (degrees) between the rule's gradient of each wrapped layer's weight and the
    true backprop gradient, on the batch ``(x, y)`` with ``loss = loss_fn(model(x), y)``.

    Two forward/backward passes (the rule's, then exact backprop with localopt's hooks taken
    off every module -- the user's own hooks stay),
    each from the same RNG state; the model's training state is left as it was (see the
    module docstring).  Runs in the model's current mode (``train()``/``eval()``).
    """
    return compare_to_backprop(model, loss_fn, x, y)["update_angle"]


def compare_to_backprop(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], x: Any, y: Any
                        ) -> dict[str, dict[str, float]]:
    """:func:`update_angles` and, from the same two passes, ``norm_ratio``: ``‖g_rule‖ /
    ‖g_BP‖`` of each wrapped layer's weight gradient (the rule's effective step size relative
    to backprop's).  ``{"update_angle": {layer: deg}, "norm_ratio": {layer: ratio}}``."""
    names, g_rule, g_bp = _rule_and_bp_grads(model, loss_fn, x, y)
    angles = _angles(list(zip(g_rule, g_bp))).tolist()
    if names:
        dev = g_rule[0].device
        norms = torch.stack([torch.stack([a.detach().float().norm().to(dev),
                                          b.detach().float().norm().to(dev)])
                             for a, b in zip(g_rule, g_bp)]).cpu()
        ratios = (norms[:, 0] / norms[:, 1]).tolist()
    else:
        ratios = []
    return {"update_angle": dict(zip(names, angles)), "norm_ratio": dict(zip(names, ratios))}


def report(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor] | None = None, x: Any = None,
           y: Any = None) -> dict[str, dict[str, float]]:
    """All diagnostics in one JSON-ready dict: ``{"feedback_angle": {...},
    "sign_concordance": {...}, "update_angle": {...}, "norm_ratio": {...}}`` (the last two
    only with a batch: :func:`compare_to_backprop`)."""
    out = {"feedback_angle": feedback_angles(model), "sign_concordance": sign_concordance(model)}
    if loss_fn is not None and x is not None:
        out.update(compare_to_backprop(model, loss_fn, x, y))
    return out
