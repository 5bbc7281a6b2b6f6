"""The rows of ``recipes.report``: which table row, protocol and group each logged run belongs to.

A run of a definition file's protocol (``recipes/table.toml``, the training-quality track's
``recipes/quality.toml``) is the row whose settings -- those ``recipes.table_runs`` gives it --
it has; every other run joins a group of the runs trained the same way apart from the rule's
own settings (:func:`classify`).  :func:`build_rows` lists every row of every protocol, run or
not, then the other groups, in the order RESULTS.md shows them.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from .common import FIELDS, ConfigError, load_config
from .results_load import Run
from .table_runs import MACHINE_KEYS, item_config, items

MODELS = {"mlp3x1024": "3x1024 tanh MLP", "resnet20": "ResNet-20"}
#: config keys that do not change what is trained (machine, outputs, bookkeeping; the seed
#: is a row's spread)
NOT_TRAINING = {*MACHINE_KEYS, "ddp", "name", "config_name", "reference", "rules", "seed"}
#: of the training keys, those that make a rule variant (the rest make the protocol)
VARIANT_KEYS = ("rule_options", "feedback_options", "lr", "momentum", "nesterov", "betas", "eps",
                "alpha")
#: of the protocol keys, the optimizer's (shown with it in the training-quality tables)
OPTIMIZER_KEYS = ("momentum", "nesterov", "weight_decay", "betas", "eps", "alpha", "aux_lr")
DEFAULTS = load_config().to_dict()


def training_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings that change what is trained (keys a log predates: their defaults)."""
    full = {**DEFAULTS, **cfg}
    return {k: v for k, v in full.items() if k not in NOT_TRAINING and k in FIELDS}


def protocol_settings(train: dict[str, Any]) -> dict[str, Any]:
    """Of the training settings, those that make the protocol: all but the rule and its
    variant settings (options, optimizer hyperparameters; the optimizer itself stays)."""
    return {k: v for k, v in train.items() if k not in VARIANT_KEYS and k != "rule"}


def changed_from(value: Any, ref: Any) -> Any:
    """``value`` where it differs from ``ref``: for two dicts, only the differing keys."""
    if isinstance(value, dict) and isinstance(ref, dict):
        return {k: changed_from(v, ref.get(k)) for k, v in value.items() if ref.get(k) != v}
    return value


def fmt_value(v: Any) -> str:
    """A setting as RESULTS.md names it: ``0.1``, ``{exclude=fc}``, ``[0.9, 0.999]``."""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={fmt_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(fmt_value(x) for x in v) + "]"
    return str(v)


def config_file_values(name: str) -> dict[str, Any]:
    """The training settings of a config file as it is now (defaults when it is gone)."""
    try:
        return load_config(name or None).to_dict()
    except ConfigError:
        return load_config().to_dict()


@dataclasses.dataclass
class Group:
    """A protocol: a model trained with one set of settings, one row per variant."""
    model: str
    key: str                 # "cpu", "gpu", "quality-<protocol>", or the label of another
    label: str               # protocol
    table: bool              # a protocol of a definition file (recipes/table.toml or the
                             # quality track's): every row listed, run or not
    optimizer: str           # which published numbers apply
    device: str = "cpu"      # "cpu"/"cuda": which step-time ratios apply
    names: set = dataclasses.field(default_factory=set)   # other groups: config files,
    epochs: int = 0                                       # epochs and settings that differ
    diff: str = ""                                        # from the config file
    quality: bool = False    # a protocol of the training-quality track
    protocol: str = ""       # a definition file's protocol name
    config: str = ""         # ... and its config file for this model


@dataclasses.dataclass
class Row:
    group: Group
    variant: str
    rule: str
    plain: bool              # the plain rule (variant == rule): published numbers and
                             # step-time ratios apply
    data: str | None = None
    runs: list[Run] = dataclasses.field(default_factory=list)
    running: list[Run] = dataclasses.field(default_factory=list)
    diverged: list[Run] = dataclasses.field(default_factory=list)   # finished, no result
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # a definition file's
                             # row: the training settings recipes.table_runs gives it
    shared: str = ""         # a quality row with the settings of a table row: "<protocol>/
                             # <row>" of that row, whose runs it shows


def table_configs(table: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(protocol, model, row) -> the training settings recipes.table_runs gives that row (of
    recipes/table.toml or any file in its format, e.g. recipes/quality.toml)."""
    out = {}
    for proto in table["protocols"]:
        for it in items(table, proto, seeds=[0]):
            cfg = item_config(table, proto, it).to_dict()
            out[(proto, it.model, it.row)] = training_settings(cfg)
    return out


@dataclasses.dataclass
class Track:
    """A definition file (the table, the training-quality track) and its rows' settings."""
    table: dict[str, Any]
    expected: dict[tuple[str, str, str], dict[str, Any]]
    quality: bool = False

    @classmethod
    def of(cls, table: dict[str, Any], quality: bool = False) -> "Track":
        return cls(table, table_configs(table), quality)

    def group(self, proto: str, model: str) -> Group:
        return table_group(self.table, proto, model, quality=self.quality)


def is_own_run(run: Run, group: Group, variant: str) -> bool:
    """Whether ``run`` is the run ``recipes.table_runs`` made for row ``variant`` of the
    definition-file protocol ``group`` (its name ``table-<protocol>/<model>/<row>-s<seed>``),
    not another run that happens to have the row's settings."""
    return group.table and run.config.get("name") == (
        f"table-{group.protocol}/{group.model}/{variant}-s{run.info['seed']}")


def classify(run: Run, table: dict[str, Any], expected,
             quality: Track | None = None) -> tuple[Group, str, str, bool]:
    """(group, variant label, rule, plain) of a run.

    A run of a table protocol is the row whose settings it has; failing that, a run of a
    protocol of the training-quality track (``quality``) is the row of that track whose
    settings it has.  Any other run joins the group
    of the runs with the same protocol settings (everything but the rule and its variant
    settings: options and optimizer hyperparameters), so that e.g. a target-propagation run
    with its own tuned Adam sits beside the bp run of the same net, epochs and data protocol;
    its variant names the settings that differ from its config file (a run of a table row
    with changed protocol settings: from the row's)."""
    cfg = run.config
    model, train = cfg["model"], training_settings(cfg)
    tracks = [Track(table, expected)] + ([quality] if quality is not None else [])
    for track in tracks:
        for (proto, m, row), want in track.expected.items():
            if m == model and train == want:
                rule = track.table["rows"][row]["rule"]
                return track.group(proto, model), row, rule, row == rule
    m = re.fullmatch(r"table-([^/]+)/([^/]+)/(.+)-s\d+", cfg.get("name", ""))
    row = m and next((t.expected[(m[1], model, m[3])] for t in tracks
                      if (m[1], model, m[3]) in t.expected), None)
    ref = row if row else config_file_values(cfg.get("config_name", ""))
    diff = {k: changed_from(v, ref.get(k)) for k, v in train.items()
            if ref.get(k) != v and k not in ("rule", "epochs")}
    proto_diff = {k: v for k, v in diff.items() if k not in VARIANT_KEYS}
    var_diff = {k: v for k, v in diff.items() if k in VARIANT_KEYS}
    opts = {k: v for k, v in var_diff.pop("rule_options", {}).items() if k != "seed"}
    base = m[3] if row else cfg["rule"]
    variant = base + (f" {fmt_value(opts)}" if opts else "")
    variant += "".join(f", {k} {fmt_value(v)}" for k, v in sorted(var_diff.items()))
    key = json.dumps(protocol_settings(train), sort_keys=True, default=str)
    group = Group(model, key, "", False, cfg["optimizer"])
    group.names = {cfg.get("config_name") or "(none: recipe defaults)"}
    group.epochs = cfg["epochs"]
    group.diff = "".join(f", {k} {fmt_value(v)}" for k, v in sorted(proto_diff.items()))
    return group, variant, cfg["rule"], variant == base == cfg["rule"]


def table_group(table: dict[str, Any], proto: str, model: str, *, quality: bool = False
                ) -> Group:
    spec = table["protocols"][proto]
    config = spec["configs"][model]
    return Group(model, f"quality-{proto}" if quality else proto,
                 f"{'quality track, ' if quality else ''}{proto}: config {config}", True,
                 load_config(config).optimizer, spec.get("device", "cpu"), quality=quality,
                 protocol=proto, config=config)


def build_rows(runs: list[Run], table: dict[str, Any],
               quality: dict[str, Any] | None = None) -> list[Row]:
    """Rows of every table protocol (all of them, run or not), of every protocol of the
    training-quality track ``quality`` (all of them), then of the other groups."""
    expected = table_configs(table)
    qtrack = Track.of(quality, quality=True) if quality is not None else None
    tracks = [Track(table, expected)] + ([qtrack] if qtrack is not None else [])
    rows: dict[tuple, Row] = {}
    groups: dict[tuple, Group] = {}
    for track in tracks:
        for proto, spec in track.table["protocols"].items():
            for model in spec["configs"]:
                if model not in MODELS:
                    continue
                g = track.group(proto, model)
                groups[(model, g.key)] = g
                for it in items(track.table, proto, models=[model], seeds=[0]):
                    rule = track.table["rows"][it.row]["rule"]
                    want = track.expected[(proto, model, it.row)]
                    shared = next((f"{p}/{r}" for (p, m, r), v in expected.items()
                                   if track.quality and m == model and v == want), "")
                    rows[(model, g.key, it.row, None)] = Row(g, it.row, rule, it.row == rule,
                                                             settings=want, shared=shared)
    classified = [(run, *classify(run, table, expected, qtrack)) for run in runs
                  if run.config["model"] in MODELS]
    # a row's seed shows one run: the one recipes.table_runs made for that row and seed when
    # there is one, else the first by path among those with the row's settings
    classified.sort(key=lambda c: not is_own_run(c[0], c[1], c[2]))
    for run, group, variant, rule, plain in classified:
        if (group.model, group.key) in groups:      # one Group object per protocol
            known = groups[(group.model, group.key)]
            if not group.table:
                known.names |= group.names
                known.diff = min(known.diff, group.diff, key=len)
            group = known
        groups[(group.model, group.key)] = group
        data = run.info["data"]
        key = (group.model, group.key, variant, data)
        if key not in rows:
            empty = rows.get((group.model, group.key, variant, None))
            if empty is not None and empty.data is None:   # the first data copy of a table row
                del rows[(group.model, group.key, variant, None)]
                empty.data = data
                rows[key] = empty
            else:
                rows[key] = Row(group, variant, rule, plain, data)
        row = rows[key]
        seeds = {r.info["seed"] for r in row.runs}
        if run.final is None:
            row.running.append(run)
        elif run.info["seed"] not in seeds | {r.info["seed"] for r in row.diverged}:
            (row.diverged if run.diverged else row.runs).append(run)  # one per seed
    for row in rows.values():       # shown in seed order
        row.runs.sort(key=lambda r: r.info["seed"])
        row.diverged.sort(key=lambda r: r.info["seed"])
    for row in rows.values():       # a quality row with a table row's settings: its runs
        if row.shared and not (row.runs or row.running or row.diverged):
            proto, label = row.shared.split("/", 1)
            same = next((r for r in rows.values() if r.group.table and not r.group.quality
                         and r.group.model == row.group.model and r.group.key == proto
                         and r.variant == label and (r.runs or r.running or r.diverged)), None)
            if same is not None:
                row.data, row.runs, row.running = same.data, same.runs, same.running
                row.diverged = same.diverged
    for g in groups.values():
        if not g.table:
            names = sorted(g.names)
            g.label = (f"config{'s' if len(names) > 1 else ''} {', '.join(names)}; "
                       f"{g.epochs} epochs{g.diff}")
    order = {m: i for i, m in enumerate(MODELS)}
    protos = {(t.quality, p): i for t in tracks for i, p in enumerate(t.table["protocols"])}
    rowpos = {(t.quality, r): i for t in tracks for i, r in enumerate(t.table["rows"])}

    def position(r: Row) -> tuple:
        g = r.group
        return (order[g.model], 2 if not g.table else int(g.quality),
                protos.get((g.quality, g.protocol), 0), g.label,
                rowpos.get((g.quality, r.variant), len(rowpos)), r.variant,
                r.data or "")
    return sorted(rows.values(), key=position)


def slug(text: str) -> str:
    """``text`` as a file name: runs of other characters than letters, digits and dots
    become one ``-``; at most 80 characters."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:80]


def figure_paths(group: Group, figures: Path) -> dict[str, Path]:
    """The group's figures in ``figures``: ``{"curves": ..., "alignment": ...}``."""
    base = figures / group.model / slug(group.key if group.table else group.label)
    return {"curves": base.with_name(base.name + "-curves.png"),
            "alignment": base.with_name(base.name + "-alignment.png")}


def by_group(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    """The rows of each group, by (model, group key), in the order of ``rows``."""
    out: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        out.setdefault((r.group.model, r.group.key), []).append(r)
    return out
