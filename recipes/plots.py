"""The figures of the recipes (matplotlib, no display needed): accuracy curves of one or more
runs, the per-layer alignment of several rules, pipeline timelines
(:class:`localopt.pipeline.Event` lists) and pipeline speed-ups."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from localopt.pipeline.timeline import idle_fractions  # noqa: E402


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
    _epoch_axes(ax, "accuracy (%)", title)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path, dpi=120)


def _epoch_axes(ax, ylabel: str, title: str) -> None:
    """The labels of a panel over epochs: integer epoch ticks, ``ylabel``, ``title``, a grid."""
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


def plot_accuracy_curves(runs: Sequence[tuple[str, list[dict[str, Any]], dict[str, Any]]],
                         path: Path | str, title: str) -> Path:
    """``runs``: (label, the run's per-epoch log records, its final record) per line:
    validation accuracy per epoch (test accuracy where the run has no validation set), the
    final test accuracy as a star (``recipes.report``'s figure of a table; per-run figures
    with training accuracy: :func:`plot_curves`)."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, (label, recs, final) in enumerate(runs):
        color, ls = f"C{i % 10}", "-" if i < 10 else "--"
        key = "val_acc" if any(r.get("val_acc") is not None for r in recs) else "test_acc"
        pts = [(r["epoch"], 100 * r[key]) for r in recs if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), ls, color=color, marker="." if len(pts) < 3 else None,
                    label=f"{label}: {100 * final['test_acc']:.1f}")
        ax.plot(final["epoch"], 100 * final["test_acc"], "*", color=color, markersize=9)
    _epoch_axes(ax, "validation accuracy (%); star: final test", title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="test %",
              title_fontsize=7)
    return save_figure(fig, path, dpi=110)


def plot_alignment_summary(runs: Sequence[tuple[str, list[dict[str, Any]]]], path: Path | str,
                           title: str) -> Path | None:
    """``runs``: (label, the run's alignment records) per line: per layer, the angle between
    the rule's weight update and backprop's gradient, mean of the last 3 records that have
    it; None (nothing drawn) when no run logged any."""
    lines = []
    for label, records in runs:
        recs = [r["alignment"].get("update_angle") or {} for r in records]
        recs = [r for r in recs if r][-3:]
        if recs:
            layers = list(recs[-1])
            lines.append((label, layers, [statistics.fmean(r.get(n, float("nan"))
                                                           for r in recs) for n in layers]))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (label, layers, values) in enumerate(lines):
        ax.plot(range(len(layers)), values, marker="o", color=f"C{i % 10}",
                ls="-" if i < 10 else "--", label=label, ms=3)
    longest = max(lines, key=lambda t: len(t[1]))[1]
    ax.set_xticks(range(len(longest)), longest, rotation=60, fontsize=6, ha="right")
    ax.set_ylabel("angle(rule update, BP gradient) (deg)")
    ax.axhline(90, color="grey", lw=0.8, ls=":")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path, dpi=110)


def save_figure(fig, path: Path | str, dpi: int, rect: tuple | None = None) -> Path:
    """Lay out ``fig`` (within ``rect`` of the figure, if given), write it to ``path`` (parents
    created) and close it."""
    fig.tight_layout(**({"rect": rect} if rect else {}))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


#: pipeline timelines (localopt.pipeline.Event lists): a colour and a legend label per kind
COLORS = {"forward": "#4C72B0", "backward": "#DD8452", "backward_weight": "#F2C09B",
          "send": "#8C8C8C", "recv": "#B5B5B5", "step": "#55A868", "update": "#2E7D32"}
LABELS = {"forward": "forward", "backward": "backward", "backward_weight": "weight gradient",
          "send": "send", "recv": "recv", "step": "optimizer step", "wait": "waiting (idle)",
          "update": "update (asynchronous, inside the step)"}


def _draw(ax, events: Sequence, t0: float, title: str | None, rows: int) -> float:
    """One panel: a hatched (idle) bar per row, a box per event on top; returns its span."""
    tmax = max((e.end for e in events), default=t0) - t0
    for s in range(rows):
        ax.barh(s, tmax * 1e3, left=0, height=0.8, color="white", edgecolor="#BBBBBB",
                hatch="///", linewidth=0.5, zorder=0)
    for e in events:
        if e.kind == "wait":                          # idle: the hatched background shows
            continue
        x0, w = (e.start - t0) * 1e3, (e.end - e.start) * 1e3
        h = 0.8 if e.kind not in ("send", "recv") else 0.35
        ax.barh(e.stage, w, left=x0, height=h, color=COLORS.get(e.kind, "#C44E52"),
                edgecolor="black", linewidth=0.4, zorder=2)
        if e.microbatch is not None and e.microbatch >= 0 and e.kind not in ("send", "recv") \
                and tmax > 0 and w / (tmax * 1e3) > 0.012:
            ax.text(x0 + w / 2, e.stage, str(e.microbatch), ha="center", va="center",
                    fontsize=7, zorder=3, color="white" if e.kind == "forward" else "black")
    ax.set_yticks(range(rows))
    ax.set_yticklabels([f"stage {s}" for s in range(rows)])
    ax.set_ylim(rows - 0.5, -0.5)
    if title is not None:
        idle = idle_fractions(events, rows, tmax if tmax > 0 else None, t0)
        text = (", ".join(f"{100 * b:.0f}%" for b in idle) if rows <= 4 else
                f"{100 * sum(idle) / rows:.0f}% per stage on average")
        ax.set_title(f"{title}   (idle: {text})", fontsize=9, loc="left")
    return tmax


def plot_timeline(events: Sequence, path: Path | str, title: str | None = None) -> Path:
    """One row per stage: forward/backward/communication boxes with their micro-batch
    numbers, idle time hatched.  Times are shown relative to the first event."""
    return plot_timelines({title or "": events}, path)


def plot_timelines(panels: Mapping[str, Sequence], path: Path | str,
                   title: str | None = None) -> Path:
    """One panel per schedule (``{label: events}``), on the same time axis (each panel's time
    starts at its first event)."""
    panels = {k: list(v) for k, v in panels.items()}
    rows = [max((e.stage for e in ev), default=0) + 1 for ev in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False,
                             figsize=(11, 0.9 + sum(0.45 * r + 0.7 for r in rows)),
                             gridspec_kw={"height_ratios": [r + 1.2 for r in rows]})
    tmax = 0.0
    for ax, (label, ev), n in zip(axes[:, 0], panels.items(), rows):
        t0 = min((e.start for e in ev), default=0.0)
        tmax = max(tmax, _draw(ax, ev, t0, label, n))
    axes[-1, 0].set_xlabel("time (ms)")
    axes[0, 0].set_xlim(0, tmax * 1e3 * 1.02 if tmax > 0 else 1)
    used = {e.kind for ev in panels.values() for e in ev}
    handles = [Patch(facecolor=COLORS[k], edgecolor="black", label=LABELS[k])
               for k in COLORS if k in used]
    handles.append(Patch(facecolor="white", edgecolor="#BBBBBB", hatch="///",
                         label=LABELS["wait"]))
    height = fig.get_size_inches()[1]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=110,
                       rect=(0, 0.35 / height, 1, 1 - (0.3 / height if title else 0)))


def plot_speedup(measured: list[dict], scaled: list[dict], path: Path | str, title: str) -> Path:
    """Simulated speed-up over the fastest backprop schedule against the stage count, per
    direct schedule and K; measured runs as stars."""
    from localopt.pipeline.analysis import speedups
    fig, ax = plt.subplots(figsize=(6.5, 4))
    rows = speedups(scaled)
    meas = speedups(measured)
    styles = {"dfa": "-", "drtp": "--", "bdfa": "-.", "dkp": ":"}
    for label in sorted({r["label"] for r in rows}):
        for M in sorted({r["M"] for r in rows}):
            pts = sorted((r["S"], r["speedup"]) for r in rows if r["label"] == label
                         and r["M"] == M)
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(label, "-"),
                            marker="o", label=f"{label}, K={M} (simulated)")
            m = [r for r in meas if r["label"] == label and r["M"] == M]
            if m:
                ax.plot([m[0]["S"]], [m[0]["speedup"]], marker="*", ms=12, ls="none",
                        color=line.get_color())
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("stages S (processes)")
    ax.set_ylabel("images/s over the fastest backprop schedule")
    ax.set_title(title + "\n(stars: measured)", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=110)


def plot_bandwidth(speedups: list[dict], path: Path | str, title: str) -> Path:
    """Simulated speed-up of the best direct schedule over the fastest backprop one against
    the link bandwidth, one line per stage count (at the largest K)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    K = max(r["M"] for r in speedups)
    names = list(dict.fromkeys(r["bandwidth"] for r in speedups))
    xs = {n: i for i, n in enumerate(names)}
    for S in sorted({r["S"] for r in speedups}):
        pts = []
        for n in names:
            rows = [r for r in speedups if r["S"] == S and r["M"] == K and r["bandwidth"] == n]
            if rows:
                best = max(rows, key=lambda r: r["speedup"])
                pts.append((xs[n], best["speedup"], best["label"]))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"S={S}")
            for x, y, lb in pts:
                ax.annotate(lb, (x, y), fontsize=6, textcoords="offset points", xytext=(2, 3))
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n if n == "loopback" else f"{n} Gbit/s" for n in names])
    ax.set_xlabel("link between stages")
    ax.set_ylabel(f"images/s over the fastest backprop schedule (K={K})")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=110)


def plot_time_to_accuracy(curves: dict[str, list[tuple]], path: Path | str, title: str
                          ) -> Path:
    """Test accuracy against training wall-clock time and against images seen, one line per
    schedule (``curves[label] = [(images seen, seconds, accuracy), ...]``)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for label, pts in curves.items():
        axes[0].plot([p[1] for p in pts], [100 * p[2] for p in pts], marker="o", ms=3,
                     label=label)
        axes[1].plot([p[0] / 1e3 for p in pts], [100 * p[2] for p in pts], marker="o", ms=3,
                     label=label)
    axes[0].set_xlabel("training wall-clock (s, evaluation excluded)")
    axes[1].set_xlabel("training images seen (thousands)")
    axes[0].set_ylabel("test accuracy (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=110)
