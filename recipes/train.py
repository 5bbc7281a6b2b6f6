"""Train one model with one learning rule on CIFAR-10.

    python -m recipes.train --config mlp_bartunov2018 --rule fa --epochs 20
    python -m recipes.train --model resnet20 --rule fa --epochs 40 --optimizer sgd --lr 0.1
    python -m recipes.train --config mlp_bartunov2018 --rule fa --epochs 30 --resume
    python -m recipes.train --config tp_vgg_ldrl_short --max-steps 100   # a fixed step budget

Writes ``<out_dir>/<name>/``: ``log.jsonl`` (one JSON record per epoch, plus ``start`` and
``final`` records), ``checkpoint.pt`` (after every epoch; ``--resume`` continues from it
exactly), ``curves.png``.

Data parallel (``DistributedDataParallel``): ``--ddp N`` spawns N processes on 127.0.0.1, or
launch with ``torchrun --nproc-per-node N -m recipes.train ...``.  Each rank trains on its
contiguous shard of every batch (``--batch-size`` is the global batch; the shards are cut
after augmentation, so the data are those of the single-process run); rank 0 evaluates,
logs and checkpoints.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from localopt import rng as localopt_rng
from localopt.distributed import unwrap_parallel

from .common import (Config, ConfigError, add_config_args, append_jsonl, apply_rule,
                     build_model, config_from_args, device_name, git_commit, loss_fn,
                     make_optimizer, make_scheduler, pick_device, read_jsonl,
                     rule_in_effect, step_diagnostics)
from .data import CifarArrays, DataNotFoundError, Normalizer, Split, load_cifar10, make_splits
from .data import random_crop_flip
from .alignment import plot_alignment
from .plots import plot_curves
from .runlog import write_summaries
from .divergence import DIVERGENCE_FACTOR, Diverged, diverged, start_loss  # noqa: F401
from .ranks import Ranks, current_ranks  # noqa: F401 (re-exported)

#: settings a resumed run may change; everything else comes from the checkpoint
RESUME_MAY_CHANGE = ("epochs", "device", "threads", "data", "download", "out_dir", "log_every",
                     "eval_batch_size", "ddp")
#: timeout of every collective of a data-parallel run (rank 0 evaluates while the others wait)
DDP_TIMEOUT = timedelta(minutes=30)
def _autocast(cfg: Config, device: torch.device):
    if cfg.amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _prepare(x: torch.Tensor, norm: Normalizer, channels_last: bool) -> torch.Tensor:
    x = norm(x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, cfg: Config, norm: Normalizer,
             channels_last: bool, device: torch.device) -> dict[str, float]:
    """Loss and accuracy on a whole split; one host sync at the end."""
    model.eval()
    criterion = loss_fn(cfg.loss)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for i in range(0, len(split), cfg.eval_batch_size):
        x = _prepare(split.x[i:i + cfg.eval_batch_size], norm, channels_last)
        y = split.y[i:i + cfg.eval_batch_size]
        with _autocast(cfg, device):
            out = model(x)
        loss_sum += criterion(out.float(), y) * len(y)
        correct += (out.argmax(1) == y).sum()
    n = len(split)
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n}


def _epoch_generator(cfg: Config, epoch: int, device: torch.device) -> torch.Generator:
    """Shuffling and augmentation draws of one epoch: a function of (seed, epoch) only, so a
    resumed run sees exactly the batches the uninterrupted one would have."""
    return torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + epoch)


def train_epoch(model, opt, sched, split: Split, cfg: Config, epoch: int, norm: Normalizer,
                channels_last: bool, device: torch.device, log_path: Path, global_step: int,
                progress: bool | None, ranks: Ranks | None = None,
                watch: dict[str, Any] | None = None) -> tuple[dict[str, float], int]:
    """One epoch; raises :class:`Diverged` when the mean loss of the last ``log_every`` steps
    (one host sync each) fails :func:`diverged` against ``watch["start"]`` (set by the run's
    first window)."""
    ranks, watch = ranks or Ranks(), {"start": None} if watch is None else watch
    model.train()
    criterion = loss_fn(cfg.loss)
    gen = _epoch_generator(cfg, epoch, device)
    n, bs = len(split), cfg.batch_size
    steps = n // bs if cfg.drop_last else math.ceil(n / bs)
    if steps == 0:
        raise ConfigError(f"--batch-size {bs} is larger than the training set ({n} images) "
                          "with --drop-last true")
    if cfg.max_steps:  # the step budget ends in this epoch: its first steps, same batches
        steps = min(steps, cfg.max_steps - global_step)
    perm = torch.randperm(n, generator=gen, device=device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    window = torch.zeros(2, device=device)              # loss sum, samples since the last check
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", unit="step", leave=False,
               disable=(None if progress is None else not progress) if ranks.main else True,
               dynamic_ncols=True)
    shard = bs // ranks.world
    t0 = time.perf_counter()
    for step in range(steps):
        idx = perm[step * bs:(step + 1) * bs]
        x, y = split.x[idx], split.y[idx]
        if cfg.augment:
            x = random_crop_flip(x, gen, padding=cfg.crop_padding)
        if ranks.world > 1:  # this rank's shard of the (augmented) global batch
            x = x[ranks.rank * shard:(ranks.rank + 1) * shard]
            y = y[ranks.rank * shard:(ranks.rank + 1) * shard]
        x = _prepare(x, norm, channels_last)
        with _autocast(cfg, device):
            out = model(x)
        loss = criterion(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        global_step += 1
        loss_sum += loss.detach() * len(y)
        window[0] += loss.detach() * len(y)
        window[1] += len(y)
        correct += (out.argmax(1) == y).sum()
        seen += len(y)
        if cfg.diagnostics_every and global_step % cfg.diagnostics_every == 0 and ranks.main:
            eager = unwrap_parallel(getattr(model, "_orig_mod", model))   # not compiled
            extra = step_diagnostics(eager, cfg, global_step, x, y)
            if extra:
                append_jsonl(log_path, {"event": "step", "epoch": epoch, "step": global_step,
                                        **extra})
        bar.update()
        if watch["start"] is None and "first" not in watch:   # one host sync per run
            first = loss.detach() * len(y)
            n = torch.tensor(float(len(y)), device=first.device)
            ranks.sum_(first, n)
            watch["first"] = float(first / n)
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            ranks.sum_(window)
            mean = float(window[0] / window[1])
            if watch["start"] is None:   # a climb inside the first window counts too
                watch["start"] = start_loss(watch.pop("first", mean), mean)
            if diverged(mean, watch["start"]):
                raise Diverged(cfg.rule, epoch, global_step, mean, watch["start"])
            window.zero_()
            if not bar.disable:  # the only host syncs of the loop
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}",
                                acc=f"{correct.item() / seen:.3f}",
                                img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    bar.close()
    seen_t = torch.tensor(float(seen), device=device)
    ranks.sum_(loss_sum, correct, seen_t)   # the whole batch's metrics on every rank
    seen = int(seen_t.item())
    if not math.isfinite(loss_sum.item()):
        print(f"warning: epoch {epoch}: training loss is not finite", file=sys.stderr)
    return {"loss": loss_sum.item() / seen, "acc": correct.item() / seen,
            "time_s": elapsed, "images_per_s": seen / elapsed}, global_step


def _save_checkpoint(path: Path, **state: Any) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False,
          arrays: CifarArrays | None = None, progress: bool | None = None,
          stop_after: int | None = None) -> dict[str, Any] | None:
    """Run (or continue) one training run; returns the ``final`` log record, or None when
    ``stop_after`` (an epoch number) ended this invocation before ``cfg.epochs``."""
    ranks = current_ranks()
    if ranks.world > 1 and cfg.batch_size % ranks.world:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by the {ranks.world} "
                          "data-parallel processes (each trains on an equal shard)")
    run_dir = Path(cfg.out_dir) / cfg.run_name()
    ckpt_path, log_path = run_dir / "checkpoint.pt", run_dir / "log.jsonl"
    ckpt = None
    if resume:
        if not ckpt_path.is_file():
            raise ConfigError(f"--resume: no checkpoint at {ckpt_path} (check --name/--out-dir)")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = dict(ckpt["config"])
        if saved["schedule"] in ("cosine", "onecycle") and cfg.epochs != saved["epochs"]:
            raise ConfigError(f"--resume with --epochs {cfg.epochs}: the {saved['schedule']} "
                              f"schedule of this run spans --epochs {saved['epochs']}; resume "
                              "with that value")
        saved.update({k: getattr(cfg, k) for k in RESUME_MAY_CHANGE})
        cfg = Config(**saved).validate()
    elif ckpt_path.exists() or log_path.exists():
        if not overwrite:
            raise ConfigError(f"{run_dir} already holds a run: pass --resume to continue it, "
                              "--overwrite to start again, or another --name")
        ranks.barrier()   # every rank has checked before rank 0 deletes
        if ranks.main:
            shutil.rmtree(run_dir)
    if ranks.main:        # only rank 0 writes the run folder
        run_dir.mkdir(parents=True, exist_ok=True)

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if arrays is None and ranks.main:
        arrays = load_cifar10(cfg.data or None, cfg.download)
    ranks.barrier()       # rank 0 decoded (and cached) the data; the others read the cache
    if arrays is None:
        arrays = load_cifar10(cfg.data or None, cfg.download)
    splits = make_splits(arrays, cfg.protocol, device, cfg.val_size, cfg.split_seed)
    norm = Normalizer(device)

    torch.manual_seed(cfg.seed)
    # a resumed run keeps every rule option it started with, even where a default changed since
    started_with = None if ckpt is None else ckpt.get("rule_options_in_effect")
    model = apply_rule(build_model(cfg, len(arrays.classes), device), cfg, started_with)
    inner = model
    in_effect = rule_in_effect(inner)
    if ranks.world > 1:   # the start-up broadcast makes every rank rank 0's model and streams
        model = torch.nn.parallel.DistributedDataParallel(
            inner, device_ids=[device.index] if device.type == "cuda" else None)
        if not ranks.main:  # each rank's own dropout masks
            torch.manual_seed(localopt_rng.mix(cfg.seed, ranks.rank))
    channels_last = cfg.channels_last
    opt = make_optimizer(model, cfg)
    # the training forward (and its backward) compiled; evaluation, diagnostics and
    # checkpoints use the eager module (the same parameters)
    forward = torch.compile(model) if cfg.compile else model
    steps_per_epoch = (len(splits["train"]) // cfg.batch_size if cfg.drop_last
                       else math.ceil(len(splits["train"]) / cfg.batch_size))
    if cfg.max_steps and steps_per_epoch and cfg.max_steps > cfg.epochs * steps_per_epoch:
        raise ConfigError(f"--max-steps {cfg.max_steps}: more steps than --epochs {cfg.epochs} "
                          f"hold ({cfg.epochs} x {steps_per_epoch} = "
                          f"{cfg.epochs * steps_per_epoch}); raise --epochs")
    sched = make_scheduler(opt, cfg, max(steps_per_epoch, 1))
    common = {"run": cfg.run_name(), "model": cfg.model, "rule": cfg.rule, "seed": cfg.seed,
              "data": arrays.description, "device": device_name(device), "git": git_commit()}

    start_epoch, global_step = 0, 0
    watch = {"start": None if ckpt is None else ckpt.get("loss_start")}   # see Diverged
    if ckpt is not None:
        inner.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        per_rank = ckpt.get("rng_ranks", [])
        _set_rng_state(per_rank[ranks.rank] if len(per_rank) == ranks.world else ckpt["rng"])
        start_epoch, global_step = ckpt["epoch"], ckpt["global_step"]
    if not ranks.main:
        pass
    elif ckpt is not None:
        # drop what an interrupted epoch may have logged after the checkpoint
        kept = [r for r in read_jsonl(log_path) if r.get("epoch", 0) <= start_epoch
                and r.get("event") != "final"]
        log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        append_jsonl(log_path, {"event": "resume", "epoch": start_epoch, **common,
                                "config": cfg.to_dict(), "rule_options_in_effect": in_effect})
    else:
        n_params = sum(p.numel() for p in model.parameters())
        append_jsonl(log_path, {"event": "start", "epoch": 0, **common, "parameters": n_params,
                                "protocol": cfg.protocol, "config": cfg.to_dict(),
                                "rule_options_in_effect": in_effect, "optimizer": repr(opt)})
    say = (lambda text: print(text, file=sys.stderr)) if ranks.main else (lambda text: None)
    say(f"[{cfg.run_name()}] {cfg.model} + {cfg.rule} on {arrays.description} "
        f"({len(splits['train'])} train, {cfg.protocol} protocol), {device_name(device)}"
        + (f", {ranks.world} data-parallel processes" if ranks.world > 1 else ""))
    if ckpt is not None and in_effect is not None:
        if started_with is None:
            say("note: the checkpoint does not record the rule's options (written by an older "
                "recipes.train): resumed with the library's current defaults")
        else:
            from localopt.rules import make_rule
            given = {k: v for k, v in cfg.rule_options.items() if k in started_with}
            now = make_rule(cfg.rule, given).options()
            changed = {k: v for k, v in started_with.items() if now.get(k) != v}
            if changed:
                say(f"note: resumed with the rule options the run started with, {changed}; "
                    f"the library's defaults are now {({k: now.get(k) for k in changed})}")

    stop = None
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        if cfg.max_steps and global_step >= cfg.max_steps:
            break                                # a resumed run that had spent its budget
        lr = opt.param_groups[0]["lr"]
        try:
            tr, global_step = train_epoch(forward, opt, sched, splits["train"], cfg, epoch,
                                          norm, channels_last, device, log_path, global_step,
                                          progress, ranks, watch)
        except Diverged as e:
            stop = e
            say(f"[{cfg.run_name()}] {e}")
            break
        last = epoch == cfg.epochs or bool(cfg.max_steps and global_step >= cfg.max_steps)
        rng_ranks = ranks.gather(_rng_state())   # a collective: before rank 0 goes its own way
        if not ranks.main:
            if stop_after is not None and epoch >= stop_after and not last:
                return None
            continue
        rec: dict[str, Any] = {"event": "epoch", "epoch": epoch, "step": global_step, "lr": lr,
                               "train_loss": tr["loss"], "train_acc": tr["acc"],
                               "val_loss": None, "val_acc": None,
                               "test_loss": None, "test_acc": None,
                               "epoch_time_s": tr["time_s"],
                               "images_per_s": tr["images_per_s"]}
        t_eval = time.perf_counter()
        evals = ["val"] if "val" in splits else []
        if cfg.test_every_epoch or last:
            evals.append("test")
        for name in evals:
            m = evaluate(inner, splits[name], cfg, norm, channels_last, device)
            rec[f"{name}_loss"], rec[f"{name}_acc"] = m["loss"], m["acc"]
        rec["eval_time_s"] = time.perf_counter() - t_eval
        rec.update(common)
        rec["config"] = cfg.to_dict()
        if rec["val_acc"] is not None and rec["val_acc"] > max(
                (r["val_acc"] or -1 for r in read_jsonl(log_path) if r.get("event") == "epoch"),
                default=-1):                     # the best validation so far: kept for its test
            _save_checkpoint(run_dir / "best.pt", model=inner.state_dict(), epoch=epoch)
        append_jsonl(log_path, rec)
        write_summaries(run_dir)             # summary.csv, TensorBoard scalars
        _save_checkpoint(ckpt_path, model=inner.state_dict(), optimizer=opt.state_dict(),
                         scheduler=sched.state_dict(), rng=rng_ranks[0], rng_ranks=rng_ranks,
                         epoch=epoch, global_step=global_step, config=cfg.to_dict(),
                         rule_options_in_effect=in_effect, loss_start=watch["start"])
        shown = " ".join(f"{k}={rec[k]:.4f}" for k in ("train_loss", "train_acc", "val_acc",
                                                         "test_acc") if rec[k] is not None)
        print(f"[{cfg.run_name()}] epoch {epoch}/{cfg.epochs} {shown} lr={lr:.3g} "
              f"{tr['images_per_s']:.0f} img/s {tr['time_s']:.1f}s", file=sys.stderr)
        if last and epoch < cfg.epochs:
            print(f"[{cfg.run_name()}] stopped at step {global_step} (--max-steps)",
                  file=sys.stderr)
        if stop_after is not None and epoch >= stop_after and not last:
            print(f"[{cfg.run_name()}] stopped after epoch {epoch} (--stop-after); continue "
                  "with --resume", file=sys.stderr)
            return None

    if not ranks.main:
        return None
    epochs = [r for r in read_jsonl(log_path) if r.get("event") == "epoch"]
    last = epochs[-1] if epochs else {"epoch": 0}
    final = {"event": "final", **{k: last.get(k) for k in ("epoch", "train_loss", "train_acc",
                                                           "val_loss", "val_acc", "test_loss",
                                                           "test_acc")},
             "train_time_s": sum(r["epoch_time_s"] for r in epochs),
             "images_per_s": sum(r["images_per_s"] * r["epoch_time_s"] for r in epochs)
             / max(sum(r["epoch_time_s"] for r in epochs), 1e-9),
             "best_val_acc": max((r["val_acc"] for r in epochs if r["val_acc"] is not None),
                                 default=None),
             **_at_best_val(inner, epochs, run_dir, splits, cfg, norm, channels_last, device),
             "diverged": None, **common, "config": cfg.to_dict(), "run_dir": str(run_dir)}
    if stop is not None:   # a diverged run has no result: no accuracy in its final record
        final.update(diverged=stop.record, test_loss=None, test_acc=None,
                     best_val_epoch=None, test_acc_at_best_val=None)
    append_jsonl(log_path, final)
    plot_curves({cfg.rule: epochs}, run_dir / "curves.png", title=plot_title(final))
    plot_alignment(read_jsonl(log_path), run_dir / "alignment.png", title=plot_title(final))
    return final


def _at_best_val(model: nn.Module, epochs: list[dict[str, Any]], run_dir: Path, splits,
                 cfg: Config, norm: Normalizer, channels_last: bool, device: torch.device
                 ) -> dict[str, Any]:
    """``best_val_epoch`` and ``test_acc_at_best_val``: the test accuracy of the model as it
    was after the epoch of best validation accuracy (BioTorch's figure; ``best.pt``)."""
    vals = [r for r in epochs if r.get("val_acc") is not None]
    if not vals or epochs[-1].get("test_acc") is None:
        return {"best_val_epoch": None, "test_acc_at_best_val": None}
    best = max(vals, key=lambda r: r["val_acc"])     # the first epoch of the best value
    if best["epoch"] == epochs[-1]["epoch"]:
        return {"best_val_epoch": best["epoch"], "test_acc_at_best_val": epochs[-1]["test_acc"]}
    saved = torch.load(run_dir / "best.pt", map_location=device, weights_only=False)
    model.load_state_dict(saved["model"])            # the run has ended: its last state is
    acc = evaluate(model, splits["test"], cfg, norm, channels_last, device)["acc"]  # saved
    return {"best_val_epoch": saved["epoch"], "test_acc_at_best_val": acc}


def plot_title(final: dict[str, Any]) -> str:
    return (f"{final['model']} - {final['data']}\n{final['device']}, {final['epoch']} epochs, "
            f"seed {final['seed']}")


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in <out-dir>/<name> from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing run folder of the same name and start again")
    p.add_argument("--stop-after", type=int, metavar="EPOCH",
                   help="stop after this epoch (e.g. to fit a time slot); --resume continues")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _backend(cfg: Config) -> str:
    return "nccl" if pick_device(cfg.device).type == "cuda" else "gloo"


def _run(args: argparse.Namespace, cfg: Config) -> None:
    final = train(cfg, resume=args.resume, overwrite=args.overwrite,
                  progress=False if args.no_progress else None, stop_after=args.stop_after)
    if final is None:
        return
    shown = ", ".join(f"{k} {final[k]:.4f}" for k in ("train_acc", "val_acc", "test_acc")
                      if final[k] is not None)
    print(f"{final['run']}: {shown} after {final['epoch']} epochs "
          f"({final['images_per_s']:.0f} img/s on {final['device']}); log in {final['run_dir']}")


def _ddp_process(rank: int, world: int, port: int, args: argparse.Namespace,
                 cfg: Config) -> None:
    """One process of ``--ddp N``: join the group on 127.0.0.1 and train."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["LOCAL_RANK"] = str(rank)
    torch.distributed.init_process_group(_backend(cfg), init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world, timeout=DDP_TIMEOUT)
    try:
        _run(args, cfg)
    finally:
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__)
    args = parser.parse_args(argv)
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        cfg = config_from_args(args)
        if torchrun:  # launched by torchrun: the group comes from its environment
            torch.distributed.init_process_group(_backend(cfg), timeout=DDP_TIMEOUT)
            try:
                _run(args, cfg)
            finally:
                torch.distributed.destroy_process_group()
        elif cfg.ddp > 1:
            import torch.multiprocessing as mp

            from localopt.pipeline import free_port
            if cfg.batch_size % cfg.ddp:
                raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by --ddp "
                                  f"{cfg.ddp} (each process trains on an equal shard)")
            try:
                mp.start_processes(_ddp_process, args=(cfg.ddp, free_port(), args, cfg),
                                   nprocs=cfg.ddp, start_method="spawn")
            except mp.ProcessRaisedException as e:
                parser.exit(1, f"error: a data-parallel process failed:\n{e}\n")
        else:
            _run(args, cfg)
    except (ConfigError, DataNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
