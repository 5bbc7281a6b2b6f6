"""Cost of the target-propagation rules: training-step time / plain BP step time, same process.

    python -m recipes.bench_tp --model mlp3x1024 --batch-size 128
    python -m recipes.bench_tp --model simple_vgg --batch-size 128 --ldrl-iters 1,5,20

A step is forward + loss + backward + optimizer step (Adam) on a fixed random batch (step time
does not depend on the data).  Variants are timed in interleaved rounds (BP, dtp, sdtp, ...,
BP, dtp, ...) and the median over rounds is reported, so machine load drifts hit all alike.
``l-drl@K`` is L-DRL with K feedback iterations per batch (every block).  Writes a JSON
record (``--out``) with the device, sizes and ratios.
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


def _builder(name: str, device: torch.device, variant: str, iters: int):
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=10).to(device)
    if variant == "bp":
        return model, torch.optim.Adam(model.parameters(), lr=1e-4)
    localopt.wrap(model, variant, seed=0)
    opt = localopt.optim.TargetProp(model, torch.optim.Adam, lr=1e-4, feedback_lr=1e-4,
                                    feedback_iters=iters, noise=0.05,
                                    feedback_optimizer=torch.optim.Adam)
    return model, opt


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(model_name: str, batch: int, device: torch.device, variants: list[tuple[str, str, int]],
          rounds: int, steps: int) -> dict:
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    built = {label: _builder(model_name, device, v, k) for label, v, k in variants}
    times: dict[str, list[float]] = {label: [] for label, _, _ in variants}

    def run(label, n):
        model, opt = built[label]
        for _ in range(n):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    for label, _, _ in variants:  # warm-up (first-forward shape probes, allocator)
        run(label, 2)
    for _ in range(rounds):
        for label, _, _ in variants:
            _sync(device)
            t0 = time.perf_counter()
            run(label, steps)
            _sync(device)
            times[label].append((time.perf_counter() - t0) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": model_name, "batch_size": batch, "device": device_name(device),
            "threads": torch.get_num_threads(), "rounds": rounds, "steps_per_round": steps,
            "step_s": med, "ratio_to_bp": {k: v / med["bp"] for k, v in med.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp3x1024")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rules", default="dtp,sdtp,ao-sdtp,drl,l-drl")
    p.add_argument("--ldrl-iters", default="1", help="comma list of L-DRL feedback iterations")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    variants = [("bp", "bp", 0)]
    for r in a.rules.split(","):
        if r == "l-drl":
            variants += [(f"l-drl@{k}", "l-drl", int(k)) for k in a.ldrl_iters.split(",")]
        elif r:
            variants.append((r, r, 1))
    res = bench(a.model, a.batch_size, device, variants, a.rounds, a.steps)
    for k, v in res["ratio_to_bp"].items():
        print(f"{a.model:12s} {k:10s} {res['step_s'][k] * 1e3:9.1f} ms/step  {v:6.2f} x BP")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
