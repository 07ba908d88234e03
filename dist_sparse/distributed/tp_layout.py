"""How DeepSpeed AutoTP lays a logical tensor out over the tensor-parallel ranks (pure).

AutoTP splits a column-parallel Linear (``LinearLayer``: query/key/value, intermediate.dense)
by output rows and a row-parallel one (``LinearAllreduce``: attention.output.dense,
output.dense) by input columns; rank r holds the r-th equal contiguous chunk. A column-parallel
bias is split with its rows; a row-parallel bias, LayerNorms and embeddings are replicated. The
parts of the project that need this layout: sparsity targets (decide over the logical weight,
slice locally), the structural shrink (gather whole tensors, re-shard), the export (merge shards
from a checkpoint) and LAMB (sum a split tensor's norms over its shards). They all ask here, so
they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

COLUMN_PARALLEL = "LinearLayer"
ROW_PARALLEL = "LinearAllreduce"
# DeepSpeed's mark of a parameter that each tensor-parallel rank holds a different part of
# (deepspeed.module_inject.layers.DS_TENSOR_MODEL_PARALLEL). AutoTP sets it on the weight and
# bias of a column-parallel layer and on the weight of a row-parallel one (whose bias stays
# replicated); EarlyBERT's per-rank slimming coefficients carry it too. DeepSpeed's own gradient
# norm reads it (``deepspeed.runtime.utils.is_model_parallel_parameter``, which also accepts
# Megatron's ``model_parallel``), so the two stay in step.
TP_SPLIT_ATTRS = ("tensor_model_parallel", "model_parallel")


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


# What AutoTP makes of BERT's encoder Linears (deepspeed 0.19.8): the projections that feed an
# all-reduce are row-parallel, the others column-parallel; the pooler and heads stay replicated.
_PLANNED_ROW_PARALLEL = ("attention.output.dense.weight", "output.dense.weight")
_PLANNED_COLUMN_PARALLEL = ("attention.self.query.weight", "attention.self.key.weight",
                            "attention.self.value.weight", "intermediate.dense.weight")


def planned_split_dim(name: str, tp_size: int) -> int | None:
    """The dimension AutoTP will split the weight ``name`` of our BERT along (None: replicated),
    known from the name alone, before any engine exists (start-up checks). Tested against what
    AutoTP really does (``module_layout`` on the engine's module)."""
    if tp_size == 1 or not name.startswith("bert.encoder.layer."):
        return None
    if name.endswith(_PLANNED_COLUMN_PARALLEL):
        return 0
    if name.endswith(_PLANNED_ROW_PARALLEL):
        return 1
    return None


def is_tp_split(param: torch.Tensor) -> bool:
    """Whether ``param`` is a tensor-parallel shard rather than a replica (see ``TP_SPLIT_ATTRS``).

    Read off the parameter object the model holds after AutoTP ran: the mark is set in
    ``deepspeed.initialize``, not when the model is built.
    """
    return any(bool(getattr(param, attr, False)) for attr in TP_SPLIT_ATTRS)


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


__all__ = ["COLUMN_PARALLEL", "ROW_PARALLEL", "TP_SPLIT_ATTRS", "is_tp_split", "module_layout", "planned_split_dim",
           "split_dim"]
