"""The EarlyBERT keep-set decision on planted coefficients.

Run on N ranks: the deepspeed launcher, or dslaunch.spawn_ranks, which starts them the same way.

    structured_check.py OUT.json STAGE TP

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

LAYERS, HEADS, FFN = 3, 4, 128


def planted(layer: int, n: int) -> torch.Tensor:
    """A whole-layer coefficient vector with ties (values repeat every 13 units)."""
    i = torch.arange(n)
    return (((i * 7919 + layer * 31) % 13).float() / 13.0 - 0.3) * (1 + layer)


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
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
