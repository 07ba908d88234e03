"""Put tensor-parallel shards of a consolidated state dict back into whole tensors.

Input: one ``{name: tensor}`` per TP rank, each already consolidated over its data-parallel
ZeRO partitions (``zero_to_fp32`` on that rank's files), and the layout DeepSpeed recorded.

Where the layout comes from, per parameter, in this order:

1. EarlyBERT slimming coefficients (``*.slimming_coef``): each TP rank holds its contiguous block
   of heads / neurons, so they concatenate along dim 0 in rank order. This is our contract
   (``dist_sparse.structured.pruner.attach_coefficients``), not DeepSpeed's: AutoTP does not know
   these parameters and its metadata wrongly lists them as TP-replicated.
2. DeepSpeed's own record: under AutoTP every model-states file carries
   ``universal_checkpoint_info["affine_map"]``, one ``ParamAffineMap`` per parameter saying which
   block of the full tensor each rank holds (and whether a rank holds it scaled). The merge is
   DeepSpeed's ``ParamAffineMap.rebuild``, which also refuses replicas that disagree.
3. No record (a tied alias such as ``cls.predictions.decoder.weight``, or a checkpoint written
   before DeepSpeed kept affine maps): the shapes decide. Equal to the logical shape means
   replicated (and the copies must be identical); one dimension ``tp`` times too small means
   a contiguous split along it, which is how AutoTP splits column-parallel (dim 0) and
   row-parallel (dim 1) weights.

Every merged tensor is then checked against the shape the model config gives it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from dist_sparse.distributed.tp_layout import split_dim
from dist_sparse.structure import is_coefficient

AFFINE_MAP_KEY = "affine_map"          # deepspeed.checkpoint.constants.AFFINE_MAP
AFFINE_MAP_PARAMS_KEY = "params"       # ... AFFINE_MAP_PARAMS
AFFINE_MAP_VERSION_KEY = "version"     # ... AFFINE_MAP_VERSION
# The map encoding this code was written against (deepspeed 0.19.8); a newer encoding may carry
# fields we would misread, so it falls back to the shape rule instead.
KNOWN_AFFINE_MAP_VERSIONS = (1,)


def affine_maps(uc_info: Mapping | None) -> dict[str, dict]:
    """``{parameter name: affine map dict}`` from a model-states file's universal-checkpoint info.

    DeepSpeed keys the maps by an anchored regex of the exact name (``^name$`` with dots
    escaped); we turn them back into names so a lookup cannot match the wrong parameter.
    """
    if not uc_info:
        return {}
    block = uc_info.get(AFFINE_MAP_KEY)
    if not block or block.get(AFFINE_MAP_VERSION_KEY) not in KNOWN_AFFINE_MAP_VERSIONS:
        return {}
    out = {}
    for pattern, entry in block.get(AFFINE_MAP_PARAMS_KEY, {}).items():
        if pattern.startswith("^") and pattern.endswith("$"):
            name = re.sub(r"\\(.)", r"\1", pattern[1:-1])
            if re.escape(name) == pattern[1:-1]:  # a plain escaped name, not a real regex
                out[name] = entry
    return out


def _merge_by_shape(name: str, parts: list[torch.Tensor], full: tuple[int, ...]) -> torch.Tensor:
    tp = len(parts)
    try:
        dim = split_dim(name, parts[0].shape, full, tp)
    except ValueError as err:
        raise ValueError(f"{err} (the shape the checkpoint's model config gives it)") from None
    if any(p.shape != parts[0].shape for p in parts):
        raise ValueError(f"{name}: tensor-parallel ranks hold shards of different shapes "
                         f"{[tuple(p.shape) for p in parts]}")
    if dim is None:
        for rank, p in enumerate(parts[1:], start=1):
            if not torch.equal(p, parts[0]):
                raise ValueError(f"{name}: replicated on every tensor-parallel rank, but rank {rank}'s copy differs "
                                 f"from rank 0's by up to {(p - parts[0]).abs().max().item():.3g}")
        return parts[0]
    return torch.cat(parts, dim=dim)


def _merge_by_affine_map(name: str, parts: list[torch.Tensor], entry: dict) -> torch.Tensor:
    from deepspeed.checkpoint.affine import ParamAffineMap

    amap = ParamAffineMap.from_dict(entry)
    if sorted(amap.shard_shapes) != list(range(len(parts))):
        raise ValueError(f"{name}: DeepSpeed's layout describes tensor-parallel ranks {sorted(amap.shard_shapes)}, "
                         f"the checkpoint has shards of ranks 0..{len(parts) - 1}")
    for rank, p in enumerate(parts):
        if tuple(p.shape) != amap.shard_shapes[rank]:
            raise ValueError(f"{name}: rank {rank} holds a shard of shape {tuple(p.shape)}, DeepSpeed's layout says "
                             f"{amap.shard_shapes[rank]}")
    try:
        return amap.rebuild(dict(enumerate(parts)))
    except (ValueError, AssertionError) as err:
        raise ValueError(f"{name}: cannot rebuild from its tensor-parallel shards: {err}") from None


def merge_tp_shards(shards: Sequence[Mapping[str, torch.Tensor]], logical_shapes: Mapping[str, Sequence[int]],
                    uc_info: Mapping | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Whole tensors from per-TP-rank state dicts (rank order), checked against ``logical_shapes``.

    Returns the merged dict and, per name, how it was merged ("coefficient", "deepspeed",
    "shape"): the provenance is for tests and error messages. Names missing from
    ``logical_shapes`` are an error -- a checkpoint that holds parameters its model config does
    not describe is not one this code understands.
    """
    if not shards:
        raise ValueError("no tensor-parallel shards to merge")
    names = list(shards[0])
    for rank, sd in enumerate(shards[1:], start=1):
        if set(sd) != set(names):
            only0, only_r = sorted(set(names) - set(sd)), sorted(set(sd) - set(names))
            raise ValueError(f"tensor-parallel rank {rank} holds different parameters than rank 0 "
                             f"(only rank 0: {only0[:5]}, only rank {rank}: {only_r[:5]})")
    unknown = [n for n in names if n not in logical_shapes]
    if unknown:
        raise ValueError(f"the checkpoint holds parameters its model config does not describe: {unknown[:5]}")
    maps = affine_maps(uc_info) if len(shards) > 1 else {}
    merged: dict[str, torch.Tensor] = {}
    how: dict[str, str] = {}
    for name in names:
        parts = [sd[name] for sd in shards]
        full = tuple(logical_shapes[name])
        if len(parts) == 1:
            out, how[name] = parts[0], "single"
        elif is_coefficient(name):
            # One coefficient per head / neuron a rank holds, blocks in rank order.
            if any(p.dim() != 1 for p in parts):
                raise ValueError(f"{name}: slimming coefficients must be vectors, got {[tuple(p.shape) for p in parts]}")
            out, how[name] = torch.cat(parts, dim=0), "coefficient"
        elif name in maps:
            out, how[name] = _merge_by_affine_map(name, parts, maps[name]), "deepspeed"
        else:
            out, how[name] = _merge_by_shape(name, parts, full), "shape"
        if tuple(out.shape) != full:
            raise ValueError(f"{name}: the merged tensor-parallel shards give shape {tuple(out.shape)}, the model "
                             f"config says {full}")
        merged[name] = out
    return merged, how


__all__ = ["affine_maps", "merge_tp_shards"]
