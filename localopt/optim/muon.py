"""Muon (Jordan et al. 2024) for conv nets and MLPs: torch's Muon update on every weight
viewed as a matrix, plain SGD for the rest."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.sgd import sgd as _torch_sgd

try:  # torch.optim.Muon and its functional update: torch >= 2.9
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS
    from torch.optim._muon import muon as _torch_muon
except ImportError:  # pragma: no cover - older torch: Muon() says what to install
    _torch_muon = None
    DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS = 3.4445, -4.7750, 2.0315, 5, 1e-7

__all__ = ["Muon", "muon_param_groups"]

_ADJUST_LR = (None, "original", "match_rms_adamw", "spectral_unclamped")


class Muon(Optimizer):
    r"""Muon on the hidden layers' weights, SGD with momentum on everything else.

    Muon ("MomentUm Orthogonalized by Newton-Schulz"; Jordan et al. 2024, "Muon: An optimizer
    for hidden layers in neural networks", https://kellerjordan.github.io/posts/muon/) replaces
    each weight matrix's momentum update by its nearest semi-orthogonal matrix.  For a weight
    :math:`W` with gradient :math:`g_t` (both viewed as matrices, below), in a group with
    ``use_muon=True``:

    .. math::
        B_t = \mu B_{t-1} + (1-\mu)\,g_t, \qquad
        \tilde B_t = \begin{cases} (1-\mu)\,g_t + \mu B_t & \text{nesterov} \\
                                   B_t & \text{otherwise} \end{cases}, \qquad
        O_t = \mathrm{NS}^{(a,b,c)}_k(\tilde B_t; \varepsilon),

    .. math::
        W_t = (1 - \eta\lambda)\,W_{t-1} - \eta\,s(A, B)\,O_t

    where :math:`\mathrm{NS}` is ``ns_steps`` = :math:`k` quintic Newton-Schulz iterations
    (coefficients ``ns_coefficients`` = :math:`(a, b, c)`, in bfloat16, after dividing by the
    Frobenius norm plus ``eps``), which map :math:`\tilde B = USV^\top` to roughly
    :math:`UV^\top`; :math:`\lambda` is a *decoupled* ``weight_decay``; and :math:`s(A, B)` for
    an :math:`A\times B` matrix is ``adjust_lr_fn``'s scale: ``None``/``"original"``
    (Keller Jordan's) :math:`\sqrt{\max(1, A/B)}`, ``"match_rms_adamw"`` (Moonshot's)
    :math:`0.2\sqrt{\max(A, B)}`, ``"spectral_unclamped"`` :math:`\sqrt{A/B}`.  The update is
    torch's own (``torch.optim._muon.muon``, the function behind ``torch.optim.Muon``), called
    on matrix views: nothing of it is reimplemented here.  With the original scaling, Muon's
    ``lr`` is typically 0.02-0.05 (its updates have unit spectral norm, whatever the gradient's
    scale).

    **Conv kernels and other N-d weights.**  ``torch.optim.Muon`` takes 2-D parameters only.
    Here each parameter of a Muon group with shape ``(out, *rest)`` -- and its gradient and
    momentum buffer -- is viewed as the ``(out, prod(rest))`` matrix: a conv kernel
    ``(out, in, kh, kw)`` as ``(out, in*kh*kw)``, as in Keller Jordan's CIFAR-10 speedruns.  A
    2-D weight is updated exactly as by ``torch.optim.Muon``.  (Non-contiguous weights, e.g.
    ``channels_last`` conv kernels, are updated through a contiguous copy.)

    **The other parameters.**  Muon is meant for hidden layers: biases, norm scales and, by
    convention, the first layer and the classifier go into groups with ``use_muon=False``,
    which this optimizer steps exactly as ``torch.optim.SGD`` (``torch.optim.sgd.sgd``:
    :math:`B_t = \mu B_{t-1} + g_t` with :math:`g_t` including the *coupled* L2 term
    :math:`\lambda W`; nesterov :math:`g_t + \mu B_t`; :math:`W_t = W_{t-1} - \eta\,(\cdot)`).
    :func:`muon_param_groups` makes the two groups from a model.

    Every group has ``lr``, ``momentum``, ``nesterov``, ``weight_decay`` (so LR schedulers,
    including ``OneCycleLR(cycle_momentum=True)``, work on both kinds); Muon groups also read
    ``ns_steps``, ``eps``, ``ns_coefficients`` and ``adjust_lr_fn``.  The state of every
    parameter is ``momentum_buffer``, shaped like the parameter (Muon groups: from the first
    step; SGD groups: when ``momentum != 0``, as in torch), so ``state_dict`` and
    ``load_state_dict`` work as for any torch optimizer.

    Args:
        params: parameters or param groups; a group's ``use_muon`` (default True) picks the
            update, and every parameter of a Muon group must have at least 2 dimensions.
        lr: learning rate :math:`\eta` (default 1e-3, as ``torch.optim.Muon``).
        momentum: :math:`\mu` (default 0.95).
        nesterov: Nesterov momentum (default True; SGD groups need ``momentum > 0`` for it).
        weight_decay: :math:`\lambda` (default 0; note that ``torch.optim.Muon``'s is 0.1):
            decoupled in Muon groups, an L2 penalty in SGD groups (as torch.optim.SGD).
        ns_coefficients, eps, ns_steps, adjust_lr_fn: as ``torch.optim.Muon``.
        use_muon: the default for groups that do not set it.

    Example::

        groups = localopt.optim.muon_param_groups(model)   # hidden weights | the rest
        opt = localopt.optim.Muon(groups, lr=0.02, momentum=0.9, nesterov=True)
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0,
                 ns_coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
                 eps: float = EPS, ns_steps: int = DEFAULT_NS_STEPS,
                 adjust_lr_fn: str | None = None, use_muon: bool = True) -> None:
        if _torch_muon is None:
            raise ImportError("localopt.optim.Muon needs torch >= 2.9 (torch.optim.Muon and its "
                              f"functional update torch.optim._muon.muon); this is torch "
                              f"{torch.__version__}. Upgrade torch, or use another optimizer.")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn, use_muon=use_muon)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"Muon: param group {len(self.param_groups) - 1} (use_muon={group['use_muon']})"
        for key in ("lr", "momentum", "weight_decay", "eps"):
            value = group[key]
            if not (isinstance(value, Tensor) or value >= 0):
                raise ValueError(f"{where}: {key}={value!r} must be >= 0")
        if group["adjust_lr_fn"] not in _ADJUST_LR:
            raise ValueError(f"{where}: adjust_lr_fn={group['adjust_lr_fn']!r}: choose one of "
                             f"{', '.join(map(repr, _ADJUST_LR))}")
        if len(tuple(group["ns_coefficients"])) != 3 or not 0 < group["ns_steps"] < 100:
            raise ValueError(f"{where}: ns_coefficients must be 3 numbers and 0 < ns_steps < 100, "
                             f"got {group['ns_coefficients']!r}, {group['ns_steps']!r}")
        if group["use_muon"]:
            for i, p in enumerate(group["params"]):
                _check_matrix(p, f"{where}, parameter {i}")
        elif group["nesterov"] and group["momentum"] <= 0:
            raise ValueError(f"{where}: nesterov=True needs momentum > 0 in an SGD group "
                             "(as torch.optim.SGD)")

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a ``.grad``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            if group["use_muon"]:
                self._muon_step(index, group)
            else:
                self._sgd_step(group)
        return loss

    def _muon_step(self, index: int, group: dict[str, Any]) -> None:
        params, grads, bufs, copies = [], [], [], []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            _check_matrix(p, f"Muon: param group {index} (use_muon=True), parameter {i}")
            if p.numel() == 0:
                continue
            if torch.is_complex(p):
                raise RuntimeError("Muon does not support complex parameters")
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.contiguous_format)
            buf = state["momentum_buffer"]
            pm, bm = _matrix(p), _matrix(buf)
            params.append(pm)
            bufs.append(bm)
            grads.append(p.grad.reshape(pm.shape))
            copies += [(t, m) for t, m in ((p, pm), (buf, bm)) if not t.is_contiguous()]
        if not params:
            return
        _torch_muon(params, grads, bufs, lr=group["lr"], weight_decay=group["weight_decay"],
                    momentum=group["momentum"], nesterov=group["nesterov"],
                    ns_coefficients=tuple(group["ns_coefficients"]), ns_steps=group["ns_steps"],
                    eps=group["eps"], adjust_lr_fn=group["adjust_lr_fn"], has_complex=False)
        for t, m in copies:  # updated through a copy: write back
            t.copy_(m.view(t.shape))

    def _sgd_step(self, group: dict[str, Any]) -> None:
        # torch.optim.SGD.step with dampening 0, maximize False, foreach/fused chosen by torch
        params, grads, bufs = [], [], []
        has_sparse_grad = False
        for p in group["params"]:
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            has_sparse_grad |= p.grad.is_sparse
            if group["momentum"] != 0:
                bufs.append(self.state[p].get("momentum_buffer"))
        if not params:
            return
        _torch_sgd(params, grads, bufs, weight_decay=group["weight_decay"],
                   momentum=group["momentum"], lr=group["lr"], dampening=0.0,
                   nesterov=group["nesterov"], maximize=False, has_sparse_grad=has_sparse_grad,
                   grad_scale=getattr(self, "grad_scale", None),
                   found_inf=getattr(self, "found_inf", None))
        if group["momentum"] != 0:
            for p, buf in zip(params, bufs):
                self.state[p]["momentum_buffer"] = buf


def _check_matrix(p: Tensor, where: str) -> None:
    # An empty placeholder (a rule's lazily shaped feedback, e.g. dkp's) is checked at step.
    if p.ndim < 2 and p.numel() > 0:
        raise ValueError(f"{where} has shape {tuple(p.shape)}: Muon updates parameters with at "
                         "least 2 dimensions (viewed as (shape[0], -1) matrices); put biases, "
                         "norm scales and other 1-D parameters in a group with use_muon=False "
                         "(see localopt.optim.muon_param_groups)")
    if p.ndim < 2 and p.grad is not None:
        raise ValueError(f"{where} has shape {tuple(p.shape)} at the step: Muon updates "
                         "parameters with at least 2 dimensions")


def _matrix(t: Tensor) -> Tensor:
    """``t`` as a ``(shape[0], -1)`` matrix: a view when ``t`` is contiguous, else a copy."""
    return t.view(t.shape[0], -1) if t.is_contiguous() else t.reshape(t.shape[0], -1).clone()


def muon_param_groups(model: nn.Module, *, exclude: Iterable[str] = ("first", "last"),
                      aux: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a Muon group and an SGD group.

    The Muon group (``use_muon=True``) holds every weight with ``ndim >= 2`` except those
    named in ``exclude``: ``"first"`` and ``"last"`` are the first and the last such weight in
    ``model.named_parameters()`` order (the input layer and the classifier, by Muon's
    convention); other entries are parameter names (``"fc.weight"``).  The SGD group
    (``use_muon=False``) holds the rest: excluded weights, biases, norm scales, ... ``aux``
    adds hyperparameters to the SGD group only (e.g. ``{"lr": 0.1}``).  Empty groups are left
    out.  Pass the result to :class:`Muon`.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matrices = [n for n, p in named if p.ndim >= 2]
    is_matrix = set(matrices)
    names = {n for n, _ in named}
    skip = set()
    for e in exclude:
        if e in ("first", "last"):
            if matrices:
                skip.add(matrices[0] if e == "first" else matrices[-1])
        elif e in names:
            skip.add(e)
        else:
            raise ValueError(f"muon_param_groups: exclude entry {e!r} is neither 'first', "
                             f"'last' nor a trainable parameter of {type(model).__name__}")
    muon = [p for n, p in named if n in is_matrix and n not in skip]
    other = [p for n, p in named if n not in is_matrix or n in skip]
    groups = [{"params": muon, "use_muon": True},
              {"params": other, "use_muon": False, **(aux or {})}]
    return [g for g in groups if g["params"]]
