"""The pre-training loop around the DeepSpeed engine.

Determinism is by construction, which is what makes resume exact: the data order is a
function of (seed, epoch) and the position in it; MLM masking draws from a generator per
example keyed by (seed, step, the example's place in the step's global batch), the same however
the step is split into ranks and micro batches (so a resume at another data-parallel size masks
alike); dropout draws from generators reseeded at every micro step from (seed, step, micro step,
data-parallel rank).
Tensor-parallel peers share a data-parallel rank, so they see the same batch and the same
dropout masks on replicated activations; dropout on their own attention heads draws from the
tensor-parallel RNG region, seeded per micro step with the TP rank mixed in.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from dist_sparse.config import RunConfig, load_run_config, lr_multiplier, resolve_batch_sizes
from dist_sparse.data.collator import MlmCollator
from dist_sparse.data.loader import ResumableBatchIterator
from dist_sparse.data.prepare import load_prepared
from dist_sparse.distributed import comm
from dist_sparse.distributed.rng import tp_rng
from dist_sparse.distributed.topology import ParallelDims
from dist_sparse.distributed.zero import ZeroAccess, link_optimizer_state
from dist_sparse.folders import write_json_atomic
from dist_sparse.model.config import DistSparseBertConfig
from dist_sparse.model.presets import build_config, build_model
from dist_sparse.sparsifier import check_state_config, section_changes
from dist_sparse.structured.pruner import StructuredPruner, attach_coefficients
from dist_sparse.structured.pruner import validate as validate_structured
from dist_sparse.train import checkpoint as ckpt
from dist_sparse.train import dynabert as dyn
from dist_sparse.train import elastic
from dist_sparse.train import extend
from dist_sparse.train import run_dir as rd
from dist_sparse.train.args import build_parser
from dist_sparse.train.engine import build_engine
from dist_sparse.train.initial import build_pretraining_model, check_tokenizer_fits, load_initial
from dist_sparse.train.losses import DistillationLoss, DistillationWeights, pretraining_loss
from dist_sparse.train.metrics import MetricsWriter
from dist_sparse.train.sparse import SparsityComponent, config_fingerprint, preflight_sparsity
from dist_sparse.train.structured import EarlyBertComponent
from dist_sparse.train.teacher import Teacher, check_teacher, teacher_dtype
from dist_sparse.train.trainer import Trainer, check_nonfinite_policy

log = logging.getLogger("dist_sparse.train")


def step_seed(seed: int, step: int, micro: int, dp_rank: int, stream: int = 0) -> int:
    """A 63-bit seed for one micro step; distinct streams never collide for sane sizes."""
    return (((seed * 1_000_003 + step) * 4099 + micro) * 65_537 + dp_rank) * 7 + stream & (2**63 - 1)


_M64 = 2**64 - 1


def sample_seed(seed: int, step: int, slot: int) -> int:
    """A 64-bit seed for the example at place ``slot`` of optimizer step ``step``'s global batch
    (MLM masking). Global batches of LAMB recipes reach 64k, beyond step_seed's room for a micro
    index, so the slot goes through a bijective 64-bit mix (splitmix64's finaliser) instead: for
    one step, distinct slots never collide."""
    z = (step_seed(seed, step, 0, 0, stream=6) + (slot + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _resolve(args, run_cfg: RunConfig):
    t = run_cfg.training
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be at least 1 (got {args.max_steps})")
    max_steps = args.max_steps if args.max_steps is not None else t.max_steps
    if max_steps is None:
        raise ValueError("set the number of steps: --max-steps N or training.max_steps in the config")
    if max_steps < 1:
        raise ValueError(f"training.max_steps must be at least 1 (got {max_steps})")
    save_interval = args.save_interval if args.save_interval is not None else t.save_interval
    eval_interval = args.eval_interval if args.eval_interval is not None else t.eval_interval
    seed = args.seed if args.seed is not None else t.seed
    for name, v in (("--save-interval", save_interval), ("--eval-interval", eval_interval)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0")
    return max_steps, save_interval, eval_interval, seed


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Everything that can be checked without processes or models is checked first.
    run_cfg = load_run_config(args.deepspeed_config)
    max_steps, save_interval, eval_interval, seed = _resolve(args, run_cfg)
    check_nonfinite_policy(run_cfg.training.nonfinite_loss, run_cfg.deepspeed)
    datasets, meta = load_prepared(args.data)
    model_config = build_config(args.model, vocab_size=meta["vocab_size"],
                                max_position_embeddings=max(512, meta["seq_len"]),
                                pad_token_id=meta["special_ids"]["[PAD]"])
    run = Path(args.output)
    rd.check_paths(run, Path(args.data))
    # what the run started from, as checkpoints record it and a resume checks: the preset, or --init
    model_name = str(Path(args.init).resolve()) if args.init else args.model
    resume_tag = rd.check_run_dir(run, args.resume, args.overwrite, args.resume_tag)
    run_json = rd.read_run_json(run) if resume_tag is not None else {}
    if resume_tag is not None:
        ckpt.check_data(run_json.get("data_meta") or {}, meta, data=args.data, run_data=run_json.get("data"))
    # the run's length plan: the steps it was started for and every --extend (train.extend)
    plan = extend.check_length(extend.plan_of(run_json, max_steps), max_steps, args.extend,
                               None if resume_tag is None else ckpt.step_of(resume_tag) or 0)
    # A checkpoint names its own model shape (a structured run may have shrunk it) and the state of
    # the structured search; both are needed before the model is built.
    structure = None
    if resume_tag is not None:
        structure = ckpt.read_structure(rd.checkpoint_dir(run) / resume_tag)
        if structure is not None:
            model_config = DistSparseBertConfig.from_dict(structure.model_config)
    initial = None
    if args.init is not None and resume_tag is None:
        initial = load_initial(args.init, args.init_tag)
        check_tokenizer_fits("--init", initial, meta["vocab_size"], Path(args.data) / "tokenizer")
        model_config = initial.config
    if resume_tag is None:
        dyn.preflight(run_cfg, model_config, args.init or f"--model {args.model}")
    else:
        dyn.check_resumed(rd.checkpoint_dir(run) / resume_tag, run_cfg.dynabert)
    sp_cfg = run_cfg.structured_pruning
    structured_state = structure.structured if structure else None
    if structured_state is not None and structured_state.searching and sp_cfg is None:
        raise ValueError("--resume: the checkpoint is in the middle of a structured-pruning search but the config "
                         "has no \"structured_pruning\" section; add it back to continue the search")
    if sp_cfg is not None:
        if structured_state is not None and structured_state.config not in (None, sp_cfg.model_dump()):
            raise ValueError("--resume: the \"structured_pruning\" section differs from the one the run was "
                             f"started with ({section_changes(structured_state.config, sp_cfg.model_dump())}); "
                             "it decides the ticket, so it cannot change mid-run")
        if structured_state is None or structured_state.searching:
            validate_structured(sp_cfg, model_config, run_cfg.tp_size, run_cfg)
    # A teacher for the MLM logits (Prune Once for All): checked against the data and the student
    # before any process group exists; built as a plain frozen module beside the engine.
    dist_cfg = run_cfg.distillation
    teacher_model = layer_map = None
    if dist_cfg is not None:
        if sp_cfg is not None:
            raise ValueError("a \"distillation\" section with \"structured_pruning\" is not supported: the shrink "
                             "changes the student's heads under the teacher's; distil the shrunk model in a second run")
        teacher_init = load_initial(dist_cfg.teacher, dist_cfg.teacher_tag)
        check_tokenizer_fits("the teacher", teacher_init, meta["vocab_size"], Path(args.data) / "tokenizer")
        teacher_model = build_pretraining_model(teacher_init)
        layer_map = check_teacher(dist_cfg, model_config, teacher_model.config, run_cfg.tp_size)
        del teacher_init
    # The launcher sets WORLD_SIZE, so the layout and batch arithmetic are checked before any
    # process group exists.
    dims = ParallelDims.from_env(run_cfg.tp_size)
    world, dp_size = dims.world, dims.dp
    global_batch, micro_bs, grad_acc = resolve_batch_sizes(run_cfg.deepspeed, dp_size)
    # A resume at another layout (DP size, TP degree, ZeRO stage) goes through DeepSpeed's
    # universal checkpoint, converted once after the process group exists (train.elastic).
    move = None
    if resume_tag is not None:
        move = elastic.plan(run, resume_tag, elastic.launch_layout(dp_size, run_cfg.tp_size, run_cfg.deepspeed))
        if move is not None:
            elastic.check_batch(move, run_json.get("global_batch"), global_batch)
    preflight_sparsity(run_cfg, model_config, dp_size, extend.planned(plan))
    if resume_tag is not None:  # the masks against the config, from rank 0's file
        waits = run_cfg.sparsity is not None and run_cfg.sparsity.after_shrink and \
            sp_cfg is not None and (structured_state is None or structured_state.searching)
        resumed_masks(rd.checkpoint_dir(run) / resume_tag, 0, run_cfg.sparsity, args.sparsity_reset,
                       due=run_cfg.sparsity is not None and not waits, waiting=waits)

    comm.init()
    assert comm.world_size() == world, "WORLD_SIZE disagrees with the process group"
    is_rank0 = comm.rank() == 0

    if is_rank0:
        run.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            rd.clear_run(run)
        elif resume_tag is None:
            rd.clear_failed_start(run)  # check_run_dir let it through: nothing of value is there
        rd.checkpoint_dir(run).mkdir(exist_ok=True)
        if resume_tag is None:
            write_json_atomic(run / "run.json", {
                "argv": argv, "model": model_name, "data": str(Path(args.data).resolve()),
                "deepspeed_config": json.loads(Path(args.deepspeed_config).read_text()),
                "max_steps": max_steps, "seed": seed, "world_size": world, "dp_size": dp_size,
                "tp_size": run_cfg.tp_size, "global_batch": global_batch, "micro_batch": micro_bs,
                "gradient_accumulation": grad_acc, "data_meta": meta, "schedule_plan": plan})
        elif args.extend:
            extend.record(run, run_json, plan, argv)
    comm.barrier()
    if move is not None:
        elastic.prepare(move, run, is_rank0)

    torch.manual_seed(seed)
    model = build_model(model_config) if initial is None else build_pretraining_model(initial)
    del initial
    special = meta["special_ids"]
    collator = MlmCollator(pad_id=special["[PAD]"], mask_id=special["[MASK]"], vocab_size=meta["vocab_size"],
                           special_ids=sorted(special.values()), seq_len=meta["seq_len"],
                           mlm_probability=run_cfg.training.mlm_probability)
    train_ds, eval_ds = datasets["train"], datasets["eval"]
    if run_cfg.dynabert is not None and resume_tag is None and run_cfg.dynabert.phase == 1:
        # importance with the MLM loss on the held-out split, masked by one fixed generator
        gen = torch.Generator().manual_seed(step_seed(seed, 0, 0, 0, stream=5))
        batches = dyn.importance_batches(eval_ds, lambda rows: collator(rows, gen), micro_bs,
                                         run_cfg.dynabert.importance_batches)
        dyn.rewire(model, run_cfg, batches, run, is_rank0)
        model_config = model.config
    searching = sp_cfg is not None and (structured_state is None or structured_state.searching)
    if searching:
        attach_coefficients(model, run_cfg.tp_size)

    def lr_lambda(s: int) -> float:
        return lr_multiplier(s, run_cfg.training, extend.max_steps_at(plan, s))

    # DeepSpeed builds AutoTP's groups inside the first deepspeed.initialize: they are read once,
    # checked against the layout, and passed to everything after, later engines included.
    engine = build_engine(model, run_cfg, lr_lambda=lr_lambda, load_universal=move is not None)
    del model  # the engine owns it; a shrink must be able to release it
    groups = comm.parallel_groups(dims)

    def make_engine(model, *, lr_lambda=lr_lambda, start_step: int = 0):
        return build_engine(model, run_cfg, lr_lambda=lr_lambda, start_step=start_step, groups=groups)
    tokens_per_step = global_batch * meta["seq_len"]

    loader = ResumableBatchIterator(len(train_ds), micro_bs, groups.dp_rank, groups.dp_size, seed,
                                    step_batch=global_batch)

    # The components, in hook order: masks are updated before the structured search looks.
    components = []
    sparsity = None
    if run_cfg.sparsity is not None:
        sparsity = SparsityComponent.for_run(run_cfg, groups, extend.planned(plan), meta["seq_len"],
                                             tokens_per_step)
        components.append(sparsity)
    structured = None
    if sp_cfg is not None:
        pruner = StructuredPruner(sp_cfg, model_config.num_hidden_layers, groups,
                                  ZeroAccess(run_cfg.zero_stage, groups.dp_group, groups.dp_rank, groups.dp_size))
        if structured_state is not None:
            pruner.load_state_dict(structured_state.to_dict())
        # The shrink's check batch: the same on every rank (not the rank's own stride), fixed seed.
        gen = torch.Generator().manual_seed(step_seed(seed, 0, 0, 0, stream=3))
        verify_batch = collator([eval_ds[i % len(eval_ds)] for i in range(micro_bs)], gen)
        # the shrink compares the logits at every position, not the masked ones only
        verify_batch.pop("mlm_positions")
        structured = EarlyBertComponent(pruner, zero_stage=run_cfg.zero_stage, verify_batch=verify_batch,
                                        seq_len=meta["seq_len"], global_batch=global_batch, lr_lambda=lr_lambda,
                                        is_rank0=is_rank0)
        components.append(structured)
    loss_fn = pretraining_loss
    if teacher_model is not None:
        teacher = Teacher(teacher_model, engine.device, teacher_dtype(dist_cfg.teacher_dtype, engine.device))
        teacher_at_start = teacher.fingerprint()
        del teacher_model
        loss_fn = DistillationLoss(
            teacher, DistillationWeights(dist_cfg.hard, dist_cfg.logits, dist_cfg.hidden, dist_cfg.attention,
                                         dist_cfg.temperature),
            layer_map, kind="mlm", tp_rank=groups.tp_rank, tp_size=groups.tp_size,
            tp_sum=lambda t: comm.all_reduce_sum_(t, groups.tp_group))
    dynabert = None
    if run_cfg.dynabert is not None:
        dynabert = dyn.DynaBertComponent(run_cfg.dynabert, model_config, seed=seed, tp_rank=groups.tp_rank,
                                         tp_size=groups.tp_size,
                                         loss=loss_fn if isinstance(loss_fn, DistillationLoss) else None,
                                         layer_map=layer_map)
        components.append(dynabert)
    trainer = Trainer(engine, model_config, groups, zero_stage=run_cfg.zero_stage, build_engine=make_engine,
                      components=components, loss=loss_fn,
                      nonfinite_loss=run_cfg.training.nonfinite_loss, checkpoints=rd.checkpoint_dir(run))
    del engine  # the trainer holds the only reference
    if structured is not None:
        structured.bind(trainer)
    # sparsity.after_shrink: dense until the structured shrink, which draws the first masks
    masks_now = sparsity is not None and not (run_cfg.sparsity.after_shrink and searching)
    if masks_now:
        sparsity.attach(trainer)

    progress = ckpt.Progress()
    ckpt_dir = rd.checkpoint_dir(run)

    if resume_tag is not None:
        progress = load_run_checkpoint(trainer.engine, ckpt_dir, resume_tag, loader, model=model_name,
                                       data=args.data, meta=meta, groups=groups,
                                       max_steps=None if args.extend else max_steps, run_data=run_json.get("data"),
                                       move=move)
        link_optimizer_state(trainer.engine.optimizer, run_cfg.zero_stage)
        # at another layout this rank's file may not exist: rank 0's is checked, the whole masks loaded
        state = resumed_masks(ckpt_dir / resume_tag, comm.rank() if move is None else 0, run_cfg.sparsity,
                              args.sparsity_reset, due=masks_now, waiting=sparsity is not None and not masks_now)
        if state is not None and move is not None:
            sparsity.load_logical_state(*elastic.logical_sparsity(move))
        elif state is not None:
            sparsity.load_state_dict(state)
        elif masks_now:  # --sparsity-reset: new masks on the resumed weights and moments
            sparsity.start(draw=True, optimizer_has_state=True)
        if is_rank0:
            rd.truncate_metrics(run / "metrics.jsonl", progress.step)
    elif masks_now:
        sparsity.start(draw=True)
    comm.barrier()

    metrics = MetricsWriter(run, enabled=is_rank0, purge_step=progress.step + 1 if resume_tag else None)
    if masks_now and resume_tag is None:
        metrics.scalars("sparsity", 0, sparsity.scalars(trainer, None))

    pbar = None
    if is_rank0 and not args.no_progress:
        from tqdm import tqdm
        pbar = tqdm(total=max_steps, initial=progress.step, desc="pretrain", unit="step", dynamic_ncols=True)

    def save(step: int) -> None:
        structured_sd = None if structured is None else ckpt.StructuredState.from_dict(structured.state_dict())
        client = ckpt.ClientState(progress=progress, loader=loader.state_dict(), seed=seed, max_steps=max_steps,
                                  model=model_name, model_config=trainer.model_config.to_dict(), data_meta=meta,
                                  dp_size=groups.dp_size, tp_size=groups.tp_size,
                                  sparsity=None if run_cfg.sparsity is None else config_fingerprint(run_cfg.sparsity),
                                  structured=structured_sd)
        rank_files = {ckpt.rng_file(comm.rank()): ckpt.rng_state()}
        masks = None if sparsity is None else sparsity.state_dict()
        if masks is not None:
            rank_files[ckpt.sparsity_file(comm.rank())] = masks
        ckpt.save(trainer.engine, ckpt_dir, ckpt.tag_of(step), client,
                  ckpt.StructureRecord(trainer.model_config.to_dict(), structured_sd), rank_files,
                  is_rank0=is_rank0, keep=run_cfg.training.keep_checkpoints,
                  shared_json={dyn.FILE: dynabert.record()} if dynabert is not None else None)

    first_batch = next(iter(ResumableBatchIterator(len(train_ds), micro_bs, groups.dp_rank, groups.dp_size, seed)))

    def micro_batches(step: int):
        """This rank's micro batches of optimizer step ``step + 1``, each seeded just before use.
        A batch carries the collator's ``mlm_positions`` (found on the host) to the loss, so the
        model's MLM head runs on the masked positions only, without a host sync."""
        device = trainer.engine.device
        for micro in range(grad_acc):
            data_step = 0 if args.overfit_batch else step
            indices = first_batch if args.overfit_batch else next(loader)
            first_slot = (micro * groups.dp_size + groups.dp_rank) * micro_bs  # in the step's global batch
            gens = [torch.Generator().manual_seed(sample_seed(seed, data_step, first_slot + i))
                    for i in range(len(indices))]
            batch = collator([train_ds[i] for i in indices], gens)
            torch.manual_seed(step_seed(seed, step, micro, groups.dp_rank, stream=1))
            # dropout on this rank's attention heads: its own stream per TP rank (a no-op at tp=1)
            tp_rng.seed(step_seed(seed, step, micro, groups.dp_rank, stream=4), groups.tp_rank)
            yield {k: v.to(device) for k, v in batch.items()}

    while progress.step < max_steps:
        t0 = time.perf_counter()
        result = trainer.train_step(micro_batches(progress.step), step=progress.step + 1)
        # loss sum over micro steps, micro steps, tokens; on the device, read once per step
        local = torch.stack([result.loss_sum, torch.tensor(float(result.micro_steps), dtype=torch.float64,
                                                           device=result.loss_sum.device), result.tokens])
        comm.all_reduce_sum_(local, groups.dp_group)
        local = local.cpu()
        progress.step += 1
        progress.samples += global_batch
        progress.tokens += int(local[2])
        elapsed = time.perf_counter() - t0
        loss = float(local[0] / local[1])
        for group, scalars in result.scalars.items():
            metrics.scalars(group, progress.step, scalars)
        engine = trainer.engine
        if progress.step % run_cfg.training.log_interval == 0 or progress.step == max_steps:
            grad_norm = engine.get_global_grad_norm()
            metrics.scalars("train", progress.step, {
                "loss": loss, "lr": engine.get_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped_steps": float(trainer.skipped_steps),
                "samples_per_sec": global_batch / elapsed, "tokens_per_sec": float(local[2]) / elapsed,
                # rank 0's last micro batch, per distillation term
                **({f"distill_{k}": float(v) for k, v in loss_fn.last.items()}
                   if isinstance(loss_fn, DistillationLoss) else {})})
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(loss=f"{loss:.4f}")
        last = progress.step == max_steps
        if (eval_interval and progress.step % eval_interval == 0) or last:
            result = evaluate(engine, eval_ds, collator, micro_bs, run_cfg.training.eval_batches, seed, groups)
            metrics.scalars("eval", progress.step, result)
            if is_rank0:
                log.info("step %d eval %s", progress.step, {k: round(v, 4) for k, v in result.items()})
            if dynabert is not None:
                sub = dyn.evaluate_subnetworks(dynabert, engine.module, lambda: evaluate(
                    engine, eval_ds, collator, micro_bs, run_cfg.training.eval_batches, seed, groups))
                for name, values in sub.items():
                    metrics.scalars(f"eval_{name}", progress.step, values)
                if is_rank0:
                    log.info("step %d sub-networks (MLM loss): %s", progress.step,
                             {n: round(v["mlm_loss"], 4) for n, v in sub.items()})
        del engine  # the trainer holds the only reference (a shrink must be able to free it)
        if (save_interval and progress.step % save_interval == 0) or last:
            save(progress.step)

    if pbar is not None:
        pbar.close()
    metrics.close()
    if loss_fn is not pretraining_loss:
        loss_fn.teacher.check_unchanged(teacher_at_start)
    if is_rank0:
        print(f"run directory: {run.resolve()}")
        print(f"  checkpoints: {ckpt_dir.resolve()} (latest: {ckpt.latest_tag(ckpt_dir)})")
        print(f"  tensorboard: {(run / 'tensorboard').resolve()}  (tensorboard --logdir {run / 'tensorboard'})")
    comm.barrier()
    return 0


@torch.no_grad()
def evaluate(engine, eval_ds, collator, micro_bs: int, batches: int, seed: int, groups) -> dict[str, float]:
    """MLM loss (token-weighted) and accuracy on the held-out split, over all DP ranks; the MLM
    head runs on the masked positions only (the collator's ``mlm_positions``).

    Each data-parallel rank takes its own stride of the split with masking seeded independently
    of the step, so the same weights always give the same numbers.
    """
    engine.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # summed token loss, masked tokens, correct
    n = len(eval_ds)
    for b in range(batches):
        start = (b * groups.dp_size + groups.dp_rank) * micro_bs
        indices = [(start + j) % n for j in range(micro_bs)]
        gen = torch.Generator().manual_seed(step_seed(seed, 0, b, groups.dp_rank, stream=2))
        batch = {k: v.to(engine.device) for k, v in collator([eval_ds[i] for i in indices], gen).items()}
        labels = batch.pop("labels")
        batch.pop("next_sentence_label", None)
        # logits at the masked positions only (batch["mlm_positions"]), in their order
        logits = engine(**batch).prediction_logits.float()
        targets = labels.reshape(-1).index_select(0, batch["mlm_positions"])
        token_loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        correct = (logits.argmax(-1) == targets).sum()
        totals += torch.tensor([float(token_loss), float(len(targets)), float(correct)], dtype=torch.float64)
    comm.all_reduce_sum_(totals, groups.dp_group)
    engine.train()
    count = max(float(totals[1]), 1.0)
    return {"mlm_loss": float(totals[0]) / count, "mlm_accuracy": float(totals[2]) / count}


def load_run_checkpoint(engine, ckpt_dir: Path, tag: str, loader, *, model: str, data: str, meta: dict, groups,
                        max_steps: int | None, run_data: str | None, move: elastic.Move | None = None
                        ) -> ckpt.Progress:
    """Load checkpoint ``tag`` into ``engine`` and ``loader`` (a collective), check it against this
    launch (``model``: the preset or init the run was started from; ``data`` as given), restore
    this rank's RNG states; the run's progress. ``move``: the checkpoint was written at another
    layout; its universal form is loaded, the data position is taken in samples, and the RNG
    states stay (no rank of this layout has one of its own; see ``train.elastic``). ``max_steps``
    None: the run is being extended (``train.extend``), its checkpoints were planned shorter."""
    if move is None:
        client = ckpt.load_client_state(engine, ckpt_dir, tag)
    else:
        # the innermost optimizer: ZeRO's wrapper steps it with these groups
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        settings = elastic.param_group_settings(inner)
        elastic.prepare_universal_load(engine)
        client = ckpt.load_client_state(engine, move.load_dir, tag)
        elastic.restore_param_groups(inner, settings)
    ckpt.check_resume(client, model=model, max_steps=max_steps, dp_size=groups.dp_size if move is None else None,
                      data_meta=meta, data=data, run_data=run_data)
    loader.load_state_dict(client.loader, relayout=move is not None)
    if move is not None:
        log.info("resumed %s at another layout (%s): step %d, sample %d of epoch %d", tag, move.describe(),
                 client.progress.step, client.loader.get("samples", 0), client.loader["epoch"])
        return client.progress
    state = ckpt.read_rank_file(ckpt_dir / tag, ckpt.rng_file(comm.rank()))
    if state is not None:
        ckpt.restore_rng_state(state)
    return client.progress


def resumed_masks(tag_dir: Path, rank: int, cfg, reset: bool, due: bool, waiting: bool) -> dict | None:
    """Rank ``rank``'s sparsity state in checkpoint ``tag_dir`` if the run is to resume it, None if
    not; a mismatch between the checkpoint and the config is an error unless ``--sparsity-reset``
    says to start new masks (or, with no sparsity section, none). ``due``: the config's masks
    exist at this point of the run; ``waiting``: they wait for the structured shrink
    (``after_shrink``), so the checkpoint must hold none yet.

    Called before any process group exists (rank 0's file: a wrong config fails in a second) and
    again by every rank for its own file when the masks are loaded.
    """
    path = tag_dir / ckpt.sparsity_file(rank)
    has_masks = path.exists()
    if not due:
        if has_masks and not reset:
            if waiting:
                raise ValueError(f"--resume: {tag_dir} holds sparsity masks but \"sparsity.after_shrink\" waits for "
                                 "the structured shrink to draw them; remove after_shrink, or pass --sparsity-reset "
                                 "to continue dense until the shrink")
            raise ValueError(f"--resume: {tag_dir} holds sparsity masks but the config has no \"sparsity\" section; "
                             "add the section back, or pass --sparsity-reset to continue dense")
        return None
    if not has_masks and not reset:
        raise ValueError(f"--resume: {tag_dir} has no sparsity masks (a dense run?) but the config asks for "
                         "sparsity; pass --sparsity-reset to draw new masks from the resumed weights")
    if reset:
        return None
    state = torch.load(path, weights_only=False)
    check_state_config(state, cfg)  # the sparsifier checks it again when it loads its own file
    return state