"""The one mechanism every rule uses: substitute what a module sends backward.

A *site* is one hooked module (an ``nn.Linear``/``nn.ConvNd`` for the feedback-alignment
family, any ``nn.Module`` for block-level rules).  Two hooks are installed on it:

* a forward **pre-hook** hands the module a *detached* alias of its input ``x``;
* a forward **hook** routes the module's output through :class:`_Inject`, an identity in
  the forward pass whose backward receives the error ``delta = dL/d out`` and returns

  - ``delta`` to the module's own graph, so autograd computes the exact *local* weight and
    bias gradients ``dW = delta^T x``, ``db = sum(delta)`` (the input is detached, so autograd
    computes no input gradient there: no wasted work), and
  - ``rule.backward(site, delta, payload)`` as the gradient of ``x`` -- the signal the rule
    sends to the layers below (``delta B`` for feedback alignment, ``B_l e`` for DFA, ...).

The forward computation is untouched -- the module runs its own ``forward`` on the same
values -- so outputs are bitwise what they were before wrapping, for subclasses too.
``_Inject`` returns its input marked dirty instead of a view, so in-place operations that
follow (``ReLU(inplace=True)``, ``x += shortcut``) keep working as with plain autograd; for a
hooked *block* (not a Linear/Conv), or a subclass that overrides ``forward``, it returns a
copy, since the module's last operation may have saved its output for its own backward.

Rules whose input gradient is computed from the *model output* error (direct feedback:
``dfa``, ``drtp``, ...; :attr:`Rule.from_output`) use the same hooks with one more edge:
``_Inject`` also returns an alias of ``x``, which the rule hands, with its payload, to
:func:`from_output` at the model output ``z``.  That function's backward receives
``e = dL/dz`` first (before any layer upstream of ``z``) and returns each layer's signal as
the gradient of its alias, which ``_Inject`` sends on to ``x``.  The whole route is autograd
edges -- no tensor hooks, no state kept between the forward and the backward -- so
``torch.compile`` traces it into one graph.  A layer whose alias got no signal (the loss was
not computed from ``z``, or the layer ran outside the model's forward) raises in backward.
The signals of all layers are computed in that first step, so in eager mode they are held
together until each layer's backward has passed them on: one input-sized tensor per hooked
layer (for a CIFAR ResNet-20 about a quarter of the activation memory).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["Site", "site_of", "input_grad", "from_output", "overrides_forward", "CONV_TYPES",
           "LAYER_TYPES"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYER_TYPES = (nn.Linear,) + CONV_TYPES


def _identity_out(ctx, out: Tensor, site: "Site") -> Tensor:
    if not site.fast:
        # A block's (or a forward-overriding subclass's) last op may have saved its own
        # output for backward (ReLU, softmax): marking it dirty bumps its version and
        # would invalidate that, so these pay one copy of the output.
        return out.clone()
    ctx.mark_dirty(out)
    return out


class _Inject(torch.autograd.Function):
    """Identity on ``out``; backward sends ``delta`` to ``out`` and the rule's signal to ``x``."""

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, site: "Site", payload: Any) -> Tensor:
        ctx.site, ctx.payload = site, payload
        return _identity_out(ctx, out, site)

    @staticmethod
    def backward(ctx, delta: Tensor):
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = ctx.site.rule.backward(ctx.site, delta, ctx.payload)
        return delta, grad_x, None, None


class _InjectFromOutput(torch.autograd.Function):
    """``_Inject`` for :attr:`Rule.from_output` rules: identity on ``out``, plus an alias of
    ``x`` whose gradient (the signal :func:`from_output` computed) is sent on to ``x``."""

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, site: "Site") -> tuple[Tensor, Tensor]:
        ctx.site = site
        ctx.set_materialize_grads(False)  # no signal reads as None, not as zeros
        # autograd cannot mark a view dirty in a Function with two outputs: copy that one
        y = out.clone() if out._base is not None else _identity_out(ctx, out, site)
        return y, x.detach()

    @staticmethod
    def backward(ctx, delta: Tensor | None, signal: Tensor | None):
        if signal is None and ctx.needs_input_grad[1]:
            site = ctx.site
            raise RuntimeError(
                f"localopt: rule {site.rule.name!r}: layer '{site.name}' ran its backward before "
                "the model output error was captured. The loss must be computed from the output "
                "of the wrapped model's forward (named by output=...), and the layer must be run "
                "inside that forward")
        return delta, signal, None


class _FromOutput(torch.autograd.Function):
    """Identity on the model output ``z``; backward: ``e`` to ``z``, ``send(e)`` to the aliases."""

    @staticmethod
    def forward(ctx, z: Tensor, send: Any, *aliases: Tensor) -> Tensor:
        ctx.send = send
        return z.view_as(z)

    @staticmethod
    def backward(ctx, e: Tensor):
        return (e, None) + tuple(ctx.send(e))


def from_output(z: Tensor, send: Any, aliases: "list[Tensor]") -> Tensor:
    """``z`` (a view; the model output the loss is computed from) routed so that its backward
    first computes ``send(e)`` from ``e = dL/dz`` -- a tuple, one tensor per alias, each shaped
    like it -- and sends each as the gradient of its alias (returned by the hooks of a
    :attr:`Rule.from_output` rule's sites, see the module docstring)."""
    return _FromOutput.apply(z, send, *aliases)


#: the attribute of a hooked module that holds its :class:`Site` (read by :func:`site_of`)
_SITE_ATTR = "_localopt_site"


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    site: Site | None = module.__dict__.get(_SITE_ATTR)
    if site is None or not site.active:
        return None
    if args:
        x = args[0]
    else:
        x = kwargs.get(site.input_kwarg)
    if not (isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled()):
        site._pending = None
        return None
    site._pending = x
    xd = x.detach()
    if args:
        return (xd,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs[site.input_kwarg] = xd
    return args, kwargs


def _post_hook(module: nn.Module, args: tuple, out: Any):
    site: Site | None = module.__dict__.get(_SITE_ATTR)
    if site is None or not site.active or site._pending is None:
        return None
    x, site._pending = site._pending, None
    if not isinstance(out, Tensor):
        raise TypeError(
            f"localopt: module '{site.name}' ({type(module).__name__}) returned "
            f"{type(out).__name__}, not a Tensor; rule '{site.rule.name}' can only hook modules "
            "with a single tensor output (exclude it, or wrap a sub-module instead)"
        )
    payload = site.rule.forward(site, x, out)
    if not site.rule.from_output:
        return _Inject.apply(out, x, site, payload)
    out, alias = _InjectFromOutput.apply(out, x, site)
    site.rule.route(site, alias, payload)
    return out


def overrides_forward(module: nn.Module) -> bool:
    """True when ``module``'s class changes the forward of its torch base layer."""
    for base in LAYER_TYPES:
        if isinstance(module, base):
            cls = type(module)
            if cls.forward is not base.forward:
                return True
            conv_fwd = getattr(base, "_conv_forward", None)
            return conv_fwd is not None and cls._conv_forward is not conv_fwd
    return True


def site_of(module: nn.Module) -> "Site | None":
    """The :class:`Site` installed on ``module`` (by :func:`localopt.wrap`, or by a rule for
    a layer it hooks itself), or ``None`` when ``module`` is not hooked."""
    return module.__dict__.get(_SITE_ATTR)


class Site:
    """One hooked module: its name, rule, and the buffers the rule registered on it.

    Rules keep their per-layer *tensor* state as buffers on the hooked module (named
    ``localopt_*``), so it follows ``model.to(...)`` and is saved by ``model.state_dict()``.
    The per-layer *Python* state some rules keep between calls is declared below (class
    attributes give the default of every site); no other attribute is set on a site.
    """

    BUFFER_PREFIX = "localopt_"

    #: False while the site's hooks pass the module's forward through untouched (exact
    #: backprop): set by :meth:`bypassed` and by :func:`localopt.hooks_disabled`.
    active: bool = True
    #: Rules that learn their feedback (:class:`~localopt.rules.learned.LearnsFeedback`): the
    #: version counter of the site's weight when its feedback was last updated (``None``:
    #: not recorded yet, or the module has no parameter).
    weight_version: "int | None" = None
    #: Normalised least-squares feedback learning (``bfa``, ``bidfa``): the normaliser summed
    #: over the backward passes since the last optimizer step (``None``: no pending signal);
    #: the step divides ``B.grad`` by it (:func:`~localopt.rules.learned.apply_feedback_grads`).
    #: ``bidfa`` with ``center=True`` keeps a vector here, the normaliser followed by the batch
    #: sums its centring needs (summed, zeroed and averaged over ranks like a scalar one).
    feedback_norm: "Tensor | None" = None
    #: ``wm``: True once the site's feedback carried an error backward (a forward alone does
    #: not), so the mirror step updates only feedback that is used.
    sends_feedback: bool = False
    #: ``bfa`` with ``drop_mean="auto"``: whether this layer drops its mean input direction
    #: from B; None until its first feedback step decides (True when no input it saw, on any
    #: data-parallel rank, had a negative value).
    drops_mean: "bool | None" = None
    #: A layer that a direct rule hooks inside one of its modules (``inside="fa"``): the
    #: ``(module, buffer name)`` that holds the layer's feedback ``B``.
    feedback_of: "tuple[nn.Module, str] | None" = None
    #: :mod:`localopt.rng`'s cache of the site's random-stream position (no host read per draw).
    rng_cache: "tuple | None" = None

    def __init__(self, module: nn.Module, name: str, rule: "Any") -> None:
        self.module = module
        self.name = name
        self.rule = rule
        self.active = True
        self.input_kwarg = "input"
        self.buffer_names: list[str] = []
        self._handles: list[RemovableHandle] = []
        self._pending: Tensor | None = None
        # Plain torch layers (and subclasses that keep their forward) get the closed-form
        # input gradient; others re-run their own forward with W swapped (see input_grad).
        self.fast = isinstance(module, LAYER_TYPES) and not overrides_forward(module)

    # -- state ---------------------------------------------------------------------------
    def register_buffer(self, name: str, tensor: Tensor) -> None:
        full = self.BUFFER_PREFIX + name
        self.module.register_buffer(full, tensor, persistent=True)
        self.buffer_names.append(full)

    def buffer(self, name: str) -> Tensor:
        """The rule's buffer ``name`` on this site's module (registered as ``localopt_<name>``)."""
        return getattr(self.module, self.BUFFER_PREFIX + name)

    def has_buffer(self, name: str) -> bool:
        """Whether the rule registered a buffer ``name`` on this site."""
        return self.BUFFER_PREFIX + name in self.buffer_names

    def set_buffer(self, name: str, tensor: Tensor) -> None:
        """Replace the rule's buffer ``name`` by ``tensor`` (registered with :meth:`register_buffer`
        first)."""
        full = self.BUFFER_PREFIX + name
        if full not in self.buffer_names:
            raise KeyError(f"localopt: site '{self.name}' has no buffer {name!r}")
        self.module.register_buffer(full, tensor, persistent=True)

    def state_buffers(self) -> list[tuple[str, Tensor]]:
        """This site's state: ``(registered name, tensor)`` of every buffer the rule
        registered on the module (the ``localopt_*`` names), in registration order."""
        return [(b, getattr(self.module, b)) for b in self.buffer_names]

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    # -- install / remove ------------------------------------------------------------------
    def install(self) -> None:
        m = self.module
        object.__setattr__(m, _SITE_ATTR, self)
        self._handles = [m.register_forward_pre_hook(_pre_hook, with_kwargs=True),
                         m.register_forward_hook(_post_hook)]

    def remove(self) -> None:
        m = self.module
        for h in self._handles:
            h.remove()
        self._handles = []
        own = dict(m.named_buffers(recurse=False))
        for b in self.buffer_names:
            if b in own:
                delattr(m, b)
        self.buffer_names = []
        m.__dict__.pop(_SITE_ATTR, None)

    @contextlib.contextmanager
    def bypassed(self):
        """Run the module's forward without this site's hooks (used by the slow path)."""
        self.active = False
        try:
            yield
        finally:
            self.active = True

    def __repr__(self) -> str:
        return f"Site({self.name!r}, {type(self.module).__name__}, rule={self.rule.name!r})"


# ---------------------------------------------------------------------------------------
# The input gradient of a layer with a substitute weight: the only place that knows the
# layer types.  Every rule of the feedback-alignment family calls this with its B.
# ---------------------------------------------------------------------------------------
def input_grad(site: Site, delta: Tensor, weight: Tensor, x: Tensor | torch.Size) -> Tensor:
    """Gradient w.r.t. the layer input of ``layer(x)`` with ``weight`` in place of W.

    ``Linear``: ``delta @ weight`` (any leading dims).  ``ConvNd``: the transposed convolution
    of ``delta`` with ``weight`` (stride, padding incl. ``'same'`` and non-zero padding modes,
    dilation, groups).  Subclasses that override ``forward`` take an exact but slower path:
    their own forward is re-run with ``weight`` substituted and differentiated w.r.t. ``x``
    (one extra layer forward); ``x`` must then be the tensor, not its shape.
    """
    m = site.module
    if not site.fast:
        return _functional_input_grad(site, delta, weight, x)
    w = weight.to(delta.dtype)
    if isinstance(m, nn.Linear):
        return delta.matmul(w)
    shape = x if isinstance(x, torch.Size) else x.shape
    return _conv_input_grad(m, delta, w, shape)


def _conv_backward(delta, shape, w, stride, padding, dilation, groups):
    dummy = delta.new_empty(1).expand(shape)
    return torch.ops.aten.convolution_backward(
        delta, dummy, w, None, list(stride), list(padding), list(dilation),
        False, [0] * len(stride), groups, (True, False, False),
    )[0]


def mode_padding(m: nn.Module) -> list[int]:
    """The padding a conv layer with ``padding_mode != "zeros"`` applies with ``F.pad`` before
    its convolution, in ``F.pad``'s order (last dimension first, ``(low, high)`` per dimension),
    as ``torch.nn.modules.conv`` derives it from ``padding`` (``"same"``: ``dilation *
    (kernel - 1)`` in all, the extra one at the high end)."""
    nd = len(m.kernel_size)
    if isinstance(m.padding, str):
        pad = [0] * (2 * nd)
        if m.padding == "same":
            for i, (d, k) in enumerate(zip(m.dilation, m.kernel_size)):
                total = d * (k - 1)
                j = 2 * (nd - 1 - i)
                pad[j], pad[j + 1] = total // 2, total - total // 2
        return pad
    return [p for p in reversed(m.padding) for _ in range(2)]


def _conv_input_grad(m: nn.Module, delta: Tensor, w: Tensor, shape: torch.Size) -> Tensor:
    nd = w.dim() - 2
    unbatched = delta.dim() == nd + 1
    if unbatched:
        delta, shape = delta.unsqueeze(0), torch.Size((1,) + tuple(shape))
    spatial = tuple(shape[-nd:])
    if m.padding_mode != "zeros":
        # forward was conv(F.pad(x, pad, mode), padding=0): transpose the conv, then the pad.
        pad = mode_padding(m)
        lo = [pad[2 * (nd - 1 - i)] for i in range(nd)]
        hi = [pad[2 * (nd - 1 - i) + 1] for i in range(nd)]
        padded = shape[:-nd] + tuple(s + a + b for s, a, b in zip(spatial, lo, hi))
        g = _conv_backward(delta, padded, w, m.stride, (0,) * nd, m.dilation, m.groups)
        g = _pad_adjoint(g, shape, tuple(pad), m.padding_mode)
    elif m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, w.shape[2:])]
        lo = [t // 2 for t in total]
        if all(t % 2 == 0 for t in total):
            g = _conv_backward(delta, shape, w, m.stride, lo, m.dilation, m.groups)
        else:  # asymmetric: transpose on the explicitly padded input, then crop
            padded = shape[:-nd] + tuple(s + t for s, t in zip(spatial, total))
            g = _conv_backward(delta, padded, w, m.stride, (0,) * nd, m.dilation, m.groups)
            g = g[(Ellipsis,) + tuple(slice(a, a + s) for a, s in zip(lo, spatial))]
    else:
        padding = (0,) * nd if m.padding == "valid" else m.padding
        g = _conv_backward(delta, shape, w, m.stride, padding, m.dilation, m.groups)
    return g.squeeze(0) if unbatched else g


def _pad_adjoint(g: Tensor, shape: torch.Size, pad: tuple, mode: str) -> Tensor:
    with torch.enable_grad():
        z = g.new_zeros(shape, requires_grad=True)
        return torch.autograd.grad(F.pad(z, pad, mode=mode), z, g)[0]


def _functional_input_grad(site: Site, delta: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise RuntimeError(f"localopt: internal: slow path for '{site.name}' needs the input")
    with torch.enable_grad(), site.bypassed():
        xr = x.detach().requires_grad_()
        out = torch.func.functional_call(site.module, {"weight": weight.detach()}, (xr,), strict=False)
        return torch.autograd.grad(out, xr, delta.to(out.dtype))[0]

