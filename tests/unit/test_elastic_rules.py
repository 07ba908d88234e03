"""The pure parts of resuming at another layout: layouts from files and configs, the step-batch
rule, the optimizer settings a universal load overwrites, the global state both ZeRO loaders
read, and the layout-independent MLM masking."""

import json

import pytest
import torch

from dist_sparse.data.collator import MlmCollator
from dist_sparse.train import elastic
from dist_sparse.train.checkpoint import model_states_file, optim_states_file
from dist_sparse.train.loop import sample_seed


def tag(path, dp, tp, zero3=False, bf16=False):
    path.mkdir(parents=True)
    for t in range(tp):
        for d in (range(dp) if zero3 else [None]):
            torch.save({}, path / model_states_file(t, d))
        for d in range(dp):
            torch.save({}, path / optim_states_file(d, t, bf16))
    return path


def test_layouts_from_file_names_and_from_the_config(tmp_path):
    assert elastic.written_layout(tag(tmp_path / "a", 2, 1)) == elastic.Layout(2, 1, False, False)
    assert elastic.written_layout(tag(tmp_path / "b", 2, 2, zero3=True)) == elastic.Layout(2, 2, True, False)
    assert elastic.written_layout(tag(tmp_path / "c", 4, 1, bf16=True)) == elastic.Layout(4, 1, False, True)
    (tmp_path / "d").mkdir()
    assert elastic.written_layout(tmp_path / "d") is None
    bf16_z1 = {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
    assert elastic.launch_layout(2, 1, bf16_z1) == elastic.Layout(2, 1, False, True)  # DeepSpeed's BF16_Optimizer
    assert elastic.launch_layout(2, 1, {**bf16_z1, "zero_optimization": {"stage": 2}}).bf16_optimizer is False
    assert elastic.launch_layout(1, 2, {"zero_optimization": {"stage": 3}}) == elastic.Layout(1, 2, True, False)
    assert elastic.Layout(1, 2, True, False).describe() == "1 data-parallel x 2 tensor-parallel, ZeRO-3"


def test_plan_moves_only_when_the_layout_changed(tmp_path):
    run = tmp_path / "run"
    tag(run / "checkpoints" / "global_step4", 2, 1)
    # ZeRO-1 and ZeRO-2 write alike: the same files load directly
    assert elastic.plan(run, "global_step4", elastic.launch_layout(2, 1, {"zero_optimization": {"stage": 1}})) is None
    move = elastic.plan(run, "global_step4", elastic.launch_layout(1, 2, {"zero_optimization": {"stage": 2}}))
    assert move.load_dir == run / "universal" and move.tag == "global_step4"
    assert move.describe() == ("global_step4: 2 data-parallel x 1 tensor-parallel, ZeRO-1/2 -> "
                               "1 data-parallel x 2 tensor-parallel, ZeRO-1/2")
    elastic.check_batch(move, 16, 16)
    elastic.check_batch(move, None, 16)  # older run.json: nothing recorded to compare
    with pytest.raises(ValueError, match='held 16 samples, this launch.s would hold 8.*"train_batch_size": 16'):
        elastic.check_batch(move, 16, 8)


def test_the_global_state_serves_both_zero_loaders(tmp_path):
    zero = tmp_path / "zero"
    (zero / "w").mkdir(parents=True)
    torch.save(torch.tensor(7.0), zero / "w" / "step.pt")
    groups = [{"lr": 0.1, "weight_decay": 0.01, "params": [0]}, {"lr": 0.1, "weight_decay": 0.0, "params": [1]}]
    torch.save({"param_groups": groups, "zero_stage": 2}, zero / "optimizer_state.pt")  # from ZeRO-1/2
    elastic._global_state_for_every_stage(zero)
    sd = torch.load(zero / "optimizer_state.pt", weights_only=False)
    assert sd["param_groups"] == groups
    assert sd["optimizer_state_dict"]["param_groups"] == groups
    assert float(sd["optimizer_state_dict"]["state"][0]["step"]) == 7.0
    torch.save({"optimizer_state_dict": {"state": {0: {"step": 3}}, "param_groups": groups}},
               zero / "optimizer_state.pt")  # from ZeRO-3
    elastic._global_state_for_every_stage(zero)
    assert torch.load(zero / "optimizer_state.pt", weights_only=False)["param_groups"] == groups


def test_restoring_param_groups_undoes_what_the_zero3_loader_shares():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([{"params": [a], "weight_decay": 0.01, "name": "a"},
                             {"params": [b], "weight_decay": 0.0, "name": "b"}], lr=1e-3)
    kept = elastic.param_group_settings(opt)
    # what DeepSpeed 0.19.8's ZeRO-3 universal loader leaves: group 0's settings everywhere, the
    # schedule's lr, one step tensor shared by every state
    step = torch.tensor(4.0)
    for g in opt.param_groups:
        g.update(weight_decay=0.01, name="a", lr=5e-4, extra=1)
    opt.state[a] = {"step": step, "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
    opt.state[b] = {"step": step, "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}
    elastic.restore_param_groups(opt, kept)
    assert [(g["weight_decay"], g["name"], g["lr"]) for g in opt.param_groups] == [(0.01, "a", 5e-4), (0.0, "b", 5e-4)]
    assert all("extra" not in g for g in opt.param_groups)
    a.grad, b.grad = torch.ones(2), torch.ones(3)
    opt.step()  # each state counts its own steps
    assert float(opt.state[a]["step"]) == float(opt.state[b]["step"]) == 5.0
    with pytest.raises(ValueError, match="param groups after loading"):
        elastic.restore_param_groups(opt, kept[:1])


def test_converted_reads_only_a_complete_record(tmp_path):
    assert elastic.converted(tmp_path) is None
    (tmp_path / elastic.RECORD_FILE).write_text("{not json")
    assert elastic.converted(tmp_path) is None
    (tmp_path / elastic.RECORD_FILE).write_text(json.dumps({"tag": "global_step4"}))
    assert elastic.converted(tmp_path) == {"tag": "global_step4"}


def test_mlm_masking_per_example_does_not_depend_on_the_batch_split():
    collator = MlmCollator(pad_id=0, mask_id=1, vocab_size=50, special_ids=[0, 1, 2, 3], seq_len=24,
                           mlm_probability=0.3)
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(4, 50, (int(n),), generator=g).tolist()}
                for n in torch.randint(8, 25, (8,), generator=g)]

    def masked(rows, slots):
        gens = [torch.Generator().manual_seed(sample_seed(1234, 5, s)) for s in slots]
        return collator(rows, gens)

    whole = masked(examples, range(8))                  # one micro batch of 8...
    halves = [masked(examples[:4], range(4)), masked(examples[4:], range(4, 8))]  # ...or two of 4
    for key in ("input_ids", "labels"):
        assert torch.equal(whole[key], torch.cat([h[key] for h in halves]))
    assert (whole["labels"] != -100).any()
    other_step = collator(examples, [torch.Generator().manual_seed(sample_seed(1234, 6, s)) for s in range(8)])
    assert not torch.equal(whole["labels"], other_step["labels"])
    with pytest.raises(ValueError, match="3 generators for a batch of 8 rows"):
        collator(examples, [g, g, g])


def test_sample_seeds_of_one_step_are_distinct_for_large_global_batches():
    seeds = {sample_seed(1234, 77, s) for s in range(65536)}  # LAMB recipes' 64k global batch
    assert len(seeds) == 65536 and all(0 <= x < 2**64 for x in seeds)
    assert sample_seed(1234, 77, 0) != sample_seed(1234, 78, 0) != sample_seed(1235, 78, 0)
