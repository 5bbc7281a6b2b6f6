"""Shared by the rules that learn their feedback (``kp``, ``wm``, ``bfa``, ...).

Their feedback is updated by :class:`localopt.optim.LocalOptimizer`; with a plain torch
optimizer the weights would train while ``B`` stayed where it started -- silently plain
feedback alignment.  :class:`LearnsFeedback` detects that: it remembers the version counter
of each wrapped weight at the last feedback update, and the first forward pass that finds a
weight changed without one warns once, naming the fix.  Loading a state dict re-synchronises.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..mechanism import Site

__all__ = ["LearnsFeedback", "anchor", "apply_feedback_grads"]


def anchor(site: Site) -> Tensor | None:
    """The parameter whose updates the site's feedback follows: the layer's weight (the first
    parameter of a module without one)."""
    w = getattr(site.module, "weight", None)
    return w if isinstance(w, Tensor) else next(site.module.parameters(), None)


class LearnsFeedback:
    """Mixin for rules whose feedback is learned in the optimizer step."""

    learns_feedback = True

    def attach(self, model: nn.Module, sites: list[Site]) -> None:
        super().attach(model, sites)
        self._warned = False
        self.synced(sites)
        self._load_hook = model.register_load_state_dict_post_hook(
            lambda module, keys: self.synced(sites))

    def detach(self, model: nn.Module, sites: list[Site]) -> None:
        self._load_hook.remove()
        super().detach(model, sites)

    def synced(self, sites: list[Site]) -> None:
        """Record that the feedback of ``sites`` is up to date with their weights."""
        for s in sites:
            w = anchor(s)
            s.weight_version = None if w is None else w._version

    def check_synced(self, site: Site) -> None:
        """Called in forward: warn once if the weight changed without a feedback update.

        Skipped while ``torch.compile`` traces the forward (a version counter cannot be read
        in a graph; reading it would break the graph at every layer): the check runs in eager
        forwards, so the first steps of a run -- or any eager forward -- still catch a plain
        torch optimizer."""
        if torch.compiler.is_compiling():
            return
        w = anchor(site)
        if w is not None and w._version != site.weight_version and not self._warned:
            self._warned = True
            warnings.warn(
                f"localopt: rule {self.name!r} learns its feedback, but the weight of "
                f"'{site.name}' changed without a feedback update, so B is not learning (this "
                "is plain feedback alignment).  Train with localopt.optim.LocalOptimizer(model, "
                "torch.optim.SGD, lr=...) -- or any torch optimizer class in place of SGD -- "
                "instead of a plain torch optimizer.", UserWarning, stacklevel=4)


@torch.no_grad()
def apply_feedback_grads(sites: list[Site], lr: float, decay: float) -> None:
    """``B <- B - lr (B.grad + decay B)`` for each site's ``localopt_feedback`` with a pending
    ``.grad`` (accumulated by the rule since the last step), then clear the ``.grad``."""
    for s in sites:
        B = s.buffer("feedback")
        if B.grad is None:
            continue
        if decay:
            B.mul_(1.0 - lr * decay)
        B.add_(B.grad, alpha=-lr)
        B.grad = None
