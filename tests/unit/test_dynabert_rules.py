"""DynaBERT's pure parts: depth and width rules, the TP-aware rewiring order, importance against
the explicit formulas, rewiring that keeps the function, and gated sub-networks equal to their
standalone (cut-out) models."""

from __future__ import annotations

import pytest
import torch

from dist_sparse.dynabert.importance import (batch_importance, own_loss, measure_importance, rewire_model,
                                             rewiring_orders)
from dist_sparse.dynabert.subnet import (deal_order, kept_layers, kept_units, position_rank, subnetwork_state_dict,
                                         unit_gate, usable_widths, width_counts)
from dist_sparse.model import DistSparseBertConfig, DistSparseBertForSequenceClassification

SIZES = dict(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _batch(seed=0, batch=4, seq=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, SIZES["vocab_size"], (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.randint(0, 2, (batch,), generator=g)}


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return DistSparseBertForSequenceClassification(DistSparseBertConfig(**SIZES, num_labels=2, **kw)).eval()


# --- depth and width rules -----------------------------------------------------------------------

def test_kept_layers_follow_dynabert_rule():
    assert kept_layers(1.0, 12) == list(range(12))
    assert kept_layers(0.5, 12) == [0, 2, 4, 6, 8, 10]
    assert kept_layers(0.75, 12) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert kept_layers(0.25, 4) == [0]
    with pytest.raises(ValueError, match=r"depth multiplier 0.3 .* usable: 0.25, 0.5, 0.75, 1"):
        kept_layers(0.3, 4)


def test_width_counts_and_the_usable_multipliers():
    assert width_counts(0.25, 12, 3072, 1) == (3, 768)
    assert width_counts(0.5, 12, 3072, 2) == (6, 1536)
    assert usable_widths(4, 64, 2) == [0.5, 1.0]
    assert usable_widths(12, 3072, 2) == [1 / 6, 1 / 3, 0.5, 2 / 3, 5 / 6, 1.0]
    # 0.25 of 12 heads is 3: not a whole number of heads on each of 2 shards
    with pytest.raises(ValueError, match=r"width multiplier 0.25 .*TP degree 2.*usable: 0.1667, 0.3333, 0.5"):
        width_counts(0.25, 12, 3072, 2)
    with pytest.raises(ValueError, match="width multiplier 1.5"):
        width_counts(1.5, 12, 3072, 1)


def test_deal_order_gives_every_shard_its_share_of_the_global_top():
    imp = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6])  # ranks: 1,5,3,7,2,6,4,0 ... by value
    ranked = torch.sort(imp, descending=True, stable=True).indices.tolist()  # [1, 5, 3, 7, 2, 4, 6, 0]
    assert deal_order(imp, 1).tolist() == ranked
    order = deal_order(imp, 2)
    # shard 0 holds ranks 0, 2, 4, 6; shard 1 ranks 1, 3, 5, 7
    assert order.tolist() == [ranked[0], ranked[2], ranked[4], ranked[6], ranked[1], ranked[3], ranked[5], ranked[7]]
    assert position_rank(8, 2).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    for keep in (2, 4, 6, 8):
        # the chosen units (old indices) are the global top `keep` at tp 1 and tp 2
        top = set(ranked[:keep])
        assert {int(order[p]) for p in kept_units(8, keep, 2)} == top
        assert {int(deal_order(imp, 1)[p]) for p in kept_units(8, keep, 1)} == top
        gate = unit_gate(8, keep, 2)
        assert gate[:4].sum() == gate[4:].sum() == keep // 2  # balanced shards


def test_deal_order_breaks_ties_by_index():
    assert deal_order(torch.zeros(6), 2).tolist() == [0, 2, 4, 1, 3, 5]


# --- importance ---------------------------------------------------------------------------------

def test_importance_equals_the_explicit_formulas():
    model = _model().double()
    batch = _batch()
    heads, neurons = batch_importance(model, batch, own_loss)
    # the reference: DynaBERT's formulas on weight gradients, head gates as a head mask on the context
    model.zero_grad()
    gates = [torch.ones(4, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    for layer, g in zip(model.bert.encoder.layer, gates):
        layer.attention.self.head_gate = g
    loss = model(**batch).loss
    loss.backward()
    for i, layer in enumerate(model.bert.encoder.layer):
        layer.attention.self.head_gate = None
        assert torch.allclose(heads[i], gates[i].grad.abs(), rtol=1e-10, atol=1e-14)
        w1, b1 = layer.intermediate.dense.weight, layer.intermediate.dense.bias
        w2 = layer.output.dense.weight
        want = ((w1 * w1.grad).sum(1) + b1 * b1.grad).abs() + (w2 * w2.grad).sum(0).abs()
        assert torch.allclose(neurons[i], want, rtol=1e-8, atol=1e-12)
    assert heads.shape == (4, 4) and neurons.shape == (4, 64)
    assert all(layer.attention.self.head_gate is None and layer.intermediate.neuron_gate is None
               for layer in model.bert.encoder.layer)


def test_measure_importance_split_over_ranks_equals_one_process():
    model = _model()
    batches = [_batch(seed=s) for s in range(5)]
    ref = measure_importance(model, batches, own_loss)
    seen = {}

    def gather(obj):  # rank 0's all-gather: its own part, and rank 1's computed as rank 1 would
        seen[0] = set(obj)
        other = {j: batch_importance(model, batches[j], own_loss) for j in (1, 3)}
        return [obj, other]

    got = measure_importance(model, batches, own_loss, rank=0, world=2, gather=gather)
    assert seen[0] == {0, 2, 4}
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# --- rewiring and sub-networks ------------------------------------------------------------------

@pytest.mark.parametrize("tp", [1, 2])
def test_rewiring_keeps_the_function(tp):
    model = _model()
    batch = _batch()
    before = model(**batch).logits
    heads, neurons = measure_importance(model, [batch], own_loss)
    rewire_model(model, *rewiring_orders(heads, neurons, tp), tp)
    assert model.config.unit_order_tp == tp
    after = model(**batch).logits
    assert torch.allclose(after, before, rtol=0, atol=1e-5)
    # the most important head of layer 0 now sits at position 0 (rank 0)
    h2, _ = measure_importance(model, [batch], own_loss)
    assert torch.argmax(h2[0]).item() == 0
    with pytest.raises(ValueError, match="already rewired"):
        rewire_model(model, *rewiring_orders(heads, neurons, tp), tp)


def _gate(model, width, depth):
    cfg = model.config
    heads, neurons = width_counts(width, cfg.num_attention_heads, cfg.intermediate_size, cfg.unit_order_tp or 1)
    for layer in model.bert.encoder.layer:
        layer.attention.self.head_gate = unit_gate(cfg.num_attention_heads, heads, cfg.unit_order_tp)
        layer.intermediate.neuron_gate = unit_gate(cfg.intermediate_size, neurons, cfg.unit_order_tp)
    model.bert.encoder.active_layers = kept_layers(depth, cfg.num_hidden_layers)


@pytest.mark.parametrize("tp,width,depth", [(1, 0.5, 1.0), (2, 0.5, 0.5), (2, 1.0, 0.75), (1, 0.25, 0.75)])
def test_gated_subnetwork_equals_its_standalone_model(tp, width, depth):
    model = _model(seed=3)
    batch = _batch(seed=1)
    rewire_model(model, *rewiring_orders(*measure_importance(model, [batch], own_loss), tp), tp)
    sd, cfg = subnetwork_state_dict(model.state_dict(), model.config, width, depth)
    _gate(model, width, depth)
    want = model(**batch).logits
    small = DistSparseBertForSequenceClassification(cfg).eval()
    small.load_state_dict(sd, strict=True)
    got = small(**batch).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    assert cfg.num_hidden_layers == len(kept_layers(depth, 4))
    heads = round(width * 4)
    assert [cfg.heads_of(i) for i in range(cfg.num_hidden_layers)] == [heads] * cfg.num_hidden_layers
    assert cfg.unit_order_tp is None
    if width == 1.0:
        assert cfg.is_uniform() and cfg.layer_num_heads is None


# --- the section, the schedule and the start-up refusals ---------------------------------------

def _section(**kw):
    from dist_sparse.config import DynaBertConfig

    return DynaBertConfig(**kw)


def test_section_defaults_and_schedule_order():
    cfg = _section()
    assert cfg.width_mult == [0.25, 0.5, 0.75, 1.0] and cfg.depth_mult == [1.0] and cfg.phase == 1
    two = _section(phase=2, width_mult=[0.5, 1.0], depth_mult=[0.5, 1.0])
    # the full model first (ZeRO-3 copies the first backward's gradients), then largest first
    assert two.schedule() == [(1.0, 1.0), (0.5, 1.0), (1.0, 0.5), (0.5, 0.5)]


@pytest.mark.parametrize("kw,message", [
    (dict(width_mult=[0.5, 0.75]), r"width_mult \[0.5, 0.75\] must include 1.0"),
    (dict(width_mult=[0.5, 1.0, 1.0]), "distinct multipliers"),
    (dict(width_mult=[0.0, 1.0]), r"in \(0, 1\]"),
    (dict(depth_mult=[0.5, 1.0]), "phase 1 is width-adaptive only"),
    (dict(phase=2, depth_mult=[0.5]), "must include 1.0"),
    (dict(subnetworks=5), "subnetworks 5: between 1 and 4"),
    (dict(subnetworks=0), "subnetworks 0"),
])
def test_section_refusals(kw, message):
    with pytest.raises(ValueError, match=message):
        _section(**kw)


def test_section_does_not_mix_with_sparsity_or_attention_distillation():
    from dist_sparse.config import parse_run_config

    base = {"train_micro_batch_size_per_gpu": 2, "dynabert": {}}
    with pytest.raises(ValueError, match="DynaBERT's sub-networks are cut from a dense model"):
        parse_run_config({**base, "sparsity": {"method": "gmp", "sparsity": 0.5}})
    with pytest.raises(ValueError, match="set distillation.attention to 0"):
        parse_run_config({**base, "distillation": {"teacher": "t", "attention": 1.0}})
    assert parse_run_config(base).dynabert.phase == 1


def test_sampled_schedule_is_seeded_and_keeps_the_full_model_first():
    from dist_sparse.train.dynabert import step_schedule

    cfg = _section(phase=2, width_mult=[0.25, 0.5, 0.75, 1.0], depth_mult=[0.5, 0.75, 1.0], subnetworks=4)
    every = cfg.schedule()
    seen = set()
    for step in range(1, 40):
        s = step_schedule(cfg, 1234, step)
        assert s == step_schedule(cfg, 1234, step)  # what every rank and a resumed run compute
        assert len(s) == 4 and len(set(s)) == 4 and s[0] == (1.0, 1.0)
        assert s[1:] == [wd for wd in every if wd in s[1:]]  # in schedule order
        seen.update(s)
    assert seen == set(every)  # every sub-network is drawn at some step
    assert [step_schedule(cfg, 1234, k) for k in range(1, 6)] != [step_schedule(cfg, 99, k) for k in range(1, 6)]
    assert step_schedule(_section(), 1, 1) == _section().schedule()


def test_start_up_refusals_name_what_to_fix():
    from dist_sparse.config import parse_run_config
    from dist_sparse.train.dynabert import preflight as preflight_dynabert

    def run_cfg(tp=1, **section):
        raw = {"train_micro_batch_size_per_gpu": 2, "dynabert": section}
        if tp > 1:
            raw["tensor_parallel"] = {"autotp_size": tp}
        return parse_run_config(raw)

    plain = _model().config
    rewired = _model(unit_order_tp=2).config
    # 0.25 of 4 heads is one head: not a whole head on each of 2 TP shards
    with pytest.raises(ValueError, match=r"width multiplier 0.25 .*TP degree 2\); usable: 0.5, 1"):
        preflight_dynabert(run_cfg(tp=2), plain, "INIT")
    preflight_dynabert(run_cfg(tp=1), plain, "INIT")
    with pytest.raises(ValueError, match="already rewired by a DynaBERT run: continue from it with dynabert.phase 2"):
        preflight_dynabert(run_cfg(width_mult=[0.5, 1.0]), rewired, "INIT")
    with pytest.raises(ValueError, match="phase 2 starts from a phase-1 run"):
        preflight_dynabert(run_cfg(phase=2, width_mult=[0.5, 1.0], depth_mult=[0.5, 1.0]), plain, "INIT")
    with pytest.raises(ValueError, match=r"depth multiplier 0.6 does not keep a whole number of the 4 layers"):
        preflight_dynabert(run_cfg(phase=2, width_mult=[0.5, 1.0], depth_mult=[0.6, 1.0]), rewired, "INIT")
    preflight_dynabert(run_cfg(phase=2, width_mult=[0.5, 1.0], depth_mult=[0.5, 0.75, 1.0]), rewired, "INIT")
