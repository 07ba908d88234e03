"""Unit tests of dist_sparse.model: config validation, HF parity, per-layer sizes, presets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForPreTraining, BertConfig, BertForPreTraining

from dist_sparse.model import (
    PRESETS,
    DistSparseBertConfig,
    DistSparseBertForMaskedLM,
    DistSparseBertForPreTraining,
    DistSparseBertModel,
    build_config,
    build_model,
    count_parameters,
    dense_flops_per_token,
    register_auto_classes,
)

TINY = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
TOL = 1e-5


def make_batch(seed: int = 1, batch: int = 3, seq: int = 10, vocab: int = 100):
    """Inputs with padding, two segments, some MLM targets and NSP labels."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1, 7:] = 0
    attention_mask[2, 4:] = 0
    input_ids[attention_mask == 0] = 0
    token_type_ids = torch.zeros(batch, seq, dtype=torch.long)
    token_type_ids[:, seq // 2 :] = 1
    labels = torch.full((batch, seq), -100)
    labels[:, 2] = input_ids[:, 2]
    labels[0, 6] = 5
    labels[1, 3] = 17
    next_sentence_label = torch.tensor([0, 1, 1][:batch])
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        labels=labels,
        next_sentence_label=next_sentence_label,
    )


def pair(seed: int = 0):
    """HF BertForPreTraining and ours, same weights, eval mode."""
    torch.manual_seed(seed)
    hf = BertForPreTraining(BertConfig(**TINY)).eval()
    ours = DistSparseBertForPreTraining(DistSparseBertConfig(**TINY)).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


# --------------------------------------------------------------------------- config


def test_config_helpers_and_json_roundtrip(tmp_path):
    cfg = DistSparseBertConfig(**TINY, layer_num_heads=[4, 2], layer_intermediate_sizes=[128, 48])
    assert cfg.model_type == "dist_sparse_bert"
    assert cfg.head_dim == 16
    assert [cfg.heads_of(i) for i in range(2)] == [4, 2]
    assert [cfg.intermediate_of(i) for i in range(2)] == [128, 48]
    assert not cfg.is_uniform()
    with pytest.raises(ValueError, match="uniform"):
        cfg.to_hf_bert_config()
    with pytest.raises(IndexError):
        cfg.heads_of(2)

    cfg.save_pretrained(tmp_path)
    loaded = DistSparseBertConfig.from_pretrained(tmp_path)
    assert loaded.layer_num_heads == [4, 2] and loaded.layer_intermediate_sizes == [128, 48]
    assert loaded.to_dict() == cfg.to_dict()

    uniform = DistSparseBertConfig(**TINY)
    assert uniform.is_uniform() and uniform.heads_of(1) == 4 and uniform.intermediate_of(0) == 128
    # Explicit lists equal to the full sizes are still uniform.
    assert DistSparseBertConfig(**TINY, layer_num_heads=[4, 4]).is_uniform()
    hf = uniform.to_hf_bert_config()
    assert type(hf) is BertConfig and hf.model_type == "bert"
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        assert getattr(hf, key) == TINY[key]
    assert not hasattr(hf, "layer_num_heads")


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(layer_num_heads=[4]), "layer_num_heads has 1 entries"),
        (dict(layer_intermediate_sizes=[128, 64, 32]), "layer_intermediate_sizes has 3 entries"),
        (dict(layer_num_heads=[4, 0]), r"\(1, 0\)"),
        (dict(layer_intermediate_sizes=[0, 128]), r"\(0, 0\)"),
        (dict(layer_intermediate_sizes=[-3, 128]), ">= 1"),
        (dict(hidden_size=66), "divisible"),
    ],
)
def test_config_validation_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        DistSparseBertConfig(**{**TINY, **bad})


# --------------------------------------------------------------------------- HF parity


def test_state_dict_keys_and_shapes_match_hf_both_ways():
    torch.manual_seed(0)
    hf = BertForPreTraining(BertConfig(**TINY))
    ours = DistSparseBertForPreTraining(DistSparseBertConfig(**TINY))
    hf_sd, our_sd = hf.state_dict(), ours.state_dict()
    assert list(our_sd) == list(hf_sd)  # same keys, same order
    assert {k: v.shape for k, v in our_sd.items()} == {k: v.shape for k, v in hf_sd.items()}
    # transformers v5 keeps both tied keys in the state dict.
    assert "cls.predictions.decoder.bias" in our_sd and "cls.predictions.decoder.weight" in our_sd
    assert DistSparseBertForPreTraining._tied_weights_keys == BertForPreTraining._tied_weights_keys

    result = ours.load_state_dict(hf_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    result = hf.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    # Ties survive loading: the decoder is the word embedding, its bias the MLM bias.
    preds = ours.cls.predictions
    assert preds.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    assert preds.decoder.bias is preds.bias
    # Distinct parameters: HF counts tied tensors once too.
    assert count_parameters(ours) == count_parameters(hf)


def test_same_seed_gives_same_init_as_hf():
    """Same module order and init rules as HF: a seed reproduces HF's initial weights, and the
    init follows BERT's recipe (N(0, 0.02) weights, zero biases, LayerNorm 1/0, zero pad row)."""
    torch.manual_seed(123)
    hf = BertForPreTraining(BertConfig(**TINY))
    torch.manual_seed(123)
    ours = build_model(DistSparseBertConfig(**TINY))
    for (name, a), b in zip(hf.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name
    emb = ours.bert.embeddings.word_embeddings.weight
    assert torch.all(emb[0] == 0)  # padding row
    assert abs(emb[1:].std().item() - 0.02) < 0.003
    layer = ours.bert.encoder.layer[0]
    assert torch.all(layer.attention.self.query.bias == 0)
    assert torch.all(layer.output.LayerNorm.weight == 1) and torch.all(layer.output.LayerNorm.bias == 0)
    assert torch.all(ours.cls.predictions.bias == 0)


def test_uniform_model_is_hf_function():
    hf, ours = pair()
    batch = make_batch()
    with torch.no_grad():
        ref = hf(**batch)
        out = ours(**batch)
        # Without labels: logits only.
        plain = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        ref_plain, out_plain = hf(**plain), ours(**plain)
    torch.testing.assert_close(out.prediction_logits, ref.prediction_logits, atol=TOL, rtol=0)
    torch.testing.assert_close(out.seq_relationship_logits, ref.seq_relationship_logits, atol=TOL, rtol=0)
    assert abs(out.loss.item() - ref.loss.item()) < TOL
    assert out_plain.loss is None
    torch.testing.assert_close(out_plain.prediction_logits, ref_plain.prediction_logits, atol=TOL, rtol=0)

    # Labels only (HF returns no loss then): MLM mean CE over the non-ignored tokens.
    with torch.no_grad():
        mlm = ours(**plain, labels=batch["labels"]).loss
        nsp = ours(**plain, next_sentence_label=batch["next_sentence_label"]).loss
    want_mlm = F.cross_entropy(ref.prediction_logits.reshape(-1, 100), batch["labels"].reshape(-1))
    want_nsp = F.cross_entropy(ref.seq_relationship_logits, batch["next_sentence_label"])
    assert abs(mlm.item() - want_mlm.item()) < TOL
    assert abs(nsp.item() - want_nsp.item()) < TOL
    assert abs(ref.loss.item() - (want_mlm + want_nsp).item()) < TOL

    # No mask / no token types behave as all-ones / all-zeros.
    ids = batch["input_ids"][:1, :6]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).prediction_logits, hf(ids).prediction_logits, atol=TOL, rtol=0)

    # return_dict=False gives HF's tuple order.
    with torch.no_grad():
        tup = ours(**batch, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 3
    assert torch.equal(tup[0], out.loss) and torch.equal(tup[1], out.prediction_logits)


def test_training_mode_gradients_match_hf():
    """Backward through the tied decoder and SDPA gives HF's gradients (dropout off)."""
    kw = dict(TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    hf = BertForPreTraining(BertConfig(**kw)).train()
    ours = DistSparseBertForPreTraining(DistSparseBertConfig(**kw)).train()
    ours.load_state_dict(hf.state_dict())
    batch = make_batch(seed=5)
    hf(**batch).loss.backward()
    ours(**batch).loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, atol=TOL, rtol=1e-4, msg=name)


def test_dropout_active_in_training_mode_only():
    torch.manual_seed(0)
    model = DistSparseBertForPreTraining(DistSparseBertConfig(**TINY, attention_probs_dropout_prob=0.5))
    batch = make_batch()
    model.train()
    a, b = model(**batch).prediction_logits, model(**batch).prediction_logits
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).prediction_logits, model(**batch).prediction_logits)


def test_gradient_checkpointing_same_gradients():
    kw = dict(TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    plain = DistSparseBertForPreTraining(DistSparseBertConfig(**kw)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing_enable()
    assert ckpt.bert.encoder.layer[0].gradient_checkpointing
    batch = make_batch()
    plain(**batch).loss.backward()
    ckpt(**batch).loss.backward()
    ckpt_params = dict(ckpt.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(ckpt_params[name].grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_base_model_and_auto_registration(tmp_path):
    register_auto_classes()  # a second registration must not raise
    register_auto_classes()
    cfg = DistSparseBertConfig(**TINY, layer_num_heads=[4, 2], layer_intermediate_sizes=[128, 48])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is DistSparseBertConfig
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert type(loaded) is DistSparseBertForPreTraining
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).prediction_logits, model(**batch).prediction_logits)
        base = DistSparseBertModel(cfg).eval()
        base.load_state_dict({k[len("bert.") :]: v for k, v in model.state_dict().items() if k.startswith("bert.")})
        hidden = base(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        full = model.bert(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert torch.equal(hidden.last_hidden_state, full.last_hidden_state)
    assert hidden.pooler_output.shape == (3, 64)
    # The masked-LM class loads the pre-training folder: no missing keys, tied decoder, same logits.
    mlm, info = AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(mlm) is DistSparseBertForMaskedLM
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        out = mlm.eval()(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels=batch["labels"])
        ref = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels=batch["labels"])
    assert torch.equal(out.logits, ref.prediction_logits)
    assert torch.equal(out.loss, ref.loss)


# --------------------------------------------------------------------------- per-layer sizes

HEADS = [4, 2]
FFN = [128, 48]
KEEP_HEADS_L1 = [0, 2]  # layer 1 loses heads 1 and 3
KEEP_FFN_L1 = sorted(torch.randperm(128, generator=torch.Generator().manual_seed(7))[:48].tolist())


def test_nonuniform_parameter_shapes():
    model = DistSparseBertForPreTraining(
        DistSparseBertConfig(**TINY, layer_num_heads=HEADS, layer_intermediate_sizes=FFN)
    )
    sd = model.state_dict()
    for i, (heads, ffn) in enumerate(zip(HEADS, FFN)):
        p = f"bert.encoder.layer.{i}."
        for proj in ("query", "key", "value"):
            assert sd[p + f"attention.self.{proj}.weight"].shape == (heads * 16, 64)
            assert sd[p + f"attention.self.{proj}.bias"].shape == (heads * 16,)
        assert sd[p + "attention.output.dense.weight"].shape == (64, heads * 16)
        assert sd[p + "attention.output.dense.bias"].shape == (64,)
        assert sd[p + "intermediate.dense.weight"].shape == (ffn, 64)
        assert sd[p + "intermediate.dense.bias"].shape == (ffn,)
        assert sd[p + "output.dense.weight"].shape == (64, ffn)
    # Same key set as the uniform model: only shapes differ.
    assert list(sd) == list(DistSparseBertForPreTraining(DistSparseBertConfig(**TINY)).state_dict())


def _head_rows(heads: list[int], head_dim: int = 16) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def test_zeroed_heads_and_neurons_equal_physically_smaller_model():
    torch.manual_seed(3)
    big = DistSparseBertForPreTraining(DistSparseBertConfig(**TINY)).eval()
    # Give biases and LayerNorms non-trivial values so a wrong slice cannot hide behind zeros.
    with torch.no_grad():
        for name, p in big.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)

    keep_rows = _head_rows(KEEP_HEADS_L1)
    drop_rows = _head_rows([1, 3])
    drop_ffn = sorted(set(range(128)) - set(KEEP_FFN_L1))
    layer = big.bert.encoder.layer[1]
    with torch.no_grad():
        for proj in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
            proj.weight[drop_rows] = 0
            proj.bias[drop_rows] = 0
        # Zero Q/K rows alone would NOT remove a head (softmax of zeros is uniform, not zero);
        # the head's contribution goes through these input columns of attention.output.dense.
        layer.attention.output.dense.weight[:, drop_rows] = 0
        layer.intermediate.dense.weight[drop_ffn] = 0
        layer.intermediate.dense.bias[drop_ffn] = 0
        layer.output.dense.weight[:, drop_ffn] = 0

    small = DistSparseBertForPreTraining(
        DistSparseBertConfig(**TINY, layer_num_heads=HEADS, layer_intermediate_sizes=FFN)
    ).eval()
    keep_ffn = torch.tensor(KEEP_FFN_L1)
    sliced = {}
    for key, value in big.state_dict().items():
        if key.startswith("bert.encoder.layer.1."):
            sub = key[len("bert.encoder.layer.1.") :]
            if sub.startswith("attention.self."):
                value = value[keep_rows]
            elif sub == "attention.output.dense.weight":
                value = value[:, keep_rows]
            elif sub.startswith("intermediate.dense."):
                value = value[keep_ffn]
            elif sub == "output.dense.weight":
                value = value[:, keep_ffn]
        sliced[key] = value
    result = small.load_state_dict(sliced, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    batch = make_batch(seed=11)
    with torch.no_grad():
        want, got = big(**batch), small(**batch)
    torch.testing.assert_close(got.prediction_logits, want.prediction_logits, atol=TOL, rtol=0)
    torch.testing.assert_close(got.seq_relationship_logits, want.seq_relationship_logits, atol=TOL, rtol=0)
    assert abs(got.loss.item() - want.loss.item()) < TOL


def test_attention_reshape_infers_head_count_for_tp_shards():
    """A TP rank holds only some Q/K/V rows (AutoTP swaps the nn.Linear): forward must infer the
    head count from the tensor, and the shards' partial attention outputs must sum to the full one."""
    torch.manual_seed(0)
    model = DistSparseBertForPreTraining(DistSparseBertConfig(**TINY)).eval()
    attn = model.bert.encoder.layer[0].attention
    x = torch.randn(2, 5, 64)
    bias = torch.zeros(2, 1, 1, 5)
    bias[1, ..., 3:] = torch.finfo(torch.float32).min
    with torch.no_grad():
        full_context = attn.self(x, bias)
        full_proj = attn.output.dense(full_context)
        partial_sum = attn.output.dense.bias.clone()
        for shard in range(2):
            rows = torch.arange(shard * 32, (shard + 1) * 32)  # two heads of 16 per rank
            self_shard = copy.deepcopy(attn.self)
            for name in ("query", "key", "value"):
                full = getattr(attn.self, name)
                lin = torch.nn.Linear(64, 32)
                lin.weight.copy_(full.weight[rows])
                lin.bias.copy_(full.bias[rows])
                setattr(self_shard, name, lin)
            ctx = self_shard(x, bias)
            assert ctx.shape == (2, 5, 32)
            torch.testing.assert_close(ctx, full_context[..., rows], atol=1e-6, rtol=0)
            partial_sum = partial_sum + ctx @ attn.output.dense.weight[:, rows].T
    torch.testing.assert_close(partial_sum, full_proj, atol=1e-5, rtol=0)

    # An even row split of an odd head count (what AutoTP does at tp=2 with 3 heads) is a
    # fraction of a head per rank: a clear error, not a silent wrong reshape.
    odd = copy.deepcopy(attn.self)
    odd.query = torch.nn.Linear(64, 24)
    with pytest.raises(ValueError, match="whole number of heads"):
        odd(x, bias)


# --------------------------------------------------------------------------- presets


def test_presets_and_build_config():
    expected = {
        "bert-tiny": (2, 128, 2, 512),
        "bert-mini": (4, 256, 4, 1024),
        "bert-small": (4, 512, 8, 2048),
        "bert-medium": (8, 512, 8, 2048),
        "bert-base": (12, 768, 12, 3072),
        "bert-large": (24, 1024, 16, 4096),
    }
    assert list(PRESETS) == list(expected)
    for name, (layers, hidden, heads, ffn) in expected.items():
        cfg = build_config(name, vocab_size=1000)
        assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (
            layers,
            hidden,
            heads,
            ffn,
        )
        assert cfg.head_dim == 64 and cfg.vocab_size == 1000 and cfg.is_uniform()
        assert cfg.max_position_embeddings == 512 and cfg.type_vocab_size == 2 and cfg.pad_token_id == 0

    cfg = build_config(
        "bert-tiny", vocab_size=500, max_position_embeddings=128, pad_token_id=3, layer_num_heads=[2, 1],
        hidden_dropout_prob=0.0,
    )
    assert cfg.max_position_embeddings == 128 and cfg.pad_token_id == 3 and cfg.layer_num_heads == [2, 1]
    assert cfg.hidden_dropout_prob == 0.0
    assert build_config("bert-tiny", vocab_size=500, num_hidden_layers=3).num_hidden_layers == 3
    with pytest.raises(ValueError, match="bert-tiny, bert-mini"):
        build_config("bert-huge", vocab_size=500)
    with pytest.raises(ValueError, match="layer_num_heads"):
        build_config("bert-tiny", vocab_size=500, layer_num_heads=[2])

    model = build_model(build_config("bert-tiny", vocab_size=1000))
    assert isinstance(model, DistSparseBertForPreTraining)
    # bert-tiny: embeddings (1000+512+2)*128 + 128*2 LN; per layer 4*(128*128+128) + 2*256 LN
    # + 2*128*512 + 512 + 128; pooler 128*128+128; MLM transform 128*128+128+256, bias 1000;
    # NSP 128*2+2; decoder tied (not counted).
    emb = (1000 + 512 + 2) * 128 + 2 * 128
    per_layer = 4 * (128 * 128 + 128) + 2 * 256 + 2 * 128 * 512 + 512 + 128
    heads = (128 * 128 + 128) + (128 * 128 + 128 + 256) + 1000 + (128 * 2 + 2)
    assert count_parameters(model) == emb + 2 * per_layer + heads
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == emb + 2 * per_layer + heads - 1000 * 128


def test_dense_flops_per_token():
    cfg = build_config("bert-base", vocab_size=30522)
    h, s, v = 768, 128, 30522
    per_layer = 2 * (4 * h * h + 2 * h * 3072) + 4 * s * h
    want = 12 * per_layer + 2 * (h * h + h * v) + 2 * (h * h + 2 * h) / s
    assert dense_flops_per_token(cfg, s) == pytest.approx(want, rel=1e-12)
    assert dense_flops_per_token(cfg, s, training=True) == pytest.approx(3 * want, rel=1e-12)
    # BERT-large forward ~0.68 GFLOP/token at seq 128 (6 * 335M params * ... sanity range).
    large = dense_flops_per_token(build_config("bert-large", vocab_size=30522), 128)
    assert 0.6e9 < large < 0.75e9

    # Pruning layer 1 of a tiny model to one head and 100 neurons removes exactly those FLOPs.
    full = build_config("bert-tiny", vocab_size=1000)
    pruned = build_config("bert-tiny", vocab_size=1000, layer_num_heads=[2, 1], layer_intermediate_sizes=[512, 100])
    saved = dense_flops_per_token(full, 64) - dense_flops_per_token(pruned, 64)
    assert saved == pytest.approx(2 * (4 * 128 * 64) + 4 * 64 * 64 + 2 * (2 * 128 * 412))
    with pytest.raises(ValueError):
        dense_flops_per_token(full, 0)
