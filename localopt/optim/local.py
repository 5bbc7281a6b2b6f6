"""The optimizer for rules that learn their feedback: any torch optimizer, plus the feedback
update after each step."""
from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .. import distributed
from ..mechanism import site_of
from ..rules.learned import zero_feedback_grads

__all__ = ["LocalOptimizer", "KolenPollack", "WeightMirror", "Bidirectional"]

_CLASSES: dict[tuple[type, type], type] = {}


def _raw_step(opt_cls: type):
    """``opt_cls.step`` without torch's profiling/hook wrapper (our own step carries it)."""
    fn = opt_cls.step
    return fn.__wrapped__ if getattr(fn, "hooked", False) else fn


class LocalOptimizer(Optimizer):
    """A torch optimizer that also trains the feedback of a wrapped model.

    ``LocalOptimizer(model, torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)`` is an
    instance of ``torch.optim.SGD`` built on ``model.parameters()`` (or on ``params``, e.g.
    param groups) with those arguments -- param groups, LR schedulers, ``zero_grad`` and hooks
    behave exactly as with the plain optimizer -- whose :meth:`step` runs the optimizer's
    update on the weights and then the rule's feedback update:

    * rules that mirror the weight update (``kp``, ``dkp``): each feedback tensor ``B``
      receives its gradient from the rule (``kp``: the gradient of its weight ``W``; ``dkp``:
      ``e^T x``) and is stepped by an internal optimizer of the same class, whose param groups
      copy *every* hyperparameter of its layer's group before each step (so schedulers,
      momentum, weight decay apply to B as to W) and which keeps its own state (momentum
      buffers of B, ...);
    * other feedback-learning rules (``wm``, ``bfa``, ``bidfa``): ``rule.feedback_step`` with
      the rule's own hyperparameters (see the rule);
    * rules that learn nothing (``fa``, ``bp``, ...): just the optimizer.

    Step semantics, as for ``.grad``: what the feedback learns from a batch (``dkp``'s
    ``e^T x``, ``bfa``/``bidfa``'s reconstruction gradients; ``kp`` reads ``W.grad`` itself)
    is accumulated by the batch's *backward* pass -- a forward alone (a validation pass
    without ``torch.no_grad``, a skipped NaN batch) never changes the next step -- summed over
    the backward passes before a step (gradient accumulation: micro-batches with losses
    ``loss_i / k`` give the step of the whole batch), consumed by :meth:`step`, and discarded
    by :meth:`zero_grad` (either ``set_to_none``) with the weights' gradients.  So a batch
    whose backward ran but whose step is skipped leaves no trace after ``zero_grad()``.
    (``model.zero_grad()`` clears only the parameters' ``.grad``: use the optimizer's.)

    ``state_dict()`` is the optimizer's, plus a ``"localopt"`` entry with the feedback
    learning's state (internal optimizer state, step count); the feedback weights themselves
    are buffers in ``model.state_dict()``.  A plain torch ``state_dict`` (e.g. from a BP run)
    loads too: the feedback learning then starts afresh.

    Data parallelism: with a ``DistributedDataParallel``-wrapped ``model`` (or an explicit
    ``process_group``), what the feedback learns from each rank's data (``bfa``, ``bidfa``,
    ``dkp``) is averaged over the ranks before the feedback update, so the feedback stays
    identical on every rank (:mod:`localopt.distributed`); one step then equals the
    single-process step on the concatenated batch (gradients and least-squares normalisers are
    averaged separately).

    Args:
        model: a model wrapped by :func:`localopt.wrap`, or that model wrapped in
            ``DistributedDataParallel``.
        optimizer: a ``torch.optim.Optimizer`` subclass (default ``torch.optim.SGD``).
        params: parameters or param groups for it (default ``model.parameters()``).
        process_group: the data-parallel group to average the learned feedback over (default:
            that of a DDP-wrapped ``model``; none otherwise).
        check_every: every ``check_every`` steps (default 0: never), check that the weights'
            gradients, the weights and the wrapped layers' feedback state are finite, and raise
            ``FloatingPointError`` naming the rule, the step and the first tensor at fault --
            the cheap signal of a diverging run (one host sync per check; none when off).
        **kwargs: the optimizer's arguments (``lr``, ``momentum``, ``weight_decay``, ...).

    The result is an instance of ``LocalOptimizer`` *and* of ``optimizer`` (a subclass
    ``Local<Name>`` made once per optimizer class).
    """

    #: rules this class accepts (``None``: any)
    rule_names: ClassVar[tuple[str, ...] | None] = None
    _inner: ClassVar[type | None] = None

    def __new__(cls, *args: Any, **kwargs: Any):
        if cls._inner is not None:
            return super().__new__(cls)
        optimizer = kwargs.get("optimizer", args[1] if len(args) > 1 else torch.optim.SGD)
        if not (isinstance(optimizer, type) and issubclass(optimizer, Optimizer)):
            raise TypeError(f"localopt: {cls.__name__}: optimizer must be a torch.optim.Optimizer "
                            f"subclass (e.g. torch.optim.SGD), got {optimizer!r}")
        if issubclass(optimizer, LocalOptimizer):
            raise TypeError(f"localopt: {cls.__name__}: optimizer {optimizer.__name__} is already "
                            "a LocalOptimizer; pass the plain torch optimizer class")
        sub = _CLASSES.get((cls, optimizer))
        if sub is None:
            prefix = "Local" if cls is LocalOptimizer else cls.__name__
            sub = type(prefix + optimizer.__name__, (cls, optimizer),
                       {"_inner": optimizer, "__module__": __name__})
            _CLASSES[(cls, optimizer)] = sub
        return super().__new__(sub)

    def __init__(self, model: nn.Module, optimizer: type = torch.optim.SGD, params=None, *,
                 process_group=None, check_every: int = 0, **kwargs: Any) -> None:
        from ..wrap import is_wrapped, sites
        outer, model = model, distributed.unwrap_parallel(model)
        if not isinstance(model, nn.Module) or not is_wrapped(model):
            raise ValueError(f"localopt: {type(self).__name__} needs a model wrapped by "
                             "localopt.wrap(model, rule); got "
                             f"{'an unwrapped ' if isinstance(model, nn.Module) else ''}"
                             f"{type(model).__name__}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
            raise ValueError(f"localopt: {type(self).__name__}: check_every={check_every!r} must "
                             "be a non-negative integer (0: no check)")
        self._check_every = check_every
        self._sites = sites(model)
        self._rule = self._sites[0].rule
        if self.rule_names is not None and self._rule.name not in self.rule_names:
            raise ValueError(f"localopt: {type(self).__name__.removesuffix(optimizer.__name__)} "
                             f"trains rule(s) {list(self.rule_names)}, but the model is wrapped "
                             f"with {self._rule.name!r}; use localopt.optim.LocalOptimizer")
        super().__init__(model.parameters() if params is None else params, **kwargs)
        self._group = (distributed.find_group(outer, process_group)
                       if self._rule.feedback_from_data else None)
        self._feedback_steps = 0
        self._mirror: Optimizer | None = None
        self._mirror_sites: list[list] = []
        if self._rule.mirrors_update:
            self._build_mirror(kwargs)
        if self._rule.learns_feedback:
            self._rule.feedback_start(self._sites)
            self._rule.synced(self._sites)

    # -- the mirrored update (kp) --------------------------------------------------------------
    def _build_mirror(self, kwargs: dict) -> None:
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self._mirror_sites = [[] for _ in self.param_groups]
        for s in self._sites:
            for k, (_, w) in enumerate(self._rule.mirrored(s)):
                if id(w) in group_of:
                    self._mirror_sites[group_of[id(w)]].append((s, k))
        if not any(self._mirror_sites):
            return
        groups = [{"params": self._mirror_tensors(i)} for i in range(len(self.param_groups))]
        self._mirror = self._inner([g for g in groups if g["params"]] or groups, **kwargs)
        self._mirror_groups = [i for i, g in enumerate(groups) if g["params"]]
        if all(not self.param_groups[i].get("weight_decay", 0) for i in self._mirror_groups):
            warnings.warn(
                f"localopt: rule {self._rule.name!r} with weight_decay=0: the feedback receives "
                "the weights' updates, so B - W (kp) or B's random start (dkp) never decays and "
                "B never approaches what the rule learns; pass weight_decay > 0 (e.g. AdamW's "
                "decoupled decay, under which W - B shrinks by (1 - lr weight_decay) per step)",
                UserWarning, stacklevel=3)

    def _mirror_tensors(self, group: int) -> list[Tensor]:
        return [self._rule.mirrored(s)[k][0] for s, k in self._mirror_sites[group]]

    def _mirror_step(self) -> None:
        mirror = self._mirror
        self._rule.feedback_grads(self._sites)
        for mg, i in zip(mirror.param_groups, self._mirror_groups):
            current = self._mirror_tensors(i)
            for old, new in zip(mg["params"], current):
                if old is not new:  # the model was moved (.to()): carry the state over
                    st = mirror.state.pop(old, None)
                    if st is not None:
                        mirror.state[new] = {k: v.to(new.device) if torch.is_tensor(v) and v.dim()
                                             else v for k, v in st.items()}
            mg["params"] = current
            for key, value in self.param_groups[i].items():
                if key != "params":
                    mg[key] = value
        _raw_step(self._inner)(mirror)
        for mg in mirror.param_groups:
            for b in mg["params"]:
                b.grad = None

    # -- torch.optim interface -----------------------------------------------------------------
    def step(self, closure=None):
        site = self._sites[0]
        if site_of(site.module) is not site:  # no sync: identity check
            raise RuntimeError(
                f"localopt: {type(self).__name__}.step(): the model was unwrapped (or wrapped "
                "again) after this optimizer was built, so the feedback it trains is gone. "
                "Build a new optimizer for the model as it is now (a plain torch optimizer "
                "after localopt.unwrap)")
        check = self._check_every and (self._feedback_steps + 1) % self._check_every == 0
        if check:
            self._check_finite("gradient", [(f"parameter {i} of group {g}", p.grad)
                                            for g, group in enumerate(self.param_groups)
                                            for i, p in enumerate(group["params"])])
        loss = _raw_step(self._inner)(self, closure)
        self._feedback_steps += 1
        rule = self._rule
        if rule.learns_feedback:
            if self._group is not None:  # data parallel: the mean of the ranks' signals
                distributed.average_(self._pending_feedback_grads(), self._group)
            if rule.mirrors_update:
                if self._mirror is not None:
                    self._mirror_step()
            else:
                rule.feedback_step(self._sites, self._feedback_steps)
            rule.synced(self._sites)
        if check:
            self._check_finite("value", [(f"{b} of '{s.name}'", t) for s in self._sites
                                         for b, t in s.module.named_parameters(recurse=False)]
                               + [(f"{b} of '{s.name}'", t)
                                  for s in self._sites for b, t in s.state_buffers()])
        return loss

    def _check_finite(self, what: str, tensors: list[tuple[str, Tensor | None]]) -> None:
        """Raise ``FloatingPointError`` if any of ``tensors`` holds a NaN or an infinity (one
        host sync for all of them)."""
        named = [(n, t) for n, t in tensors if t is not None and t.numel()]
        if not named:
            return
        flags: dict[torch.device, list[Tensor]] = {}
        for _, t in named:                    # one stack per device, one copy each
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
        by_device = {d: iter(torch.stack(f).tolist()) for d, f in flags.items()}
        ok = [next(by_device[t.device]) for _, t in named]
        if not all(ok):
            bad = next(n for (n, _), good in zip(named, ok) if not good)
            raise FloatingPointError(
                f"localopt: rule {self._rule.name!r} diverged: a non-finite {what} at optimizer "
                f"step {self._feedback_steps + (what == 'gradient')} ({bad}"
                f"{'' if what == 'gradient' else ', after the step'}); lower the learning rate "
                "or see the rule's options for its scale")

    def _pending_feedback_grads(self) -> list[Tensor]:
        """The pending feedback signals, in site order: the ``.grad`` of every ``localopt_*``
        buffer that holds one, and the least-squares normalisers (``site.feedback_norm``)."""
        out = []
        for s in self._sites:
            for _, t in s.state_buffers():
                g = t.grad
                if g is not None:
                    out.append(g)
            if s.feedback_norm is not None:
                out.append(s.feedback_norm)
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The optimizer's ``zero_grad``, plus: discard the feedback-learning signals
        accumulated by the backward passes since the last step."""
        super().zero_grad(set_to_none)
        if self._rule.learns_feedback:
            zero_feedback_grads(self._sites, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["localopt"] = {"rule": self._rule.name, "feedback_steps": self._feedback_steps,
                          "mirror": None if self._mirror is None else self._mirror.state_dict()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("localopt", None)
        if extra is not None and extra["rule"] != self._rule.name:
            raise ValueError(f"localopt: optimizer state was saved for rule {extra['rule']!r}, "
                             f"this model uses {self._rule.name!r}")
        super().load_state_dict(state_dict)
        if extra is not None:
            self._feedback_steps = int(extra["feedback_steps"])
            if self._mirror is not None and extra["mirror"] is not None:
                self._mirror.load_state_dict(extra["mirror"])
        if self._rule.learns_feedback:
            self._rule.synced(self._sites)


class KolenPollack(LocalOptimizer):
    """:class:`LocalOptimizer` for a model wrapped with ``kp`` (Kolen-Pollack), e.g.
    ``KolenPollack(model, torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)``."""

    rule_names = ("kp",)


class WeightMirror(LocalOptimizer):
    """:class:`LocalOptimizer` for a model wrapped with ``wm`` (weight mirror)."""

    rule_names = ("wm",)


class Bidirectional(LocalOptimizer):
    """:class:`LocalOptimizer` for a model wrapped with ``bfa`` (bidirectional FA)."""

    rule_names = ("bfa",)
