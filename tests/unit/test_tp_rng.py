"""The tensor-parallel RNG region around the attention's dropout, in one process.

Two "TP ranks" are the same model run from the same global seed with the region seeded for
tensor-parallel rank 0 or 1, which is all that differs between real TP peers' draws.
"""

import copy

import pytest
import torch

from dist_sparse.distributed.rng import REGION_ATTR, TensorParallelRng, region_seed
from dist_sparse.model import DistSparseBertConfig, DistSparseBertForPreTraining

CFG = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
           max_position_embeddings=16, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.5)
GLOBAL_SEED, STEP_SEED = 11, 123


def make_model(rng: TensorParallelRng | None = None, **overrides) -> DistSparseBertForPreTraining:
    torch.manual_seed(0)
    model = DistSparseBertForPreTraining(DistSparseBertConfig(**{**CFG, **overrides})).train()
    if rng is not None:
        assert rng.install(model) == CFG["num_hidden_layers"]
    return model


def batch() -> dict:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, CFG["vocab_size"], (3, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run(model, tp_rank: int | None = None, rng: TensorParallelRng | None = None) -> dict:
    """One training-mode forward from the loop's global seed: the attention contexts per layer,
    the hidden-state dropout masks, the logits and the global RNG state afterwards."""
    if rng is not None:
        rng.clear() if tp_rank is None else rng.seed(STEP_SEED, tp_rank)
    contexts, masks, hooks = [], [], []
    for module in model.modules():
        if hasattr(module, REGION_ATTR):
            hooks.append(module.register_forward_hook(lambda m, i, out: contexts.append(out.detach())))
        elif isinstance(module, torch.nn.Dropout):
            hooks.append(module.register_forward_hook(lambda m, i, out: masks.append(out.detach() != 0)))
    torch.manual_seed(GLOBAL_SEED)
    try:
        logits = model(**batch()).prediction_logits.detach()
    finally:
        for h in hooks:
            h.remove()
    return {"contexts": contexts, "masks": masks, "logits": logits, "after": torch.get_rng_state()}


def all_equal(xs, ys) -> bool:
    return len(xs) == len(ys) and all(torch.equal(x, y) for x, y in zip(xs, ys))


def test_region_seed_differs_per_tp_rank_and_key_and_is_deterministic():
    seeds = {region_seed(STEP_SEED, r, k) for r in range(4) for k in range(8)}
    assert len(seeds) == 32 and all(0 <= s < 2**63 for s in seeds)
    assert region_seed(STEP_SEED, 1, 3) == region_seed(STEP_SEED, 1, 3)
    assert region_seed(STEP_SEED, 1, 3) != region_seed(STEP_SEED + 1, 1, 3)


def test_tp_ranks_draw_different_attention_masks_and_the_same_hidden_masks():
    rng = TensorParallelRng()
    model = make_model(rng)
    rank0, rank1, rank0_again = run(model, 0, rng), run(model, 1, rng), run(model, 0, rng)
    # Layer 0's attention sees the same input on both ranks: its output differs only by the mask.
    assert not torch.equal(rank0["contexts"][0], rank1["contexts"][0])
    assert all_equal(rank0["contexts"], rank0_again["contexts"]) and torch.equal(rank0["logits"], rank0_again["logits"])
    # Replicated activations: every hidden-state dropout mask (embeddings, attention output,
    # FFN output, in both layers) is the same on both ranks, and so is the global stream after.
    assert len(rank0["masks"]) == 1 + 2 * CFG["num_hidden_layers"]
    assert all_equal(rank0["masks"], rank1["masks"])
    assert torch.equal(rank0["after"], rank1["after"])


def test_the_region_leaves_the_global_stream_as_if_attention_drew_nothing():
    rng = TensorParallelRng()
    seeded = run(make_model(rng), 1, rng)
    no_attention_dropout = run(make_model(attention_probs_dropout_prob=0.0))
    assert all_equal(seeded["masks"], no_attention_dropout["masks"])
    assert torch.equal(seeded["after"], no_attention_dropout["after"])


def test_unseeded_region_is_the_model_as_before_and_eval_never_enters_it():
    rng = TensorParallelRng()
    plain, installed = run(make_model()), run(make_model(rng), None, rng)
    assert all_equal(plain["contexts"], installed["contexts"]) and all_equal(plain["masks"], installed["masks"])
    assert torch.equal(plain["logits"], installed["logits"]) and torch.equal(plain["after"], installed["after"])
    # Attention dropout draws from the global stream when unseeded: the stream moved further.
    assert not torch.equal(plain["after"], run(make_model(rng), 0, rng)["after"])
    model = make_model(rng).eval()
    assert torch.equal(run(model, 0, rng)["logits"], run(model, 1, rng)["logits"])


def test_checkpoint_recompute_draws_the_forward_mask():
    # Activation checkpointing restores the global RNG state for the recompute, not the region's;
    # the region reseeds on every entry, so the recomputed mask is the forward's.
    def grads(checkpointing: bool) -> list[torch.Tensor]:
        rng = TensorParallelRng()
        model = make_model(rng)
        if checkpointing:
            model.activation_checkpointing_enable()
        rng.seed(STEP_SEED, 1)
        torch.manual_seed(GLOBAL_SEED)
        model(**batch()).prediction_logits.square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    assert all_equal(grads(True), grads(False))


def test_a_copied_model_keeps_the_process_region():
    rng = TensorParallelRng()
    model = make_model(rng)
    clone = copy.deepcopy(model)
    rng.seed(STEP_SEED, 1)
    region = getattr(clone.bert.encoder.layer[1].attention.self, REGION_ATTR)
    assert region.func.__self__ is rng and region.args == (1,)


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_fork_restores_the_global_state_even_on_error(tp_rank):
    rng = TensorParallelRng()
    rng.seed(STEP_SEED, tp_rank)
    torch.manual_seed(GLOBAL_SEED)
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError):
        with rng.fork(0):
            torch.rand(3)
            raise RuntimeError("inside the region")
    assert torch.equal(torch.get_rng_state(), before)
