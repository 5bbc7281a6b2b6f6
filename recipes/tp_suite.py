"""The target-propagation result suite, run in time-budgeted parts (made for one GPU lease).

    python -m recipes.tp_suite --part mlp --out results/tp --budget 400

``mlp``: cost ratios on mlp3x1024 and simple_vgg (``recipes.step_time``), then the 3x1024 MLP for
20 epochs with dtp, sdtp, drl (configs ``tp_mlp_dtp``/``tp_mlp_drl``) and bp
(``mlp_bartunov2018`` at 20 epochs).  (The SimpleVGG runs: ``recipes/tp_vgg_gpu.sh``; the
``vgg`` part that was here, used for ``results/tp/gpu_h100_vgg_suite.jsonl``, is in commit
3fca764.)  Every finished item is appended at once to ``<out>/suite.jsonl``
(final record + per-epoch records), so a part cut short by its time limit keeps what it did;
an item is skipped when the budget left is below its estimated cost.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from . import step_time
from .common import load_config, read_jsonl
from .train import train


class Suite:
    def __init__(self, out: Path, budget: float) -> None:
        self.out, self.t0, self.budget = out, time.perf_counter(), budget
        out.mkdir(parents=True, exist_ok=True)
        self.log = out / "suite.jsonl"

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def record(self, item: str, **data) -> None:
        with self.log.open("a") as f:
            f.write(json.dumps({"item": item, "t": round(time.perf_counter() - self.t0, 1),
                                **data}, default=str) + "\n")
        print(f"[suite {time.perf_counter() - self.t0:6.0f}s] {item}: "
              f"{ {k: v for k, v in data.items() if k != 'epochs'} }", flush=True)

    def run(self, item: str, estimate: float, fn) -> None:
        if self.left() < estimate:
            self.record(item, skipped=f"budget left {self.left():.0f}s < estimate {estimate:.0f}s")
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- keep going with the next item
            self.record(item, error=repr(e), tb=traceback.format_exc()[-2000:])

    def train(self, item: str, config: str, **overrides) -> None:
        cfg = load_config(config, out_dir="/tmp/tp_runs", name=item, **overrides)
        final = train(cfg, overwrite=True, progress=False)
        epochs = [r for r in read_jsonl(Path(final["run_dir"]) / "log.jsonl")
                  if r.get("event") == "epoch"]
        self.record(item, config=config, overrides=overrides, final=final, epochs=epochs)


def part_mlp(s: Suite, device: torch.device) -> None:
    ratios = {}

    def bench(model, rules, iters, rounds):
        variants = [f"{r}@{k}" if r == "l-drl" else r
                    for r in rules for k in (iters if r == "l-drl" else [1])]
        res = step_time.measure(model, variants, 128, 5 * rounds, rounds, str(device), "adam",
                                1e-4, 1e-4, 0.05, feedback_optimizer="adam")
        ratios[model] = res
        s.record(f"bench-{model}", **res)

    s.run("bench-mlp3x1024", 30, lambda: bench("mlp3x1024", ["dtp", "sdtp", "ao-sdtp", "drl",
                                                            "l-drl"], [1, 5, 20], 3))
    s.run("bench-simple_vgg", 60, lambda: bench("simple_vgg", ["dtp", "sdtp", "drl", "l-drl"],
                                                [1, 5, 20], 3))
    for rule, config in (("dtp", "tp_mlp_dtp"), ("drl", "tp_mlp_drl"), ("sdtp", "tp_mlp_dtp")):
        s.run(f"mlp3x1024-{rule}", 40, lambda r=rule, c=config: s.train(
            f"mlp3x1024-{r}", c, rule=r, epochs=20))
    s.run("mlp3x1024-bp", 15, lambda: s.train("mlp3x1024-bp", "mlp_bartunov2018", epochs=20))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["mlp"], required=True)
    p.add_argument("--out", default="results/tp")
    p.add_argument("--budget", type=float, default=400.0, help="seconds for this part")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = Suite(Path(a.out), a.budget)
    s.record("start", part=a.part, device=str(device), torch=torch.__version__,
             gpu=torch.cuda.get_device_name(0) if device.type == "cuda" else None)
    part_mlp(s, device)
    s.record("end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
