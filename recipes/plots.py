"""Accuracy curves of one or more runs on one figure (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path | str, title: str) -> Path:
    """``runs``: label -> the run's per-epoch log records.  Per label, one colour: training
    accuracy dashed, validation (or per-epoch test) accuracy solid, final test accuracy as a
    star."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, recs) in enumerate(runs.items()):
        color = f"C{i}"
        ep = [r["epoch"] for r in recs]
        ax.plot(ep, [100 * r["train_acc"] for r in recs], "--", color=color, alpha=0.7,
                label=f"{label} train")
        for key, name in (("val_acc", "val"), ("test_acc", "test")):
            pts = [(r["epoch"], 100 * r[key]) for r in recs if r.get(key) is not None]
            if len(pts) > 1:
                ax.plot(*zip(*pts), "-", color=color, label=f"{label} {name}")
                break
        tests = [(r["epoch"], 100 * r["test_acc"]) for r in recs if r.get("test_acc") is not None]
        if tests:
            ax.plot(*tests[-1], "*", color=color, markersize=12,
                    label=f"{label} test {tests[-1][1]:.1f}%")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path, dpi=120)


def save_figure(fig, path: Path | str, dpi: int) -> Path:
    """Lay out ``fig``, write it to ``path`` (parents created) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
