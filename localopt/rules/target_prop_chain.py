"""The chain of blocks that target propagation trains, and the fixed parts of each block's
feedback mapping (used by :mod:`localopt.rules.target_prop`; the math is stated there).

A block ``F_i`` is one ``Linear``/``ConvNd`` layer with the parameter-free layers around it
(activations, pooling, flatten, dropout).  Its feedback mapping ``g_i`` (``x_{i+1} -> x_i``)
runs the block backwards: the inverse of its shape operations (flatten -> unflatten, pooling
-> nearest upsampling, or max-unpooling with the forward's switches), the layer's
transposed-shape op (``Linear(out -> in)``, or the transposed convolution with the conv's
stride/padding/dilation/groups) with the learned weight ``V_i`` and bias ``c_i``, then the
activation that produced ``x_i`` (Lee et al. 2015: ``g(h) = s(V h + c)``) -- or, in the
transpose-like form of ScalingDTP (Ernoult et al. 2022), ``V·act(unpool(a)) + c``.
:func:`feedback_map` computes it; :class:`Trace` is what one forward and its backward record.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import rng
from ..mechanism import LAYER_TYPES, Site

__all__ = ["ACTIVATIONS", "PARAM_FREE", "CHAIN_HELP", "Block", "Trace", "auto_chain", "user_chain",
           "feedback_map", "unpoolable", "maxpool_with_indices"]

ACTIVATIONS = (nn.Tanh, nn.ReLU, nn.ELU, nn.Sigmoid, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Softplus,
               nn.Hardtanh, nn.ReLU6, nn.SELU, nn.CELU, nn.Mish, nn.Softsign, nn.Tanhshrink)
ELEMENTWISE = ACTIVATIONS + (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                             nn.AlphaDropout)
POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
         nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
         nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
SHAPES = (nn.Flatten, nn.Unflatten)
PARAM_FREE = ELEMENTWISE + POOLS + SHAPES

CHAIN_HELP = (
    "target propagation needs the model as a chain of blocks: an nn.Sequential of "
    "Linear/Conv layers and parameter-free layers (activations, pooling, flatten, dropout), or "
    "blocks=['name1', 'name2', ...] naming modules that run one after the other, each on the "
    "previous one's output, each an nn.Sequential (or a single layer) holding one Linear/Conv "
    "plus parameter-free layers"
)


# ---------------------------------------------------------------------------------------
# Chain description
# ---------------------------------------------------------------------------------------
def is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def leaves(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """Modules a plain (nested) nn.Sequential runs, in order."""
    if not is_plain_sequential(module):
        return [(prefix, module)]
    out: list[tuple[str, nn.Module]] = []
    for n, c in module.named_children():
        out += leaves(c, f"{prefix}.{n}" if prefix else n)
    return out


class Block:
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
                if unpoolable(m):
                    h, indices[j] = maxpool_with_indices(m, h)
                else:
                    h = m(h)
            return h


MAXPOOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def unpoolable(m: nn.Module) -> bool:
    if not isinstance(m, MAXPOOLS) or m.ceil_mode:
        return False
    d = m.dilation if isinstance(m.dilation, tuple) else (m.dilation,)
    return all(v == 1 for v in d)


def _base_pool(m: nn.Module) -> type:
    return next(t for t in MAXPOOLS if isinstance(m, t))


def maxpool_with_indices(m: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
    fn = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d,
          nn.MaxPool3d: F.max_pool3d}[_base_pool(m)]
    return fn(h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
              return_indices=True)


def unpool(m: nn.Module, h: Tensor, idx: Tensor, in_shape: tuple) -> Tensor:
    """Max-unpooling with the forward's indices: exactly the transpose of the max-pooling."""
    reps = h.shape[0] // idx.shape[0]
    if reps > 1:
        idx = idx.repeat((reps,) + (1,) * (idx.dim() - 1))
    fn = {nn.MaxPool1d: F.max_unpool1d, nn.MaxPool2d: F.max_unpool2d,
          nn.MaxPool3d: F.max_unpool3d}[_base_pool(m)]
    return fn(h, idx, m.kernel_size, m.stride, m.padding, output_size=tuple(in_shape[1:]))


def undo(m: nn.Module, h: Tensor, in_shape: tuple) -> Tensor:
    """The feedback path's stand-in for the inverse of a parameter-free module."""
    if isinstance(m, ELEMENTWISE):
        return h
    if isinstance(m, SHAPES):
        return h.reshape((h.shape[0],) + tuple(in_shape))
    if isinstance(m, POOLS):  # nearest upsampling back to the pooled input's size
        return F.interpolate(h, size=tuple(in_shape[1:]), mode="nearest")
    raise RuntimeError(f"localopt: internal: no feedback inverse for {type(m).__name__}")


def _numeric_padding(layer: nn.Module, nd: int) -> tuple[int, ...]:
    if layer.padding == "valid":
        return (0,) * nd
    if layer.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(layer.dilation, layer.kernel_size))
    return tuple(layer.padding)


def transposed(layer: nn.Module, h: Tensor, V: Tensor, c: Tensor, in_shape: tuple) -> Tensor:
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
# Chain discovery (from an nn.Sequential, or the user's block names)
# ---------------------------------------------------------------------------------------
def auto_chain(rule: str, model: nn.Module, picked: list[tuple[str, nn.Module]]) -> list[Block]:
    """The blocks of an ``nn.Sequential``: every Linear/Conv starts one, the parameter-free
    layers after it belong to it; ``picked``: the sites ``wrap`` chose (all the layers)."""
    if not is_plain_sequential(model):
        raise ValueError(f"localopt: rule {rule!r}: this {type(model).__name__} is not "
                         f"an nn.Sequential; {CHAIN_HELP}")
    chain: list[Block] = []
    for n, m in leaves(model, ""):
        if isinstance(m, LAYER_TYPES):
            chain.append(Block(n, m, m, [], [], []))
        elif isinstance(m, PARAM_FREE) and not any(True for _ in m.parameters()):
            if chain:
                chain[-1].outer.append((n, m))
        else:
            raise ValueError(f"localopt: rule {rule!r}: module '{n}' "
                             f"({type(m).__name__}) has no feedback mapping here; "
                             f"{CHAIN_HELP}")
    names = [n for n, _ in picked]
    if names != [b.name for b in chain]:
        missing = sorted(set(b.name for b in chain) - set(names))
        raise ValueError(f"localopt: rule {rule!r}: every Linear/Conv of the chain must "
                         f"be a block, but {missing} were excluded")
    if len(chain) < 2:
        raise ValueError(f"localopt: rule {rule!r}: the chain has {len(chain)} block(s); "
                         "target propagation needs at least two")
    return chain


def user_chain(rule: str, model: nn.Module, blocks: list[str]) -> list[Block]:
    """The blocks named by the rule's ``blocks`` option, each checked to hold one
    Linear/Conv plus parameter-free layers, none inside another."""
    mods = dict(model.named_modules())
    chain: list[Block] = []
    for name in blocks:
        if name not in mods or name == "":
            raise ValueError(f"localopt: rule {rule!r}: blocks entry {name!r} is not a "
                             f"submodule of this {type(model).__name__}")
        m = mods[name]
        parts = leaves(m, name)
        layers = [(i, n, l) for i, (n, l) in enumerate(parts) if isinstance(l, LAYER_TYPES)]
        bad = [(n, l) for n, l in parts if not isinstance(l, LAYER_TYPES + PARAM_FREE)
               or (isinstance(l, PARAM_FREE) and any(True for _ in l.parameters()))]
        if len(layers) != 1 or bad:
            what = (f"module '{bad[0][0]}' ({type(bad[0][1]).__name__})" if bad
                    else f"{len(layers)} Linear/Conv layers")
            raise ValueError(f"localopt: rule {rule!r}: block '{name}' "
                             f"({type(m).__name__}) contains {what}; {CHAIN_HELP}")
        k, _, layer = layers[0]
        chain.append(Block(name, m, layer, [l for _, l in parts[:k]],
                           [l for _, l in parts[k + 1:]], []))
    for a in chain:
        for b in chain:
            if a is not b and b.name.startswith(a.name + "."):
                raise ValueError(f"localopt: rule {rule!r}: blocks '{a.name}' and "
                                 f"'{b.name}' overlap; {CHAIN_HELP}")
    return chain


# ---------------------------------------------------------------------------------------
# The feedback mapping g_i, and the per-forward record
# ---------------------------------------------------------------------------------------
def feedback_map(b: Block, a: Tensor, P: dict[str, Tensor], shapes: list[tuple],
                 transpose: bool, z: Tensor | None = None, idx: dict | None = None) -> Tensor:
    """``g_i(a)`` (``x_{i+1} -> x_i``) of block ``b`` with feedback parameters ``P``
    (``feedback``, ``feedback_bias``, and ``feedback_aux`` with ``z``); ``shapes`` from
    ``b.shapes(x_i)``; ``transpose``: the transpose-like form; ``z``: auxiliary output units
    (``ao-sdtp`` top block only); ``idx``: max-pool indices by chain position (transpose-like
    form)."""
    chain = b.chain()
    k = len(b.pre)
    h = a.to(P["feedback"].dtype)  # bf16 activations (autocast): g in the feedback's dtype
    if z is not None:
        z = z.to(h.dtype)
    for j in list(range(len(chain) - 1, k, -1)) + [k] + list(range(k - 1, -1, -1)):
        m = chain[j]
        if j == k:
            h = transposed(b.layer, h, P["feedback"], P["feedback_bias"], shapes[k])
            if z is not None:
                h = h + z.matmul(P["feedback_aux"])
        elif transpose and isinstance(m, ACTIVATIONS):
            h = m(h)
        elif transpose and idx is not None and j in idx:
            h = unpool(m, h, idx[j], shapes[j])
        else:
            h = undo(m, h, shapes[j])
    if not transpose and b.act_in is not None:
        h = b.act_in(h)
    return h


class Trace:
    """What one forward recorded: block inputs ``x[i]`` (and ``x[n] = y``), the targets
    ``t[i]`` filled in by the backward, and the top weight's version counter at the backward."""

    __slots__ = ("x", "t", "last", "idx", "version")

    def __init__(self, n: int) -> None:
        self.x: list[Tensor | None] = [None] * (n + 1)
        self.t: list[Tensor | None] = [None] * (n + 1)
        self.last = -1
        self.idx: list[dict] = [{} for _ in range(n)]  # max-pool indices (transpose feedback)
        self.version = -1

    @staticmethod
    def merge(traces: "list[Trace]") -> "Trace | None":
        """The traces of the backward passes since the last step as one batch (their
        samples concatenated, a trace twice if it was backpropagated twice): the feedback
        step and ``retarget`` then see exactly the samples one big batch would have."""
        if len(traces) <= 1:
            return traces[0] if traces else None
        cat = lambda ts: None if any(t is None for t in ts) else torch.cat(ts)  # noqa: E731
        out = Trace(len(traces[0].idx))
        out.x = [cat([tr.x[i] for tr in traces]) for i in range(len(out.x))]
        out.t = [cat([tr.t[i] for tr in traces]) for i in range(len(out.t))]
        out.idx = [{j: torch.cat([tr.idx[i][j] for tr in traces]) for j in traces[0].idx[i]
                    if all(j in tr.idx[i] for tr in traces)} for i in range(len(out.idx))]
        out.last = traces[-1].last
        out.version = traces[-1].version
        return out
