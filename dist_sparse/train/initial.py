"""The weights a fine-tuning run (or a teacher) starts from: a dist_sparse run or checkpoint, or a
Hugging Face BERT folder on disk, read into one whole fp32 state dict with our key names.

* A dist_sparse checkpoint (any ZeRO stage, any DP x TP layout, sparse or shrunk) is consolidated
  on one process by the export's machinery (:func:`dist_sparse.export.checkpoint.consolidate`);
  a checkpoint taken during a structured search has its slimming coefficients folded into the
  weights, which leaves the function unchanged.
* A Hugging Face folder: a stock BERT (``model_type: "bert"``: ``BertModel``, ``BertForMaskedLM``,
  ``BertForPreTraining``, ``BertForSequenceClassification`` ...) or our compact export
  (``"dist_sparse_bert"``: per-layer sizes). Our modules carry HF's names, so the keys map one to
  one; a bare ``BertModel`` folder lacks the ``bert.`` prefix, which is added.

Nothing is downloaded: a path that is not on disk is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_sparse.model.config import DistSparseBertConfig

HF_CONFIG = "config.json"
TASK_ARCHITECTURE = "DistSparseBertForSequenceClassification"
# Weights of BERT's pre-training heads: a fine-tuned classifier has no use for them.
PRETRAINING_HEAD_PREFIX = "cls."
CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")
POOLER_KEYS = ("bert.pooler.dense.weight", "bert.pooler.dense.bias")


@dataclass
class InitialWeights:
    config: DistSparseBertConfig        # as stored: per-layer sizes, and labels if fine-tuned
    state_dict: dict[str, torch.Tensor]  # whole fp32 tensors, our (= HF's) key names
    source: str                          # for logs and run.json
    tokenizer_dir: Path | None           # the tokenizer the weights were trained with, when known
    structured: object | None = None     # StructuredState of a shrunk model (its ticket), when recorded

    @property
    def has_classifier(self) -> bool:
        return all(k in self.state_dict for k in CLASSIFIER_KEYS)

    @property
    def labels(self) -> list[str] | None:
        """The classifier's label names in id order, when the weights carry a classifier whose
        labels were named (HF's defaults LABEL_0, LABEL_1 ... do not count as names)."""
        if not self.has_classifier:
            return None
        id2label = {int(k): v for k, v in (self.config.id2label or {}).items()}
        names = [id2label.get(i) for i in range(len(id2label))]
        if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
            return None
        return names


def load_initial(path: str | Path, tag: str | None = None) -> InitialWeights:
    """The weights at ``path``: a Hugging Face folder (it has a config.json), else a dist_sparse
    run, its checkpoints/ folder or one tag of it (``tag`` picks another than ``latest``)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist (a dist_sparse run or checkpoint, or a Hugging Face BERT folder "
                         "on disk; nothing is downloaded)")
    if (path / HF_CONFIG).is_file():
        if tag is not None:
            raise ValueError(f"{path} is a Hugging Face folder: it has no checkpoint tags (drop the tag)")
        return _from_hf_folder(path)
    return _from_checkpoint(path, tag)


# ---------------------------------------------------------------------------------------------


def _from_checkpoint(path: Path, tag: str | None) -> InitialWeights:
    from dist_sparse.export.checkpoint import TIED_KEYS, consolidate
    from dist_sparse.export.hf import recorded_tokenizer
    from dist_sparse.export.structured import fold
    from dist_sparse.train.checkpoint import locate, read_info

    tag_dir = locate(path, tag)
    info = read_info(tag_dir)
    config = DistSparseBertConfig.from_dict(info.model_config)
    weights = fold(consolidate(info, config), config)
    weights = {k: v for k, v in weights.items() if k not in TIED_KEYS}
    _, tokenizer = recorded_tokenizer(tag_dir)
    return InitialWeights(config, weights, f"dist_sparse checkpoint {tag_dir} (step {info.step})",
                          tokenizer if tokenizer is not None and (tokenizer / "tokenizer.json").is_file() else None,
                          info.structured if info.structured is not None and not info.structured.searching else None)


def _hf_config(path: Path) -> DistSparseBertConfig:
    try:
        raw = json.loads((path / HF_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path / HF_CONFIG} cannot be read: {err}") from None
    kind = raw.get("model_type")
    if kind == DistSparseBertConfig.model_type:
        return DistSparseBertConfig.from_pretrained(str(path))
    if kind != "bert":
        raise ValueError(f"{path} holds a {kind!r} model; fine-tuning starts from BERT (model_type \"bert\") or "
                         "a dist_sparse export")
    from transformers import BertConfig

    data = BertConfig.from_pretrained(str(path)).to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        data.pop(key, None)
    return DistSparseBertConfig(**data)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights: dict[str, torch.Tensor] = {}
        for name in files:
            weights.update(load_file(str(path / name)))
        return weights
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"{path} has a config.json but no weights (model.safetensors, a safetensors index or "
                     "pytorch_model.bin)")


def _our_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF BERT names as our modules use them: the ``bert.`` prefix of a bare ``BertModel`` added,
    the LayerNorm ``gamma``/``beta`` of old TF-converted files renamed."""
    bare = not any(k.startswith("bert.") for k in weights)
    out = {}
    for k, v in weights.items():
        if k.endswith(".gamma"):
            k = k[: -len("gamma")] + "weight"
        elif k.endswith(".beta"):
            k = k[: -len("beta")] + "bias"
        if bare and k.startswith(("embeddings.", "encoder.", "pooler.")):
            k = "bert." + k
        out[k] = v.float() if v.is_floating_point() else v
    return out


def _from_hf_folder(path: Path) -> InitialWeights:
    config = _hf_config(path)
    weights = _our_names(_read_weights(path))
    weights.pop("bert.embeddings.position_ids", None)  # a buffer older transformers saved
    tokenizer = path if (path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file() else None
    from dist_sparse.export.structured import shrunk_record_of_export
    from dist_sparse.train.checkpoint import StructuredState

    shrunk = shrunk_record_of_export(path, config)  # a compact export of a shrunk model: its ticket
    return InitialWeights(config, weights, f"Hugging Face folder {path.resolve()}", tokenizer,
                          None if shrunk is None else StructuredState.from_dict(shrunk, path / "sparsity.json"))


# ---------------------------------------------------------------------------------------------


def task_config(initial: InitialWeights, *, num_labels: int, labels: list[str],
                task_type: str) -> DistSparseBertConfig:
    """The initial model's config as a classifier of ``labels`` (regression: one output)."""
    data = initial.config.to_dict()
    for key in ("id2label", "label2id", "num_labels", "problem_type", "architectures"):
        data.pop(key, None)
    config = DistSparseBertConfig(**{k: v for k, v in data.items() if k not in ("model_type", "transformers_version")})
    config.num_labels = num_labels
    if labels:
        config.id2label = {i: name for i, name in enumerate(labels)}
        config.label2id = {name: i for i, name in enumerate(labels)}
    config.problem_type = "regression" if task_type == "regression" else "single_label_classification"
    config.architectures = [TASK_ARCHITECTURE]
    return config


def build_task_model(initial: InitialWeights, *, num_labels: int, labels: list[str], task_type: str,
                     require_classifier: bool = False):
    """A ``DistSparseBertForSequenceClassification`` with the initial weights, and what happened to
    the parts a pre-trained model may lack: {"pooler": "loaded" | "new", "classifier": ...}.

    The classifier is kept only when the initial weights were fine-tuned for the same labels
    (continuing a fine-tuned model; a teacher), else it starts new. ``require_classifier``: a
    teacher must have one for these labels, and a pooler.
    """
    from dist_sparse.model import DistSparseBertForSequenceClassification

    config = task_config(initial, num_labels=num_labels, labels=labels, task_type=task_type)
    weights = {k: v for k, v in initial.state_dict.items() if not k.startswith(PRETRAINING_HEAD_PREFIX)}
    why_not = _classifier_mismatch(initial, num_labels, labels)
    if why_not is not None:
        if require_classifier:
            raise ValueError(f"{initial.source} {why_not}")
        for k in CLASSIFIER_KEYS:
            weights.pop(k, None)
    model = DistSparseBertForSequenceClassification(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    new_parts = {"pooler": POOLER_KEYS, "classifier": CLASSIFIER_KEYS}
    fresh = {part for part, keys in new_parts.items() if any(k in missing for k in keys)}
    missing = [k for k in missing if not any(k in keys for keys in new_parts.values())]
    if missing or unexpected:
        raise ValueError(f"the weights of {initial.source} do not fit a BERT of its own config: missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}")
    if require_classifier and "pooler" in fresh:
        raise ValueError(f"{initial.source} has no pooler: it is not a fine-tuned sequence classifier")
    return model, {part: ("new" if part in fresh else "loaded") for part in new_parts}


def check_tokenizer_fits(what: str, initial: InitialWeights, vocab_size: int, tokenizer_dir: Path) -> None:
    """The weights must have been trained with the data's tokenizer (``tokenizer_dir``, of
    ``vocab_size`` pieces): the same vocabulary size always, and the same ids for the same text
    where the weights' own tokenizer is known (a dist_sparse run's, a folder's tokenizer.json)."""
    vocab = initial.config.vocab_size
    if vocab != vocab_size:
        raise ValueError(f"{what} {initial.source} has a vocabulary of {vocab}, the data's tokenizer "
                         f"{vocab_size}: prepare the data with the tokenizer the model was trained with "
                         "(--tokenizer of prepare-task / prepare-data)")
    if initial.tokenizer_dir is None or not (initial.tokenizer_dir / "tokenizer.json").is_file():
        return
    if not (tokenizer_dir / "tokenizer.json").is_file():
        return
    from dist_sparse.export.hf import tokenizer_difference

    diff = tokenizer_difference(initial.tokenizer_dir, tokenizer_dir)
    if diff:
        raise ValueError(f"{what} {initial.source} was trained with another tokenizer ({initial.tokenizer_dir}) "
                         f"than the data's ({tokenizer_dir}): their {', '.join(diff)} differ; prepare the data "
                         f"with --tokenizer {initial.tokenizer_dir}")


def build_pretraining_model(initial: InitialWeights):
    """A ``DistSparseBertForPreTraining`` with the initial weights, which must include the MLM head
    (a pre-trained teacher: a dist_sparse pre-training checkpoint, a HF BertForPreTraining or
    BertForMaskedLM folder). The NSP head and pooler may be missing (a masked-LM folder): the
    distillation reads the MLM logits only."""
    from dist_sparse.export.checkpoint import TIED_KEYS
    from dist_sparse.model import DistSparseBertForPreTraining

    if not any(k.startswith("cls.predictions.") for k in initial.state_dict):
        raise ValueError(f"{initial.source} has no masked-LM head: pre-training starts from (and distils from) a "
                         "pre-trained model only (BertForPreTraining / BertForMaskedLM, or a dist_sparse pre-training "
                         "run)")
    model = DistSparseBertForPreTraining(initial.config)
    missing, unexpected = model.load_state_dict(initial.state_dict, strict=False)
    optional = set(TIED_KEYS) | {"cls.seq_relationship.weight", "cls.seq_relationship.bias", *POOLER_KEYS}
    missing = [k for k in missing if k not in optional]
    unexpected = [k for k in unexpected if not k.startswith("classifier.")]
    if missing or unexpected:
        raise ValueError(f"the weights of {initial.source} do not fit a BERT of its own config: missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}")
    model.tie_weights()
    return model


def _classifier_mismatch(initial: InitialWeights, num_labels: int, labels: list[str]) -> str | None:
    """Why the initial classifier cannot serve these labels, or None when it can."""
    if not initial.has_classifier:
        return "has no classifier: it is not a fine-tuned sequence classifier"
    rows = initial.state_dict["classifier.weight"].shape[0]
    if rows != num_labels:
        return f"classifies into {rows} outputs, the task has {num_labels}"
    named = initial.labels
    if named is not None and labels and named != list(labels):
        return f"was fine-tuned for the labels {named}, the task's are {list(labels)}"
    return None


__all__ = ["InitialWeights", "build_pretraining_model", "build_task_model", "check_tokenizer_fits", "load_initial",
           "task_config"]
