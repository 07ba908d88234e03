"""Dense training throughput of a model preset under a DeepSpeed config.

Measures whole optimizer steps (forward, backward, engine.step over all gradient-accumulation
micro steps) on synthetic MLM data and reports samples/s, tokens/s, model TFLOP/s and, on a
GPU, MFU against the device's peak dense bf16 TFLOP/s.

    python benchmarks/dense_throughput.py --model bert-tiny --deepspeed_config ds_configs/cpu_zero2.json
    deepspeed --num_gpus 1 benchmarks/dense_throughput.py --model bert-large \\
        --deepspeed_config ds_configs/bert_large_phase1_seq128_zero1.json --micro-batch 64 --seq-len 128

Model FLOPs are ``dense_flops_per_token(config, seq_len, training=True, mlm_fraction=0.15)``
(the MLM head counted at the masked positions, where the model computes it; 3x forward, no
attention recomputation counted) times tokens/s, i.e. MFU in the PaLM sense, not hardware FLOPs.
Data generation is outside the timed region: a few batches are made on the device up front and
cycled, so the figure is that of the training step alone.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
from pathlib import Path

# The shared helpers live beside this file; importing them also puts the repository root on
# sys.path, for a checkout whose package is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DATA_POOL, MLM_PROBABILITY, batch_arithmetic, device_name, loadavg_1m, peak_tflops_for,  # noqa: E402
                     precision, prepare_deepspeed_dict, remove_own_shm_buffer, run_main, setup_device,
                     single_process_env, synthetic_batches, timed, utc_now_iso, write_json)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Dense training throughput (samples/s, tokens/s, TFLOP/s, MFU).")
    p.add_argument("--model", default="bert-tiny", help="model preset (bert-tiny ... bert-large)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", required=True,
                   help="DeepSpeed JSON (e.g. from ds_configs/); its batch sizes are used unless --micro-batch")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="override train_micro_batch_size_per_gpu; also sets gradient_accumulation_steps 1 "
                        "and drops train_batch_size so that any number of ranks works")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=30522, help="default: BERT's uncased WordPiece vocabulary")
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps run before timing")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps timed")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense TFLOP/s per device for MFU (default: looked up from the GPU name)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", dest="json_out", default=None, help="write the result (rank 0) to this file")
    # The deepspeed launcher passes --local_rank; LOCAL_RANK in the environment carries the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def run(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    if args.seq_len < 1 or args.vocab_size < 2:
        raise ValueError("--seq-len must be >= 1 and --vocab-size >= 2")
    single_process_env()

    import torch
    import deepspeed

    from dist_sparse.config import parse_run_config
    from dist_sparse.distributed import comm
    from dist_sparse.model.presets import build_config, build_model, count_parameters, dense_flops_per_token
    from dist_sparse.train.engine import build_engine

    path = Path(args.deepspeed_config)
    raw = json.loads(path.read_text())
    run_cfg = parse_run_config(prepare_deepspeed_dict(raw, args.micro_batch), source=str(path))
    # Batch arithmetic is checked before any process group exists, so a bad combination fails fast.
    world, _, global_batch, micro_bs, grad_acc = batch_arithmetic(run_cfg)

    comm.init()
    rank = comm.rank()
    on_gpu, sync = setup_device(comm.local_rank())

    model_config = build_config(args.model, vocab_size=args.vocab_size,
                                max_position_embeddings=max(512, args.seq_len))
    torch.manual_seed(args.seed)
    model = build_model(model_config)
    n_params = count_parameters(model)
    # Constant learning rate: the schedule has no bearing on step time.
    engine = build_engine(model, run_cfg, lr_lambda=lambda step: 1.0)
    groups = comm.parallel_groups(run_cfg.tp_size)
    engine.train()

    # Ranks of one TP group must see the same batch; different DP ranks get different data.
    batches = synthetic_batches(DATA_POOL, micro_bs, args.seq_len, args.vocab_size,
                                args.seed + 1000 * groups.dp_rank, engine.device)
    cursor = 0

    def optimizer_step() -> torch.Tensor:
        nonlocal cursor
        loss = None
        for _ in range(grad_acc):
            batch = batches[cursor % DATA_POOL]
            cursor += 1
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()  # DeepSpeed only updates at the gradient-accumulation boundary
            loss = out.loss
        return loss

    for _ in range(args.warmup):
        optimizer_step()
    sync()
    comm.barrier()  # all ranks start the clock together

    # Load average around the timed window: on a shared machine other jobs' load shows up here.
    load_before = loadavg_1m()
    step_times = []
    last_loss = None
    for _ in range(args.steps):
        # Synchronised around every step: that gives the per-step spread.
        seconds, last_loss = timed(optimizer_step, sync)
        step_times.append(seconds)
    load_after = loadavg_1m()
    last_loss = float(last_loss.detach())  # after timing: .item() would be another sync in the loop

    flops_per_token = dense_flops_per_token(model_config, args.seq_len, training=True, mlm_fraction=MLM_PROBABILITY)
    device = device_name(on_gpu)
    # An explicit peak is honoured on CPU too (e.g. a measured GEMM peak); no CPU peak is guessed.
    peak = args.peak_tflops if args.peak_tflops is not None else (peak_tflops_for(device) if on_gpu else None)

    elapsed = sum(step_times)
    rank_samples = micro_bs * grad_acc * args.steps  # samples through this rank's DP stream
    rank_tokens = rank_samples * args.seq_len         # full attention mask: every position is a token
    # A TP rank does 1/tp of the FLOPs of the samples it sees.
    rank_tflops = flops_per_token * rank_tokens / groups.tp_size / elapsed / 1e12
    per_rank = {
        "rank": rank, "dp_rank": groups.dp_rank, "tp_rank": groups.tp_rank,
        "step_time_s": elapsed / args.steps,
        "step_time_median_s": statistics.median(step_times),
        "step_time_min_s": min(step_times), "step_time_max_s": max(step_times),
        "samples_per_s": rank_samples / elapsed, "tokens_per_s": rank_tokens / elapsed,
        "model_tflops": rank_tflops,
        "mfu": rank_tflops / peak if peak else None,
        "final_loss": last_loss,
        "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
    }
    all_ranks = comm.all_gather_object(per_rank)
    if rank != 0:
        comm.barrier()
        remove_own_shm_buffer()
        return None

    # Steps are synchronous (gradient all-reduce), so the slowest rank's time is the step time.
    step_time = max(r["step_time_s"] for r in all_ranks)
    samples_per_s = global_batch / step_time
    tokens_per_s = samples_per_s * args.seq_len
    tflops = flops_per_token * tokens_per_s / 1e12
    result = {
        "benchmark": "dense_throughput",
        "model": args.model, "params": n_params, "seq_len": args.seq_len, "vocab_size": args.vocab_size,
        "deepspeed_config": str(path), "zero_stage": run_cfg.zero_stage, "precision": precision(run_cfg.deepspeed),
        "world_size": world, "dp_size": groups.dp_size, "tp_size": groups.tp_size,
        "micro_batch": micro_bs, "gradient_accumulation": grad_acc, "global_batch": global_batch,
        "warmup_steps": args.warmup, "measured_steps": args.steps,
        "step_time_s": step_time,
        "samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s,
        "model_tflops_per_token": flops_per_token / 1e12,
        "model_tflops": tflops,
        "peak_tflops_per_device": peak,
        "mfu": tflops / (peak * world) if peak else None,
        "device": device, "accelerator": "cuda" if on_gpu else "cpu",
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg_1m_before_after": [load_before, load_after],
        "torch": torch.__version__, "deepspeed": deepspeed.__version__,
        "host": socket.gethostname(),
        "time_utc": utc_now_iso(),
        "per_rank": all_ranks,
    }
    print(json.dumps(result, separators=(",", ":")), flush=True)
    print(format_table(result), flush=True)
    if args.json_out:
        write_json(args.json_out, result)
    comm.barrier()
    remove_own_shm_buffer()
    return result


def format_table(r: dict) -> str:
    def mfu(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    head = (f"dense throughput: {r['model']} ({r['params'] / 1e6:.1f}M params), seq {r['seq_len']}, "
            f"{r['precision']}, ZeRO-{r['zero_stage']}, {r['world_size']} rank(s) "
            f"(dp {r['dp_size']} x tp {r['tp_size']}), micro batch {r['micro_batch']} x grad acc "
            f"{r['gradient_accumulation']} -> global batch {r['global_batch']}; "
            f"{r['measured_steps']} steps timed after {r['warmup_steps']} warmup; device: {r['device']}"
            + ("" if r["accelerator"] == "cuda" else f" ({r['torch_threads']} torch threads/rank)")
            + "; 1-min load average before/after timing: "
            + "/".join(f"{x:.2f}" for x in r["loadavg_1m_before_after"]))
    cols = ["", "step s", "samples/s", "tokens/s", "TFLOP/s", "MFU"]
    rows = [[f"rank {p['rank']}", f"{p['step_time_s']:.4f}", f"{p['samples_per_s']:.1f}",
             f"{p['tokens_per_s']:.0f}", f"{p['model_tflops']:.4g}", mfu(p["mfu"])] for p in r["per_rank"]]
    rows.append(["aggregate", f"{r['step_time_s']:.4f}", f"{r['samples_per_s']:.1f}", f"{r['tokens_per_s']:.0f}",
                 f"{r['model_tflops']:.4g}", mfu(r["mfu"])])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = [head, "  ".join(c.rjust(w) for c, w in zip(cols, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    if r["accelerator"] != "cuda" and r["mfu"] is None:
        lines.append("MFU: n/a on CPU (no peak given; pass --peak-tflops to compute one)")
    elif r["mfu"] is None:
        lines.append(f"MFU: n/a, no peak known for {r['device']!r}; pass --peak-tflops")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
