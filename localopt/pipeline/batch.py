"""Every rank's batch, checked against the others' before a step changes anything.

A pipelined step reads the input ``x`` on the first stage and the targets ``y`` on the last
(``drtp``: on every stage): if the ranks were given different batches -- a data loader shuffled
differently per rank -- the step would silently pair rank 0's inputs with another rank's labels.
So each step starts with one small all-gather of a header per rank::

    [has x, rows of x, checksum of x, has y, rows of y, checksum of y, autocast dtype]

and every rank raises the same :class:`PipelineError` naming the ranks that disagree: on the
batch size, on the contents (an order-sensitive checksum, ``sum_i i * sum(sample_i)`` in
float64: one pass over the batch, no host copy of it), on a batch that does not divide into
the micro-batches, or on autocast.  The gather's wait is bounded by the pipeline's timeout.
"""
from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from .comm import PipelineError

__all__ = ["agree_batch", "checksum", "autocast_code"]

_AUTOCAST = {None: 0.0, torch.bfloat16: 1.0, torch.float16: 2.0, torch.float32: 3.0}
_AUTOCAST_NAMES = {v: ("off" if k is None else str(k).replace("torch.", ""))
                   for k, v in _AUTOCAST.items()}


def checksum(t: Tensor) -> Tensor:
    """``sum_i (i + 1) * sum(t[i])`` in float64 (a 0-d tensor): changes when samples change or
    move."""
    rows = t.detach().reshape(t.shape[0], -1).sum(1, dtype=torch.float64)
    w = torch.arange(1, t.shape[0] + 1, dtype=torch.float64, device=t.device)
    return (rows * w).sum()


def autocast_code(device: torch.device) -> float:
    """This thread's autocast state on ``device``'s type, as a number."""
    if not torch.is_autocast_enabled(device.type):
        return 0.0
    return _AUTOCAST.get(torch.get_autocast_dtype(device.type), 9.0)


def _same(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def agree_batch(x: Tensor | None, y: Tensor | None, microbatches: int, group,
                device: torch.device, timeout: float, rank: int, while_waiting=None) -> int:
    """Gather every rank's batch header, check it, and return the batch size ``N`` (rank 0's
    ``x``: stage 0 is always on rank 0).  Raises :class:`PipelineError` on every rank at once
    when the ranks disagree (see the module docstring).  ``while_waiting()``, if given, is
    called while the gather is in flight (work left from an earlier step; it returns whether
    it did any)."""
    own = torch.zeros(7, dtype=torch.float64, device=device)
    if x is not None:
        own[0], own[1], own[2] = 1, x.shape[0], checksum(x.to(device))
    if y is not None:
        own[3], own[4], own[5] = 1, y.shape[0], checksum(y.to(device))
    own[6] = autocast_code(device)
    world = dist.get_world_size(group)
    got = [torch.empty_like(own) for _ in range(world)]
    others = [r for r in range(world) if r != rank]
    peers = f"rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))}"
    t0 = time.monotonic()
    try:
        work = dist.all_gather(got, own, group=group, async_op=True)
        if while_waiting is not None:
            deadline = t0 + timeout
            while not work.is_completed() and time.monotonic() < deadline:
                if not while_waiting():
                    time.sleep(2e-5)
        ok = work.wait(timedelta(seconds=timeout))
    except Exception as exc:  # noqa: BLE001 -- gloo/nccl raise RuntimeError subclasses
        raise PipelineError(f"localopt.pipeline: rank {rank} could not gather the batch headers "
                            f"from {peers} (failed after {time.monotonic() - t0:.1f} s): a rank "
                            f"failed, died, or is stuck (see its own error) [{exc}]") from exc
    if ok is False:
        raise PipelineError(f"localopt.pipeline: rank {rank} could not gather the batch headers "
                            f"from {peers} within {timeout:g} s: a rank is stuck or dead")
    h = torch.stack(got).cpu().tolist()      # one host read per step
    return check_headers(h, microbatches)


def check_headers(h: list[list[float]], microbatches: int) -> int:
    """The checks of :func:`agree_batch` on the gathered headers ``h[rank]``; returns ``N``."""
    if not h[0][0]:
        raise PipelineError("localopt.pipeline: rank 0 (first stage) was given no input x: pass "
                            "the same batch (x, y) on every rank")
    N = int(h[0][1])
    for what, has, rows, ck in (("x", 0, 1, 2), ("y", 3, 4, 5)):
        given = [r for r in range(len(h)) if h[r][has]]
        for r in given:
            if int(h[r][rows]) != N:
                raise PipelineError(
                    f"localopt.pipeline: rank {r}'s {what} has {int(h[r][rows])} rows, rank 0's "
                    f"x {N}: pass the same batch on every rank")
        for r in given[1:]:
            if not _same(h[r][ck], h[given[0]][ck]):
                raise PipelineError(
                    f"localopt.pipeline: rank {r}'s {what} differs from rank {given[0]}'s (batch "
                    "checksums differ): pass the same batch, in the same order, on every rank "
                    "(e.g. the same data loader seed)")
    if N % microbatches:
        raise PipelineError(f"localopt.pipeline: a batch of {N} does not divide into "
                            f"microbatches={microbatches} equal micro-batches")
    modes = [h[r][6] for r in range(len(h))]
    if any(m != modes[0] for m in modes):
        listing = ", ".join(f"rank {r}: {_AUTOCAST_NAMES.get(m, m)}" for r, m in enumerate(modes))
        raise PipelineError(f"localopt.pipeline: the ranks run the step under different autocast "
                            f"settings ({listing}): enter the same torch.autocast on every rank")
    return N
