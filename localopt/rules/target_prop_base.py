"""The machinery shared by the target-propagation rules: :class:`TargetPropRule` (targets in
the backward pass, the blocks' local losses, the DTP reconstruction loss of the feedback) and
the accessors of what the last backward recorded.  The math, the papers and the variants are
stated in :mod:`localopt.rules.target_prop`, which re-exports every public name of this module.
"""
from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .. import rng
from ..mechanism import CONV_TYPES, LAYER_TYPES, Site, input_grad
from .base import FEEDBACK_INITS, Rule, check_choice, check_number, init_feedback
from .target_prop_chain import (ACTIVATIONS, CHAIN_HELP, Block, Trace, auto_chain, feedback_map,
                                maxpool_with_indices, unpoolable, user_chain)

__all__ = ["TargetPropRule", "is_target_prop", "target_prop_rule", "last_targets", "last_inputs"]


def randn_like(x: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator``."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def target_dtype(x: Tensor) -> torch.dtype:
    """Targets are computed in at least float32: a bf16/fp16 target would round the target
    step ``β ∂L/∂y`` away against activations of order one."""
    return torch.promote_types(x.dtype, torch.float32)


class _Capture(torch.autograd.Function):
    """Identity on the model output; its backward sets the top target ``y - β ∂L/∂y``."""

    @staticmethod
    def forward(ctx, y: Tensor, trace: Trace, rule: "TargetPropRule") -> Tensor:
        ctx.trace, ctx.rule = trace, rule
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        tr, rule = ctx.trace, ctx.rule
        hi = target_dtype(tr.x[-1])  # targets in float32 under autocast (bf16 activations)
        tr.t[-1] = tr.x[-1].to(hi) - rule.beta * grad.to(hi)
        tr.version = rule._chain[-1].layer.weight._version
        rule._last_trace = tr
        rule._traces.append(tr)  # accumulated until the step (or zero_grad), as .grad
        return grad, None, None


# ---------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------
class TargetPropRule(Rule):
    """Base of the target-propagation rules (the math: :mod:`localopt.rules.target_prop`).

    Options (all variants):
        beta: target step ``β`` of the top target ``y - β ∂L/∂y`` (default 0.1), for the loss
            as computed: with a batch-mean loss, a per-example step ``β₀`` (ScalingDTP's 0.7 on
            the summed cross-entropy) is ``beta = β₀ * batch_size``.
        blocks: module names forming the chain (default: cut an ``nn.Sequential``
            automatically at every Linear/Conv).  Overrides include/exclude.
        init: initialisation of the feedback weights ``V`` (``"xavier"`` default, as
            :func:`localopt.rules.init_feedback`); feedback biases start at 0.
    """

    name = ""
    wraps = LAYER_TYPES
    learns_feedback = True
    random_stream = True
    feedback_from_data = True
    #: feedback-training loss: "rec" (DTP), "drl" (Meulemans 2020), "ldrl" (Ernoult 2022)
    feedback_loss_kind = "rec"
    #: True: the penultimate target comes from the gradient through the top block (DTP)
    gradient_top = False
    aux = False
    #: feedback form: False = inverse-like ``s_prev(V·U(a) + c)`` (Lee et al. 2015);
    #: True = transpose-like ``V·act(unpool(a)) + c`` (ScalingDTP; L-DRL's optimum is J_F^T)
    transpose_feedback = False
    #: default of ``TargetProp(retarget=...)``: a batch's targets use feedback already trained
    #: on that batch (ScalingDTP's order)
    feedback_first = False

    def __init__(self, *, beta: float = 0.1, blocks: list[str] | None = None,
                 init: str = "xavier") -> None:
        beta = check_number(self.name, "beta", beta, low=0, low_open=True)
        check_choice(self.name, "init", init, FEEDBACK_INITS)
        if blocks is not None and (isinstance(blocks, str) or not all(
                isinstance(b, str) for b in blocks) or len(blocks) < 2):
            raise ValueError(f"localopt: rule {self.name!r}: option blocks={blocks!r} must be a "
                             "list of at least two module names")
        self.beta = float(beta)
        self.blocks = list(blocks) if blocks is not None else None
        self.init = init
        self._chain: list[Block] = []
        self._by_name: dict[str, Block] = {}
        self._current: Trace | None = None
        self._last_trace: Trace | None = None
        self._traces: list[Trace] = []  # the backward passes since the last step
        self._validated = False
        self._root_hooks: list[Any] = []
        self._model_ref: nn.Module | None = None

    @property
    def installed(self) -> bool:
        """Whether this rule is installed on a model (``localopt.wrap`` ran, ``unwrap`` not)."""
        return self._model_ref is not None

    # -- chain discovery (called by wrap before anything is installed) --------------------
    def choose_sites(self, model: nn.Module, picked: list[tuple[str, nn.Module]]):
        if self._model_ref is not None:
            raise RuntimeError(f"localopt: this {type(self).__name__} rule instance is already "
                               "installed on a model; create a new one")
        chain = (user_chain(self.name, model, self.blocks) if self.blocks is not None
                 else auto_chain(self.name, model, picked))
        covered = set()
        for b in chain:
            covered.update(id(p) for p in b.module.parameters())
        stray = [n for n, p in model.named_parameters() if id(p) not in covered]
        if stray:
            raise ValueError(f"localopt: rule {self.name!r}: parameters {stray[:4]} are outside "
                             f"the blocks {[b.name for b in chain]} and would get no gradient; "
                             f"{CHAIN_HELP}")
        for i, b in enumerate(chain):
            b.index = i
            if i > 0:
                prev = chain[i - 1]
                after = prev.post + [m for _, m in prev.outer]
                acts = [m for m in after if isinstance(m, ACTIVATIONS)]
                b.act_in = acts[-1] if acts else None
            b.has_feedback = i > 0 and not (self.gradient_top and i == len(chain) - 1)
        if self.aux and not isinstance(chain[-1].layer, nn.Linear):
            raise ValueError(f"localopt: rule {self.name!r} needs a Linear top block (auxiliary "
                             f"output units); block '{chain[-1].name}' holds a "
                             f"{type(chain[-1].layer).__name__}")
        self._chain = chain
        self._by_name = {b.name: b for b in chain}
        return [(b.name, b.module) for b in chain]

    # -- state ----------------------------------------------------------------------------
    def setup(self, site: Site, generator: torch.Generator | None) -> None:
        b = self._by_name[site.name]
        b.site = site
        if not b.has_feedback:
            return
        W = b.layer.weight
        site.register_buffer("feedback", init_feedback(self.init, W, generator))
        c_size = W.shape[1] * (b.layer.groups if isinstance(b.layer, CONV_TYPES) else 1)
        site.register_buffer("feedback_bias", W.new_zeros(c_size))
        if self.aux and b.index == len(self._chain) - 1:
            n_in = W.shape[1]
            A = torch.randn((self.aux_units, n_in), generator=generator) / math.sqrt(n_in)
            site.register_buffer("aux", A.to(W))
            Va = init_feedback(self.init, torch.empty(self.aux_units, n_in), generator)
            site.register_buffer("feedback_aux", Va.to(W))

    def attach(self, model: nn.Module, sites: list[Site]) -> None:
        self._model_ref = model
        self._root_hooks = [model.register_forward_pre_hook(self._root_pre),
                            model.register_forward_hook(self._root_post)]
        # until the first complete forward: record each block's output to check the chain
        self._outputs: dict[int, Tensor] = {}
        self._check_hooks = [b.module.register_forward_hook(partial(self._record_output, b))
                             for b in self._chain]
        self._root_hooks.append(self._chain[0].module.register_forward_pre_hook(self._record_x0))
        if self.transpose_feedback:  # record the max-pool indices of each forward
            for b in self._chain:
                for j, m in enumerate(b.chain()):
                    if unpoolable(m):
                        self._root_hooks.append(
                            m.register_forward_hook(partial(self._record_idx, b, j)))

    # hooks are bound methods (with functools.partial), not closures: the wrapped model stays
    # picklable, and a deepcopy's hooks act on the copy
    def _record_idx(self, b: Block, j: int, module, args, out):
        tr = self._current
        if tr is not None:
            with torch.no_grad():
                tr.idx[b.index][j] = maxpool_with_indices(module, args[0])[1]

    def _record_x0(self, module, args):
        tr = self._current
        if tr is not None and args and isinstance(args[0], Tensor) and tr.x[0] is None:
            tr.x[0] = args[0].detach()

    def _record_output(self, b: Block, module, args, out):
        if not self.hooks_enabled:  # localopt.hooks_disabled
            return
        self._outputs[b.index] = out

    def __getstate__(self) -> dict:
        # what one forward/backward records is not part of the model: not pickled/copied
        state = dict(self.__dict__)
        state.update(_current=None, _last_trace=None, _traces=[], _outputs={})
        return state

    def _end_check(self) -> None:
        for h in self._check_hooks:
            h.remove()
        self._check_hooks, self._outputs = [], {}

    def detach(self, model: nn.Module, sites: list[Site]) -> None:
        for h in self._root_hooks:
            h.remove()
        self._root_hooks = []
        self._end_check()
        self._current = self._last_trace = None
        self._traces = []
        self._model_ref = None

    def synced(self, sites=None) -> None:
        """The weights changed legitimately (checkpoint loaded, model unpickled): no warning
        about a missing TargetProp step at the next forward."""
        last = getattr(self, "_last_trace", None)
        if last is not None and self._chain:
            last.version = self._chain[-1].layer.weight._version

    def feedback_format(self) -> str:
        return "target-prop/" + ("transpose" if self.transpose_feedback else "inverse")

    def feedback_shape(self, site: Site):
        b = self._by_name[site.name]
        return tuple(b.layer.weight.shape) if b.has_feedback else None

    def feedback_blocks(self) -> list[Block]:
        """The blocks that carry a learned feedback mapping, bottom-up."""
        return [b for b in self._chain if b.has_feedback]

    def feedback_params(self, b: Block) -> dict[str, Tensor]:
        names = ["feedback", "feedback_bias"] + (["feedback_aux"] if self._is_aux(b) else [])
        return {n: b.site.buffer(n) for n in names}

    def _is_aux(self, b: Block) -> bool:
        return self.aux and b.index == len(self._chain) - 1

    # -- forward --------------------------------------------------------------------------
    def _root_pre(self, module, args):
        if not self.hooks_enabled:  # localopt.hooks_disabled
            return
        self._current = Trace(len(self._chain)) if torch.is_grad_enabled() else None
        last = self._last_trace  # a TargetProp step consumes it: still here, weights changed?
        if (last is not None and not getattr(self, "_warned_optimizer", False)
                and last.version != self._chain[-1].layer.weight._version):
            self._warned_optimizer = True
            warnings.warn(
                f"localopt: rule {self.name!r} trains its feedback mappings in the optimizer "
                "step, but the weights changed without a localopt.optim.TargetProp step, so "
                "the feedback is not learning.  Train with localopt.optim.TargetProp(model, "
                "torch.optim.SGD, lr=...) -- or any torch optimizer class in place of SGD -- "
                "instead of a plain torch optimizer.", UserWarning, stacklevel=3)

    def _root_post(self, module, args, out):
        if not self.hooks_enabled:  # localopt.hooks_disabled
            return None
        tr, self._current = self._current, None
        if tr is None:
            return None
        if not isinstance(out, Tensor):
            raise TypeError(f"localopt: rule {self.name!r} needs the model to return one tensor "
                            f"(got {type(out).__name__})")
        if not out.requires_grad:
            return None
        n = len(self._chain)
        if tr.last != n - 1:
            raise RuntimeError(f"localopt: rule {self.name!r}: the last block "
                               f"'{self._chain[-1].name}' did not run in this forward; "
                               f"{CHAIN_HELP}")
        if not self._validated:
            top = self._chain[-1]
            if not top.outer and out is not self._outputs.get(n - 1):
                raise RuntimeError(f"localopt: rule {self.name!r}: the model output is not the "
                                   f"output of the last block '{top.name}'; {CHAIN_HELP}")
            self._validated = True
            self._end_check()
        tr.x[n] = out.detach()
        return _Capture.apply(out, tr, self)

    def forward(self, site: Site, x: Tensor, out: Tensor) -> Any:
        tr = self._current
        if tr is None:
            raise RuntimeError(f"localopt: rule {self.name!r}: block '{site.name}' ran outside a "
                               "call of the wrapped model; call the model itself")
        b = self._by_name[site.name]
        if b.index <= tr.last:
            raise RuntimeError(f"localopt: rule {self.name!r}: block '{site.name}' ran after "
                               f"block '{self._chain[tr.last].name}' (or twice) in one forward; "
                               f"{CHAIN_HELP}")
        if not self._validated and b.index > 0:
            prev = self._chain[b.index - 1]
            if not prev.outer and x is not self._outputs.get(prev.index):
                raise RuntimeError(f"localopt: rule {self.name!r}: the input of block "
                                   f"'{b.name}' is not the output of block '{prev.name}'; "
                                   f"{CHAIN_HELP}")
        tr.last = b.index
        xd = x.detach()
        tr.x[b.index] = xd
        b.shapes(xd)
        return tr, b.index

    # -- the feedback mapping g_i ---------------------------------------------------------
    def g(self, b: Block, a: Tensor, P: dict[str, Tensor], shapes: list[tuple],
          z: Tensor | None = None, idx: dict | None = None) -> Tensor:
        """``g_i(a)`` (``x_{i+1} -> x_i``) with feedback parameters ``P``; ``shapes`` from
        ``b.shapes(x_i)``; ``z``: auxiliary output units (``ao-sdtp`` top block only);
        ``idx``: max-pool indices by chain position (transpose-style feedback)."""
        return feedback_map(b, a, P, shapes, self.transpose_feedback, z, idx)

    def _aux_out(self, b: Block, x: Tensor) -> Tensor:
        A = b.site.buffer("aux")
        return x.to(A.dtype).matmul(A.t())

    # -- backward: targets ----------------------------------------------------------------
    def backward(self, site: Site, delta: Tensor, payload: Any) -> Tensor | None:
        tr, i = payload
        if i == 0:
            return None  # no target is needed below the first block
        b = self._chain[i]
        x = tr.x[i]
        if self.gradient_top and i == len(self._chain) - 1:
            grad = self._exact_input_grad(b, delta, x)
            hi = target_dtype(x)
            tr.t[i] = x.to(hi) - self.beta * grad.to(hi)
            return grad
        t_next, x_next = tr.t[i + 1], tr.x[i + 1]
        if t_next is None:
            raise RuntimeError(f"localopt: rule {self.name!r}: no target reached block "
                               f"'{b.name}' from above; the loss must be computed from the "
                               "wrapped model's output")
        d = self._difference(b, tr, i)
        tr.t[i] = x + d
        return (-d / self.beta).to(delta.dtype)

    def _difference(self, b: Block, tr: Trace, i: int) -> Tensor:
        """``g_i(x̂_{i+1}) - g_i(x_{i+1})`` with the current feedback."""
        ga, gx = self._g_pair(b, tr.t[i + 1], tr.x[i], tr.x[i + 1], self.feedback_params(b),
                              tr.idx[i])
        return ga - gx

    def _g_pair(self, b: Block, a: Tensor, x: Tensor, x_next: Tensor, P: dict[str, Tensor],
                idx: dict | None = None) -> tuple[Tensor, Tensor]:
        """``(g_i(a), g_i(x_{i+1}))`` in one call of ``g`` (the two halves of a difference
        correction; with the auxiliary units of ``x_i`` on the ``ao-sdtp`` top block)."""
        n = x_next.shape[0]
        z = None
        if self._is_aux(b):
            z = self._aux_out(b, x)
            z = torch.cat([z, z])
        r = self.g(b, torch.cat([a, x_next]), P, b.shapes(x), z, idx)
        return r[:n], r[n:]

    @torch.no_grad()
    def retarget(self, tr: Trace, salt: int = 0) -> list[Tensor]:
        """Recompute the targets of ``tr`` with the current feedback and put each non-top
        block's gradient of ``‖F_j(x_j) - x̂_{j+1}‖²/(2β)`` in ``.grad`` (replacing the one from
        the backward; one extra forward/backward per block).  Used by ``TargetProp(...,
        retarget=True)`` after the feedback step: the targets of a batch then use feedback
        already trained on it, as in ScalingDTP.  Returns the parameters whose ``.grad`` it
        replaced; randomness in the replayed blocks (dropout) comes from each block's stream
        (``salt``: see :func:`localopt.rng.next_seed`)."""
        n = len(self._chain)
        done: list[Tensor] = []
        for i in range(n - 1, 0, -1):
            if tr.x[i] is None or tr.t[i + 1] is None:
                return done
            if not (self.gradient_top and i == n - 1):
                tr.t[i] = tr.x[i] + self._difference(self._chain[i], tr, i)
        for j in range(n - 1):
            b, x, t = self._chain[j], tr.x[j], tr.t[j + 1]
            params = [p for p in b.module.parameters() if p.requires_grad]
            if x is None or t is None or not params:
                continue
            with torch.enable_grad(), self._replaying(b, x.device, salt):
                loss = (b.replay(x) - t).pow(2).sum() / (2 * self.beta)
                grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads):
                p.grad = g
            done += params
        return done

    def _replaying(self, b: Block, device: torch.device, salt: int = 0):
        """Context of a replay of block ``b`` (and the blocks above, for DRL): torch's global
        RNG, which ``nn.Dropout`` draws from, is re-seeded from ``b``'s own stream and restored
        afterwards, so replays never consume global randomness."""
        return rng.private_global_rng(device, rng.next_seed(b.site, salt))

    def _exact_input_grad(self, b: Block, delta: Tensor, x: Tensor) -> Tensor:
        if b.site.module is b.layer and b.site.fast:
            return input_grad(b.site, delta, b.layer.weight, x.shape)
        with torch.enable_grad(), b.site.bypassed(), self._replaying(b, x.device):
            xr = x.detach().to(b.layer.weight.dtype).requires_grad_()  # bf16 under autocast
            out = b.module(xr)
            return torch.autograd.grad(out, xr, delta.to(out.dtype))[0]

    # -- feedback training losses (called by localopt.optim.TargetProp) -----------------
    def clear_traces(self) -> None:
        """Forget the backward passes since the last step (``TargetProp.zero_grad``)."""
        self._traces, self._last_trace = [], None

    def take_pending_feedback(self, sites: list[Site]) -> Any:
        taken = (super().take_pending_feedback(sites), self._traces, self._last_trace)
        self.clear_traces()
        return taken

    def restore_pending_feedback(self, sites: list[Site], taken: Any) -> None:
        inner, self._traces, self._last_trace = taken
        super().restore_pending_feedback(sites, inner)

    def pop_trace(self) -> Trace | None:
        """The samples of every backward pass since the last step, as one trace (consumed)."""
        tr, self._traces, self._last_trace = Trace.merge(self._traces), [], None
        if tr is not None:  # recorded under autocast (bf16): train/replay in the weights' dtype
            top = len(self._chain) - 1
            for i, x in enumerate(tr.x):
                dt = self._chain[min(i, top)].layer.weight.dtype
                if x is not None and x.is_floating_point() and x.dtype != dt:
                    tr.x[i] = x.to(dt)
        return tr

    def feedback_loss(self, b: Block, tr: Trace, P: dict[str, Tensor], noise: float,
                      salt: int = 0) -> Tensor:
        """The feedback loss of block ``b`` on the recorded forward ``tr`` (differentiable in
        ``P``); see the module docstring.  Its noise (and the dropout of replayed blocks) comes
        from ``b``'s own stream, varied by ``salt`` (the data-parallel rank: each rank's shard
        gets its own noise); torch's global RNG is untouched."""
        x = tr.x[b.index]
        kind = self.feedback_loss_kind
        gen = rng.generator(b.site, x.device, salt)
        with self._replaying(b, x.device, salt):
            if kind == "rec":
                xn = x + noise * randn_like(x, gen)
                with torch.no_grad():
                    yn = b.replay(xn)
                    z = self._aux_out(b, xn) if self._is_aux(b) else None
                r = self.g(b, yn, P, b.shapes(x), z)
                return (r - xn).pow(2).flatten(1).sum(1).mean()
            if noise <= 0:
                raise ValueError(f"localopt: rule {self.name!r}: the feedback loss needs noise "
                                 f"> 0 (block '{b.name}' has noise={noise})")
            return self._noisy_feedback_loss(b, tr, P, x, noise, gen)

    def _noisy_feedback_loss(self, b: Block, tr: Trace, P: dict[str, Tensor], x: Tensor,
                             noise: float, gen: torch.Generator) -> Tensor:
        """The feedback loss of the variants whose loss is not the DTP reconstruction
        (``feedback_loss_kind`` ``"drl"``, ``"ldrl"``): each defines it."""
        raise NotImplementedError(f"localopt: rule {self.name!r}: feedback loss "
                                  f"{self.feedback_loss_kind!r} is not implemented")

    def options(self) -> dict[str, Any]:
        opts = {"beta": self.beta, "blocks": self.blocks, "init": self.init}
        if self.aux:
            opts["aux_units"] = self.aux_units
        return opts


def target_prop_rule(model: nn.Module) -> TargetPropRule:
    """The target-propagation rule installed on ``model`` (error if there is none)."""
    from ..wrap import wrapping
    rec = wrapping(model)
    if rec is None or not isinstance(rec.rule, TargetPropRule):
        what = "not wrapped" if rec is None else f"wrapped with rule {rec.rule.name!r}"
        raise ValueError(f"localopt: this {type(model).__name__} is {what}; wrap it with a "
                         "target-propagation rule (dtp, sdtp, ao-sdtp, drl, l-drl) first")
    return rec.rule


def is_target_prop(model: nn.Module) -> bool:
    from ..wrap import wrapping
    rec = wrapping(model)
    return rec is not None and isinstance(rec.rule, TargetPropRule)


def last_targets(model: nn.Module) -> list[Tensor | None]:
    """Targets ``x̂_0..x̂_n`` of the last backward not yet consumed by an optimizer step
    (``x̂_n`` is the top target; ``None`` where none was computed).  For inspection/tests."""
    return list(_last_trace(model).t)


def last_inputs(model: nn.Module) -> list[Tensor | None]:
    """Recorded block inputs ``x_0..x_n`` (``x_n`` = output) of the last backward's forward."""
    return list(_last_trace(model).x)


def _last_trace(model: nn.Module) -> Trace:
    tr = target_prop_rule(model)._last_trace
    if tr is None:
        raise ValueError("localopt: no backward since the last optimizer step")
    return tr
