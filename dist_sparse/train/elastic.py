"""Resuming a checkpoint at another layout: another data-parallel size, tensor-parallel degree or
ZeRO stage (nodes lost, an allocation of another size, a TP degree that fits other GPUs).

DeepSpeed writes its states per layout: flat ZeRO partitions per (DP, TP) rank that only the same
layout can load. Its answer is the universal checkpoint: ``ds_to_universal`` turns the partitions
into one folder per parameter (fp32 master, ``exp_avg``, ``exp_avg_sq``, ``step``; AutoTP's splits
merged back into whole tensors by the metadata AutoTP records in the checkpoint), and an engine
built with ``"checkpoint": {"load_universal": true}`` takes its own part of each at any layout.
That is used here as it is, once per checkpoint and only when the layout changed: rank 0
converts ``RUN/checkpoints/TAG`` into ``RUN/universal/TAG`` (kept, so a second resume of the same
checkpoint at yet another layout converts nothing), the others wait for its verdict.

What DeepSpeed does not know is ours, and has a layout-free form:

* masks: each rank's file holds the part of every mask it kept; the conversion puts them
  together into whole masks (``checkpoint.logical_masks``) in ``RUN/universal/TAG/MASKS_FILE``,
  beside rank 0's sparsifier state (step, history, config: the same on every rank), and each rank
  of the new layout keeps its own part (``Sparsifier.load_logical_state``);
* the data position: the loader's state counts the samples of the epoch consumed, and an optimizer
  step holds the same samples at every layout (``ResumableBatchIterator``);
* the structure record, DynaBERT's record, the schedules: rank-independent already.

Per-rank RNG states do not carry over (a rank of the new layout has no old rank to take them from);
nothing the loops draw depends on them, as every generator is reseeded per micro step from
(seed, step, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dist_sparse.folders import publish_folder, write_json_atomic
from dist_sparse.train import checkpoint as ckpt

log = logging.getLogger("dist_sparse.train")

UNIVERSAL_DIR = "universal"            # below the run directory: RUN/universal/TAG
RECORD_FILE = "dist_sparse_universal.json"  # written last: the conversion is complete
MASKS_FILE = "dist_sparse_masks.pt"    # whole masks and rank 0's sparsifier state


@dataclass(frozen=True)
class Layout:
    """What decides the form of DeepSpeed's states in a checkpoint."""

    dp: int
    tp: int
    zero3: bool             # module states partitioned per DP rank (stages 1 and 2 write alike)
    bf16_optimizer: bool    # DeepSpeed's BF16_Optimizer (ZeRO-1, bf16, fp32 accumulation)

    def describe(self) -> str:
        stage = "ZeRO-3" if self.zero3 else ("ZeRO-1 BF16_Optimizer" if self.bf16_optimizer else "ZeRO-1/2")
        return f"{self.dp} data-parallel x {self.tp} tensor-parallel, {stage}"


def written_layout(tag_dir: Path) -> Layout | None:
    """The layout checkpoint ``tag_dir`` was written at, from its file names; None if it holds no
    ZeRO optimizer states."""
    files = ckpt.list_files(tag_dir)
    if files.layout is None:
        return None
    dp, tp = files.layout
    return Layout(dp, tp, files.zero3, files.bf16_optimizer)


def launch_layout(dp: int, tp: int, ds_config: dict) -> Layout:
    """The layout this launch writes, from the DeepSpeed config (DeepSpeed's own rule for picking
    its BF16_Optimizer: bf16 weights, fp32 gradient accumulation, ZeRO stage 1)."""
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
    accum = ds_config.get("data_types", {}).get("grad_accum_dtype")
    return Layout(dp, tp, stage == 3, bf16 and stage == 1 and accum in ("fp32", "float32", "float"))


@dataclass(frozen=True)
class Move:
    """A resume of ``tag`` from ``source`` to ``target``; ``load_dir`` holds its universal form."""

    tag: str
    source: Layout
    target: Layout
    load_dir: Path

    def describe(self) -> str:
        return f"{self.tag}: {self.source.describe()} -> {self.target.describe()}"


def plan(run: Path, tag: str, target: Layout) -> Move | None:
    """The move a resume of ``tag`` at ``target`` needs, or None when the layouts are the same."""
    source = written_layout(run / ckpt.CHECKPOINTS_DIR / tag)
    if source is None or source == target:
        return None
    return Move(tag, source, target, run / UNIVERSAL_DIR)


def register_own_tp_splits(engine) -> list[str]:
    """Describe our own tensor-parallel parameters to DeepSpeed's universal checkpoint; the names.

    EarlyBERT's slimming coefficients hold one block of heads or neurons per TP rank (rank r the
    r-th block, as AutoTP splits the heads' rows) and are marked ``tensor_model_parallel``, but
    AutoTP did not make them: its metadata lists every parameter it left alone as replicated
    (pattern and affine map), and the converter would refuse to merge blocks that differ. Taken
    out of both, they merge by the converter's default, concatenated along dim 0 in TP-rank order,
    and a rank of another layout takes its block back along the same dim.
    """
    import re

    from deepspeed.checkpoint.constants import (AFFINE_MAP, AFFINE_MAP_PARAMS, DS_AUTOTP_UC_META,
                                                TP_REPLICATED_PARAMETER_PATTERNS, UNIVERSAL_CHECKPOINT_INFO)

    module = engine.module
    own = {rf"^{re.escape(name)}$": name for name, p in module.named_parameters()
           if getattr(p, "tensor_model_parallel", False) and getattr(p, DS_AUTOTP_UC_META, None) is None}
    if not own:
        return []
    infos = {}
    for holder in (module, getattr(engine, "optimizer", None), *module.parameters()):
        for attr in (UNIVERSAL_CHECKPOINT_INFO, "_universal_checkpoint_info"):
            info = getattr(holder, attr, None)
            if isinstance(info, dict):
                infos[id(info)] = info
    for info in infos.values():
        info[TP_REPLICATED_PARAMETER_PATTERNS] = [p for p in info.get(TP_REPLICATED_PARAMETER_PATTERNS, [])
                                                  if p not in own]
        maps = info.get(AFFINE_MAP, {}).get(AFFINE_MAP_PARAMS)
        if maps is not None:
            for pattern in own:
                maps.pop(pattern, None)
    return sorted(own.values())


def check_batch(move: Move, recorded: int | None, global_batch: int) -> None:
    """A move keeps the samples of an optimizer step: the data position, the loss and the LR
    schedule per step all assume it. ``recorded``: run.json's global batch (None: not recorded)."""
    if recorded is not None and recorded != global_batch:
        raise ValueError(f"--resume at another layout ({move.describe()}): an optimizer step of the run held "
                         f"{recorded} samples, this launch's would hold {global_batch} (micro batch x gradient "
                         f"accumulation x data-parallel size); set \"train_batch_size\": {recorded} in the "
                         "DeepSpeed config and leave out gradient_accumulation_steps, so DeepSpeed derives the "
                         "accumulation for this layout")


def converted(out: Path) -> dict | None:
    """The record of a complete conversion in ``out``, or None."""
    path = out / RECORD_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def convert(tag_dir: Path, out: Path) -> dict:
    """Convert checkpoint ``tag_dir`` to DeepSpeed's universal form in ``out`` with our masks in
    whole form beside it (one process; no process group needed). Written into a hidden sibling and
    renamed into place, the record last: an interrupted conversion leaves nothing that looks done."""
    from deepspeed.checkpoint import ds_to_universal

    source = written_layout(tag_dir)
    if source is None:
        raise ValueError(f"{tag_dir} holds no ZeRO optimizer states; it cannot be resumed at another layout")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.converting")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    # One worker: the conversion runs inside a training process whose threads (gloo) a fork would copy.
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # A checkpoint written without AutoTP has no universal metadata: every
                              # tensor is whole. With AutoTP, DeepSpeed's metadata is there and is used.
                              inject_missing_state=True)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            ds_to_universal.main(args)
        _name_model_states_for_every_stage(tmp)
        _global_state_for_every_stage(tmp / "zero")
        if source.zero3:
            _zero3_parameters_for_every_stage(tmp)
        states = ckpt.read_sparsity(tag_dir)
        if states:
            first = states[min(states)]
            torch.save({"state": {k: v for k, v in first.items() if k != "masks"},
                        "masks": ckpt.logical_masks(tag_dir)}, tmp / MASKS_FILE)
        record = {"source": str(tag_dir), "tag": tag_dir.name, "layout": asdict(source),
                  "masks": bool(states), "seconds": round(time.perf_counter() - t0, 3)}
        write_json_atomic(tmp / RECORD_FILE, record)
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        log.error("converting %s to a universal checkpoint failed; DeepSpeed printed:\n%s", tag_dir,
                  printed.getvalue()[-4000:])
        raise
    return record


def _name_model_states_for_every_stage(folder: Path) -> None:
    """An engine loading a universal checkpoint reads its client state from the model-states file
    of TP rank t under the name its own stage writes (``mp_rank_t`` for ZeRO-1/2,
    ``zero_pp_rank_0_mp_rank_t`` for ZeRO-3), while the weights come from ``zero/``. The
    conversion keeps the source's names; the other stage's name is linked to the same file."""
    import os

    files = ckpt.list_files(folder).model_states
    for tp in sorted({t for _, t in files}):
        have = {d for d, t in files if t == tp}
        src = folder / ckpt.model_states_file(tp, None if None in have else min(have))
        for dp in (None, 0):
            dest = folder / ckpt.model_states_file(tp, dp)
            if not dest.exists():
                try:
                    os.link(src, dest)
                except OSError:
                    shutil.copyfile(src, dest)


def _global_state_for_every_stage(zero: Path) -> None:
    """``zero/optimizer_state.pt`` is read differently by the two loaders of DeepSpeed 0.19.8: ZeRO-1/2
    zips its ``param_groups`` with the engine's and requires ``ds_version``, ZeRO-3 reads
    ``optimizer_state_dict`` (the step of parameter 0, and the hyperparameters of group 0, see
    ``restore_param_groups``). Each conversion writes only its own stage's keys; the other's are
    added from them."""
    path = zero / "optimizer_state.pt"
    sd = torch.load(path, weights_only=False)
    if "optimizer_state_dict" not in sd:
        steps = sorted(zero.glob("*/step.pt"))
        if not steps:
            raise ValueError(f"{zero} holds no step of any parameter: the conversion is incomplete")
        step = torch.load(steps[0], weights_only=False)
        sd["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": sd["param_groups"]}
    if "param_groups" not in sd:
        sd["param_groups"] = sd["optimizer_state_dict"]["param_groups"]
    if "ds_version" not in sd:  # ZeRO-1/2 refuses a state without it; ZeRO-3 does not write it
        import deepspeed

        sd["ds_version"] = deepspeed.__version__
    torch.save(sd, path)


def _zero3_parameters_for_every_stage(folder: Path) -> None:
    """DeepSpeed 0.19.8 converts a ZeRO-3 checkpoint into bare flat tensors per parameter and no
    ``step.pt``, which its own ZeRO-3 loader reads; its ZeRO-1/2 loader wants ``{"param": tensor}``
    of the parameter's shape and a step per parameter (else Adam's step count would restart).
    Both forms are written: shapes from the model states (a TP shard's shape is the whole one
    where the tensor holds as many elements; AutoTP's split weights carry their logical shape in
    the universal metadata), the step from the global state."""
    from deepspeed.checkpoint.constants import AFFINE_MAP, AFFINE_MAP_PARAMS, PARAM, UNIVERSAL_CHECKPOINT_INFO

    files = ckpt.list_files(folder).model_states
    states = torch.load(folder / files[min(files, key=lambda k: (k[1], k[0] is not None, k[0] or 0))],
                        weights_only=False)
    shapes = {}
    for group in states.get("param_shapes", []):
        shapes.update({name: tuple(shape) for name, shape in group.items()})
    logical = states.get(UNIVERSAL_CHECKPOINT_INFO, {}).get(AFFINE_MAP, {}).get(AFFINE_MAP_PARAMS, {})
    for pattern, spec in logical.items():
        name = pattern.removeprefix("^").removesuffix("$").replace("\\", "")
        if isinstance(spec, dict) and spec.get("logical_shape"):
            shapes[name] = tuple(spec["logical_shape"])
    sd = torch.load(folder / "zero" / "optimizer_state.pt", weights_only=False)
    step = sd["optimizer_state_dict"]["state"][0]["step"]
    for param_dir in sorted(p for p in (folder / "zero").iterdir() if p.is_dir()):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            path = param_dir / f"{key}.pt"
            if not path.is_file():
                continue
            value = torch.load(path, weights_only=False)
            if isinstance(value, torch.Tensor):
                shape = shapes.get(param_dir.name)
                if shape is not None and torch.Size(shape).numel() == value.numel():
                    value = value.view(shape)
                torch.save({PARAM: value, "cat_dim": 0}, path)
        if not (param_dir / "step.pt").exists() and (param_dir / "exp_avg.pt").exists():
            torch.save(step.clone() if isinstance(step, torch.Tensor) else torch.tensor(float(step)),
                       param_dir / "step.pt")


def _load_zero12_universal(self, lp_groups_name: str, checkpoint_dir: str) -> None:
    """DeepSpeed 0.19.8's ``load_hp_checkpoint_state_from_checkpoint_dir`` (ZeRO-1/2 and its
    BF16_Optimizer) with one change: a param group of which this rank holds no element (LAMB keeps
    one group per tensor, so at DP >= 2 a small tensor lies wholly in another rank's partition) is
    skipped instead of failing on its empty list of steps (``steps[0]``, IndexError)."""
    import os

    from deepspeed.runtime.utils import bwc_tensor_model_parallel_rank
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    zero = os.path.join(checkpoint_dir, "zero")
    optim_sd = torch.load(os.path.join(zero, "optimizer_state.pt"), weights_only=False)
    self._load_global_state(optim_sd)
    tp_rank = bwc_tensor_model_parallel_rank(mpu=self.mpu)
    if self.mpu is None:
        tp_world_size = 1
    elif hasattr(self.mpu, "get_slice_parallel_world_size"):
        tp_world_size = self.mpu.get_slice_parallel_world_size()
    else:
        tp_world_size = self.mpu.get_tensor_model_parallel_world_size()
    lp_groups = getattr(self, lp_groups_name)
    for i, (group, loaded) in enumerate(zip(self.optimizer.param_groups, optim_sd["param_groups"])):
        keys, steps = set(), []
        for lp in lp_groups[i]:
            if lp._hp_mapping is not None:
                steps.append(lp.load_hp_checkpoint_state(os.path.join(zero, self.param_names[lp]), tp_rank,
                                                         tp_world_size))
                keys.update(lp._hp_mapping.get_optim_state_keys())
        if steps:
            hp = group["params"][0]
            if not all(step == steps[0] for step in steps):
                raise ValueError(f"param group {i}: its tensors were saved at different steps {steps}")
            if steps[0] is not None:
                self.optimizer.state[hp]["step"] = steps[0]
            map_to_flat_opt_states(hp, lp_groups[i], self.optimizer.state, keys)
        for key, value in loaded.items():
            if key != "params":
                group[key] = value


def prepare_universal_load(engine) -> None:
    """Before ``engine.load_checkpoint`` of a universal checkpoint: ZeRO-1/2 (and BF16_Optimizer)
    engines load with ``_load_zero12_universal`` (ZeRO-3 has its own loader)."""
    import types

    optimizer = engine.optimizer
    zero3 = engine.zero_optimization_partition_weights()
    if hasattr(optimizer, "load_hp_checkpoint_state_from_checkpoint_dir") and not zero3:
        optimizer.load_hp_checkpoint_state_from_checkpoint_dir = types.MethodType(_load_zero12_universal, optimizer)


def param_group_settings(optimizer) -> list[dict]:
    """Every param group's settings but its parameters and learning rate (the schedule's)."""
    return [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]


def restore_param_groups(optimizer, settings: list[dict]) -> None:
    """Put back what loading a universal checkpoint overwrote or shared (DeepSpeed 0.19.8):

    * its ZeRO-3 loader gives every group group 0's settings (weight decay, LAMB's parameter
      names), the ZeRO-1/2 loader the source's groups in order. The settings come from this
      launch's config, as a fresh run's would; the learning rate stays as loaded (the schedule's
      value at the resumed step);
    * its ZeRO-3 loader puts one ``step`` tensor into every group's state, which the optimizer
      increments in place: each group would count every group's steps (group 1 sees step 6 at
      step 5, and Adam's bias correction with it). Each state gets its own copy."""
    if len(settings) != len(optimizer.param_groups):
        raise ValueError(f"the optimizer has {len(optimizer.param_groups)} param groups after loading, "
                         f"{len(settings)} before")
    for group, kept in zip(optimizer.param_groups, settings):
        for k in [k for k in group if k not in kept and k not in ("params", "lr")]:
            del group[k]
        group.update(kept)
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def prepare(move: Move, run: Path, is_rank0: bool) -> None:
    """Make ``move.load_dir / tag`` hold the universal form (a collective: rank 0 converts unless a
    complete conversion is there, every rank learns whether it succeeded, so none waits forever on
    a rank that failed)."""
    from dist_sparse.distributed import comm

    out = move.load_dir / move.tag
    error = None
    if is_rank0:
        try:
            record = converted(out)
            if record is not None and record.get("layout") == asdict(move.source):
                log.info("resuming %s at another layout (%s): using its universal form in %s, converted before",
                         move.tag, move.describe(), out)
            else:
                log.info("resuming %s at another layout (%s): converting it to DeepSpeed's universal checkpoint "
                         "in %s", move.tag, move.describe(), out)
                record = convert(run / ckpt.CHECKPOINTS_DIR / move.tag, out)
                log.info("converted %s in %.1f s (masks: %s)", move.tag, record["seconds"],
                         "whole masks written beside it" if record["masks"] else "none, a dense run")
        except Exception as err:  # told to every rank below, raised here
            error = err
    failed = comm.broadcast_object(error is not None)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"rank 0 could not convert checkpoint {move.tag} for the resume at another layout; "
                           "its log says why")


def logical_sparsity(move: Move) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(rank 0's sparsifier state without masks, the whole masks) of a converted checkpoint; None
    for a dense one."""
    path = move.load_dir / move.tag / MASKS_FILE
    if not path.is_file():
        return None
    content = torch.load(path, weights_only=False)
    return content["state"], content["masks"]


__all__ = ["Layout", "MASKS_FILE", "Move", "RECORD_FILE", "UNIVERSAL_DIR", "check_batch", "convert", "converted",
           "launch_layout", "logical_sparsity", "param_group_settings", "plan", "prepare", "prepare_universal_load",
           "register_own_tp_splits", "restore_param_groups", "written_layout"]
