"""Rule base classes and the rule registry.

A rule decides, per hooked module (a :class:`~localopt.mechanism.Site`), what is sent
backward as the gradient of the module's input.  The module's own parameter gradients are
always autograd's exact local ones for the error the module received.

Subclass :class:`Rule` (any signal) or :class:`FeedbackRule` (the feedback-alignment family:
the input gradient is the layer's transposed op with a feedback weight ``B`` in place of
``W``) and decorate with :func:`register_rule`.
"""
from __future__ import annotations

import fnmatch
import inspect
import math
import numbers
import sys
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..mechanism import LAYER_TYPES, Site, input_grad

__all__ = ["Rule", "FeedbackRule", "register_rule", "get_rule", "available_rules", "make_rule",
           "init_feedback", "feedback_magnitude", "FEEDBACK_INITS", "check_choice", "check_bool", "check_number"]

_REGISTRY: dict[str, type["Rule"]] = {}


def register_rule(cls: type["Rule"]) -> type["Rule"]:
    """Class decorator: make ``cls`` available to :func:`localopt.wrap` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"rule class {cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a rule named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_rules() -> list[str]:
    """Names accepted by :func:`localopt.wrap`."""
    return sorted(_REGISTRY)


def get_rule(name: str) -> type["Rule"]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"localopt: unknown rule {name!r}; available rules: {', '.join(available_rules())}"
        ) from None


def make_rule(rule: "str | Rule", options: dict[str, Any]) -> "Rule":
    """Instantiate a rule by name, checking ``options`` against its signature first."""
    if isinstance(rule, Rule):
        if options:
            raise TypeError(f"localopt: options {sorted(options)} given with a rule instance; "
                            "pass them to the rule's constructor instead")
        return rule
    if not isinstance(rule, str):
        raise TypeError(f"localopt: rule must be a name or a Rule, got {type(rule).__name__}")
    cls = get_rule(rule)
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self" and params[p].kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"localopt: rule {rule!r} got unknown option(s) {unknown}; "
            f"its options are: {valid if valid else 'none'}"
        )
    return cls(**options)


class Rule:
    """What a hooked module sends backward.

    Life cycle: :meth:`setup` once per site at :func:`localopt.wrap` (register state with
    ``site.register_buffer``); :meth:`attach` once for the whole model (model-level hooks,
    e.g. capturing the output error); per forward, :meth:`forward` returns a payload kept for
    the backward; per backward, :meth:`backward` returns the gradient for the module's input.
    """

    name: ClassVar[str] = ""
    #: module types hooked by default
    wraps: ClassVar[tuple[type[nn.Module], ...]] = LAYER_TYPES
    #: True when the rule learns state that an optimizer step must update
    #: (then use :class:`localopt.optim.LocalOptimizer` rather than a plain torch optimizer)
    learns_feedback: ClassVar[bool] = False
    #: True when the feedback receives exactly the optimizer update of a weight (Kolen-Pollack):
    #: :class:`localopt.optim.LocalOptimizer` steps the tensors of :meth:`mirrored` with the
    #: weights' optimizer algorithm and hyperparameters; otherwise it calls :meth:`feedback_step`
    mirrors_update: ClassVar[bool] = False
    #: True when the rule draws random numbers after wrap (per step, or lazily at the first
    #: forward): :func:`localopt.wrap` then gives each site its own stream, the buffer
    #: ``localopt_rng`` (:mod:`localopt.rng`) -- a rule never draws from torch's global RNG
    random_stream: ClassVar[bool] = False
    #: True when the feedback's gradient comes from the local data (``bfa``'s reconstruction,
    #: ``dkp``'s ``e^T x``): under data parallelism the optimizer averages it over the ranks
    feedback_from_data: ClassVar[bool] = False
    #: True when the input gradient of a site is computed from the model output error (direct
    #: feedback): the mechanism hands :meth:`route` an alias of the site's input instead of
    #: calling :meth:`backward` (see :func:`localopt.mechanism.from_output`)
    from_output: ClassVar[bool] = False
    #: True when the signal the rule sends backward is the exact gradient (``bp``: ``B = W``):
    #: there is no feedback of its own to check or compare
    computes_true_gradient: ClassVar[bool] = False
    #: False while :func:`localopt.hooks_disabled` holds the model in exact backprop.  The
    #: site hooks are switched off by :attr:`Site.active`; a rule that registers hooks of its
    #: own (in :meth:`attach`) returns from them at once while this is False.
    hooks_enabled: bool = True

    def select(self, name: str, module: nn.Module) -> bool:
        """Extra per-module selection on top of ``wraps`` and include/exclude (default: all);
        e.g. module-wise DFA hooks only the modules named by its ``modules`` option."""
        return True

    def choose_sites(self, model: nn.Module, picked: list[tuple[str, nn.Module]]
                     ) -> list[tuple[str, nn.Module]]:
        """The ``(name, module)`` pairs to hook, given the default selection ``picked`` (by
        :attr:`wraps` and include/exclude).  Block-level rules that choose their own sites
        (target propagation) override it; raising here leaves the model untouched."""
        return picked

    def setup(self, site: Site, generator: torch.Generator | None) -> None:
        pass

    def attach(self, model: nn.Module, sites: list[Site]) -> None:
        """Once for the whole model, after every site is installed: model-level hooks (kept
        as the ``RemovableHandle`` torch returns, removed in :meth:`detach`; each returns at
        once while :attr:`hooks_enabled` is False)."""

    def detach(self, model: nn.Module, sites: list[Site]) -> None:
        pass

    def forward(self, site: Site, x: Tensor, out: Tensor) -> Any:
        return None

    def backward(self, site: Site, delta: Tensor, payload: Any) -> Tensor | None:
        raise NotImplementedError

    def route(self, site: Site, alias: Tensor, payload: Any) -> None:
        """:attr:`from_output` rules, per forward: the site's input ``alias``, whose gradient
        the rule's :func:`~localopt.mechanism.from_output` at the model output will send."""
        raise NotImplementedError

    def feedback_shape(self, site: Site) -> tuple[int, ...] | None:
        """Shape of the per-site feedback state, for :func:`localopt.summary`."""
        return None

    # -- feedback learning (rules with ``learns_feedback``), driven by LocalOptimizer.step --------
    def mirrored(self, site: Site) -> list[tuple[Tensor, Tensor]]:
        """``mirrors_update`` rules: ``(feedback, weight)`` pairs; before each optimizer step the
        rule puts the feedback's gradient in ``feedback.grad`` (:meth:`feedback_grads`) and the
        feedback is stepped like ``weight``, with the hyperparameters of ``weight``'s group."""
        return []

    def feedback_grads(self, sites: list[Site]) -> None:
        """``mirrors_update`` rules: set ``feedback.grad`` of each :meth:`mirrored` pair."""

    def feedback_step(self, sites: list[Site], step: int) -> None:
        """Other feedback-learning rules: update the feedback after the weights' optimizer step
        (``step``: 1-based count of optimizer steps)."""

    def feedback_start(self, sites: list[Site]) -> None:
        """Feedback-learning rules: called once when a LocalOptimizer is built, before any
        training step (e.g. ``wm``'s initial mirror phase)."""

    def take_pending_feedback(self, sites: list[Site]) -> Any:
        """Take away the feedback-learning signal accumulated by the backward passes since the
        last optimizer step, so that passes run next start from none; returns it for
        :meth:`restore_pending_feedback` (used by :mod:`localopt.diagnostics`).  By default
        the ``.grad`` of every feedback buffer and :attr:`Site.feedback_norm`; rules that keep
        more extend it (target propagation: the traces of those passes)."""
        bufs = [t for s in sites for _, t in s.state_buffers()]
        taken = ([(t, t.grad) for t in bufs], [(s, s.feedback_norm) for s in sites])
        for t in bufs:
            t.grad = None
        for s in sites:
            s.feedback_norm = None
        return taken

    def restore_pending_feedback(self, sites: list[Site], taken: Any) -> None:
        """Put back what :meth:`take_pending_feedback` took, replacing what was accumulated
        since."""
        grads, norms = taken
        for t, g in grads:
            t.grad = g
        for s, n in norms:
            s.feedback_norm = n

    # -- feedback state: checkpoints and redrawing ------------------------------------------
    def feedback_format(self) -> str:
        """What the rule's state means, saved with it in ``state_dict()`` (key
        ``localopt_rule``): a checkpoint loads only into a rule of the same format.  Rules
        whose state is interchangeable share one (``fa``, ``kp``, ``wm``, ``bfa``: a B shaped
        like W; the direct rules: ``"direct/dense"`` or ``"direct/channel"``)."""
        return self.name

    def check_loaded(self, entries: list[tuple[Site, str, tuple[int, ...]]]) -> str | None:
        """Before a checkpoint's tensors fill feedback buffers this model has not drawn yet
        (``entries``: site, buffer name, checkpoint shape): a message if they cannot fit."""
        return None

    def redraw(self, site: Site, generator: torch.Generator) -> None:
        """Draw the site's state again from ``generator`` (:func:`localopt.reset_feedback`):
        by default, what :meth:`setup` registers is registered again, in the same order, so
        the same generator draws the same values as at wrap time."""
        names, site.buffer_names = site.buffer_names, []
        self.setup(site, generator)
        site.buffer_names = names + [b for b in site.buffer_names if b not in names]

    def options(self) -> dict[str, Any]:
        """The rule's options, as passed to its constructor."""
        params = inspect.signature(type(self).__init__).parameters
        return {p: getattr(self, p) for p in params if p != "self" and hasattr(self, p)}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


class FeedbackRule(Rule):
    """Feedback-alignment family: the input gradient uses a feedback weight B instead of W.

    For a layer ``y = W * x + b`` (``*`` a matmul or convolution) receiving the error
    ``delta = dL/dy``::

        dW = delta^T x          (exact, local -- computed by autograd)
        db = sum(delta)
        dx = delta B            (transposed op with B in place of W)

    Subclasses implement :meth:`feedback`, returning ``B`` (the shape of ``W``) for the
    current forward pass.
    """

    #: how to bring B to W's norm, named by the exploding-feedback warning
    #: (:func:`check_feedback_scale`)
    scale_remedy: ClassVar[str] = "match_norm=True"
    #: True when B is drawn afresh at every forward (``brsf``): no fixed B whose scale
    #: :func:`check_feedback_scale` could check at wrap time
    redraws_feedback: ClassVar[bool] = False

    def feedback(self, site: Site) -> Tensor:
        raise NotImplementedError

    def feedback_format(self) -> str:
        return "fa"  # B shaped like W, sent back as delta B: fa, kp, wm, bfa share it

    def attach(self, model: nn.Module, sites: list[Site]) -> None:
        super().attach(model, sites)
        check_feedback_scale(self, sites)

    def forward(self, site: Site, x: Tensor, out: Tensor) -> Any:
        return self.feedback(site), (x.shape if site.fast else x)

    def backward(self, site: Site, delta: Tensor, payload: Any) -> Tensor:
        B, x = payload
        return input_grad(site, delta, B, x)

    def feedback_shape(self, site: Site) -> tuple[int, ...] | None:
        return tuple(site.weight.shape)


# ---------------------------------------------------------------------------------------
# Feedback initialisation, shared by the rules that draw a random B.
# ---------------------------------------------------------------------------------------
def _fans(w: Tensor) -> tuple[int, int]:
    receptive = math.prod(w.shape[2:]) if w.dim() > 2 else 1
    return w.shape[1] * receptive, w.shape[0] * receptive


def _init_xavier(w, g, device):
    fan_in, fan_out = _fans(w)
    a = math.sqrt(6.0 / (fan_in + fan_out))
    return torch.empty(w.shape, device=device).uniform_(-a, a, generator=g)


def _init_kaiming(w, g, device):
    fan_in, _ = _fans(w)
    a = math.sqrt(6.0 / fan_in)  # He-uniform, gain sqrt(2)
    return torch.empty(w.shape, device=device).uniform_(-a, a, generator=g)


def _init_uniform(w, g, device):
    # Lillicrap et al. 2016: B ~ U(-0.5, 0.5); kept unscaled by design.
    return torch.empty(w.shape, device=device).uniform_(-0.5, 0.5, generator=g)


def _init_normal(w, g, device):
    fan_in, _ = _fans(w)
    return torch.randn(w.shape, generator=g, device=device) / math.sqrt(fan_in)


FEEDBACK_INITS = {"xavier": _init_xavier, "kaiming": _init_kaiming, "uniform": _init_uniform,
                  "normal": _init_normal}


def feedback_magnitude(init: str, weight: Tensor, u: Tensor) -> Tensor:
    """``|M|`` for ``M`` drawn with ``init`` (as :data:`FEEDBACK_INITS`) shaped like ``weight``,
    from uniform numbers ``u`` in ``(0, 1)`` of that shape: every init law is symmetric, so
    ``|U(-a, a)| = a u`` (``xavier``: ``a = sqrt(6 / (fan_in + fan_out))``, ``kaiming``:
    ``sqrt(6 / fan_in)``, ``uniform``: ``0.5``) and ``|N(0, s^2)| = s sqrt(2) erfinv(u)``
    (``normal``: ``s = 1 / sqrt(fan_in)``).  Tensor ops only (traceable)."""
    fan_in, fan_out = _fans(weight)
    if init == "normal":
        return torch.erfinv(u).mul_(math.sqrt(2.0 / fan_in))
    bound = {"xavier": math.sqrt(6.0 / (fan_in + fan_out)), "kaiming": math.sqrt(6.0 / fan_in),
             "uniform": 0.5}[init]
    return u * bound


def scaled_to(B: Tensor, weight: Tensor) -> Tensor:
    """``B ||weight||_F / ||B||_F``: B with the Frobenius norm of ``weight`` (its direction kept;
    tensor ops only, no host sync)."""
    return B * (weight.norm() / B.norm().clamp_min(1e-12)).to(B.dtype)


def init_feedback(init: str, weight: Tensor, generator: torch.Generator | None,
                  match_norm: bool = False, on_device: bool = False) -> Tensor:
    """Draw a random feedback weight shaped like ``weight`` on its device and dtype.

    ``init``: ``"xavier"`` (Glorot-uniform, BioTorch's default), ``"kaiming"`` (He-uniform),
    ``"uniform"`` (U(-0.5, 0.5), Lillicrap et al. 2016), ``"normal"`` (N(0, 1/fan_in)).
    ``match_norm`` rescales B to the Frobenius norm of ``weight``.  Drawn in float32 on the CPU
    from ``generator`` (a CPU generator), so the draw does not depend on the device;
    ``on_device=True`` draws directly on ``weight.device`` from ``generator``, a generator of
    that device (for rules that redraw every step).
    """
    device = weight.device if on_device else torch.device("cpu")
    B = FEEDBACK_INITS[init](weight, generator, device)
    if match_norm:
        B = scaled_to(B, weight.detach().float().to(device))
    return B.to(device=weight.device, dtype=weight.dtype)


#: :func:`check_feedback_scale` warns when prod_l ||B_l|| / ||W_l|| exceeds this
EXPLODING_FEEDBACK = 100.0


def check_feedback_scale(rule: "FeedbackRule", sites: list[Site]) -> None:
    """Warn once when the feedback is so much larger than the weights that the backward signal
    will explode: when ``prod_l ||B_l|| / ||W_l||`` over the wrapped layers exceeds
    :data:`EXPLODING_FEEDBACK` (100).

    Each layer scales the error it sends back by about ``||B|| / ||W||`` relative to backprop,
    and the factors compound with depth.  Measured at initialisation (one batch, gradient norm
    of the first layer, FA over BP): a timm ``vit_tiny`` (W ~ trunc_normal(0.02), Xavier B
    2.5x larger in 49 of 50 layers, product 2e20): 3e6; ResNet-20 with He-uniform B over
    Xavier W (product 2e3): 108; timm resnet18 (product 0.007): 1.5; ResNet-20 (0.006): 0.29.
    Once per wrap/redraw, one host sync per layer; skipped on the meta device and for
    rules without a fixed B (``bp``, ``brsf``)."""
    if rule.computes_true_gradient or rule.redraws_feedback:
        return
    ratios = []
    with torch.no_grad():
        for s in sites:
            w = getattr(s.module, "weight", None)
            if not isinstance(w, Tensor) or w.is_meta:
                return
            B = rule.feedback(s)
            if B.is_meta or B.shape != w.shape:
                return
            ratios.append(B.float().norm() / w.float().norm().clamp_min(1e-30))
    if len(ratios) < 2:  # the bottom layer's B sends nothing anywhere
        return
    logs = torch.stack([r.cpu() for r in ratios]).clamp_min(1e-30).log()
    growth = float(logs.sum().exp())
    if growth > EXPLODING_FEEDBACK:
        warnings.warn(
            f"localopt: rule {rule.name!r}: the feedback is {float(logs.mean().exp()):.2g}x larger "
            f"than the weights (||B||/||W||, geometric mean over {len(ratios)} layers; product "
            f"{growth:.2g}), so the backward signal will likely explode with depth (a ViT with "
            "trunc_normal(0.02) weights: gradients 1e6x backprop's). Pass "
            f"{rule.scale_remedy} to scale B to W's norm.", UserWarning, stacklevel=_user_level())


def _user_level() -> int:
    """``stacklevel`` of the first frame outside localopt, for warnings raised deep inside."""
    f, level = sys._getframe(1), 1
    while f is not None and f.f_globals.get("__name__", "").startswith("localopt"):
        f, level = f.f_back, level + 1
    return level


def selector_matches(name: str, module: nn.Module, spec) -> bool:
    """Whether a selector -- an ``fnmatch`` name pattern or an ``nn.Module`` subclass -- picks
    the module ``name``; used by ``wrap``'s include/exclude and by rules' module options."""
    if isinstance(spec, str):
        return fnmatch.fnmatchcase(name, spec)
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return isinstance(module, spec)
    raise TypeError(f"localopt: selector {spec!r} must be a name pattern (str) or an nn.Module "
                    "subclass")


def check_choice(rule: str, option: str, value: Any, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"localopt: rule {rule!r}: option {option}={value!r} is not one of "
                         f"{sorted(choices)}")


def check_bool(rule: str, option: str, value: Any) -> bool:
    """``value`` if it is a bool; a ``TypeError`` naming the option otherwise (a string such as
    ``'no'`` would otherwise read as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"localopt: rule {rule!r}: option {option}={value!r} must be True or "
                        "False")
    return value


def check_number(rule: str, option: str, value: Any, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False, high_open: bool = False,
                 integer: bool = False) -> float | int:
    """Validate a numeric rule option: the one place every rule's constructor checks numbers.

    ``value`` must be a real number (never a bool), finite, integral when ``integer``, and in
    the range given by ``low``/``high`` (inclusive unless ``low_open``/``high_open``).  Returns
    it as ``float`` (``int`` when ``integer``).  Raises ``TypeError`` for what is not a number
    and ``ValueError`` for a number that does not fit, both naming the rule and the option.
    """
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"localopt: rule {rule!r}: option {option}={value!r} must be {kind}")
    if integer and not isinstance(value, numbers.Integral):
        raise ValueError(f"localopt: rule {rule!r}: option {option}={value!r} must be {kind}")
    if not math.isfinite(value):
        raise ValueError(f"localopt: rule {rule!r}: option {option}={value!r} must be finite")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        raise ValueError(f"localopt: rule {rule!r}: option {option}={value!r} must be {kind} "
                         f"{' and '.join(t for t in (lo, hi) if t)}")
    return int(value) if integer else float(value)
