"""Train several rules on one model and print the comparison table.

    python -m recipes.benchmark                                  # the main job (configs/main.toml)
    python -m recipes.benchmark --config resnet20_biotorch_sgd --rules bp,fa --epochs 5
    python -m recipes.benchmark --config resnet20_biotorch_sgd --epochs 3 \
        --rules bp,hybrid=dfa --options 'hybrid={modules = ["layers.0"]}'

Every setting of ``recipes.train`` applies to all rules; ``--rules`` picks the variants
(default: the config's ``rules``), in the syntax of ``recipes.step_time``
(:mod:`recipes.variants`): ``RULE``, ``RULE@K`` (``K`` feedback iterations per step of a
target-propagation rule, in place of ``feedback_options``' ``feedback_iters``), ``LABEL=RULE``
or ``LABEL=RULE@K``; ``--options LABEL=TABLE`` (repeatable) adds options of ``localopt.wrap`` to
variant ``LABEL``'s (over the config's ``rule_options``), so that e.g. layer-wise and
module-wise DFA share one invocation, device and data copy.  The older ``--variants '{label =
{rule = ..., rule_options = {...}}}'`` is still read (deprecated; its ``rule_options`` replace
the config's).  ``--config ''`` runs the recipe defaults.  Runs go to
``<out_dir>/<name>/<label>/``; the table (``table.md``), a ``summary.json`` and one accuracy
figure for all variants (``curves.png``) go to ``<out_dir>/<name>/`` and, with
``--results DIR``, are copied to DIR with the runs' logs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from .common import Config, ConfigError, config_from_args, read_jsonl
from .data import PROTOCOLS, DataNotFoundError, load_cifar10
from .plots import plot_curves
from .train import build_parser, plot_title, train
from .variants import add_options_arg, parse_variants as parse_variants_list, \
    parse_variants_table


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def format_table(finals: list[dict[str, Any]]) -> str:
    f0 = finals[0]
    cfg = f0["config"]
    git = f0["git"]["commit"] or "no git"
    head = (f"{f0['data']}; {cfg['model']}, {cfg['optimizer']} lr {cfg['lr']:g}, batch "
            f"{cfg['batch_size']}, {f0['epoch']} epochs, seed {cfg['seed']}, protocol "
            f"'{cfg['protocol']}' ({PROTOCOLS[cfg['protocol']]}); {f0['device']}; "
            f"commit {git[:10]}")
    rows = ["| rule | epochs | train acc % | val acc % | best val % | test acc % | img/s "
            "| train time s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for f in finals:
        rows.append(f"| {f['rule']} | {f['epoch']} | {_pct(f['train_acc'])} | "
                    f"{_pct(f['val_acc'])} | {_pct(f['best_val_acc'])} | {_pct(f['test_acc'])} | "
                    f"{f['images_per_s']:.0f} | {f['train_time_s']:.0f} |")
    return head + "\n\n" + "\n".join(rows) + "\n"


def parse_variants(text: str) -> dict[str, dict[str, Any]]:
    """The deprecated ``--variants`` form, ``{label = {rule = "dfa", rule_options = {...}}}``
    -> label -> ``{"rule": ..., "rule_options": ...}``
    (:func:`recipes.variants.parse_variants_table`)."""
    return {v.label: {"rule": v.rule, "rule_options": v.options}
            for v in parse_variants_table(text)}


def run_configs(args: argparse.Namespace, cfg: Config, bench: str) -> list[tuple[str, Config]]:
    """Each variant's label and run config: ``--rules`` with ``--options`` (the config's
    ``rule_options`` updated by the variant's; ``@K`` sets ``feedback_iters``), or the
    deprecated ``--variants`` (its ``rule_options`` replace the config's)."""
    if args.variants:
        if args.options:
            raise ConfigError("--options goes with --rules LABEL=RULE, not with the deprecated "
                              "--variants")
        print("note: --variants is deprecated: use --rules LABEL=RULE with --options "
              "LABEL='{...}'", file=sys.stderr)
        variants, shared = parse_variants_table(args.variants), {}
    else:
        variants = parse_variants_list(cfg.rules, args.options, default_iters=None)
        shared = cfg.rule_options
    out = []
    for v in variants:
        fb = cfg.feedback_options if v.iters is None else {**cfg.feedback_options,
                                                           "feedback_iters": v.iters}
        out.append((v.label, dataclasses.replace(cfg, rule=v.rule, name=f"{bench}/{v.label}",
                                                 rule_options={**shared, **v.options},
                                                 feedback_options=fb)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__)
    parser.add_argument("--results", metavar="DIR",
                        help="also copy table, summary, figure and run logs to DIR")
    add_options_arg(parser)
    parser.add_argument("--variants", metavar="TOML", help="deprecated, instead of --rules: "
                        "{label = {rule = ..., rule_options = {...}}}")
    args = parser.parse_args(argv)
    if args.config is None:
        args.config = "main"
    try:
        cfg = config_from_args(args)
        bench = cfg.name or f"bench-{cfg.config_name or cfg.model}-s{cfg.seed}"
        runs = run_configs(args, cfg, bench)
        if not runs:
            raise ConfigError("--rules: give at least one rule, e.g. --rules bp,fa")
        arrays = load_cifar10(cfg.data or None, cfg.download)
        finals = []
        for label, rcfg in runs:
            resume = args.resume and (Path(cfg.out_dir) / bench / label / "checkpoint.pt").is_file()
            final = train(rcfg, resume=resume, overwrite=args.overwrite or args.resume,
                          arrays=arrays, progress=False if args.no_progress else None,
                          stop_after=args.stop_after)
            if final is None:  # --stop-after: the rest of this rule and the others come later
                print(f"stopped: continue with the same command and --resume", file=sys.stderr)
                return 0
            finals.append({**final, "rule": label})
    except (ConfigError, DataNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    out = Path(cfg.out_dir) / bench
    table = format_table(finals)
    (out / "table.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(finals, indent=1) + "\n")
    curves = {f["rule"]: [r for r in read_jsonl(Path(f["run_dir"]) / "log.jsonl")
                          if r.get("event") == "epoch"] for f in finals}
    plot_curves(curves, out / "curves.png", title=plot_title(finals[0]))
    print(table)
    if args.results:
        dest = Path(args.results)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("table.md", "summary.json", "curves.png"):
            shutil.copy(out / name, dest / name)
        for f in finals:
            shutil.copy(Path(f["run_dir"]) / "log.jsonl", dest / f"{f['rule']}.log.jsonl")
        print(f"results copied to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
