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
    both = parse_run_config({"structured_pruning": ISSUE_EXAMPLE, "sparsity": {"method": "set", "sparsity": 0.5}})
    assert both.sparsity.method == "set" and both.structured_pruning.head_ratio == 0.33
    with pytest.raises(ValueError, match='"sparsity.after_shrink" needs a "structured_pruning" section'):
        parse_run_config({"sparsity": {"method": "set", "sparsity": 0.5, "after_shrink": True}})
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
    for adam in ("AdamW", "Adam"):  # the shrink carries their moments as LAMB's
        cfg = run_cfg(optimizer=adam)
        validate(cfg.structured_pruning, model, 1, cfg)
    with pytest.raises(ValueError, match='optimizer.type to "Lamb", "Adam" or "AdamW"'):
        cfg = run_cfg(optimizer="OneBitAdam")
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


def test_top_mask_breaks_ties_in_the_seeded_order_of_the_index():
    """The project's one tie rule (masks.topk.tie_order): among equal scores the smallest key
    tie_order(index, salt) is kept first; different salts (layers) order the ties differently,
    so no head index is favoured everywhere; untied scores are unaffected."""
    from dist_sparse.masks.topk import tie_order, tie_order_bits
    from dist_sparse.structured.earlybird import tie_salt

    scores = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0])
    tied = torch.tensor([1, 2, 4])
    seen = set()
    for layer in range(8):
        salt = tie_salt(layer)
        keys = tie_order(tied, salt, tie_order_bits(5))
        first_two = set(tied[keys.argsort()[:2]].tolist())
        assert top_mask(scores, 2, salt).nonzero().flatten().tolist() == sorted(first_two)
        assert top_mask(scores, 3, salt).nonzero().flatten().tolist() == [1, 2, 4]  # no tie left to break
        assert top_mask(scores, 4, salt).tolist() == [True, True, True, False, True]
        seen.add(frozenset(first_two))
    assert len(seen) > 1  # the order differs between layers


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

def _coef_model():
    config = tiny_config()
    torch.manual_seed(0)
    model = DistSparseBertForPreTraining(config)
    attach_coefficients(model, 1)
    return config, model


def test_lamb_applies_the_l1_penalty_as_adding_it_to_the_loss():
    """LAMB's ``l1`` on the coefficients' groups equals adding ``l1 * sum|c|`` to the loss, with
    gradient accumulation (2 micro steps), step after step; other parameters are untouched by it."""
    from dist_sparse.optim import Lamb, parameter_groups

    l1, steps = 0.05, 3
    config, penalised = _coef_model()
    _, reference = _coef_model()
    b = batch(config)
    opt_a = Lamb(parameter_groups(penalised, 0.01, one_per_parameter=True, l1=l1), lr=0.01)
    opt_b = Lamb(parameter_groups(reference, 0.01, one_per_parameter=True), lr=0.01)
    assert sum(1 for g in opt_a.param_groups if g["l1"] == l1) == 2 * config.num_hidden_layers
    for _ in range(steps):
        for model, opt, penalty in ((penalised, opt_a, 0.0), (reference, opt_b, l1)):
            opt.zero_grad()
            for _micro in range(2):
                torch.manual_seed(1)
                loss = model(**b, labels=b["input_ids"]).loss
                coefs = sum(p.abs().sum() for n, p in model.named_parameters() if n.endswith("slimming_coef"))
                ((loss + penalty * coefs) / 2).backward()
            opt.step()
    a, r = dict(penalised.named_parameters()), dict(reference.named_parameters())
    for name in a:
        torch.testing.assert_close(a[name], r[name], rtol=1e-5, atol=1e-6, msg=name)
    # and the penalty did something: without it the coefficients end elsewhere
    _, plain = _coef_model()
    opt_c = Lamb(parameter_groups(plain, 0.01, one_per_parameter=True), lr=0.01)
    for _ in range(steps):
        opt_c.zero_grad()
        for _micro in range(2):
            torch.manual_seed(1)
            (plain(**b, labels=b["input_ids"]).loss / 2).backward()
        opt_c.step()
    key = layer_key(0, HEAD_COEF)
    assert (dict(plain.named_parameters())[key] - a[key]).abs().max() > 1e-4


def test_l1_survives_bf16_gradients_at_large_accumulation():
    """Under bf16 the old per-micro-step hook added ``l1 / accumulation`` to bf16 gradients, where
    it rounds away (shown below); LAMB adds ``l1 * sign(c)`` to the fp32 gradient ZeRO hands it,
    so the first moment holds exactly (1 - beta1) * (g + l1 * sign(c))."""
    from dist_sparse.optim import Lamb

    l1, accumulation = 1e-4, 8
    grad_bf16 = torch.tensor([0.25, -0.5, 0.125, 1.0], dtype=torch.bfloat16)
    # the old way: the subgradient vanishes in bf16
    assert torch.equal(grad_bf16 + torch.tensor(l1 / accumulation, dtype=torch.bfloat16), grad_bf16)
    master = torch.nn.Parameter(torch.tensor([0.5, -0.25, 1.0, 0.0]))  # ZeRO's fp32 master of c
    master.grad = grad_bf16.float()  # ZeRO up-casts the reduced gradient before the step
    opt = Lamb([{"params": [master], "weight_decay": 0.0, "l1": l1}], lr=0.1, betas=(0.9, 0.999))
    opt.step()
    want = 0.1 * (grad_bf16.float() + l1 * torch.tensor([1.0, -1.0, 1.0, 0.0]))
    assert torch.equal(opt.state[master]["exp_avg"], want)
    assert not torch.equal(opt.state[master]["exp_avg"], 0.1 * grad_bf16.float())


def test_l1_drives_units_without_data_gradient_down_and_the_decision_removes_them():
    """Planted case: head 1 of layer 0 gets no data gradient (its outgoing weights are zero and
    frozen). LAMB's L1 alone moves its coefficient down (to below 1, monotonically), and once the
    other heads sit above it the decision removes exactly the planted head."""
    from dist_sparse.optim import Lamb, parameter_groups

    config, model = _coef_model()
    d = config.head_dim
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.output.dense.weight[:, d:2 * d] = 0
    model.bert.encoder.layer[0].attention.output.dense.weight.register_hook(
        lambda g: torch.cat([g[:, :d], torch.zeros_like(g[:, d:2 * d]), g[:, 2 * d:]], dim=1))
    cfg = StructuredPruningConfig(l1=0.05, head_ratio=0.25, ffn_ratio=0.25, ffn_multiple=1)
    pruner = StructuredPruner(cfg, 2, groups1(), LocalZero())
    pruner.bind(model)
    opt = Lamb(parameter_groups(model, 0.0, one_per_parameter=True, l1=cfg.l1), lr=0.01)
    b = batch(config)
    head = dict(model.named_parameters())[layer_key(0, HEAD_COEF)]
    seen = [float(head[1].detach())]
    for _ in range(4):
        opt.zero_grad()
        for _micro in range(2):
            (model(**b, labels=b["input_ids"]).loss / 2).backward()
        opt.step()
        seen.append(float(head[1].detach()))
    assert seen == sorted(seen, reverse=True) and seen[-1] < 1.0 - 1e-3, seen
    # After the L1 penalty alone, the planted units have the smallest coefficients among those
    # pushed down: the decision (ratio 1/4 of 4 heads) removes exactly the planted head once the
    # others are above it.
    with torch.no_grad():
        dict(model.named_parameters())[layer_key(0, HEAD_COEF)][[0, 2, 3]] = 1.0
    heads, _ = pruner.plan.decide(*pruner.gather_scores())
    assert heads[0].tolist() == [True, False, True, True]


def test_sparsity_patterns_that_a_shrink_would_break_are_refused_at_start_up():
    """With structured pruning, a block must fit one head and one ffn_multiple of neurons, and
    N:M masks can only be drawn after the shrink; both are refused before any process starts."""
    from dist_sparse.train.sparse import preflight_sparsity

    model = tiny_config(num_attention_heads=4, hidden_size=32, intermediate_size=64)  # head size 8
    def cfg(**sparsity):
        return parse_run_config({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                                 "zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 2,
                                 "structured_pruning": {**ISSUE_EXAMPLE, "ffn_multiple": 8},
                                 "sparsity": {"method": "set", "sparsity": 0.5, **sparsity}})
    preflight_sparsity(cfg(pattern="block", block_size=4), model, 1, 100)
    with pytest.raises(ValueError, match="block_size 16 does not divide the head size"):
        preflight_sparsity(cfg(pattern="block", block_size=16), model, 1, 100)
    nm = {"method": "static", "pattern": "nm", "n": 2, "m": 4}
    with pytest.raises(ValueError, match='needs "after_shrink": true'):
        preflight_sparsity(cfg(**nm), model, 1, 100)
    preflight_sparsity(cfg(**nm, after_shrink=True), model, 1, 100)
