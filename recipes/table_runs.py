"""Run every missing training run of the CIFAR-10 table (``recipes/table.toml``), one at a time.

    python -m recipes.table_runs --protocol cpu --list                # what is done, what is not
    python -m recipes.table_runs --protocol cpu                       # run what is missing
    python -m recipes.table_runs --protocol cpu --rules bp,fa --seeds 0,1 --models mlp3x1024
    python -m recipes.table_runs --protocol cpu --resume --stop-after 5   # in chunks: up to
                      # epoch 5 of the next unfinished run, then stop; later --stop-after 10 ...
    python -m recipes.report                                          # RESULTS.md from the logs

A run is one ``recipes.train`` run of a row of the table (a rule with its settings, see
``recipes/table.toml``) on one model with one seed, under the protocol's config
(``recipes/configs/<mlp|resnet20>_<protocol>.toml``).  Runs go to ``<out-dir>/table-<protocol>/
<model>/<row>-s<seed>/`` (checkpoint after every epoch; ``--resume`` continues one exactly);
when a run has finished, its ``log.jsonl`` and figures are copied to
``<results>/<model>/<protocol>/<row>-s<seed>/``, the folder ``recipes.report`` reads, and a run
whose copy is there is done.  One process trains one run at a time (the CIFAR-10 arrays are
loaded once), so on a shared machine it can run in the background (``nohup ... &``) and be
stopped and resumed at any epoch boundary.

``--only MODEL/ROW/sSEED`` runs one run; ``--missing`` prints the ids of the runs not done yet
(``recipes/gpu_table.sh`` starts one process per id, in parallel, and ``--collect`` copies the
finished runs to the results folder afterwards).

Every run's config is the protocol's config file with the row's settings; the settings flags
of ``recipes.train`` (``--device cuda``, ``--threads 1``, ``--out-dir DIR``, ``--epochs 1``,
...; not those the table sets: model, rule, rule options, seed, and ``protocol``, which here
names the table's protocol) and ``--settings '{epochs = 1, val_size = 20}'`` (a TOML inline
table of config keys) override it for every run.  Machine and output settings (device, threads,
data, out_dir, ...) leave the table's runs as they are; any other changes what is trained
(smoke tests), so then ``--results`` must be given, and such runs never land in the committed
results.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

from .common import (FIELDS, ConfigError, Config, add_config_args, config_overrides, flag,
                     load_config, read_jsonl, resolve_config_path)
from .data import REPO, DataNotFoundError, load_cifar10
from .train import train

TABLE = Path(__file__).resolve().parent / "table.toml"
#: where finished runs are collected, the folder ``recipes.report`` reads
RESULTS = REPO / "results"
#: the training-quality track: variants of fa and dfa beside bp, in the table's format
QUALITY = Path(__file__).resolve().parent / "quality.toml"
#: config keys a row's ``base`` config contributes: the rule's training settings; the protocol
#: keeps everything else (model, epochs, schedule, batch, augmentation, split, seed)
TRAINING_KEYS = ("optimizer", "lr", "momentum", "nesterov", "weight_decay", "betas", "eps",
                 "alpha", "aux_lr", "loss", "rule_options", "feedback_options")
#: files of a finished run that are copied to the results folder
RESULT_FILES = ("log.jsonl", "curves.png", "alignment.png")
#: config keys that leave what is trained as it is (machine, outputs): settings of every run
#: that the committed results folder accepts
MACHINE_KEYS = ("data", "download", "device", "threads", "channels_last", "compile", "out_dir",
                "log_every", "diagnostics_every", "eval_batch_size", "test_every_epoch")
#: config keys with a flag here: all but those the table sets per run, ``ddp`` (a run is one
#: process), and ``protocol`` (``--protocol`` is the table's)
SETTINGS = tuple(k for k in FIELDS if k not in ("name", "config_name", "reference", "rules",
                                                "model", "rule", "rule_options", "seed", "ddp",
                                                "protocol"))


@dataclasses.dataclass(frozen=True)
class Item:
    """One run of the table: a row (rule with settings) on a model with a seed."""
    model: str
    row: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.model}/{self.row}/s{self.seed}"

    @classmethod
    def parse(cls, text: str) -> "Item":
        try:
            model, row, seed = text.split("/")
            if not seed.startswith("s"):
                raise ValueError
            return cls(model, row, int(seed[1:]))
        except ValueError:
            raise ConfigError(f"--only {text!r}: write MODEL/ROW/sSEED, e.g. "
                              "resnet20/dfa/s0") from None


def load_table(path: Path | str = TABLE) -> dict[str, Any]:
    with open(path, "rb") as fh:
        table = tomllib.load(fh)
    for label, row in table["rows"].items():
        unknown = set(row) - {"rule", "models", "rule_options", "base", "settings"}
        if unknown or "rule" not in row:
            raise ConfigError(f"{path}: [rows.{label}] needs 'rule' and may set models, "
                              f"rule_options, base, settings; got {sorted(row)}")
    return table


def protocol_configs(table: dict[str, Any], protocol: str) -> dict[str, str]:
    """``{model: config name}`` of a protocol."""
    if protocol not in table["protocols"]:
        raise ConfigError(f"--protocol {protocol!r}: choose one of "
                          f"{', '.join(table['protocols'])}")
    return dict(table["protocols"][protocol]["configs"])


def rows_for(table: dict[str, Any], model: str) -> list[str]:
    """The row labels the table has for ``model``, in table order."""
    return [label for label, row in table["rows"].items()
            if model in row.get("models", [model])]


def items(table: dict[str, Any], protocol: str, models: list[str] | None = None,
          rows: list[str] | None = None, seeds: list[int] | None = None) -> list[Item]:
    """Every run of the protocol (restricted to ``models``/``rows``/``seeds`` when given),
    models in table order, then rows, then seeds."""
    configs = protocol_configs(table, protocol)
    for name, allowed, what in ((models, configs, "--models"), (rows, table["rows"], "--rules")):
        bad = [m for m in name or [] if m not in allowed]
        if bad:
            raise ConfigError(f"{what} {','.join(bad)}: the table has {', '.join(allowed)}")
    seeds = seeds if seeds is not None else list(table["protocols"][protocol]["seeds"])
    return [Item(model, row, seed) for model in configs if not models or model in models
            for row in rows_for(table, model) if not rows or row in rows for seed in seeds]


def item_config(table: dict[str, Any], protocol: str, item: Item, out_dir: str = "runs",
                settings: dict[str, Any] | None = None) -> Config:
    """The :class:`Config` of one run: the protocol's config, the row's ``base`` training
    settings, rule, rule options and per-model settings, the seed, then ``settings``."""
    row = table["rows"].get(item.row)
    if row is None or item.model not in row.get("models", [item.model]):
        raise ConfigError(f"{item.id}: the table has no row {item.row!r} for {item.model}")
    config = protocol_configs(table, protocol).get(item.model)
    if config is None:
        raise ConfigError(f"{item.id}: protocol {protocol!r} has no model {item.model!r}")
    values: dict[str, Any] = {}
    if "base" in row:
        with open(resolve_config_path(row["base"]), "rb") as fh:
            base = tomllib.load(fh)
        values.update({k: v for k, v in base.items() if k in TRAINING_KEYS})
    values["rule"] = row["rule"]
    if "rule_options" in row:
        values["rule_options"] = {**values.get("rule_options", {}), **row["rule_options"]}
    values.update(row.get("settings", {}).get(item.model, {}))
    values.update(seed=item.seed, out_dir=out_dir,
                  name=f"table-{protocol}/{item.model}/{item.row}-s{item.seed}")
    values.update(settings or {})
    return load_config(config, **values)


def result_dir(results: Path | str, protocol: str, item: Item) -> Path:
    return Path(results) / item.model / protocol / f"{item.row}-s{item.seed}"


def finished(log: Path) -> bool:
    return any(r.get("event") == "final" for r in read_jsonl(log))


def status(cfg: Config, dest: Path) -> str:
    """``done``, ``partial (epoch k/N)`` or ``missing``."""
    if finished(dest / "log.jsonl"):
        return "done"
    epochs = [r for r in read_jsonl(Path(cfg.out_dir) / cfg.run_name() / "log.jsonl")
              if r.get("event") == "epoch"]
    if epochs:
        return f"partial (epoch {epochs[-1]['epoch']}/{cfg.epochs})"
    return "missing"


def collect(cfg: Config, dest: Path) -> bool:
    """Copy a finished run's log and figures to ``dest``; False if it has not finished."""
    run_dir = Path(cfg.out_dir) / cfg.run_name()
    if not finished(run_dir / "log.jsonl"):
        return False
    dest.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, dest / name)
    return True


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", required=True, help="a [protocols.*] of recipes/table.toml")
    p.add_argument("--models", help="comma-separated (default: every model of the protocol)")
    p.add_argument("--rules", help="comma-separated row labels (default: every row)")
    p.add_argument("--seeds", help="comma-separated (default: the protocol's seeds)")
    p.add_argument("--only", metavar="MODEL/ROW/sSEED", help="run this one run")
    p.add_argument("--resume", action="store_true",
                   help="continue runs that stopped, from their last checkpoint")
    p.add_argument("--stop-after", type=int, metavar="EPOCH",
                   help="stop the run in progress after this epoch and exit (--resume goes on)")
    p.add_argument("--list", action="store_true", help="print each run's status and exit")
    p.add_argument("--missing", action="store_true",
                   help="print the ids of the runs not done yet, one a line, and exit")
    p.add_argument("--collect", action="store_true",
                   help="copy the runs that have finished to the results folder and exit")
    p.add_argument("--results", help=f"results folder (default {RESULTS})")
    p.add_argument("--settings", help="TOML inline table of config keys for every run, e.g. "
                   "'{epochs = 1, data = \"/tmp/tiny.tar.gz\"}' (settings other than the "
                   f"machine's and the outputs' -- {', '.join(MACHINE_KEYS)} -- need --results)")
    p.add_argument("--table", default=str(TABLE), help="the table definition")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(p, SETTINGS, config=False)
    return p


def plan(args: argparse.Namespace) -> tuple[Path, dict[Item, Config]]:
    """The results folder and the config of each selected run: the protocol's config file,
    the row's settings, then ``--settings``, then the settings flags.  Raises
    :class:`ConfigError` for settings that change what is trained without ``--results``."""
    table = load_table(args.table)
    try:
        settings = tomllib.loads(f"v = {args.settings}")["v"] if args.settings else {}
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--settings {args.settings!r}: {e}") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"--settings {args.settings!r}: write a TOML inline table, e.g. "
                          "'{epochs = 1}'")
    settings.update(config_overrides(args, SETTINGS))
    changed = [k for k in settings if k not in MACHINE_KEYS]
    if changed and args.results is None:
        raise ConfigError(f"{', '.join(flag(k) for k in changed)} (--settings or flags) "
                          "change what the table's runs train: give --results (not the "
                          "committed results folder)")
    todo = ([Item.parse(args.only)] if args.only else
            items(table, args.protocol, _csv(args.models), _csv(args.rules),
                  [int(s) for s in _csv(args.seeds)] if args.seeds else None))
    return (Path(args.results) if args.results else RESULTS,
            {it: item_config(table, args.protocol, it, settings=settings) for it in todo})


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        results, cfgs = plan(a)
    except (ConfigError, tomllib.TOMLDecodeError) as e:
        p.exit(2, f"error: {e}\n")
    todo = list(cfgs)
    dests = {it: result_dir(results, a.protocol, it) for it in todo}
    if a.list:
        width = max((len(it.id) for it in todo), default=0)
        for it in todo:
            print(f"{it.id:<{width}}  {status(cfgs[it], dests[it]):<22} {dests[it]}")
        return 0
    if a.missing:
        for it in todo:
            if status(cfgs[it], dests[it]) != "done":
                print(it.id)
        return 0
    if a.collect:
        got = [it.id for it in todo if status(cfgs[it], dests[it]) != "done"
               and collect(cfgs[it], dests[it])]
        print(f"collected {len(got)} finished run(s) into {results}: {', '.join(got) or '-'}")
        return 0
    arrays = None
    for it in todo:
        cfg, dest = cfgs[it], dests[it]
        state = status(cfg, dest)
        if state == "done":
            continue
        ckpt = Path(cfg.out_dir) / cfg.run_name() / "checkpoint.pt"
        if state.startswith("partial") and ckpt.is_file() and not a.resume:
            p.exit(2, f"error: {it.id} is {state} in {ckpt.parent}: pass --resume to continue "
                      "it\n")
        try:
            if arrays is None:
                arrays = load_cifar10(cfg.data or None, cfg.download)
            final = train(cfg, resume=ckpt.is_file(), overwrite=not ckpt.is_file(),
                          arrays=arrays, progress=False if a.no_progress else None,
                          stop_after=a.stop_after)
        except (ConfigError, DataNotFoundError) as e:
            p.exit(2, f"error: {it.id}: {e}\n")
        if final is None:
            print(f"{it.id}: stopped after epoch {a.stop_after}; the same command with "
                  "--resume continues it", file=sys.stderr)
            return 0
        collect(cfg, dest)
        shown = ("DIVERGED (no result)" if final.get("diverged")
                 else f"test acc {100 * final['test_acc']:.2f}%")
        print(f"{it.id}: {shown} -> {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
