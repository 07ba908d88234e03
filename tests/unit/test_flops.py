"""Sparse-aware FLOP counting: exact values on a hand-computed case."""

import pytest

from dist_sparse.flops import saved_forward_flops, training_flops_per_token
from dist_sparse.model.presets import build_config, dense_flops_per_token


def test_dense_is_three_times_forward():
    cfg = build_config("bert-tiny", vocab_size=1000)
    fwd = dense_flops_per_token(cfg, 128)
    assert training_flops_per_token(fwd, []) == pytest.approx(3 * fwd)
    assert training_flops_per_token(fwd, [(4096, 1.0)]) == pytest.approx(3 * fwd)


def test_sparse_weights_count_only_active_entries():
    # two weights of 1000 and 3000 entries at densities 0.1 and 0.5: 2*(900 + 1500) saved per token
    assert saved_forward_flops([(1000, 0.1), (3000, 0.5)]) == 4800.0
    assert training_flops_per_token(10_000.0, [(1000, 0.1), (3000, 0.5)]) == 3 * (10_000 - 4800)
    # RigL's update step: the weight gradient is dense
    assert training_flops_per_token(10_000.0, [(1000, 0.1), (3000, 0.5)], dense_gradient=True) == \
        2 * (10_000 - 4800) + 10_000


def test_mlm_head_counted_on_the_positions_it_runs_on():
    cfg = build_config("bert-tiny", vocab_size=1000)
    h, v = cfg.hidden_size, cfg.vocab_size
    full, masked = dense_flops_per_token(cfg, 128), dense_flops_per_token(cfg, 128, mlm_fraction=0.15)
    assert full - masked == pytest.approx(0.85 * 2 * (h * h + h * v))
    assert dense_flops_per_token(cfg, 128, training=True, mlm_fraction=0.15) == pytest.approx(3 * masked)
    with pytest.raises(ValueError, match="mlm_fraction"):
        dense_flops_per_token(cfg, 128, mlm_fraction=1.5)
