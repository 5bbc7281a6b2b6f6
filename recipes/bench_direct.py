"""Layer-wise vs module-wise DFA against BP: several variants of one rule in ONE process.

    python -m recipes.bench_direct --epochs 3                     # ResNet-20 (recipe defaults)
    python -m recipes.bench_direct --config resnet20_biotorch_adam --epochs 3 --seed 0

Like ``recipes.benchmark`` (same settings, same table), but a variant is a rule *with its
options*, so layer-wise ``dfa`` and module-wise (hybrid) DFA share one invocation, device and
data copy.  Default variants: ``bp``; ``dfa``; ``hybrid-stage`` = ``dfa`` with
``modules=["layers.0", "layers.3", "layers.6"]`` -- the first block of each ResNet-20 stage, so
the direct signal enters at each stage's input and each stage (the stem, stages 1-2, stage 3
with the classifier) trains by exact BP inside, from ``e`` alone (Han et al. 2020).
``--variants`` takes a TOML table ``{label = {rule = ..., rule_options = {...}}}``.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tomllib
from pathlib import Path

from .benchmark import format_table
from .common import ConfigError, config_from_args
from .data import DataNotFoundError, load_cifar10
from .train import build_parser, train

STAGES = ["layers.0", "layers.3", "layers.6"]
DEFAULT_VARIANTS = {"bp": {"rule": "bp"}, "dfa": {"rule": "dfa"},
                    "hybrid-stage": {"rule": "dfa", "rule_options": {"modules": STAGES}}}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__)
    parser.add_argument("--variants", help="TOML inline table of label = {rule, rule_options}")
    parser.add_argument("--results", metavar="DIR", help="also copy table, summary and logs")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        variants = (tomllib.loads(f"v = {args.variants}")["v"] if args.variants
                    else DEFAULT_VARIANTS)
        bench = cfg.name or f"direct-{cfg.config_name or cfg.model}-s{cfg.seed}"
        arrays = load_cifar10(cfg.data or None, cfg.download)
        finals = []
        for label, v in variants.items():
            rcfg = dataclasses.replace(cfg, rule=v["rule"], name=f"{bench}/{label}",
                                       rule_options=dict(v.get("rule_options", {})))
            final = train(rcfg, resume=False, overwrite=True, arrays=arrays,
                          progress=False if args.no_progress else None)
            finals.append({**final, "rule": label})
    except (ConfigError, DataNotFoundError, tomllib.TOMLDecodeError) as e:
        parser.exit(2, f"error: {e}\n")
    out = Path(cfg.out_dir) / bench
    table = format_table(finals)
    (out / "table.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(finals, indent=1) + "\n")
    print(table)
    if args.results:
        dest = Path(args.results)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("table.md", "summary.json"):
            shutil.copy(out / name, dest / name)
        for f in finals:
            shutil.copy(Path(f["run_dir"]) / "log.jsonl", dest / f"{f['rule']}.log.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
