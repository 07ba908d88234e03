"""A frozen teacher beside the student: never an optimizer's parameter, never ZeRO's.

What DeepSpeed users hit when they put a teacher next to a DeepSpeed student, and why it does not
apply here:

* a teacher built inside ``deepspeed.zero.Init`` (or handed to ``deepspeed.initialize``) is
  partitioned like the student and its parameters gathered by hooks that expect a backward
  (DeepSpeed #3286, #3175): the teacher is built here, outside any ``zero.Init`` context and
  outside the engine, as a plain module on the device;
* a teacher left in train mode keeps drawing dropout and gives noisy targets (#4922): it is put in
  eval mode and every call runs under ``torch.no_grad`` (no autograd graph is kept, so no
  step can leak one);
* ranks that run different parts of a partitioned teacher deadlock in its gathers (#1888): the
  teacher is whole on every rank, each rank runs all of it on its own batch, no collective.

Under tensor parallelism the teacher is not split (it is replicated on the TP ranks): the
student's attention term compares each TP rank's heads with the teacher's same heads
(:func:`dist_sparse.train.losses.attention_mse`).
"""

from __future__ import annotations

import torch
from torch import nn

from dist_sparse.model.config import DistSparseBertConfig


def teacher_dtype(choice: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU (half the memory, the tensor cores), fp32 on a CPU (where bf16
    matmuls are slow and the CPU tests compare with fp32 references)."""
    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_teacher(cfg, student: DistSparseBertConfig, teacher: DistSparseBertConfig, tp_size: int) -> list[int]:
    """The teacher against the student and the distillation section; returns the layer map."""
    layer_map = cfg.resolved_layer_map(student.num_hidden_layers, teacher.num_hidden_layers)
    if cfg.hidden and student.hidden_size != teacher.hidden_size:
        raise ValueError(f"distillation.hidden needs the same hidden size: the student has {student.hidden_size}, "
                         f"the teacher {teacher.hidden_size}; set hidden to 0")
    if cfg.attention:
        for i, t in enumerate(layer_map):
            if student.heads_of(i) != teacher.heads_of(t) or student.head_dim != teacher.head_dim:
                raise ValueError(f"distillation.attention compares heads one to one: student layer {i} has "
                                 f"{student.heads_of(i)} heads of width {student.head_dim}, teacher layer {t} "
                                 f"{teacher.heads_of(t)} of width {teacher.head_dim}; set attention to 0")
        if any(student.heads_of(i) % tp_size for i in range(student.num_hidden_layers)):
            raise ValueError("distillation.attention under tensor parallelism needs every layer's head count "
                             f"divisible by the tensor-parallel degree {tp_size}")
    return layer_map


class Teacher:
    """Wraps the teacher model: frozen, eval mode, on ``device`` in ``dtype``; called on a batch's
    model inputs, it returns the model's output (logits, and hidden states / attention scores
    when asked), detached. Inputs with ``mlm_positions`` give MLM logits at those positions only,
    as the student's (``DistillationLoss`` passes them to both)."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype):
        model.requires_grad_(False)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype

    def __call__(self, inputs: dict, *, hidden: bool = False, scores: bool = False):
        if self.model.training:  # someone called .train() on it: the targets must not be noisy
            self.model.eval()
        with torch.no_grad():
            return self.model(**inputs, output_hidden_states=hidden, output_attention_scores=scores)

    def parameters(self):
        return self.model.parameters()

    def check_unchanged(self, fingerprint: str) -> None:
        """Raise if the teacher's weights are no longer those of ``fingerprint`` (taken at start):
        nothing may write to a teacher, and this is checked, not assumed."""
        if self.fingerprint() != fingerprint:
            raise RuntimeError("the teacher's weights changed during training: something wrote to a frozen model")

    def fingerprint(self) -> str:
        """A SHA-256 of every teacher weight's bytes: equal before and after training (the tests
        check that nothing wrote to the teacher)."""
        import hashlib

        h = hashlib.sha256()
        for name, p in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


__all__ = ["Teacher", "check_teacher", "teacher_dtype"]
