"""`dist-sparse export` of a fine-tuned sequence classifier, in one process.

The checkpoint is a fake with DeepSpeed's file names whose consolidation is replaced by a state
dict built here (what ``consolidate`` returns for a fine-tuning run: ``bert.*`` + ``classifier.*``
of a shrunk model, some weights exact zeros as masks leave them); everything after it is the real
export: the stock ``BertForSequenceClassification`` folder padded back with the ticket, the
compact folder, the labels in config.json, sparsity.json and the card, the verification in a
fresh process. Real multi-process fine-tuning runs are exported in
tests/distributed/test_finetune_export.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_sparse.export import hf
from dist_sparse.model import DistSparseBertConfig, DistSparseBertForSequenceClassification
from dist_sparse.structure import Ticket, head_rows
from dist_sparse.train.checkpoint import StructureRecord, StructuredState
from test_export_errors import VOCAB, make_tokenizer

LABELS = ["con", "neutral", "pro"]
TICKET = Ticket(heads=((0, 2), (1, 2, 3)), neurons=((1, 4, 5, 9, 10, 20), (0, 1, 2, 3, 22, 23)))
PAIRS = [["The State of the Union is strong.", "The people are at work."],
         ["Congress shall lay and collect taxes.", "We will pay the common defence."]]


def classifier_config(shrunk: bool = True) -> DistSparseBertConfig:
    sizes = dict(layer_num_heads=TICKET.num_heads, layer_intermediate_sizes=TICKET.num_neurons) if shrunk else {}
    return DistSparseBertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=24, max_position_embeddings=64, num_labels=3,
                                id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
                                problem_type="single_label_classification",
                                architectures=["DistSparseBertForSequenceClassification"], **sizes)


def trained_weights(cfg) -> dict[str, torch.Tensor]:
    """A trained-looking classifier: random weights, every second weight of each encoder matrix
    an exact zero (what a 50% mask leaves)."""
    torch.manual_seed(0)
    sd = DistSparseBertForSequenceClassification(cfg).state_dict()
    gen = torch.Generator().manual_seed(1)
    out = {}
    for k, v in sd.items():
        v = v + 0.1 * torch.randn(v.shape, generator=gen) if "LayerNorm" not in k else v.clone()
        if k.startswith("bert.encoder.layer.") and v.dim() == 2:
            v.view(-1)[::2] = 0.0
        out[k] = v
    return out


def fake_finetune_run(root: Path, cfg, structured: dict | None, step: int = 6) -> Path:
    """A fine-tuning run directory: run.json naming its task folder (whose tokenizer/ is the one),
    a ZeRO-2 DP1 checkpoint whose files only need to be whole, the task's validation result."""
    task = root / "TASK"
    make_tokenizer(task / "tokenizer", slice(0, 3))
    run = root / "run"
    tag = run / "checkpoints" / f"global_step{step}"
    tag.mkdir(parents=True)
    meta = {"seq_len": 32, "task_type": "classification", "num_labels": 3, "labels": LABELS,
            "text_columns": ["premise", "hypothesis"], "label_column": "stance", "source": "train a.csv"}
    torch.save({"module": {}, "ds_config": {"zero_optimization": {"stage": 2}}, "mp_world_size": 1, "dp_size": 1,
                "tp_size": 1, "model_config": cfg.to_dict(), "structured": None, "progress": {"step": step},
                "max_steps": step, "model": "/models/init", "data_meta": meta}, tag / "mp_rank_00_model_states.pt")
    torch.save({}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    record = StructureRecord(cfg.to_dict(), None if structured is None else StructuredState.from_dict(structured))
    (tag / "structure.json").write_text(json.dumps(record.to_dict()))
    (run / "checkpoints" / "latest").write_text(tag.name)
    (run / "run.json").write_text(json.dumps({"kind": "finetune", "data": str(task)}))
    (run / "eval_results.json").write_text(json.dumps({"step": step, "split": "validation", "accuracy": 0.75,
                                                       "f1": 0.5}))
    return run


SHRUNK = {"phase": "shrunk", "ticket": TICKET.to_dict(), "ticket_step": 9, "forced": False, "detector": {},
          "config": {"method": "earlybert"}}


@pytest.fixture
def consolidated(monkeypatch):
    """Make the export's consolidation return the given weights (what zero_to_fp32 gives back)."""
    holder = {}
    monkeypatch.setattr(hf, "consolidate", lambda info, config, provenance=None: dict(holder["weights"]))
    return holder


def reference_logits(cfg, weights, tok_dir: Path, texts) -> torch.Tensor:
    from transformers import AutoTokenizer

    model = DistSparseBertForSequenceClassification(cfg).eval()
    model.load_state_dict(weights)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    batch = tok([a for a, _ in texts], [b for _, b in texts], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def exported_logits(folder: Path, texts, **kw):
    """The classifier and its logits as a user gets them: the Auto class, the folder's tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok([a for a, _ in texts], [b for _, b in texts], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval(), model(**batch).logits


def test_a_fine_tuned_shrunk_classifier_exports_dense_and_compact(tmp_path, consolidated):
    cfg = classifier_config()
    weights = consolidated["weights"] = trained_weights(cfg)
    run = fake_finetune_run(tmp_path, cfg, SHRUNK)
    want = reference_logits(cfg, weights, tmp_path / "TASK" / "tokenizer", PAIRS)

    dense = tmp_path / "dense"
    result = hf.export(run, dense)
    assert result["max_diff"] <= hf.TOLERANCE
    config = json.loads((dense / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["model_type"] == "bert"
    assert config["id2label"] == {"0": "con", "1": "neutral", "2": "pro"}
    assert config["label2id"] == {"con": 0, "neutral": 1, "pro": 2}
    assert config["problem_type"] == "single_label_classification"
    assert "layer_num_heads" not in config and "auto_map" not in config
    model, got = exported_logits(dense, PAIRS)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert torch.allclose(got, want, atol=1e-5)
    # padded back: removed heads / neurons are zero rows and columns at their original indices,
    # and the sparse weights' zeros are still exact zeros where the trained model had them
    for i, layer in enumerate(model.bert.encoder.layer):
        q = layer.attention.self.query.weight
        removed = [h for h in range(4) if h not in TICKET.heads[i]]
        assert torch.all(q[head_rows(removed, 4)] == 0)
        kept = q[head_rows(TICKET.heads[i], 4)]
        assert torch.equal(kept == 0, weights[f"bert.encoder.layer.{i}.attention.self.query.weight"] == 0)
        w = layer.intermediate.dense.weight
        assert sorted(torch.nonzero(w.abs().sum(1)).flatten().tolist()) == list(TICKET.neurons[i])
    from transformers import pipeline
    top = pipeline("text-classification", model=str(dense))({"text": PAIRS[0][0], "text_pair": PAIRS[0][1]})
    assert top["label"] in LABELS

    report = json.loads((dense / "sparsity.json").read_text())
    assert report["model"] == {"kind": "sequence_classification", "architecture": "BertForSequenceClassification"}
    assert report["labels"]["labels"] == LABELS and report["labels"]["num_labels"] == 3
    assert [e["kept_heads"] for e in report["layers"].values()] == [list(h) for h in TICKET.heads]
    assert report["structured"]["phase"] == "shrunk"
    card = (dense / "README.md").read_text()
    assert card.startswith("# BERT sequence classifier fine-tuned with dist_sparse")
    assert "0 = `con`, 1 = `neutral`, 2 = `pro`" in card and "sentence pairs" in card
    assert "Validation at this step: accuracy 0.7500, f1 0.5000." in card
    assert "`BertForSequenceClassification`" in card and "text-classification" in card
    assert "of the pre-training this model was fine-tuned from" in card

    compact = tmp_path / "compact"
    hf.export(run, compact, fmt="compact")
    config = json.loads((compact / "config.json").read_text())
    assert config["architectures"] == ["DistSparseBertForSequenceClassification"]
    assert config["layer_num_heads"] == [2, 3] and config["id2label"]["2"] == "pro"
    model, got = exported_logits(compact, PAIRS, trust_remote_code=True)
    assert type(model).__name__ == "DistSparseBertForSequenceClassification"
    assert torch.allclose(got, want, atol=1e-5)
    assert json.loads((compact / "sparsity.json").read_text())["model"]["architecture"] == type(model).__name__
    assert "trust_remote_code=True" in (compact / "README.md").read_text()

    # a fine-tuning run started from this compact folder knows the ticket again (from sparsity.json)
    from dist_sparse.train.initial import load_initial
    initial = load_initial(compact)
    assert initial.structured is not None and initial.structured.ticket == TICKET
    assert initial.structured.phase == "shrunk" and initial.structured.ticket_step == 9


def test_dense_export_of_a_shrunk_classifier_without_a_ticket_points_at_compact(tmp_path, consolidated):
    """A fine-tuned model with per-layer sizes whose run recorded no ticket (started from a folder
    that does not say which heads it kept): dense is refused before anything is written."""
    cfg = classifier_config()
    consolidated["weights"] = trained_weights(cfg)
    run = fake_finetune_run(tmp_path, cfg, None)
    with pytest.raises(ValueError, match=r"no structured-pruning ticket .*\(a fine-tuning run records the ticket .* "
                                         r"only --format compact can export it"):
        hf.export(run, tmp_path / "dense")
    assert not (tmp_path / "dense").exists()


def test_a_regression_head_exports_without_label_names(tmp_path, consolidated):
    data = classifier_config(shrunk=False).to_dict()
    for key in ("id2label", "label2id", "model_type", "transformers_version"):
        data.pop(key, None)
    cfg = DistSparseBertConfig(**{**data, "num_labels": 1, "problem_type": "regression"})
    weights = consolidated["weights"] = trained_weights(cfg)
    run = fake_finetune_run(tmp_path, cfg, None)
    dense = tmp_path / "dense"
    hf.export(run, dense)
    config = json.loads((dense / "config.json").read_text())
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1
    report = json.loads((dense / "sparsity.json").read_text())
    assert report["labels"]["labels"] is None and report["labels"]["num_labels"] == 1
    assert "a regression head (one output, mean squared error)" in (dense / "README.md").read_text()
    _, got = exported_logits(dense, PAIRS)
    assert torch.allclose(got, reference_logits(cfg, weights, tmp_path / "TASK" / "tokenizer", PAIRS), atol=1e-5)
