"""Model-parallel (pipelined) training, one stage per process.

    def make():                              # called on the meta device: no values yet
        model = create_model("mlp3x1024")
        localopt.wrap(model, "dfa", seed=0)
        return model

    pipe = localopt.pipeline.build(make, split=["3"], schedule="direct", microbatches=4,
                                   example=x[:1], seed=0)   # this rank's stage, materialised
    opt = pipe.optimizer(torch.optim.Adam, lr=1e-4)
    for x, y in loader:                      # the same batch on every rank (checked)
        opt.zero_grad()
        loss = pipe.step(x, target=y)        # mean loss on the last rank, None elsewhere
        opt.step()
    torch.save(pipe.state_dict(), f"stage{pipe.rank}.pt")   # this rank's part, plain keys

* :mod:`~localopt.pipeline.split` / :mod:`~localopt.pipeline.trace` -- cutting a model into
  stages at named modules (a sequence, or the forward traced by ``torch.fx``);
* :mod:`~localopt.pipeline.materialize` -- a meta-device model given values stage by stage,
  drawn by module name;
* :mod:`~localopt.pipeline.direct` -- the direct schedule (``dfa``, ``bdfa``, ``drtp``,
  ``dkp``, module-wise ``dfa``): every stage runs its backward as soon as the output error
  ``e`` (or, for ``drtp``, the target) is known, no gradient crosses a stage boundary;
* :mod:`~localopt.pipeline.backprop` -- torch's own schedules (``gpipe``, ``1f1b``, ``zb``)
  for backprop and the rules that need the next stage's gradient;
* :mod:`~localopt.pipeline.batch` -- every step's check that the ranks were given one batch;
* :mod:`~localopt.pipeline.checkpoint` -- each rank's part in the plain model's keys, gathered
  or resumed;
* :class:`Event` / ``PipelineStep.events`` -- what each rank computed and communicated, when;
  :mod:`~localopt.pipeline.analysis` measures runs and where to cut,
  :mod:`~localopt.pipeline.timeline` simulates longer pipelines.

The guide: ``docs/guide/model-parallel.md``.
"""
from .comm import PipelineError, destroy, free_port, launch
from .events import Event
from .materialize import materialize
from .split import Stage, blocks, split_stages
from .step import SCHEDULES, PipelineStep, build

__all__ = ["build", "PipelineStep", "Event", "PipelineError", "SCHEDULES", "launch", "destroy",
           "split_stages", "Stage", "blocks", "materialize", "free_port"]
