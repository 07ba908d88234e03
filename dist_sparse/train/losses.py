"""Training losses: functions of (engine, batch) -> scalar loss, pluggable into the Trainer.

The Trainer calls ``loss(engine, batch)`` once per micro batch and back-propagates what it
returns, so a distillation loss (a teacher's outputs beside the student's) or a task loss is a
new function here, not a change to the step sequence.

The distillation terms are pure functions of tensors (unit-tested against hand computations);
:class:`DistillationLoss` runs the student and the teacher and weighs them.

Tensor parallelism: under AutoTP a student rank holds a contiguous slice of each layer's heads,
so its attention scores are those heads' only. Its attention term is that slice's share of the
whole (normalised by the total head count), so the TP ranks' terms sum to the TP=1 loss, and
AutoTP's column-parallel backward (an all-reduce of the input gradient over the TP group) sums
their gradients where they meet. Every other term sees replicated tensors and is the same on
every TP rank, as the task loss is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[object, dict], torch.Tensor]
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def pretraining_loss(engine, batch: dict) -> torch.Tensor:
    """BERT pre-training: masked-LM cross-entropy, plus NSP when the batch has its labels (the
    model computes both from ``labels`` / ``next_sentence_label``)."""
    return engine(**batch).loss


def task_loss(engine, batch: dict) -> torch.Tensor:
    """Fine-tuning: the sequence classifier's own loss on ``labels`` (cross entropy, or MSE for
    regression; see ``DistSparseBertForSequenceClassification``)."""
    return engine(**batch).loss


# ---------------------------------------------------------------------------------------------
# the distillation terms (pure)


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of the cross entropy of softmax(student / T) against softmax(teacher / T),
    times T^2 so the gradient's scale does not shrink with T (Hinton et al. 2015). In fp32."""
    t = float(temperature)
    target = torch.softmax(teacher.float() / t, dim=-1)
    return -(target * torch.log_softmax(student.float() / t, dim=-1)).sum(-1).mean() * (t * t)


def hidden_mse(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], layer_map: list[int],
               mask: torch.Tensor | None) -> torch.Tensor:
    """Sum over matched layers of the MSE between hidden states, averaged over the real (mask 1)
    tokens and the hidden size. ``student[0]``/``teacher[0]`` are the embedding outputs and are
    matched; student layer i's output ``student[i + 1]`` is matched with ``teacher[layer_map[i] + 1]``."""
    pairs = [(0, 0)] + [(i + 1, t + 1) for i, t in enumerate(layer_map)]
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in pairs:
        diff = (student[s].float() - teacher[t].float()).pow(2).mean(-1)  # (batch, seq)
        total = total + (diff.mean() if mask is None else (diff * mask).sum() / mask.sum().clamp(min=1))
    return total


def attention_mse(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], layer_map: list[int],
                  mask: torch.Tensor | None, tp_rank: int = 0, tp_size: int = 1) -> torch.Tensor:
    """Sum over student layers of the MSE between pre-softmax attention scores (batch, heads,
    seq, seq), over pairs of real query and key tokens, averaged over the layer's heads.

    Under tensor parallelism ``student[i]`` holds this TP rank's contiguous slice of the layer's
    heads (AutoTP splits Q/K/V rows evenly): it is compared with the same heads of
    ``teacher[layer_map[i]]`` and divided by the whole layer's head count, so the TP ranks'
    terms add up to the TP=1 value.
    """
    total = student[0].new_zeros((), dtype=torch.float32)
    for i, t in enumerate(layer_map):
        s = student[i].float()
        heads = s.shape[1]
        ref = teacher[t][:, tp_rank * heads:(tp_rank + 1) * heads].float()
        sq = (s - ref).pow(2).sum(1)  # (batch, seq, seq), summed over this slice's heads
        denom = heads * tp_size
        if mask is None:
            total = total + sq.mean() / denom
        else:
            pair = mask[:, :, None] * mask[:, None, :]
            total = total + (sq * pair).sum() / (pair.sum().clamp(min=1) * denom)
    return total


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillationWeights:
    hard: float
    logits: float
    hidden: float
    attention: float
    temperature: float


class DistillationLoss:
    """The student's loss against a frozen teacher (``dist_sparse.train.teacher.Teacher``).

    ``kind``: "task" (sequence classification: the logits of the pooled token; regression takes
    MSE on them instead of the soft cross-entropy) or "mlm" (pre-training: the MLM logits at the
    positions the MLM loss reads, labels != -100; with the collator's ``mlm_positions`` in the
    batch, the student and the teacher compute the logits of those positions only).
    ``tp_rank``/``tp_size``: the student's tensor-parallel place (its heads are a slice). ``last``
    holds the detached terms of the latest micro batch, for logging.
    """

    def __init__(self, teacher, weights: DistillationWeights, layer_map: list[int], *, kind: str,
                 regression: bool = False, tp_rank: int = 0, tp_size: int = 1,
                 tp_sum: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if kind not in ("task", "mlm"):
            raise ValueError(f"kind must be 'task' or 'mlm', not {kind!r}")
        self.teacher = teacher
        self.w = weights
        self.layer_map = list(layer_map)
        self.kind = kind
        self.regression = regression
        self.tp_rank, self.tp_size = tp_rank, tp_size
        if tp_size > 1 and weights.attention > 0 and tp_sum is None:
            raise ValueError("the attention term under tensor parallelism needs tp_sum (a sum over the TP group)")
        self.tp_sum = tp_sum
        self.last: dict[str, torch.Tensor] = {}
        # The teacher's outputs of the latest micro batch: several student passes on one batch
        # (DynaBERT's sub-networks) share one teacher forward. Keyed by the batch object itself
        # (held, so its identity cannot be reused by a later batch).
        self._cached: tuple[dict, tuple[bool, bool], object] | None = None

    def __call__(self, engine, batch: dict) -> torch.Tensor:
        w = self.w
        hidden, scores = w.hidden > 0, w.attention > 0
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        if self.kind == "mlm" and "mlm_positions" in batch:
            # Both models run their MLM head on the masked positions only: the soft term reads
            # nothing else, and the hard loss is the same (see DistSparseBertForPreTraining.forward).
            inputs["mlm_positions"] = batch["mlm_positions"]
        student_kwargs = dict(inputs)
        if w.hard > 0:
            student_kwargs.update({k: v for k, v in batch.items() if k not in student_kwargs})
        out = engine(**student_kwargs, output_hidden_states=hidden, output_attention_scores=scores)
        ref = self._teacher_outputs(batch, inputs, hidden, scores)
        terms: dict[str, torch.Tensor] = {}
        if w.hard > 0:
            terms["hard"] = out.loss
        if w.logits > 0:
            terms["logits"] = self._logits_term(out, ref, batch)
        mask = batch["attention_mask"].float() if "attention_mask" in batch else None
        if hidden:
            terms["hidden"] = hidden_mse(out.hidden_states, ref.hidden_states, self.layer_map, mask)
        if scores:
            share = attention_mse(out.attention_scores, ref.attention_scores, self.layer_map, mask,
                                  tp_rank=self.tp_rank, tp_size=self.tp_size)
            if self.tp_size > 1:
                # The value of the whole term (what is logged, the same on every TP rank), the
                # gradient of this rank's share (AutoTP's backward sums the shares' gradients).
                whole = self.tp_sum(share.detach().clone())
                share = share + (whole - share.detach())
            terms["attention"] = share
        loss = sum(getattr(w, name) * value for name, value in terms.items())
        self.last = {name: value.detach() for name, value in terms.items()}
        return loss

    def _teacher_outputs(self, batch: dict, inputs: dict, hidden: bool, scores: bool):
        c = self._cached
        if c is not None and c[0] is batch and c[1] == (hidden, scores):
            return c[2]
        ref = self.teacher(inputs, hidden=hidden, scores=scores)
        self._cached = (batch, (hidden, scores), ref)
        return ref

    def _logits_term(self, out, ref, batch) -> torch.Tensor:
        if self.kind == "task":
            if self.regression:
                return F.mse_loss(out.logits.float(), ref.logits.float())
            return soft_cross_entropy(out.logits, ref.logits, self.w.temperature)
        if "mlm_positions" in batch:
            # The logits are already those of the masked positions, in the order of the boolean
            # index below (ascending flat positions): the same rows, the same mean.
            return soft_cross_entropy(out.prediction_logits, ref.prediction_logits, self.w.temperature)
        selected = batch["labels"] != -100  # the positions the MLM loss reads (a host sync on a GPU)
        return soft_cross_entropy(out.prediction_logits[selected], ref.prediction_logits[selected],
                                  self.w.temperature)


__all__ = ["DistillationLoss", "DistillationWeights", "LossFn", "attention_mse", "hidden_mse", "pretraining_loss",
           "soft_cross_entropy", "task_loss"]
