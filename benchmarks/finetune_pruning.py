"""Fine-tuning with pruning: knowledge-aware pruning (SparseBERT) vs pruning alone vs a small dense model.

Issue 13's benchmark. On the default task (``dist-sparse prepare-task --default-task``) and any
task given with ``--task``, with the same fine-tuning steps, batch, learning rate and seed for every
row:

1. pre-training: the base model (``--base-model``, bert-mini) and a small dense model
   (``--small-model``, bert-tiny: 2 layers x 128 hidden, 12.5% of bert-mini's encoder Linear
   weights, about what bert-mini keeps at 87.5% sparsity) are both pre-trained with
   ``launchers/pretrain.py`` for ``--pretrain-steps`` on the same prepared corpus (vocabulary 8000,
   seq 128) with the same config and seed;
2. ``teacher``: the base model fine-tuned dense (the distillation teacher of the rows below);
3. ``gmp80/90/95``: the base model fine-tuned with GMP pruning of the encoder's Linear weights
   (cubic schedule), no distillation;
4. ``kd80/90/95``: knowledge-aware pruning: the same GMP plus distillation from ``teacher``
   (soft logits, hidden states and attention scores, each weight 1.0, temperature 1, hard 0:
   SparseBERT's recipe, ``ds_configs/cpu_zero2_finetune_sparsebert.json``);
5. ``small`` and ``small_kd``: the small dense model fine-tuned without and with distillation from
   ``teacher`` (logits only: the hidden size and head count differ).

Every run is a real launch (``deepspeed --num_gpus N launchers/finetune.py``); the temporary
configs are written into ``--output-dir``. Per row it records the validation metrics
(``RUN/eval_results.json``), the non-zero encoder Linear weights counted in the final checkpoint
(``dist_sparse.train.initial.load_initial``: ``bert.encoder.layer.*.weight`` of rank 2), the
training FLOPs and the wall-clock time.

Training FLOPs follow ``dist_sparse/flops.py``: a step is forward + backward (gradients with
respect to activations and to weights), each of the three products counting only the active
weights of the sparse (encoder Linear) weights at the density in force at that step (GMP's
schedule, read from the run's ``sparsity`` records), everything else dense, as in
``dense_flops_per_token``. Two differences from the pre-training benchmarks, because the model is a
classifier on padded batches: (a) the per-token dense forward is ``dense_flops_per_token`` without
its MLM head and NSP head, plus the pooler and classifier once per sequence; (b) the tokens are
those actually computed: every micro batch of every rank is padded to its longest example, and the
script replays the run's data order (``ResumableBatchIterator`` with the run's seed) to get those
shapes. The distillation rows also pay the teacher's forward pass on the same batches (dense, fp32
on the CPU), reported in its own column and in the total. Evaluation is not counted.

    # the full benchmark as recorded (three seeds, about 100 min on the 2-core CPU machine): table in
    # benchmarks/RESULTS.md, plot benchmarks/finetune_pruning.png, raw results in benchmarks/results/
    python benchmarks/finetune_pruning.py --output-dir /tmp/bench/fp --seeds 1234,4321,2718 \
        --base-lr 3e-4 --small-lr 1e-3
    # end-to-end check in a few minutes (10 steps, 90% only; writes into --output-dir only)
    python benchmarks/finetune_pruning.py --quick --output-dir /tmp/bench/fp_quick

The plot needs matplotlib: ``pip install -e ".[bench]"`` (or ``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

# The shared helpers live beside this file; importing them also puts the repository root on
# sys.path, for a checkout whose package is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, BatchShapes, classifier_forward_per_token, cpu_model, ensure_data, exe,  # noqa: E402
                     free_port, git_state, launch_env, loadavg_1m, read_metrics, run_logged, train_loop_seconds,
                     utc_now, write_config, write_json)

SECTION_TITLE = "## Fine-tuning: knowledge-aware pruning vs small dense (issue 13)"
BLOCK_START = "<!-- finetune_pruning.py: generated block, start -->"
BLOCK_END = "<!-- finetune_pruning.py: generated block, end -->"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "finetune_pruning.json"
DEFAULT_PLOT = ROOT / "benchmarks" / "finetune_pruning.png"
DEFAULT_RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
MATPLOTLIB_HINT = ('the plot needs matplotlib, which is not installed: pip install -e ".[bench]" '
                   '(or pip install matplotlib) into this environment, or pass --no-plot')
ENCODER_WEIGHT = re.compile(r"^bert\.encoder\.layer\.\d+\..*\.weight$")


# --- arguments ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Knowledge-aware pruning (GMP + distillation) vs GMP alone vs a small "
                                            "dense model, in fine-tuning.")
    p.add_argument("--output-dir", required=True, help="run directories, configs and logs go here (not the repo)")
    p.add_argument("--quick", action="store_true",
                   help="end-to-end check: 10 pre-training and 10 fine-tuning steps, 90%% only, GMP every 2 steps; "
                        "results stay in --output-dir unless --json/--plot/--results-md are given")
    p.add_argument("--data", default=None, help="a corpus prepared by `dist-sparse prepare-data` (else the default "
                                                "corpus, vocabulary 8000, seq 128, prepared in OUTPUT_DIR/data)")
    p.add_argument("--task", action="append", default=[], metavar="TASK",
                   help="another task prepared by `dist-sparse prepare-task` with the corpus' tokenizer (repeatable)")
    p.add_argument("--no-default-task", action="store_true", help="only the tasks given with --task")
    p.add_argument("--base-model", default="bert-mini", help="preset of the base model (teacher, pruned rows)")
    p.add_argument("--small-model", default="bert-tiny", help="preset of the small dense model")
    p.add_argument("--pretrain-steps", type=int, default=None, help="pre-training steps of both models (300)")
    p.add_argument("--pretrain-config", default=str(ROOT / "ds_configs" / "cpu_zero2.json"))
    p.add_argument("--pretrain-seed", type=int, default=1234)
    p.add_argument("--finetune-steps", type=int, default=None, help="fine-tuning steps of every row (300)")
    p.add_argument("--finetune-config", default=str(ROOT / "ds_configs" / "cpu_zero2_finetune.json"),
                   help="base fine-tuning config (a sparsity/distillation section in it is replaced)")
    p.add_argument("--base-lr", type=float, default=None,
                   help="peak learning rate of the base model's rows (teacher, GMP, KD); default: the config's")
    p.add_argument("--small-lr", type=float, default=None,
                   help="peak learning rate of the small dense model's rows; default: the config's")
    p.add_argument("--sparsities", default=None, help="comma-separated GMP targets (0.8,0.9,0.95)")
    p.add_argument("--update-interval", type=int, default=None, help="GMP update interval (5)")
    p.add_argument("--end-fraction", type=float, default=0.75, help="GMP reaches its target at this fraction")
    p.add_argument("--seeds", default="1234", help="comma-separated fine-tuning seeds (every row runs with each)")
    p.add_argument("--rows", default=None,
                   help="comma-separated subset of teacher,gmp,kd,small,small_kd (kd and small_kd need teacher)")
    p.add_argument("--num-gpus", type=int, default=2, help="ranks per run (CPU processes on a CPU machine)")
    p.add_argument("--master-port", type=int, default=None,
                   help="port of every launch (default: a free port picked per launch; 29500 is often held)")
    p.add_argument("--reuse", action="store_true",
                   help="keep runs in --output-dir that finished with the same command (resume a broken benchmark)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the fine-tuned rows' checkpoints (default: deleted once counted; the pre-trained "
                        "models and the teachers are always kept)")
    p.add_argument("--json", dest="json_out", default=None,
                   help=f"raw results (default: {DEFAULT_JSON.relative_to(ROOT)}; quick: OUTPUT_DIR/finetune_pruning.json)")
    p.add_argument("--plot", default=None,
                   help=f"PNG plot (default: {DEFAULT_PLOT.relative_to(ROOT)}; quick: OUTPUT_DIR/finetune_pruning.png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--results-md", default=None,
                   help=f"markdown file whose generated block is replaced (default: {DEFAULT_RESULTS_MD.relative_to(ROOT)}; "
                        "quick: none)")
    p.add_argument("--no-results-md", action="store_true")
    return p


def resolve_args(args) -> None:
    quick = args.quick
    if args.pretrain_steps is None:
        args.pretrain_steps = 10 if quick else 300
    if args.finetune_steps is None:
        args.finetune_steps = 10 if quick else 300
    if args.sparsities is None:
        args.sparsities = "0.9" if quick else "0.8,0.9,0.95"
    if args.update_interval is None:
        args.update_interval = 2 if quick else 5
    args.sparsity_list = [float(s) for s in args.sparsities.split(",") if s.strip()]
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not args.sparsity_list or any(not 0 < s < 1 for s in args.sparsity_list):
        raise ValueError("--sparsities: fractions in (0, 1)")
    if not args.seed_list:
        raise ValueError("--seeds: at least one seed")
    if min(args.pretrain_steps, args.finetune_steps, args.update_interval, args.num_gpus) < 1:
        raise ValueError("--pretrain-steps, --finetune-steps, --update-interval and --num-gpus must be >= 1")
    kinds = ("teacher", "gmp", "kd", "small", "small_kd")
    args.row_kinds = kinds if args.rows is None else tuple(r.strip() for r in args.rows.split(",") if r.strip())
    bad = [r for r in args.row_kinds if r not in kinds]
    if bad:
        raise ValueError(f"--rows: unknown {bad}; known: {', '.join(kinds)}")
    if {"kd", "small_kd"} & set(args.row_kinds) and "teacher" not in args.row_kinds:
        raise ValueError("--rows: kd and small_kd distil from the teacher row; include teacher")
    out = Path(args.output_dir).resolve()
    if args.json_out is None:
        args.json_out = str(out / "finetune_pruning.json") if quick else str(DEFAULT_JSON)
    if args.plot is None:
        args.plot = str(out / "finetune_pruning.png") if quick else str(DEFAULT_PLOT)
    if args.results_md is None and not quick:
        args.results_md = str(DEFAULT_RESULTS_MD)
    if args.no_results_md:
        args.results_md = None


def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(MATPLOTLIB_HINT) from None


# --- launching ---------------------------------------------------------------------------------


def ensure_tasks(args, out_dir: Path, data: Path) -> dict[str, Path]:
    tasks: dict[str, Path] = {}
    if not args.no_default_task:
        task = out_dir / "task"
        if not (task / "meta.json").is_file():
            cmd = [exe("dist-sparse"), "prepare-task", "--default-task", "--tokenizer", str(data),
                   "--output", str(task), "--seq-len", "128"]
            print("preparing the default task:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, env=launch_env(), cwd=ROOT)
        tasks["default"] = task
    for t in args.task:
        path = Path(t).resolve()
        if not (path / "meta.json").is_file():
            raise ValueError(f"--task {path} is not a prepared task (no meta.json)")
        name = path.name
        while name in tasks:
            name += "_"
        tasks[name] = path
    if not tasks:
        raise ValueError("no task: drop --no-default-task or give --task")
    data_vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    for name, path in tasks.items():
        vocab = json.loads((path / "meta.json").read_text())["vocab_size"]
        if vocab != data_vocab:
            raise ValueError(f"task {path} has a vocabulary of {vocab}, the pre-training corpus {data_vocab}: prepare "
                             f"it with --tokenizer {data}")
    return tasks


def launch(name: str, script: str, script_args: list[str], args, out_dir: Path, run_dir: Path,
           done_file: str) -> tuple[float, list[str], bool]:
    """Run one ``deepspeed`` launch; returns (wall seconds, command, reused)."""
    port = args.master_port or free_port()
    cmd = [exe("deepspeed"), "--num_gpus", str(args.num_gpus), "--master_port", str(port),
           str(ROOT / "launchers" / script)] + script_args + ["--no-progress", "--overwrite"]
    stamp = run_dir / "bench_command.json"
    # The port may differ between attempts; the config's contents must not (its path stays the same).
    cfg_file = Path(script_args[script_args.index("--deepspeed_config") + 1])
    key = [c for c in cmd if c != str(port)] + [json.dumps(json.loads(cfg_file.read_text()), sort_keys=True)]
    if args.reuse and (run_dir / done_file).exists() and stamp.is_file():
        old = json.loads(stamp.read_text())
        if old.get("key") == key:
            print(f"[{name}] reusing the finished run in {run_dir}", flush=True)
            return old["wall_s"], old["command"], True
    log_path = out_dir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] {' '.join(cmd)}  (log: {log_path})", flush=True)
    wall = run_logged(name, cmd, log_path, port)
    stamp.write_text(json.dumps({"key": key, "command": cmd, "wall_s": wall}) + "\n")
    return wall, cmd, False


# --- pre-training ------------------------------------------------------------------------------

def pretrain(which: str, model: str, args, data: Path, out_dir: Path) -> dict:
    from dist_sparse.model.presets import build_config, dense_flops_per_token

    run_dir = out_dir / "pretrain" / which
    cfg = json.loads(Path(args.pretrain_config).read_text())
    for key in ("sparsity", "distillation", "structured_pruning"):
        cfg.pop(key, None)
    cfg_path = write_config(out_dir, f"pretrain_{which}", cfg)
    wall, cmd, reused = launch(f"pretrain_{which}", "pretrain.py",
                               ["--deepspeed_config", str(cfg_path), "--data", str(data), "--model", model,
                                "--output", str(run_dir), "--max-steps", str(args.pretrain_steps),
                                "--seed", str(args.pretrain_seed)],
                               args, out_dir, run_dir, "checkpoints/latest")
    rows = read_metrics(run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    final = [r for r in rows if r["split"] == "eval"]
    dm = meta["data_meta"]
    mcfg = build_config(model, vocab_size=dm["vocab_size"], max_position_embeddings=max(512, dm["seq_len"]),
                        pad_token_id=dm["special_ids"]["[PAD]"])
    tokens = meta["global_batch"] * dm["seq_len"] * args.pretrain_steps
    res = {"which": which, "model": model, "run_dir": str(run_dir), "steps": args.pretrain_steps,
           "seed": args.pretrain_seed, "global_batch": meta["global_batch"], "seq_len": dm["seq_len"],
           "eval_mlm_loss": final[-1]["mlm_loss"] if final else None,
           "eval_mlm_accuracy": final[-1]["mlm_accuracy"] if final else None,
           # as benchmarks/sparse_quality.py: 3 x dense forward (MLM decoder at every position) x tokens
           "train_tflops": dense_flops_per_token(mcfg, dm["seq_len"], training=True) * tokens / 1e12,
           "wall_s": wall, "train_loop_s": train_loop_seconds(rows, meta["global_batch"]),
           "command": " ".join(cmd), "config": str(cfg_path), "reused": reused}
    print(f"[pretrain_{which}] {model}: eval MLM loss {res['eval_mlm_loss']:.4f}, {wall:.0f} s", flush=True)
    return res


# --- fine-tuning rows --------------------------------------------------------------------------

def row_specs(args) -> list[dict]:
    """The rows in run order (teacher first: the distillation rows need it)."""
    specs = []
    kinds = args.row_kinds
    if "teacher" in kinds:
        specs.append({"row": "teacher", "model": "base", "sparsity": None, "distill": None})
    for s in args.sparsity_list:
        pct = f"{round(100 * s):d}"
        if "gmp" in kinds:
            specs.append({"row": f"gmp{pct}", "model": "base", "sparsity": s, "distill": None})
        if "kd" in kinds:
            specs.append({"row": f"kd{pct}", "model": "base", "sparsity": s, "distill": "full"})
    if "small" in kinds:
        specs.append({"row": "small", "model": "small", "sparsity": None, "distill": None})
    if "small_kd" in kinds:
        specs.append({"row": "small_kd", "model": "small", "sparsity": None, "distill": "logits"})
    return specs


def row_config(spec: dict, base: dict, args, teacher_dir: Path | None) -> dict:
    cfg = copy.deepcopy(base)
    for key in ("sparsity", "distillation", "structured_pruning"):
        cfg.pop(key, None)
    # Each model at a learning rate it learns at: one rate for all does not fit both sizes (the
    # first run: bert-mini stayed on the majority class at bert-tiny's 1e-3).
    lr = args.base_lr if spec["model"] == "base" else args.small_lr
    if lr is not None:
        cfg.setdefault("optimizer", {}).setdefault("params", {})["lr"] = lr
    if spec["sparsity"] is not None:
        # ds_configs/cpu_zero2_finetune_sparsebert.json's GMP section at this target
        cfg["sparsity"] = {"method": "gmp", "sparsity": spec["sparsity"], "update_interval": args.update_interval,
                           "start_fraction": 0.0, "end_fraction": args.end_fraction}
    if spec["distill"] == "full":   # SparseBERT: logits, hidden states and attention scores
        cfg["distillation"] = {"teacher": str(teacher_dir), "temperature": 1.0, "logits": 1.0, "hidden": 1.0,
                               "attention": 1.0}
    elif spec["distill"] == "logits":  # another hidden size and head count: logits only
        cfg["distillation"] = {"teacher": str(teacher_dir), "temperature": 1.0, "logits": 1.0, "hidden": 0.0,
                               "attention": 0.0}
    return cfg


def encoder_counts(run_dir: Path) -> dict:
    """Non-zero and total encoder Linear weights (and all parameters) of the run's final checkpoint."""
    from dist_sparse.train.initial import load_initial

    init = load_initial(run_dir)
    enc_nz = enc_total = all_nz = all_total = 0
    per_weight = {}
    for name, w in init.state_dict.items():
        nz = int((w != 0).sum())
        all_nz += nz
        all_total += w.numel()
        if ENCODER_WEIGHT.match(name) and w.dim() == 2:
            enc_nz += nz
            enc_total += w.numel()
            per_weight[name] = (w.numel(), nz)
    return {"encoder_linear_nonzero": enc_nz, "encoder_linear_total": enc_total,
            "params_nonzero": all_nz, "params_total": all_total, "per_weight": per_weight,
            "config": init.config}


def cached_counts(run_dir: Path, reused: bool) -> dict:
    """``encoder_counts`` of the run, kept in RUN/bench_counts.json: a reused run whose checkpoints
    were deleted (the default) is counted from there."""
    from dist_sparse.model.config import DistSparseBertConfig

    cache = run_dir / "bench_counts.json"
    if reused and cache.is_file():
        counts = json.loads(cache.read_text())
        counts["config"] = DistSparseBertConfig.from_dict(counts["config"])
        return counts
    counts = encoder_counts(run_dir)
    cache.write_text(json.dumps({**counts, "config": counts["config"].to_dict()}) + "\n")
    return counts


def density_schedule(rows: list[dict], steps: int) -> list[dict[str, float] | None]:
    """Per step 1..steps, the per-weight densities in force (None: a dense run). A ``sparsity``
    record at step s is written after step s's mask update and holds from step s + 1 on."""
    sp = sorted((r for r in rows if r["split"] == "sparsity"), key=lambda r: r["step"])
    if not sp:
        return [None] * steps
    out, j = [], 0
    for step in range(1, steps + 1):
        while j + 1 < len(sp) and sp[j + 1]["step"] < step:
            j += 1
        out.append({k[len("density/"):]: v for k, v in sp[j].items() if k.startswith("density/")})
    return out


def training_flops(shapes: list[list[tuple[int, int]]], densities: list, student_cfg, numels: dict[str, int],
                   num_labels: int, teacher_cfg=None) -> dict:
    """Student training FLOPs (dist_sparse.flops: forward + both backward products over active weights)
    and the teacher's forward FLOPs, summed over the run's micro batches."""
    from dist_sparse.flops import training_flops_per_token

    student = teacher = 0.0
    tokens = real_steps = 0
    for step_shapes, dens in zip(shapes, densities):
        weights = [] if dens is None else [(numels[name], d) for name, d in dens.items()]
        real_steps += 1
        for b, length in step_shapes:
            n = b * length
            tokens += n
            student += training_flops_per_token(classifier_forward_per_token(student_cfg, length, num_labels),
                                                weights) * n
            if teacher_cfg is not None:
                teacher += classifier_forward_per_token(teacher_cfg, length, num_labels) * n
    return {"student_tflops": student / 1e12, "teacher_forward_tflops": teacher / 1e12,
            "total_tflops": (student + teacher) / 1e12, "padded_tokens": tokens, "steps_counted": real_steps}


def finetune_row(spec: dict, task_name: str, task: Path, seed: int, args, out_dir: Path, inits: dict[str, Path],
                 base_cfg: dict, shapes: BatchShapes, teacher_dir: Path | None, teacher_cfg) -> dict:
    name = f"{task_name}_s{seed}_{spec['row']}"
    run_dir = out_dir / "finetune" / task_name / f"seed{seed}" / spec["row"]
    cfg = row_config(spec, base_cfg, args, teacher_dir)
    cfg_path = write_config(out_dir, name, cfg)
    load0 = loadavg_1m()
    started = utc_now().isoformat(timespec="seconds")
    code = git_state()
    wall, cmd, reused = launch(name, "finetune.py",
                               ["--deepspeed_config", str(cfg_path), "--task", str(task),
                                "--init", str(inits[spec["model"]]), "--output", str(run_dir),
                                "--max-steps", str(args.finetune_steps), "--seed", str(seed),
                                "--eval-interval", "0", "--save-interval", "0"],
                               args, out_dir, run_dir, "eval_results.json")
    load1 = loadavg_1m()
    rows = read_metrics(run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    ev = json.loads((run_dir / "eval_results.json").read_text())
    counts = cached_counts(run_dir, reused)
    numels = {k: v[0] for k, v in counts["per_weight"].items()}
    dens = density_schedule(rows, args.finetune_steps)
    step_shapes = shapes.steps(seed, meta["micro_batch"], meta["dp_size"], meta["gradient_accumulation"],
                               args.finetune_steps)
    flops = training_flops(step_shapes, dens, counts["config"], numels, shapes.meta["num_labels"],
                           teacher_cfg if spec["distill"] else None)
    sp_rows = [r for r in rows if r["split"] == "sparsity"]
    metric = shapes.meta.get("metric", "accuracy")
    res = {"task": task_name, "task_dir": str(task), "seed": seed, **{k: v for k, v in spec.items()},
           "model_preset": args.base_model if spec["model"] == "base" else args.small_model,
           "metric": metric, "eval": {k: v for k, v in ev.items() if k not in ("split", "teacher_sha256")},
           "primary": ev.get(metric),
           **{k: v for k, v in counts.items() if k not in ("per_weight", "config")},
           "final_logged_density": sp_rows[-1]["density"] if sp_rows else 1.0,
           "mask_updates": max(0, len(sp_rows) - 1),
           **flops, "wall_s": wall, "train_loop_s": train_loop_seconds(rows, meta["global_batch"]),
           "global_batch": meta["global_batch"], "micro_batch": meta["micro_batch"],
           "gradient_accumulation": meta["gradient_accumulation"], "dp_size": meta["dp_size"],
           "steps": args.finetune_steps, "lr": cfg.get("optimizer", {}).get("params", {}).get("lr"),
           "train_loss_last10": _mean([r["loss"] for r in rows if r["split"] == "train"
                                       and r["step"] > args.finetune_steps - 10]),
           "run_dir": str(run_dir), "config": str(cfg_path), "sections": {k: cfg[k] for k in ("sparsity", "distillation")
                                                                          if k in cfg},
           "command": " ".join(cmd), "reused": reused, "git": code, "started_utc": started,
           "loadavg_1m_before_after": [load0, load1]}
    if not args.keep_checkpoints and spec["row"] != "teacher":
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    print(f"[{name}] {metric} {res['primary']:.4f}, non-zero encoder Linear {res['encoder_linear_nonzero']:,}, "
          f"{res['total_tflops']:.2f} training TFLOPs, {wall:.0f} s", flush=True)
    return res


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


# --- output ------------------------------------------------------------------------------------

ROW_LABEL = {"teacher": "dense base (teacher)", "small": "small dense", "small_kd": "small dense + KD (logits)"}


def row_label(r: dict) -> str:
    if r["row"] in ROW_LABEL:
        return ROW_LABEL[r["row"]]
    pct = f"{round(100 * r['sparsity'])}%"
    return f"GMP {pct}" if r["distill"] is None else f"GMP {pct} + KD"


def format_tables(result: dict) -> str:
    pre = result["pretrain"]
    lines = ["Pre-training (the same corpus, config, steps and seed for both):", "",
             "| model | role | steps | global batch | eval MLM loss | eval MLM acc | training TFLOPs | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for p in pre.values():
        lines.append(f"| {p['model']} | {p['which']} | {p['steps']} | {p['global_batch']} | {p['eval_mlm_loss']:.4f} | "
                     f"{p['eval_mlm_accuracy']:.4f} | {p['train_tflops']:.2f} | {p['wall_s']:.0f} |")
    for task in result["tasks"]:
        rows = [r for r in result["rows"] if r["task"] == task]
        if not rows:
            continue
        base_nz = next((r["encoder_linear_total"] for r in rows if r["model"] == "base"), None)
        metric = rows[0]["metric"]
        others = [k for k in rows[0]["eval"] if k not in (metric, "loss", "step")]
        lines += ["", f"Fine-tuning, task `{task}` ({result['finetune_steps']} steps; primary metric {metric}):", "",
                  f"| seed | row | model | {metric} | " + " | ".join(others) + " | val loss | non-zero encoder Linear "
                  "| / base encoder | non-zero params (all) | student training TFLOPs | teacher fwd TFLOPs | "
                  "total TFLOPs | train loop s | wall s |",
                  "|---" * (10 + len(others) + 3) + "|"]
        for r in rows:
            frac = f"{r['encoder_linear_nonzero'] / base_nz:.3f}" if base_nz else "n/a"
            lines.append(
                f"| {r['seed']} | {row_label(r)} | {r['model_preset']} | **{r['primary']:.4f}** | "
                + " | ".join(f"{r['eval'][k]:.4f}" for k in others)
                + f" | {r['eval']['loss']:.4f} | {r['encoder_linear_nonzero']:,} | {frac} | {r['params_nonzero']:,} | "
                f"{r['student_tflops']:.3f} | {r['teacher_forward_tflops']:.3f} | {r['total_tflops']:.3f} | "
                f"{r['train_loop_s']:.0f} | {r['wall_s']:.0f} |")
        if len(result["seeds"]) > 1:
            lines += ["", f"Mean over seeds {', '.join(map(str, result['seeds']))} ({metric}, min-max):", "",
                      f"| row | {metric} mean | min | max |", "|---|---|---|---|"]
            for label, vals in grouped(rows):
                lines.append(f"| {label} | {_mean(vals):.4f} | {min(vals):.4f} | {max(vals):.4f} |")
    return "\n".join(lines)


def grouped(rows: list[dict]) -> list[tuple[str, list[float]]]:
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault(row_label(r), []).append(r["primary"])
    return list(out.items())


def make_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in result["tasks"] if any(r["task"] == t for r in result["rows"])]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.8 * len(tasks)), squeeze=False)
    for ti, task in enumerate(tasks):
        rows = [r for r in result["rows"] if r["task"] == task]
        metric = rows[0]["metric"]
        for ax, xkey, xlabel in ((axes[ti][0], "encoder_linear_nonzero", "non-zero encoder Linear weights (log)"),
                                 (axes[ti][1], "total_tflops",
                                  "training TFLOPs, student + teacher forward (log)")):
            def series(pred):
                pts: dict = {}
                for r in rows:
                    if pred(r):
                        key = r["sparsity"] or 0.0
                        pts.setdefault(key, []).append((r[xkey], r["primary"]))
                xs, ys, lo, hi = [], [], [], []
                for key in sorted(pts):
                    v = pts[key]
                    xs.append(_mean([p[0] for p in v]))
                    m = _mean([p[1] for p in v])
                    ys.append(m)
                    lo.append(m - min(p[1] for p in v))
                    hi.append(max(p[1] for p in v) - m)
                return xs, ys, [lo, hi]

            styles = [
                ("dense base (teacher)", lambda r: r["row"] == "teacher", dict(marker="*", ms=14, color="black", ls="")),
                ("GMP, no distillation", lambda r: r["sparsity"] is not None and r["distill"] is None,
                 dict(marker="o", color="tab:blue", ls="-")),
                ("GMP + distillation (SparseBERT)", lambda r: r["sparsity"] is not None and r["distill"] is not None,
                 dict(marker="s", color="tab:red", ls="-")),
                ("small dense", lambda r: r["row"] == "small", dict(marker="^", ms=9, color="tab:green", ls="")),
                ("small dense + KD (logits)", lambda r: r["row"] == "small_kd",
                 dict(marker="v", ms=9, color="tab:purple", ls="")),
            ]
            for label, pred, st in styles:
                xs, ys, err = series(pred)
                if xs:
                    ax.errorbar(xs, ys, yerr=err if len(result["seeds"]) > 1 else None, label=label, capsize=3, **st)
            for r in rows:
                if r["sparsity"] is not None and r["seed"] == result["seeds"][0]:
                    ax.annotate(f"{round(100 * r['sparsity'])}%", (r[xkey], r["primary"]), textcoords="offset points",
                                xytext=(4, -12 if r["distill"] is None else 6), fontsize=8)
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"validation {metric}")
            ax.grid(True, which="both", alpha=0.3)
        axes[ti][0].legend(fontsize=8, loc="lower right")
        seeds = ", ".join(map(str, result["seeds"]))
        axes[ti][0].set_title(f"task {task}: {result['base_model']} pruned vs {result['small_model']} dense "
                              f"({result['finetune_steps']} steps, seed {seeds})", fontsize=9)
        axes[ti][1].set_title("same runs vs training FLOPs (evaluation not counted)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_line(result: dict) -> str:
    m = result["machine"]
    return (f"{m['cpu']}, {m['cpu_count']} cores, no GPU; Python {m['python']}, torch {m['torch']}, deepspeed "
            f"{m['deepspeed']}, transformers {m['transformers']}; gloo, fp32, {result['num_ranks']} ranks with one "
            f"OpenMP thread each")


def generated_block(result: dict) -> str:
    g = result["git"]
    loads = [x for r in result["rows"] for x in r["loadavg_1m_before_after"]]
    lines = [BLOCK_START,
             f"- Machine: {machine_line(result)}.",
             f"- Date: {result['started_utc']} to {result['finished_utc']} (UTC); {result['wall_s'] / 60:.1f} min in all. "
             f"1-minute load average around the fine-tuning runs: {min(loads):.1f}-{max(loads):.1f}." if loads else "",
             f"- Code: commit `{(g['commit'] or 'unknown')[:7]}`, dist_sparse/ "
             f"{'modified' if g['dist_sparse_modified'] else 'unmodified'}.",
             f"- Command: `{result['command']}`",
             f"- Pre-training: {result['base_model']} and {result['small_model']}, {result['pretrain_steps']} steps each "
             f"on the default corpus (vocabulary 8000, seq 128), `{Path(result['pretrain_config']).name}`, seed "
             f"{result['pretrain_seed']}.",
             f"- Fine-tuning: {result['finetune_steps']} steps for every row, `{Path(result['finetune_config']).name}` "
             f"(global batch {result['rows'][0]['global_batch']}, {lr_text(result['rows'])}, 10% warm-up, linear "
             f"decay), seed(s) {', '.join(map(str, result['seeds']))}; GMP: cubic schedule from dense, every "
             f"{result['update_interval']} steps, target reached at {result['end_fraction']:.0%} of the steps; "
             f"distillation: temperature 1, hard 0; KD rows logits, hidden and attention 1.0, small dense + KD "
             f"logits only.",
             "",
             format_tables(result),
             "",
             "Non-zero encoder Linear weights are counted in each run's final checkpoint. Training FLOPs: "
             "`dist_sparse/flops.py` (forward + activation-gradient + weight-gradient products over the active "
             "encoder weights at the density in force each step, the rest dense) on the classifier (the "
             "encoder, pooler and classifier of `dense_flops_per_token` without the MLM head) over the padded "
             "micro batches the run computed; the teacher's forward on the same batches is its own column. "
             "Evaluation is not counted. Wall seconds are CPU figures for reference only.",
             BLOCK_END]
    return "\n".join(x for x in lines if x is not None)


def lr_text(rows: list[dict]) -> str:
    """'lr 0.001' when every row used one rate, else the rate of each model."""
    per_model: dict[str, set] = {}
    for r in rows:
        per_model.setdefault(r["model_preset"], set()).add(r["lr"])
    rates = {lr for v in per_model.values() for lr in v}
    if len(rates) == 1:
        return f"lr {rates.pop()}"
    return "peak lr " + ", ".join(f"{m} {'/'.join(map(str, sorted(v)))}" for m, v in per_model.items())


def update_results_md(path: Path, block: str) -> None:
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    if BLOCK_START in text and BLOCK_END in text:
        head, rest = text.split(BLOCK_START, 1)
        _, tail = rest.split(BLOCK_END, 1)
        text = head + block + tail
    else:
        section = (f"\n{SECTION_TITLE} (benchmarks/finetune_pruning.py)\n\n" if SECTION_TITLE not in text else "")
        text = text.rstrip("\n") + "\n" + section + "\n" + block + "\n\n### Reading\n\n(to be written)\n"
    path.write_text(text)


# --- main --------------------------------------------------------------------------------------

def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    resolve_args(args)
    if not args.no_plot:
        check_matplotlib()  # before an hour of runs, not after
    out_dir = Path(args.output_dir).resolve()
    if ROOT in (out_dir, *out_dir.parents):
        raise ValueError(f"--output-dir {out_dir} is inside the repository; put the runs elsewhere (e.g. /tmp)")
    out_dir.mkdir(parents=True, exist_ok=True)
    base_cfg = json.loads(Path(args.finetune_config).read_text())
    t_start = time.perf_counter()
    started = utc_now()
    data = ensure_data(args.data, out_dir)
    tasks = ensure_tasks(args, out_dir, data)

    pre = {"base": pretrain("base", args.base_model, args, data, out_dir),
           "small": pretrain("small", args.small_model, args, data, out_dir)}
    inits = {"base": Path(pre["base"]["run_dir"]), "small": Path(pre["small"]["run_dir"])}

    results = []
    for task_name, task in tasks.items():
        shapes = BatchShapes(task)
        for seed in args.seed_list:
            teacher_dir = teacher_cfg = None
            for spec in row_specs(args):
                res = finetune_row(spec, task_name, task, seed, args, out_dir, inits, base_cfg, shapes,
                                   teacher_dir, teacher_cfg)
                results.append(res)
                if spec["row"] == "teacher":
                    teacher_dir = Path(res["run_dir"])
                    from dist_sparse.train.initial import load_initial

                    teacher_cfg = load_initial(teacher_dir).config

    import deepspeed
    import torch
    import transformers

    result = {
        "benchmark": "finetune_pruning", "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None
        else "finetune_pruning.py " + " ".join(argv),
        "quick": args.quick, "base_model": args.base_model, "small_model": args.small_model,
        "pretrain_steps": args.pretrain_steps, "pretrain_seed": args.pretrain_seed,
        "pretrain_config": args.pretrain_config, "finetune_steps": args.finetune_steps,
        "finetune_config": args.finetune_config, "sparsities": args.sparsity_list,
        "update_interval": args.update_interval, "end_fraction": args.end_fraction, "seeds": args.seed_list,
        "num_ranks": args.num_gpus, "data": str(data), "tasks": list(tasks), "task_dirs": {k: str(v) for k, v in tasks.items()},
        "pretrain": pre, "rows": results,
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "host": socket.gethostname(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "deepspeed": deepspeed.__version__, "transformers": transformers.__version__},
        "git": git_state(), "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": utc_now().isoformat(timespec="seconds"), "wall_s": time.perf_counter() - t_start,
    }
    tables = format_tables(result)
    print(tables, flush=True)
    write_json(args.json_out, result)
    print(f"raw results: {args.json_out}", flush=True)
    if not args.no_plot:
        make_plot(result, Path(args.plot))
        print(f"plot: {args.plot}", flush=True)
    if args.results_md:
        update_results_md(Path(args.results_md), generated_block(result))
        print(f"table: {args.results_md}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except (ValueError, RuntimeError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
