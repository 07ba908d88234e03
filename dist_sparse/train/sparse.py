"""Wiring the sparsifier into a training run: construction, and what it logs."""

from __future__ import annotations

from dist_sparse.config import RunConfig
from dist_sparse.distributed import comm
from dist_sparse.distributed.comm import ParallelGroups
from dist_sparse.distributed.zero import ZeroAccess
from dist_sparse.flops import training_flops_per_token
from dist_sparse.sparsifier import Sparsifier, UpdateStats, check_layout, config_fingerprint
from dist_sparse.sparsity.targets import plan_targets, select_targets

__all__ = ["build_sparsifier", "config_fingerprint", "preflight_sparsity", "sparsity_scalars"]


def build_sparsifier(engine, run_cfg: RunConfig, groups: ParallelGroups, max_steps: int) -> Sparsifier | None:
    """The run's sparsifier, validated against the sharded model, or None for a dense run.

    Every check that needs the model's shapes (patterns that match nothing, blocks or N:M groups
    that do not divide a shard) raises here, before the first step.
    """
    cfg = run_cfg.sparsity
    if cfg is None:
        return None
    if run_cfg.zero_stage not in (1, 2, 3):
        raise ValueError("sparsity needs ZeRO stage 1, 2 or 3 (zero_optimization.stage)")
    targets = select_targets(engine.module, cfg, groups.tp_rank, groups.tp_size)
    if groups.tp_size > 1:
        # AutoTP may split by heads unevenly (e.g. 12 heads over 8 ranks); the logical-shape and
        # offset arithmetic of the masks needs equal shards, so check once, on every rank.
        shapes = comm.all_gather_object([tuple(t.shard_shape) for t in targets], groups.tp_group)
        uneven = [t.name for i, t in enumerate(targets) if len({s[i] for s in shapes}) > 1]
        if uneven:
            raise ValueError(f"tensor-parallel shards of {uneven[:3]} differ in size across TP ranks; sparse "
                             "training needs autotp_size to divide the head count and FFN width evenly")
    zero = ZeroAccess(run_cfg.zero_stage, groups.dp_group, groups.dp_rank, groups.dp_size)
    return Sparsifier(cfg, targets, zero, groups, max_steps)


def preflight_sparsity(run_cfg: RunConfig, model_config, dp_size: int, max_steps: int) -> None:
    """Check the sparsity section against the model's shapes before any process group or engine
    exists, so a bad block size or N:M group fails in a second and leaves nothing behind."""
    cfg = run_cfg.sparsity
    if cfg is None:
        return
    if run_cfg.zero_stage not in (1, 2, 3):
        raise ValueError("sparsity needs ZeRO stage 1, 2 or 3 (zero_optimization.stage)")
    targets = plan_targets(model_config, cfg, run_cfg.tp_size)
    check_layout(cfg, targets, tp_size=run_cfg.tp_size, dp_size=dp_size, zero_stage=run_cfg.zero_stage,
                 max_steps=max_steps)


def sparsity_scalars(sp: Sparsifier, update: UpdateStats | None, dense_forward_per_token: float,
                     tokens_per_step: int) -> dict[str, float]:
    """TensorBoard scalars after a mask install: densities, churn, bytes, FLOPs of a step."""
    dens = sp.densities()
    total = sum(t.numel for t in sp.targets)
    out = {"density": sum(dens[t.name] * t.numel for t in sp.targets) / total}
    for t in sp.targets:
        out[f"density/{t.name}"] = dens[t.name]
    step_flops = training_flops_per_token(dense_forward_per_token, sp.sparse_weights()) * tokens_per_step
    out["step_tflops"] = step_flops / 1e12
    out["dense_step_tflops"] = 3 * dense_forward_per_token * tokens_per_step / 1e12
    if update is not None:
        out["churn"] = update.changed / max(update.active, 1)
        out["sync_bytes"] = float(update.sync_bytes)
        out["apply_bytes"] = float(update.apply_bytes)
    return out
