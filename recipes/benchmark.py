"""Train several rules on one model and print the comparison table.

    python -m recipes.benchmark                                  # the main job (configs/main.toml)
    python -m recipes.benchmark --config resnet20_biotorch_sgd --rules bp,fa --epochs 5
    python -m recipes.benchmark --config resnet20_biotorch_sgd --epochs 3 --variants \
        '{bp = {rule = "bp"}, hybrid = {rule = "dfa", rule_options = {modules = ["layers.0"]}}}'

Every setting of ``recipes.train`` applies to all rules; ``--rules`` picks them (default: the
config's ``rules``).  ``--variants`` instead names each run and gives it a rule *with its
options* (a TOML inline table ``{label = {rule = ..., rule_options = {...}}}``), so that e.g.
layer-wise and module-wise DFA share one invocation, device and data copy; ``--config ''``
runs the recipe defaults.  Runs go to ``<out_dir>/<name>/<rule>/``; the table (``table.md``), a
``summary.json`` and one accuracy figure for all rules (``curves.png``) go to
``<out_dir>/<name>/`` and, with ``--results DIR``, are copied to DIR with the runs' logs.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

from .common import ConfigError, config_from_args, read_jsonl
from .data import PROTOCOLS, DataNotFoundError, load_cifar10
from .plots import plot_curves
from .train import build_parser, plot_title, train


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
    """``--variants``: ``{label = {rule = "dfa", rule_options = {...}}}`` -> label -> variant."""
    try:
        raw = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--variants: {e}") from None
    out = {}
    for label, v in raw.items():
        if not isinstance(v, dict) or "rule" not in v or set(v) - {"rule", "rule_options"}:
            raise ConfigError(f"--variants: {label} = {v!r} should be {{rule = \"...\"}} with "
                              "optional rule_options = {...}")
        out[label] = {"rule": v["rule"], "rule_options": v.get("rule_options", {})}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__)
    parser.add_argument("--results", metavar="DIR",
                        help="also copy table, summary, figure and run logs to DIR")
    parser.add_argument("--variants", metavar="TOML",
                        help="instead of --rules: {label = {rule = ..., rule_options = {...}}}")
    args = parser.parse_args(argv)
    if args.config is None:
        args.config = "main"
    try:
        cfg = config_from_args(args)
        variants = parse_variants(args.variants) if args.variants else {
            rule: {"rule": rule, "rule_options": cfg.rule_options} for rule in cfg.rules}
        if not variants:
            raise ConfigError("--rules: give at least one rule, e.g. --rules bp,fa")
        bench = cfg.name or f"bench-{cfg.config_name or cfg.model}-s{cfg.seed}"
        arrays = load_cifar10(cfg.data or None, cfg.download)
        finals = []
        for label, v in variants.items():
            rcfg = dataclasses.replace(cfg, rule=v["rule"], name=f"{bench}/{label}",
                                       rule_options=dict(v["rule_options"]))
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
