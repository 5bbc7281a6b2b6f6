"""SimpleVGG: bp vs l-drl for the same short budget of training steps (CPU-sized).

    python -m recipes.tp_vgg_short --steps 150 --channels 32,32,64,64,128 --out results/tp/vgg_short.json

Both rules see the same batches (a fixed random stream over the 50k training images, no
augmentation) and the same forward optimizer (SGD 0.05, momentum 0.9, weight decay 1e-4, as
ScalingDTP).  L-DRL uses ScalingDTP's per-layer feedback lr/noise, beta 0.7, and its per-layer
feedback iterations [20, 30, 35, 55, 20] divided by ``--iters-div``.  Reports the training-loss
curve, the accuracy on a fixed random 2,000-image subset of the test set, and the step time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import localopt
import models

from .data import load_cifar10

PAPER_ITERS = [20, 30, 35, 55, 20]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--channels", default="128,128,256,256,512")
    p.add_argument("--iters-div", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rules", default="bp,l-drl")
    p.add_argument("--retarget", action="store_true",
                   help="TargetProp(retarget=True): targets from feedback trained on the batch")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    arr = load_cifar10()
    g = torch.Generator().manual_seed(a.seed)
    xtr = torch.tensor(arr.train_x).permute(0, 3, 1, 2)
    mean = xtr[:5000].float().div(255).mean((0, 2, 3), keepdim=True)
    std = xtr[:5000].float().div(255).std((0, 2, 3), keepdim=True)
    prep = lambda u8: (u8.float().div(255) - mean) / std  # noqa: E731
    batches = torch.randint(0, len(xtr), (a.steps, a.batch_size), generator=g)
    test_idx = torch.randperm(len(arr.test_y), generator=g)[:2000]
    xte = prep(torch.tensor(arr.test_x).permute(0, 3, 1, 2)[test_idx])
    yte = torch.tensor(arr.test_y)[test_idx]
    ytr = torch.tensor(arr.train_y)
    channels = tuple(int(c) for c in a.channels.split(","))
    iters = [max(1, k // a.iters_div) for k in PAPER_ITERS]
    result = {"data": arr.description, "device": f"cpu ({a.threads} threads)", "steps": a.steps,
              "lr": a.lr, "retarget": a.retarget,
              "batch_size": a.batch_size, "channels": channels, "seed": a.seed, "runs": {}}
    for rule in a.rules.split(","):
        torch.manual_seed(a.seed)
        model = models.create_model("simple_vgg", channels=channels)
        sgd = dict(lr=a.lr, momentum=0.9, weight_decay=1e-4)
        if rule == "bp":
            opt = torch.optim.SGD(model.parameters(), **sgd)
        else:
            localopt.wrap(model, "l-drl", beta=0.7, seed=a.seed)
            opt = localopt.optim.TargetProp(
                model, torch.optim.SGD, **sgd, feedback_optimizer=torch.optim.SGD,
                feedback_lr=[1e-4, 3.5e-4, 8e-3, 8e-3, 0.18], feedback_iters=iters,
                noise=[0.4, 0.4, 0.2, 0.2, 0.08], feedback_options={"momentum": 0.9},
                retarget=a.retarget)
        curve, t0 = [], time.perf_counter()
        model.train()
        for s in range(a.steps):
            idx = batches[s]
            loss = F.cross_entropy(model(prep(xtr[idx])), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if s % 10 == 0 or s == a.steps - 1:
                curve.append((s, round(loss.item(), 4)))
        elapsed = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            acc = sum((model(xte[i:i + 500]).argmax(1) == yte[i:i + 500]).sum().item()
                      for i in range(0, len(yte), 500)) / len(yte)
        result["runs"][rule] = {"test_acc_2000": acc, "loss_curve": curve,
                                "step_s": elapsed / a.steps,
                                "feedback_iters": iters if rule != "bp" else None}
        print(f"{rule}: test acc (2000 imgs) {acc:.4f}, final loss {curve[-1][1]}, "
              f"{elapsed / a.steps:.2f} s/step", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
