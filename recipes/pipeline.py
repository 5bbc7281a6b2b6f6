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
over that window), the mean forward/backward time per micro-batch, and a timeline of
two steps of the steady state.  The measured costs drive :func:`localopt.pipeline.timeline.simulate`,
first for the measured ``S`` (its error against the measurement is recorded), then for the
stage counts of ``--simulate`` under the assumption of ``--deepen``.

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
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

BACKPROP = ("gpipe", "1f1b", "zb")
DIRECT = ("dfa", "bdfa", "dkp", "drtp")
IMAGE = (3, 32, 32)
LINK_SIZES = [4, 16384, 131072, 524288, 2097152]     # ping-pong message sizes (bytes)
NUM_CLASSES = 10
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


def _csv(text: str, cast=str) -> list:
    return [cast(t) for t in str(text).split(",") if t.strip()]


# ------------------------------------------------------------------------------ splitting

def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's sequence (:func:`localopt.pipeline.split.sequence`) with its
    ``nn.Sequential`` entries opened one level: the places a stage may begin."""
    from localopt.pipeline.split import sequence
    out = []
    for name, m in sequence(model):
        if isinstance(m, nn.Sequential) and len(m):
            out += [(f"{name}.{c}", cm) for c, cm in m.named_children()]
        else:
            out.append((name, m))
    return out


def _candidate(m: nn.Module) -> bool:
    """A stage may begin at a module with parameters (a layer or a block), not at an
    activation, so that a stage's input is read by a layer."""
    return any(True for _ in m.parameters())


def profile_units(model_name: str, batch: int, steps: int = 8, warmup: int = 3,
                  seed: int = 0, options: dict | None = None) -> dict[str, Any]:
    """One process, plain autograd: per unit of the model's sequence (run on its own, on a
    detached input as a pipeline stage would), the median time of its forward, of its full
    backward, of its input gradient alone and of its weight gradients alone, on a batch of
    ``batch`` images; and the bytes of its input per sample.  The last unit includes the
    loss.  A direct-feedback rule's backward of a unit is about its weight-gradient part (the
    input gradient becomes a projection of ``e``, cheap for 10 classes)."""
    from localopt.models import create_model
    torch.manual_seed(seed)
    model = create_model(model_name, **(options or {}))
    seq = units(model)
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, *IMAGE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    n = len(seq)
    keys = ("forward", "backward", "backward_input", "backward_weight")
    t: dict[str, list[list[float]]] = {k: [[] for _ in range(n)] for k in keys}
    in_bytes = []
    with torch.no_grad():
        ins = []
        for _, m in seq:
            ins.append(h)
            in_bytes.append(h[0].numel() * h.element_size())
            h = m(h)
    for k, (_, m) in enumerate(seq):
        params = [p for p in m.parameters() if p.requires_grad]
        below = any(p.requires_grad for _, u in seq[:k] for p in u.parameters())
        inp = ins[k].detach().requires_grad_(below)   # the model input needs no gradient
        last = k == n - 1

        def fwd():
            out = m(inp)
            return F.cross_entropy(out, y) if last else out
        with torch.no_grad():
            gout = None if last else torch.randn_like(m(inp))
        for it in range(warmup + steps):
            t0 = time.perf_counter()
            out = fwd()
            t1 = time.perf_counter()
            if out.requires_grad:                     # not: a parameter-free first unit
                torch.autograd.backward(out, gout)
            t2 = time.perf_counter()
            m.zero_grad(set_to_none=True)
            ti = tw = 0.0
            if below:
                out = fwd()
                t3 = time.perf_counter()
                torch.autograd.grad(out, [inp], gout)
                ti = time.perf_counter() - t3
            if params:
                out = fwd()
                t3 = time.perf_counter()
                torch.autograd.grad(out, params, gout)
                tw = time.perf_counter() - t3
            if it >= warmup:
                for key, v in zip(keys, (t1 - t0, t2 - t1, ti, tw)):
                    t[key][k].append(v)
    return {"units": [nm for nm, _ in seq], "candidate": [_candidate(m) for _, m in seq],
            "input_bytes_per_sample": in_bytes, "batch": batch,
            **{key: [statistics.median(v) for v in t[key]] for key in keys}}


def best_split(cost: list[float], candidate: list[bool], parts: int,
               placement: list[int] | None = None) -> list[int]:
    """Indices where parts 1..parts-1 begin (contiguous cuts at candidate units), minimising
    the costliest process (``placement[p]`` = process of part ``p``; default one part per
    process), then the costliest part."""
    import itertools
    n = len(cost)
    cuts_ok = [k for k in range(1, n) if candidate[k]]
    if len(cuts_ok) < parts - 1:
        raise ValueError(f"cannot cut {n} units into {parts} stages (only {len(cuts_ok)} "
                         "possible split points)")
    placement = placement or list(range(parts))
    best, arg = None, None
    for cuts in itertools.combinations(cuts_ok, parts - 1):
        bounds = [0, *cuts, n]
        part = [sum(cost[a:b]) for a, b in zip(bounds, bounds[1:])]
        procs: dict[int, float] = {}
        for p, c in zip(placement, part):
            procs[p] = procs.get(p, 0.0) + c
        key = (round(max(procs.values()), 9), round(max(part), 9))
        if best is None or key < best:
            best, arg = key, list(cuts)
    return arg


def plan_splits(args: argparse.Namespace) -> dict[str, Any]:
    """The split of every family of schedules (see the module docstring)."""
    S = args.stages
    labels = _csv(args.schedules)
    prof = profile_units(args.model, max(1, args.batch // 4), options=args.model_options)
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

def _family(label: str) -> str:
    return "bp" if label in BACKPROP else label


def rule_options(args, model: nn.Module | None = None) -> dict:
    """The rule options of ``args`` for ``model`` (``"modules": "blocks"``: its blocks; kept as
    written without a model)."""
    from localopt.pipeline import blocks
    opts = args.rule_options if args.rule_options is not None else next(
        (v for k, v in DEFAULT_RULE_OPTIONS.items() if args.model.startswith(k)), {})
    if model is not None and opts.get("modules") == "blocks":
        opts = {**opts, "modules": blocks(model)}
    return opts


def _rule_schedule(label: str) -> tuple[str, str]:
    return ("none", label) if label in BACKPROP else (label, "direct")


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
            localopt.wrap(model, rule, seed=args.seed, **rule_options(args, model))
    split = plan["splits"]["zb" if label == "zb" else _family(label)]
    pipe = lp.build(model, split=split, schedule=sched, microbatches=M,
                    loss_fn=F.cross_entropy, example=torch.zeros(1, *IMAGE),
                    timeout=args.timeout, seed=args.seed if meta else None)
    return model, pipe


def _ping(nbytes: int, reps: int) -> float:
    """Median one-way time of a ``nbytes`` message between ranks 0 and 1 (round trip / 2)."""
    rank = dist.get_rank()
    t = torch.zeros(max(1, nbytes // 4))
    times = []
    timeout = datetime.timedelta(seconds=60)
    for _ in range(reps):
        t0 = time.perf_counter()
        if rank == 0:
            dist.isend(t, 1).wait(timeout)
            dist.irecv(t, 1).wait(timeout)
        elif rank == 1:
            dist.irecv(t, 0).wait(timeout)
            dist.isend(t, 0).wait(timeout)
        times.append((time.perf_counter() - t0) / 2)
    return statistics.median(times)


def measure_link(sizes: list[int], reps: int = 20) -> dict[str, float]:
    """Latency (the smallest message's one-way time) and per-byte cost (the slope to the
    largest) of a message on this process group, from ping-pong times of ``sizes``."""
    if dist.get_world_size() < 2:
        return {"latency": 0.0, "per_byte": 0.0, "sizes": [], "times": []}
    _ping(sizes[0], 3)
    ts = [_ping(s, reps) for s in sizes]
    slope = max(0.0, (ts[-1] - ts[0]) / (sizes[-1] - sizes[0]))
    return {"latency": ts[0], "per_byte": slope, "sizes": sizes, "times": ts}


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
    mine = {"rank": dist.get_rank(), "stages": list(getattr(pipe, "stages", [pipe.stage])),
            "first": first, "last": last, "steps": steps, "losses": losses,
            **pipe.memory()}                                   # MEMORY_KEYS
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
            out = _train(args, plan)
        else:
            out = {"link": measure_link(LINK_SIZES), "runs": []}
            for label in _csv(args.schedules):
                for M in _csv(args.microbatches, int):
                    if dist.get_rank() == 0:
                        print(f"[pipeline] {label} K={M}", flush=True)
                    out["runs"].append(_measure(args, label, M, plan))
        return out if dist.get_rank() == 0 else None
    finally:
        lp.destroy()


# ------------------------------------------------------------------------------ training

def _training_data(args) -> tuple:
    """CIFAR-10 (``--data``) split for training (all 50k) and test, the normaliser, the model's
    training defaults, and the results record to fill."""
    from .data import Normalizer, load_cifar10, make_splits
    arrays = load_cifar10(args.data or None)
    dflt = DEFAULT_TRAIN.get(args.model, DEFAULT_TRAIN["resnet20"])
    return (make_splits(arrays, "full", "cpu"), Normalizer("cpu"), dflt,
            {"data": arrays.description, "runs": []})


def _train(args, plan: dict) -> dict[str, Any]:
    """Train on CIFAR-10 (``--data``), pipelined; test accuracy after every epoch."""
    splits, norm, dflt, out = _training_data(args)
    for label in _csv(args.schedules):
        M = _csv(args.microbatches, int)[0]
        model, pipe = _build(args, label, M, plan, dflt["model_options"])
        opt = pipe.optimizer(torch.optim.Adam, lr=args.lr or dflt["lr"], eps=dflt["eps"])
        hist = _train_loop(args, model, pipe.step, pipe.predict, opt, splits, norm,
                           is_last=dist.get_rank() == pipe.output_rank)
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, hist)
        hist = next(h for h in everyone if h["epochs"] and h["epochs"][0].get("test_acc")
                    is not None)
        out["runs"].append({"label": label, "M": M, "optimizer": dict(
            name="adam", lr=args.lr or dflt["lr"], eps=dflt["eps"]), **hist})
    return out


def _train_loop(args, model, step_fn, predict_fn, opt, splits, norm, is_last: bool) -> dict:
    """Epochs of shuffled batches (seeded by (seed, epoch), the same on every rank), then the
    test set in eval mode (BatchNorm running statistics) on the last stage."""
    train, test = splits["train"], splits["test"]
    n, bs = len(train), args.batch
    hist: dict[str, Any] = {"epochs": []}
    for epoch in range(1, args.epochs + 1):
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=gen)
        model.train()
        t0 = time.perf_counter()
        loss_sum, seen, curve = 0.0, 0, []
        nsteps = n // bs if not args.max_steps else min(n // bs, args.max_steps)
        for k in range(nsteps):
            idx = perm[k * bs:(k + 1) * bs]
            x, y = norm(train.x[idx]), train.y[idx]
            opt.zero_grad(set_to_none=True)
            loss = step_fn(x, y)
            opt.step()
            if loss is not None:
                loss_sum += float(loss) * len(y)
                seen += len(y)
                if k % 50 == 0:
                    curve.append([k, float(loss)])
        elapsed = time.perf_counter() - t0
        correct, tot = 0, 0
        model.eval()
        for i in range(0, len(test), 1000):
            with torch.no_grad():
                out = predict_fn(norm(test.x[i:i + 1000]))
            if out is not None:
                correct += int((out.argmax(1) == test.y[i:i + 1000]).sum())
                tot += len(out)
        rec = {"epoch": epoch, "train_loss": loss_sum / seen if seen else None,
               "test_acc": correct / tot if tot else None, "time_s": elapsed,
               "images_per_s": nsteps * bs / elapsed, "loss_curve": curve}
        hist["epochs"].append(rec)
        if is_last:
            print(f"[pipeline] epoch {epoch}: train loss {rec['train_loss']:.4f}, test acc "
                  f"{rec['test_acc']:.4f}, {elapsed:.0f} s", flush=True)
    return hist


def _train_single(args) -> dict[str, Any]:
    """``--stages 1``: the same training loop on the whole model in this process."""
    import localopt
    from localopt.models import create_model
    torch.set_num_threads(args.threads)
    splits, norm, dflt, out = _training_data(args)
    for label in _csv(args.schedules):
        rule, _ = _rule_schedule(label)
        torch.manual_seed(args.seed)
        model = create_model(args.model, **{**args.model_options, **dflt["model_options"]})
        if rule != "none":
            localopt.wrap(model, rule, seed=args.seed, **rule_options(args, model))
        opt = torch.optim.Adam(model.parameters(), lr=args.lr or dflt["lr"], eps=dflt["eps"])

        def step(x, y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss.detach()
        hist = _train_loop(args, model, step, model, opt, splits, norm, is_last=True)
        out["runs"].append({"label": label, "M": 1, "optimizer": dict(
            name="adam", lr=args.lr or dflt["lr"], eps=dflt["eps"]), **hist})
    return out


# ------------------------------------------------------------------------------ analysis

def _mean(v: list[float]) -> float:
    """Means, not medians: the sum of the durations is what the step takes."""
    return statistics.fmean(v) if v else 0.0


#: what each process holds (localopt.pipeline.PipelineStep.memory), per process in the JSON
MEMORY_KEYS = ("parameter_bytes", "rule_state_bytes", "state_bytes", "model_parameter_bytes")


def analyse(run: dict, batch: int) -> dict[str, Any]:
    """Throughput, idle fractions and per-stage costs of one gathered run.

    Per process, over the timed window: *busy* = time inside forward/backward/send/recv calls
    and the optimizer step; *waiting* = time blocked on messages; the rest is the schedule's
    own overhead (Python between the calls).  idle fraction = 1 - busy / window."""
    from localopt.pipeline import Event
    ranks = sorted(run["ranks"], key=lambda r: r["rank"])
    nsteps = len(ranks[0]["steps"])
    t0 = min(r["first"] for r in ranks)
    window = max(r["last"] for r in ranks) - t0
    ips = nsteps * batch / window
    idle, costs, per_rank = [], {}, []
    for r in ranks:
        busy = calls = waited = 0.0
        ops = 0
        per_stage: dict[int, dict[str, list]] = {}
        for st in r["steps"]:
            busy += st["t"][2] - st["t"][1]                   # optimizer step
            seen_b: dict[tuple, int] = {}
            for s, kind, mb, start, end in st["events"]:
                d = per_stage.setdefault(s, {"forward": [], "backward": [], "weight": []})
                if kind in ("forward", "backward", "send", "recv"):
                    busy += end - start
                if kind in ("send", "recv"):
                    calls += end - start
                elif kind == "wait":
                    waited += end - start
                elif kind == "forward":
                    d["forward"].append(end - start)
                    ops += 1
                elif kind == "backward":
                    n = seen_b.get((s, mb), 0)
                    seen_b[(s, mb)] = n + 1
                    d["weight" if n else "backward"].append(end - start)
                    ops += 1
        own = r["last"] - r["first"]
        other = max(0.0, own - busy - waited)
        idle.append(max(0.0, 1.0 - busy / window))
        opt_t = _mean([st["t"][2] - st["t"][1] for st in r["steps"]])
        per_op = (calls + other) / ops if ops else 0.0
        per_rank.append({"rank": r["rank"], "busy_per_step": busy / nsteps,
                         "comm_calls_per_step": calls / nsteps, "wait_per_step": waited / nsteps,
                         "overhead_per_step": other / nsteps, "optimizer_step": opt_t,
                         **{k: r[k] for k in MEMORY_KEYS if k in r}})
        for s, d in per_stage.items():
            costs[s] = {"rank": r["rank"], "forward": _mean(d["forward"]),
                        "backward": _mean(d["backward"]),
                        "backward_weight": _mean(d["weight"]) if d["weight"] else None,
                        "optimizer_step": opt_t / len(per_stage),
                        "calls_and_overhead_per_op": per_op}
    # the timeline: every process in a window of two steps from rank 0's middle step on (in
    # the steady state a later stage may still be finishing the step before)
    lo = ranks[0]["steps"][nsteps // 2]["t"][0]
    hi = lo + 2 * window / nsteps
    events = []
    rank_of = {s: r["rank"] for r in ranks for s in r["stages"]}
    for r in ranks:
        for st in r["steps"]:
            seen_b = {}
            evs = [(s, kind, mb, a, b) for s, kind, mb, a, b in st["events"]]
            evs.append((r["stages"][0], "step", -1, st["t"][1], st["t"][2]))
            for s, kind, mb, start, end in evs:
                if kind == "backward":
                    n = seen_b.get((s, mb), 0)
                    seen_b[(s, mb)] = n + 1
                    kind = "backward_weight" if n else kind
                if end > lo and start < hi:
                    events.append(Event(rank_of.get(s, r["rank"]), kind, mb, max(start, lo),
                                        min(end, hi)))
    losses = [x for r in ranks for x in r["losses"]]
    return {"images_per_s": ips, "step_time_s": window / nsteps, "idle_fraction": idle,
            "stage_costs": [costs[s] for s in sorted(costs)], "per_process": per_rank,
            "loss_first_last": [losses[0], losses[-1]] if losses else None,
            "timeline_events": events, "stage_of_rank": rank_of}


def stage_costs(measured: dict, label: str, act_bytes: list[float]):
    """:class:`StageCost` per (virtual) stage from a measured run: mean forward/backward
    times, plus the process's communication-call time and schedule overhead spread evenly
    over its forward and backward operations."""
    from localopt.pipeline.timeline import StageCost
    out = []
    for s, c in enumerate(measured["stage_costs"]):
        extra = c["calls_and_overhead_per_op"]
        f, b = c["forward"] + extra, c["backward"] + extra
        w = None if c["backward_weight"] is None else c["backward_weight"] + extra
        ab = act_bytes[s] if s < len(act_bytes) else 0.0
        if label in BACKPROP:
            out.append(StageCost(f, b + (w or 0.0), backward_input=b if w is not None else None,
                                 backward_weight=w, act_bytes=ab, step=c["optimizer_step"]))
        else:
            out.append(StageCost(f, b, direct=b, act_bytes=ab, step=c["optimizer_step"]))
    return out


def _boundary_bytes(plan: dict, label: str, mb: int) -> list[float]:
    """Activation bytes per micro-batch leaving each (virtual) stage."""
    fam = "zb" if label == "zb" else _family(label)
    prof = plan["profile"]
    names = prof["units"]
    return [prof["input_bytes_per_sample"][names.index(n)] * mb for n in plan["splits"][fam]]


def _sim_schedule(label: str) -> str:
    if label in BACKPROP:
        return label
    return "drtp" if label == "drtp" else "direct"


def simulate_all(res: dict, args, plan: dict) -> dict[str, Any]:
    """Replay every measured run (same S) and the deeper pipelines of ``--simulate``."""
    from localopt.pipeline.timeline import CommCost, deepen, simulate
    link = CommCost(res["link"]["latency"], res["link"]["per_byte"])
    S = args.stages
    check, scaled = [], []
    by_key: dict[tuple, tuple] = {}
    s8: dict[str, list] = {}
    for run in res["runs"]:
        M, label = run["M"], run["label"]
        mb = args.batch // M
        costs = stage_costs(run, label, _boundary_bytes(plan, label, mb))
        e_bytes = mb * NUM_CLASSES * 4
        kw = dict(link=link, e_bytes=e_bytes, batch=args.batch, steps=4)

        def sim_of(cs, **over):
            if label == "zb":
                return simulate(cs[::2][:S], "zb", M, virtual_costs=cs, **{**kw, **over})
            return simulate(cs, _sim_schedule(label), M, **{**kw, **over})
        sim = sim_of(costs)
        err = sim.images_per_s / run["images_per_s"] - 1
        # what decides it: the same costs with free messages, and with perfectly balanced stages
        free = sim_of(costs, link=CommCost(), e_bytes=0.0)
        balanced = sim_of(deepen(costs, len(costs), "finer"))
        check.append({"label": label, "M": M, "measured_images_per_s": run["images_per_s"],
                      "simulated_images_per_s": sim.images_per_s, "error": err,
                      "simulated_idle_fraction": sim.idle_fraction,
                      "simulated_free_messages_images_per_s": free.images_per_s,
                      "simulated_balanced_images_per_s": balanced.images_per_s})
        by_key[(label, M)] = (costs, kw, sim)
    for (label, M), (costs, kw, _) in by_key.items():
        for S2 in _csv(args.simulate, int) if args.simulate else []:
            if label == "1f1b" and M < S2:               # torch's Schedule1F1B needs M >= S
                continue
            if label == "zb":
                vc = deepen(costs, 2 * S2, args.deepen)
                deep = dict(costs=vc[:S2], schedule="zb", virtual_costs=vc)
            else:
                deep = dict(costs=deepen(costs, S2, args.deepen),
                            schedule=_sim_schedule(label))
            sim = simulate(microbatches=M, **deep, **kw)
            free = simulate(microbatches=M, **deep, **{**kw, "link": CommCost(), "e_bytes": 0.0})
            scaled.append({"label": label, "M": M, "S": S2, "images_per_s": sim.images_per_s,
                           "idle_fraction_mean": sum(sim.idle_fraction) / S2,
                           "images_per_s_free_messages": free.images_per_s})
            if args.timeline and S2 == 8 and M == 8:         # two steps, for the figure
                s8[label] = simulate(microbatches=M, **deep, **{**kw, "steps": 2}).events
    return {"check": check, "scaled": scaled, "assumption": args.deepen, "_s8_events": s8}


def speedups(rows: list[dict], key: str = "images_per_s") -> list[dict]:
    """Per (S, M): each non-backprop schedule's images/s over the fastest backprop one."""
    out = []
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        groups.setdefault((r.get("S"), r["M"]), {})[r["label"]] = r[key]
    for (S, M), g in sorted(groups.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
        bp = {k: v for k, v in g.items() if k in BACKPROP}
        if not bp:
            continue
        best = max(bp, key=bp.get)
        for k, v in g.items():
            if k not in BACKPROP:
                out.append({"S": S, "M": M, "label": k, "over": best, "speedup": v / bp[best],
                            "over_gpipe": v / g["gpipe"] if "gpipe" in g else None})
    return out


def plot_speedup(measured: list[dict], scaled: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    p.add_argument("--max-steps", type=int, default=0, help="--epochs: at most this many "
                   "steps per epoch (0: all)")
    p.add_argument("--data", default="", help="CIFAR-10 location (recipes.data.find_data)")
    p.add_argument("--lr", type=float, default=0.0, help="--epochs: Adam lr (default: the "
                   "model's config)")
    p.add_argument("--report", metavar="DIR", help="write DIR/README.md from DIR/*.json")
    p.add_argument("--readme", default=None,
                   help="with --report: a page whose pipeline block gets the headline "
                   "(default: the checkout's docs/guide/model-parallel.md when DIR is its "
                   "results/pipeline)")
    return p


def _under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.load_before = list(os.getloadavg())          # 1, 5, 15 min (recorded in the JSON)
    if args.report:
        repo = Path(__file__).resolve().parents[1]
        readme = args.readme or (repo / "docs" / "guide" / "model-parallel.md"
                                 if Path(args.report).resolve() == repo / "results" / "pipeline"
                                 else None)
        path = write_report(Path(args.report), readme=Path(readme) if readme else None)
        print(f"wrote {path}")
        return 0
    command = "python -m recipes.pipeline " + " ".join(sys.argv[1:] if argv is None else argv)
    labels = _csv(args.schedules)
    for lb in labels:
        if lb not in BACKPROP and lb not in DIRECT:
            raise SystemExit(f"error: --schedules {lb!r}: choose from "
                             f"{', '.join(BACKPROP + DIRECT)}")
    if args.stages == 1:
        if not args.epochs or any(lb in BACKPROP for lb in labels):
            raise SystemExit("error: --stages 1 is the one-process reference of an --epochs "
                             "run of localopt rules")
        out = _train_single(args)
        _finish_training(out, args, command)
        return 0
    if _under_torchrun():
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
    for run in res["runs"]:
        last = run["epochs"][-1]
        print(f"{run['label']} (S={args.stages}, K={run['M']}): test acc "
              f"{100 * last['test_acc']:.2f}% after {last['epoch']} epochs, "
              f"{last['images_per_s']:.0f} img/s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


def _finish_throughput(res: dict, args, plan: dict, command: str) -> None:
    from localopt.pipeline.timeline import plot_timelines
    runs, panels = [], {}
    for raw in res["runs"]:
        a = analyse(raw, args.batch)
        events = a.pop("timeline_events")
        runs.append({"label": raw["label"], "M": raw["M"], "S": args.stages, **a})
        panels.setdefault(raw["M"], {})[raw["label"]] = events
    out = {"meta": _meta(args, command), "link": res["link"],
           "splits": plan["splits"], "split_how": plan["how"],
           "profile": plan["profile"], "runs": runs}
    sim = simulate_all({"link": res["link"], "runs": runs}, args, plan)
    s8 = sim.pop("_s8_events")
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
        if sim["scaled"]:
            f = d / f"{stem}_speedup.png"
            plot_speedup(runs, sim["scaled"], f, f"{args.model}: direct-feedback schedules "
                         f"over the fastest backprop schedule")
            files["speedup"] = str(f)
    out["files"] = files
    for r in runs:
        print(f"{r['label']:>6} K={r['M']}: {r['images_per_s']:7.0f} img/s, idle "
              + _pcts(r["idle_fraction"]))
    for c in sim["check"]:
        print(f"  sim {c['label']:>6} K={c['M']}: {c['simulated_images_per_s']:7.0f} img/s "
              f"({100 * c['error']:+.1f}%)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


# ------------------------------------------------------------------------------ report

def _pcts(v: list[float]) -> str:
    return ", ".join(f"{100 * x:.0f}%" for x in v)


def _ms(t: float) -> str:
    return f"{1e3 * t:.2f}"


def write_report(d: Path, headline_k: int = 4, headline_s: int = 8,
                 readme: Path | None = None) -> Path:
    """``d/README.md`` from the JSON files of ``d`` (throughput and training results): a
    headline (images/s at ``K = headline_k``, simulated speed-up at ``S = headline_s``,
    ``K = 8``; pipelined vs one-process accuracy), then every file in full.  ``readme``: a
    README whose ``<!-- pipeline:begin -->`` ... ``<!-- pipeline:end -->`` block gets the
    headline too."""
    files = [(f, json.loads(f.read_text())) for f in sorted(d.glob("*.json"))]
    lines = ["# Pipeline (model-parallel) training: direct feedback vs backprop schedules", "",
             "Generated by `python -m recipes.pipeline --report " + str(d) + "` from the JSON "
             "files next to it; each section names the command that wrote its file.", ""]
    lines += _headline(files, headline_k, headline_s)
    for f, res in files:
        m = res.get("meta", {})
        git = m.get("git") or {}
        lines += [f"## `{f.name}`", "", f"    {m.get('command', '?')}", "",
                  f"model {m.get('model')}, S = {m.get('stages')} processes, batch "
                  f"{m.get('batch')}, device {m.get('device')}, torch {m.get('torch')}, commit "
                  f"{git.get('commit', '?')}{' (dirty)' if git.get('dirty') else ''}, "
                  f"{m.get('date')}; load average (1, 5, 15 min) before the run "
                  f"{', '.join(f'{x:.2f}' for x in m.get('load_average', []))}"
                  + (f", after {', '.join(f'{x:.2f}' for x in m['load_average_after'])}"
                     if m.get("load_average_after") else "") + ".", ""]
        if m.get("note"):
            lines += [f"Note: {m['note']}.", ""]
        if "simulation" in res:
            lines += _report_throughput(res, m)
        else:
            lines += _report_training(res, m)
    out = d / "README.md"
    out.write_text("\n".join(lines) + "\n")
    if readme is not None and readme.is_file():
        text = readme.read_text()
        if README_BEGIN in text and README_END in text:
            block = readme_block(d, files, headline_k, headline_s, readme.parent)
            start, stop = text.index(README_BEGIN), text.index(README_END) + len(README_END)
            readme.write_text(text[:start] + block + text[stop:])
    return out


#: the block of the project README that :func:`write_report` rewrites with the headline
README_BEGIN, README_END = "<!-- pipeline:begin -->", "<!-- pipeline:end -->"


def readme_block(d: Path, files: list, K: int, S_sim: int, root: Path) -> str:
    """The headline tables for the project README, with the machine they were measured on."""
    rel = os.path.relpath(d, root)
    thr = [r["meta"] for _, r in files if "simulation" in r]
    where = ""
    if thr:
        m = thr[0]
        where = (f" Measured on {m.get('device')}, torch {m.get('torch')}; data: random "
                 "batches for images/s, CIFAR-10 (JPEG-q75 copy) for accuracy; one row per "
                 "measurement file (repeated runs of the same command show the run-to-run "
                 "spread).")
    cmd = os.path.relpath(d.resolve(), Path(__file__).resolve().parents[1])
    lines = [README_BEGIN,
             f"Generated by `python -m recipes.pipeline --report {cmd}` from the JSON files in "
             f"[{cmd}/]({rel}/README.md) (commands: `{cmd}/commands.sh`; timelines, per-process "
             f"time budgets and the simulation's error against each measurement there).{where}",
             ""]
    for line in _headline(files, K, S_sim):
        lines.append("**" + line[3:] + "**" if line.startswith("## ") else line)
    while lines and not lines[-1]:
        lines.pop()
    lines.append(README_END)
    return "\n".join(lines)


def _headline(files: list, K: int, S_sim: int) -> list[str]:
    thr = [(f, r) for f, r in files if "simulation" in r]
    L: list[str] = []
    if thr:
        labels = sorted({r["label"] for _, res in thr for r in res["runs"]},
                        key=lambda x: (x not in BACKPROP, (BACKPROP + DIRECT).index(x)
                                       if x in BACKPROP + DIRECT else 99))
        direct = [lb for lb in labels if lb not in BACKPROP]
        L += [f"## Headline: images/s, S = {thr[0][1]['meta'].get('stages')} processes, "
              f"K = {K} micro-batches", "",
              "| model | batch | " + " | ".join(labels) + " | " +
              " | ".join(f"{lb} / gpipe | {lb} / best backprop" for lb in direct) +
              f" | simulated S={S_sim}, K=8: " + ", ".join(direct) + " / best backprop | file |",
              "|---|---:|" + "---:|" * (len(labels) + 2 * len(direct) + 1) + "---|"]
        for f, res in thr:
            ips = {r["label"]: r["images_per_s"] for r in res["runs"] if r["M"] == K}
            if not ips:
                continue
            sp = {s["label"]: s for s in res["speedup_measured"] if s["M"] == K}
            sim = {s["label"]: s["speedup"] for s in res["speedup_simulated"]
                   if s["M"] == 8 and s["S"] == S_sim}
            cells = [f"{ips[lb]:.0f}" if lb in ips else "" for lb in labels]
            for lb in direct:
                s = sp.get(lb)
                cells += [f"{s['over_gpipe']:.2f}x" if s and s["over_gpipe"] else "",
                          f"{s['speedup']:.2f}x ({s['over']})" if s else ""]
            cells.append(", ".join(f"{sim[lb]:.2f}x" for lb in direct if lb in sim))
            L.append(f"| {res['meta']['model']} | {res['meta']['batch']} | "
                     + " | ".join(cells) + f" | `{f.name}` |")
        L.append("")
    acc = [(f, r) for f, r in files if "simulation" not in r and "runs" in r]
    if acc:
        L += ["## Headline: accuracy, pipelined vs one process (same loop, data order, seeds)",
              "", "| model | schedule | processes | K | epochs | test acc % | train loss | "
              "images/s (last epoch) | file |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for f, res in acc:
            for r in res["runs"]:
                e = r["epochs"][-1]
                k = r["M"] if res["meta"]["stages"] > 1 else "-"
                L.append(f"| {res['meta']['model']} | {r['label']} | {res['meta']['stages']} | "
                         f"{k} | {e['epoch']} | {100 * e['test_acc']:.2f} | "
                         f"{e['train_loss']:.4f} | {e['images_per_s']:.0f} | `{f.name}` |")
        L.append("")
    return L


def _report_throughput(res: dict, m: dict) -> list[str]:
    L = [f"Timed: {m.get('steps')} steps after {m.get('warmup')} warm-up steps per row. "
         f"Splits ({res.get('split_how')}): " +
         "; ".join(f"{k}: {v}" for k, v in res["splits"].items()) + ".", "",
         "| schedule | K | images/s | idle per process | fwd ms/mb per stage | bwd ms/mb per "
         "stage | simulated images/s (error) | simulated, free messages | simulated, "
         "balanced stages |", "|---|---:|---:|---|---|---|---|---:|---:|"]
    check = {(c["label"], c["M"]): c for c in res["simulation"]["check"]}
    for r in sorted(res["runs"], key=lambda r: (r["M"], r["label"])):
        c = check.get((r["label"], r["M"]))
        bw = ", ".join(_ms(s["backward"]) + ("+" + _ms(s["backward_weight"])
                                              if s.get("backward_weight") else "")
                       for s in r["stage_costs"])
        fw = ", ".join(_ms(s["forward"]) for s in r["stage_costs"])
        L.append(f"| {r['label']} | {r['M']} | {r['images_per_s']:.0f} | "
                 f"{_pcts(r['idle_fraction'])} | {fw} | {bw} | "
                 + (f"{c['simulated_images_per_s']:.0f} ({100 * c['error']:+.1f}%) | "
                    f"{c['simulated_free_messages_images_per_s']:.0f} | "
                    f"{c['simulated_balanced_images_per_s']:.0f}" if c else " | ") + " |")
    L += ["", "Where each process's time goes (ms per step: compute = forward + backward, "
          "communication calls, optimizer step, blocked waiting for a message, the rest = "
          "schedule overhead between calls):", "",
          "| schedule | K | " + " | ".join(f"process {i}: compute / comm / optimizer / wait / "
                                          f"overhead" for i in range(m.get("stages", 2)))
          + " |", "|---|---:|" + "---|" * m.get("stages", 2)]
    for r in sorted(res["runs"], key=lambda r: (r["M"], r["label"])):
        cells = []
        for p in r.get("per_process", []):
            comp = p["busy_per_step"] - p["comm_calls_per_step"] - p["optimizer_step"]
            cells.append(" / ".join(_ms(x) for x in (comp, p["comm_calls_per_step"],
                                                       p["optimizer_step"], p["wait_per_step"],
                                                       p["overhead_per_step"])))
        L.append(f"| {r['label']} | {r['M']} | " + " | ".join(cells) + " |")
    link = res["link"]
    L += ["", f"Messages (ping-pong fit): latency {1e6 * link['latency']:.0f} us, "
          f"{1e9 * link['per_byte']:.2f} ns/byte.  zb: backward = input gradient + weight "
          "gradient, stages are the 2S virtual stages.", "",
          "Speed-up over the fastest backprop schedule, measured:", "",
          "| schedule | K | speed-up | over | over gpipe |", "|---|---:|---:|---|---:|"]
    for s in res["speedup_measured"]:
        L.append(f"| {s['label']} | {s['M']} | {s['speedup']:.2f}x | {s['over']} | "
                 + (f"{s['over_gpipe']:.2f}x" if s['over_gpipe'] else "") + " |")
    if res["speedup_simulated"]:
        L += ["", f"Simulated (`{res['simulation']['assumption']}` assumption: "
              + ("every stage costs the mean of the measured stages, a deeper model of the "
                 "same blocks" if res['simulation']['assumption'] == "blocks" else
                 "the measured model's total cost split evenly over S stages")
              + "; the same measured message costs):", "",
              "| S | K | schedule | speed-up | over | with free messages |",
              "|---:|---:|---|---:|---|---:|"]
        free = {(s["S"], s["M"], s["label"]): s
                for s in res.get("speedup_simulated_free_messages", [])}
        for s in res["speedup_simulated"]:
            f = free.get((s["S"], s["M"], s["label"]))
            L.append(f"| {s['S']} | {s['M']} | {s['label']} | {s['speedup']:.2f}x | "
                     f"{s['over']} | " + (f"{f['speedup']:.2f}x ({f['over']})" if f else "")
                     + " |")
    files = res.get("files", {})
    if files:
        L += ["", "Figures: " + ", ".join(f"`{Path(v).name}`" for v in files.values()) + "."]
    return L + [""]


def _report_training(res: dict, m: dict) -> list[str]:
    cap = m.get("max_steps_per_epoch")
    L = [f"Data: {res.get('data')}; {m.get('epochs')} epoch(s) of "
         + (f"at most {cap} steps" if cap else "all 50,000 training images")
         + f" (batch {m.get('batch')}, Adam {res['runs'][0]['optimizer']['lr']:.3g}), "
         "test on the 10,000 test images after every epoch.", "",
         "| schedule | K | epoch | train loss (epoch mean) | batch loss along the epoch | "
         "test acc % | images/s |", "|---|---:|---:|---:|---|---:|---:|"]
    for r in res["runs"]:
        for e in r["epochs"]:
            curve = ", ".join(f"{loss:.2f} (step {k})" for k, loss in e.get("loss_curve", [])[:8])
            L.append(f"| {r['label']} | {r['M']} | {e['epoch']} | {e['train_loss']:.4f} | "
                     f"{curve} | {100 * e['test_acc']:.2f} | {e['images_per_s']:.0f} |")
    return L + [""]


if __name__ == "__main__":
    sys.exit(main())
