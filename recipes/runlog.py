"""A run's metrics for the tools people already use: ``summary.csv`` and TensorBoard.

Both are written from the run's ``log.jsonl`` (the one record of a run), after every epoch, by
:func:`write_summaries`; they are rewritten whole each time, so a resumed run's files hold
exactly the epochs of its log.

* ``summary.csv``: one row per epoch (as timm's ``summary.csv``): ``epoch``, ``step``, ``lr``,
  train/val/test loss and accuracy, epoch time, images/s.  Empty cells where the run has no
  value (no validation set, test only after the last epoch).
* ``tensorboard/``: when the ``tensorboard`` package is installed (``pip install
  localopt[tensorboard]``), one event file with the scalars ``loss/{train,val,test}``,
  ``accuracy/{train,val,test}``, ``lr``, ``images_per_s``, and, for runs with
  ``--diagnostics-every N``, each layer's alignment: ``feedback_angle/<layer>`` (angle of B
  and W, degrees), ``update_angle/<layer>`` (rule vs backprop weight gradient),
  ``norm_ratio/<layer>`` and ``sign_concordance/<layer>``.  The x axis is the training step.
  ``tensorboard --logdir runs`` shows every run side by side.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any, Iterable

__all__ = ["SUMMARY_COLUMNS", "write_summaries", "write_summary_csv", "write_tensorboard",
           "tensorboard_available"]

#: the columns of ``summary.csv``, in order (keys of the log's ``epoch`` records)
SUMMARY_COLUMNS = ("epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                   "test_loss", "test_acc", "epoch_time_s", "images_per_s")
#: epoch-record keys written to TensorBoard, with their tags
EPOCH_SCALARS = {"train_loss": "loss/train", "val_loss": "loss/val", "test_loss": "loss/test",
                 "train_acc": "accuracy/train", "val_acc": "accuracy/val",
                 "test_acc": "accuracy/test", "lr": "lr", "images_per_s": "images_per_s"}
#: the per-layer alignment diagnostics of ``step`` records (``recipes.alignment``)
ALIGNMENT_KEYS = ("feedback_angle", "update_angle", "norm_ratio", "sign_concordance")


def _read(log: Path) -> list[dict[str, Any]]:
    with open(log) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_summary_csv(records: Iterable[dict[str, Any]], path: Path | str) -> Path:
    """``path`` with one row per ``epoch`` record (columns :data:`SUMMARY_COLUMNS`)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(SUMMARY_COLUMNS)
        for r in records:
            if r.get("event") == "epoch":
                w.writerow(["" if r.get(k) is None else r[k] for k in SUMMARY_COLUMNS])
    tmp.replace(path)
    return path


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package (which torch's ``SummaryWriter`` needs) is there."""
    return importlib.util.find_spec("tensorboard") is not None


def write_tensorboard(records: Iterable[dict[str, Any]], folder: Path | str) -> Path | None:
    """Rewrite ``folder`` as one TensorBoard event file with the run's scalars (see the module
    docstring); ``None`` (nothing written) when ``tensorboard`` is not installed."""
    if not tensorboard_available():
        return None
    from torch.utils.tensorboard import SummaryWriter
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    with SummaryWriter(log_dir=str(folder)) as w:
        for r in records:
            step = r.get("step")
            if step is None:
                continue
            if r.get("event") == "epoch":
                for key, tag in EPOCH_SCALARS.items():
                    if r.get(key) is not None:
                        w.add_scalar(tag, r[key], step)
            for key in ALIGNMENT_KEYS:
                for layer, value in ((r.get("alignment") or {}).get(key) or {}).items():
                    if value is not None:
                        w.add_scalar(f"{key}/{layer or '(model)'}", value, step)
    return folder


def write_summaries(run_dir: Path | str) -> dict[str, Path | None]:
    """``run_dir/summary.csv`` and (when TensorBoard is installed) ``run_dir/tensorboard/``
    from ``run_dir/log.jsonl``; called by the training recipe after every epoch."""
    run_dir = Path(run_dir)
    records = _read(run_dir / "log.jsonl")
    return {"summary.csv": write_summary_csv(records, run_dir / "summary.csv"),
            "tensorboard": write_tensorboard(records, run_dir / "tensorboard")}
