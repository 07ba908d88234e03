"""BERT for pre-training with a head count and an FFN width per layer.

Written against transformers v5, which removed ``prune_heads``.  Two constraints shape it:

* Module names and state-dict keys are exactly those of ``transformers.BertForPreTraining``
  (``bert.encoder.layer.{i}.attention.self.query`` ...).  DeepSpeed AutoTP picks what to split by
  these names, and checkpoints / the dense Hugging Face export map one to one.
* With uniform sizes it is the same function as ``BertForPreTraining``.  A layer with fewer heads
  only has narrower Q/K/V outputs and a narrower ``attention.output.dense`` input; a layer with
  fewer FFN neurons a narrower ``intermediate.dense`` output / ``output.dense`` input.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (flash /
memory-efficient kernels on GPU). Only when a caller asks for the attention scores (distillation
reads them, ``output_attention_scores=True``) does a layer compute them explicitly, as
``q @ k^T * scale`` before the padding bias and the softmax (TinyBERT's choice: scores, not
probabilities, carry the teacher's attention without the softmax flattening it).

The MLM head runs at every position unless the caller passes ``mlm_positions`` (training does:
the collator knows the masked positions on the host): then only those rows go through the
transform and the decoder (~15% of the tokens; NVIDIA's BERT recipe), with the same loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (BaseModelOutputWithPooling, MaskedLMOutput, QuestionAnsweringModelOutput,
                                           SequenceClassifierOutput, TokenClassifierOutput)

from .config import DistSparseBertConfig

try:  # reuse HF's output type so downstream code can treat both models alike
    from transformers.models.bert.modeling_bert import BertForPreTrainingOutput
except ImportError:  # pragma: no cover - only if transformers moves it
    from dataclasses import dataclass

    from transformers.utils import ModelOutput

    @dataclass
    class BertForPreTrainingOutput(ModelOutput):
        loss: torch.Tensor | None = None
        prediction_logits: torch.Tensor | None = None
        seq_relationship_logits: torch.Tensor | None = None
        hidden_states: tuple[torch.Tensor, ...] | None = None
        attentions: tuple[torch.Tensor, ...] | None = None


IGNORE_INDEX = -100


@dataclass
class DistSparseBertModelOutput(BaseModelOutputWithPooling):
    """``BaseModelOutputWithPooling`` plus ``attention_scores``: per layer, the (batch, heads this rank
    holds, seq, seq) pre-softmax scores, when asked for. HF's ``attentions`` are probabilities and
    this model never computes those, so the two are kept apart."""

    attention_scores: tuple[torch.Tensor, ...] | None = None


@dataclass
class DistSparsePreTrainingOutput(BertForPreTrainingOutput):
    """``BertForPreTrainingOutput`` plus the encoder's attention scores (see DistSparseBertModelOutput)."""

    attention_scores: tuple[torch.Tensor, ...] | None = None


@dataclass
class DistSparseSequenceClassifierOutput(SequenceClassifierOutput):
    """``SequenceClassifierOutput`` plus the encoder's attention scores (see DistSparseBertModelOutput)."""

    attention_scores: tuple[torch.Tensor, ...] | None = None


@dataclass
class DistSparseTokenClassifierOutput(TokenClassifierOutput):
    """``TokenClassifierOutput`` plus the encoder's attention scores (see DistSparseBertModelOutput)."""

    attention_scores: tuple[torch.Tensor, ...] | None = None


@dataclass
class DistSparseQuestionAnsweringOutput(QuestionAnsweringModelOutput):
    """``QuestionAnsweringModelOutput`` plus the encoder's attention scores (see DistSparseBertModelOutput)."""

    attention_scores: tuple[torch.Tensor, ...] | None = None


def _activation(config: DistSparseBertConfig):
    return ACT2FN[config.hidden_act] if isinstance(config.hidden_act, str) else config.hidden_act


def padding_mask_to_additive(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Turn a ``(batch, seq)`` 1 = keep / 0 = pad mask into an additive ``(batch, 1, 1, seq)`` bias.

    An additive bias with the dtype's most negative finite value (not -inf, not a boolean mask)
    keeps a row whose keys are all padding finite: it softmaxes to a uniform row instead of NaN,
    as in HF's eager BERT.  ``None`` stays ``None`` so SDPA may pick a mask-free flash kernel;
    callers with unpadded batches should therefore pass no mask at all.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must have shape (batch, seq), got {tuple(attention_mask.shape)}")
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


class DistSparseBertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout (as HF BERT)."""

    def __init__(self, config: DistSparseBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Non-persistent so the state dict has exactly HF's keys; they only save an arange per step.
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if position_ids is None:
            position_ids = self.position_ids[:, :seq_len]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class DistSparseBertSelfAttention(nn.Module):
    """Q/K/V projections and SDPA for ``config.heads_of(layer_idx)`` heads of width ``head_dim``."""

    def __init__(self, config: DistSparseBertConfig, layer_idx: int):
        super().__init__()
        self.num_heads = config.heads_of(layer_idx)  # informational only: forward infers it (TP shards)
        self.head_dim = config.head_dim
        inner = self.num_heads * self.head_dim
        self.query = nn.Linear(config.hidden_size, inner)
        self.key = nn.Linear(config.hidden_size, inner)
        self.value = nn.Linear(config.hidden_size, inner)
        self.dropout_p = float(config.attention_probs_dropout_prob)
        self.scaling = self.head_dim**-0.5
        # Under tensor parallelism this rank's heads are a shard: their dropout must not draw the
        # mask that its TP peers draw for theirs. The trainer installs a callable returning the
        # context to draw it in (dist_sparse.distributed.rng); None, as in an exported model,
        # draws from torch's global generator.
        self.dropout_rng_region: Callable[[], contextlib.AbstractContextManager] | None = None
        # EarlyBERT's slimming coefficients, one per head this rank holds; absent (None, not in
        # the state dict) unless structured pruning attaches them (dist_sparse.structured).
        self.register_parameter("slimming_coef", None)
        # DynaBERT's per-head gate over this rank's heads (dist_sparse.dynabert): 0/1 selects a
        # sub-network's heads, a tensor of ones that requires grad measures head importance. Not a
        # parameter and not in the state dict; None outside DynaBERT.
        self.head_gate: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor | None = None,
                return_scores: bool = False):
        """The heads' context, (batch, seq, heads * head_dim); with ``return_scores`` also the
        pre-softmax scores (batch, heads, seq, seq), computed explicitly instead of by SDPA."""
        batch, seq = hidden_states.shape[:2]
        # -1 for the head count: under AutoTP a rank holds only its slice of the Q/K/V rows, i.e.
        # fewer heads than the config says, and a pruned layer fewer than num_attention_heads.
        split = (batch, seq, -1, self.head_dim)
        q = self.query(hidden_states)
        if q.shape[-1] % self.head_dim != 0:
            # AutoTP splits rows evenly without looking at heads: a layer whose kept head count
            # is not divisible by the TP degree ends up with a fraction of a head per rank.
            raise ValueError(
                f"attention projection has {q.shape[-1]} output features, not a whole number of heads of "
                f"width {self.head_dim}; under tensor parallelism every layer's head count must be "
                "divisible by the tensor-parallel degree"
            )
        q = q.view(split).transpose(1, 2)
        k = self.key(hidden_states).view(split).transpose(1, 2)
        v = self.value(hidden_states).view(split).transpose(1, 2)
        dropout_p = self.dropout_p if self.training else 0.0
        region = self.dropout_rng_region
        scores = None
        with region() if region is not None and dropout_p > 0 else contextlib.nullcontext():
            if return_scores:
                scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling
                biased = scores if attention_bias is None else scores + attention_bias
                # softmax in fp32 as SDPA's kernels accumulate it; dropout on the probabilities as SDPA
                probs = F.dropout(torch.softmax(biased.float(), dim=-1).to(q.dtype), p=dropout_p)
                context = torch.matmul(probs, v)
            else:
                context = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=attention_bias,
                    dropout_p=dropout_p,
                    scale=self.scaling,
                )
        if self.slimming_coef is not None:  # (batch, heads, seq, head_dim) scaled per head
            context = context * self.slimming_coef.to(context.dtype).view(1, -1, 1, 1)
        if self.head_gate is not None:
            context = context * self.head_gate.to(context.dtype).view(1, -1, 1, 1)
        context = context.transpose(1, 2).reshape(batch, seq, -1)
        return (context, scores) if return_scores else context


class DistSparseBertSelfOutput(nn.Module):
    """``attention.output``: projects the concatenated heads back to hidden, residual, LayerNorm."""

    def __init__(self, config: DistSparseBertConfig, layer_idx: int):
        super().__init__()
        # Input width follows the kept heads: removing a head removes its head_dim input columns.
        self.dense = nn.Linear(config.heads_of(layer_idx) * config.head_dim, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(context)) + residual)


class DistSparseBertAttention(nn.Module):
    def __init__(self, config: DistSparseBertConfig, layer_idx: int):
        super().__init__()
        self.self = DistSparseBertSelfAttention(config, layer_idx)
        self.output = DistSparseBertSelfOutput(config, layer_idx)

    def forward(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor | None = None,
                return_scores: bool = False):
        if return_scores:
            context, scores = self.self(hidden_states, attention_bias, return_scores=True)
            return self.output(context, hidden_states), scores
        return self.output(self.self(hidden_states, attention_bias), hidden_states)


class DistSparseBertIntermediate(nn.Module):
    def __init__(self, config: DistSparseBertConfig, layer_idx: int):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_of(layer_idx))
        self.intermediate_act_fn = _activation(config)
        # One slimming coefficient per FFN neuron this rank holds (see the attention's).
        self.register_parameter("slimming_coef", None)
        # DynaBERT's gates over this rank's neurons (see the attention's head_gate): ``neuron_gate``
        # scales the activation; ``neuron_pre_gate`` the pre-activation (its gradient at 1 is the
        # first-order Taylor score of the up-projection row, only used to measure importance).
        self.neuron_gate: torch.Tensor | None = None
        self.neuron_pre_gate: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        pre = self.dense(hidden_states)
        if self.neuron_pre_gate is not None:
            pre = pre * self.neuron_pre_gate.to(pre.dtype)
        out = self.intermediate_act_fn(pre)
        if self.slimming_coef is not None:
            out = out * self.slimming_coef.to(out.dtype)
        if self.neuron_gate is not None:
            out = out * self.neuron_gate.to(out.dtype)
        return out


class DistSparseBertOutput(nn.Module):
    """FFN down-projection, residual, LayerNorm."""

    def __init__(self, config: DistSparseBertConfig, layer_idx: int):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_of(layer_idx), config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class DistSparseBertLayer(GradientCheckpointingLayer):
    """One post-LN transformer block; GradientCheckpointingLayer makes
    ``model.gradient_checkpointing_enable()`` work (hidden_states must stay positional)."""

    def __init__(self, config: DistSparseBertConfig, layer_idx: int):
        super().__init__()
        self.attention = DistSparseBertAttention(config, layer_idx)
        self.intermediate = DistSparseBertIntermediate(config, layer_idx)
        self.output = DistSparseBertOutput(config, layer_idx)

    def forward(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor | None = None,
                return_scores: bool = False):
        if return_scores:
            attention_output, scores = self.attention(hidden_states, attention_bias, return_scores=True)
            return self.output(self.intermediate(attention_output), attention_output), scores
        attention_output = self.attention(hidden_states, attention_bias)
        return self.output(self.intermediate(attention_output), attention_output)


class DistSparseBertEncoder(nn.Module):
    def __init__(self, config: DistSparseBertConfig):
        super().__init__()
        self.layer = nn.ModuleList([DistSparseBertLayer(config, i) for i in range(config.num_hidden_layers)])
        # DynaBERT's depth: the layers a sub-network runs (None: all). Every rank must run the
        # same ones (under ZeRO-3 each layer's forward gathers its parameters collectively).
        self.active_layers: list[int] | None = None

    def forward(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor | None = None,
                output_hidden_states: bool = False, output_attention_scores: bool = False):
        """(last hidden states, every layer's input and the last output or None, every layer's
        attention scores or None). ``all_hidden[0]`` is the embedding output, as in HF."""
        all_hidden = [hidden_states] if output_hidden_states else None
        all_scores = [] if output_attention_scores else None
        layers = self.layer if self.active_layers is None else [self.layer[i] for i in self.active_layers]
        for layer in layers:
            if output_attention_scores:
                hidden_states, scores = layer(hidden_states, attention_bias, return_scores=True)
                all_scores.append(scores)
            else:
                hidden_states = layer(hidden_states, attention_bias)
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        return (hidden_states, None if all_hidden is None else tuple(all_hidden),
                None if all_scores is None else tuple(all_scores))


class DistSparseBertPooler(nn.Module):
    """tanh(dense(first token)), the input of the NSP head."""

    def __init__(self, config: DistSparseBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class DistSparseBertPredictionHeadTransform(nn.Module):
    def __init__(self, config: DistSparseBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = _activation(config)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class DistSparseBertLMPredictionHead(nn.Module):
    def __init__(self, config: DistSparseBertConfig):
        super().__init__()
        self.transform = DistSparseBertPredictionHeadTransform(config)
        # decoder.weight is tied to the word embeddings and decoder.bias to ``self.bias`` by
        # PreTrainedModel.tie_weights (see _tied_weights_keys).  Both keys appear in the state
        # dict, exactly as in HF BERT, so checkpoints load either way.
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


def gather_positions(sequence_output: torch.Tensor, mlm_positions: torch.Tensor) -> torch.Tensor:
    """The rows ``mlm_positions`` (flat indices into batch * seq) of a (batch, seq, hidden) tensor,
    as (n, hidden). ``index_select`` with an index tensor: no host sync, its backward scatters the
    gradient back (zeros at the other positions, which is what they get through the full head)."""
    return sequence_output.reshape(-1, sequence_output.shape[-1]).index_select(0, mlm_positions)


def _mlm_head(predictions: nn.Module, sequence_output: torch.Tensor, labels: torch.Tensor | None,
              mlm_positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(MLM logits, mean MLM cross entropy or None).

    Without ``mlm_positions``: logits at every position (batch, seq, vocab), as stock BERT. With
    them (flat int64 indices into batch * seq, ascending, the positions whose label != -100, as
    ``MlmCollator`` returns them): the transform and the decoder run on those rows only and the
    logits are (n, vocab) in that order (the order of ``logits[labels != -100]``). The loss is the
    same mean over the same tokens; about 85% of the head's work is saved (NVIDIA's BERT recipe).
    """
    if mlm_positions is None:
        logits = predictions(sequence_output)
        return logits, None if labels is None else _mlm_loss(logits, labels)
    logits = predictions(gather_positions(sequence_output, mlm_positions))
    if labels is None:
        return logits, None
    # -100 stays ignored, so positions that were not masked (a caller's choice) cannot count.
    return logits, _mlm_loss(logits, labels.reshape(-1).index_select(0, mlm_positions))


class DistSparseBertPreTrainingHeads(nn.Module):
    def __init__(self, config: DistSparseBertConfig):
        super().__init__()
        self.predictions = DistSparseBertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, sequence_output: torch.Tensor, pooled_output: torch.Tensor):
        return self.predictions(sequence_output), self.seq_relationship(pooled_output)


class DistSparseBertPreTrainedModel(PreTrainedModel):
    config_class = DistSparseBertConfig
    config: DistSparseBertConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    # The attention is SDPA whatever config._attn_implementation says; declaring support keeps
    # transformers from rejecting the default "sdpa" choice.
    _supports_sdpa = True
    _no_split_modules = ["DistSparseBertEmbeddings", "DistSparseBertLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """BERT init: N(0, initializer_range) for linear and embedding weights, zero biases,
        LayerNorm 1/0, zero padding embedding row and MLM output bias.

        Uses transformers.initialization so that parameters already loaded by from_pretrained
        (flagged ``_is_hf_initialized``) are left alone.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, DistSparseBertLMPredictionHead):
            init.zeros_(module.bias)
        elif isinstance(module, DistSparseBertEmbeddings):
            # Buffers are not saved; recompute in case the model was built on the meta device.
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))


class DistSparseBertModel(DistSparseBertPreTrainedModel):
    """Embeddings + encoder (+ pooler): the ``bert.`` sub-module of the pre-training model."""

    def __init__(self, config: DistSparseBertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = DistSparseBertEmbeddings(config)
        self.encoder = DistSparseBertEncoder(config)
        self.pooler = DistSparseBertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_dict: bool = True,
        output_hidden_states: bool = False,
        output_attention_scores: bool = False,
    ):
        hidden_states = self.embeddings(input_ids, token_type_ids, position_ids)
        attention_bias = padding_mask_to_additive(attention_mask, hidden_states.dtype)
        sequence_output, all_hidden, all_scores = self.encoder(
            hidden_states, attention_bias, output_hidden_states=output_hidden_states,
            output_attention_scores=output_attention_scores)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        out = DistSparseBertModelOutput(last_hidden_state=sequence_output, pooler_output=pooled_output,
                                        hidden_states=all_hidden, attention_scores=all_scores)
        return out if return_dict else out.to_tuple()


# transformers v5 form: {target: source}; expanded by post_init() and applied by tie_weights().
_TIED_MLM_DECODER = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}


class _MLMDecoderAccess:
    """Output-embedding accessors of a model whose MLM decoder lives at ``cls.predictions``."""

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias


def _mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # fp32 for the log-softmax over the vocabulary: in bf16 it loses ~3 digits.
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


class DistSparseBertForPreTraining(_MLMDecoderAccess, DistSparseBertPreTrainedModel):
    """BERT with the MLM and NSP heads; state-dict compatible with ``BertForPreTraining``."""

    _tied_weights_keys = dict(_TIED_MLM_DECODER)

    def __init__(self, config: DistSparseBertConfig):
        super().__init__(config)
        self.bert = DistSparseBertModel(config)
        self.cls = DistSparseBertPreTrainingHeads(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        return_dict: bool = True,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attention_scores: bool = False,
        mlm_positions: torch.Tensor | None = None,
    ):
        """Logits of both heads, and the loss when labels are given.

        ``loss`` = mean MLM cross entropy over tokens whose label is not -100 (when ``labels``
        is given) + mean NSP cross entropy (when ``next_sentence_label`` is given).  HF only
        returns a loss when both are given; with both given the value is the same.

        ``mlm_positions`` (not in HF; training passes the collator's): flat int64 indices into
        batch * seq of the masked tokens. Given, the MLM head runs on those rows only and
        ``prediction_logits`` is (n_masked, vocab) in their order; the loss is the same. Not
        given (inspection, export, stock callers): (batch, seq, vocab) as ``BertForPreTraining``.
        """
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, return_dict=True,
                            output_hidden_states=output_hidden_states,
                            output_attention_scores=output_attention_scores)
        # The heads one by one rather than through self.cls(...): the MLM head may run on the
        # masked positions only (see _mlm_head); same modules, same state-dict keys.
        prediction_logits, loss = _mlm_head(self.cls.predictions, outputs.last_hidden_state, labels, mlm_positions)
        seq_relationship_logits = self.cls.seq_relationship(outputs.pooler_output)
        if next_sentence_label is not None:
            nsp_loss = F.cross_entropy(seq_relationship_logits.reshape(-1, 2).float(), next_sentence_label.reshape(-1))
            loss = nsp_loss if loss is None else loss + nsp_loss

        out = DistSparsePreTrainingOutput(
            loss=loss, prediction_logits=prediction_logits, seq_relationship_logits=seq_relationship_logits,
            hidden_states=outputs.hidden_states, attention_scores=outputs.attention_scores,
        )
        return out if return_dict else out.to_tuple()


class DistSparseBertOnlyMLMHead(nn.Module):
    def __init__(self, config: DistSparseBertConfig):
        super().__init__()
        self.predictions = DistSparseBertLMPredictionHead(config)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        return self.predictions(sequence_output)


class DistSparseBertForMaskedLM(_MLMDecoderAccess, DistSparseBertPreTrainedModel):
    """BERT with the MLM head only (``BertForMaskedLM``'s layout); loads a pre-training folder.

    Training does not use it; a compact export maps ``AutoModelForMaskedLM`` to it, so that
    ``pipeline("fill-mask")`` works on a folder with per-layer widths.
    """

    _tied_weights_keys = dict(_TIED_MLM_DECODER)
    # A pre-training folder also holds the pooler and the next-sentence head; not used here.
    _keys_to_ignore_on_load_unexpected = [r"^bert\.pooler\.", r"^cls\.seq_relationship\."]

    def __init__(self, config: DistSparseBertConfig):
        super().__init__(config)
        self.bert = DistSparseBertModel(config, add_pooling_layer=False)
        self.cls = DistSparseBertOnlyMLMHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool = True,
        position_ids: torch.Tensor | None = None,
        mlm_positions: torch.Tensor | None = None,
        **kwargs,
    ):
        """MLM logits, and the mean cross entropy over labels != -100 when ``labels`` is given.
        ``mlm_positions``: as in ``DistSparseBertForPreTraining.forward`` (logits at those rows
        only, (n, vocab)); without it (batch, seq, vocab) as ``BertForMaskedLM``. Extra keyword
        arguments (pipelines pass some) are accepted and ignored."""
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, return_dict=True)
        logits, loss = _mlm_head(self.cls.predictions, outputs.last_hidden_state, labels, mlm_positions)
        out = MaskedLMOutput(loss=loss, logits=logits)
        return out if return_dict else out.to_tuple()


class DistSparseBertForSequenceClassification(DistSparseBertPreTrainedModel):
    """BERT with a classification / regression head on the pooled first token; state-dict
    compatible with ``BertForSequenceClassification`` (``bert.*``, ``classifier.*``).

    ``config.num_labels == 1`` is regression (mean squared error), otherwise single-label
    classification (cross entropy), as HF decides when ``problem_type`` is unset. A folder of the
    pre-training model loads into it (its MLM/NSP heads are not used; the classifier starts new).
    """

    _keys_to_ignore_on_load_unexpected = [r"^cls\."]

    def __init__(self, config: DistSparseBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        if getattr(config, "problem_type", None) == "multi_label_classification":
            raise ValueError("multi-label classification is not supported; use one label per example")
        self.bert = DistSparseBertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool = True,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attention_scores: bool = False,
        **kwargs,
    ):
        """Logits (batch, num_labels), the loss when ``labels`` is given, and on request the
        hidden states (embedding output first) and attention scores a distillation reads."""
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, return_dict=True,
                            output_hidden_states=output_hidden_states,
                            output_attention_scores=output_attention_scores)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = task_loss(logits, labels, self.num_labels) if labels is not None else None
        out = DistSparseSequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                                 attention_scores=outputs.attention_scores)
        return out if return_dict else out.to_tuple()


# A pre-training or sequence-classification folder also holds what a per-token head has no use for.
_UNUSED_BY_TOKEN_HEADS = [r"^cls\.", r"^bert\.pooler\."]


class DistSparseBertForTokenClassification(DistSparseBertPreTrainedModel):
    """BERT with a linear classifier on every token (NER, POS tagging); state-dict compatible with
    ``BertForTokenClassification`` (``bert.*`` without a pooler, ``classifier.*``) and the same
    function: logits (batch, seq, num_labels), mean cross entropy over labels != -100.

    Training here does not use it; a compact export maps ``AutoModelForTokenClassification`` to it,
    so a model with per-layer widths can be fine-tuned for tagging by stock transformers code.
    """

    _keys_to_ignore_on_load_unexpected = list(_UNUSED_BY_TOKEN_HEADS)

    def __init__(self, config: DistSparseBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = DistSparseBertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool = True,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attention_scores: bool = False,
        **kwargs,
    ):
        """Per-token logits, and the loss when ``labels`` (batch, seq; -100 = not scored) is given.
        Extra keyword arguments (Trainer and pipelines pass some) are accepted and ignored."""
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, return_dict=True,
                            output_hidden_states=output_hidden_states,
                            output_attention_scores=output_attention_scores)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, self.num_labels).float(), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        out = DistSparseTokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                              attention_scores=outputs.attention_scores)
        return out if return_dict else out.to_tuple()


class DistSparseBertForQuestionAnswering(DistSparseBertPreTrainedModel):
    """BERT with a span head for extractive question answering (SQuAD); state-dict compatible with
    ``BertForQuestionAnswering`` (``bert.*`` without a pooler, ``qa_outputs.*``) and the same
    function: ``qa_outputs`` has ``config.num_labels`` outputs (2: start and end logits), the loss
    is the mean of the start and end cross entropies, positions outside the sequence ignored.

    Training here does not use it; a compact export maps ``AutoModelForQuestionAnswering`` to it.
    """

    _keys_to_ignore_on_load_unexpected = list(_UNUSED_BY_TOKEN_HEADS)

    def __init__(self, config: DistSparseBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = DistSparseBertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        return_dict: bool = True,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attention_scores: bool = False,
        **kwargs,
    ):
        """Start and end logits (batch, seq), and the loss when both position tensors are given."""
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, return_dict=True,
                            output_hidden_states=output_hidden_states,
                            output_attention_scores=output_attention_scores)
        logits = self.qa_outputs(outputs.last_hidden_state)
        start_logits, end_logits = logits.split(1, dim=-1)
        start_logits = start_logits.squeeze(-1).contiguous()
        end_logits = end_logits.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            if start_positions.dim() > 1:
                start_positions = start_positions.squeeze(-1)
            if end_positions.dim() > 1:
                end_positions = end_positions.squeeze(-1)
            # as HF: a position beyond the sequence (the answer was cut off) is clamped to one past
            # the end and ignored
            ignored = start_logits.shape[1]
            start_positions, end_positions = start_positions.clamp(0, ignored), end_positions.clamp(0, ignored)
            loss = (F.cross_entropy(start_logits.float(), start_positions, ignore_index=ignored)
                    + F.cross_entropy(end_logits.float(), end_positions, ignore_index=ignored)) / 2
        out = DistSparseQuestionAnsweringOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                                hidden_states=outputs.hidden_states,
                                                attention_scores=outputs.attention_scores)
        return out if return_dict else out.to_tuple()


def task_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Mean squared error for one output (regression), else cross entropy; in fp32."""
    if num_labels == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.reshape(-1, num_labels).float(), labels.reshape(-1))


__all__ = [
    "BertForPreTrainingOutput",
    "DistSparseBertForQuestionAnswering",
    "DistSparseBertForSequenceClassification",
    "DistSparseBertForTokenClassification",
    "DistSparseBertModelOutput",
    "DistSparseQuestionAnsweringOutput",
    "DistSparseTokenClassifierOutput",
    "DistSparseSequenceClassifierOutput",
    "task_loss",
    "DistSparseBertForMaskedLM",
    "DistSparseBertForPreTraining",
    "DistSparseBertModel",
    "DistSparseBertPreTrainedModel",
    "gather_positions",
    "padding_mask_to_additive",
]
