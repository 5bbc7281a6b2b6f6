"""``build``: cut a (wrapped) model into stages, one per process, and run a schedule."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..mechanism import Site
from ..rules.direct import DirectRule
from .backprop import BACKPROP_SCHEDULES, TorchRunner, stages_of_rank
from .comm import Link, PipelineError, init_group
from .direct import DIRECT_RULES, AsyncOptimizer, DirectRunner
from .policy import check_bound
from . import checkpoint
from .batch import agree_batch
from .events import Event, Recorder
from .materialize import entry_site, materialise_stages, meta_plan, on_meta, tensor_bytes
from .split import Stage, check_coverage, split_stages

__all__ = ["build", "PipelineStep", "SCHEDULES"]

SCHEDULES = BACKPROP_SCHEDULES + ("direct",)
_TAG_PREDICT, _TAG_OUT = 4 << 20, 6 << 20


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
        if getattr(rule, "gate", False):
            raise ValueError(
                "localopt.pipeline: schedule='direct' runs drtp's published signal -y*/c, known "
                "from the target alone on every stage; this model's drtp has gate=True (the "
                "target component of the error, which needs the output p_t, so every stage "
                "would wait for it as dfa's do). Wrap with gate=False (the default) to "
                "pipeline it, or use 'dfa'")
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

    ``step(x, y)`` (or torch's spelling ``step(x, target=y, losses=[])``) runs one training
    step's forward and backward over ``microbatches`` micro-batches and leaves the gradients of
    this rank's stage(s) in ``.grad``; it returns the batch's mean loss on rank
    :attr:`output_rank` (the last rank, for every schedule), ``None`` elsewhere.  Step the
    optimizer from :meth:`optimizer` (one per pipeline) as usual.  ``events`` lists what the
    last step did on this rank (:class:`Event`).
    """

    def __init__(self, model, stages, indices, num_stages, schedule, microbatches, runner,
                 link, recorder, group, rule, shapes, device, next_site, split, meta,
                 asynchronous: bool = False) -> None:
        self.model = model
        self.stages = tuple(indices)
        self.stage = self.stages[0]
        self.num_stages = num_stages
        self.schedule = schedule
        self.microbatches = microbatches
        #: the direct schedule without a flush between steps (:mod:`localopt.pipeline.direct`)
        self.asynchronous = asynchronous
        self.split = list(split)
        self.module: nn.Module = stages[0] if len(stages) == 1 else nn.ModuleList(stages)
        self._stage_modules = stages
        self._runner = runner
        self._link = link
        self._rec = recorder
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        #: the rank on which :meth:`step` returns the loss and :meth:`predict` the output
        self.output_rank = self.world_size - 1
        self.rule = rule
        self.meta = meta
        self._shapes = shapes            # [(per-sample shape, dtype)] of each stage's output
        self._device = device
        self._next_site = next_site      # direct schedule: the next stage's first hooked module
        w = None if next_site is None else getattr(next_site.module, "weight", None)
        self._next_site_weight = w if isinstance(w, nn.Parameter) or next_site is None else \
            next(next_site.module.parameters(), None)
        self._owner = {i: r for r in range(self.world_size)
                       for i in stages_of_rank(schedule, r, self.world_size)}
        self._optimizer: tuple | None = None

    @property
    def stage_modules(self) -> tuple[nn.Module, ...]:
        """This rank's stage module(s), in the order of :attr:`stages`."""
        return tuple(self._stage_modules)

    @property
    def next_site(self) -> Site | None:
        """Direct schedule: the next stage's first hooked module, whose feedback this rank
        draws, uses and (``dkp``) learns; None otherwise."""
        return self._next_site

    @property
    def made_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer :meth:`optimizer` made, or None before its first call."""
        return None if self._optimizer is None else self._optimizer[2]

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
        """The pipeline's optimizer over this rank's parameters, made at the first call; later
        calls return the same one (with other arguments: an error).  A
        :class:`~localopt.optim.LocalOptimizer` when the rule learns its feedback (``dkp``,
        ``kp``, ...).  With ``dkp`` on the direct schedule it also steps this stage's copy of the
        feedback of the next stage's first module, with the hyperparameters of that module's
        weight (which this rank never updates: it has no gradient here)."""
        if self._optimizer is not None:
            made, args, opt = self._optimizer
            if (made, args) != (optimizer, kwargs):
                raise ValueError(
                    f"localopt.pipeline: this pipeline already has its optimizer "
                    f"({made.__name__}, {args}); optimizer() returns that one (asked now: "
                    f"{getattr(optimizer, '__name__', optimizer)}, {kwargs}): build the pipeline "
                    "again for another optimizer")
            return opt
        params = self.parameters()
        if self.rule is not None and self.rule.learns_feedback:
            from ..optim import LocalOptimizer
            if self._next_site_weight is not None:
                params = params + [self._next_site_weight]
            with warnings.catch_warnings():  # the ranks hold different stages: no data-parallel
                warnings.filterwarnings(      # group to average the learned feedback over
                    "ignore", message="localopt: torch.distributed runs", category=UserWarning)
                opt = LocalOptimizer(self.model, optimizer, params=params, **kwargs)
        else:
            opt = optimizer(params, **kwargs)
        if self.asynchronous:
            opt = AsyncOptimizer(opt, self._runner)
        self._optimizer = (optimizer, dict(kwargs), opt)
        return opt

    def flush(self) -> None:
        """Asynchronous schedule: run this rank's pending backwards and apply the update asked
        for, so that the weights are those of every step given (done by :meth:`predict` and
        the checkpoint methods; the next step's first forwards then use them too).  Local:
        needs no other rank to call it.  Nothing to do on the synchronous schedules."""
        if self.asynchronous:
            self._runner.flush()

    @property
    def peak_in_flight(self) -> int | None:
        """Direct schedule: the most micro-batches this rank has held between their forward
        and backward so far (their activations); None on torch's schedules."""
        pol = getattr(self._runner, "policy", None)
        return None if pol is None else pol.peak_in_flight

    def step(self, x: Tensor | None = None, y: Tensor | None = None, *,
             target: Tensor | None = None, losses: list | None = None) -> Tensor | None:
        """One training step (forward and backward of every micro-batch).  Pass the same batch
        on every rank: ``x`` is read on the first stage, ``y`` (or ``target=``, torch's name) on
        the last (and on every stage for ``drtp``); every rank checks its batch against the
        others' first (size, contents by checksum, autocast) and raises naming the ranks that
        disagree before anything runs.  Returns the mean loss on :attr:`output_rank`, None
        elsewhere; ``losses``, a list, gets the ``M`` micro-batch losses appended there."""
        if target is not None:
            if y is not None:
                raise TypeError("localopt.pipeline: step() got both y and target=; pass one")
            y = target
        self._rec.reset()            # (asynchronous: backwards left run during the check)
        N = agree_batch(x, y, self.microbatches, self.group, self._device,
                        self._link.timeout.total_seconds(), self.rank,
                        while_waiting=self._runner.poll if self.asynchronous else None)
        mb = self._runner.step(x, y, N)
        mb = self._to_output_rank(mb, (self.microbatches,), torch.float32, self.num_stages)
        if mb is None:
            return None
        if losses is not None:
            losses.extend(mb.unbind())
        return mb.mean()

    def _to_output_rank(self, t: Tensor | None, shape: tuple, dtype: torch.dtype,
                        tag_stage: int) -> Tensor | None:
        """``t`` (held by the rank of the last stage) on :attr:`output_rank`."""
        holder, link = self._owner[self.num_stages - 1], self._link
        if holder == self.output_rank:
            return t
        if self.rank == holder:
            link.wait(link.isend(t.to(dtype).contiguous(), self.output_rank, _TAG_OUT, tag_stage,
                                 -1), tag_stage, -1, "the output")
            return None
        if self.rank == self.output_rank:
            buf = torch.empty(shape, dtype=dtype, device=self._device)
            return link.wait(link.irecv(buf, holder, _TAG_OUT, tag_stage, -1), tag_stage, -1,
                             "the output")
        return None

    @torch.no_grad()
    def predict(self, x: Tensor | None) -> Tensor | None:
        """The model output for ``x`` (no gradients, the whole batch at once): a tensor on
        :attr:`output_rank`, ``None`` elsewhere.  ``x`` is read on the first stage."""
        self.flush()
        link, S, owner = self._link, self.num_stages, self._owner
        mine = dict(zip(self.stages, self._stage_modules))
        h, n = None, None
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
                n = int(hdr[0])
                buf = torch.empty((n,) + shape, dtype=dtype, device=self._device)
                h = link.wait(link.irecv(buf, owner[i - 1], _TAG_PREDICT + 1, i, -1), i, -1,
                              "a predict activation")
            h = mine[i](h)
            n = h.shape[0]
            if i < S - 1 and owner[i + 1] != self.rank:
                hdr = torch.tensor([n], dtype=torch.int64, device=self._device)
                sends = [link.isend(hdr, owner[i + 1], _TAG_PREDICT, i, -1),
                         link.isend(h.to(self._shapes[i][1]).contiguous(), owner[i + 1],
                                    _TAG_PREDICT + 1, i, -1)]
                for op in sends:
                    link.wait(op, i, -1, "a predict message")
        holder = owner[S - 1]
        if holder != self.output_rank:    # zero bubble: the last stage is on rank 0
            if self.rank == holder:
                link.wait(link.isend(torch.tensor([n], device=self._device), self.output_rank,
                                     _TAG_PREDICT, S, -1), S, -1, "the predict header")
            elif self.rank == self.output_rank:
                hdr = torch.empty(1, dtype=torch.int64, device=self._device)
                link.wait(link.irecv(hdr, holder, _TAG_PREDICT, S, -1), S, -1,
                          "the predict header")
                n = int(hdr[0])
            h = self._to_output_rank(h, (n,) + self._shapes[-1][0], self._shapes[-1][1], S)
        return h if self.rank == self.output_rank else None

    def state_dict(self) -> dict[str, Any]:
        """This rank's part of the run (its stage in the plain model's keys, the optimizer's
        state, the set-up): save one per rank; :mod:`localopt.pipeline.checkpoint`."""
        self.flush()
        return checkpoint.state_dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from this rank's :meth:`state_dict` (same set-up) or load this rank's part of
        a plain whole-model state dict (any split); anything else is refused, naming why, before
        anything is loaded.  :mod:`localopt.pipeline.checkpoint`."""
        self.flush()
        checkpoint.load_state_dict(self, state)

    def gather_state_dict(self, dst: int = 0) -> dict[str, Tensor] | None:
        """The whole model's plain ``state_dict`` on rank ``dst`` (None elsewhere), loadable by
        the unsplit model; call on every rank."""
        self.flush()
        return checkpoint.gather_state_dict(self, dst)

    def memory(self) -> dict[str, int]:
        """Bytes this process holds: ``parameter_bytes`` (the materialised parameters and
        buffers of its stage(s)), ``rule_state_bytes`` (the rule's feedback and streams it
        holds), ``state_bytes`` (all of these plus gradients and the optimizer's state), and the
        whole model's ``model_parameter_bytes`` (its parameters and buffers, rule state not
        counted)."""
        def split(named):
            plain, rule = [], []
            for n, t in named:
                (rule if n.rsplit(".", 1)[-1].startswith(Site.BUFFER_PREFIX) else plain).append(t)
            return plain, rule

        plain, rule = split((n, t) for m in self._stage_modules for n, t in
                            list(m.named_parameters()) + list(m.named_buffers()))
        if self._next_site is not None:
            rule += [self._next_site.module.get_buffer(b) for b in self._next_site.buffer_names]
        params, rule_bytes = tensor_bytes(plain), tensor_bytes(rule)
        grads = tensor_bytes(p.grad for p in self.parameters())
        opt = 0
        if self._optimizer is not None:
            opt = tensor_bytes(v for st in self._optimizer[2].state.values()
                               for v in st.values() if isinstance(v, Tensor))
        whole, _ = split(list(self.model.named_parameters()) + list(self.model.named_buffers()))
        return {"parameter_bytes": params, "rule_state_bytes": rule_bytes,
                "state_bytes": params + rule_bytes + grads + opt,
                "model_parameter_bytes": tensor_bytes(whole, materialised_only=False)}

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


def _is_compiled(model: nn.Module) -> bool:
    return type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod")


def build(model: "nn.Module | Callable[[], nn.Module]", split: Sequence[str],
          schedule: str = "direct", microbatches: int = 4,
          loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
          example: Tensor | None = None, group=None, timeout: float = 60.0,
          record: bool = True, seed: int | None = None, device=None,
          init: Callable[[str, nn.Module], None] | None = None, asynchronous: bool = False,
          max_in_flight: int | None = None) -> PipelineStep:
    """Cut ``model`` into stages and return this process's :class:`PipelineStep`.

    Call on every rank with the same arguments.  Two ways to give the model:

    * **on the meta device** (built under ``with torch.device("meta"):``, wrapped or not), or a
      function that builds it (called here under the meta device): each rank then materialises
      only its stage -- parameters, buffers, and the rule state its stage uses -- on ``device``
      (default: the CPU), drawn by module name from ``seed``
      (:mod:`localopt.pipeline.materialize`; ``init(name, module)`` for modules whose values
      no ``reset_parameters()`` draws).  No rank ever holds the whole model.
      :func:`localopt.pipeline.materialize` of the whole model gives one process the same values.
    * **materialised** (same seed on every rank; wrapped with the same rule and ``seed=``): every
      rank holds the whole model and trains its stage; the model is not modified (stages refer
      to its modules).

    Args:
        model: an ``nn.Sequential`` or a model with ``pipeline_sequence()``
            (:mod:`localopt.pipeline.split`), optionally wrapped by :func:`localopt.wrap`; not a
            ``torch.compile``-d model: compile each stage after ``build``
            (``pipe.module.compile()``).
        split: names of the modules where stages 1, 2, ... begin (``["3"]``, ``["layers.3"]``).
            ``S = len(split) + 1`` stages: one per process (``"zb"``: two per process).  Every
            parameter and buffer of the model must be in a stage.
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
            through the model in eval mode to size messages and check the stages (on the meta
            device: shapes only).
        group: the process group (default: the world, initialised from torchrun's environment
            variables if needed: gloo on CPU, nccl on CUDA).
        timeout: seconds any message or collective may take before the rank raises an error
            naming the peer (a dead or stuck rank never hangs the others).
        record: record :attr:`PipelineStep.events` (two ``perf_counter`` calls per event).
        seed, device, init: the materialisation of a meta-device model (see above).
        asynchronous: ``schedule="direct"`` only: no flush between steps -- a stage runs the
            first forwards of the next step before its update (one step stale) and applies the
            update when its own backwards are done (:mod:`localopt.pipeline.policy`); the
            optimizer's ``step()`` is deferred to that point, ``pipe.flush()`` applies what is
            pending.
        max_in_flight: ``schedule="direct"`` only: the micro-batches a stage may hold between
            forward and backward (int >= 1; default 1F1B's ``S - s``, 1 on the last stage and
            with ``drtp``).
    """
    if callable(model) and not isinstance(model, nn.Module):
        with torch.device("meta"):
            model = model()
    if not isinstance(model, nn.Module):
        raise TypeError(f"localopt.pipeline.build expects an nn.Module (or a function that builds "
                        f"one), got {type(model).__name__}")
    if _is_compiled(model):
        raise TypeError("localopt.pipeline.build takes the model itself, not torch.compile(model) "
                        "(whose stages cannot be cut): build the pipeline from the uncompiled "
                        "model, then compile this rank's stage(s): pipe.module.compile()")
    if not (isinstance(microbatches, int) and microbatches >= 1):
        raise ValueError(f"localopt.pipeline: microbatches={microbatches!r} must be a positive "
                         "int")
    if not isinstance(example, Tensor) or example.dim() < 1:
        raise ValueError("localopt.pipeline: example= must be an input batch (a tensor with the "
                         "batch dimension first), e.g. x[:1]")
    meta = on_meta(model)
    if meta and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError("localopt.pipeline: this model is on the meta device: pass seed=<int> "
                         "(each rank draws its stage's values by module name from it)")
    if asynchronous not in (False, True):
        raise ValueError(f"localopt.pipeline: asynchronous={asynchronous!r} must be True or False")
    if asynchronous:
        r0 = _rule_of(model)
        if schedule != "direct" or not (isinstance(r0, DirectRule) and r0.name in DIRECT_RULES):
            name = "none (plain autograd)" if r0 is None else repr(r0.name)
            raise ValueError(
                f"localopt.pipeline: asynchronous=True runs the direct schedule only (a stage "
                f"updates when its own backwards are done, which needs only the output error); "
                f"schedule={schedule!r} with rule {name} needs the next stage's gradient in every "
                f"backward: use schedule='direct' with one of {list(DIRECT_RULES)}, or "
                "asynchronous=False")
    check_rule(model, schedule)
    check_bound(max_in_flight)
    if max_in_flight is not None and schedule != "direct":
        raise ValueError(f"localopt.pipeline: max_in_flight={max_in_flight} bounds the direct "
                         f"schedule; torch's {schedule!r} fixes its own (leave it None)")
    stages = split_stages(model, split)
    S = len(stages)
    rule = _rule_of(model)
    direct = schedule == "direct"
    sites = {}
    if direct:   # before any communication: a refused set-up fails fast on every rank
        sites = {id(s.module): s for s in _sites(model)}
        for s in range(1, S):
            if entry_site(stages[s], sites) is None:
                name, first = stages[s].entry()[-1]
                raise ValueError(
                    f"localopt.pipeline: schedule='direct': stage {s} begins with '{name}' "
                    f"({type(first).__name__}), which rule {rule.name!r} does not hook, so the "
                    f"gradient at stage {s - 1}'s output would need stage {s}'s backward.  Split "
                    "before a hooked layer, or (module-wise dfa) name the first module of each "
                    f"stage in wrap(..., modules=[...]) (e.g. modules={list(split)})")
    check_coverage(model, stages)
    if meta:
        plan = meta_plan(model, stages, example, direct, sites, init)
        device = torch.device("cpu" if device is None else device)
    else:
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
    config = (schedule, microbatches, list(split), None if rule is None else rule.name,
              "meta" if meta else "materialised", seed if meta else None, asynchronous,
              max_in_flight)
    configs: list = [None] * world
    dist.all_gather_object(configs, config, group=group)
    for r, c in enumerate(configs):
        if c != config:
            fields = ("schedule", "microbatches", "split", "rule", "model", "seed",
                      "asynchronous", "max_in_flight")
            diff = [f"{f}: rank {rank} {a!r}, rank {r} {b!r}" for f, a, b in zip(fields, config, c)
                    if a != b]
            raise ValueError(f"localopt.pipeline: ranks disagree on the set-up ({'; '.join(diff)})"
                             ": call build() with the same arguments on every rank")
    indices = stages_of_rank(schedule, rank, world)
    mine = [stages[i] for i in indices]
    next_site = None
    if direct and indices[0] < S - 1:
        next_site = entry_site(stages[indices[0] + 1], sites)
    if meta:
        shapes = materialise_stages(model, stages, indices, plan, seed, device, init, direct,
                                    next_site)
    else:
        shapes = _shape_pass(model, stages, example.to(device), direct)
    for s in range(1, S if direct else 0):
        site = entry_site(stages[s], sites)
        if not meta and site.buffer("feedback").numel() == 0:
            raise ValueError(f"localopt.pipeline: schedule='direct': '{site.name}' (first module "
                             f"of stage {s}) has no feedback matrix (its input needs no "
                             "gradient): split after a module with parameters")
    recorder = Recorder(record)
    link = Link(group, timeout, recorder)
    if direct:
        s = indices[0]
        out_shape, out_dtype = shapes[-1]
        in_shape, in_dtype = shapes[s - 1] if s > 0 else (tuple(example.shape[1:]), example.dtype)
        runner = DirectRunner(stages[s], s, S, rule, next_site, microbatches, loss_fn, link,
                              recorder, in_shape, in_dtype, out_shape, out_dtype, shapes[s][1],
                              device, asynchronous, max_in_flight)
    else:
        runner = TorchRunner(mine, indices, S, schedule, microbatches, loss_fn, group, device,
                             recorder)
    return PipelineStep(model, mine, indices, S, schedule, microbatches, runner, link, recorder,
                        group, rule, shapes, device, next_site, split, meta, asynchronous)


def _sites(model: nn.Module):
    from ..wrap import sites
    return sites(model)
