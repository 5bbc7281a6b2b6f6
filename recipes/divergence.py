"""The divergence test shared by :mod:`recipes.train` (which stops a diverging run) and the
results report (which shows such a run as diverged, never as an accuracy)."""

from __future__ import annotations

import math

__all__ = ["DIVERGENCE_FACTOR", "diverged", "start_loss", "Diverged"]

#: a run has diverged when its training loss (mean over ``log_every`` steps) is not finite or
#: exceeds this multiple of the run's first such mean; ``recipes.report`` applies the same
#: test to the per-epoch losses of a log
DIVERGENCE_FACTOR = 3.0


def start_loss(first_step: float, first_window: float) -> float:
    """The reference of :func:`diverged`: the lower of the run's first step's loss and the
    mean over its first ``log_every`` steps, so that a loss that climbs within that first
    window is measured against where it began.  A non-finite first value is ignored."""
    finite = [v for v in (first_step, first_window) if math.isfinite(v)]
    return min(finite) if finite else first_window


def diverged(loss: float, start: float | None) -> bool:
    """The divergence test of :data:`DIVERGENCE_FACTOR` (``start``: the reference loss)."""
    return not math.isfinite(loss) or (start is not None and loss > DIVERGENCE_FACTOR * start)


class Diverged(RuntimeError):
    """Training stopped: the loss diverged (see :func:`diverged`); ``record`` goes to the log."""

    def __init__(self, rule: str, epoch: int, step: int, loss: float, start: float | None):
        self.record = {"epoch": epoch, "step": step, "loss": loss, "start_loss": start}
        super().__init__(f"rule {rule!r} diverged at epoch {epoch}, step {step}: training loss "
                         f"{loss:.4g} over the last steps, against {start:.4g} at the start "
                         f"(the limit: {DIVERGENCE_FACTOR:g}x, or not finite); run stopped")
