"""Data- and tensor-parallel degrees, checked before any process group exists (pure).

As torchtitan's ``ParallelDims``: the launcher's WORLD_SIZE and the config's TP degree give the
layout, and everything that depends only on these numbers is checked here, on every rank alike,
in a second, before the rendezvous. DeepSpeed's AutoTP builds its (data, tensor) mesh inside
``deepspeed.initialize`` with tensor-parallel peers on consecutive ranks; ``dp_rank`` and
``tp_rank`` state that arithmetic, and ``comm.parallel_groups`` checks the groups DeepSpeed built
against it before anything uses them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class ParallelDims:
    world: int   # ranks in the job
    tp: int      # tensor-parallel degree (tensor_parallel.autotp_size)

    def __post_init__(self):
        if self.world < 1:
            raise ValueError(f"the world size must be at least 1 (got {self.world})")
        if self.tp < 1 or self.world % self.tp:
            raise ValueError(f"tensor_parallel.autotp_size {self.tp} does not divide the world size {self.world}")

    @classmethod
    def from_env(cls, tp: int, env: Mapping[str, str] | None = None) -> "ParallelDims":
        """The launcher's WORLD_SIZE (1 without a launcher) and the config's TP degree."""
        raw = (os.environ if env is None else env).get("WORLD_SIZE", "1")
        try:
            world = int(raw)
        except ValueError:
            raise ValueError(f"WORLD_SIZE must be an integer (got {raw!r})") from None
        return cls(world, tp)

    @property
    def dp(self) -> int:
        """Data-parallel degree: the ranks that see different batches."""
        return self.world // self.tp

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp


__all__ = ["ParallelDims"]
