"""Quality at equal steps: dense vs static vs SET vs RigL at 80% and 90% sparsity.

Every run is a real pre-training run: ``launchers/pretrain.py`` under ``deepspeed --num_gpus N``
with the base DeepSpeed config plus a "sparsity" section (temporary configs written into
``--output-dir``), the same model, data, steps and seeds. From each run's metrics.jsonl it reads

- the held-out MLM loss and accuracy at the final step (``eval/mlm_loss``, ``eval/mlm_accuracy``);
- training FLOPs: the sum over steps of ``sparsity/step_tflops`` (logged at step 0 and after every
  mask update, in force until the next), plus RigL's dense weight-gradient on its update steps,
  which ``step_tflops`` does not count (``dist_sparse.flops``: the weight-gradient product of an
  update step is dense, ``(dense_step_tflops - step_tflops) / 3`` more); dense runs:
  3 x dense forward x tokens x steps.

    python benchmarks/sparse_quality.py --output-dir /tmp/sq --data-cache /tmp/sq_data
    python benchmarks/sparse_quality.py --steps 100 --update-interval 10 --runs dense,rigl90,static90 \\
        --output-dir /tmp/sq --data-cache /tmp/sq_data --json /tmp/sq/result.json

Run names: dense, static80, static90, set80, set90, rigl80, rigl90. Sparse runs use ERK layer
densities (``--distribution``) and the README defaults otherwise (drop fraction 0.3, cosine decay,
masks frozen after 75% of the steps, random first mask).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

# The shared helpers live beside this file; importing them also puts the repository root on
# sys.path, for a checkout whose package is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, bin_dir, launch_env, run_logged, free_port, git_state, loadavg_1m, utc_now, write_json  # noqa: E402

ALL_RUNS = ("dense", "static80", "static90", "set80", "set90", "rigl80", "rigl90")
METHODS = {"static": "static", "set": "set", "rigl": "rigl"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Dense vs static vs SET vs RigL: held-out MLM loss at equal steps.")
    p.add_argument("--model", default="bert-mini", help="model preset")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of every run")
    p.add_argument("--update-interval", type=int, default=25,
                   help="SET/RigL mask update interval dT (25 suits short runs; the papers use 100 over far longer ones)")
    p.add_argument("--distribution", choices=("erk", "uniform"), default="erk")
    p.add_argument("--runs", default=",".join(ALL_RUNS), help=f"comma-separated subset of {','.join(ALL_RUNS)}")
    p.add_argument("--output-dir", required=True, help="run directories, temporary configs and logs go here")
    p.add_argument("--data", default=None, help="a dataset written by `dist-sparse prepare-data` (else the default corpus)")
    p.add_argument("--data-cache", default=None,
                   help="where the default corpus is prepared (vocab 8000, seq 128) and reused from "
                        "(default: OUTPUT_DIR/data)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   default=str(ROOT / "ds_configs" / "cpu_zero2.json"), help="base DeepSpeed config")
    p.add_argument("--num-gpus", type=int, default=2, help="ranks per run (CPU processes on a CPU machine)")
    p.add_argument("--eval-batches", type=int, default=None,
                   help="override training.eval_batches (micro batches per rank in the final evaluation)")
    p.add_argument("--seed", type=int, default=None, help="overrides training.seed (same for every run)")
    p.add_argument("--json", dest="json_out", default=None, help="write the table and per-run figures here")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each run's final checkpoint (default: deleted after reading the metrics)")
    return p


def parse_runs(spec: str) -> list[str]:
    runs = [r.strip() for r in spec.split(",") if r.strip()]
    bad = [r for r in runs if r not in ALL_RUNS]
    if bad or not runs:
        raise ValueError(f"--runs: unknown run(s) {bad}; known: {', '.join(ALL_RUNS)}")
    return [r for r in ALL_RUNS if r in runs]  # fixed order: dense first, then by method


def run_spec(name: str) -> tuple[str, float | None]:
    if name == "dense":
        return "dense", None
    return METHODS[name.rstrip("0123456789")], int(name[-2:]) / 100


def sparsity_section(method: str, sparsity: float, args) -> dict:
    sec = {"method": method, "sparsity": sparsity, "distribution": args.distribution, "seed": 1}
    if method in ("set", "rigl"):
        sec["update_interval"] = args.update_interval
    return sec


def ensure_data(args, out_dir: Path) -> Path:
    if args.data:
        data = Path(args.data)
        if not (data / "meta.json").is_file():
            raise ValueError(f"--data {data} is not a prepared dataset (no meta.json)")
        return data
    data = Path(args.data_cache) if args.data_cache else out_dir / "data"
    if (data / "meta.json").is_file():
        print(f"using the prepared default corpus in {data}", flush=True)
        return data
    exe = bin_dir() / "dist-sparse"
    cmd = [str(exe if exe.exists() else "dist-sparse"), "prepare-data", "--default-corpus", "--output", str(data),
           "--vocab-size", "8000", "--seq-len", "128"]
    print("preparing data:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=launch_env(), cwd=ROOT)
    return data


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: the run did not get far enough to write metrics")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(name: str, run_dir: Path, steps: int, wall: float) -> dict:
    from dist_sparse.model.presets import build_config, dense_flops_per_token

    rows = read_metrics(run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    final_eval = [r for r in rows if r["split"] == "eval" and r["step"] == steps]
    if not final_eval:
        raise RuntimeError(f"{run_dir}: no eval metrics at the final step {steps}")
    train = [r for r in rows if r["split"] == "train"]
    tail = [r["loss"] for r in train if r["step"] > steps - 10]
    cfg = build_config(meta["model"], vocab_size=meta["data_meta"]["vocab_size"],
                       max_position_embeddings=max(512, meta["data_meta"]["seq_len"]),
                       pad_token_id=meta["data_meta"]["special_ids"]["[PAD]"])
    tokens_per_step = meta["global_batch"] * meta["data_meta"]["seq_len"]
    dense_step = dense_flops_per_token(cfg, meta["data_meta"]["seq_len"], training=True) * tokens_per_step / 1e12
    out = {"run": name, "run_dir": str(run_dir), "steps": steps, "wall_s": wall,
           "eval_mlm_loss": final_eval[-1]["mlm_loss"], "eval_mlm_accuracy": final_eval[-1]["mlm_accuracy"],
           "train_loss_last10": sum(tail) / len(tail) if tail else None,
           "global_batch": meta["global_batch"], "tokens_per_step": tokens_per_step,
           "dense_step_tflops": dense_step}
    sp = sorted((r for r in rows if r["split"] == "sparsity"), key=lambda r: r["step"])
    if not sp:
        out.update(train_tflops=dense_step * steps, density=1.0, updates=0)
        return out
    # step_tflops logged at step s is the cost of steps s+1 ... until the next log.
    total, extra = 0.0, 0.0
    for i, r in enumerate(sp):
        nxt = sp[i + 1]["step"] if i + 1 < len(sp) else steps
        total += r["step_tflops"] * (nxt - r["step"])
    updates = [r for r in sp if r["step"] > 0]
    out.update(density=sp[-1]["density"], updates=len(updates),
               mean_churn=(sum(r["churn"] for r in updates) / len(updates)) if updates else None,
               sync_bytes_per_update=max((r["sync_bytes"] for r in updates), default=0),
               apply_bytes_per_update=max((r["apply_bytes"] for r in updates), default=0),
               step_tflops_sparse=sp[-1]["step_tflops"], train_tflops_logged=total)
    if name.startswith("rigl"):
        # The dense weight gradient RigL computes on its update steps (the step before each log).
        prev = {r["step"]: r for r in sp}
        for r in updates:
            before = max(s for s in prev if s < r["step"])
            extra += (prev[before]["dense_step_tflops"] - prev[before]["step_tflops"]) / 3
    out.update(rigl_dense_grad_tflops=extra, train_tflops=total + extra)
    return out


def run_one(name: str, args, base: dict, data: Path, out_dir: Path) -> dict:
    method, sparsity = run_spec(name)
    cfg = copy.deepcopy(base)
    cfg.pop("sparsity", None)
    if sparsity is not None:
        cfg["sparsity"] = sparsity_section(method, sparsity, args)
    if args.eval_batches is not None:
        cfg.setdefault("training", {})["eval_batches"] = args.eval_batches
    cfg_path = out_dir / "configs" / f"{name}.json"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    run_dir = out_dir / "runs" / name
    log_path = out_dir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    exe = bin_dir() / "deepspeed"
    port = free_port()
    cmd = [str(exe if exe.exists() else "deepspeed"), "--num_gpus", str(args.num_gpus), "--master_port",
           str(port), str(ROOT / "launchers" / "pretrain.py"), "--deepspeed_config", str(cfg_path),
           "--data", str(data), "--model", args.model, "--output", str(run_dir), "--max-steps", str(args.steps),
           "--no-progress", "--overwrite"]
    if args.seed is not None:
        cmd += ["--seed", str(args.seed)]
    print(f"[{name}] {' '.join(cmd)}  (log: {log_path})", flush=True)
    code = git_state()  # per run: in a shared checkout the package can change between runs
    wall = run_logged(name, cmd, log_path, port)
    res = summarize(name, run_dir, args.steps, wall)
    res.update(method=method, sparsity=sparsity or 0.0, config=str(cfg_path), command=" ".join(cmd), git=code)
    if not args.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # bert-mini x 7 runs adds up
    print(f"[{name}] eval MLM loss {res['eval_mlm_loss']:.4f}, {res['train_tflops']:.2f} training TFLOPs, "
          f"{wall:.0f} s", flush=True)
    return res


def format_table(results: list[dict], dense_tflops: float | None) -> str:
    lines = ["| run | method | sparsity | density (sparse weights) | updates | eval MLM loss | eval MLM acc | "
             "train loss (last 10) | training TFLOPs | / dense | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['train_tflops'] / dense_tflops:.3f}" if dense_tflops else "n/a"
        lines.append(f"| {r['run']} | {r['method']} | {r['sparsity']:.0%} | {r['density']:.3f} | {r['updates']} | "
                     f"{r['eval_mlm_loss']:.4f} | {r['eval_mlm_accuracy']:.4f} | {r['train_loss_last10']:.4f} | "
                     f"{r['train_tflops']:.2f} | {ratio} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = parse_runs(args.runs)
        if args.steps < 1 or args.update_interval < 1 or args.num_gpus < 1:
            raise ValueError("--steps, --update-interval and --num-gpus must be >= 1")
        out_dir = Path(args.output_dir).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        base = json.loads(Path(args.deepspeed_config).read_text())
        data = ensure_data(args, out_dir).resolve()
        started = utc_now()
        load_before = loadavg_1m()
        results = [run_one(name, args, base, data, out_dir) for name in runs]
    except (ValueError, RuntimeError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    dense = next((r for r in results if r["run"] == "dense"), None)
    dense_tflops = dense["train_tflops"] if dense else results[0]["dense_step_tflops"] * args.steps
    table = format_table(results, dense_tflops)
    head = (f"sparse quality: {args.model}, {args.steps} steps, global batch {results[0]['global_batch']}, "
            f"{args.num_gpus} rank(s), base config {args.deepspeed_config}, data {data}, "
            f"SET/RigL dT={args.update_interval}, {args.distribution} densities; "
            f"1-min load average before/after: {load_before:.2f}/{loadavg_1m():.2f}")
    print(head)
    print(table, flush=True)
    if args.json_out:
        import torch
        import deepspeed

        write_json(args.json_out, {
            "benchmark": "sparse_quality", "model": args.model, "steps": args.steps,
            "update_interval": args.update_interval, "distribution": args.distribution,
            "num_ranks": args.num_gpus, "base_config": args.deepspeed_config, "data": str(data),
            "dense_tflops": dense_tflops, "results": results, "table": table,
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "host": socket.gethostname(),
            "git": git_state(),
            "started_utc": started.isoformat(timespec="seconds"),
            "finished_utc": utc_now().isoformat(timespec="seconds"),
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
