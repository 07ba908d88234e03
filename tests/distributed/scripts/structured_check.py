"""The EarlyBERT keep-set decision on planted coefficients.

Run on N ranks: the deepspeed launcher, or dslaunch.spawn_ranks, which starts them the same way.

    structured_check.py OUT.json STAGE TP
    structured_check.py l1 OUT.json       # L1 on a dead head, fp32 and bf16, ZeRO 1/2/3, accumulation 8

Builds a small BERT with slimming coefficients through dist_sparse's engine set-up (ZeRO STAGE,
AutoTP degree TP), writes planted values into the coefficients' fp32 masters through DeepSpeed's
fragment API (every rank its own TP block of a fixed whole-layer vector with many ties), and lets
the pruner decide with scope "layer" and "global". Rank 0 writes the tickets and every rank's view
of them, so the test can compare layouts with each other and with an unsharded reference.
"""

import json
import sys

import torch
from deepspeed.utils import safe_set_full_fp32_param

from dist_sparse.config import StructuredPruningConfig, parse_run_config
from dist_sparse.distributed import comm
from dist_sparse.distributed.zero import ZeroAccess
from dist_sparse.model import DistSparseBertConfig, DistSparseBertForPreTraining
from dist_sparse.structure import HEAD_COEF, NEURON_COEF, Ticket, layer_key
from dist_sparse.structured.pruner import StructuredPruner, attach_coefficients
from dist_sparse.train.engine import build_engine
from dist_sparse.train.trainer import Trainer

LAYERS, HEADS, FFN = 3, 4, 128


def planted(layer: int, n: int) -> torch.Tensor:
    """A whole-layer coefficient vector with ties (values repeat every 13 units)."""
    i = torch.arange(n)
    return (((i * 7919 + layer * 31) % 13).float() / 13.0 - 0.3) * (1 + layer)


L1, L1_STEPS, L1_ACCUMULATION = 1e-3, 4, 8


def l1_case(stage: int, bf16: bool) -> dict:
    """Head 1 of layer 0 is dead: its value rows and bias and its attention-output columns are
    zero, so no gradient reaches them or its coefficient, and they stay zero. The coefficient's
    only gradient is then LAMB's L1 term, exactly ``l1`` (its sign is +1), so its first moment
    must be exactly l1 * (1 - beta1**t) after t steps, whatever the precision of the data
    gradients, and the coefficient must fall at every step."""
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": L1_ACCUMULATION,
          "gradient_clipping": 1.0, "optimizer": {"type": "Lamb", "params": {"lr": 1e-2}},
          "zero_optimization": {"stage": stage}, "steps_per_print": 10**6,
          "structured_pruning": {"l1": L1}}
    if bf16:
        ds["bf16"] = {"enabled": True}
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    config = DistSparseBertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    model = DistSparseBertForPreTraining(config)
    attach_coefficients(model, 1)
    d = config.head_dim
    layer = model.bert.encoder.layer[0].attention
    with torch.no_grad():
        layer.self.value.weight[d:2 * d] = 0
        layer.self.value.bias[d:2 * d] = 0
        layer.output.dense.weight[:, d:2 * d] = 0
    engine = build_engine(model, parse_run_config(ds), lr_lambda=lambda s: 1.0)
    groups = comm.parallel_groups(1)
    zero = ZeroAccess(stage, groups.dp_group, groups.dp_rank, groups.dp_size)
    coef = dict(engine.module.named_parameters())[layer_key(0, HEAD_COEF)]
    trainer = Trainer(engine, config, groups, zero_stage=stage)
    del engine
    values, moments = [float(zero.full_fp32(coef)[1])], []
    for step in range(1, L1_STEPS + 1):
        def micro():
            for m in range(L1_ACCUMULATION):
                g = torch.Generator().manual_seed(1000 * step + 10 * m + groups.dp_rank)
                ids = torch.randint(5, 64, (2, 16), generator=g)
                yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        trainer.train_step(micro(), step)
        values.append(float(zero.full_fp32(coef)[1]))
        moments.append(float(zero.full_state(coef, "exp_avg")[1]))
    dtype = str(next(trainer.engine.module.parameters()).dtype)
    trainer.engine.destroy()
    return {"stage": stage, "bf16": bf16, "values": values, "exp_avg": moments, "dtype": dtype}


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
    if argv[0] == "l1":
        comm.init()
        report = [l1_case(stage, bf16) for stage in (1, 2, 3) for bf16 in (False, True)]
        everyone = comm.all_gather_object(report)
        if comm.rank() == 0:
            with open(argv[1], "w") as f:
                json.dump({"l1": L1, "accumulation": L1_ACCUMULATION, "ranks": everyone}, f)
        comm.barrier()
        return
    out, stage, tp = argv[0], int(argv[1]), int(argv[2])
    comm.init()
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": stage},
          "steps_per_print": 10**6}
    if tp > 1:
        ds["tensor_parallel"] = {"autotp_size": tp}
    run_cfg = parse_run_config(ds)
    config = DistSparseBertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  intermediate_size=FFN, max_position_embeddings=32)
    torch.manual_seed(0)
    model = DistSparseBertForPreTraining(config)
    attach_coefficients(model, tp)
    engine = build_engine(model, run_cfg, lr_lambda=lambda s: 1.0)
    groups = comm.parallel_groups(tp)
    zero = ZeroAccess(stage, groups.dp_group, groups.dp_rank, groups.dp_size)
    params = dict(engine.module.named_parameters())
    for layer in range(LAYERS):
        for key, n in ((HEAD_COEF, HEADS), (NEURON_COEF, FFN)):
            p = params[layer_key(layer, key)]
            block = n // tp
            safe_set_full_fp32_param(p, planted(layer, n)[groups.tp_rank * block:(groups.tp_rank + 1) * block])
    tickets = {}
    for scope in ("layer", "global"):
        cfg = StructuredPruningConfig(scope=scope, head_ratio=0.5, ffn_ratio=0.4, max_search_steps=1)
        pruner = StructuredPruner(cfg, LAYERS, groups, zero)
        pruner.bind(engine.module)
        obs, _ = pruner.check(1)
        assert obs.drawn and obs.forced
        tickets[scope] = pruner.ticket.to_dict()
    views = comm.all_gather_object(tickets)
    if comm.rank() == 0:
        with open(out, "w") as f:
            json.dump({"tickets": tickets, "all_ranks": views, "world": comm.world_size(), "tp": groups.tp_size,
                       "local_head_coef": list(params[layer_key(0, HEAD_COEF)].ds_shape
                                               if stage == 3 else params[layer_key(0, HEAD_COEF)].shape)}, f)
    comm.barrier()


if __name__ == "__main__":
    main()
