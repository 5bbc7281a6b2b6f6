"""Install a rule on any ``nn.Module`` with one call, remove it with another."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from . import rng
from .mechanism import Site
from .rules import FeedbackRule, Rule, make_rule
from .rules.base import selector_matches

__all__ = ["wrap", "unwrap", "summary", "sites", "is_wrapped", "strip_feedback", "UNSUPPORTED_TYPES"]

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
    root_hook_ids: list[tuple[str, int]] = field(default_factory=list)


def _record(model: nn.Module) -> _Wrapping | None:
    return model.__dict__.get("_localopt")


def is_wrapped(model: nn.Module) -> bool:
    """True if :func:`wrap` installed a rule on ``model``."""
    return _record(model) is not None


def sites(model: nn.Module) -> list[Site]:
    """The hooked modules of a wrapped model, in ``named_modules()`` order."""
    rec = _record(model)
    if rec is None:
        raise ValueError("localopt: this model is not wrapped (call localopt.wrap first)")
    return list(rec.sites)


def _as_list(spec) -> list:
    if spec is None:
        return []
    if isinstance(spec, (str, type)):
        return [spec]
    return list(spec)


def _select(model: nn.Module, rule: Rule, include, exclude, unsupported: str):
    include, exclude = _as_list(include), _as_list(exclude)
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
    if unsupported not in ("error", "bp"):
        raise ValueError(f"localopt: unsupported={unsupported!r} must be 'error' or 'bp'")
    rec = _record(model)
    if rec is not None:
        raise RuntimeError(f"localopt: this {type(model).__name__} is already wrapped with rule "
                           f"{rec.rule.name!r}; call localopt.unwrap(model) first")
    for n, m in model.named_modules():
        if "_localopt_site" in m.__dict__ or (m is not model and _record(m) is not None):
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
        clash = [k for k in list(m._buffers) + list(m._parameters) + list(m.__dict__)
                 if k.startswith(Site.BUFFER_PREFIX)]
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
        h = model.register_load_state_dict_pre_hook(_check_checkpoint)
        record.root_hook_ids.append(("_load_state_dict_pre_hooks", h.id))
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
    for dict_name, hid in record.root_hook_ids:
        getattr(model, dict_name).pop(hid, None)
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


def _check_checkpoint(module, state_dict, prefix, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    """Root load pre-hook: validate feedback state before anything is copied.

    * a checkpoint without feedback keys (plain BP) loads: the current feedback is kept;
    * a feedback tensor of the wrong shape, or (strict) a feedback key this model does not
      have, raises before any tensor of the model is touched;
    * an *empty* feedback buffer means "not drawn yet" (rules that size their feedback at the
      first forward, e.g. ``dfa``): a checkpoint's drawn tensor is loaded into it, and an
      empty one in the checkpoint keeps the model's current feedback.
    """
    rec = _record(module)
    if rec is None:
        return
    ours, materialise = set(), []
    for s in rec.sites:  # validate everything first: an error leaves the model untouched
        for b in s.buffer_names:
            key = _state_key(prefix, s, b)
            ours.add(key)
            cur = s.module._buffers[b]
            if key not in state_dict or (state_dict[key].numel() == 0 and cur.numel() > 0):
                state_dict[key] = cur
            elif cur.numel() == 0 and state_dict[key].numel() > 0:
                materialise.append((s.module, b, state_dict[key].shape))
            elif tuple(state_dict[key].shape) != tuple(cur.shape):
                raise RuntimeError(
                    f"localopt: feedback shape mismatch for layer '{s.name}' ({key}): checkpoint "
                    f"has {tuple(state_dict[key].shape)}, this model {tuple(cur.shape)} "
                    f"(rule {rec.rule.name!r}); the model was not modified"
                )
    if strict:
        stray = [k for k in state_dict if k.startswith(prefix) and k not in ours
                 and k.rsplit(".", 1)[-1].startswith(Site.BUFFER_PREFIX)]
        if stray:
            raise RuntimeError(
                f"localopt: checkpoint has feedback state {stray[:5]} that rule "
                f"{rec.rule.name!r} on this model does not use; load with "
                "localopt.strip_feedback(state_dict) or strict=False. The model was not modified"
            )
    for m, b, shape in materialise:  # lazily-sized feedback: allocate, load_state_dict fills it
        cur = m._buffers[b]
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
