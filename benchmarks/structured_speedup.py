"""Training step time of dense BERT vs a structurally shrunk one, against the FLOP-ideal speedup.

The shrunk model is EarlyBERT's setting: in every layer a third of the attention heads and 40% of
the FFN neurons are removed, and what remains is a physically smaller
``DistSparseBertForPreTraining`` (per-layer ``layer_num_heads`` / ``layer_intermediate_sizes``).
Kept counts per layer:

    heads  H - round(H * head_ratio), at least 1          12 -> 8 (bert-base), 4 -> 3 (bert-mini),
                                                          16 -> 11 (bert-large)
    FFN    I - round(I * ffn_ratio), then the nearest     3072 -> 1843 -> 1840, 1024 -> 614 -> 616,
           multiple of --ffn-multiple (8)                 4096 -> 2458 -> 2456

(the multiple of 8 keeps GEMM dimensions aligned to vector and tensor-core widths; round() is
half-up). Both models train on the same synthetic MLM batches (as dense_throughput.py). A step is
forward + backward + optimizer step; dense and shrunk steps alternate in interleaved rounds (the
order swaps every round: dense shrunk, shrunk dense, ...) so that load from other jobs on the
machine falls on both alike. Reported per model and mode:

- measured speedup = dense step time / shrunk step time: the median over rounds of the per-round
  ratio (headline: robust to slow drifts in machine load), the ratio of means with a 95% bootstrap
  interval over rounds, and the ratio of the fastest steps;
- FLOP-ideal speedup = dense_flops_per_token(dense) / dense_flops_per_token(shrunk), both with
  training=True. It counts the whole model: the encoder, which shrinks, and the MLM head and
  decoder (hidden x vocabulary at every position) and the NSP head, which structured pruning
  does not shrink; the encoder-only FLOP ratio is printed beside it as a reading aid;
- their quotient (DESIGN §9 target >= 0.85), and the share of the ideal time saving realized,
  (1 - 1/measured) / (1 - 1/ideal), which is the stricter reading when the ideal is close to 1;
- tokens/s of both, and (CPU default) the forward / backward / optimizer phases of the step
  timed separately, so that a shortfall can be placed.

Modes: ``torch`` (default): one process, ``torch.optim.AdamW`` (fused on CUDA) with BERT's
weight-decay groups and gradient clipping at 1.0, bf16 autocast on CUDA, fp32 on CPU.
``deepspeed``: the same through ``dist_sparse.train.engine.build_engine`` on one rank with
--deepspeed_config (CPU default ds_configs/cpu_zero2.json: fp32 AdamW ZeRO-2; CUDA default
ds_configs/bert_large_phase1_seq128_zero1.json: bf16 LAMB ZeRO-1), micro batch from --batch.

    python benchmarks/structured_speedup.py --quick                      # seconds: self-check
    python benchmarks/structured_speedup.py                              # CPU: bert-mini, bert-base
    python benchmarks/structured_speedup.py --models bert-mini --modes torch,deepspeed
    python benchmarks/structured_speedup.py --json $OUT/structured_speedup_gpu.json   # on a GPU:
                                                                         # bert-large, seq 128, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import statistics
import sys
import time
from pathlib import Path

# The shared helpers live beside this file; importing them also puts the repository root on
# sys.path, for a checkout whose package is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DATA_POOL, MLM_PROBABILITY, ROOT, bootstrap_ratio_ci, device_name, git_state,  # noqa: E402
                     peak_tflops_for, precision, prepare_deepspeed_dict, remove_shm_buffers, interleaved,
                     setup_device, single_process_env, stats, synthetic_batches, utc_now_iso, write_json)

VARIANTS = ("dense", "shrunk")
PHASES = ("fwd", "bwd", "opt")
TARGET_QUOTIENT = 0.85  # DESIGN §9: measured speedup >= 0.85 x FLOP-ideal speedup
PROFILE_TOP = 14        # operators listed by --profile

# Micro batch per device when --batch is not given: on the 2-core CPU machines chosen so that a
# dense fp32 step takes roughly 0.3-1 s when the machine is quiet (long enough to time, short
# enough for ~20 rounds); on a GPU the bert-large phase-1 micro batch of
# ds_configs/bert_large_phase1_seq128_*.json.
DEFAULT_BATCH_CPU = {"bert-tiny": 16, "bert-mini": 4, "bert-small": 2, "bert-medium": 1, "bert-base": 1,
                     "bert-large": 1}
DEFAULT_BATCH_GPU = {"bert-large": 64}
DEFAULT_DS_CONFIG = {"cpu": "ds_configs/cpu_zero2.json", "cuda": "ds_configs/bert_large_phase1_seq128_zero1.json"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Dense vs structurally shrunk BERT: training step speedup vs FLOP ratio.")
    p.add_argument("--models", default=None,
                   help="comma-separated presets (default: bert-mini,bert-base on CPU, bert-large on CUDA)")
    p.add_argument("--modes", default="torch", help="comma-separated subset of torch,deepspeed")
    p.add_argument("--head-ratio", type=float, default=1 / 3, help="fraction of heads removed per layer")
    p.add_argument("--ffn-ratio", type=float, default=0.4, help="fraction of FFN neurons removed per layer")
    p.add_argument("--ffn-multiple", type=int, default=8, help="kept FFN width rounded to the nearest multiple")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=None,
                   help="micro batch (sequences per step) for every model (default: per model, see DEFAULT_BATCH_*)")
    p.add_argument("--vocab-size", type=int, default=30522, help="default: BERT's uncased WordPiece vocabulary")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="torch mode: auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON of the deepspeed mode (default: " + ", ".join(
                       f"{k}: {v}" for k, v in DEFAULT_DS_CONFIG.items()) + ")")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps of each variant (default: CPU 2, CUDA 10)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: CPU 20, CUDA 20)")
    p.add_argument("--steps-per-round", type=int, default=None, help="steps of each variant per round (default: CPU 1, CUDA 5)")
    p.add_argument("--phases", choices=("auto", "on", "off"), default="auto",
                   help="time forward / backward / optimizer separately (auto: on for CPU, where it is free; "
                        "off on CUDA, where the extra synchronisations would stall the launch queue)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N more steps of each variant with torch.profiler and print the "
                        "operators with the most self time: where the time that does not shrink goes")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--quick", action="store_true",
                   help="self-check in seconds: bert-tiny, vocab 1000, seq 32, 3 rounds; asserts shapes, FLOP "
                        "arithmetic, finite losses and that the optimizer moved the weights")
    p.add_argument("--json", dest="json_out", default=None, help="write the result here")
    return p


# --- the shrunk configuration ------------------------------------------------------------------

def _round_half_up(x: float) -> int:
    # Python's round() rounds halves to even; a documented half-up rule is easier to reproduce.
    return math.floor(x + 0.5)


def kept_heads(heads: int, removed_fraction: float) -> int:
    return max(1, heads - _round_half_up(heads * removed_fraction))


def kept_ffn(width: int, removed_fraction: float, multiple: int) -> int:
    kept = width - _round_half_up(width * removed_fraction)
    return max(multiple, multiple * _round_half_up(kept / multiple))


def model_configs(preset: str, args):
    """(dense, shrunk) configs of one preset; the shrunk one has the same layers, fewer heads and
    FFN neurons in each."""
    from dist_sparse.model.presets import build_config

    common = dict(vocab_size=args.vocab_size, max_position_embeddings=max(512, args.seq_len))
    dense = build_config(preset, **common)
    layers = dense.num_hidden_layers
    heads = [kept_heads(dense.heads_of(i), args.head_ratio) for i in range(layers)]
    ffn = [kept_ffn(dense.intermediate_of(i), args.ffn_ratio, args.ffn_multiple) for i in range(layers)]
    shrunk = build_config(preset, layer_num_heads=heads, layer_intermediate_sizes=ffn, **common)
    return dense, shrunk


def flop_figures(preset: str, dense, shrunk, seq_len: int) -> dict:
    """FLOP-ideal speedup of the whole model, and of the encoder alone (the part that shrinks)."""
    from dist_sparse.model.presets import build_config, dense_flops_per_token

    f_dense = dense_flops_per_token(dense, seq_len, training=True, mlm_fraction=MLM_PROBABILITY)
    f_shrunk = dense_flops_per_token(shrunk, seq_len, training=True, mlm_fraction=MLM_PROBABILITY)
    # The MLM head at the masked positions, where the model computes it in training.
    # The same function on a zero-layer copy counts what is outside the encoder (MLM head with its
    # decoder, NSP head), so the split uses exactly the convention of the headline figure.
    no_layers = build_config(preset, vocab_size=dense.vocab_size, num_hidden_layers=0,
                             max_position_embeddings=dense.max_position_embeddings)
    f_heads = dense_flops_per_token(no_layers, seq_len, training=True, mlm_fraction=MLM_PROBABILITY)
    return {"flops_per_token_dense": f_dense, "flops_per_token_shrunk": f_shrunk,
            "flops_per_token_outside_encoder": f_heads,
            "outside_encoder_share_dense": f_heads / f_dense,
            "ideal_speedup": f_dense / f_shrunk,
            "ideal_speedup_encoder_only": (f_dense - f_heads) / (f_shrunk - f_heads)}


def check_shapes(model, config) -> None:
    """The built model really has the per-layer widths its config asks for (the benchmark would
    otherwise time the wrong thing without a sign)."""
    for i, layer in enumerate(model.bert.encoder.layer):
        inner = config.heads_of(i) * config.head_dim
        got = (layer.attention.self.query.out_features, layer.attention.output.dense.in_features,
               layer.intermediate.dense.out_features, layer.output.dense.in_features)
        want = (inner, inner, config.intermediate_of(i), config.intermediate_of(i))
        assert got == want, f"layer {i}: (q out, attn-out in, ffn out, ffn-out in) = {got}, config says {want}"


# --- one variant: model, optimizer, step -------------------------------------------------------

class TorchVariant:
    """Plain torch: AdamW with BERT's decay groups, clipping at 1.0 as in pre-training recipes."""

    CLIP = 1.0

    def __init__(self, model, on_gpu: bool, bf16: bool):
        import torch
        from dist_sparse.optim import parameter_groups

        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        # fused AdamW is one kernel per group on CUDA; on CPU torch's default implementation.
        self.opt = torch.optim.AdamW(parameter_groups(model, 0.01, one_per_parameter=False), lr=1e-4,
                                     betas=(0.9, 0.999), eps=1e-6, **({"fused": True} if on_gpu else {}))
        # bf16 autocast keeps fp32 master weights and optimizer state, as a bf16 DeepSpeed engine does.
        self.amp = ((lambda: torch.autocast("cuda" if on_gpu else "cpu", dtype=torch.bfloat16)) if bf16
                    else contextlib.nullcontext)
        self.precision = "bf16 autocast" if bf16 else "fp32"

    def forward(self, batch):
        with self.amp():
            return self.model(**batch).loss

    def backward(self, loss) -> None:
        loss.backward()

    def optimizer_step(self) -> None:
        import torch

        torch.nn.utils.clip_grad_norm_(self.params, self.CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class EngineVariant:
    """Through dist_sparse's DeepSpeed engine on one rank, stepped by ``Trainer.train_step`` (the
    run's own sequence); with phases, a clock component and the loss function mark the ends of
    forward and backward."""

    def __init__(self, model, run_cfg):
        from dist_sparse.distributed import comm
        from dist_sparse.train.components import Component
        from dist_sparse.train.engine import build_engine
        from dist_sparse.train.losses import pretraining_loss
        from dist_sparse.train.trainer import Trainer

        marks: dict = {}
        self.marks, self.sync, self.phases, self.steps = marks, (lambda: None), False, 0

        class BackwardClock(Component):
            def on_after_backward(clock, trainer, step, micro):
                if self.phases:
                    self.sync()
                marks["bwd"] = time.perf_counter()

        def timed_loss(engine, batch):
            loss = pretraining_loss(engine, batch)
            if self.phases:
                self.sync()
            marks["fwd"] = time.perf_counter()
            marks["loss"] = loss.detach()
            return loss

        # Constant learning rate: the schedule has no bearing on step time.
        engine = build_engine(model, run_cfg, lr_lambda=lambda step: 1.0)
        self.trainer = Trainer(engine, model.config, comm.parallel_groups(run_cfg.tp_size),
                               zero_stage=run_cfg.zero_stage, components=[BackwardClock()], loss=timed_loss)
        self.model = model
        self.precision = precision(run_cfg.deepspeed) + f" engine, ZeRO-{run_cfg.zero_stage}"

    def timed(self, batch, sync, phases: bool) -> tuple[dict, object]:
        self.sync, self.phases = sync, phases
        self.steps += 1
        sync()
        t0 = time.perf_counter()
        self.trainer.train_step([batch], self.steps)
        sync()
        t3 = time.perf_counter()
        rec = {"total": t3 - t0}
        if phases:
            rec.update(fwd=self.marks["fwd"] - t0, bwd=self.marks["bwd"] - self.marks["fwd"],
                       opt=t3 - self.marks["bwd"])
        return rec, self.marks["loss"]


def timed_step(variant, batch, sync, phases: bool) -> tuple[dict, object]:
    """One training step of ``variant``: forward, backward, optimizer step. With ``phases`` the
    device is drained between them so each phase's time is its own (free on CPU)."""
    if isinstance(variant, EngineVariant):
        return variant.timed(batch, sync, phases)
    sync()
    t0 = time.perf_counter()
    loss = variant.forward(batch)
    if phases:
        sync()
    t1 = time.perf_counter()
    variant.backward(loss)
    if phases:
        sync()
    t2 = time.perf_counter()
    variant.optimizer_step()
    sync()
    t3 = time.perf_counter()
    rec = {"total": t3 - t0}
    if phases:
        rec.update(fwd=t1 - t0, bwd=t2 - t1, opt=t3 - t2)
    return rec, loss.detach()


# --- one comparison: a model in a mode ---------------------------------------------------------

def compare(preset: str, mode: str, args, on_gpu: bool, sync, device) -> dict:
    import torch

    from dist_sparse.model.presets import build_model, count_parameters

    dense_cfg, shrunk_cfg = model_configs(preset, args)
    cfgs = {"dense": dense_cfg, "shrunk": shrunk_cfg}
    batch = args.batch or (DEFAULT_BATCH_GPU if on_gpu else DEFAULT_BATCH_CPU).get(preset, 8)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and on_gpu)
    run_cfg = path = None
    if mode == "deepspeed":
        from dist_sparse.config import parse_run_config

        path = ROOT / (args.deepspeed_config or DEFAULT_DS_CONFIG["cuda" if on_gpu else "cpu"])
        raw = prepare_deepspeed_dict(json.loads(path.read_text()), batch)
        run_cfg = parse_run_config(raw, source=str(path))

    variants, n_params, first_param = {}, {}, {}
    for v in VARIANTS:
        # Same seed for both: the shrunk model's weights are drawn the same way (their values do
        # not matter for time, only that both train something comparable).
        torch.manual_seed(args.seed)
        model = build_model(cfgs[v]).to(device)
        check_shapes(model, cfgs[v])
        model.train()
        n_params[v] = count_parameters(model)
        variants[v] = EngineVariant(model, run_cfg) if mode == "deepspeed" else TorchVariant(model, on_gpu, bf16)
        # A weight of layer 0's FFN, to check afterwards that the timed steps updated the model.
        first_param[v] = model.bert.encoder.layer[0].intermediate.dense.weight.detach().float().clone()

    # One pool of batches for both variants, cycled in the same order: they see identical data.
    batches = synthetic_batches(DATA_POOL, batch, args.seq_len, args.vocab_size, args.seed + 1, device)
    cursor = {v: 0 for v in VARIANTS}
    last_loss = {}

    def step(v: str) -> dict:
        rec, loss = timed_step(variants[v], batches[cursor[v] % DATA_POOL], sync, args.phases_on)
        cursor[v] += 1
        last_loss[v] = loss
        return rec

    for _ in range(args.warmup):
        for v in VARIANTS:
            step(v)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()

    records, wall, (load_before, load_after) = interleaved(
        VARIANTS, args.rounds, args.steps_per_round, lambda v, r: {**step(v), "v": v, "round": r})

    profile = profile_ops(step, args.profile, on_gpu) if args.profile else None
    losses = {v: float(last_loss[v]) for v in VARIANTS}  # after timing: .item() syncs
    moved = {v: not torch.equal(first_param[v],
                                variants[v].model.bert.encoder.layer[0].intermediate.dense.weight.detach().float())
             for v in VARIANTS}
    result = summarize(records, args)
    result.update(flop_figures(preset, dense_cfg, shrunk_cfg, args.seq_len))
    speed, ideal = result["speedup_round_median"], result["ideal_speedup"]
    result["quotient"] = speed / ideal
    result["quotient_means"] = result["speedup_means"] / ideal
    # The share of the dense step's time that the FLOP count says should go and did go. With the
    # step modelled as t = fixed + k * FLOPs, 1 minus this is the fixed (non-shrinking) share.
    result["ideal_saving_realized"] = (1 - 1 / speed) / (1 - 1 / ideal)
    # The optimizer step (and gradient clipping) costs per parameter, not per FLOP: its ideal is
    # the parameter ratio, which counts the embeddings that pruning leaves alone.
    result["ideal_speedup_params"] = n_params["dense"] / n_params["shrunk"]
    tokens = batch * args.seq_len
    for v in VARIANTS:
        median_step = result["step_time_s"][v]["median"]
        result[f"tokens_per_s_{v}"] = tokens / median_step
        result[f"model_tflops_{v}"] = result[f"flops_per_token_{v}"] * tokens / median_step / 1e12
    peak = peak_tflops_for(device_name(on_gpu)) if on_gpu else None
    result.update({
        "model": preset, "mode": mode, "precision": variants["dense"].precision,
        "deepspeed_config": str(path) if path else None,
        "batch": batch, "seq_len": args.seq_len, "vocab_size": args.vocab_size,
        "layer_num_heads": {v: [cfgs[v].heads_of(i) for i in range(cfgs[v].num_hidden_layers)] for v in VARIANTS},
        "layer_intermediate_sizes": {v: [cfgs[v].intermediate_of(i) for i in range(cfgs[v].num_hidden_layers)]
                                     for v in VARIANTS},
        "params": n_params, "final_loss": losses, "weights_moved": moved,
        "mfu": ({v: result[f"model_tflops_{v}"] / peak for v in VARIANTS} if peak else None),
        "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "warmup_steps": args.warmup, "rounds": args.rounds, "steps_per_round": args.steps_per_round,
        "loadavg_1m_before_after": [load_before, load_after], "timed_wall_s": wall,
        "profile_ms_per_step": profile, "steps": records,
    })
    del variants
    return result


def profile_ops(step, n: int, on_gpu: bool) -> dict[str, dict[str, float]]:
    """Self time per step of every operator, per variant (ms; device time on CUDA). Outside the
    timed rounds: the profiler's own overhead must not enter the speedup."""
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, dict[str, float]] = {}
    for v in VARIANTS:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
            for _ in range(n):
                step(v)
        for e in prof.key_averages():
            us = e.self_device_time_total if on_gpu else e.self_cpu_time_total
            out.setdefault(e.key, {})[v] = us / n / 1000
    return out


def summarize(records: list[dict], args) -> dict:
    def per_round(v: str, key: str) -> list[float]:
        return [sum(m[key] for m in records if m["v"] == v and m["round"] == r) for r in range(args.rounds)]

    out = {"step_time_s": {v: stats([m["total"] for m in records if m["v"] == v]) for v in VARIANTS}}
    dense_r, shrunk_r = per_round("dense", "total"), per_round("shrunk", "total")
    out["per_round_s"] = {"dense": dense_r, "shrunk": shrunk_r}
    # Each round's two variants ran back to back, under nearly the same machine load.
    out["speedup_per_round"] = [d / s for d, s in zip(dense_r, shrunk_r)]
    out["speedup_round_median"] = statistics.median(out["speedup_per_round"])
    out["speedup_means"] = sum(dense_r) / sum(shrunk_r)
    out["speedup_means_ci95"] = bootstrap_ratio_ci(dense_r, shrunk_r)
    # On a machine shared with other jobs the fastest step is the least disturbed one.
    out["speedup_fastest"] = out["step_time_s"]["dense"]["min"] / out["step_time_s"]["shrunk"]["min"]
    if args.phases_on:
        out["phase_time_s"] = {v: {ph: stats([m[ph] for m in records if m["v"] == v]) for ph in PHASES}
                               for v in VARIANTS}
        out["phase_speedup_round_median"] = {
            ph: statistics.median(d / s for d, s in zip(per_round("dense", ph), per_round("shrunk", ph)))
            for ph in PHASES}
        # Each phase's share of the dense step, from means so that the shares add up to one.
        total = out["step_time_s"]["dense"]["mean"]
        out["phase_share_dense"] = {ph: out["phase_time_s"]["dense"][ph]["mean"] / total for ph in PHASES}
    return out


# --- report ------------------------------------------------------------------------------------

def format_report(r: dict) -> str:
    ms = lambda x: f"{1000 * x:.1f}"  # noqa: E731
    lines = [
        "| model | mode | precision | batch x seq | heads dense -> shrunk | FFN dense -> shrunk | params dense -> shrunk "
        "| dense step ms (median) | shrunk step ms | measured speedup: median of rounds | means [95% CI] | fastest "
        "| FLOP-ideal (encoder only) | quotient | ideal saving realized | tokens/s dense | tokens/s shrunk |",
        "|" + "---|" * 17,
    ]
    for x in r["results"]:
        h, f = x["layer_num_heads"], x["layer_intermediate_sizes"]
        ci = x["speedup_means_ci95"]
        lines.append(
            f"| {x['model']} | {x['mode']} | {x['precision']} | {x['batch']} x {x['seq_len']} | "
            f"{h['dense'][0]} -> {h['shrunk'][0]} | {f['dense'][0]} -> {f['shrunk'][0]} | "
            f"{x['params']['dense'] / 1e6:.1f}M -> {x['params']['shrunk'] / 1e6:.1f}M | "
            f"{ms(x['step_time_s']['dense']['median'])} | {ms(x['step_time_s']['shrunk']['median'])} | "
            f"{x['speedup_round_median']:.3f} | {x['speedup_means']:.3f} [{ci[0]:.3f}-{ci[1]:.3f}] | "
            f"{x['speedup_fastest']:.3f} | {x['ideal_speedup']:.3f} ({x['ideal_speedup_encoder_only']:.3f}) | "
            f"**{x['quotient']:.3f}** | {x['ideal_saving_realized']:.2f} | "
            f"{x['tokens_per_s_dense']:.0f} | {x['tokens_per_s_shrunk']:.0f} |")
    lines.append("")
    for x in r["results"]:
        verdict = "meets" if x["quotient"] >= TARGET_QUOTIENT else "misses"
        lines.append(
            f"{x['model']} ({x['mode']}): measured {x['speedup_round_median']:.3f}x vs FLOP-ideal "
            f"{x['ideal_speedup']:.3f}x -> quotient {x['quotient']:.3f} ({x['quotient_means']:.3f} on the means): "
            f"{verdict} >= {TARGET_QUOTIENT}; outside-encoder FLOPs (MLM head + decoder + NSP) are "
            f"{100 * x['outside_encoder_share_dense']:.1f}% of the dense model's; {x['rounds']} rounds x "
            f"{x['steps_per_round']} step(s), 1-min load {x['loadavg_1m_before_after'][0]:.2f}/"
            f"{x['loadavg_1m_before_after'][1]:.2f}; final losses "
            f"{x['final_loss']['dense']:.3f}/{x['final_loss']['shrunk']:.3f}"
            + (f"; MFU {100 * x['mfu']['dense']:.1f}% / {100 * x['mfu']['shrunk']:.1f}%" if x["mfu"] else "")
            + (f"; peak memory {x['max_memory_allocated_gib']:.1f} GiB" if x["max_memory_allocated_gib"] else ""))
        if "phase_speedup_round_median" in x:
            sh, sp = x["phase_share_dense"], x["phase_speedup_round_median"]
            lines.append("    phases (share of the dense step; speedup, median of rounds): "
                         + ", ".join(f"{ph} {100 * sh[ph]:.0f}%; {sp[ph]:.3f}x" for ph in PHASES)
                         + f" (ideal: fwd/bwd {x['ideal_speedup']:.3f}x by FLOPs, opt {x['ideal_speedup_params']:.3f}x "
                           "by parameters)")
        if x.get("profile_ms_per_step"):
            prof = x["profile_ms_per_step"]
            top = sorted(prof, key=lambda k: -prof[k].get("dense", 0.0))[:PROFILE_TOP]
            total = {v: sum(o.get(v, 0.0) for o in prof.values()) for v in VARIANTS}
            lines.append(f"    profile, self ms per step (all operators: dense {total['dense']:.1f}, shrunk "
                         f"{total['shrunk']:.1f}): "
                         + "; ".join(f"{k} {prof[k].get('dense', 0.0):.1f} -> {prof[k].get('shrunk', 0.0):.1f}"
                                     for k in top))
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------

def resolve_args(args, on_gpu: bool) -> None:
    if args.quick:
        args.models = args.models or "bert-tiny"
        args.vocab_size, args.seq_len = 1000, 32
        args.batch = args.batch or 2
        args.warmup = 1 if args.warmup is None else args.warmup
        args.rounds = args.rounds or 3
        args.steps_per_round = args.steps_per_round or 1
    args.models = [m.strip() for m in (args.models or ("bert-large" if on_gpu else "bert-mini,bert-base")).split(",")
                   if m.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 2)
    args.rounds = args.rounds or 20
    args.steps_per_round = args.steps_per_round or (5 if on_gpu else 1)
    args.phases_on = args.phases == "on" or (args.phases == "auto" and not on_gpu)
    from dist_sparse.model.presets import PRESETS

    bad = [m for m in args.models if m not in PRESETS] + [m for m in args.modes if m not in ("torch", "deepspeed")]
    if bad:
        raise ValueError(f"unknown model(s)/mode(s) {bad}; models: {', '.join(PRESETS)}; modes: torch, deepspeed")
    if not (0 <= args.head_ratio < 1 and 0 <= args.ffn_ratio < 1):
        raise ValueError("--head-ratio and --ffn-ratio are fractions removed, in [0, 1)")
    if min(args.rounds, args.steps_per_round, args.seq_len, args.ffn_multiple) < 1 or args.warmup < 0:
        raise ValueError("--rounds, --steps-per-round, --seq-len, --ffn-multiple must be >= 1, --warmup >= 0")
    if args.rounds < 2:
        raise ValueError("--rounds must be >= 2 (the interval and the swap of order need two)")


def self_check(r: dict, args) -> list[str]:
    """What --quick asserts about each comparison: the machinery, not the speed."""
    problems = []
    if kept_heads(12, 1 / 3) != 8 or kept_ffn(3072, 0.4, 8) != 1840 or kept_heads(4, 1 / 3) != 3:
        problems.append("rounding rule: expected bert-base 12 -> 8 heads, 3072 -> 1840 FFN; bert-mini 4 -> 3 heads")
    for x in r["results"]:
        tag = f"{x['model']}/{x['mode']}"
        if not x["ideal_speedup"] > 1 or not x["ideal_speedup_encoder_only"] > x["ideal_speedup"]:
            problems.append(f"{tag}: FLOP-ideal {x['ideal_speedup']:.3f} (encoder {x['ideal_speedup_encoder_only']:.3f}) "
                            "should be > 1 and below the encoder-only ratio")
        if x["params"]["shrunk"] >= x["params"]["dense"]:
            problems.append(f"{tag}: the shrunk model is not smaller ({x['params']})")
        if not all(math.isfinite(v) for v in x["final_loss"].values()):
            problems.append(f"{tag}: non-finite loss {x['final_loss']}")
        if not all(x["weights_moved"].values()):
            problems.append(f"{tag}: the optimizer did not change the weights {x['weights_moved']}")
        n = args.rounds * args.steps_per_round
        if any(x["step_time_s"][v]["n"] != n for v in VARIANTS) or len(x["speedup_per_round"]) != args.rounds:
            problems.append(f"{tag}: expected {n} timed steps per variant in {args.rounds} rounds")
        if not all(t > 0 for t in x["per_round_s"]["dense"] + x["per_round_s"]["shrunk"]):
            problems.append(f"{tag}: a round has no time")
    return problems


def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    import torch
    import deepspeed

    on_gpu, sync = setup_device(0)
    resolve_args(args, on_gpu)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if "deepspeed" in args.modes:
        # A world of one in this process; init here so that both engines share the process group.
        single_process_env()
        from dist_sparse.distributed import comm

        comm.init()

    results = []
    try:
        for preset in args.models:
            for mode in args.modes:
                print(f"[{preset} / {mode}] ...", flush=True)
                results.append(compare(preset, mode, args, on_gpu, sync, device))
                if on_gpu:
                    torch.cuda.empty_cache()
    finally:
        if "deepspeed" in args.modes:
            # This process is the whole world: every buffer on its port is its own.
            remove_shm_buffers(int(os.environ["MASTER_PORT"]))

    r = {
        "benchmark": "structured_speedup", "head_ratio": args.head_ratio, "ffn_ratio": args.ffn_ratio,
        "ffn_multiple": args.ffn_multiple, "target_quotient": TARGET_QUOTIENT, "quick": args.quick,
        "results": results,
        "device": device_name(on_gpu), "accelerator": "cuda" if on_gpu else "cpu",
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "deepspeed": deepspeed.__version__,
        "cuda": torch.version.cuda if on_gpu else None,
        "host": socket.gethostname(), "git": git_state(), "time_utc": utc_now_iso(),
        "master_port": int(os.environ["MASTER_PORT"]) if "deepspeed" in args.modes else None,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    head = (f"structured speedup: {r['head_ratio']:.3g} of heads and {r['ffn_ratio']:.3g} of FFN neurons removed "
            f"per layer (FFN to a multiple of {r['ffn_multiple']}); device: {r['device']}"
            + ("" if on_gpu else f" ({r['torch_threads']} torch threads, {r['cpu_count']} CPUs)")
            + f"; torch {r['torch']}; commit {(r['git']['commit'] or '?')[:7]}"
            + (" (dist_sparse/ modified)" if r["git"]["dist_sparse_modified"] else ""))
    print(head)
    print(format_report(r), flush=True)
    if args.json_out:
        write_json(args.json_out, r)
    if args.quick:
        problems = self_check(r, args)
        if problems:
            raise AssertionError("self-check failed:\n  " + "\n  ".join(problems))
        print("self-check passed", flush=True)
    return r


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except AssertionError as err:
        print(str(err), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
