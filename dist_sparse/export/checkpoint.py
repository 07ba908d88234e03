"""Read a dist_sparse checkpoint back as one whole fp32 state dict, on one process.

Locating: RUN, RUN/checkpoints or RUN/checkpoints/<tag>; ``tag`` picks another checkpoint than
the one ``latest`` names.

Consolidating without the training world size, through DeepSpeed's own tooling:

* ZeRO (stages 1-3) partitions the fp32 master weights over the data-parallel ranks;
  ``deepspeed.utils.zero_to_fp32`` puts them together. It reads every ``*_optim_states.pt`` of a
  directory and expects their number to equal the data-parallel size, so under tensor
  parallelism (one set of files per TP rank: ``..._mp_rank_XX_...``) it is pointed at one TP
  rank at a time, through a temporary directory of symbolic links to that rank's files.
* The TP shards are then merged with the layout DeepSpeed recorded (:mod:`.tp_merge`).

DeepSpeed's universal-checkpoint conversion (``ds_to_universal``) also handles AutoTP, but it
writes a second copy of the whole checkpoint (optimizer moments included) to disk, and it would
merge the slimming coefficients wrongly (AutoTP's metadata calls them replicated); the pieces
used here are the same DeepSpeed code paths without either cost.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_sparse.export.tp_merge import merge_tp_shards
from dist_sparse.structure import HEAD_COEF, NEURON_COEF, layer_key
from dist_sparse.train.run_dir import MODEL_STATES, OPTIM_STATES, checkpoint_tags, damaged

STRUCTURE_FILE = "structure.json"          # dist_sparse.train.loop.STRUCTURE_FILE
SPARSITY_FILE_PREFIX = "sparsity_rank"     # dist_sparse.train.loop.SPARSITY_FILE_PREFIX
LATEST_FILE = "latest"
TIED_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def _is_tag_dir(path: Path) -> bool:
    return any(MODEL_STATES.match(p.name) for p in path.iterdir()) if path.is_dir() else False


def _run_of(path: Path) -> Path | None:
    """The run directory ``path`` is, or whose checkpoints/ it is; None if it is neither."""
    if (path / "run.json").is_file() or (path / "checkpoints").is_dir():
        return path
    if path.name == "checkpoints" and (path.parent / "run.json").is_file():
        return path.parent
    return None


def no_checkpoint_yet(run: Path, ckpt_dir: Path) -> str:
    """The message for a run that has not written a checkpoint (or only unfinished ones)."""
    unfinished = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir()) if ckpt_dir.is_dir() else []
    partial = f"; {', '.join(unfinished)}: a save that did not finish" if unfinished else ""
    return (f"run {run} has no checkpoint yet (a run saves one every --save-interval steps and at its last "
            f"step{partial}); try again after its first save")


def locate(path: str | Path, tag: str | None = None) -> Path:
    """The checkpoint tag directory that ``path`` (and ``tag``) name, or a ValueError saying why not."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is a file, not a run directory or a checkpoint directory")
    if _is_tag_dir(path):
        if tag is not None and tag != path.name:
            raise ValueError(f"{path} is itself checkpoint {path.name!r}; --tag {tag} names another one: "
                             "pass the run directory with --tag, or the tag directory alone")
        return path
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    tags = checkpoint_tags(ckpt_dir)
    latest = ckpt_dir / LATEST_FILE
    if not tags and not latest.is_file():
        run = _run_of(path)
        if run is not None:
            raise ValueError(no_checkpoint_yet(run, ckpt_dir))
        siblings = checkpoint_tags(path.parent) if path.parent != path else []
        if siblings or (path.parent / LATEST_FILE).is_file():
            # A tag directory of a checkpoints/ folder, but without DeepSpeed's files: a save that
            # never finished (``latest`` would not name it) or a partial copy.
            raise ValueError(f"{path} holds no model states file: the checkpoint is incomplete "
                             f"(available in {path.parent}: {', '.join(siblings) or 'none'})")
        raise ValueError(f"{path} is not a checkpoint: expected a run directory (with checkpoints/), its "
                         "checkpoints/ directory (with 'latest'), or one checkpoint directory "
                         "(with mp_rank_00_model_states.pt or zero_pp_rank_0_mp_rank_00_model_states.pt)")
    available = ", ".join(tags) if tags else "none"
    if tag is not None:
        if not (ckpt_dir / tag).is_dir():
            raise ValueError(f"no checkpoint {tag!r} in {ckpt_dir} (available: {available})")
        if not _is_tag_dir(ckpt_dir / tag):
            raise ValueError(f"{ckpt_dir / tag} holds no model states file: the checkpoint is incomplete or "
                             f"not a DeepSpeed checkpoint (available: {available})")
        return ckpt_dir / tag
    if not latest.is_file():
        raise ValueError(f"{ckpt_dir} has no 'latest' file naming the last complete checkpoint; pick one with "
                         f"--tag (available: {available})")
    name = latest.read_text().strip()
    if not name:
        raise ValueError(f"{latest} is empty; pick a checkpoint with --tag (available: {available})")
    if not (ckpt_dir / name).is_dir():
        raise ValueError(f"{latest} names checkpoint {name!r}, which does not exist in {ckpt_dir}; pick one with "
                         f"--tag (available: {available})")
    if not _is_tag_dir(ckpt_dir / name):
        raise ValueError(f"{ckpt_dir / name} (named by {latest}) holds no model states file; pick another "
                         f"checkpoint with --tag (available: {available})")
    return ckpt_dir / name


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself, read from rank 0's model states and structure.json."""

    tag_dir: Path
    client_state: dict
    zero_stage: int
    dp_size: int
    tp_size: int
    model_config: dict
    structured: dict | None
    uc_info: dict | None = None
    files: dict[int, list[Path]] = field(default_factory=dict)   # TP rank -> its files

    @property
    def step(self) -> int:
        return int(self.client_state.get("progress", {}).get("step", 0))


def _rank0_model_states(tag_dir: Path) -> Path:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise ValueError(f"{tag_dir}: no model states file of rank 0 (mp_rank_00_model_states.pt or "
                     "zero_pp_rank_0_mp_rank_00_model_states.pt): the checkpoint is incomplete")


def _expected_files(stage: int, dp: int, tp: int, optim_prefix: str = "") -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for t in range(tp):
        names = [f"{optim_prefix}zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt" for d in range(dp)]
        if stage == 3:  # ZeRO-3 partitions the module states too: one file per rank
            names += [f"zero_pp_rank_{d}_mp_rank_{t:02d}_model_states.pt" for d in range(dp)]
        else:
            names.append(f"mp_rank_{t:02d}_model_states.pt")
        out[t] = names
    return out


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _check_whole(path: Path) -> None:
    """Refuse a shard file that torch.save did not finish (truncated by a full disk, a killed copy):
    named, with the checkpoint to export instead, before anything is loaded from it."""
    why = damaged(path)
    if why is None:
        return
    tag_dir = path.parent
    tags = checkpoint_tags(tag_dir.parent)
    earlier = tags[:tags.index(tag_dir.name)] if tag_dir.name in tags else []
    others = [t for t in tags if t != tag_dir.name]
    hint = (f"export an earlier checkpoint with --tag {earlier[-1]}" if earlier
            else f"export another checkpoint with --tag {others[0]}" if others
            else "the run has no other checkpoint to export")
    raise ValueError(f"{path} is damaged (not a complete torch file: {why}; truncated?); {hint}")


def read_info(tag_dir: Path) -> CheckpointInfo:
    """Client state, layout and file list of a checkpoint; every shard file must be present."""
    path = _rank0_model_states(tag_dir)
    _check_whole(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which one
        raise ValueError(f"cannot read {path}: {err}") from None
    if not isinstance(state, dict) or "module" not in state:
        raise ValueError(f"{path} is not a DeepSpeed model states file")
    if "model_config" not in state:
        raise ValueError(f"{tag_dir} is a DeepSpeed checkpoint but not one written by dist_sparse (no model_config "
                         "in its client state)")
    ds_config = state.get("ds_config") or {}
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    if stage not in (1, 2, 3):
        raise ValueError(f"{tag_dir} was trained without ZeRO (stage {stage}); export consolidates ZeRO stage 1-3 "
                         "checkpoints, whose optimizer files hold the fp32 master weights")
    tp = int(state.get("tp_size", state.get("mp_world_size", 1)))
    dp = int(state.get("dp_size", state.get("dp_world_size", 1)))
    if int(state.get("mp_world_size", tp)) != tp:
        raise ValueError(f"{path}: dist_sparse recorded tensor-parallel size {tp}, DeepSpeed {state['mp_world_size']}")

    bf16_optimizer = any(p.name.startswith("bf16_zero_pp_rank_") for p in tag_dir.iterdir())
    expected = _expected_files(stage, dp, tp, "bf16_" if bf16_optimizer else "")
    missing = [n for names in expected.values() for n in names if not (tag_dir / n).is_file()]
    if missing:
        total = sum(len(v) for v in expected.values())
        raise ValueError(f"checkpoint {tag_dir} is incomplete: {len(missing)} of the {total} shard files of a "
                         f"ZeRO-{stage} DP {dp} x TP {tp} checkpoint are missing ({', '.join(missing[:4])}"
                         f"{', ...' if len(missing) > 4 else ''}); was it copied whole? Another checkpoint can be "
                         "picked with --tag")
    for names in expected.values():
        for name in names:
            _check_whole(tag_dir / name)
    extra = sorted(p.name for p in tag_dir.iterdir()
                   if (MODEL_STATES.match(p.name) or OPTIM_STATES.match(p.name))
                   and p.name not in {n for names in expected.values() for n in names})
    if extra:
        raise ValueError(f"checkpoint {tag_dir} holds shard files a DP {dp} x TP {tp} run does not write "
                         f"({', '.join(extra[:4])}): files of another run were copied into it?")

    model_config, structured = state["model_config"], state.get("structured")
    structure_file = tag_dir / STRUCTURE_FILE
    if structure_file.is_file():
        # Written by rank 0 beside DeepSpeed's files; the same content as the client state.
        structure = json.loads(structure_file.read_text())
        model_config, structured = structure["model_config"], structure.get("structured")
    return CheckpointInfo(tag_dir=tag_dir, client_state=state, zero_stage=stage, dp_size=dp, tp_size=tp,
                          model_config=model_config, structured=structured,
                          uc_info=state.get("universal_checkpoint_info"),
                          files={t: [tag_dir / n for n in names] for t, names in expected.items()})


def _bf16_optimizer_view(src: Path, dst: Path) -> None:
    """A copy of a BF16_Optimizer optimizer file that ``zero_to_fp32`` reads as ZeRO-1.

    DeepSpeed's BF16_Optimizer (ZeRO-1 with bf16 weights and fp32 gradient accumulation) saves the
    fp32 master partitions under the keys ZeRO-1/2 use (``single_partition_of_fp32_groups``,
    ``group_paddings``, ``partition_count``), flattened and padded the same way, but without the
    ``zero_stage`` key, so zero_to_fp32 (deepspeed 0.19.8) refuses the file. The copy adds the key
    and leaves out the optimizer moments, which consolidation does not read.
    """
    state = torch.load(src, map_location="cpu", weights_only=False)
    inner = state["optimizer_state_dict"]
    if "single_partition_of_fp32_groups" not in inner:
        raise ValueError(f"{src} is not an optimizer file of DeepSpeed's BF16_Optimizer that export can read")
    inner.pop("base_optimizer_state", None)
    inner["zero_stage"] = 1
    torch.save(state, dst)


def _consolidate_rank(info: CheckpointInfo, tp_rank: int) -> dict[str, torch.Tensor]:
    """zero_to_fp32 over one TP rank's data-parallel partitions (a view of only its files)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory(prefix="dist_sparse_export_") as tmp:
        view = Path(tmp) / info.tag_dir.name
        view.mkdir()
        for f in info.files[tp_rank]:
            if f.name.startswith("bf16_"):
                _bf16_optimizer_view(f, view / f.name)
            else:
                (view / f.name).symlink_to(f.resolve())
        log = io.StringIO()  # zero_to_fp32 narrates every file it reads (and draws progress bars)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                weights = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=view.name)
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
            # One line: the captured narration is mostly zero_to_fp32's progress bars, which would
            # print after the error as if the export went on. Files are named where they really
            # are, not in the temporary view.
            why = _one_line(err).replace(str(view), str(info.tag_dir))
            raise ValueError(f"cannot consolidate the ZeRO partitions of tensor-parallel rank {tp_rank} of "
                             f"{info.tag_dir}: {why}") from None
    # Some entries come back as views with requires_grad set; plain tensors are what we merge.
    return {k: v.detach() for k, v in weights.items()}


def logical_shapes(model_config, with_coefficients: bool) -> dict[str, tuple[int, ...]]:
    """Shape of every state-dict entry of the whole (unsharded) model as trained.

    The model is built on the meta device (no memory). Coefficients: one per head and per FFN
    neuron of every layer, present while the structured search runs.
    """
    from dist_sparse.model import DistSparseBertForPreTraining

    with torch.device("meta"):
        model = DistSparseBertForPreTraining(model_config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if with_coefficients:
        for i in range(model_config.num_hidden_layers):
            shapes[layer_key(i, HEAD_COEF)] = (model_config.heads_of(i),)
            shapes[layer_key(i, NEURON_COEF)] = (model_config.intermediate_of(i),)
    return shapes


def consolidate(info: CheckpointInfo, model_config, provenance: dict | None = None) -> dict[str, torch.Tensor]:
    """The whole fp32 state dict of the model as trained (coefficients included while searching).

    ``provenance``, if given, is filled with how each tensor-parallel parameter was merged
    (see :func:`dist_sparse.export.tp_merge.merge_tp_shards`)."""
    # The tied aliases (MLM decoder = word embeddings, decoder bias = prediction bias) are not
    # parameters of their own; DeepSpeed records the aliasing on TP rank 0 only, so zero_to_fp32
    # adds them to rank 0's dict alone. The model re-ties them on load: drop them everywhere.
    shards = [{k: v for k, v in _consolidate_rank(info, t).items() if k not in TIED_KEYS}
              for t in range(info.tp_size)]
    searching = bool(info.structured) and info.structured.get("phase") == "search"
    shapes = {k: v for k, v in logical_shapes(model_config, with_coefficients=searching).items()
              if k not in TIED_KEYS}
    merged, how = merge_tp_shards(shards, shapes, info.uc_info)
    if provenance is not None:
        provenance.update(how)
    missing = [k for k in shapes if k not in merged]
    if missing:
        raise ValueError(f"{info.tag_dir}: the checkpoint lacks parameters its model config has: {missing[:5]}"
                         + (" (a structured search checkpoint without slimming coefficients?)" if searching else ""))
    return merged


__all__ = ["CheckpointInfo", "consolidate", "locate", "logical_shapes", "read_info"]
