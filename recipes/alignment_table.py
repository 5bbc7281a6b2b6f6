"""Markdown summary of training runs with alignment diagnostics.

    python -m recipes.alignment_table runs/issue5/* > results/issue5/README.md

Per run: rule, epochs, final train/val/test accuracy (from the ``final`` record of
``log.jsonl``), then per wrapped layer the last logged angle(B, W), angle(rule gradient, BP
gradient) and sign concordance (from the last ``step`` record with ``alignment``).
"""
from __future__ import annotations

import sys
from pathlib import Path

from .common import read_jsonl


def _fmt(v, pct=False):
    if v is None:
        return "-"
    return f"{100 * v:.2f}" if pct else f"{v:.1f}"


def summarize(run_dirs: list[Path]) -> str:
    out = []
    head = ("| run | rule | data | device | epochs | seed | train acc % | val acc % | test acc % "
            "| img/s |\n|---|---|---|---|---|---|---|---|---|---|")
    rows, layers = [], []
    for d in run_dirs:
        recs = read_jsonl(d / "log.jsonl")
        fin = next((r for r in reversed(recs) if r.get("event") == "final"), None)
        last = [r for r in recs if r.get("event") == "epoch"]
        if fin is None and not last:
            continue
        f = fin or {**last[-1], "images_per_s": last[-1].get("images_per_s")}
        start = next(r for r in recs if r.get("event") == "start")
        rows.append(f"| {d.name} | {start['rule']} | {start['data']} | {start['device']} | "
                    f"{f['epoch']}{'' if fin else ' (running)'} | {start['seed']} | "
                    f"{_fmt(f.get('train_acc'), True)} | {_fmt(f.get('val_acc'), True)} | "
                    f"{_fmt(f.get('test_acc'), True)} | {f.get('images_per_s') or 0:.0f} |")
        al = [r for r in recs if "alignment" in r]
        if al:
            a = al[-1]["alignment"]
            names = list(a.get("update_angle") or a.get("feedback_angle"))
            layers.append(f"\n**{d.name}** (step {al[-1]['step']}, epoch {al[-1]['epoch']}): "
                          "angles in degrees\n\n| layer | angle(B, W) | angle(rule grad, BP grad) "
                          "| sign concordance |\n|---|---|---|---|")
            for n in names:
                sc = a.get("sign_concordance", {}).get(n)
                layers.append(f"| {n} | {_fmt(a.get('feedback_angle', {}).get(n))} | "
                              f"{_fmt(a.get('update_angle', {}).get(n))} | "
                              f"{'-' if sc is None else f'{sc:.3f}'} |")
    out.append(head)
    out.extend(rows)
    out.extend(layers)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(summarize([Path(a) for a in args if (Path(a) / "log.jsonl").is_file()]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
