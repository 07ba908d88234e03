"""Export a checkpoint to a Hugging Face folder, verified in a fresh process.

The model is what the run trained: the pre-training model (MLM + NSP heads) of a pre-training
run, the sequence classifier of a fine-tuning run (its config names that architecture, with the
labels; ``export.checkpoint.model_class``).

Formats:

* ``dense`` (default): a stock ``BertForPreTraining`` / ``BertForSequenceClassification`` folder
  that plain transformers loads with no missing or unexpected keys (a classifier's config has
  ``id2label``, ``label2id``, ``problem_type``). Pruned weights are exact zeros; heads and FFN
  neurons removed by structured pruning are zero rows/columns at their original positions, so the
  function is exactly the trained one.
* ``compact``: the trained per-layer head counts and FFN widths, physically smaller, with the
  model's configuration and modeling code written into the folder (standalone: it does not import
  dist_sparse); loaded with ``trust_remote_code=True``, through every Auto class of BERT's heads
  (pre-training, masked LM, sequence and token classification, question answering).

A DynaBERT run's checkpoint exports whole (a normal model), or with ``--width/--depth`` one
sub-network it trained, cut out as a standalone model (:mod:`.subnetwork`): dense when it has
every head and neuron (width 1.0: fewer layers only), else compact; verified against the whole
trained model with that sub-network's gates and active layers set.

Both carry the tokenizer (a fine-tuning run's: its task folder's ``tokenizer/``), a README model
card and ``sparsity.json`` (per-layer density, pattern, kept heads and FFN widths with their
original indices, and a classifier's labels).

Any ZeRO stage, any DP x TP layout, without the training world size (:mod:`.checkpoint`).
Every export loads the written folder in a fresh process with plain transformers, runs a
forward pass on sample text, compares with the trained model (the checkpoint's own model with
its slimming coefficients, if any, before any folding or padding) and fails above the
tolerance. The folder is written beside OUT_DIR and renamed onto it only once verified, so a
failure or an interruption leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dist_sparse import folders
from dist_sparse.export.checkpoint import TIED_KEYS, consolidate, model_class
from dist_sparse.export.structured import TrainedStructure, compact_state_dict, dense_state_dict
from dist_sparse.train.checkpoint import (CheckpointInfo, DamagedFile, checkpoint_tags, locate, read_info,
                                          sparsity_summary)

FORMATS = ("dense", "compact")
# Largest |logit difference| accepted between the exported and the trained model, absolute, fp32.
# Folding a coefficient rounds once per weight (~1e-7 relative); logits of these models are O(10).
TOLERANCE = 1e-4
SAMPLE_TEXT = ["The State of the Union is strong, and the people of this nation are at work.",
               "Congress shall have the power to lay and collect taxes."]
# What a masked-LM model has no place for when it loads a pre-training folder.
PRETRAINING_ONLY_KEYS = {"bert.pooler.dense.weight", "bert.pooler.dense.bias",
                         "cls.seq_relationship.weight", "cls.seq_relationship.bias"}


# ---------------------------------------------------------------------------------------------
# the tokenizer: the one the model was trained with, or refused

# The parts of tokenizer.json that decide which ids a text gets (not its padding or truncation
# settings, nor how a transformers version lays the file out), with what to call them.
TOKENIZER_ID_PARTS = {"model": "vocabulary (pieces, ids, scores)", "normalizer": "normalizer",
                      "pre_tokenizer": "pre-tokenizer", "post_processor": "[CLS]/[SEP] template",
                      "added_tokens": "special tokens"}


def recorded_tokenizer(tag_dir: Path) -> tuple[Path, Path | None]:
    """(run.json, the tokenizer the run trained with as run.json records it: DATA/tokenizer, where
    DATA is a pre-training run's prepared data or a fine-tuning run's task folder, both of which
    keep their tokenizer in ``tokenizer/``). The second is None when there is no run.json (a
    checkpoint copied out of its run)."""
    run_json = tag_dir.parent.parent / "run.json"
    if not run_json.is_file():
        return run_json, None
    try:
        return run_json, Path(json.loads(run_json.read_text())["data"]) / "tokenizer"
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{run_json} is damaged ({err!r}): pass --tokenizer DATA/tokenizer --force-tokenizer "
                         "with the tokenizer the run trained with") from None


def _has_tokenizer(path: Path | None) -> bool:
    return path is not None and (path / "tokenizer.json").is_file()


def tokenizer_dirs(tag_dir: Path, tokenizer: str | None, force: bool) -> tuple[Path, Path | None]:
    """(the tokenizer to write, the run's own tokenizer to check it against, or None when forced).

    Without --tokenizer: the run's own. With it: checked against the run's own, which must then be
    found, unless the user vouches for it with --force-tokenizer (then run.json is not read).
    """
    path = None if tokenizer is None else Path(tokenizer)
    if path is not None and not _has_tokenizer(path):
        raise ValueError(f"--tokenizer {path}: no tokenizer.json in it; pass the run's DATA/tokenizer (or a "
                         "previous export of the run)")
    if path is not None and force:
        return path, None
    run_json, recorded = recorded_tokenizer(tag_dir)
    where = (f"{recorded}, as {run_json} records it" if recorded is not None
             else f"no {run_json}: a checkpoint copied out of its run?")
    if path is None:
        if not _has_tokenizer(recorded):
            raise ValueError(f"cannot find the tokenizer the run trained with ({where}): pass --tokenizer DIR "
                             "--force-tokenizer with that tokenizer")
        return recorded, recorded
    if not _has_tokenizer(recorded):
        raise ValueError(f"--tokenizer {path} cannot be checked against the tokenizer the run trained with ({where}): "
                         "pass --force-tokenizer if it is that tokenizer")
    return path, recorded


def expected_special_ids(info: CheckpointInfo) -> dict[str, int]:
    """Special token -> id as the run's data recorded it (the fixed ids of prepare-data for
    checkpoints whose client state does not carry them)."""
    from dist_sparse.data.tokenizer import SPECIAL_IDS, SPECIAL_TOKENS

    recorded = (info.client_state.get("data_meta") or {}).get("special_ids")
    return dict(recorded) if recorded else {SPECIAL_TOKENS[role]: i for role, i in SPECIAL_IDS.items()}


def describe_tokenizer(tok) -> dict:
    """What decides whether a tokenizer fits a model: its size, the ids of the special tokens and
    the tokens in its special roles (what fill-mask and padding use). Plain data, so the verifying
    process can report the written tokenizer's in the same form."""
    from dist_sparse.data.tokenizer import SPECIAL_TOKENS

    return {"size": len(tok), "roles": {role: getattr(tok, f"{role}_token") for role in SPECIAL_TOKENS},
            "ids": {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS.values()}}


def tokenizer_mismatch(found: dict, vocab_size: int, special_ids: dict[str, int]) -> str | None:
    """Why a tokenizer (``describe_tokenizer``) does not fit the model, or None."""
    from dist_sparse.data.tokenizer import SPECIAL_TOKENS

    if found["size"] != vocab_size:
        return f"has {found['size']} tokens, the model's vocabulary has {vocab_size}"
    wrong_ids = [f"{t} is {found['ids'].get(t)}, not {i}" for t, i in special_ids.items() if found["ids"].get(t) != i]
    if wrong_ids:
        return f"gives the special tokens other ids than the model's ({', '.join(wrong_ids)})"
    wrong_roles = [f"{role} token is {found['roles'].get(role)!r}, not {token!r}"
                   for role, token in SPECIAL_TOKENS.items() if found["roles"].get(role) != token]
    if wrong_roles:
        return f"has other special tokens than the model's ({', '.join(wrong_roles)})"
    return None


def tokenizer_difference(a: Path, b: Path) -> list[str]:
    """The parts of tokenizer.json (TOKENIZER_ID_PARTS) in which two tokenizer folders differ."""
    ja, jb = (json.loads((d / "tokenizer.json").read_text()) for d in (a, b))
    return [name for part, name in TOKENIZER_ID_PARTS.items() if ja.get(part) != jb.get(part)]


def check_tokenizer(tok_dir: Path, run_tok_dir: Path | None, info: CheckpointInfo, vocab_size: int,
                    given: bool = True) -> None:
    """Refuse a tokenizer that would give the exported model other ids than it was trained on: one
    of another size or other special ids (always), or other than the run's own (``run_tok_dir``;
    None when the user forced the tokenizer). ``given``: ``tok_dir`` came from --tokenizer (not
    from run.json), for the message."""
    from transformers import AutoTokenizer

    why = tokenizer_mismatch(describe_tokenizer(AutoTokenizer.from_pretrained(tok_dir)), vocab_size,
                             expected_special_ids(info))
    if why and given:
        raise ValueError(f"--tokenizer {tok_dir} {why}: it is not the tokenizer this model was trained with")
    if why:
        raise ValueError(f"the run's tokenizer {tok_dir} {why}: was the data prepared again since the run started? "
                         "Pass --tokenizer DIR --force-tokenizer with the tokenizer the run trained with")
    if run_tok_dir is None or run_tok_dir.resolve() == tok_dir.resolve():
        return
    differ = tokenizer_difference(tok_dir, run_tok_dir)
    if differ:
        raise ValueError(f"--tokenizer {tok_dir} differs from the tokenizer the run trained with ({run_tok_dir}) in "
                         f"its {', '.join(differ)}, although size and special ids match: the same text would get "
                         "other ids; pass that tokenizer, or --force-tokenizer if this one is meant")


# ---------------------------------------------------------------------------------------------
# OUT_DIR: new, empty, or a previous export (--overwrite)


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """OUT_DIR is new, empty, or (with --overwrite) a previous export that holds nothing else.

    --overwrite means "replace what export wrote there before", never "delete whatever is there":
    the same rule as prepare-data's --overwrite (see dist_sparse.folders). Called again just before
    the new folder is put in place, as OUT_DIR may have changed during a long export.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory; pick another OUT_DIR")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    record = folders.export_record(out_dir)
    if record is None:
        raise ValueError(f"{out_dir} exists and is {folders.describe(out_dir)}; pick another OUT_DIR (--overwrite "
                         "replaces only a previous export)")
    if not overwrite:
        raise ValueError(f"{out_dir} holds a previous export; pass --overwrite to replace it")
    extra = folders.unlisted(out_dir, record.get("files"))
    if extra:
        raise ValueError(f"{out_dir} is a previous export, but holds files the export did not write "
                         f"({', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''}) that --overwrite would delete; "
                         "move them out of it or pick another OUT_DIR")


def _check_not_inside(out_dir: Path, protected: dict[str, Path]) -> None:
    """--overwrite replaces OUT_DIR whole: never let that delete the checkpoint or the tokenizer."""
    out = out_dir.resolve()
    for what, path in protected.items():
        p = path.resolve()
        if p == out or out in p.parents:
            raise ValueError(f"OUT_DIR {out_dir} contains the {what} ({path}); replacing it would delete that: "
                             "pick another OUT_DIR")
        if p in out.parents:
            raise ValueError(f"OUT_DIR {out_dir} is inside the {what} ({path}); pick a folder outside it")


# What a checkpoint's model is, as the export and its verification treat it.
PRETRAINING, SEQUENCE_CLASSIFICATION = "pretraining", "sequence_classification"
# The stock transformers class of a dense export, and ours (in the folder's code) of a compact one.
EXPORT_CLASSES = {PRETRAINING: {"dense": "BertForPreTraining", "compact": "DistSparseBertForPreTraining"},
                  SEQUENCE_CLASSIFICATION: {"dense": "BertForSequenceClassification",
                                            "compact": "DistSparseBertForSequenceClassification"}}


def model_kind(config) -> str:
    """PRETRAINING or SEQUENCE_CLASSIFICATION: the class the checkpoint's model was trained as."""
    from dist_sparse.model import DistSparseBertForSequenceClassification

    return SEQUENCE_CLASSIFICATION if model_class(config) is DistSparseBertForSequenceClassification else PRETRAINING


def label_record(config) -> dict:
    """A classifier's labels as its config holds them, in plain JSON form: what sparsity.json and
    the model card say and what the verification expects the written config to hold. Regression
    (one output) has no label names."""
    id2label = {int(k): v for k, v in (config.id2label or {}).items()}
    problem = getattr(config, "problem_type", None)
    return {"num_labels": config.num_labels, "problem_type": problem,
            "id2label": {str(i): id2label[i] for i in sorted(id2label)},
            "label2id": {k: int(v) for k, v in (config.label2id or {}).items()},
            "labels": None if problem == "regression" else [id2label.get(i) for i in range(config.num_labels)]}


def trained_model(weights: dict[str, torch.Tensor], config):
    """The model exactly as trained: our BERT (pre-training model or sequence classifier) at the
    trained sizes, with the slimming coefficients as parameters when the checkpoint has them (so
    the reference involves no folding or padding)."""
    from torch import nn

    from dist_sparse.structure import HEAD_COEF, NEURON_COEF, layer_key

    model = model_class(config)(config)
    for i, layer in enumerate(model.bert.encoder.layer):
        for module, suffix in ((layer.attention.self, HEAD_COEF), (layer.intermediate, NEURON_COEF)):
            key = layer_key(i, suffix)
            if key in weights:
                module.slimming_coef = nn.Parameter(torch.empty_like(weights[key]))
    _load_exactly(model, weights)
    return model.eval()


def _load_exactly(model, weights: dict) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in TIED_KEYS]
    if missing or unexpected:
        raise ValueError(f"the weights do not fit {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()


def _export_model(weights: dict, structure: TrainedStructure, fmt: str, subnetwork=None):
    """The model object to save_pretrained, and the config it was built with: the stock class of
    the trained model's kind (dense), or ours at the trained sizes (compact); of the DynaBERT
    ``subnetwork`` (an ``export.subnetwork.Subnetwork``) cut out of the weights when given."""
    if subnetwork is not None:
        sd, cfg = subnetwork.cut(weights)
    else:
        sd, cfg = (dense_state_dict if fmt == "dense" else compact_state_dict)(weights, structure)
    if fmt == "dense":
        import transformers

        # the kind from the trained config: the dense config has no architectures any more
        cls = getattr(transformers, EXPORT_CLASSES[model_kind(structure.config)]["dense"])
        model = cls(cfg.to_hf_bert_config())
    else:
        model = model_class(cfg)(cfg)
    _load_exactly(model, sd)
    return model.eval(), cfg


# ---------------------------------------------------------------------------------------------
# sparsity.json and the model card


def sparsity_report(info: CheckpointInfo, structure: TrainedStructure, masks: dict, exported, fmt: str) -> dict:
    """Everything sparsity.json says: per layer the kept heads / FFN neurons (original indices)
    and the density of the sparse weights, per weight the trained masks' counts, and what the
    exported tensors actually hold."""
    cfg = structure.config
    try:
        kept = structure.kept_units()
    except ValueError:
        kept = None
    layers = {}
    for i in range(cfg.num_hidden_layers):
        entry = {"heads": cfg.heads_of(i), "num_attention_heads": cfg.num_attention_heads,
                 "ffn": cfg.intermediate_of(i), "intermediate_size": cfg.intermediate_size,
                 "kept_heads": None if kept is None else kept[i]["heads"],
                 "kept_ffn_neurons": None if kept is None else kept[i]["neurons"]}
        if masks:
            mine = [e for n, e in masks["layers"].items() if n.startswith(f"bert.encoder.layer.{i}.")]
            total = sum(e["full_shape"][0] * e["full_shape"][1] for e in mine)
            active = sum(e["active"] for e in mine)
            entry["density"] = active / total if total else None
        layers[f"layer.{i}"] = entry
    kind = model_kind(cfg)
    out = {"format": fmt,
           "checkpoint": {"tag": info.tag_dir.name, "step": info.step, "zero_stage": info.zero_stage,
                          "dp_size": info.dp_size, "tp_size": info.tp_size},
           "model": {"kind": kind, "architecture": EXPORT_CLASSES[kind][fmt]},
           "layers": layers, "structured": None, "method": None}
    if kind == SEQUENCE_CLASSIFICATION:
        out["labels"] = label_record(cfg)
    s = info.structured
    if s is not None:
        out["structured"] = {"method": s.method, "phase": s.phase, "ticket_step": s.ticket_step, "forced": s.forced,
                             "config": s.config}
    if masks:
        c = masks["config"]
        out.update(method=c["method"], sparsity=c["sparsity"], pattern=c["pattern"], distribution=c["distribution"])
        if c["pattern"] == "block":
            out["block_size"] = c.get("block_size")
        if c["pattern"] == "nm":
            out["n"], out["m"] = c.get("n"), c.get("m")
        out["weights"] = {n: {"shape": list(e["full_shape"]), "active": e["active"],
                              "density": e["active"] / (e["full_shape"][0] * e["full_shape"][1])}
                          for n, e in sorted(masks["layers"].items())}
    # What the exported file holds, measured on it: a dense export of a shrunk model has the
    # removed units as extra zeros, so its densities are lower than the trained masks'.
    params = dict(exported.named_parameters())
    out["exported_nonzero"] = {
        n: {"shape": list(p.shape), "nonzero": int((p != 0).sum()), "density": float((p != 0).float().mean())}
        for n, p in sorted(params.items()) if n.startswith("bert.encoder.layer.") and p.dim() == 2}
    return out


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _task_lines(info: CheckpointInfo, report: dict) -> list[str]:
    """What a fine-tuned classifier's card says of its task: labels, inputs, the validation result
    of the exported step when the run recorded one."""
    meta = info.client_state.get("data_meta", {})
    labels = report["labels"]
    if labels["problem_type"] == "regression":
        what = "a regression head (one output, mean squared error)"
    else:
        names = ", ".join(f"{i} = `{name}`" for i, name in enumerate(labels["labels"]))
        what = f"a classifier into {labels['num_labels']} labels ({names}; `id2label` in config.json)"
    columns = meta.get("text_columns") or []
    inputs = "sentence pairs" if len(columns) > 1 else "single texts"
    lines = [f"A BERT sequence classifier: {what}, fine-tuned from `{info.client_state.get('model', '?')}` on "
             f"{inputs} (column{'s' if len(columns) > 1 else ''} {', '.join(f'`{c}`' for c in columns) or '?'}, label "
             f"column `{meta.get('label_column', '?')}`; data: {meta.get('source', '?')}).", ""]
    results = info.tag_dir.parent.parent / "eval_results.json"
    with contextlib.suppress(OSError, ValueError, TypeError):
        got = json.loads(results.read_text())
        sub = report.get("dynabert")
        if sub and (sub["width"], sub["depth"]) != (1.0, 1.0):
            # a DynaBERT run evaluates each sub-network too; the full model's results are top level
            got = {**(got.get("subnetworks") or {}).get(sub["name"], {}), "step": got.get("step")}
        if got.get("step") == info.step:
            shown = {k: v for k, v in got.items() if isinstance(v, float) and not k.startswith("teacher")}
            if shown:
                lines += ["Validation at this step" + (f" (sub-network {sub['name']})" if sub else "") + ": "
                          + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()) + ".", ""]
    return lines


def model_card(info: CheckpointInfo, report: dict, fmt: str, trained_params: int, exported_params: int,
               max_diff: float, tolerance: float) -> str:
    state = info.client_state
    cfg = info.model_config
    meta = state.get("data_meta", {})
    classifier = report["model"]["kind"] == SEQUENCE_CLASSIFICATION
    title = ("BERT sequence classifier fine-tuned with dist_sparse" if classifier
             else f"{state.get('model', 'BERT')} pre-trained with dist_sparse")
    if report.get("dynabert"):
        title += f", DynaBERT sub-network {report['dynabert']['name']}"
    lines = [f"# {title}", "",
             f"Exported ({fmt}) from DeepSpeed checkpoint `{info.tag_dir.name}` at step {info.step} of "
             f"{state.get('max_steps', '?')}: ZeRO-{info.zero_stage}, data-parallel {info.dp_size} x tensor-parallel "
             f"{info.tp_size}, sequence length {meta.get('seq_len', '?')}, vocabulary {cfg.get('vocab_size')}"
             + (f" (sentencepiece {meta.get('tokenizer_type', '')})." if not classifier else "."), ""]
    if classifier:
        lines += _task_lines(info, report)
    if report.get("dynabert"):
        from dist_sparse.export.subnetwork import card_lines

        lines += card_lines(report["dynabert"])
    if report.get("method"):
        weights = report["weights"]
        total = sum(w["shape"][0] * w["shape"][1] for w in weights.values())
        active = sum(w["active"] for w in weights.values())
        whole = ", in the full trained model" if report.get("dynabert") else ""  # the masks are the whole model's
        lines += [f"Sparse training: method {report['method']}, target sparsity {report['sparsity']}, pattern "
                  f"{report['pattern']}, distribution {report['distribution']}. The sparse weights hold {active} "
                  f"non-zeros of {total} (density {active / total:.4f}{whole}); pruned weights are stored as exact "
                  "zeros. Per-layer and per-weight figures are in sparsity.json.", ""]
    else:
        lines += ["No unstructured sparsity (dense weights).", ""]
    s = report.get("structured")
    if s and s["phase"] == "shrunk":
        how = "forced at the end of the search" if s.get("forced") else "early-bird criterion met"
        where = "of the pre-training this model was fine-tuned from " if classifier else ""
        lines += [f"Structured pruning ({s['method']}): the ticket was drawn at step {s.get('ticket_step')} {where}"
                  f"({how}) and the model physically shrunk; training continued on the smaller model. Parameters: "
                  f"{trained_params:,} trained" + (f", {exported_params:,} in this dense export (removed heads and "
                                                   "FFN neurons stored as zero rows/columns)" if fmt == "dense"
                                                   else " (this compact export has the same)") + ".", "",
                  "| layer | heads kept (original indices) | FFN width kept |", "|---|---|---|"]
        for name, e in report["layers"].items():
            heads = ", ".join(map(str, e["kept_heads"])) if e["kept_heads"] is not None else "?"
            lines.append(f"| {name} | {e['heads']} of {e['num_attention_heads']} ({heads}) | "
                         f"{e['ffn']} of {e['intermediate_size']} |")
        lines += ["", "The kept FFN neuron indices are in sparsity.json.", ""]
    elif s:
        lines += [f"Structured pruning ({s['method']}) was still searching at this step: the slimming coefficients "
                  "are folded into the weights (same function) and no head or neuron is removed yet.", ""]
    if classifier:
        remote = ", trust_remote_code=True" if fmt == "compact" else ""
        lines += [("Format: dense-equivalent, a stock `BertForSequenceClassification` folder. Load with plain "
                   "transformers:" if fmt == "dense" else
                   "Format: compact, per-layer head counts and FFN widths physically smaller. The folder carries its "
                   "configuration and modeling code (standalone, torch + transformers only); it loads into "
                   "`AutoModelForSequenceClassification` (this classifier), and for further fine-tuning into "
                   "`AutoModelForTokenClassification` and `AutoModelForQuestionAnswering` (new heads):"), "",
                  "```python", "from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline",
                  f"model = AutoModelForSequenceClassification.from_pretrained(PATH{remote})",
                  "tokenizer = AutoTokenizer.from_pretrained(PATH)",
                  f"classify = pipeline(\"text-classification\", model=PATH{remote})", "```", ""]
    elif fmt == "dense":
        lines += ["Format: dense-equivalent, a stock `BertForPreTraining` folder. Load with plain transformers:", "",
                  "```python", "from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline",
                  "model = AutoModelForMaskedLM.from_pretrained(PATH)",
                  "tokenizer = AutoTokenizer.from_pretrained(PATH)",
                  "fill = pipeline(\"fill-mask\", model=PATH)", "```", ""]
    else:
        lines += ["Format: compact, per-layer head counts and FFN widths physically smaller. The folder carries its "
                  "configuration and modeling code (standalone, torch + transformers only):", "",
                  "```python", "from transformers import AutoModelForMaskedLM, AutoModelForPreTraining, AutoTokenizer",
                  "model = AutoModelForMaskedLM.from_pretrained(PATH, trust_remote_code=True)",
                  "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```", ""]
    gated = f" computing sub-network {report['dynabert']['name']} (gates set)" if report.get("dynabert") else ""
    lines += [f"Verified on export: reloaded in a fresh process with plain transformers, the logits differ from the "
              f"trained model's{gated} by at most {max_diff:.3g} (tolerance {tolerance:g}).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# verification in a fresh process

# Text the written tokenizer and model are checked on, as the model saw text in training: single
# segments (MLM) and sentence pairs ([SEP] between, token type 1 for the second: NSP), with
# digits, punctuation, accents and runs of spaces for the normaliser.
SAMPLES = {
    "single": SAMPLE_TEXT + ["In 1946 the  budget grew by 3.5% -- a naïve estimate, said the café owners."],
    "pair": [["The State of the Union is strong.", "The people of this nation are at work."],
             ["Congress shall have the power to lay and collect taxes.", "We will pay the common defence."]],
}

VERIFY_SCRIPT = r"""
import json, sys, torch
from transformers import (AutoModelForMaskedLM, AutoModelForPreTraining, AutoModelForSequenceClassification,
                          AutoTokenizer, BertForPreTraining)
folder, out, fmt, model_kind = sys.argv[1], sys.argv[4], sys.argv[5], sys.argv[6]
samples, special = json.loads(sys.argv[2]), json.loads(sys.argv[3])
remote = fmt == "compact"
info_of = lambda info: {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs"}
tok = AutoTokenizer.from_pretrained(folder)
if model_kind == "sequence_classification":  # the classifier, as a user loads it
    clf, clf_info = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=remote,
                                                                       output_loading_info=True)
    models = {"classifier": clf.eval()}
    c = clf.config
    result = {"infos": {"classifier": info_of(clf_info)}, "classes": [type(clf).__name__],
              "labels": {"num_labels": c.num_labels, "problem_type": c.problem_type,
                         "id2label": {str(k): v for k, v in c.id2label.items()},
                         "label2id": {k: int(v) for k, v in c.label2id.items()}}}
else:
    if remote:
        pre, pre_info = AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    else:
        pre, pre_info = BertForPreTraining.from_pretrained(folder, output_loading_info=True)
    mlm, mlm_info = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=remote, output_loading_info=True)
    models = {"pretraining": pre.eval(), "masked_lm": mlm.eval()}
    result = {"infos": {"pretraining": info_of(pre_info), "masked_lm": info_of(mlm_info)},
              "classes": [type(pre).__name__, type(mlm).__name__]}
result["tokenizer"] = {"size": len(tok), "roles": {role: getattr(tok, role + "_token") for role in special},
                       "ids": {t: tok.convert_tokens_to_ids(t) for t in special.values()}}
for kind, texts in samples.items():
    batch = tok(*zip(*texts), padding=True, truncation=True, return_tensors="pt") if kind == "pair" else \
        tok(texts, padding=True, truncation=True, return_tensors="pt")
    got = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
           "token_type_ids": batch.get("token_type_ids")}
    with torch.no_grad():
        for name, model in models.items():
            o = model(**batch)
            if name == "pretraining":
                got.update(pretraining=o.prediction_logits, nsp=o.seq_relationship_logits)
            else:
                got[name] = o.logits
    result[kind] = got
result["dist_sparse_modules"] = sorted(n for n in sys.modules if n.split(".")[0] == "dist_sparse")
torch.save(result, out)
"""


def _tokenize(tok, kind: str, texts: list):
    """A batch of SAMPLES[kind] as the verifying process makes it (cut at the tokenizer's maximum
    length, the sequence length the model was trained at)."""
    if kind == "pair":
        return tok([a for a, _ in texts], [b for _, b in texts], padding=True, truncation=True, return_tensors="pt")
    return tok(texts, padding=True, truncation=True, return_tensors="pt")


def _rows(batch, key: str) -> list:
    """Each text's ``key`` (ids or token types) without its padding, as a list (None if absent)."""
    mask, values = batch["attention_mask"].bool(), batch.get(key)
    return [None if values is None else values[i][mask[i]].tolist() for i in range(mask.shape[0])]


def tokenization_difference(got, want, texts: list) -> str | None:
    """Where the written tokenizer's batch (``got``) differs from the reference tokenizer's
    (``want``): what differs for which text; None if nothing does. Compared text by text without
    padding, so a different padding side or length is no difference."""
    for key in ("input_ids", "token_type_ids"):
        for text, mine, theirs in zip(texts, _rows(got, key), _rows(want, key)):
            if mine != theirs:
                return f"other {key} for {text!r}"
    return None


def verify_folder(folder: Path, reference, fmt: str = "dense", tokenizer_dir: Path | None = None,
                  special_ids: dict[str, int] | None = None, kind: str = PRETRAINING) -> float:
    """Load ``folder`` with plain transformers in a fresh process, tokenize SAMPLES with its
    tokenizer and run them through its models; the largest |logit difference| to ``reference``
    fed the same text tokenized by ``tokenizer_dir`` (the tokenizer the model was trained with; the
    written one's own ids when None). ``kind`` PRETRAINING: the MLM logits of the pre-training and
    the masked-LM model and the NSP logits; SEQUENCE_CLASSIFICATION: the classifier's logits of
    ``AutoModelForSequenceClassification``, whose config must carry the reference's labels.

    Raises ValueError when the folder does not load, loads with missing/unexpected keys or as
    another class than the export's, imports dist_sparse (compact), or its tokenizer does not fit
    the model (size, ``special_ids``) or tokenizes the samples differently from ``tokenizer_dir``.
    """
    from dist_sparse.data.tokenizer import SPECIAL_IDS, SPECIAL_TOKENS

    special_ids = special_ids or {SPECIAL_TOKENS[role]: i for role, i in SPECIAL_IDS.items()}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.pt"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
        # Offline: the folder must load from itself; a remote-code cache in a temporary HF_HOME so
        # the check is not served by modules another export left behind.
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(Path(tmp) / "modules"))
        proc = subprocess.run([sys.executable, "-c", VERIFY_SCRIPT, str(folder), json.dumps(SAMPLES),
                               json.dumps(SPECIAL_TOKENS), str(out), fmt, kind], capture_output=True, text=True,
                              env=env)
        if proc.returncode != 0:
            raise ValueError(f"the exported folder does not load with plain transformers:\n{proc.stderr[-3000:]}")
        got = torch.load(out, weights_only=False)
    for name, info in got["infos"].items():
        # a stock masked-LM model has no place for the pooler / NSP head of a pre-training folder
        ignorable = PRETRAINING_ONLY_KEYS if name == "masked_lm" else set()
        if info["missing_keys"] or set(info["unexpected_keys"]) - ignorable or info.get("mismatched_keys"):
            raise ValueError(f"transformers loads the {name.replace('_', '-')} model with missing keys "
                             f"{info['missing_keys']}, unexpected {info['unexpected_keys']}, mismatched "
                             f"{info.get('mismatched_keys')}")
    if kind == SEQUENCE_CLASSIFICATION:
        want_class = EXPORT_CLASSES[kind][fmt]
        if got["classes"] != [want_class]:
            raise ValueError(f"AutoModelForSequenceClassification loads the exported folder as {got['classes'][0]}, "
                             f"not {want_class}")
        want_labels = {k: v for k, v in label_record(reference.config).items() if k != "labels"}
        if got["labels"] != want_labels:
            raise ValueError(f"the exported config's labels {got['labels']} are not the trained model's {want_labels}")
    if got["dist_sparse_modules"]:
        raise ValueError(f"loading the exported folder imported {got['dist_sparse_modules'][:3]}: it is not standalone")
    why = tokenizer_mismatch(got["tokenizer"], reference.config.vocab_size, special_ids)
    if why:
        raise ValueError(f"the exported tokenizer {why}")
    ref_tok = None
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        ref_tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    diffs = []
    for sample, texts in SAMPLES.items():
        mine = got[sample]
        want = _tokenize(ref_tok, sample, texts) if ref_tok is not None else mine
        differ = tokenization_difference(mine, want, texts)
        if differ:
            raise ValueError(f"the exported tokenizer gives {differ} than the tokenizer the model was trained with "
                             f"({tokenizer_dir})")
        with torch.no_grad():  # the trained model on the text as its own tokenizer gives it
            ref = reference(input_ids=want["input_ids"], attention_mask=want["attention_mask"],
                            token_type_ids=want.get("token_type_ids"))
        if kind == SEQUENCE_CLASSIFICATION:  # one row of logits per text, in order
            diffs.append((mine["classifier"] - ref.logits).abs().max().item())
            continue
        # the real tokens of each text, in order (the same ids on both sides, as just checked)
        ours, theirs = mine["attention_mask"].bool(), want["attention_mask"].bool()
        expected = ref.prediction_logits[theirs]
        diffs += [(mine["pretraining"][ours] - expected).abs().max().item(),
                  (mine["masked_lm"][ours] - expected).abs().max().item(),
                  (mine["nsp"] - ref.seq_relationship_logits).abs().max().item()]
    return max(diffs)


# ---------------------------------------------------------------------------------------------


def _umask_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder and safetensors writes 0600 files; an exported model is meant to
    be shared, so give it the permissions a plain mkdir/open would (the user's umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _another_checkpoint(tag_dir: Path) -> str:
    """What to export instead of a checkpoint with a damaged file: the one before it, else any other."""
    tags = checkpoint_tags(tag_dir.parent)
    earlier = tags[:tags.index(tag_dir.name)] if tag_dir.name in tags else []
    others = [t for t in tags if t != tag_dir.name]
    return (f"export an earlier checkpoint with --tag {earlier[-1]}" if earlier
            else f"export another checkpoint with --tag {others[0]}" if others
            else "the run has no other checkpoint to export")


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p ``folder``; the folders it created, innermost first (to remove them on failure)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders_: list[Path]) -> None:
    for f in folders_:
        with contextlib.suppress(OSError):  # not empty (something else was put there): keep it
            f.rmdir()


def _nearest_existing(path: Path) -> Path:
    return next((p for p in (path, *path.parents) if p.exists()), path)


@contextlib.contextmanager
def _writing_into(out_dir: Path):
    """Writes below OUT_DIR's parent: an OSError (permissions, a read-only or full file system)
    becomes one line naming the folder, not a traceback."""
    try:
        yield
    except OSError as err:
        if err.filename is not None and Path(err.filename).absolute() == out_dir.absolute():
            # the previous export cannot be moved aside (--overwrite of a read-only folder)
            raise ValueError(f"cannot replace {out_dir}: {err.strerror or err}; make it writable or pick "
                             "another OUT_DIR") from None
        raise ValueError(f"cannot write into {_nearest_existing(out_dir.absolute().parent)}: "
                         f"{err.strerror or err}; pick an OUT_DIR in a folder you can write to") from None


def export(checkpoint: str | Path, out_dir: str | Path, fmt: str | None = None, overwrite: bool = False,
           tokenizer: str | None = None, tolerance: float = TOLERANCE, tag: str | None = None,
           force_tokenizer: bool = False, width: float | None = None, depth: float | None = None) -> dict:
    """Export one checkpoint; see the module docstring. Returns a summary (paths, max_diff).

    ``width`` / ``depth`` (a DynaBERT run's checkpoint; either one alone: the other is 1.0): only
    that sub-network, as a standalone model (:mod:`.subnetwork`). ``fmt`` None: dense, except for a
    sub-network of width < 1, which only compact can hold.

    Every refusal of the input (OUT_DIR, the checkpoint and its files, the sub-network, the
    tokenizer, a parent folder that cannot be written) comes before the consolidation, which is
    the slow part."""
    from transformers import AutoTokenizer

    from dist_sparse.export import subnetwork as sn
    from dist_sparse.model import DistSparseBertConfig

    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    sn.check_format(width, fmt)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    tag_dir = locate(checkpoint, tag)
    _check_not_inside(out_dir, {"checkpoint": tag_dir})
    try:
        info = read_info(tag_dir)
        masks = sparsity_summary(tag_dir)
    except DamagedFile as err:
        raise ValueError(f"{err}; {_another_checkpoint(err.path.parent)}") from None
    config = DistSparseBertConfig.from_dict(info.model_config)
    sub = None if width is None and depth is None else sn.select(tag_dir, config, width, depth)
    if fmt is None:
        fmt = "compact" if sub is not None and sub.width < 1 else "dense"
    tok_dir, run_tok_dir = tokenizer_dirs(tag_dir, tokenizer, force_tokenizer)
    _check_not_inside(out_dir, {"tokenizer": tok_dir})
    check_tokenizer(tok_dir, run_tok_dir, info, config.vocab_size, given=tokenizer is not None)
    # export.structured reads the state as stored (its tests build it from plain dicts)
    structure = TrainedStructure(config, None if info.structured is None else info.structured.to_dict())
    if fmt == "dense":
        structure.kept_units()  # a shrunk model without a usable ticket: refuse before the heavy part

    # The folder is made now, before the heavy part: this is the real test that OUT_DIR's parent
    # can be written (permission bits say nothing for root, nor on a read-only mount).
    created: list[Path] = []
    tmp = None
    try:
        with _writing_into(out_dir):
            created = _make_parents(out_dir.parent)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        weights = consolidate(info, config)
        reference = trained_model(weights, config)
        model, out_cfg = _export_model(weights, structure, fmt, sub)
        report = sparsity_report(info, structure, masks, model, fmt)
        if sub is not None:
            # the reference: the whole trained model computing the sub-network, as training ran it
            sub.gate(reference)
            _subnetwork_report(report, sub, sn.read_record(tag_dir))
        with _writing_into(out_dir):
            if fmt == "compact":
                from dist_sparse.export.remote_code import save_compact

                save_compact(model, tmp)
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            AutoTokenizer.from_pretrained(tok_dir).save_pretrained(tmp)
            (tmp / "sparsity.json").write_text(json.dumps(report, indent=2) + "\n")
        # The written tokenizer must give the ids of the one the model was trained with: the run's
        # own, or the one the user vouched for with --force-tokenizer.
        max_diff = verify_folder(tmp, reference, fmt, run_tok_dir or tok_dir, expected_special_ids(info),
                                 kind=model_kind(config))
        what = "trained model" if sub is None else f"trained model gated to sub-network {sub.name}"
        print(f"verified: plain transformers reproduces the logits of the {what} to {max_diff:.3g} "
              f"(tolerance {tolerance:g})")
        if not max_diff <= tolerance:
            raise ValueError(f"exported model differs from the trained one by {max_diff:.3g} > {tolerance:g}")
        with _writing_into(out_dir):
            (tmp / "README.md").write_text(model_card(info, report, fmt, _numel(reference), _numel(model),
                                                      max_diff, tolerance))
            # What this export wrote, so that a later --overwrite finds files added to the folder since.
            report["files"] = sorted(p.name for p in tmp.iterdir())
            (tmp / "sparsity.json").write_text(json.dumps(report, indent=2) + "\n")
            check_out_dir(out_dir, overwrite)  # OUT_DIR may have changed during the export
            _umask_permissions(tmp)
            folders.publish_folder(tmp, out_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    return {"out_dir": str(out_dir), "max_diff": max_diff, "checkpoint": str(tag_dir), "format": fmt,
            "subnetwork": None if sub is None else sub.name}


def _subnetwork_report(report: dict, sub, record: dict) -> None:
    """sparsity.json of a sub-network export: its own layers (the kept ones, renumbered, with the
    trained layer each was) and the sub-network's description; the trained layer's mask density
    where the run trained with masks."""
    full_layers = report["layers"]
    report["layers"] = sub.report_layers()
    for entry in report["layers"].values():
        density = full_layers[f"layer.{entry['trained_layer']}"].get("density")
        if density is not None:
            entry["trained_layer_density"] = density
    report["dynabert"] = {**sub.describe(), "phase": record.get("phase"),
                          "trained_subnetworks": list(record.get("subnetworks") or [])}


def run_export(args) -> int:
    result = export(args.checkpoint, args.out_dir, fmt=args.format, overwrite=args.overwrite,
                    tokenizer=args.tokenizer, tag=args.tag, force_tokenizer=args.force_tokenizer,
                    width=args.width, depth=args.depth)
    what = result["format"] + (f", sub-network {result['subnetwork']}" if result["subnetwork"] else "")
    print(f"exported {result['checkpoint']} -> {result['out_dir']} ({what})")
    return 0
