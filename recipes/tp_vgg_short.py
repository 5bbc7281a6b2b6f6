"""SimpleVGG: bp vs l-drl for the same short budget of training steps (CPU-sized).

    python -m recipes.tp_vgg_short --steps 150 --channels 32,32,64,64,128 --out results/tp/vgg_short.json

Both rules see the same batches (a fixed random stream over the 50k training images, no
augmentation) and the same forward optimizer (SGD 0.05, momentum 0.9, weight decay 1e-4, as
ScalingDTP).  L-DRL uses ScalingDTP's per-layer feedback lr/noise, beta 0.7, and its per-layer
feedback iterations [20, 30, 35, 55, 20] divided by ``--iters-div``; ``--warmup N`` first
trains its feedback alone on N further batches (``TargetProp(feedback_warmup=N)``), and
``--ldrl-lr`` gives it its own forward learning rate; ``--optimizer adam`` swaps the forward
SGD for Adam (both rules).  Reports the training-loss curve (stops
at a non-finite loss), the accuracy on a fixed random 2,000-image subset of the test set, and
the step time.

**beta and the batch reduction.**  The library's top target is ``y - β ∂L/∂y`` with the loss as
the user computes it (here the batch-*mean* cross-entropy), and each block's update is
``(x - x̂)/β``.  ScalingDTP takes ``β = 0.7`` on the *summed* cross-entropy (the target moves
each example by ``0.7 (onehot - softmax)``) and updates with ``(x - x̂)/B`` (``B`` = batch).
So ScalingDTP's run is ``--beta 0.7*B`` (89.6 at batch 128) with ``--ldrl-lr 0.7 * lr``
(0.035 for its 0.05): the same targets and the same updates.  With the default ``--beta 0.7``
the targets move 128x less, so the nonlinear feedback ``g`` is used in its linear regime.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import localopt
from localopt import models

from .data import load_cifar10

PAPER_ITERS = [20, 30, 35, 55, 20]
PAPER_FEEDBACK_LR = [1e-4, 3.5e-4, 8e-3, 8e-3, 0.18]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--channels", default="128,128,256,256,512")
    p.add_argument("--iters-div", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05, help="forward learning rate (both rules)")
    p.add_argument("--ldrl-lr", type=float, default=None, help="forward lr of l-drl (default --lr)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                   help="forward optimizer: SGD (momentum 0.9, wd 1e-4, ScalingDTP) or Adam")
    p.add_argument("--warmup", type=int, default=0,
                   help="l-drl: feedback-only steps (TargetProp feedback_warmup) before the "
                        "--steps training steps, on extra batches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rules", default="bp,l-drl")
    p.add_argument("--retarget", action=argparse.BooleanOptionalAction, default=None,
                   help="TargetProp(retarget=...): targets from feedback trained on the batch "
                        "(default: the rule's, on for l-drl)")
    p.add_argument("--diagnostics-every", type=int, default=0, metavar="N",
                   help="every N steps record, per layer, the angle of the rule's weight "
                        "gradient to backprop's and the ratio of their norms")
    p.add_argument("--feedback-lr-scale", type=float, default=1.0,
                   help="l-drl: multiply ScalingDTP's per-layer feedback learning rates")
    p.add_argument("--feedback-optimizer", choices=["sgd", "adam"], default="sgd",
                   help="l-drl feedback optimizer: ScalingDTP's SGD (momentum 0.9, its "
                        "per-layer lr) or Adam (lr --feedback-lr for every layer)")
    p.add_argument("--feedback-lr", type=float, default=1e-4,
                   help="l-drl: the feedback lr of every layer with --feedback-optimizer adam")
    p.add_argument("--switches", choices=["clean", "perturbed"], default="clean",
                   help="l-drl option: max-pool switches of the feedback loss's eta term")
    p.add_argument("--transposed-feedback", action="store_true",
                   help="control: before every step set each l-drl feedback weight to its "
                        "block's forward weight (V = W, bias 0) and do not train it")
    p.add_argument("--beta", type=float, default=0.7,
                   help="l-drl target step: the top target is y - beta * dL/dy with L the "
                        "batch-mean cross-entropy.  ScalingDTP's beta 0.7 is taken on the "
                        "summed cross-entropy, i.e. beta = 0.7 * batch size here; its forward "
                        "lr then corresponds to --ldrl-lr = 0.7 * its lr (module docstring)")
    p.add_argument("--out", default="")
    p.add_argument("--table", metavar="PATH", help="print the markdown table of the JSON results "
                   "in the folder PATH (written by --out), or of the runs.jsonl that "
                   "recipes/gpu_table.sh writes with PLAN=..., and exit")
    a = p.parse_args(argv)
    if a.table:
        t = Path(a.table)
        print(runs_table(t) if t.suffix == ".jsonl" else table(sorted(t.glob("*.json"))))
        return 0
    torch.set_num_threads(a.threads)
    arr = load_cifar10()
    g = torch.Generator().manual_seed(a.seed)
    xtr = torch.tensor(arr.train_x).permute(0, 3, 1, 2)
    mean = xtr[:5000].float().div(255).mean((0, 2, 3), keepdim=True)
    std = xtr[:5000].float().div(255).std((0, 2, 3), keepdim=True)
    prep = lambda u8: (u8.float().div(255) - mean) / std  # noqa: E731
    batches = torch.randint(0, len(xtr), (a.steps, a.batch_size), generator=g)
    warm_batches = torch.randint(0, len(xtr), (a.warmup, a.batch_size), generator=g)
    test_idx = torch.randperm(len(arr.test_y), generator=g)[:2000]
    xte = prep(torch.tensor(arr.test_x).permute(0, 3, 1, 2)[test_idx])
    yte = torch.tensor(arr.test_y)[test_idx]
    ytr = torch.tensor(arr.train_y)
    channels = tuple(int(c) for c in a.channels.split(","))
    iters = [0 if a.transposed_feedback else max(1, k // a.iters_div) for k in PAPER_ITERS]
    result = {"data": arr.description, "device": f"cpu ({a.threads} threads)", "steps": a.steps,
              "lr": a.lr, "ldrl_lr": a.ldrl_lr or a.lr, "warmup": a.warmup,
              "transposed_feedback": a.transposed_feedback,
              "switches": a.switches, "optimizer": a.optimizer, "beta": a.beta,
              "feedback_lr_scale": a.feedback_lr_scale,
              "feedback_optimizer": a.feedback_optimizer,
              "feedback_lr": a.feedback_lr if a.feedback_optimizer == "adam" else None,
              "batch_size": a.batch_size, "channels": channels, "seed": a.seed, "runs": {}}
    for rule in a.rules.split(","):
        torch.manual_seed(a.seed)
        model = models.create_model("simple_vgg", channels=channels)
        sgd = dict(lr=a.lr if rule == "bp" else (a.ldrl_lr or a.lr))
        if a.optimizer == "sgd":
            sgd.update(momentum=0.9, weight_decay=1e-4)
        fwd = torch.optim.SGD if a.optimizer == "sgd" else torch.optim.Adam
        if a.feedback_optimizer == "sgd":
            feedback = dict(feedback_optimizer=torch.optim.SGD, feedback_options={"momentum": 0.9},
                            feedback_lr=[a.feedback_lr_scale * v for v in PAPER_FEEDBACK_LR])
        else:
            feedback = dict(feedback_optimizer=torch.optim.Adam, feedback_lr=a.feedback_lr)
        warm = 0 if rule == "bp" else a.warmup
        if rule == "bp":
            opt = fwd(model.parameters(), **sgd)
        else:
            localopt.wrap(model, "l-drl", beta=a.beta, seed=a.seed, switches=a.switches)
            opt = localopt.optim.TargetProp(
                model, fwd, **sgd, **feedback,
                feedback_iters=iters,
                noise=[0.4, 0.4, 0.2, 0.2, 0.08],
                retarget=a.retarget, feedback_warmup=warm)
        curve, diag, t0 = [], [], time.perf_counter()
        model.train()
        for s in range(-warm, a.steps):
            idx = batches[s] if s >= 0 else warm_batches[s + warm]
            xb, yb = prep(xtr[idx]), ytr[idx]
            if rule != "bp" and a.transposed_feedback:
                with torch.no_grad():
                    for b in opt.blocks:
                        b.site.buffer("feedback").copy_(b.layer.weight)
                        b.site.buffer("feedback_bias").zero_()
            if rule != "bp" and a.diagnostics_every and s >= 0 and s % a.diagnostics_every == 0:
                cmp = localopt.diagnostics.compare_to_backprop(model, F.cross_entropy, xb, yb)
                diag.append({"step": s, **{k: {n: round(v, 3) for n, v in d.items()}
                                           for k, d in cmp.items()}})
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if s % 10 == 0 or s == a.steps - 1:
                curve.append((s, round(loss.item(), 4)))  # s < 0: feedback warm-up
            if not torch.isfinite(loss):  # diverged: no point in going on
                curve.append((s, float("nan")))
                break
        elapsed = time.perf_counter() - t0  # warm-up steps included
        model.eval()
        with torch.no_grad():
            acc = sum((model(xte[i:i + 500]).argmax(1) == yte[i:i + 500]).sum().item()
                      for i in range(0, len(yte), 500)) / len(yte)
        if rule != "bp":
            result["retarget"] = opt.retarget
        result["runs"][rule] = {"test_acc_2000": acc, "loss_curve": curve,
                                "step_s": elapsed / (a.steps + warm), "warmup": warm,
                                "lr": sgd["lr"], "diagnostics": diag,
                                "feedback_iters": iters if rule != "bp" else None}
        print(f"{rule}: test acc (2000 imgs) {acc:.4f}, final loss {curve[-1][1]}, "
              f"{elapsed / (a.steps + warm):.2f} s/step", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


def table(paths: list[Path]) -> str:
    """One markdown row per run of the given result files."""
    rows = ["| file | rule | lr | warm-up | feedback iters | loss at step 0 / 100 / 200 / 300 / last "
            "| test acc (2,000) | s/step | update angle to BP, layers 1-5 (last record) |",
            "|---|---|---:|---:|---|---|---:|---:|---|"]
    for path in paths:
        res = json.loads(path.read_text())
        for rule, run in res["runs"].items():
            curve = dict((s, l) for s, l in run["loss_curve"])
            last_step = max(curve)
            # diverged: the first recorded step whose loss is not finite or > 3x the first loss
            bad = [s for s, v in sorted(curve.items()) if s >= 0 and not (v < 3 * curve[0])]
            fmt = lambda v: f"{v:.2f}" if abs(v) < 100 else f"{v:.1e}"  # noqa: E731
            pts = [fmt(curve[s]) if s in curve else "-" for s in (0, 100, 200, 300)]
            pts.append(f"diverged at {bad[0]}" if bad else fmt(curve[last_step]))
            iters = run.get("feedback_iters")
            what = rule
            if rule != "bp" and res.get("transposed_feedback"):
                what, iters = "l-drl, V = W (control)", None
            elif rule != "bp":
                what = f"l-drl, switches={res.get('switches', 'clean')}"
            if res.get("optimizer", "sgd") != "sgd":
                what += f", {res['optimizer']}"
            if rule != "bp" and res.get("feedback_lr_scale", 1.0) != 1.0:
                what += f", feedback lr x{res['feedback_lr_scale']}"
            if rule != "bp" and res.get("retarget"):
                what += ", retarget"
            if rule != "bp" and res.get("beta", 0.7) != 0.7:
                what += f", beta {res['beta']}"
            if rule != "bp" and res.get("feedback_optimizer", "sgd") != "sgd":
                what += f", feedback {res['feedback_optimizer']} {res['feedback_lr']}"
            diag = run.get("diagnostics") or []
            ang = "-"
            if diag:
                ang = " / ".join(f"{v:.0f}" for v in list(diag[-1]["update_angle"].values())[:5])
                ang += f" (step {diag[-1]['step']})"
            rows.append(f"| {path.name} | {what} | {run['lr']} | {run.get('warmup', 0)} | "
                        f"{iters or '-'} | {' / '.join(pts)} | {100 * run['test_acc_2000']:.1f} | "
                        f"{run['step_s']:.2f} | {ang} |")
    return "\n".join(rows)


def runs_table(path: Path) -> str:
    """One markdown row per run of a ``runs.jsonl`` of ``recipes/gpu_table.sh`` with a ``PLAN`` (records of
    ``recipes.train``, tagged with the run name)."""
    runs: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        run = runs.setdefault(r["run"], {"epochs": [], "steps": []})
        if r.get("event") == "start":
            run["start"] = r
        elif r.get("event") == "epoch":
            run["epochs"].append(r)
        elif r.get("event") == "step":
            run["steps"].append(r)
    rows = ["| run | rule, options | lr | feedback iters | test acc per epoch | train loss per "
            "epoch | img/s | update angle to BP, layers 1-5, at steps 100 / 200 |",
            "|---|---|---:|---|---|---|---:|---|"]
    for name, run in runs.items():
        cfg = run["start"]["config"]
        rule = cfg["rule"] + (f", {cfg['rule_options']}" if cfg["rule_options"] else "")
        if cfg["optimizer"] != "sgd":
            rule += f", {cfg['optimizer']}"
        if cfg["rule"] != "bp" and (cfg["feedback_options"].get("retarget") or
                                    "retarget=True" in run["start"].get("optimizer", "")):
            rule += ", retarget"
        iters = cfg["feedback_options"].get("feedback_iters") if cfg["rule"] != "bp" else "-"
        accs = " / ".join(f"{100 * e['test_acc']:.2f}" for e in run["epochs"])
        losses = " / ".join("nan" if not math.isfinite(e["train_loss"]) else
                            f"{e['train_loss']:.3f}" for e in run["epochs"])
        ips = sum(e["images_per_s"] for e in run["epochs"]) / max(1, len(run["epochs"]))
        ang = []
        for st in run["steps"]:
            if st["step"] in (100, 200) and cfg["rule"] != "bp":
                vals = list(st["alignment"]["update_angle"].values())[:5]
                ang.append(" ".join("nan" if not math.isfinite(v) else f"{v:.0f}" for v in vals))
        rows.append(f"| {name} | {rule} | {cfg['lr']} | {iters} | {accs} | {losses} | {ips:.0f} | "
                    f"{' / '.join(ang) or '-'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
