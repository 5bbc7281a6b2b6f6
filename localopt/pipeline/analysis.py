"""Measuring a pipeline: where to cut it (a one-process profile and the balanced split) and
what a run of it did (throughput, idle time and per-stage costs from its events).

* :func:`units` / :func:`profile_units` / :func:`best_split`: the places a stage may begin,
  their measured costs, and the contiguous cut that minimises the busiest process;
  :func:`measure_link`: a message's latency and per-byte cost between two ranks;
* :func:`analyse`: one measured run -- every rank's :class:`~localopt.pipeline.Event` lists of
  its timed steps -- into images/s, idle fractions and per-stage costs; each event names its
  kind (``forward``, ``backward``, ``backward_weight`` for zero bubble's deferred weight
  gradients, ``send``, ``recv``, ``wait``);
* :func:`stage_costs`: those costs as :class:`~localopt.pipeline.timeline.StageCost` for the
  simulation; :func:`speedups`: schedules against the fastest backprop one.

``recipes.pipeline`` drives them.
"""
from __future__ import annotations

import datetime
import itertools
import statistics
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .backprop import BACKPROP_SCHEDULES
from .events import Event
from .split import sequence
from .timeline import StageCost

__all__ = ["units", "candidate", "profile_units", "best_split", "measure_link", "MEMORY_KEYS",
           "analyse", "stage_costs", "speedups", "peak_in_flight"]


def _ping(nbytes: int, reps: int, timeout: float) -> float:
    """Median one-way time of a ``nbytes`` message between ranks 0 and 1 (round trip / 2)."""
    rank = dist.get_rank()
    t = torch.zeros(max(1, nbytes // 4))
    times = []
    limit = datetime.timedelta(seconds=timeout)
    for _ in range(reps):
        t0 = time.perf_counter()
        if rank == 0:
            dist.isend(t, 1).wait(limit)
            dist.irecv(t, 1).wait(limit)
        elif rank == 1:
            dist.irecv(t, 0).wait(limit)
            dist.isend(t, 0).wait(limit)
        times.append((time.perf_counter() - t0) / 2)
    return statistics.median(times)


def measure_link(sizes: list[int], reps: int = 20, timeout: float = 60.0) -> dict[str, float]:
    """Latency (the smallest message's one-way time) and per-byte cost (the slope to the
    largest) of a message between ranks 0 and 1 of the default group, from ping-pong times of
    ``sizes`` (bytes); every wait bounded by ``timeout`` seconds."""
    if dist.get_world_size() < 2:
        return {"latency": 0.0, "per_byte": 0.0, "sizes": [], "times": []}
    _ping(sizes[0], 3, timeout)
    ts = [_ping(s, reps, timeout) for s in sizes]
    slope = max(0.0, (ts[-1] - ts[0]) / (sizes[-1] - sizes[0]))
    return {"latency": ts[0], "per_byte": slope, "sizes": sizes, "times": ts}


def _mean(v: list[float]) -> float:
    """Means, not medians: the sum of the durations is what the step takes."""
    return statistics.fmean(v) if v else 0.0


def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's sequence (:func:`~localopt.pipeline.split.sequence`) with its
    ``nn.Sequential`` entries opened one level: the places a stage may begin."""
    out = []
    for name, m in sequence(model):
        if isinstance(m, nn.Sequential) and len(m):
            out += [(f"{name}.{c}", cm) for c, cm in m.named_children()]
        else:
            out.append((name, m))
    return out


def candidate(m: nn.Module) -> bool:
    """A stage may begin at a module with parameters (a layer or a block), not at an
    activation, so that a stage's input is read by a layer."""
    return any(True for _ in m.parameters())


def profile_units(model: nn.Module, x: Tensor, y: Tensor,
                  loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                  steps: int = 8, warmup: int = 3,
                  sync: Callable[[], None] | None = None) -> dict[str, Any]:
    """One process, plain autograd: per unit of ``model``'s sequence (:func:`units`; run on its
    own, on a detached input as a pipeline stage would), the median time of its forward, of its
    full backward, of its input gradient alone and of its weight gradients alone, on the batch
    ``x`` (targets ``y``); and the bytes of its input per sample.  The last unit includes the
    loss.  A direct-feedback rule's backward of a unit is about its weight-gradient part (the
    input gradient becomes a projection of ``e``, cheap for 10 classes).  ``sync``: called
    before every clock read (``torch.cuda.synchronize`` on a GPU, whose calls return before
    the work is done)."""

    def now() -> float:
        if sync is not None:
            sync()
        return time.perf_counter()
    seq = units(model)
    h = x
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
            return loss_fn(out, y) if last else out
        with torch.no_grad():
            gout = None if last else torch.randn_like(m(inp))
        for it in range(warmup + steps):
            t0 = now()
            out = fwd()
            t1 = now()
            if out.requires_grad:                     # not: a parameter-free first unit
                torch.autograd.backward(out, gout)
            t2 = now()
            m.zero_grad(set_to_none=True)
            ti = tw = 0.0
            if below:
                out = fwd()
                t3 = now()
                torch.autograd.grad(out, [inp], gout)
                ti = now() - t3
            if params:
                out = fwd()
                t3 = now()
                torch.autograd.grad(out, params, gout)
                tw = now() - t3
            if it >= warmup:
                for key, v in zip(keys, (t1 - t0, t2 - t1, ti, tw)):
                    t[key][k].append(v)
    return {"units": [nm for nm, _ in seq], "candidate": [candidate(m) for _, m in seq],
            "input_bytes_per_sample": in_bytes, "batch": x.shape[0],
            **{key: [statistics.median(v) for v in t[key]] for key in keys}}


def best_split(cost: list[float], candidate: list[bool], parts: int,
               placement: list[int] | None = None) -> list[int]:
    """Indices where parts 1..parts-1 begin (contiguous cuts at candidate units), minimising
    the costliest process (``placement[p]`` = process of part ``p``; default one part per
    process), then the costliest part."""
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


#: what each process holds (localopt.pipeline.PipelineStep.memory), per process in the JSON
MEMORY_KEYS = ("parameter_bytes", "rule_state_bytes", "state_bytes", "model_parameter_bytes")


def _optimizer_time(st: dict) -> float:
    """One step's optimizer time on a rank: the ``opt.step()`` call (``st["t"][1:]``) less the
    backwards the asynchronous schedule runs inside it, plus the updates it applies inside
    ``pipe.step`` (``update`` events)."""
    t1, t2 = st["t"][1], st["t"][2]
    inside = out = 0.0
    for s, kind, mb, start, end in st["events"]:
        within = t1 <= start and end <= t2
        if kind == "update" and not within:
            out += end - start
        elif kind not in ("wait", "update") and within:
            inside += end - start
    return max(t2 - t1 - inside, 0.0) + out


def analyse(run: dict, batch: int) -> dict[str, Any]:
    """Throughput, idle fractions and per-stage costs of one gathered run: ``run["ranks"]``, one
    dict per rank with its ``rank``, ``stages``, the ``first``/``last`` times of its timed
    window, its ``steps`` (each ``{"t": (start, step called, optimizer done), "events":
    [Event tuples]}``), its ``losses`` and its :data:`MEMORY_KEYS`.

    Per process, over the timed window: *busy* = time inside forward/backward/send/recv calls
    and the optimizer step; *waiting* = time blocked on messages; the rest is the schedule's
    own overhead (Python between the calls).  idle fraction = 1 - busy / window."""
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
        opt_steps = []
        for st in r["steps"]:
            opt_steps.append(_optimizer_time(st))
            busy += opt_steps[-1]
            for s, kind, mb, start, end in st["events"]:
                if kind == "update":          # counted in the optimizer time
                    continue
                if kind != "wait":
                    busy += end - start
                if kind in ("send", "recv"):
                    calls += end - start
                elif kind == "wait":
                    waited += end - start
                else:                         # forward, backward, backward_weight: one op
                    d = per_stage.setdefault(s, {"forward": [], "backward": [],
                                                 "backward_weight": []})
                    d[kind].append(end - start)
                    ops += 1
        own = r["last"] - r["first"]
        other = max(0.0, own - busy - waited)
        idle.append(max(0.0, 1.0 - busy / window))
        opt_t = _mean(opt_steps)
        per_op = (calls + other) / ops if ops else 0.0
        per_rank.append({"rank": r["rank"], "busy_per_step": busy / nsteps,
                         "comm_calls_per_step": calls / nsteps, "wait_per_step": waited / nsteps,
                         "overhead_per_step": other / nsteps, "optimizer_step": opt_t,
                         **{k: r[k] for k in MEMORY_KEYS if k in r}})
        for s, d in per_stage.items():
            costs[s] = {"rank": r["rank"], "forward": _mean(d["forward"]),
                        "backward": _mean(d["backward"]),
                        "backward_weight": _mean(d["backward_weight"])
                        if d["backward_weight"] else None,
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
            evs = [(s, kind, mb, a, b) for s, kind, mb, a, b in st["events"]]
            evs.append((r["stages"][0], "step", -1, st["t"][1], st["t"][2]))
            for s, kind, mb, start, end in evs:
                if end > lo and start < hi:
                    events.append(Event(rank_of.get(s, r["rank"]), kind, mb, max(start, lo),
                                        min(end, hi)))
    losses = [x for r in ranks for x in r["losses"]]
    held = {s: v for r in ranks for s, v in peak_in_flight(
        [e for st in r["steps"] for e in st["events"]]).items()}
    return {"peak_in_flight": [held.get(s) for s in sorted(costs)], "images_per_s": ips,
            "step_time_s": window / nsteps, "idle_fraction": idle,
            "stage_costs": [costs[s] for s in sorted(costs)], "per_process": per_rank,
            "loss_first_last": [losses[0], losses[-1]] if losses else None,
            "timeline_events": events, "stage_of_rank": rank_of}


def peak_in_flight(events: list) -> dict[int, int]:
    """Per stage: the most micro-batches forwarded and not yet released -- their activations
    held -- over a run's events (in time order; a micro-batch is released by its
    ``backward``, or, where the stage defers weight gradients (zero bubble), by its
    ``backward_weight``).  Counts begin at the first event: micro-batches held from before
    (an asynchronous schedule's previous step) are added back from the lowest count seen."""
    by_stage: dict[int, list] = {}
    for e in events:
        by_stage.setdefault(e[0], []).append(e)
    out = {}
    for s, evs in by_stage.items():
        release = "backward_weight" if any(e[1] == "backward_weight" for e in evs) else \
            "backward"
        held = low = peak = 0
        for e in sorted(evs, key=lambda e: e[4]):
            if e[1] == "forward":
                held += 1
            elif e[1] == release:
                held -= 1
            low, peak = min(low, held), max(peak, held)
        out[s] = peak - low
    return out


def stage_costs(measured: dict, label: str, act_bytes: list[float]):
    """:class:`StageCost` per (virtual) stage from a measured run: mean forward/backward
    times, plus the process's communication-call time and schedule overhead spread evenly
    over its forward and backward operations."""
    out = []
    for s, c in enumerate(measured["stage_costs"]):
        extra = c["calls_and_overhead_per_op"]
        f, b = c["forward"] + extra, c["backward"] + extra
        w = None if c["backward_weight"] is None else c["backward_weight"] + extra
        ab = act_bytes[s] if s < len(act_bytes) else 0.0
        if label in BACKPROP_SCHEDULES:
            out.append(StageCost(f, b + (w or 0.0), backward_input=b if w is not None else None,
                                 backward_weight=w, act_bytes=ab, step=c["optimizer_step"]))
        else:
            out.append(StageCost(f, b, direct=b, act_bytes=ab, step=c["optimizer_step"]))
    return out


def speedups(rows: list[dict], key: str = "images_per_s") -> list[dict]:
    """Per (S, M): each non-backprop schedule's images/s over the fastest backprop one."""
    out = []
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        groups.setdefault((r.get("S"), r["M"]), {})[r["label"]] = r[key]
    for (S, M), g in sorted(groups.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
        bp = {k: v for k, v in g.items() if k in BACKPROP_SCHEDULES}
        if not bp:
            continue
        best = max(bp, key=bp.get)
        for k, v in g.items():
            if k not in BACKPROP_SCHEDULES:
                out.append({"S": S, "M": M, "label": k, "over": best, "speedup": v / bp[best],
                            "over_gpipe": v / g["gpipe"] if "gpipe" in g else None})
    return out
