"""torch.optim-style optimizers for local learning rules."""
from .batch_manhattan import BatchManhattan
from .local import Bidirectional, KolenPollack, LocalOptimizer, WeightMirror
from .muon import Muon, muon_param_groups
from .target_prop import TargetProp

__all__ = ["BatchManhattan", "LocalOptimizer", "KolenPollack", "WeightMirror", "Bidirectional",
           "TargetProp", "Muon", "muon_param_groups"]
