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


def holds_a_run(run: Path) -> bool:
    return any((run / f).exists() for f in RUN_FILES + RUN_DIRS)


def check_run_dir(run: Path, resume: bool, overwrite: bool) -> str | None:
    """Validate the start mode against the directory; return the tag to resume from.

    Raises ValueError that says what to do when the request and the directory disagree.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pick one")
    if run.exists() and not run.is_dir():
        raise ValueError(f"--output {run} exists and is not a directory")
    if resume:
        tag = latest_tag(checkpoint_dir(run))
        if tag is None:
            raise ValueError(f"--resume: no checkpoint to resume from in {checkpoint_dir(run)} "
                             "(no 'latest' naming an existing checkpoint); start without --resume")
        return tag
    if holds_a_run(run) and not overwrite:
        raise ValueError(f"--output {run} already holds a run; pass --resume to continue it or "
                         "--overwrite to replace it")
    return None


def clear_run(run: Path) -> None:
    """Remove what a previous run left (rank 0, only with --overwrite); other files stay."""
    for f in RUN_FILES:
        (run / f).unlink(missing_ok=True)
    for d in RUN_DIRS:
        shutil.rmtree(run / d, ignore_errors=True)


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
