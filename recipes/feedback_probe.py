"""How much of each learned feedback matrix lies along its layer's mean input.

    python -m recipes.feedback_probe runs/table-cpu/resnet20/bidfa-s42 [--images 256]

Loads a run's last checkpoint (``checkpoint.pt`` beside its ``log.jsonl``), rebuilds the
wrapped model from the logged config, runs ``--images`` training images drawn at random (seed
0) through it in training mode, and prints for every hooked layer with a feedback matrix:

* ``B along mean``: ``||B m||^2 / ||B||_F^2`` for ``m`` the unit direction of the layer's mean
  input over the batch (the flattened input for a dense direct feedback ``(E, D)``; the mean
  over positions for a channel-shared ``(K, C)`` or a W-shaped B's input features, a conv
  kernel summed over its taps).  A random B has about ``1 / D``; a B that has learned to
  read out the mean activity, close to 1.
* ``mean share``: ``||mean x||^2 / mean ||x||^2``, how much of the input's energy the mean
  activity holds.
* ``spread along mean``: ``E[((x - mean x) . m)^2] / E||x - mean x||^2``, the share of the
  inputs' variation about their mean that lies along the mean direction itself (samples whose
  activity differs mostly in overall level: near 1; isotropic: about ``1 / D``).
* for a ``Linear`` layer whose B has W's shape (``bfa``, ``fa``, ``kp``, ...): the angles to W
  of B, of the layer's least-squares inverse on the batch (``(W C W^T)^-1 W C``, ``C`` the
  inputs' second moment: the minimiser of ``bfa``'s reconstruction loss), and of the centred
  inverse (``C`` the inputs' covariance).

Reads no private state: the model's ``state_dict``, ``localopt.sites`` and ``Site.buffer``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from .common import apply_rule, build_model, load_config
from .data import Normalizer, load_cifar10


def probe(run_dir: Path, images: int = 256, data: str | None = None) -> list[dict]:
    import localopt
    start = json.loads((run_dir / "log.jsonl").read_text().splitlines()[0])
    keys = ("model", "model_options", "rule", "rule_options", "seed")
    cfg = load_config(None, **{k: start["config"][k] for k in keys})
    arrays = load_cifar10(data or start["config"].get("data") or None)
    idx = torch.randperm(len(arrays.train_y), generator=torch.Generator().manual_seed(0))
    x = torch.from_numpy(arrays.train_x[idx[:images].numpy()]).permute(0, 3, 1, 2)
    model = apply_rule(build_model(cfg, len(arrays.classes), torch.device("cpu")), cfg)
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"])
    model.train()
    inputs: dict[str, torch.Tensor] = {}
    sites = localopt.sites(model)
    hooks = [s.module.register_forward_pre_hook(
        lambda mod, args, name=s.name: inputs.__setitem__(name, args[0].detach()))
        for s in sites]
    with torch.no_grad():
        model(Normalizer("cpu")(x))
    for h in hooks:
        h.remove()
    rows = []
    for s in sites:
        B = s.buffer("feedback") if s.has_buffer("feedback") else None
        inp = inputs.get(s.name)
        if B is None or inp is None or B.numel() == 0:
            continue
        row = {"layer": s.name, **mean_shares(inp, B)}
        W = getattr(s.module, "weight", None)
        if isinstance(s.module, torch.nn.Linear) and W is not None and B.shape == W.shape:
            row.update(_inverse_angles(inp.reshape(-1, inp.shape[-1]), W.detach(), B))
        rows.append(row)
    return rows


def mean_shares(inp: torch.Tensor, B: torch.Tensor) -> dict[str, float]:
    """``B_along_mean``, ``mean_share`` and ``spread_along_mean`` (module docstring) of a
    layer's batch of inputs ``inp`` and its feedback ``B``."""
    mean = inp.mean(0)
    # a W-shaped conv B: its response to a constant map, the kernel summed
    B2 = B.flatten(2).sum(2) if B.dim() > 2 else B.reshape(B.shape[0], -1)
    per_feature = B2.shape[1] != mean.numel()  # channel-shared or W-shaped: per feature
    m = mean.reshape(B2.shape[1], -1).mean(1) if per_feature else mean.flatten()
    m = m / m.norm().clamp_min(1e-30)
    dev = inp - mean
    dev = dev.reshape(len(dev), B2.shape[1], -1).mean(2) if per_feature else dev.flatten(1)
    return {"B_along_mean": ((B2 @ m).square().sum() / B2.square().sum()).item(),
            "mean_share": (mean.square().sum() / inp.square().mean(0).sum()).item(),
            "spread_along_mean": ((dev @ m).square().mean()
                                  / dev.square().sum(1).mean().clamp_min(1e-30)).item()}


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = (a.flatten() @ b.flatten()) / (a.norm() * b.norm()).clamp_min(1e-300)
    return math.degrees(math.acos(float(cos.clamp(-1.0, 1.0))))


def _inverse_angles(X: torch.Tensor, W: torch.Tensor, B: torch.Tensor) -> dict[str, float]:
    """Angles (degrees) to W of B and of the least-squares inverses, plain and centred."""
    X, W, B = X.double(), W.double(), B.double()
    C = X.t() @ X / len(X)
    mu = X.mean(0)
    inverse = {k: torch.linalg.solve(W @ c @ W.t(), W @ c)
               for k, c in (("inverse", C), ("centred_inverse", C - torch.outer(mu, mu)))}
    return {"B_to_W": _angle(B, W), **{f"{k}_to_W": _angle(v, W) for k, v in inverse.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (log.jsonl, checkpoint.pt)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--data", help="CIFAR-10 location (default: the run's, else LOCALOPT_DATA)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    for run in a.runs:
        rows = probe(run, a.images, a.data)
        print(f"{run}: {len(rows)} layers")
        print(f"  {'layer':<20} {'B along mean':>12} {'mean share':>10} "
              f"{'spread along mean':>17}")
        for r in rows:
            extra = "".join(f"  {k} {r[k]:.1f} deg" for k in ("B_to_W", "inverse_to_W",
                                                              "centred_inverse_to_W") if k in r)
            print(f"  {r['layer']:<20} {r['B_along_mean']:>12.3f} {r['mean_share']:>10.2f} "
                  f"{r['spread_along_mean']:>17.3f}" + extra)
        if rows:
            for key in ("B_along_mean", "spread_along_mean"):
                v = [r[key] for r in rows]
                print(f"  range of {key.replace('_', ' ')}: {min(v):.2f}-{max(v):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
