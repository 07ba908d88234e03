"""Export a checkpoint to a Hugging Face folder that stock transformers loads, verified.

dense format: a plain ``BertForPreTraining`` folder (config.json, model.safetensors, tokenizer
files, README.md model card, sparsity.json). Pruned weights are exact zeros, so the exported
function is exactly the trained one.

The checkpoint is consolidated with DeepSpeed's own tooling (``zero_to_fp32``), so any ZeRO stage
and any data-parallel size works without the world size it was trained with. Every export
re-loads the written folder in a fresh process with plain transformers, runs a forward pass on
sample text, compares with the training model and refuses (leaving nothing behind) above the
tolerance. The folder is written next to OUT_DIR and renamed onto it only when verified.
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

from dist_sparse.inspect import collect, resolve_checkpoint

TOLERANCE = 1e-4
SAMPLE_TEXT = ["The State of the Union is strong, and the people of this nation are at work.",
               "Congress shall have the power to lay and collect taxes."]


def _client_state(tag_dir: Path) -> dict:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        path = tag_dir / name
        if path.exists():
            state = torch.load(path, map_location="cpu", weights_only=False)
            if "model_config" not in state:
                raise ValueError(f"{tag_dir} is a DeepSpeed checkpoint but not one written by dist_sparse")
            return state
    raise ValueError(f"{tag_dir}: no model states file (mp_rank_00_model_states.pt): missing shard files?")


def _tokenizer_dir(tag_dir: Path, tokenizer: str | None) -> Path:
    if tokenizer:
        path = Path(tokenizer)
    else:
        run_json = tag_dir.parent.parent / "run.json"
        if not run_json.exists():
            raise ValueError(f"cannot find the run's tokenizer ({run_json} is missing): pass --tokenizer DIR")
        path = Path(json.loads(run_json.read_text())["data"]) / "tokenizer"
    if not (path / "tokenizer.json").exists():
        raise ValueError(f"no tokenizer at {path}: pass --tokenizer DATA/tokenizer")
    return path


def load_trained_model(tag_dir: Path):
    """The trained model in fp32, consolidated from any ZeRO stage, and dist_sparse's client state."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dist_sparse.model import DistSparseBertConfig, DistSparseBertForPreTraining

    state = _client_state(tag_dir)
    if state.get("tp_size", 1) > 1:
        raise ValueError("exporting a tensor-parallel checkpoint is not supported yet: train with autotp_size 1 "
                         "or convert it to a universal checkpoint first")
    try:
        weights = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"cannot consolidate {tag_dir}: {err}") from None
    config = DistSparseBertConfig.from_dict(state["model_config"])
    model = DistSparseBertForPreTraining(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "cls.predictions.decoder.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval(), state


def _model_card(state: dict, sparsity: dict, fmt: str) -> str:
    cfg = state["model_config"]
    lines = [f"# {state['model']} pre-trained with dist_sparse", "",
             f"Exported ({fmt}) from a DeepSpeed checkpoint at step {state['progress']['step']} of "
             f"{state['max_steps']}, data-parallel size {state['dp_size']}, sequence length "
             f"{state['data_meta']['seq_len']}, vocabulary {cfg['vocab_size']} (sentencepiece "
             f"{state['data_meta'].get('tokenizer_type', '')}).", ""]
    if sparsity:
        c = sparsity["config"]
        total = sum(e["full_shape"][0] * e["full_shape"][1] for e in sparsity["layers"].values())
        active = sum(e["active"] for e in sparsity["layers"].values())
        lines += [f"Sparse training: method {c['method']}, target sparsity {c['sparsity']}, pattern {c['pattern']}, "
                  f"distribution {c['distribution']}. The sparse weights hold {active} non-zeros of {total} "
                  f"(density {active / total:.4f}); pruned weights are stored as exact zeros. Per-layer figures "
                  "are in sparsity.json.", ""]
    else:
        lines += ["Dense training (no sparsity).", ""]
    lines += ["Load with stock transformers:", "", "```python",
              "from transformers import AutoModelForMaskedLM, AutoTokenizer",
              "model = AutoModelForMaskedLM.from_pretrained(PATH)",
              "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```", ""]
    return "\n".join(lines)


def _sparsity_json(info: dict, model) -> dict:
    layers = {}
    for i in range(model.config.num_hidden_layers):
        layers[f"layer.{i}"] = {"heads": model.config.heads_of(i), "ffn": model.config.intermediate_of(i)}
    out = {"layers": layers}
    if info:
        out.update(method=info["config"]["method"], sparsity=info["config"]["sparsity"],
                   pattern=info["config"]["pattern"], distribution=info["config"]["distribution"],
                   weights={n: {"shape": list(e["full_shape"]), "active": e["active"],
                                "density": e["active"] / (e["full_shape"][0] * e["full_shape"][1])}
                            for n, e in sorted(info["layers"].items())})
    return out


VERIFY_SCRIPT = r"""
import json, sys, torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertForPreTraining
folder, texts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
tok = AutoTokenizer.from_pretrained(folder)
batch = tok(texts, padding=True, return_tensors="pt")
pre, info = BertForPreTraining.from_pretrained(folder, output_loading_info=True)
mlm = AutoModelForMaskedLM.from_pretrained(folder)
with torch.no_grad():
    a = pre.eval()(**batch).prediction_logits
    b = mlm.eval()(**batch).logits
torch.save({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "token_type_ids": batch.get("token_type_ids"), "pretraining": a, "masked_lm": b,
            "missing": info["missing_keys"], "unexpected": info["unexpected_keys"]}, out)
"""


def verify_folder(folder: Path, model) -> float:
    """Load ``folder`` with plain transformers in a fresh process; largest |logit difference|."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.pt"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        proc = subprocess.run([sys.executable, "-c", VERIFY_SCRIPT, str(folder), json.dumps(SAMPLE_TEXT), str(out)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise ValueError(f"the exported folder does not load with plain transformers:\n{proc.stderr[-3000:]}")
        got = torch.load(out, weights_only=False)
    if got["missing"] or got["unexpected"]:
        raise ValueError(f"transformers reports missing keys {got['missing']} / unexpected {got['unexpected']}")
    with torch.no_grad():
        ref = model(input_ids=got["input_ids"], attention_mask=got["attention_mask"],
                    token_type_ids=got["token_type_ids"]).prediction_logits
    keep = got["attention_mask"].bool()
    diff_pre = (got["pretraining"] - ref)[keep].abs().max().item()
    diff_mlm = (got["masked_lm"] - ref)[keep].abs().max().item()
    return max(diff_pre, diff_mlm)


def export(checkpoint: str | Path, out_dir: str | Path, fmt: str = "dense", overwrite: bool = False,
           tokenizer: str | None = None, tolerance: float = TOLERANCE) -> dict:
    if fmt != "dense":
        raise ValueError(f"--format {fmt!r} is not available yet; use --format dense")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    tag_dir = resolve_checkpoint(checkpoint)
    tok_dir = _tokenizer_dir(tag_dir, tokenizer)
    model, state = load_trained_model(tag_dir)
    if not model.config.is_uniform():
        raise ValueError("this checkpoint has per-layer head counts or FFN widths; the dense format needs uniform "
                         "sizes (the compact format for shrunk models is not available yet)")
    info = collect(tag_dir)

    from transformers import AutoTokenizer, BertForPreTraining

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        hf = BertForPreTraining(model.config.to_hf_bert_config())
        missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
        if [k for k in missing if k != "cls.predictions.decoder.weight"] or unexpected:
            raise ValueError(f"state dict does not map onto BertForPreTraining: {missing[:5]} {unexpected[:5]}")
        hf.tie_weights()
        hf.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(state, info, fmt))
        (tmp / "sparsity.json").write_text(json.dumps(_sparsity_json(info, model), indent=2) + "\n")
        max_diff = verify_folder(tmp, model)
        print(f"verified: plain transformers reproduces the trained model's logits to {max_diff:.3g} "
              f"(tolerance {tolerance:g})")
        if not max_diff <= tolerance:
            raise ValueError(f"exported model differs from the trained one by {max_diff:.3g} > {tolerance:g}")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out_dir": str(out_dir), "max_diff": max_diff, "checkpoint": str(tag_dir)}


def run_export(args) -> int:
    result = export(args.checkpoint, args.out_dir, fmt=args.format, overwrite=args.overwrite,
                    tokenizer=args.tokenizer)
    print(f"exported {result['checkpoint']} -> {result['out_dir']}")
    return 0
