"""Batch Manhattan (Liao, Leibo & Poggio 2016)."""
from __future__ import annotations

import torch
from torch.optim import Optimizer

__all__ = ["BatchManhattan"]


class BatchManhattan(Optimizer):
    r"""Batch Manhattan update: SGD on the elementwise sign of the mini-batch gradient.

    Liao, Leibo & Poggio, "How important is weight symmetry in backpropagation?" (AAAI 2016)
    found that sign-concordant feedback trains deep nets only when the update discards the
    gradient's magnitude.  For each parameter with mini-batch gradient :math:`g_t`:

    .. math::
        d_t = \operatorname{sign}(g_t) + \lambda\,\theta_{t-1}, \qquad
        v_t = \mu\,v_{t-1} + d_t, \qquad
        \theta_t = \theta_{t-1} - \eta\,v_t

    (:math:`\lambda` = ``weight_decay``, :math:`\mu` = ``momentum``; with ``momentum=0``,
    :math:`\theta_t = \theta_{t-1} - \eta\,d_t`).  The sign is taken of the whole mini-batch
    gradient (hence *batch*), and momentum and decay act after it.

    Args:
        params: iterable of parameters or param groups.
        lr: learning rate :math:`\eta` (the size of every element's step before momentum).
        momentum: :math:`\mu` (default 0).
        weight_decay: :math:`\lambda` (default 0).
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        if lr < 0.0:
            raise ValueError(f"BatchManhattan: invalid lr={lr}")
        if momentum < 0.0:
            raise ValueError(f"BatchManhattan: invalid momentum={momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"BatchManhattan: invalid weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            d = torch._foreach_sign([p.grad for p in params])
            if group["weight_decay"] != 0:
                torch._foreach_add_(d, params, alpha=group["weight_decay"])
            if group["momentum"] != 0:
                bufs = []
                for p, dp in zip(params, d):
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = dp.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(dp)
                    bufs.append(state["momentum_buffer"])
                d = bufs
            torch._foreach_add_(params, d, alpha=-group["lr"])
        return loss
