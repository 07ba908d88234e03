"""Build the DeepSpeed engine from a validated RunConfig.

DeepSpeed's config is passed through untouched except for what the hardware forces:
- ``"optimizer": {"type": "Lamb"}`` is DeepSpeed's FusedLamb, which is CUDA-only and, under
  ZeRO, computes its trust ratio over flat multi-layer partitions. Where either applies we
  substitute dist_sparse's layer-wise ``Lamb`` as a client optimizer with the same update rule
  and hyper-parameters, one param group per tensor, each tensor's norms summed over the ranks
  that hold a part of it (see ``lamb_norm_reducer``). With AutoTP FusedLamb would take a split
  weight's trust ratio from its shard, so tensor parallelism takes our LAMB even without ZeRO.
- ``"Adam"/"AdamW"`` on a machine without CUDA run as torch's AdamW (``torch_adam``).
With AutoTP the model's attention dropout is put in the tensor-parallel RNG region
(``dist_sparse.distributed.rng``), which the training loop seeds every micro step.
The learning-rate schedule is ours (warmup + linear/polynomial/cosine decay), handed to
DeepSpeed as a client scheduler so that it is stepped and checkpointed with the engine.
"""

from __future__ import annotations

import copy
import os
from typing import Callable

import torch

from dist_sparse.config import RunConfig, resolve_batch_sizes
from dist_sparse.distributed import comm
from dist_sparse.distributed.rng import tp_rng
from dist_sparse.distributed.tp_layout import is_tp_split
from dist_sparse.optim import Lamb, add_l1_to_gradients, parameter_groups

LAMB_KEYS = {"lr", "betas", "eps", "weight_decay", "bias_correction", "max_coeff", "min_coeff"}


def lamb_norm_reducer(groups: comm.ParallelGroups, tp_split_names: set[str],
                      dp_sharded: bool) -> Callable[[torch.Tensor, list[dict]], None] | None:
    """Sums LAMB's per-tensor squared norms over the ranks holding parts of each tensor; None
    when every rank holds whole tensors.

    Row i holds (||w||^2, ||update||^2) of what this rank holds of group i's tensor:
    - replicated tensor (LayerNorm, embeddings, a row-parallel bias ...): under ZeRO each
      data-parallel rank holds a slice, summed over DP (``dp_sharded``); without ZeRO each rank
      holds all of it. Never over TP: every TP peer holds the same values.
    - tensor AutoTP split (``tp_split_names``): one shard per TP rank, so the whole weight's
      norm sums over TP as well, which gives the trust ratio tp=1 would. Under ZeRO the DP group
      slices each shard, so the parts lie on every rank of DP x TP: one sum over the world.
    A call therefore makes at most one all-reduce per kind of tensor in it. ZeRO 1/2/3 step
    one tensor per call (see dist_sparse.optim): one all-reduce per tensor and step, as before;
    without ZeRO one TP all-reduce per step.
    """
    if groups.tp_size == 1 or not tp_split_names:
        tp_split_names = set()
    if not dp_sharded and not tp_split_names:
        return None
    assert groups.world_size == groups.dp_size * groups.tp_size, "DP x TP must span the world (no pipeline)"
    split_group = None if dp_sharded else groups.tp_group  # None: the whole world
    rows_on: dict[tuple, torch.Tensor] = {}  # row indices per (device, kinds), made once

    def reduce_rows(sq_norms: torch.Tensor, which: list[int], group) -> None:
        if len(which) == len(sq_norms):  # the common case (ZeRO: one group per call): no gather
            comm.all_reduce_sum_(sq_norms, group)
            return
        key = (sq_norms.device, tuple(which))
        rows = rows_on.setdefault(key, torch.tensor(which, dtype=torch.long).to(sq_norms.device))
        part = sq_norms.index_select(0, rows)
        comm.all_reduce_sum_(part, group)
        sq_norms.index_copy_(0, rows, part)

    def reduce_(sq_norms: torch.Tensor, param_groups: list[dict]) -> None:
        # Every rank steps the same groups in the same order, so the collectives below match.
        split = [i for i, g in enumerate(param_groups) if g["name"] in tp_split_names]
        replicated = [i for i, g in enumerate(param_groups) if g["name"] not in tp_split_names]
        if split:
            reduce_rows(sq_norms, split, split_group)
        if replicated and dp_sharded:
            reduce_rows(sq_norms, replicated, groups.dp_group)
    return reduce_


def tp_split_names(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> set[str]:
    """Names of the param groups (one tensor each, named) whose tensor AutoTP split.

    The marks live on the module's parameters after ``deepspeed.initialize`` (AutoTP sets them
    there, and under ZeRO the optimizer's own params are flat fp32 partitions without marks),
    so each group is matched to the module's parameter by the name it was built with. Names,
    not group indices or dicts: ZeRO steps one group at a time through a swapped-in list, and
    loading a checkpoint replaces the group dicts.
    """
    params = dict(module.named_parameters())
    missing = [g["name"] for g in optimizer.param_groups if g["name"] not in params]
    assert not missing, f"LAMB param groups without a module parameter of that name: {missing[:5]}"
    return {g["name"] for g in optimizer.param_groups if is_tp_split(params[g["name"]])}


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
        if torch.cuda.is_available() and zero == 0 and run_cfg.tp_size == 1:
            return None  # FusedLamb sees whole tensors without ZeRO and TP: DeepSpeed's own is right
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
        # Which ranks share a tensor is known only once deepspeed.initialize has built the mesh
        # and AutoTP has split the model: build_engine sets the norm reducer then.
        sp = run_cfg.structured_pruning
        groups = parameter_groups(model, weight_decay, one_per_parameter=True, l1=sp.l1 if sp is not None else 0.0)
        return Lamb(groups, **kwargs)
    if kind in ("adam", "adamw"):
        if not torch.cuda.is_available():
            spec = copy.deepcopy(spec)
            spec.setdefault("params", {})["torch_adam"] = True
            ds["optimizer"] = spec
        return None
    raise ValueError(f"optimizer.type {spec.get('type')!r} is not supported here: use Lamb or AdamW")


def build_engine(model: torch.nn.Module, run_cfg: RunConfig,
                 lr_lambda: Callable[[int], float], start_step: int = 0, groups: comm.ParallelGroups | None = None,
                 load_universal: bool = False):
    """The DeepSpeed engine of ``model``. ``start_step``: optimizer steps already taken, for an
    engine that takes over a run (after a physical shrink) so the LR schedule continues.
    ``groups``: the run's parallel groups; None only for a process's first engine, before whose
    ``deepspeed.initialize`` AutoTP's groups do not exist (they are then read from DeepSpeed).
    ``load_universal``: the engine will load a universal checkpoint (a resume at another layout,
    ``train.elastic``)."""
    import deepspeed

    ds = copy.deepcopy(run_cfg.deepspeed)
    # DeepSpeed 0.19.8 derives a batch size missing from the config with the whole world as the
    # data-parallel size when AutoTP comes from the config: given train_batch_size and a micro
    # batch at TP 2 it accumulated half the micro batches the loop feeds per step, so it stepped
    # the optimizer and the LR schedule twice per step. It is handed the loop's own resolution
    # (micro batch and accumulation for the real data-parallel size) instead.
    # (before deepspeed.initialize the process group may not exist yet: the launcher's WORLD_SIZE)
    world = comm.world_size() if comm.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    _, micro, grad_acc = resolve_batch_sizes(run_cfg.deepspeed, world // run_cfg.tp_size)
    ds.pop("train_batch_size", None)
    ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = micro, grad_acc
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    if run_cfg.tp_size > 1:
        # Split attention heads draw their dropout in the TP region (a no-op until the loop seeds
        # it). Here, not in the loop, so that the engine a physical shrink builds gets it too.
        tp_rng.install(model)
    client_opt = build_optimizer(model, run_cfg, ds)
    weight_decay = float(run_cfg.deepspeed["optimizer"].get("params", {}).get("weight_decay", 0.01))
    sp = run_cfg.structured_pruning
    l1 = sp.l1 if sp is not None else 0.0
    model_parameters = (None if client_opt is not None
                        else parameter_groups(model, weight_decay, one_per_parameter=False, l1=l1))
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
    if run_cfg.tp_size > 1:
        from dist_sparse.train.elastic import register_own_tp_splits

        register_own_tp_splits(engine)  # so that a checkpoint can be resumed at another TP degree
    if isinstance(client_opt, Lamb):
        if groups is None:
            groups = comm.parallel_groups(run_cfg.tp_size)
        split = tp_split_names(client_opt, engine.module) if groups.tp_size > 1 else set()
        # ZeRO 1-3 (and DeepSpeed's BF16_Optimizer, which it picks here only for ZeRO-1 with fp32
        # gradient accumulation) hand the optimizer DP slices; stage 0 whole (TP-local) tensors.
        client_opt.norm_reducer = lamb_norm_reducer(groups, split, dp_sharded=run_cfg.zero_stage > 0)
    elif l1:
        # DeepSpeed's own optimizer (AdamW): the coefficients' L1 in fp32, as LAMB applies it
        add_l1_to_gradients(engine.basic_optimizer)
    return engine
