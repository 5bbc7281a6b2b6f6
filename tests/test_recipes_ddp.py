"""``recipes.train --ddp 2`` end to end on tiny synthetic data: two processes on 127.0.0.1
train on the shards of each batch, rank 0 logs and checkpoints, ``--resume`` continues, and
the run matches the single-process run on the same batches."""
from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import pytest
import torch

from localopt.recipes import train
from localopt.recipes.synthetic import synthetic_arrays, write_imagefolder

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_data_env")

TIMEOUT_S = 240


def _records(run_dir: Path, event: str) -> list[dict]:
    with open(run_dir / "log.jsonl") as fh:
        return [r for r in map(json.loads, fh) if r["event"] == event]


def _main_with_deadline(argv: list[str]) -> int:
    """``train.main(argv)``; a run still going after TIMEOUT_S fails the test (its spawned
    processes have a 30-minute collective timeout of their own)."""
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("rc", train.main(argv)), daemon=True)
    t.start()
    t.join(TIMEOUT_S)
    if t.is_alive():
        for child in multiprocessing.active_children():
            child.kill()
        pytest.fail(f"recipes.train {' '.join(argv)} still running after {TIMEOUT_S} s")
    return out.get("rc", 1)


def test_ddp_run_resumes_and_matches_one_process(tmp_path):
    data = write_imagefolder(tmp_path / "tiny.tar.gz", synthetic_arrays(n_train=48, n_test=16))
    common = ["--data", str(data), "--out-dir", str(tmp_path), "--val-size", "16",
              "--batch-size", "8", "--eval-batch-size", "16", "--threads", "1", "--no-progress",
              "--download", "false", "--model", "mlp3x1024", "--rule", "dkp", "--epochs", "2",
              "--optimizer", "sgd", "--lr", "0.05", "--augment", "true", "--crop-padding", "2"]
    assert _main_with_deadline(common + ["--ddp", "2", "--name", "ddp", "--stop-after", "1"]) == 0
    assert len(_records(tmp_path / "ddp", "epoch")) == 1
    assert _main_with_deadline(common + ["--ddp", "2", "--name", "ddp", "--resume"]) == 0
    assert train.main(common + ["--name", "one"]) == 0

    ddp, one = tmp_path / "ddp", tmp_path / "one"
    (final,) = _records(ddp, "final")
    assert final["config"]["ddp"] == 2 and final["epoch"] == 2
    for a, b in zip(_records(ddp, "epoch"), _records(one, "epoch")):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert (a["train_acc"], a["val_acc"]) == (b["train_acc"], b["val_acc"])
    ck_ddp = torch.load(ddp / "checkpoint.pt", weights_only=False)
    ck_one = torch.load(one / "checkpoint.pt", weights_only=False)
    assert len(ck_ddp["rng_ranks"]) == 2
    assert ck_ddp["model"].keys() == ck_one["model"].keys()
    for k, v in ck_one["model"].items():
        torch.testing.assert_close(ck_ddp["model"][k], v, atol=1e-5, rtol=1e-4, msg=k)
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in one.iterdir())
