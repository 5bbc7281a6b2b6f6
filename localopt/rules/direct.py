"""Direct feedback rules: ``dfa``, ``bdfa``, ``drtp`` -- and module-wise (hybrid) DFA.

Every hidden unit receives the *output* error (or the target) through its own fixed random
matrix, instead of the error backpropagated through the layers above it.

Where the signal enters
-----------------------
``localopt.wrap(model, "dfa")`` hooks each selected layer (``nn.Linear``/``nn.ConvNd``) -- or,
with ``modules=[...]``, each named module -- and the model itself:

* the **model output** ``z`` is routed through :func:`~localopt.mechanism.from_output`: the
  first step of the backward receives ``e = dL/dz`` (shape ``(N, K)``, or ``(N, *P, K)`` for
  per-position outputs such as tokens ``(N, T, K)``), computes every hooked layer's signal
  and sends it to that layer's input as an ordinary autograd gradient -- no tensor hooks and
  no state between forward and backward, so ``torch.compile`` traces the model into one graph
  (after the first forward, which draws ``B``).  ``loss.backward()`` is unchanged;
* a hooked layer ``y = f_W(x)`` receiving the error ``delta = dL/dy`` computes its exact
  *local* parameter gradients from ``delta`` (autograd, as for every rule), and sends
  backward, as the gradient of its input ``x``, the direct projection (dense mode)::

      dx = e_flat @ B        B: (E, D) fixed, E = numel(e) / N, D = numel(x) / N

  instead of ``delta @ W``.  Everything between that input and the hooked layer below it
  (activations, norms, pooling, residual additions) keeps its exact derivative.

For an MLP ``h_l = f(a_l), a_l = W_l h_{l-1}`` this is Nøkland's (2016) DFA exactly: layer
``l+1`` sends ``B_{l+1}^T e`` to ``h_l``, the activation's backward multiplies by ``f'(a_l)``,
so ``delta a_l = (B e) * f'(a_l)`` (the feedback matrix of hidden layer ``l`` is stored on the
layer that *reads* ``h_l``); the layer that produces the output receives ``delta = e`` and
trains on its true gradient.  With ``B = W_2`` on a one-hidden-layer net, or ``B_l`` the
product of the downstream weights in a deep linear net, DFA equals backprop (tested).
In a residual network the gradient at a block's input is the sum of the direct signals of
the hooked layers that read it, through the exact shortcut paths.  A layer whose input needs
no gradient (the first layer) gets no feedback matrix.

Module-wise / hybrid DFA (Han et al. 2020): ``modules=["layers.0", "layers.1", ...]`` (names,
``fnmatch`` patterns or module types) hooks those modules instead of layers: inside a module
the error flows by exact backprop (``inside="bp"``, default) or by feedback alignment
(``inside="fa"``: every Linear/Conv inside sends ``delta B_in`` with a fixed Glorot-uniform
``B_in`` shaped like its W, stored on the module as ``localopt_inside_<path>``), and each
module's *input* gradient is ``e_flat @ B``.  A
module's update therefore needs only ``e`` -- not the modules above it -- which is what makes
the scheme model-parallel.  Layers outside the named modules keep exact backprop (so the
classifier after the last module trains on ``e`` and sends ``W^T e`` to the last module).

Feedback shapes and memory (float32, 4 bytes per entry)
-------------------------------------------------------
* ``feedback="dense"`` (default): ``B`` of shape ``(E, D)``, one random weight per (error
  component, input unit) -- Nøkland's DFA for any layer.  ``E*D`` entries per layer: 10 x
  16*32*32 = 164k for a CIFAR ResNet-20 block input, but 1000 x 64*56*56 = 2e8 (800 MB) for
  an ImageNet ResNet-50 layer -- use ``"channel"`` there.
* ``feedback="channel"`` (memory-bounded): ``B`` of shape ``(K, C)``, ``C`` the input's
  channel/feature size; the signal ``e @ B`` is shared by every spatial position (conv
  inputs ``(N, C, *S)``) or token (``(N, T, C)``) of the input.  When the output itself has
  per-position errors ``e: (N, *P, K)`` with ``P`` equal to the input's positions (token
  models), each position gets its own ``e_p @ B``.  ``K*C`` entries per layer (1000 x 64 for
  that ResNet-50 layer); a 224x224 timm ``resnet50`` with 1000 classes needs 94 MB in all.

``B`` is drawn lazily at the first forward pass with gradients (its shape depends on the
input and output shapes), all pending layers at once, each on the CPU from its layer's own
stream (``localopt_rng``, seeded at wrap time by ``seed=`` of :func:`localopt.wrap`; see
:mod:`localopt.rng`), so the draw is reproducible, independent of the device, and the same
on every data-parallel rank (``DistributedDataParallel`` broadcasts the stream at start-up).
Before that the buffers ``localopt_feedback`` are empty placeholders, filled in place (same
tensor); ``state_dict()`` works at any time and loading a checkpoint fills them (see
:func:`localopt.wrap`).  ``max_feedback_mb`` (default
1024) bounds the total; exceeding it is an error naming the largest layers.

Cost
----
Per hooked layer the backward still computes the exact weight gradient, but the transposed
op ``delta W`` (a matmul / transposed convolution as large as the forward) becomes the
projection ``e B``: ``N*E*D`` multiply-adds in dense mode (``E`` = 10 for CIFAR), ``N*K*C``
in channel mode (then a broadcast) -- a 3x3 convolution with 64 output channels costs ~60x
fewer.  What remains is the weight gradient, the exact backward of activations/norms, and the
hooks' per-layer Python overhead; so DFA beats BP where compute dominates (CPU) and is on par
with BP-through-hooks where kernel launches dominate (small models on a GPU).  Measured
ratios: ``results/notes/direct_feedback.md``.

Scaling
-------
``B`` entries have standard deviation ``scale / sqrt(F)``, ``F`` the number of input units
that receive the projection of one error vector (``D`` in dense mode; ``C`` times the number
of broadcast positions in channel mode), so that ``E||e B||^2 = ||e||^2``: every layer gets a
signal of the norm of the output error, the order of magnitude of BP's signal below the last
layer.  ``init="uniform"`` (default) draws ``U(-sqrt(3) s, sqrt(3) s)``, ``"normal"`` draws
``N(0, s^2)``, ``s = scale / sqrt(F)``.

The rules
---------
* ``dfa`` -- Nøkland, *Direct Feedback Alignment Provides Learning in Deep Neural Networks*,
  NeurIPS 2016; projected signal ``e``.
* ``bdfa`` -- binary DFA (Han & Yoo, *Efficient Convolutional Neural Network Training with
  Direct Feedback Alignment*, ICLR 2019 submission, arXiv:1901.01986): sign-valued feedback
  ``B = s * sign(R)``, entries ``+-s`` with ``s = scale / sqrt(F)``.  (The paper also proposes
  a feedback initialisation derived from the patterns of the random matrices; its exact recipe
  is not reproduced here.)
* ``drtp`` -- direct random target projection (Frenkel, Lefebvre & Bol, *Learning without
  feedback*, Frontiers in Neuroscience 2021): the projected signal is the target, not the
  error: ``dx = (-y* / c) @ B`` with ``y*`` the one-hot target and ``c`` the normaliser of the
  cross-entropy error ``e = (softmax(z) - y*) / c`` (``c = R``, the number of error rows ``N``
  or ``N*T``, for the plain batch mean; ``R k`` for ``loss / k``), i.e. the target part of the
  error, so it scales with the loss like every gradient.  (Frenkel writes ``B^T y*``; ``B`` is
  symmetric random, so the sign convention only fixes which of ``B``, ``-B`` is used.)  With
  ``gate=True`` (an option) each row's signal is scaled by ``1 - p_t``, i.e. the target
  component of the error is projected (see :class:`DRTP`).  The output layer still trains on
  its true gradient.  ``target="ce"`` (default) recovers ``y*``
  and ``c`` from the captured error of a hard-label ``F.cross_entropy`` on the named output,
  any reduction or scale (see :class:`DRTP`); another loss, or soft labels, raise.
  ``target="given"``: call ``localopt.set_targets(model, y, scale=s)`` (class indices or
  ``(N, K)`` targets; ``s`` the loss scale beyond the batch mean) before each backward.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import rng
from ..mechanism import CONV_TYPES, LAYER_TYPES, Site, from_output
from .base import (EXPLODING_FEEDBACK, FeedbackRule, Rule, check_bool, check_choice,
                   check_number, init_feedback, register_rule, selector_matches)

__all__ = ["DirectRule", "DFA", "BDFA", "DRTP", "set_targets"]

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
        return module._buffers[buf]


class DirectRule(Rule):
    """Shared machinery of the direct feedback rules (see the module docstring)."""

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


@register_rule
class DFA(DirectRule):
    """Direct feedback alignment (Nøkland 2016); module-wise DFA with ``modules=[...]``
    (Han et al. 2020).  See :mod:`localopt.rules.direct` for the exact math.

    Options:
        feedback: ``"dense"`` (default; B: (E, D)) or ``"channel"`` (B: (K, C), shared over
            positions; memory-bounded).
        init: ``"uniform"`` (default) or ``"normal"``; entries have std ``scale / sqrt(F)``.
        scale: multiplier of the feedback (default 1.0).
        output: index or key of the output tensor the loss uses, for models returning a
            tuple/list/dict.
        modules: names (``fnmatch`` patterns) or types of the modules that receive the direct
            signal at their input (module-wise DFA).
        inside: with ``modules``: ``"bp"`` (default; exact backprop inside each module) or
            ``"fa"`` (feedback alignment inside each module).
        channel_dim: feature axis of the inputs for ``feedback="channel"`` (default: 1 for
            convs and 4-D/5-D inputs of modules, -1 for Linear and 2-D/3-D inputs).
        max_feedback_mb: bound on the total feedback memory (default 1024).

    State: buffer ``localopt_feedback`` on each hooked module (empty until the first forward).
    """

    name = "dfa"


@register_rule
class BDFA(DirectRule):
    """Binary DFA (Han & Yoo 2019): DFA with sign-valued feedback ``B = s * sign(R)``,
    ``s = scale / sqrt(F)``.  Options as :class:`DFA` (``init`` is ignored)."""

    name = "bdfa"
    binary = True


@register_rule
class DRTP(DirectRule):
    """Direct random target projection (Frenkel et al. 2021): the projected signal is the
    target, ``dx = (-y*/c) @ B``, ``y*`` the one-hot target and ``c`` the loss's normaliser.

    ``gate=True`` (an option of this library, not of the paper; off by default): each row's signal
    is the target component of its error, ``dx = P(e) @ B`` with ``P(e) = (e . y* / ||y*||^2)
    y*`` -- for a hard-label cross-entropy ``-(1 - p_t) y* / c``, the published signal times
    how far the sample still is from its target.  The direction (the target's projection) is
    DRTP's; only its size fades as a sample is learned.  Why: the published signal ``-y*/c``
    never fades, so it keeps pushing every hidden unit along its fixed random direction and,
    in a network whose growth nothing bounds (ReLU, BatchNorm's scale and shift; Frenkel et
    al. trained tanh/sigmoid networks, which saturate), the activity and the logits grow: on
    ResNet-20 (RESULTS.md, row ``drtp``) its training loss rose from 2.2 to 9.4 in
    epochs 5-9 with update norms 3-14 times backprop's.  Not shown to fix that: in 100 steps at
    a constant lr of 0.02 both forms diverge (training loss 135 published, 93 gated), so the
    default stays the paper's rule (``gate=False``).
    The price: the gate needs ``p_t``, so the hidden layers wait for the output, as ``dfa``'s
    do; with ``gate=False`` the signal is known from the target alone, before the forward pass
    ends (what :mod:`localopt.pipeline`'s direct schedule sends: the published form).

    Option ``target`` (besides those of :class:`DFA`):

    * ``"ce"`` (default): for a hard-label cross-entropy loss on the output, with any
      reduction and scale (``F.cross_entropy(z, y) / k`` for gradient accumulation, ``sum``
      reduction, a loss scaler), read from the captured error ``e = (softmax(z) - y*) / c``:
      ``y*`` is one-hot at each row's most negative error, and the batch's ``c`` is recovered
      as ``sum p / sum e`` over the non-target entries (in float64; there ``e = p / c``
      exactly up to rounding, also where ``p`` is nearly one-hot).  Rows whose error vanished
      (``p`` one-hot in ``e``'s precision) carry no scale and are left out; when every row
      has, ``c = R`` (the unscaled mean over the ``R`` error rows).  So the signal scales with
      the loss, and micro-batches with losses ``mean / k`` accumulate to the whole batch's.
      If ``softmax(z) - c e`` is not one-hot (another loss, or soft labels: label smoothing
      and a loss scale cannot be told apart in ``e``) the backward raises.
    * ``"given"``: ``localopt.set_targets(model, y, scale=s)`` before each backward (class
      indices, or one-hot/soft targets of any loss); the signal is ``-s y* / R`` -- the
      target part of ``s`` times a mean-reduced loss's error.  Pass the loss's scale as
      ``s``: ``1/k`` for ``loss / k`` over ``k`` equal micro-batches (``n_i / N`` for a
      micro-batch of ``n_i`` of ``N`` samples), ``R`` for a ``sum`` reduction.
    """

    name = "drtp"

    def __init__(self, *, target: str = "ce", gate: bool = False, feedback: str = "dense",
                 init: str = "uniform", scale: float = 1.0, output: "int | str | None" = None,
                 modules: Any = None, channel_dim: "int | None" = None,
                 max_feedback_mb: float = 1024.0, inside: str = "bp") -> None:
        check_choice(self.name, "target", target, ("ce", "given"))
        self.gate = check_bool(self.name, "gate", gate)
        super().__init__(feedback=feedback, init=init, scale=scale, output=output,
                         modules=modules, channel_dim=channel_dim,
                         max_feedback_mb=max_feedback_mb, inside=inside)
        self.target = target
        self.needs_output = target == "ce"

    def source(self, e: Tensor, out: Tensor | None) -> Tensor:
        if self.target == "ce":
            return _ce_target_signal(out, e, self.gate)
        K = e.shape[-1]
        R = e.numel() // K
        st = self._state
        given, st.targets = (st.targets if st is not None else None), None
        if given is None:
            raise RuntimeError("localopt: rule 'drtp' with target='given': call "
                               "localopt.set_targets(model, y) before each backward")
        y, scale = given
        if not torch.is_floating_point(y):
            y = F.one_hot(y.long(), K)
        if y.shape != e.shape:
            raise RuntimeError(f"localopt: rule 'drtp': targets of shape {tuple(y.shape)} "
                               f"do not match the output {tuple(e.shape)} (give class "
                               "indices or one-hot/soft targets shaped like the output)")
        y = y.to(device=e.device, dtype=e.dtype)
        if self.gate:  # the error's projection on the target, row by row
            return y * ((e * y).sum(-1, keepdim=True) /
                        y.square().sum(-1, keepdim=True).clamp_min(1e-30))
        return y.mul(-scale / R)


def _ce_target_signal(z: Tensor, e: Tensor, gate: bool = False) -> Tensor:
    """``-y*/c`` from the output ``z`` and its error ``e = (softmax(z) - y*) / c`` under a
    hard-label cross-entropy of any scale (see :class:`DRTP`); with ``gate``, the target
    component of the error, ``e_t y* = -(1 - p_t) y* / c``.  Tensor ops only (no sync)."""
    K = e.shape[-1]
    R = e.numel() // K
    e2 = e.detach().reshape(-1, K).double()
    p = torch.softmax(z.detach().reshape(-1, K).double(), -1)
    # the target: the most negative error; among ties (zeros where p rounded to one-hot or
    # underflowed) the most probable class
    t = torch.where(e2 == e2.amin(-1, keepdim=True), p, -1.0).argmax(-1, keepdim=True)
    off = torch.ones_like(e2, dtype=torch.bool).scatter_(-1, t, False)
    live = (e2 > 0).any(-1, keepdim=True)          # rows whose error did not vanish
    num = torch.where(off & live, p, 0.0).sum()
    den = torch.where(off & live, e2, 0.0).sum()
    c = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny),
                    torch.full_like(den, float(R)))
    onehot = torch.zeros_like(e2).scatter_(-1, t, 1.0)
    tol = max(1e-3, 4 * torch.finfo(e.dtype).eps)
    torch._assert_async((p - c * e2 - onehot).abs().amax() <= tol,
                        "localopt: rule 'drtp' (target='ce'): softmax(z) - c e is not a one-hot "
                        "target for any loss scale c: the loss is not hard-label cross-entropy "
                        "on the output. Use target='given' with localopt.set_targets(model, y, "
                        "scale=...)")
    if gate:
        return onehot.mul_(e2).to(e.dtype).reshape(e.shape)
    return onehot.div_(-c).to(e.dtype).reshape(e.shape)


def set_targets(model: nn.Module, targets: Tensor, scale: float = 1.0) -> None:
    """Give ``drtp`` (``target="given"``) the targets of the next backward pass: class indices
    ``(N,)``/``(N, T)`` or one-hot/soft targets shaped like the output.  The hidden layers
    receive ``-scale * y* / R`` (``R`` error rows): ``scale`` is the factor the loss carries
    beyond a batch mean (``1/k`` for ``loss / k`` gradient accumulation over ``k``
    micro-batches; see :class:`DRTP`)."""
    from ..wrap import wrapping
    rec = wrapping(model)
    if rec is None or not isinstance(rec.rule, DRTP) or rec.rule._state is None:
        raise ValueError("localopt.set_targets: this model is not wrapped with rule 'drtp'")
    if not isinstance(targets, Tensor):
        raise TypeError(f"localopt.set_targets: targets must be a Tensor, got "
                        f"{type(targets).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"localopt.set_targets: scale={scale!r} must be a positive number")
    rec.rule._state.targets = (targets.detach(), float(scale))
