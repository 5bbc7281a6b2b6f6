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

The order of a stage's forwards, backwards and update is :class:`~localopt.pipeline.policy.
DirectPolicy`'s (the simulator uses the same object): it polls the activations and the errors
(a ready backward never waits behind a forward whose input has not arrived), bounds the
micro-batches in flight per stage (default: 1F1B's ``S - s``), and, synchronous, accumulates the
gradients over the ``M`` micro-batches in order, so one optimizer step equals the
single-process step of the same rule with gradient accumulation over the same micro-batches
(each loss divided by ``M``).

**Asynchronous** (``build(..., asynchronous=True)``): no flush at the end of a step.  A stage
runs the first ``S - s - 1`` forwards of the next step while it waits for the last errors of
this one, then applies its update (the optimizer's ``step()`` is deferred to that point: the
pipeline's optimizer is an :class:`AsyncOptimizer`); those forwards use weights one step
stale, every other computation is as in the synchronous step (the policy's docstring states
it exactly).  Deterministic: where each update falls is fixed by counts, not by timing.  ``dkp`` learns ``B_{f_{s+1}}`` from ``e^T h_s``: that gradient, too, is stage ``s``'s
own, and stage ``s`` steps its copy (the copy on stage ``s+1`` is never used there).
BatchNorm statistics are those of each micro-batch, as in the single-process accumulation.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..mechanism import Site
from ..rules.direct import DRTP, DirectRule
from .comm import Link, PipelineError
from .events import Recorder
from .policy import DirectPolicy

__all__ = ["DirectRunner", "AsyncOptimizer", "DIRECT_RULES"]

#: rules the direct schedule runs (module-wise dfa is ``dfa`` with ``modules=[...]``)
DIRECT_RULES = ("dfa", "bdfa", "drtp", "dkp")

_TAG_ACT, _TAG_ERR = 2 << 20, 3 << 20


def _unversioned():
    """A forward whose graph outlives the next in-place update of its weights (the
    asynchronous schedule's stale forwards): its saved tensors are kept as they are, without
    autograd's version check, so the backward through a module (module-wise rules) reads the
    updated weights where it needs them."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


class DirectRunner:
    """Runs one stage of the direct schedule on this rank (see the module docstring)."""

    def __init__(self, stage: nn.Module, index: int, num_stages: int, rule: DirectRule,
                 next_site: Site | None, microbatches: int, loss_fn, link: Link,
                 recorder: Recorder, in_shape: tuple, in_dtype: torch.dtype, out_shape: tuple,
                 out_dtype: torch.dtype, act_dtype: torch.dtype, device: torch.device,
                 asynchronous: bool = False, max_in_flight: int | None = None) -> None:
        self.stage, self.s, self.S = stage, index, num_stages
        self.rule, self.next_site = rule, next_site
        self.M, self.loss_fn, self.link, self.rec = microbatches, loss_fn, link, recorder
        self.in_shape, self.in_dtype = in_shape, in_dtype
        self.out_shape, self.out_dtype = out_shape, out_dtype     # of the model output z
        self.act_dtype = act_dtype           # of this stage's output, as the next one receives it
        self.device = device
        self.drtp = isinstance(rule, DRTP)
        self.last = index == num_stages - 1
        self.waits = not (self.last or self.drtp)         # D needs e from the last stage
        self.asynchronous = asynchronous
        self.policy = DirectPolicy(index, num_stages, microbatches, waits_for_error=self.waits,
                                   asynchronous=asynchronous, max_in_flight=max_in_flight)
        self.optimizer: torch.optim.Optimizer | None = None   # asynchronous: applied here
        self.k = -1                          # steps begun
        self._data: dict = {}                # step -> (micro-batch inputs, targets)
        self._acts: dict = {}                # (step, m) -> activation receive
        self._errs: dict = {}                # (step, m) -> error receive
        self._pending: dict = {}             # g -> (out, payload, routes, signal or None)
        self._losses: dict = {}              # step -> [loss of each micro-batch] (last stage)
        self._sends: list = []

    # -- helpers -------------------------------------------------------------------------------
    def _drtp_signal(self, y: Tensor, z_rows: int, K: int, dtype: torch.dtype) -> Tensor:
        """The rule's signal for the loss ``CE/M`` from the given labels (``-y*/(n M)``,
        centred with ``center=True``: :meth:`~localopt.rules.direct.DRTP.target_signal`)."""
        if torch.is_floating_point(y):
            t = y.to(dtype)
        else:
            t = F.one_hot(y.long(), K).to(dtype)
        rows = t.numel() // K
        if rows != z_rows:
            raise PipelineError(f"localopt.pipeline: drtp targets have {rows} rows per "
                                f"micro-batch, the output has {z_rows}")
        return self.rule.target_signal(t, 1.0 / (rows * self.M))

    def _tag(self, base: int, k: int, m: int) -> int:
        return base + (k % 2) * self.M + m       # two steps' messages may be in flight

    # -- one step --------------------------------------------------------------------------------
    def step(self, x: Tensor | None, y: Tensor | None, N: int) -> Tensor | None:
        """One step on a batch of ``N`` (agreed by every rank); returns the ``M`` micro-batch
        losses on the last stage, None elsewhere.  Messages cross stages in the dtypes of the
        build-time shape pass (under autocast, each is cast to it on sending).  Synchronous:
        returns once this stage's backwards of the step are done; asynchronous: once its
        forwards are -- the backwards left and the update run as soon as they can, in the next
        call or while the next batch is being checked (:meth:`poll`), so that no rank holds
        the others at that check."""
        s, M, link, pol = self.s, self.M, self.link, self.policy
        k = self.k + 1
        if (self.last or self.drtp) and y is None:
            raise PipelineError(f"localopt.pipeline: rank {s} needs the targets y "
                                f"({'last stage' if self.last else 'drtp needs them on every stage'})")
        if self.asynchronous:
            if pol.requested < k:
                raise PipelineError(
                    "localopt.pipeline: asynchronous=True: call the pipeline optimizer's step() "
                    "after every pipe.step() (it is applied when this stage's backwards of the "
                    "step are done)")
        elif k > 0:                           # the caller stepped the optimizer in between
            pol.requested = pol.nu = k
        self.k = k
        n = N // M
        self._data[k] = (x.to(self.device).split(n) if s == 0 else None,
                         None if y is None else y.to(self.device).split(n))
        if s > 0:
            for m in range(M):
                self._acts[(k, m)] = link.irecv(
                    torch.empty((n,) + self.in_shape, dtype=self.in_dtype, device=self.device),
                    s - 1, self._tag(_TAG_ACT, k, m), s, m)
        if self.waits:
            for m in range(M):
                self._errs[(k, m)] = link.irecv(
                    torch.empty((n,) + self.out_shape, dtype=self.out_dtype, device=self.device),
                    self.S - 1, self._tag(_TAG_ERR, k, m), s, m)
        pol.available = k + 1
        while not pol.step_done(k):
            self._advance(block=True)
        for op in self._sends:
            link.wait(op, s, -1, "a message")
        self._sends = []
        losses = self._losses.pop(k, None)
        return torch.stack(losses) if self.last else None

    def poll(self) -> bool:
        """Run one operation that is ready now (asynchronous: a backward of an earlier step, or
        the update); False if none is."""
        return self._advance(block=False)

    def request_update(self) -> None:
        """The caller asked for the update of the last step (:class:`AsyncOptimizer`); it runs
        when the policy allows (nothing runs here)."""
        if self.policy.requested > self.k:
            raise PipelineError("localopt.pipeline: asynchronous=True: one optimizer step() per "
                                "pipe.step(), not more")
        self.policy.requested = self.k + 1

    def flush(self) -> None:
        """Run every pending backward and the update asked for (evaluation, checkpoints)."""
        while not self.policy.finished():
            if not self._advance(block=True, flush=True):
                break
        for op in self._sends:
            self.link.wait(op, self.s, -1, "a message")
        self._sends = []

    # -- the policy's operations -------------------------------------------------------------------
    def _ready(self, op: tuple) -> bool:
        kind, k, m = op
        if kind == "F":
            return self.s == 0 or self.link.done(self._acts[(k, m)])
        if kind == "D":
            return not self.waits or self.link.done(self._errs[(k, m)])
        return True

    def _advance(self, block: bool, flush: bool = False) -> bool:
        """Run the first ready candidate of the policy; if none is ready and ``block``, wait
        for one (polling when more than one message could come first)."""
        cands = self.policy.candidates(flush)
        if not cands:
            if block and not flush:
                raise PipelineError(f"localopt.pipeline: rank {self.s}: the direct schedule has "
                                    "nothing to run (an update was not asked for)")
            return False
        op = next((c for c in cands if self._ready(c)), None)
        if op is None:
            if not block:
                return False
            op = self._wait_any(cands)
        self._run(op)
        self.policy.done(op)
        return True

    def _wait_any(self, cands: list) -> tuple:
        s = self.s
        if len(cands) == 1:
            kind, k, m = cands[0]
            if kind == "F":
                self.link.wait(self._acts[(k, m)], s, m, f"micro-batch {m}'s activation")
            else:
                self.link.wait(self._errs[(k, m)], s, m, f"micro-batch {m}'s output error")
            return cands[0]
        deadline = time.monotonic() + self.link.timeout.total_seconds()
        with self.rec.span(s, "wait", -1):
            while time.monotonic() < deadline:
                for c in cands:
                    if self._ready(c):
                        return c
                time.sleep(2e-5)
        kind, k, m = cands[0]                  # names the peer, or raises its error
        self.link.wait(self._acts[(k, m)] if kind == "F" else self._errs[(k, m)], s, m,
                       f"micro-batch {m}'s {'activation' if kind == 'F' else 'output error'}")
        return cands[0]

    def _run(self, op: tuple) -> None:
        kind, k, m = op
        if kind == "F":
            self._forward(k, m)
        elif kind == "D":
            out, payload, routed, src = self._pending.pop(k * self.M + m)
            if self.last:
                self._backward_last(out, payload, routed, src, m)
                return
            if src is None:
                e = self._errs.pop((k, m))[1]
                src = self.rule.source(e, None)
            self._backward(m, out, payload, routed, src)
        else:
            with self.rec.span(self.s, "update", -1):
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)

    def _forward(self, k: int, m: int) -> None:
        s, link = self.s, self.link
        xs, ys = self._data[k]
        if s == 0:
            inp = xs[m]
        else:
            inp = self._acts.pop((k, m))[1]
        if m == self.M - 1:
            self._data.pop(k)
        if self.last:
            self._last(k, m, inp, ys[m])
            return
        stale = k > 0 and m < self.policy.stale and self.policy.nu < k
        with self.rec.span(s, "forward", m), self.rule.collect_routes() as routed, \
                torch.enable_grad(), (_unversioned() if stale else contextlib.nullcontext()):
            out = self.stage(inp)
            payload = self.rule.forward(self.next_site, out, None)
        self._sends.append(link.isend(out.detach().to(self.act_dtype).contiguous(), s + 1,
                                      self._tag(_TAG_ACT, k, m), s, m))
        src = None
        if self.drtp:
            src = self._drtp_signal(ys[m], out.shape[0] * math.prod(self.out_shape[:-1]),
                                    self.out_shape[-1], self.out_dtype)
        self._pending[k * self.M + m] = (out, payload, list(routed), src)

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

    def _last(self, k: int, m: int, inp: Tensor, y: Tensor) -> None:
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
                self._sends.append(self.link.isend(sent, peer, self._tag(_TAG_ERR, k, m), s, m))
            src = rule.source(e, None)
        else:
            src = self._drtp_signal(y, e.numel() // e.shape[-1], e.shape[-1], e.dtype)
        self._losses.setdefault(k, []).append(loss.detach())
        self._pending[k * self.M + m] = (z, e, list(routed), src)

    def _backward_last(self, z: Tensor, e: Tensor, routed: list, src: Tensor, m: int) -> None:
        rule = self.rule
        with self.rec.span(self.s, "backward", m):
            roots, grads = [z], [e]
            for site, alias, p in routed:
                roots.append(alias)
                grads.append(rule.send(site, src, p))
            torch.autograd.backward(roots, grads)


class AsyncOptimizer:
    """The pipeline's optimizer under ``asynchronous=True``: ``step()`` asks for the update of
    the step just run, which the pipeline applies (then zeroes the gradients) as soon as this
    stage's backwards of that step are done -- possibly during the next ``pipe.step``;
    ``zero_grad()`` does nothing (the pipeline zeroes after each update it applies, and a
    backward of the previous step may still be due).  Everything else is the wrapped
    optimizer's (:attr:`optimizer`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, runner: DirectRunner) -> None:
        self.optimizer = optimizer
        self._runner = runner
        runner.optimizer = optimizer

    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("localopt.pipeline: asynchronous=True: optimizer.step(closure) is "
                             "not supported (the update is applied later)")
        self._runner.request_update()

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def __getattr__(self, name: str):
        return getattr(self.optimizer, name)
