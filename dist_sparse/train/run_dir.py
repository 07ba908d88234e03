"""The run directory: what it holds, and the rules for starting, resuming and overwriting.

RUN/
  run.json         what started the run (arguments, config), written once by rank 0
  metrics.jsonl    one line per logged step and per evaluation (rank 0)
  tensorboard/     event files
  checkpoints/     DeepSpeed's layout: <tag>/ per checkpoint and ``latest`` naming the last good one

Every rank calls the checks (they only read) so that all ranks fail the same way; only rank 0
changes files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

RUN_FILES = ("run.json", "metrics.jsonl")
RUN_DIRS = ("checkpoints", "tensorboard")


def checkpoint_dir(run: Path) -> Path:
    return run / "checkpoints"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag in ``latest``, if it names a checkpoint directory that exists."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if tag and (ckpt_dir / tag).is_dir() else None


# DeepSpeed's per-rank files of a checkpoint tag: model states (one per TP rank, or per DP x TP
# rank under ZeRO-3) and optimizer states (per DP x TP rank; ``bf16_`` for its BF16_Optimizer).
MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    """Tags in ``ckpt_dir`` that hold model states, in step order."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir()
            if p.is_dir() and any(MODEL_STATES.match(f.name) for f in p.iterdir())]
    return sorted(tags, key=lambda t: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", t)])


def _our_run_json(run: Path) -> bool:
    """Whether ``run/run.json`` is one a run of ours wrote (the first thing a start writes)."""
    try:
        content = json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and {"argv", "deepspeed_config", "data_meta"} <= content.keys()


def holds_a_run(run: Path) -> bool:
    """Whether ``run`` holds something a new start must not replace without --overwrite: a logged
    step, a checkpoint, or run files that are not ours (a foreign run.json, event files without
    our run.json). What a start of ours that failed before its first step left (its run.json, an
    empty checkpoints/, its first event files) is not a run: ``clear_failed_start`` removes it."""
    metrics = run / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return True
    ckpt = checkpoint_dir(run)
    if ckpt.is_dir() and any(ckpt.iterdir()):
        return True
    if (run / "run.json").exists():
        return not _our_run_json(run)
    events = run / "tensorboard"
    return events.is_dir() and any(events.iterdir())


def check_paths(run: Path, data: Path) -> None:
    """The run directory may not be the dataset, nor lie inside it or contain it: checkpoints and
    event files would be mixed into the dataset (and ``--overwrite`` would delete parts of it)."""
    r, d = run.resolve(), data.resolve()
    if r == d or d in r.parents or r in d.parents:
        relation = "is" if r == d else ("lies inside" if d in r.parents else "contains")
        raise ValueError(f"--output {run} {relation} --data {data}: give the run a directory of its own")


def check_run_dir(run: Path, resume: bool, overwrite: bool, resume_tag: str | None = None) -> str | None:
    """Validate the start mode against the directory; return the tag to resume from.

    Raises ValueError that says what to do when the request and the directory disagree.
    ``resume_tag``: resume from this checkpoint instead of the one ``latest`` names.
    """
    resume = resume or resume_tag is not None
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pick one")
    if run.exists() and not run.is_dir():
        raise ValueError(f"--output {run} exists and is not a directory")
    if resume:
        ckpt = checkpoint_dir(run)
        tags = checkpoint_tags(ckpt)
        available = ", ".join(tags) or "none"
        if resume_tag is not None:
            if resume_tag not in tags:
                raise ValueError(f"--resume-tag: no checkpoint {resume_tag!r} in {ckpt} (available: {available})")
            tag = resume_tag
        else:
            latest = ckpt / "latest"
            if not tags:
                raise ValueError(f"--resume: {run} has no checkpoint yet ({ckpt} holds none); start the run "
                                 "without --resume")
            if not latest.is_file():
                raise ValueError(f"--resume: {ckpt} has no 'latest' file naming the last complete checkpoint; "
                                 f"pick one with --resume-tag (available: {available})")
            tag = latest.read_text().strip()
            if tag not in tags:
                raise ValueError(f"--resume: {latest} names checkpoint {tag!r}, which is not in {ckpt} (deleted, "
                                 f"moved or incomplete?); pick one with --resume-tag (available: {available})")
        check_checkpoint_files(ckpt / tag, tags)
        return tag
    if holds_a_run(run) and not overwrite:
        raise ValueError(f"--output {run} already holds a run; pass --resume to continue it or "
                         "--overwrite to replace it")
    return None


def check_checkpoint_files(tag_dir: Path, tags: list[str]) -> None:
    """Every file torch wrote into the tag is a complete zip archive (torch.save's format; its
    directory sits at the end, so a truncated file has none). Checked before any process starts
    loading, so that a damaged file is named instead of failing deep inside DeepSpeed, on one
    rank, while the others wait in a collective."""
    earlier = tags[:tags.index(tag_dir.name)] if tag_dir.name in tags else []
    hint = (f"resume from an earlier checkpoint with --resume-tag {earlier[-1]}" if earlier
            else "no earlier checkpoint exists; start a new run")
    for f in sorted(tag_dir.glob("*.pt")):
        why = damaged(f)
        if why is not None:
            raise ValueError(f"--resume: {f} is damaged ({why}); {hint}")


def damaged(path: Path) -> str | None:
    """Why the torch file ``path`` cannot be complete, or None. torch.save writes a zip archive
    whose directory sits at the end, so a truncated file has none; reading it is cheap."""
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        return str(err)
    return None


def checkpoint_layout(tag_dir: Path) -> tuple[int, int] | None:
    """(data-parallel size, tensor-parallel size) a checkpoint was written with, read from its
    optimizer-state file names; None if it has none (not written by a ZeRO run)."""
    found = [OPTIM_STATES.match(f.name) for f in tag_dir.iterdir()]
    pairs = {(int(m.group(1)), int(m.group(2))) for m in found if m}
    if not pairs:
        return None
    return len({d for d, _ in pairs}), len({t for _, t in pairs})


def clear_run(run: Path) -> None:
    """Remove what a previous run left (rank 0, only with --overwrite); other files stay."""
    for f in RUN_FILES:
        (run / f).unlink(missing_ok=True)
    for d in RUN_DIRS:
        shutil.rmtree(run / d, ignore_errors=True)


def clear_failed_start(run: Path) -> None:
    """Remove what a start that never took a step left (``holds_a_run`` said it is ours and holds
    no step): its run.json, an empty metrics file, empty checkpoints/ and its event files."""
    assert not holds_a_run(run), f"{run} holds a run; clear_failed_start must not touch it"
    if (run / "run.json").exists():
        clear_run(run)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def commit_latest(ckpt_dir: Path, tag: str) -> None:
    """Point ``latest`` at ``tag`` with an atomic rename.

    Called by rank 0 only after every rank has finished writing ``tag`` (a barrier), so a
    process that dies mid-save leaves ``latest`` on the previous good checkpoint.
    """
    tmp = ckpt_dir / f".latest.tmp-{os.getpid()}"
    tmp.write_text(tag)
    os.replace(tmp, ckpt_dir / "latest")


def prune_checkpoints(ckpt_dir: Path, keep: int, current: str) -> None:
    """Delete the oldest ``global_step*`` checkpoints beyond the newest ``keep``."""
    if keep <= 0:
        return
    tags = sorted((p for p in ckpt_dir.glob("global_step*") if p.is_dir()),
                  key=lambda p: int(p.name.removeprefix("global_step") or 0))
    for old in tags[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past ``last_step`` (left by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
