"""Sparsity start-up checks, in one process."""

import pytest
import torch

from dist_sparse.config import SparsityConfig, parse_run_config
from dist_sparse.distributed.comm import ParallelGroups
from dist_sparse.distributed.zero import ZeroAccess
from dist_sparse.model.presets import build_config, build_model
from dist_sparse.sparsifier import Sparsifier
from dist_sparse.sparsity.targets import select_targets

GROUPS = ParallelGroups(dp_group=None, tp_group=None, dp_rank=0, dp_size=1, tp_rank=0, tp_size=1,
                        global_rank=0, world_size=1)


def tiny():
    return build_model(build_config("bert-tiny", vocab_size=64, max_position_embeddings=16, hidden_size=64,
                                    num_attention_heads=4, intermediate_size=96))


def sparsifier(stage=2, **section):
    cfg = SparsityConfig(**section)
    model = tiny()
    return Sparsifier(cfg, select_targets(model, cfg), ZeroAccess(stage, None, 0, 1), GROUPS, max_steps=10)


def test_default_targets_are_the_encoder_linear_weights():
    cfg = SparsityConfig(method="static", sparsity=0.5)
    names = [t.name for t in select_targets(tiny(), cfg)]
    assert len(names) == 12 and all(n.startswith("bert.encoder.layer.") and n.endswith(".weight") for n in names)
    assert not any("LayerNorm" in n for n in names)


def test_pattern_that_matches_nothing():
    with pytest.raises(ValueError, match=r"match no 2-D Linear weight"):
        sparsifier(method="static", sparsity=0.5, params=["bert.encoder.layers.*.weight"])


def test_block_that_does_not_divide():
    with pytest.raises(ValueError, match=r"block_size 64 does not divide .*intermediate.dense.weight"):
        sparsifier(method="set", sparsity=0.5, pattern="block", block_size=64)


def test_nm_that_does_not_divide_the_input_dimension():
    with pytest.raises(ValueError, match=r"m=5 does not divide the input dimension"):
        sparsifier(method="static", sparsity=0.6, pattern="nm", n=2, m=5)


def test_nm_sparsity_must_match():
    with pytest.raises(ValueError, match=r"must be 1 - n/m = 0.5"):
        sparsifier(method="static", sparsity=0.7, pattern="nm", n=2, m=4)


def test_nm_under_zero3_refuses_partitions_smaller_than_a_group():
    """ZeRO-3 N:M completes cut groups from the two neighbouring slices only."""
    cfg = SparsityConfig(method="static", sparsity=0.5, pattern="nm", n=2, m=4)
    targets = select_targets(tiny(), cfg)
    # 64 x 64 = 4096 weights: 2048 ranks leave 2 per partition, less than m - 1 = 3.
    with pytest.raises(ValueError, match=r"attention.output.dense.weight is split into partitions of 2 elements over 2048"):
        Sparsifier(cfg, targets, ZeroAccess(3, None, 0, 2048), GROUPS, max_steps=10)
    Sparsifier(cfg, targets, ZeroAccess(3, None, 0, 1024), GROUPS, max_steps=10)  # 4 per partition: fine


def test_sparsity_range_and_unknown_keys_in_the_json():
    with pytest.raises(ValueError, match=r'"sparsity.sparsity"'):
        parse_run_config({"sparsity": {"method": "set", "sparsity": 1.0}})
    with pytest.raises(ValueError, match=r'unknown key "sparsity.drop_fractoin"'):
        parse_run_config({"sparsity": {"method": "set", "sparsity": 0.5, "drop_fractoin": 0.1}})


def test_the_issue_example_parses():
    example = {"method": "rigl", "sparsity": 0.9, "distribution": "erk", "pattern": "unstructured",
               "update_interval": 100, "drop_fraction": 0.3, "drop_schedule": "cosine", "end_fraction": 0.75,
               "seed": 1}
    assert parse_run_config({"sparsity": example}).sparsity.method == "rigl"
