"""The MLM head at the masked positions only (issue 16): same loss, same gradients, same
distillation terms as the full (batch, seq, vocab) logits, fewer decoder rows, no host sync.

Exactness, measured on CPU and asserted as such: the logits of a masked row and its per-token loss
are bit-identical in both paths (a Linear computes each row independently). The *mean* is not
always: ``cross_entropy(..., ignore_index=-100)`` reduces all batch * seq rows (zeros at the
ignored ones) and the gathered path n_masked rows, and torch's CPU reduction groups the terms by
position, so the two sums may round differently. Likewise the gradients of the head's biases are
sums over rows (batch * seq vs n_masked). Those comparisons use the bound of a reordered sum of n
terms, n * eps * the largest magnitude (eps of the dtype that sum is computed in); everything that
is not a reordered sum is compared with torch.equal.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_sparse.costs import count_costs
from dist_sparse.data.collator import IGNORE_INDEX, MlmCollator, mlm_positions
from dist_sparse.model import DistSparseBertConfig, DistSparseBertForMaskedLM, DistSparseBertForPreTraining
from dist_sparse.train.losses import DistillationLoss, DistillationWeights
from dist_sparse.train.teacher import Teacher

VOCAB, SEQ = 300, 32
SIZES = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _batch(seed: int = 1, lengths=(32, 20, 27, 9), nsp: bool = True) -> dict:
    collator = MlmCollator(pad_id=0, mask_id=1, vocab_size=VOCAB, special_ids=[0, 1, 2, 3], seq_len=SEQ)
    g = torch.Generator().manual_seed(seed)
    examples = [{"input_ids": torch.randint(4, VOCAB, (n,), generator=g).tolist(),
                 **({"next_sentence_label": i % 2} if nsp else {})} for i, n in enumerate(lengths)]
    return collator(examples, [torch.Generator().manual_seed(seed * 100 + i) for i in range(len(examples))])


def _model(cls, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    return cls(DistSparseBertConfig(**SIZES)).to(dtype)


def _ulps_of_sum(n: int, magnitude: torch.Tensor, dtype: torch.dtype) -> float:
    """Bound on the difference of two summation orders of n terms of at most ``magnitude``."""
    return n * torch.finfo(dtype).eps * float(magnitude)


def _loss_and_grads(model, batch: dict, **extra):
    model.zero_grad()
    out = model(**batch, **extra)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [DistSparseBertForPreTraining, DistSparseBertForMaskedLM])
def test_masked_positions_loss_and_gradients_equal_the_full_logits_ones(cls, dtype):
    batch = _batch(nsp=cls is DistSparseBertForPreTraining)
    positions = batch.pop("mlm_positions")
    n = len(positions)
    assert 0 < n < batch["labels"].numel()
    model = _model(cls, dtype)
    full, full_grads = _loss_and_grads(model, batch)
    part, part_grads = _loss_and_grads(model, batch, mlm_positions=positions)

    logits_of = (lambda o: o.prediction_logits) if cls is DistSparseBertForPreTraining else (lambda o: o.logits)
    selected = batch["labels"] != IGNORE_INDEX
    assert logits_of(full).shape == (*batch["labels"].shape, VOCAB)
    assert logits_of(part).shape == (n, VOCAB)
    # the same rows, bit for bit, in the order of a boolean index
    assert torch.equal(logits_of(part), logits_of(full)[selected])
    # the same per-token losses, and the same mean of them when reduced over the same rows
    targets = batch["labels"][selected]
    assert torch.equal(F.cross_entropy(logits_of(part).float(), targets, reduction="none"),
                       F.cross_entropy(logits_of(full)[selected].float(), targets, reduction="none"))
    assert torch.equal(part.loss, full.loss) or \
        abs(float(part.loss.detach() - full.loss.detach())) <= _ulps_of_sum(n, full.loss.detach().abs(), torch.float32)
    # the loss is in fp32 whatever the weights' dtype (the head casts the logits)
    assert part.loss.dtype == full.loss.dtype == torch.float32

    assert part_grads.keys() == full_grads.keys() and len(full_grads) == len(list(model.parameters()))
    for name, g in full_grads.items():
        rows = selected.numel()  # a parameter's gradient sums at most batch * seq rows
        assert part_grads[name].dtype == g.dtype == dtype
        assert torch.equal(part_grads[name], g) or \
            float((part_grads[name].float() - g.float()).abs().max()) <= _ulps_of_sum(rows, g.abs().max(), dtype), name


def test_decoder_sees_only_the_masked_rows_and_the_head_never_syncs():
    batch = _batch()
    positions = batch.pop("mlm_positions")
    model = _model(DistSparseBertForPreTraining)
    seen = []
    hooks = [model.cls.predictions.decoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape)),
             model.cls.predictions.transform.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))]
    with count_costs() as costs:
        model(**batch, mlm_positions=positions).loss.backward()
    for h in hooks:
        h.remove()
    n_masked = int((batch["labels"] != IGNORE_INDEX).sum())
    assert seen == [(n_masked, SIZES["hidden_size"])] * 2  # transform's input, then the decoder's
    # the whole training forward + backward, the gather and its backward included
    assert costs.host_syncs == 0, costs.summary()
    # the full path (no positions: inspection, export) still runs every row
    seen.clear()
    model.cls.predictions.decoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    model(**batch)
    assert seen == [(*batch["labels"].shape, SIZES["hidden_size"])]


def test_collator_positions_are_the_labelled_positions_in_boolean_index_order():
    batch = _batch(seed=7, lengths=(32, 1, 17, 32, 5))
    labels = batch["labels"]
    flat = torch.arange(labels.numel()).reshape(labels.shape)
    assert batch["mlm_positions"].dtype == torch.int64
    assert torch.equal(batch["mlm_positions"], flat[labels != IGNORE_INDEX])
    assert torch.equal(batch["mlm_positions"], mlm_positions(labels))
    assert len(batch["mlm_positions"]) == int((labels != IGNORE_INDEX).sum()) > 0
    # a batch with nothing masked gives an empty (not a missing) index
    assert mlm_positions(torch.full((2, 4), IGNORE_INDEX)).shape == (0,)


@pytest.mark.parametrize("hard", [0.0, 0.5])
def test_mlm_distillation_terms_are_those_of_the_full_logits(hard):
    batch = _batch(seed=3)
    teacher = Teacher(_model(DistSparseBertForPreTraining, seed=11), torch.device("cpu"), torch.float32)
    student = _model(DistSparseBertForPreTraining, seed=12)
    weights = DistillationWeights(hard=hard, logits=1.0, hidden=1.0, attention=0.0, temperature=2.0)
    loss_fn = DistillationLoss(teacher, weights, [0, 1], kind="mlm")
    without = {k: v for k, v in batch.items() if k != "mlm_positions"}

    rows = {"student": [], "teacher": []}
    hooks = [m.cls.predictions.decoder.register_forward_hook(lambda mod, args, out, k=k: rows[k].append(args[0].shape[:-1].numel()))
             for k, m in (("student", student), ("teacher", teacher.model))]
    old = loss_fn(student, without)
    old_terms = dict(loss_fn.last)
    with count_costs() as costs:
        new = loss_fn(student, batch)
        new.backward()
    for h in hooks:
        h.remove()
    n_masked = len(batch["mlm_positions"])
    # full logits without positions (every row), then the masked rows only, in both models
    assert rows == {"student": [SEQ * 4, n_masked], "teacher": [SEQ * 4, n_masked]}
    assert set(loss_fn.last) == ({"hard"} if hard else set()) | {"logits", "hidden"}
    # the soft term reads the same rows in the same order: bit-identical
    assert torch.equal(loss_fn.last["logits"], old_terms["logits"])
    assert torch.equal(loss_fn.last["hidden"], old_terms["hidden"])
    if hard:  # the hard MLM loss: the reduction order of the mean (see the module docstring)
        assert abs(float(loss_fn.last["hard"] - old_terms["hard"])) <= \
            _ulps_of_sum(n_masked, old_terms["hard"].abs(), torch.float32)
    assert abs(float(new.detach() - old.detach())) <= _ulps_of_sum(n_masked, old.detach().abs(), torch.float32)
    assert costs.host_syncs == 0, costs.summary()
    # the old form searched the labels on the device (a boolean index): the counter sees it
    with count_costs() as costs:
        loss_fn(student, without)
    assert costs.sync_ops["index"] > 0, costs.summary()
