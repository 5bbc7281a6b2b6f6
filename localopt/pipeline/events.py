"""What a pipeline step did, when: one :class:`Event` per computation or communication call."""
from __future__ import annotations

import contextlib
import time
from typing import Iterator, NamedTuple

__all__ = ["Event", "KINDS"]

#: ``forward``/``backward``: a stage's computation for one micro-batch (``backward_weight``: the
#: weight gradients a zero-bubble schedule defers after the input gradient of ``backward``);
#: ``send``/``recv``: time inside the (non-blocking) communication calls; ``wait``: blocked
#: waiting for a message; ``update``: an optimizer update the asynchronous direct schedule
#: applies inside a step.
KINDS = ("forward", "backward", "backward_weight", "send", "recv", "wait", "update")


class Event(NamedTuple):
    """One interval of a pipeline step on one process.

    ``start``/``end`` are :func:`time.perf_counter` seconds (CLOCK_MONOTONIC, so comparable
    across the processes of one machine); ``microbatch`` is -1 where a call serves several
    micro-batches or none (torch's batched p2p calls)."""

    stage: int
    kind: str
    microbatch: int
    start: float
    end: float


class Recorder:
    """Collects the events of one step (two ``perf_counter`` calls per event)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.events: list[Event] = []

    def reset(self) -> None:
        self.events = []

    @contextlib.contextmanager
    def span(self, stage: int, kind: str, microbatch: int) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.events.append(Event(stage, kind, microbatch, t0, time.perf_counter()))
