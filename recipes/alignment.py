"""Alignment diagnostics of a training run: per-layer records every N steps, one PNG per run.

The records come from :func:`localopt.diagnostics.report` on the current training batch (the
angle between each layer's feedback B and its weight W, the sign concordance of B and W, and
the angle between the rule's weight gradient and the true backprop gradient); computing them
leaves the training state untouched.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import Tensor, nn

from .plots import plt, save_figure

PANELS = (("feedback_angle", "angle(B, W) (deg)"), ("update_angle", "angle(rule grad, BP grad) (deg)"),
          ("norm_ratio", "||rule grad|| / ||BP grad||"),
          ("sign_concordance", "sign concordance of B and W"))


def alignment_record(model: nn.Module, loss: Callable[[Any, Any], Tensor], x: Any, y: Any
                     ) -> dict[str, Any]:
    """``{"alignment": {"feedback_angle": {layer: deg}, "sign_concordance": {...},
    "update_angle": {...}}}`` for a wrapped model, ``{}`` otherwise."""
    import localopt
    if not localopt.is_wrapped(model):
        return {}
    return {"alignment": localopt.diagnostics.report(model, loss, x, y)}


def plot_alignment(records: list[dict[str, Any]], path: Path | str, title: str) -> Path | None:
    """One panel per diagnostic, one line per layer, against the training step; ``None``
    (nothing written) when no record carries alignment data."""
    recs = [r for r in records if "alignment" in r]
    if not recs:
        return None
    panels = [(k, label) for k, label in PANELS if any(r["alignment"].get(k) for r in recs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        layers = list(dict.fromkeys(n for r in recs for n in r["alignment"].get(key, {})))
        cmap = plt.get_cmap("viridis", max(len(layers), 2))
        for i, name in enumerate(layers):
            pts = [(r["step"], r["alignment"][key][name]) for r in recs
                   if name in r["alignment"].get(key, {})]
            ax.plot(*zip(*pts), color=cmap(i), lw=1.2, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "norm_ratio":
            ax.set_yscale("log")
            ax.axhline(1, color="grey", lw=0.8, ls=":")
        elif key != "sign_concordance":
            ax.axhline(90, color="grey", lw=0.8, ls=":")
    axes[0][0].legend(fontsize=6, ncol=1 + len(axes[0][0].get_lines()) // 12, title="layer",
                      title_fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=110)
