"""Shared by the rules that learn their feedback (``kp``, ``wm``, ``bfa``, ...).

Their feedback is updated by :class:`localopt.optim.LocalOptimizer`; with a plain torch
optimizer the weights would train while ``B`` stayed where it started -- silently plain
feedback alignment.  :class:`LearnsFeedback` detects that: it remembers the version counter
of each wrapped weight at the last feedback update, and the first forward pass that finds a
weight changed without one warns once, naming the fix.  Loading a state dict re-synchronises.

Step semantics (as for ``.grad``): what a feedback update learns from a batch is accumulated
by that batch's *backward* pass only -- a forward pass alone (a validation pass without
``torch.no_grad``, a NaN batch that is skipped) never changes what the next step does.  The
pending signal is ``B.grad`` of the feedback buffer (``bfa``/``bidfa``: plus its least-squares
normaliser ``site.feedback_norm``); several backward passes add up (gradient accumulation,
``retain_graph``), :class:`localopt.optim.LocalOptimizer`'s ``step`` consumes it and its
``zero_grad`` (either ``set_to_none``) discards it.  :func:`accumulate_feedback_grad`,
:func:`zero_feedback_grads` and :func:`apply_feedback_grads` are that one mechanism.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..mechanism import Site

__all__ = ["LearnsFeedback", "anchor", "accumulate_feedback_grad", "zero_feedback_grads",
           "apply_feedback_grads"]


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
        self._learned_sites = sites
        # a bound method, not a closure: the wrapped model stays picklable (torch.save(model))
        # and a deepcopy's hook re-synchronises the copy's sites, not the original's
        self._load_hook = model.register_load_state_dict_post_hook(self._synced_after_load)

    def detach(self, model: nn.Module, sites: list[Site]) -> None:
        self._load_hook.remove()
        super().detach(model, sites)

    def _synced_after_load(self, module: nn.Module, incompatible_keys) -> None:
        self.synced(self._learned_sites)

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


def accumulate_feedback_grad(site: Site, grad: Tensor, norm: Tensor | None = None) -> None:
    """Add one backward pass's feedback gradient to ``B.grad`` of ``site``'s feedback (copied
    on the first add, never aliased) and, for the normalised least-squares rules, its
    normaliser to ``site.feedback_norm`` (the step divides the sums: accumulating micro-batches
    gives exactly the update of their union)."""
    B = site.buffer("feedback")
    with torch.no_grad():
        grad = grad.detach().to(B.dtype)  # B's dtype: grads computed under autocast are bf16
        B.grad = grad.clone() if B.grad is None else B.grad.add_(grad)
        if norm is not None:
            cur = site.feedback_norm
            site.feedback_norm = norm.detach().clone() if cur is None else cur.add_(norm)


def zero_feedback_grads(sites: list[Site], set_to_none: bool = True) -> None:
    """Discard the feedback signals accumulated since the last step (``zero_grad`` of the
    optimizers): ``B.grad`` and ``feedback_norm`` set to ``None``, or zeroed in place."""
    for s in sites:
        B = s.buffer("feedback") if s.has_buffer("feedback") else None
        if B is not None and B.grad is not None:
            if set_to_none:
                B.grad = None
            else:
                B.grad.zero_()
        norm = s.feedback_norm
        if norm is not None:
            s.feedback_norm = None if set_to_none else norm.zero_()


@torch.no_grad()
def apply_feedback_grads(sites: list[Site], lr: float, decay: float) -> None:
    """``B <- B - lr (B.grad / feedback_norm + decay B)`` for each site's ``localopt_feedback``
    with a pending ``.grad`` (accumulated by the rule's backward passes since the last step;
    ``feedback_norm`` 1 when the rule keeps none), then clear both."""
    for s in sites:
        B = s.buffer("feedback")
        G = B.grad
        if G is None:
            continue
        norm = s.feedback_norm
        if norm is not None:  # zeroed by zero_grad(set_to_none=False) with G: a zero update
            G = G / norm.clamp_min(1e-12).to(G.dtype)
        if decay:
            B.mul_(1.0 - lr * decay)
        B.add_(G, alpha=-lr)
        B.grad = None
        s.feedback_norm = None


def feature_sum(x: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """The sum of ``x`` over every dimension but ``dim`` (one value per feature), in ``dtype``:
    the input sum that ``drop_mean`` accumulates."""
    return x.movedim(dim, -1).reshape(-1, x.shape[dim]).sum(0, dtype=dtype)


def split_pending_input_sum(site: Site) -> Tensor | None:
    """For a pending feedback step whose normaliser was accumulated as ``[normaliser, sum_i
    x_i...]`` (``drop_mean`` of ``bfa``/``bidfa``): keep the normaliser in
    ``site.feedback_norm`` and return the input sum (None when no step is pending)."""
    B, st = site.buffer("feedback"), site.feedback_norm
    if B.grad is None or st is None:
        return None
    site.feedback_norm = st[0]
    return st[1:].to(B.dtype)


@torch.no_grad()
def drop_input_direction(B: Tensor, v: Tensor, groups: int = 1) -> None:
    """Remove from ``B`` (in place) its component along the direction ``v`` of its input
    dimension (dim 1; a ``(outputs, inputs)`` matrix or a conv kernel ``(out, in / groups,
    *kernel)``): ``B_g <- B_g - (B_g . u_g) u_g`` contracting dim 1, ``u_g = v_g / ||v_g||`` for
    each group's share ``v_g`` of ``v`` -- so ``delta B`` has no component along ``v``, at any
    position.  A zero ``v_g`` leaves its group as it is."""
    Bg = B.view(groups, B.shape[0] // groups, B.shape[1], -1)           # (g, o, c, k)
    u = v.reshape(groups, -1).to(B.dtype)
    u = u / torch.linalg.vector_norm(u, dim=1, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)
    Bg.sub_(torch.einsum("gok,gc->gock", torch.einsum("gock,gc->gok", Bg, u), u))

