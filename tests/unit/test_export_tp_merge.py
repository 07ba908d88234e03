"""Merging tensor-parallel shards back into whole tensors (dist_sparse.export.tp_merge), one process.

The shards are cut here the way AutoTP cuts HF BERT (written out independently of the code under
test): query/key/value/intermediate.dense weight and bias by rows, attention.output.dense and
output.dense weights by columns with their biases replicated, slimming coefficients in
contiguous blocks, everything else replicated. Every merge must give the whole tensors back
bit for bit.
"""

import re

import pytest
import torch

from dist_sparse.export.checkpoint import TIED_KEYS, logical_shapes
from dist_sparse.export.tp_merge import affine_maps, merge_tp_shards
from dist_sparse.model import DistSparseBertConfig
from dist_sparse.structure import HEAD_COEF, NEURON_COEF, layer_key

COLUMN_PARALLEL = ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense")
ROW_PARALLEL = ("attention.output.dense", "output.dense")


def tiny_config(**kw) -> DistSparseBertConfig:
    args = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
                max_position_embeddings=16)
    return DistSparseBertConfig(**{**args, **kw})


def whole_state(cfg, coefficients: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = {k: v for k, v in logical_shapes(cfg, coefficients).items() if k not in TIED_KEYS}
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def split_dim(name: str) -> int | None:
    """The AutoTP cut of ``name``: 0 (rows), 1 (columns) or None (replicated)."""
    m = re.match(r"bert\.encoder\.layer\.\d+\.(.+)\.(weight|bias|slimming_coef)$", name)
    if not m:
        return None
    module, leaf = m.groups()
    if leaf == "slimming_coef" or module in COLUMN_PARALLEL:
        return 0
    if module in ROW_PARALLEL and leaf == "weight":
        return 1
    return None


def shard(sd: dict, tp: int) -> list[dict]:
    out = [{} for _ in range(tp)]
    for name, t in sd.items():
        dim = split_dim(name)
        parts = [t.clone() for _ in range(tp)] if dim is None else [c.clone() for c in t.chunk(tp, dim=dim)]
        for rank in range(tp):
            out[rank][name] = parts[rank]
    return out


def deepspeed_uc_info(sd: dict, tp: int, scale_replicated: dict | None = None) -> dict:
    """Universal-checkpoint info as DeepSpeed 0.19.8 writes it under AutoTP: an affine map per
    parameter; parameters AutoTP did not touch -- our slimming coefficients among them -- are
    recorded as replicated."""
    from deepspeed.checkpoint.affine import contiguous_split_map, replicated_map

    params = {}
    for name, t in sd.items():
        dim = None if name.endswith("slimming_coef") else split_dim(name)
        if dim is None:
            amap = replicated_map(t.shape, tp, scale=(scale_replicated or {}).get(name, 1.0))
        else:
            amap = contiguous_split_map(t.shape, [t.shape[dim] // tp] * tp, dim)
        params[f"^{re.escape(name)}$"] = amap.to_dict()
    return {"universal_checkpoint_version": 0.4, "affine_map": {"version": 1, "params": params}}


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("with_metadata", [True, False])
def test_merge_gives_the_whole_tensors_back(tp, with_metadata):
    cfg = tiny_config()
    sd = whole_state(cfg, coefficients=True)
    shapes = logical_shapes(cfg, True)
    uc = deepspeed_uc_info(sd, tp) if with_metadata else None
    merged, how = merge_tp_shards(shard(sd, tp), shapes, uc)
    assert merged.keys() == sd.keys()
    for name in sd:
        assert torch.equal(merged[name], sd[name]), name
    coefs = {n for n in sd if n.endswith("slimming_coef")}
    assert len(coefs) == 2 * cfg.num_hidden_layers
    # the coefficients never follow DeepSpeed's (wrong for them) "replicated" record
    assert {how[n] for n in coefs} == {"coefficient"}
    assert {how[n] for n in sd if n not in coefs} == ({"deepspeed"} if with_metadata else {"shape"})


def test_the_scale_deepspeed_records_is_undone():
    """A row-parallel layer may hold its replicated bias pre-divided by the TP degree; DeepSpeed
    records that as the piece's scale. A merge that ignored it would be off by a factor of 2."""
    cfg = tiny_config()
    sd = whole_state(cfg, coefficients=False)
    name = "bert.encoder.layer.0.attention.output.dense.bias"
    shards = shard(sd, 2)
    for s in shards:
        s[name] = s[name] * 0.5
    merged, how = merge_tp_shards(shards, logical_shapes(cfg, False), deepspeed_uc_info(sd, 2, {name: 0.5}))
    assert how[name] == "deepspeed" and torch.equal(merged[name], sd[name])


def test_an_unknown_affine_map_version_falls_back_to_shapes():
    cfg = tiny_config()
    sd = whole_state(cfg, coefficients=False)
    uc = deepspeed_uc_info(sd, 2)
    uc["affine_map"]["version"] = 99
    assert affine_maps(uc) == {}
    merged, how = merge_tp_shards(shard(sd, 2), logical_shapes(cfg, False), uc)
    assert set(how.values()) == {"shape"} and all(torch.equal(merged[n], sd[n]) for n in sd)


def test_affine_map_names_are_exact_names_not_patterns():
    maps = affine_maps({"affine_map": {"version": 1, "params": {
        r"^bert\.pooler\.dense\.weight$": {"x": 1}, r"^bert\..*\.weight$": {"x": 2}}}})
    assert maps == {"bert.pooler.dense.weight": {"x": 1}}


def test_a_single_rank_is_returned_as_is():
    cfg = tiny_config()
    sd = whole_state(cfg, coefficients=False)
    merged, how = merge_tp_shards([sd], logical_shapes(cfg, False))
    assert set(how.values()) == {"single"} and all(merged[n] is sd[n] for n in sd)


def test_disagreeing_replicas_are_refused():
    cfg = tiny_config()
    sd = whole_state(cfg, coefficients=False)
    name = "bert.embeddings.LayerNorm.weight"
    for uc in (None, deepspeed_uc_info(sd, 2)):
        shards = shard(sd, 2)
        shards[1][name] = shards[1][name] + 1e-3
        with pytest.raises(ValueError, match=re.escape(name)):
            merge_tp_shards(shards, logical_shapes(cfg, False), uc)


def test_shapes_that_do_not_fit_the_config_are_refused():
    cfg = tiny_config()
    sd = whole_state(cfg, coefficients=False)
    shards = shard(sd, 2)
    # a checkpoint whose model config says 48 FFN neurons while the shards hold 2 x 12
    wrong = logical_shapes(tiny_config(intermediate_size=48), False)
    with pytest.raises(ValueError, match=r"intermediate\.dense\.weight: a tensor-parallel shard of shape \(12, 16\) "
                                         r"is not an even 2-way split of the logical shape \(48, 16\) \(the shape the checkpoint's model config"):
        merge_tp_shards(shards, wrong)
    # DeepSpeed's record describes the shards, but the whole tensor still has to fit the config
    with pytest.raises(ValueError, match=r"shard of shape \(12, 16\), DeepSpeed's layout says|model config says"):
        merge_tp_shards(shards, wrong, deepspeed_uc_info(whole_state(tiny_config(intermediate_size=48), False), 2))


def test_coefficients_that_do_not_add_up_are_refused():
    cfg = tiny_config()
    sd = whole_state(cfg, coefficients=True)
    shards = shard(sd, 2)
    name = layer_key(1, HEAD_COEF)
    shards[1][name] = shards[1][name][:1]
    with pytest.raises(ValueError, match=re.escape(f"{name}: the merged tensor-parallel shards give shape (3,), "
                                                   "the model config says (4,)")):
        merge_tp_shards(shards, logical_shapes(cfg, True))


def test_ranks_with_different_parameters_and_unknown_parameters_are_refused():
    cfg = tiny_config()
    sd = whole_state(cfg, coefficients=True)
    shards = shard(sd, 2)
    del shards[1][layer_key(0, NEURON_COEF)]
    with pytest.raises(ValueError, match="rank 1 holds different parameters than rank 0"):
        merge_tp_shards(shards, logical_shapes(cfg, True))
    # coefficients in a checkpoint whose config does not expect them (not a search checkpoint)
    with pytest.raises(ValueError, match="parameters its model config does not describe"):
        merge_tp_shards(shard(sd, 2), logical_shapes(cfg, False))
