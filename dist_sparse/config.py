"""Typed configuration of the project's own sections of the DeepSpeed JSON.

A run is configured by one DeepSpeed JSON file. DeepSpeed owns its keys (batch sizes,
optimizer, ZeRO, tensor_parallel, ...); the sections named in ``OWN_SECTIONS`` belong to
dist_sparse. They are parsed here with ``extra="forbid"`` so that a typo is an error that
names the key, and they are removed before the dict is handed to ``deepspeed.initialize``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Sections of the DeepSpeed JSON that dist_sparse owns. Later capabilities add theirs here.
OWN_SECTIONS = ("training", "sparsity", "structured_pruning", "distillation", "dynabert")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class TrainingConfig(_Section):
    """The ``"training"`` section: schedule, cadence and seed of a pre-training run."""

    max_steps: int | None = Field(default=None, ge=1)
    """Optimizer steps to train; ``--max-steps`` on the command line overrides it."""

    warmup_steps: int | None = Field(default=None, ge=0)
    """Linear warmup length in optimizer steps; wins over ``warmup_fraction`` when set."""

    warmup_fraction: float = Field(default=0.01, ge=0.0, lt=1.0)
    """Warmup length as a fraction of ``max_steps`` (BERT used 1%; NVIDIA's LAMB phase 1 28.4%)."""

    decay: Literal["linear", "polynomial", "cosine", "constant"] = "linear"
    """Shape of the learning-rate decay after warmup, down to ``end_lr_fraction`` at ``max_steps``."""

    decay_power: float = Field(default=0.5, gt=0.0)
    """Exponent of the ``polynomial`` decay (NVIDIA's BERT LAMB recipe uses 0.5)."""

    end_lr_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    """Learning rate at the end of training, as a fraction of the peak."""

    seed: int = 1234
    """Seeds model initialisation, data order, masking and dropout."""

    log_interval: int = Field(default=1, ge=1)
    """Write training scalars to TensorBoard every this many optimizer steps."""

    eval_interval: int = Field(default=0, ge=0)
    """Evaluate on the held-out split every this many steps (0: only at the end)."""

    eval_batches: int = Field(default=8, ge=1)
    """Micro batches per rank in one evaluation."""

    save_interval: int = Field(default=0, ge=0)
    """Save a checkpoint every this many steps (0: only at the end)."""

    keep_checkpoints: int = Field(default=0, ge=0)
    """Keep only the newest N checkpoints (0: keep all)."""

    mlm_probability: float = Field(default=0.15, gt=0.0, lt=1.0)
    """Fraction of tokens selected for masked-language-model prediction (80/10/10 rule)."""

    nonfinite_loss: Literal["stop", "skip"] = "stop"
    """What a NaN or infinite loss (on any rank, in any micro batch of an optimizer step) does,
    decided the same on every rank before the step's last backward. ``stop``: nothing of that
    step is applied and the run exits non-zero with a message naming the step and the last
    complete checkpoint. ``skip``: the optimizer step is not applied (weights, fp32 masters,
    moments, masks and the learning-rate schedule stay as they were; the data moves on), counted
    in ``train/skipped_steps``; it needs DeepSpeed to skip steps whose gradient norm is not
    finite, which every ZeRO stage and fp16/bf16 does unless ``bf16.check_grad_overflow`` or
    ``zero_optimization.compute_grad_norm`` is false (refused at start)."""


DEFAULT_SPARSE_PARAMS = ("bert.encoder.layer.*.weight",)


class SparsityConfig(_Section):
    """The ``"sparsity"`` section: which weights are sparse, how sparse, and how masks change.

    Defaults follow the papers: RigL (Evci et al. 2020) updates every 100 steps, drops 30% of
    the active weights with cosine decay and stops changing masks at 75% of training; GMP
    (Zhu & Gupta 2017) prunes on a cubic schedule.
    """

    method: Literal["static", "gmp", "set", "rigl"]
    """static: fixed mask; gmp: gradual magnitude pruning from dense; set: magnitude drop +
    random regrow (SET, Graphcore's method); rigl: magnitude drop + dense-gradient regrow."""

    sparsity: float = Field(ge=0.0, lt=1.0)
    """Target fraction of zero weights over the selected parameters, in [0, 1)."""

    pattern: Literal["unstructured", "block", "nm"] = "unstructured"
    """unstructured; block (square blocks of ``block_size``, scored by block norm); nm (``n`` of
    every ``m`` consecutive weights along the input dimension; static and gmp only)."""

    block_size: int = Field(default=16, ge=1)
    """Side of a square block for ``pattern: "block"``; must divide each (sharded) weight."""

    n: int = Field(default=2, ge=1)
    """N of N:M: weights kept in every group of ``m``."""

    m: int = Field(default=4, ge=2)
    """M of N:M: group length along the input dimension."""

    distribution: Literal["uniform", "erk"] = "uniform"
    """Per-layer density: the same everywhere, or Erdős–Rényi-Kernel (RigL) by layer shape."""

    params: list[str] = Field(default_factory=lambda: list(DEFAULT_SPARSE_PARAMS))
    """Glob patterns on parameter names; default: the encoder's Linear weights (embeddings,
    pooler and heads stay dense). LayerNorm weights never take part."""

    exclude: list[str] = Field(default_factory=list)
    """Glob patterns removed from the selection."""

    init: Literal["random", "magnitude"] = "random"
    """How the first mask is drawn for static, set and rigl (gmp always starts dense)."""

    update_interval: int = Field(default=100, ge=1)
    """Steps between mask updates (dT) for set, rigl and gmp."""

    drop_fraction: float = Field(default=0.3, gt=0.0, le=1.0)
    """Fraction of the active weights dropped (and regrown) at an update, before decay."""

    drop_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay of the drop fraction to zero at ``end_fraction`` of training."""

    start_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Fraction of ``--max-steps`` before which masks do not change (gmp: pruning starts)."""

    end_fraction: float = Field(default=0.75, gt=0.0, le=1.0)
    """Fraction of ``--max-steps`` after which masks stop changing (gmp: target reached)."""

    balance: Literal["global", "shard"] = "global"
    """Tensor parallel: decide over the whole weight, the same at any TP degree (global), or
    keep the same count in every shard (shard)."""

    seed: int = 0
    """Seeds random masks and random regrowth, keyed by (seed, step, parameter)."""

    verify: bool = True
    """After every mask update, compare a checksum of every mask across data-parallel ranks."""

    after_shrink: bool = False
    """With a ``"structured_pruning"`` section: train dense through the search and draw the first
    masks on the shrunk model (false: masks from the start, carried through the shrink)."""

    @model_validator(mode="after")
    def _check(self):
        if self.pattern == "nm":
            if self.n >= self.m:
                raise ValueError(f"N:M needs n < m, got n={self.n}, m={self.m}")
            if self.method in ("set", "rigl"):
                raise ValueError("pattern \"nm\" is for method static or gmp (N:M masks are not regrown)")
        if self.end_fraction <= self.start_fraction:
            raise ValueError(f"end_fraction {self.end_fraction} must be after start_fraction {self.start_fraction}")
        return self


class StructuredPruningConfig(_Section):
    """The ``"structured_pruning"`` section: EarlyBERT (Chen et al., ACL 2021) on our BERT.

    Learnable slimming coefficients scale every attention head and FFN neuron, pushed towards
    zero by an L1 penalty. Every ``check_interval`` steps the heads and neurons to keep are read
    off the coefficients; once the keep-set stops moving (normalised Hamming distance between
    consecutive checks below ``epsilon`` for ``window`` checks in a row) the early-bird ticket is
    drawn, the model is physically shrunk to it and training continues on the smaller model.
    """

    method: Literal["earlybert"] = "earlybert"
    """The structured pruning method (EarlyBERT: slimming coefficients + early-bird ticket)."""

    head_ratio: float = Field(default=0.33, ge=0.0, lt=1.0)
    """Fraction of the attention heads removed (EarlyBERT's pre-training setting: a third)."""

    ffn_ratio: float = Field(default=0.4, ge=0.0, lt=1.0)
    """Fraction of the FFN neurons removed (EarlyBERT: 40%)."""

    scope: Literal["layer", "global"] = "layer"
    """layer: every layer loses the same fraction; global: coefficients compete across layers
    (each layer keeps at least the minimum, and a multiple of the tensor-parallel degree)."""

    l1: float = Field(default=1e-4, ge=0.0)
    """Weight of the L1 penalty on the slimming coefficients (EarlyBERT used 1e-4)."""

    check_interval: int = Field(default=10, ge=1)
    """Steps between two readings of the keep-set."""

    window: int = Field(default=5, ge=1)
    """Consecutive distances that must all be below ``epsilon`` to draw the ticket."""

    epsilon: float = Field(default=0.1, gt=0.0, le=1.0)
    """Threshold on the normalised Hamming distance between consecutive keep-sets."""

    max_search_steps: int = Field(default=1000, ge=1)
    """The search ends at this step anyway (the ticket is drawn from the current
    coefficients, with a warning)."""

    min_heads: int = Field(default=1, ge=1)
    """Fewest heads a layer keeps (raised to the tensor-parallel degree if that is larger)."""

    min_neurons: int = Field(default=1, ge=1)
    """Fewest FFN neurons a layer keeps (rounded up like every FFN width, see ``ffn_multiple``)."""

    ffn_multiple: int = Field(default=8, ge=1)
    """Kept FFN widths are multiples of this times the tensor-parallel degree (8 keeps bf16
    matrix shapes friendly to tensor cores; 1 keeps the exact ratio on tiny models)."""

    verify_tolerance: float | None = Field(default=None, gt=0.0)
    """At the shrink, the small model's outputs on a fixed batch are compared with the masked
    model's: the largest difference relative to the largest logit must be below this (default
    1e-4 for fp32 engines, 3e-2 for bf16/fp16) or the run stops."""

    @model_validator(mode="after")
    def _check(self):
        if self.head_ratio == 0.0 and self.ffn_ratio == 0.0:
            raise ValueError("head_ratio and ffn_ratio are both 0: nothing would be pruned")
        return self


class DistillationConfig(_Section):
    """The ``"distillation"`` section: a frozen teacher beside the student.

    The loss is ``hard * (the task's or MLM's own loss) + logits * soft cross-entropy of the
    student's logits against the teacher's at ``temperature`` (times temperature^2, Hinton et al.;
    MSE for regression) + hidden * MSE of hidden states (the embedding output and every student
    layer's output against its teacher layer's) + attention * MSE of pre-softmax attention scores
    (TinyBERT). In pre-training the logits are the MLM logits at the masked positions.
    SparseBERT's recipe: logits, hidden and attention at 1, hard 0; Prune Once for All's
    pre-training recipe: hard 0.5, logits 0.5, temperature 2.
    """

    teacher: str
    """A fine-tuned model for the same task (pre-training: a pre-trained model) on disk: a dist_sparse
    run or checkpoint, or a Hugging Face BERT folder. Its tokenizer must be the student's."""

    teacher_tag: str | None = None
    """Checkpoint tag of a dist_sparse teacher run (default: the one ``latest`` names)."""

    temperature: float = Field(default=1.0, gt=0.0)
    """Softmax temperature of the soft cross-entropy on logits."""

    logits: float = Field(default=1.0, ge=0.0)
    """Weight of the soft cross-entropy (regression: MSE) between student and teacher logits."""

    hidden: float = Field(default=0.0, ge=0.0)
    """Weight of the MSE between hidden states (needs the same hidden size)."""

    attention: float = Field(default=0.0, ge=0.0)
    """Weight of the MSE between attention scores (needs the same head count in mapped layers)."""

    hard: float = Field(default=0.0, ge=0.0)
    """Weight of the student's own loss on the labels (task loss, or MLM in pre-training)."""

    layer_map: list[int] | None = None
    """Teacher layer (0-based) whose output each student layer learns; default: the same layer
    when the depths match, else evenly spaced (student layer i -> teacher layer
    (i + 1) * T / S - 1, TinyBERT's uniform map). Must be increasing."""

    teacher_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """The teacher's precision: auto is bf16 on a GPU and fp32 on the CPU."""

    @model_validator(mode="after")
    def _check(self):
        if self.logits == self.hidden == self.attention == self.hard == 0.0:
            raise ValueError("every loss weight (logits, hidden, attention, hard) is 0: nothing to train on")
        if self.layer_map is not None:
            if not self.layer_map or min(self.layer_map) < 0:
                raise ValueError(f"layer_map {self.layer_map}: teacher layers are 0-based indices, one per student layer")
            if any(b <= a for a, b in zip(self.layer_map, self.layer_map[1:])):
                raise ValueError(f"layer_map {self.layer_map} must be increasing (student layer i learns a teacher "
                                 "layer below student layer i+1's)")
        return self

    def resolved_layer_map(self, student_layers: int, teacher_layers: int) -> list[int]:
        """Teacher layer per student layer; ValueError when it cannot be one."""
        if self.layer_map is not None:
            if len(self.layer_map) != student_layers:
                raise ValueError(f"distillation.layer_map has {len(self.layer_map)} entries, the student has "
                                 f"{student_layers} layers")
            if self.layer_map[-1] >= teacher_layers:
                raise ValueError(f"distillation.layer_map names teacher layer {self.layer_map[-1]}, the teacher "
                                 f"has {teacher_layers} layers (0-based)")
            return list(self.layer_map)
        if student_layers > teacher_layers and (self.hidden or self.attention):
            raise ValueError(f"the student has {student_layers} layers, the teacher {teacher_layers}: give "
                             "distillation.layer_map (a teacher layer per student layer) or set hidden and "
                             "attention to 0")
        if student_layers > teacher_layers:
            return []  # only logits: no layer is matched
        step = teacher_layers // student_layers if teacher_layers % student_layers == 0 else None
        if step is not None:
            return [(i + 1) * step - 1 for i in range(student_layers)]
        return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


class DynaBertConfig(_Section):
    """The ``"dynabert"`` section: DynaBERT (Hou et al., NeurIPS 2020), one model whose sub-networks
    at every width and depth multiplier work.

    Every optimizer step runs forward and backward of each sub-network in the step's schedule on
    every micro batch and applies the sum of their gradients. A sub-network of width ``m`` keeps the
    ``m * heads`` most important heads and ``m * FFN`` most important neurons of every layer; depth
    ``d`` keeps ``d * layers`` layers spread evenly (0.5: every other layer). The loss of each
    sub-network is the ``"distillation"`` section's (soft cross-entropy on logits and MSE on hidden
    states against the teacher, a dropped layer's teacher layer skipped with it; ``hard`` for the
    labels), or the task's own loss without that section.

    Phase 1 (width): the importance of heads and neurons is measured on ``importance_batches``
    batches of the validation split with the task loss, and the weights are rewired so that every
    width is a prefix on every tensor-parallel shard; teacher: the fine-tuned dense model. Phase 2
    (width and depth) starts from a phase-1 run (already rewired); teacher: that phase-1 model.
    """

    phase: Literal[1, 2] = 1
    """1: width-adaptive, measures importance and rewires; 2: width- and depth-adaptive, from a phase-1 run."""

    width_mult: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    """Width multipliers (of heads and FFN neurons alike); must include 1.0."""

    depth_mult: list[float] = Field(default_factory=lambda: [1.0])
    """Depth multipliers; phase 1 allows only [1.0], phase 2 e.g. [0.5, 0.75, 1.0]; must include 1.0."""

    importance_batches: int = Field(default=32, ge=1)
    """Micro batches of the validation split (in order, the micro batch size) that measure importance."""

    subnetworks: Literal["all"] | int = "all"
    """Sub-networks per step: "all" of width_mult x depth_mult, or this many: the full model and a
    seeded draw of the others, the same on every rank."""

    @model_validator(mode="after")
    def _check(self):
        for name in ("width_mult", "depth_mult"):
            values = getattr(self, name)
            if not values or any(not 0 < v <= 1 for v in values) or len(set(values)) != len(values):
                raise ValueError(f"{name} {values}: distinct multipliers in (0, 1]")
            if 1.0 not in values:
                # The full model's pass opens every step: under ZeRO-3 the first backward of a step
                # overwrites the gradient partitions (later ones add), so it must reach every parameter.
                raise ValueError(f"{name} {values} must include 1.0 (the full model)")
        if self.phase == 1 and self.depth_mult != [1.0]:
            raise ValueError(f"phase 1 is width-adaptive only: depth_mult must be [1.0], not {self.depth_mult} "
                             "(train depth in phase 2, from the phase-1 run)")
        total = len(self.width_mult) * len(self.depth_mult)
        if isinstance(self.subnetworks, int) and not 1 <= self.subnetworks <= total:
            raise ValueError(f"subnetworks {self.subnetworks}: between 1 and {total} (the schedule's size), or \"all\"")
        return self

    def schedule(self) -> list[tuple[float, float]]:
        """Every (width, depth), largest first (DynaBERT's order): the full model's pass opens a step."""
        return sorted(((w, d) for d in self.depth_mult for w in self.width_mult), key=lambda wd: (wd[1], wd[0]),
                      reverse=True)


class RunConfig(BaseModel):
    """A DeepSpeed config split into DeepSpeed's part and ours."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    deepspeed: dict[str, Any]
    training: TrainingConfig
    sparsity: SparsityConfig | None = None
    structured_pruning: StructuredPruningConfig | None = None
    distillation: DistillationConfig | None = None
    dynabert: DynaBertConfig | None = None

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))

    @property
    def tp_size(self) -> int:
        return int(self.deepspeed.get("tensor_parallel", {}).get("autotp_size", 1) or 1)


def _format_validation_error(section: str, model: type[BaseModel], err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f'unknown key "{section}.{where}" (known keys: {", ".join(sorted(model.model_fields))})')
        else:
            lines.append(f'"{section}{"." + where if where else ""}": {e["msg"]}')
    return "; ".join(lines)


def parse_section(raw: dict[str, Any], section: str, model: type[BaseModel], source: str):
    """Validate one of our sections; a missing section gives the defaults."""
    body = raw.get(section, {})
    if not isinstance(body, dict):
        raise ValueError(f'{source}: "{section}" must be a JSON object')
    try:
        return model(**body)
    except ValidationError as err:
        raise ValueError(f"{source}: {_format_validation_error(section, model, err)}") from None


def parse_run_config(raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Split and validate a DeepSpeed config dict. Raises ValueError naming what to fix."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: a DeepSpeed config must be a JSON object")
    ds = {k: v for k, v in raw.items() if k not in OWN_SECTIONS}
    sparsity = parse_section(raw, "sparsity", SparsityConfig, source) if "sparsity" in raw else None
    structured = (parse_section(raw, "structured_pruning", StructuredPruningConfig, source)
                  if "structured_pruning" in raw else None)
    if sparsity is not None and sparsity.after_shrink and structured is None:
        raise ValueError(f'{source}: "sparsity.after_shrink" needs a "structured_pruning" section (there is no '
                         "shrink to wait for); remove it")
    distillation = (parse_section(raw, "distillation", DistillationConfig, source)
                    if "distillation" in raw else None)
    dynabert = parse_section(raw, "dynabert", DynaBertConfig, source) if "dynabert" in raw else None
    if dynabert is not None:
        if structured is not None or sparsity is not None:
            raise ValueError(f'{source}: "dynabert" with a "{"structured_pruning" if structured else "sparsity"}" '
                             "section is not supported: DynaBERT's sub-networks are cut from a dense model; remove "
                             "one of the two")
        if distillation is not None and distillation.attention > 0:
            raise ValueError(f'{source}: "dynabert" distils logits and hidden states; set distillation.attention '
                             "to 0 (a sub-network's attention has fewer heads than the teacher's)")
    return RunConfig(deepspeed=ds, training=parse_section(raw, "training", TrainingConfig, source),
                     sparsity=sparsity, structured_pruning=structured, distillation=distillation,
                     dynabert=dynabert)


def load_run_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"DeepSpeed config {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    return parse_run_config(raw, source=str(path))


def resolve_batch_sizes(ds: dict[str, Any], dp_size: int) -> tuple[int, int, int]:
    """Return (global batch, micro batch per rank, gradient accumulation) for ``dp_size``.

    DeepSpeed derives a missing one of the three from the other two; we do the same here
    first so that a mismatch is reported in terms the user wrote, before any process group
    or model exists.
    """
    train = ds.get("train_batch_size")
    micro = ds.get("train_micro_batch_size_per_gpu")
    gas = ds.get("gradient_accumulation_steps")
    given = {k: v for k, v in (("train_batch_size", train), ("train_micro_batch_size_per_gpu", micro),
                                 ("gradient_accumulation_steps", gas)) if v is not None}
    for k, v in given.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")
    if micro is None and train is None:
        raise ValueError("set train_micro_batch_size_per_gpu (and train_batch_size or "
                         "gradient_accumulation_steps) in the DeepSpeed config")
    if train is None:
        gas = gas or 1
        train = micro * gas * dp_size
    elif micro is None:
        gas = gas or 1
        if train % (gas * dp_size):
            raise ValueError(f"train_batch_size {train} is not divisible by gradient_accumulation_steps "
                             f"{gas} x data-parallel size {dp_size}")
        micro = train // (gas * dp_size)
    elif gas is None:
        if train % (micro * dp_size):
            raise ValueError(f"train_batch_size {train} is not divisible by train_micro_batch_size_per_gpu "
                             f"{micro} x data-parallel size {dp_size}")
        gas = train // (micro * dp_size)
    if train != micro * gas * dp_size:
        raise ValueError(
            f"batch sizes do not multiply out: train_batch_size {train} != train_micro_batch_size_per_gpu "
            f"{micro} x gradient_accumulation_steps {gas} x data-parallel size {dp_size} "
            f"(= {micro * gas * dp_size}); fix one of the three or change the number of ranks")
    return train, micro, gas


def lr_multiplier(step: int, cfg: TrainingConfig, max_steps: int) -> float:
    """Learning-rate multiplier of the peak at optimizer step ``step`` (0-based): pure function."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_fraction * max_steps)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if cfg.decay == "constant" or max_steps <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (max_steps - warmup))
    end = cfg.end_lr_fraction
    if cfg.decay == "linear":
        shape = 1.0 - progress
    elif cfg.decay == "polynomial":
        shape = (1.0 - progress) ** cfg.decay_power
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return end + (1.0 - end) * shape
