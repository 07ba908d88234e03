"""Training losses: functions of (engine, batch) -> scalar loss, pluggable into the Trainer.

The Trainer calls ``loss(engine, batch)`` once per micro batch and back-propagates what it
returns, so a distillation loss (a teacher's outputs beside the student's) or a task loss is a
new function here, not a change to the step sequence.
"""

from __future__ import annotations

from typing import Callable

import torch

LossFn = Callable[[object, dict], torch.Tensor]


def pretraining_loss(engine, batch: dict) -> torch.Tensor:
    """BERT pre-training: masked-LM cross-entropy, plus NSP when the batch has its labels (the
    model computes both from ``labels`` / ``next_sentence_label``)."""
    return engine(**batch).loss


__all__ = ["LossFn", "pretraining_loss"]
