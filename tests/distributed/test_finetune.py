"""Fine-tuning on 2 and 4 ranks: a frozen teacher beside a ZeRO-3 student and beside a DP2 x TP2
student, knowledge-aware sparse pruning (GMP + distillation), exact resume, and the start-up
refusals.

The student starts from a stock Hugging Face folder built here with dropout 0, so a step's loss is
a pure function of the weights and the batch: the first step's logged loss must equal the loss a
single process computes on the same micro batches, for the TP run too (where each TP rank holds
half the heads and the attention term is the sum of the ranks' shares).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dslaunch import ROOT, launch

pytestmark = pytest.mark.distributed

FINETUNE = ROOT / "launchers" / "finetune.py"
SIZES = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
DISTILL = {"temperature": 2.0, "logits": 1.0, "hidden": 1.0, "attention": 1.0, "hard": 0.5}
GMP = {"method": "gmp", "sparsity": 0.9, "update_interval": 2, "end_fraction": 0.75}


@pytest.fixture(scope="module")
def task_dir(data_dir, tmp_path_factory):
    """A small task from the default task's first paragraphs, through the CSV reader."""
    import csv

    from dist_sparse.data.task import default_task_examples, prepare_task

    tmp = tmp_path_factory.mktemp("task")
    examples = default_task_examples()
    files = {}
    for split, n in (("train", 384), ("validation", 72)):
        rows = examples[split][::max(1, len(examples[split]) // n)][:n]
        files[split] = tmp / f"{split}.csv"
        with open(files[split], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "era"])
            w.writerows([(text, "before-1900" if label else "1900-or-later") for _, text, label in rows])
    out = tmp / "task"
    prepare_task(out, tokenizer=data_dir, train=files["train"], validation=files["validation"], text_column="text",
                 label_column="era", seq_len=64)
    return out


@pytest.fixture(scope="module")
def init_dir(task_dir, tmp_path_factory):
    from transformers import BertConfig, BertForPreTraining

    meta = json.loads((task_dir / "meta.json").read_text())
    out = tmp_path_factory.mktemp("init") / "hf"
    torch.manual_seed(0)
    BertForPreTraining(BertConfig(vocab_size=meta["vocab_size"], **SIZES)).save_pretrained(out)
    return out


def ds_config(tmp: Path, name: str, *, stage: int = 2, micro: int = 8, gas: int = 2, tp: int = 1,
              lr: float = 1e-3, **sections) -> Path:
    cfg = json.loads((ROOT / "ds_configs" / "cpu_zero2_finetune.json").read_text())
    cfg["zero_optimization"]["stage"] = stage
    cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"] = micro, gas
    cfg["optimizer"]["params"]["lr"] = lr
    if tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": tp}
    cfg.update(sections)
    path = tmp / name
    path.write_text(json.dumps(cfg))
    return path


def finetune(cfg: Path, task: Path, init: Path, run: Path, *extra, nproc: int = 2, **kw):
    return launch([FINETUNE, "--deepspeed_config", cfg, "--task", task, "--init", init, "--output", run,
                   "--no-progress", *extra], nproc=nproc, **kw)


def rows(run: Path, split: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r["split"] == split]


@pytest.fixture(scope="module")
def teacher_run(task_dir, init_dir, tmp_path_factory):
    """A dense fine-tuned classifier: the teacher of the runs below (a dist_sparse checkpoint).
    Trained as the BERT-large recipes run: bf16 with fp32 gradient accumulation on ZeRO-1
    (DeepSpeed's BF16_Optimizer), accumulation 2; the students read it back from its fp32 masters."""
    tmp = tmp_path_factory.mktemp("teacher")
    run = tmp / "run"
    finetune(ds_config(tmp, "teacher.json", stage=1, micro=4, gas=2, bf16={"enabled": True},
                       data_types={"grad_accum_dtype": "fp32"}), task_dir, init_dir, run, "--max-steps", 12)
    assert (run / "checkpoints" / "global_step12" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    results = json.loads((run / "eval_results.json").read_text())
    assert 0.0 <= results["accuracy"] <= 1.0 and math.isfinite(results["loss"])
    return run


def reference_first_loss(task_dir: Path, init_dir: Path, teacher_run: Path, *, dp: int, micro: int, gas: int,
                         seed: int = 1234) -> float:
    """The loss of step 1 as one process computes it: the same initial weights and classifier draw,
    the same micro batches of every data-parallel rank, the same distillation terms."""
    from dist_sparse.config import DistillationConfig
    from dist_sparse.data.loader import ResumableBatchIterator
    from dist_sparse.data.task import TaskCollator, load_task
    from dist_sparse.train.initial import build_task_model, load_initial
    from dist_sparse.train.losses import DistillationLoss, DistillationWeights
    from dist_sparse.train.teacher import Teacher

    data, meta = load_task(task_dir)
    task = dict(num_labels=meta["num_labels"], labels=meta["labels"], task_type=meta["task_type"])
    torch.manual_seed(seed)
    student, _ = build_task_model(load_initial(init_dir), **task)
    teacher_model, _ = build_task_model(load_initial(teacher_run), **task, require_classifier=True)
    cfg = DistillationConfig(teacher=str(teacher_run), **DISTILL)
    loss_fn = DistillationLoss(Teacher(teacher_model, torch.device("cpu"), torch.float32),
                               DistillationWeights(cfg.hard, cfg.logits, cfg.hidden, cfg.attention, cfg.temperature),
                               cfg.resolved_layer_map(2, 2), kind="task")
    collator = TaskCollator(pad_id=meta["special_ids"]["[PAD]"], task_type=meta["task_type"])
    student.train()
    total = 0.0
    with torch.no_grad():
        for rank in range(dp):
            loader = ResumableBatchIterator(len(data["train"]), micro, rank, dp, seed, drop_last=False)
            for _ in range(gas):
                total += float(loss_fn(student, collator([data["train"][i] for i in next(loader)])))
    return total / (dp * gas)


def teacher_fingerprint(task_dir: Path, teacher_run: Path) -> str:
    from dist_sparse.data.task import load_task
    from dist_sparse.train.initial import build_task_model, load_initial
    from dist_sparse.train.teacher import Teacher

    _, meta = load_task(task_dir)
    model, _ = build_task_model(load_initial(teacher_run), num_labels=meta["num_labels"], labels=meta["labels"],
                                task_type=meta["task_type"], require_classifier=True)
    return Teacher(model, torch.device("cpu"), torch.float32).fingerprint()


def test_teacher_beside_a_zero3_student_with_gmp_and_exact_resume(task_dir, init_dir, teacher_run, tmp_path):
    """ZeRO-3, 2 ranks, accumulation 2: GMP to 90% with soft-logit, hidden and attention
    distillation. The teacher is the same bytes before and after; the first loss equals the
    single-process reference; every pruned weight ends at exactly 10% kept on both ranks' masks;
    the number of live tensors does not grow; a resume from step 8 gives the same losses."""
    from dist_sparse.train.checkpoint import logical_masks, sparsity_summary

    cfg = ds_config(tmp_path, "z3.json", stage=3, distillation={"teacher": str(teacher_run), **DISTILL},
                    sparsity=GMP)
    run = tmp_path / "run"
    steps = 16
    finetune(cfg, task_dir, init_dir, run, "--max-steps", steps, "--save-interval", 8, "--eval-interval", 8,
             env={"DIST_SPARSE_COUNT_TENSORS": "1"})

    results = json.loads((run / "eval_results.json").read_text())
    # the run checked its teacher unchanged at the end; it was the teacher of teacher_run
    assert results["teacher_sha256"] == teacher_fingerprint(task_dir, teacher_run)
    train = rows(run, "train")
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in train)
    assert set(k for k in train[0] if k.startswith("distill_")) == {"distill_hard", "distill_logits",
                                                                   "distill_hidden", "distill_attention"}
    want = reference_first_loss(task_dir, init_dir, teacher_run, dp=2, micro=8, gas=2)
    assert train[0]["loss"] == pytest.approx(want, rel=1e-5)
    # no growth: after the first steps (optimizer state) the live tensors stay within what the
    # first steps held (they alternate with GMP's update steps: masks rebuilt every 2 steps)
    live = [r["live_tensors"] for r in train[2:]]
    assert max(live[4:]) <= max(live[:4]), live

    # GMP reaches its goal at 0.75 * 16 = 12: exactly 10% of every encoder Linear weight kept
    tag = run / "checkpoints" / "global_step16"
    summary = sparsity_summary(tag)
    assert summary["ranks"] == 2 and len(summary["layers"]) == 12
    for name, layer in summary["layers"].items():
        numel = layer["full_shape"][0] * layer["full_shape"][1]
        assert layer["active"] == int(0.1 * numel + 0.5), name
    assert not any(n.startswith(("bert.pooler", "classifier", "bert.embeddings")) for n in summary["layers"])
    # the consolidated weights are zero exactly where the masks are
    from dist_sparse.train.initial import load_initial
    weights = load_initial(run).state_dict
    for name, mask in logical_masks(tag).items():
        assert torch.count_nonzero(weights[name][~mask]) == 0, name
    assert {"accuracy", "f1", "matthews_correlation", "loss"} <= set(rows(run, "eval")[-1])

    # exact resume from global_step8 in a copy of the run
    import shutil
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "global_step16")
    (resumed / "checkpoints" / "latest").write_text("global_step8")
    # another teacher for the same labels is refused: the run would continue on other targets
    from transformers import BertConfig, BertForSequenceClassification
    meta = json.loads((task_dir / "meta.json").read_text())
    other = tmp_path / "other_teacher"
    BertForSequenceClassification(BertConfig(vocab_size=meta["vocab_size"], **SIZES, num_labels=2,
                                             id2label=dict(enumerate(meta["labels"])),
                                             label2id={n: i for i, n in enumerate(meta["labels"])})
                                  ).save_pretrained(other)
    proc = finetune(cfg, task_dir, init_dir, resumed, "--max-steps", steps, "--resume", "--teacher", other,
                    check=False)
    assert proc.returncode != 0 and "is not the one the run started with" in proc.stdout + proc.stderr
    finetune(cfg, task_dir, init_dir, resumed, "--max-steps", steps, "--save-interval", 8, "--eval-interval", 8,
             "--resume")
    again = {r["step"]: r["loss"] for r in rows(resumed, "train")}
    for r in train:
        assert again[r["step"]] == pytest.approx(r["loss"], rel=1e-6, abs=1e-7), r["step"]
    assert torch.equal(torch.stack([m.flatten().float().sum() for m in logical_masks(tag).values()]),
                       torch.stack([m.flatten().float().sum() for m in
                                    logical_masks(resumed / "checkpoints" / "global_step16").values()]))

    # the same checkpoint (ZeRO-3, 2 ranks) resumed on 1 rank with ZeRO-2 (train_batch_size 32 for
    # the step's samples: accumulation 4): converted once, the teacher still the same, GMP's masks
    # reach exactly 10% again
    shutil.rmtree(resumed / "checkpoints" / "global_step16")
    (resumed / "checkpoints" / "latest").write_text("global_step8")
    one_rank = json.loads(cfg.read_text())
    one_rank.pop("gradient_accumulation_steps")
    one_rank.update(train_batch_size=32, zero_optimization={"stage": 2})
    (tmp_path / "dp1.json").write_text(json.dumps(one_rank))
    proc = finetune(tmp_path / "dp1.json", task_dir, init_dir, resumed, "--max-steps", steps, "--resume", nproc=1)
    assert "2 data-parallel x 1 tensor-parallel, ZeRO-3 -> 1 data-parallel x 1 tensor-parallel, ZeRO-1/2" in \
        proc.stdout + proc.stderr
    assert json.loads((resumed / "eval_results.json").read_text())["teacher_sha256"] == results["teacher_sha256"]
    moved = {r["step"]: r["loss"] for r in rows(resumed, "train")}
    assert sorted(moved) == list(range(1, steps + 1)) and all(math.isfinite(v) for v in moved.values())
    for name, layer in sparsity_summary(resumed / "checkpoints" / "global_step16")["layers"].items():
        numel = layer["full_shape"][0] * layer["full_shape"][1]
        assert layer["active"] == int(0.1 * numel + 0.5), name


def test_teacher_beside_a_dp2_x_tp2_student(task_dir, init_dir, teacher_run, tmp_path):
    """AutoTP: each TP rank holds one of the two heads of every layer. The first loss (with the
    attention term summed over the TP ranks' shares) equals the TP=1 single-process reference,
    the loss falls, the teacher is untouched."""
    cfg = ds_config(tmp_path, "tp2.json", stage=2, micro=8, gas=2, tp=2,
                    distillation={"teacher": str(teacher_run), **DISTILL})
    run = tmp_path / "run"
    finetune(cfg, task_dir, init_dir, run, "--max-steps", 10, nproc=4, timeout=900,
             env={"DIST_SPARSE_COUNT_TENSORS": "1"})
    results = json.loads((run / "eval_results.json").read_text())
    assert results["teacher_sha256"] == teacher_fingerprint(task_dir, teacher_run)
    train = rows(run, "train")
    want = reference_first_loss(task_dir, init_dir, teacher_run, dp=2, micro=8, gas=2)
    assert train[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert all(math.isfinite(r["loss"]) for r in train)
    assert sum(r["loss"] for r in train[-3:]) < sum(r["loss"] for r in train[:3])
    live = [r["live_tensors"] for r in train[2:]]
    assert max(live) == min(live), live
    # the TP shards merge into a stock classifier (the export verifies its logits against the run's)
    from transformers import AutoModelForSequenceClassification

    from dist_sparse.export.hf import export
    summary = export(run, tmp_path / "hf")
    assert summary["max_diff"] <= 1e-4
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert type(model).__name__ == "BertForSequenceClassification"
    meta = json.loads((task_dir / "meta.json").read_text())
    assert [model.config.id2label[i] for i in range(2)] == meta["labels"]


def test_start_up_refusals(task_dir, init_dir, teacher_run, tmp_path, capsys, monkeypatch):
    """Each bad start is one line and exit code 2 before any process group, and leaves no run."""
    from transformers import BertConfig, BertForSequenceClassification

    from dist_sparse.train.main import main

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    meta = json.loads((task_dir / "meta.json").read_text())
    other_labels = tmp_path / "other_labels"
    BertForSequenceClassification(BertConfig(vocab_size=meta["vocab_size"], **SIZES, num_labels=2,
                                             id2label={0: "no", 1: "yes"}, label2id={"no": 0, "yes": 1})
                                  ).save_pretrained(other_labels)
    other_vocab = tmp_path / "other_vocab"
    BertForSequenceClassification(BertConfig(vocab_size=meta["vocab_size"] + 7, **SIZES, num_labels=2)
                                  ).save_pretrained(other_vocab)
    shallow = tmp_path / "shallow"
    BertForSequenceClassification(BertConfig(vocab_size=meta["vocab_size"], **{**SIZES, "num_hidden_layers": 1},
                                             num_labels=2, id2label={0: "1900-or-later", 1: "before-1900"},
                                             label2id={"1900-or-later": 0, "before-1900": 1})
                                  ).save_pretrained(shallow)

    capsys.readouterr()  # the progress bars of save_pretrained

    def refused(cfg: Path, *extra, init: Path = init_dir) -> str:
        run = tmp_path / "refused_run"
        code = main(["--deepspeed_config", str(cfg), "--task", str(task_dir), "--init", str(init),
                     "--output", str(run), "--max-steps", "2", *map(str, extra)], kind="finetune")
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert not run.exists()
        return err[0]

    def distill(teacher: Path, **kw) -> Path:
        return ds_config(tmp_path, f"d{len(list(tmp_path.iterdir()))}.json",
                         distillation={"teacher": str(teacher), **DISTILL, **kw})

    assert "fine-tuned for the labels ['no', 'yes']" in refused(distill(other_labels))
    assert "has a vocabulary of" in refused(distill(other_vocab))
    assert "give distillation.layer_map" in refused(distill(shallow))
    assert "has no classifier" in refused(distill(init_dir))
    assert "has a vocabulary of" in refused(ds_config(tmp_path, "plain.json"), init=other_vocab)
    structured = ds_config(tmp_path, "sp.json", structured_pruning={"head_ratio": 0.5, "ffn_ratio": 0.5})
    assert "is for pre-training" in refused(structured)
    assert "is not a prepared task" in refused(ds_config(tmp_path, "plain2.json"), "--task", str(init_dir))
    assert "--teacher needs a \"distillation\" section" in refused(ds_config(tmp_path, "plain3.json"),
                                                                    "--teacher", str(teacher_run))
    run = tmp_path / "refused_run"
    code = main(["--deepspeed_config", str(ds_config(tmp_path, "plain4.json")), "--task", str(task_dir), "--init",
                 str(init_dir), "--output", str(run), "--epochs", "0"], kind="finetune")
    assert code == 2 and "--epochs must be positive" in capsys.readouterr().err and not run.exists()


def test_epochs_round_up_to_whole_steps():
    import argparse

    from dist_sparse.config import parse_run_config
    from dist_sparse.train.finetune import _length

    cfg = parse_run_config({"training": {"max_steps": 7}})
    ask = lambda **kw: argparse.Namespace(**{"max_steps": None, "epochs": None, **kw})  # noqa: E731
    assert _length(ask(epochs=1.0), cfg, num_train=100, global_batch=32) == 4      # 100 / 32 = 3.1 -> 4
    assert _length(ask(epochs=2.0), cfg, num_train=96, global_batch=32) == 6
    assert _length(ask(epochs=0.01), cfg, num_train=96, global_batch=32) == 1
    assert _length(ask(max_steps=5), cfg, num_train=96, global_batch=32) == 5
    assert _length(ask(), cfg, num_train=96, global_batch=32) == 7
    with pytest.raises(ValueError, match="set the length"):
        _length(ask(), parse_run_config({}), num_train=96, global_batch=32)


def test_pretraining_with_a_teacher(data_dir, init_dir, tmp_path):
    """Prune Once for All's pre-training recipe: 0.5 MLM + 0.5 soft MLM logits at temperature 2
    from a dense pre-trained teacher (a stock BertForPreTraining folder), with GMP, on ZeRO-2 at
    accumulation 2. The loop checks the teacher unchanged at the end (it raises otherwise)."""
    cfg = json.loads((ROOT / "ds_configs" / "cpu_zero2.json").read_text())
    cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"] = 4, 2
    cfg["distillation"] = {"teacher": str(init_dir), "hard": 0.5, "logits": 0.5, "temperature": 2.0}
    cfg["sparsity"] = {**GMP, "sparsity": 0.5}
    path = tmp_path / "pofa.json"
    path.write_text(json.dumps(cfg))
    run = tmp_path / "run"
    launch([ROOT / "launchers" / "pretrain.py", "--deepspeed_config", path, "--data", data_dir, "--model",
            "bert-tiny", "--output", run, "--no-progress", "--max-steps", 6])
    train = rows(run, "train")
    assert [r["step"] for r in train] == list(range(1, 7))
    for r in train:
        assert set(k for k in r if k.startswith("distill_")) == {"distill_hard", "distill_logits"}
        assert math.isfinite(r["loss"])
        # the logged loss is the weighted sum over the micro batches; the terms are rank 0's last
        assert r["distill_logits"] > 0 and r["distill_hard"] > 0
