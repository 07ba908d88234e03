"""Step-time overhead of sparse training: dense vs fixed mask vs RigL, side by side in one run.

Three engines are built up front from the same initial weights and the same synthetic batches:

    dense   no sparsity section
    fixed   method "static" (the first mask never changes), --sparsity (0.9), --distribution (erk)
    rigl    method "rigl", same sparsity and distribution, update interval --rigl-interval (100)

and timed in interleaved rounds (dense fixed rigl, fixed rigl dense, rigl dense fixed, ...: the
order rotates), --steps-per-round optimizer steps of each per round, so that whatever else the
machine is doing hits the three alike. A step is the run's own, ``Trainer.train_step`` with the
sparsifier as a component: ``before_step``, forward, ``engine.backward``, ``mask_gradients`` at
the accumulation boundary, ``engine.step``, then ``sparsifier.step`` (the mask update on RigL's
update steps); two clock components around the sparsity component time its hooks.

Reported, as ratios to the dense step:
- fixed / dense (DESIGN §9 target <= 1.03);
- RigL amortized / dense: the mean over all timed RigL steps, update steps included, at the
  interval actually run; and, because a short run can only afford a small interval, the same
  figure extrapolated to dT = 100 from the two kinds of RigL step measured here:
  amortized(100) = (99 * t_between + t_update) / 100 (target <= 1.05);
- mask-update latency (``sparsifier.step`` on an update step) and the dense-gradient read
  (``mask_gradients`` on an update step);
- bytes per update: ``UpdateStats.sync_bytes`` (deciding and verifying the masks) and
  ``apply_bytes`` (zeroing ZeRO's copies), against one bf16 all-reduce payload of the sparse
  weights (2 bytes x numel); sync target <= 1/16.

    python benchmarks/sparse_overhead.py --model bert-mini --rigl-interval 10
    deepspeed --num_gpus 2 benchmarks/sparse_overhead.py --model bert-mini --rigl-interval 10 \\
        --deepspeed_config ds_configs/cpu_zero3.json --json /tmp/so/zero3.json
    deepspeed --num_gpus 1 benchmarks/sparse_overhead.py --model bert-large --seq-len 128 \\
        --deepspeed_config ds_configs/bert_large_phase1_seq128_zero2.json --micro-batch 64 \\
        --rounds 10 --steps-per-round 20

Ratios are computed two ways: the ratio of mean step times over the whole run, and the median
over rounds of the per-round ratio (each round's variants ran back to back, so this one is
less sensitive to slow drifts in machine load); the ratio of the fastest steps is printed too.
Step times are those of the slowest rank. Because a few percent is far below the scatter of step
times on a shared machine, the direct per-step work of a fixed mask is also timed on its own:
the gradient hook's masking (ZeRO-1/2, on stand-in gradients) and ``mask_gradients`` (ZeRO-3).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

# The shared helpers live beside this file; importing them also puts the repository root on
# sys.path, for a checkout whose package is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DATA_POOL, batch_arithmetic, bootstrap_ratio_ci, device_name, git_state,  # noqa: E402
                     precision, prepare_deepspeed_dict, remove_own_shm_buffer, interleaved, run_main,
                     setup_device, single_process_env, stats, synthetic_batches, timed, utc_now_iso,
                     write_json)

VARIANTS = ("dense", "fixed", "rigl")
# bf16 all-reduce payload of the sparse weights: 2 bytes per element (DESIGN §4's yardstick).
BF16_BYTES = 2
DT_TARGET = 100  # the update interval the RigL target is stated at


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sparse-training step overhead: dense vs fixed mask vs RigL.")
    p.add_argument("--model", default="bert-mini", help="model preset (bert-tiny ... bert-large)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   default="ds_configs/cpu_zero2.json",
                   help="DeepSpeed JSON (a \"sparsity\" section in it is ignored: the script sets its own)")
    p.add_argument("--zero-stage", type=int, choices=(1, 2, 3), default=None,
                   help="override zero_optimization.stage of the config")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="train_micro_batch_size_per_gpu (gradient accumulation 1, global batch follows the ranks)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=30522, help="default: BERT's uncased WordPiece vocabulary")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--distribution", choices=("erk", "uniform"), default="erk",
                   help="per-layer densities of both sparse variants")
    p.add_argument("--rigl-interval", type=int, default=DT_TARGET,
                   help="RigL's update interval dT; a short CPU run may use less (the dT=100 figure is "
                        "then extrapolated from the measured update step)")
    p.add_argument("--horizon", type=int, default=100_000,
                   help="training length the sparsity schedule assumes; large, so that every timed step "
                        "lies before end_fraction and the drop fraction stays near its initial 0.3")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each variant before the first round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps-per-round", type=int, default=5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", dest="json_out", default=None, help="write the result (rank 0) to this file")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def sparsity_section(method: str, args) -> dict:
    sec = {"method": method, "sparsity": args.sparsity, "distribution": args.distribution, "seed": 1}
    if method == "rigl":
        sec["update_interval"] = args.rigl_interval
    return sec


def isolated_hook_cost(sp, device, reps: int, sync) -> dict | None:
    """The per-step work of a fixed mask under ZeRO-1/2, timed alone: the gradient hook's
    ``masked_fill`` on every sparse weight's gradient, here on stand-in gradients of the same
    shapes and dtype with the run's masks. Step times on a shared machine scatter by far more
    than the few percent at stake; this figure does not. (ZeRO-3's per-step work is
    ``mask_gradients``, timed inside the steps instead.)"""
    import torch

    if sp.zero.partitioned:
        return None
    grads = [torch.randn(t.shard_shape, device=device).to(t.param.dtype) for t in sp.targets]
    masks = [sp.masks[t.name].to(device).view(t.shard_shape) for t in sp.targets]

    def mask_all() -> None:
        for g, m in zip(grads, masks):
            g.masked_fill(~m, 0)  # what Sparsifier._grad_hook returns for every gradient

    return stats([timed(mask_all, sync)[0] for _ in range(reps)])


def run(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    if args.rounds < 1 or args.steps_per_round < 1 or args.warmup < 0:
        raise ValueError("--rounds and --steps-per-round must be >= 1, --warmup >= 0")
    if not 0 < args.sparsity < 1:
        raise ValueError("--sparsity must be in (0, 1)")
    if args.rigl_interval < 1:
        raise ValueError("--rigl-interval must be >= 1")
    last_step = args.warmup + args.rounds * args.steps_per_round
    if last_step >= 0.75 * args.horizon:
        raise ValueError("--horizon too short: RigL stops updating at 75% of it, before the last timed step")
    single_process_env()

    import torch
    import deepspeed

    from dist_sparse.config import parse_run_config
    from dist_sparse.distributed import comm
    from dist_sparse.model.presets import build_config, build_model, count_parameters
    from dist_sparse.train.engine import build_engine
    from dist_sparse.train.sparse import build_sparsifier

    path = Path(args.deepspeed_config)
    raw = prepare_deepspeed_dict(json.loads(path.read_text()), args.micro_batch)
    raw.pop("sparsity", None)
    if args.zero_stage is not None:
        raw["zero_optimization"] = {**raw.get("zero_optimization", {}), "stage": args.zero_stage}
    cfgs = {"dense": raw, "fixed": {**raw, "sparsity": sparsity_section("static", args)},
            "rigl": {**raw, "sparsity": sparsity_section("rigl", args)}}
    run_cfgs = {v: parse_run_config(c, source=f"{path} ({v})") for v, c in cfgs.items()}
    dense_cfg = run_cfgs["dense"]
    world, _, global_batch, micro_bs, grad_acc = batch_arithmetic(dense_cfg)

    comm.init()
    rank = comm.rank()
    on_gpu, sync = setup_device(comm.local_rank())

    model_config = build_config(args.model, vocab_size=args.vocab_size,
                                max_position_embeddings=max(512, args.seq_len))

    # All three start from the same weights (same seed) so that the dense and sparse models do
    # the same work apart from the masks; the sparse ones prune their copy in prepare().
    engines, sparsifiers = {}, {}
    for v in VARIANTS:
        torch.manual_seed(args.seed)
        model = build_model(model_config)
        n_params = count_parameters(model)
        engines[v] = build_engine(model, run_cfgs[v], lr_lambda=lambda step: 1.0)
        engines[v].train()
        groups = comm.parallel_groups(run_cfgs[v].tp_size)
        sparsifiers[v] = build_sparsifier(engines[v], run_cfgs[v], groups, args.horizon)
        if sparsifiers[v] is not None:
            sparsifiers[v].prepare(draw=True)
    sparse_numel_local = sum(t.shard_numel for t in sparsifiers["fixed"].targets)
    sparse_numel = sum(t.numel for t in sparsifiers["fixed"].targets)
    n_targets = len(sparsifiers["fixed"].targets)

    batches = synthetic_batches(DATA_POOL, micro_bs, args.seq_len, args.vocab_size,
                                args.seed + 1000 * groups.dp_rank, engines["dense"].device)
    cursor = {v: 0 for v in VARIANTS}
    step_no = {v: 0 for v in VARIANTS}

    from dist_sparse.train.components import Component
    from dist_sparse.train.sparse import SparsityComponent
    from dist_sparse.train.trainer import Trainer

    class Clock(Component):
        """Time stamps around the sparsity component's hooks: one clock before it in the list,
        one after it. Only RigL's update step (the dense-gradient read) is synchronised around
        ``mask_gradients``: a sync on other steps would add host stalls the training loop does
        not have, so there, on a GPU, the figure is host time only."""

        def __init__(self, marks: dict, which: str):
            self.marks, self.which = marks, which

        def on_before_optimizer_step(self, trainer, step):
            if self.marks["dense_grad"]:
                sync()
            self.marks[f"mask_{self.which}"] = time.perf_counter()

        def on_after_optimizer_step(self, trainer, step):
            sync()
            self.marks[f"step_{self.which}"] = time.perf_counter()

    marks: dict = {"dense_grad": False}
    sparsity_parts = {v: None if sparsifiers[v] is None else
                      SparsityComponent(None, seq_len=args.seq_len, tokens_per_step=global_batch * args.seq_len,
                                        sparsifier=sparsifiers[v]) for v in VARIANTS}
    trainers = {v: Trainer(engines[v], model_config, groups, zero_stage=run_cfgs[v].zero_stage,
                           components=[Clock(marks, "start")] + ([sparsity_parts[v]] if sparsity_parts[v] else [])
                           + [Clock(marks, "end")])
                for v in VARIANTS}
    del engines

    def one_step(v: str) -> dict:
        """One optimizer step of variant v through ``Trainer.train_step``, the run's sequence, timed."""
        sp = sparsifiers[v]
        step_no[v] += 1
        step = step_no[v]
        update = sp is not None and sp.is_update_step(step)
        marks["dense_grad"] = update and sp.method.dense_grad
        applied0 = sp.zero.bytes_applied if sp is not None else 0

        def micro_batches():
            for _ in range(grad_acc):
                cursor[v] += 1
                yield batches[(cursor[v] - 1) % DATA_POOL]
        sync()
        t0 = time.perf_counter()
        trainers[v].train_step(micro_batches(), step)
        sync()
        t2 = time.perf_counter()
        update_stats = sparsity_parts[v].last_update if sp is not None else None
        rec = {"v": v, "step": step, "total": t2 - t0, "sp_step": marks["step_end"] - marks["step_start"],
               "mask_grad": marks["mask_end"] - marks["mask_start"], "update": bool(update)}
        if update_stats is not None:
            rec.update(sync_bytes=update_stats.sync_bytes, apply_bytes=update_stats.apply_bytes,
                       # everything ZeroAccess moved over the step, the dense-gradient read included
                       applied_step_bytes=sp.zero.bytes_applied - applied0,
                       changed=update_stats.changed, active=update_stats.active, total_w=update_stats.total)
        return rec

    for _ in range(args.warmup):
        for v in VARIANTS:
            one_step(v)
    sync()
    hook_cost = isolated_hook_cost(sparsifiers["fixed"], trainers["fixed"].engine.device, 20, sync)
    comm.barrier()

    # The order rotates from round to round (dense fixed rigl, fixed rigl dense, ...) so that no
    # variant always runs first or last in a round, after the same neighbour.
    records, wall, (load_before, load_after) = interleaved(
        VARIANTS, args.rounds, args.steps_per_round, lambda v, r: {**one_step(v), "round": r})
    # Density over all sparse weights after the run (a check that the masks held their target).
    densities = {}
    for v in ("fixed", "rigl"):
        dens = sparsifiers[v].densities()
        densities[v] = sum(dens[t.name] * t.numel for t in sparsifiers[v].targets) / sparse_numel

    all_records = comm.all_gather_object(records)
    if rank != 0:
        comm.barrier()
        remove_own_shm_buffer()
        return None

    # Steps are synchronous across ranks (gradient reduction, and the sparsifier's collectives),
    # so each step costs what its slowest rank took.
    merged = []
    for i, rec in enumerate(all_records[0]):
        per_rank = [recs[i] for recs in all_records]
        m = dict(rec)
        for key in ("total", "sp_step", "mask_grad"):
            m[key] = max(p[key] for p in per_rank)
        if rec["update"]:
            for key in ("sync_bytes", "apply_bytes", "applied_step_bytes"):
                m[key + "_per_rank"] = [p[key] for p in per_rank]
        merged.append(m)

    def times(v, pred=lambda m: True):
        return [m["total"] for m in merged if m["v"] == v and pred(m)]

    t = {v: stats(times(v)) for v in VARIANTS}
    dense_mean = t["dense"]["mean"]
    per_round = {v: [sum(m["total"] for m in merged if m["v"] == v and m["round"] == r) for r in range(args.rounds)]
                 for v in VARIANTS}
    rigl_between = stats(times("rigl", lambda m: not m["update"]))
    rigl_update = stats(times("rigl", lambda m: m["update"]))
    upd = [m for m in merged if m["v"] == "rigl" and m["update"]]
    # Per-round ratios for RigL's between-update steps only (a round with an update step would
    # mix the two kinds): per-round mean of its non-update steps over the round's dense mean.
    rigl_between_round_ratio = []
    for r in range(args.rounds):
        nb = [m["total"] for m in merged if m["v"] == "rigl" and m["round"] == r and not m["update"]]
        if nb:
            rigl_between_round_ratio.append(statistics.fmean(nb) / (per_round["dense"][r] / args.steps_per_round))

    result = {
        "benchmark": "sparse_overhead",
        "model": args.model, "params": n_params, "seq_len": args.seq_len, "vocab_size": args.vocab_size,
        "deepspeed_config": str(path), "zero_stage": dense_cfg.zero_stage, "precision": precision(dense_cfg.deepspeed),
        "world_size": world, "dp_size": groups.dp_size, "tp_size": groups.tp_size,
        "micro_batch": micro_bs, "gradient_accumulation": grad_acc, "global_batch": global_batch,
        "sparsity": args.sparsity, "distribution": args.distribution, "rigl_interval": args.rigl_interval,
        "horizon": args.horizon, "sparse_targets": n_targets, "sparse_numel": sparse_numel,
        "sparse_numel_per_rank": sparse_numel_local, "final_density": densities,
        "warmup_steps": args.warmup, "rounds": args.rounds, "steps_per_round": args.steps_per_round,
        "order": "interleaved rounds, order rotated each round: " + " ".join(VARIANTS) + ", "
                 + " ".join(VARIANTS[1:] + VARIANTS[:1]) + ", ...",
        "step_time_s": t,
        "ratio_fixed_dense_mean": t["fixed"]["mean"] / dense_mean,
        "ratio_fixed_dense_round_median": statistics.median(f / d for f, d in zip(per_round["fixed"], per_round["dense"])),
        "ratio_fixed_dense_ci95": bootstrap_ratio_ci(per_round["fixed"], per_round["dense"]),
        # On a machine shared with other jobs the fastest step is the least disturbed one.
        "ratio_fixed_dense_min": t["fixed"]["min"] / t["dense"]["min"],
        "rigl_timed_steps": t["rigl"]["n"], "rigl_update_steps_timed": len(upd),
        "ratio_rigl_dense_measured": t["rigl"]["mean"] / dense_mean,
        "rigl_between_step_s": rigl_between, "rigl_update_step_s": rigl_update,
        "ratio_rigl_between_dense_round_median": (statistics.median(rigl_between_round_ratio)
                                                  if rigl_between_round_ratio else None),
        "ratio_rigl_between_dense_min": rigl_between["min"] / t["dense"]["min"] if rigl_between else None,
    }
    if rigl_between and rigl_update:
        amort = (99 * rigl_between["mean"] + rigl_update["mean"]) / DT_TARGET
        result["rigl_amortized_dt100_s"] = amort
        result["ratio_rigl_dense_dt100_extrapolated"] = amort / dense_mean
        # The same from the robust pieces: median between-step ratio plus the update step's
        # extra time (over a between step) spread over 100 steps.
        if result["ratio_rigl_between_dense_round_median"] is not None:
            extra = rigl_update["mean"] - rigl_between["mean"]
            result["ratio_rigl_dense_dt100_extrapolated_round_median"] = (
                result["ratio_rigl_between_dense_round_median"] + extra / DT_TARGET / dense_mean)
    if upd:
        result["mask_update_latency_s"] = stats([m["sp_step"] for m in upd])
        result["dense_grad_read_s"] = stats([m["mask_grad"] for m in upd])
        sync_b = [max(m["sync_bytes_per_rank"]) for m in upd]
        apply_b = [max(m["apply_bytes_per_rank"]) for m in upd]
        step_b = [max(m["applied_step_bytes_per_rank"]) for m in upd]
        payload = BF16_BYTES * sparse_numel_local
        result["bf16_allreduce_payload_bytes"] = payload
        result["sync_bytes_per_update"] = max(sync_b)
        result["apply_bytes_per_update"] = max(apply_b)
        result["zero_bytes_per_update_step"] = max(step_b)
        result["ratio_sync_bf16_allreduce"] = max(sync_b) / payload
        result["ratio_apply_bf16_allreduce"] = max(apply_b) / payload
        result["ratio_zero_step_bytes_bf16_allreduce"] = max(step_b) / payload
        result["churn_per_update"] = [m["changed"] / max(m["active"], 1) for m in upd]
    if hook_cost is not None:
        result["isolated_hook_cost_s"] = hook_cost  # rank 0's
        result["ratio_isolated_hook_cost_dense"] = hook_cost["median"] / t["dense"]["median"]
    fixed_mg = [m["mask_grad"] for m in merged if m["v"] == "fixed"]
    result["fixed_mask_gradients_s"] = stats(fixed_mg)
    result["ratio_fixed_mask_gradients_dense"] = statistics.median(fixed_mg) / t["dense"]["median"]
    # A low-noise estimate built only from directly timed parts: the fixed mask's per-step work
    # plus, once per 100 steps, what an update step adds (dense-gradient read + mask update).
    direct_fixed = (result.get("ratio_isolated_hook_cost_dense", 0.0) + result["ratio_fixed_mask_gradients_dense"])
    result["ratio_fixed_dense_direct_estimate"] = 1.0 + direct_fixed
    if upd:
        extra = statistics.fmean(m["sp_step"] + m["mask_grad"] for m in upd)
        result["rigl_update_extra_direct_s"] = extra
        result["ratio_rigl_dense_dt100_direct_estimate"] = 1.0 + direct_fixed + extra / DT_TARGET / t["dense"]["median"]
    # The initial mask draw of the fixed variant (prepare), for reference: under ZeRO-3 it is a
    # distributed top-k too.
    result["fixed_prepare_sync_bytes"] = sparsifiers["fixed"].history[0]["sync_bytes"]
    result.update({
        "device": device_name(on_gpu), "accelerator": "cuda" if on_gpu else "cpu",
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg_1m_before_after": [load_before, load_after], "timed_wall_s": wall,
        "torch": torch.__version__, "deepspeed": deepspeed.__version__, "host": socket.gethostname(),
        "git": git_state(),
        "time_utc": utc_now_iso(),
        "per_round_s": per_round, "steps": merged,
    })
    print(format_report(result), flush=True)
    if args.json_out:
        write_json(args.json_out, result)
    comm.barrier()
    remove_own_shm_buffer()
    return result


def format_report(r: dict) -> str:
    def ms(x):
        return "n/a" if x is None else f"{1000 * x:.1f}"

    def verdict(x, target):
        return "n/a" if x is None else ("meets" if x <= target else "misses") + f" <= {target:g}"

    t = r["step_time_s"]
    lines = [
        f"sparse overhead: {r['model']} ({r['params'] / 1e6:.1f}M params, {r['sparse_numel'] / 1e6:.2f}M in "
        f"{r['sparse_targets']} sparse weights), seq {r['seq_len']}, {r['precision']}, ZeRO-{r['zero_stage']}, "
        f"{r['world_size']} rank(s), micro batch {r['micro_batch']} x grad acc {r['gradient_accumulation']}; "
        f"sparsity {r['sparsity']:g} ({r['distribution']}), RigL dT={r['rigl_interval']}; "
        f"{r['rounds']} rounds x {r['steps_per_round']} steps of each variant, interleaved, after "
        f"{r['warmup_steps']} warmup; device: {r['device']}"
        + ("" if r["accelerator"] == "cuda" else f" ({r['torch_threads']} torch threads/rank)")
        + "; 1-min load average before/after: " + "/".join(f"{x:.2f}" for x in r["loadavg_1m_before_after"]),
        "",
        "| variant | steps | step ms mean | median | min | max | / dense (means) | / dense (median of rounds) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, ratio, rr in (("dense", 1.0, 1.0), ("fixed", r["ratio_fixed_dense_mean"], r["ratio_fixed_dense_round_median"]),
                         ("rigl", r["ratio_rigl_dense_measured"], None)):
        s = t[v]
        lines.append(f"| {v}{' (all steps, dT=' + str(r['rigl_interval']) + ')' if v == 'rigl' else ''} | {s['n']} | "
                     f"{ms(s['mean'])} | {ms(s['median'])} | {ms(s['min'])} | {ms(s['max'])} | {ratio:.3f} | "
                     f"{'-' if rr is None else f'{rr:.3f}'} |")
    for label, s, rr in (("rigl between updates", r["rigl_between_step_s"], r["ratio_rigl_between_dense_round_median"]),
                         ("rigl update steps", r["rigl_update_step_s"], None)):
        if s:
            lines.append(f"| {label} | {s['n']} | {ms(s['mean'])} | {ms(s['median'])} | {ms(s['min'])} | "
                         f"{ms(s['max'])} | {s['mean'] / t['dense']['mean']:.3f} | "
                         f"{'-' if rr is None else f'{rr:.3f}'} |")
    lines.append("")
    lines.append(f"fixed / dense: {r['ratio_fixed_dense_mean']:.3f} (means; 95% bootstrap over rounds "
                 f"{r['ratio_fixed_dense_ci95'][0]:.3f}-{r['ratio_fixed_dense_ci95'][1]:.3f}), "
                 f"{r['ratio_fixed_dense_round_median']:.3f} "
                 f"(median of rounds), {r['ratio_fixed_dense_min']:.3f} (fastest steps): "
                 f"{verdict(r['ratio_fixed_dense_mean'], 1.03)} on the means")
    direct = []
    if "isolated_hook_cost_s" in r:
        direct.append(f"gradient-hook masking timed alone {ms(r['isolated_hook_cost_s']['median'])} ms "
                      f"= {r['ratio_isolated_hook_cost_dense']:.4f} x the median dense step")
    direct.append(f"mask_gradients per step {ms(r['fixed_mask_gradients_s']['median'])} ms "
                  f"= {r['ratio_fixed_mask_gradients_dense']:.4f} x"
                  + ("" if r["accelerator"] == "cuda" or r["zero_stage"] == 3 else " (a no-op under ZeRO-1/2)"))
    lines.append("fixed mask, direct per-step cost (medians): " + "; ".join(direct)
                 + f" -> fixed / dense estimated from these parts: {r['ratio_fixed_dense_direct_estimate']:.4f}")
    if r["rigl_between_step_s"]:
        lines.append(f"RigL between updates / dense: {r['rigl_between_step_s']['mean'] / t['dense']['mean']:.3f} (means), "
                     f"{r['ratio_rigl_between_dense_round_median']:.3f} (median of rounds), "
                     f"{r['ratio_rigl_between_dense_min']:.3f} (fastest steps)")
    lines.append(f"RigL amortized / dense, MEASURED at dT={r['rigl_interval']} ({r['rigl_update_steps_timed']} update "
                 f"step(s) in {r['rigl_timed_steps']}): {r['ratio_rigl_dense_measured']:.3f}"
                 + (f": {verdict(r['ratio_rigl_dense_measured'], 1.05)}" if r["rigl_interval"] == DT_TARGET else ""))
    if "ratio_rigl_dense_dt100_extrapolated" in r:
        lines.append(f"RigL amortized / dense, EXTRAPOLATED to dT=100 as (99 x between-step + update step) / 100: "
                     f"{r['ratio_rigl_dense_dt100_extrapolated']:.3f} (means), "
                     f"{r.get('ratio_rigl_dense_dt100_extrapolated_round_median', float('nan')):.3f} "
                     f"(median-of-rounds between-step ratio): {verdict(r['ratio_rigl_dense_dt100_extrapolated'], 1.05)} "
                     f"on the means")
        if "ratio_rigl_dense_dt100_direct_estimate" in r:
            lines.append(f"RigL amortized / dense at dT=100, ESTIMATED from directly timed parts (fixed-mask work + "
                         f"(mask update + dense-gradient read = {ms(r['rigl_update_extra_direct_s'])} ms) / 100): "
                         f"{r['ratio_rigl_dense_dt100_direct_estimate']:.4f}")
    else:
        lines.append("RigL dT=100 extrapolation: n/a (no update step, or no between step, was timed)")
    if "mask_update_latency_s" in r:
        lat, dg = r["mask_update_latency_s"], r["dense_grad_read_s"]
        lines.append(f"mask-update latency (sparsifier.step on an update step): mean {ms(lat['mean'])} ms "
                     f"(min {ms(lat['min'])}, max {ms(lat['max'])}); dense-gradient read (mask_gradients on it): "
                     f"mean {ms(dg['mean'])} ms")
        lines.append(f"bytes per update per rank: sync {r['sync_bytes_per_update']:,} "
                     f"= {r['ratio_sync_bf16_allreduce']:.2e} x one bf16 all-reduce payload of the sparse weights "
                     f"({r['bf16_allreduce_payload_bytes']:,} B): {verdict(r['ratio_sync_bf16_allreduce'], 1 / 16)}; "
                     f"apply {r['apply_bytes_per_update']:,} = {r['ratio_apply_bf16_allreduce']:.2f} x; "
                     f"all ZeRO copies read/written over the update step (dense-gradient read included) "
                     f"{r['zero_bytes_per_update_step']:,} = {r['ratio_zero_step_bytes_bf16_allreduce']:.2f} x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
