"""The machinery shared by the direct feedback rules of :mod:`localopt.rules.direct` (``dfa``,
``bdfa``, ``drtp``, and the learned-feedback ``dkp``, ``bidfa``): :class:`DirectRule`.

It hooks the selected layers (or, for module-wise DFA, the named modules) and the model: the
model output is routed through :func:`~localopt.mechanism.from_output`, whose backward
projects the output error ``e`` (or the rule's ``source`` of it) to the input
of every hooked site as ``e_flat @ B`` (``feedback="dense"``, ``B: (E, D)``) or ``e @ B``
broadcast over positions (``feedback="channel"``, ``B: (K, C)``); ``B`` is drawn lazily at
the first forward, with entries of standard deviation ``scale / sqrt(F)``.  The math, the
shapes, the memory and the cost: :mod:`localopt.rules.direct`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import rng
from ..mechanism import CONV_TYPES, LAYER_TYPES, Site, from_output
from .base import (EXPLODING_FEEDBACK, FeedbackRule, Rule, check_choice, check_number,
                   init_feedback, selector_matches)

__all__ = ["DirectRule"]

_INITS = ("uniform", "normal")
_MODES = ("dense", "channel")


class _State:
    """Per-wrapping state: the current forward's routed inputs, lazily drawn feedback,
    targets."""

    def __init__(self, model: nn.Module, sites: list[Site]) -> None:
        self.model = model
        self.sites = sites
        self.routed: list[tuple[Site, Tensor, Any]] | None = None
        self.pending: dict[Site, tuple[torch.Size, torch.device]] = {}
        self.targets: Tensor | None = None
        self.handles: list[Any] = []  # torch's RemovableHandle of each root hook


class _InsideFA(FeedbackRule):
    """Feedback alignment for a layer inside a module of module-wise DFA (``inside="fa"``):
    ``dx = delta B`` with ``B`` (Glorot-uniform, shape of W) stored on the enclosing module as
    ``localopt_inside_<path>``, so it is saved and checked with the module's state."""

    name = "fa"

    def feedback(self, site: Site) -> Tensor:
        module, buf = site.feedback_of
        return getattr(module, buf)


class DirectRule(Rule):
    """Shared machinery of the direct feedback rules: the hooks, the routing from the model
    output, the projection and the lazy drawing of ``B`` (the math: :mod:`localopt.rules.direct`).
    A rule sets ``binary``, ``needs_output`` and ``source``."""

    #: per-rule: fixed sign-valued feedback (bdfa)
    binary = False
    #: per-rule: the source needs the model output (drtp with target="ce")
    needs_output = False
    from_output = True
    random_stream = True

    def __init__(self, *, feedback: str = "dense", init: str = "uniform", scale: float = 1.0,
                 output: "int | str | None" = None, modules: Any = None,
                 channel_dim: "int | None" = None, max_feedback_mb: float = 1024.0,
                 inside: str = "bp") -> None:
        check_choice(self.name, "feedback", feedback, _MODES)
        check_choice(self.name, "inside", inside, ("bp", "fa"))
        if inside != "bp" and modules is None:
            raise ValueError(f"localopt: rule {self.name!r}: option inside={inside!r} needs "
                             "modules=[...] (it sets the rule inside each named module)")
        check_choice(self.name, "init", init, _INITS)
        scale = check_number(self.name, "scale", scale, low=0, low_open=True)
        max_feedback_mb = check_number(self.name, "max_feedback_mb", max_feedback_mb, low=0,
                                       low_open=True)
        if output is not None and not isinstance(output, (int, str)):
            raise TypeError(f"localopt: rule {self.name!r}: option output={output!r} must be "
                            "an int (tuple/list index) or a str (dict key)")
        if channel_dim is not None and channel_dim not in (1, -1):
            raise ValueError(f"localopt: rule {self.name!r}: option channel_dim={channel_dim!r} "
                             "must be 1 (channels first) or -1 (features last)")
        if modules is not None:
            specs = [modules] if isinstance(modules, (str, type)) else list(modules)
            if not specs:
                raise ValueError(f"localopt: rule {self.name!r}: option modules is empty")
            for s in specs:
                if not (isinstance(s, str) or (isinstance(s, type) and issubclass(s, nn.Module))):
                    raise TypeError(f"localopt: rule {self.name!r}: modules entry {s!r} must be "
                                    "a module name pattern (str) or an nn.Module subclass")
            self.wraps = (nn.Module,)
            self._module_specs = specs
        else:
            self._module_specs = None
        self.feedback, self.init, self.scale = feedback, init, float(scale)
        self.output, self.modules, self.channel_dim = output, modules, channel_dim
        self.max_feedback_mb = float(max_feedback_mb)
        self.inside = inside
        self._inner: list[tuple[Site, nn.Module, str, str]] = []   # (outer, layer, name, buffer)
        self._inner_sites: list[Site] = []
        self._state: _State | None = None

    # -- selection (module-wise DFA) -------------------------------------------------------
    def select(self, name: str, module: nn.Module) -> bool:
        if self._module_specs is None:
            return True
        return bool(name) and any(selector_matches(name, module, s) for s in self._module_specs)

    # -- life cycle -------------------------------------------------------------------------
    def setup(self, site: Site, generator: torch.Generator | None) -> None:
        # Empty placeholder: the shape of B is known at the first forward (see docstring).
        # It takes the module's device and floating dtype, and follows later .to() calls.
        ref = next((t for t in site.module.parameters() if t.is_floating_point()), None)
        site.register_buffer("feedback", torch.empty(0) if ref is None else
                             ref.new_empty(0, requires_grad=False).detach())
        if self.inside == "fa":  # FA inside the module: B per inner layer, kept on the module
            for rel, layer in site.module.named_modules():
                if rel and isinstance(layer, LAYER_TYPES):
                    buf = "inside_" + rel.replace(".", "__")
                    site.register_buffer(buf, init_feedback("xavier", layer.weight, generator))
                    entry = (site, layer, f"{site.name}.{rel}", Site.BUFFER_PREFIX + buf)
                    if entry not in self._inner:  # redraw (reset_feedback) runs setup again
                        self._inner.append(entry)

    def feedback_format(self) -> str:
        return f"direct/{self.feedback}" + ("/inside-fa" if self.inside == "fa" else "")

    def check_loaded(self, entries) -> str | None:
        """A checkpoint's feedback for layers not drawn yet: ``(E, D)`` (dense) or ``(K, C)``
        (channel) matrices with one output size for all layers, and (plain Linear/Conv
        layers, default ``channel_dim``) ``D`` a multiple of the layer's input features /
        ``C`` equal to them."""
        outs = {}
        for site, buf, shape in entries:
            if buf != Site.BUFFER_PREFIX + "feedback":
                continue
            if len(shape) != 2:
                return (f"the checkpoint's feedback for layer '{site.name}' has shape {shape}, "
                        f"not the 2-D feedback={self.feedback!r} matrix of a direct rule")
            outs.setdefault(shape[0], site.name)
            m = site.module
            fin = (m.in_features if isinstance(m, nn.Linear) else
                   m.in_channels if isinstance(m, CONV_TYPES) else None)
            if fin is None or self.channel_dim is not None:
                continue
            fits = shape[1] % fin == 0 if self.feedback == "dense" else shape[1] == fin
            if not fits:
                return (f"the checkpoint's feedback for layer '{site.name}' has shape {shape}, "
                        f"which does not fit its input of {fin} features/channels with "
                        f"feedback={self.feedback!r}")
        if len(outs) > 1:
            (a, na), (b, nb) = list(outs.items())[:2]
            return (f"the checkpoint's feedback projects {a} output values for layer '{na}' but "
                    f"{b} for layer '{nb}': it is not a direct-feedback checkpoint of one model")
        return None

    def attach(self, model: nn.Module, sites: list[Site]) -> None:
        if self._state is not None:
            raise RuntimeError(f"localopt: this {type(self).__name__} rule object is already "
                               "installed on another model; create one rule per model")
        if self._module_specs is not None:
            for spec in self._module_specs:
                if not any(selector_matches(s.name, s.module, spec) for s in sites):
                    raise ValueError(f"localopt: rule {self.name!r}: modules entry {spec!r} "
                                     f"matches no module of this {type(model).__name__}")
            names = [s.name for s in sites]
            for a in names:
                inner = [b for b in names if b.startswith(a + ".")]
                if inner:
                    raise ValueError(
                        f"localopt: rule {self.name!r}: modules selects '{a}' and modules inside "
                        f"it ({', '.join(repr(b) for b in inner[:3])}); name patterns match "
                        "sub-modules too ('layers.*' matches 'layers.0.conv1'): name the "
                        "modules exactly (e.g. 'layers.?') or by type")
        state = _State(model, sites)
        h1 = model.register_forward_pre_hook(self._root_pre_hook)
        h2 = model.register_forward_hook(self._root_hook)
        state.handles = [h1, h2]
        self._state = state
        inner_rule = _InsideFA()
        for outer, layer, name, buf in self._inner:
            sub = Site(layer, name, inner_rule)
            sub.feedback_of = (outer.module, buf)
            sub.install()
            self._inner_sites.append(sub)

    def detach(self, model: nn.Module, sites: list[Site]) -> None:
        for sub in self._inner_sites:
            sub.remove()
        self._inner_sites, self._inner = [], []
        st = self._state
        if st is not None:
            for h in st.handles:
                h.remove()
        self._state = None

    @contextlib.contextmanager
    def collect_routes(self):
        """Collect the ``(site, alias, payload)`` routes of the hooked modules run inside the
        block, outside the model's own forward (one pipeline stage, whose root hook would
        otherwise collect them); yields the list they are appended to."""
        st = self._state
        prev, st.routed = st.routed, []
        try:
            yield st.routed
        finally:
            st.routed = prev

    # -- root hooks: collect the routed inputs of a forward, route them from the output ------
    def _root_pre_hook(self, model: nn.Module, args: tuple) -> None:
        if not self.hooks_enabled:  # localopt.hooks_disabled
            return
        self._state.routed = [] if torch.is_grad_enabled() else None

    def _root_hook(self, model: nn.Module, args: tuple, out: Any) -> Any:
        if not self.hooks_enabled:  # localopt.hooks_disabled
            return None
        st = self._state
        routed, st.routed = st.routed, None
        if routed is None:
            return None
        z = self._select_output(model, out)
        if st.pending:
            self._materialize(z)
        if not (routed and z.requires_grad):
            return None
        sites, aliases, payloads = zip(*routed)
        send = _Send(self, sites, payloads, z.detach() if self.needs_output else None)
        return _replace_output(out, self.output, from_output(z, send, list(aliases)))

    def _select_output(self, model: nn.Module, out: Any) -> Tensor:
        key, where = self.output, f"{type(model).__name__} output"
        if key is None:
            if isinstance(out, Tensor):
                return out
            raise TypeError(
                f"localopt: rule {self.name!r} needs the model output error, but this "
                f"{where} is a {type(out).__name__}; pass output=<index or key> to wrap to name "
                "the tensor the loss is computed from")
        try:
            z = None if isinstance(out, Tensor) else out[key]
        except (KeyError, IndexError, TypeError):
            z = None
        if not isinstance(z, Tensor):
            raise TypeError(f"localopt: rule {self.name!r}: option output={key!r} does not name "
                            f"a tensor of this {where} ({type(out).__name__})")
        return z

    # -- per site -----------------------------------------------------------------------------
    def forward(self, site: Site, x: Tensor, out: Tensor) -> Any:
        st = self._state
        B = site.buffer("feedback")
        if B.numel():  # drawn (or loaded) for one input shape: shape checks, no sync
            if self.feedback == "dense":
                want, got = B.shape[1], math.prod(x.shape[1:])
            else:
                want, got = B.shape[1], x.shape[self._feature_dim(site, x.dim())]
            if want != got:
                raise RuntimeError(
                    f"localopt: rule {self.name!r}, feedback={self.feedback!r}: the feedback of "
                    f"layer '{site.name}' was drawn for inputs of {want} "
                    f"{'values' if self.feedback == 'dense' else 'channels'} per sample, but "
                    f"this input {tuple(x.shape)} has {got} (a new input resolution?). Dense "
                    "feedback is fixed to one input shape: use feedback='channel' (shared "
                    "over positions), or localopt.reset_feedback(model) to draw it again for "
                    "the new shape")
        else:
            prev = st.pending.get(site)
            if prev is not None and prev[0][1:] != x.shape[1:]:
                raise RuntimeError(f"localopt: layer '{site.name}' is called on inputs of "
                                   f"shapes {tuple(prev[0])} and {tuple(x.shape)} in one pass; "
                                   f"rule {self.name!r} needs one input shape per layer")
            st.pending[site] = (x.shape, x.device)
        return x.shape, x.dtype

    def route(self, site: Site, alias: Tensor, payload: Any) -> None:
        routed = self._state.routed
        if routed is not None:  # else run outside the model's forward: its backward raises
            routed.append((site, alias, payload))

    def send(self, site: Site, src: Tensor, payload: Any) -> Tensor:
        """The gradient of the site's input: the projection ``src @ B`` (in backward)."""
        shape, dtype = payload
        return self._project(site, src, site.buffer("feedback"), shape).to(dtype)

    # -- the projection ----------------------------------------------------------------------
    def _feature_dim(self, site: Site, ndim: int) -> int:
        if self.channel_dim is not None:
            return self.channel_dim % ndim
        if isinstance(site.module, nn.Linear):
            return ndim - 1
        if isinstance(site.module, CONV_TYPES):
            return 1
        return 1 if ndim >= 4 else ndim - 1

    def _project(self, site: Site, src: Tensor, B: Tensor, shape: torch.Size) -> Tensor:
        N = shape[0]
        if src.shape[0] != N:
            raise RuntimeError(f"localopt: rule {self.name!r}: layer '{site.name}' has batch "
                               f"size {N} but the output error has {src.shape[0]} rows; the "
                               "direct signal needs the batch dimension first in both")
        B = B.to(src.dtype)
        if self.feedback == "dense":
            E = src[0].numel()
            if B.shape[0] != E:
                raise RuntimeError(self._shape_msg(site, f"an output of {B.shape[0]} values "
                                                         f"per sample", f"{E}"))
            return src.reshape(N, E).matmul(B).view(shape)
        fdim = self._feature_dim(site, len(shape))
        pos_x = tuple(shape[1:fdim]) + tuple(shape[fdim + 1:])
        pos_e = tuple(src.shape[1:-1])
        if B.shape[0] != src.shape[-1]:
            raise RuntimeError(self._shape_msg(site, f"{B.shape[0]} outputs", f"{src.shape[-1]}"))
        s = src.matmul(B)                                   # (N, *P, C)
        if not pos_e:
            view = [N] + [1] * len(pos_x)
            view.insert(fdim, shape[fdim])
            return s.view(view).expand(shape)
        if pos_e != pos_x:
            raise RuntimeError(
                f"localopt: rule {self.name!r}, feedback='channel': layer '{site.name}' has "
                f"input positions {pos_x} but the output error has positions {pos_e}; per-"
                "position signals need equal positions (use feedback='dense' otherwise)")
        return s.movedim(-1, fdim) if fdim != len(shape) - 1 else s

    def at_drawn_norm(self, site: Site, B: Tensor, xshape: torch.Size, e_ndim: int) -> Tensor:
        """``B n_0 / ||B||_F``: the feedback at the Frobenius norm it was drawn with, ``n_0 =
        scale sqrt(E)`` (dense; ``scale sqrt(K / P)`` for ``"channel"`` with ``P`` shared
        positions) -- the learned rules' ``fixed_norm`` (``dkp``, ``bidfa``): ``B`` learns the
        signal's direction only.  Tensor ops only (no host sync)."""
        n0 = self.scale * math.sqrt(B.shape[0] / self._shared_positions(site, xshape, e_ndim))
        return B * (n0 / torch.linalg.vector_norm(B).clamp_min(1e-30))

    def _shape_msg(self, site: Site, had: str, now: str) -> str:
        return (f"localopt: rule {self.name!r}: the feedback of layer '{site.name}' was drawn "
                f"for {had}, but this output has {now}; the output shape must stay fixed "
                "(or unwrap and wrap again)")

    # -- lazy feedback ---------------------------------------------------------------------
    def _feedback_shape(self, site: Site, xshape: torch.Size, zshape: torch.Size):
        """(shape of B, fan F) for input ``xshape`` and output ``zshape``."""
        if self.feedback == "dense":
            D = math.prod(xshape[1:])
            return (math.prod(zshape[1:]), D), D
        C = xshape[self._feature_dim(site, len(xshape))]
        return (zshape[-1], C), C * self._shared_positions(site, xshape, len(zshape))

    def _shared_positions(self, site: Site, xshape: torch.Size, e_ndim: int) -> int:
        """``P``, the input positions that share one projection ``e B``: those of a
        ``feedback="channel"`` input when the error is per sample (``e_ndim == 2``); else 1."""
        if self.feedback != "channel" or e_ndim != 2:
            return 1
        return math.prod(xshape[1:]) // xshape[self._feature_dim(site, len(xshape))]

    def _materialize(self, z: Tensor) -> None:
        st = self._state
        todo = [s for s in st.sites if s in st.pending]
        if len(z.shape) < 2:
            raise RuntimeError(f"localopt: rule {self.name!r} needs a batched model output "
                               f"(N, ..., K); got shape {tuple(z.shape)}")
        if self.scale > EXPLODING_FEEDBACK:  # before any buffer is drawn
            raise ValueError(
                f"localopt: rule {self.name!r}: option scale={self.scale:g} makes every layer's "
                f"direct signal {self.scale:g}x the norm of the output error (the feedback's "
                f"entries have std scale / sqrt(fan)); above {EXPLODING_FEEDBACK:g} the updates "
                "blow up from the first step. Use a scale near 1 (the default)")
        plans = []
        for s in todo:
            xshape, dev = st.pending[s]
            if len(xshape) < 2:
                raise RuntimeError(f"localopt: rule {self.name!r}: layer '{s.name}' got an "
                                   f"unbatched input of shape {tuple(xshape)}")
            plans.append((s, *self._feedback_shape(s, xshape, z.shape)))
        total = sum(math.prod(shp) for _, shp, _ in plans) * 4 / 2**20
        have = sum(s.buffer("feedback").numel() for s in st.sites) * 4 / 2**20
        if total + have > self.max_feedback_mb:
            big = sorted(plans, key=lambda p: -math.prod(p[1]))[:3]
            listing = ", ".join(f"'{s.name}' {shp} ({math.prod(shp) * 4 / 2**20:.0f} MB)"
                                for s, shp, _ in big)
            raise RuntimeError(
                f"localopt: rule {self.name!r}, feedback={self.feedback!r}: the feedback "
                f"matrices would take {total + have:.0f} MB > max_feedback_mb="
                f"{self.max_feedback_mb:g} (largest: {listing}). Use feedback='channel' "
                "(K x C per layer) or raise max_feedback_mb")
        for s, shp, fan in plans:
            cur = s.buffer("feedback")
            B = self.draw(shp, self.scale / math.sqrt(fan), rng.generator(s))
            with torch.no_grad():  # in place: the buffer keeps its identity (DDP, optimizers)
                cur.set_(B.to(cur.device, cur.dtype))
        st.pending.clear()

    def draw_feedback(self, site: Site, input_shape, output_shape) -> None:
        """Draw ``site``'s feedback now, as the first forward of the whole model would for layer
        inputs ``input_shape`` and model outputs ``output_shape`` (for a pipeline stage, which
        never runs the whole model's forward: :mod:`localopt.pipeline`)."""
        self._state.pending[site] = (torch.Size(input_shape), site.buffer("feedback").device)
        self._materialize(torch.empty(tuple(output_shape), device="meta"))

    def draw(self, shape: tuple[int, ...], std: float, generator: torch.Generator) -> Tensor:
        """A feedback matrix of ``shape`` with entries of standard deviation ``std``."""
        if self.binary:
            B = torch.empty(shape).uniform_(-1.0, 1.0, generator=generator)
            return torch.where(B >= 0, std, -std)
        if self.init == "normal":
            return torch.randn(shape, generator=generator).mul_(std)
        a = math.sqrt(3.0) * std
        return torch.empty(shape).uniform_(-a, a, generator=generator)

    def feedback_shape(self, site: Site) -> tuple[int, ...] | None:
        B = site.buffer("feedback")
        return tuple(B.shape) if B.numel() else None

    # -- the signal ---------------------------------------------------------------------------
    def source(self, e: Tensor, out: Tensor | None) -> Tensor:
        """The vector projected to every layer, from the output error ``e`` (and the detached
        output ``out`` when :attr:`needs_output`)."""
        return e


class _Send:
    """The backward of :func:`~localopt.mechanism.from_output` for one forward: the signal of
    every routed input, from the output error ``e``."""

    def __init__(self, rule: DirectRule, sites: tuple, payloads: tuple,
                 out: Tensor | None) -> None:
        self.rule, self.sites, self.payloads, self.out = rule, sites, payloads, out

    def __call__(self, e: Tensor) -> tuple[Tensor, ...]:
        src = self.rule.source(e, self.out)
        return tuple(self.rule.send(s, src, p) for s, p in zip(self.sites, self.payloads))


def _replace_output(out: Any, key: "int | str | None", z: Tensor) -> Any:
    """The model output with the tensor named by ``key`` (all of it when None) replaced."""
    if key is None:
        return z
    if isinstance(out, (dict, list)):
        out[key] = z  # the container was just built by the forward
        return out
    items = list(out)
    items[key] = z
    return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
