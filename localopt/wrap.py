"""Install a rule on any ``nn.Module`` with one call, remove it with another."""
from __future__ import annotations

import contextlib
import json
import numbers
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from . import rng
from .mechanism import Site, site_of
from .rules import FeedbackRule, Rule, make_rule
from .rules.base import check_feedback_scale, selector_matches

__all__ = ["wrap", "unwrap", "wrapping", "Wrapping", "hooks_disabled", "summary", "sites",
           "is_wrapped", "strip_feedback", "reset_feedback", "UNSUPPORTED_TYPES"]

#: Layer types that transport weights but that no rule covers yet.  Wrapping a model that
#: contains one is an error unless it is excluded or ``unsupported="bp"`` keeps it (and
#: everything inside it) on exact backprop.
UNSUPPORTED_TYPES: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear,
    nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase,
)

Selector = "str | type[nn.Module] | Iterable[str | type[nn.Module]] | None"


@dataclass
class _Wrapping:
    rule: Rule
    sites: list[Site]
    kept_bp: list[tuple[str, str]] = field(default_factory=list)  # (name, type) left on BP
    root_handles: list = field(default_factory=list)  # torch's RemovableHandle of each root hook
    #: the feedback state was created on the meta device and holds no values yet
    meta_state: bool = False
    #: the buffer whose identity tells that the state was checked since it last changed
    checked: Any = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "checked": None}  # a weakref: never pickled

    def __setstate__(self, state: dict) -> None:
        # torch.load(model) / copy.deepcopy(model): fresh weight tensors restart their version
        # counters; re-synchronise rules that track them (the submodules are rebuilt by now)
        self.__dict__.update(state)
        self.checked = None
        resync = getattr(self.rule, "synced", None)
        if resync is not None:
            try:
                resync(self.sites)
            except AttributeError:  # the root module itself is a site and not rebuilt yet
                pass


def _record(model: nn.Module) -> _Wrapping | None:
    return model.__dict__.get("_localopt")


@dataclass(frozen=True)
class Wrapping:
    """What :func:`wrap` installed on a model (a read-only view; see :func:`wrapping`)."""

    #: the rule object (one per wrapped model)
    rule: Rule
    #: the hooked modules, in ``named_modules()`` order
    sites: tuple[Site, ...]
    #: ``(name, type name)`` of the uncovered layers kept on exact backprop
    #: (``unsupported="bp"``)
    kept_bp: tuple[tuple[str, str], ...]

    @property
    def options(self) -> dict[str, Any]:
        """The rule's options, as passed to its constructor (:meth:`Rule.options`)."""
        return self.rule.options()


def wrapping(model: nn.Module) -> Wrapping | None:
    """The rule and sites :func:`wrap` installed on ``model`` as a :class:`Wrapping`
    (``rule``, ``sites``, ``kept_bp``, ``options``), or ``None`` if ``model`` is not wrapped.

    The view is a snapshot: it is not updated by a later :func:`unwrap` or :func:`wrap`."""
    rec = _record(model)
    if rec is None:
        return None
    return Wrapping(rec.rule, tuple(rec.sites), tuple(rec.kept_bp))


def is_wrapped(model: nn.Module) -> bool:
    """True if :func:`wrap` installed a rule on ``model``."""
    return _record(model) is not None


@contextlib.contextmanager
def hooks_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: exact backprop through a wrapped ``model`` while it is open.

    Every hook localopt installed on ``model`` does nothing: the site hooks of every hooked
    module (:attr:`Site.active`), the rule's own hooks (:attr:`Rule.hooks_enabled`) and
    :func:`wrap`'s state check.  Nothing is removed or re-registered -- the user's own
    hooks, and the order of all hooks, stay as they are -- and on exit every flag is put
    back as it was (so it nests).  Yields ``model``.  Used by
    :func:`localopt.diagnostics.update_angles` for its backprop pass.
    """
    rec = _record(model)
    if rec is None:
        raise ValueError(f"localopt.hooks_disabled: this {type(model).__name__} is not wrapped")
    # every site on the model's modules: wrap's, and those a rule hooked itself (inside="fa")
    site_list = [s for s in map(site_of, model.modules()) if s is not None]
    saved = [(s, s.active) for s in site_list]
    rule, was = rec.rule, rec.rule.hooks_enabled
    try:
        rule.hooks_enabled = False
        for s in site_list:
            s.active = False
        yield model
    finally:
        rule.hooks_enabled = was
        for s, active in saved:
            s.active = active


def sites(model: nn.Module) -> list[Site]:
    """The hooked modules of a wrapped model, in ``named_modules()`` order."""
    rec = _record(model)
    if rec is None:
        raise ValueError("localopt: this model is not wrapped (call localopt.wrap first)")
    return list(rec.sites)


def _as_list(option: str, spec) -> list:
    if spec is None:
        return []
    specs = [spec] if isinstance(spec, (str, type)) else None
    if specs is None:
        try:
            specs = list(spec)
        except TypeError:
            specs = None
    bad = [spec] if specs is None else [s for s in specs if not (isinstance(s, str) or (
        isinstance(s, type) and issubclass(s, nn.Module)))]
    if bad:
        raise TypeError(f"localopt: {option}={spec!r}: selector {bad[0]!r} must be a module name "
                        "pattern (str) or an nn.Module subclass (or give a list of them)")
    return specs


def _select(model: nn.Module, rule: Rule, include, exclude, unsupported: str):
    include, exclude = _as_list("include", include), _as_list("exclude", exclude)
    named = list(model.named_modules())
    for option, specs in (("include", include), ("exclude", exclude)):
        for spec in specs:  # a name pattern that matches nothing is most likely a typo
            hit = any(selector_matches(n, m, spec) for n, m in named)
            if not hit and isinstance(spec, str):
                raise ValueError(f"localopt: {option} selector {spec!r} matches no module of "
                                 f"this {type(model).__name__}")

    def chosen(n, m):
        if include and not any(selector_matches(n, m, s) for s in include):
            return False
        return not any(selector_matches(n, m, s) for s in exclude)

    blocked = [(n, m) for n, m in named if isinstance(m, UNSUPPORTED_TYPES) and chosen(n, m)]
    if blocked and unsupported == "error":
        listing = ", ".join(f"'{n or '(root)'}' ({type(m).__name__})" for n, m in blocked)
        raise ValueError(
            f"localopt: rule {rule.name!r} does not cover {listing}: these layers transport "
            "weights but have no feedback path here.  Pass exclude=[...] to leave them out, "
            "or unsupported='bp' to keep them (and what they contain) on exact backprop."
        )
    # Layers inside an uncovered one (MultiheadAttention.out_proj) are not run through their
    # own forward by it, so hooks on them would never fire: never pick them.
    uncovered = [n + "." for n, m in named if isinstance(m, UNSUPPORTED_TYPES)]
    picked = [(n, m) for n, m in named
              if isinstance(m, rule.wraps) and rule.select(n, m) and chosen(n, m)
              and not isinstance(m, UNSUPPORTED_TYPES)
              and not any(n.startswith(u) for u in uncovered)]
    return picked, [(n, type(m).__name__) for n, m in blocked]


def feedback_seed(seed: int) -> int:
    """The seed of the feedback generator for ``wrap(..., seed=seed)``: ``seed`` mixed with a
    fixed odd constant, so that feedback drawn after ``torch.manual_seed(seed)`` does not
    repeat the weights the model drew from the same seed (B would then be proportional to W)."""
    return (int(seed) * 0x9E3779B97F4A7C15 + 0x10CA1) % 2**63


def _device_of(module: nn.Module) -> torch.device:
    t = next(iter(module.parameters()), None)
    if t is None:
        t = next(iter(module.buffers()), None)
    return torch.device("cpu") if t is None else t.device


def wrap(model: nn.Module, rule: "str | Rule" = "fa", *, include: Selector = None,
         exclude: Selector = None, unsupported: str = "error", seed: int | None = None,
         **options: Any) -> nn.Module:
    """Install a learning rule on ``model`` by hooks; returns ``model``.

    Args:
        model: any ``nn.Module``; its class and forward are not changed.
        rule: a name from :func:`localopt.available_rules` or a :class:`~localopt.Rule`.
        include / exclude: name patterns (``fnmatch``, e.g. ``"fc"``, ``"layer4.*"``) or module
            types selecting which layers the rule covers (default: every layer type the rule
            wraps).  Excluded layers keep exact backprop -- e.g. ``exclude="fc"`` keeps the
            classifier on BP as the sign-symmetry papers do.  A name pattern that matches no
            module is an error.
        unsupported: ``"error"`` (default) or ``"bp"``: what to do with weight-transporting
            layers no rule covers (:data:`UNSUPPORTED_TYPES`).
        seed: seed of all the rule's randomness: the feedback drawn at wrap time and the
            random streams of rules that draw later (:mod:`localopt.rng`); mixed by
            :func:`feedback_seed`, so it never repeats the weights drawn from the same seed.
            ``None`` (default): one draw of torch's global RNG, the only global draw a rule
            ever makes.
        **options: the rule's options (see its docstring).

    On any error the model is left exactly as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"localopt.wrap expects an nn.Module, got {type(model).__name__}")
    if not isinstance(unsupported, str) or unsupported not in ("error", "bp"):
        raise ValueError(f"localopt: unsupported={unsupported!r} must be 'error' or 'bp'")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"localopt: seed={seed!r} must be an int (or None: torch's global RNG)")
    rec = _record(model)
    if rec is not None:
        raise RuntimeError(f"localopt: this {type(model).__name__} is already wrapped with rule "
                           f"{rec.rule.name!r}; call localopt.unwrap(model) first")
    for n, m in model.named_modules():
        if site_of(m) is not None or (m is not model and _record(m) is not None):
            raise RuntimeError(f"localopt: module '{n or '(root)'}' is already wrapped as part "
                               "of another model; unwrap that one first")
    rule_obj = make_rule(rule, options)
    picked, kept_bp = _select(model, rule_obj, include, exclude, unsupported)
    picked = rule_obj.choose_sites(model, picked)
    if not picked:
        kinds = ", ".join(t.__name__ for t in rule_obj.wraps)
        raise ValueError(f"localopt: rule {rule_obj.name!r} found no layer to wrap in this "
                         f"{type(model).__name__} (it wraps: {kinds}; check include/exclude)")
    for n, m in picked:
        own = [k for k, _ in m.named_buffers(recurse=False)]
        own += [k for k, _ in m.named_parameters(recurse=False)] + list(vars(m))
        clash = [k for k in own if k.startswith(Site.BUFFER_PREFIX)]
        if clash:
            raise RuntimeError(f"localopt: module '{n}' already has attribute(s) {clash}, which "
                               "localopt reserves for its state")

    base_seed = feedback_seed(rng.draw_seed() if seed is None else seed)
    generator = torch.Generator().manual_seed(base_seed)
    site_list = [Site(m, n, rule_obj) for n, m in picked]
    record = _Wrapping(rule_obj, site_list, kept_bp)
    try:
        for k, s in enumerate(site_list):
            rule_obj.setup(s, generator)
            if rule_obj.random_stream:  # the rule's own random stream (localopt.rng)
                s.register_buffer(rng.BUFFER, rng.stream_state(base_seed, k,
                                                                _device_of(s.module)))
            s.install()
        record.meta_state = _on_meta(site_list)
        for register, hook in ((model.register_load_state_dict_pre_hook, _check_checkpoint),
                               (model.register_load_state_dict_post_hook, _after_load),
                               (model.register_state_dict_post_hook, _save_format),
                               (model.register_forward_pre_hook, _check_state)):
            record.root_handles.append(register(hook))
        object.__setattr__(model, "_localopt", record)
        rule_obj.attach(model, site_list)
    except BaseException:
        _teardown(model, record, attached=False)
        raise
    return model


def _teardown(model: nn.Module, record: _Wrapping, attached: bool) -> None:
    if attached:
        record.rule.detach(model, record.sites)
    for s in record.sites:
        s.remove()
    for handle in record.root_handles:
        handle.remove()
    model.__dict__.pop("_localopt", None)


def unwrap(model: nn.Module) -> nn.Module:
    """Remove the rule installed by :func:`wrap`: hooks and feedback state go, exact backprop
    returns.  Returns ``model``."""
    rec = _record(model)
    if rec is None:
        raise ValueError(f"localopt: this {type(model).__name__} is not wrapped; nothing to unwrap")
    _teardown(model, rec, attached=True)
    return model


def _state_key(prefix: str, site: Site, buffer_name: str) -> str:
    return prefix + (site.name + "." if site.name else "") + buffer_name


# ---------------------------------------------------------------------------------------
# Feedback state: where it came from (meta device), whether it is finite, redrawing it.
# ---------------------------------------------------------------------------------------
def _state_buffers(rec: _Wrapping):
    for s in rec.sites:
        for b, t in s.state_buffers():
            if t is not None:
                yield s, b, t


def _on_meta(sites: list[Site]) -> bool:
    return any(t.is_meta for s in sites for _, t in s.state_buffers()
               if t is not None and t.numel() > 0)


def _first_buffer(rec: _Wrapping):
    return next((t for _, _, t in _state_buffers(rec)), None)


def _check_state(model: nn.Module, args) -> None:
    """Root forward pre-hook: check the feedback state once after it changed (wrap, load,
    ``.to()``/``to_empty()``, :func:`reset_feedback`): one host sync then, none per step.

    State created on the meta device holds no values, so after ``to_empty()`` it is garbage
    even where it happens to be finite: an error until it is redrawn or loaded."""
    if torch.compiler.is_compiling():
        return
    rec = _record(model)
    if rec is None or not rec.rule.hooks_enabled:  # hooks_disabled(model)
        return
    first = _first_buffer(rec)
    if first is None or (rec.checked is not None and rec.checked() is first) or first.is_meta:
        return
    if rec.meta_state:
        s = next(s for s, _, t in _state_buffers(rec) if t.numel() > 0)
        raise RuntimeError(
            f"localopt: the feedback state of layer '{s.name}' (rule {rec.rule.name!r}) was "
            "created on the meta device and holds no values (to_empty() leaves it "
            "uninitialised): call localopt.reset_feedback(model, seed=...) after to_empty(), or "
            "load a checkpoint with model.load_state_dict(...)")
    floats = [(s, b, t) for s, b, t in _state_buffers(rec) if t.is_floating_point() and t.numel()]
    by_device: dict[torch.device, list] = {}
    for _, _, t in floats:
        by_device.setdefault(t.device, []).append(torch.isfinite(t).all())
    if not all(bool(torch.stack(v).all()) for v in by_device.values()):  # one sync per device
        s, b, _ = next((s, b, t) for s, b, t in floats if not bool(torch.isfinite(t).all()))
        raise RuntimeError(
            f"localopt: the feedback state {b} of layer '{s.name}' (rule {rec.rule.name!r}) has "
            "non-finite values: redraw it with localopt.reset_feedback(model, seed=...) or load "
            "a checkpoint with finite feedback")
    rec.checked = weakref.ref(first)


def _after_load(model: nn.Module, incompatible_keys) -> None:
    rec = _record(model)
    if rec is not None:
        rec.checked = None  # loaded in place: check again at the next forward
        resync = getattr(rec.rule, "synced", None)
        if resync is not None:  # the weights changed by loading, not by a wrong optimizer
            resync(rec.sites)


def reset_feedback(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Draw the random feedback state of a wrapped ``model`` again, on the devices of its
    weights; returns ``model``.

    The draw is the one ``localopt.wrap(model, rule, seed=seed)`` makes (the same values for the
    same seed; ``None``: from one draw of torch's global RNG), including the rule's random
    streams, for rules with norm-matched feedback from the *current* weights.  Use it after
    building a wrapped model on the meta device (``model.to_empty(device=...)`` leaves the
    feedback uninitialised, which the first forward reports), or to restart feedback learning.
    Learned feedback (``kp``, ``wm``, ``dtp``, ...) restarts from its initial draw: build the
    optimizer again afterwards, its feedback state no longer applies.
    """
    rec = _record(model)
    if rec is None:
        raise ValueError(f"localopt.reset_feedback: this {type(model).__name__} is not wrapped")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"localopt.reset_feedback: seed={seed!r} must be an int (or None)")
    if any(p.is_meta for s in rec.sites for p in s.module.parameters()):
        raise RuntimeError("localopt.reset_feedback: the model's weights are on the meta device; "
                           "call model.to_empty(device=...) first")
    base_seed = feedback_seed(rng.draw_seed() if seed is None else seed)
    generator = torch.Generator().manual_seed(base_seed)
    for k, s in enumerate(rec.sites):
        rec.rule.redraw(s, generator)
        if rec.rule.random_stream:
            s.set_buffer(rng.BUFFER, rng.stream_state(base_seed, k, _device_of(s.module)))
    rec.meta_state, rec.checked = _on_meta(rec.sites), None
    if isinstance(rec.rule, FeedbackRule):
        check_feedback_scale(rec.rule, rec.sites)
    return model


# ---------------------------------------------------------------------------------------
# Checkpoints: the rule's feedback format travels with the state dict.
# ---------------------------------------------------------------------------------------
#: state-dict key (at the wrapped model's prefix) of the rule that saved the feedback
FORMAT_KEY = Site.BUFFER_PREFIX + "rule"


def _save_format(model: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook: with feedback state, record the rule and its feedback format
    (:meth:`~localopt.Rule.feedback_format`) under ``<prefix>localopt_rule`` (JSON as uint8)."""
    rec = _record(model)
    if rec is None or not any(s.buffer_names for s in rec.sites):
        return
    info = {"rule": rec.rule.name, "format": rec.rule.feedback_format()}
    state_dict[prefix + FORMAT_KEY] = torch.tensor(list(json.dumps(info).encode()),
                                                   dtype=torch.uint8)


def _read_format(t) -> dict | None:
    try:
        return json.loads(bytes(t.cpu().tolist()).decode())
    except (AttributeError, TypeError, ValueError):
        return None


def _check_checkpoint(module, state_dict, prefix, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    """Root load pre-hook: validate feedback state before anything is copied.

    * a checkpoint without feedback keys (plain BP) loads: the current feedback is kept;
    * a feedback tensor of the wrong shape, or (strict) a feedback key this model does not
      have, raises before any tensor of the model is touched;
    * an *empty* feedback buffer means "not drawn yet" (rules that size their feedback at the
      first forward, e.g. ``dfa``): a checkpoint's drawn tensor is loaded into it, and an
      empty one in the checkpoint keeps the model's current feedback; the rule checks that
      the tensor fits (:meth:`~localopt.Rule.check_loaded`);
    * a checkpoint saved by a rule whose feedback means something else (its
      ``localopt_rule`` record: :meth:`~localopt.Rule.feedback_format`) raises -- an ``fa``
      state in a ``dfa`` model, dense into channel DFA -- instead of failing at every backward.
    """
    rec = _record(module)
    if rec is None:
        return
    saved = state_dict.pop(prefix + FORMAT_KEY, None)
    ours, materialise, kept = set(), [], False
    for s in rec.sites:  # validate everything first: an error leaves the model untouched
        for b, cur in s.state_buffers():
            key = _state_key(prefix, s, b)
            ours.add(key)
            if key not in state_dict or (state_dict[key].numel() == 0 and cur.numel() > 0):
                state_dict[key] = cur
                kept = kept or cur.numel() > 0
            elif cur.numel() == 0 and state_dict[key].numel() > 0:
                materialise.append((s, b, state_dict[key].shape))
            elif tuple(state_dict[key].shape) != tuple(cur.shape):
                raise RuntimeError(
                    f"localopt: feedback shape mismatch for layer '{s.name}' ({key}): checkpoint "
                    f"has {tuple(state_dict[key].shape)}, this model {tuple(cur.shape)} "
                    f"(rule {rec.rule.name!r}); the model was not modified"
                )
    if saved is not None:
        info = _read_format(saved)
        fmt = rec.rule.feedback_format()
        if info is None or info.get("format") != fmt:
            what = (f"rule {info.get('rule')!r} (feedback {info.get('format')!r})"
                    if info else "an unreadable rule record")
            raise RuntimeError(
                f"localopt: this checkpoint's feedback was saved by {what}, but rule "
                f"{rec.rule.name!r} on this model needs feedback {fmt!r}: it would fail or "
                "mislead at every backward. Wrap the model with the checkpoint's rule, or load "
                "localopt.strip_feedback(state_dict) to keep this model's feedback. The model "
                "was not modified")
    # torch hands load pre-hooks strict=True whatever the caller passed, so feedback state this
    # model does not use is always refused here (before anything is copied), with the way out.
    stray = [k for k in state_dict if k.startswith(prefix) and k not in ours
             and k.rsplit(".", 1)[-1].startswith(Site.BUFFER_PREFIX)]
    if strict and stray:
        raise RuntimeError(
            f"localopt: checkpoint has feedback state {stray[:5]} that rule "
            f"{rec.rule.name!r} on this model does not use; load "
            "localopt.strip_feedback(state_dict) instead. The model was not modified")
    if materialise:  # feedback not drawn yet here: does the checkpoint's fit this model?
        problem = rec.rule.check_loaded([(s, b, tuple(shape)) for s, b, shape in materialise])
        if problem:
            raise RuntimeError(f"localopt: rule {rec.rule.name!r}: {problem}; the model was not "
                               "modified")
    if not kept:  # every piece of state comes from the checkpoint
        rec.meta_state = False
    for s, b, shape in materialise:  # lazily-sized feedback: allocate, load_state_dict fills it
        cur = dict(s.state_buffers())[b]
        with torch.no_grad():  # in place: the buffer keeps its identity (DDP, optimizers)
            cur.set_(torch.empty(shape, dtype=cur.dtype, device=cur.device))


def strip_feedback(state_dict: dict) -> dict:
    """A copy of ``state_dict`` without localopt's feedback state: loads into a plain model."""
    return type(state_dict)((k, v) for k, v in state_dict.items()
                            if not k.rsplit(".", 1)[-1].startswith(Site.BUFFER_PREFIX))


@dataclass
class Summary:
    """What :func:`wrap` installed; ``print()`` it for a table."""

    rule: str
    rows: list[dict]
    kept_bp: list[tuple[str, str]]

    def __str__(self) -> str:
        head = ("layer", "type", "rule", "weight", "feedback", "path")
        body = [(r["name"], r["type"], r["rule"], str(r["weight"]), str(r["feedback"]), r["path"])
                for r in self.rows]
        body += [(n, t, "bp (unsupported)", "", "", "") for n, t in self.kept_bp]
        widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in body]
        lines.append(f"{len(self.rows)} layer(s) on rule {self.rule!r}")
        return "\n".join(lines)

    __repr__ = __str__


def summary(model: nn.Module) -> Summary:
    """Table of the wrapped layers: name, type, rule, weight and feedback shapes, and whether
    the layer takes the closed-form input gradient (``fast``) or re-runs its own forward
    (``forward-vjp``, for subclasses that override ``forward``)."""
    rec = _record(model)
    if rec is None:
        raise ValueError("localopt: this model is not wrapped (call localopt.wrap first)")
    rows = []
    for s in rec.sites:
        w = getattr(s.module, "weight", None)
        fb = rec.rule.feedback_shape(s)
        rows.append({"name": s.name or "(root)", "type": type(s.module).__name__,
                     "rule": rec.rule.name,
                     "weight": tuple(w.shape) if isinstance(w, torch.Tensor) else "",
                     "feedback": tuple(fb) if fb is not None else "",
                     "path": ("-" if not isinstance(rec.rule, FeedbackRule)
                              else "fast" if s.fast else "forward-vjp")})
    return Summary(rec.rule.name, rows, rec.kept_bp)
