"""This process's place in a data-parallel run of :mod:`recipes.train`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Ranks", "current_ranks"]


@dataclass
class Ranks:
    """This process's place in a data-parallel run (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum_(self, *tensors: torch.Tensor) -> None:
        """Sum tensors over the ranks, in place."""
        if self.world > 1:
            for t in tensors:
                torch.distributed.all_reduce(t)

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def current_ranks() -> Ranks:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return Ranks()
