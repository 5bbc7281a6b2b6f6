"""Step-time of each rule as a ratio to plain backprop, measured in one process.

    python -m recipes.step_time --model resnet18 --rules bp,fa,usf --batch 64 --steps 20

For each rule a fresh copy of the model (same initial weights) is wrapped, warmed up, then
timed over ``--steps`` forward+backward(+optimizer) steps on a fixed random batch; rounds of all
rules are interleaved so that machine noise hits every rule alike.  The median step time is
reported next to the unwrapped model's ("plain") and the ratio to it.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

import localopt
import models

from .common import device_name, pick_device


def _step_fn(model, opt, x, y, device):
    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def measure(model_name: str, rules: list[str], batch: int = 64, steps: int = 20, rounds: int = 3,
            device: str = "auto", rule_options: dict | None = None, opt_step: bool = True,
            seed: int = 0) -> dict:
    """Median seconds per step for the plain model and each rule, and ratios to plain."""
    dev = pick_device(device)
    torch.manual_seed(seed)
    base = models.create_model(model_name, num_classes=10).to(dev)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    fns = {}
    for name in ["plain"] + rules:
        m = copy.deepcopy(base)
        if name != "plain":
            localopt.wrap(m, name, **(rule_options or {}).get(name, {}))
        opt = torch.optim.SGD(m.parameters(), lr=1e-3 if opt_step else 0.0, momentum=0.9)
        fns[name] = _step_fn(m, opt, x, y, dev)
        for _ in range(3):  # warm-up
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(max(1, steps // rounds)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    return {"model": model_name, "batch": batch, "device": device_name(dev),
            "threads": torch.get_num_threads(), "steps_per_rule": len(times["plain"]),
            "median_s": med, "ratio_to_plain": {n: med[n] / med["plain"] for n in med}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--rules", default="bp,fa")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=21)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the result to this JSON file")
    a = p.parse_args(argv)
    res = measure(a.model, [r for r in a.rules.split(",") if r], a.batch, a.steps, a.rounds,
                  a.device)
    print(f"{res['model']}, batch {res['batch']}, {res['device']}, {res['threads']} threads, "
          f"median of {res['steps_per_rule']} steps (forward+backward+SGD step)")
    print(f"{'rule':<8}{'ms/step':>10}{'ratio to plain':>16}")
    for n, t in res["median_s"].items():
        print(f"{n:<8}{1e3 * t:>10.1f}{res['ratio_to_plain'][n]:>16.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
