"""The ``--epochs`` runs of ``recipes.pipeline``: CIFAR-10 training, pipelined on every rank
(:func:`train`) or in one process with the same loop, data order and seeds
(:func:`train_single`, ``--stages 1``), with the test accuracy after every epoch.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .pipeline import DEFAULT_TRAIN, _build, _csv, _rule_schedule, rule_options

__all__ = ["train", "train_single"]


def _training_data(args) -> tuple:
    """CIFAR-10 (``--data``) split for training (all 50k) and test, the normaliser, the model's
    training defaults, and the results record to fill."""
    from .data import Normalizer, load_cifar10, make_splits
    arrays = load_cifar10(args.data or None)
    dflt = DEFAULT_TRAIN.get(args.model, DEFAULT_TRAIN["resnet20"])
    return (make_splits(arrays, "full", "cpu"), Normalizer("cpu"), dflt,
            {"data": arrays.description, "runs": []})


def train(args, plan: dict) -> dict[str, Any]:
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


def _evaluate(model, predict_fn, test, norm) -> float | None:
    correct, tot = 0, 0
    model.eval()
    for i in range(0, len(test), 1000):
        with torch.no_grad():
            out = predict_fn(norm(test.x[i:i + 1000]))
        if out is not None:
            correct += int((out.argmax(1) == test.y[i:i + 1000]).sum())
            tot += len(out)
    model.train()
    return correct / tot if tot else None


def _train_loop(args, model, step_fn, predict_fn, opt, splits, norm, is_last: bool) -> dict:
    """Epochs of shuffled batches (seeded by (seed, epoch), the same on every rank), then the
    test set in eval mode (BatchNorm running statistics) on the last stage; with
    ``--eval-every N`` also every ``N`` steps.  ``curve``: (training images seen, training
    wall-clock seconds -- evaluation excluded --, test accuracy) at every evaluation."""
    train, test = splits["train"], splits["test"]
    n, bs = len(train), args.batch
    hist: dict[str, Any] = {"epochs": [], "curve": []}
    every = getattr(args, "eval_every", 0) or 0
    images, clock = 0, 0.0
    for epoch in range(1, args.epochs + 1):
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=gen)
        model.train()
        elapsed = 0.0
        t0 = time.perf_counter()
        loss_sum, seen, curve = 0.0, 0, []
        nsteps = n // bs if not args.max_steps else min(n // bs, args.max_steps)
        for k in range(nsteps):
            idx = perm[k * bs:(k + 1) * bs]
            x, y = norm(train.x[idx]), train.y[idx]
            opt.zero_grad(set_to_none=True)
            loss = step_fn(x, y)
            opt.step()
            images += len(idx)
            if loss is not None:
                loss_sum += float(loss) * len(y)
                seen += len(y)
                if k % 50 == 0:
                    curve.append([k, float(loss)])
            if every and (k + 1) % every == 0 and k + 1 < nsteps:
                elapsed += time.perf_counter() - t0
                acc = _evaluate(model, predict_fn, test, norm)
                hist["curve"].append([images, clock + elapsed, acc])
                t0 = time.perf_counter()
        elapsed += time.perf_counter() - t0
        clock += elapsed
        acc = _evaluate(model, predict_fn, test, norm)
        hist["curve"].append([images, clock, acc])
        rec = {"epoch": epoch, "train_loss": loss_sum / seen if seen else None,
               "test_acc": acc, "time_s": elapsed,
               "images_per_s": nsteps * bs / elapsed, "loss_curve": curve}
        hist["epochs"].append(rec)
        if is_last:
            print(f"[pipeline] epoch {epoch}: train loss {rec['train_loss']:.4f}, test acc "
                  f"{rec['test_acc']:.4f}, {elapsed:.0f} s", flush=True)
    return hist


def train_single(args) -> dict[str, Any]:
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
            localopt.wrap(model, rule, seed=args.seed, **rule_options(args, model, rule))
        opt = torch.optim.Adam(model.parameters(), lr=args.lr or dflt["lr"], eps=dflt["eps"])

        def step(x, y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss.detach()
        hist = _train_loop(args, model, step, model, opt, splits, norm, is_last=True)
        out["runs"].append({"label": label, "M": 1, "optimizer": dict(
            name="adam", lr=args.lr or dflt["lr"], eps=dflt["eps"]), **hist})
    return out
