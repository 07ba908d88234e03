"""The sparsifier's invariants under ZeRO 1/2/3 (and AutoTP).

Run on N ranks: the deepspeed launcher, or dslaunch.spawn_ranks, which starts them the same way.

    sparse_check.py train  OUT.json   # lr > 0, different data on every rank: invariants after every step
    sparse_check.py train-bf16 OUT.json  # the same in bf16 with fp32 gradient accumulation
    sparse_check.py frozen OUT.json [TP [STAGES]]  # lr = 0: logical masks of every update, to compare layouts
    sparse_check.py frozen-bf16 OUT.json  # the same in bf16 (TP 1, ZeRO 1/2/3)
    sparse_check.py balance OUT.json 2  # DP2 x TP2: balance "shard" against "global" on planted weights

Every case accumulates gradients over several micro batches (2 or 3) and steps through
``Trainer.train_step`` with the sparsifier as its component, the sequence the training run uses. bf16 cases set
``data_types.grad_accum_dtype`` to fp32 as the BERT-large configs do, so ZeRO-1 runs on
DeepSpeed's BF16_Optimizer, ZeRO-2/3 on their fp32-accumulating paths.

For every case (ZeRO stage x method x pattern) the script trains a small BERT through
dist_sparse's engine set-up with the sparsifier and checks, on every rank and after every step:
exact zeros of pruned weights in the module weight, the fp32 master and both optimizer moments
(read through deepspeed.utils' public API), exact active counts per layer, regrown weights at
zero right after an update, block alignment and N:M groups (every group, on the whole logical mask). Mask fingerprints of all ranks are
gathered so the test can assert they are equal. Rank 0 writes the report.
"""

import json
import sys

import torch

from dist_sparse.config import SparsityConfig, parse_run_config
from dist_sparse.distributed import comm
from dist_sparse.distributed.zero import MOMENT_KEYS, ZeroAccess
from dist_sparse.masks.checksum import mask_fingerprint
from dist_sparse.masks.density import active_counts, erk_densities, uniform_densities
from dist_sparse.masks.patterns import check_block_aligned, check_nm, nm_halo
from dist_sparse.model.presets import build_config, build_model
from dist_sparse.sparsifier import Sparsifier
from dist_sparse.sparsity.targets import plan_targets, select_targets
from dist_sparse.train.engine import build_engine
from dist_sparse.train.components import Component
from dist_sparse.train.sparse import SparsityComponent
from dist_sparse.train.trainer import Trainer

STEPS = 9
# Frozen runs only compare the logical masks of every update across layouts (the invariants are
# checked at every step of the trained runs); 7 steps give two or three updates per section
# (an update is never due at the last step of end_fraction 1.0).
FROZEN_STEPS = 7
SEQ, VOCAB, MICRO = 16, 64, 4

# Model sizes. "default" splits evenly everywhere. Under ZeRO-3 on 2 ranks a weight of R x C is
# cut at R*C/2, which cuts an N:M group only when R*C/2 is not a multiple of m: "nm4" (FFN of
# 75 rows x 36 inputs, cut at 1350 = 4*337 + 2) and "nm3" (every weight has an odd size, so the
# last partition is also short) make the boundaries straddle groups. Neither splits under TP=2.
MODELS = {
    "default": {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128},
    "nm4": {"hidden_size": 36, "num_attention_heads": 4, "intermediate_size": 75},
    "nm3": {"hidden_size": 33, "num_attention_heads": 3, "intermediate_size": 45},
}
# 75 FFN neurons are not a multiple of 4, so the FFN output weights (75 inputs) stay dense in 2:4
# sections on "nm4"; '?' keeps the glob off attention.output.dense (fnmatch's '*' crosses dots).
NM4_SECTION = {"pattern": "nm", "n": 2, "m": 4, "sparsity": 0.5, "exclude": ["bert.encoder.layer.?.output.dense.weight"]}
NM3_SECTION = {"pattern": "nm", "n": 1, "m": 3, "sparsity": 2 / 3}

# Gradient accumulation of a case: 2, and 3 for every second case (each stage gets both in "train").
def accumulation(index: int) -> int:
    return 3 if index % 2 else 2


CASES = [
    # (zero stage, sparsity section)
    (1, {"method": "set", "sparsity": 0.75, "update_interval": 2, "end_fraction": 1.0, "drop_schedule": "constant"}),
    (2, {"method": "set", "sparsity": 0.8, "distribution": "erk", "update_interval": 2, "end_fraction": 1.0,
         "init": "magnitude"}),
    (3, {"method": "set", "sparsity": 0.75, "update_interval": 2, "end_fraction": 1.0, "drop_schedule": "linear"}),
    (2, {"method": "set", "sparsity": 0.75, "pattern": "block", "block_size": 16, "update_interval": 2,
         "end_fraction": 1.0}),
    (3, {"method": "set", "sparsity": 0.75, "pattern": "block", "block_size": 16, "update_interval": 2,
         "end_fraction": 1.0, "drop_schedule": "constant"}),
    (1, {"method": "rigl", "sparsity": 0.8, "update_interval": 2, "end_fraction": 1.0}),
    (2, {"method": "rigl", "sparsity": 0.9, "distribution": "erk", "update_interval": 3, "end_fraction": 1.0,
         "drop_fraction": 0.5}),
    (3, {"method": "rigl", "sparsity": 0.8, "update_interval": 2, "end_fraction": 1.0}),
    (1, {"method": "static", "sparsity": 0.9, "distribution": "erk"}),
    (3, {"method": "static", "sparsity": 0.5, "init": "magnitude"}),
    (2, {"method": "static", "sparsity": 0.5, "pattern": "nm", "n": 2, "m": 4}),
    (1, {"method": "gmp", "sparsity": 0.8, "update_interval": 2, "start_fraction": 0.1, "end_fraction": 0.8}),
    (3, {"method": "gmp", "sparsity": 0.8, "update_interval": 2, "end_fraction": 0.8}),
    (2, {"method": "gmp", "sparsity": 0.5, "pattern": "nm", "n": 2, "m": 4, "update_interval": 2,
         "end_fraction": 0.8}),
    # N:M under ZeRO-3 where slice boundaries cut groups (see MODELS)
    (3, {"method": "static", **NM4_SECTION}, "nm4"),
    (3, {"method": "gmp", **NM3_SECTION, "update_interval": 2, "end_fraction": 0.8}, "nm3"),
]


# bf16 (fp32 gradient accumulation): every method on every ZeRO stage, unstructured and block.
BF16_CASES = [
    (1, {"method": "set", "sparsity": 0.75, "update_interval": 2, "end_fraction": 1.0, "init": "magnitude"}),
    (2, {"method": "rigl", "sparsity": 0.8, "update_interval": 2, "end_fraction": 1.0}),
    (3, {"method": "set", "sparsity": 0.75, "pattern": "block", "block_size": 16, "update_interval": 2,
         "end_fraction": 1.0}),
    (1, {"method": "rigl", "sparsity": 0.8, "distribution": "erk", "update_interval": 2, "end_fraction": 1.0}),
    (2, {"method": "gmp", "sparsity": 0.8, "update_interval": 2, "end_fraction": 0.8}),
    (3, {"method": "rigl", "sparsity": 0.8, "update_interval": 2, "end_fraction": 1.0}),
    (1, {"method": "static", "sparsity": 0.5, "pattern": "nm", "n": 2, "m": 4}),
    (2, {"method": "set", "sparsity": 0.75, "pattern": "block", "block_size": 16, "update_interval": 2,
         "end_fraction": 1.0, "init": "magnitude"}),
    (3, {"method": "gmp", "sparsity": 0.5, "pattern": "nm", "n": 2, "m": 4, "update_interval": 2,
         "end_fraction": 0.8}),
]


# The same sections on every layout, with frozen weights, so that the logical masks can be compared.
FROZEN_SECTIONS = [
    {"method": "set", "sparsity": 0.75, "update_interval": 2, "end_fraction": 1.0, "init": "magnitude",
     "drop_schedule": "constant"},
    {"method": "set", "sparsity": 0.8, "distribution": "erk", "update_interval": 3, "end_fraction": 1.0},
    {"method": "set", "sparsity": 0.75, "pattern": "block", "block_size": 16, "update_interval": 2,
     "end_fraction": 1.0, "init": "magnitude"},
    {"method": "gmp", "sparsity": 0.8, "update_interval": 2, "end_fraction": 0.8},
    {"method": "rigl", "sparsity": 0.75, "update_interval": 2, "end_fraction": 1.0, "drop_schedule": "constant"},
    # N:M at TP=2: row-parallel shards (64 and 32 inputs) hold whole groups of 4 along the input.
    {"method": "gmp", "sparsity": 0.5, "pattern": "nm", "n": 2, "m": 4, "update_interval": 2, "end_fraction": 0.8,
     "seed": 5},
]
# N:M sections on models whose ZeRO-3 slices cut groups; TP=1 only (the models do not split in two).
FROZEN_NM = [
    ({"method": "gmp", **NM4_SECTION, "update_interval": 2, "end_fraction": 0.8}, "nm4"),
    ({"method": "gmp", **NM3_SECTION, "update_interval": 2, "end_fraction": 0.8}, "nm3"),
]


# balance: "shard" keeps round(density * shard numel) in every TP shard; "global" decides over
# the whole weight. On weights whose TP shard 0 is planted 4x larger, a global magnitude top-k
# keeps more of shard 0, so the two modes must differ there.
BALANCE_SECTION = {"method": "set", "sparsity": 0.7, "init": "magnitude", "update_interval": 2,
                   "end_fraction": 1.0, "drop_schedule": "constant"}
BALANCE_CASES = [(2, {**BALANCE_SECTION, "balance": "shard"}), (3, {**BALANCE_SECTION, "balance": "shard"}),
                 (2, {**BALANCE_SECTION, "balance": "global"})]


def plant_heavier_first_shard(model) -> None:
    """Scale by 4 the half of every encoder Linear weight that TP rank 0 will hold: the first rows
    of column-parallel layers (query/key/value, intermediate), the first columns of row-parallel
    ones (attention.output.dense, output.dense)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("bert.encoder.layer.") or p.dim() != 2:
                continue
            if name.endswith("output.dense.weight"):
                p[:, : p.shape[1] // 2] *= 4
            else:
                p[: p.shape[0] // 2] *= 4


def planted_master(index: int, shape) -> torch.Tensor:
    """fp32 master values 1 +- up to 1e-3, distinct and in a seeded order, random signs: all of
    them round to +-1.0 in bf16, so only the fp32 masters can tell the weights apart."""
    g = torch.Generator().manual_seed(77 + index)
    numel = shape[0] * shape[1]
    magnitude = 1.0 + 1e-3 * torch.randperm(numel, generator=g).float() / numel
    sign = torch.where(torch.rand(numel, generator=g) < 0.5, -1.0, 1.0)
    return (magnitude * sign).view(shape)


def plant_masters(targets, stage: int) -> dict:
    """Write ``planted_master`` into every target's fp32 master (each rank its own TP shard);
    returns the fingerprint of the magnitude top-k of every whole planted weight (the expected
    first mask of ``init: magnitude``) for the caller's densities."""
    from deepspeed.utils import safe_set_full_fp32_param

    for t in targets:
        safe_set_full_fp32_param(t.param, t.slice_full(planted_master(t.index, t.full_shape)).contiguous()
                                 .to(t.param.device))
    return {t.name: planted_master(t.index, t.full_shape) for t in targets}


def make_model(model: str = "default"):
    torch.manual_seed(0)
    cfg = build_config("bert-tiny", vocab_size=VOCAB, max_position_embeddings=SEQ,
                       **MODELS["default" if model == "planted" else model])
    built = build_model(cfg)
    if model == "planted":
        plant_heavier_first_shard(built)
    return built


def batch(step: int, dp_rank: int, micro: int = 0):
    g = torch.Generator().manual_seed(1000 * step + 100 * micro + dp_rank)  # different data on every DP rank
    ids = torch.randint(5, VOCAB, (MICRO, SEQ), generator=g)
    labels = torch.where(torch.rand(MICRO, SEQ, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def full_value(p, stage):
    from deepspeed.utils import safe_get_full_fp32_param
    return safe_get_full_fp32_param(p).detach().cpu()


def module_value(p, stage):
    if stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().clone().cpu()
    return p.detach().clone().cpu()


def logical_mask(sp, t, groups):
    """The whole mask of a target: TP shards gathered and joined along the split dimension."""
    mask = sp.shard_mask(t.name)
    if groups.tp_size == 1 or t.shard_dim is None:
        return mask
    parts = comm.all_gather_object(mask, groups.tp_group)
    return torch.cat(parts, dim=t.shard_dim)


def nm_group_counts(mask: torch.Tensor, m: int) -> set[int]:
    """The distinct numbers of kept weights over all groups of m along the input dim."""
    return set(mask.reshape(-1, m).sum(dim=-1).tolist())


class MasksBeforeUpdate(Component):
    """Keeps every shard mask as it stands after the optimizer step, before the update."""

    def __init__(self, sparsifier):
        self.sparsifier, self.masks = sparsifier, {}

    def on_after_optimizer_step(self, trainer, step):
        self.masks = {t.name: self.sparsifier.shard_mask(t.name) for t in self.sparsifier.targets}


def run_case(stage: int, section: dict, frozen: bool, tp: int, model: str = "default", ga: int = 2,
             bf16: bool = False, optimizer: str = "AdamW") -> dict:
    cfg = SparsityConfig(**section)
    ds = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ga, "gradient_clipping": 1.0,
          "optimizer": {"type": optimizer, "params": {"lr": 0.0 if frozen else 5e-3, "weight_decay": 0.01}},
          "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}}
    if bf16:
        ds["bf16"] = {"enabled": True}
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if tp > 1:
        ds["tensor_parallel"] = {"autotp_size": tp}
    engine = build_engine(make_model(model), parse_run_config(ds), lr_lambda=lambda s: 1.0)
    dtype = next(engine.module.parameters()).dtype
    assert dtype == (torch.bfloat16 if bf16 else torch.float32), dtype
    optimizer_path = type(engine.optimizer).__name__
    groups = comm.parallel_groups(tp)
    zero = ZeroAccess(stage, groups.dp_group, groups.dp_rank, groups.dp_size)
    targets = select_targets(engine.module, cfg, groups.tp_rank, groups.tp_size)
    steps = FROZEN_STEPS if frozen else STEPS
    failures = []
    # The start-up check plans the targets from the config alone; it must see AutoTP's real layout.
    planned = {t.name: (tuple(t.shard_shape), t.shard_dim) for t in plan_targets(engine.module.config, cfg, tp)}
    real = {t.name: (tuple(t.shard_shape), t.shard_dim) for t in targets}
    if planned != real:
        failures.append(f"planned targets {planned} differ from AutoTP's {real}")
    sp = Sparsifier(cfg, targets, zero, groups, max_steps=steps)
    planted = plant_masters(targets, stage) if bf16 and frozen else None
    sp.prepare()
    # Where this rank's ZeRO-3 slice cuts N:M groups, and the bytes of one boundary exchange.
    straddling, halo_bytes = [], 0
    if stage == 3 and cfg.pattern == "nm":
        for t in targets:
            part = zero.local_slice(t.param, t.shard_numel)
            h = nm_halo(part.start, part.stop, cfg.m)
            if h.from_prev or h.from_next:
                straddling.append(t.name)
            halo_bytes += 4 * (h.to_prev + h.to_next)  # float32 scores
    shapes = {t.name: t.full_shape for t in targets}
    dens = (erk_densities if cfg.distribution == "erk" else uniform_densities)(shapes, 1 - cfg.sparsity)
    expected_final = active_counts(shapes, dens)
    updates, fingerprints, logical, shard_counts = [], [], [], []

    changed = [0]

    def check(step, old_masks, stats):
        shard_masks = {t.name: sp.shard_mask(t.name) for t in targets}  # gathered under ZeRO-3
        for t in targets:
            mask = shard_masks[t.name]
            off = ~mask
            master = full_value(t.param, stage)
            weight = module_value(t.param, stage)
            if (master[off] != 0).any() or (weight[off] != 0).any():
                failures.append(f"step {step} {t.name}: pruned weight not zero")
            for key in MOMENT_KEYS if step > 0 else ():  # no optimizer state before the first step
                from deepspeed.utils import safe_get_full_optimizer_state
                st = safe_get_full_optimizer_state(t.param, key)
                if st is None or (st.cpu()[off] != 0).any():
                    failures.append(f"step {step} {t.name}: {key} not zero where pruned")
            if old_masks is not None:
                grown = mask & ~old_masks[t.name]
                changed[0] += int((mask != old_masks[t.name]).sum())
                if (master[grown] != 0).any():
                    failures.append(f"step {step} {t.name}: regrown weight does not start at zero")
            if cfg.pattern == "block" and not check_block_aligned(mask, cfg.block_size):
                failures.append(f"step {step} {t.name}: mask not block aligned")
            if cfg.pattern == "nm":
                # Exactly on the whole logical mask: every group keeps the same count at every
                # step (m while GMP is dense, then fewer), n from the start for static and at the
                # end for GMP.
                whole = logical_mask(sp, t, groups)
                kept = nm_group_counts(whole, cfg.m)
                if len(kept) != 1:
                    failures.append(f"step {step} {t.name}: N:M groups keep {sorted(kept)} weights")
                if (step == steps or cfg.method == "static") and not check_nm(whole, cfg.n, cfg.m):
                    failures.append(f"step {step} {t.name}: N:M violated")
        if stats is not None or step == 0:
            counts = {t.name: int(logical_mask(sp, t, groups).sum()) for t in targets}
            if groups.tp_size > 1:  # active weights of every TP shard, in TP rank order
                shard_counts.append({t.name: comm.all_gather_object(int(shard_masks[t.name].sum()), groups.tp_group)
                                     for t in targets})
            fingerprints.append({t.name: mask_fingerprint(shard_masks[t.name]) for t in targets})
            logical.append({t.name: mask_fingerprint(logical_mask(sp, t, groups)) for t in targets})
            updates.append({"step": step, "counts": counts,
                            "stats": None if stats is None else {k: v for k, v in stats.__dict__.items()
                                                                 if k != "per_layer_density"}})

    check(0, None, None)
    before = MasksBeforeUpdate(sp)
    sparsity = SparsityComponent(None, seq_len=SEQ, tokens_per_step=SEQ * MICRO * ga * groups.dp_size, sparsifier=sp)
    # the snapshot first: it sees the masks the sparsifier's after-step update is about to replace
    trainer = Trainer(engine, engine.module.config, groups, zero_stage=stage, components=[before, sparsity])
    del engine
    for step in range(1, steps + 1):
        device = trainer.engine.device
        micro_batches = ({k: v.to(device) for k, v in batch(step, groups.dp_rank, m).items()} for m in range(ga))
        trainer.train_step(micro_batches, step)
        stats = sparsity.last_update
        if not frozen or stats is not None or step == steps:
            check(step, before.masks if stats is not None else None, stats)
    sp.remove_hooks()
    trainer.engine.destroy()
    expected_first = None
    if planted is not None and cfg.init == "magnitude" and cfg.pattern == "unstructured":
        # the first mask keeps the largest planted fp32 magnitudes (all distinct: no ties)
        expected_first = {}
        for name, values in planted.items():
            keep = torch.zeros(values.numel(), dtype=torch.bool)
            keep[values.abs().flatten().topk(expected_final[name]).indices] = True
            expected_first[name] = mask_fingerprint(keep.view(values.shape))
    return {"stage": stage, "section": section, "tp": tp, "model": model, "ga": ga, "bf16": bf16,
            "expected_first": expected_first,
            "optimizer_path": optimizer_path, "failures": failures, "updates": updates,
            "expected_final_counts": expected_final, "fingerprints": fingerprints, "logical": logical,
            "changed_seen": changed[0], "straddling": straddling, "halo_bytes": halo_bytes,
            "initial_sync_bytes": sp.history[0]["sync_bytes"], "shard_counts": shard_counts,
            "shard_shapes": {t.name: list(t.shard_shape) for t in targets},
            "rank": comm.rank(), "dp_rank": groups.dp_rank, "tp_rank": groups.tp_rank}


def planted_divergence(out_path: str) -> None:
    """Rank 1 flips one bit of one mask; verify() must stop every rank, naming that weight."""
    from dist_sparse.sparsifier import MaskDivergenceError

    cfg = SparsityConfig(method="set", sparsity=0.75, update_interval=2)
    ds = {"train_micro_batch_size_per_gpu": MICRO, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
          "zero_optimization": {"stage": 2}}
    engine = build_engine(make_model(), parse_run_config(ds), lr_lambda=lambda s: 1.0)
    groups = comm.parallel_groups(1)
    sp = Sparsifier(cfg, select_targets(engine.module, cfg), ZeroAccess(2, None, groups.dp_rank, groups.dp_size),
                    groups, max_steps=STEPS)
    sp.prepare()
    clean = sp.verify()
    victim = sp.targets[3].name
    if comm.rank() == 1:
        sp.masks[victim].view(-1)[7] ^= True
    try:
        sp.verify()
        outcome = "no error"
    except MaskDivergenceError as err:
        outcome = str(err)
    everyone = comm.all_gather_object({"rank": comm.rank(), "clean_bytes": clean, "outcome": outcome,
                                       "victim": victim})
    if comm.rank() == 0:
        with open(out_path, "w") as f:
            json.dump(everyone, f)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    mode, out_path = args[0], args[1]
    if mode == "diverge":
        comm.init()
        planted_divergence(out_path)
        comm.shutdown()
        return
    tp = int(args[2]) if len(args) > 2 else 1
    stages = tuple(int(x) for x in args[3].split(",")) if len(args) > 3 else (1, 2, 3)
    comm.init()
    frozen = mode.startswith("frozen")
    bf16 = mode.endswith("bf16")
    if mode == "balance":
        cases = [(stage, sec, "planted") for stage, sec in BALANCE_CASES]
    elif frozen:
        cases = [(stage, sec, "default") for sec in FROZEN_SECTIONS for stage in stages]
        if tp == 1 and not bf16:
            cases += [(stage, sec, model) for sec, model in FROZEN_NM for stage in stages]
    elif bf16:
        cases = [(stage, sec, "default") for stage, sec in BF16_CASES]
    else:
        cases = [(c + ("default",))[:3] for c in CASES]
    # Frozen RigL compares gradient scores across ZeRO stages bit for bit; with accumulation the
    # stages sum micro-batch gradients in different orders (ZeRO-1 locally then across ranks,
    # ZeRO-2/3 across ranks per micro batch), which changes the last bits. Its frozen cases
    # therefore accumulate over one micro batch; the trained RigL cases accumulate over 2 and 3.
    reports = [run_case(stage, dict(section), frozen, tp, model,
                        ga=1 if frozen and section["method"] == "rigl" and not bf16 else accumulation(i), bf16=bf16)
               for i, (stage, section, model) in enumerate(cases)]
    everyone = comm.all_gather_object(reports)
    if comm.rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"world": comm.world_size(), "tp": tp, "mode": mode, "ranks": everyone}, f)
    comm.shutdown()


if __name__ == "__main__":
    main()
