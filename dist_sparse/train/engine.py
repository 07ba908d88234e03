"""Build the DeepSpeed engine from a validated RunConfig.

DeepSpeed's config is passed through untouched except for what the hardware forces:
- ``"optimizer": {"type": "Lamb"}`` is DeepSpeed's FusedLamb, which is CUDA-only and, under
  ZeRO, computes its trust ratio over flat multi-layer partitions. Where either applies we
  substitute dist_sparse's layer-wise ``Lamb`` as a client optimizer with the same update rule
  and hyper-parameters, one param group per tensor, norms summed over the data-parallel group.
- ``"Adam"/"AdamW"`` on a machine without CUDA run as torch's AdamW (``torch_adam``).
The learning-rate schedule is ours (warmup + linear/polynomial/cosine decay), handed to
DeepSpeed as a client scheduler so that it is stepped and checkpointed with the engine.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from dist_sparse.config import RunConfig
from dist_sparse.distributed import comm
from dist_sparse.optim import Lamb, parameter_groups

LAMB_KEYS = {"lr", "betas", "eps", "weight_decay", "bias_correction", "max_coeff", "min_coeff"}


def _dp_norm_reducer(tp_size: int) -> Callable[[torch.Tensor], None]:
    # The DP group exists only once deepspeed.initialize has built the mesh; resolve lazily.
    def reduce_(sq_norms: torch.Tensor) -> None:
        comm.all_reduce_sum_(sq_norms, comm.parallel_groups(tp_size).dp_group)
    return reduce_


def build_optimizer(model: torch.nn.Module, run_cfg: RunConfig, ds: dict) -> torch.optim.Optimizer | None:
    """Return a client optimizer when DeepSpeed's own cannot do the job, else None (and fix ``ds``)."""
    spec = ds.get("optimizer")
    if spec is None:
        raise ValueError('the DeepSpeed config needs an "optimizer" section (type Lamb or AdamW)')
    kind = str(spec.get("type", "")).lower()
    params = dict(spec.get("params", {}))
    weight_decay = float(params.get("weight_decay", 0.01))
    zero = run_cfg.zero_stage
    if kind == "lamb":
        if torch.cuda.is_available() and zero == 0:
            return None  # FusedLamb sees whole tensors without ZeRO: DeepSpeed's own is right
        unknown = set(params) - LAMB_KEYS - {"max_grad_norm"}
        if unknown:
            raise ValueError(f"optimizer.params: unknown LAMB key(s) {sorted(unknown)}; known: {sorted(LAMB_KEYS)}")
        kwargs = {k: v for k, v in params.items() if k in LAMB_KEYS}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        del ds["optimizer"]
        ds["zero_allow_untested_optimizer"] = True
        # LAMB's trust ratio is per tensor: one group per tensor, with or without ZeRO. The
        # structured search's L1 penalty is applied by LAMB, in fp32 (see dist_sparse.optim).
        sp = run_cfg.structured_pruning
        groups = parameter_groups(model, weight_decay, one_per_parameter=True, l1=sp.l1 if sp is not None else 0.0)
        return Lamb(groups, norm_reducer=_dp_norm_reducer(run_cfg.tp_size) if zero > 0 else None, **kwargs)
    if kind in ("adam", "adamw"):
        if not torch.cuda.is_available():
            spec = copy.deepcopy(spec)
            spec.setdefault("params", {})["torch_adam"] = True
            ds["optimizer"] = spec
        return None
    raise ValueError(f"optimizer.type {spec.get('type')!r} is not supported here: use Lamb or AdamW")


def build_engine(model: torch.nn.Module, run_cfg: RunConfig,
                 lr_lambda: Callable[[int], float], start_step: int = 0):
    """The DeepSpeed engine of ``model``. ``start_step``: optimizer steps already taken, for an
    engine that takes over a run (after a physical shrink) so the LR schedule continues."""
    import deepspeed

    ds = copy.deepcopy(run_cfg.deepspeed)
    client_opt = build_optimizer(model, run_cfg, ds)
    weight_decay = float(run_cfg.deepspeed["optimizer"].get("params", {}).get("weight_decay", 0.01))
    model_parameters = (None if client_opt is not None
                        else parameter_groups(model, weight_decay, one_per_parameter=False))
    scheduler = None
    if "scheduler" not in ds:
        def scheduler(optimizer):
            if start_step:
                # torch's documented way to start a scheduler mid-run: last_epoch plus initial_lr.
                for group in optimizer.param_groups:
                    group.setdefault("initial_lr", group["lr"])
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda, last_epoch=start_step - 1)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client_opt, model_parameters=model_parameters,
                                           lr_scheduler=scheduler, config=ds)
    return engine
