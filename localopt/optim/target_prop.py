"""The optimizer of the target-propagation rules (``dtp``, ``sdtp``, ``ao-sdtp``, ``drl``,
``l-drl``): the task optimizer on the weights, plus the training of the feedback mappings."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .. import distributed
from ..rules.target_prop import target_prop_rule

__all__ = ["TargetProp"]


def _per_block(name: str, value, n: int, kind: type) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"localopt: TargetProp: {name} has {len(value)} entries but the model "
                             f"has {n} block(s) with a feedback mapping (one entry each, bottom-up)")
        vals = list(value)
    else:
        vals = [value] * n
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int) or v < 0:
            raise ValueError(f"localopt: TargetProp: {name}={value!r} must be a non-negative "
                             f"{kind.__name__} or a list of them")
    return [kind(v) for v in vals]


class TargetProp(Optimizer):
    """Task optimizer + feedback training for a model wrapped with a target-propagation rule.

    ``opt = TargetProp(model, torch.optim.Adam, lr=1e-4, feedback_lr=1e-3, feedback_iters=1,
    noise=0.1)``; the loop is the standard one (``loss.backward(); opt.step()``):

    1. ``loss.backward()`` computes the targets and puts each block's local gradient in
       ``.grad`` (see :mod:`localopt.rules.target_prop`);
    2. ``step()`` first trains the feedback mappings on the block inputs recorded in that
       forward (so ``F_i(x_i)`` is exactly the recorded ``x_{i+1}``): ``feedback_iters``
       iterations, each a step of the *feedback optimizer* on the rule's feedback loss (DTP
       reconstruction / DRL / L-DRL) with fresh noise of scale ``noise``; then it runs the task
       optimizer's step on the weights.  With ``retarget`` (the ``l-drl`` default) the batch's
       targets and gradients are recomputed between the two, so the feedback trained on batch
       ``t`` shapes the targets of batch ``t``; without it, those of batch ``t+1``.

    Args:
        model: a model wrapped by ``localopt.wrap(model, "dtp" | "sdtp" | "ao-sdtp" | "drl" |
            "l-drl")``.
        optimizer: the task optimizer: a ``torch.optim.Optimizer`` class (built on ``params``,
            default ``model.parameters()``, with ``**kwargs``), or an already built instance
            (then no ``params``/``kwargs``).
        feedback_optimizer: class of the feedback optimizer (default ``torch.optim.SGD``).
        feedback_lr, feedback_iters, noise: one value, or a list with one entry per block that
            has a feedback mapping, bottom-up (ScalingDTP's per-layer settings).  They live in
            :attr:`feedback_param_groups` (keys ``lr``, ``iters``, ``noise``, ``block``), which
            can be changed during training.
        feedback_options: further arguments of ``feedback_optimizer`` (``momentum``, ...).
        retarget: after the feedback step, recompute the batch's targets with the trained
            feedback and the blocks' gradients from them (ScalingDTP's order: a batch's
            targets use feedback trained on that batch; costs one more forward/backward of
            each block).  False: targets from the feedback of the previous step.  Default
            (None): the rule's ``feedback_first`` -- True for ``l-drl`` (without it SimpleVGG
            diverged at ScalingDTP's settings, with it it trained: ``results/notes/target_prop.md``),
            False for the others.
        feedback_warmup: the first ``feedback_warmup`` calls of :meth:`step` train only the
            feedback mappings and leave the weights (and the task optimizer's state) as they
            are -- the feedback pre-training of Meulemans et al. (2020), which starts the
            forward training from feedback already close to its optimum instead of from the
            random initial ``g`` (whose targets are large and unrelated to the gradient).
            Counted in :meth:`state_dict`; :attr:`in_warmup` tells whether the next step is one.
            A learning-rate scheduler stepped during the warm-up still advances.

    Randomness (the feedback noise, dropout in replayed blocks) comes from each block's own
    stream (``localopt_rng``, saved with the model; :mod:`localopt.rng`), never from torch's
    global RNG.  Data parallelism: with a ``DistributedDataParallel``-wrapped ``model`` (or
    ``process_group=``) each rank draws its own noise for its data shard, and the feedback
    gradients of every iteration -- and, with ``retarget``, the recomputed block gradients --
    are averaged over the ranks (:mod:`localopt.distributed`), so weights and feedback stay
    identical on every rank.  Targets use each rank's own loss gradient: with a batch-mean
    loss, ``beta``'s batch size is the per-rank one.

    Step semantics, as for ``.grad``: a batch counts once its backward ran (a forward alone
    never changes the next step); the samples of every backward since the last step are
    accumulated -- the feedback step and ``retarget`` see them as one batch -- consumed by
    :meth:`step`, and forgotten by :meth:`zero_grad`, so a skipped batch leaves no trace.
    Loss scale: the targets ``x̂ = y - β ∂L/∂y`` are not linear in the loss, so a scaled
    loss is not a scaled step.  What holds exactly: (1) with the loss multiplied by ``s``, the
    targets are those of the unscaled loss with ``β s``, and every weight gradient is ``s``
    times that run's (the feedback losses do not depend on the task loss); (2) micro-batches
    whose losses are each their share of the whole batch's loss (``F.cross_entropy(z_i, y_i,
    reduction="sum") / N``; for equal micro-batches the same as ``mean / k``) give the
    targets, the gradients and the step -- feedback training included -- of the whole batch,
    given the same feedback noise.

    The feedback weights are buffers of the model (``model.state_dict()``); :meth:`state_dict`
    holds the task optimizer's state plus ``"target_prop"``: the feedback optimizer's state.
    ``last_feedback_loss``: the per-block feedback losses of the last iteration of the last
    step (tensors, no host sync).
    """

    def __init__(self, model: nn.Module, optimizer: type | Optimizer = torch.optim.SGD,
                 params=None, *, feedback_optimizer: type = torch.optim.SGD,
                 feedback_lr: float | Sequence[float] = 1e-3,
                 feedback_iters: int | Sequence[int] = 1,
                 noise: float | Sequence[float] = 0.1,
                 feedback_options: dict[str, Any] | None = None, retarget: bool | None = None,
                 feedback_warmup: int = 0, process_group=None, **kwargs: Any) -> None:
        self.rule = target_prop_rule(distributed.unwrap_parallel(model))
        self._group = distributed.find_group(model, process_group)
        self._rank = distributed.rank(self._group)
        if isinstance(optimizer, Optimizer):
            if params is not None or kwargs:
                raise TypeError("localopt: TargetProp: give params/optimizer arguments only with "
                                "an optimizer class, not with an optimizer instance")
            inner = optimizer
        elif isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
            inner = optimizer(model.parameters() if params is None else params, **kwargs)
        else:
            raise TypeError(f"localopt: TargetProp: optimizer must be a torch.optim.Optimizer "
                            f"class or instance, got {optimizer!r}")
        if not (isinstance(feedback_optimizer, type) and issubclass(feedback_optimizer, Optimizer)):
            raise TypeError(f"localopt: TargetProp: feedback_optimizer must be a torch.optim."
                            f"Optimizer class, got {feedback_optimizer!r}")
        self.inner = inner
        super().__init__([p for g in inner.param_groups for p in g["params"]], inner.defaults)
        self.param_groups = inner.param_groups  # schedulers/zero_grad act on the task optimizer
        self.state = inner.state
        self.blocks = self.rule.feedback_blocks()
        n = len(self.blocks)
        lrs = _per_block("feedback_lr", feedback_lr, n, float)
        iters = _per_block("feedback_iters", feedback_iters, n, int)
        noises = _per_block("noise", noise, n, float)
        groups = [{"params": list(self.rule.feedback_params(b).values()), "lr": lr, "iters": k,
                   "noise": s, "block": b.name}
                  for b, lr, k, s in zip(self.blocks, lrs, iters, noises)]
        self.feedback = feedback_optimizer(groups, **(feedback_options or {})) if groups else None
        self.feedback_param_groups = self.feedback.param_groups if groups else []
        self.last_feedback_loss: dict[str, Tensor] = {}
        self.retarget = self.rule.feedback_first if retarget is None else bool(retarget)
        if isinstance(feedback_warmup, bool) or not isinstance(feedback_warmup, int) \
                or feedback_warmup < 0:
            raise ValueError(f"localopt: TargetProp: feedback_warmup={feedback_warmup!r} must be "
                             "a non-negative integer (a number of steps)")
        self.feedback_warmup = feedback_warmup
        self.steps_done = 0

    @property
    def in_warmup(self) -> bool:
        """True while :meth:`step` trains only the feedback (``feedback_warmup``)."""
        return self.steps_done < self.feedback_warmup

    # -- feedback training ---------------------------------------------------------------
    def _sync(self) -> None:
        """Re-point the feedback optimizer at the current buffers (``model.to()`` replaces
        buffer tensors), carrying its state over."""
        fb = self.feedback
        for g, b in zip(fb.param_groups, self.blocks):
            current = list(self.rule.feedback_params(b).values())
            for old, new in zip(g["params"], current):
                if old is not new:
                    st = fb.state.pop(old, None)
                    if st is not None:
                        fb.state[new] = {k: v.to(new.device) if torch.is_tensor(v) and v.dim()
                                         else v for k, v in st.items()}
            g["params"] = current

    def train_feedback(self) -> None:
        """Train the feedback mappings on the last backward's recorded forward (``step()``
        calls this; a no-op when there was no backward since the last step); with
        ``retarget``, then recompute that batch's targets and block gradients."""
        tr = self.rule.pop_trace()
        if tr is None or self.feedback is None:
            return
        self._train_feedback(tr)
        if self.retarget and not self.in_warmup:  # warm-up steps leave the weights alone
            done = self.rule.retarget(tr, salt=self._rank)
            # data parallel: the re-targeted gradients came from this rank's shard only
            distributed.average_([p.grad for p in done], self._group)

    def _train_feedback(self, tr) -> None:
        self._sync()
        groups = [(g, b) for g, b in zip(self.feedback.param_groups, self.blocks)
                  if tr.x[b.index] is not None]
        rounds = max((g["iters"] for g, _ in groups), default=0)
        with torch.enable_grad():
            for it in range(rounds):
                live = [(g, b) for g, b in groups if g["iters"] > it]
                losses, leaves, targets = [], [], []
                for g, b in live:
                    bufs = self.rule.feedback_params(b)
                    P = {k: v.detach().requires_grad_() for k, v in bufs.items()}
                    losses.append(self.rule.feedback_loss(b, tr, P, g["noise"],
                                                          salt=self._rank))
                    leaves += list(P.values())
                    targets += list(bufs.values())
                grads = torch.autograd.grad(torch.stack(losses).sum(), leaves)
                distributed.average_(list(grads), self._group)  # data parallel: all shards
                for t, gr in zip(targets, grads):
                    t.grad = gr
                self.feedback.step()
                for t in targets:
                    t.grad = None
                self.last_feedback_loss = {b.name: l.detach() for (g, b), l in zip(live, losses)}

    # -- torch.optim interface -------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        if not self.rule.installed:
            raise RuntimeError(
                "localopt: TargetProp.step(): the model was unwrapped after this optimizer was "
                "built, so there are no targets or feedback to train. Build a new optimizer for "
                "the model as it is now (a plain torch optimizer after localopt.unwrap)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        warm = self.in_warmup
        self.train_feedback()
        if not warm:
            self.inner.step()
        self.steps_done += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The task optimizer's ``zero_grad``, plus: forget the samples recorded by the
        backward passes since the last step (either ``set_to_none``)."""
        self.inner.zero_grad(set_to_none=set_to_none)
        self.rule.clear_traces()

    def state_dict(self) -> dict[str, Any]:
        sd = self.inner.state_dict()
        sd["target_prop"] = {"rule": self.rule.name, "steps": self.steps_done,
                             "feedback": None if self.feedback is None
                             else self.feedback.state_dict()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("target_prop", None)
        if extra is not None and extra["rule"] != self.rule.name:
            raise ValueError(f"localopt: TargetProp state was saved for rule {extra['rule']!r}, "
                             f"this model uses {self.rule.name!r}")
        self.inner.load_state_dict(state_dict)
        if extra is not None:
            self.steps_done = int(extra.get("steps", 0))
        self.param_groups, self.state = self.inner.param_groups, self.inner.state
        if extra is not None and extra["feedback"] is not None and self.feedback is not None:
            self._sync()
            self.feedback.load_state_dict(extra["feedback"])
            self.feedback_param_groups = self.feedback.param_groups

    def __repr__(self) -> str:
        return (f"TargetProp({self.rule.name}, task={self.inner!r}, feedback="
                f"{type(self.feedback).__name__ if self.feedback else None}, "
                f"retarget={self.retarget})")
