"""Layer-wise LAMB sharded by ZeRO or AutoTP equals unsharded LAMB; TP attention dropout.

Run on 2 ranks: the deepspeed launcher, or dslaunch.spawn_ranks, which starts them the same way.
Every case accumulates gradients over 2 micro batches per optimizer step. Writes a JSON list of
reports to argv[1].

* ZeRO stages 0-3 at DP 2: each rank trains a small MLP on its share of a fixed global batch
  through dist_sparse's engine setup (our Lamb, one group per tensor, norms summed over DP);
  rank 0 also trains an unsharded copy on the whole batch with the same Lamb and compares every
  fp32 master weight read through ``deepspeed.utils.safe_get_full_fp32_param``.
* DP 1 x TP 2 (AutoTP) at ZeRO 0, 2 and 3: a tiny BERT without dropout trains on the same micro
  batches as an unsharded TP 1 reference; the fp32 masters of the split weights are gathered
  over the TP group and every tensor is compared with the reference. The gradients of a TP 2
  backward are not bitwise those of TP 1 (the row-parallel all-reduce sums partial products in
  another order), so this is a tolerance check; the test makes it one that can fail by also
  training TP 2 with the old per-shard trust ratio (norms summed over DP only) and reporting
  how far that lands from the reference.

* Attention dropout under AutoTP: with both head shards made equal, the TP peers' attention
  outputs are equal unseeded (one mask for both) and differ once the TP RNG region is seeded,
  while hidden-state dropout masks stay equal.

All parts run in one launch: process start-up dominates the cost of these tests.
"""

import json
import sys

import torch

from dist_sparse.config import parse_run_config
from dist_sparse.distributed import comm
from dist_sparse.distributed.tp_layout import is_tp_split, split_dim
from dist_sparse.model import DistSparseBertConfig, DistSparseBertForPreTraining
from dist_sparse.optim import Lamb, parameter_groups
from dist_sparse.train.engine import build_engine, lamb_norm_reducer, tp_split_names

STEPS = 5
GAS = 2
LAMB = {"type": "Lamb", "params": {"lr": 0.05, "weight_decay": 0.01}}


def make_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                               torch.nn.Linear(32, 4))


def zero_section(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero.update({"stage3_param_persistence_threshold": 0})
    return zero


def run_config(micro_bs: int, stage: int, tp: int = 1):
    # No clipping: DeepSpeed clips at 1.0 by default, the reference does not clip.
    raw = {"train_micro_batch_size_per_gpu": micro_bs, "gradient_accumulation_steps": GAS,
           "gradient_clipping": 0.0, "optimizer": LAMB, "zero_optimization": zero_section(stage)}
    if tp > 1:
        raw["tensor_parallel"] = {"autotp_size": tp}
    return parse_run_config(raw)


def client_lamb(engine) -> Lamb:
    opt = engine.optimizer
    opt = opt if isinstance(opt, Lamb) else opt.optimizer  # ZeRO wraps the client optimizer
    assert isinstance(opt, Lamb), type(opt)
    return opt


def fp32_master(param, stage: int) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param
    return (safe_get_full_fp32_param(param) if stage else param).detach().clone()


def check_zero_stage(stage: int) -> dict:
    rank, world = comm.rank(), comm.world_size()
    g = torch.Generator().manual_seed(1)
    # Global batch: GAS micro batches of 8 per rank. The MSE of equal-sized micro batches
    # averaged over micro steps and ranks is the MSE of the whole batch.
    x_all, y_all = torch.randn(8 * world * GAS, 16, generator=g), torch.randn(8 * world * GAS, 4, generator=g)
    engine = build_engine(make_mlp(), run_config(8, stage), lr_lambda=lambda s: 1.0)
    lamb = client_lamb(engine)
    calls = {"step": 0, "reduce": 0}
    real_step, real_reduce = lamb.step, lamb.norm_reducer

    def counted_step(*a, **k):
        calls["step"] += 1
        return real_step(*a, **k)

    def counted_reduce(*a, **k):
        calls["reduce"] += 1
        return real_reduce(*a, **k)

    lamb.step = counted_step
    if real_reduce is not None:
        lamb.norm_reducer = counted_reduce
    for _ in range(STEPS):
        for micro in range(GAS):
            lo = (micro * world + rank) * 8
            loss = torch.nn.functional.mse_loss(engine(x_all[lo:lo + 8]), y_all[lo:lo + 8])
            engine.backward(loss)
            engine.step()
    sharded = {n: fp32_master(p, stage) for n, p in engine.module.named_parameters()}
    report = {"kind": "zero", "stage": stage, "world": world, "optimizer": type(engine.optimizer).__name__,
              "groups": len(lamb.param_groups), "lamb_calls": calls["step"], "reductions": calls["reduce"],
              "flat_tensors_with_segments": len(lamb.segments), "steps": STEPS}
    if rank == 0:
        ref = make_mlp()
        opt = Lamb(parameter_groups(ref, 0.01, one_per_parameter=True), lr=0.05)
        for _ in range(STEPS):
            opt.zero_grad()
            torch.nn.functional.mse_loss(ref(x_all), y_all).backward()
            opt.step()
        diffs = {n: float((sharded[n] - p.detach()).abs().max()) for n, p in ref.named_parameters()}
        moved = {n: float((p.detach() - q.detach()).abs().max())
                 for (n, p), q in zip(ref.named_parameters(), make_mlp().parameters())}
        report.update(max_diff=max(diffs.values()), diffs=diffs, min_moved=min(moved.values()))
    comm.barrier()
    return report


# --- DP 1 x TP 2 against TP 1 ------------------------------------------------------------------

BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TP_MICRO_BS, SEQ = 4, 12


def make_bert(**overrides):
    torch.manual_seed(0)
    return DistSparseBertForPreTraining(DistSparseBertConfig(**{**BERT, **overrides}))


def bert_batches() -> list[list[dict]]:
    """STEPS x GAS micro batches, the same on every rank (TP peers read the same data)."""
    g = torch.Generator().manual_seed(2)
    steps = []
    for _ in range(STEPS):
        micro = []
        for _ in range(GAS):
            ids = torch.randint(5, BERT["vocab_size"], (TP_MICRO_BS, SEQ), generator=g)
            labels = torch.where(torch.rand(TP_MICRO_BS, SEQ, generator=g) < 0.3, ids, torch.full_like(ids, -100))
            micro.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                          "token_type_ids": (torch.arange(SEQ) >= SEQ // 2).long().expand(TP_MICRO_BS, SEQ),
                          "labels": labels, "next_sentence_label": torch.randint(0, 2, (TP_MICRO_BS,), generator=g)})
        steps.append(micro)
    return steps


def tp1_reference(batches) -> dict[str, torch.Tensor]:
    """Unsharded LAMB on the same micro batches; the loss of each is scaled by 1/GAS as DeepSpeed does."""
    ref = make_bert()
    opt = Lamb(parameter_groups(ref, 0.01, one_per_parameter=True), lr=0.05)
    for micro_batches in batches:
        opt.zero_grad()
        for batch in micro_batches:
            (ref(**batch).loss / GAS).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in ref.named_parameters()}


def check_tp(stage: int, ref: dict[str, torch.Tensor], init: dict[str, torch.Tensor], batches,
             per_shard: bool = False) -> dict:
    """Train DP 1 x TP 2 and compare the whole (TP-gathered) fp32 masters with the TP 1 reference.

    ``per_shard``: swap in the old norm reducer (DP only), i.e. every shard its own trust ratio.
    """
    engine = build_engine(make_bert(), run_config(TP_MICRO_BS, stage, tp=2), lr_lambda=lambda s: 1.0)
    groups = comm.parallel_groups(2)
    assert (groups.tp_size, groups.dp_size, groups.tp_rank) == (2, 1, comm.rank()), groups
    if per_shard:
        client_lamb(engine).norm_reducer = lamb_norm_reducer(groups, set(), dp_sharded=stage > 0)
    for micro_batches in batches:
        for batch in micro_batches:
            engine.backward(engine(**batch).loss)
            engine.step()
    diffs, peer_diffs, split, marks_agree = {}, [], [], True
    for name, p in engine.module.named_parameters():
        local = fp32_master(p, stage)
        dim = split_dim(name, local.shape, ref[name].shape, 2)
        # AutoTP marks exactly the tensors it shrank: the mark LAMB's reducer reads is the layout.
        marks_agree &= is_tp_split(p) == (dim is not None)
        if dim is not None:
            split.append(name)
            local = comm.all_gather_cat(local, groups.tp_group, dim=dim)
        else:  # replicated: TP peers must hold the very same values
            lo, hi = comm.all_reduce_min_max(local, groups.tp_group)
            peer_diffs.append(float((hi - lo).abs().max()))
        diffs[name] = float((local - ref[name]).abs().max())
    # A key bias gets an exactly zero gradient (it adds the same q.b to every score of a query,
    # which softmax ignores) and no weight decay: it never moves, and is left out of min_moved.
    moved = {n: float((ref[n] - init[n]).abs().max()) for n in ref if not n.endswith("key.bias")}
    comm.barrier()
    return {"kind": "tp", "stage": stage, "per_shard": per_shard, "split": sorted(split), "marks_agree": marks_agree,
            "max_diff": max(diffs.values()), "worst": max(diffs, key=diffs.get),
            "diffs": diffs, "max_peer_diff": max(peer_diffs), "min_moved": min(moved.values()),
            "split_marked": sorted(tp_split_names(client_lamb(engine), engine.module))}


# --- attention dropout under AutoTP ----------------------------------------------------------

def check_tp_dropout() -> dict:
    """Real TP peers draw different attention-dropout masks once the region is seeded.

    Every layer's second half of heads is made a copy of its first half, so the two TP ranks'
    head shards compute the same function: their attention outputs are equal exactly when their
    dropout masks are. build_engine must have put the region into the attention modules AutoTP
    left in place; hidden-state dropout (replicated) must draw the same masks on both ranks.
    """
    from dist_sparse.distributed.rng import REGION_ATTR, tp_rng

    model = make_bert(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.5)
    half = BERT["hidden_size"] // 2
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                lin.weight[half:] = lin.weight[:half]
                lin.bias[half:] = torch.randn(half) * 0.1
                lin.bias[:half] = lin.bias[half:]
    engine = build_engine(model, run_config(TP_MICRO_BS, 0, tp=2), lr_lambda=lambda s: 1.0)
    groups = comm.parallel_groups(2)
    regions = [m for m in engine.module.modules() if getattr(m, REGION_ATTR, None) is not None]
    contexts, masks = [], []
    for m in regions:
        m.register_forward_hook(lambda mod, i, out: contexts.append(out.detach()))
    for m in engine.module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.register_forward_hook(lambda mod, i, out: masks.append((out.detach() != 0).to(torch.float32)))
    engine.train()
    report = {"kind": "tp_dropout", "regions": len(regions)}
    for seeded in (False, True):
        contexts.clear(), masks.clear()
        if seeded:  # what the training loop does every micro step
            tp_rng.seed(777, groups.tp_rank)
        torch.manual_seed(99)
        engine(**bert_batches()[0][0])
        lo, hi = comm.all_reduce_min_max(contexts[0], groups.tp_group)
        report[f"{'seeded' if seeded else 'unseeded'}_attention_differs"] = bool((hi != lo).any())
        mask_diffs = [comm.all_reduce_min_max(m, groups.tp_group) for m in masks]
        report[f"{'seeded' if seeded else 'unseeded'}_hidden_masks_equal"] = all(torch.equal(a, b) for a, b in mask_diffs)
        report["hidden_masks"] = len(masks)
    tp_rng.clear()
    comm.barrier()
    return report


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out_path = args[0]
    comm.init()
    assert comm.world_size() == 2, "this script runs on 2 ranks"
    # One launch checks every case. The TP 1 engines come first: AutoTP builds its mesh once.
    reports = [check_zero_stage(stage) for stage in (0, 1, 2, 3)]
    batches = bert_batches()
    init = {n: p.detach().clone() for n, p in make_bert().named_parameters()}
    ref = tp1_reference(batches)
    reports += [check_tp(stage, ref, init, batches) for stage in (0, 2, 3)]
    reports.append(check_tp(2, ref, init, batches, per_shard=True))
    reports.append(check_tp_dropout())
    if comm.rank() == 0:
        with open(out_path, "w") as f:
            json.dump(reports, f)


if __name__ == "__main__":
    main()
