"""Per-stage costs of real models on a GPU, fed to the pipeline simulator.

    python -m recipes.pipeline_gpu --json results/pipeline/gpu_costs.json     # on a CUDA GPU
    DRY=1 python -m recipes.pipeline_gpu --json /tmp/gpu_dry.json              # CPU smoke test

One GPU cannot host a multi-GPU pipeline (its stages would share one device and run one at a
time), so this recipe does not run a pipeline: it measures, on the one device, the forward, the
backward, and the backward's input- and weight-gradient parts of every unit (block) of
ResNet-20 (CIFAR, 32x32), timm's ResNet-18 and a small timm ViT (ImageNet size, 224x224) at
realistic batch sizes (:func:`localopt.pipeline.analysis.profile_units`, with
``torch.cuda.synchronize`` around every clock read), cuts each model into ``S`` = 2..32 stages
that balance those costs, and simulates (:func:`localopt.pipeline.timeline.simulate`) torch's
backprop schedules and the synchronous and asynchronous direct schedules (module-wise ``dfa``:
backprop inside each block, the stage's first block needs no input gradient) over links of the
given bandwidths.  ``DRY=1``: the CPU, tiny batches and images, one timed step -- the same code
path, no meaningful numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from localopt.pipeline.analysis import best_split, profile_units, speedups, units
from localopt.pipeline.timeline import CommCost, StageCost, simulate

#: name: (input size, batch, classes) on the GPU
MODELS = {"resnet20": (32, 256, 10), "resnet18": (224, 64, 1000), "vit_small": (224, 64, 1000)}
BACKPROP = ("gpipe", "1f1b", "zb")


class _VitEmbed(nn.Module):
    """A timm ViT's patch embedding, class token and position embedding (one unit)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.patch_embed, self.norm_pre = vit.patch_embed, vit.norm_pre
        self.cls_token, self.pos_embed = vit.cls_token, vit.pos_embed
        object.__setattr__(self, "_vit", vit)        # not a submodule: only its method

    def forward(self, x):
        return self.norm_pre(self._vit._pos_embed(self.patch_embed(x)))


class _VitHead(nn.Module):
    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.norm, self.fc_norm, self.head = vit.norm, vit.fc_norm, vit.head
        object.__setattr__(self, "_vit", vit)

    def forward(self, x):
        return self._vit.forward_head(self.norm(x))


def sequential(name: str, size: int, classes: int) -> nn.Sequential:
    """The model as an ``nn.Sequential`` of its blocks (the units a stage may begin at)."""
    if name == "resnet20":
        from localopt.models import create_model
        m = create_model("resnet20", num_classes=classes)
        return nn.Sequential(*[mod for _, mod in m.pipeline_sequence()])
    import timm
    if name == "resnet18":
        m = timm.create_model("resnet18", num_classes=classes)
        stem = nn.Sequential(m.conv1, m.bn1, m.act1, m.maxpool)
        blocks = [b for layer in (m.layer1, m.layer2, m.layer3, m.layer4) for b in layer]
        return nn.Sequential(stem, *blocks, nn.Sequential(m.global_pool, m.fc))
    if name == "vit_small":
        m = timm.create_model("vit_small_patch16_224", img_size=size, num_classes=classes)
        return nn.Sequential(_VitEmbed(m), *m.blocks, _VitHead(m))
    raise ValueError(f"--models: unknown model {name!r} (choose from {', '.join(MODELS)})")


def stage_costs_of(prof: dict, cuts: list[int], act_bytes: list[float], direct: bool
                   ) -> list[StageCost]:
    """Per stage: summed unit costs; the direct (module-wise) backward is backprop's minus the
    input gradient of the stage's first unit (its input is a received activation)."""
    bounds = [0, *cuts, len(prof["forward"])]
    out = []
    for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
        f = sum(prof["forward"][a:b])
        bw = sum(prof["backward"][a:b])
        bi = sum(prof["backward_input"][a:b])
        d = max(bw - prof["backward_input"][a], 0.0)
        out.append(StageCost(f, bw, backward_input=bi, backward_weight=max(bw - bi, 0.0),
                             direct=d if direct else None,
                             act_bytes=act_bytes[s] if s < len(act_bytes) else 0.0))
    return out


def simulate_model(prof: dict, batch: int, classes: int, stage_counts: list[int],
                   links: dict[str, CommCost]) -> list[dict[str, Any]]:
    """images/s of every schedule per (S, link), micro-batches ``K = max(8, S)``."""
    rows = []
    cost = [f + b for f, b in zip(prof["forward"], prof["backward"])]
    cand = prof["candidate"]
    n_cand = sum(cand[1:])
    for S in stage_counts:
        if S - 1 > n_cand:
            continue
        K = max(8, S)
        mb = batch // K
        scale = mb / prof["batch"]                   # profiled at one micro-batch's size
        p = {k: [v * scale for v in prof[k]] for k in
             ("forward", "backward", "backward_input", "backward_weight")}
        p["candidate"] = cand
        cuts = best_split(cost, cand, S)
        act = [prof["input_bytes_per_sample"][c] * mb for c in cuts]
        costs = stage_costs_of(p, cuts, act, direct=True)
        zb_cuts = best_split(cost, cand, 2 * S, list(range(S)) + list(range(S - 1, -1, -1))) \
            if 2 * S - 1 <= n_cand else None
        for name, link in links.items():
            kw = dict(link=link, e_bytes=mb * classes * 4, batch=batch, steps=3)
            for sched in ("gpipe", "1f1b", "zb", "direct", "direct-async"):
                if sched == "zb":
                    if zb_cuts is None:
                        continue
                    vact = [prof["input_bytes_per_sample"][c] * mb for c in zb_cuts]
                    vc = stage_costs_of(p, zb_cuts, vact, direct=False)
                    r = simulate(vc[:S], "zb", K, virtual_costs=vc, **kw)
                elif sched.startswith("direct"):
                    r = simulate(costs, "direct", K, asynchronous=sched.endswith("async"), **kw)
                else:
                    r = simulate(costs, sched, K, **kw)
                rows.append({"label": sched, "S": S, "M": K, "link": name,
                             "images_per_s": r.images_per_s})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.pipeline_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--stages", default="2,4,8,16,32")
    p.add_argument("--bandwidth", default="3600,100,10,1",
                   help="Gbit/s of the links between stages (3600: NVLink 4, 450 GB/s)")
    p.add_argument("--latency", type=float, default=1e-5, help="seconds per message")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    dry = bool(os.environ.get("DRY"))
    if not dry and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; run with DRY=1 for the CPU smoke test")
    device = torch.device("cpu" if dry else "cuda")
    links = {b: CommCost.of(float(b), args.latency) for b in args.bandwidth.split(",")}
    sync = None if dry else torch.cuda.synchronize
    out: dict[str, Any] = {
        "meta": {"device": "cpu (DRY: a smoke test, not a measurement)" if dry else
                 torch.cuda.get_device_name(), "torch": torch.__version__,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                     timespec="seconds"),
                 "command": "python -m recipes.pipeline_gpu " + " ".join(
                     sys.argv[1:] if argv is None else argv),
                 "note": "one GPU cannot host a multi-GPU pipeline: per-unit costs measured on "
                         "one device, the pipelines simulated from them"},
        "models": {}}
    for name in args.models.split(","):
        size, batch, classes = MODELS[name]
        if dry:
            size, batch = 32, 16
        torch.manual_seed(0)
        model = sequential(name, size, classes).to(device)
        for mod in model.modules():          # each unit's input is a leaf that needs a gradient
            if getattr(mod, "inplace", False) is True:
                mod.inplace = False
        K0 = 8
        x = torch.randn(max(1, batch // K0), 3, size, size, device=device)
        y = torch.randint(0, classes, (x.shape[0],), device=device)
        prof = profile_units(model, x, y, steps=1 if dry else args.steps,
                             warmup=1 if dry else 3, sync=sync)
        rows = simulate_model(prof, batch, classes,
                              [int(s) for s in args.stages.split(",")], links)
        sp = []
        for ln in links:
            for r in speedups([r for r in rows if r["link"] == ln]):
                sp.append({**r, "link": ln})
        out["models"][name] = {"size": size, "batch": batch, "classes": classes,
                               "units": len(units(model)), "profile": prof, "simulated": rows,
                               "speedup": sp}
        best = {}
        for r in sp:
            key = (r["S"], r["link"])
            if key not in best or r["speedup"] > best[key]["speedup"]:
                best[key] = r
        for (S, ln), r in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            print(f"{name:>10} S={S:>2} K={r['M']:>2} {ln:>5} Gbit/s: {r['label']} "
                  f"{r['speedup']:.2f}x over {r['over']}", flush=True)
        del model
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
