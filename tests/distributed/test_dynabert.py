"""DynaBERT on 2 ranks: phase 1 (importance, TP-aware rewiring, width-adaptive training with a
teacher) at DP2 x TP1 and at DP1 x TP2, then phase 2 (width and depth, sampled sub-networks) on
ZeRO-3 from the phase-1 run, resumed exactly and equal to ZeRO-1.

The student starts from a stock Hugging Face folder built here with dropout 0, so the first
step's loss is a pure function of the weights and the batches: it must equal the sum over the
step's sub-networks that one process computes, for the TP run too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from test_finetune import ds_config, finetune, rows, task_dir  # noqa: F401  (task_dir: a fixture)

pytestmark = pytest.mark.distributed

SIZES = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
DISTILL = {"temperature": 2.0, "logits": 1.0, "hidden": 1.0, "hard": 0.5}
PHASE1 = {"phase": 1, "width_mult": [0.5, 1.0], "importance_batches": 3}
PHASE2 = {"phase": 2, "width_mult": [0.5, 1.0], "depth_mult": [0.5, 1.0], "subnetworks": 3}


@pytest.fixture(scope="module")
def dyn_init(task_dir, tmp_path_factory):  # noqa: F811
    """(student folder, teacher folder): stock Hugging Face BERTs with 4 heads and 4 layers; the
    teacher a sequence classifier for the task's labels (its weights are random: the tests compare
    with references, not accuracy)."""
    from transformers import BertConfig, BertForPreTraining, BertForSequenceClassification

    meta = json.loads((task_dir / "meta.json").read_text())
    tmp = tmp_path_factory.mktemp("dyn_init")
    torch.manual_seed(0)
    BertForPreTraining(BertConfig(vocab_size=meta["vocab_size"], **SIZES)).save_pretrained(tmp / "student")
    labels = dict(enumerate(meta["labels"]))
    BertForSequenceClassification(BertConfig(vocab_size=meta["vocab_size"], **SIZES, num_labels=len(labels),
                                             id2label=labels, label2id={v: k for k, v in labels.items()})
                                  ).save_pretrained(tmp / "teacher")
    return tmp / "student", tmp / "teacher"


def reference_first_loss(task_dir: Path, student: Path, teacher: Path, rewiring: dict, schedule, *, dp: int,  # noqa: F811
                         micro: int, gas: int, seed: int = 1234) -> float:
    """Step 1 as one process computes it: the same initial weights and classifier draw, rewired
    with the run's recorded orders, every sub-network's distillation loss on every data-parallel
    rank's micro batches."""
    from dist_sparse.config import DistillationConfig
    from dist_sparse.data.loader import ResumableBatchIterator
    from dist_sparse.data.task import TaskCollator, load_task
    from dist_sparse.dynabert.importance import rewire_model
    from dist_sparse.dynabert.subnet import kept_layers, unit_gate, width_counts
    from dist_sparse.train.initial import build_task_model, load_initial
    from dist_sparse.train.losses import DistillationLoss, DistillationWeights
    from dist_sparse.train.teacher import Teacher

    data, meta = load_task(task_dir)
    task = dict(num_labels=meta["num_labels"], labels=meta["labels"], task_type=meta["task_type"])
    torch.manual_seed(seed)
    model, _ = build_task_model(load_initial(student), **task)
    rewire_model(model, [torch.tensor(o) for o in rewiring["head_orders"]],
                 [torch.tensor(o) for o in rewiring["neuron_orders"]], rewiring["unit_order_tp"])
    teacher_model, _ = build_task_model(load_initial(teacher), **task, require_classifier=True)
    cfg = DistillationConfig(teacher=str(teacher), **DISTILL)
    loss_fn = DistillationLoss(Teacher(teacher_model, torch.device("cpu"), torch.float32),
                               DistillationWeights(cfg.hard, cfg.logits, cfg.hidden, cfg.attention, cfg.temperature),
                               list(range(4)), kind="task")
    collator = TaskCollator(pad_id=meta["special_ids"]["[PAD]"], task_type=meta["task_type"])
    c = model.config
    model.train()
    total = 0.0
    with torch.no_grad():
        for rank in range(dp):
            loader = ResumableBatchIterator(len(data["train"]), micro, rank, dp, seed, drop_last=False)
            for _ in range(gas):
                batch = collator([data["train"][i] for i in next(loader)])
                for w, d in schedule:
                    heads, neurons = width_counts(w, c.num_attention_heads, c.intermediate_size, c.unit_order_tp)
                    for layer in model.bert.encoder.layer:
                        layer.attention.self.head_gate = unit_gate(c.num_attention_heads, heads, c.unit_order_tp)
                        layer.intermediate.neuron_gate = unit_gate(c.intermediate_size, neurons, c.unit_order_tp)
                    kept = kept_layers(d, c.num_hidden_layers)
                    model.bert.encoder.active_layers = kept
                    loss_fn.layer_map = kept
                    total += float(loss_fn(model, batch))
    return total / (dp * gas)


def reference_importance(task_dir: Path, student: Path, batches: int, micro: int, seed: int = 1234):  # noqa: F811
    from dist_sparse.data.task import TaskCollator, load_task
    from dist_sparse.dynabert.importance import measure_importance, own_loss
    from dist_sparse.train.dynabert import importance_batches
    from dist_sparse.train.initial import build_task_model, load_initial

    data, meta = load_task(task_dir)
    torch.manual_seed(seed)
    model, _ = build_task_model(load_initial(student), num_labels=meta["num_labels"], labels=meta["labels"],
                                task_type=meta["task_type"])
    collator = TaskCollator(pad_id=meta["special_ids"]["[PAD]"], task_type=meta["task_type"])
    return measure_importance(model, importance_batches(data["validation"], collator, micro, batches), own_loss)


def assert_close_scores(got: list, want: torch.Tensor) -> None:
    """Importance from the launched ranks against this process's: the same sums of per-token
    gradient products, up to float rounding (the ranks run one thread, this process may not;
    a score near zero is a difference of large terms, so the tolerance is relative to the layer's
    largest score)."""
    got = torch.tensor(got, dtype=torch.float64)
    assert got.shape == want.shape
    tol = 1e-5 * want.abs().amax(dim=-1, keepdim=True)
    assert ((got - want).abs() <= tol).all(), float(((got - want).abs() / tol).max())


def chosen(rewiring: dict, width: float) -> list[tuple[set, set]]:
    """Per layer, the original heads and neurons width ``width`` keeps."""
    from dist_sparse.dynabert.subnet import kept_units

    tp = rewiring["unit_order_tp"]
    out = []
    for ho, no in zip(rewiring["head_orders"], rewiring["neuron_orders"]):
        heads = {ho[p] for p in kept_units(len(ho), int(width * len(ho)), tp)}
        neurons = {no[p] for p in kept_units(len(no), int(width * len(no)), tp)}
        out.append((heads, neurons))
    return out


@pytest.fixture(scope="module")
def phase1_runs(task_dir, dyn_init, tmp_path_factory):  # noqa: F811
    """Phase 1 at DP2 x TP1 (ZeRO-2) and at DP1 x TP2 (ZeRO-1), accumulation 2, 3 steps each."""
    student, teacher = dyn_init
    tmp = tmp_path_factory.mktemp("dyn_phase1")
    runs = {}
    for name, stage, tp in (("dp2", 2, 1), ("tp2", 1, 2)):
        cfg = ds_config(tmp, f"{name}.json", stage=stage, micro=4, gas=2, tp=tp, dynabert=PHASE1,
                        distillation={"teacher": str(teacher), **DISTILL})
        runs[name] = tmp / name
        finetune(cfg, task_dir, student, runs[name], "--max-steps", 3, "--save-interval", 3)
    return runs


def test_phase1_rewiring_and_training_equal_at_tp1_and_tp2(task_dir, dyn_init, phase1_runs):  # noqa: F811
    student, teacher = dyn_init
    rec = {k: json.loads((run / "dynabert_rewiring.json").read_text()) for k, run in phase1_runs.items()}
    # importance: the same numbers at both layouts, equal to one process on the same batches
    want_heads, want_neurons = reference_importance(task_dir, student, batches=3, micro=4)
    for r in rec.values():
        assert r["importance_batches"] == 3 and r["logits_max_abs_diff"] < 1e-5
        assert_close_scores(r["head_importance"], want_heads)
        assert_close_scores(r["neuron_importance"], want_neurons)
    assert rec["dp2"]["head_importance"] == rec["tp2"]["head_importance"]
    assert (rec["dp2"]["unit_order_tp"], rec["tp2"]["unit_order_tp"]) == (1, 2)
    # dealt for TP 2: each shard's first slot holds one of the two most important heads
    from dist_sparse.dynabert.subnet import deal_order
    for layer, imp in enumerate(rec["tp2"]["head_importance"]):
        assert rec["tp2"]["head_orders"][layer] == deal_order(torch.tensor(imp), 2).tolist()
        assert rec["dp2"]["head_orders"][layer] == deal_order(torch.tensor(imp), 1).tolist()
    # width 0.5 keeps the same original heads and neurons at both TP degrees
    assert chosen(rec["dp2"], 0.5) == chosen(rec["tp2"], 0.5)
    assert all(len(h) == 2 and len(n) == 64 for h, n in chosen(rec["tp2"], 0.5))

    # step 1 = both sub-networks' losses, as one process computes them
    schedule = [(1.0, 1.0), (0.5, 1.0)]
    for name, dp in (("dp2", 2), ("tp2", 1)):
        want = reference_first_loss(task_dir, student, teacher, rec[name], schedule, dp=dp, micro=4, gas=2)
        assert rows(phase1_runs[name], "train")[0]["loss"] == pytest.approx(want, rel=1e-5), name
        record = json.loads((phase1_runs[name] / "checkpoints" / "global_step3" / "dynabert.json").read_text())
        assert record["phase"] == 1 and record["unit_order_tp"] == rec[name]["unit_order_tp"]
        assert record["subnetworks"] == ["w1_d1", "w0.5_d1"]
        results = json.loads((phase1_runs[name] / "eval_results.json").read_text())
        assert set(results["subnetworks"]) == {"w0.5_d1"}
        assert set(results["subnetworks"]["w0.5_d1"]) >= {"accuracy", "f1", "loss"}


def test_phase2_on_zero3_resumes_exactly_and_equals_zero1(task_dir, phase1_runs, tmp_path):  # noqa: F811
    """Phase 2 from the phase-1 run (the teacher too), width and depth, 3 of the 4 sub-networks a
    step: ZeRO-3's losses equal ZeRO-1's (a sub-network that drops layers must not add onto the
    previous step's gradients), and a resume from step 2 continues exactly."""
    phase1 = phase1_runs["dp2"]
    distill = {"teacher": str(phase1), **DISTILL}
    runs = {}
    for stage in (3, 1):
        cfg = ds_config(tmp_path, f"z{stage}.json", stage=stage, micro=4, gas=2, dynabert=PHASE2,
                        distillation=distill)
        runs[stage] = tmp_path / f"z{stage}"
        finetune(cfg, task_dir, phase1, runs[stage], "--max-steps", 4, "--save-interval", 2)
    z3, z1 = ([r["loss"] for r in rows(runs[s], "train")] for s in (3, 1))
    assert len(z3) == 4 and z3 == pytest.approx(z1, rel=1e-5)
    results = json.loads((runs[3] / "eval_results.json").read_text())
    assert set(results["subnetworks"]) == {"w0.5_d1", "w1_d0.5", "w0.5_d0.5"}
    # a run's subnetworks scalar: 3 passes every step
    assert [r["subnetworks"] for r in rows(runs[3], "dynabert")] == [3.0] * 4

    resumed = tmp_path / "resumed"
    shutil.copytree(runs[3], resumed)
    shutil.rmtree(resumed / "checkpoints" / "global_step4")
    (resumed / "checkpoints" / "latest").write_text("global_step2")
    cfg = tmp_path / "z3.json"
    finetune(cfg, task_dir, phase1, resumed, "--max-steps", 4, "--save-interval", 2, "--resume")
    assert [r["loss"] for r in rows(resumed, "train")] == z3
    assert json.loads((resumed / "eval_results.json").read_text()) == results

    # every trained sub-network of the ZeRO-3 checkpoint exports as a standalone model whose
    # logits equal the trained model's gated pass (the export verifies it, or refuses to write)
    from dist_sparse.export import hf

    for width in PHASE2["width_mult"]:
        for depth in PHASE2["depth_mult"]:
            out = tmp_path / f"export_w{width:g}_d{depth:g}"
            result = hf.export(runs[3], out, width=width, depth=depth)
            assert result["subnetwork"] == f"w{width:g}_d{depth:g}" and result["max_diff"] <= hf.TOLERANCE
            assert result["format"] == ("dense" if width == 1.0 else "compact")
            layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
            assert layers == int(SIZES["num_hidden_layers"] * depth)

    # another schedule on resume is refused before anything runs
    other = ds_config(tmp_path, "other.json", stage=3, micro=4, gas=2, dynabert={**PHASE2, "subnetworks": 2},
                      distillation=distill)
    proc = finetune(other, task_dir, phase1, resumed, "--max-steps", 4, "--resume", check=False)
    assert proc.returncode != 0
    assert "the \"dynabert\" section differs from the one the run started with" in proc.stdout + proc.stderr


def test_pretraining_phase1_with_mlm_distillation_at_tp2(data_dir, dyn_init, tmp_path):
    """DynaBERT in pre-training (beyond the paper): --init a pre-trained BERT, importance from
    the MLM loss on the held-out split, rewired for TP 2, MLM distillation from the dense model,
    every sub-network evaluated on held-out MLM loss."""
    from dist_sparse.data.collator import MlmCollator
    from dist_sparse.data.prepare import load_prepared
    from dist_sparse.dynabert.importance import measure_importance, own_loss
    from dist_sparse.dynabert.subnet import deal_order
    from dist_sparse.train.dynabert import importance_batches
    from dist_sparse.train.initial import build_pretraining_model, load_initial
    from dist_sparse.train.loop import step_seed
    from dslaunch import ROOT, launch

    student, _ = dyn_init
    cfg = json.loads((ROOT / "ds_configs" / "cpu_zero2.json").read_text())
    cfg["zero_optimization"]["stage"] = 1
    cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"] = 4, 2
    cfg["tensor_parallel"] = {"autotp_size": 2}
    cfg["distillation"] = {"teacher": str(student), "hard": 0.5, "logits": 0.5, "hidden": 1.0, "temperature": 2.0}
    cfg["dynabert"] = {**PHASE1, "importance_batches": 2}
    path = tmp_path / "pt.json"
    path.write_text(json.dumps(cfg))
    run = tmp_path / "run"
    launch([ROOT / "launchers" / "pretrain.py", "--deepspeed_config", path, "--data", data_dir, "--init", student,
            "--output", run, "--no-progress", "--max-steps", 3])
    assert json.loads((run / "run.json").read_text())["model"] == str(student.resolve())

    rec = json.loads((run / "dynabert_rewiring.json").read_text())
    datasets, meta = load_prepared(data_dir)
    special = meta["special_ids"]
    collator = MlmCollator(pad_id=special["[PAD]"], mask_id=special["[MASK]"], vocab_size=meta["vocab_size"],
                           special_ids=sorted(special.values()), seq_len=meta["seq_len"], mlm_probability=0.15)
    gen = torch.Generator().manual_seed(step_seed(1234, 0, 0, 0, stream=5))
    batches = importance_batches(datasets["eval"], lambda rows: collator(rows, gen), 4, 2)
    heads, neurons = measure_importance(build_pretraining_model(load_initial(student)), batches, own_loss)
    assert_close_scores(rec["head_importance"], heads)
    assert_close_scores(rec["neuron_importance"], neurons)
    assert rec["unit_order_tp"] == 2 and rec["logits_max_abs_diff"] < 1e-4
    assert rec["head_orders"][0] == deal_order(torch.tensor(rec["head_importance"][0]), 2).tolist()
    train = rows(run, "train")
    assert [r["step"] for r in train] == [1, 2, 3] and all(r["distill_hidden"] > 0 for r in train)
    sub = rows(run, "eval_w0.5_d1")
    assert len(sub) == 1 and sub[0]["mlm_loss"] > 0
    record = json.loads((run / "checkpoints" / "global_step3" / "dynabert.json").read_text())
    assert record["unit_order_tp"] == 2
    structure = json.loads((run / "checkpoints" / "global_step3" / "structure.json").read_text())
    assert structure["model_config"]["unit_order_tp"] == 2


def test_multipliers_that_split_heads_over_tp_shards_are_refused_at_start_up(task_dir, dyn_init, tmp_path):  # noqa: F811
    """Width 0.25 of 4 heads is one head: not a whole head on each of 2 TP shards. Refused before
    any process group, naming the usable multipliers; nothing is written."""
    student, teacher = dyn_init
    cfg = ds_config(tmp_path, "bad.json", stage=1, micro=4, gas=1, tp=2,
                    dynabert={"phase": 1, "width_mult": [0.25, 1.0]})
    run = tmp_path / "run"
    proc = finetune(cfg, task_dir, student, run, "--max-steps", 2, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "width multiplier 0.25 does not keep whole heads and FFN neurons on every tensor-parallel shard" in out
    assert "usable: 0.5, 1" in out
    assert not run.exists()


def test_phase2_in_bf16_accumulates_every_pass_alike_on_zero1_and_zero2(task_dir, phase1_runs, tmp_path):  # noqa: F811
    """The BERT-large recipe's precision: bf16 with fp32 gradient accumulation. ZeRO-1 runs
    DeepSpeed's BF16_Optimizer, ZeRO-2 its partitioned optimizer: two implementations of the many
    backward passes per micro step. Their losses agree to bf16's rounding (measured: 2e-4
    relative), far below the step-to-step change a pass dropped from the sum would make."""
    phase1 = phase1_runs["dp2"]
    losses = {}
    for stage in (1, 2):
        cfg = ds_config(tmp_path, f"bf16_z{stage}.json", stage=stage, micro=4, gas=2, dynabert=PHASE2,
                        distillation={"teacher": str(phase1), **DISTILL}, bf16={"enabled": True},
                        data_types={"grad_accum_dtype": "fp32"})
        run = tmp_path / f"bf16_z{stage}"
        finetune(cfg, task_dir, phase1, run, "--max-steps", 4, "--save-interval", 0)
        losses[stage] = [r["loss"] for r in rows(run, "train")]
    assert len(losses[1]) == 4
    assert losses[1] == pytest.approx(losses[2], rel=1e-3)
    # every step moves the loss by several times the tolerance: the comparison can fail
    assert min(abs(a - b) / b for a, b in zip(losses[1], losses[1][1:])) > 3e-3
