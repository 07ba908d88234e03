"""`dist-sparse export` of real fine-tuning runs (2 ranks, ZeRO-2, accumulation 2), loaded by stock
transformers code.

* A sparse classifier (GMP, fine-tuned from a stock Hugging Face folder built here) exported dense:
  stock ``AutoModelForSequenceClassification`` loads it with no missing or unexpected keys, gives the
  trained model's logits, its labels, the validation accuracy the run measured, and exact zeros
  wherever the masks say.
* The shrunk EarlyBERT run of conftest.py (``earlybert_tp2_run``, DP2 x TP2, per-layer sizes after
  its shrink) fine-tuned for a few steps: the compact export loads with
  ``AutoModelForSequenceClassification.from_pretrained(..., trust_remote_code=True)`` and trains with
  the stock ``transformers.Trainer``; the dense export is padded back with the ticket the
  fine-tuning run carried over from its init checkpoint, and gives the same logits.

Each fine-tuning run is launched once per module (fixtures) and both runs share one prepared task.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dslaunch import ROOT, launch

pytestmark = pytest.mark.distributed

FINETUNE = ROOT / "launchers" / "finetune.py"
GMP = {"method": "gmp", "sparsity": 0.8, "update_interval": 2, "end_fraction": 0.75}
STEPS = 6
# exported vs trained logits: both fp32, the export itself verified to 1e-4 (hf.TOLERANCE)
TOL = 1e-4


def ds_config(tmp: Path, name: str, **sections) -> Path:
    cfg = json.loads((ROOT / "ds_configs" / "cpu_zero2_finetune.json").read_text())
    cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"] = 4, 2
    cfg.update(sections)
    path = tmp / name
    path.write_text(json.dumps(cfg))
    return path


def finetune(cfg: Path, task: Path, init: Path, run: Path, steps: int = STEPS):
    return launch([FINETUNE, "--deepspeed_config", cfg, "--task", task, "--init", init, "--output", run,
                   "--no-progress", "--max-steps", steps], nproc=2)


def cli_export(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dist_sparse.cli", "export", *map(str, args)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verified: plain transformers reproduces" in proc.stdout
    return proc


@pytest.fixture(scope="module")
def task_dir(data_dir, tmp_path_factory):
    """The default task (State of the Union paragraphs: before 1900 or not) with the corpus' tokenizer."""
    from dist_sparse.data.task import prepare_task

    out = tmp_path_factory.mktemp("task") / "sotu_era"
    prepare_task(out, tokenizer=data_dir, default_task=True, seq_len=64)
    return out


@pytest.fixture(scope="module")
def sparse_run(task_dir, tmp_path_factory):
    """A classifier fine-tuned with GMP to 80% from a stock BertForPreTraining folder built here."""
    from transformers import BertConfig, BertForPreTraining

    tmp = tmp_path_factory.mktemp("sparse_finetune")
    meta = json.loads((task_dir / "meta.json").read_text())
    init = tmp / "hf_init"
    torch.manual_seed(0)
    BertForPreTraining(BertConfig(vocab_size=meta["vocab_size"], hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=128,
                                  max_position_embeddings=64)).save_pretrained(init)
    run = tmp / "run"
    finetune(ds_config(tmp, "gmp.json", sparsity=GMP), task_dir, init, run)
    return run


@pytest.fixture(scope="module")
def shrunk_run(task_dir, earlybert_tp2_run, tmp_path_factory):
    """The EarlyBERT run's latest checkpoint (shrunk, per-layer sizes) fine-tuned on the task."""
    tmp = tmp_path_factory.mktemp("shrunk_finetune")
    run = tmp / "run"
    finetune(ds_config(tmp, "dense.json"), task_dir, earlybert_tp2_run, run, steps=4)
    return run


def validation(task_dir: Path, n: int | None = None) -> tuple[dict, torch.Tensor]:
    """A batch of the task's validation split (all of it by default) and its labels."""
    from dist_sparse.data.task import TaskCollator, load_task

    data, meta = load_task(task_dir)
    split = data["validation"]
    batch = TaskCollator(pad_id=meta["special_ids"]["[PAD]"], task_type=meta["task_type"])(
        [split[i] for i in range(n if n is not None else len(split))])
    return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]


def trained_logits(run: Path, batch: dict) -> torch.Tensor:
    """The fine-tuned model as dist_sparse holds it (the checkpoint consolidated into our classifier)."""
    from dist_sparse.model import DistSparseBertConfig, DistSparseBertForSequenceClassification
    from dist_sparse.train.initial import load_initial

    initial = load_initial(run)
    model = DistSparseBertForSequenceClassification(DistSparseBertConfig.from_dict(initial.config.to_dict())).eval()
    missing, unexpected = model.load_state_dict(initial.state_dict, strict=False)
    assert not missing and not unexpected
    with torch.no_grad():
        return model(**batch).logits


def load_classifier(folder: Path, **kw):
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_sparse_fine_tuned_classifier_exports_to_stock_transformers(sparse_run, task_dir, tmp_path):
    from transformers import AutoTokenizer, pipeline

    from dist_sparse.train.checkpoint import logical_masks, locate

    out = tmp_path / "hf"
    cli_export(sparse_run, out)
    meta = json.loads((task_dir / "meta.json").read_text())
    model = load_classifier(out)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.id2label == dict(enumerate(meta["labels"]))
    assert model.config.label2id == {name: i for i, name in enumerate(meta["labels"])}
    assert model.config.problem_type == "single_label_classification"

    # the folder's tokenizer is the task's: the same ids as the prepared validation examples
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(task_dir / "tokenizer").get_vocab()
    batch, labels = validation(task_dir)
    with torch.no_grad():
        logits = model(**batch).logits
    want = trained_logits(sparse_run, {k: v[:64] for k, v in batch.items()})
    assert (logits[:64] - want).abs().max() < TOL
    # the accuracy the run measured on the whole validation split, from the exported model
    results = json.loads((sparse_run / "eval_results.json").read_text())
    accuracy = float((logits.argmax(-1) == labels).float().mean())
    assert accuracy == pytest.approx(results["accuracy"], abs=2 / len(labels))
    top = pipeline("text-classification", model=str(out))("The Congress has passed the tariff bill.")
    assert top[0]["label"] in meta["labels"]

    # exact zeros wherever the masks (GMP at its goal: 20% kept) say; the rest trained
    masks = logical_masks(locate(sparse_run))
    assert len(masks) == 12  # Q, K, V, attention output, FFN in and out of both layers
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        weight = params[name].detach()
        assert torch.all(weight[~mask] == 0), name
        assert int((weight != 0).sum()) == int(mask.sum()), name
        assert abs(int(mask.sum()) - 0.2 * mask.numel()) <= 1, name
    assert int((params["classifier.weight"] == 0).sum()) == 0  # the head stays dense

    report = json.loads((out / "sparsity.json").read_text())
    assert report["model"] == {"kind": "sequence_classification", "architecture": "BertForSequenceClassification"}
    assert report["labels"]["labels"] == meta["labels"] and report["method"] == "gmp"
    card = (out / "README.md").read_text()
    assert "sequence classifier" in card and all(f"`{name}`" in card for name in meta["labels"])


def test_shrunk_fine_tuned_model_compact_trains_with_stock_trainer(shrunk_run, earlybert_tp2_run, task_dir, tmp_path):
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    from dist_sparse.train.checkpoint import locate, read_structure

    ticket = read_structure(locate(earlybert_tp2_run)).structured.ticket
    # the fine-tuning run kept its init's ticket: the fine-tuned model is the shrunk one
    carried = read_structure(locate(shrunk_run)).structured
    assert carried.phase == "shrunk" and carried.ticket == ticket

    compact = tmp_path / "compact"
    cli_export(shrunk_run, compact, "--format", "compact")
    model = load_classifier(compact, trust_remote_code=True)
    assert type(model).__name__ == "DistSparseBertForSequenceClassification"
    assert model.config.layer_num_heads == ticket.num_heads and model.config.layer_intermediate_sizes == \
        ticket.num_neurons
    assert model.config.auto_map["AutoModelForSequenceClassification"].endswith(
        "DistSparseBertForSequenceClassification")
    batch, _ = validation(task_dir, 32)
    want = trained_logits(shrunk_run, batch)
    with torch.no_grad():
        assert (model(**batch).logits - want).abs().max() < TOL

    # dense: padded back to 4 heads per layer with the carried ticket, the same function
    dense = tmp_path / "dense"
    cli_export(shrunk_run, dense)
    stock = load_classifier(dense)
    assert stock.config.num_attention_heads == 4 and "layer_num_heads" not in stock.config.to_dict()
    with torch.no_grad():
        assert (stock(**batch).logits - want).abs().max() < TOL
    head_dim = stock.config.hidden_size // 4
    for i, heads in enumerate(ticket.heads):  # removed heads: zero rows at their original places
        q = stock.bert.encoder.layer[i].attention.self.query.weight.view(4, head_dim, -1)
        assert [h for h in range(4) if bool(torch.any(q[h] != 0))] == list(heads), i
    assert [e["kept_heads"] for e in json.loads((compact / "sparsity.json").read_text())["layers"].values()] == \
        [list(h) for h in ticket.heads]

    # the compact model fine-tunes further with the stock Trainer: a tiny data set built here
    tok = AutoTokenizer.from_pretrained(compact)
    texts = ["The tariff on imports was lowered by Congress.", "Our troops have returned from the war.",
             "The railroads reach the western territories.", "We will invest in clean energy and the internet.",
             "The Treasury holds a surplus of gold and silver.", "Health care costs too much for families."]
    examples = [{**tok(t, truncation=True, max_length=64), "labels": i % 2} for i, t in enumerate(texts)]
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-4, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                             disable_tqdm=True, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model.train(), args=args, train_dataset=examples,
                      data_collator=DataCollatorWithPadding(tok))
    result = trainer.train()
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert not torch.equal(before["classifier.weight"], model.classifier.weight.detach())  # it did train
