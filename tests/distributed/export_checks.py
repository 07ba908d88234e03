"""Checks of an exported Hugging Face folder with plain transformers (shared by the run tests)."""

import subprocess
import sys
from pathlib import Path

import torch


def export_and_check(run: Path, out: Path, data: Path, sparse: bool = False) -> None:
    proc = subprocess.run([sys.executable, "-m", "dist_sparse.cli", "export", str(run), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verified: plain transformers reproduces" in proc.stdout
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertForPreTraining, pipeline

    model, info = BertForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    mlm = AutoModelForMaskedLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ref = AutoTokenizer.from_pretrained(data / "tokenizer")
    text = "The people of the United States have spoken in this election."
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert torch.equal(mlm.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)
    fill = pipeline("fill-mask", model=str(out), tokenizer=str(out))
    assert len(fill("The people of the [MASK] States.")) == 5
    if sparse:
        from dist_sparse.inspect import resolve_checkpoint
        from dist_sparse.train.checkpoint import logical_masks

        masks = logical_masks(resolve_checkpoint(run))
        params = dict(model.named_parameters())
        assert len(masks) == 12
        for name, mask in masks.items():
            weight = params[name].detach()
            assert torch.all(weight[~mask] == 0), name  # pruned weights are exact zeros
            assert int((weight != 0).sum()) <= int(mask.sum())
    # a second export into the same folder is refused; nothing is half-written by a refusal
    again = subprocess.run([sys.executable, "-m", "dist_sparse.cli", "export", str(run), str(out)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr
