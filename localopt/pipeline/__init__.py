"""Model-parallel (pipelined) training, one stage per process.

    pipe = localopt.pipeline.build(model, split=["3"], schedule="direct", microbatches=4,
                                   example=x[:1])
    opt = pipe.optimizer(torch.optim.Adam, lr=1e-4)
    for x, y in loader:                      # the same batch on every rank
        opt.zero_grad()
        loss = pipe.step(x, y)               # mean loss on the last stage, None elsewhere
        opt.step()

* :mod:`~localopt.pipeline.split` -- cutting a model into stages at named modules;
* :mod:`~localopt.pipeline.direct` -- the direct schedule (``dfa``, ``bdfa``, ``drtp``,
  ``dkp``, module-wise ``dfa``): every stage runs its backward as soon as the output error
  ``e`` (or, for ``drtp``, the target) is known, no gradient crosses a stage boundary;
* :mod:`~localopt.pipeline.backprop` -- torch's own schedules (``gpipe``, ``1f1b``, ``zb``)
  for backprop and the rules that need the next stage's gradient;
* :class:`Event` / ``PipelineStep.events`` -- what each rank computed and communicated, when;
  :mod:`~localopt.pipeline.timeline` draws and simulates them.
"""
from .comm import PipelineError, destroy, free_port, launch
from .events import Event
from .materialize import materialize
from .split import Stage, blocks, split_stages
from .step import SCHEDULES, PipelineStep, build

__all__ = ["build", "PipelineStep", "Event", "PipelineError", "SCHEDULES", "launch", "destroy",
           "split_stages", "Stage", "blocks", "materialize", "free_port"]
