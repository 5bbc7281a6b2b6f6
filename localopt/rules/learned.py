"""Shared by the rules that learn their feedback (``kp``, ``wm``, ``bfa``, ...).

Their feedback is updated by :class:`localopt.optim.LocalOptimizer`; with a plain torch
optimizer the weights would train while ``B`` stayed where it started -- silently plain
feedback alignment.  :class:`LearnsFeedback` detects that: it remembers the version counter
of each wrapped weight at the last feedback update, and the first forward pass that finds a
weight changed without one warns once, naming the fix.  Loading a state dict re-synchronises.
"""
from __future__ import annotations

import warnings

from torch import nn

from ..mechanism import Site

__all__ = ["LearnsFeedback"]


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
            s.weight_version = s.module.weight._version

    def check_synced(self, site: Site) -> None:
        """Called in forward: warn once if the weight changed without a feedback update."""
        if site.module.weight._version != site.weight_version and not self._warned:
            self._warned = True
            warnings.warn(
                f"localopt: rule {self.name!r} learns its feedback, but the weight of "
                f"'{site.name}' changed without a feedback update, so B is not learning (this "
                "is plain feedback alignment).  Train with localopt.optim.LocalOptimizer(model, "
                "torch.optim.SGD, lr=...) -- or any torch optimizer class in place of SGD -- "
                "instead of a plain torch optimizer.", UserWarning, stacklevel=4)
