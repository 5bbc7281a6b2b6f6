"""Memory of a pipelined run against one process: each process materialises only its stage.

    python -m recipes.pipeline_memory --json results/pipeline/memory/mlp8x4096.json
    python -m recipes.pipeline_memory --report results/pipeline/memory   # table + docs block

Runs, each in fresh processes (so peak RSS is the run's own): one process building the whole
model and training ``--steps`` Adam steps; then ``--stages`` processes building the same model
on the meta device (``localopt.pipeline.build(..., seed=)``: each materialises its stage only)
and training the same steps on the direct schedule (``dfa``) and on GPipe (``bp``).  Reports,
per process, the peak RSS after ``build`` and after the steps (``ru_maxrss``), and
``PipelineStep.memory()``: ``parameter_bytes``, ``state_bytes``, ``model_parameter_bytes``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .markdown import link_base, replace_block

IMAGE = (3, 32, 32)


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _make(width: int, depth: int, rule: str):
    def make():
        import localopt
        from localopt.models.mlp import MLP
        model = MLP(hidden=(width,) * depth, num_classes=10)
        if rule != "bp":
            localopt.wrap(model, rule, seed=0)
        return model
    return make


def _batch(batch: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, *IMAGE, generator=g), torch.randint(0, 10, (batch,), generator=g)


def one_process(width: int, depth: int, steps: int, batch: int) -> dict:
    """The whole model in one process: build (eager, seeded), ``steps`` Adam steps."""
    torch.manual_seed(0)
    model = _make(width, depth, "bp")()
    built = _rss_mb()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = _batch(batch)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    params = sum(t.numel() * t.element_size() for t in
                 list(model.parameters()) + list(model.buffers()))
    return {"rss_build_mb": built, "rss_peak_mb": _rss_mb(), "parameter_bytes": params,
            "parameters": sum(p.numel() for p in model.parameters())}


def pipelined(width: int, depth: int, steps: int, batch: int, rule: str, schedule: str,
              split: list[str], microbatches: int) -> dict:
    """This rank of the pipelined run (meta-device model, stage materialised by build)."""
    from localopt import pipeline as lp
    x, y = _batch(batch)
    pipe = lp.build(_make(width, depth, rule), split, schedule, microbatches=microbatches,
                    example=x[:1], seed=0, timeout=300)
    built = _rss_mb()
    opt = pipe.optimizer(torch.optim.Adam, lr=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        pipe.step(x, y)
        opt.step()
    return {"rank": pipe.rank, "stages": list(pipe.stages), "rss_build_mb": built,
            "rss_peak_mb": _rss_mb(), **pipe.memory()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.pipeline_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--depth", type=int, default=8, help="hidden layers")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--report", metavar="DIR", help="write DIR/README.md (and the docs page's "
                   "block) from DIR/*.json, nothing else")
    p.add_argument("--readme", default=None, help="with --report: the page whose memory block "
                   "gets the table (default: the checkout's docs/guide/model-parallel.md)")
    args = p.parse_args(argv)
    if args.report:
        repo = Path(__file__).resolve().parents[1]
        page = Path(args.readme) if args.readme else repo / "docs" / "guide" / "model-parallel.md"
        print(f"wrote {write_report(Path(args.report), page)}")
        return 0
    from localopt import pipeline as lp
    # stage s begins at hidden layer s * depth / S (Linear k is child 1 + 2k of the Sequential)
    split = [str(1 + 2 * (s * args.depth // args.stages)) for s in range(1, args.stages)]
    common = (args.width, args.depth, args.steps, args.batch)
    out = {"model": f"mlp{args.depth}x{args.width}", "split": split, "steps": args.steps,
           "batch": args.batch, "microbatches": args.microbatches, "optimizer": "Adam",
           "device": "cpu", "machine": platform.machine(), "torch": torch.__version__,
           "command": "python -m recipes.pipeline_memory " + " ".join(argv or sys.argv[1:]),
           "one_process": lp.launch(one_process, 1, args=common, timeout=1800)[0], "runs": []}
    for rule, schedule in (("dfa", "direct"), ("bp", "gpipe")):
        ranks = lp.launch(pipelined, args.stages, args=common + (rule, schedule, split,
                                                                 args.microbatches),
                          timeout=1800)
        out["runs"].append({"rule": rule, "schedule": schedule, "ranks": ranks})
    one = out["one_process"]
    for run in out["runs"]:
        whole = run["ranks"][0]["model_parameter_bytes"]
        run["max_parameter_fraction"] = max(r["parameter_bytes"] for r in run["ranks"]) / whole
        run["max_rss_build_fraction"] = max(r["rss_build_mb"] for r in run["ranks"]) / \
            one["rss_peak_mb"]
        run["max_rss_peak_fraction"] = max(r["rss_peak_mb"] for r in run["ranks"]) / \
            one["rss_peak_mb"]
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


#: the block of the docs page that :func:`write_report` rewrites


def table(files: list[tuple[Path, dict]]) -> list[str]:
    """Markdown rows: per run, the one-process peak RSS against each process's RSS after
    ``build`` and at its peak, and its parameter bytes against the model's."""
    mb = 2 ** 20
    lines = ["| model | steps | processes | rule, schedule | one process: peak RSS (MB) | "
             "per process: RSS after build (MB) | per process: peak RSS (MB) | per process: "
             "parameters (MB, share of the model) | file |",
             "|---|---:|---:|---|---:|---|---|---|---|"]
    for f, res in files:
        one = res["one_process"]
        for run in res["runs"]:
            ranks = run["ranks"]
            whole = ranks[0]["model_parameter_bytes"]
            lines.append(
                f"| {res['model']} | {res['steps']} | {len(ranks)} | {run['rule']}, "
                f"{run['schedule']} | {one['rss_peak_mb']:.0f} | "
                + " / ".join(f"{r['rss_build_mb']:.0f}" for r in ranks)
                + f" ({run['max_rss_build_fraction']:.2f}x) | "
                + " / ".join(f"{r['rss_peak_mb']:.0f}" for r in ranks)
                + f" ({run['max_rss_peak_fraction']:.2f}x) | "
                + " / ".join(f"{r['parameter_bytes'] / mb:.0f} ({r['parameter_bytes'] / whole:.2f})"
                             for r in ranks) + f" | `{f.name}` |")
    return lines


def write_report(d: Path, page: Path | None) -> Path:
    """``d/README.md`` from ``d/*.json``; the table also replaces ``page``'s block."""
    files = [(f, json.loads(f.read_text())) for f in sorted(d.glob("*.json"))]
    head = ("Generated by `python -m recipes.pipeline_memory --report " + str(d) + "` from "
            "the JSON files next to it (each written by the command it records). CPU, one "
            "torch thread per process, gloo on 127.0.0.1; RSS is each process's peak resident "
            "set (`ru_maxrss`), torch itself included; `x`: the largest process over the one "
            "process's peak.")
    rows = table(files)
    cmds = [f"    {res['command']}" for _, res in files]
    out = d / "README.md"
    out.write_text("\n".join(["# Memory per process: pipelined (meta build) vs one process", "",
                              head, "", *rows, "", "Commands:", "", *cmds]) + "\n")
    if page is not None and page.is_file():
        rel = os.path.relpath(d.resolve(), link_base(page))
        cmd = os.path.relpath(d.resolve(), Path(__file__).resolve().parents[1])
        replace_block(page, "pipeline-memory", "\n".join([
            f"Generated by `python -m recipes.pipeline_memory --report {cmd}` from "
            f"[{cmd}/]({rel}/README.md).", "", *rows]))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
