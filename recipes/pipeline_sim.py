"""The event-simulation driver of :mod:`recipes.pipeline`: every measured run replayed by
:func:`localopt.pipeline.timeline.simulate` (its error against the measurement), the deeper
pipelines of ``--simulate`` (measured costs deepened as ``--deepen`` assumes), the sweep over
link bandwidths of ``--bandwidth``, and the bytes a training step sends
(:func:`bytes_per_step`); with the schedule labels the recipe shares with it."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from localopt.pipeline.analysis import speedups, stage_costs
from localopt.pipeline.backprop import BACKPROP_SCHEDULES as BACKPROP

NUM_CLASSES = 10


def csv_list(text: str, cast=str) -> list:
    """The comma-separated items of ``text``, each ``cast``."""
    return [cast(t) for t in str(text).split(",") if t.strip()]


#: ``<rule>-async``: the rule on the asynchronous direct schedule (no flush between steps)
ASYNC = "-async"
#: ``<rule>-async-wide`` (simulated only): the asynchronous schedule with ``max_in_flight=S``,
#: every stage holding up to ``S`` micro-batches -- 1F1B's first stage's count, on every stage
#: (so no process holds more than 1F1B's busiest one; stage ``s`` more than 1F1B's ``S - s``)
WIDE = "-wide"


def base(label: str) -> str:
    """The rule (or backprop schedule) of a schedule label, ``-async`` removed."""
    return label[:-len(ASYNC)] if label.endswith(ASYNC) else label


def family(label: str) -> str:
    """The split family of a label: ``"bp"`` for torch's schedules, else the rule."""
    return "bp" if label in BACKPROP else base(label)


def _boundary_bytes(plan: dict, label: str, mb: int) -> list[float]:
    """Activation bytes per micro-batch leaving each (virtual) stage."""
    fam = "zb" if label == "zb" else family(label)
    prof = plan["profile"]
    names = prof["units"]
    return [prof["input_bytes_per_sample"][names.index(n)] * mb for n in plan["splits"][fam]]


def _sim_schedule(label: str) -> str:
    if label in BACKPROP:
        return label
    return "drtp" if base(label) == "drtp" else "direct"


def _sim_options(label: str) -> dict:
    return {"asynchronous": True} if label.endswith(ASYNC) else {}


def _window(label: str, meta: dict) -> dict:
    """``simulate``'s steps and timed window for a schedule.  The asynchronous schedule never
    flushes, so it fills the pipeline once per training: it is timed as the recipe times a
    measured run (the recorded untimed ``warmup`` steps, then ``steps`` timed ones, the last
    step's drain left out).  Every other schedule flushes and fills again at every step, so
    a total over a few steps is its steady state already (they agree within 1% on the
    committed files): ``{}``, the caller's own step count."""
    if not label.endswith(ASYNC):
        return {}                   # the caller's step count (a total over a few steps)
    warm = max(1, int(meta.get("warmup", 3)))
    return {"steps": warm + int(meta.get("steps", 12)) + 1, "warmup": warm}


def bytes_per_step(plan: dict, label: str, M: int, batch: int, S: int) -> dict[str, Any]:
    """Bytes one training step sends, per stage boundary (``zb``: between virtual stages; a
    boundary inside one process sends nothing): activations forward; backprop: their
    gradients back (the same size); direct rules but ``drtp``: the output error ``e`` of every
    micro-batch from the last stage to each other stage (``M x batch/M x classes`` float32)."""
    mb = batch // M
    act = _boundary_bytes(plan, label, mb)
    if label == "zb":
        place = list(range(S)) + list(range(S - 1, -1, -1))
        crosses = [place[v] != place[v + 1] for v in range(len(act))]
    else:
        crosses = [True] * len(act)
    fwd = [M * a if c else 0.0 for a, c in zip(act, crosses)]
    back = list(fwd) if label in BACKPROP else [0.0] * len(fwd)
    e = M * mb * NUM_CLASSES * 4 if _sim_schedule(label) == "direct" else 0
    errors = [float(e)] * (S - 1)                  # to stages 0..S-2
    return {"activations": fwd, "activation_gradients": back, "errors_to_stage": errors,
            "per_boundary": [f + b for f, b in zip(fwd, back)],
            "total": sum(fwd) + sum(back) + sum(errors)}


def simulate_all(res: dict, args, plan: dict) -> dict[str, Any]:
    """Replay every measured run (same S) and the deeper pipelines of ``--simulate``.

    The replay of a measured run totals 4 steps (``simulated_images_per_s``, the figure
    checked against the measurement); an asynchronous run also gets the timed-window replay
    (``simulated_steady_images_per_s``, :func:`_window`), the estimator the deeper pipelines
    and the bandwidth sweep use for it."""
    meta = {"warmup": getattr(args, "warmup", 3), "steps": getattr(args, "steps", 12)}
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
            return simulate(cs, _sim_schedule(label), M, **{**kw, **_sim_options(label),
                                                             **over})
        sim = sim_of(costs)
        err = sim.images_per_s / run["images_per_s"] - 1
        # what decides it: the same costs with free messages, and with perfectly balanced stages
        free = sim_of(costs, link=CommCost(), e_bytes=0.0)
        balanced = sim_of(deepen(costs, len(costs), "finer"))
        steady = (sim_of(costs, **_window(label, meta)).images_per_s
                  if label.endswith(ASYNC) else None)
        check.append({"label": label, "M": M, "measured_images_per_s": run["images_per_s"],
                      "simulated_images_per_s": sim.images_per_s, "error": err,
                      "simulated_steady_images_per_s": steady,
                      "simulated_idle_fraction": sim.idle_fraction,
                      "simulated_free_messages_images_per_s": free.images_per_s,
                      "simulated_balanced_images_per_s": balanced.images_per_s})
        by_key[(label, M)] = (costs, kw, sim)
    for (label, M), (costs, kw, _) in by_key.items():
        kw = {**kw, **_window(label, meta)}
        for S2 in csv_list(args.simulate, int) if args.simulate else []:
            if label == "1f1b" and M < S2:               # torch's Schedule1F1B needs M >= S
                continue
            if label == "zb":
                vc = deepen(costs, 2 * S2, args.deepen)
                deep = dict(costs=vc[:S2], schedule="zb", virtual_costs=vc)
            else:
                deep = dict(costs=deepen(costs, S2, args.deepen),
                            schedule=_sim_schedule(label), **_sim_options(label))
            variants = [(label, {})]
            if label.endswith(ASYNC):
                variants.append((label + WIDE, {"max_in_flight": S2}))
            for name, extra in variants:
                sim = simulate(microbatches=M, **deep, **extra, **kw)
                free = simulate(microbatches=M, **deep, **extra,
                                **{**kw, "link": CommCost(), "e_bytes": 0.0})
                scaled.append({"label": name, "M": M, "S": S2, "images_per_s": sim.images_per_s,
                               "idle_fraction_mean": sum(sim.idle_fraction) / S2,
                               "images_per_s_free_messages": free.images_per_s})
            if args.timeline and S2 == 8 and M == 8:         # two steps, for the figure
                s8[label] = simulate(microbatches=M, **deep,
                                     **{**kw, "steps": 2, "warmup": 0}).events
    return {"check": check, "scaled": scaled, "assumption": args.deepen, "_s8_events": s8,
            "bandwidth": _bandwidth_sweep(by_key, args, link, meta)}


def _bandwidth_sweep(by_key: dict, args, loopback, meta: dict) -> dict[str, Any]:
    """images/s of every schedule over links of ``--bandwidth`` Gbit/s (``loopback``: the
    measured one) with ``--latency``, for ``S`` = the measured count and ``--simulate``; the
    measured costs deepened as for ``--simulate``."""
    from localopt.pipeline.timeline import CommCost, deepen, simulate
    links = {}
    for b in csv_list(args.bandwidth):
        links[b] = loopback if b == "loopback" else CommCost.of(float(b), args.latency)
    rows = []
    stage_counts = sorted({args.stages, *(csv_list(args.simulate, int) if args.simulate else [])})
    for (label, M), (costs, kw, _) in by_key.items():
        for S2 in stage_counts:
            if label == "1f1b" and M < S2:
                continue
            for name, lk in links.items():
                base = {**kw, "link": lk, "e_link": None, "steps": 3, **_window(label, meta)}
                if label == "zb":
                    vc = deepen(costs, 2 * S2, args.deepen)
                    sim = simulate(vc[:S2], "zb", M, virtual_costs=vc, **base)
                else:
                    sim = simulate(deepen(costs, S2, args.deepen), _sim_schedule(label), M,
                                   **_sim_options(label), **base)
                rows.append({"label": label, "M": M, "S": S2, "bandwidth": name,
                             "images_per_s": sim.images_per_s})
    out = []
    for name in links:
        for sp in speedups([dict(r) for r in rows if r["bandwidth"] == name]):
            out.append({**sp, "bandwidth": name})
    return {"latency": args.latency, "links": {k: {"latency": v.latency,
                                                   "per_byte": v.per_byte}
                                               for k, v in links.items()},
            "rows": rows, "speedup": out}


def resimulate(path) -> dict[str, Any]:
    """Re-run :func:`simulate_all` on a throughput JSON written by :mod:`recipes.pipeline`
    (its measured costs, split, link, stage counts, deepening and bandwidths as recorded) and
    rewrite its simulation and simulated speed-ups in place: the simulator's answers for
    measurements already taken.  Returns the new contents."""
    path = Path(path)
    res = json.loads(path.read_text())
    old = res["simulation"]
    bw = old.get("bandwidth") or {}
    args = SimpleNamespace(
        stages=res["meta"]["stages"], batch=res["meta"]["batch"], timeline=None,
        warmup=res["meta"].get("warmup", 3), steps=res["meta"].get("steps", 12),
        simulate=",".join(str(S) for S in sorted({x["S"] for x in old["scaled"]})),
        deepen=old["assumption"], bandwidth=",".join(bw.get("links") or ["loopback"]),
        latency=bw.get("latency", 5e-5))
    plan = {"profile": res["profile"], "splits": res["splits"]}
    sim = simulate_all({"link": res["link"], "runs": res["runs"]}, args, plan)
    sim.pop("_s8_events")
    was = {(c["label"], c["M"]): c["simulated_images_per_s"] for c in old["check"]}
    for c in sim["check"]:
        before = was.get((c["label"], c["M"]))
        if before is None or abs(c["simulated_images_per_s"] - before) > 1e-6 * before:
            raise ValueError(
                f"{path}: the simulator no longer replays this file's measured run "
                f"{c['label']} K={c['M']} as it did ({before} images/s recorded, "
                f"{c['simulated_images_per_s']:.6g} now): it was measured with a runner the "
                "current simulator does not model; measure it again instead")
    res["simulation"] = sim
    res["speedup_simulated"] = speedups(sim["scaled"])
    res["speedup_simulated_free_messages"] = speedups(sim["scaled"], "images_per_s_free_messages")
    path.write_text(json.dumps(res, indent=1) + "\n")
    return res
