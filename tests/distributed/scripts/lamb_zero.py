"""ZeRO-sharded layer-wise LAMB equals unsharded LAMB.

Run on N ranks: the deepspeed launcher, or dslaunch.spawn_ranks, which starts them the same way.

Each rank trains a small MLP on its half of a fixed global batch through dist_sparse's engine
setup (our Lamb, one group per tensor, norms summed over DP); rank 0 also trains an unsharded
copy on the whole batch with the same Lamb and compares every fp32 master weight read through
``deepspeed.utils.safe_get_full_fp32_param``, for ZeRO stages 0-3 in one launch. Writes a JSON
report to argv[1].
"""

import json
import sys

import torch

from dist_sparse.config import parse_run_config
from dist_sparse.distributed import comm
from dist_sparse.optim import Lamb, parameter_groups
from dist_sparse.train.engine import build_engine

STEPS = 5


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                               torch.nn.Linear(32, 4))


def check_stage(stage: int) -> dict:
    rank, world = comm.rank(), comm.world_size()
    g = torch.Generator().manual_seed(1)
    x_all, y_all = torch.randn(8 * world, 16, generator=g), torch.randn(8 * world, 4, generator=g)
    x, y = x_all[rank * 8:(rank + 1) * 8], y_all[rank * 8:(rank + 1) * 8]
    lamb = {"type": "Lamb", "params": {"lr": 0.05, "weight_decay": 0.01}}
    zero = {"stage": stage}
    if stage == 3:
        zero.update({"stage3_param_persistence_threshold": 0})
    # No clipping: DeepSpeed clips at 1.0 by default, the reference does not clip.
    run_cfg = parse_run_config({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
                                "gradient_clipping": 0.0,
                                "optimizer": lamb, "zero_optimization": zero})
    engine = build_engine(make_model(), run_cfg, lr_lambda=lambda s: 1.0)
    for _ in range(STEPS):
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
    from deepspeed.utils import safe_get_full_fp32_param
    sharded = {n: (safe_get_full_fp32_param(p) if stage else p).detach().clone()
               for n, p in engine.module.named_parameters()}
    report = {"stage": stage, "world": world, "optimizer": type(engine.optimizer).__name__}
    if rank == 0:
        ref = make_model()
        opt = Lamb(parameter_groups(ref, 0.01, one_per_parameter=True), lr=0.05)
        for _ in range(STEPS):
            opt.zero_grad()
            torch.nn.functional.mse_loss(ref(x_all), y_all).backward()
            opt.step()
        diffs = {n: float((sharded[n] - p.detach()).abs().max()) for n, p in ref.named_parameters()}
        moved = {n: float((p.detach() - q.detach()).abs().max())
                 for (n, p), q in zip(ref.named_parameters(), make_model().parameters())}
        report.update(max_diff=max(diffs.values()), diffs=diffs, min_moved=min(moved.values()))
    comm.barrier()
    return report


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out_path = args[0]
    comm.init()
    # One launch checks every stage: process start-up dominates the cost of these tests.
    reports = [check_stage(stage) for stage in (0, 1, 2, 3)]
    if comm.rank() == 0:
        with open(out_path, "w") as f:
            json.dump(reports, f)


if __name__ == "__main__":
    main()
