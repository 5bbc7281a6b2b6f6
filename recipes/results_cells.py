"""The cells of ``recipes.report``'s tables: one row's accuracy (mean ± spread over seeds, or
why it has none), gap to ``bp``, step-time ratio, published numbers, alignment, optimizer and
options, each formatted as RESULTS.md shows it."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .results_load import Run
from .results_rows import (OPTIMIZER_KEYS, Row, changed_from, config_file_values, fmt_value,
                           protocol_settings, training_settings)

NOT_RUN = "not run"


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
        want = protocol_settings(row.settings)
        return next((r for r in same
                     if r.rule == "bp" and protocol_settings(r.settings) == want), None)
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
    the most rules (not when that file timed the rule with other options than the row's); a
    row with options or its own optimizer (``fa-best``, ``dfa-stage``) from
    a file that timed it by its label with the same rule, options and optimizer."""
    device = row.group.device
    if row.runs:
        device = "cuda" if any(r.info["device"].startswith("cuda") for r in row.runs) else "cpu"
    for st in step_times:
        if st["model"] != row.group.model or st["device"] != device:
            continue
        timed = st["variants"].get(row.rule)      # a plain rule timed with other options
        if row.plain and row.rule in st["ratios"] and (
                timed is None or timed.get("options", {}) ==
                (row.settings or {}).get("rule_options", {})):
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


def distinct(values) -> str:
    """The values' distinct texts, in their first order, comma-separated."""
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
    """Every cell of a row, by column name (``recipes.results_tables.COLUMNS``)."""
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
    out["epochs"] = distinct(f["epoch"] for f in finals)
    out["img/s"] = f"{statistics.fmean(f['images_per_s'] for f in finals):.0f}"
    out["device"] = distinct(f["device"] for f in finals)
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


def _row_changes(row: Row) -> dict[str, Any]:
    """The training settings a row of a definition file changes from its config file (rule
    options and the optimizer and its lr aside: those have their own cells)."""
    ref = training_settings(config_file_values(row.group.config))
    return {k: changed_from(v, ref.get(k)) for k, v in row.settings.items()
            if ref.get(k) != v and k not in ("rule", "rule_options", "optimizer", "lr")}


def fmt_optimizer(row: Row) -> str:
    """The optimizer, its lr and the optimizer settings the row changes."""
    if not row.settings:
        return "—"
    extra = {k: v for k, v in _row_changes(row).items() if k in OPTIMIZER_KEYS}
    return (f"{row.settings['optimizer']}, lr {float(row.settings['lr']):.3g}"
            + "".join(f", {k} {fmt_value(v)}" for k, v in extra.items()))


def fmt_options(row: Row) -> str:
    """The rule options, then any other setting the row changes (model options, ...)."""
    opts = {k: v for k, v in row.settings.get("rule_options", {}).items() if k != "seed"}
    other = {k: v for k, v in _row_changes(row).items() if k not in OPTIMIZER_KEYS}
    parts = ([fmt_value(opts)] if opts else []) + [f"{k} {fmt_value(v)}"
                                                   for k, v in other.items()]
    return "; ".join(parts) or "—"


def quality_cells(row: Row, rows: list[Row]) -> dict[str, str]:
    """Every cell of a row of the training-quality track, by column name
    (``recipes.results_tables.QUALITY_COLUMNS``)."""
    angle, ratio = alignment_cells(row)
    label = f"`{row.variant}`"
    if row.shared:
        label += f" (= table `{row.shared.replace('/', '` `')}`)"
    return {"row": label, "rule": row.rule, "optimizer": fmt_optimizer(row),
            "rule options": fmt_options(row),
            "test acc %": fmt_acc(accuracies(row)) if row.runs else state_cell(row),
            "gap to bp": fmt_gap(row, rows), "update angle": angle, "norm ratio": ratio}
