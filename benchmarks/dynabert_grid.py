"""DynaBERT's sub-network grid: every (width, depth) sub-network next to the full model and next to
a model of its size trained alone (issue 14's benchmark).

Fine-tuning, on the default task (``dist-sparse prepare-task --default-task``, or ``--task``), with
the same fine-tuning config, learning rate, batch, seed and data order for every run:

1. ``base``: ``--base-model`` (bert-mini: 4 layers, 4 heads, hidden 256, FFN 1024, so widths
   0.25/0.5/0.75/1.0 and depths 0.5/0.75/1.0 are all whole heads, neurons and layers at TP 1)
   pre-trained with ``launchers/pretrain.py`` for ``--pretrain-steps`` on the prepared corpus
   (``--pretrained RUN`` reuses one);
2. ``teacher``: the base fine-tuned dense for ``--teacher-steps`` (``--teacher RUN`` reuses one);
3. DynaBERT: phase 1 (``--widths``) ``--init teacher``, distilling from the teacher; phase 2
   (``--widths`` x ``--depths``) ``--init`` phase 1, distilling from phase 1; ``--phase-steps`` each,
   every sub-network in every step (``"subnetworks": "all"``). Distillation as DynaBERT: soft
   cross-entropy on the logits and MSE on the hidden states (each weight 1, temperature 1, no hard
   label loss). Each sub-network's validation metrics come from phase 2's ``eval_results.json``
   (``subnetworks``), the width-only ones also from phase 1's;
4. ``alone`` (``--alone``: every sub-network but the full model by default, or a list): the same
   sub-network trained by itself. What "alone" means here, exactly: the weights DynaBERT's phase 1
   started from, with its units -- the teacher rewired by phase 1's own importance order
   (``RUN/dynabert_rewiring.json``: heads and FFN neurons sorted by importance) and cut with
   ``dist_sparse.dynabert.subnet.subnetwork_state_dict`` to the heads, neurons and layers the
   sub-network keeps -- so at step 0 it is the very function DynaBERT's sub-network starts as.
   It is saved as a compact folder (``save_compact``: our per-layer-size classifier, which
   ``finetune.py --init`` loads) and fine-tuned with no other sub-network sharing its weights for
   2 x ``--phase-steps`` steps (both phases' steps), with the same distillation from the dense
   teacher (each kept layer learns the teacher layer DynaBERT's pass maps it to: ``layer_map`` =
   the kept layers). Differences from DynaBERT by construction: its only teacher is the dense
   teacher (DynaBERT's phase 2 learns from the phase-1 model), it trains one sub-network instead
   of all at once, and its depth is fixed from the first step (DynaBERT trains the shallower
   sub-networks in phase 2 only).

Pre-training (on by default, ``--no-pretraining`` skips it): DynaBERT phase 1 and phase 2 in
pre-training (``launchers/pretrain.py --init BASE`` with a ``"dynabert"`` section; MLM
distillation, logits and hidden 1, from the base, then from phase 1), ``--pt-phase-steps`` each,
the held-out MLM loss of every sub-network from ``metrics.jsonl`` (``eval_w0.5_d1`` rows; the
evaluation covers the whole held-out split once), and ``--pt-alone`` sub-networks (three corners
of the grid by default) cut from the base rewired by pre-training phase 1's order and pre-trained
alone for both phases' steps with the same MLM distillation from the base.

Inference throughput: every sub-network of the final phase-2 fine-tuned model and the full model,
each cut out as a standalone ``DistSparseBertForSequenceClassification`` (eval mode, no_grad),
timed in one process on the task's validation examples padded to a fixed ``--infer-seq-len`` at a
fixed ``--infer-batch``, in interleaved rounds (``_common.interleaved``: the order rotates every
round, so load from other jobs falls on all alike). Reported: the speedup over the full model (the
median over rounds of full time / sub-network time, the ratio of means with a 95% bootstrap
interval) beside the FLOP-ideal one; sequences/second only from a GPU (``--device cuda``): on a
shared CPU machine absolute times are not comparable between runs, ratios within one are. Before
timing, each standalone model's logits are checked against the trained model run with DynaBERT's
gates on one batch (the timed model is the trained sub-network).

FLOPs. Inference: forward FLOPs per token at ``--infer-seq-len`` of the standalone sub-network
(``dense_flops_per_token`` without the MLM and NSP heads, plus pooler and classifier once per
sequence: ``_common.classifier_forward_per_token``; pre-training: ``dense_flops_per_token``, MLM
head at every position). Training: forward + backward (3 x forward) over the padded micro batches
each run computed (its data order replayed, ``_common.BatchShapes``; pre-training: full packed
sequences), plus the teacher's forward on the same batches; evaluation and the importance
measurement not counted. A DynaBERT pass of width m computes every head and neuron of the layers
it runs (gates, not slicing), so its pass is counted as computed (full width, kept layers) and,
beside it, as it would be if the weights were sliced. DynaBERT's training FLOPs are those of both
phases together, shared by all sub-networks; the teacher's and the base's training are common to
every row and reported apart.

    # the full benchmark: table in benchmarks/RESULTS.md, plot benchmarks/dynabert_grid.png, raw
    # benchmarks/results/dynabert_grid.json. About 40 min on the 2-core CPU machine with little else
    # running (--quick's estimate from its own launches; 100 min at a load of 4-6 from other jobs)
    python benchmarks/dynabert_grid.py --output-dir /tmp/bench/dyn
    # end-to-end check in a few minutes (tiny steps, widths 0.5,1 and depths 0.5,1; writes only into
    # --output-dir) that also prints its estimate of the full run's time on this machine
    python benchmarks/dynabert_grid.py --quick --output-dir /tmp/bench/dyn_quick
    # inference timing on a GPU (sequences/second as well as ratios)
    python benchmarks/dynabert_grid.py --output-dir /tmp/bench/dyn --reuse --device cuda

The plot needs matplotlib: ``pip install -e ".[bench]"`` (or ``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The shared helpers live beside this file; importing them also puts the repository root on
# sys.path, for a checkout whose package is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DATA_POOL, ROOT, BatchShapes, bootstrap_ratio_ci, classifier_forward_per_token,  # noqa: E402
                     cpu_model, ensure_data, exe, free_port, git_state, interleaved, launch_env, loadavg_1m,
                     read_metrics, run_logged, stats, timed, train_loop_seconds, utc_now, write_config, write_json)

SECTION_TITLE = "## DynaBERT: sub-network grid (issue 14)"
BLOCK_START = "<!-- dynabert_grid.py: generated block, start -->"
BLOCK_END = "<!-- dynabert_grid.py: generated block, end -->"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "dynabert_grid.json"
DEFAULT_PLOT = ROOT / "benchmarks" / "dynabert_grid.png"
DEFAULT_RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
MATPLOTLIB_HINT = ('the plot needs matplotlib, which is not installed: pip install -e ".[bench]" '
                   '(or pip install matplotlib) into this environment, or pass --no-plot')
# DynaBERT's distillation (and the alone runs'): logits and hidden states, no hard label loss
DISTILL = {"temperature": 1.0, "logits": 1.0, "hidden": 1.0, "attention": 0.0, "hard": 0.0}
FULL = (1.0, 1.0)


# --- arguments ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DynaBERT: every (width, depth) sub-network against the full model and "
                                            "against the same sub-network trained alone; metric, FLOPs, speedup.")
    p.add_argument("--output-dir", required=True, help="run directories, configs and logs go here (not the repo)")
    p.add_argument("--quick", action="store_true",
                   help="end-to-end check: tiny steps, widths 0.5,1 and depths 0.5,1; results stay in --output-dir "
                        "unless --json/--plot/--results-md are given; prints an estimate of the full run's time")
    p.add_argument("--data", default=None, help="a corpus prepared by `dist-sparse prepare-data` (else the default "
                                                "corpus, vocabulary 8000, seq 128, prepared in OUTPUT_DIR/data)")
    p.add_argument("--task", default=None, help="a task prepared by `dist-sparse prepare-task` with the corpus' "
                                                "tokenizer (default: the default task, prepared in OUTPUT_DIR/task)")
    p.add_argument("--base-model", default="bert-mini", help="preset of the base model")
    p.add_argument("--pretrained", default=None, metavar="RUN",
                   help="an existing dist_sparse pre-training run of the base model (skips pre-training)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="pre-training steps of the base model (300)")
    p.add_argument("--pretrain-config", default=str(ROOT / "ds_configs" / "cpu_zero2.json"),
                   help="config of every pre-training run (its sparsity/distillation/dynabert sections replaced)")
    p.add_argument("--pretrain-seed", type=int, default=1234)
    p.add_argument("--teacher", default=None, metavar="RUN",
                   help="an existing dense fine-tuning run of the base model on the task (skips the teacher run)")
    p.add_argument("--teacher-steps", type=int, default=None, help="fine-tuning steps of the teacher (300)")
    p.add_argument("--finetune-config", default=str(ROOT / "ds_configs" / "cpu_zero2_finetune.json"),
                   help="config of every fine-tuning run (its sparsity/distillation/dynabert sections replaced)")
    p.add_argument("--lr", type=float, default=3e-4,
                   help="peak learning rate of every fine-tuning run (bert-mini stayed on the majority class at "
                        "the config's 1e-3 in finetune_pruning's first run); 0: the config's")
    p.add_argument("--seed", type=int, default=1234, help="seed of every fine-tuning run")
    p.add_argument("--widths", default=None, help="width multipliers, comma-separated (0.25,0.5,0.75,1.0)")
    p.add_argument("--depths", default=None, help="depth multipliers of phase 2, comma-separated (0.5,0.75,1.0)")
    p.add_argument("--phase-steps", type=int, default=None, help="fine-tuning steps of each DynaBERT phase (60)")
    p.add_argument("--importance-batches", type=int, default=None, help="phase 1's importance batches (32)")
    p.add_argument("--alone", default="all",
                   help="sub-networks trained alone in fine-tuning: all (every one but the full model), none, "
                        "or names such as w0.5_d0.5,w1_d0.5")
    p.add_argument("--no-pretraining", action="store_true", help="skip DynaBERT in pre-training")
    p.add_argument("--pt-phase-steps", type=int, default=None, help="pre-training steps of each DynaBERT phase (40)")
    p.add_argument("--pt-alone", default=None,
                   help="sub-networks pre-trained alone: all, none or names (default: the smallest, the narrowest "
                        "at full depth and the shallowest at full width; quick: the smallest)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the inference timing")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="inference timing precision (auto: bf16 autocast on CUDA, fp32 on the CPU)")
    p.add_argument("--infer-batch", type=int, default=None, help="sequences per timed forward (32)")
    p.add_argument("--infer-seq-len", type=int, default=128, help="padded length of the timed batches")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (10)")
    p.add_argument("--steps-per-round", type=int, default=2, help="timed forwards per variant and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per variant before timing")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the timing (CPU default 1)")
    p.add_argument("--num-gpus", type=int, default=2, help="ranks per run (CPU processes on a CPU machine)")
    p.add_argument("--master-port", type=int, default=None,
                   help="port of every launch (default: a free port picked per launch; 29500 is often held)")
    p.add_argument("--reuse", action="store_true",
                   help="keep runs in --output-dir that finished with the same command and config (and, for the "
                        "cut sub-networks, the same initial weights): resume a broken benchmark, or time a finished "
                        "one again with --device cuda")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the alone runs' checkpoints (default: deleted once read; the base, the teacher and "
                        "the DynaBERT phases are always kept)")
    p.add_argument("--json", dest="json_out", default=None,
                   help=f"raw results (default: {DEFAULT_JSON.relative_to(ROOT)}; quick: OUTPUT_DIR/dynabert_grid.json)")
    p.add_argument("--plot", default=None,
                   help=f"PNG plot (default: {DEFAULT_PLOT.relative_to(ROOT)}; quick: OUTPUT_DIR/dynabert_grid.png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--results-md", default=None,
                   help=f"markdown file whose generated block is replaced (default: "
                        f"{DEFAULT_RESULTS_MD.relative_to(ROOT)}; quick: none)")
    p.add_argument("--no-results-md", action="store_true")
    return p


def parse_multipliers(text: str, what: str) -> list[float]:
    values = sorted({float(x) for x in text.split(",") if x.strip()}, reverse=True)
    if not values or any(not 0 < v <= 1 for v in values) or 1.0 not in values:
        raise ValueError(f"{what} {text!r}: multipliers in (0, 1], 1.0 among them")
    return values


def grid(widths: list[float], depths: list[float]) -> list[tuple[float, float]]:
    """Every (width, depth), largest first as DynaBERT orders them: the full model, then by depth
    and width descending."""
    return sorted(((w, d) for d in depths for w in widths), key=lambda wd: (wd[1], wd[0]), reverse=True)


def subnet_name(width: float, depth: float) -> str:
    from dist_sparse.dynabert.subnet import subnetwork_name

    return subnetwork_name(width, depth)


def pick_subnetworks(spec: str | None, cells: list[tuple[float, float]], default: list[tuple[float, float]],
                     what: str) -> list[tuple[float, float]]:
    """The sub-networks ``spec`` names (``all``: every one but the full model; ``none``; a comma
    list of names such as ``w0.5_d0.5``), in grid order; ``default`` when ``spec`` is None."""
    if spec is None:
        return [c for c in cells if c in default]
    spec = spec.strip()
    if spec == "none":
        return []
    if spec == "all":
        return [c for c in cells if c != FULL]
    by_name = {subnet_name(*c): c for c in cells}
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in wanted if s not in by_name]
    if bad:
        raise ValueError(f"{what}: unknown sub-network(s) {bad}; the grid has {', '.join(by_name)}")
    return [c for c in cells if subnet_name(*c) in wanted]


def corners(cells: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The smallest sub-network, the narrowest at full depth and the shallowest at full width."""
    w0, d0 = min(w for w, _ in cells), min(d for _, d in cells)
    return [c for c in {(w0, d0), (w0, 1.0), (1.0, d0)} if c != FULL]


def resolve_args(args) -> None:
    quick = args.quick
    defaults = {"pretrain_steps": (10, 300), "teacher_steps": (10, 300), "phase_steps": (4, 60),
                "pt_phase_steps": (3, 40), "importance_batches": (2, 32), "infer_batch": (8, 32), "rounds": (3, 10)}
    for key, (q, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, q if quick else full)
    if args.widths is None:
        args.widths = "0.5,1.0" if quick else "0.25,0.5,0.75,1.0"
    if args.depths is None:
        args.depths = "0.5,1.0" if quick else "0.5,0.75,1.0"
    args.width_list = parse_multipliers(args.widths, "--widths")
    args.depth_list = parse_multipliers(args.depths, "--depths")
    check_multipliers(args.base_model, args.width_list, args.depth_list)
    args.cells = grid(args.width_list, args.depth_list)
    args.alone_cells = pick_subnetworks(args.alone, args.cells, [], "--alone")
    smallest = [min(args.cells, key=lambda c: (c[0] * c[1], c[1]))]
    args.pt_alone_cells = pick_subnetworks(args.pt_alone, args.cells, smallest if quick else corners(args.cells),
                                           "--pt-alone")
    for name in ("pretrain_steps", "teacher_steps", "phase_steps", "pt_phase_steps", "importance_batches",
                 "infer_batch", "infer_seq_len", "rounds", "steps_per_round", "num_gpus"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    out = Path(args.output_dir).resolve()
    if args.json_out is None:
        args.json_out = str(out / "dynabert_grid.json") if quick else str(DEFAULT_JSON)
    if args.plot is None:
        args.plot = str(out / "dynabert_grid.png") if quick else str(DEFAULT_PLOT)
    if args.results_md is None and not quick:
        args.results_md = str(DEFAULT_RESULTS_MD)
    if args.no_results_md:
        args.results_md = None


def check_multipliers(preset: str, widths: list[float], depths: list[float]) -> None:
    """Every multiplier must give whole heads, neurons and layers of the base model at TP 1."""
    from dist_sparse.dynabert.subnet import kept_layers, width_counts
    from dist_sparse.model.presets import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"--base-model: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    sizes = PRESETS[preset]
    layers, heads, ffn = sizes["num_hidden_layers"], sizes["num_attention_heads"], sizes["intermediate_size"]
    for w in widths:
        width_counts(w, heads, ffn, 1)
    for d in depths:
        kept_layers(d, layers)


def check_multipliers_fit(config, args) -> None:
    """The multipliers against a reused teacher's own shape (another preset than --base-model)."""
    from dist_sparse.dynabert.subnet import kept_layers, width_counts

    for w in args.width_list:
        width_counts(w, config.num_attention_heads, config.intermediate_size, 1)
    for d in args.depth_list:
        kept_layers(d, config.num_hidden_layers)


def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(MATPLOTLIB_HINT) from None


# --- launching ---------------------------------------------------------------------------------

def ensure_task(args, out_dir: Path, data: Path) -> Path:
    if args.task:
        task = Path(args.task).resolve()
        if not (task / "meta.json").is_file():
            raise ValueError(f"--task {task} is not a prepared task (no meta.json)")
    else:
        task = out_dir / "task"
        if not (task / "meta.json").is_file():
            cmd = [exe("dist-sparse"), "prepare-task", "--default-task", "--tokenizer", str(data),
                   "--output", str(task), "--seq-len", "128"]
            print("preparing the default task:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, env=launch_env(), cwd=ROOT)
    vocab = json.loads((task / "meta.json").read_text())["vocab_size"]
    data_vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    if vocab != data_vocab:
        raise ValueError(f"task {task} has a vocabulary of {vocab}, the pre-training corpus {data_vocab}: prepare it "
                         f"with --tokenizer {data}")
    return task


def launch(name: str, script: str, script_args: list[str], args, out_dir: Path, run_dir: Path, done_file: str,
           extra_key: str | None = None) -> tuple[float, list[str], bool]:
    """Run one ``deepspeed`` launch; returns (wall seconds, command, reused). A finished run is
    reused (``--reuse``) only when the command, the config's contents and ``extra_key`` (the
    initial weights' hash, for the folders this script writes) are the same."""
    port = args.master_port or free_port()
    cmd = [exe("deepspeed"), "--num_gpus", str(args.num_gpus), "--master_port", str(port),
           str(ROOT / "launchers" / script)] + script_args + ["--no-progress", "--overwrite"]
    cfg_file = Path(script_args[script_args.index("--deepspeed_config") + 1])
    key = cmd[:4] + cmd[5:] + [json.dumps(json.loads(cfg_file.read_text()), sort_keys=True), extra_key or ""]
    stamp = run_dir / "bench_command.json"
    if args.reuse and (run_dir / done_file).exists() and stamp.is_file():
        old = json.loads(stamp.read_text())
        if old.get("key") == key:
            print(f"[{name}] reusing the finished run in {run_dir}", flush=True)
            return old["wall_s"], old["command"], True
    log_path = out_dir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] {' '.join(cmd)}  (log: {log_path})", flush=True)
    if stamp.is_file():
        stamp.unlink()  # a stamp stands for the last launch that finished in run_dir
    wall = run_logged(name, cmd, log_path, port)
    stamp.write_text(json.dumps({"key": key, "command": cmd, "wall_s": wall}) + "\n")
    return wall, cmd, False


def section_config(base: dict, *, lr: float | None = None, distillation: dict | None = None,
                   dynabert: dict | None = None, eval_batches: int | None = None) -> dict:
    """``base`` with this run's sections: the benchmark's own replace any the file had."""
    cfg = copy.deepcopy(base)
    for key in ("sparsity", "structured_pruning", "distillation", "dynabert"):
        cfg.pop(key, None)
    if lr:
        cfg.setdefault("optimizer", {}).setdefault("params", {})["lr"] = lr
    if eval_batches is not None:
        cfg.setdefault("training", {})["eval_batches"] = eval_batches
    if distillation is not None:
        cfg["distillation"] = distillation
    if dynabert is not None:
        cfg["dynabert"] = dynabert
    return cfg


# --- FLOPs -------------------------------------------------------------------------------------

def subnet_config(config, width: float, depth: float):
    """The config of standalone sub-network (width, depth) of ``config``'s model (what
    ``subnetwork_state_dict`` returns, without weights): the kept layers, each with the kept heads
    and FFN neurons. Width 1.0 at depth ``d``: what a gated DynaBERT pass computes."""
    from dist_sparse.dynabert.subnet import kept_layers, width_counts
    from dist_sparse.model.config import DistSparseBertConfig

    n = len(kept_layers(depth, config.num_hidden_layers))
    H, inter = config.num_attention_heads, config.intermediate_size
    heads, neurons = width_counts(width, H, inter, config.unit_order_tp or 1)
    data = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        data.pop(key, None)
    uniform = heads == H and neurons == inter
    data.update(num_hidden_layers=n, unit_order_tp=None,
                layer_num_heads=None if uniform else [heads] * n,
                layer_intermediate_sizes=None if uniform else [neurons] * n)
    return DistSparseBertConfig(**data)


def finetune_flops(shapes: list[list[tuple[int, int]]], pass_configs: list, teacher_config, num_labels: int) -> dict:
    """Training FLOPs of a fine-tuning run: per micro batch (size, padded length) 3 x the forward of
    every pass, and one teacher forward (None: no teacher)."""
    student = teacher = 0.0
    tokens = 0
    for step in shapes:
        for b, length in step:
            n = b * length
            tokens += n
            student += 3 * n * sum(classifier_forward_per_token(c, length, num_labels) for c in pass_configs)
            if teacher_config is not None:
                teacher += n * classifier_forward_per_token(teacher_config, length, num_labels)
    return {"student_tflops": student / 1e12, "teacher_forward_tflops": teacher / 1e12, "padded_tokens": tokens}


def pretrain_flops(tokens: int, seq_len: int, pass_configs: list, teacher_config) -> dict:
    """Training FLOPs of a pre-training run over ``tokens`` packed tokens (as above, MLM head on
    every position)."""
    from dist_sparse.model.presets import dense_flops_per_token

    student = 3 * tokens * sum(dense_flops_per_token(c, seq_len) for c in pass_configs)
    teacher = tokens * dense_flops_per_token(teacher_config, seq_len) if teacher_config is not None else 0.0
    return {"student_tflops": student / 1e12, "teacher_forward_tflops": teacher / 1e12, "padded_tokens": tokens}


def run_flops(kind: str, cells: list[tuple[float, float]], config, teacher_config, *, gated: bool, shapes=None,
              num_labels: int = 2, tokens: int = 0, seq_len: int = 128) -> dict:
    """Training FLOPs of a run whose step runs the passes ``cells`` of ``config``'s model, counted
    as computed and as they would be with the weights sliced. ``gated``: a DynaBERT run, whose pass
    of width m computes every unit of the layers it runs; else each cell is a model of its own size
    (an alone run: computed = sliced). ``kind`` is "finetune" or "pretrain"."""
    sliced = [subnet_config(config, w, d) for w, d in cells]
    computed = [subnet_config(config, 1.0, d) for _, d in cells] if gated else sliced

    def count(configs):
        if kind == "finetune":
            return finetune_flops(shapes, configs, teacher_config, num_labels)
        return pretrain_flops(tokens, seq_len, configs, teacher_config)

    a, b = count(computed), count(sliced)
    return {"student_tflops": a["student_tflops"], "student_tflops_sliced": b["student_tflops"],
            "teacher_forward_tflops": a["teacher_forward_tflops"],
            "total_tflops": a["student_tflops"] + a["teacher_forward_tflops"],
            "padded_tokens": a["padded_tokens"], "passes_per_step": len(cells)}


# --- the runs ----------------------------------------------------------------------------------

def run_summary(name: str, run_dir: Path, wall: float, cmd: list[str], reused: bool, cfg_path: Path | None,
                steps: int, **extra) -> dict:
    rows = read_metrics(run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    return {"name": name, "run_dir": str(run_dir), "steps": steps, "wall_s": wall,
            "train_loop_s": train_loop_seconds(rows, meta["global_batch"]), "global_batch": meta["global_batch"],
            "micro_batch": meta["micro_batch"], "gradient_accumulation": meta["gradient_accumulation"],
            "dp_size": meta["dp_size"], "command": " ".join(cmd), "config": str(cfg_path) if cfg_path else None,
            "reused": reused, "loadavg_1m_after": loadavg_1m(), **extra}


def final_eval(run_dir: Path, split: str = "eval") -> dict | None:
    """The last ``split`` row of a pre-training run's metrics (without split and step)."""
    rows = [r for r in read_metrics(run_dir) if r["split"] == split]
    if not rows:
        return None
    return {k: v for k, v in rows[-1].items() if k not in ("split", "step")}


def pretrain_base(args, data: Path, out_dir: Path, base_pt_cfg: dict) -> dict:
    from dist_sparse.model.presets import build_config

    if args.pretrained:
        run_dir = Path(args.pretrained).resolve()
        if not (run_dir / "run.json").is_file():
            raise ValueError(f"--pretrained {run_dir} is not a dist_sparse pre-training run (no run.json)")
        meta = json.loads((run_dir / "run.json").read_text())
        print(f"[pt_base] using the pre-trained base {run_dir}", flush=True)
        return {"name": "pt_base", "run_dir": str(run_dir), "steps": meta.get("max_steps"), "external": True,
                "eval": final_eval(run_dir), "wall_s": None, "total_tflops": None, "model": meta.get("model")}
    run_dir = out_dir / "pretrain" / "base"
    # evaluated like the DynaBERT pre-training runs: the whole held-out split once
    cfg_path = write_config(out_dir, "pt_base", section_config(
        base_pt_cfg, eval_batches=pt_eval_batches(data, base_pt_cfg, args.num_gpus)))
    wall, cmd, reused = launch("pt_base", "pretrain.py",
                               ["--deepspeed_config", str(cfg_path), "--data", str(data), "--model", args.base_model,
                                "--output", str(run_dir), "--max-steps", str(args.pretrain_steps),
                                "--seed", str(args.pretrain_seed), "--eval-interval", "0", "--save-interval", "0"],
                               args, out_dir, run_dir, "checkpoints/latest")
    res = run_summary("pt_base", run_dir, wall, cmd, reused, cfg_path, args.pretrain_steps, model=args.base_model,
                      external=False, eval=final_eval(run_dir))
    meta = json.loads((run_dir / "run.json").read_text())
    dm = meta["data_meta"]
    cfg = build_config(args.base_model, vocab_size=dm["vocab_size"], max_position_embeddings=max(512, dm["seq_len"]),
                       pad_token_id=dm["special_ids"]["[PAD]"])
    res.update(run_flops("pretrain", [FULL], cfg, None, gated=False,
                         tokens=meta["global_batch"] * dm["seq_len"] * args.pretrain_steps, seq_len=dm["seq_len"]))
    print(f"[pt_base] {args.base_model}: held-out MLM loss {res['eval']['mlm_loss']:.4f}, {wall:.0f} s", flush=True)
    return res


def eval_results(run_dir: Path) -> dict:
    ev = json.loads((run_dir / "eval_results.json").read_text())
    subs = ev.pop("subnetworks", {})
    main = {k: v for k, v in ev.items() if k not in ("split", "step", "teacher_sha256")}
    return {"full": main, "subnetworks": subs}


def finetune_teacher(args, task: Path, base_dir: Path | None, out_dir: Path, base_ft_cfg: dict,
                     shapes: BatchShapes) -> dict:
    """The dense teacher's run record (its training FLOPs are added once its config is read)."""
    if args.teacher:
        run_dir = Path(args.teacher).resolve()
        if not (run_dir / "eval_results.json").is_file():
            raise ValueError(f"--teacher {run_dir} is not a finished fine-tuning run (no eval_results.json)")
        meta = json.loads((run_dir / "run.json").read_text())
        print(f"[teacher] using the fine-tuned teacher {run_dir}", flush=True)
        return {"name": "teacher", "run_dir": str(run_dir), "steps": meta.get("max_steps"), "external": True,
                "eval": eval_results(run_dir)["full"], "wall_s": None, "total_tflops": None}
    run_dir = out_dir / "finetune" / "teacher"
    cfg_path = write_config(out_dir, "teacher", section_config(base_ft_cfg, lr=args.lr))
    wall, cmd, reused = launch("teacher", "finetune.py",
                               ["--deepspeed_config", str(cfg_path), "--task", str(task), "--init", str(base_dir),
                                "--output", str(run_dir), "--max-steps", str(args.teacher_steps), "--seed",
                                str(args.seed), "--eval-interval", "0", "--save-interval", "0"],
                               args, out_dir, run_dir, "eval_results.json")
    res = run_summary("teacher", run_dir, wall, cmd, reused, cfg_path, args.teacher_steps, external=False,
                      eval=eval_results(run_dir)["full"])
    metric = shapes.meta.get("metric", "accuracy")
    print(f"[teacher] {metric} {res['eval'].get(metric, float('nan')):.4f}, {wall:.0f} s", flush=True)
    return res


def dynabert_section(phase: int, widths: list[float], depths: list[float], importance_batches: int) -> dict:
    section = {"phase": phase, "width_mult": sorted(widths), "depth_mult": sorted(depths) if phase == 2 else [1.0],
               "subnetworks": "all"}
    if phase == 1:
        section["importance_batches"] = importance_batches
    return section


def finetune_phase(phase: int, args, task: Path, init: Path, teacher: Path, out_dir: Path, base_ft_cfg: dict,
                   shapes: BatchShapes, teacher_config) -> dict:
    """One DynaBERT phase in fine-tuning (``teacher_config``: the teacher's model, the student's
    shape too)."""
    name = f"ft_phase{phase}"
    run_dir = out_dir / "finetune" / f"dynabert_phase{phase}"
    cfg = section_config(base_ft_cfg, lr=args.lr, distillation={"teacher": str(teacher), **DISTILL},
                         dynabert=dynabert_section(phase, args.width_list, args.depth_list, args.importance_batches))
    cfg_path = write_config(out_dir, name, cfg)
    wall, cmd, reused = launch(name, "finetune.py",
                               ["--deepspeed_config", str(cfg_path), "--task", str(task), "--init", str(init),
                                "--output", str(run_dir), "--max-steps", str(args.phase_steps), "--seed",
                                str(args.seed), "--eval-interval", "0", "--save-interval", "0"],
                               args, out_dir, run_dir, "eval_results.json")
    res = run_summary(name, run_dir, wall, cmd, reused, cfg_path, args.phase_steps, phase=phase,
                      eval=eval_results(run_dir))
    cells = grid(args.width_list, args.depth_list if phase == 2 else [1.0])
    res.update(run_flops("finetune", cells, teacher_config, teacher_config, gated=True,
                         num_labels=shapes.meta["num_labels"],
                         shapes=shapes.steps(args.seed, res["micro_batch"], res["dp_size"],
                                             res["gradient_accumulation"], args.phase_steps)))
    metric = shapes.meta.get("metric", "accuracy")
    print(f"[{name}] full {metric} {res['eval']['full'].get(metric, float('nan')):.4f}; "
          + ", ".join(f"{k} {v.get(metric, float('nan')):.4f}" for k, v in res["eval"]["subnetworks"].items())
          + f"; {wall:.0f} s", flush=True)
    return res


def rewired(initial, rewiring_file: Path):
    """(state dict, config) of ``initial`` rewired as the DynaBERT phase-1 run recorded in
    ``rewiring_file`` did it: the weights that run started from."""
    from dist_sparse.structure import reorder_units

    rec = json.loads(rewiring_file.read_text())
    sd = reorder_units(initial.state_dict, rec["head_orders"], rec["neuron_orders"], initial.config.head_dim)
    config = type(initial.config).from_dict(initial.config.to_dict())
    config.unit_order_tp = rec["unit_order_tp"]
    return sd, config


def write_subnetwork(sd: dict, config, width: float, depth: float, folder: Path, tokenizer_dir: Path | None,
                     classifier: bool) -> str:
    """Sub-network (width, depth) of the rewired ``sd`` saved as a compact folder (``--init`` of
    finetune.py / pretrain.py); returns the sha256 of its weights."""
    from dist_sparse.dynabert.subnet import subnetwork_state_dict
    from dist_sparse.export.hf import trained_model
    from dist_sparse.export.remote_code import save_compact
    from dist_sparse.train.initial import TASK_ARCHITECTURE

    sub, cfg = subnetwork_state_dict(sd, config, width, depth)
    cfg.architectures = [TASK_ARCHITECTURE] if classifier else None
    model = trained_model(sub, cfg)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_compact(model, tmp)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def finetune_alone(cell: tuple[float, float], args, task: Path, teacher_dir: Path, out_dir: Path, base_ft_cfg: dict,
                   shapes: BatchShapes, teacher_initial, rewired_sd: dict, rewired_cfg) -> dict:
    from dist_sparse.dynabert.subnet import kept_layers

    w, d = cell
    sub = subnet_name(w, d)
    name = f"ft_alone_{sub}"
    init = out_dir / "finetune" / "alone_init" / sub
    digest = write_subnetwork(rewired_sd, rewired_cfg, w, d, init, teacher_initial.tokenizer_dir, classifier=True)
    run_dir = out_dir / "finetune" / "alone" / sub
    steps = 2 * args.phase_steps
    layer_map = kept_layers(d, rewired_cfg.num_hidden_layers)
    cfg = section_config(base_ft_cfg, lr=args.lr,
                         distillation={"teacher": str(teacher_dir), **DISTILL, "layer_map": layer_map})
    cfg_path = write_config(out_dir, name, cfg)
    wall, cmd, reused = launch(name, "finetune.py",
                               ["--deepspeed_config", str(cfg_path), "--task", str(task), "--init", str(init),
                                "--output", str(run_dir), "--max-steps", str(steps), "--seed", str(args.seed),
                                "--eval-interval", "0", "--save-interval", "0"],
                               args, out_dir, run_dir, "eval_results.json", extra_key=digest)
    res = run_summary(name, run_dir, wall, cmd, reused, cfg_path, steps, cell=[w, d], init=str(init),
                      init_sha256=digest, eval=eval_results(run_dir)["full"])
    res.update(run_flops("finetune", [cell], rewired_cfg, teacher_initial.config, gated=False,
                         num_labels=shapes.meta["num_labels"],
                         shapes=shapes.steps(args.seed, res["micro_batch"], res["dp_size"],
                                             res["gradient_accumulation"], steps)))
    if not args.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    metric = shapes.meta.get("metric", "accuracy")
    print(f"[{name}] {metric} {res['eval'].get(metric, float('nan')):.4f}, {wall:.0f} s", flush=True)
    return res


def pt_eval_batches(data: Path, pt_cfg: dict, num_gpus: int) -> int:
    """Evaluation batches per rank that cover the held-out split once (rank r takes every
    num_gpus-th micro batch)."""
    n = json.loads((data / "meta.json").read_text())["num_eval"]
    micro = pt_cfg.get("train_micro_batch_size_per_gpu", 8)
    return max(1, math.ceil(n / (micro * num_gpus)))


def pretrain_run(name: str, run_dir: Path, init_path: Path, cells: list[tuple[float, float]], args, data: Path,
                 out_dir: Path, cfg: dict, steps: int, flops_config, teacher_config, *, gated: bool,
                 extra_key: str | None = None, **extra) -> dict:
    cfg_path = write_config(out_dir, name, cfg)
    wall, cmd, reused = launch(name, "pretrain.py",
                               ["--deepspeed_config", str(cfg_path), "--data", str(data), "--init", str(init_path),
                                "--output", str(run_dir), "--max-steps", str(steps), "--seed", str(args.pretrain_seed),
                                "--eval-interval", "0", "--save-interval", "0"],
                               # metrics.jsonl: the alone runs' checkpoints are deleted once read
                               args, out_dir, run_dir, "metrics.jsonl", extra_key=extra_key)
    res = run_summary(name, run_dir, wall, cmd, reused, cfg_path, steps, eval=final_eval(run_dir), **extra)
    res["subnetworks"] = {subnet_name(w, d): final_eval(run_dir, f"eval_{subnet_name(w, d)}")
                          for w, d in cells if (w, d) != FULL} if len(cells) > 1 else {}
    meta = json.loads((run_dir / "run.json").read_text())
    seq = meta["data_meta"]["seq_len"]
    res.update(run_flops("pretrain", cells, flops_config, teacher_config, gated=gated,
                         tokens=meta["global_batch"] * seq * steps, seq_len=seq))
    print(f"[{name}] held-out MLM loss {res['eval']['mlm_loss']:.4f}"
          + "".join(f", {k} {v['mlm_loss']:.4f}" for k, v in res["subnetworks"].items() if v) + f"; {wall:.0f} s",
          flush=True)
    return res


def pretraining_variant(args, data: Path, base: dict, out_dir: Path, base_pt_cfg: dict) -> dict:
    from dist_sparse.dynabert.subnet import kept_layers
    from dist_sparse.train.initial import load_initial

    base_dir = Path(base["run_dir"])
    base_init = load_initial(base_dir)
    base_cfg = base_init.config
    eval_batches = pt_eval_batches(data, base_pt_cfg, args.num_gpus)
    phase_cells = {1: grid(args.width_list, [1.0]), 2: args.cells}
    runs = {}
    init, teacher = base_dir, base_dir
    for phase in (1, 2):
        name = f"pt_phase{phase}"
        cfg = section_config(base_pt_cfg, eval_batches=eval_batches, distillation={"teacher": str(teacher), **DISTILL},
                             dynabert=dynabert_section(phase, args.width_list, args.depth_list,
                                                       args.importance_batches))
        run_dir = out_dir / "pretrain" / f"dynabert_phase{phase}"
        runs[name] = pretrain_run(name, run_dir, init, phase_cells[phase], args, data, out_dir, cfg,
                                  args.pt_phase_steps, base_cfg, base_cfg, gated=True, phase=phase)
        init = teacher = run_dir
    alone = {}
    if args.pt_alone_cells:
        sd, cfg_rewired = rewired(base_init, out_dir / "pretrain" / "dynabert_phase1" / "dynabert_rewiring.json")
        for w, d in args.pt_alone_cells:
            sub = subnet_name(w, d)
            folder = out_dir / "pretrain" / "alone_init" / sub
            digest = write_subnetwork(sd, cfg_rewired, w, d, folder, base_init.tokenizer_dir, classifier=False)
            cfg = section_config(base_pt_cfg, eval_batches=eval_batches,
                                 distillation={"teacher": str(base_dir), **DISTILL,
                                               "layer_map": kept_layers(d, base_cfg.num_hidden_layers)})
            run_dir = out_dir / "pretrain" / "alone" / sub
            res = pretrain_run(f"pt_alone_{sub}", run_dir, folder, [(w, d)], args, data, out_dir, cfg,
                               2 * args.pt_phase_steps, cfg_rewired, base_cfg, gated=False, extra_key=digest, cell=[w, d],
                               init=str(folder), init_sha256=digest)
            if not args.keep_checkpoints:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            alone[sub] = res
    return {"runs": runs, "alone": alone, "eval_batches": eval_batches, "base_config": base_cfg.to_dict()}


# --- inference throughput ----------------------------------------------------------------------

def fixed_batches(task: Path, batch: int, seq_len: int, pool: int) -> list[dict]:
    """``pool`` batches of the validation split's first examples, each right-padded (or cut) to
    exactly ``seq_len``: the same shapes for every timed forward."""
    import torch

    from dist_sparse.data.task import load_task

    datasets, meta = load_task(str(task))
    val = datasets["validation"]
    pad = meta["special_ids"]["[PAD]"]
    out = []
    for p in range(pool):
        ids = torch.full((batch, seq_len), pad, dtype=torch.long)
        types = torch.zeros((batch, seq_len), dtype=torch.long)
        mask = torch.zeros((batch, seq_len), dtype=torch.long)
        for row in range(batch):
            ex = val[(p * batch + row) % len(val)]
            n = min(len(ex["input_ids"]), seq_len)
            ids[row, :n] = torch.as_tensor(ex["input_ids"][:n])
            types[row, :n] = torch.as_tensor(ex["token_type_ids"][:n])
            mask[row, :n] = 1
        out.append({"input_ids": ids, "token_type_ids": types, "attention_mask": mask})
    return out


def time_subnetworks(phase2_dir: Path, task: Path, args) -> dict:
    """Standalone sub-networks of the final phase-2 model timed side by side (see the docstring)."""
    import contextlib

    import torch

    from dist_sparse.config import DynaBertConfig
    from dist_sparse.dynabert.subnet import subnetwork_state_dict
    from dist_sparse.export.hf import trained_model
    from dist_sparse.train.dynabert import DynaBertComponent
    from dist_sparse.train.initial import TASK_ARCHITECTURE, load_initial

    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and on_gpu)

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    init = load_initial(phase2_dir)
    num_labels = init.config.num_labels
    gated = trained_model(init.state_dict, init.config)
    component = DynaBertComponent(DynaBertConfig(phase=2, width_mult=sorted(args.width_list),
                                                 depth_mult=sorted(args.depth_list)),
                                  init.config, seed=0, tp_rank=0, tp_size=1)
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in fixed_batches(task, args.infer_batch, args.infer_seq_len, DATA_POOL)]
    gated.to(device)
    models, info = {}, {}
    for w, d in args.cells:
        name = subnet_name(w, d)
        sd, cfg = subnetwork_state_dict(init.state_dict, init.config, w, d)
        cfg.architectures = [TASK_ARCHITECTURE]
        model = trained_model(sd, cfg).to(device)
        with torch.no_grad():
            mine = model(**batches[0]).logits.float()
            with component.subnetwork(gated, w, d):
                ref = gated(**batches[0]).logits.float()
        diff, scale = float((mine - ref).abs().max()), max(float(ref.abs().max()), 1.0)
        if diff > 1e-4 * scale:
            raise RuntimeError(f"the standalone sub-network {name} differs from the trained model's gated pass by "
                               f"{diff:.3g} (of {scale:.3g}): the timed model would not be the trained one")
        models[name] = model
        info[name] = {"params": sum(v.numel() for v in sd.values()),
                      "encoder_params": sum(v.numel() for k, v in sd.items() if k.startswith("bert.encoder.")),
                      "max_abs_logit_diff_vs_gated": diff,
                      "flops_per_token": classifier_forward_per_token(cfg, args.infer_seq_len, num_labels),
                      "layers": cfg.num_hidden_layers, "heads": cfg.heads_of(0), "ffn": cfg.intermediate_of(0)}
    del gated
    full_name = subnet_name(*FULL)
    cursor = dict.fromkeys(models, 0)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def forward(v: str) -> None:
        batch = batches[cursor[v] % len(batches)]
        cursor[v] += 1
        with torch.no_grad(), autocast():
            models[v](**batch)

    for v in models:
        for _ in range(args.warmup):
            forward(v)
    variants = list(models)
    records, wall, loads = interleaved(variants, args.rounds, args.steps_per_round,
                                       lambda v, r: {"v": v, "round": r, "s": timed(lambda: forward(v), sync)[0]})
    per_round = {v: [sum(x["s"] for x in records if x["v"] == v and x["round"] == r) for r in range(args.rounds)]
                 for v in variants}
    out = {}
    for v in variants:
        times = [x["s"] for x in records if x["v"] == v]
        speed = [f / s for f, s in zip(per_round[full_name], per_round[v])]
        out[v] = {**info[v], "forward_s": stats(times),
                  "sequences_per_s": args.infer_batch / statistics.median(times),
                  "speedup_round_median": statistics.median(speed),
                  "speedup_means": sum(per_round[full_name]) / sum(per_round[v]),
                  "speedup_means_ci95": bootstrap_ratio_ci(per_round[full_name], per_round[v]),
                  "flop_ideal_speedup": info[full_name]["flops_per_token"] / info[v]["flops_per_token"]}
    return {"device": args.device, "device_name": torch.cuda.get_device_name() if on_gpu else cpu_model(),
            "precision": "bf16" if bf16 else "fp32", "threads": torch.get_num_threads(), "batch": args.infer_batch,
            "seq_len": args.infer_seq_len, "rounds": args.rounds, "steps_per_round": args.steps_per_round,
            "warmup": args.warmup, "timed_wall_s": wall, "loadavg_1m_before_after": loads, "subnetworks": out}


# --- rows and tables (pure) --------------------------------------------------------------------

def finetune_rows(cells: list[tuple[float, float]], phase1: dict | None, phase2: dict, alone: dict[str, dict],
                  timing: dict | None, metric: str) -> list[dict]:
    """One row per sub-network: its metrics after phase 1 (width-only ones), after phase 2 and
    trained alone, its shape, FLOPs and timing. ``phase1``/``phase2``: a phase's ``eval`` record
    ({"full": metrics, "subnetworks": {name: metrics}}); ``alone``: by name, the alone run record."""
    rows = []
    for w, d in cells:
        name = subnet_name(w, d)

        def of(ev):
            if ev is None:
                return None
            return ev["full"] if (w, d) == FULL else ev["subnetworks"].get(name)

        p1, p2 = of(phase1), of(phase2)
        a = alone.get(name)
        t = (timing or {}).get("subnetworks", {}).get(name)
        row = {"name": name, "width": w, "depth": d, "phase1": p1, "phase2": p2,
               "alone": a["eval"] if a else None, "alone_total_tflops": a["total_tflops"] if a else None,
               "metric": metric,
               "primary_phase1": p1.get(metric) if p1 else None, "primary_phase2": p2.get(metric) if p2 else None,
               "primary_alone": a["eval"].get(metric) if a else None, "timing": t}
        row["dynabert_minus_alone"] = (row["primary_phase2"] - row["primary_alone"]
                                       if row["primary_phase2"] is not None and row["primary_alone"] is not None
                                       else None)
        rows.append(row)
    return rows


def pretrain_rows(cells: list[tuple[float, float]], phase1: dict | None, phase2: dict | None,
                  alone: dict[str, dict], flops_per_token: dict[str, float]) -> list[dict]:
    """As finetune_rows, for pre-training: the held-out MLM loss of each sub-network."""
    rows = []
    for w, d in cells:
        name = subnet_name(w, d)

        def loss(run):
            if run is None:
                return None
            ev = run["eval"] if (w, d) == FULL else run["subnetworks"].get(name)
            return ev["mlm_loss"] if ev else None

        a = alone.get(name)
        row = {"name": name, "width": w, "depth": d, "mlm_loss_phase1": loss(phase1), "mlm_loss_phase2": loss(phase2),
               "mlm_loss_alone": a["eval"]["mlm_loss"] if a else None,
               "alone_total_tflops": a["total_tflops"] if a else None,
               "flops_per_token": flops_per_token.get(name)}
        row["dynabert_minus_alone"] = (row["mlm_loss_phase2"] - row["mlm_loss_alone"]
                                       if row["mlm_loss_phase2"] is not None and row["mlm_loss_alone"] is not None
                                       else None)
        rows.append(row)
    return rows


def _f(x, fmt: str = ".4f", none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def _signed(x) -> str:
    return "-" if x is None else f"{x:+.4f}"


def format_tables(result: dict) -> str:
    metric = result["metric"]
    timing = result.get("timing")
    gpu = bool(timing) and timing["device"] == "cuda"
    lines = []
    ft = result["finetune_rows"]
    if ft:
        teacher = result["teacher"]
        lines += [f"Fine-tuning, task `{result['task_name']}` (validation {metric}; DynaBERT {result['phase_steps']} "
                  f"steps per phase, alone {2 * result['phase_steps']} steps; teacher: {metric} "
                  f"{_f(teacher['eval'].get(metric))} after {teacher['steps']} steps):", ""]
        head = (f"| sub-network | layers | heads / FFN per layer | params "
                f"| fwd MFLOPs/token (seq {result['infer_seq_len']}) "
                f"| {metric} after phase 1 | **{metric} DynaBERT** (phase 2) | {metric} alone | DynaBERT - alone "
                f"| speedup vs full: median of rounds | means [95% CI] | FLOP-ideal |")
        if gpu:
            head += " sequences/s |"
        lines += [head, "|---" * (12 + gpu) + "|"]
        for r in ft:
            t = r["timing"] or {}
            ci = t.get("speedup_means_ci95") or [None, None]
            shape = f"{t['heads']} / {t['ffn']}" if t else "-"
            params = f"{t['params'] / 1e6:.2f}M" if t else "-"
            mflops = t["flops_per_token"] / 1e6 if t else None
            line = (f"| {r['name']} | {t.get('layers', '-')} | {shape} | {params} | {_f(mflops, '.2f')} | "
                    f"{_f(r['primary_phase1'])} | **{_f(r['primary_phase2'])}** | {_f(r['primary_alone'])} | "
                    f"{_signed(r['dynabert_minus_alone'])} | {_f(t.get('speedup_round_median'), '.2f')} | "
                    f"{_f(t.get('speedup_means'), '.2f')} [{_f(ci[0], '.2f')}-{_f(ci[1], '.2f')}] | "
                    f"{_f(t.get('flop_ideal_speedup'), '.2f')} |")
            if gpu:
                line += f" {_f(t.get('sequences_per_s'), '.0f')} |"
            lines.append(line)
        if timing:
            worst = max((s["max_abs_logit_diff_vs_gated"] for s in timing["subnetworks"].values()), default=0.0)
            lines += ["", f"Timing: {timing['device_name']}, {timing['precision']}, "
                          f"{timing['threads']} thread(s), batch {timing['batch']} x seq {timing['seq_len']} "
                          f"(validation examples padded), {timing['rounds']} interleaved rounds x "
                          f"{timing['steps_per_round']} forward(s), 1-min load {timing['loadavg_1m_before_after'][0]:.1f}/"
                          f"{timing['loadavg_1m_before_after'][1]:.1f}; every standalone sub-network's logits equal "
                          f"the trained model's gated pass to {worst:.1e}."
                          + ("" if gpu else " CPU: ratios only (absolute times count only from a GPU).")]
    pt = result.get("pretrain_rows") or []
    if pt:
        base = result["pretrain"]["base"] or {}
        lines += ["", f"Pre-training (held-out MLM loss over the whole held-out split; DynaBERT "
                      f"{result['pt_phase_steps']} steps per phase, alone {2 * result['pt_phase_steps']} steps; the base "
                      f"before DynaBERT, {base.get('steps')} steps: {_f((base.get('eval') or {}).get('mlm_loss'))}"
                      + (" on its own run's evaluation" if base.get("external") else ", the same evaluation")
                      + "):", "",
                  "| sub-network | fwd MFLOPs/token (MLM head included) | MLM loss after phase 1 | **MLM loss DynaBERT** "
                  "(phase 2) | MLM loss alone | DynaBERT - alone |", "|---|---|---|---|---|---|"]
        for r in pt:
            lines.append(f"| {r['name']} | {_f(r['flops_per_token'] and r['flops_per_token'] / 1e6, '.2f')} | "
                         f"{_f(r['mlm_loss_phase1'])} | **{_f(r['mlm_loss_phase2'])}** | {_f(r['mlm_loss_alone'])} | "
                         f"{_signed(r['dynabert_minus_alone'])} |")
    runs = result["runs"]
    if runs:
        lines += ["", "Runs (training FLOPs: forward + backward over the batches computed, the teacher's forward apart; "
                      "'sliced': if each pass ran only its sub-network's weights):", "",
                  "| run | steps | passes / step | student TFLOPs (as computed) | sliced | teacher fwd TFLOPs "
                  "| total TFLOPs | train loop s | wall s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            lines.append(f"| {r['name']} | {r['steps']} | {r.get('passes_per_step', '-')} | "
                         f"{_f(r.get('student_tflops'), '.3f')} | {_f(r.get('student_tflops_sliced'), '.3f')} | "
                         f"{_f(r.get('teacher_forward_tflops'), '.3f')} | {_f(r.get('total_tflops'), '.3f')} | "
                         f"{_f(r.get('train_loop_s'), '.0f')} | {_f(r.get('wall_s'), '.0f')} |")
        for prefix, label in (("ft", "Fine-tuning"), ("pt", "Pre-training")):
            dyn = [r for r in runs if r["name"] in (f"{prefix}_phase1", f"{prefix}_phase2")]
            alone = [r for r in runs if r["name"].startswith(f"{prefix}_alone_")]
            if dyn:
                lines += ["", f"{label}: DynaBERT's two phases {sum(r['total_tflops'] for r in dyn):.2f} TFLOPs as "
                              f"computed ({sum(r['student_tflops_sliced'] + r['teacher_forward_tflops'] for r in dyn):.2f} "
                              f"sliced) for all {len(result['cells'])} sub-networks; "
                              + (f"the {len(alone)} alone run{'s' if len(alone) > 1 else ''} "
                                 f"{sum(r['total_tflops'] for r in alone):.2f} TFLOPs."
                                 if alone else "no alone runs.")]
    return "\n".join(lines)


# --- plot --------------------------------------------------------------------------------------

def make_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    panels = [("finetune", result["finetune_rows"]), ("pretrain", result.get("pretrain_rows") or [])]
    panels = [(k, rows) for k, rows in panels if rows]
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 4.8 * len(panels)), squeeze=False)
    colors = {d: c for d, c in zip(sorted({r["depth"] for _, rows in panels for r in rows}, reverse=True),
                                   ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"])}
    runs = {r["name"]: r for r in result["runs"]}
    for i, (kind, rows) in enumerate(panels):
        prefix = "ft" if kind == "finetune" else "pt"
        if kind == "finetune":
            ykey = {"dyn": "primary_phase2", "p1": "primary_phase1", "alone": "primary_alone"}
            ylabel = f"validation {result['metric']}"
            fpt = {r["name"]: (r["timing"] or {}).get("flops_per_token") for r in rows}
        else:
            ykey = {"dyn": "mlm_loss_phase2", "p1": "mlm_loss_phase1", "alone": "mlm_loss_alone"}
            ylabel = "held-out MLM loss (lower is better)"
            fpt = {r["name"]: r["flops_per_token"] for r in rows}
        dyn_tflops = sum(runs[n]["total_tflops"] for n in (f"{prefix}_phase1", f"{prefix}_phase2") if n in runs)
        ax_inf, ax_train = axes[i]
        for d, color in colors.items():
            pts = sorted((fpt[r["name"]] / 1e6, r[ykey["dyn"]]) for r in rows
                         if r["depth"] == d and r[ykey["dyn"]] is not None and fpt[r["name"]])
            if pts:
                ax_inf.plot(*zip(*pts), marker="o", color=color, label=f"DynaBERT, depth {d:g}")
                ax_train.plot([dyn_tflops] * len(pts), [p[1] for p in pts], marker="o", ls="", color=color,
                              label=f"DynaBERT, depth {d:g} (both phases, all sub-networks)")
            alone = sorted((fpt[r["name"]] / 1e6, r[ykey["alone"]], r["alone_total_tflops"]) for r in rows
                           if r["depth"] == d and r[ykey["alone"]] is not None and fpt[r["name"]])
            if alone:
                ax_inf.plot([a[0] for a in alone], [a[1] for a in alone], marker="s", mfc="none", ls="--",
                            color=color, label=f"alone, depth {d:g}")
                ax_train.plot([a[2] for a in alone], [a[1] for a in alone], marker="s", mfc="none", ls="",
                              color=color, label=f"alone, depth {d:g}")
        p1 = sorted((fpt[r["name"]] / 1e6, r[ykey["p1"]]) for r in rows if r[ykey["p1"]] is not None and fpt[r["name"]])
        if p1:
            ax_inf.plot(*zip(*p1), marker="^", ls=":", color="gray", label="after phase 1 (width only)")
        for r in rows:
            if r[ykey["dyn"]] is not None and fpt[r["name"]]:
                ax_inf.annotate(r["name"], (fpt[r["name"]] / 1e6, r[ykey["dyn"]]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7)
        ax_inf.set_xlabel("inference forward MFLOPs per token (log)")
        ax_train.set_xlabel("training TFLOPs to get the model(s), teacher forward included (log)")
        for ax in (ax_inf, ax_train):
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
            ax.tick_params(axis="x", which="minor", labelsize=7)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        what = (f"fine-tuning, task {result['task_name']}, {result['phase_steps']} steps per phase"
                if kind == "finetune" else f"pre-training, {result['pt_phase_steps']} steps per phase")
        ax_inf.set_title(f"{result['base_model']} DynaBERT vs alone: {what}", fontsize=9)
        ax_train.set_title("same models vs training FLOPs (base and teacher training not counted)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- RESULTS.md --------------------------------------------------------------------------------

def machine_line(result: dict) -> str:
    m = result["machine"]
    ranks = (f"{result['num_ranks']} GPU ranks" if m.get("gpu") else
             f"gloo, fp32, {result['num_ranks']} ranks with one OpenMP thread each")
    return (f"{m['cpu']}, {m['cpu_count']} cores, {m.get('gpu') or 'no GPU'}; Python {m['python']}, torch {m['torch']}, "
            f"deepspeed {m['deepspeed']}, transformers {m['transformers']}; {ranks}")


def generated_block(result: dict) -> str:
    g = result["git"]
    loads = [r["loadavg_1m_after"] for r in result["runs"] if r.get("loadavg_1m_after") is not None]
    lines = [BLOCK_START,
             f"- Machine: {machine_line(result)}.",
             f"- Date: {result['started_utc']} to {result['finished_utc']} (UTC); {result['wall_s'] / 60:.1f} min in all."
             + (f" 1-minute load average after the runs: {min(loads):.1f}-{max(loads):.1f}." if loads else ""),
             f"- Code: commit `{(g['commit'] or 'unknown')[:7]}`, dist_sparse/ "
             f"{'modified' if g['dist_sparse_modified'] else 'unmodified'}.",
             f"- Command: `{result['command']}`",
             f"- Base: {result['base_model']} pre-trained {(result['pretrain']['base'] or {}).get('steps')} steps "
             f"(`{Path(result['pretrain_config']).name}`); teacher: fine-tuned dense {result['teacher']['steps']} steps. "
             f"Fine-tuning runs: `{Path(result['finetune_config']).name}` at peak lr {result['lr']}, seed {result['seed']}; "
             f"widths {', '.join(f'{w:g}' for w in sorted(result['widths']))}, "
             f"depths {', '.join(f'{d:g}' for d in sorted(result['depths']))}; "
             "DynaBERT distils logits and hidden states (1, 1, temperature 1, no hard loss), phase 1 from the teacher, "
             "phase 2 from phase 1; alone: the sub-network cut from the teacher rewired by phase 1's importance, "
             "fine-tuned by itself for both phases' steps with the same distillation from the teacher.",
             (f"- Pre-training: DynaBERT `pretrain.py --init` the base, `{Path(result['pretrain_config']).name}`, seed "
              f"{result['pretrain_seed']}, {result['pt_phase_steps']} steps per phase, MLM distillation (logits and "
              f"hidden, 1 and 1) from the base, then from phase 1; held-out MLM loss over the whole held-out split "
              f"({result['pretrain'].get('eval_batches')} micro batches per rank); alone: cut from the base rewired by "
              "pre-training phase 1's importance, pre-trained by itself for both phases' steps with the same "
              "distillation from the base." if result.get("pretrain_rows") else "- Pre-training: not run."),
             "",
             format_tables(result),
             BLOCK_END]
    return "\n".join(lines)


def update_results_md(path: Path, block: str) -> None:
    """Replace the generated block; a file without it gets the section, the block and a Reading
    placeholder appended."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    if BLOCK_START in text and BLOCK_END in text:
        head, rest = text.split(BLOCK_START, 1)
        _, tail = rest.split(BLOCK_END, 1)
        text = head + block + tail
    else:
        text = (text.rstrip("\n") + f"\n\n{SECTION_TITLE} (benchmarks/dynabert_grid.py)\n\n" + block
                + "\n\n### Reading\n\n(to be written)\n")
    path.write_text(text)


# --- the estimate of a full run ----------------------------------------------------------------

def pass_equivalents(kind: str, config, cells: list[tuple[float, float]], *, gated: bool, teacher: bool,
                     seq_len: int = 128, num_labels: int = 2) -> float:
    """A step's computed training FLOPs over one training pass of the full model: the passes of
    ``cells`` (gated: at full width) plus a third for a teacher's forward."""
    from dist_sparse.model.presets import dense_flops_per_token

    def fwd(c):
        if kind == "finetune":
            return classifier_forward_per_token(c, seq_len, num_labels)
        return dense_flops_per_token(c, seq_len)

    unit = fwd(subnet_config(config, *FULL))
    total = sum(fwd(subnet_config(config, 1.0 if gated else w, d)) for w, d in cells) / unit
    return total + (1 / 3 if teacher else 0.0)


def fit_step_cost(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(a, b) of seconds per step = a + b x pass-equivalents, least squares over (pe, s) points
    (one distinct pe: the line through the origin)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    if var <= 1e-12:
        return 0.0, my / mx
    b = sum((x - mx) * (y - my) for x, y in points) / var
    a = my - b * mx
    if a < 0 or b < 0:  # noise on a few tiny runs: fall back to proportional
        return 0.0, sum(y for _, y in points) / sum(x for x, _ in points)
    return a, b


def estimate_seconds(result: dict, full_args, configs: dict) -> dict:
    """Wall time of a run with ``full_args``' settings, estimated from this run's own launches,
    per kind (fine-tuning, pre-training): a step costs a + b x pass-equivalents (its computed FLOPs
    over one full-model training pass; fitted over this run's launches); a launch costs this run's
    median start-up and end-of-run evaluation of a plain run, plus a DynaBERT phase's evaluation per
    sub-network evaluated and phase 1's importance batches. ``configs``: the model config of each
    kind. Rough by nature: the machine's load moves every figure."""
    # a reused run counts too: its wall time is the one measured when it ran (bench_command.json)
    runs = [r for r in result["runs"] if r.get("train_loop_s") and r.get("total_tflops") and not r.get("external")]
    ref = {"ft": "teacher", "pt": "pt_base"}
    out = {"seconds": 0.0, "launches": 0, "per_kind": {}}
    cells = grid(full_args.width_list, full_args.depth_list)
    nl = configs["num_labels"]
    for kind, label in (("ft", "finetune"), ("pt", "pretrain")):
        mine = [r for r in runs if r["name"].startswith(kind + "_") or r["name"] == ref[kind]]
        base = next((r for r in mine if r["name"] == ref[kind]), None)
        if kind == "pt" and full_args.no_pretraining:
            continue
        if not mine or base is None:
            return {"seconds": None, "why": f"no measured {label} runs of the reference ({ref[kind]}) to scale from"}
        unit = base["total_tflops"] / base["steps"]
        a, b = fit_step_cost([((r["total_tflops"] / r["steps"]) / unit, r["train_loop_s"] / r["steps"]) for r in mine])
        plain = [r["wall_s"] - r["train_loop_s"] for r in mine if "phase" not in r["name"]]
        startup = statistics.median(plain)
        per_eval = statistics.median(
            [max(r["wall_s"] - r["train_loop_s"] - startup, 0.0) / r["passes_per_step"]
             for r in mine if "phase" in r["name"]] or [0.0])
        cfg = configs[kind]
        pe = lambda cs, gated, teacher: pass_equivalents(label, cfg, cs, gated=gated, teacher=teacher,  # noqa: E731
                                                         num_labels=nl)
        phase_steps = full_args.phase_steps if kind == "ft" else full_args.pt_phase_steps
        plan = []  # (steps, pass-equivalents per step, sub-networks evaluated at the end, importance batches)
        if (kind == "ft" and not full_args.teacher) or (kind == "pt" and not full_args.pretrained):
            plan.append((full_args.teacher_steps if kind == "ft" else full_args.pretrain_steps, 1.0, 0, 0))
        widths = grid(full_args.width_list, [1.0])
        plan.append((phase_steps, pe(widths, True, True), len(widths), full_args.importance_batches))
        plan.append((phase_steps, pe(cells, True, True), len(cells), 0))
        for cell in (full_args.alone_cells if kind == "ft" else full_args.pt_alone_cells):
            plan.append((2 * phase_steps, pe([cell], False, True), 0, 0))
        seconds = sum(startup + nev * per_eval + steps * (a + b * p) + imp / full_args.num_gpus * (a + b)
                      for steps, p, nev, imp in plan)
        out["per_kind"][kind] = {"seconds": seconds, "launches": len(plan), "step_s_fixed": a, "step_s_per_pass": b,
                                 "startup_s": startup, "eval_s_per_subnetwork": per_eval}
        out["seconds"] += seconds
        out["launches"] += len(plan)
    t = result.get("timing")
    if t:
        # the timed rounds scale with variants x rounds x batch; the model builds and checks are small
        out["timing_s"] = (t["timed_wall_s"] * len(cells) / len(result["cells"]) * full_args.rounds / t["rounds"]
                           * full_args.infer_batch / t["batch"])
        out["seconds"] += out["timing_s"]
    out["seconds"] += result.get("prepare_s", 0.0)
    return out


def estimate_line(est: dict, result: dict) -> str:
    if not est.get("seconds"):
        return f"no estimate of the full run: {est.get('why')}"
    parts = [f"{'fine-tuning' if k == 'ft' else 'pre-training'} {v['seconds'] / 60:.0f} min ({v['launches']} launches; "
             f"a step {v['step_s_fixed']:.2f} s + {v['step_s_per_pass']:.2f} s per full-model pass, start-up and "
             f"evaluation {v['startup_s']:.0f} s per launch + {v['eval_s_per_subnetwork']:.0f} s per sub-network "
             f"evaluated)" for k, v in est["per_kind"].items()]
    return (f"estimated wall time of the full run (defaults) on this machine at this run's load (1-min load "
            f"{loadavg_1m():.1f}): {est['seconds'] / 60:.0f} min = " + "; ".join(parts)
            + f"; timing {est.get('timing_s', 0) / 60:.1f} min; preparing data and task {result.get('prepare_s', 0):.0f} s "
            "in this invocation (0 when they were already there). "
            f"This quick run's launches took {sum(r['wall_s'] for r in result['runs']) / 60:.1f} min"
            + (" (some reused from an earlier invocation)" if any(r.get("reused") for r in result["runs"]) else "")
            + ".")


# --- main --------------------------------------------------------------------------------------

def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    resolve_args(args)
    if not args.no_plot:
        check_matplotlib()  # before the runs, not after
    out_dir = Path(args.output_dir).resolve()
    if ROOT in (out_dir, *out_dir.parents):
        raise ValueError(f"--output-dir {out_dir} is inside the repository; put the runs elsewhere (e.g. /tmp)")
    out_dir.mkdir(parents=True, exist_ok=True)
    base_ft_cfg = json.loads(Path(args.finetune_config).read_text())
    base_pt_cfg = json.loads(Path(args.pretrain_config).read_text())
    t_start = time.perf_counter()
    started = utc_now()
    data = ensure_data(args.data, out_dir)
    task = ensure_task(args, out_dir, data)
    prepare_s = time.perf_counter() - t_start
    shapes = BatchShapes(task)
    metric = shapes.meta.get("metric", "accuracy")

    from dist_sparse.train.initial import load_initial

    base = pretrain_base(args, data, out_dir, base_pt_cfg) if (args.pretrained or not args.teacher
                                                              or not args.no_pretraining) else None
    teacher = finetune_teacher(args, task, Path(base["run_dir"]) if base else None, out_dir, base_ft_cfg, shapes)
    teacher_dir = Path(teacher["run_dir"])
    teacher_init = load_initial(teacher_dir)
    check_multipliers_fit(teacher_init.config, args)
    if not teacher.get("external"):
        teacher.update(run_flops("finetune", [FULL], teacher_init.config, None, gated=False,
                                 num_labels=shapes.meta["num_labels"],
                                 shapes=shapes.steps(args.seed, teacher["micro_batch"], teacher["dp_size"],
                                                     teacher["gradient_accumulation"], args.teacher_steps)))
    phase1 = finetune_phase(1, args, task, teacher_dir, teacher_dir, out_dir, base_ft_cfg, shapes, teacher_init.config)
    phase1_dir = Path(phase1["run_dir"])
    # phase 2's teacher is the phase-1 model: the teacher's shape
    phase2 = finetune_phase(2, args, task, phase1_dir, phase1_dir, out_dir, base_ft_cfg, shapes, teacher_init.config)
    alone_runs = {}
    if args.alone_cells:
        sd, cfg = rewired(teacher_init, phase1_dir / "dynabert_rewiring.json")
        for cell in args.alone_cells:
            res = finetune_alone(cell, args, task, teacher_dir, out_dir, base_ft_cfg, shapes, teacher_init, sd, cfg)
            alone_runs[subnet_name(*cell)] = res
    pretraining = None if args.no_pretraining else pretraining_variant(args, data, base, out_dir, base_pt_cfg)

    print("timing the sub-networks ...", flush=True)
    timing = time_subnetworks(Path(phase2["run_dir"]), task, args)

    import deepspeed
    import torch
    import transformers

    runs = [r for r in (base, teacher, phase1, phase2, *alone_runs.values()) if r is not None and not r.get("external")]
    pt_rows = []
    if pretraining is not None:
        runs += [*pretraining["runs"].values(), *pretraining["alone"].values()]
        from dist_sparse.model.presets import dense_flops_per_token

        from dist_sparse.model.config import DistSparseBertConfig

        bcfg = DistSparseBertConfig.from_dict(pretraining["base_config"])
        seq = json.loads((data / "meta.json").read_text())["seq_len"]
        fpt = {subnet_name(w, d): dense_flops_per_token(subnet_config(bcfg, w, d), seq) for w, d in args.cells}
        pt_rows = pretrain_rows(args.cells, pretraining["runs"]["pt_phase1"], pretraining["runs"]["pt_phase2"],
                                pretraining["alone"], fpt)
    result = {
        "benchmark": "dynabert_grid", "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None
        else "dynabert_grid.py " + " ".join(argv),
        "quick": args.quick, "base_model": args.base_model, "pretrain_steps": args.pretrain_steps,
        "pretrain_seed": args.pretrain_seed, "pretrain_config": args.pretrain_config,
        "finetune_config": args.finetune_config, "lr": args.lr or None, "seed": args.seed,
        "widths": args.width_list, "depths": args.depth_list, "cells": [list(c) for c in args.cells],
        "phase_steps": args.phase_steps, "pt_phase_steps": args.pt_phase_steps,
        "importance_batches": args.importance_batches, "num_ranks": args.num_gpus, "infer_seq_len": args.infer_seq_len,
        "data": str(data), "task": str(task), "prepare_s": prepare_s,
        "task_name": "default" if not args.task else Path(args.task).name,
        "metric": metric, "teacher": teacher, "pretrain": {"base": base, **(pretraining or {})},
        "finetune": {"phase1": phase1, "phase2": phase2, "alone": alone_runs},
        "finetune_rows": finetune_rows(args.cells, phase1["eval"], phase2["eval"], alone_runs, timing, metric),
        "pretrain_rows": pt_rows, "timing": timing, "runs": runs,
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "host": socket.gethostname(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "deepspeed": deepspeed.__version__, "transformers": transformers.__version__},
        "git": git_state(), "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": utc_now().isoformat(timespec="seconds"), "wall_s": time.perf_counter() - t_start,
    }
    if args.quick:
        full = build_parser().parse_args(["--output-dir", str(out_dir)] + (["--no-pretraining"] if args.no_pretraining
                                                                           else []))
        resolve_args(full)
        configs = {"ft": teacher_init.config, "num_labels": shapes.meta["num_labels"]}
        if pretraining is not None:
            configs["pt"] = bcfg
        result["estimate_full"] = estimate_seconds(result, full, configs)
    print(format_tables(result), flush=True)
    write_json(args.json_out, result)
    print(f"raw results: {args.json_out}", flush=True)
    if not args.no_plot:
        make_plot(result, Path(args.plot))
        print(f"plot: {args.plot}", flush=True)
    if args.results_md:
        update_results_md(Path(args.results_md), generated_block(result))
        print(f"table: {args.results_md}", flush=True)
    est = result.get("estimate_full")
    if est:
        print(estimate_line(est, result), flush=True)
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
