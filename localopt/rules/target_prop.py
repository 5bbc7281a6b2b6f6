"""Target propagation: ``dtp``, ``sdtp``, ``ao-sdtp``, ``drl``, ``l-drl``.

The model is a **chain of blocks** ``x_{i+1} = F_i(x_i)``, ``i = 0..n-1``, with ``x_n = y`` the
model output.  Each block is a hooked :class:`~localopt.mechanism.Site`:

* an ``nn.Sequential`` (``models.create_model("mlp3x1024")``, ``"simple_vgg"``, ...) is cut
  automatically: every ``Linear``/``ConvNd`` starts a block, and the parameter-free layers
  that follow it (activation, pooling, flatten, dropout) belong to it;
* any other model: pass ``blocks=["stem", "layer1", ...]``, names of modules that run one after
  the other, each on the previous one's output, each an ``nn.Sequential`` (or a single layer)
  holding one ``Linear``/``ConvNd`` plus parameter-free layers.  The first forward checks it.

**Targets** (computed in ``loss.backward()``, top-down, as the blocks' backward nodes run)::

    x̂_n = y - β ∂L/∂y                                  (top target)
    x̂_i = x_i + g_i(x̂_{i+1}) - g_i(x_{i+1})            (difference correction, i = n-1..1)

``g_i`` is the learned feedback mapping of block ``i`` (``x_{i+1} -> x_i``), built from the
block's type: the inverse of its shape operations (flatten -> unflatten, pooling -> nearest
upsampling), then the transposed-shape op of its layer (``Linear(out -> in)``, or the
transposed convolution with the conv's stride/padding/dilation/groups) with its own weight
``V_i`` and bias ``c_i``, then the activation that produced ``x_i`` (Lee et al. 2015 form
``g(h) = s(V h + c)``).  No target is needed for the input ``x_0``, so block 0 has no ``g``.

**Weight updates.**  The top block trains on the task loss (its exact local gradient
``∂L/∂θ_{n-1}``, as in DTP).  Every other block ``i`` gets the gradient of its local loss::

    ℓ_i = ‖x_{i+1} - x̂_{i+1}‖² / (2β)          (summed over the batch; x̂ detached)

w.r.t. its own parameters only: block ``i+1``'s backward node returns
``(x_{i+1} - x̂_{i+1}) / β`` as the gradient of its (detached) input, which autograd sends
into block ``i``'s own graph.  No gradient crosses blocks.  The ``1/β`` makes the update
scale independent of ``β`` (``x̂`` carries the task loss's batch reduction through
``∂L/∂y``), and equal to BP's where ``g`` is the transposed Jacobian.

**Variants** (``wrap(model, name, beta=...)``):

* ``dtp`` -- Lee et al. (2015), as benchmarked by Bartunov et al. (2018): the penultimate
  target comes from the gradient through the top block, ``x̂_{n-1} = x_{n-1} - β ∂L/∂x_{n-1}``
  (no learned inverse of the top block); below, difference correction.  Feedback trained by
  the DTP reconstruction loss (below).
* ``sdtp`` -- Simplified DTP (Bartunov et al. 2018): the top block also has a learned inverse,
  ``x̂_{n-1} = x_{n-1} + g_{n-1}(x̂_n) - g_{n-1}(y)``: no gradient reaches any hidden block.
* ``ao-sdtp`` -- SDTP with auxiliary output units (Bartunov et al. 2018): the top block also
  emits ``z = A x_{n-1}`` (``aux_units`` units, ``A`` fixed random, outside the task loss;
  their target is ``ẑ = z``), and ``g_{n-1}`` reads both: ``g_{n-1}(ŷ, z) = s(ŷ V + z V_z + c)``,
  so the inverse of a 10-unit output can carry more than the label.  Top block must be Linear.
* ``drl`` -- DTP with the *difference reconstruction loss* of Meulemans et al. (2020), targets
  as ``sdtp``.
* ``l-drl`` -- the layer-wise DRL of Ernoult et al. (2022, "Towards scaling difference target
  propagation by learning backprop targets"), targets as ``sdtp``; trained with several
  feedback iterations per batch.

**Feedback losses** (used by :class:`localopt.optim.TargetProp`'s step; ``ε, η ~ N(0, σ²)``;
``‖·‖²`` sums over features, then the batch mean is taken):

* DTP reconstruction (``dtp``/``sdtp``/``ao-sdtp``): ``‖g_i(F_i(x_i + ε)) - (x_i + ε)‖²``.
* DRL (``drl``): corrupt ``x̃_i = x_i + ε``, run it to the output ``ỹ = F_{n-1}∘…∘F_i(x̃_i)``,
  bring it back down with difference corrections ``r_n = ỹ``,
  ``r_j = x_j + g_j(r_{j+1}) - g_j(x_{j+1})`` (``j = n-1..i``, only ``g_i`` differentiated), loss
  ``‖r_i - x̃_i‖² / σ²``.
* L-DRL (``l-drl``): with ``y = x_{i+1} = F_i(x_i)``,
  ``-2 ε·(g_i(F_i(x_i + ε)) - g_i(y)) + ‖g_i(y + η) - g_i(y)‖²``, whose expectation
  ``σ²(‖J_g - J_F^T‖² - ‖J_F‖²)`` is minimal at ``J_{g_i} = J_{F_i}^T``: targets then
  approximate BP's (``(x_i - x̂_i)/β ≈ ∂L/∂x_i`` for small β).  Blocks with max-pooling:
  ``g`` max-unpools with pooling switches: ``g_i(F_i(x_i + ε))`` with those of the perturbed
  forward, ``g_i(y)`` and ``g_i(y + η)`` with the recorded forward's (option
  ``switches="clean"``, the default), as ScalingDTP's final code does (ernoult/scalingDTP
  re-runs the clean forward before ``g_i(y + η)``; its successor passes the clean indices
  explicitly).  ``switches="perturbed"`` gives the ``η`` term the perturbed forward's switches,
  as ScalingDTP's first release did by accident (its pooling layers keep only the latest
  indices): the mismatch of switches then also penalises ``V`` on the activity that moves
  between pooling positions, which shrinks ``‖V‖`` (``results/notes/target_prop.md`` compares both).

State: buffers ``localopt_feedback`` (``V_i``, shaped like the block layer's weight),
``localopt_feedback_bias`` (``c_i``) and for ``ao-sdtp`` ``localopt_aux``/``localopt_feedback_aux``
on each block's hooked module: saved in ``model.state_dict()``, moved by ``.to()``, never in
``model.parameters()`` (the task optimizer cannot touch them).  The forward pass records the
block inputs ``x_i`` (references the autograd graph keeps anyway) until the optimizer step.
"""
from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import rng
from ..mechanism import CONV_TYPES, LAYER_TYPES, Site, input_grad
from .base import FEEDBACK_INITS, Rule, check_choice, check_number, init_feedback, register_rule

__all__ = ["TargetPropRule", "DTP", "SDTP", "AOSDTP", "DRL", "LDRL", "is_target_prop",
           "target_prop_rule", "last_targets"]

ACTIVATIONS = (nn.Tanh, nn.ReLU, nn.ELU, nn.Sigmoid, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Softplus,
               nn.Hardtanh, nn.ReLU6, nn.SELU, nn.CELU, nn.Mish, nn.Softsign, nn.Tanhshrink)
_ELEMENTWISE = ACTIVATIONS + (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                              nn.AlphaDropout)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_SHAPES = (nn.Flatten, nn.Unflatten)
_PARAM_FREE = _ELEMENTWISE + _POOLS + _SHAPES

_CHAIN_HELP = (
    "target propagation needs the model as a chain of blocks: an nn.Sequential of "
    "Linear/Conv layers and parameter-free layers (activations, pooling, flatten, dropout), or "
    "blocks=['name1', 'name2', ...] naming modules that run one after the other, each on the "
    "previous one's output, each an nn.Sequential (or a single layer) holding one Linear/Conv "
    "plus parameter-free layers"
)


# ---------------------------------------------------------------------------------------
# Chain description
# ---------------------------------------------------------------------------------------
def _is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _leaves(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """Modules a plain (nested) nn.Sequential runs, in order."""
    if not _is_plain_sequential(module):
        return [(prefix, module)]
    out: list[tuple[str, nn.Module]] = []
    for n, c in module.named_children():
        out += _leaves(c, f"{prefix}.{n}" if prefix else n)
    return out


class _Block:
    """One block of the chain: ``F(x) = outer(site_module(x))``; the site module runs
    ``pre -> layer -> post`` (``pre``/``post`` empty when the site *is* the layer)."""

    def __init__(self, name, module, layer, pre, post, outer):
        self.name: str = name
        self.module: nn.Module = module
        self.layer: nn.Module = layer
        self.pre: list[nn.Module] = pre
        self.post: list[nn.Module] = post
        self.outer: list[tuple[str, nn.Module]] = outer
        self.index = -1
        self.site: Site | None = None
        self.act_in: nn.Module | None = None       # activation that produced this block's input
        self.has_feedback = False
        self._shapes: dict[tuple, list[tuple]] = {}

    # the modules run by F, in order (the site module expanded into its leaves)
    def chain(self) -> list[nn.Module]:
        return self.pre + [self.layer] + self.post + [m for _, m in self.outer]

    def shapes(self, x: Tensor) -> list[tuple]:
        """Per-sample input shape of every module of :meth:`chain`, plus the output's."""
        key = tuple(x.shape[1:])
        s = self._shapes.get(key)
        if s is None:
            s = [key]
            # private_global_rng: a Dropout in the chain must not consume global randomness
            # (the first forward, and the first one after a resume, would differ)
            with torch.no_grad(), self.site.bypassed(), rng.private_global_rng(x.device):
                h = x[:1].detach()
                for m in self.chain():
                    h = m(h)
                    s.append(tuple(h.shape[1:]))
            self._shapes[key] = s
        return s

    def replay(self, x: Tensor, indices: dict | None = None) -> Tensor:
        """``F(x)`` without the hooks (no_grad by the caller where wanted); with ``indices``
        (a dict), the max-pooling indices are recorded into it by chain position."""
        with self.site.bypassed():
            if indices is None:
                h = self.module(x)
                for _, m in self.outer:
                    h = m(h)
                return h
            h = x
            for j, m in enumerate(self.chain()):
                if _unpoolable(m):
                    h, indices[j] = _maxpool_with_indices(m, h)
                else:
                    h = m(h)
            return h


_MAXPOOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def _unpoolable(m: nn.Module) -> bool:
    if not isinstance(m, _MAXPOOLS) or m.ceil_mode:
        return False
    d = m.dilation if isinstance(m.dilation, tuple) else (m.dilation,)
    return all(v == 1 for v in d)


def _base_pool(m: nn.Module) -> type:
    return next(t for t in _MAXPOOLS if isinstance(m, t))


def _maxpool_with_indices(m: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
    fn = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d,
          nn.MaxPool3d: F.max_pool3d}[_base_pool(m)]
    return fn(h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
              return_indices=True)


def _unpool(m: nn.Module, h: Tensor, idx: Tensor, in_shape: tuple) -> Tensor:
    """Max-unpooling with the forward's indices: exactly the transpose of the max-pooling."""
    reps = h.shape[0] // idx.shape[0]
    if reps > 1:
        idx = idx.repeat((reps,) + (1,) * (idx.dim() - 1))
    fn = {nn.MaxPool1d: F.max_unpool1d, nn.MaxPool2d: F.max_unpool2d,
          nn.MaxPool3d: F.max_unpool3d}[_base_pool(m)]
    return fn(h, idx, m.kernel_size, m.stride, m.padding, output_size=tuple(in_shape[1:]))


def _randn_like(x: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _undo(m: nn.Module, h: Tensor, in_shape: tuple) -> Tensor:
    """The feedback path's stand-in for the inverse of a parameter-free module."""
    if isinstance(m, _ELEMENTWISE):
        return h
    if isinstance(m, _SHAPES):
        return h.reshape((h.shape[0],) + tuple(in_shape))
    if isinstance(m, _POOLS):  # nearest upsampling back to the pooled input's size
        return F.interpolate(h, size=tuple(in_shape[1:]), mode="nearest")
    raise RuntimeError(f"localopt: internal: no feedback inverse for {type(m).__name__}")


def _numeric_padding(layer: nn.Module, nd: int) -> tuple[int, ...]:
    if layer.padding == "valid":
        return (0,) * nd
    if layer.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(layer.dilation, layer.kernel_size))
    return tuple(layer.padding)


def _transposed(layer: nn.Module, h: Tensor, V: Tensor, c: Tensor, in_shape: tuple) -> Tensor:
    """The layer's transposed-shape op with feedback weight ``V`` (shape of W), bias ``c``."""
    if isinstance(layer, nn.Linear):
        return F.linear(h, V.t(), c)
    nd = V.dim() - 2
    pad = _numeric_padding(layer, nd)
    stride, dil = tuple(layer.stride), tuple(layer.dilation)
    base = [(i - 1) * s - 2 * p + d * (k - 1) + 1
            for i, s, p, d, k in zip(h.shape[2:], stride, pad, dil, V.shape[2:])]
    outpad = [max(0, min(t - b, max(s, d) - 1))
              for t, b, s, d in zip(in_shape[1:], base, stride, dil)]
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    out = fn(h, V, c, stride, pad, outpad, layer.groups, dil)
    if tuple(out.shape[2:]) != tuple(in_shape[1:]):  # asymmetric 'same' etc.: crop/pad
        diff = [t - o for t, o in zip(in_shape[1:], out.shape[2:])]
        padspec: list[int] = []
        for dd in reversed(diff):
            padspec += [0, dd]
        out = F.pad(out, padspec)
    return out


# ---------------------------------------------------------------------------------------
# Per-forward record and the output capture node
# ---------------------------------------------------------------------------------------
class _Trace:
    """What one forward recorded: block inputs ``x[i]`` (and ``x[n] = y``), and the targets
    ``t[i]`` filled in by the backward."""

    __slots__ = ("x", "t", "last", "idx", "version")

    def __init__(self, n: int) -> None:
        self.x: list[Tensor | None] = [None] * (n + 1)
        self.t: list[Tensor | None] = [None] * (n + 1)
        self.last = -1
        self.idx: list[dict] = [{} for _ in range(n)]  # max-pool indices (transpose feedback)

    @staticmethod
    def merge(traces: "list[_Trace]") -> "_Trace | None":
        """The traces of the backward passes since the last step as one batch (their
        samples concatenated, a trace twice if it was backpropagated twice): the feedback
        step and ``retarget`` then see exactly the samples one big batch would have."""
        if len(traces) <= 1:
            return traces[0] if traces else None
        cat = lambda ts: None if any(t is None for t in ts) else torch.cat(ts)  # noqa: E731
        out = _Trace(len(traces[0].idx))
        out.x = [cat([tr.x[i] for tr in traces]) for i in range(len(out.x))]
        out.t = [cat([tr.t[i] for tr in traces]) for i in range(len(out.t))]
        out.idx = [{j: torch.cat([tr.idx[i][j] for tr in traces]) for j in traces[0].idx[i]
                    if all(j in tr.idx[i] for tr in traces)} for i in range(len(out.idx))]
        out.last = traces[-1].last
        if hasattr(traces[-1], "version"):
            out.version = traces[-1].version
        return out
        self.version = -1  # the top weight's version counter at the backward


class _Capture(torch.autograd.Function):
    """Identity on the model output; its backward sets the top target ``y - β ∂L/∂y``."""

    @staticmethod
    def forward(ctx, y: Tensor, trace: _Trace, rule: "TargetPropRule") -> Tensor:
        ctx.trace, ctx.rule = trace, rule
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        tr, rule = ctx.trace, ctx.rule
        hi = _target_dtype(tr.x[-1])  # targets in float32 under autocast (bf16 activations)
        tr.t[-1] = tr.x[-1].to(hi) - rule.beta * grad.to(hi)
        tr.version = rule._chain[-1].layer.weight._version
        rule._last_trace = tr
        rule._traces.append(tr)  # accumulated until the step (or zero_grad), as .grad
        return grad, None, None


# ---------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------
class TargetPropRule(Rule):
    """Base of the target-propagation rules (see the module docstring for the math).

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
        self._chain: list[_Block] = []
        self._by_name: dict[str, _Block] = {}
        self._current: _Trace | None = None
        self._last_trace: _Trace | None = None
        self._traces: list[_Trace] = []  # the backward passes since the last step
        self._validated = False
        self._root_hooks: list[Any] = []
        self._model_ref: nn.Module | None = None

    # -- chain discovery (called by wrap before anything is installed) --------------------
    def choose_sites(self, model: nn.Module, picked: list[tuple[str, nn.Module]]):
        if self._model_ref is not None:
            raise RuntimeError(f"localopt: this {type(self).__name__} rule instance is already "
                               "installed on a model; create a new one")
        chain = (self._user_chain(model) if self.blocks is not None
                 else self._auto_chain(model, picked))
        covered = set()
        for b in chain:
            covered.update(id(p) for p in b.module.parameters())
        stray = [n for n, p in model.named_parameters() if id(p) not in covered]
        if stray:
            raise ValueError(f"localopt: rule {self.name!r}: parameters {stray[:4]} are outside "
                             f"the blocks {[b.name for b in chain]} and would get no gradient; "
                             f"{_CHAIN_HELP}")
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

    def _auto_chain(self, model, picked) -> list[_Block]:
        if not _is_plain_sequential(model):
            raise ValueError(f"localopt: rule {self.name!r}: this {type(model).__name__} is not "
                             f"an nn.Sequential; {_CHAIN_HELP}")
        leaves = _leaves(model, "")
        chain: list[_Block] = []
        for n, m in leaves:
            if isinstance(m, LAYER_TYPES):
                chain.append(_Block(n, m, m, [], [], []))
            elif isinstance(m, _PARAM_FREE) and not any(True for _ in m.parameters()):
                if chain:
                    chain[-1].outer.append((n, m))
            else:
                raise ValueError(f"localopt: rule {self.name!r}: module '{n}' "
                                 f"({type(m).__name__}) has no feedback mapping here; "
                                 f"{_CHAIN_HELP}")
        names = [n for n, _ in picked]
        if names != [b.name for b in chain]:
            missing = sorted(set(b.name for b in chain) - set(names))
            raise ValueError(f"localopt: rule {self.name!r}: every Linear/Conv of the chain must "
                             f"be a block, but {missing} were excluded")
        if len(chain) < 2:
            raise ValueError(f"localopt: rule {self.name!r}: the chain has {len(chain)} block(s); "
                             "target propagation needs at least two")
        return chain

    def _user_chain(self, model) -> list[_Block]:
        mods = dict(model.named_modules())
        chain: list[_Block] = []
        for name in self.blocks:
            if name not in mods or name == "":
                raise ValueError(f"localopt: rule {self.name!r}: blocks entry {name!r} is not a "
                                 f"submodule of this {type(model).__name__}")
            m = mods[name]
            leaves = _leaves(m, name)
            layers = [(i, n, l) for i, (n, l) in enumerate(leaves) if isinstance(l, LAYER_TYPES)]
            bad = [(n, l) for n, l in leaves if not isinstance(l, LAYER_TYPES + _PARAM_FREE)
                   or (isinstance(l, _PARAM_FREE) and any(True for _ in l.parameters()))]
            if len(layers) != 1 or bad:
                what = (f"module '{bad[0][0]}' ({type(bad[0][1]).__name__})" if bad
                        else f"{len(layers)} Linear/Conv layers")
                raise ValueError(f"localopt: rule {self.name!r}: block '{name}' "
                                 f"({type(m).__name__}) contains {what}; {_CHAIN_HELP}")
            k, _, layer = layers[0]
            chain.append(_Block(name, m, layer, [l for _, l in leaves[:k]],
                                [l for _, l in leaves[k + 1:]], []))
        for a in chain:
            for b in chain:
                if a is not b and b.name.startswith(a.name + "."):
                    raise ValueError(f"localopt: rule {self.name!r}: blocks '{a.name}' and "
                                     f"'{b.name}' overlap; {_CHAIN_HELP}")
        return chain

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
                    if _unpoolable(m):
                        self._root_hooks.append(
                            m.register_forward_hook(partial(self._record_idx, b, j)))

    # hooks are bound methods (with functools.partial), not closures: the wrapped model stays
    # picklable, and a deepcopy's hooks act on the copy
    def _record_idx(self, b: _Block, j: int, module, args, out):
        tr = self._current
        if tr is not None:
            with torch.no_grad():
                tr.idx[b.index][j] = _maxpool_with_indices(module, args[0])[1]

    def _record_x0(self, module, args):
        tr = self._current
        if tr is not None and args and isinstance(args[0], Tensor) and tr.x[0] is None:
            tr.x[0] = args[0].detach()

    def _record_output(self, b: _Block, module, args, out):
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

    def feedback_blocks(self) -> list[_Block]:
        """The blocks that carry a learned feedback mapping, bottom-up."""
        return [b for b in self._chain if b.has_feedback]

    def feedback_params(self, b: _Block) -> dict[str, Tensor]:
        names = ["feedback", "feedback_bias"] + (["feedback_aux"] if self._is_aux(b) else [])
        return {n: b.site.buffer(n) for n in names}

    def _is_aux(self, b: _Block) -> bool:
        return self.aux and b.index == len(self._chain) - 1

    # -- forward --------------------------------------------------------------------------
    def _root_pre(self, module, args):
        if not self.hooks_enabled:  # localopt.hooks_disabled
            return
        self._current = _Trace(len(self._chain)) if torch.is_grad_enabled() else None
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
                               f"{_CHAIN_HELP}")
        if not self._validated:
            top = self._chain[-1]
            if not top.outer and out is not self._outputs.get(n - 1):
                raise RuntimeError(f"localopt: rule {self.name!r}: the model output is not the "
                                   f"output of the last block '{top.name}'; {_CHAIN_HELP}")
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
                               f"{_CHAIN_HELP}")
        if not self._validated and b.index > 0:
            prev = self._chain[b.index - 1]
            if not prev.outer and x is not self._outputs.get(prev.index):
                raise RuntimeError(f"localopt: rule {self.name!r}: the input of block "
                                   f"'{b.name}' is not the output of block '{prev.name}'; "
                                   f"{_CHAIN_HELP}")
        tr.last = b.index
        xd = x.detach()
        tr.x[b.index] = xd
        b.shapes(xd)
        return tr, b.index

    # -- the feedback mapping g_i ---------------------------------------------------------
    def g(self, b: _Block, a: Tensor, P: dict[str, Tensor], shapes: list[tuple],
          z: Tensor | None = None, idx: dict | None = None) -> Tensor:
        """``g_i(a)`` (``x_{i+1} -> x_i``) with feedback parameters ``P``; ``shapes`` from
        ``b.shapes(x_i)``; ``z``: auxiliary output units (``ao-sdtp`` top block only);
        ``idx``: max-pool indices by chain position (transpose-style feedback)."""
        chain = b.chain()
        k = len(b.pre)
        h = a.to(P["feedback"].dtype)  # bf16 activations (autocast): g in the feedback's dtype
        if z is not None:
            z = z.to(h.dtype)
        for j in list(range(len(chain) - 1, k, -1)) + [k] + list(range(k - 1, -1, -1)):
            m = chain[j]
            if j == k:
                h = _transposed(b.layer, h, P["feedback"], P["feedback_bias"], shapes[k])
                if z is not None:
                    h = h + z.matmul(P["feedback_aux"])
            elif self.transpose_feedback and isinstance(m, ACTIVATIONS):
                h = m(h)
            elif self.transpose_feedback and idx is not None and j in idx:
                h = _unpool(m, h, idx[j], shapes[j])
            else:
                h = _undo(m, h, shapes[j])
        if not self.transpose_feedback and b.act_in is not None:
            h = b.act_in(h)
        return h

    def _aux_out(self, b: _Block, x: Tensor) -> Tensor:
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
            hi = _target_dtype(x)
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

    def _difference(self, b: _Block, tr: _Trace, i: int) -> Tensor:
        """``g_i(x̂_{i+1}) - g_i(x_{i+1})`` with the current feedback."""
        x, t_next, x_next = tr.x[i], tr.t[i + 1], tr.x[i + 1]
        n = x_next.shape[0]
        z = None
        if self._is_aux(b):
            z = self._aux_out(b, x)
            z = torch.cat([z, z])
        r = self.g(b, torch.cat([t_next, x_next]), self.feedback_params(b), b.shapes(x), z,
                   tr.idx[i])
        return r[:n] - r[n:]

    @torch.no_grad()
    def retarget(self, tr: _Trace, salt: int = 0) -> list[Tensor]:
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

    def _replaying(self, b: _Block, device: torch.device, salt: int = 0):
        """Context of a replay of block ``b`` (and the blocks above, for DRL): torch's global
        RNG, which ``nn.Dropout`` draws from, is re-seeded from ``b``'s own stream and restored
        afterwards, so replays never consume global randomness."""
        return rng.private_global_rng(device, rng.next_seed(b.site, salt))

    def _exact_input_grad(self, b: _Block, delta: Tensor, x: Tensor) -> Tensor:
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

    def pop_trace(self) -> _Trace | None:
        """The samples of every backward pass since the last step, as one trace (consumed)."""
        tr, self._traces, self._last_trace = _Trace.merge(self._traces), [], None
        if tr is not None:  # recorded under autocast (bf16): train/replay in the weights' dtype
            top = len(self._chain) - 1
            for i, x in enumerate(tr.x):
                dt = self._chain[min(i, top)].layer.weight.dtype
                if x is not None and x.is_floating_point() and x.dtype != dt:
                    tr.x[i] = x.to(dt)
        return tr

    def feedback_loss(self, b: _Block, tr: _Trace, P: dict[str, Tensor], noise: float,
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
                xn = x + noise * _randn_like(x, gen)
                with torch.no_grad():
                    yn = b.replay(xn)
                    z = self._aux_out(b, xn) if self._is_aux(b) else None
                r = self.g(b, yn, P, b.shapes(x), z)
                return (r - xn).pow(2).flatten(1).sum(1).mean()
            if noise <= 0:
                raise ValueError(f"localopt: rule {self.name!r}: the feedback loss needs noise "
                                 f"> 0 (block '{b.name}' has noise={noise})")
            if kind == "drl":
                return self._drl(b, tr, P, x, noise, gen)
            return self._ldrl(b, tr, P, x, noise, gen)

    def _drl(self, b, tr, P, x, noise, gen):
        eps = noise * _randn_like(x, gen)
        xn = x + eps
        with torch.no_grad():
            h = xn
            for blk in self._chain[b.index:]:
                h = blk.replay(h)
            r = h
            for blk in reversed(self._chain[b.index + 1:]):
                xb, xb_next = tr.x[blk.index], tr.x[blk.index + 1]
                Pb = self.feedback_params(blk)
                n = r.shape[0]
                z = None
                if self._is_aux(blk):
                    z = self._aux_out(blk, xb)
                    z = torch.cat([z, z])
                out = self.g(blk, torch.cat([r, xb_next]), Pb, blk.shapes(xb), z)
                r = xb + out[:n] - out[n:]
        n = r.shape[0]
        out = self.g(b, torch.cat([r, tr.x[b.index + 1]]), P, b.shapes(x))
        ri = x + out[:n] - out[n:]
        return (ri - xn).pow(2).flatten(1).sum(1).mean() / noise ** 2

    def _ldrl(self, b, tr, P, x, noise, gen):
        y = tr.x[b.index + 1]
        dx = noise * _randn_like(x, gen)
        dy = noise * _randn_like(y, gen)
        rec = tr.idx[b.index]
        idx_n: dict = {} if rec else None
        with torch.no_grad():
            yn = b.replay(x + dx, idx_n)
        last = idx_n if self.switches == "perturbed" else rec
        idx = {j: torch.cat([rec[j], idx_n[j], last[j]]) for j in rec if j in idx_n} if rec else None
        n = y.shape[0]
        r = self.g(b, torch.cat([y, yn, y + dy]), P, b.shapes(x), None, idx)
        r0, r_x, r_y = r[:n], r[n:2 * n], r[2 * n:]
        dr, dr_y = r_x - r0, r_y - r0
        return (-2 * (dx * dr).flatten(1).sum(1).mean()
                + dr_y.pow(2).flatten(1).sum(1).mean())

    def options(self) -> dict[str, Any]:
        opts = {"beta": self.beta, "blocks": self.blocks, "init": self.init}
        if self.aux:
            opts["aux_units"] = self.aux_units
        return opts


@register_rule
class DTP(TargetPropRule):
    """``dtp``: difference target propagation (Lee et al. 2015; Bartunov et al. 2018's
    "DTP"): penultimate target from the gradient through the top block, learned inverses
    below, trained by the DTP reconstruction loss.  See :mod:`localopt.rules.target_prop`."""

    name = "dtp"
    gradient_top = True


@register_rule
class SDTP(TargetPropRule):
    """``sdtp``: simplified DTP (Bartunov et al. 2018): learned inverses for every block
    including the top one; no gradient below the top block."""

    name = "sdtp"


@register_rule
class AOSDTP(TargetPropRule):
    """``ao-sdtp``: SDTP with auxiliary output units (Bartunov et al. 2018).

    Extra option ``aux_units`` (default 128): the number of auxiliary units ``z = A x_{n-1}``
    (``A`` fixed, N(0, 1/fan_in)) that the top feedback reads beside the output."""

    name = "ao-sdtp"
    aux = True

    def __init__(self, *, beta: float = 0.1, blocks: list[str] | None = None,
                 init: str = "xavier", aux_units: int = 128) -> None:
        super().__init__(beta=beta, blocks=blocks, init=init)
        self.aux_units = check_number(self.name, "aux_units", aux_units, low=1, integer=True)


@register_rule
class DRL(TargetPropRule):
    """``drl``: DTP with the difference reconstruction loss (Meulemans et al. 2020)."""

    name = "drl"
    feedback_loss_kind = "drl"


@register_rule
class LDRL(TargetPropRule):
    """``l-drl``: layer-wise difference reconstruction loss (Ernoult et al. 2022).

    Extra option ``switches`` (``"clean"`` default, or ``"perturbed"``): which max-pooling
    switches the ``η`` term of the feedback loss unpools with (module docstring)."""

    name = "l-drl"
    feedback_loss_kind = "ldrl"
    transpose_feedback = True
    feedback_first = True

    def __init__(self, *, beta: float = 0.1, blocks: list[str] | None = None,
                 init: str = "xavier", switches: str = "clean") -> None:
        super().__init__(beta=beta, blocks=blocks, init=init)
        check_choice(self.name, "switches", switches, ("clean", "perturbed"))
        self.switches = switches

    def options(self) -> dict[str, Any]:
        return {**super().options(), "switches": self.switches}


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def _target_dtype(x: Tensor) -> torch.dtype:
    """Targets are computed in at least float32: a bf16/fp16 target would round the target
    step ``β ∂L/∂y`` away against activations of order one."""
    return torch.promote_types(x.dtype, torch.float32)


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
    tr = target_prop_rule(model)._last_trace
    if tr is None:
        raise ValueError("localopt: no backward since the last optimizer step")
    return list(tr.t)


def last_inputs(model: nn.Module) -> list[Tensor | None]:
    """Recorded block inputs ``x_0..x_n`` (``x_n`` = output) of the last backward's forward."""
    tr = target_prop_rule(model)._last_trace
    if tr is None:
        raise ValueError("localopt: no backward since the last optimizer step")
    return list(tr.x)
