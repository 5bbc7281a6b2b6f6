"""Step time of learning rules as a ratio to plain backprop, measured in one process.

    python -m recipes.step_time --model resnet18 --rules bp,fa,usf --batch 64 --steps 20
    python -m recipes.step_time --model mlp3x1024 --rules bp,fa,kp,wm,bfa --diagnostics kp
    python -m recipes.step_time --model simple_vgg --rules bp,dtp,sdtp,drl,l-drl@1,l-drl@5 \\
        --optimizer adam --lr 1e-4

The one benchmark runner of the repo.  A variant is a rule name; ``rule@K`` gives a
target-propagation rule K feedback iterations per step.  Each variant is a fresh copy of the
model (same initial weights), wrapped with its rule and trained by the optimizer that rule
needs: the plain one (``--optimizer``), ``localopt.optim.LocalOptimizer`` around it for rules
that learn their feedback (``kp``, ``wm``, ...), ``localopt.optim.TargetProp`` around it for
target propagation (``--feedback-optimizer``, ``--feedback-lr``, ``--noise``).  ``plain`` is the
unwrapped model with the plain optimizer: the reference.  A step is forward, cross-entropy,
backward and ``opt.step()`` on a fixed random batch (step time does not depend on the data).
After two warm-up steps each, rounds of all variants are interleaved so that machine noise
hits every variant alike; the median step time of each is reported with its ratio to
``plain``.  ``--diagnostics RULE`` also times one ``localopt.diagnostics.report`` call on that
variant's model.  ``--json`` writes the result.

``--compile`` times every variant's model -- ``plain`` included -- through
``torch.compile(model)`` (forward and its backward; the optimizer step stays eager), after
three warm-up steps (the first compiles, and the direct rules' first forward draws their
feedback, which compiles once more).

    python -m recipes.step_time --model mlp3x1024 --rules bp,fa,dfa,kp --compile --threads 1
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import localopt
from localopt import models

from .common import device_name, pick_device

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def parse_variant(spec: str) -> tuple[str, int]:
    """``"l-drl@5"`` -> ``("l-drl", 5)``; ``"fa"`` -> ``("fa", 1)``."""
    rule, _, k = spec.partition("@")
    if k and not k.isdigit():
        raise ValueError(f"variant {spec!r}: write rule@K with K a number of feedback iterations")
    return rule, int(k) if k else 1


def build(base: torch.nn.Module, spec: str, optimizer: str = "sgd", lr: float = 1e-3,
          feedback_lr: float = 1e-4, noise: float = 0.05, seed: int = 0,
          feedback_optimizer: str = "sgd"):
    """A copy of ``base`` wrapped for variant ``spec`` (``"plain"``: not wrapped) and the
    optimizer that trains it."""
    model = copy.deepcopy(base)
    cls = OPTIMIZERS[optimizer]
    kw = {"lr": lr, "momentum": 0.9} if optimizer == "sgd" else {"lr": lr}
    if spec == "plain":
        return model, cls(model.parameters(), **kw)
    rule, iters = parse_variant(spec)
    localopt.wrap(model, rule, seed=seed)
    if localopt.rules.target_prop.is_target_prop(model):
        return model, localopt.optim.TargetProp(
            model, cls, feedback_optimizer=OPTIMIZERS[feedback_optimizer],
            feedback_lr=feedback_lr, feedback_iters=iters, noise=noise, **kw)
    if localopt.sites(model)[0].rule.learns_feedback:
        return model, localopt.optim.LocalOptimizer(model, cls, **kw)
    return model, cls(model.parameters(), **kw)


def measure(model_name: str, variants: list[str], batch: int = 64, steps: int = 20,
            rounds: int = 3, device: str = "auto", optimizer: str = "sgd", lr: float = 1e-3,
            feedback_lr: float = 1e-4, noise: float = 0.05, diagnostics: str | None = None,
            seed: int = 0, feedback_optimizer: str = "sgd", compile: bool = False) -> dict:
    """Median seconds per step of ``plain`` and each variant, and the ratios to ``plain``
    (``compile``: each model run through ``torch.compile``)."""
    dev = pick_device(device)
    if diagnostics is not None and diagnostics not in variants:
        raise ValueError(f"--diagnostics {diagnostics!r} is not one of the variants {variants}")
    torch.manual_seed(seed)
    base = models.create_model(model_name, num_classes=10).to(dev)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(0, 10, (batch,), generator=g).to(dev)
    built = {v: build(base, v, optimizer, lr, feedback_lr, noise, seed, feedback_optimizer)
             for v in ["plain"] + [v for v in variants if v != "plain"]}
    if compile:  # one compiled entry per variant (and per feedback draw): lift dynamo's cap
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                   4 * len(built))
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 16 * len(built))
        built = {v: (torch.compile(model), opt) for v, (model, opt) in built.items()}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step(model, opt):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sync()

    for model, opt in built.values():  # warm-up: shape probes, allocator, lazy feedback
        for _ in range(3 if compile else 2):
            step(model, opt)
    times: dict[str, list[float]] = {v: [] for v in built}
    diag: list[float] = []
    for _ in range(rounds):
        for v, (model, opt) in built.items():
            for _ in range(max(1, steps // rounds)):
                t0 = time.perf_counter()
                step(model, opt)
                times[v].append(time.perf_counter() - t0)
        if diagnostics is not None:
            t0 = time.perf_counter()
            model = built[diagnostics][0]
            localopt.diagnostics.report(getattr(model, "_orig_mod", model), F.cross_entropy,
                                        x, y)
            sync()
            diag.append(time.perf_counter() - t0)
    med = {v: statistics.median(t) for v, t in times.items()}
    if diag:
        med[f"diagnostics.report ({diagnostics}), per call"] = statistics.median(diag)
    return {"model": model_name, "batch": batch, "device": device_name(dev),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "compile": compile, "optimizer": f"{optimizer}(lr={lr})",
            "feedback_optimizer": feedback_optimizer,
            "feedback_lr": feedback_lr, "noise": noise,
            "steps_per_variant": len(times["plain"]), "rounds": rounds,
            "median_s": med, "ratio_to_plain": {v: t / med["plain"] for v, t in med.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--rules", default="bp,fa", help="comma list of variants (rule or rule@K)")
    p.add_argument("--batch", "--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=21, help="timed steps per variant")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads when > 0")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--feedback-optimizer", choices=sorted(OPTIMIZERS), default="sgd",
                   help="target propagation")
    p.add_argument("--feedback-lr", type=float, default=1e-4, help="target propagation")
    p.add_argument("--noise", type=float, default=0.05, help="target propagation")
    p.add_argument("--diagnostics", metavar="RULE", help="also time diagnostics.report on it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="time every model (plain included) through torch.compile")
    p.add_argument("--json", "--out", dest="json", help="also write the result to this file")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    try:
        res = measure(a.model, [r for r in a.rules.split(",") if r], a.batch, a.steps, a.rounds,
                      a.device, a.optimizer, a.lr, a.feedback_lr, a.noise, a.diagnostics, a.seed,
                      a.feedback_optimizer, a.compile)
    except ValueError as e:
        p.exit(2, f"error: {e}\n")
    print(f"{res['model']}, batch {res['batch']}, {res['device']}, {res['threads']} threads, "
          f"{'torch.compile, ' if res['compile'] else ''}"
          f"{res['optimizer']}, median of {res['steps_per_variant']} steps "
          f"(forward+backward+optimizer step)")
    print(f"{'variant':<40}{'ms/step':>10}{'ratio to plain':>16}")
    for v, t in res["median_s"].items():
        print(f"{v:<40}{1e3 * t:>10.1f}{res['ratio_to_plain'][v]:>16.3f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
