"""Standard BERT sizes, config/model builders, parameter and FLOP counting.

The sizes are those of Google's BERT release (Turc et al. 2019 for the small ones): the FFN is
always 4x hidden and the head width 64.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .bert import DistSparseBertForPreTraining
from .config import DistSparseBertConfig

# name -> (num_hidden_layers, hidden_size, num_attention_heads, intermediate_size)
_SIZES: dict[str, tuple[int, int, int, int]] = {
    "bert-tiny": (2, 128, 2, 512),
    "bert-mini": (4, 256, 4, 1024),
    "bert-small": (4, 512, 8, 2048),
    "bert-medium": (8, 512, 8, 2048),
    "bert-base": (12, 768, 12, 3072),
    "bert-large": (24, 1024, 16, 4096),
}

PRESETS: dict[str, dict[str, int]] = {
    name: {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "intermediate_size": ffn,
    }
    for name, (layers, hidden, heads, ffn) in _SIZES.items()
}


def build_config(
    preset: str,
    vocab_size: int,
    max_position_embeddings: int = 512,
    type_vocab_size: int = 2,
    pad_token_id: int = 0,
    **overrides: Any,
) -> DistSparseBertConfig:
    """Config of a named preset; ``overrides`` replace any field, preset sizes included
    (e.g. ``layer_num_heads=[...]`` or ``hidden_dropout_prob=0.0``).

    The vocabulary size has no default on purpose: it comes from the tokenizer actually trained.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    fields: dict[str, Any] = dict(PRESETS[preset])
    fields.update(
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        type_vocab_size=type_vocab_size,
        pad_token_id=pad_token_id,
    )
    fields.update(overrides)
    return DistSparseBertConfig(**fields)


def build_model(config: DistSparseBertConfig) -> DistSparseBertForPreTraining:
    """A freshly initialised pre-training model (seed torch first for reproducible weights: with
    uniform sizes the weights equal those of ``BertForPreTraining`` built after the same seed)."""
    return DistSparseBertForPreTraining(config)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters; tied weights (decoder = word embeddings) count once.

    Under ZeRO-3 a parameter's local tensor is an empty placeholder; its full size is
    ``ds_numel``, which is used when present.  Under AutoTP the count is that of this rank's shards.
    """
    total = 0
    for p in model.parameters():  # parameters() already skips shared (tied) tensors
        if trainable_only and not p.requires_grad:
            continue
        total += int(getattr(p, "ds_numel", p.numel()))
    return total


def dense_flops_per_token(config: DistSparseBertConfig, seq_len: int, *, training: bool = False,
                          mlm_fraction: float = 1.0) -> float:
    """Forward FLOPs per token of the model as built (per-layer sizes honoured, no weight sparsity).

    With ``H`` = hidden_size, ``d`` = head_dim, ``V`` = vocab_size, and for layer ``l``
    ``h_l`` heads and ``I_l`` FFN neurons, a multiply-add counting 2 FLOPs::

        per layer   2 * (3*H*h_l*d      Q, K, V projections
                         + h_l*d*H      attention output projection
                         + 2*H*I_l)     FFN up and down projections
                  + 2 * 2 * seq_len * h_l * d     scores Q.K^T and context P.V
        MLM head    2 * (H*H + H*V) * mlm_fraction    transform dense + decoder, on the tokens
                                        it runs on: every token without labels (inference,
                                        export), the masked ones in training (the model then
                                        computes logits at the masked positions only: pass the
                                        masking probability, 0.15, for a pre-training step)
        NSP         2 * (H*H + 2*H) / seq_len     pooler + classifier, once per sequence

    Biases, LayerNorm, GELU, softmax, dropout and embedding lookups are left out (elementwise,
    < 1% for BERT-base and up).  ``training=True`` returns 3x forward (backward = 2x forward: the
    gradients with respect to activations and to weights), the usual convention for MFU.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not 0.0 <= mlm_fraction <= 1.0:
        raise ValueError(f"mlm_fraction must be in [0, 1], got {mlm_fraction}")
    hidden, head_dim, vocab = config.hidden_size, config.head_dim, config.vocab_size
    flops = 0.0
    for layer in range(config.num_hidden_layers):
        inner = config.heads_of(layer) * head_dim
        matmul_params = 3 * hidden * inner + inner * hidden + 2 * hidden * config.intermediate_of(layer)
        flops += 2 * matmul_params + 2 * 2 * seq_len * inner
    flops += 2 * (hidden * hidden + hidden * vocab) * mlm_fraction
    flops += 2 * (hidden * hidden + 2 * hidden) / seq_len
    return 3 * flops if training else flops


__all__ = ["PRESETS", "build_config", "build_model", "count_parameters", "dense_flops_per_token"]
