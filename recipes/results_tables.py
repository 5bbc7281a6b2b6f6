"""The Markdown of ``recipes.report``: RESULTS.md (:func:`render`: per model and protocol the
table of every row, the per-layer alignment, the training-quality track), README.md's headline
table (:func:`readme_block`), and the summaries of run folders (:func:`run_summary`,
:func:`runs_table`)."""
from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any

from .common import load_config, read_jsonl
from .data import REPO
from .results_cells import (NOT_RUN, accuracies, cells, distinct, fmt_acc, last_alignment_record,
                            published_for, quality_cells, step_ratio)
from .results_load import Run, split_runs
from .results_rows import MODELS, Group, Row, by_group, figure_paths
from .table_runs import QUALITY

COLUMNS = ("rule", "test acc %", "at best val", "gap to bp", "epochs", "img/s", "ratio",
           "device", "data", "seeds", "published %")
HEADER = ("| rule | test acc % | test acc % at best val epoch | gap to bp (points) | epochs | "
          "img/s | step time / plain | device | data | seeds | published % (epochs, optimizer, "
          "source) |\n|---|---:|---:|---:|---:|---:|---:|---|---|---|---|")


def table_markdown(rows: list[Row], all_rows: list[Row], step_times, pub) -> str:
    """The table of one group: a line per row of ``rows`` (gaps to ``bp`` among
    ``all_rows``)."""
    lines = [HEADER]
    for row in rows:
        c = cells(row, all_rows, step_times, pub)
        lines.append("| " + " | ".join(c[k] for k in COLUMNS) + " |")
    return "\n".join(lines)


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
        step = f"step {distinct(steps)}" if len(set(steps)) == 1 else \
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


def _command_path(path: Path) -> str:
    """``path`` as a command run in the repository root names it."""
    path = Path(path).resolve()
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def render_quality(rows: list[Row], quality: dict[str, Any], quality_path: Path,
                   figure_links) -> list[str]:
    """Lines of the training-quality section: per protocol of ``quality`` and model, a
    paragraph (configs, epochs, seeds, the command) and the table of every row."""
    groups = {k: v for k, v in by_group(rows).items() if v[0].group.quality}
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
           "accuracy is not shown.  Gap: points to `bp` of the same protocol and data copy.  "
           "Step time / plain: "
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
    groups = by_group(rows)
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
    """The short headline table for README.md (its ``results`` block, markers aside): each
    table row's accuracy per protocol that has any run (RESULTS.md lists the others); a row
    with a diverged seed says which."""
    by_key = {(r.group.model, r.group.key, r.variant): r for r in rows
              if r.group.table and not r.group.quality}
    protos = [p for p in table["protocols"]
              if any(k[1] == p and (r.runs or r.diverged) for k, r in by_key.items())]
    head = ["rule"]
    for model, title in MODELS.items():
        head += [f"{title}, {p}" for p in protos] + [f"{title}, published"]
    lines = ["Test accuracy (%) on CIFAR-10 of each rule in the table protocols run so far "
             "(mean over seeds); generated by `python -m recipes.report` from the logs -- "
             "gaps, spreads, speed, devices, the protocols not run yet and the short runs: "
             "[RESULTS.md](RESULTS.md).",
             "",
             "| " + " | ".join(head) + " |",
             "|---|" + "---:|" * (len(head) - 1)]

    def cell(r: Row | None) -> str:
        if r is None:
            return "—"
        if not r.runs:
            return "diverged" if r.diverged else NOT_RUN
        seeds = ", ".join(str(d.info["seed"]) for d in r.diverged)
        return fmt_acc(accuracies(r)) + (f"; seed {seeds} diverged" if seeds else "")

    for label in table["rows"]:
        cells_ = [f"`{label}`"]
        for model in MODELS:
            for p in protos:
                cells_.append(cell(by_key.get((model, p, label))))
            r = next((by_key[(model, p, label)] for p in protos
                      if (model, p, label) in by_key), None)
            pubs = published_for(r, pub) if r is not None else []
            cells_.append(" / ".join(f"{e['accuracy']:.2f}" for e in pubs) or "—")
        lines.append("| " + " | ".join(cells_) + " |")
    return "\n".join(lines)


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
    records: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        found = (split_runs(read_jsonl(path)) if path.is_file()
                 else {path.name: read_jsonl(path / "log.jsonl")})
        for name, recs in found.items():
            records.setdefault(name, []).extend(recs)
    runs = {name: {"start": next((r for r in reversed(recs) if r.get("event") == "start"), None),
                   "epochs": [r for r in recs if r.get("event") == "epoch"],
                   "steps": [r for r in recs if r.get("event") == "step"]}
            for name, recs in records.items()}

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else "nan" if not math.isfinite(v) else format(v, fmt)
    rows = ["| run | rule, options | lr | feedback iters | test acc per epoch | train loss per "
            "epoch | img/s | update angle to BP, layers 1-5, at steps 100 / 200 |",
            "|---|---|---:|---|---|---|---:|---|"]
    for name, run in runs.items():
        if run["start"] is None:
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
