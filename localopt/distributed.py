"""Data parallelism: the one place localopt talks to ``torch.distributed``.

Under ``torch.nn.parallel.DistributedDataParallel`` every rank holds the same weights and
feedback (``DistributedDataParallel`` broadcasts parameters and buffers -- including each
rule's ``localopt_rng`` stream -- from rank 0 at start-up, so feedback drawn later is the same
everywhere) and averages the weight gradients in ``backward()``.  What DDP does not see is the
feedback learned from each rank's own data shard (``bfa``/``bidfa`` reconstructions, ``dkp``'s
``e^T x``, target propagation's feedback losses and re-targeted gradients): the optimizers
(:class:`~localopt.optim.LocalOptimizer`, :class:`~localopt.optim.TargetProp`) average those
gradients over the data-parallel group with :func:`average_`, before the feedback update, so
feedback stays identical on every rank and equals the single-process update on the whole
batch where the update is linear in the per-sample gradients.

The group is found by :func:`find_group`: the ``process_group`` of a DDP-wrapped model, or
an explicit ``process_group=``.  Without ``torch.distributed`` (or outside a group) all of this
is a no-op.
"""
from __future__ import annotations

import warnings
from datetime import timedelta

import torch
from torch import Tensor, nn

__all__ = ["unwrap_parallel", "find_group", "rank", "average_"]


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (``model`` otherwise)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def find_group(model: nn.Module, process_group=None, *, what: str = "feedback"):
    """The data-parallel group to average over: ``process_group`` if given, else that of a
    DDP-wrapped ``model``; ``None`` (no averaging) without one.  Warns when
    ``torch.distributed`` runs on several processes but no group was found (an unwrapped
    model: pass the DDP-wrapped one, or ``process_group=``)."""
    if process_group is not None:
        return process_group
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.process_group
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        warnings.warn(f"localopt: torch.distributed runs {dist.get_world_size()} processes but "
                      f"the optimizer got a model that is not DistributedDataParallel: the "
                      f"{what} learned from each rank's data is not averaged over the ranks. "
                      "Pass the DDP-wrapped model, or process_group=...", UserWarning,
                      stacklevel=3)
    return None


def rank(group) -> int:
    """This process's rank in ``group`` (0 without one)."""
    dist = _dist()
    return 0 if group is None or dist is None else dist.get_rank(group)


def average_(tensors: list[Tensor], group, timeout: timedelta | None = None) -> None:
    """Replace each tensor of ``tensors`` in place by its mean over ``group`` (one coalesced
    all-reduce per dtype and device; a no-op without a group).  Every rank must pass tensors of
    the same shapes in the same order.  ``timeout``: of the collective (default: the group's,
    set by ``init_process_group(timeout=...)``)."""
    dist = _dist()
    if group is None or dist is None or not tensors:
        return
    size = dist.get_world_size(group)
    if size == 1:
        return
    buckets: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for ts in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        work = dist.all_reduce(flat, group=group, async_op=True)
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout)
        flat.div_(size)
        offset = 0
        with torch.no_grad():
            for t in ts:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view_as(t))
                offset += n
