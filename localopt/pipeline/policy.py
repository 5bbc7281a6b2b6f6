"""The order of one stage's operations under the direct schedule: one policy object, used by the
runner (:mod:`localopt.pipeline.direct`) and by the simulator
(:func:`localopt.pipeline.timeline.simulate`).

A stage ``s`` of ``S`` runs, for every step ``k`` and micro-batch ``m`` (``M`` per step), a
forward ``F(k, m)`` and a backward ``D(k, m)``, and once per step the optimizer update
``U(k)``.  :meth:`DirectPolicy.candidates` lists the operations this stage's own state allows
now, in order of preference; the caller runs the first whose message has arrived (``F``: the
activation from stage ``s - 1``; ``D``: the output error ``e`` from the last stage, when the
stage waits for it) -- it polls, so a backward whose ``e`` is there never waits behind a
forward whose input is not, nor the reverse -- and reports it with :meth:`DirectPolicy.done`.

The rules (``g = k M + m`` counts micro-batches over steps; forwards and backwards run in ``g``
order, so gradients accumulate in a fixed order):

* **Bounded in flight.** ``F(g)`` only while fewer than ``max_in_flight`` micro-batches are
  forwarded and not yet backwarded on this stage (their activations are held).  Default: the
  count 1F1B holds, ``S - s``, on a stage that waits for ``e`` (it returns after the
  micro-batch has crossed the ``S - s - 1`` stages above); 1 on the last stage and with
  ``drtp``, whose backward needs only the stage's own forward.
* **Preference.** A forward first (it feeds the stages above), else the oldest backward, else
  the update.
* **Synchronous** (``asynchronous=False``): ``U(k)`` after ``D(k, M-1)``, and ``F(k+1, 0)``
  after ``U(k)``: the step is the single-process step with gradient accumulation.
* **Asynchronous** (no flush): a stage runs the first ``a = min(max_in_flight, M) - 1``
  forwards of step ``k+1`` *before* its update ``U(k)`` -- while it waits for the last errors
  of step ``k`` -- and ``U(k)`` right after them and its ``M`` backwards of step ``k``.  So
  ``F(k+1, m)`` for ``m < a`` uses the weights before ``U(k)`` (stale by exactly one step), and
  every other forward the current ones; ``D(k, m)`` follows ``U(k-1)``; the update is the
  gradient of the micro-batches of step ``k``.  Where the update falls is fixed by these
  counts, not by when messages arrive, so a run is deterministic.  With the default bound the
  last stage has ``a = 0``: it is synchronous; with one stage the schedule *is* the
  synchronous step.  A ``flush`` (before evaluation, a checkpoint, the end) lets ``U(k)`` run
  without the forwards of step ``k+1``.
"""
from __future__ import annotations

__all__ = ["DirectPolicy", "check_bound"]


def check_bound(max_in_flight, name: str = "max_in_flight") -> None:
    """Raise if ``max_in_flight`` is neither None nor an int >= 1."""
    if max_in_flight is None:
        return
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or \
            max_in_flight < 1:
        raise ValueError(f"localopt.pipeline: {name}={max_in_flight!r} must be an int >= 1 "
                         "(micro-batches a stage holds between their forward and backward) or "
                         "None (1F1B's count)")


class DirectPolicy:
    """The direct schedule's order on one stage (see the module docstring).

    Operations are tuples ``("F", k, m)``, ``("D", k, m)``, ``("U", k, -1)``.  The caller sets
    :attr:`available` (steps whose batch it holds) and :attr:`requested` (updates asked for).
    """

    def __init__(self, stage: int, num_stages: int, microbatches: int, *, waits_for_error: bool,
                 asynchronous: bool = False, max_in_flight: int | None = None) -> None:
        check_bound(max_in_flight)
        self.stage, self.S, self.M = stage, num_stages, microbatches
        self.bound = (num_stages - stage if waits_for_error else 1) if max_in_flight is None \
            else max_in_flight
        self.asynchronous = asynchronous
        #: forwards of step k+1 that run before the update of step k
        self.stale = min(self.bound, microbatches) - 1 if asynchronous else 0
        self.nf = self.nd = self.nu = 0          # forwards, backwards (micro-batches), updates
        self.available = 0                       # steps whose batch is given
        self.requested = 0                       # updates asked for
        self.peak_in_flight = 0

    @property
    def in_flight(self) -> int:
        return self.nf - self.nd

    def candidates(self, flush: bool = False) -> list[tuple]:
        """The operations this stage's state allows now, preferred first (their messages may
        not have arrived yet).  ``flush``: the next update need not wait for the forwards of
        the step after."""
        M, out = self.M, []
        if self.nf < self.available * M and self.nf - self.nd < self.bound:
            k, m = divmod(self.nf, M)
            needs = k - 1 if m >= self.stale else k - 2        # U(needs) done before F(k, m)
            if self.nu > needs:
                out.append(("F", k, m))
        if self.nd < self.nf:
            k, m = divmod(self.nd, M)
            if self.nu >= k:                                   # U(k-1) done before D(k, .)
                out.append(("D", k, m))
        u = self.nu
        if self.requested > u and self.nd >= (u + 1) * M and \
                (flush or self.nf >= (u + 1) * M + self.stale):
            out.append(("U", u, -1))
        return out

    def done(self, op: tuple) -> None:
        kind = op[0]
        if kind == "F":
            self.nf += 1
            self.peak_in_flight = max(self.peak_in_flight, self.nf - self.nd)
        elif kind == "D":
            self.nd += 1
        else:
            self.nu += 1

    def step_done(self, k: int) -> bool:
        """Whether a call for step ``k`` returns: synchronous, when its backwards are done
        (the caller then steps the optimizer); asynchronous, when its forwards are."""
        need = (k + 1) * self.M
        return (self.nf if self.asynchronous else self.nd) >= need

    def finished(self) -> bool:
        """Nothing left to run for the batches and updates given."""
        return self.nd == self.nf == self.available * self.M and self.nu >= self.requested
