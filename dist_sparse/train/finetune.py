"""Fine-tuning on a downstream task (``launchers/finetune.py``), on the pre-training machinery.

The same Trainer, engine builder, checkpoint format, run directory rules and sparsity component
as pre-training; what differs is the data (a task written by ``dist-sparse prepare-task``), the
model (a sequence classifier started from a dist_sparse checkpoint or a Hugging Face BERT
folder), the loss (the task's, or a distillation from a frozen teacher) and the evaluation (the
task's metrics over the whole validation split).

Determinism is as in pre-training: the data order is a function of (seed, epoch), dropout draws
from generators reseeded every micro step, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from dist_sparse.config import RunConfig, load_run_config, lr_multiplier, resolve_batch_sizes
from dist_sparse.data.loader import ResumableBatchIterator
from dist_sparse.data.task import TaskCollator, load_task
from dist_sparse.distributed import comm
from dist_sparse.distributed.rng import tp_rng
from dist_sparse.distributed.topology import ParallelDims
from dist_sparse.distributed.zero import link_optimizer_state
from dist_sparse.folders import write_json_atomic
from dist_sparse.model.config import DistSparseBertConfig
from dist_sparse.train import checkpoint as ckpt
from dist_sparse.train import dynabert as dyn
from dist_sparse.train import elastic
from dist_sparse.train import extend
from dist_sparse.train import run_dir as rd
from dist_sparse.train.engine import build_engine
from dist_sparse.train.initial import build_task_model, check_tokenizer_fits, load_initial
from dist_sparse.train.loop import load_run_checkpoint, resumed_masks, step_seed
from dist_sparse.train.losses import DistillationLoss, DistillationWeights, task_loss
from dist_sparse.train.metrics import MetricsWriter
from dist_sparse.train.sparse import SparsityComponent, config_fingerprint, preflight_sparsity
from dist_sparse.train.task_metrics import task_metrics
from dist_sparse.train.teacher import Teacher, check_teacher, teacher_dtype
from dist_sparse.train.trainer import Trainer, check_nonfinite_policy

log = logging.getLogger("dist_sparse.finetune")
RESULTS_FILE = "eval_results.json"
# Set to log the number of live tensors after every step (train/live_tensors): a test of leaks.
COUNT_TENSORS_ENV = "DIST_SPARSE_COUNT_TENSORS"


def _live_tensors() -> int:
    import gc

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune.py",
        description="Fine-tune BERT on a task written by `dist-sparse prepare-task` (start with the deepspeed launcher).")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", required=True,
                   help="DeepSpeed JSON config (DeepSpeed's own flag name); 'training', 'sparsity' and "
                        "'distillation' are dist_sparse's sections")
    p.add_argument("--task", required=True, help="a task folder written by `dist-sparse prepare-task`")
    p.add_argument("--init", required=True,
                   help="weights to start from: a dist_sparse run or checkpoint, or a Hugging Face BERT folder")
    p.add_argument("--init-tag", default=None, metavar="TAG", help="checkpoint tag of a dist_sparse --init run")
    p.add_argument("--output", required=True, help="run directory (checkpoints, tensorboard, metrics)")
    p.add_argument("--teacher", default=None, metavar="PATH",
                   help="the distillation teacher, instead of the config's distillation.teacher")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides training.max_steps)")
    length.add_argument("--epochs", type=float, default=None,
                        help="passes over the training split, rounded up to whole optimizer steps")
    p.add_argument("--save-interval", type=int, default=None, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--eval-interval", type=int, default=None, help="evaluate every N steps (0: at the end)")
    p.add_argument("--seed", type=int, default=None, help="overrides training.seed")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/latest")
    p.add_argument("--resume-tag", default=None, metavar="TAG",
                   help="continue from RUN/checkpoints/TAG instead of the one 'latest' names (implies --resume)")
    p.add_argument("--extend", action="store_true",
                   help="with --resume: continue the run to a larger --max-steps than it was planned for (the "
                        "learning-rate decay is re-stretched over the longer run from the resumed step; the "
                        "sparsity schedule keeps its length: see the README)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def _length(args, run_cfg: RunConfig, num_train: int, global_batch: int) -> int:
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be at least 1 (got {args.max_steps})")
    if args.epochs is not None:
        if args.epochs <= 0:
            raise ValueError(f"--epochs must be positive (got {args.epochs})")
        return max(1, math.ceil(args.epochs * num_train / global_batch))
    steps = args.max_steps if args.max_steps is not None else run_cfg.training.max_steps
    if steps is None:
        raise ValueError("set the length: --max-steps N, --epochs E or training.max_steps in the config")
    return steps


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    run_cfg = load_run_config(args.deepspeed_config)
    if run_cfg.structured_pruning is not None:
        raise ValueError("a \"structured_pruning\" section is for pre-training (EarlyBERT); fine-tune the shrunk "
                         "model instead (--init RUN of the structured run)")
    t = run_cfg.training
    check_nonfinite_policy(t.nonfinite_loss, run_cfg.deepspeed)
    datasets, meta = load_task(args.task)
    meta = {**meta, "_path": str(Path(args.task).resolve())}
    dims = ParallelDims.from_env(run_cfg.tp_size)
    world, dp_size = dims.world, dims.dp
    global_batch, micro_bs, grad_acc = resolve_batch_sizes(run_cfg.deepspeed, dp_size)
    train_ds, eval_ds = datasets["train"], datasets["validation"]
    max_steps = _length(args, run_cfg, len(train_ds), global_batch)
    save_interval = args.save_interval if args.save_interval is not None else t.save_interval
    eval_interval = args.eval_interval if args.eval_interval is not None else t.eval_interval
    seed = args.seed if args.seed is not None else t.seed

    run = Path(args.output)
    rd.check_paths(run, Path(args.task))
    resume_tag = rd.check_run_dir(run, args.resume, args.overwrite, args.resume_tag)
    run_json = rd.read_run_json(run) if resume_tag is not None else {}
    if resume_tag is not None:
        ckpt.check_data(run_json.get("data_meta") or {}, meta, data=args.task, run_data=run_json.get("data"))
    # the run's length plan: the steps it was started for and every --extend (train.extend)
    plan = extend.check_length(extend.plan_of(run_json, max_steps), max_steps, args.extend,
                               None if resume_tag is None else ckpt.step_of(resume_tag) or 0)
    # a resume at another layout goes through DeepSpeed's universal checkpoint (train.elastic)
    move = None
    if resume_tag is not None:
        move = elastic.plan(run, resume_tag, elastic.launch_layout(dp_size, run_cfg.tp_size, run_cfg.deepspeed))
        if move is not None:
            elastic.check_batch(move, run_json.get("global_batch"), global_batch)
    labels = list(meta["labels"])
    task_kw = dict(num_labels=meta["num_labels"], labels=labels, task_type=meta["task_type"])

    # The student's weights: from --init on a new run (every rank reads them: no process group
    # yet), from the checkpoint on resume (the config from its structure record).
    initial = None
    if resume_tag is None:
        initial = load_initial(args.init, args.init_tag)
        check_tokenizer_fits("--init", initial, meta["vocab_size"], Path(meta["_path"]) / "tokenizer")
        # A new classifier (and pooler) is drawn here: the same on every rank, and again on a rerun.
        torch.manual_seed(seed)
        model, parts = build_task_model(initial, **task_kw)
        model_config = model.config
        zeros = encoder_zero_fraction(initial.state_dict)
        if zeros >= 0.05 and run_cfg.sparsity is None and int(os.environ.get("RANK", "0")) == 0:
            log.warning("%.1f%% of the encoder's Linear weights of %s are zero, and without a \"sparsity\" section "
                        "fine-tuning fills them in; add one (e.g. method \"gmp\" or \"static\" with init "
                        "\"magnitude\" at that sparsity) to keep the model sparse", 100 * zeros, initial.source)
        # a shrunk --init's ticket (which original heads / neurons it kept), kept in every checkpoint
        # so that a dense export can pad the fine-tuned model back to stock shapes
        init_structured = initial.structured
    else:
        structure = ckpt.read_structure(rd.checkpoint_dir(run) / resume_tag)
        model_config = DistSparseBertConfig.from_dict(structure.model_config)
        init_structured = structure.structured
        model = None
        parts = {}
    preflight_sparsity(run_cfg, model_config, dp_size, extend.planned(plan))
    if resume_tag is None:
        dyn.preflight(run_cfg, model_config, args.init)
    else:
        dyn.check_resumed(rd.checkpoint_dir(run) / resume_tag, run_cfg.dynabert)
    if resume_tag is not None:
        resumed_masks(rd.checkpoint_dir(run) / resume_tag, 0, run_cfg.sparsity, False,
                       due=run_cfg.sparsity is not None, waiting=False)
    dist_cfg = run_cfg.distillation
    if args.teacher is not None:
        if dist_cfg is None:
            raise ValueError("--teacher needs a \"distillation\" section in the config (its loss weights)")
        dist_cfg = dist_cfg.model_copy(update={"teacher": args.teacher})
    teacher_model = layer_map = None
    if dist_cfg is not None:
        teacher_init = load_initial(dist_cfg.teacher, dist_cfg.teacher_tag)
        check_tokenizer_fits("the teacher", teacher_init, meta["vocab_size"], Path(meta["_path"]) / "tokenizer")
        teacher_model, _ = build_task_model(teacher_init, **task_kw, require_classifier=True)
        layer_map = check_teacher(dist_cfg, model_config, teacher_model.config, run_cfg.tp_size)
        teacher_source = teacher_init.source
        del teacher_init

    comm.init()
    assert comm.world_size() == world, "WORLD_SIZE disagrees with the process group"
    is_rank0 = comm.rank() == 0
    if is_rank0:
        run.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            rd.clear_run(run)
        elif resume_tag is None:
            rd.clear_failed_start(run)
        rd.checkpoint_dir(run).mkdir(exist_ok=True)
        if resume_tag is None:
            write_json_atomic(run / "run.json", {
                "argv": argv, "kind": "finetune", "model": str(Path(args.init).resolve()), "init": initial.source,
                "init_parts": parts, "data": meta["_path"],
                "deepspeed_config": json.loads(Path(args.deepspeed_config).read_text()),
                "teacher": teacher_source if dist_cfg is not None else None,
                "max_steps": max_steps, "seed": seed, "world_size": world, "dp_size": dp_size,
                "tp_size": run_cfg.tp_size, "global_batch": global_batch, "micro_batch": micro_bs,
                "gradient_accumulation": grad_acc, "data_meta": _recorded_meta(meta), "schedule_plan": plan})
            log.info("fine-tuning %s from %s (pooler %s, classifier %s)", meta["_path"], initial.source,
                     parts["pooler"], parts["classifier"])
        elif args.extend:
            extend.record(run, run_json, plan, argv)
    comm.barrier()
    del initial
    if move is not None:
        elastic.prepare(move, run, is_rank0)

    if run_cfg.dynabert is not None and resume_tag is None and run_cfg.dynabert.phase == 1:
        collator = TaskCollator(pad_id=meta["special_ids"]["[PAD]"], task_type=meta["task_type"])
        batches = dyn.importance_batches(eval_ds, collator, micro_bs,
                                         run_cfg.dynabert.importance_batches)
        dyn.rewire(model, run_cfg, batches, run, is_rank0)
        model_config = model.config

    torch.manual_seed(seed)
    if model is None:  # resume: the weights come from the checkpoint
        from dist_sparse.model import DistSparseBertForSequenceClassification
        model = DistSparseBertForSequenceClassification(model_config)

    def lr_lambda(s: int) -> float:
        return lr_multiplier(s, run_cfg.training, extend.max_steps_at(plan, s))

    engine = build_engine(model, run_cfg, lr_lambda=lr_lambda, load_universal=move is not None)
    del model
    groups = comm.parallel_groups(dims)

    def make_engine(model, *, lr_lambda=lr_lambda, start_step: int = 0):
        return build_engine(model, run_cfg, lr_lambda=lr_lambda, start_step=start_step, groups=groups)

    loss_fn = task_loss
    teacher = None
    if dist_cfg is not None:
        teacher = Teacher(teacher_model, engine.device, teacher_dtype(dist_cfg.teacher_dtype, engine.device))
        teacher_at_start = teacher.fingerprint()
        del teacher_model
        recorded = run_json.get("teacher_sha256") if resume_tag is not None else None
        if recorded is not None and recorded != teacher_at_start:
            raise ValueError(f"--resume: the teacher {dist_cfg.teacher} is not the one the run started with (its "
                             "weights differ from those run.json records); resume with that teacher")
        if is_rank0 and resume_tag is None:
            write_json_atomic(run / "run.json", {**rd.read_run_json(run), "teacher_sha256": teacher_at_start})
        loss_fn = DistillationLoss(
            teacher, DistillationWeights(dist_cfg.hard, dist_cfg.logits, dist_cfg.hidden, dist_cfg.attention,
                                         dist_cfg.temperature),
            layer_map, kind="task", regression=meta["task_type"] == "regression",
            tp_rank=groups.tp_rank, tp_size=groups.tp_size,
            tp_sum=lambda t: comm.all_reduce_sum_(t, groups.tp_group))

    tokens_per_step = global_batch * meta["seq_len"]
    components = []
    sparsity = None
    if run_cfg.sparsity is not None:
        sparsity = SparsityComponent.for_run(run_cfg, groups, extend.planned(plan), meta["seq_len"],
                                             tokens_per_step)
        components.append(sparsity)
    dynabert = None
    if run_cfg.dynabert is not None:
        dynabert = dyn.DynaBertComponent(run_cfg.dynabert, model_config, seed=seed, tp_rank=groups.tp_rank,
                                         tp_size=groups.tp_size,
                                         loss=loss_fn if isinstance(loss_fn, DistillationLoss) else None,
                                         layer_map=layer_map)
        components.append(dynabert)
        if is_rank0 and resume_tag is None:
            write_json_atomic(run / "run.json", {**rd.read_run_json(run), "dynabert": dynabert.record()})
    trainer = Trainer(engine, model_config, groups, zero_stage=run_cfg.zero_stage, build_engine=make_engine,
                      components=components, loss=loss_fn,
                      nonfinite_loss=run_cfg.training.nonfinite_loss, checkpoints=rd.checkpoint_dir(run))
    del engine
    if sparsity is not None:
        sparsity.attach(trainer)

    collator = TaskCollator(pad_id=meta["special_ids"]["[PAD]"], task_type=meta["task_type"])
    loader = ResumableBatchIterator(len(train_ds), micro_bs, groups.dp_rank, groups.dp_size, seed, drop_last=False,
                                    step_batch=global_batch)
    progress = ckpt.Progress()
    ckpt_dir = rd.checkpoint_dir(run)
    if resume_tag is not None:
        progress = load_run_checkpoint(trainer.engine, ckpt_dir, resume_tag, loader,
                                       model=str(Path(args.init).resolve()), data=args.task,
                                       meta=_recorded_meta(meta), groups=groups,
                                       max_steps=None if args.extend else max_steps,
                                       run_data=run_json.get("data"), move=move)
        link_optimizer_state(trainer.engine.optimizer, run_cfg.zero_stage)
        if sparsity is not None and move is not None:  # rank 0's file checked, the whole masks loaded
            resumed_masks(ckpt_dir / resume_tag, 0, run_cfg.sparsity, False, due=True, waiting=False)
            sparsity.load_logical_state(*elastic.logical_sparsity(move))
        elif sparsity is not None:
            sparsity.load_state_dict(resumed_masks(ckpt_dir / resume_tag, comm.rank(), run_cfg.sparsity, False,
                                                    due=True, waiting=False))
        if is_rank0:
            rd.truncate_metrics(run / "metrics.jsonl", progress.step)
    elif sparsity is not None:
        sparsity.start(draw=True)
    comm.barrier()

    metrics = MetricsWriter(run, enabled=is_rank0, purge_step=progress.step + 1 if resume_tag else None)
    if sparsity is not None and resume_tag is None:
        metrics.scalars("sparsity", 0, sparsity.scalars(trainer, None))
    pbar = None
    if is_rank0 and not args.no_progress:
        from tqdm import tqdm
        pbar = tqdm(total=max_steps, initial=progress.step, desc="finetune", unit="step", dynamic_ncols=True)

    def save(step: int) -> None:
        client = ckpt.ClientState(progress=progress, loader=loader.state_dict(), seed=seed, max_steps=max_steps,
                                  model=str(Path(args.init).resolve()), model_config=trainer.model_config.to_dict(),
                                  data_meta=_recorded_meta(meta), dp_size=groups.dp_size, tp_size=groups.tp_size,
                                  sparsity=None if run_cfg.sparsity is None else config_fingerprint(run_cfg.sparsity))
        rank_files = {ckpt.rng_file(comm.rank()): ckpt.rng_state()}
        if sparsity is not None:
            rank_files[ckpt.sparsity_file(comm.rank())] = sparsity.state_dict()
        shared = {dyn.FILE: dynabert.record()} if dynabert is not None else None
        ckpt.save(trainer.engine, ckpt_dir, ckpt.tag_of(step), client,
                  ckpt.StructureRecord(trainer.model_config.to_dict(), init_structured), rank_files,
                  is_rank0=is_rank0, keep=run_cfg.training.keep_checkpoints, shared_json=shared)

    def micro_batches(step: int):
        device = trainer.engine.device
        for micro in range(grad_acc):
            indices = next(loader)
            batch = collator([train_ds[i] for i in indices])
            torch.manual_seed(step_seed(seed, step, micro, groups.dp_rank, stream=1))
            tp_rng.seed(step_seed(seed, step, micro, groups.dp_rank, stream=4), groups.tp_rank)
            yield {k: v.to(device) for k, v in batch.items()}

    result_eval: dict[str, float] = {}
    count_tensors = bool(os.environ.get(COUNT_TENSORS_ENV))
    while progress.step < max_steps:
        t0 = time.perf_counter()
        result = trainer.train_step(micro_batches(progress.step), step=progress.step + 1)
        local = torch.stack([result.loss_sum, torch.tensor(float(result.micro_steps), dtype=torch.float64,
                                                           device=result.loss_sum.device), result.tokens])
        comm.all_reduce_sum_(local, groups.dp_group)
        local = local.cpu()
        progress.step += 1
        progress.samples += global_batch
        progress.tokens += int(local[2])
        loss = float(local[0] / local[1])
        for group, scalars in result.scalars.items():
            metrics.scalars(group, progress.step, scalars)
        engine = trainer.engine
        if progress.step % run_cfg.training.log_interval == 0 or progress.step == max_steps:
            grad_norm = engine.get_global_grad_norm()
            scalars = {"loss": loss, "lr": engine.get_lr()[0],
                       "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       "skipped_steps": float(trainer.skipped_steps),
                       "samples_per_sec": global_batch / (time.perf_counter() - t0)}
            if isinstance(loss_fn, DistillationLoss):  # rank 0's last micro batch, per term
                scalars.update({f"distill_{k}": float(v) for k, v in loss_fn.last.items()})
            if count_tensors:
                scalars["live_tensors"] = float(_live_tensors())
            metrics.scalars("train", progress.step, scalars)
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(loss=f"{loss:.4f}")
        last = progress.step == max_steps
        if (eval_interval and progress.step % eval_interval == 0) or last:
            result_eval = evaluate(engine, eval_ds, collator, micro_bs, meta, groups)
            metrics.scalars("eval", progress.step, result_eval)
            if is_rank0:
                log.info("step %d eval %s", progress.step, {k: round(v, 4) for k, v in result_eval.items()})
            if dynabert is not None:
                sub_eval = dyn.evaluate_subnetworks(
                    dynabert, engine.module, lambda: evaluate(engine, eval_ds, collator, micro_bs, meta, groups))
                for name, values in sub_eval.items():
                    metrics.scalars(f"eval_{name}", progress.step, values)
                if is_rank0:
                    log.info("step %d sub-networks: %s", progress.step,
                             {n: round(v.get(meta.get("metric", "accuracy"), float("nan")), 4)
                              for n, v in sub_eval.items()})
                result_eval = {**result_eval, "subnetworks": sub_eval}
        del engine
        if (save_interval and progress.step % save_interval == 0) or last:
            save(progress.step)

    if pbar is not None:
        pbar.close()
    metrics.close()
    extra = {}
    if teacher is not None:
        # Nothing may write to the teacher: checked, not assumed (its fingerprint at start and end).
        teacher.check_unchanged(teacher_at_start)
        extra = {"teacher_sha256": teacher_at_start}
    if is_rank0:
        write_json_atomic(run / RESULTS_FILE, {"step": progress.step, "split": "validation", **result_eval, **extra})
        print(f"run directory: {run.resolve()}")
        print(f"  validation ({meta.get('metric', 'metrics')}): "
              + ", ".join(f"{k} {v:.4f}" for k, v in result_eval.items() if k != "subnetworks"))
        for name, values in result_eval.get("subnetworks", {}).items():
            print(f"    sub-network {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        print(f"  checkpoints: {ckpt_dir.resolve()} (latest: {ckpt.latest_tag(ckpt_dir)})")
        print(f"  tensorboard: {(run / 'tensorboard').resolve()}  (tensorboard --logdir {run / 'tensorboard'})")
    comm.barrier()
    return 0


def encoder_zero_fraction(state_dict: dict[str, torch.Tensor]) -> float:
    """The fraction of exact zeros over the encoder's Linear weights (what sparse training prunes)."""
    zeros = total = 0
    for name, w in state_dict.items():
        if name.startswith("bert.encoder.layer.") and name.endswith(".weight") and w.dim() == 2:
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total if total else 0.0


def _recorded_meta(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if not k.startswith("_")}


@torch.no_grad()
def evaluate(engine, eval_ds, collator, micro_bs: int, meta: dict, groups) -> dict[str, float]:
    """The task's metrics over the whole validation split: each data-parallel rank predicts its
    stride of it, the predictions are gathered over the DP group, and every rank computes the
    same numbers (TP peers hold the same predictions)."""
    engine.eval()
    n = len(eval_ds)
    mine = list(range(groups.dp_rank, n, groups.dp_size))
    # Every rank runs the same number of forward passes: under ZeRO-3 (and TP) a forward is a
    # sequence of collectives, and a rank with one batch fewer would leave its peers waiting.
    # A rank short of examples runs its first one again and drops the result.
    batches = math.ceil(math.ceil(n / groups.dp_size) / micro_bs)
    preds, golds, loss_sum = [], [], 0.0
    for b in range(batches):
        chunk = mine[b * micro_bs:(b + 1) * micro_bs]
        real = len(chunk)
        batch = {k: v.to(engine.device) for k, v in collator([eval_ds[i] for i in (chunk or mine[:1] or [0])]).items()}
        out = engine(**batch)
        if not real:
            continue
        loss_sum += float(out.loss) * real
        logits = out.logits.float().cpu()
        preds += (logits.squeeze(-1) if meta["task_type"] == "regression" else logits.argmax(-1)).tolist()
        golds += batch["labels"].cpu().tolist()
    engine.train()
    gathered = comm.all_gather_object((preds, golds, loss_sum), groups.dp_group)
    all_preds = [p for g in gathered for p in g[0]]
    all_golds = [y for g in gathered for y in g[1]]
    results = task_metrics(meta["task_type"], meta["num_labels"], all_preds, all_golds)
    results["loss"] = sum(g[2] for g in gathered) / max(n, 1)
    return results


__all__ = ["build_parser", "evaluate", "run"]
