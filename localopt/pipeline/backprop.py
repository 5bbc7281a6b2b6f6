"""torch's own backprop pipeline schedules (the baselines), with events recorded.

``"gpipe"`` is ``ScheduleGPipe``, ``"1f1b"`` ``Schedule1F1B`` (one stage per process), ``"zb"``
``ScheduleZBVZeroBubble`` (zero bubble, V order: two stages per process, rank ``r`` holding
stages ``r`` and ``2W-1-r``), each on ``torch.distributed.pipelining.PipelineStage`` objects and
used as torch provides them: every stage sends the gradient of its input to the stage below,
which waits for it (backward locking).  Losses are ``loss_fn`` per micro-batch and torch scales
the accumulated gradients by ``1/M`` (``scale_grads=True``), i.e. the single-process step with
gradient accumulation of ``loss/M``.  Any rule whose input gradient needs the gradient of the
layer above (``bp``, ``fa``, sign-symmetry, ``kp``, ``wm``, ...) runs on them as on one process.

Events: the stage's compute calls (``forward_one_chunk``, ``backward_one_chunk``, and the
deferred ``backward_weight_one_chunk`` of the zero-bubble schedule: a ``"backward_weight"``
event after the micro-batch's ``"backward"``) are timed on this process's stage objects; the
schedule's batched isend/irecv calls and its waits are timed by wrapping torch's
``_batch_p2p``/``_wait_batch_p2p`` for the duration of a step (``microbatch`` -1).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import Tensor, nn

from .comm import PipelineError
from .events import Recorder

__all__ = ["TorchRunner", "BACKPROP_SCHEDULES", "stages_of_rank"]

BACKPROP_SCHEDULES = ("gpipe", "1f1b", "zb")


def stages_of_rank(schedule: str, rank: int, world: int) -> tuple[int, ...]:
    """The stage indices rank ``rank`` holds under ``schedule``."""
    if schedule == "zb":
        return (rank, 2 * world - 1 - rank)
    return (rank,)


class _OwnOutput(nn.Module):
    """A stage whose output, when it is a view (a flatten after pooling), is copied: torch's
    zero-bubble backward detaches stage outputs in place, which autograd refuses on views."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: Tensor) -> Tensor:
        out = self.stage(x)
        return out.clone() if isinstance(out, Tensor) and out._base is not None else out


class TorchRunner:
    """This rank's stage(s) under one of torch's schedules."""

    def __init__(self, stages: list[nn.Module], indices: tuple[int, ...], num_stages: int,
                 schedule: str, microbatches: int, loss_fn, group, device: torch.device,
                 recorder: Recorder) -> None:
        self.stages, self.indices, self.S = stages, indices, num_stages
        self.schedule, self.M, self.loss_fn = schedule, microbatches, loss_fn
        self.group, self.device, self.rec = group, device, recorder
        self._cache: dict[int, tuple] = {}

    def _build(self, N: int):
        from torch.distributed import pipelining as pp
        if N in self._cache:
            return self._cache[N]
        pstages = [pp.PipelineStage(_OwnOutput(m), i, self.S, self.device, group=self.group)
                   for m, i in zip(self.stages, self.indices)]
        for st, i in zip(pstages, self.indices):
            self._instrument(st, i)
        if self.schedule == "zb":
            sched = pp.ScheduleZBVZeroBubble(pstages, self.M, loss_fn=self.loss_fn)
        else:
            cls = pp.ScheduleGPipe if self.schedule == "gpipe" else pp.Schedule1F1B
            sched = cls(pstages[0], self.M, loss_fn=self.loss_fn)
        self._cache[N] = (sched, pstages)
        return sched, pstages

    def _instrument(self, st, index: int) -> None:
        rec = self.rec

        def timed(fn, kind, mb_arg):
            @functools.wraps(fn)
            def run(*args, **kwargs):
                mb = args[0] if args else kwargs.get(mb_arg, -1)
                with rec.span(index, kind, int(mb)):
                    return fn(*args, **kwargs)
            return run

        st.forward_one_chunk = timed(st.forward_one_chunk, "forward", "fwd_chunk_id")
        st.backward_one_chunk = timed(st.backward_one_chunk, "backward", "bwd_chunk_id")
        st.backward_weight_one_chunk = timed(st.backward_weight_one_chunk, "backward_weight",
                                             "bwd_chunk_id")

    @contextlib.contextmanager
    def _timed_p2p(self) -> Iterator[None]:
        from torch.distributed.pipelining import schedules
        rec, stage = self.rec, self.indices[0]
        # torch has no public hook on its schedules' send/recv: the two module functions they
        # call are wrapped for the step; a torch without them runs the step untimed
        batch = getattr(schedules, "_batch_p2p", None)
        wait = getattr(schedules, "_wait_batch_p2p", None)
        if batch is None or wait is None:
            yield
            return

        def timed_batch(ops, desc=None):
            kind = "recv" if ops and all(op.op is torch.distributed.irecv for op in ops) \
                else "send"
            with rec.span(stage, kind, -1):
                return batch(ops, desc)

        def timed_wait(works):
            with rec.span(stage, "wait", -1):
                return wait(works)

        schedules._batch_p2p, schedules._wait_batch_p2p = timed_batch, timed_wait
        try:
            yield
        finally:
            schedules._batch_p2p, schedules._wait_batch_p2p = batch, wait

    def step(self, x: Tensor | None, y: Tensor | None, N: int) -> Tensor | None:
        """One step on a batch of ``N`` (agreed by every rank); returns the ``M`` micro-batch
        losses on the rank holding the last stage, None elsewhere."""
        first, last = 0 in self.indices, self.S - 1 in self.indices
        if last and y is None:
            raise PipelineError("localopt.pipeline: the rank holding the last stage needs the "
                                "targets y")
        sched, _ = self._build(N)
        args = (x.to(self.device),) if first else ()
        kwargs = {}
        losses: list[Tensor] = []
        if last:
            kwargs = {"target": y.to(self.device), "losses": losses}
        with self._timed_p2p():
            try:
                sched.step(*args, **kwargs)
            except PipelineError:
                raise
            except RuntimeError as exc:
                world = self.S // len(self.indices)
                owner = {i: r for r in range(world)
                         for i in stages_of_rank(self.schedule, r, world)}
                me = owner[self.indices[0]]
                peers = sorted({owner[j] for i in self.indices for j in (i - 1, i + 1)
                                if j in owner and owner[j] != me})
                raise PipelineError(
                    f"localopt.pipeline: rank {me} (stages {self.indices}) failed in torch's "
                    f"{self.schedule!r} schedule; its peer rank(s) {peers} may have died, failed "
                    f"or timed out (see their errors): {exc}") from exc
        if not last:
            return None
        return torch.stack([loss.detach() for loss in losses])
