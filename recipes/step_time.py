"""Step time of learning rules as a ratio to plain backprop, measured in one process.

    python -m recipes.step_time --model resnet18 --rules bp,fa,usf --batch 64 --steps 20
    python -m recipes.step_time --model mlp3x1024 --rules bp,fa,kp,wm,bfa --diagnostics kp
    python -m recipes.step_time --model simple_vgg --rules bp,dtp,sdtp,drl,l-drl@1,l-drl@5 \\
        --optimizer adam --lr 1e-4

The one benchmark runner of the repo.  A variant is a rule name; ``rule@K`` gives a
target-propagation rule K feedback iterations per step.  Each variant is a fresh copy of the
model (same initial weights), wrapped with its rule and trained by the optimizer that rule
needs, built as ``recipes.train`` builds it (``recipes.common.make_optimizer``): the plain one
(``--optimizer``: ``sgd`` or ``muon`` with momentum 0.9, or ``adam``; no weight decay),
``localopt.optim.LocalOptimizer`` around it for rules that learn their feedback (``kp``, ``wm``,
...), ``localopt.optim.TargetProp`` around it for target propagation (``--feedback-optimizer``,
``--feedback-lr``, ``--noise``).  ``plain`` is the unwrapped model with the plain optimizer: the
reference.  A step is forward, cross-entropy, backward and ``opt.step()`` on a fixed random
batch (step time does not depend on the data).
After two warm-up steps each, rounds of all variants are interleaved so that machine noise
hits every variant alike; the median step time of each is reported with its ratio to
``plain``.  ``--diagnostics LABEL`` also times one ``localopt.diagnostics.report`` call on that
variant's model.  ``--json`` writes the result.

Settings.  The model, variants, batch, device, threads, optimizer, lr, seed, compile,
channels_last and the target propagation's feedback optimizer, lr and noise come from a config,
as in ``recipes.train``: ``recipes/step_time.toml`` (the defaults) or ``--config FILE``, then
the flags of those settings (``--batch`` is ``--batch-size``; ``--feedback-optimizer``,
``--feedback-lr`` and ``--noise`` set those keys of ``feedback_options``).

Variants (the syntax of ``recipes.variants``, shared with ``recipes.benchmark``).  An entry of
``--rules`` may be ``LABEL=RULE`` (or ``LABEL=RULE@K``): a variant named LABEL.
``--options LABEL=TABLE`` (repeatable) gives a variant the options of ``localopt.wrap`` as a
TOML inline table (a label without ``=`` is its own label)::

    python -m recipes.step_time --model resnet20 --rules bp,dfa,dfa-stage=dfa \\
        --options 'dfa-stage={modules = ["layers.0", "layers.3", "layers.6"]}'

``--variants-from recipes/table.toml`` adds one variant per row of the CIFAR-10 table that has
``--model``, labelled by the row, with the row's rule and rule options (its ``base`` config's,
then its own, then its ``settings`` for the model, as ``recipes.table_runs`` merges them).  A
row's ``freeze`` setting holds those parameters fixed.  A
row whose settings name an optimizer this runner has (``sgd``, ``adam``, ``muon``; also the
target propagation's ``feedback_optimizer``) is timed with it and its ``lr``, ``aux_lr`` (and
``feedback_lr``, ``noise``); a row naming another optimizer is timed with the plain one, and
its JSON record says so (``note``)::

    python -m recipes.step_time --model resnet20 --variants-from recipes/table.toml --threads 1

The JSON records each variant's label, rule, options and optimizer under ``variants``;
``median_s`` and ``ratio_to_plain`` are keyed by label.

``--compile`` times every variant's model -- ``plain`` included -- through
``torch.compile(model)`` (forward and its backward; the optimizer step stays eager), after
three warm-up steps (the first compiles, and the direct rules' first forward draws their
feedback, which compiles once more); ``--compile-backend`` picks the backend (default
inductor).  ``--channels-last`` converts every model -- ``plain`` included -- and the batch to
``torch.channels_last``.  ``--threads N`` sets ``torch.set_num_threads(N)``.

    python -m recipes.step_time --model mlp3x1024 --rules bp,fa,dfa,kp --compile --threads 1

``--sweep-cpu`` measures absolute CPU training throughput instead, for one variant (the one
entry of ``--rules``, default ``bp``): images/s of forward+backward+optimizer step on the fixed
batch, median over the timed steps, for every setting of threads {1, 2} x channels_last
{off, on} x torch.compile {off, on} -- one model per setting (inductor's CPU kernels are
compiled for the thread count in force), rounds interleaved over the settings as above.  The
JSON holds images/s and ms/step per setting, the fastest, and the machine's description.  The
process's thread count is restored afterwards.

    python -m recipes.step_time --model resnet20 --sweep-cpu --batch 128 --steps 10 \\
        --rounds 3 --json results/step_time/cpu_sweep_resnet20.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import localopt
from localopt import models

from .common import FEEDBACK_OPTIMIZERS, Config, ConfigError, add_config_args, \
    config_from_args, device_name, freeze_parameters, load_config, make_optimizer, pick_device, \
    resolve_config_path
from .variants import Variant, add_options_arg, parse_variants
from .variants import parse_options, parse_variant  # noqa: F401  (their former home)

OPTIMIZERS = ("sgd", "adam", "muon")   # momentum 0.9 (sgd, muon), no weight decay
#: step_time's default config; the settings it reads from a config
DEFAULTS = Path(__file__).resolve().parent / "step_time.toml"
SETTINGS = ("model", "rules", "batch_size", "device", "threads", "optimizer", "lr", "seed",
            "compile", "channels_last", "feedback_options")
FEEDBACK_SETTINGS = ("feedback_optimizer", "feedback_lr", "noise")


def table_variants(model: str, path: Path | str) -> list[Variant]:
    """One variant per row of the table (``recipes/table.toml``) that has ``model``: its rule,
    the rule options ``recipes.table_runs`` would train it with, and its optimizer when this
    runner has it."""
    from .table_runs import TRAINING_KEYS, load_table, rows_for
    table = load_table(path)
    out = []
    for label in rows_for(table, model):
        row = table["rows"][label]
        values: dict[str, Any] = {}  # as table_runs.item_config merges a row's settings
        if "base" in row:
            with open(resolve_config_path(row["base"]), "rb") as fh:
                values.update({k: v for k, v in tomllib.load(fh).items() if k in TRAINING_KEYS})
        if "rule_options" in row:
            values["rule_options"] = {**values.get("rule_options", {}), **row["rule_options"]}
        values.update(row.get("settings", {}).get(model, {}))
        v = Variant(label, row["rule"], options=dict(values.pop("rule_options", {})))
        if values:
            v.row_settings = values
        notes: list[str] = []
        name = values.get("optimizer")
        v.optimizer = _known(name, OPTIMIZERS, notes, f"the row trains with optimizer {name!r}, "
                             "which step_time does not have: timed with the plain optimizer")
        if "lr" in values and name in (None, *OPTIMIZERS):
            v.lr = float(values["lr"])
        if "aux_lr" in values and name == "muon":
            v.aux_lr = float(values["aux_lr"])
        fb = values.get("feedback_options", {})
        fb_name = fb.get("feedback_optimizer")
        v.feedback_optimizer = _known(fb_name, FEEDBACK_OPTIMIZERS, notes,
                                      f"the row's feedback_optimizer {fb_name!r} is not one "
                                      "step_time has: timed with --feedback-optimizer")
        v.feedback_lr, v.noise = (float(fb[k]) if k in fb else None
                                  for k in ("feedback_lr", "noise"))
        if values.get("freeze"):
            v.freeze = list(values["freeze"])
        v.note = "; ".join(notes) or None
        out.append(v)
    return out


def _known(name: str | None, known, notes: list[str], note: str) -> str | None:
    """``name`` if this runner has it; else ``None``, and ``note`` when a name was given."""
    if name is not None and name not in known:
        notes.append(note)
    return name if name in known else None


def _as_variant(spec: "str | Variant") -> Variant:
    return spec if isinstance(spec, Variant) else Variant.parse(spec)


def build(base: torch.nn.Module, spec: "str | Variant", optimizer: str = "sgd", lr: float = 1e-3,
          feedback_lr: float = 1e-4, noise: float = 0.05, seed: int = 0,
          feedback_optimizer: str = "sgd"):
    """A copy of ``base`` wrapped for variant ``spec`` (``"plain"``: not wrapped) and the
    optimizer that trains it.  A :class:`Variant`'s options go to ``localopt.wrap``, its own
    optimizer settings replace the arguments."""
    v = _as_variant(spec)
    optimizer, lr = v.optimizer or optimizer, lr if v.lr is None else v.lr
    feedback_optimizer = v.feedback_optimizer or feedback_optimizer
    feedback_lr = feedback_lr if v.feedback_lr is None else v.feedback_lr
    noise = noise if v.noise is None else v.noise
    model = copy.deepcopy(base)
    freeze_parameters(model, v.freeze or [], f"variant {v.label!r}")
    if v.rule != "plain":
        try:
            localopt.wrap(model, v.rule, **{"seed": seed, **v.options})
        except (TypeError, ValueError) as e:
            raise ValueError(f"variant {v.label!r} ({v.describe()}): {e}") from None
    tp = v.rule != "plain" and localopt.rules.target_prop.is_target_prop(model)
    fb = {"feedback_optimizer": feedback_optimizer, "feedback_lr": feedback_lr,
          "feedback_iters": v.iters, "noise": noise} if tp else {}
    # recipes.common.make_optimizer, as recipes.train builds it (LocalOptimizer for rules that
    # learn feedback, TargetProp for target propagation, Muon's parameter groups)
    cfg = Config(optimizer=optimizer, lr=lr, momentum=0.9, weight_decay=0.0,
                 aux_lr=v.aux_lr or 0.0, feedback_options=fb)
    return model, make_optimizer(model, cfg)


def _batch(batch: int, seed: int, dev: torch.device, channels_last: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(0, 10, (batch,), generator=g).to(dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _base_model(model_name: str, seed: int, dev: torch.device,
                channels_last: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    base = models.create_model(model_name, num_classes=10).to(dev)
    return base.to(memory_format=torch.channels_last) if channels_last else base


def _lift_recompile_limits(n: int) -> None:
    """One compiled entry per model (and per feedback draw): lift dynamo's caps."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * n)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 16 * n)


def _step_fn(dev: torch.device) -> Callable:
    def step(model, opt, x, y):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return step


def measure(model_name: str, variants: "list[str | Variant]", batch: int = 64, steps: int = 20,
            rounds: int = 3, device: str = "auto", optimizer: str = "sgd", lr: float = 1e-3,
            feedback_lr: float = 1e-4, noise: float = 0.05, diagnostics: str | None = None,
            seed: int = 0, feedback_optimizer: str = "sgd", compile: bool = False,
            channels_last: bool = False, compile_backend: str = "inductor") -> dict:
    """Median seconds per step of ``plain`` and each variant (a rule spec or a
    :class:`Variant`), and the ratios to ``plain``, keyed by label (``compile``: each model run
    through ``torch.compile``; ``channels_last``: models and batch in that memory format)."""
    dev = pick_device(device)
    vs = {v.label: v for v in map(_as_variant, variants) if v.label != "plain"}
    vs = {"plain": Variant("plain", "plain"), **vs}
    if diagnostics is not None and diagnostics not in vs:
        raise ValueError(f"--diagnostics {diagnostics!r} is not one of the variants {list(vs)}")
    base = _base_model(model_name, seed, dev, channels_last)
    x, y = _batch(batch, seed, dev, channels_last)
    built = {label: build(base, v, optimizer, lr, feedback_lr, noise, seed, feedback_optimizer)
             for label, v in vs.items()}
    if compile:
        _lift_recompile_limits(len(built))
        built = {v: (torch.compile(model, backend=compile_backend), opt)
                 for v, (model, opt) in built.items()}
    step = _step_fn(dev)

    for model, opt in built.values():  # warm-up: shape probes, allocator, lazy feedback
        for _ in range(3 if compile else 2):
            step(model, opt, x, y)
    times: dict[str, list[float]] = {v: [] for v in built}
    diag: list[float] = []
    for _ in range(rounds):
        for v, (model, opt) in built.items():
            for _ in range(max(1, steps // rounds)):
                t0 = time.perf_counter()
                step(model, opt, x, y)
                times[v].append(time.perf_counter() - t0)
        if diagnostics is not None:
            t0 = time.perf_counter()
            model = built[diagnostics][0]
            localopt.diagnostics.report(getattr(model, "_orig_mod", model), F.cross_entropy,
                                        x, y)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            diag.append(time.perf_counter() - t0)
    med = {v: statistics.median(t) for v, t in times.items()}
    if diag:
        med[f"diagnostics.report ({diagnostics}), per call"] = statistics.median(diag)
    return {"model": model_name, "batch": batch, "device": device_name(dev),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "compile": compile, **({"compile_backend": compile_backend} if compile else {}),
            "channels_last": channels_last, "optimizer": f"{optimizer}(lr={lr})",
            "feedback_optimizer": feedback_optimizer,
            "feedback_lr": feedback_lr, "noise": noise,
            "steps_per_variant": len(times["plain"]), "rounds": rounds,
            "variants": {label: v.record() for label, v in vs.items()},
            "median_s": med, "ratio_to_plain": {v: t / med["plain"] for v, t in med.items()}}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sweep_cpu(model_name: str, variant: "str | Variant" = "bp", batch: int = 128,
              steps: int = 10, rounds: int = 3, optimizer: str = "sgd", lr: float = 1e-3,
              feedback_lr: float = 1e-4, noise: float = 0.05, seed: int = 0,
              feedback_optimizer: str = "sgd", threads: tuple[int, ...] = (1, 2),
              channels_last: tuple[bool, ...] = (False, True),
              compile: tuple[bool, ...] = (False, True),
              compile_backend: str = "inductor") -> dict:
    """Training throughput (images/s, median over the timed steps) of one variant on the CPU
    for every setting of ``threads`` x ``channels_last`` x ``compile``: one model per setting
    (built, compiled and warmed up under its thread count), rounds interleaved over the
    settings.  The process's thread count is restored afterwards."""
    v = _as_variant(variant)
    dev = torch.device("cpu")
    prev = torch.get_num_threads()
    settings = [(t, cl, c) for t in threads for cl in channels_last for c in compile]
    try:
        bases = {cl: _base_model(model_name, seed, dev, cl) for cl in set(channels_last)}
        batches = {cl: _batch(batch, seed, dev, cl) for cl in set(channels_last)}
        if any(compile):
            _lift_recompile_limits(len(settings))
        step = _step_fn(dev)
        built = {}
        for t, cl, c in settings:
            torch.set_num_threads(t)
            model, opt = build(bases[cl], v, optimizer, lr, feedback_lr, noise, seed,
                               feedback_optimizer)
            if c:
                model = torch.compile(model, backend=compile_backend)
            for _ in range(3 if c else 2):  # warm-up (the first compiled step compiles)
                step(model, opt, *batches[cl])
            built[t, cl, c] = model, opt
        times: dict[tuple, list[float]] = {s: [] for s in settings}
        for _ in range(rounds):
            for (t, cl, c), (model, opt) in built.items():
                torch.set_num_threads(t)
                for _ in range(max(1, steps // rounds)):
                    t0 = time.perf_counter()
                    step(model, opt, *batches[cl])
                    times[t, cl, c].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev)
    results = []
    for (t, cl, c), ts in times.items():
        med = statistics.median(ts)
        results.append({"threads": t, "channels_last": cl, "compile": c,
                        "median_s": med, "images_per_s": batch / med})
    best = max(results, key=lambda r: r["images_per_s"])
    return {"mode": "sweep-cpu", "model": model_name, "variant": v.label, **v.record(),
            "batch": batch, "device": device_name(dev),
            "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(),
                        "platform": platform.platform()},
            "torch": torch.__version__, "compile_backend": compile_backend,
            "optimizer": f"{v.optimizer or optimizer}(lr={lr if v.lr is None else v.lr})",
            "steps_per_setting": len(next(iter(times.values()))), "rounds": rounds,
            "settings": results,
            "best": {k: best[k] for k in ("threads", "channels_last", "compile",
                                          "images_per_s")}}


def _print_measure(res: dict) -> None:
    print(f"{res['model']}, batch {res['batch']}, {res['device']}, {res['threads']} threads, "
          f"{'torch.compile, ' if res['compile'] else ''}"
          f"{'channels_last, ' if res['channels_last'] else ''}"
          f"{res['optimizer']}, median of {res['steps_per_variant']} steps "
          f"(forward+backward+optimizer step)")
    described = {label: Variant(label, **rec).describe()
                 for label, rec in res["variants"].items()}
    show_rule = any(d != label for label, d in described.items() if label != "plain")
    print(f"{'variant':<40}{'ms/step':>10}{'ratio to plain':>16}"
          + ("  rule" if show_rule else ""))
    for v, t in res["median_s"].items():
        rule = f"  {described[v]}" if show_rule and v in described and v != "plain" else ""
        print(f"{v:<40}{1e3 * t:>10.1f}{res['ratio_to_plain'][v]:>16.3f}{rule}")
    for label, rec in res["variants"].items():
        if rec.get("note"):
            print(f"note ({label}): {rec['note']}")


def _print_sweep(res: dict) -> None:
    print(f"{res['model']}, {res['variant']}, batch {res['batch']}, {res['machine']['cpu']} "
          f"({res['machine']['cores']} cores), {res['optimizer']}, median of "
          f"{res['steps_per_setting']} steps (forward+backward+optimizer step)")
    print(f"{'threads':>7}{'channels_last':>15}{'compile':>9}{'ms/step':>10}{'images/s':>10}")
    for r in res["settings"]:
        print(f"{r['threads']:>7}{'on' if r['channels_last'] else 'off':>15}"
              f"{'on' if r['compile'] else 'off':>9}{1e3 * r['median_s']:>10.1f}"
              f"{r['images_per_s']:>10.1f}")
    b = res["best"]
    print(f"fastest: {b['threads']} threads, channels_last {'on' if b['channels_last'] else 'off'}"
          f", compile {'on' if b['compile'] else 'off'}: {b['images_per_s']:.1f} images/s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, SETTINGS, {"batch_size": ["--batch"]}, load_config(str(DEFAULTS)))
    add_options_arg(p)
    p.add_argument("--variants-from", metavar="TABLE_TOML",
                   help="also time every row of this table (recipes/table.toml) for --model")
    p.add_argument("--steps", type=int, default=21, help="timed steps per variant")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--feedback-optimizer", choices=sorted(FEEDBACK_OPTIMIZERS),
                   help="target propagation: feedback_options' feedback_optimizer")
    p.add_argument("--feedback-lr", type=float, help="feedback_options' feedback_lr")
    p.add_argument("--noise", type=float, help="feedback_options' noise")
    p.add_argument("--diagnostics", metavar="LABEL", help="also time diagnostics.report on it")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (--compile, --sweep-cpu)")
    p.add_argument("--sweep-cpu", action="store_true",
                   help="images/s of one variant on the CPU for threads {1,2} x channels_last "
                   "x compile")
    p.add_argument("--json", "--out", dest="json", help="also write the result to this file")
    return p


def _settings(a: argparse.Namespace) -> tuple[Config, dict[str, Any], list[Variant]]:
    """The config (``recipes/step_time.toml`` or ``--config``, then the flags), the target
    propagation's feedback settings and the variants."""
    a.config = a.config or str(DEFAULTS)
    cfg = config_from_args(a)
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {cfg.optimizer!r}: step_time times "
                          f"{', '.join(OPTIMIZERS)}")
    fb = {k: v for k, v in {**load_config(str(DEFAULTS)).feedback_options,
                            **cfg.feedback_options}.items() if k in FEEDBACK_SETTINGS}
    fb.update({k: getattr(a, k) for k in FEEDBACK_SETTINGS if getattr(a, k) is not None})
    if fb["feedback_optimizer"] not in FEEDBACK_OPTIMIZERS:
        raise ConfigError(f"--feedback-options feedback_optimizer={fb['feedback_optimizer']!r}: "
                          f"choose one of {', '.join(FEEDBACK_OPTIMIZERS)}")
    entries = cfg.rules
    if a.rules is None and (a.sweep_cpu or a.variants_from):
        entries = ["bp"] if a.sweep_cpu else []
    variants = parse_variants(entries, a.options)
    if a.variants_from:
        taken = {v.label for v in variants}
        rows = table_variants(cfg.model, a.variants_from)
        clash = [v.label for v in rows if v.label in taken]
        if clash:
            raise ConfigError(f"--rules labels {', '.join(clash)} are also rows of "
                              f"{a.variants_from}: rename them (LABEL=RULE)")
        if not rows:
            raise ConfigError(f"{a.variants_from} has no row for model {cfg.model!r}")
        variants = rows + variants
    return cfg, fb, variants


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        cfg, fb, variants = _settings(a)
        common = dict(optimizer=cfg.optimizer, lr=cfg.lr, feedback_lr=fb["feedback_lr"],
                      noise=fb["noise"], seed=cfg.seed,
                      feedback_optimizer=fb["feedback_optimizer"],
                      compile_backend=a.compile_backend)
        if a.sweep_cpu:
            if len(variants) != 1 or a.variants_from:
                raise ValueError("--sweep-cpu times one variant: give one entry of --rules")
            bad = [f for f, on in (("--threads", (a.threads or 0) > 0), ("--compile", a.compile),
                                   ("--channels-last", a.channels_last),
                                   ("--diagnostics", a.diagnostics is not None),
                                   ("--device", a.device not in (None, "auto", "cpu"))) if on]
            if bad:
                raise ValueError(f"--sweep-cpu sets threads, channels_last and compile itself "
                                 f"on the CPU: drop {', '.join(bad)}")
            res = sweep_cpu(cfg.model, variants[0], cfg.batch_size, a.steps, a.rounds, **common)
        else:
            if cfg.threads > 0:
                torch.set_num_threads(cfg.threads)
            res = measure(cfg.model, variants, cfg.batch_size, a.steps, a.rounds, cfg.device,
                          diagnostics=a.diagnostics, compile=cfg.compile,
                          channels_last=cfg.channels_last, **common)
    except (ValueError, ConfigError) as e:
        p.exit(2, f"error: {e}\n")
    (_print_sweep if a.sweep_cpu else _print_measure)(res)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
