"""Fine-tuning model, initial weights, teacher and distillation losses, in one process.

The sequence classifier is checked against stock ``BertForSequenceClassification`` (eager
attention, so its probabilities can be compared with our scores), the distillation terms
against hand computations, and the tensor-parallel share of the attention term against the
whole: the TP ranks' terms must add up to the TP=1 value exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

from dist_sparse.config import DistillationConfig, parse_run_config
from dist_sparse.model import DistSparseBertConfig, DistSparseBertForPreTraining, DistSparseBertForSequenceClassification
from dist_sparse.train.initial import build_task_model, load_initial
from dist_sparse.train.losses import (DistillationLoss, DistillationWeights, attention_mse, hidden_mse,
                                      soft_cross_entropy)
from dist_sparse.train.teacher import Teacher

SIZES = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _batch(seed=0, batch=3, seq=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, SIZES["vocab_size"], (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@pytest.fixture(scope="module")
def hf_classifier():
    torch.manual_seed(0)
    cfg = BertConfig(**SIZES, num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2},
                     attn_implementation="eager")
    return BertForSequenceClassification(cfg).eval()


def test_classifier_equals_stock_bert_for_sequence_classification(hf_classifier):
    ours = DistSparseBertForSequenceClassification(DistSparseBertConfig(**SIZES, num_labels=3)).eval()
    missing, unexpected = ours.load_state_dict(hf_classifier.state_dict(), strict=False)
    assert missing == [] and unexpected == []
    batch, labels = _batch(), torch.tensor([0, 2, 1])
    want = hf_classifier(**batch, labels=labels, output_hidden_states=True, output_attentions=True)
    got = ours(**batch, labels=labels, output_hidden_states=True, output_attention_scores=True)
    plain = ours(**batch, labels=labels)  # the SDPA path, no scores
    assert torch.equal(got.logits, want.logits)
    assert torch.allclose(plain.logits, want.logits, atol=1e-6)
    assert torch.equal(got.loss, want.loss)
    assert len(got.hidden_states) == len(want.hidden_states) == SIZES["num_hidden_layers"] + 1
    for a, b in zip(got.hidden_states, want.hidden_states):
        assert torch.equal(a, b)
    # our scores are pre-softmax and unbiased: bias + softmax gives HF's probabilities
    bias = (1 - batch["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
    for scores, probs in zip(got.attention_scores, want.attentions):
        assert scores.shape == probs.shape == (3, 4, 9, 9)
        assert torch.equal(torch.softmax(scores + bias, -1), probs)


def test_regression_head_takes_mse():
    model = DistSparseBertForSequenceClassification(DistSparseBertConfig(**SIZES, num_labels=1)).eval()
    batch, labels = _batch(), torch.tensor([0.5, -1.0, 2.0])
    out = model(**batch, labels=labels)
    assert out.logits.shape == (3, 1)
    assert torch.allclose(out.loss, ((out.logits.squeeze(-1) - labels) ** 2).mean())


def test_pretraining_model_returns_hidden_states_and_scores():
    model = DistSparseBertForPreTraining(DistSparseBertConfig(**SIZES)).eval()
    out = model(**_batch(), output_hidden_states=True, output_attention_scores=True)
    assert len(out.hidden_states) == 3 and len(out.attention_scores) == 2
    assert torch.allclose(model(**_batch()).prediction_logits, out.prediction_logits, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the terms


def test_soft_cross_entropy_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[0.5, 1.5, 0.0], [2.0, 0.0, 1.0]])
    for temp in (1.0, 2.0):
        want = 0.0
        for row_s, row_t in zip(s.tolist(), t.tolist()):
            zt = [math.exp(x / temp) for x in row_t]
            p = [z / sum(zt) for z in zt]
            lse = math.log(sum(math.exp(x / temp) for x in row_s))
            want += -sum(pi * (x / temp - lse) for pi, x in zip(p, row_s))
        want = want / 2 * temp * temp
        assert soft_cross_entropy(s, t, temp).item() == pytest.approx(want, rel=1e-6)
    # against itself it is the teacher's entropy: its gradient is zero there
    x = s.clone().requires_grad_(True)
    soft_cross_entropy(x, s, 1.0).backward()
    assert x.grad.abs().max() < 1e-7


def test_hidden_mse_counts_real_tokens_and_maps_layers():
    g = torch.Generator().manual_seed(1)
    student = tuple(torch.randn(2, 4, 8, generator=g) for _ in range(3))   # embeddings + 2 layers
    teacher = tuple(torch.randn(2, 4, 8, generator=g) for _ in range(5))   # embeddings + 4 layers
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).float()
    got = hidden_mse(student, teacher, [1, 3], mask)
    want = 0.0
    for s, t in ((0, 0), (1, 2), (2, 4)):
        real = [(b, i) for b in range(2) for i in range(4) if mask[b, i]]
        want += sum(((student[s][b, i] - teacher[t][b, i]) ** 2).mean().item() for b, i in real) / len(real)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_attention_term_of_tp_slices_adds_up_to_the_whole():
    g = torch.Generator().manual_seed(2)
    heads, layers = 4, 2
    student = tuple(torch.randn(2, heads, 5, 5, generator=g) for _ in range(layers))
    teacher = tuple(torch.randn(2, heads, 5, 5, generator=g) for _ in range(layers))
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]).float()
    whole = attention_mse(student, teacher, [0, 1], mask)
    # by hand: the mean over heads and real (query, key) pairs, summed over layers
    want = 0.0
    for s, t in zip(student, teacher):
        pair = mask[:, :, None] * mask[:, None, :]
        want += (((s - t) ** 2) * pair[:, None]).sum().item() / (pair.sum().item() * heads)
    assert whole.item() == pytest.approx(want, rel=1e-6)
    for tp in (2, 4):
        share = heads // tp
        parts = [attention_mse(tuple(s[:, r * share:(r + 1) * share] for s in student), teacher, [0, 1], mask,
                               tp_rank=r, tp_size=tp) for r in range(tp)]
        assert sum(p.item() for p in parts) == pytest.approx(whole.item(), rel=1e-6)


def test_distillation_section_and_layer_maps():
    cfg = parse_run_config({"distillation": {"teacher": "T", "hidden": 1.0, "attention": 1.0}}).distillation
    assert cfg.logits == 1.0 and cfg.temperature == 1.0 and cfg.hard == 0.0
    assert cfg.resolved_layer_map(4, 12) == [2, 5, 8, 11]
    assert cfg.resolved_layer_map(6, 6) == list(range(6))
    assert cfg.resolved_layer_map(3, 4) == [0, 2, 3]
    with pytest.raises(ValueError, match="give distillation.layer_map"):
        cfg.resolved_layer_map(6, 4)
    assert DistillationConfig(teacher="T").resolved_layer_map(6, 4) == []  # logits only: nothing to map
    with pytest.raises(ValueError, match="has 2 entries, the student has 3"):
        DistillationConfig(teacher="T", layer_map=[1, 3]).resolved_layer_map(3, 4)
    with pytest.raises(ValueError, match="names teacher layer 5, the teacher has 4"):
        DistillationConfig(teacher="T", layer_map=[1, 5]).resolved_layer_map(2, 4)
    for bad, msg in (({"teacher": "T", "logits": 0.0}, "nothing to train on"),
                     ({"teacher": "T", "layer_map": [2, 1]}, "must be increasing"),
                     ({"teacher": "T", "temperatur": 2}, 'unknown key "distillation.temperatur"'),
                     ({"logits": 1.0}, "teacher")):
        with pytest.raises(ValueError, match=msg):
            parse_run_config({"distillation": bad})


# ---------------------------------------------------------------------------------------------
# initial weights and the teacher


def test_initial_weights_from_stock_folders(tmp_path, hf_classifier):
    hf_classifier.save_pretrained(tmp_path / "cls")
    torch.manual_seed(3)
    BertModel(BertConfig(**SIZES)).save_pretrained(tmp_path / "base")
    BertForMaskedLM(BertConfig(**SIZES)).save_pretrained(tmp_path / "mlm")
    task = dict(num_labels=3, labels=["a", "b", "c"], task_type="classification")

    teacher, parts = build_task_model(load_initial(tmp_path / "cls"), **task, require_classifier=True)
    assert parts == {"pooler": "loaded", "classifier": "loaded"}
    batch = _batch()
    assert torch.allclose(teacher.eval()(**batch).logits, hf_classifier(**batch).logits, atol=1e-6)

    base = load_initial(tmp_path / "base")  # a bare BertModel: no "bert." prefix in the file
    _, parts = build_task_model(base, **task)
    assert parts == {"pooler": "loaded", "classifier": "new"}
    _, parts = build_task_model(load_initial(tmp_path / "mlm"), **task)
    assert parts == {"pooler": "new", "classifier": "new"}
    # a classifier for other labels is not continued, and cannot teach
    _, parts = build_task_model(load_initial(tmp_path / "cls"), num_labels=3, labels=["x", "y", "z"],
                                task_type="classification")
    assert parts["classifier"] == "new"
    with pytest.raises(ValueError, match=r"fine-tuned for the labels \['a', 'b', 'c'\], the task's are"):
        build_task_model(load_initial(tmp_path / "cls"), num_labels=3, labels=["x", "y", "z"],
                         task_type="classification", require_classifier=True)
    with pytest.raises(ValueError, match="classifies into 3 outputs, the task has 2"):
        build_task_model(load_initial(tmp_path / "cls"), num_labels=2, labels=["a", "b"],
                         task_type="classification", require_classifier=True)
    with pytest.raises(ValueError, match="has no classifier"):
        build_task_model(base, **task, require_classifier=True)
    with pytest.raises(ValueError, match="does not exist"):
        load_initial(tmp_path / "nowhere")


def test_teacher_is_frozen_and_untouched_by_a_student_step(hf_classifier):
    teacher_model = DistSparseBertForSequenceClassification(DistSparseBertConfig(**SIZES, num_labels=3))
    teacher_model.load_state_dict(hf_classifier.state_dict())
    teacher_model.train()  # as a careless caller would leave it
    teacher = Teacher(teacher_model, torch.device("cpu"), torch.float32)
    before = teacher.fingerprint()
    assert all(not p.requires_grad for p in teacher.parameters())

    torch.manual_seed(4)
    student = DistSparseBertForSequenceClassification(DistSparseBertConfig(**SIZES, num_labels=3))
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    loss_fn = DistillationLoss(teacher, DistillationWeights(hard=0.5, logits=1.0, hidden=1.0, attention=1.0,
                                                            temperature=2.0), [0, 1], kind="task")
    batch = {**_batch(), "labels": torch.tensor([0, 1, 2])}
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = loss_fn(student, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(loss_fn.last) == {"hard", "logits", "hidden", "attention"}
    assert losses[-1] < losses[0]
    assert teacher.fingerprint() == before
    assert not teacher.model.training
    assert all(p.grad is None for p in teacher.parameters())
    # the weighted sum is what was returned
    w = loss_fn.w
    total = sum(getattr(w, k) * v for k, v in loss_fn.last.items())
    assert total.item() == pytest.approx(losses[-1], rel=1e-6)
