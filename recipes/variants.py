"""The variants of the runners that compare rules (``recipes.benchmark``, ``recipes.step_time``):
one syntax, one parser.

A variant is a labelled run of one rule.  ``--rules`` lists them, comma-separated; each entry
is ``RULE``, ``RULE@K``, ``LABEL=RULE`` or ``LABEL=RULE@K`` (``K``: feedback iterations per
step of a target-propagation rule; a label without ``=`` is the entry itself).
``--options LABEL=TABLE`` (repeatable) gives the variant ``LABEL`` options of
``localopt.wrap`` as a TOML inline table::

    --rules bp,dfa,dfa-stage=dfa,tp5=l-drl@5 \\
        --options 'dfa-stage={modules = ["layers.0", "layers.3", "layers.6"]}'

The older form of ``recipes.benchmark``, ``--variants '{label = {rule = "dfa", rule_options =
{...}}}'``, is still read (:func:`parse_variants_table`) but deprecated.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from typing import Any

from .common import ConfigError

__all__ = ["Variant", "add_options_arg", "parse_variant", "parse_options", "parse_variants",
           "parse_variants_table"]


def add_options_arg(parser: argparse.ArgumentParser) -> None:
    """``--options LABEL=TABLE`` (repeatable; ``args.options``, a list of strings for
    :func:`parse_variants`)."""
    parser.add_argument("--options", action="append", default=[], metavar="LABEL=TABLE",
                        help="options of variant LABEL to localopt.wrap, a TOML inline table, "
                        "e.g. 'dfa-stage={modules = [\"layers.0\"]}' (repeatable)")


def parse_variant(spec: str) -> tuple[str, int | None]:
    """``"l-drl@5"`` -> ``("l-drl", 5)``; ``"fa"`` -> ``("fa", None)``."""
    rule, _, k = spec.partition("@")
    if k and not k.isdigit():
        raise ConfigError(f"variant {spec!r}: write rule@K with K a number of feedback "
                          "iterations")
    return rule, int(k) if k else None


@dataclasses.dataclass
class Variant:
    """One variant: ``rule`` (``"plain"`` in ``recipes.step_time``: the unwrapped model) with
    ``iters`` feedback iterations (target propagation; ``None``: the runner's default) and
    ``options`` to ``localopt.wrap``; the optimizer settings left ``None`` are the runner's."""
    label: str
    rule: str
    iters: int | None = 1
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    optimizer: str | None = None
    lr: float | None = None
    aux_lr: float | None = None         # muon: the SGD group's lr
    feedback_optimizer: str | None = None
    feedback_lr: float | None = None
    noise: float | None = None
    freeze: list[str] | None = None     # parameters kept fixed (recipes' freeze setting)
    note: str | None = None
    row_settings: dict[str, Any] | None = None  # a table row's training settings

    @classmethod
    def parse(cls, entry: str, default_iters: int | None = 1) -> "Variant":
        """``"fa"``, ``"dtp@2"``, ``"dfa-stage=dfa"``, ``"tp5=l-drl@5"``."""
        label, eq, spec = entry.partition("=")
        if not eq:
            spec = label
        label, spec = label.strip(), spec.strip()
        if not label or not spec:
            raise ConfigError(f"variant {entry!r}: write RULE, RULE@K, LABEL=RULE or "
                              "LABEL=RULE@K")
        rule, iters = parse_variant(spec)
        return cls(label, rule, default_iters if iters is None else iters)

    @property
    def spec(self) -> str:
        return self.rule if self.iters in (None, 1) else f"{self.rule}@{self.iters}"

    def describe(self) -> str:
        """The rule, its options and any optimizer of its own, for a printed table."""
        text = self.spec
        if self.options:
            text += " {" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in self.options.items()) \
                + "}"
        if self.optimizer:
            text += f" [{self.optimizer}]"
        if self.freeze:
            text += f" freeze {json.dumps(self.freeze)}"
        return text

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v is not None and k != "label"}


def parse_options(text: str) -> dict[str, Any]:
    """A TOML inline table, ``'{modules = ["layers.0"], output = 1}'`` -> a dict."""
    return _inline_table(text, f"options {text!r}", "'{modules = [\"layers.0\"]}'")


def _inline_table(text: str, what: str, example: str) -> dict[str, Any]:
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what}: not a TOML inline table ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: write a TOML inline table, e.g. {example}")
    return value


def parse_variants(entries: list[str], options: list[str] | None = None,
                   default_iters: int | None = 1) -> list[Variant]:
    """The variants of ``--rules`` entries, with ``--options LABEL=TABLE`` attached; an entry
    without ``@K`` gets ``default_iters``."""
    variants = [Variant.parse(e, default_iters) for e in entries]
    by_label: dict[str, Variant] = {}
    for v in variants:
        if v.label in by_label:
            raise ConfigError(f"variant label {v.label!r} is given twice")
        by_label[v.label] = v
    for text in options or []:
        label, eq, table = text.partition("=")
        label = label.strip()
        if not eq:
            raise ConfigError(f"--options {text!r}: write LABEL='{{key = value, ...}}'")
        if label not in by_label:
            raise ConfigError(f"--options {text!r}: no variant labelled {label!r} (variants: "
                              f"{', '.join(by_label) or 'none'})")
        by_label[label].options.update(parse_options(table))
    return variants


def parse_variants_table(text: str, flag: str = "--variants") -> list[Variant]:
    """The deprecated form ``{label = {rule = "dfa", rule_options = {...}}}`` (``flag`` names
    the option in errors); the variants get no ``iters`` (the runner's default)."""
    raw = _inline_table(text, flag, "'{fa = {rule = \"fa\"}}'")
    out = []
    for label, v in raw.items():
        if not isinstance(v, dict) or "rule" not in v or set(v) - {"rule", "rule_options"}:
            raise ConfigError(f"{flag}: {label} = {v!r} should be {{rule = \"...\"}} with "
                              "optional rule_options = {...}")
        out.append(Variant(label, v["rule"], None, dict(v.get("rule_options", {}))))
    return out
