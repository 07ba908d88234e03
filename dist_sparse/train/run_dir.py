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
import shutil
import zipfile
from pathlib import Path

from dist_sparse.folders import write_atomic
from dist_sparse.train.checkpoint import CHECKPOINTS_DIR, checkpoint_tags, damaged

RUN_FILES = ("run.json", "metrics.jsonl")
RUN_DIRS = (CHECKPOINTS_DIR, "tensorboard")


def checkpoint_dir(run: Path) -> Path:
    return run / CHECKPOINTS_DIR


def read_run_json(run: Path) -> dict:
    """What the run recorded when it started (its data, length, config), or {} if ``run/run.json``
    is missing, unreadable or not a JSON object."""
    try:
        content = json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _our_run_json(run: Path) -> bool:
    """Whether ``run/run.json`` is one a run of ours wrote (the first thing a start writes)."""
    return {"argv", "deepspeed_config", "data_meta"} <= read_run_json(run).keys()


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


def foreign_run_files(run: Path) -> str | None:
    """What in ``run`` looks like a run but no run of ours wrote (a run.json without our keys,
    event files without a run.json), or None. ``--overwrite`` replaces only what a run of ours
    wrote, as ``export --overwrite`` replaces only a previous export."""
    if (run / "run.json").exists():
        return None if _our_run_json(run) else "a run.json that dist_sparse did not write"
    metrics = run / "metrics.jsonl"
    ckpt = checkpoint_dir(run)
    if (metrics.is_file() and metrics.stat().st_size > 0) or (ckpt.is_dir() and any(ckpt.iterdir())):
        return None  # our own names; a run of ours whose run.json was removed
    events = run / "tensorboard"
    return "event files in tensorboard/ without a run.json" if events.is_dir() and any(events.iterdir()) else None


def other_folder_kind(run: Path) -> str | None:
    """What ``run`` is when it is a folder another command of ours wrote (a prepared dataset or task,
    a Hugging Face export), or None. A run written into one would mix its files into it, and a
    later ``prepare-data --overwrite`` / ``export --overwrite`` of that folder would delete the run."""
    if (run / "meta.json").is_file():
        return "a prepared dataset or task (meta.json)"
    if (run / "config.json").is_file():
        return "a Hugging Face model folder (config.json)"
    return None


def check_paths(run: Path, data: Path) -> None:
    """The run directory may not be the dataset, nor lie inside it or contain it: checkpoints and
    event files would be mixed into the dataset (and ``--overwrite`` would delete parts of it).
    Nor may it be another dataset or an export (:func:`other_folder_kind`)."""
    r, d = run.resolve(), data.resolve()
    if r == d or d in r.parents or r in d.parents:
        relation = "is" if r == d else ("lies inside" if d in r.parents else "contains")
        raise ValueError(f"--output {run} {relation} --data {data}: give the run a directory of its own")
    kind = other_folder_kind(run)
    if kind is not None:
        raise ValueError(f"--output {run} is {kind}, not a run directory: give the run a directory of its own")


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
    if holds_a_run(run):
        foreign = foreign_run_files(run)
        if foreign is not None:
            raise ValueError(f"--output {run} holds {foreign}; refusing to replace it even with --overwrite "
                             "(it replaces only a run of dist_sparse): move it out or choose another --output")
        if not overwrite:
            raise ValueError(f"--output {run} already holds a run; pass --resume to continue it or "
                             "--overwrite to replace it")
    return None


def check_checkpoint_files(tag_dir: Path, tags: list[str], share: tuple[int, int] | None = None) -> None:
    """Every file torch wrote into the tag is a complete zip archive (torch.save's format; its
    directory sits at the end, so a truncated file has none), and, for this rank's share of the
    files, every member still has the CRC-32 it was written with (torch.load does not check it:
    a file whose bytes changed loads without a word). Checked before any process starts loading,
    so that a damaged file is named instead of failing deep inside DeepSpeed, on one rank, while
    the others wait in a collective, or being trained on.

    ``share``: (rank, world) — this rank reads every world-th file for the CRC check, so the
    ranks together read the checkpoint once; None takes RANK and WORLD_SIZE from the launcher's
    environment (one process alone checks all of them). The refusal names the newest earlier
    checkpoint whose files are all whole: falling back is the user's decision (``--resume-tag``).
    """
    rank, world = share if share is not None else (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    files = sorted(tag_dir.glob("*.pt"))
    for f in files:
        why = damaged(f)
        if why is not None:
            _refuse(f, f"not a complete torch file: {why}; truncated?", tag_dir, tags)
    for f in files[rank::max(world, 1)]:
        why = crc_mismatch(f)
        if why is not None:
            _refuse(f, why, tag_dir, tags)


def crc_mismatch(path: Path) -> str | None:
    """Why a zip archive's member no longer matches the CRC-32 recorded when it was written, or None."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as err:  # zlib and truncation errors included
        return f"unreadable: {err}"
    return None if bad is None else f"its member {bad} fails its CRC-32 check: bytes changed after it was written"


def whole_checkpoint(tag_dir: Path) -> bool:
    """Whether every torch file of the tag is complete and passes its CRC check (reads them all)."""
    return all(damaged(f) is None and crc_mismatch(f) is None for f in tag_dir.glob("*.pt"))


def _refuse(f: Path, why: str, tag_dir: Path, tags: list[str]):
    earlier = tags[:tags.index(tag_dir.name)] if tag_dir.name in tags else []
    fallback = next((t for t in reversed(earlier) if whole_checkpoint(tag_dir.parent / t)), None)
    hint = (f"resume from the newest undamaged earlier checkpoint with --resume-tag {fallback}" if fallback
            else "no undamaged earlier checkpoint exists; start a new run (--overwrite)")
    raise ValueError(f"--resume: {f} is damaged ({why}); {hint}")


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


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past ``last_step`` (left by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    write_atomic(path, "".join(line + "\n" for line in kept))
