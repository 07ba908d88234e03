"""Which weights are sparse, and how each one is laid out over the ranks.

A target is a 2-D Linear weight. Its *logical* shape is the unsharded weight; under AutoTP a
rank holds a contiguous shard of rows (column-parallel layers: query/key/value,
intermediate.dense) or of columns (row-parallel layers: attention.output.dense, output.dense);
under ZeRO-3 the rank's data is further a flat slice of that shard. Masks always have the shard
shape (what the rank's gradient hook sees); decisions are made over the logical weight.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch

from dist_sparse.config import SparsityConfig
from dist_sparse.distributed.tp_layout import module_layout, planned_split_dim


@dataclass
class Target:
    index: int                   # position in the sorted target list: keys random streams
    name: str
    param: torch.nn.Parameter
    shard_shape: tuple[int, int]  # shape of this rank's tensor-parallel shard
    full_shape: tuple[int, int]   # logical (unsharded) shape
    shard_dim: int | None         # 0: rows split, 1: columns split, None: replicated
    shard_offset: int             # first row/column of this rank's shard along shard_dim

    @property
    def numel(self) -> int:
        return self.full_shape[0] * self.full_shape[1]

    @property
    def shard_numel(self) -> int:
        return self.shard_shape[0] * self.shard_shape[1]

    def global_index(self, shard_flat: torch.Tensor) -> torch.Tensor:
        """Flat index in the logical weight of flat positions in this rank's shard."""
        rows, cols = shard_flat // self.shard_shape[1], shard_flat % self.shard_shape[1]
        if self.shard_dim == 0:
            rows = rows + self.shard_offset
        elif self.shard_dim == 1:
            cols = cols + self.shard_offset
        return rows * self.full_shape[1] + cols

    def slice_full(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a tensor of the logical shape."""
        if self.shard_dim is None:
            return full
        return full.narrow(self.shard_dim, self.shard_offset, self.shard_shape[self.shard_dim])


def select_targets(model: torch.nn.Module, cfg: SparsityConfig, tp_rank: int = 0, tp_size: int = 1) -> list[Target]:
    """The sparse targets of ``model`` (the engine's module, after AutoTP), in name order.

    Raises ValueError if a pattern in ``cfg.params`` matches no 2-D weight, so a typo cannot
    silently leave the model dense.
    """
    modules = dict(model.named_modules())
    found: dict[str, Target] = {}
    unmatched = []
    for pattern in cfg.params:
        hit = False
        for name, p in model.named_parameters():
            if not fnmatch.fnmatchcase(name, pattern) or any(fnmatch.fnmatchcase(name, x) for x in cfg.exclude):
                continue
            shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the real shape in ds_shape
            owner = modules[name.rsplit(".", 1)[0]] if "." in name else model
            if len(shape) != 2 or "LayerNorm" in name or isinstance(owner, torch.nn.Embedding):
                continue
            hit = True
            if name not in found:
                full, dim, offset = module_layout(owner, shape, tp_rank, tp_size)
                found[name] = Target(0, name, p, shape, full, dim, offset)
        if not hit:
            unmatched.append(pattern)
    if unmatched:
        raise ValueError(f"sparsity.params: pattern(s) {unmatched} match no 2-D Linear weight of the model "
                         "(names look like bert.encoder.layer.0.attention.self.query.weight)")
    targets = [found[n] for n in sorted(found)]
    for i, t in enumerate(targets):
        t.index = i
    return targets


def plan_targets(model_config, cfg: SparsityConfig, tp_size: int) -> list[Target]:
    """The targets rank 0 of a ``tp_size``-way AutoTP run will have, from the model config alone
    (a model on the meta device: no memory, no process group), for start-up checks."""
    from dist_sparse.model import DistSparseBertForPreTraining

    with torch.device("meta"):
        model = DistSparseBertForPreTraining(model_config)
    targets = select_targets(model, cfg)
    for t in targets:
        dim = planned_split_dim(t.name, tp_size)
        if dim is not None:
            shard = list(t.full_shape)
            if shard[dim] % tp_size:
                raise ValueError(f"{t.name} of shape {tuple(t.full_shape)} does not split evenly over "
                                 f"tensor_parallel.autotp_size {tp_size}")
            shard[dim] //= tp_size
            t.shard_shape, t.shard_dim = tuple(shard), dim
    return targets
