"""Build the DeepSpeed engine from a validated RunConfig.

DeepSpeed's config is passed through untouched except for what the hardware forces:
- ``"optimizer": {"type": "Lamb"}`` is DeepSpeed's FusedLamb, which is CUDA-only and, under
  ZeRO, computes its trust ratio over flat multi-layer partitions. Where either applies we
  substitute dist_sparse's layer-wise ``Lamb`` as a client optimizer with the same update rule
  and hyper-parameters, BERT's few param groups with each tensor's norms taken over its own
  elements (``lamb_segments``) and summed over the ranks that hold a part of it
  (``lamb_norm_reducer``). With AutoTP FusedLamb would take a split
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
from dist_sparse.optim import Lamb, Segments, add_l1_to_gradients, parameter_groups, row_names

LAMB_KEYS = {"lr", "betas", "eps", "weight_decay", "bias_correction", "max_coeff", "min_coeff"}


def lamb_norm_reducer(groups: comm.ParallelGroups, tp_split_names: set[str],
                      dp_sharded: bool) -> Callable[[torch.Tensor, list], None] | None:
    """Sums LAMB's per-tensor squared norms over the ranks holding parts of each tensor, in one
    all-reduce per call; None when every rank holds whole tensors.

    Row i holds (||w||^2, ||update||^2) of what this rank holds of tensor ``names[i]``:
    - replicated tensor (LayerNorm, embeddings, a row-parallel bias ...): under ZeRO each
      data-parallel rank holds a slice, summed over DP (``dp_sharded``); without ZeRO each rank
      holds all of it. Every TP peer holds the same values, so they count on TP rank 0 only.
    - tensor AutoTP split (``tp_split_names``): one shard per TP rank, so the whole weight's
      norm sums over TP as well, which gives the trust ratio tp=1 would. Under ZeRO the DP group
      slices each shard, so the parts lie on every rank of DP x TP.
    With TP the replicated rows are zeroed on TP ranks other than 0 and the whole tensor is then
    summed over the world (ZeRO) or the TP group (no ZeRO): one all-reduce per call, a handful
    per step (LAMB's groups are few, see dist_sparse.optim).
    """
    if groups.tp_size == 1 or not tp_split_names:
        tp_split_names = set()
    if not dp_sharded and not tp_split_names:
        return None
    assert groups.world_size == groups.dp_size * groups.tp_size, "DP x TP must span the world (no pipeline)"
    tp = groups.tp_size > 1 and bool(tp_split_names)
    group = (None if dp_sharded else groups.tp_group) if tp else groups.dp_group  # None: the world
    keep_on: dict[tuple, torch.Tensor] = {}  # per (device, names): 1 for rows this rank contributes

    def reduce_(sq_norms: torch.Tensor, names: list) -> None:
        # Every rank steps the same groups in the same order, so the collectives match.
        if tp and groups.tp_rank != 0:
            key = (sq_norms.device, tuple(names))
            if key not in keep_on:
                keep_on[key] = torch.tensor([[1.0 if n in tp_split_names else 0.0] for n in names],
                                            dtype=sq_norms.dtype).to(sq_norms.device)
            sq_norms.mul_(keep_on[key])
        comm.all_reduce_sum_(sq_norms, group)
    return reduce_


def tp_split_names(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> set[str]:
    """Names of LAMB's rows (tensors) that AutoTP split.

    The marks live on the module's parameters after ``deepspeed.initialize`` (AutoTP sets them
    there, and under ZeRO the optimizer's own params are flat fp32 partitions without marks),
    so each row is matched to the module's parameter by the name its group was built with.
    """
    params = dict(module.named_parameters())
    names = [n for g in optimizer.param_groups for n in row_names(g)]
    missing = [n for n in names if n not in params]
    assert not missing, f"LAMB rows without a module parameter of that name: {missing[:5]}"
    return {n for n in names if is_tp_split(params[n])}


def lamb_segments(engine, optimizer: Lamb) -> dict[int, Segments]:
    """Where each LAMB tensor's elements lie in the flat partitions DeepSpeed hands the
    optimizer (``Lamb.segments``); empty without ZeRO (the groups hold the tensors themselves).

    Reads DeepSpeed 0.19.8's layouts, which no public call exposes:
    - ZeRO-1/2 and BF16_Optimizer: each module parameter's ``_hp_mapping`` (``link_hp_params``)
      names its group (``param_group_index``) and the run of the group's flat fp32 partition that
      holds this rank's fragment (``hp_fragment_address``); the flat partition is the group's
      only param. The rest of a partition is alignment padding.
    - ZeRO-3: sub-group ``i`` (``fp16_groups[i]``, stepped as ``fp32_partitioned_groups_flat[i]``
      in param group ``sub_group_to_group_id[i]``) concatenates its parameters' partitions
      (``ds_tensor``, ``ceil(numel / dp)`` elements each, the last rank's padded).
    """
    zero_opt = engine.optimizer
    if zero_opt is optimizer:  # no ZeRO, no BF16_Optimizer: the groups hold the tensors themselves
        return {}
    row_of = [{n: i for i, n in enumerate(row_names(g))} for g in optimizer.param_groups]
    runs: dict[int, list[tuple[int, int, int]]] = {}  # id(flat) -> (start, numel, row)
    flats: dict[int, torch.Tensor] = {}
    if hasattr(zero_opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        names = {id(p): n for n, p in engine.module.named_parameters()}
        dp_rank = comm.rank(zero_opt.dp_process_group)
        for i, params in enumerate(zero_opt.fp16_groups):
            flat = zero_opt.fp32_partitioned_groups_flat[i]
            rows = row_of[zero_opt.sub_group_to_group_id[i]]
            flats[id(flat)], start, mine = flat, 0, runs.setdefault(id(flat), [])
            for p in params:
                part = p.ds_tensor.ds_numel
                real = min(part, max(0, p.ds_numel - dp_rank * part))
                mine.append((start, real, rows[names[id(p)]]))
                start += part
    else:  # ZeRO-1/2, BF16_Optimizer
        for group in optimizer.param_groups:
            if len(group["params"]) == 1:
                flats[id(group["params"][0])] = group["params"][0]
                runs.setdefault(id(group["params"][0]), [])
        for name, p in engine.module.named_parameters():
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                continue
            group = optimizer.param_groups[mapping.param_group_index]
            flat = group["params"][0]
            address = mapping.hp_fragment_address
            # the fragment DeepSpeed steps must be the run this table names (a misread layout would
            # give wrong trust ratios silently)
            if mapping.hp_fragment.data_ptr() != flat.data_ptr() + int(address.start) * flat.element_size():
                raise RuntimeError(f"LAMB: the fp32 fragment of {name} does not lie where DeepSpeed's mapping "
                                   "says in its flat partition; this DeepSpeed version lays ZeRO out otherwise")
            runs[id(flat)].append((int(address.start), int(address.numel), row_of[mapping.param_group_index][name]))
    out = {}
    for key, found in runs.items():
        runs_in_order, at = [], 0  # (length, row), padding (row -1) filling the gaps
        for start, numel, row in sorted(found):
            if start > at:
                runs_in_order.append((start - at, -1))
            runs_in_order.append((numel, row))
            at = start + numel
        total = flats[key].numel()
        assert at <= total, "a LAMB tensor's fragment lies beyond its flat partition"
        if total > at:
            runs_in_order.append((total - at, -1))
        out[key] = Segments([n for n, _ in runs_in_order], [r for _, r in runs_in_order])
    return out


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
        # LAMB's trust ratio is per tensor, whatever the group: BERT's few groups, each tensor a
        # row (dist_sparse.optim). The structured search's L1 penalty is applied by LAMB, in fp32.
        # Which ranks share a tensor, and where its elements lie in ZeRO's flat partitions, is
        # known only once deepspeed.initialize has built the mesh, split the model and
        # partitioned the groups: build_engine sets the norm reducer and the segments then.
        sp = run_cfg.structured_pruning
        groups = parameter_groups(model, weight_decay, one_per_parameter=False, l1=sp.l1 if sp is not None else 0.0)
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
        client_opt.segments = lamb_segments(engine, client_opt)
    elif l1:
        # DeepSpeed's own optimizer (AdamW): the coefficients' L1 in fp32, as LAMB applies it
        add_l1_to_gradients(engine.basic_optimizer)
    return engine
