"""From trained weights to exported weights for structured checkpoints (dist_sparse.export.structured).

Pre-shrink (search): slimming coefficients folded, same function. Post-shrink: dense pads removed
heads / neurons back as exact zeros at their original indices and is the same function as the
small model in a stock BertForPreTraining; compact keeps the small shapes.
"""

import pytest
import torch
from transformers import BertForPreTraining

from dist_sparse.export.hf import trained_model
from dist_sparse.export.structured import TrainedStructure, compact_state_dict, dense_state_dict
from dist_sparse.model import DistSparseBertConfig, DistSparseBertForPreTraining
from dist_sparse.structure import (HEAD_COEF, NEURON_COEF, Ticket, head_rows, is_coefficient, layer_key,
                                   shrink_state_dict, shrunk_model_config)

# fp32 logits of a model this size are O(1); folding rounds once per weight (~1e-7 relative).
TOL = 1e-5
TICKET = Ticket(heads=((0, 2), (1, 2, 3)), neurons=((1, 4, 5, 9, 10, 20), (0, 1, 2, 3, 22, 23)))


def config() -> DistSparseBertConfig:
    return DistSparseBertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=24, max_position_embeddings=16)


def random_weights(cfg, coefficients: bool, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    sd = DistSparseBertForPreTraining(cfg).state_dict()
    gen = torch.Generator().manual_seed(seed + 1)
    sd = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if "LayerNorm" not in k else v for k, v in sd.items()}
    sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
    sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"]
    if coefficients:
        for i in range(cfg.num_hidden_layers):
            sd[layer_key(i, HEAD_COEF)] = torch.rand(cfg.heads_of(i), generator=gen) + 0.5
            sd[layer_key(i, NEURON_COEF)] = torch.rand(cfg.intermediate_of(i), generator=gen) + 0.5
            sd[layer_key(i, NEURON_COEF)][3] = 0.0  # a coefficient driven to zero by the L1 penalty
    return sd


def batch():
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(5, 40, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def hf_dense(sd, cfg) -> BertForPreTraining:
    model = BertForPreTraining(cfg.to_hf_bert_config())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    model.tie_weights()
    return model.eval()


def max_diff(a, b) -> float:
    b_ = batch()
    keep = b_["attention_mask"].bool()
    with torch.no_grad():
        x, y = a(**b_), b(**b_)
    return max((x.prediction_logits - y.prediction_logits)[keep].abs().max().item(),
               (x.seq_relationship_logits - y.seq_relationship_logits).abs().max().item())


def test_search_checkpoint_folds_the_coefficients_into_the_same_function():
    cfg = config()
    sd = random_weights(cfg, coefficients=True)
    structure = TrainedStructure(cfg, {"phase": "search", "ticket": None})
    reference = trained_model(sd, cfg)  # the model with its coefficients as parameters
    assert reference.bert.encoder.layer[1].intermediate.slimming_coef is not None
    dense, dense_cfg = dense_state_dict(sd, structure)
    assert not any(is_coefficient(k) for k in dense) and dense_cfg.is_uniform()
    assert max_diff(hf_dense(dense, dense_cfg), reference) < TOL
    # a zero coefficient silences its neuron: the folded down-projection column is exactly zero
    assert torch.all(dense[layer_key(0, "output.dense.weight")][:, 3] == 0)
    compact, compact_cfg = compact_state_dict(sd, structure)
    assert compact_cfg is cfg and all(torch.equal(compact[k], dense[k]) for k in dense)


def test_shrunk_checkpoint_pads_back_to_the_original_indices():
    cfg = config()
    full = random_weights(cfg, coefficients=False)
    small_cfg = shrunk_model_config(cfg, TICKET)
    small = shrink_state_dict(full, TICKET, cfg.head_dim)
    structure = TrainedStructure(small_cfg, {"phase": "shrunk", "ticket": TICKET.to_dict()})
    reference = trained_model(small, small_cfg)

    dense, dense_cfg = dense_state_dict(small, structure)
    assert dense_cfg.is_uniform() and dense_cfg.num_attention_heads == 4 and dense_cfg.intermediate_size == 24
    for i, (heads, neurons) in enumerate(zip(TICKET.heads, TICKET.neurons)):
        rows = head_rows(heads, cfg.head_dim)
        gone_rows = torch.ones(cfg.hidden_size, dtype=torch.bool)
        gone_rows[rows] = False
        gone_n = torch.ones(cfg.intermediate_size, dtype=torch.bool)
        gone_n[list(neurons)] = False
        for mod in ("query", "key", "value"):
            w, b = dense[layer_key(i, f"attention.self.{mod}.weight")], dense[layer_key(i, f"attention.self.{mod}.bias")]
            assert torch.equal(w[rows], full[layer_key(i, f"attention.self.{mod}.weight")][rows])
            assert torch.all(w[gone_rows] == 0) and torch.all(b[gone_rows] == 0)
        out = dense[layer_key(i, "attention.output.dense.weight")]
        assert torch.all(out[:, gone_rows] == 0) and torch.equal(out[:, rows], full[layer_key(i, "attention.output.dense.weight")][:, rows])
        assert torch.all(dense[layer_key(i, "intermediate.dense.weight")][gone_n] == 0)
        assert torch.all(dense[layer_key(i, "intermediate.dense.bias")][gone_n] == 0)
        assert torch.all(dense[layer_key(i, "output.dense.weight")][:, gone_n] == 0)
    assert max_diff(hf_dense(dense, dense_cfg), reference) < TOL

    compact, compact_cfg = compact_state_dict(small, structure)
    assert compact_cfg.layer_num_heads == [2, 3] and compact_cfg.layer_intermediate_sizes == [6, 6]
    assert compact[layer_key(0, "attention.self.query.weight")].shape == (8, 16)
    assert sum(v.numel() for v in compact.values()) < sum(v.numel() for v in dense.values())


def test_kept_units():
    cfg = config()
    assert TrainedStructure(cfg, None).kept_units() == [{"heads": [0, 1, 2, 3], "neurons": list(range(24))}] * 2
    small_cfg = shrunk_model_config(cfg, TICKET)
    shrunk = TrainedStructure(small_cfg, {"phase": "shrunk", "ticket": TICKET.to_dict()})
    assert shrunk.kept_units()[1] == {"heads": [1, 2, 3], "neurons": [0, 1, 2, 3, 22, 23]}
    # per-layer sizes without a ticket: nobody can say where the kept heads were
    with pytest.raises(ValueError, match="only --format compact can export it"):
        dense_state_dict(random_weights(small_cfg, False), TrainedStructure(small_cfg, None))
    # a ticket that does not describe the model
    other = Ticket(heads=((0,), (1, 2, 3)), neurons=TICKET.neurons)
    with pytest.raises(ValueError, match="layer 0: the ticket keeps 1 heads / 6 FFN neurons but the model config "
                                         "has 2 / 6"):
        TrainedStructure(small_cfg, {"phase": "shrunk", "ticket": other.to_dict()}).kept_units()
