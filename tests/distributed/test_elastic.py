"""Resume at another layout (issue 15): a sparse run written at one data-parallel size, tensor-
parallel degree and ZeRO stage continues at another, through DeepSpeed's universal checkpoint.

The model starts from a BERT folder without dropout, and MLM masking is keyed by each example's
place in the optimizer step, so a step computes the same function of the same samples at every
layout: the losses after a move must equal the uninterrupted run's (up to the order of float
sums), and the masks, decided on the moved masters and moments, must be the same bits.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dslaunch import ROOT, launch

pytestmark = pytest.mark.distributed

PRETRAIN = ROOT / "launchers" / "pretrain.py"
STEPS = 12
# SET at 80% in 8x8 blocks, updates at 3, 6, 9 and 12: two of them after each move below
SPARSITY = {"method": "set", "sparsity": 0.8, "distribution": "erk", "update_interval": 3,
            "drop_fraction": 0.3, "drop_schedule": "cosine", "end_fraction": 1.0, "seed": 1,
            "pattern": "block", "block_size": 8}
# EarlyBERT with SET beside it (unstructured 50%, updates at 7, 14): the ticket falls by step 12
# (checks at 3, 6, 9, 12), the masks follow the shrink
EARLYBERT = {"method": "earlybert", "head_ratio": 0.5, "ffn_ratio": 0.4, "scope": "layer", "l1": 0.0001,
             "check_interval": 3, "window": 2, "epsilon": 0.1, "max_search_steps": 12}
EARLYBERT_SPARSITY = {"method": "set", "sparsity": 0.5, "update_interval": 7, "end_fraction": 1.0}


def config(tmp: Path, name: str, stage: int, tp: int = 1, structured: bool = False) -> Path:
    cfg = json.loads((ROOT / "ds_configs" / "cpu_zero2.json").read_text())
    # the step's samples fixed, the accumulation derived per layout: micro batch 4, so 2 ranks
    # accumulate 2 micro batches and 1 rank 4
    cfg.pop("gradient_accumulation_steps")
    cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"] = 16, 4
    cfg["zero_optimization"] = {"stage": stage}
    cfg["sparsity"] = EARLYBERT_SPARSITY if structured else SPARSITY
    if structured:
        cfg["structured_pruning"] = EARLYBERT
    cfg["training"]["save_interval"] = 4
    if tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": tp}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def pretrain(cfg: Path, init: Path, data: Path, run: Path, nproc: int, *extra, steps: int = STEPS):
    return launch([PRETRAIN, "--deepspeed_config", cfg, "--data", data, "--init", init, "--output", run,
                   "--max-steps", steps, "--no-progress", *extra], nproc=nproc)


def tiny_bert(path: Path, data_dir: Path, heads: int) -> Path:
    """A BERT folder without dropout, for the data's vocabulary."""
    from transformers import BertConfig, BertForPreTraining

    meta = json.loads((data_dir / "meta.json").read_text())
    torch.manual_seed(0)
    BertForPreTraining(BertConfig(
        vocab_size=meta["vocab_size"], hidden_size=16 * heads, num_hidden_layers=2, num_attention_heads=heads,
        intermediate_size=64 * heads, max_position_embeddings=128, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=meta["special_ids"]["[PAD]"])).save_pretrained(path)
    return path


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def masks(run: Path, tag: str) -> dict[str, torch.Tensor]:
    from dist_sparse.train.checkpoint import logical_masks

    return logical_masks(run / "checkpoints" / tag)


def moved(source: Path, tag: str, dest: Path) -> Path:
    """A run directory holding ``source``'s checkpoint ``tag`` as its latest, to resume elsewhere."""
    (dest / "checkpoints").mkdir(parents=True)
    for f in ("run.json", "metrics.jsonl"):
        shutil.copy(source / f, dest / f)
    shutil.copytree(source / "checkpoints" / tag, dest / "checkpoints" / tag)
    (dest / "checkpoints" / "latest").write_text(tag)
    return dest


def assert_continues(run: Path, source: Path, moved_at: int, reference: Path, same_sums: bool = True) -> None:
    """The run moved from ``source``'s checkpoint of step ``moved_at`` continues ``reference``: its
    first checkpoint after the move (``--save-interval 1``; no mask update at ``moved_at + 1``)
    holds the source's masks bit for bit, its losses equal the reference's, every later mask has
    the exact target count
    and, where the new layout sums gradients in the same order (``same_sums``), the same bits.
    ZeRO-3 reduce-scatters gradients in another order than ZeRO-2's all-reduce: its masters differ
    in the last bits, and SET's magnitude ranking may then swap near-ties (a handful per weight)."""
    mine, ref = losses(run), losses(reference)
    for step in range(moved_at + 1, STEPS + 1):
        assert mine[step] == pytest.approx(ref[step], rel=1e-5, abs=0), (step, mine[step], ref[step])
    assert (moved_at + 1) % SPARSITY["update_interval"], "the step after the move must not update masks"
    at_move, want = masks(run, f"global_step{moved_at + 1}"), masks(source, f"global_step{moved_at}")
    assert at_move.keys() == want.keys() and len(want) == 12
    for name in want:
        assert torch.equal(at_move[name], want[name]), name
    last = f"global_step{STEPS}"
    got, want = masks(run, last), masks(reference, last)
    for name in want:
        assert int(got[name].sum()) == int(want[name].sum()), name
        differ = int((got[name] != want[name]).sum())
        if same_sums:
            assert differ == 0, (name, differ)
        else:
            assert differ <= 0.02 * int(want[name].sum()), (name, differ)


@pytest.fixture(scope="module")
def setup(data_dir, tmp_path_factory):
    """A dropout-free tiny BERT folder to start from and the uninterrupted run: DP 2, ZeRO-2."""
    tmp = tmp_path_factory.mktemp("elastic")
    tiny_bert(tmp / "init", data_dir, heads=4)
    reference = tmp / "reference"
    pretrain(config(tmp, "z2", 2), tmp / "init", data_dir, reference, 2)
    return tmp, reference


def test_moves_to_one_rank_and_to_zero3_continue_the_run(setup, data_dir):
    tmp, reference = setup
    # DP 2 -> DP 1 (the accumulation doubles), ZeRO-2 -> ZeRO-3 at DP 2
    for name, cfg, nproc in (("dp1", config(tmp, "z2", 2), 1), ("zero3", config(tmp, "z3", 3), 2)):
        run = moved(reference, "global_step4", tmp / name)
        proc = pretrain(cfg, tmp / "init", data_dir, run, nproc, "--resume", "--save-interval", 1)
        out = proc.stdout + proc.stderr
        assert "converting it to DeepSpeed's universal checkpoint" in out, out[-3000:]
        assert_continues(run, reference, 4, reference, same_sums=name == "dp1")
        record = json.loads((run / "universal" / "global_step4" / "dist_sparse_universal.json").read_text())
        assert record["layout"] == {"dp": 2, "tp": 1, "zero3": False, "bf16_optimizer": False}
        assert record["masks"] is True


def test_moves_between_tensor_parallel_degrees_continue_the_run(setup, data_dir):
    tmp, reference = setup
    # DP 2 x TP 1 -> DP 1 x TP 2: every split weight, master, moment and mask cut along AutoTP's split
    tp2 = moved(reference, "global_step4", tmp / "tp2")
    pretrain(config(tmp, "tp2", 2, tp=2), tmp / "init", data_dir, tp2, 2, "--resume", "--save-interval", 1)
    assert_continues(tp2, reference, 4, reference)
    # and back: DP 1 x TP 2 (ZeRO-2) -> DP 2 x TP 1 on ZeRO-3, from the TP-2 run's own checkpoint
    # (step 7: the first checkpoint after the move, 8, holds no mask update)
    back = moved(tp2, "global_step7", tmp / "back")
    proc = pretrain(config(tmp, "z3", 3), tmp / "init", data_dir, back, 2, "--resume", "--save-interval", 1)
    out = proc.stdout + proc.stderr
    assert "1 data-parallel x 2 tensor-parallel, ZeRO-1/2 -> 2 data-parallel x 1 tensor-parallel, ZeRO-3" in out
    assert_continues(back, tp2, 7, reference, same_sums=False)


def test_earlybert_moves_during_the_search_and_after_the_shrink(data_dir, tmp_path):
    """EarlyBERT with SET: moved mid-search from DP 2 x TP 1 to DP 1 x TP 2 (the slimming
    coefficients split per TP rank), the search continues the run's; the ticket then falls by TP 2's
    rules (each shard's share of the kept neurons a multiple of ffn_multiple). Moved again
    after the shrink, the smaller TP-2 model continues on DP 2 x TP 1, ZeRO-3."""
    steps = 20
    init = tiny_bert(tmp_path / "init", data_dir, heads=4)
    reference = tmp_path / "reference"
    pretrain(config(tmp_path, "eb", 2, structured=True), init, data_dir, reference, 2, steps=steps)
    mid = moved(reference, "global_step4", tmp_path / "mid")
    pretrain(config(tmp_path, "eb_tp2", 2, tp=2, structured=True), init, data_dir, mid, 2, "--resume", steps=steps)
    after = moved(mid, "global_step16", tmp_path / "after")
    pretrain(config(tmp_path, "eb_z3", 3, structured=True), init, data_dir, after, 2, "--resume", steps=steps)

    def structure(run, step):
        return json.loads((run / "checkpoints" / f"global_step{step}" / "structure.json").read_text())

    # the search after the move is the run's: same losses up to the ticket (forced at step 12)
    ref, mine = losses(reference), losses(mid)
    for step in range(5, 13):
        assert mine[step] == pytest.approx(ref[step], rel=1e-5, abs=0), step
    want, got = structure(reference, steps)["structured"], structure(mid, steps)["structured"]
    assert got["phase"] == want["phase"] == "shrunk" and got["ticket_step"] == want["ticket_step"] == 12
    assert got["ticket"]["heads"] == want["ticket"]["heads"]
    for mine_kept, ref_kept in zip(got["ticket"]["neurons"], want["ticket"]["neurons"]):
        # TP 2's rule: the kept count a multiple of ffn_multiple (8) on each of the 2 shards (160)
        # where TP 1 needs a multiple of 8 only (152)
        assert len(mine_kept) % 16 == 0 and len(ref_kept) % 8 == 0 and len(mine_kept) >= len(ref_kept)
    # after the shrink: the moved run continues the TP-2 run exactly in structure and masks
    assert structure(after, steps) == structure(mid, steps)
    ref, mine = losses(mid), losses(after)
    for step in range(17, steps + 1):
        assert mine[step] == pytest.approx(ref[step], rel=1e-5, abs=0), step
    got, want = masks(after, f"global_step{steps}"), masks(mid, f"global_step{steps}")
    assert got.keys() == want.keys() and len(want) == 12
    for name in want:  # no mask update after step 14: the bits of the move
        assert torch.equal(got[name], want[name]), name


def test_extend_continues_a_finished_run_with_the_documented_schedules(setup, data_dir):
    """--resume --extend: the finished 12-step run continues to 16 (also at another layout, DP 1);
    from step 13 the learning rate is the 16-step plan's, the sparsity schedule keeps the 12-step
    plan (SET's updates end at end_fraction 1.0 of 12 steps: the masks stay those of step 12)."""
    from dist_sparse.config import lr_multiplier, parse_run_config

    tmp, reference = setup
    cfg = config(tmp, "z2", 2)
    run = moved(reference, f"global_step{STEPS}", tmp / "extended")
    refused = launch([PRETRAIN, "--deepspeed_config", cfg, "--data", data_dir, "--init", tmp / "init",
                      "--output", run, "--max-steps", 16, "--no-progress", "--resume"], nproc=1, check=False)
    assert refused.returncode != 0 and "planned for 12 steps, not 16" in refused.stderr
    pretrain(cfg, tmp / "init", data_dir, run, 1, "--resume", "--extend", steps=16)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    lrs = {r["step"]: r["lr"] for r in rows if r["split"] == "train"}
    training = parse_run_config(json.loads(cfg.read_text()), source=str(cfg)).training
    peak = json.loads(cfg.read_text())["optimizer"]["params"]["lr"]
    for step in range(1, 17):  # logged after step s: the rate of the next step (0-based index s)
        planned_for = 12 if step <= 12 else 16
        assert lrs[step] == pytest.approx(peak * lr_multiplier(step, training, planned_for), rel=1e-9), step
    got, want = masks(run, "global_step16"), masks(reference, f"global_step{STEPS}")
    for name in want:
        assert torch.equal(got[name], want[name]), name
    recorded = json.loads((run / "run.json").read_text())
    assert recorded["max_steps"] == 16 and recorded["schedule_plan"] == [[0, 12], [12, 16]]
    assert [(e["at_step"], e["from_max_steps"], e["to_max_steps"]) for e in recorded["extensions"]] == [(12, 12, 16)]


def lamb_bf16_config(tmp: Path, name: str, stage: int) -> Path:
    """The BERT-large recipes' optimizer and precision: LAMB (one param group per tensor), bf16
    weights with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer at ZeRO-1)."""
    cfg = json.loads((ROOT / "ds_configs" / "cpu_zero2_lamb.json").read_text())
    cfg.pop("gradient_accumulation_steps", None)
    cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"] = 16, 4
    cfg.update(zero_optimization={"stage": stage}, bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    cfg["sparsity"] = {k: v for k, v in SPARSITY.items() if k not in ("pattern", "block_size")}
    cfg["training"]["save_interval"] = 4
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def test_lamb_in_bf16_moves_from_the_bf16_optimizer(setup, data_dir, tmp_path):
    """LAMB in bf16 on ZeRO-1 (BF16_Optimizer) at DP 2, moved to DP 1 on the same optimizer and to
    ZeRO-2 at DP 2: LAMB's one group per tensor leaves some groups without an element on a rank,
    which DeepSpeed 0.19.8's ZeRO-1/2 universal loader failed on (elastic._load_zero12_universal)."""
    tmp, _ = setup
    reference = tmp_path / "reference"
    pretrain(lamb_bf16_config(tmp_path, "z1", 1), tmp / "init", data_dir, reference, 2, steps=8)
    assert (reference / "checkpoints" / "global_step4" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    for name, stage, nproc, rel in (("dp1", 1, 1, 1e-5), ("zero2", 2, 2, 1e-4)):
        run = moved(reference, "global_step4", tmp_path / name)
        pretrain(lamb_bf16_config(tmp_path, name, stage), tmp / "init", data_dir, run, nproc, "--resume",
                 "--save-interval", 1, steps=8)
        mine, ref = losses(run), losses(reference)
        # DP 1 accumulates 4 micro batches where DP 2 sums 2 + 2; ZeRO-2 in bf16 also rounds and
        # reduces its gradients otherwise than BF16_Optimizer
        for step in range(5, 9):
            assert mine[step] == pytest.approx(ref[step], rel=rel, abs=0), (name, step)
        at_move, want = masks(run, "global_step5"), masks(reference, "global_step4")
        for key in want:
            assert torch.equal(at_move[key], want[key]), (name, key)


def test_a_dp2_x_tp2_run_moves_to_two_ranks_before_and_after_its_shrink(earlybert_tp2_run, data_dir, tmp_path):
    """The 4-rank EarlyBERT + SET run (DP 2 x TP 2, conftest) moved to 2 ranks: mid-search to
    DP 2 x TP 1, after the shrink to DP 1 x TP 2. Both carry the masks of the move bit for bit
    (no SET update at the step after it), the shrunk structure, and train on to the end."""
    run_json = json.loads((earlybert_tp2_run / "run.json").read_text())
    steps = run_json["max_steps"]
    cfg = run_json["deepspeed_config"]
    cfg.pop("gradient_accumulation_steps")
    cfg["train_batch_size"] = run_json["global_batch"]  # the step's samples, whatever the layout
    for name, tag, tp in (("dp2_tp1", "global_step4", 1), ("dp1_tp2", "global_step12", 2)):
        cfg["tensor_parallel"] = {"autotp_size": tp}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cfg))
        run = moved(earlybert_tp2_run, tag, tmp_path / name)
        proc = launch([PRETRAIN, "--deepspeed_config", path, "--data", data_dir, "--model", "bert-mini",
                       "--output", run, "--no-progress", "--max-steps", steps, "--save-interval", 1, "--resume"])
        out = proc.stdout + proc.stderr
        assert "2 data-parallel x 2 tensor-parallel, ZeRO-1/2 -> " in out
        moved_at = int(tag.removeprefix("global_step"))
        after = masks(run, f"global_step{moved_at + 1}")
        before = masks(earlybert_tp2_run, tag)
        assert after.keys() == before.keys() and len(before) == 24  # bert-mini: 4 layers x 6 Linear weights
        for key in before:
            assert torch.equal(after[key], before[key]), (name, key)
        final = json.loads((run / "checkpoints" / f"global_step{steps}" / "structure.json").read_text())
        assert final["structured"]["phase"] == "shrunk"
        if tag == "global_step12":  # shrunk before the move: the same structure after it
            assert final == json.loads((earlybert_tp2_run / "checkpoints" / tag / "structure.json").read_text())
        train = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
        assert [r["step"] for r in train][-1] == steps and all(math.isfinite(r["loss"]) for r in train)
