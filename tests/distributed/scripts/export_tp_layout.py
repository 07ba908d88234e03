"""Save DeepSpeed checkpoints of a model whose whole weights are known, for the export's merge test.

Every rank builds the same tiny model from one seed (random weights, random slimming
coefficients: a structured search in progress), rank 0 saves that unsharded state dict as the
truth, then for each ZeRO stage given, AutoTP + ZeRO shard a fresh copy and the engine saves a
checkpoint at step 0 -- before any step, the fp32 masters are exactly the initial weights, so
the export's consolidation must give the truth back bit for bit.

The client state carries what a dist_sparse checkpoint carries for the export (model_config,
structured, dp/tp sizes) and rank 0 writes structure.json beside DeepSpeed's files.

    deepspeed --num_gpus N export_tp_layout.py OUT TP STAGE [STAGE ...]
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
from torch import nn

from dist_sparse.distributed import comm
from dist_sparse.model import DistSparseBertConfig, DistSparseBertForPreTraining
from dist_sparse.structure import HEAD_COEF, NEURON_COEF, layer_key


def build(cfg: DistSparseBertConfig, tp: int, tp_rank: int) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = DistSparseBertForPreTraining(cfg)
    truth = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    for i, layer in enumerate(model.bert.encoder.layer):
        for module, suffix, n in ((layer.attention.self, HEAD_COEF, cfg.heads_of(i)),
                                  (layer.intermediate, NEURON_COEF, cfg.intermediate_of(i))):
            whole = torch.rand(n, generator=gen) + 0.5   # distinct values: a wrong order shows
            truth[layer_key(i, suffix)] = whole
            block = n // tp
            coef = nn.Parameter(whole[tp_rank * block:(tp_rank + 1) * block].clone())
            coef.tensor_model_parallel = True  # as dist_sparse.structured.pruner marks them
            module.slimming_coef = coef
    return model, truth


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
    out, tp, stages = Path(args[0]), int(args[1]), [int(s) for s in args[2:]]
    comm.init()
    rank, world = comm.rank(), comm.world_size()
    # Consecutive ranks form a tensor-parallel group (DeepSpeed's mesh, checked below).
    tp_rank, dp = rank % tp, world // tp
    cfg = DistSparseBertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=48, max_position_embeddings=32)
    for stage in stages:
        model, truth = build(cfg, tp, tp_rank)
        if rank == 0 and stage == stages[0]:
            out.mkdir(parents=True, exist_ok=True)
            torch.save(truth, out / "truth.pt")
        ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": stage}, "tensor_parallel": {"autotp_size": tp}}
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        groups = comm.parallel_groups(tp)
        assert (groups.tp_rank, groups.dp_size) == (tp_rank, dp), (groups.tp_rank, groups.dp_size)
        structured = {"phase": "search", "ticket": None, "ticket_step": None, "forced": False, "detector": {},
                      "config": {"method": "earlybert"}}
        client = {"format": 1, "model": "layout-test", "model_config": cfg.to_dict(), "structured": structured,
                  "dp_size": dp, "tp_size": tp, "progress": {"step": 0, "samples": 0, "tokens": 0},
                  "max_steps": 0, "data_meta": {"seq_len": 16}}
        ckpt = out / f"zero{stage}"
        engine.save_checkpoint(str(ckpt), tag="global_step0", client_state=client, save_latest=True)
        if rank == 0:
            (ckpt / "global_step0" / "structure.json").write_text(
                json.dumps({"model_config": cfg.to_dict(), "structured": structured}, default=str))
        comm.barrier()
        del engine, model
    if rank == 0:
        print(f"saved ZeRO stages {stages} at DP {dp} x TP {tp} into {out}")


if __name__ == "__main__":
    main()
