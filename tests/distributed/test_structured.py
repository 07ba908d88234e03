"""EarlyBERT on gloo: layouts decide the same, the whole run (search, ticket, shrink, continue)
on DP2 x TP2, and resume before and after the shrink."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dslaunch import ROOT, launch, run_script

from dist_sparse.config import StructuredPruningConfig
from dist_sparse.structured.pruner import PrunePlan

pytestmark = pytest.mark.distributed
PRETRAIN = ROOT / "launchers" / "pretrain.py"


def load_planted():
    import importlib.util

    spec = importlib.util.spec_from_file_location("structured_check", Path(__file__).parent / "scripts" /
                                                  "structured_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("layouts", [[(2, 1), (2, 2), (3, 1)]])
def test_tp1_tp2_and_zero3_decide_the_same_as_the_unsharded_reference(layouts, tmp_path):
    """Planted coefficients with ties: DP2 (ZeRO-2), DP1 x TP2 (ZeRO-2) and DP2 (ZeRO-3) draw the
    same ticket, on every rank, for scope layer and global, and it is the unsharded decision."""
    mod = load_planted()
    results = []
    for stage, tp in layouts:
        out = tmp_path / f"z{stage}_tp{tp}.json"
        run_script("structured_check.py", out, stage, tp)
        results.append(json.loads(out.read_text()))
    for r in results:
        assert all(view == r["tickets"] for view in r["all_ranks"]), "ranks disagree on the ticket"
    tp2 = next(r for r in results if r["tp"] == 2)
    assert tp2["local_head_coef"] == [mod.HEADS // 2]  # each TP rank holds only its block
    for scope in ("layer", "global"):
        cfg = StructuredPruningConfig(scope=scope, head_ratio=0.5, ffn_ratio=0.4, max_search_steps=1)
        for r in results:
            # Counts round to multiples of the TP degree, so each layout is compared with the
            # unsharded decision under its own rounding.
            heads, neurons = PrunePlan(cfg, r["tp"]).decide(
                [mod.planted(i, mod.HEADS).abs() for i in range(mod.LAYERS)],
                [mod.planted(i, mod.FFN).abs() for i in range(mod.LAYERS)])
            want = {"heads": [m.nonzero().flatten().tolist() for m in heads],
                    "neurons": [m.nonzero().flatten().tolist() for m in neurons]}
            assert r["tickets"][scope] == want, f"scope {scope}: layout tp={r['tp']} differs from the reference"
    # Per-layer scope at these ratios rounds alike at TP 1 and 2 (heads 2 of 4; FFN 76.8 -> 80 in
    # multiples of 8 and of 16), so there all layouts must draw the very same ticket.
    assert results[0]["tickets"]["layer"] == results[1]["tickets"]["layer"] == results[2]["tickets"]["layer"]
    assert [len(n) for n in results[0]["tickets"]["layer"]["neurons"]] == [80, 80, 80]


def write_config(tmp_path: Path, base: str, stage: int, accumulation: int = 1, **structured) -> Path:
    cfg = json.loads((ROOT / "ds_configs" / base).read_text())
    cfg["zero_optimization"] = {"stage": stage}
    cfg["train_micro_batch_size_per_gpu"] //= accumulation
    cfg["gradient_accumulation_steps"] = accumulation
    cfg["structured_pruning"].update(structured)
    path = tmp_path / f"cfg_{stage}.json"
    path.write_text(json.dumps(cfg))
    return path


def pretrain(config: Path, data: Path, run: Path, *extra, nproc: int = 2, model: str = "bert-mini", **kw):
    return launch([PRETRAIN, "--deepspeed_config", config, "--data", data, "--model", model,
                   "--output", run, "--no-progress", *extra], nproc=nproc, timeout=900, **kw)


def metrics(run: Path, split: str) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [m for m in lines if m["split"] == split]


def check_early_bird_rule(structured: list[dict], window: int, epsilon: float, max_search: int) -> int:
    """From the logged distances: the ticket step is the first check where the rule holds (or the
    forced one at max_search_steps), not earlier and not later."""
    checks = [m for m in structured if "kept_heads" in m]
    ticket = [m for m in structured if "ticket_step" in m]
    assert len(ticket) == 1, "exactly one ticket"
    step = int(ticket[0]["ticket_step"])
    history = []
    for m in checks:
        if "distance/heads" in m:
            history.append(max(m["distance/heads"], m["distance/neurons"]))
        holds = len(history) >= window and max(history[-window:]) < epsilon
        if m["step"] < step:
            assert not holds, f"the rule held at step {m['step']} but the ticket was drawn at {step}"
        elif m["step"] == step:
            assert holds or step >= max_search
    assert checks[-1]["step"] == step  # no check after the ticket
    return step


def test_earlybert_dp2_x_tp2_zero2_search_shrink_and_continue(earlybert_tp2_run):
    """The shared DP2 x TP2 ZeRO-2 run (conftest.py): checks every 3 steps, window 2, epsilon 0.1,
    forced at 12; 24 steps on one batch, a checkpoint every 4 steps."""
    run = earlybert_tp2_run
    section = json.loads((run / "run.json").read_text())["deepspeed_config"]["structured_pruning"]
    structured = metrics(run, "structured")
    step = check_early_bird_rule(structured, section["window"], section["epsilon"], section["max_search_steps"])
    assert step in (9, 12)
    shrink = next(m for m in structured if "ticket_step" in m)
    assert shrink["shrink/relative_diff"] < 1e-5       # fp32: the shrunk model is the masked model
    assert shrink["shrink/tp_imbalance"] == 1.0        # both TP shards hold the same FLOPs
    assert shrink["shrink/old_engine_released"] == 1.0  # nothing kept the old model alive
    assert shrink["flop_ratio"] < 0.7
    losses = [m["loss"] for m in metrics(run, "train")]
    assert len(losses) == 24
    after = losses[step:]
    assert sum(after[-3:]) / 3 < sum(after[:3]) / 3 - 0.1, f"loss did not fall after the shrink: {after}"

    tag = run / "checkpoints" / "global_step24"
    structure = json.loads((tag / "structure.json").read_text())
    assert structure["structured"]["phase"] == "shrunk"
    assert structure["model_config"]["layer_num_heads"] == [2, 2, 2, 2]
    widths = structure["model_config"]["layer_intermediate_sizes"]
    assert widths == [608] * 4  # 1024 * 0.6 = 614.4 -> nearest multiple of 8 x TP 2
    shards = [torch.load(tag / f"mp_rank_0{r}_model_states.pt", map_location="cpu", weights_only=False)["module"]
              for r in (0, 1)]
    for key, shape in (("bert.encoder.layer.0.attention.self.query.weight", (64, 256)),
                       ("bert.encoder.layer.0.intermediate.dense.weight", (304, 256)),
                       ("bert.encoder.layer.0.output.dense.weight", (256, 304))):
        assert [tuple(s[key].shape) for s in shards] == [shape, shape], key
    assert not any(k.endswith("slimming_coef") for k in shards[0])
    from dslaunch import BIN, launch_env
    import subprocess
    report = subprocess.run([str(BIN / "dist-sparse"), "inspect", str(run)], capture_output=True, text=True,
                            env=launch_env(), check=True).stdout
    assert "phase shrunk" in report and report.count("2 / 4") == 4 and report.count("608 / 1024") == 4
    # The shrink happens inside step `step`, before that step's checkpoint: global_step12 is small,
    # global_step4 (before any ticket could be drawn) still searching.
    at12 = json.loads((run / "checkpoints" / "global_step12" / "structure.json").read_text())
    assert at12["structured"]["phase"] == "shrunk" and at12["structured"]["ticket_step"] == step
    at4 = json.loads((run / "checkpoints" / "global_step4" / "structure.json").read_text())
    assert at4["structured"]["phase"] == "search"


def test_resume_before_and_after_the_shrink_reproduces_the_run(data_dir, tmp_path):
    """ZeRO-3, 2 ranks, gradient accumulation 3 (the shrink's priming cycle must end on a boundary
    for the later steps to line up). A run that lost its save of step 16 (after the shrink)
    resumes from the pre-shrink step 8: resuming repeats the search, draws the same ticket at the
    same step and gives the same losses. A second resume starts from the post-shrink step 16 and
    builds the small model from the checkpoint alone."""
    cfg = write_config(tmp_path, "cpu_zero2_earlybert.json", 3, accumulation=3, check_interval=3, window=2,
                       epsilon=0.1, max_search_steps=12)
    # sparse as well (SET, updates at 5, 10, 15): masks resume before the shrink, are carried
    # through it, and resume after it, under ZeRO-3's slices
    raw = json.loads(cfg.read_text())
    raw["sparsity"] = {"method": "set", "sparsity": 0.5, "update_interval": 5, "end_fraction": 1.0}
    cfg.write_text(json.dumps(raw))
    args = ("--max-steps", 20, "--save-interval", 8)
    whole = tmp_path / "whole"
    pretrain(cfg, data_dir, whole, *args)
    shrink = next(m for m in metrics(whole, "structured") if "ticket_step" in m)
    ticket_step = int(shrink["ticket_step"])
    assert 8 < ticket_step <= 12
    assert shrink["shrink/old_engine_released"] == 1.0  # ZeRO-3 frees the old engine as well

    # A run whose save of step 16 was lost (tests/distributed/test_pretrain.py and test_drills.py
    # crash real saves): its `latest` is the pre-shrink step 8.
    broken = tmp_path / "broken"
    shutil.copytree(whole, broken)
    for tag in ("global_step16", "global_step20"):
        shutil.rmtree(broken / "checkpoints" / tag, ignore_errors=True)
    (broken / "checkpoints" / "latest").write_text("global_step8")
    pretrain(cfg, data_dir, broken, *args, "--resume")

    after = tmp_path / "after"
    shutil.copytree(whole, after)
    (after / "checkpoints" / "latest").write_text("global_step16")
    pretrain(cfg, data_dir, after, *args, "--resume")

    want = [(m["step"], m["loss"]) for m in metrics(whole, "train")]
    assert [s for s, _ in want] == list(range(1, 21))
    for run in (broken, after):
        got = [(m["step"], m["loss"]) for m in metrics(run, "train")]
        assert [s for s, _ in got] == list(range(1, 21))
        for (step, a), (_, b) in zip(want, got):
            assert abs(a - b) <= 1e-6 * abs(a), f"{run.name} step {step}: uninterrupted {a} vs resumed {b}"
        assert metrics(run, "eval")[-1]["mlm_loss"] == pytest.approx(metrics(whole, "eval")[-1]["mlm_loss"], rel=1e-6)
    resumed_ticket = [m for m in metrics(broken, "structured") if "ticket_step" in m]
    assert [int(m["ticket_step"]) for m in resumed_ticket] == [ticket_step]
    final = [json.loads((r / "checkpoints" / "global_step20" / "structure.json").read_text()) for r in
             (whole, broken, after)]
    assert final[0] == final[1] == final[2]
    assert final[0]["structured"]["phase"] == "shrunk"
    from dist_sparse.train.checkpoint import logical_masks
    masks = [logical_masks(r / "checkpoints" / "global_step20") for r in (whole, broken, after)]
    assert len(masks[0]) == 24 and masks[0].keys() == masks[1].keys() == masks[2].keys()
    for name, m in masks[0].items():
        assert torch.equal(m, masks[1][name]) and torch.equal(m, masks[2][name]), name
        assert int(m.sum()) == math.floor(0.5 * m.numel() + 0.5), name  # the update at 15, on the small shapes


def test_l1_reaches_a_dead_head_in_full_in_fp32_and_bf16_at_accumulation_8(tmp_path):
    """ZeRO 1/2/3 on 2 ranks, LAMB, accumulation 8, fp32 and bf16 (fp32 accumulation): a head
    that no data gradient reaches has LAMB's L1 term as its coefficient's whole gradient. Its
    first moment is exactly l1 * (1 - 0.9**t) (the full l1, not a bf16-rounded share of it), and
    the coefficient falls at every step, in bf16 as in fp32."""
    out = tmp_path / "l1.json"
    run_script("structured_check.py", "l1", out)
    report = json.loads(out.read_text())
    l1 = report["l1"]
    runs = [case for per_rank in report["ranks"] for case in per_rank]
    assert {(c["stage"], c["dtype"]) for c in runs} == {(s, d) for s in (1, 2, 3)
                                                          for d in ("torch.float32", "torch.bfloat16")}
    fp32 = {c["stage"]: c["values"] for c in runs if not c["bf16"]}
    for c in runs:
        for t, m in enumerate(c["exp_avg"], start=1):
            assert m == pytest.approx(l1 * (1 - 0.9 ** t), rel=1e-6), (c["stage"], c["bf16"], t)
        assert all(b < a for a, b in zip(c["values"], c["values"][1:])), c
        # the fall is LAMB's (trust ratio from the whole coefficient tensor), so bf16 follows fp32
        assert c["values"][-1] == pytest.approx(fp32[c["stage"]][-1], abs=1e-5), c


def test_bf16_zero1_search_shrink_and_continue_at_accumulation_2(data_dir, tmp_path):
    """The BERT-large precision recipe on CPU: bf16 weights with fp32 gradient accumulation, so
    ZeRO-1 runs on DeepSpeed's BF16_Optimizer; micro batch 4 x accumulation 2, ticket forced at
    step 6, shrink, 4 more steps. The shrunk bf16 engine computes the fp32 masked model's outputs
    within the bf16 tolerance, the old engine is released, every step is logged and the learning
    rate after the shrink is the schedule's."""
    from dist_sparse.config import load_run_config, lr_multiplier

    cfg = json.loads((ROOT / "ds_configs" / "cpu_zero2_earlybert.json").read_text())
    cfg.update({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
                "zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 4,
                "gradient_accumulation_steps": 2})
    cfg["structured_pruning"].update(check_interval=3, window=2, max_search_steps=6)
    path = tmp_path / "bf16.json"
    path.write_text(json.dumps(cfg))
    run = tmp_path / "run"
    pretrain(path, data_dir, run, "--max-steps", 10, model="bert-tiny")
    shrink = next(m for m in metrics(run, "structured") if "ticket_step" in m)
    assert shrink["ticket_step"] == 6
    assert 0 < shrink["shrink/relative_diff"] < 3e-2
    assert shrink["shrink/old_engine_released"] == 1.0
    train = metrics(run, "train")
    assert [m["step"] for m in train] == list(range(1, 11))
    assert all(math.isfinite(m["loss"]) for m in train)
    # The checkpoint of DeepSpeed's BF16_Optimizer (bf16_zero_pp_rank_* files) exports, and the
    # consolidated fp32 masters round exactly to the bf16 module weights the checkpoint holds.
    from dist_sparse.export.checkpoint import consolidate
    from dist_sparse.train.checkpoint import read_info
    from dist_sparse.export.hf import export
    from dist_sparse.model import DistSparseBertConfig

    tag = run / "checkpoints" / "global_step10"
    assert sorted(p.name for p in tag.glob("*optim_states.pt")) == [
        f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    info = read_info(tag)
    masters = consolidate(info, DistSparseBertConfig.from_dict(info.model_config))
    module = info.client_state["module"]
    assert len(masters) > 20 and all(torch.equal(masters[k].to(torch.bfloat16), module[k]) for k in masters)
    assert export(run, tmp_path / "hf")["max_diff"] < 1e-4

    run_cfg = load_run_config(path)
    peak = cfg["optimizer"]["params"]["lr"]
    for m in train:
        # DeepSpeed reports the lr the scheduler set after step s, i.e. the multiplier at s
        assert m["lr"] == pytest.approx(peak * lr_multiplier(m["step"], run_cfg.training, 10), rel=1e-6), m["step"]
