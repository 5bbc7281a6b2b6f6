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
accuracy curves of every row (first seed; :func:`recipes.plots.plot_accuracy_curves`) and,
where the runs logged alignment (``--diagnostics-every``), the per-layer angle between each
rule's weight update and backprop's gradient at the end of training (mean of the last records;
:func:`recipes.plots.plot_alignment_summary`).
README.md's table between ``<!-- results:begin -->`` and ``<!-- results:end -->`` (the table
proper only) is rewritten too.

The pieces: ``recipes.results_load`` reads the logs, ``recipes.results_rows`` sorts the runs
into rows, ``recipes.results_cells`` and ``recipes.results_tables`` write the Markdown,
``recipes.plots`` draws the figures, ``recipes.markdown`` replaces README's block.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import ConfigError
from .data import REPO
from .markdown import markers, replace_block
from .results_cells import NOT_RUN
from .results_load import PUBLISHED, Run, load_published, load_runs, load_step_times
from .results_rows import MODELS, Group, Row, build_rows, by_group, classify, figure_paths
from .results_tables import (COLUMNS, QUALITY_COLUMNS, layer_alignment_markdown,
                             quality_markdown, readme_block, render, run_summary, runs_table,
                             table_markdown)
from .table_runs import QUALITY, RESULTS, TABLE, load_table

__all__ = ["build", "main", "write_figures", "BEGIN", "END", "README_BLOCK",
           # re-exported from the modules that make the report
           "PUBLISHED", "QUALITY", "TABLE", "MODELS", "NOT_RUN", "COLUMNS", "QUALITY_COLUMNS",
           "Run", "Group", "Row", "load_runs", "load_published", "load_step_times", "classify",
           "build_rows", "render", "readme_block", "table_markdown", "quality_markdown",
           "layer_alignment_markdown", "run_summary", "runs_table"]

#: README.md's block that gets the headline table
README_BLOCK = "results"
BEGIN, END = markers(README_BLOCK)


def write_figures(rows: list[Row], figures: Path) -> None:
    """Per group with finished runs, its accuracy curves and (where its runs logged
    alignment) per-layer alignment, each row drawn from its first run."""
    from .plots import plot_accuracy_curves, plot_alignment_summary
    for grows in by_group(rows).values():
        g = grows[0].group
        done = [r for r in grows if r.runs]
        if not done:
            continue
        paths = figure_paths(g, figures)
        title = f"{MODELS[g.model]} - {g.label}"
        plot_accuracy_curves([(r.variant, r.runs[0].epochs, r.runs[0].final) for r in done],
                             paths["curves"], title)
        plot_alignment_summary([(r.variant, r.runs[0].alignment) for r in done],
                               paths["alignment"], title)


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
        write_figures(rows, figures)
    text = render(rows, step_times, pub, table, out.parent, figures, quality,
                  quality_path or QUALITY)
    new_readme = None
    if readme is not None and readme.is_file():
        new_readme = replace_block(readme, README_BLOCK, readme_block(rows, pub, table),
                                   write=False)
    return text, new_readme


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS), help="folder of the logs")
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
