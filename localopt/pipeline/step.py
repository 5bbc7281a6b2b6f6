"""``build``: cut a (wrapped) model into stages, one per process, and run a schedule."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..rules.direct import DirectRule
from .backprop import BACKPROP_SCHEDULES, TorchRunner, stages_of_rank
from .comm import Link, PipelineError, init_group
from .direct import DIRECT_RULES, DirectRunner
from .events import Event, Recorder
from .split import Stage, split_stages

__all__ = ["build", "PipelineStep", "SCHEDULES"]

SCHEDULES = BACKPROP_SCHEDULES + ("direct",)
_TAG_PREDICT = 4 << 20


def _rule_of(model: nn.Module):
    from ..wrap import wrapping
    rec = wrapping(model)
    return None if rec is None else rec.rule


def check_rule(model: nn.Module, schedule: str) -> None:
    """Raise if the rule ``model`` is wrapped with cannot run on ``schedule``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"localopt.pipeline: schedule={schedule!r} is not one of "
                         f"{list(SCHEDULES)} ('drtp' runs on 'direct')")
    rule = _rule_of(model)
    name = "none (plain autograd)" if rule is None else repr(rule.name)
    if schedule == "direct":
        if not (isinstance(rule, DirectRule) and rule.name in DIRECT_RULES):
            raise ValueError(
                f"localopt.pipeline: schedule='direct' runs the direct-feedback rules "
                f"{list(DIRECT_RULES)} (module-wise dfa included), whose stages need only the "
                f"output error or the target; this model's rule is {name}, whose backward needs "
                "the gradient of the stage above: use schedule='gpipe', '1f1b' or 'zb'")
        if rule.output is not None:
            raise ValueError("localopt.pipeline: schedule='direct' needs a model whose output "
                             f"is the tensor the loss is computed from (rule option "
                             f"output={rule.output!r} is not supported)")
        return
    if isinstance(rule, DirectRule):
        raise ValueError(
            f"localopt.pipeline: rule {rule.name!r} sends the output error directly to every "
            f"layer; torch's backprop schedule {schedule!r} would still lock each stage's "
            "backward behind the stage above. Use schedule='direct'"
            + ("" if rule.name in DIRECT_RULES else f" (which runs {list(DIRECT_RULES)})"))
    from ..rules.target_prop import TargetPropRule
    if isinstance(rule, TargetPropRule):
        raise ValueError(f"localopt.pipeline: rule {rule.name!r} (target propagation) is not "
                         "supported by the pipeline schedules")


class PipelineStep:
    """This process's part of a pipelined model; made by :func:`build`.

    ``step(x, y)`` runs one training step's forward and backward over ``microbatches``
    micro-batches and leaves the gradients of this rank's stage(s) in ``.grad``; returns the
    batch's mean loss on the rank holding the last stage, ``None`` elsewhere.  Step the
    optimizer from :meth:`optimizer` (or any torch optimizer on :meth:`parameters`) as usual.
    ``events`` lists what the last step did on this rank (:class:`Event`).
    """

    def __init__(self, model, stages, indices, num_stages, schedule, microbatches, runner,
                 link, recorder, group, rule, shapes, device, next_site_weight) -> None:
        self.model = model
        self.stages = tuple(indices)
        self.stage = self.stages[0]
        self.num_stages = num_stages
        self.schedule = schedule
        self.microbatches = microbatches
        self.module: nn.Module = stages[0] if len(stages) == 1 else nn.ModuleList(stages)
        self._stage_modules = stages
        self._runner = runner
        self._link = link
        self._rec = recorder
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.rule = rule
        self._shapes = shapes            # [(per-sample shape, dtype)] of each stage's output
        self._device = device
        self._next_site_weight = next_site_weight

    @property
    def events(self) -> list[Event]:
        """The events of the last :meth:`step` on this rank."""
        return list(self._rec.events)

    def parameters(self) -> list[nn.Parameter]:
        """The parameters of this rank's stage(s), each once."""
        seen, out = set(), []
        for m in self._stage_modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def optimizer(self, optimizer: type = torch.optim.SGD, **kwargs: Any) -> torch.optim.Optimizer:
        """An ``optimizer`` over this rank's parameters; a
        :class:`~localopt.optim.LocalOptimizer` when the rule learns its feedback (``dkp``,
        ``kp``, ...).  With ``dkp`` on the direct schedule it also steps this stage's copy of the
        feedback of the next stage's first module, with the hyperparameters of that module's
        weight (which this rank never updates: it has no gradient here)."""
        params = self.parameters()
        if self.rule is not None and self.rule.learns_feedback:
            from ..optim import LocalOptimizer
            if self._next_site_weight is not None:
                params = params + [self._next_site_weight]
            with warnings.catch_warnings():  # the ranks hold different stages: no data-parallel
                warnings.filterwarnings(      # group to average the learned feedback over
                    "ignore", message="localopt: torch.distributed runs", category=UserWarning)
                return LocalOptimizer(self.model, optimizer, params=params, **kwargs)
        return optimizer(params, **kwargs)

    def step(self, x: Tensor | None, y: Tensor | None) -> Tensor | None:
        """One training step (forward and backward of every micro-batch).  Pass the same batch
        on every rank: ``x`` is read on the first stage, ``y`` on the last (and on every stage
        for ``drtp``)."""
        self._rec.reset()
        return self._runner.step(x, y)

    @torch.no_grad()
    def predict(self, x: Tensor | None) -> Tensor | None:
        """The model output for ``x`` (no gradients, the whole batch at once): a tensor on the
        rank holding the last stage, ``None`` elsewhere.  ``x`` is read on the first stage."""
        link, S = self._link, self.num_stages
        owner = {i: r for r in range(self.world_size)
                 for i in stages_of_rank(self.schedule, r, self.world_size)}
        mine = dict(zip(self.stages, self._stage_modules))
        h = None
        for i in range(S):
            if i not in mine:
                continue
            if i == 0:
                if x is None:
                    raise PipelineError("localopt.pipeline: predict needs x on the first stage")
                h = x.to(self._device)
            elif owner[i - 1] != self.rank:
                hdr = torch.empty(1, dtype=torch.int64, device=self._device)
                link.wait(link.irecv(hdr, owner[i - 1], _TAG_PREDICT, i, -1), i, -1,
                          "the predict header")
                shape, dtype = self._shapes[i - 1]
                buf = torch.empty((int(hdr[0]),) + shape, dtype=dtype, device=self._device)
                h = link.wait(link.irecv(buf, owner[i - 1], _TAG_PREDICT + 1, i, -1), i, -1,
                              "a predict activation")
            h = mine[i](h)
            if i < S - 1 and owner[i + 1] != self.rank:
                n = torch.tensor([h.shape[0]], dtype=torch.int64, device=self._device)
                sends = [link.isend(n, owner[i + 1], _TAG_PREDICT, i, -1),
                         link.isend(h.contiguous(), owner[i + 1], _TAG_PREDICT + 1, i, -1)]
                for op in sends:
                    link.wait(op, i, -1, "a predict message")
        return h if S - 1 in mine else None

    def __repr__(self) -> str:
        return (f"PipelineStep(schedule={self.schedule!r}, stages={self.stages} of "
                f"{self.num_stages}, rank={self.rank}, microbatches={self.microbatches}, "
                f"rule={None if self.rule is None else self.rule.name!r})")


def _shape_pass(model: nn.Module, stages: list[Stage], example: Tensor, direct: bool):
    """Run ``model(example)`` once (eval mode: no BatchNorm statistics change; with gradients
    for a direct rule, which draws its feedback at the first forward -- the same draw as a
    single-process run), check that the stages compose to it, and return each stage's output
    (per-sample shape, dtype)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.set_grad_enabled(direct):
            ref = model(example)
        shapes = []
        with torch.no_grad():
            h = example
            for st in stages:
                h = st(h)
                shapes.append((tuple(h.shape[1:]), h.dtype))
            if not isinstance(ref, Tensor) or ref.shape != h.shape or \
                    not torch.allclose(ref.detach().float(), h.float(), rtol=1e-4, atol=1e-5):
                raise ValueError(
                    f"localopt.pipeline: the stages of this {type(model).__name__} do not "
                    "compose to its forward (its sequence must be exactly what forward computes; "
                    "see localopt.pipeline.split)")
    finally:
        for m, mode in modes:
            m.training = mode
    return shapes


def build(model: nn.Module, split: Sequence[str], schedule: str = "direct",
          microbatches: int = 4, loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
          example: Tensor | None = None, group=None, timeout: float = 60.0,
          record: bool = True) -> PipelineStep:
    """Cut ``model`` into stages and return this process's :class:`PipelineStep`.

    Call on every rank with the same arguments and an identical ``model`` (same seed; wrapped
    with the same rule and ``seed=``).  The model is not modified: stages refer to its modules.

    Args:
        model: an ``nn.Sequential`` or a model with ``pipeline_sequence()``
            (:mod:`localopt.pipeline.split`), optionally wrapped by :func:`localopt.wrap`.
        split: names of the modules where stages 1, 2, ... begin (``["3"]``, ``["layers.3"]``).
            ``S = len(split) + 1`` stages: one per process (``"zb"``: two per process).
        schedule: ``"gpipe"``, ``"1f1b"``, ``"zb"`` (torch's backprop schedules; no rule or a
            rule that needs the next stage's gradient) or ``"direct"`` (``dfa``, ``bdfa``,
            ``drtp``, ``dkp``, module-wise ``dfa``; every stage ``s >= 1`` must begin with a
            module the rule hooks: :mod:`localopt.pipeline.direct`).
        microbatches: ``M``, micro-batches per step (the batch must divide into them).
            BatchNorm statistics are those of each micro-batch, as in a single-process run
            with gradient accumulation over the same micro-batches.
        loss_fn: ``loss_fn(output, y)`` of one micro-batch, mean-reduced; the step's gradient
            is that of the mean over micro-batches.
        example: an input batch (any size; only its per-sample shape and dtype matter), run once
            through the model in eval mode to size messages and check the stages.
        group: the process group (default: the world, initialised from torchrun's environment
            variables if needed: gloo on CPU, nccl on CUDA).
        timeout: seconds any message or collective may take before the rank raises an error
            naming the peer (a dead or stuck rank never hangs the others).
        record: record :attr:`PipelineStep.events` (two ``perf_counter`` calls per event).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"localopt.pipeline.build expects an nn.Module, got {type(model).__name__}")
    if not (isinstance(microbatches, int) and microbatches >= 1):
        raise ValueError(f"localopt.pipeline: microbatches={microbatches!r} must be a positive "
                         "int")
    if not isinstance(example, Tensor) or example.dim() < 1:
        raise ValueError("localopt.pipeline: example= must be an input batch (a tensor with the "
                         "batch dimension first), e.g. x[:1]")
    check_rule(model, schedule)
    stages = split_stages(model, split)
    S = len(stages)
    rule = _rule_of(model)
    direct = schedule == "direct"
    sites = {}
    if direct:   # before any communication: a refused set-up fails fast on every rank
        sites = {id(s.module): s for s in _sites(model)}
        for s in range(1, S):
            if _entry_site(stages[s], sites) is None:
                name, first = stages[s].entry()[-1]
                raise ValueError(
                    f"localopt.pipeline: schedule='direct': stage {s} begins with '{name}' "
                    f"({type(first).__name__}), which rule {rule.name!r} does not hook, so the "
                    f"gradient at stage {s - 1}'s output would need stage {s}'s backward.  Split "
                    "before a hooked layer, or (module-wise dfa) name the first module of each "
                    f"stage in wrap(..., modules=[...]) (e.g. modules={list(split)})")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    init_group(device, timeout)
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    want = 2 * world if schedule == "zb" else world
    if S != want:
        per = "two stages per process (zero bubble, V order)" if schedule == "zb" else \
            "one stage per process"
        raise ValueError(f"localopt.pipeline: split={list(split)} gives {S} stages, but schedule "
                         f"{schedule!r} on {world} process(es) needs {want} ({per}): pass "
                         f"{want - 1} split point(s) or run {S // 2 if schedule == 'zb' else S} "
                         "processes")
    config = (schedule, microbatches, list(split), None if rule is None else rule.name)
    configs: list = [None] * world
    dist.all_gather_object(configs, config, group=group)
    for r, c in enumerate(configs):
        if c != config:
            fields = ("schedule", "microbatches", "split", "rule")
            diff = [f"{f}: rank {rank} {a!r}, rank {r} {b!r}" for f, a, b in zip(fields, config, c)
                    if a != b]
            raise ValueError(f"localopt.pipeline: ranks disagree on the set-up ({'; '.join(diff)})"
                             ": call build() with the same arguments on every rank")
    shapes = _shape_pass(model, stages, example.to(device), direct)
    for s in range(1, S if direct else 0):
        site = _entry_site(stages[s], sites)
        if site.buffer("feedback").numel() == 0:
            raise ValueError(f"localopt.pipeline: schedule='direct': '{site.name}' (first module "
                             f"of stage {s}) has no feedback matrix (its input needs no "
                             "gradient): split after a module with parameters")
    recorder = Recorder(record)
    link = Link(group, timeout, recorder)
    indices = stages_of_rank(schedule, rank, world)
    mine = [stages[i] for i in indices]
    next_weight = None
    if direct:
        s = indices[0]
        next_site = None
        if s < S - 1:
            next_site = _entry_site(stages[s + 1], sites)
            w = getattr(next_site.module, "weight", None)
            next_weight = w if isinstance(w, nn.Parameter) else next(
                next_site.module.parameters(), None)
        out_shape, out_dtype = shapes[-1]
        in_shape, in_dtype = shapes[s - 1] if s > 0 else (tuple(example.shape[1:]), example.dtype)
        runner = DirectRunner(stages[s], s, S, rule, next_site, microbatches, loss_fn, link,
                              recorder, in_shape, in_dtype, out_shape, out_dtype, device)
    else:
        runner = TorchRunner(mine, indices, S, schedule, microbatches, loss_fn, group, device,
                             recorder)
    return PipelineStep(model, mine, indices, S, schedule, microbatches, runner, link, recorder,
                        group, rule, shapes, device, next_weight)


def _entry_site(stage: Stage, sites: dict):
    """The outermost hooked module that reads the stage input (None if there is none)."""
    return next((sites[id(m)] for _, m in stage.entry() if id(m) in sites), None)


def _sites(model: nn.Module):
    from ..wrap import sites
    return sites(model)
