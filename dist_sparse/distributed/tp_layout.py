"""How DeepSpeed AutoTP lays a logical tensor out over the tensor-parallel ranks (pure).

AutoTP splits a column-parallel Linear (``LinearLayer``: query/key/value, intermediate.dense)
by output rows and a row-parallel one (``LinearAllreduce``: attention.output.dense,
output.dense) by input columns; rank r holds the r-th equal contiguous chunk. Everything else
is replicated. Three parts of the project need this layout: sparsity targets (decide over the
logical weight, slice locally), the structural shrink (gather whole tensors, re-shard), and the
export (merge shards from a checkpoint). They all ask here, so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

COLUMN_PARALLEL = "LinearLayer"
ROW_PARALLEL = "LinearAllreduce"


def module_layout(module: torch.nn.Module, shard_shape: tuple[int, ...], tp_rank: int,
                  tp_size: int) -> tuple[tuple[int, ...], int | None, int]:
    """(logical shape, split dim or None, first index of this rank's shard) of a weight of ``module``.

    Read from the AutoTP class that owns the weight, so it holds before any data exists (ZeRO-3
    keeps only ``ds_shape``).
    """
    kind = type(module).__name__
    if tp_size == 1 or kind not in (COLUMN_PARALLEL, ROW_PARALLEL):
        return tuple(shard_shape), None, 0
    dim = 0 if kind == COLUMN_PARALLEL else 1
    full = list(shard_shape)
    full[dim] *= tp_size
    return tuple(full), dim, tp_rank * shard_shape[dim]


def split_dim(name: str, local: Sequence[int], full: Sequence[int], tp_size: int) -> int | None:
    """The dimension along which ``local`` is an even ``tp_size``-way shard of ``full`` (None: replicated).

    Raises ValueError, naming the tensor, when ``local`` is no such shard: a layout we do not
    understand must stop the caller rather than be merged or re-sharded wrongly.
    """
    local, full = tuple(local), tuple(full)
    if local == full:
        return None
    diff = [d for d in range(len(full)) if d >= len(local) or local[d] != full[d]]
    if len(local) != len(full) or len(diff) != 1 or local[diff[0]] * tp_size != full[diff[0]]:
        raise ValueError(f"{name}: a tensor-parallel shard of shape {local} is not an even {tp_size}-way split "
                         f"of the logical shape {full}")
    return diff[0]


__all__ = ["COLUMN_PARALLEL", "ROW_PARALLEL", "module_layout", "split_dim"]
