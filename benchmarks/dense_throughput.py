"""Dense training throughput of a model preset under a DeepSpeed config.

Measures whole optimizer steps (forward, backward, engine.step over all gradient-accumulation
micro steps) on synthetic MLM data and reports samples/s, tokens/s, model TFLOP/s and, on a
GPU, MFU against the device's peak dense bf16 TFLOP/s.

    python benchmarks/dense_throughput.py --model bert-tiny --deepspeed_config ds_configs/cpu_zero2.json
    deepspeed --num_gpus 1 benchmarks/dense_throughput.py --model bert-large \\
        --deepspeed_config ds_configs/bert_large_phase1_seq128_zero1.json --micro-batch 64 --seq-len 128

Model FLOPs are ``dense_flops_per_token(config, seq_len, training=True)`` (3x forward, no
attention recomputation counted) times tokens/s, i.e. MFU in the PaLM sense, not hardware FLOPs.
Data generation is outside the timed region: a few batches are made on the device up front and
cycled, so the figure is that of the training step alone.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

# `python benchmarks/dense_throughput.py` puts benchmarks/ on sys.path, not the repository root;
# the package is normally installed editable, this only covers a checkout that is not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Peak dense (no 2:4 sparsity) bf16 tensor-core TFLOP/s from NVIDIA's data sheets. Matched as a
# substring of torch.cuda.get_device_name() in this order, so the more specific H100 variants
# (PCIe and NVL have lower clocks / fewer SMs than SXM) are tried before the bare "H100".
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),   # SXM5 (device name "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),   # same compute die as H100 SXM, more and faster memory
    ("A100", 312.0),
]

MLM_PROBABILITY = 0.15  # BERT's fraction of positions that carry an MLM label
DATA_POOL = 4           # distinct synthetic batches cycled per rank (enough to avoid one cached batch)


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """Make a plain `python ...` run a world of one: deepspeed.init_distributed otherwise tries MPI
    discovery. A port picked here rather than 29500, which other jobs on the machine may hold."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return  # started by a launcher
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_tflops_for(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def prepare_deepspeed_dict(raw: dict, micro_batch: int | None) -> dict:
    ds = copy.deepcopy(raw)
    if micro_batch is not None:
        if micro_batch < 1:
            raise ValueError(f"--micro-batch must be >= 1, got {micro_batch}")
        # One micro step per optimizer step and no fixed global batch: the global batch then
        # follows the number of ranks, so the same JSON runs on 1 GPU or 8.
        ds["train_micro_batch_size_per_gpu"] = micro_batch
        ds["gradient_accumulation_steps"] = 1
        ds.pop("train_batch_size", None)
    return ds


def synthetic_batches(n: int, micro_bs: int, seq_len: int, vocab: int, seed: int, device):
    """Random token ids, 15% of positions labelled (the rest -100), no padding, random NSP labels.

    The NSP label is included because real pre-training batches carry it and the NSP head is
    counted in dense_flops_per_token; its cost is negligible either way.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (micro_bs, seq_len), generator=gen)
        selected = torch.rand(micro_bs, seq_len, generator=gen) < MLM_PROBABILITY
        labels = torch.where(selected, ids, torch.full_like(ids, -100))
        batch = {
            "input_ids": ids,
            "token_type_ids": torch.zeros_like(ids),
            # A full mask as the collator always sends one; it makes attention take the additive-
            # bias SDPA path that real (padded) batches take, not the mask-free flash path.
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
            "next_sentence_label": torch.randint(0, 2, (micro_bs,), generator=gen),
        }
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def _precision(ds: dict) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def run(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    if args.seq_len < 1 or args.vocab_size < 2:
        raise ValueError("--seq-len must be >= 1 and --vocab-size >= 2")
    _single_process_env()

    import torch
    import deepspeed

    from dist_sparse.config import data_parallel_size, parse_run_config, resolve_batch_sizes
    from dist_sparse.distributed import comm
    from dist_sparse.model.presets import build_config, build_model, count_parameters, dense_flops_per_token
    from dist_sparse.train.engine import build_engine

    path = Path(args.deepspeed_config)
    raw = json.loads(path.read_text())
    run_cfg = parse_run_config(prepare_deepspeed_dict(raw, args.micro_batch), source=str(path))
    # Batch arithmetic is checked before any process group exists, so a bad combination fails fast.
    world = int(os.environ["WORLD_SIZE"])
    dp_size = data_parallel_size(world, run_cfg.tp_size)
    global_batch, micro_bs, grad_acc = resolve_batch_sizes(run_cfg.deepspeed, dp_size)

    comm.init()
    rank = comm.rank()
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(comm.local_rank())

    def sync() -> None:
        # CUDA kernels run asynchronously: without this the clock would stop at kernel launch.
        if on_gpu:
            torch.cuda.synchronize()

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
    load_before = os.getloadavg()[0]
    step_times = []
    last_loss = None
    for _ in range(args.steps):
        t0 = time.perf_counter()
        last_loss = optimizer_step()
        # Synchronising every step gives the per-step spread; it costs one host-device round
        # trip per step, negligible beside a training step.
        sync()
        step_times.append(time.perf_counter() - t0)
    load_after = os.getloadavg()[0]
    last_loss = float(last_loss.detach())  # after timing: .item() would be another sync in the loop

    flops_per_token = dense_flops_per_token(model_config, args.seq_len, training=True)
    device_name = torch.cuda.get_device_name() if on_gpu else _cpu_model()
    # An explicit peak is honoured on CPU too (e.g. a measured GEMM peak); no CPU peak is guessed.
    peak = args.peak_tflops if args.peak_tflops is not None else (peak_tflops_for(device_name) if on_gpu else None)

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
        return None

    # Steps are synchronous (gradient all-reduce), so the slowest rank's time is the step time.
    step_time = max(r["step_time_s"] for r in all_ranks)
    samples_per_s = global_batch / step_time
    tokens_per_s = samples_per_s * args.seq_len
    tflops = flops_per_token * tokens_per_s / 1e12
    result = {
        "benchmark": "dense_throughput",
        "model": args.model, "params": n_params, "seq_len": args.seq_len, "vocab_size": args.vocab_size,
        "deepspeed_config": str(path), "zero_stage": run_cfg.zero_stage, "precision": _precision(run_cfg.deepspeed),
        "world_size": world, "dp_size": groups.dp_size, "tp_size": groups.tp_size,
        "micro_batch": micro_bs, "gradient_accumulation": grad_acc, "global_batch": global_batch,
        "warmup_steps": args.warmup, "measured_steps": args.steps,
        "step_time_s": step_time,
        "samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s,
        "model_tflops_per_token": flops_per_token / 1e12,
        "model_tflops": tflops,
        "peak_tflops_per_device": peak,
        "mfu": tflops / (peak * world) if peak else None,
        "device": device_name, "accelerator": "cuda" if on_gpu else "cpu",
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg_1m_before_after": [load_before, load_after],
        "torch": torch.__version__, "deepspeed": deepspeed.__version__,
        "host": socket.gethostname(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "per_rank": all_ranks,
    }
    print(json.dumps(result, separators=(",", ":")), flush=True)
    print(format_table(result), flush=True)
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    comm.barrier()
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
    try:
        run(argv)
    except ValueError as err:
        print(f"error (rank {os.environ.get('RANK', '0')}): {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
