"""The direct schedule: pipelined training for direct-feedback rules without backward locking.

Math (one stage per process, ``S`` stages, ``M`` micro-batches of ``n`` samples)
-----------------------------------------------------------------------------
With a direct rule (:mod:`localopt.rules.direct`) every hooked module ``l`` receives, as the
gradient of its input ``x_l``, the projection ``src @ B_l`` of one signal ``src`` per
micro-batch -- the output error ``e = dL/dz`` (``dfa``, ``bdfa``, ``dkp``; module-wise ``dfa``)
or the target part ``-y*/(n M)`` of the error of the loss ``CE/M`` (``drtp``) -- never
``delta W_l`` from the layer above.  Cut the model so that every stage ``s >= 1`` *begins*
with a hooked module ``f_s`` (its input is read by ``f_s`` only).  Then the gradient at the
output ``h_s`` of stage ``s`` is exactly::

    dL~/dh_s = src @ B_{f_{s+1}}                      (the first hooked module of stage s+1)

which stage ``s`` computes itself, from ``src`` and its own copy of ``B_{f_{s+1}}``; the rest of
its backward -- the exact local gradients of its layers and the direct signals of its own hooked
modules -- needs nothing else.  So:

* stage ``S-1`` runs its forward, the loss ``L_m = loss_fn(z_m, y_m) / M``, computes
  ``e_m = dL_m/dz_m``, sends ``e_m`` (``n x K`` values) to every other stage at once, and runs
  its backward;
* stage ``s < S-1`` runs its backward for micro-batch ``m`` as soon as ``e_m`` has arrived
  (``drtp``: right after its own forward -- the target is known to every stage), without
  waiting for any stage in between;
* no activation gradient crosses a stage boundary, and no stage computes the gradient of its
  own input (the received activation needs none).

Each stage runs a ready forward first, else the oldest ready backward; the gradients
accumulate over the ``M`` micro-batches, so one optimizer step equals the single-process step of
the same rule with gradient accumulation over the same micro-batches (each loss divided by
``M``).  ``dkp`` learns ``B_{f_{s+1}}`` from ``e^T h_s``: that gradient, too, is stage ``s``'s
own, and stage ``s`` steps its copy (the copy on stage ``s+1`` is never used there).
BatchNorm statistics are those of each micro-batch, as in the single-process accumulation.
"""
from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..mechanism import Site
from ..rules.direct import DRTP, DirectRule
from .comm import Link, PipelineError
from .events import Recorder

__all__ = ["DirectRunner", "DIRECT_RULES"]

#: rules the direct schedule runs (module-wise dfa is ``dfa`` with ``modules=[...]``)
DIRECT_RULES = ("dfa", "bdfa", "drtp", "dkp")

_TAG_ACT, _TAG_ERR = 2 << 20, 3 << 20


class DirectRunner:
    """Runs one stage of the direct schedule on this rank (see the module docstring)."""

    def __init__(self, stage: nn.Module, index: int, num_stages: int, rule: DirectRule,
                 next_site: Site | None, microbatches: int, loss_fn, link: Link,
                 recorder: Recorder, in_shape: tuple, in_dtype: torch.dtype, out_shape: tuple,
                 out_dtype: torch.dtype, act_dtype: torch.dtype, device: torch.device) -> None:
        self.stage, self.s, self.S = stage, index, num_stages
        self.rule, self.next_site = rule, next_site
        self.M, self.loss_fn, self.link, self.rec = microbatches, loss_fn, link, recorder
        self.in_shape, self.in_dtype = in_shape, in_dtype
        self.out_shape, self.out_dtype = out_shape, out_dtype     # of the model output z
        self.act_dtype = act_dtype           # of this stage's output, as the next one receives it
        self.device = device
        self.drtp = isinstance(rule, DRTP)

    # -- helpers -------------------------------------------------------------------------------
    def _drtp_signal(self, y: Tensor, z_rows: int, K: int, dtype: torch.dtype) -> Tensor:
        """``-y*/(n M)``: the target part of the error of ``CE/M``, from the given labels."""
        if torch.is_floating_point(y):
            t = y.to(dtype)
        else:
            t = F.one_hot(y.long(), K).to(dtype)
        rows = t.numel() // K
        if rows != z_rows:
            raise PipelineError(f"localopt.pipeline: drtp targets have {rows} rows per "
                                f"micro-batch, the output has {z_rows}")
        return t.mul(-1.0 / (rows * self.M))

    # -- one step --------------------------------------------------------------------------------
    def step(self, x: Tensor | None, y: Tensor | None, N: int) -> Tensor | None:
        """One step on a batch of ``N`` (agreed by every rank); returns the ``M`` micro-batch
        losses on the last stage, None elsewhere.  Messages cross stages in the dtypes of the
        build-time shape pass (under autocast, each is cast to it on sending)."""
        s, S, M, link, rec = self.s, self.S, self.M, self.link, self.rec
        last = s == S - 1
        self._sends: list = []
        n = N // M
        if (last or self.drtp) and y is None:
            raise PipelineError(f"localopt.pipeline: rank {s} needs the targets y "
                                f"({'last stage' if last else 'drtp needs them on every stage'})")
        ys = None if y is None else y.to(self.device).split(n)
        xs = x.to(self.device).split(n) if s == 0 else None
        acts = [link.irecv(torch.empty((n,) + self.in_shape, dtype=self.in_dtype,
                                       device=self.device), s - 1, _TAG_ACT + m, s, m)
                for m in range(M)] if s > 0 else None
        errs = [link.irecv(torch.empty((n,) + self.out_shape, dtype=self.out_dtype,
                                       device=self.device), S - 1, _TAG_ERR + m, s, m)
                for m in range(M)] if not (last or self.drtp) else None
        todo: deque = deque()     # (m, out, next payload, routes) waiting for their signal
        losses = []
        for m in range(M):
            inp = xs[m] if s == 0 else link.wait(acts[m], s, m, f"micro-batch {m}'s activation")
            if last:
                losses.append(self._last(m, inp, ys[m], errs))
                continue
            with rec.span(s, "forward", m), self.rule.collect_routes() as routed, \
                    torch.enable_grad():
                out = self.stage(inp)
                payload = self.rule.forward(self.next_site, out, None)
            self._sends.append(link.isend(out.detach().to(self.act_dtype).contiguous(), s + 1,
                                          _TAG_ACT + m, s, m))
            if self.drtp:
                src = self._drtp_signal(ys[m], n * math.prod(self.out_shape[:-1]),
                                         self.out_shape[-1], self.out_dtype)
                self._backward(m, out, payload, list(routed), src)
                continue
            todo.append((m, out, payload, list(routed)))
            while todo and link.done(errs[todo[0][0]]):   # ready backwards between forwards
                self._backward_when_ready(todo.popleft(), errs)
        while todo:
            self._backward_when_ready(todo.popleft(), errs)
        for op in self._sends:
            link.wait(op, s, -1, "a message")
        self._sends = []
        return torch.stack(losses) if last else None

    def _backward_when_ready(self, item, errs) -> None:
        m, out, payload, routed = item
        e = self.link.wait(errs[m], self.s, m, f"micro-batch {m}'s output error")
        self._backward(m, out, payload, routed, self.rule.source(e, None))

    def _backward(self, m: int, out: Tensor, payload, routed: list, src: Tensor) -> None:
        """Stage ``s``'s backward for micro-batch ``m``: ``src @ B_next`` at its output, the
        direct signals at its hooked modules' inputs, exact local gradients in between."""
        rule = self.rule
        with self.rec.span(self.s, "backward", m):
            roots = [out] if out.requires_grad else []
            grads = [rule.send(self.next_site, src, payload)] if roots else []
            for site, alias, p in routed:
                roots.append(alias)
                grads.append(rule.send(site, src, p))
            if roots:
                torch.autograd.backward(roots, grads)

    def _last(self, m: int, inp: Tensor, y: Tensor, errs) -> Tensor:
        s, rule = self.s, self.rule
        with self.rec.span(s, "forward", m), rule.collect_routes() as routed, torch.enable_grad():
            z = self.stage(inp)
            if not isinstance(z, Tensor):
                raise PipelineError(f"localopt.pipeline: the last stage returned "
                                    f"{type(z).__name__}, not a Tensor")
            zd = z.detach().requires_grad_()
            loss = self.loss_fn(zd, y)
            e = torch.autograd.grad(loss / self.M, zd)[0]
        if not self.drtp:
            sent = e.to(self.out_dtype).contiguous()
            for peer in range(self.S - 1):     # e to every stage, before this stage's backward
                self._sends.append(self.link.isend(sent, peer, _TAG_ERR + m, s, m))
            src = rule.source(e, None)
        else:
            src = self._drtp_signal(y, e.numel() // e.shape[-1], e.shape[-1], e.dtype)
        with self.rec.span(s, "backward", m):
            roots, grads = [z], [e]
            for site, alias, p in routed:
                roots.append(alias)
                grads.append(rule.send(site, src, p))
            torch.autograd.backward(roots, grads)
        return loss.detach()
