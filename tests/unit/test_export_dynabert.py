"""`dist-sparse export --width/--depth`: one DynaBERT sub-network as a standalone model, and what
`dist-sparse inspect` lists of a DynaBERT run, in one process.

The checkpoint is the fake fine-tuning run of test_export_classifier.py (consolidation replaced
by a state dict built here) plus the dynabert.json a DynaBERT run writes into every checkpoint.
The weights are random with unit_order_tp 2: to the export, a rewired model is exactly that (the
rewiring itself is tested in test_dynabert.py); TP order 2 makes the kept units no prefix, so a
wrong order would show. The reference gates the whole model with the explicit rule (unit_gate,
kept_layers), not with the export's own code.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from dist_sparse.dynabert.subnet import kept_layers, unit_gate
from dist_sparse.export import hf
from dist_sparse.export.subnetwork import parameter_count
from dist_sparse.inspect import format_dynabert
from dist_sparse.model import DistSparseBertConfig, DistSparseBertForSequenceClassification
from dist_sparse.model.presets import dense_flops_per_token
from test_export_classifier import LABELS, PAIRS, fake_finetune_run, trained_weights
from test_export_errors import VOCAB, leftovers, refused

RECORD = {"phase": 2, "config": {"phase": 2, "width_mult": [0.5, 1.0], "depth_mult": [0.5, 0.75, 1.0],
                                 "importance_batches": 2, "subnetworks": "all"},
          "unit_order_tp": 2, "subnetworks": ["w1_d1", "w0.5_d1", "w1_d0.75", "w0.5_d0.75", "w1_d0.5", "w0.5_d0.5"]}


def dynabert_config(unit_order_tp: int | None = 2) -> DistSparseBertConfig:
    return DistSparseBertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=4, num_attention_heads=4,
                                intermediate_size=24, max_position_embeddings=64, num_labels=3,
                                id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
                                problem_type="single_label_classification", unit_order_tp=unit_order_tp,
                                architectures=["DistSparseBertForSequenceClassification"])


@pytest.fixture
def consolidated(monkeypatch):
    """The export's consolidation returns the given weights (what zero_to_fp32 gives back)."""
    holder = {}
    monkeypatch.setattr(hf, "consolidate", lambda info, config, provenance=None: dict(holder["weights"]))
    return holder


def dynabert_run(tmp_path, cfg, record: dict | None = RECORD):
    run = fake_finetune_run(tmp_path, cfg, None)
    run_json = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**run_json, "data_meta": {"seq_len": 32}}))  # inspect's FLOPs
    tag = run / "checkpoints" / "global_step6"
    if record is not None:
        (tag / "dynabert.json").write_text(json.dumps(record))
        results = json.loads((run / "eval_results.json").read_text())
        results["subnetworks"] = {"w1_d0.5": {"accuracy": 0.625}, "w0.5_d0.75": {"accuracy": 0.5}}
        (run / "eval_results.json").write_text(json.dumps(results))
    return run


def gated_logits(cfg, weights, width: float | None, depth: float, batch) -> torch.Tensor:
    """The whole trained model computing sub-network (width, depth) by DynaBERT's rule; width None: no gates."""
    model = DistSparseBertForSequenceClassification(cfg).eval()
    model.load_state_dict(weights)
    H, inter = cfg.num_attention_heads, cfg.intermediate_size
    for layer in model.bert.encoder.layer:
        if width is not None:
            layer.attention.self.head_gate = unit_gate(H, round(width * H), cfg.unit_order_tp)
            layer.intermediate.neuron_gate = unit_gate(inter, round(width * inter), cfg.unit_order_tp)
    model.bert.encoder.active_layers = kept_layers(depth, cfg.num_hidden_layers)
    with torch.no_grad():
        return model(**batch).logits


def tokenized(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return dict(tok([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, truncation=True, return_tensors="pt"))


def loaded(cls, folder, **kw):
    model, info = cls.from_pretrained(folder, output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_width_1_depth_half_exports_a_stock_bert_of_the_kept_layers(tmp_path, consolidated):
    cfg = dynabert_config()
    weights = consolidated["weights"] = trained_weights(cfg)
    run = dynabert_run(tmp_path, cfg)
    out = tmp_path / "w1_d0.5"
    result = hf.export(run, out, depth=0.5)  # --width left out: 1.0; default format: dense
    assert result["format"] == "dense" and result["subnetwork"] == "w1_d0.5"
    assert result["max_diff"] <= hf.TOLERANCE

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["num_hidden_layers"] == 2
    assert "unit_order_tp" not in config and "auto_map" not in config
    model = loaded(BertForSequenceClassification, out)
    batch = tokenized(out)
    with torch.no_grad():
        got = model(**batch).logits
    want = gated_logits(cfg, weights, None, 0.5, batch)
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(want, gated_logits(cfg, weights, None, 1.0, batch), atol=1e-3)  # a real cut

    sub = json.loads((out / "sparsity.json").read_text())["dynabert"]
    assert (sub["name"], sub["layers_kept"], sub["heads_per_layer"], sub["ffn_per_layer"]) == ("w1_d0.5", [0, 2], 4, 24)
    assert sub["parameters"] == sum(p.numel() for p in model.parameters())
    card = (out / "README.md").read_text()
    assert "DynaBERT sub-network `w1_d0.5` (width 1, depth 0.5)" in card and "it keeps layers 0, 2 of the 4" in card
    assert f"Parameters: {sub['parameters']:,} (the full trained model: {sub['full_model_parameters']:,})" in card
    assert "Validation at this step (sub-network w1_d0.5): accuracy 0.6250." in card


def test_width_half_depth_three_quarters_exports_compact(tmp_path, consolidated):
    cfg = dynabert_config()
    weights = consolidated["weights"] = trained_weights(cfg)
    run = dynabert_run(tmp_path, cfg)
    out = tmp_path / "w0.5_d0.75"
    assert hf.export(run, out, width=0.5, depth=0.75)["format"] == "compact"  # the default for width < 1

    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["layer_num_heads"] == [2, 2, 2]
    assert config["layer_intermediate_sizes"] == [12, 12, 12] and config["unit_order_tp"] is None
    model = loaded(AutoModelForSequenceClassification, out, trust_remote_code=True)
    assert type(model).__name__ == "DistSparseBertForSequenceClassification"
    batch = tokenized(out)
    with torch.no_grad():
        got = model(**batch).logits
    assert torch.allclose(got, gated_logits(cfg, weights, 0.5, 0.75, batch), rtol=0, atol=1e-5)

    report = json.loads((out / "sparsity.json").read_text())
    # TP order 2: the top half of 4 heads sits at positions 0 and 2 (ranks 0 and 1), of 24 neurons at 0-5 and 12-17
    assert [e["trained_layer"] for e in report["layers"].values()] == [0, 1, 2]
    assert report["layers"]["layer.0"]["kept_heads"] == [0, 2]
    assert report["layers"]["layer.0"]["kept_ffn_neurons"] == [*range(6), *range(12, 18)]
    assert report["dynabert"]["phase"] == 2 and report["dynabert"]["trained_subnetworks"] == RECORD["subnetworks"]
    card = (out / "README.md").read_text()
    assert "each with 2 of 4 attention heads and 12 of 24 FFN neurons" in card
    assert "| 2 | 2 | 2 of 4 | 12 of 24 |" in card


def test_a_dynabert_run_without_width_or_depth_exports_the_whole_model_as_stock_bert(tmp_path, consolidated):
    cfg = dynabert_config()
    weights = consolidated["weights"] = trained_weights(cfg)
    out = tmp_path / "full"
    result = hf.export(dynabert_run(tmp_path, cfg), out)
    assert (result["format"], result["subnetwork"]) == ("dense", None)
    assert "unit_order_tp" not in json.loads((out / "config.json").read_text())
    model = loaded(BertForSequenceClassification, out)
    batch = tokenized(out)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, gated_logits(cfg, weights, None, 1.0, batch), rtol=0, atol=1e-5)
    assert "dynabert" not in json.loads((out / "sparsity.json").read_text())


def test_refusals_name_what_to_do_and_write_nothing(tmp_path, consolidated, capfd):
    cfg = dynabert_config()
    consolidated["weights"] = trained_weights(cfg)
    run = dynabert_run(tmp_path, cfg)
    out = tmp_path / "out"
    assert refused(capfd, "export", run, out, "--width", "0.5", "--format", "dense") == (
        "--format dense cannot hold the width-0.5 sub-network: its layers keep fewer heads of the same head size, "
        "which no stock BertConfig describes (its head size is hidden size / head count); use --format compact (the "
        "default for width < 1)")
    assert refused(capfd, "export", run, out, "--width", "0.25", "--depth", "0.5") == (
        "the run did not train the sub-network of width 0.25, depth 0.5; trained: w1_d1, w0.5_d1, w1_d0.75, "
        "w0.5_d0.75, w1_d0.5, w0.5_d0.5 (width_mult [0.5, 1.0] x depth_mult [0.5, 0.75, 1.0])")

    tag = run / "checkpoints" / "global_step6"
    plain = dynabert_run(tmp_path / "plain", dynabert_config(unit_order_tp=None), record=None)
    with pytest.raises(ValueError, match=re.escape(
            f"--width/--depth select a DynaBERT sub-network, but {plain / 'checkpoints' / 'global_step6'} is not a "
            "checkpoint of a DynaBERT run: its model was never rewired (no unit_order_tp in its config) and it has no "
            "dynabert.json; export the whole model without --width/--depth")):
        hf.export(plain, out, width=0.5)
    (tag / "dynabert.json").unlink()  # rewired by an earlier DynaBERT run, fine-tuned without the section since
    with pytest.raises(ValueError, match=re.escape(
            "it has no dynabert.json: its run did not train with a \"dynabert\" section (its model was rewired by an "
            "earlier DynaBERT run: export a checkpoint of that run)")):
        hf.export(run, out, depth=0.5)
    assert not out.exists() and leftovers(tmp_path) == []


def test_inspect_lists_the_trained_subnetworks_next_to_the_full_model(tmp_path):
    cfg = dynabert_config()
    run = dynabert_run(tmp_path, cfg)
    text = format_dynabert(run / "checkpoints" / "global_step6")
    lines = text.splitlines()
    assert lines[0] == ("DynaBERT phase 2: sub-networks of width_mult [0.5, 1.0] x depth_mult [0.5, 0.75, 1.0], "
                        "units ordered for TP degree 2")
    rows = {line.split()[0]: line for line in lines[2:-1]}
    assert list(rows) == RECORD["subnetworks"] and "(full)" in rows["w1_d1"]
    # w0.5_d0.75: layers 0,1,2, 2 of 4 heads, 12 of 24 neurons, its parameters and training FLOPs at seq 32
    sub = DistSparseBertConfig(**{**{k: v for k, v in cfg.to_dict().items()
                                     if k not in ("model_type", "transformers_version")},
                                  "num_hidden_layers": 3, "unit_order_tp": None, "layer_num_heads": [2] * 3,
                                  "layer_intermediate_sizes": [12] * 3})
    flops, full = dense_flops_per_token(sub, 32, training=True), dense_flops_per_token(cfg, 32, training=True)
    assert rows["w0.5_d0.75"].split() == ["w0.5_d0.75", "0.5", "0.75", "0,1,2", "2", "/", "4", "12", "/", "24",
                                          f"{parameter_count(sub):,}", f"{flops / 1e6:.2f}", "M",
                                          f"(x{flops / full:.3f})"]
    assert format_dynabert(dynabert_run(tmp_path / "plain", dynabert_config(None), record=None)
                           / "checkpoints" / "global_step6") is None
