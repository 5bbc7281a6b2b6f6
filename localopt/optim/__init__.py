"""torch.optim-style optimizers for local learning rules."""
from .batch_manhattan import BatchManhattan

__all__ = ["BatchManhattan"]
