"""Checkpoints of a pipelined run, in the plain model's keys.

Each rank *owns* the state of its stage(s): the ``state_dict`` entries of their modules under the
model's own names (``"3.weight"``, never a stage's ``"parts.0.weight"``), with the rule's state
at them; on the direct schedule the feedback of a stage's first hooked module belongs to the
stage below, which draws, uses (and, ``dkp``, learns) it.  The owned sets of the ranks partition
``model.state_dict()``, so:

* :func:`state_dict` -- this rank's part, its optimizer state and the pipeline's set-up; saved by
  each rank (``torch.save(pipe.state_dict(), f"ckpt.{rank}.pt")``), loaded by the same rank of
  a pipeline with the same split, schedule, rule and process count with :func:`load_state_dict`:
  a bit-exact resume;
* :func:`gather_state_dict` -- the parts of all ranks merged on one rank: a plain
  ``state_dict`` of the whole model, which ``model.load_state_dict`` of the unsplit model takes;
* :func:`load_state_dict` of a plain (whole-model) state dict -- from one process or gathered --
  loads this rank's part into a pipeline of any split.

Anything else -- a part saved with another split, rule, schedule or stage count, a plain state
dict that lacks keys of this rank's stage -- is refused, naming the difference, before any tensor
of the model changes.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..mechanism import Site

__all__ = ["owned_keys", "state_dict", "load_state_dict", "gather_state_dict"]

#: the key of a plain state dict under which localopt records the rule (see localopt.wrap)
_FORMAT_KEY = Site.BUFFER_PREFIX + "rule"


def _is_rule_state(key: str) -> bool:
    return key.rsplit(".", 1)[-1].startswith(Site.BUFFER_PREFIX)


def owned_keys(pipe) -> list[str]:
    """The keys of ``model.state_dict()`` that this rank owns (see the module docstring)."""
    keys: list[str] = []
    entry = set()
    if pipe.schedule == "direct":   # the feedback of my first hooked module: the stage below's
        entry = {n for st in pipe.stage_modules if st.index > 0 for n, _ in st.entry()}
    for st in pipe.stage_modules:
        for name, part in zip(st.names, st.parts):
            for k in part.state_dict(prefix=f"{name}." if name else ""):
                owner = k.rsplit(".", 1)[0]
                if not (_is_rule_state(k) and owner in entry):
                    keys.append(k)
    nxt = pipe.next_site
    if nxt is not None:
        keys += [f"{nxt.name}.{b}" if nxt.name else b for b in nxt.buffer_names]
    return keys


def _setup(pipe) -> dict[str, Any]:
    return {"split": list(pipe.split), "schedule": pipe.schedule,
            "stages": pipe.num_stages, "processes": pipe.world_size, "rank": pipe.rank,
            "rule": None if pipe.rule is None else pipe.rule.name}


def state_dict(pipe) -> dict[str, Any]:
    """This rank's part of the run: ``{"model": <owned entries, plain keys>, "optimizer":
    <the pipeline optimizer's state_dict() or None>, "pipeline": <the set-up>}``."""
    full = pipe.model.state_dict()
    keys = owned_keys(pipe)
    model = {k: full[k] for k in keys}
    if _FORMAT_KEY in full:
        model[_FORMAT_KEY] = full[_FORMAT_KEY]
    opt = pipe.made_optimizer.state_dict() if pipe.made_optimizer is not None else None
    return {"model": model, "optimizer": opt, "pipeline": _setup(pipe)}


def load_state_dict(pipe, checkpoint: dict[str, Any]) -> None:
    """Load :func:`state_dict`'s part (same set-up, same rank) or a plain whole-model state
    dict into this rank's stage(s); see the module docstring."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f"localopt.pipeline: a checkpoint is a dict, got "
                        f"{type(checkpoint).__name__}")
    keys = owned_keys(pipe)
    opt_state = None
    if "pipeline" in checkpoint and "model" in checkpoint:
        saved, ours = checkpoint["pipeline"], _setup(pipe)
        diff = [f"{f}: checkpoint {saved.get(f)!r}, this pipeline {ours[f]!r}"
                for f in ("rule", "stages", "processes", "split", "schedule", "rank")
                if saved.get(f) != ours[f]]
        if diff:
            raise ValueError(
                "localopt.pipeline: this checkpoint part was saved by another pipeline ("
                + "; ".join(diff) + "): a rank's part resumes only the same set-up.  Gather a "
                "whole-model state dict (pipe.gather_state_dict()) to change the split, or "
                "wrap and build as it was saved.  Nothing was loaded")
        sd = checkpoint["model"]
        opt_state = checkpoint.get("optimizer")
        if opt_state is not None and pipe.made_optimizer is None:
            raise ValueError("localopt.pipeline: this checkpoint has optimizer state: call "
                             "pipe.optimizer(...) before load_state_dict so it is loaded too")
    else:
        sd = checkpoint
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(
            f"localopt.pipeline: the checkpoint lacks {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} of rank {pipe.rank}'s stage(s) "
            f"{list(pipe.stages)}: it is not a whole-model state dict of this model (nor this "
            "rank's part).  Nothing was loaded")
    part = {k: sd[k] for k in keys}
    if _FORMAT_KEY in sd:
        part[_FORMAT_KEY] = sd[_FORMAT_KEY]
    result = pipe.model.load_state_dict(part, strict=False)
    wrong = [k for k in result.unexpected_keys]
    if wrong:   # cannot happen for keys taken from the model; a guard for renamed models
        raise ValueError(f"localopt.pipeline: checkpoint keys {wrong[:5]} are not this model's")
    if opt_state is not None:
        pipe.made_optimizer.load_state_dict(opt_state)


def gather_state_dict(pipe, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """Every rank's part merged on rank ``dst`` (CPU tensors): a plain ``state_dict`` of the
    whole model, loadable by the unsplit model; None on the other ranks.  A collective: call on
    every rank (its wait is bounded by the process group's timeout, ``build(timeout=)`` when
    ``build`` created the group)."""
    mine = {k: v.detach().cpu() for k, v in state_dict(pipe)["model"].items()}
    parts: list[Any] = [None] * pipe.world_size if pipe.rank == dst else None
    dist.gather_object(mine, parts, group=pipe.group, group_dst=dst)
    if pipe.rank != dst:
        return None
    merged: dict[str, torch.Tensor] = {}
    for p in parts:
        merged.update(p)
    order = list(pipe.model.state_dict())      # the model's own key order
    return {k: merged[k] for k in order if k in merged}

