"""Reading the logs of ``recipes.report``: the ``recipes.train`` runs (:class:`Run`, one per run
of a ``log.jsonl`` or a ``runs.jsonl``), the ``recipes.step_time`` measurements and the
published numbers (``recipes/published.toml``)."""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from pathlib import Path
from typing import Any

from .common import ConfigError, read_jsonl
from .divergence import diverged

__all__ = ["PUBLISHED", "Run", "load_runs", "split_runs", "load_published", "load_step_times"]

PUBLISHED = Path(__file__).resolve().parent / "published.toml"


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
        for recs_ in split_runs(recs).values():
            if any("config" in r for r in recs_) and any("device" in r for r in recs_):
                runs.append(Run(path, recs_))
    return runs


def split_runs(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The ``recipes.train`` records of each run in a log, by run name: a record's ``run``
    field names its run (a ``runs.jsonl`` of several runs), a record without one (step records)
    belongs to the run before it; a suite's ``{"final": ..., "epochs": [...]}`` record is a run
    of its own, named by its position."""
    by_run: dict[str, list[dict[str, Any]]] = {}
    current = None
    for r in records:
        if isinstance(r.get("final"), dict) and "config" in r["final"]:
            by_run[f"{len(by_run)}"] = [*r.get("epochs", []), r["final"]]
        elif r.get("event") in ("start", "epoch", "step", "resume", "final"):
            current = str(r["run"]) if "run" in r else current
            by_run.setdefault(current, []).append(r)
    return by_run


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

