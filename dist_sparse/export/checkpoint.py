"""Read a dist_sparse checkpoint back as one whole fp32 state dict, on one process.

Finding the checkpoint and reading what it says of itself (layout, client state, structure) is
the offline reader's (:mod:`dist_sparse.train.checkpoint`: ``locate``, ``read_info``); this
module consolidates the weights, without the training world size, through DeepSpeed's own tooling:

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
import tempfile
from pathlib import Path

import torch

from dist_sparse.export.tp_merge import merge_tp_shards
from dist_sparse.structure import HEAD_COEF, NEURON_COEF, layer_key
from dist_sparse.train.checkpoint import CheckpointInfo

TIED_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


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


def model_class(model_config):
    """The class a checkpoint's model was trained as: the sequence classifier of a fine-tuning run
    (its config names that architecture), else the pre-training model."""
    from dist_sparse.model import DistSparseBertForPreTraining, DistSparseBertForSequenceClassification

    if "DistSparseBertForSequenceClassification" in (getattr(model_config, "architectures", None) or []):
        return DistSparseBertForSequenceClassification
    return DistSparseBertForPreTraining


def logical_shapes(model_config, with_coefficients: bool) -> dict[str, tuple[int, ...]]:
    """Shape of every state-dict entry of the whole (unsharded) model as trained.

    The model is built on the meta device (no memory). Coefficients: one per head and per FFN
    neuron of every layer, present while the structured search runs.
    """
    with torch.device("meta"):
        model = model_class(model_config)(model_config)
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
    searching = info.structured is not None and info.structured.searching
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


__all__ = ["TIED_KEYS", "consolidate", "logical_shapes", "model_class"]
