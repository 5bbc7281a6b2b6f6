"""Model-parallel training: localopt's direct-feedback pipeline against torch's backprop
pipeline schedules -- measured throughput, timelines, and an event simulation for more stages.

    python -m recipes.pipeline --model mlp3x1024 --stages 2 --microbatches 2,4,8 \\
        --schedules gpipe,1f1b,zb,dfa,drtp --json results/pipeline/mlp3x1024.json \\
        --timeline results/pipeline --simulate 4,8,16,32
    torchrun --nproc-per-node 2 -m recipes.pipeline ...            # the same, under torchrun
    python -m recipes.pipeline --model mlp3x1024 --schedules dfa --epochs 2 \\
        --json results/pipeline/accuracy_mlp3x1024.json            # train on CIFAR-10
    python -m recipes.pipeline --model mlp3x1024 --stages 1 --schedules dfa --epochs 2 ...
                                                                     # the same, one process
    python -m recipes.pipeline --report results/pipeline           # README.md from the JSONs
                                              # (recipes.pipeline_report), and the guide's block

Schedules: ``gpipe``, ``1f1b``, ``zb`` are torch.distributed.pipelining's backprop schedules
(``ScheduleGPipe``, ``Schedule1F1B``, ``ScheduleZBVZeroBubble``: two stages per process) on
the unwrapped model; any localopt rule name (``dfa``, ``bdfa``, ``dkp``, ``drtp``) wraps the
model with that rule (``--rule-options``; ResNets: module-wise, every block receives ``e``)
and runs localopt's ``direct`` schedule.

Without ``--epochs`` (throughput): every schedule and micro-batch count ``K`` runs
``--warmup`` untimed and ``--steps`` timed training steps (SGD) on one fixed random batch;
images/s = steps x batch / (end of the last timed step on any process - start of the first
on any process), with no barrier between steps.  Per stage the recipe records the idle
fraction (1 - time inside forward/backward/communication calls and the optimizer step,
over that window), the mean forward/backward time per micro-batch, what each process holds
(``PipelineStep.memory()``: the model is built on the meta device, each process materialises
its stage), and a timeline of two steps of the steady state
(:mod:`localopt.pipeline.analysis`).  The measured costs drive
:func:`localopt.pipeline.timeline.simulate`, first for the measured ``S`` (its error against
the measurement is recorded), then for the stage counts of ``--simulate`` under the
assumption of ``--deepen`` (:mod:`recipes.pipeline_sim`).

The split (``--split auto``, default) balances measured per-module costs: a one-process
profile (one micro-batch of the ``K = 4`` size) times the forward and backward of every
module of the model's sequence, and each family of schedules gets the contiguous cut that
minimises its slowest stage (backprop: forward + backward; layer-wise direct rules:
forward + weight gradients, module-wise ones as backprop; ``zb``: ``2 S`` stages, the V
placement's busiest process).  Process count
``S`` = ``--stages``; the processes run on 127.0.0.1 (gloo) with ``--threads`` torch
threads each.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from localopt.pipeline.analysis import (analyse, best_split, measure_link, profile_units,
                                        speedups)
from localopt.pipeline.backprop import BACKPROP_SCHEDULES as BACKPROP
from localopt.pipeline.direct import DIRECT_RULES as DIRECT

from .pipeline_report import percents
from .pipeline_sim import (ASYNC, NUM_CLASSES, bytes_per_step, simulate_all,
                           base as _base, csv_list as _csv, family as _family)

IMAGE = (3, 32, 32)
LINK_SIZES = [4, 16384, 131072, 524288, 2097152]     # ping-pong message sizes (bytes)
#: options of the direct rules per model (--rule-options overrides): a ResNet cannot be cut
#: before a layer that layer-wise DFA hooks (a block's input also feeds its shortcut), so the
#: direct rules run module-wise there (Han et al. 2020): every block receives e at its input.
#: ``"modules": "blocks"`` stands for ``localopt.pipeline.blocks(model)``: every block, whatever
#: the depth.
DEFAULT_RULE_OPTIONS = {"resnet": {"modules": "blocks"}}
DEFAULT_TRAIN = {   # optimizer of --epochs runs: the settings of the repo's configs
    "mlp3x1024": dict(config="mlp_bartunov2018", lr=3.886644634575892e-4,
                      eps=6.565611200656028e-4, model_options={"init": "xavier"}),
    "resnet20": dict(config="resnet20_biotorch_adam", lr=1e-3, eps=1e-8, model_options={}),
}


# ------------------------------------------------------------------------------ splitting

def _profile(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`~localopt.pipeline.analysis.profile_units` of ``--model`` on a quarter batch."""
    from localopt.models import create_model
    torch.manual_seed(args.seed)
    model = create_model(args.model, **(args.model_options or {}))
    g = torch.Generator().manual_seed(args.seed)
    batch = max(1, args.batch // 4)
    x = torch.randn(batch, *IMAGE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return profile_units(model, x, y)


def plan_splits(args: argparse.Namespace) -> dict[str, Any]:
    """The split of every family of schedules (see the module docstring)."""
    S = args.stages
    labels = _csv(args.schedules)
    prof = _profile(args)
    names, cand = prof["units"], prof["candidate"]
    bp = [f + b for f, b in zip(prof["forward"], prof["backward"])]
    direct = [f + w for f, w in zip(prof["forward"], prof["backward_weight"])]
    explicit = None if args.split == "auto" else _csv(args.split)
    splits: dict[str, list[str]] = {}
    for lb in labels:
        fam = "zb" if lb == "zb" else _family(lb)
        if fam in splits:
            continue
        if fam == "zb":
            place = list(range(S)) + list(range(S - 1, -1, -1))          # V: 0,1,..,1,0
            splits[fam] = (_csv(args.split_zb) if args.split_zb else
                           [names[k] for k in best_split(bp, cand, 2 * S, place)])
        elif explicit is not None:
            splits[fam] = explicit
        else:
            # layer-wise rules skip the input gradient of every hooked layer (forward + weight
            # gradients); module-wise ones keep backprop inside each module (about bp's cost)
            cost = direct if fam != "bp" and not rule_options(args).get("modules") else bp
            splits[fam] = [names[k] for k in best_split(cost, cand, S)]
    return {"splits": splits, "profile": prof,
            "how": "explicit --split" if explicit else
            "auto: the contiguous cut minimising the slowest stage (backprop: forward + "
            "backward; layer-wise direct rules: forward + weight gradients, module-wise ones: "
            "as backprop; zb: the busiest process of the V placement), from a one-process "
            f"profile at batch {prof['batch']}"}


# ------------------------------------------------------------------------------ one rank

def rule_options(args, model: nn.Module | None = None, rule: str | None = None) -> dict:
    """The rule options of ``args`` for ``model`` (``"modules": "blocks"``: its blocks; kept as
    written without a model).  ``drtp`` runs its published, target-only signal
    (``gate=False``), the form the direct schedule pipelines, unless ``args`` says otherwise."""
    from localopt.pipeline import blocks
    opts = args.rule_options if args.rule_options is not None else next(
        (v for k, v in DEFAULT_RULE_OPTIONS.items() if args.model.startswith(k)), {})
    if rule == "drtp":
        opts = {"gate": False, **opts}
    if model is not None and opts.get("modules") == "blocks":
        opts = {**opts, "modules": blocks(model)}
    return opts


def _rule_schedule(label: str) -> tuple[str, str]:
    return ("none", label) if label in BACKPROP else (_base(label), "direct")


def _build(args, label: str, M: int, plan: dict, model_options: dict | None = None,
           meta: bool = False):
    """This rank's pipeline of ``label``.  ``meta``: the model is built on the meta device and
    each rank materialises its stage only (values drawn by module name: throughput runs);
    else every rank builds the whole model from ``--seed`` (training runs, whose
    initialisation is the one-process run's)."""
    import localopt
    from localopt import pipeline as lp
    from localopt.models import create_model
    rule, sched = _rule_schedule(label)
    torch.manual_seed(args.seed)
    with torch.device("meta" if meta else "cpu"):
        model = create_model(args.model, **{**args.model_options, **(model_options or {})})
        if rule != "none":
            localopt.wrap(model, rule, seed=args.seed, **rule_options(args, model, rule))
    split = plan["splits"]["zb" if label == "zb" else _family(label)]
    pipe = lp.build(model, split=split, schedule=sched, microbatches=M,
                    loss_fn=F.cross_entropy, example=torch.zeros(1, *IMAGE),
                    timeout=args.timeout, seed=args.seed if meta else None,
                    asynchronous=label.endswith(ASYNC))
    return model, pipe


def _measure(args, label: str, M: int, plan: dict) -> dict[str, Any]:
    """Throughput run of one (schedule, K) on this rank; gathered on every rank."""
    model, pipe = _build(args, label, M, plan, meta=True)
    opt = pipe.optimizer(torch.optim.SGD, lr=args.lr_throughput, momentum=0.9)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, *IMAGE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), generator=g)
    steps = []
    losses = []
    for k in range(args.warmup + args.steps):
        if k == args.warmup:
            dist.barrier()
            first = time.perf_counter()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = pipe.step(x, y)
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if loss is not None:
            losses.append(float(loss))
        if k >= args.warmup:
            steps.append({"t": (t0, t1, t2), "events": [tuple(e) for e in pipe.events]})
    last = time.perf_counter()
    pipe.flush()
    mine = {"rank": dist.get_rank(), "stages": list(getattr(pipe, "stages", [pipe.stage])),
            "first": first, "last": last, "steps": steps, "losses": losses,
            "policy_peak_in_flight": pipe.peak_in_flight, **pipe.memory()}   # MEMORY_KEYS
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    del pipe, model, opt
    return {"label": label, "M": M, "ranks": everyone}


def _worker(args_dict: dict, plan: dict) -> dict | None:
    """Every rank: the throughput runs (or ``--epochs`` training); rank 0 returns the gathered
    results, the others ``None``."""
    args = argparse.Namespace(**args_dict)
    torch.set_num_threads(args.threads)
    from localopt import pipeline as lp
    from localopt.pipeline.comm import init_group
    init_group(torch.device("cpu"), args.timeout)
    try:
        if args.epochs:
            from .pipeline_train import train
            out = train(args, plan)
        else:
            out = {"link": measure_link(LINK_SIZES, timeout=args.timeout), "runs": []}
            for label in _csv(args.schedules):
                for M in _csv(args.microbatches, int):
                    if dist.get_rank() == 0:
                        print(f"[pipeline] {label} K={M}", flush=True)
                    out["runs"].append(_measure(args, label, M, plan))
        return out if dist.get_rank() == 0 else None
    finally:
        lp.destroy()


# ------------------------------------------------------------------------------ driver

def _meta(args, command: str) -> dict[str, Any]:
    from .common import git_commit
    procs = (f"{args.stages} processes x {args.threads} torch thread(s), gloo on 127.0.0.1"
             if args.stages > 1 else f"one process, {args.threads} torch thread(s)")
    return {"device": f"cpu ({os.cpu_count()} cores), {procs}",
            "torch": torch.__version__, "git": git_commit(), "model": args.model,
            "model_options": args.model_options, "rule_options": rule_options(args),
            "stages": args.stages, "batch": args.batch, "steps": args.steps,
            "warmup": args.warmup, "threads": args.threads, "command": command,
            "max_steps_per_epoch": args.max_steps or None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average": args.load_before, "load_average_after": list(os.getloadavg())}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp3x1024")
    p.add_argument("--model-options", default="{}", type=json.loads,
                   help='JSON options of create_model, e.g. \'{"hidden": [64, 64]}\'')
    p.add_argument("--stages", type=int, default=2, help="processes S (zb: 2S stages)")
    p.add_argument("--microbatches", default="2,4,8", help="comma list of K")
    p.add_argument("--schedules", default="gpipe,1f1b,zb,dfa,drtp")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    p.add_argument("--steps", type=int, default=20, help="timed steps per schedule and K")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--timeline", metavar="DIR", help="timeline PNGs here")
    p.add_argument("--simulate", default="", metavar="S,..", help="simulate these stage counts")
    p.add_argument("--bandwidth", default="loopback,100,10,1",
                   help="links of the bandwidth sweep: Gbit/s, or 'loopback' (the measured one)")
    p.add_argument("--latency", type=float, default=5e-5,
                   help="seconds per message on the links of --bandwidth (not loopback)")
    p.add_argument("--deepen", default="blocks", choices=("blocks", "finer"),
                   help="cost assumption for --simulate (localopt.pipeline.timeline.deepen)")
    p.add_argument("--split", default="auto", help="'auto' or comma list of split points")
    p.add_argument("--split-zb", default="", help="split points of zb (2S-1 names)")
    p.add_argument("--rule-options", default=None, type=json.loads,
                   help="JSON options of localopt.wrap for the direct rules (default: "
                        "module-wise on every block for ResNets, {} otherwise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr-throughput", type=float, default=1e-3, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds any message may take")
    p.add_argument("--run-timeout", type=float, default=3600.0,
                   help="seconds the whole multi-process run may take")
    p.add_argument("--epochs", type=int, default=0, help="train on CIFAR-10 this many epochs")
    p.add_argument("--eval-every", type=int, default=0, help="--epochs: also test every this "
                   "many steps (the time-to-accuracy curve)")
    p.add_argument("--max-steps", type=int, default=0, help="--epochs: at most this many "
                   "steps per epoch (0: all)")
    p.add_argument("--data", default="", help="CIFAR-10 location (recipes.data.find_data)")
    p.add_argument("--lr", type=float, default=0.0, help="--epochs: Adam lr (default: the "
                   "model's config)")
    p.add_argument("--report", metavar="DIR", help="write DIR/README.md from DIR/*.json")
    p.add_argument("--resimulate", metavar="JSON", nargs="+",
                   help="re-run the simulation of these throughput JSON files from their "
                   "recorded measurements (rewritten in place)")
    p.add_argument("--readme", default=None,
                   help="with --report: a page whose pipeline block gets the headline "
                   "(default: the checkout's docs/guide/model-parallel.md and README.md when "
                   "DIR is its results/pipeline)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.load_before = list(os.getloadavg())          # 1, 5, 15 min (recorded in the JSON)
    if args.resimulate:
        from .pipeline_sim import resimulate
        for f in args.resimulate:
            if "simulation" not in json.loads(Path(f).read_text()):
                continue
            try:
                resimulate(f)
                print(f"resimulated {f}")
            except ValueError as exc:
                print(f"left as it is: {exc}")
        return 0
    if args.report:
        repo = Path(__file__).resolve().parents[1]
        if args.readme:
            pages = [Path(args.readme)]
        elif Path(args.report).resolve() == repo / "results" / "pipeline":
            pages = [repo / "docs" / "guide" / "model-parallel.md", repo / "README.md"]
        else:
            pages = []
        from .pipeline_report import write_report
        path = write_report(Path(args.report), readme=pages)
        print(f"wrote {path}")
        return 0
    command = "python -m recipes.pipeline " + " ".join(sys.argv[1:] if argv is None else argv)
    labels = _csv(args.schedules)
    for lb in labels:
        if lb not in BACKPROP and _base(lb) not in DIRECT:
            raise SystemExit(f"error: --schedules {lb!r}: choose from "
                             f"{', '.join(BACKPROP + DIRECT)}, or a direct rule + {ASYNC!r} "
                             "(the asynchronous direct schedule)")
    if not args.latency > 0:
        raise SystemExit(f"error: --latency {args.latency!r} must be a positive number of "
                         "seconds")
    for b in _csv(args.bandwidth):
        try:
            ok = b == "loopback" or float(b) > 0
        except ValueError:
            ok = False
        if not ok:
            raise SystemExit(f"error: --bandwidth {b!r}: give positive numbers of Gbit/s or "
                             "'loopback'")
    if args.stages == 1:
        if not args.epochs or any(lb in BACKPROP for lb in labels):
            raise SystemExit("error: --stages 1 is the one-process reference of an --epochs "
                             "run of localopt rules")
        from .pipeline_train import train_single
        out = train_single(args)
        _finish_training(out, args, command)
        return 0
    from localopt.pipeline.comm import under_launcher
    if under_launcher():
        torch.set_num_threads(args.threads)
        from localopt.pipeline.comm import init_group
        init_group(torch.device("cpu"), args.timeout)
        if dist.get_world_size() != args.stages:
            raise SystemExit(f"error: --stages {args.stages} but torchrun started "
                             f"{dist.get_world_size()} processes")
        box = [plan_splits(args) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        plan = box[0]
        res = _worker(vars(args), plan)
        if res is None:
            return 0
    else:
        from localopt import pipeline as lp
        torch.set_num_threads(args.threads)
        plan = plan_splits(args)
        print(f"[pipeline] splits: {plan['splits']}", flush=True)
        res = lp.launch(_worker, nprocs=args.stages, args=(vars(args), plan),
                        timeout=args.run_timeout, threads=args.threads)[0]
    if args.epochs:
        _finish_training(res, args, command)
    else:
        _finish_throughput(res, args, plan, command)
    return 0


def _finish_training(res: dict, args, command: str) -> None:
    res["meta"] = _meta(args, command)
    res["meta"]["epochs"] = args.epochs
    res["meta"]["eval_every"] = args.eval_every or None
    res["meta"]["background_paused"] = bool(os.environ.get("LOCALOPT_BACKGROUND_PAUSED"))
    for run in res["runs"]:
        last = run["epochs"][-1]
        print(f"{run['label']} (S={args.stages}, K={run['M']}): test acc "
              f"{100 * last['test_acc']:.2f}% after {last['epoch']} epochs, "
              f"{last['images_per_s']:.0f} img/s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


def _finish_throughput(res: dict, args, plan: dict, command: str) -> None:
    from .plots import plot_speedup, plot_timelines
    runs, panels = [], {}
    for raw in res["runs"]:
        a = analyse(raw, args.batch)
        events = a.pop("timeline_events")
        runs.append({"label": raw["label"], "M": raw["M"], "S": args.stages, **a,
                     "bytes_per_step": bytes_per_step(plan, raw["label"], raw["M"],
                                                      args.batch, args.stages)})
        panels.setdefault(raw["M"], {})[raw["label"]] = events
    out = {"meta": _meta(args, command), "link": res["link"],
           "splits": plan["splits"], "split_how": plan["how"],
           "profile": plan["profile"], "runs": runs}
    sim = simulate_all({"link": res["link"], "runs": runs}, args, plan)
    s8 = sim.pop("_s8_events")
    out["meta"]["background_paused"] = bool(os.environ.get("LOCALOPT_BACKGROUND_PAUSED"))
    out["simulation"] = sim
    out["speedup_measured"] = speedups(runs)
    out["speedup_simulated"] = speedups(sim["scaled"])
    out["speedup_simulated_free_messages"] = speedups(sim["scaled"], "images_per_s_free_messages")
    files = {}
    stem = Path(args.json).stem if args.json else args.model
    if args.timeline:
        d = Path(args.timeline)
        k_one = min(panels, key=lambda m: (abs(m - 4), m))   # one figure per schedule at K~4
        for label, ev in panels[k_one].items():
            ips = next(r["images_per_s"] for r in runs if r["M"] == k_one and r["label"] == label)
            f = d / f"{stem}_timeline_{label}_K{k_one}.png"
            plot_timelines({f"{label}: {ips:.0f} img/s (measured)": ev}, f,
                           title=f"{args.model}, S={args.stages} processes, K={k_one} "
                                 f"micro-batches of {args.batch // k_one}: two steps of the "
                                 "steady state")
            files[f"timeline_{label}_K{k_one}"] = str(f)
        for M, pan in panels.items():
            f = d / f"{stem}_timeline_K{M}.png"
            ips = {r["label"]: r["images_per_s"] for r in runs if r["M"] == M}
            plot_timelines({f"{lb}: {ips[lb]:.0f} img/s (measured)": ev
                            for lb, ev in pan.items()}, f,
                           title=f"{args.model}, S={args.stages} processes, K={M} micro-batches "
                                 f"of {args.batch // M}: two steps of the steady state")
            files[f"timeline_K{M}"] = str(f)
        if s8:
            f = d / f"{stem}_simulated_S8_K8.png"
            plot_timelines(s8, f, title=f"{args.model}: simulated S=8, K=8 "
                                        f"({args.deepen} assumption)")
            files["simulated_S8_K8"] = str(f)
        if sim["bandwidth"]["rows"]:
            from .plots import plot_bandwidth
            f = d / f"{stem}_bandwidth.png"
            plot_bandwidth(sim["bandwidth"]["speedup"], f,
                           f"{args.model}: best direct schedule over the fastest backprop one, "
                           f"simulated from the measured costs ({args.deepen} assumption)")
            files["bandwidth"] = str(f)
        if sim["scaled"]:
            f = d / f"{stem}_speedup.png"
            plot_speedup(runs, sim["scaled"], f, f"{args.model}: direct-feedback schedules "
                         f"over the fastest backprop schedule")
            files["speedup"] = str(f)
    out["files"] = files
    for r in runs:
        print(f"{r['label']:>6} K={r['M']}: {r['images_per_s']:7.0f} img/s, idle "
              + percents(r["idle_fraction"]))
    for c in sim["check"]:
        print(f"  sim {c['label']:>6} K={c['M']}: {c['simulated_images_per_s']:7.0f} img/s "
              f"({100 * c['error']:+.1f}%)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
