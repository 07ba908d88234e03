"""Sparsity and EarlyBERT in one run, through the Trainer: what the shrink must carry.

Run on 2 ranks (dslaunch.spawn_ranks or the deepspeed launcher):

    carry_check.py OUT.json

Each case trains a small BERT with slimming coefficients on 2 data-parallel ranks, micro batch
2 x accumulation 2, with the run's components (``SparsityComponent``, ``EarlyBertComponent``)
on a ``Trainer``; the ticket is forced at step 4, SET updates masks at steps 3 and 6. Two probe
components around them record, just before the engine is replaced, the whole fp32 masters,
both Adam moments and the logical masks of the old engine, and right after it those of the new
engine. From the old state the script computes what the shrink must produce (coefficients of
removed units zeroed, folded into the consumers, rows and columns cut: ``shrink_tensors``;
masks cut to the same rows and columns) and compares: masters, moments and masks exactly, the
optimizer's step count, zeros of pruned weights in masters and moments, and after the next update
the exact active count of every weight on the smaller shapes. Rank 0 writes the report.

Cases: AdamW under ZeRO-2 and ZeRO-3 with masks carried through the shrink; LAMB under ZeRO-2
with ``sparsity.after_shrink`` (dense search, first masks drawn on the shrunk model).
"""

import json
import sys

import torch

from dist_sparse.config import parse_run_config
from dist_sparse.distributed import comm
from dist_sparse.distributed.zero import MOMENT_KEYS, ZeroAccess
from dist_sparse.masks.checksum import mask_fingerprint
from dist_sparse.model import DistSparseBertConfig, DistSparseBertForPreTraining
from dist_sparse.structure import shrink_state_dict
from dist_sparse.structured.pruner import StructuredPruner, attach_coefficients
from dist_sparse.structured.shrink import gather_full, masked_weights, shrink_tensors
from dist_sparse.train.components import Component
from dist_sparse.train.engine import build_engine
from dist_sparse.train.sparse import SparsityComponent
from dist_sparse.train.structured import EarlyBertComponent
from dist_sparse.train.trainer import Trainer

STEPS, MICRO, SEQ, GA, VOCAB = 8, 2, 16, 2, 64
SPARSITY = 0.5


def batch(step: int, dp_rank: int, micro: int) -> dict:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + dp_rank)
    ids = torch.randint(5, VOCAB, (MICRO, SEQ), generator=g)
    labels = torch.where(torch.rand(MICRO, SEQ, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class Before(Component):
    """First in the list: sees the old engine before any component lets go of it."""

    def __init__(self, sparsity: SparsityComponent, zero: ZeroAccess):
        self.sparsity, self.zero, self.expected = sparsity, zero, None

    def on_before_engine_replaced(self, trainer, change):
        weights, states = gather_full(trainer.engine.module, trainer.model_config, trainer.groups, self.zero,
                                      with_coefficients=True)
        small_w, small_s = shrink_tensors(masked_weights(weights, change.ticket, trainer.model_config.num_hidden_layers),
                                          states, change.ticket, trainer.model_config)
        masks = None
        if self.sparsity.sparsifier is not None:
            masks = shrink_state_dict(self.sparsity.sparsifier.logical_masks(), change.ticket,
                                      trainer.model_config.head_dim)
        self.expected = {"weights": small_w, "moments": small_s, "masks": masks, "step": change.step}


class After(Component):
    """Last in the list: sees the new engine after every component has followed it."""

    def __init__(self, before: Before, sparsity: SparsityComponent, zero: ZeroAccess):
        self.before, self.sparsity, self.zero = before, sparsity, zero
        self.failures: list[str] = []
        self.report: dict = {}

    def on_engine_replaced(self, trainer, change):
        want = self.before.expected
        weights, states = gather_full(trainer.engine.module, change.new_config, trainer.groups, self.zero,
                                      with_coefficients=False)
        f = self.failures
        sp = self.sparsity.sparsifier
        masks = sp.logical_masks()
        carried = want["masks"]
        if set(weights) != set(want["weights"]):
            f.append(f"parameters differ: {sorted(set(weights) ^ set(want['weights']))[:4]}")
        for name, w in weights.items():
            # Masks drawn at the shrink (after_shrink) zero what they prune: compare where they keep.
            keep = masks[name] if carried is None and name in masks else torch.ones_like(w, dtype=torch.bool)
            if not torch.equal(w[keep], want["weights"][name][keep]):
                f.append(f"master of {name} not carried exactly")
            for key in MOMENT_KEYS:
                if not torch.equal(states[key][name][keep], want["moments"][key][name][keep]):
                    f.append(f"{key} of {name} not carried exactly")
        steps = {int(s["step"]) for s in trainer.engine.basic_optimizer.state.values() if "step" in s}
        if steps != {change.step}:
            f.append(f"optimizer step counts {sorted(steps)} after the shrink, not {change.step}")
        if carried is not None:
            for name, m in masks.items():
                if not torch.equal(m, carried[name]):
                    f.append(f"mask of {name} is not the old mask cut to the ticket")
        for name, m in masks.items():
            for what, v in [("master", weights[name])] + [(k, states[k][name]) for k in MOMENT_KEYS]:
                if (v[~m] != 0).any():
                    f.append(f"{what} of {name} is not zero where the mask prunes")
        self.report = {"step": change.step, "counts": {n: int(m.sum()) for n, m in masks.items()},
                       "carried_counts": None if carried is None else {n: int(m.sum()) for n, m in carried.items()},
                       "numel": {n: m.numel() for n, m in masks.items()},
                       "heads": list(change.new_config.layer_num_heads),
                       "ffn": list(change.new_config.layer_intermediate_sizes)}


def run_case(stage: int, optimizer: str, after_shrink: bool) -> dict:
    ds = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GA, "gradient_clipping": 1.0,
          "optimizer": {"type": optimizer, "params": {"lr": 2e-3, "weight_decay": 0.01}},
          "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
          "steps_per_print": 10**6,
          "structured_pruning": {"l1": 1e-4, "head_ratio": 0.5, "ffn_ratio": 0.5, "ffn_multiple": 8,
                                 "check_interval": 2, "window": 2, "max_search_steps": 4},
          "sparsity": {"method": "set", "sparsity": SPARSITY, "update_interval": 3, "end_fraction": 1.0,
                       "after_shrink": after_shrink}}
    run_cfg = parse_run_config(ds)
    config = DistSparseBertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    model = DistSparseBertForPreTraining(config)
    attach_coefficients(model, 1)

    def lr_lambda(s: int) -> float:
        return 1.0

    def make_engine(model, *, lr_lambda=lr_lambda, start_step=0):
        return build_engine(model, run_cfg, lr_lambda=lr_lambda, start_step=start_step)

    engine = make_engine(model)
    del model
    groups = comm.parallel_groups(1)
    zero = ZeroAccess(stage, groups.dp_group, groups.dp_rank, groups.dp_size)
    sparsity = SparsityComponent.for_run(run_cfg, groups, STEPS, SEQ, MICRO * GA * SEQ * groups.dp_size)
    pruner = StructuredPruner(run_cfg.structured_pruning, config.num_hidden_layers, groups, zero)
    earlybert = EarlyBertComponent(pruner, zero_stage=stage, verify_batch=batch(0, 0, 0), seq_len=SEQ,
                                   global_batch=MICRO * GA * groups.dp_size, lr_lambda=lr_lambda,
                                   is_rank0=comm.rank() == 0)
    before = Before(sparsity, zero)
    after = After(before, sparsity, zero)
    trainer = Trainer(engine, config, groups, zero_stage=stage, build_engine=make_engine,
                      components=[before, sparsity, earlybert, after])
    del engine
    earlybert.bind(trainer)
    if not after_shrink:
        sparsity.attach(trainer)
        sparsity.start(draw=True)
    updates, scalars = [], {}
    for step in range(1, STEPS + 1):
        result = trainer.train_step(({k: v.to(trainer.engine.device) for k, v in batch(step, groups.dp_rank, m).items()}
                                     for m in range(GA)), step)
        for group, s in result.scalars.items():
            scalars.setdefault(group, {})[step] = s
        if sparsity.last_update is not None and sparsity.sparsifier is not None:
            masks = sparsity.sparsifier.logical_masks()
            updates.append({"step": step, "counts": {n: int(m.sum()) for n, m in masks.items()},
                            "numel": {n: m.numel() for n, m in masks.items()},
                            "fingerprint": {n: mask_fingerprint(m) for n, m in masks.items()}})
    # the mask invariant at the end: pruned weights are zero in masters and moments
    final = sparsity.sparsifier.logical_masks()
    weights, states = gather_full(trainer.engine.module, trainer.model_config, groups, zero, with_coefficients=False)
    for name, m in final.items():
        for what, v in [("master", weights[name])] + [(k, states[k][name]) for k in MOMENT_KEYS]:
            if (v[~m] != 0).any():
                after.failures.append(f"end: {what} of {name} is not zero where the mask prunes")
    trainer.engine.destroy()
    return {"stage": stage, "optimizer": optimizer, "after_shrink": after_shrink, "failures": after.failures,
            "shrink": after.report, "updates": updates, "phase": pruner.phase,
            "structured_steps": sorted(scalars.get("structured", {})),
            "old_engine_released": scalars.get("structured", {}).get(after.report.get("step"), {})
                                          .get("shrink/old_engine_released"),
            "relative_diff": scalars.get("structured", {}).get(after.report.get("step"), {})
                                    .get("shrink/relative_diff")}


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    comm.init()
    reports = [run_case(2, "AdamW", False), run_case(3, "AdamW", False), run_case(2, "Lamb", True)]
    everyone = comm.all_gather_object(reports)
    if comm.rank() == 0:
        with open(argv[0], "w") as f:
            json.dump({"sparsity": SPARSITY, "steps": STEPS, "ranks": everyone}, f)
    comm.shutdown()


if __name__ == "__main__":
    main()
