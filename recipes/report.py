"""RESULTS.md -- the CIFAR-10 table of every rule -- and its figures, built from the logs.

    python -m recipes.report              # write RESULTS.md, results/figures/, README's table
    python -m recipes.report --check      # exit 1 if RESULTS.md or README's table is stale
    python -m recipes.report --quality '' # without the training-quality section
    python -m recipes.report --runs runs/x/*     # markdown summary of some run folders, with
                                                 # the last per-layer alignment of each
    python -m recipes.report --runs-table OUT/runs.jsonl   # one row per run of a runs.jsonl
    python -m recipes.report --runs-table runs/x/*         # (gpu_table.sh PLAN=...) or of run
                                                           # folders: accuracy, loss per epoch

Reads every ``log.jsonl`` (and ``<name>.log.jsonl``) under ``results/`` written by
``recipes.train`` (its ``final`` record: test accuracy, epochs, images/s, device, data copy,
seed, full config), the ``recipes.step_time`` JSON files there (step-time ratios to the
unwrapped model), ``recipes/table.toml`` (the rows and protocols of the table) and
``recipes/published.toml`` (published accuracies with their epochs and sources).

For the 3x1024 MLP and ResNet-20, one row per (protocol, rule variant, data copy): test
accuracy (mean, and sample standard deviation over seeds where there are 2+), its gap to
``bp`` of the same protocol and data copy (points), epochs, training images/s, step-time
ratio, device, data copy, seeds, and the published number.  The table protocols
(``recipes/table.toml``) list every row they should have; a row without a finished log says
"not run" (numbers come from logs only).  A run belongs to a table protocol when its config
equals the one ``recipes.table_runs`` builds for that row (machine and output settings
aside); every other log is listed under "Other runs", grouped by what was trained apart from
the rule's own settings (model, epochs, schedule, batch, augmentation, split: runs of
different config files with the same such settings share a group, and its ``bp``), each row
naming the settings its runs changed from their config file.

The training-quality track (``recipes/quality.toml``, the same format: variants of ``fa`` and
``dfa`` beside ``bp`` with the same optimizer) has its own section, after the per-model tables:
per protocol and model, every row of that file (in its order, "not run" where no log has
finished) with its rule, optimizer, rule options (and other changed settings), test accuracy,
the gap to the ``bp`` row of that table with the same optimizer, model and protocol, and, from
each run's last alignment record, the mean over layers of the update angle and the norm ratio
of the first wrapped layer.  A run belongs to it
when its config equals the one ``recipes.table_runs --table recipes/quality.toml`` builds for
that row (it is then not among "Other runs"); a run whose settings equal a row of the table
proper stays there, and a quality row with those settings shows that row's runs.

Under the table of each table protocol and each quality-track protocol where a row other
than ``bp`` logged alignment: the per-layer alignment table (where alignment fails, layer by
layer), one row per layer in the order logged, one column per such row, each cell the update
angle (degrees) and the norm ratio of that layer in each run's last alignment record (mean
over seeds).

Figures (``results/figures/``): per model and protocol (the quality track's too), the
accuracy curves of every row (first seed; :func:`recipes.plots.plot_curves`) and, where the
runs logged alignment (``--diagnostics-every``), the per-layer angle between each rule's
weight update and backprop's gradient at the end of training (mean of the last records).
README.md's table between ``<!-- results:begin -->`` and ``<!-- results:end -->`` (the table
proper only) is rewritten too.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import tomllib
from pathlib import Path
from typing import Any

from .common import FIELDS, ConfigError, load_config, read_jsonl
from .data import REPO
from .table_runs import TABLE, item_config, items, load_table
from .train import diverged

PUBLISHED = Path(__file__).resolve().parent / "published.toml"
QUALITY = Path(__file__).resolve().parent / "quality.toml"
MODELS = {"mlp3x1024": "3x1024 tanh MLP", "resnet20": "ResNet-20"}
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
#: config keys that do not change what is trained (machine, outputs, bookkeeping; the seed
#: is a row's spread)
NOT_TRAINING = {"name", "config_name", "reference", "rules", "data", "download", "device",
                "threads", "channels_last", "compile", "ddp", "out_dir", "log_every",
                "diagnostics_every", "eval_batch_size", "test_every_epoch", "seed"}
#: of the training keys, those that make a rule variant (the rest make the protocol)
VARIANT_KEYS = ("rule_options", "feedback_options", "lr", "momentum", "nesterov", "betas", "eps",
                "alpha")
#: of the protocol keys, the optimizer's (shown with it in the training-quality tables)
OPTIMIZER_KEYS = ("momentum", "nesterov", "weight_decay", "betas", "eps", "alpha", "aux_lr")
NOT_RUN = "not run"
DEFAULTS = load_config().to_dict()


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass
class Run:
    """One training run's log."""
    path: Path
    records: list[dict[str, Any]]

    @property
    def final(self) -> dict[str, Any] | None:
        return next((r for r in reversed(self.records) if r.get("event") == "final"), None)

    @property
    def config(self) -> dict[str, Any]:
        return next(r["config"] for r in reversed(self.records) if "config" in r)

    @property
    def epochs(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == "epoch"]

    @property
    def alignment(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "alignment" in r]

    @property
    def info(self) -> dict[str, Any]:
        """The last record with the run's provenance (device, data, seed)."""
        return next(r for r in reversed(self.records) if "device" in r)

    @property
    def diverged(self) -> dict[str, Any] | None:
        """Where the run diverged: its final record's ``diverged`` (``recipes.train`` stopped
        it), or, for logs from before that check, the first epoch whose training loss fails
        :func:`recipes.train.diverged` against the first epoch's; None if it did not."""
        if self.final is not None and self.final.get("diverged"):
            return self.final["diverged"]
        losses = [(r["epoch"], r["train_loss"]) for r in self.epochs]
        start = losses[0][1] if losses and math.isfinite(losses[0][1]) else None
        return next(({"epoch": e, "loss": v, "start_loss": start} for e, v in losses
                     if diverged(v, start)), None)

    def test_at_best_val(self) -> float | None:
        """Test accuracy at the epoch of best validation accuracy: the final record's, or,
        for older logs, the last epoch's test accuracy when that epoch had the best."""
        f = self.final
        if f.get("test_acc_at_best_val") is not None:
            return f["test_acc_at_best_val"]
        vals = [r for r in self.epochs if r.get("val_acc") is not None]
        if vals and max(vals, key=lambda r: r["val_acc"])["epoch"] == f["epoch"]:
            return f.get("test_acc")
        return None


def load_runs(results: Path) -> list[Run]:
    """Every recipes.train run logged under ``results`` (sorted by file): its ``log.jsonl``,
    or any ``.jsonl`` holding train records (several runs, told apart by their ``run``
    field), or ``{"final": ..., "epochs": [...]}`` records of a suite."""
    runs = []
    for path in sorted(results.rglob("*.jsonl")):
        try:
            recs = read_jsonl(path)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        by_run: dict[str, list[dict[str, Any]]] = {}
        current = None          # step records carry no run name: they belong to the last run
        for r in recs:
            if isinstance(r.get("final"), dict) and "config" in r["final"]:
                by_run[f"{len(by_run)}"] = [*r.get("epochs", []), r["final"]]
            elif r.get("event") in ("start", "epoch", "step", "resume", "final"):
                current = str(r["run"]) if "run" in r else current
                by_run.setdefault(current, []).append(r)
        for recs_ in by_run.values():
            if any("config" in r for r in recs_) and any("device" in r for r in recs_):
                runs.append(Run(path, recs_))
    return runs


def load_published(path: Path = PUBLISHED) -> dict[str, Any]:
    with open(path, "rb") as fh:
        pub = tomllib.load(fh)
    for e in pub.get("result", []):
        if e["source"] not in pub["sources"]:
            raise ConfigError(f"{path}: source {e['source']!r} of {e['model']}/{e['rule']} is "
                              "not in [sources]")
    return pub


def load_step_times(results: Path) -> list[dict[str, Any]]:
    """``recipes.step_time`` JSON files under ``results``: {path, model, device, ratios},
    those with the most ratios first (then by path)."""
    out = []
    for path in sorted(results.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and "ratio_to_plain" in data and "model" in data:
            out.append({"path": path, "model": data["model"],
                        "device": "cuda" if str(data.get("device", "")).startswith("cuda")
                        else "cpu", "ratios": data["ratio_to_plain"],
                        "variants": data.get("variants", {}),
                        "optimizer": str(data.get("optimizer", "")).split("(")[0]})
    # the file that measured the most rules first: one table's ratios from one measurement
    return sorted(out, key=lambda st: -len(st["ratios"]))


# ----------------------------------------------------------------------------- grouping


def _training(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings that change what is trained (keys a log predates: their defaults)."""
    full = {**DEFAULTS, **cfg}
    return {k: v for k, v in full.items() if k not in NOT_TRAINING and k in FIELDS}


def _protocol(train: dict[str, Any]) -> dict[str, Any]:
    """Of the training settings, those that make the protocol: all but the rule and its
    variant settings (options, optimizer hyperparameters; the optimizer itself stays)."""
    return {k: v for k, v in train.items() if k not in VARIANT_KEYS and k != "rule"}


def _changed(value: Any, ref: Any) -> Any:
    """``value`` where it differs from ``ref``: for two dicts, only the differing keys."""
    if isinstance(value, dict) and isinstance(ref, dict):
        return {k: _changed(v, ref.get(k)) for k, v in value.items() if ref.get(k) != v}
    return value


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={_fmt_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def _config_file_values(name: str) -> dict[str, Any]:
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
            out[(proto, it.model, it.row)] = _training(item_config(table, proto, it).to_dict())
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
    model, train = cfg["model"], _training(cfg)
    tracks = [Track(table, expected)] + ([quality] if quality is not None else [])
    for track in tracks:
        for (proto, m, row), want in track.expected.items():
            if m == model and train == want:
                rule = track.table["rows"][row]["rule"]
                return track.group(proto, model), row, rule, row == rule
    m = re.fullmatch(r"table-([^/]+)/([^/]+)/(.+)-s\d+", cfg.get("name", ""))
    row = m and next((t.expected[(m[1], model, m[3])] for t in tracks
                      if (m[1], model, m[3]) in t.expected), None)
    ref = row if row else _config_file_values(cfg.get("config_name", ""))
    diff = {k: _changed(v, ref.get(k)) for k, v in train.items()
            if ref.get(k) != v and k not in ("rule", "epochs")}
    proto_diff = {k: v for k, v in diff.items() if k not in VARIANT_KEYS}
    var_diff = {k: v for k, v in diff.items() if k in VARIANT_KEYS}
    opts = {k: v for k, v in var_diff.pop("rule_options", {}).items() if k != "seed"}
    base = m[3] if row else cfg["rule"]
    variant = base + (f" {_fmt_value(opts)}" if opts else "")
    variant += "".join(f", {k} {_fmt_value(v)}" for k, v in sorted(var_diff.items()))
    key = json.dumps(_protocol(train), sort_keys=True, default=str)
    group = Group(model, key, "", False, cfg["optimizer"])
    group.names = {cfg.get("config_name") or "(none: recipe defaults)"}
    group.epochs = cfg["epochs"]
    group.diff = "".join(f", {k} {_fmt_value(v)}" for k, v in sorted(proto_diff.items()))
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
    for run in runs:
        if run.config["model"] not in MODELS:
            continue
        group, variant, rule, plain = classify(run, table, expected, qtrack)
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
            (row.diverged if run.diverged else row.runs).append(run)  # one per seed: the first
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


# ----------------------------------------------------------------------------- cells


def accuracies(row: Row) -> list[float]:
    return [100 * r.final["test_acc"] for r in row.runs]


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt_acc(values: list[float]) -> str:
    if not values:
        return NOT_RUN
    m, sd = mean_sd(values)
    return f"{m:.2f}" if sd is None else f"{m:.2f} ± {sd:.2f}"


def bp_row(row: Row, rows: list[Row]) -> Row | None:
    """The ``bp`` row of the same model, protocol and data copy, if it has runs; in the
    training-quality track, the first row of the same table whose rule is ``bp`` and whose
    settings are this row's but for the rule, its options and the optimizer hyperparameters:
    the same optimizer, model (options) and training protocol."""
    same = (r for r in rows if r.group.model == row.group.model
            and r.group.key == row.group.key and r.data == row.data and r.runs)
    if row.group.quality:
        want = _protocol(row.settings)
        return next((r for r in same if r.rule == "bp" and _protocol(r.settings) == want),
                    None)
    return next((r for r in same if r.variant == "bp"), None)


def fmt_gap(row: Row, rows: list[Row]) -> str:
    if not row.runs:
        return "—"
    bp = bp_row(row, rows)
    if bp is row or (row.variant == "bp" and not row.group.quality):
        return "ref"
    if bp is None:
        return "—"
    gap = statistics.fmean(accuracies(row)) - statistics.fmean(accuracies(bp))
    return f"{gap:+.2f}"


def _timed_as(row: Row, variant: dict[str, Any] | None, file_optimizer: str) -> bool:
    """A ``recipes.step_time`` variant record (``--variants-from`` the table) times this row:
    same rule, rule options and optimizer (the variant's own, else the file's)."""
    if not variant or not row.settings:
        return False
    return (variant.get("rule") == row.rule
            and variant.get("options", {}) == row.settings.get("rule_options", {})
            and variant.get("optimizer", file_optimizer) == row.settings.get("optimizer"))


def step_ratio(row: Row, step_times: list[dict[str, Any]]) -> tuple[str, Path | None]:
    """The row's step-time ratio to plain backprop: a plain rule's from the file that measured
    the most rules; a row with options or its own optimizer (``fa-best``, ``dfa-stage``) from
    a file that timed it by its label with the same rule, options and optimizer."""
    device = row.group.device
    if row.runs:
        device = "cuda" if any(r.info["device"].startswith("cuda") for r in row.runs) else "cpu"
    for st in step_times:
        if st["model"] != row.group.model or st["device"] != device:
            continue
        if row.plain and row.rule in st["ratios"]:
            return f"{st['ratios'][row.rule]:.2f}", st["path"]
        if (not row.plain and row.variant in st["ratios"]
                and _timed_as(row, st["variants"].get(row.variant), st["optimizer"])):
            return f"{st['ratios'][row.variant]:.2f}", st["path"]
    return "—", None


def published_for(row: Row, pub: dict[str, Any]) -> list[dict[str, Any]]:
    if not row.plain:
        return []
    found = [e for e in pub.get("result", []) if e["model"] == row.group.model
             and e["rule"] == row.rule]
    same = [e for e in found if e.get("optimizer") == row.group.optimizer]
    return same or found


def fmt_published(entries: list[dict[str, Any]]) -> str:
    return "; ".join(f"{e['accuracy']:.2f} ({e['epochs']} ep, {e['optimizer']}, "
                     f"[{e['source']}](#{e['source']}))" for e in entries) or "—"


def _distinct(values) -> str:
    return ", ".join(dict.fromkeys(str(v) for v in values))


def fmt_diverged(row: Row) -> str:
    """"diverged (seed S: epoch E, ...)" for the row's diverged runs ("" if none): such a run
    has no result."""
    where = [f"seed {r.info['seed']}: epoch {r.diverged['epoch']}" for r in row.diverged]
    return f"**diverged** ({'; '.join(where)})" if where else ""


def state_cell(row: Row) -> str:
    """The accuracy cell of a row without a result: "diverged (...)", "not run", or how far
    its first unfinished run has come."""
    if row.diverged:
        return fmt_diverged(row)
    if not row.running:
        return NOT_RUN
    last = row.running[0].epochs
    return (f"unfinished (epoch {last[-1]['epoch'] if last else 0}/"
            f"{row.running[0].config['epochs']})")


def cells(row: Row, rows: list[Row], step_times, pub) -> dict[str, str]:
    """Every cell of a row, by column name (see COLUMNS)."""
    ratio, _ = step_ratio(row, step_times)
    out = {"rule": f"`{row.variant}`", "test acc %": fmt_acc(accuracies(row)),
           "gap to bp": fmt_gap(row, rows), "ratio": ratio,
           "published %": fmt_published(published_for(row, pub)),
           "at best val": fmt_best_val(row)}
    if row.diverged and row.runs:
        out["test acc %"] += f"; {fmt_diverged(row)}"
    if not row.runs:
        out["test acc %"] = state_cell(row)
        out.update({k: "—" for k in ("epochs", "img/s", "device", "data", "seeds")})
        return out
    finals = [r.final for r in row.runs]
    out["epochs"] = _distinct(f["epoch"] for f in finals)
    out["img/s"] = f"{statistics.fmean(f['images_per_s'] for f in finals):.0f}"
    out["device"] = _distinct(f["device"] for f in finals)
    out["data"] = row.data or "—"
    out["seeds"] = ", ".join(str(s) for s in sorted(f["seed"] for f in finals))
    return out


def fmt_best_val(row: Row) -> str:
    """Test accuracy at the epoch of best validation accuracy, mean over the row's runs ("—"
    unless every run has it: older logs tested only after the last epoch)."""
    accs = [r.test_at_best_val() for r in row.runs]
    if not accs or None in accs:
        return "—"
    return fmt_acc([100 * a for a in accs])


COLUMNS = ("rule", "test acc %", "at best val", "gap to bp", "epochs", "img/s", "ratio",
           "device", "data", "seeds", "published %")
HEADER = ("| rule | test acc % | test acc % at best val epoch | gap to bp (points) | epochs | "
          "img/s | step time / plain | device | data | seeds | published % (epochs, optimizer, "
          "source) |\n|---|---:|---:|---:|---:|---:|---:|---|---|---|---|")


def table_markdown(rows: list[Row], all_rows: list[Row], step_times, pub) -> str:
    lines = [HEADER]
    for row in rows:
        c = cells(row, all_rows, step_times, pub)
        lines.append("| " + " | ".join(c[k] for k in COLUMNS) + " |")
    return "\n".join(lines)


def last_alignment_record(run: Run, key: str) -> dict[str, Any] | None:
    """The run's last alignment record (``{"event": "step", "step": ..., "alignment": ...}``)
    that has ``key`` (``update_angle``, ``norm_ratio``, ...); None when the run logged none."""
    return next((r for r in reversed(run.alignment) if r["alignment"].get(key)), None)


def last_alignment(run: Run, key: str) -> dict[str, float] | None:
    """``{layer: value}`` of ``key`` (``update_angle``, ``norm_ratio``, ...) in the run's last
    alignment record that has it; None when the run logged none."""
    rec = last_alignment_record(run, key)
    return None if rec is None else rec["alignment"][key]


def alignment_cells(row: Row) -> tuple[str, str]:
    """(mean over layers of the update angle in degrees, norm ratio of the first wrapped
    layer in the record's order -- the farthest from the output), each from the last
    alignment record of each finished run, averaged over the runs; "—" where none logged it."""
    angles, ratios = [], []
    for run in row.runs:
        if (a := last_alignment(run, "update_angle")) is not None:
            angles.append(statistics.fmean(a.values()))
        if (n := last_alignment(run, "norm_ratio")) is not None:
            ratios.append(next(iter(n.values())))
    return (f"{statistics.fmean(angles):.1f}" if angles else "—",
            f"{statistics.fmean(ratios):.3g}" if ratios else "—")


def _fmt_ratio(value: float) -> str:
    """A norm ratio to 2 significant digits (``0.087`` -> ``0.087``, ``123`` -> ``120``)."""
    if not math.isfinite(value):
        return str(value)
    text = f"{value:.2g}"
    return f"{float(text):.0f}" if "e+" in text and abs(value) < 1e6 else text


def _merge_layers(orders: list[list[str]]) -> list[str]:
    """The layers of several runs in the order they were logged (the model's order): each
    layer one of them lacks goes after the layer logged before it in a run that has it."""
    merged: list[str] = []
    for order in sorted(orders, key=len, reverse=True):
        for i, name in enumerate(order):
            if name not in merged:
                before = next((merged.index(p) for p in reversed(order[:i]) if p in merged), -1)
                merged.insert(before + 1, name)
    return merged


def layer_alignment_markdown(rows: list[Row]) -> str:
    """Where alignment fails, layer by layer: one row per layer (in the order logged), one
    column per row of the group (its label) whose finished runs logged alignment, ``bp`` rows
    aside (0 degrees by construction), each cell "update angle in degrees / norm ratio" from
    each run's last alignment record, mean over its seeds; "—" where the layer was not
    logged.  A sentence says what the values are and the step of the records (per column
    when they differ).  "" when no such row."""
    labels = [r.variant for r in rows]
    columns = []                # (label, layers, {layer: (angle, ratio)}, steps, epochs, runs)
    for row in rows:
        if row.rule == "bp":
            continue
        recs = [rec for run in row.runs
                if (rec := last_alignment_record(run, "update_angle")) is not None]
        if not recs:
            continue
        label = f"`{row.variant}`"
        if labels.count(row.variant) > 1 and row.data:
            label += f" ({row.data})"
        layers = _merge_layers([list(r["alignment"]["update_angle"]) for r in recs])
        values = {}
        for name in layers:
            angles = [r["alignment"]["update_angle"][name] for r in recs
                      if name in r["alignment"]["update_angle"]]
            ratios = [r["alignment"]["norm_ratio"][name] for r in recs
                      if name in (r["alignment"].get("norm_ratio") or {})]
            values[name] = (statistics.fmean(angles) if angles else None,
                            statistics.fmean(ratios) if ratios else None)
        columns.append((label, layers, values, [r.get("step") for r in recs],
                        [r.get("epoch") for r in recs], len(recs)))
    if not columns:
        return ""

    def when(steps, epochs) -> str:
        step = f"step {_distinct(steps)}" if len(set(steps)) == 1 else \
            f"steps {min(steps)}-{max(steps)}"
        return step + (f", epoch {epochs[0]}" if len(set(epochs)) == 1
                       and epochs[0] is not None else "")
    all_steps = [s for c in columns for s in c[3]]
    all_epochs = [e for c in columns for e in c[4]]
    same = len(set(all_steps)) == 1 and len(set(all_epochs)) == 1
    several = any(c[5] > 1 for c in columns)
    sentence = (
        "**Per-layer alignment** of the rows above: each cell is the update "
        "angle in degrees between the rule's weight gradient and backprop's on a training "
        "batch, then ||rule grad|| / ||BP grad||, of that layer, from the last diagnostics "
        "record of the run (`diagnostics_every`; "
        + (f"{when(all_steps, all_epochs)})" if same else "the step under each column)")
        + ("; mean over the seeds (their number under the column)" if several else "")
        + "; one column per row that logged alignment, `bp` rows left out (0° by "
        "construction); \"—\": the layer was not logged.")

    def head(c) -> str:        # the label; the step when the columns' differ; the seeds
        notes = ([] if same else [when(c[3], c[4])]) + ([f"{c[5]} seeds"] if c[5] > 1 else [])
        return c[0] + (f" ({', '.join(notes)})" if notes else "")
    lines = [sentence, "", "| layer | " + " | ".join(head(c) for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name in _merge_layers([c[1] for c in columns]):
        cells_ = []
        for c in columns:
            angle, ratio = c[2].get(name, (None, None))
            cells_.append("—" if angle is None and ratio is None else
                          ("—" if angle is None else f"{angle:.0f}") + " / "
                          + ("—" if ratio is None else _fmt_ratio(ratio)))
        lines.append(f"| `{name}` | " + " | ".join(cells_) + " |")
    return "\n".join(lines)


def _row_changes(row: Row) -> dict[str, Any]:
    """The training settings a row of a definition file changes from its config file (rule
    options and the optimizer and its lr aside: those have their own cells)."""
    ref = _training(_config_file_values(row.group.config))
    return {k: _changed(v, ref.get(k)) for k, v in row.settings.items()
            if ref.get(k) != v and k not in ("rule", "rule_options", "optimizer", "lr")}


def fmt_optimizer(row: Row) -> str:
    """The optimizer, its lr and the optimizer settings the row changes."""
    if not row.settings:
        return "—"
    extra = {k: v for k, v in _row_changes(row).items() if k in OPTIMIZER_KEYS}
    return (f"{row.settings['optimizer']}, lr {float(row.settings['lr']):.3g}"
            + "".join(f", {k} {_fmt_value(v)}" for k, v in extra.items()))


def fmt_options(row: Row) -> str:
    """The rule options, then any other setting the row changes (model options, ...)."""
    opts = {k: v for k, v in row.settings.get("rule_options", {}).items() if k != "seed"}
    other = {k: v for k, v in _row_changes(row).items() if k not in OPTIMIZER_KEYS}
    parts = ([_fmt_value(opts)] if opts else []) + [f"{k} {_fmt_value(v)}"
                                                   for k, v in other.items()]
    return "; ".join(parts) or "—"


def quality_cells(row: Row, rows: list[Row]) -> dict[str, str]:
    """Every cell of a row of the training-quality track, by column name (see
    QUALITY_COLUMNS)."""
    angle, ratio = alignment_cells(row)
    label = f"`{row.variant}`"
    if row.shared:
        label += f" (= table `{row.shared.replace('/', '` `')}`)"
    return {"row": label, "rule": row.rule, "optimizer": fmt_optimizer(row),
            "rule options": fmt_options(row),
            "test acc %": fmt_acc(accuracies(row)) if row.runs else state_cell(row),
            "gap to bp": fmt_gap(row, rows), "update angle": angle, "norm ratio": ratio}


QUALITY_COLUMNS = ("row", "rule", "optimizer", "rule options", "test acc %", "gap to bp",
                   "update angle", "norm ratio")
QUALITY_HEADER = ("| row | rule | optimizer | rule options; other settings | test acc % | "
                  "gap to bp, same optimizer (points) | update angle (deg, mean over layers) | "
                  "norm ratio, first layer |\n|---|---|---|---|---:|---:|---:|---:|")


def quality_markdown(rows: list[Row], all_rows: list[Row]) -> str:
    """The table of one protocol and model of the training-quality track; a row on a second
    data copy names it."""
    lines = [QUALITY_HEADER]
    labels = [r.variant for r in rows]
    for row in rows:
        c = quality_cells(row, all_rows)
        if labels.count(row.variant) > 1 and row.data:
            c["row"] += f" ({row.data})"
        lines.append("| " + " | ".join(c[k] for k in QUALITY_COLUMNS) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:80]


def figure_paths(group: Group, figures: Path) -> dict[str, Path]:
    base = figures / group.model / slug(group.key if group.table else group.label)
    return {"curves": base.with_name(base.name + "-curves.png"),
            "alignment": base.with_name(base.name + "-alignment.png")}


def plot_alignment_summary(rows: list[Row], path: Path, title: str) -> Path | None:
    """Per layer, the angle between each variant's weight update and backprop's gradient,
    mean of the last 3 alignment records of its first run; None when no run logged any."""
    from .plots import plt, save_figure
    lines = []
    for row in rows:
        recs = [r["alignment"].get("update_angle") or {} for r in
                (row.runs[0].alignment if row.runs else [])]
        recs = [r for r in recs if r][-3:]
        if recs:
            layers = list(recs[-1])
            lines.append((row.variant, layers, [statistics.fmean(r.get(n, float("nan"))
                                                                 for r in recs)
                                                for n in layers]))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (label, layers, values) in enumerate(lines):
        ax.plot(range(len(layers)), values, marker="o", color=f"C{i % 10}",
                ls="-" if i < 10 else "--", label=label, ms=3)
    longest = max(lines, key=lambda t: len(t[1]))[1]
    ax.set_xticks(range(len(longest)), longest, rotation=60, fontsize=6, ha="right")
    ax.set_ylabel("angle(rule update, BP gradient) (deg)")
    ax.axhline(90, color="grey", lw=0.8, ls=":")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path, dpi=110)


def plot_accuracy_curves(rows: list[Row], path: Path, title: str) -> Path:
    """One line per variant (its first run): validation accuracy per epoch (test accuracy
    where the run has no validation set), the final test accuracy as a star.  (Per-run
    figures with training accuracy: :func:`recipes.plots.plot_curves`, beside each log.)"""
    from .plots import MaxNLocator, plt, save_figure
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, row in enumerate(rows):
        recs, color, ls = row.runs[0].epochs, f"C{i % 10}", "-" if i < 10 else "--"
        key = "val_acc" if any(r.get("val_acc") is not None for r in recs) else "test_acc"
        pts = [(r["epoch"], 100 * r[key]) for r in recs if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), ls, color=color, marker="." if len(pts) < 3 else None,
                    label=f"{row.variant}: {100 * row.runs[0].final['test_acc']:.1f}")
        ax.plot(row.runs[0].final["epoch"], 100 * row.runs[0].final["test_acc"], "*",
                color=color, markersize=9)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation accuracy (%); star: final test")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="test %",
              title_fontsize=7)
    return save_figure(fig, path, dpi=110)


def write_figures(groups: dict[str, list[Row]], figures: Path) -> None:
    for rows in groups.values():
        g = rows[0].group
        done = [r for r in rows if r.runs]
        if not done:
            continue
        paths = figure_paths(g, figures)
        title = f"{MODELS[g.model]} - {g.label}"
        plot_accuracy_curves(done, paths["curves"], title)
        plot_alignment_summary(done, paths["alignment"], title)


# ----------------------------------------------------------------------------- documents


def _groups(rows: list[Row]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}
    for r in rows:
        out.setdefault((r.group.model, r.group.key), []).append(r)
    return out


def _command_path(path: Path) -> str:
    """``path`` as a command run in the repository root names it."""
    path = Path(path).resolve()
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def render_quality(rows: list[Row], quality: dict[str, Any], quality_path: Path,
                   figure_links) -> list[str]:
    """Lines of the training-quality section: per protocol of ``quality`` and model, a
    paragraph (configs, epochs, seeds, the command) and the table of every row."""
    groups = {k: v for k, v in _groups(rows).items() if v[0].group.quality}
    qpath = _command_path(quality_path)
    out = ["", "## Training-quality track", "",
           f"Rows and protocols: `{qpath}` (variants of the rules beside `bp` with the same "
           "optimizer, one table per protocol and model; generated like the tables above).  "
           "Gap: points to the row of the same table whose rule is `bp` and whose optimizer, "
           "model and protocol are this row's (its settings but for the rule, the rule options "
           "and the optimizer hyperparameters; same data copy): \"—\" where no such row has "
           "run.  Rule options; other settings: the settings a row changes from its config "
           "file besides the optimizer.  Update angle: the angle between the rule's "
           "weight update and backprop's gradient, mean over the wrapped layers; norm ratio: "
           "||rule grad|| / ||BP grad|| of the first wrapped layer (the farthest from the "
           "output); both from the last alignment record of each run (`diagnostics_every`), "
           "mean over seeds; \"—\" where the runs logged none.  A row with the settings of a "
           "row of the table above shows that row's runs."]
    for proto, spec in quality["protocols"].items():
        for model, config in spec["configs"].items():
            grows = groups.get((model, f"quality-{proto}"))
            if not grows:
                continue
            n_done = sum(1 for r in grows if r.runs)
            seeds = ", ".join(str(x) for x in spec["seeds"])
            out += ["", f"### {MODELS[model]}, protocol {proto} ({n_done} of {len(grows)} "
                    "rows run)", "",
                    f"Config `recipes/configs/{config}.toml` ({load_config(config).epochs} "
                    f"epochs), seed{'s' if len(spec['seeds']) > 1 else ''} {seeds}, device "
                    f"{spec.get('device', 'cpu')}; gaps are to `bp` with the same optimizer.  "
                    f"Runs: `python -m recipes.table_runs --table {qpath} --protocol {proto} "
                    f"--models {model}`.", "",
                    quality_markdown(grows, rows)]
            shown = figure_links(grows[0].group)
            if shown:
                out += ["", "* figures: " + ", ".join(shown)]
            if layers := layer_alignment_markdown(grows):
                out += ["", layers]
    return out


def render(rows: list[Row], step_times, pub, table: dict[str, Any], root: Path,
           figures: Path, quality: dict[str, Any] | None = None,
           quality_path: Path = QUALITY) -> str:
    """The text of RESULTS.md; paths relative to ``root`` (RESULTS.md's folder); figures
    that exist in ``figures`` are linked.  With ``quality`` (the training-quality track's
    definition, read from ``quality_path``), its section follows the per-model tables."""
    def rel(path: Path) -> str:
        return Path(os.path.relpath(Path(path).resolve(), root.resolve())).as_posix()

    def figure_links(g: Group) -> list[str]:
        return [f"[{k}]({rel(p)})" for k, p in figure_paths(g, figures).items() if p.is_file()]

    protocols = ", ".join(
        f"`{p}` (" + ", ".join(f"`recipes/configs/{c}.toml`" for c in s["configs"].values()) + ")"
        for p, s in table["protocols"].items())
    out = ["# Results: CIFAR-10, every rule",
           "",
           "Generated by `python -m recipes.report` from the training logs under `results/` "
           "(do not edit by hand; `python -m recipes.report --check` tells whether this file "
           "is up to date).  Test accuracy in percent on the 10,000 test images after the last "
           "epoch: the mean over seeds, ± the sample standard deviation where there are 2+; "
           "beside it, the test accuracy of the model after the epoch of best validation "
           "accuracy (as BioTorch reports; \"—\" for logs that tested only after the last "
           "epoch, unless that epoch had the best).  **diverged**: the run's training loss "
           "became non-finite or exceeded 3x its start (`recipes.train` stops such a run; "
           "older logs are judged on their per-epoch losses): it has no result, and its "
           "accuracy is not shown.  Gap: points to `bp` of the same protocol and data copy.  Step time / plain: "
           "`recipes.step_time` ratio of a training step to the unwrapped model on the same "
           "kind of device (source files listed under each table); img/s: the run's own "
           "training throughput, which also depends on what else shared the machine (the CPU "
           "runs ran two or three at a time on two cores), so compare speeds by the step-time "
           "ratio.  \"not run\": the table "
           "has this row but no finished log yet.  Compare rules only against `bp` on the "
           "same data copy: the JPEG-q75 copy scores 1-3 points below the official files.",
           "",
           "Runs: `python -m recipes.table_runs --protocol cpu` (one at a time, resumable) or "
           "`bash recipes/gpu_table.sh` (every row in parallel on one GPU); rows and "
           f"rule-specific settings: `recipes/table.toml`; protocols: {protocols}."]
    groups = _groups(rows)
    for model, title in MODELS.items():
        out += ["", f"## {title}"]
        mine = [(k, v) for k, v in groups.items() if k[0] == model and not v[0].group.quality]
        others = [(k, v) for k, v in mine if not v[0].group.table]
        for i, (key, grows) in enumerate(mine):
            g = grows[0].group
            if not g.table and i == len(mine) - len(others):
                out += ["", f"### Other runs ({title})", "",
                        "Runs outside the table protocols (mostly short), grouped by what "
                        "was trained: model, epochs, schedule, batch, augmentation, split "
                        "(named by their config files; settings that differ from the config "
                        "file as it is now are named).  A row names the settings its runs "
                        "changed (rule options, optimizer hyperparameters) from their config "
                        "file."]
            head = "###" if g.table else "####"
            n_done = sum(1 for r in grows if r.runs)
            out += ["", f"{head} {'Protocol ' if g.table else ''}{g.label}"
                    + (f" ({n_done} of {len(grows)} rows run)" if g.table else ""), ""]
            out.append(table_markdown(grows, rows, step_times, pub))
            sources = sorted({rel(p) for r in grows for p in [step_ratio(r, step_times)[1]]
                              if p is not None})
            notes = []
            if sources:
                notes.append("step-time ratios: " + ", ".join(f"`{s}`" for s in sources))
            logs = [rel(run.path) for r in grows for run in r.runs + r.running]
            if logs and not g.table:
                notes.append("logs: " + ", ".join(f"`{s}`" for s in logs))
            shown = figure_links(g)
            if shown:
                notes.append("figures: " + ", ".join(shown))
            if notes:
                out += [""] + [f"* {n}" for n in notes]
            if g.table and (layers := layer_alignment_markdown(grows)):
                out += ["", layers]
    if quality is not None:
        out += render_quality(rows, quality, quality_path, figure_links)
    out += ["", "## Published numbers", ""]
    for key, src in pub["sources"].items():
        out.append(f"* <a id=\"{key}\"></a>**{key}**: {src['cite']}. {src['where']}. "
                   f"Protocol: {src['protocol']}.")
    return "\n".join(out) + "\n"


def readme_block(rows: list[Row], pub, table: dict[str, Any]) -> str:
    """The short headline table for README.md: each table row's accuracy per protocol."""
    protos = list(table["protocols"])
    head = ["rule"]
    for model, title in MODELS.items():
        head += [f"{title}, {p}" for p in protos] + [f"{title}, published"]
    lines = [BEGIN,
             "Test accuracy (%) on CIFAR-10 of each rule in the table protocols (mean over "
             "seeds); generated by `python -m recipes.report` from the logs -- gaps, "
             "spreads, speed, devices and the short runs: [RESULTS.md](RESULTS.md).",
             "",
             "| " + " | ".join(head) + " |",
             "|---|" + "---:|" * (len(head) - 1)]
    by_key = {(r.group.model, r.group.key, r.variant): r for r in rows
              if r.group.table and not r.group.quality}
    for label in table["rows"]:
        cells_ = [f"`{label}`"]
        for model in MODELS:
            for p in protos:
                r = by_key.get((model, p, label))
                cells_.append("—" if r is None else fmt_acc(accuracies(r))
                              if r.runs else NOT_RUN)
            r = next((by_key[(model, p, label)] for p in protos
                      if (model, p, label) in by_key), None)
            pubs = published_for(r, pub) if r is not None else []
            cells_.append(" / ".join(f"{e['accuracy']:.2f}" for e in pubs) or "—")
        lines.append("| " + " | ".join(cells_) + " |")
    lines.append(END)
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    if BEGIN not in text or END not in text:
        raise ConfigError(f"README has no {BEGIN} ... {END} block for the results table")
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + block + text[stop:]


# ----------------------------------------------------------------------------- run summary


def run_summary(run_dirs: list[Path]) -> str:
    """Markdown: one row per run folder (rule, data, device, epochs, seed, accuracies, img/s),
    then per run the last logged per-layer alignment."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"
    rows = ["| run | rule | data | device | epochs | seed | train acc % | val acc % | "
            "test acc % | img/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    layers = []
    for d in run_dirs:
        recs = read_jsonl(d / "log.jsonl")
        if not any("device" in r for r in recs):
            continue
        run = Run(d / "log.jsonl", recs)
        f = run.final or (run.epochs[-1] if run.epochs else None)
        if f is None:
            continue
        info = run.info
        rows.append(f"| {d.name} | {run.config['rule']} | {info['data']} | {info['device']} | "
                    f"{f['epoch']}{'' if run.final else ' (running)'} | {info['seed']} | "
                    f"{pct(f.get('train_acc'))} | {pct(f.get('val_acc'))} | "
                    f"{pct(f.get('test_acc'))} | {f.get('images_per_s') or 0:.0f} |")
        if run.alignment:
            last = run.alignment[-1]
            a = last["alignment"]
            layers.append(f"\n**{d.name}** (step {last['step']}, epoch {last['epoch']}): "
                          "angles in degrees\n\n| layer | angle(B, W) | angle(rule grad, BP "
                          "grad) | sign concordance |\n|---|---|---|---|")
            for n in a.get("update_angle") or a.get("feedback_angle"):
                fa, ua = a.get("feedback_angle", {}).get(n), a.get("update_angle", {}).get(n)
                sc = a.get("sign_concordance", {}).get(n)
                layers.append(f"| {n} | {'-' if fa is None else f'{fa:.1f}'} | "
                              f"{'-' if ua is None else f'{ua:.1f}'} | "
                              f"{'-' if sc is None else f'{sc:.3f}'} |")
    return "\n".join(rows + layers) + "\n"


def runs_table(paths: list[Path]) -> str:
    """Markdown: one row per ``recipes.train`` run, from ``runs.jsonl`` files (the records of
    several runs, each tagged with its ``run`` name, as ``recipes/gpu_table.sh`` with a
    ``PLAN`` writes them) or run folders (their ``log.jsonl``; the folder names the run): rule
    and options, lr, feedback iterations, test accuracy and training loss per epoch (``nan``:
    the run diverged), images/s, and the per-layer update angle to BP at steps 100 and 200."""
    runs: dict[str, dict] = {}
    for path in paths:
        tagged = path.is_file()
        for r in read_jsonl(path if tagged else path / "log.jsonl"):
            run = runs.setdefault(r["run"] if tagged else path.name, {"epochs": [], "steps": []})
            if r.get("event") == "start":
                run["start"] = r
            elif r.get("event") == "epoch":
                run["epochs"].append(r)
            elif r.get("event") == "step":
                run["steps"].append(r)

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else "nan" if not math.isfinite(v) else format(v, fmt)
    rows = ["| run | rule, options | lr | feedback iters | test acc per epoch | train loss per "
            "epoch | img/s | update angle to BP, layers 1-5, at steps 100 / 200 |",
            "|---|---|---:|---|---|---|---:|---|"]
    for name, run in runs.items():
        if "start" not in run:
            continue
        cfg = run["start"]["config"]
        rule = cfg["rule"] + (f", {cfg['rule_options']}" if cfg["rule_options"] else "")
        if cfg["optimizer"] != "sgd":
            rule += f", {cfg['optimizer']}"
        if cfg["rule"] != "bp" and (cfg["feedback_options"].get("retarget") or
                                    "retarget=True" in run["start"].get("optimizer", "")):
            rule += ", retarget"
        iters = cfg["feedback_options"].get("feedback_iters") if cfg["rule"] != "bp" else "-"
        accs = " / ".join(num(None if e.get("test_acc") is None else 100 * e["test_acc"], ".2f")
                          for e in run["epochs"])
        losses = " / ".join(num(e["train_loss"], ".3f") for e in run["epochs"])
        ips = sum(e["images_per_s"] for e in run["epochs"]) / max(1, len(run["epochs"]))
        ang = []
        for st in run["steps"]:
            if st["step"] in (100, 200) and cfg["rule"] != "bp" and "alignment" in st:
                vals = list(st["alignment"]["update_angle"].values())[:5]
                ang.append(" ".join(num(v, ".0f") for v in vals))
        rows.append(f"| {name} | {rule} | {cfg['lr']} | {iters} | {accs} | {losses} | {ips:.0f} | "
                    f"{' / '.join(ang) or '-'} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- CLI


def build(results: Path, out: Path, readme: Path | None, figures: Path, *, write_figs: bool,
          table_path: Path = TABLE, published: Path = PUBLISHED,
          quality_path: Path | None = QUALITY) -> tuple[str, str | None]:
    """(RESULTS.md text, README.md text or None); figures written when ``write_figs``; the
    training-quality section from ``quality_path`` (None: none)."""
    table = load_table(table_path)
    quality = load_table(quality_path) if quality_path is not None else None
    rows = build_rows(load_runs(results), table, quality)
    pub, step_times = load_published(published), load_step_times(results)
    if write_figs:
        write_figures(_groups(rows), figures)
    text = render(rows, step_times, pub, table, out.parent, figures, quality,
                  quality_path or QUALITY)
    new_readme = None
    if readme is not None and readme.is_file():
        new_readme = replace_block(readme.read_text(), readme_block(rows, pub, table))
    return text, new_readme


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(REPO / "results"), help="folder of the logs")
    p.add_argument("--out", default=str(REPO / "RESULTS.md"), help="the table file")
    p.add_argument("--readme", default=str(REPO / "README.md"),
                   help=f"file whose {BEGIN} ... {END} block gets the headline table "
                        "('' for none)")
    p.add_argument("--figures", help="figure folder (default <results>/figures)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if --out or the README block is stale")
    p.add_argument("--no-figures", action="store_true", help="do not (re)draw the figures")
    p.add_argument("--table", default=str(TABLE), help="the table definition")
    p.add_argument("--published", default=str(PUBLISHED), help="published numbers")
    p.add_argument("--quality", default=str(QUALITY),
                   help="the training-quality track's definition ('' for no such section)")
    p.add_argument("--runs", nargs="+", metavar="RUN_DIR",
                   help="print a markdown summary of these run folders and exit")
    p.add_argument("--runs-table", nargs="+", metavar="PATH",
                   help="print one markdown row per recipes.train run of these runs.jsonl files "
                        "(recipes/gpu_table.sh with PLAN=...) or run folders, and exit")
    a = p.parse_args(argv)
    if a.runs_table:
        missing = [t for t in a.runs_table if not (Path(t).is_file()
                                                   or (Path(t) / "log.jsonl").is_file())]
        if missing:
            p.exit(2, f"error: --runs-table {' '.join(missing)}: neither a runs.jsonl file nor "
                      "a run folder with a log.jsonl\n")
        print(runs_table([Path(t) for t in a.runs_table]))
        return 0
    if a.runs:
        print(run_summary([Path(d) for d in a.runs if (Path(d) / "log.jsonl").is_file()]),
              end="")
        return 0
    results, out = Path(a.results), Path(a.out)
    readme = Path(a.readme) if a.readme else None
    figures = Path(a.figures) if a.figures else results / "figures"
    try:
        text, new_readme = build(results, out, readme, figures,
                                 write_figs=not (a.check or a.no_figures),
                                 table_path=Path(a.table), published=Path(a.published),
                                 quality_path=Path(a.quality) if a.quality else None)
    except ConfigError as e:
        p.exit(2, f"error: {e}\n")
    if a.check:
        stale = [str(path) for path, new in ((out, text), (readme, new_readme))
                 if new is not None and (not path.is_file() or path.read_text() != new)]
        if stale:
            print(f"stale: {', '.join(stale)}; run python -m recipes.report", file=sys.stderr)
            return 1
        print(f"{out} is up to date with the logs in {results}")
        return 0
    out.write_text(text)
    if new_readme is not None and new_readme != readme.read_text():
        readme.write_text(new_readme)
    print(f"wrote {out}" + (f" and the table in {readme}" if new_readme is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
