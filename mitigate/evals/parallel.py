"""Sharding samples across processes started by ``accelerate launch`` (or ``torchrun``).

Each process takes every ``world``-th sample by position in the full sample list, so the split does not
depend on what a previous, interrupted run already finished. Process 0 waits for the others at the end
(an ``accelerate`` barrier), merges their predictions and scores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def take(self, items: list[T]) -> list[T]:
        return items[self.rank :: self.world]


def current_shard() -> Shard:
    """This process's place among the launched ones (``RANK``/``WORLD_SIZE``, as the launchers set)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    if not 0 <= rank < world:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return Shard(rank, world)


_STATE: Any = None


def init_group(shard: Shard) -> None:
    """Join the launcher's process group (gloo on CPU) so that :func:`barrier` works; no-op alone."""
    global _STATE
    if shard.world == 1 or _STATE is not None:
        return
    import torch
    from accelerate import PartialState

    # Shards may finish far apart on long runs: allow a long wait at the final barrier.
    _STATE = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=24))


def barrier(shard: Shard) -> None:
    if shard.world > 1:
        init_group(shard)
        _STATE.wait_for_everyone()


def local_device(shard: Shard) -> str | None:
    """The GPU of this process when several share a machine (``LOCAL_RANK``), else ``None``."""
    import torch

    if shard.world == 1 or not torch.cuda.is_available():
        return None
    return f"cuda:{int(os.environ.get('LOCAL_RANK', shard.rank)) % torch.cuda.device_count()}"
