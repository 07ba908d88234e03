"""EarlyBERT in one process: rounding rules, the early-bird rule, the surgery, the L1 penalty."""

import json

import pytest
import torch

from dist_sparse.config import StructuredPruningConfig, parse_run_config
from dist_sparse.distributed.comm import ParallelGroups
from dist_sparse.model import DistSparseBertConfig, DistSparseBertForPreTraining
from dist_sparse.structure import (HEAD_COEF, NEURON_COEF, Ticket, fold_coefficients, layer_key, pad_state_dict,
                                   shrink_state_dict, shrunk_model_config)
from dist_sparse.structured.earlybird import (EarlyBirdDetector, global_counts, hamming, kept_count, layer_counts,
                                              top_mask)
from dist_sparse.structured.pruner import PrunePlan, StructuredPruner, attach_coefficients, validate
from dist_sparse.structured.shrink import masked_weights, shrink_tensors

ISSUE_EXAMPLE = {"method": "earlybert", "head_ratio": 0.33, "ffn_ratio": 0.4, "scope": "layer", "l1": 1e-4,
                 "check_interval": 10, "window": 5, "epsilon": 0.1, "max_search_steps": 200}


def tiny_config(**kw) -> DistSparseBertConfig:
    fields = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    fields.update(kw)
    return DistSparseBertConfig(**fields)


class LocalZero:
    """ZeroAccess stand-in for one process without DeepSpeed: the module value is the master."""
    partitioned = False

    def full_fp32(self, p):
        return p.detach().float()


def groups1() -> ParallelGroups:
    return ParallelGroups(dp_group=None, tp_group=None, dp_rank=0, dp_size=1, tp_rank=0, tp_size=1,
                          global_rank=0, world_size=1)


# -- configuration --------------------------------------------------------------------------------

def test_issue_example_parses_and_typos_are_named():
    cfg = parse_run_config({"structured_pruning": ISSUE_EXAMPLE}).structured_pruning
    assert (cfg.head_ratio, cfg.ffn_ratio, cfg.scope, cfg.window, cfg.max_search_steps) == (0.33, 0.4, "layer", 5, 200)
    with pytest.raises(ValueError, match='unknown key "structured_pruning.head_ration"'):
        parse_run_config({"structured_pruning": {"head_ration": 0.3}})
    with pytest.raises(ValueError, match="cannot be combined"):
        parse_run_config({"structured_pruning": ISSUE_EXAMPLE, "sparsity": {"method": "static", "sparsity": 0.5}})
    with pytest.raises(ValueError, match="nothing would be pruned"):
        parse_run_config({"structured_pruning": {"head_ratio": 0.0, "ffn_ratio": 0.0}})


def run_cfg(stage=2, optimizer="Lamb", **extra):
    raw = {"optimizer": {"type": optimizer, "params": {"lr": 1e-3}}, "zero_optimization": {"stage": stage},
           "train_micro_batch_size_per_gpu": 2, "structured_pruning": ISSUE_EXAMPLE}
    raw.update(extra)
    return parse_run_config(raw)


def test_start_up_checks_name_what_to_fix():
    model = tiny_config(num_attention_heads=4, hidden_size=32, intermediate_size=64)
    good = run_cfg()
    validate(good.structured_pruning, model, 1, good)
    validate(good.structured_pruning, model, 2, good)
    with pytest.raises(ValueError, match="leaves no head in layer 0"):
        validate(StructuredPruningConfig(head_ratio=0.9, ffn_ratio=0.4), model, 2, good)
    with pytest.raises(ValueError, match="not divisible by tensor_parallel.autotp_size 3"):
        validate(good.structured_pruning, model, 3, good)
    with pytest.raises(ValueError, match="ffn_multiple"):
        validate(StructuredPruningConfig(ffn_multiple=48), model, 1, good)
    with pytest.raises(ValueError, match="offload"):
        cfg = run_cfg(stage=3, zero_optimization={"stage": 3, "offload_param": {"device": "cpu"}})
        validate(cfg.structured_pruning, model, 1, cfg)
    with pytest.raises(ValueError, match="fp16"):
        cfg = run_cfg(fp16={"enabled": True})
        validate(cfg.structured_pruning, model, 1, cfg)
    with pytest.raises(ValueError, match="LAMB only"):
        cfg = run_cfg(optimizer="AdamW")
        validate(cfg.structured_pruning, model, 1, cfg)
    with pytest.raises(ValueError, match="ZeRO stage 1, 2 or 3"):
        cfg = run_cfg(stage=0)
        validate(cfg.structured_pruning, model, 1, cfg)


# -- decisions ------------------------------------------------------------------------------------

def test_kept_counts_round_to_the_tp_degree_and_respect_minimums():
    assert kept_count(12, 0.33, 1, 1) == 8          # EarlyBERT on BERT-base: 12 heads -> 8
    assert kept_count(12, 0.33, 4, 1) == 8
    assert kept_count(16, 0.33, 8, 1) == 8          # 10.72 is nearer 8 than 16
    assert kept_count(4, 0.5, 2, 1) == 2
    assert kept_count(4, 0.25, 2, 1) == 4           # 3 is halfway between 2 and 4: keep more
    assert kept_count(3072, 0.4, 16, 1) == 1840     # 1843.2 -> nearest multiple of 16
    assert kept_count(8, 0.95, 2, 1) == 2           # never below one multiple
    assert kept_count(8, 0.5, 2, 6) == 6
    with pytest.raises(ValueError):
        kept_count(10, 0.5, 4, 1)
    assert layer_counts([12, 12], 0.33, 2, 1) == [8, 8]


def test_top_mask_breaks_ties_by_lower_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0])
    assert top_mask(scores, 2).tolist() == [False, True, True, False, False]
    assert top_mask(scores, 4).tolist() == [True, True, True, False, True]


def test_global_scope_lets_layers_compete_and_rounds_per_layer():
    strong = torch.tensor([5.0, 6.0, 7.0, 8.0])
    weak = torch.tensor([0.1, 0.2, 0.3, 6.5])
    assert global_counts([strong, weak], 0.5, 1, 1) == [3, 1]
    assert global_counts([strong, weak], 0.5, 2, 1) == [4, 2]  # 3 and 1 round up to multiples of 2
    plan = PrunePlan(StructuredPruningConfig(scope="global", head_ratio=0.5, ffn_ratio=0.5, ffn_multiple=1), 1)
    heads, _ = plan.decide([strong, weak], [strong, weak])
    assert [h.tolist() for h in heads] == [[False, True, True, True], [False, False, False, True]]


def test_hamming_distance_is_the_fraction_of_units_that_differ():
    a = [torch.tensor([True, False, True, False]), torch.tensor([True, True])]
    b = [torch.tensor([True, True, False, False]), torch.tensor([True, True])]
    assert hamming(a, b) == 2 / 6
    assert hamming(a, a) == 0.0


def masks_from(bits: str) -> list[torch.Tensor]:
    return [torch.tensor([c == "1" for c in bits])]


def test_ticket_is_drawn_when_the_last_window_distances_are_small_and_not_before():
    det = EarlyBirdDetector(window=2, epsilon=0.15, max_search_steps=1000)
    steps = [("1100", None), ("1010", 0.5), ("1010", 0.0), ("1001", 0.5), ("1001", 0.0), ("1001", 0.0)]
    drawn = []
    for k, (bits, expected) in enumerate(steps):
        m = masks_from(bits)
        obs = det.observe(k, m, [torch.ones(4, dtype=torch.bool)])
        assert obs.head_distance == expected
        drawn.append(obs.drawn)
    # window 2: needs two consecutive distances < 0.15; the pair (0.0, 0.5) at check 3 is not enough.
    assert drawn == [False, False, False, False, False, True]


def test_max_search_steps_forces_the_ticket_and_state_round_trips():
    det = EarlyBirdDetector(window=3, epsilon=0.01, max_search_steps=30)
    obs = [det.observe(s, masks_from("1100" if s % 20 else "0011"), masks_from("10")) for s in (10, 20)]
    assert not any(o.drawn for o in obs)
    copy = EarlyBirdDetector(window=3, epsilon=0.01, max_search_steps=30)
    copy.load_state_dict(json.loads(json.dumps(det.state_dict())))
    a = det.observe(30, masks_from("1010"), masks_from("10"))
    b = copy.observe(30, masks_from("1010"), masks_from("10"))
    assert a == b and a.drawn and a.forced


# -- surgery: the function is unchanged -----------------------------------------------------------

def model_with_coefficients(config, seed=0):
    torch.manual_seed(seed)
    model = DistSparseBertForPreTraining(config).eval()
    attach_coefficients(model, 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("slimming_coef"):
                p.copy_(torch.rand_like(p) * 2 - 0.5)  # some negative, none exactly 1
    return model


def batch(config, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


TICKET = Ticket(heads=((0, 3), (1, 2)), neurons=(tuple(range(0, 48, 2)), tuple(range(10, 40))))


def outputs(model, b):
    with torch.no_grad():
        out = model(**b)
    return out.prediction_logits, out.seq_relationship_logits


def test_shrunk_model_equals_the_masked_model_and_padding_restores_it():
    config = tiny_config()
    model = model_with_coefficients(config)
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    masked = masked_weights(weights, TICKET, config.num_hidden_layers)
    model.load_state_dict(masked, strict=False)
    want = outputs(model, batch(config))

    small_w, _ = shrink_tensors(masked, {}, TICKET, config)
    small_cfg = shrunk_model_config(config, TICKET)
    assert small_cfg.layer_num_heads == [2, 2] and small_cfg.layer_intermediate_sizes == [24, 30]
    small = DistSparseBertForPreTraining(small_cfg).eval()
    missing, unexpected = small.load_state_dict(small_w, strict=False)
    assert unexpected == [] and set(missing) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    got = outputs(small, batch(config))
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=2e-6)

    # Dense export layout: removed units are exact zeros at their original positions.
    padded = pad_state_dict(small_w, TICKET, config.head_dim, 4, 48)
    dense = DistSparseBertForPreTraining(config).eval()
    dense.load_state_dict(padded, strict=False)
    for w, g in zip(want, outputs(dense, batch(config))):
        torch.testing.assert_close(g, w, rtol=0, atol=2e-6)
    q = padded[layer_key(0, "attention.self.query.weight")]
    d = config.head_dim
    assert torch.count_nonzero(q[d:3 * d]) == 0 and torch.count_nonzero(q[:d]) > 0
    down = padded[layer_key(1, "output.dense.weight")]
    assert torch.count_nonzero(down[:, :10]) == 0 and torch.count_nonzero(down[:, 40:]) == 0
    assert torch.equal(shrink_state_dict(padded, TICKET, d)[layer_key(1, "intermediate.dense.bias")],
                       small_w[layer_key(1, "intermediate.dense.bias")])


def test_folded_moments_follow_the_reparametrised_gradient():
    """With W' = W diag(c), dL/dW' = dL/dW / c per column: Adam's moments fold with 1/c, 1/c^2."""
    config = tiny_config()
    model = model_with_coefficients(config)
    b = batch(config)
    labels = b["input_ids"].clone()
    model(**b, labels=labels).loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    coefs = {k: p.detach().clone() for k, p in model.named_parameters() if k.endswith("slimming_coef")}
    folded_model = DistSparseBertForPreTraining(config).eval()
    folded_w = fold_coefficients({k: p.detach() for k, p in model.named_parameters()}, 2, config.head_dim)
    folded_model.load_state_dict(folded_w, strict=False)
    folded_model(**b, labels=labels).loss.backward()
    want = fold_coefficients(grads, 2, config.head_dim, power=-1, coefs=coefs)
    for key in (layer_key(0, "attention.output.dense.weight"), layer_key(1, "output.dense.weight")):
        torch.testing.assert_close(dict(folded_model.named_parameters())[key].grad, want[key], rtol=1e-4, atol=1e-7)
    sq = fold_coefficients({k: g * g for k, g in grads.items()}, 2, config.head_dim, power=-2, coefs=coefs)
    key = layer_key(0, "attention.output.dense.weight")
    torch.testing.assert_close(sq[key], want[key] ** 2, rtol=1e-4, atol=1e-10)


# -- the L1 penalty --------------------------------------------------------------------------------

def test_l1_subgradient_scales_with_accumulation_and_drives_unused_units_linearly():
    """Planted case: head 1 of layer 0 and FFN neurons 0-7 of layer 1 get no data gradient (their
    outgoing weights are zero). Under SGD their coefficients must fall by exactly lr * l1 per
    step, with gradient accumulation (2 micro steps), while used units move differently."""
    config = tiny_config()
    torch.manual_seed(0)
    model = DistSparseBertForPreTraining(config)
    attach_coefficients(model, 1)
    d = config.head_dim
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.output.dense.weight[:, d:2 * d] = 0
        model.bert.encoder.layer[1].output.dense.weight[:, :8] = 0
        # The zeroed weights must stay zero for the planted case to hold: no gradient reaches them
        # through a zero coefficient only if we freeze them.
    model.bert.encoder.layer[0].attention.output.dense.weight.register_hook(
        lambda g: torch.cat([g[:, :d], torch.zeros_like(g[:, d:2 * d]), g[:, 2 * d:]], dim=1))
    model.bert.encoder.layer[1].output.dense.weight.register_hook(
        lambda g: torch.cat([torch.zeros_like(g[:, :8]), g[:, 8:]], dim=1))
    cfg = StructuredPruningConfig(l1=0.05, head_ratio=0.25, ffn_ratio=0.25, ffn_multiple=1)
    pruner = StructuredPruner(cfg, 2, groups1(), LocalZero())
    pruner.bind(model, gradient_accumulation=2)
    lr, steps = 0.1, 4
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    b = batch(config)
    for _ in range(steps):
        opt.zero_grad()
        for _micro in range(2):
            (model(**b, labels=b["input_ids"]).loss / 2).backward()
        opt.step()
    head = dict(model.named_parameters())[layer_key(0, HEAD_COEF)].detach()
    neuron = dict(model.named_parameters())[layer_key(1, NEURON_COEF)].detach()
    expected = torch.tensor(1.0 - steps * lr * cfg.l1)
    torch.testing.assert_close(head[1], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(neuron[:8], expected.expand(8), rtol=0, atol=1e-6)
    assert (head[[0, 2, 3]] - expected).abs().min() > 1e-5
    # After the L1 penalty alone, the planted units have the smallest coefficients among those
    # pushed down: the decision (ratio 1/4 of 4 heads) removes exactly the planted head once the
    # others are above it.
    with torch.no_grad():
        dict(model.named_parameters())[layer_key(0, HEAD_COEF)][[0, 2, 3]] = 1.0
    heads, _ = pruner.plan.decide(*pruner.gather_scores())
    assert heads[0].tolist() == [True, False, True, True]
