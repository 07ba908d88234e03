"""The downstream heads a compact export offers besides the sequence classifier: token
classification and question answering, checked against stock transformers models built here
(eager attention, so the two compute the same thing step by step), registered with the Auto
classes, and reachable from a compact folder through its ``auto_map`` in a process that never
imports dist_sparse.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering, BertForTokenClassification

from dist_sparse.export.remote_code import AUTO_MAP, MODELING_MODULE, save_compact
from dist_sparse.model import (DistSparseBertConfig, DistSparseBertForQuestionAnswering,
                               DistSparseBertForSequenceClassification, DistSparseBertForTokenClassification)

SIZES = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _batch(seed=0, batch=3, seq=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, SIZES["vocab_size"], (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1  # a second segment, as a question / context pair has
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _load_stock(ours, stock) -> None:
    missing, unexpected = ours.load_state_dict(stock.state_dict(), strict=False)
    assert missing == [] and unexpected == []
    assert set(ours.state_dict()) == set(stock.state_dict())


def test_token_classifier_equals_stock_bert_for_token_classification():
    torch.manual_seed(0)
    stock = BertForTokenClassification(BertConfig(**SIZES, num_labels=5, attn_implementation="eager")).eval()
    ours = DistSparseBertForTokenClassification(DistSparseBertConfig(**SIZES, num_labels=5)).eval()
    _load_stock(ours, stock)
    assert "bert.pooler.dense.weight" not in ours.state_dict()  # no pooler, as stock
    batch = _batch()
    labels = torch.randint(0, 5, batch["input_ids"].shape, generator=torch.Generator().manual_seed(1))
    labels[1, 6:] = -100  # padding is not scored
    labels[0, 0] = -100
    want = stock(**batch, labels=labels, output_hidden_states=True)
    # with the scores asked for, attention is computed explicitly, as eager attention does
    got = ours(**batch, labels=labels, output_hidden_states=True, output_attention_scores=True)
    assert got.logits.shape == (3, 9, 5)
    assert torch.equal(got.logits, want.logits)
    assert torch.equal(got.loss, want.loss)
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        assert torch.equal(a, b)
    assert len(got.attention_scores) == 2
    plain = ours(**batch, labels=labels)  # the SDPA path
    assert torch.allclose(plain.logits, want.logits, atol=1e-6)
    assert ours(**batch).loss is None
    assert ours(**batch, return_dict=False)[0].shape == (3, 9, 5)


def test_question_answering_equals_stock_bert_for_question_answering():
    torch.manual_seed(0)
    stock = BertForQuestionAnswering(BertConfig(**SIZES, attn_implementation="eager")).eval()
    ours = DistSparseBertForQuestionAnswering(DistSparseBertConfig(**SIZES)).eval()
    _load_stock(ours, stock)
    assert ours.qa_outputs.out_features == 2
    batch = _batch()
    # an answer beyond the sequence (cut off by truncation) is clamped and ignored, as in HF;
    # positions given as (batch, 1) are squeezed
    start, end = torch.tensor([[2], [7], [40]]), torch.tensor([[4], [8], [41]])
    want = stock(**batch, start_positions=start, end_positions=end, output_hidden_states=True)
    # with the scores asked for, attention is computed explicitly, as eager attention does
    got = ours(**batch, start_positions=start, end_positions=end, output_hidden_states=True,
               output_attention_scores=True)
    assert got.start_logits.shape == got.end_logits.shape == (3, 9)
    assert torch.equal(got.start_logits, want.start_logits)
    assert torch.equal(got.end_logits, want.end_logits)
    assert torch.equal(got.loss, want.loss)
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        assert torch.equal(a, b)
    plain = ours(**batch, start_positions=start, end_positions=end)  # the SDPA path
    assert torch.allclose(plain.start_logits, want.start_logits, atol=1e-6)
    assert torch.allclose(plain.loss, want.loss, atol=1e-6)
    assert ours(**batch, start_positions=start[:, 0]).loss is None  # both positions or no loss


@pytest.mark.parametrize("auto, cls", [("AutoModelForTokenClassification", DistSparseBertForTokenClassification),
                                       ("AutoModelForQuestionAnswering", DistSparseBertForQuestionAnswering),
                                       ("AutoModelForSequenceClassification",
                                        DistSparseBertForSequenceClassification)])
def test_heads_are_registered_with_the_auto_classes(auto, cls):
    import transformers

    cfg = DistSparseBertConfig(**SIZES, layer_num_heads=[1, 4])
    model = getattr(transformers, auto).from_config(cfg)
    assert type(model) is cls
    assert model.bert.encoder.layer[0].attention.self.query.out_features == 8  # per-layer sizes kept
    assert AUTO_MAP[auto] == f"{MODELING_MODULE}.{cls.__name__}"


LOAD = r"""
import json, sys, torch
import transformers
folder, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
out = {}
for auto in ("AutoModelForSequenceClassification", "AutoModelForTokenClassification", "AutoModelForQuestionAnswering"):
    model, info = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    with torch.no_grad():
        o = model.eval()(input_ids=ids)
    out[auto] = {"class": type(model).__name__, "missing": sorted(info["missing_keys"]),
                 "unexpected": sorted(info["unexpected_keys"]), "heads": model.config.layer_num_heads,
                 "id2label": {str(k): v for k, v in model.config.id2label.items()},
                 "logits": (o.logits if hasattr(o, "logits") else torch.stack([o.start_logits, o.end_logits])).tolist()}
out["dist_sparse"] = sorted(m for m in sys.modules if m.split(".")[0] == "dist_sparse")
print(json.dumps(out))
"""


def test_compact_classifier_folder_loads_into_every_head_without_dist_sparse(tmp_path):
    """A compact folder of a fine-tuned classifier with per-layer sizes: the classifier itself
    through AutoModelForSequenceClassification (same logits, labels kept), and the same encoder
    under a new token-classification or question-answering head (what fine-tuning it further for
    another task does), all from the folder's own code."""
    cfg = DistSparseBertConfig(**SIZES, max_position_embeddings=16, layer_num_heads=[1, 3],
                               layer_intermediate_sizes=[8, 64], num_labels=2, id2label={0: "no", 1: "yes"},
                               label2id={"no": 0, "yes": 1}, problem_type="single_label_classification")
    torch.manual_seed(0)
    model = DistSparseBertForSequenceClassification(cfg).eval()
    save_compact(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == ["DistSparseBertForSequenceClassification"]
    assert written["auto_map"] == AUTO_MAP

    ids = [[2, 7, 9, 11, 3, 5], [2, 30, 31, 4, 3, 0]]
    proc = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path), json.dumps(ids)], capture_output=True,
                          text=True, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                        "HF_MODULES_CACHE": str(tmp_path / "hf_modules")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got.pop("dist_sparse") == []
    seq, tok, qa = (got[k] for k in ("AutoModelForSequenceClassification", "AutoModelForTokenClassification",
                                     "AutoModelForQuestionAnswering"))
    assert [seq["class"], tok["class"], qa["class"]] == ["DistSparseBertForSequenceClassification",
                                                         "DistSparseBertForTokenClassification",
                                                         "DistSparseBertForQuestionAnswering"]
    assert seq["heads"] == tok["heads"] == qa["heads"] == [1, 3]
    assert seq["id2label"] == {"0": "no", "1": "yes"}
    assert seq["missing"] == seq["unexpected"] == []
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids)).logits
    assert torch.equal(torch.tensor(seq["logits"]), ref)  # the same code on the same weights
    # the token classifier takes the classifier's weights (same name and shape, as stock BERT does)
    # and has no use for the pooler; question answering starts its span head new
    assert tok["missing"] == [] and tok["unexpected"] == []
    assert torch.tensor(tok["logits"]).shape == (2, 6, 2)
    assert qa["missing"] == ["qa_outputs.bias", "qa_outputs.weight"]
    assert qa["unexpected"] == ["classifier.bias", "classifier.weight"]
    assert torch.tensor(qa["logits"]).shape == (2, 2, 6)
