"""The sparsifier's per-step costs and gradient masking under real ZeRO (2 ranks, gloo).

    sparse_costs.py OUT.json

For every case (ZeRO stage, section, bf16 or fp32, gradient accumulation 2) it trains a small
BERT through ``Trainer.train_step`` with the sparsifier and records, on every rank:

- after ``mask_gradients`` of every step: whether any pruned entry of the gradient the
  optimizer will read is non-zero (read back through deepspeed.utils' public getters, which the
  masking itself does not use), and what ``mask_gradients`` and ``step`` cost
  (``dist_sparse.costs.count_costs``: host syncs, kernels, collectives);
- after every step: exact zeros of pruned weights in the module weight, the fp32 master and the
  moments, the fingerprints of the masks and the logical active counts;
- every update's statistics and the bytes of one bf16 all-reduce of the sparse weights.

Rank 0 writes the report.
"""

import json
import sys

import torch

from sparse_check import MICRO, SEQ, batch, full_value, make_model, module_value

from dist_sparse.config import SparsityConfig, parse_run_config
from dist_sparse.costs import count_costs
from dist_sparse.distributed import comm
from dist_sparse.distributed.zero import MOMENT_KEYS, ZeroAccess
from dist_sparse.masks.checksum import mask_fingerprint
from dist_sparse.masks.density import active_counts, uniform_densities
from dist_sparse.sparsifier import Sparsifier, bf16_all_reduce_bytes
from dist_sparse.sparsity.targets import select_targets
from dist_sparse.train.components import Component
from dist_sparse.train.engine import build_engine
from dist_sparse.train.sparse import SparsityComponent
from dist_sparse.train.trainer import Trainer

STEPS = 6
GA = 2
CASES = [
    # (zero stage, section, bf16)
    (3, {"method": "static", "sparsity": 0.8}, True),
    (3, {"method": "set", "sparsity": 0.75, "update_interval": 2, "end_fraction": 1.0}, False),
    (2, {"method": "rigl", "sparsity": 0.8, "update_interval": 2, "end_fraction": 1.0}, False),
    (2, {"method": "rigl", "sparsity": 0.8, "update_interval": 2, "end_fraction": 1.0}, True),
    (1, {"method": "rigl", "sparsity": 0.8, "update_interval": 2, "end_fraction": 1.0}, True),
]


class GradientCheck(Component):
    """Runs after the sparsity component's ``mask_gradients``: pruned gradient entries must be zero."""

    def __init__(self, sparsifier, stage):
        self.sp, self.stage, self.failures = sparsifier, stage, []

    def on_before_optimizer_step(self, trainer, step):
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        for t in self.sp.targets:
            mask = self.sp.masks[t.name].cpu()
            if self.stage == 3:
                grad = safe_get_local_grad(t.param).detach().flatten()[: mask.numel()].cpu()
            else:
                grad = safe_get_full_grad(t.param).detach().cpu().view(mask.shape)
            if (grad[~mask] != 0).any():
                self.failures.append(f"step {step} {t.name}: pruned gradient not zero before the optimizer step")
            if not (grad[mask] != 0).any():
                self.failures.append(f"step {step} {t.name}: no active gradient left (nothing was checked)")


def run_case(stage: int, section: dict, bf16: bool) -> dict:
    cfg = SparsityConfig(**section)
    ds = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GA, "gradient_clipping": 1.0,
          "optimizer": {"type": "AdamW", "params": {"lr": 5e-3, "weight_decay": 0.01}},
          "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}}
    if bf16:
        ds["bf16"] = {"enabled": True}
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    engine = build_engine(make_model(), parse_run_config(ds), lr_lambda=lambda s: 1.0)
    groups = comm.parallel_groups(1)
    zero = ZeroAccess(stage, groups.dp_group, groups.dp_rank, groups.dp_size)
    targets = select_targets(engine.module, cfg, groups.tp_rank, groups.tp_size)
    sp = Sparsifier(cfg, targets, zero, groups, max_steps=STEPS)
    sp.prepare()
    shapes = {t.name: t.full_shape for t in targets}
    expected = active_counts(shapes, uniform_densities(shapes, 1 - cfg.sparsity))
    costs = []

    def counted(fn, what):
        def wrapper(*args):
            with count_costs() as c:
                out = fn(*args)
            costs.append({"what": what, "host_syncs": c.host_syncs, "kernels": c.kernels,
                          "collectives": c.collectives, "update": out is not None if what == "step" else None,
                          "summary": c.summary()})
            return out
        return wrapper

    sp.mask_gradients = counted(sp.mask_gradients, "mask_gradients")
    sp.step = counted(sp.step, "step")
    check = GradientCheck(sp, stage)
    sparsity = SparsityComponent(None, seq_len=SEQ, tokens_per_step=SEQ * MICRO * GA * groups.dp_size, sparsifier=sp)
    trainer = Trainer(engine, engine.module.config, groups, zero_stage=stage, components=[sparsity, check])
    del engine
    failures, fingerprints, updates = check.failures, [], []
    for step in range(1, STEPS + 1):
        device = trainer.engine.device
        trainer.train_step(({k: v.to(device) for k, v in batch(step, groups.dp_rank, m).items()} for m in range(GA)),
                           step)
        shard = {t.name: sp.shard_mask(t.name) for t in targets}
        for t in targets:
            off = ~shard[t.name]
            if (full_value(t.param, stage)[off] != 0).any() or (module_value(t.param, stage)[off] != 0).any():
                failures.append(f"step {step} {t.name}: pruned weight not zero")
            from deepspeed.utils import safe_get_full_optimizer_state
            for key in MOMENT_KEYS:
                if (safe_get_full_optimizer_state(t.param, key).cpu()[off] != 0).any():
                    failures.append(f"step {step} {t.name}: {key} not zero where pruned")
        fingerprints.append({t.name: mask_fingerprint(shard[t.name]) for t in targets})
        stats = sparsity.last_update
        if stats is not None:
            updates.append({"step": step, "counts": {t.name: int(shard[t.name].sum()) for t in targets},
                            "apply_bytes": stats.apply_bytes, "sync_bytes": stats.sync_bytes,
                            "changed": stats.changed})
    sp.remove_hooks()
    trainer.engine.destroy()
    return {"stage": stage, "section": section, "bf16": bf16, "failures": failures, "costs": costs,
            "fingerprints": fingerprints, "updates": updates, "expected_counts": expected,
            "budget": bf16_all_reduce_bytes([t.shard_numel for t in targets], groups.dp_size),
            "targets": len(targets), "dp": groups.dp_size}


def main():
    out_path = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
    comm.init()
    reports = [run_case(*case) for case in CASES]
    everyone = comm.all_gather_object(reports)
    if comm.rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"ranks": everyone}, f)
    comm.shutdown()


if __name__ == "__main__":
    main()
