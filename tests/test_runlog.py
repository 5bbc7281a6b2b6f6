"""Every training run also writes ``summary.csv`` (one row per epoch) and, with tensorboard
installed, TensorBoard scalars (losses, accuracies, lr, per-layer alignment angles)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from localopt.recipes import runlog, train
from localopt.recipes.synthetic import synthetic_arrays, write_imagefolder

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_data_env")


def _epoch(epoch: int, **kw) -> dict:
    rec = {"event": "epoch", "epoch": epoch, "step": 10 * epoch, "lr": 0.1 / epoch,
           "train_loss": 2.0 / epoch, "train_acc": 0.2 * epoch, "val_loss": None,
           "val_acc": None, "test_loss": None, "test_acc": None, "epoch_time_s": 1.5,
           "images_per_s": 100.0, "config": {"rule": "fa"}}
    rec.update(kw)
    return rec


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    (events,) = folder.glob("events.out.tfevents.*")     # one file: rewritten, not appended
    acc = EventAccumulator(str(events))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_summary_csv_has_one_row_per_epoch(tmp_path):
    records = [{"event": "start", "epoch": 0}, _epoch(1),
               {"event": "step", "epoch": 1, "step": 5, "alignment": {}},
               _epoch(2, test_loss=1.25, test_acc=0.5), {"event": "final", "epoch": 2}]
    path = runlog.write_summary_csv(records, tmp_path / "summary.csv")
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == list(runlog.SUMMARY_COLUMNS)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[0]["test_acc"] == "" and float(rows[1]["test_acc"]) == 0.5
    assert float(rows[1]["lr"]) == 0.05 and float(rows[0]["train_loss"]) == 2.0


def test_tensorboard_scalars_with_alignment(tmp_path):
    pytest.importorskip("tensorboard")
    align = {"feedback_angle": {"0": 80.0, "2": 85.0}, "update_angle": {"0": 60.0},
             "norm_ratio": {"0": 0.5}, "sign_concordance": {"0": 0.55}}
    records = [_epoch(1), {"event": "step", "epoch": 2, "step": 15, "alignment": align},
               _epoch(2, test_acc=0.5, test_loss=1.0)]
    folder = tmp_path / "tb"
    (folder / "stale").mkdir(parents=True)                # rewritten whole
    assert runlog.write_tensorboard(records, folder) == folder
    s = _scalars(folder)
    assert s["loss/train"] == [(10, 2.0), (20, 1.0)]
    assert s["accuracy/test"] == [(20, 0.5)] and "accuracy/val" not in s
    assert [v for _, v in s["lr"]] == pytest.approx([0.1, 0.05])
    assert s["feedback_angle/0"] == [(15, 80.0)] and s["feedback_angle/2"] == [(15, 85.0)]
    assert s["update_angle/0"] == [(15, 60.0)] and s["norm_ratio/0"] == [(15, 0.5)]
    assert not (folder / "stale").exists()


def test_without_tensorboard_only_the_csv(tmp_path, monkeypatch):
    monkeypatch.setattr(runlog, "tensorboard_available", lambda: False)
    (tmp_path / "log.jsonl").write_text(json.dumps(_epoch(1)) + "\n")
    out = runlog.write_summaries(tmp_path)
    assert out["tensorboard"] is None and not (tmp_path / "tensorboard").exists()
    assert (tmp_path / "summary.csv").is_file()


def test_a_training_run_writes_both(tmp_path):
    """recipes.train calls the writer after every epoch; a resumed run's files match its log."""
    data = write_imagefolder(tmp_path / "tiny.tar.gz", synthetic_arrays(n_train=40, n_test=16))
    args = ["--data", str(data), "--out-dir", str(tmp_path / "runs"), "--val-size", "8",
            "--batch-size", "8", "--eval-batch-size", "16", "--threads", "1", "--no-progress",
            "--model", "mlp3x1024", "--rule", "fa", "--epochs", "2", "--optimizer", "sgd",
            "--lr", "0.01", "--diagnostics-every", "2", "--name", "run"]
    assert train.main([*args, "--stop-after", "1"]) == 0
    run = tmp_path / "runs" / "run"
    assert len(list(csv.DictReader(open(run / "summary.csv")))) == 1
    assert train.main([*args, "--resume"]) == 0
    rows = list(csv.DictReader(open(run / "summary.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[1]["test_acc"] != ""
    logged = [json.loads(line) for line in open(run / "log.jsonl")]
    assert float(rows[1]["train_loss"]) == next(r["train_loss"] for r in logged
                                                if r["event"] == "epoch" and r["epoch"] == 2)
    if runlog.tensorboard_available():
        s = _scalars(run / "tensorboard")
        assert [st for st, _ in s["accuracy/train"]] == [4, 8]
        assert any(tag.startswith("update_angle/") for tag in s)
        assert all(0 <= v <= 180 for tag in s if tag.startswith("feedback_angle/")
                   for _, v in s[tag])
