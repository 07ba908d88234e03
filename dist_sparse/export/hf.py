"""Export a checkpoint to a Hugging Face folder, verified in a fresh process.

Formats:

* ``dense`` (default): a stock ``BertForPreTraining`` folder that plain transformers loads with no
  missing or unexpected keys. Pruned weights are exact zeros; heads and FFN neurons removed by
  structured pruning are zero rows/columns at their original positions, so the function is
  exactly the trained one.
* ``compact``: the trained per-layer head counts and FFN widths, physically smaller, with the
  model's configuration and modeling code written into the folder (standalone: it does not import
  dist_sparse); loaded with ``trust_remote_code=True``.

Both carry the tokenizer, a README model card and ``sparsity.json`` (per-layer density, pattern,
kept heads and FFN widths with their original indices).

Any ZeRO stage, any DP x TP layout, without the training world size (:mod:`.checkpoint`).
Every export loads the written folder in a fresh process with plain transformers, runs a
forward pass on sample text, compares with the trained model (the checkpoint's own model with
its slimming coefficients, if any, before any folding or padding) and fails above the
tolerance. The folder is written beside OUT_DIR and renamed onto it only once verified, so a
failure or an interruption leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dist_sparse.export.checkpoint import TIED_KEYS, CheckpointInfo, consolidate, locate, read_info
from dist_sparse.export.structured import TrainedStructure, compact_state_dict, dense_state_dict

FORMATS = ("dense", "compact")
# Largest |logit difference| accepted between the exported and the trained model, absolute, fp32.
# Folding a coefficient rounds once per weight (~1e-7 relative); logits of these models are O(10).
TOLERANCE = 1e-4
SAMPLE_TEXT = ["The State of the Union is strong, and the people of this nation are at work.",
               "Congress shall have the power to lay and collect taxes."]
# What a masked-LM model has no place for when it loads a pre-training folder.
PRETRAINING_ONLY_KEYS = {"bert.pooler.dense.weight", "bert.pooler.dense.bias",
                         "cls.seq_relationship.weight", "cls.seq_relationship.bias"}


def _run_tokenizer_dir(tag_dir: Path) -> Path | None:
    """The tokenizer the run trained with (DATA/tokenizer of run.json's data), if it can be found."""
    run_json = tag_dir.parent.parent / "run.json"
    if not run_json.exists():
        return None
    path = Path(json.loads(run_json.read_text())["data"]) / "tokenizer"
    return path if (path / "tokenizer.json").exists() else None


def _tokenizer_dir(tag_dir: Path, tokenizer: str | None) -> Path:
    if tokenizer:
        path = Path(tokenizer)
    else:
        path = _run_tokenizer_dir(tag_dir)
        if path is None:
            raise ValueError(f"cannot find the run's tokenizer (no {tag_dir.parent.parent / 'run.json'} naming a "
                             "dataset with one): pass --tokenizer DATA/tokenizer")
    if not (path / "tokenizer.json").exists():
        raise ValueError(f"no tokenizer at {path}: pass --tokenizer DATA/tokenizer")
    return path


def _check_tokenizer(tok_dir: Path, run_tok_dir: Path | None, info: CheckpointInfo, vocab_size: int,
                     force: bool) -> None:
    """The tokenizer must give the ids the model was trained on: its size and special-token ids
    must be the model's (always), and it must be the run's own tokenizer unless ``force``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    if len(tok) != vocab_size:
        raise ValueError(f"--tokenizer {tok_dir} has {len(tok)} tokens, the model's vocabulary has {vocab_size}: "
                         "it is not the tokenizer this model was trained with")
    special = (info.client_state.get("data_meta") or {}).get("special_ids") or {}
    wrong = {name: (tok.convert_tokens_to_ids(name), i) for name, i in special.items()
             if tok.convert_tokens_to_ids(name) != i}
    if wrong:
        raise ValueError(f"--tokenizer {tok_dir} gives the special tokens other ids than the model's "
                         + ", ".join(f"{n}: {got} instead of {want}" for n, (got, want) in wrong.items()))
    if run_tok_dir is None or run_tok_dir.resolve() == tok_dir.resolve() or force:
        return
    if (tok_dir / "tokenizer.json").read_bytes() != (run_tok_dir / "tokenizer.json").read_bytes():
        raise ValueError(f"--tokenizer {tok_dir} differs from the run's tokenizer ({run_tok_dir}) although size and "
                         "special ids match: the same text may get other ids; pass --force-tokenizer if it is "
                         "meant to")


def is_export_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an export of ours: what every export writes, config.json and a
    sparsity.json naming the checkpoint it came from."""
    report = folder / "sparsity.json"
    if not (folder / "config.json").is_file() or not report.is_file():
        return False
    try:
        content = json.loads(report.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and "checkpoint" in content


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """OUT_DIR is new, empty, or (with --overwrite) a previous export: --overwrite means "replace
    what this command wrote before", never "delete whatever is there" (prepare-data's and the
    training run's --overwrite mean the same). The folder around it must be writable."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory; pick another OUT_DIR")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(f"{out_dir} exists and is not empty; pass --overwrite to replace a previous export there")
        if not is_export_folder(out_dir):
            found = sorted(p.name for p in out_dir.iterdir())
            raise ValueError(f"--overwrite replaces only a previous export, and {out_dir} is not one (it holds "
                             f"{', '.join(found[:4])}{', ...' if len(found) > 4 else ''}); pick another OUT_DIR")
    parent = out_dir.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write into {parent}: permission denied; pick an OUT_DIR in a folder you can write to")


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


def trained_model(weights: dict[str, torch.Tensor], config):
    """The model exactly as trained: our BERT at the trained sizes, with the slimming coefficients
    as parameters when the checkpoint has them (so the reference involves no folding or padding)."""
    from torch import nn

    from dist_sparse.model import DistSparseBertForPreTraining
    from dist_sparse.structure import HEAD_COEF, NEURON_COEF, layer_key

    model = DistSparseBertForPreTraining(config)
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


def _export_model(weights: dict, structure: TrainedStructure, fmt: str):
    """The model object to save_pretrained, and the config it was built with."""
    if fmt == "dense":
        from transformers import BertForPreTraining

        sd, cfg = dense_state_dict(weights, structure)
        model = BertForPreTraining(cfg.to_hf_bert_config())
    else:
        from dist_sparse.model import DistSparseBertForPreTraining

        sd, cfg = compact_state_dict(weights, structure)
        model = DistSparseBertForPreTraining(cfg)
    _load_exactly(model, sd)
    return model.eval(), cfg


# ---------------------------------------------------------------------------------------------
# sparsity.json and the model card


def _sparse_info(tag_dir: Path) -> dict:
    from dist_sparse.inspect import collect

    return collect(tag_dir)


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
    out = {"format": fmt,
           "checkpoint": {"tag": info.tag_dir.name, "step": info.step, "zero_stage": info.zero_stage,
                          "dp_size": info.dp_size, "tp_size": info.tp_size},
           "layers": layers, "structured": None, "method": None}
    if structure.structured:
        s = structure.structured
        out["structured"] = {"method": (s.get("config") or {}).get("method", "earlybert"), "phase": s.get("phase"),
                             "ticket_step": s.get("ticket_step"), "forced": s.get("forced"),
                             "config": s.get("config")}
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


def model_card(info: CheckpointInfo, report: dict, fmt: str, trained_params: int, exported_params: int,
               max_diff: float, tolerance: float) -> str:
    state = info.client_state
    cfg = info.model_config
    meta = state.get("data_meta", {})
    lines = [f"# {state.get('model', 'BERT')} pre-trained with dist_sparse", "",
             f"Exported ({fmt}) from DeepSpeed checkpoint `{info.tag_dir.name}` at step {info.step} of "
             f"{state.get('max_steps', '?')}: ZeRO-{info.zero_stage}, data-parallel {info.dp_size} x tensor-parallel "
             f"{info.tp_size}, sequence length {meta.get('seq_len', '?')}, vocabulary {cfg.get('vocab_size')} "
             f"(sentencepiece {meta.get('tokenizer_type', '')}).", ""]
    if report.get("method"):
        weights = report["weights"]
        total = sum(w["shape"][0] * w["shape"][1] for w in weights.values())
        active = sum(w["active"] for w in weights.values())
        lines += [f"Sparse training: method {report['method']}, target sparsity {report['sparsity']}, pattern "
                  f"{report['pattern']}, distribution {report['distribution']}. The sparse weights hold {active} "
                  f"non-zeros of {total} (density {active / total:.4f}); pruned weights are stored as exact zeros. "
                  "Per-layer and per-weight figures are in sparsity.json.", ""]
    else:
        lines += ["No unstructured sparsity (dense weights).", ""]
    s = report.get("structured")
    if s and s["phase"] == "shrunk":
        how = "forced at the end of the search" if s.get("forced") else "early-bird criterion met"
        lines += [f"Structured pruning ({s['method']}): the ticket was drawn at step {s.get('ticket_step')} ({how}) and "
                  f"the model physically shrunk; training continued on the smaller model. Parameters: "
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
    if fmt == "dense":
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
    lines += [f"Verified on export: reloaded in a fresh process with plain transformers, the logits differ from the "
              f"trained model's by at most {max_diff:.3g} (tolerance {tolerance:g}).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# verification in a fresh process

VERIFY_SCRIPT = r"""
import json, sys, torch
from transformers import AutoModelForMaskedLM, AutoModelForPreTraining, AutoTokenizer, BertForPreTraining
folder, texts, out, fmt = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
remote = fmt == "compact"
tok = AutoTokenizer.from_pretrained(folder)
batch = tok(texts, padding=True, return_tensors="pt")
if remote:
    pre, pre_info = AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
else:
    pre, pre_info = BertForPreTraining.from_pretrained(folder, output_loading_info=True)
mlm, mlm_info = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=remote, output_loading_info=True)
with torch.no_grad():
    p = pre.eval()(**batch)
    m = mlm.eval()(**batch)
torch.save({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "token_type_ids": batch.get("token_type_ids"), "pretraining": p.prediction_logits,
            "nsp": p.seq_relationship_logits, "masked_lm": m.logits,
            "pre_info": {k: sorted(map(str, v)) for k, v in pre_info.items() if k != "error_msgs"},
            "mlm_info": {k: sorted(map(str, v)) for k, v in mlm_info.items() if k != "error_msgs"},
            "classes": [type(pre).__name__, type(mlm).__name__],
            "dist_sparse_modules": sorted(n for n in sys.modules if n.split(".")[0] == "dist_sparse")}, out)
"""


def verify_folder(folder: Path, reference, fmt: str = "dense", tokenizer_dir: Path | None = None) -> float:
    """Load ``folder`` with plain transformers in a fresh process; the largest |logit difference|
    (MLM logits of both models, NSP logits) to ``reference`` on the sample text.

    Raises ValueError when the folder does not load, loads with missing/unexpected keys, imports
    dist_sparse (compact), or tokenizes differently from ``tokenizer_dir``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.pt"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
        # Offline: the folder must load from itself; a remote-code cache in a temporary HF_HOME so
        # the check is not served by modules another export left behind.
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(Path(tmp) / "modules"))
        proc = subprocess.run([sys.executable, "-c", VERIFY_SCRIPT, str(folder), json.dumps(SAMPLE_TEXT), str(out), fmt],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise ValueError(f"the exported folder does not load with plain transformers:\n{proc.stderr[-3000:]}")
        got = torch.load(out, weights_only=False)
    pre, mlm = got["pre_info"], got["mlm_info"]
    if pre["missing_keys"] or pre["unexpected_keys"] or pre.get("mismatched_keys"):
        raise ValueError(f"transformers loads the pre-training model with missing keys {pre['missing_keys']}, "
                         f"unexpected {pre['unexpected_keys']}, mismatched {pre.get('mismatched_keys')}")
    if mlm["missing_keys"] or set(mlm["unexpected_keys"]) - PRETRAINING_ONLY_KEYS or mlm.get("mismatched_keys"):
        raise ValueError(f"transformers loads the masked-LM model with missing keys {mlm['missing_keys']}, "
                         f"unexpected {mlm['unexpected_keys']}, mismatched {mlm.get('mismatched_keys')}")
    if got["dist_sparse_modules"]:
        raise ValueError(f"loading the exported folder imported {got['dist_sparse_modules'][:3]}: it is not standalone")
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        ref = AutoTokenizer.from_pretrained(tokenizer_dir)(SAMPLE_TEXT, padding=True, return_tensors="pt")
        if not torch.equal(ref["input_ids"], got["input_ids"]):
            raise ValueError("the exported tokenizer gives different token ids than the run's tokenizer")
    with torch.no_grad():
        ref = reference(input_ids=got["input_ids"], attention_mask=got["attention_mask"],
                        token_type_ids=got["token_type_ids"])
    keep = got["attention_mask"].bool()
    return max((got["pretraining"] - ref.prediction_logits)[keep].abs().max().item(),
               (got["masked_lm"] - ref.prediction_logits)[keep].abs().max().item(),
               (got["nsp"] - ref.seq_relationship_logits).abs().max().item())


# ---------------------------------------------------------------------------------------------


def _umask_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder and safetensors writes 0600 files; an exported model is meant to
    be shared, so give it the permissions a plain mkdir/open would (the user's umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _commit(tmp: Path, out_dir: Path) -> None:
    """Put the verified folder at OUT_DIR. An existing OUT_DIR (--overwrite) is moved aside first and
    deleted only once the new folder is in place, so there is always a whole folder there."""
    _umask_permissions(tmp)
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old / out_dir.name, out_dir)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def export(checkpoint: str | Path, out_dir: str | Path, fmt: str = "dense", overwrite: bool = False,
           tokenizer: str | None = None, tolerance: float = TOLERANCE, tag: str | None = None,
           force_tokenizer: bool = False) -> dict:
    """Export one checkpoint; see the module docstring. Returns a summary (paths, max_diff)."""
    from transformers import AutoTokenizer

    from dist_sparse.model import DistSparseBertConfig

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    tag_dir = locate(checkpoint, tag)
    tok_dir = _tokenizer_dir(tag_dir, tokenizer)
    _check_not_inside(out_dir, {"checkpoint": tag_dir, "tokenizer": tok_dir})
    info = read_info(tag_dir)
    config = DistSparseBertConfig.from_dict(info.model_config)
    run_tok_dir = _run_tokenizer_dir(tag_dir)
    _check_tokenizer(tok_dir, run_tok_dir, info, config.vocab_size, force_tokenizer)
    structure = TrainedStructure(config, info.structured)
    if fmt == "dense":
        structure.kept_units()  # a shrunk model without a usable ticket: refuse before the heavy part
    weights = consolidate(info, config)
    reference = trained_model(weights, config)
    model, out_cfg = _export_model(weights, structure, fmt)
    masks = _sparse_info(tag_dir)
    report = sparsity_report(info, structure, masks, model, fmt)

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as err:
        raise ValueError(f"cannot write into {out_dir.parent}: {err.strerror}; pick an OUT_DIR in a folder you can "
                         "write to") from None
    try:
        if fmt == "compact":
            from dist_sparse.export.remote_code import save_compact

            save_compact(model, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(tmp)
        (tmp / "sparsity.json").write_text(json.dumps(report, indent=2) + "\n")
        # The written tokenizer must tokenize like the one the run trained with (when known).
        max_diff = verify_folder(tmp, reference, fmt, run_tok_dir if run_tok_dir and not force_tokenizer else tok_dir)
        print(f"verified: plain transformers reproduces the trained model's logits to {max_diff:.3g} "
              f"(tolerance {tolerance:g})")
        if not max_diff <= tolerance:
            raise ValueError(f"exported model differs from the trained one by {max_diff:.3g} > {tolerance:g}")
        (tmp / "README.md").write_text(model_card(info, report, fmt, sum(p.numel() for p in reference.parameters()),
                                                  _numel(model), max_diff, tolerance))
        _commit(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out_dir": str(out_dir), "max_diff": max_diff, "checkpoint": str(tag_dir), "format": fmt}


def run_export(args) -> int:
    result = export(args.checkpoint, args.out_dir, fmt=args.format, overwrite=args.overwrite,
                    tokenizer=args.tokenizer, tag=args.tag, force_tokenizer=args.force_tokenizer)
    print(f"exported {result['checkpoint']} -> {result['out_dir']} ({result['format']})")
    return 0
