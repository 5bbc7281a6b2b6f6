"""Cost of the feedback-learning rules and of the alignment diagnostics, as ratios to plain BP.

    python -m recipes.feedback_cost --model mlp3x1024 --batch-size 128
    python -m recipes.feedback_cost --model resnet20 --batch-size 128 --steps 3

Times one training step (forward, backward, ``opt.step()``) of: the plain model with a plain
``torch.optim.SGD`` (the reference), and the model wrapped with each rule and trained by
``localopt.optim.LocalOptimizer(model, SGD, ...)``; and one ``localopt.diagnostics.report``
call (feedback angles, sign concordance, update angles on the batch).  Variants are timed in
interleaved rounds in one process on random data; the median per-step time of each is divided
by the reference's.  Prints a table and writes it as JSON with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import localopt
import models

from .common import device_name


def _variants(name: str, rules: list[str], seed: int):
    def build(rule: str | None):
        torch.manual_seed(seed)
        m = models.create_model(name, num_classes=10)
        if rule is not None:
            localopt.wrap(m, rule, seed=seed)
            return m, localopt.optim.LocalOptimizer(m, torch.optim.SGD, lr=0.01, momentum=0.9,
                                                    weight_decay=1e-4)
        return m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    return {"plain BP": build(None), **{r: build(r) for r in rules}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp3x1024")
    p.add_argument("--rules", default="bp,fa,kp,wm,bfa")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="steps per timing round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rules = [r for r in a.rules.split(",") if r]
    variants = _variants(a.model, rules, a.seed)
    g = torch.Generator().manual_seed(a.seed)
    x = torch.randn(a.batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (a.batch_size,), generator=g)

    def train_steps(model, opt, n):
        for _ in range(n):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    times: dict[str, list[float]] = {k: [] for k in variants}
    diag: list[float] = []
    for model, opt in variants.values():
        train_steps(model, opt, 1)  # warm-up
    for _ in range(a.rounds):
        for key, (model, opt) in variants.items():
            t0 = time.perf_counter()
            train_steps(model, opt, a.steps)
            times[key].append((time.perf_counter() - t0) / a.steps)
        diag_rule = "kp" if "kp" in rules else (rules[0] if rules else None)
        model = variants[diag_rule][0] if diag_rule else None
        if model is not None:
            t0 = time.perf_counter()
            localopt.diagnostics.report(model, F.cross_entropy, x, y)
            diag.append(time.perf_counter() - t0)
    ref = statistics.median(times["plain BP"])
    rows = [{"variant": k, "step_ms": 1e3 * statistics.median(v),
             "ratio_to_plain_bp": statistics.median(v) / ref} for k, v in times.items()]
    if diag:
        rows.append({"variant": f"diagnostics.report ({diag_rule}), per call",
                     "step_ms": 1e3 * statistics.median(diag),
                     "ratio_to_plain_bp": statistics.median(diag) / ref})
    meta = {"model": a.model, "batch_size": a.batch_size, "steps": a.steps, "rounds": a.rounds,
            "device": device_name(torch.device("cpu")), "torch": torch.__version__,
            "optimizer": "SGD(lr=0.01, momentum=0.9, weight_decay=1e-4)",
            "rule_options": "defaults"}
    print(f"{a.model}, batch {a.batch_size}, {meta['device']}; median of {a.rounds} rounds x "
          f"{a.steps} steps")
    print(f"{'variant':<40} {'ms/step':>9} {'x plain BP':>11}")
    for r in rows:
        print(f"{r['variant']:<40} {r['step_ms']:>9.1f} {r['ratio_to_plain_bp']:>11.2f}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
