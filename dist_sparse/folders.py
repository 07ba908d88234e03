"""What a folder holds, for the ``--overwrite`` rule every command shares.

``--overwrite`` means one thing everywhere: replace what this same command wrote there before,
never whatever happens to be at the path (a folder of the user's notes, another run). Each
command recognises its own output by what it writes:

* ``prepare-data``: ``meta.json`` (``dist_sparse.data.prepare.META_FILE``);
* a training run: ``run.json``, ``metrics.jsonl``, ``checkpoints/`` (``dist_sparse.train.run_dir``);
* ``export``: ``config.json`` beside a ``sparsity.json`` that names the checkpoint it came from and
  lists the files the export wrote, so that files added to the folder later are found too.

A refusal says what the folder is instead (:func:`describe`), so the user sees at once that the
path was another run, a dataset or a folder of their own. Only reads; never changes a file.
"""

from __future__ import annotations

import json
from pathlib import Path

DATASET_FILE = "meta.json"                            # dist_sparse.data.prepare.META_FILE
RUN_ENTRIES = ("run.json", "metrics.jsonl", "checkpoints")  # dist_sparse.train.run_dir.RUN_FILES/RUN_DIRS
EXPORT_REPORT = "sparsity.json"
EXPORT_CONFIG = "config.json"


def export_record(folder: Path) -> dict | None:
    """The ``sparsity.json`` of a folder that ``dist-sparse export`` wrote; None for any other folder.

    config.json alone is any Hugging Face model; a sparsity.json with the export's own keys
    (``format``, ``checkpoint``) beside it is ours.
    """
    if not (folder / EXPORT_CONFIG).is_file():
        return None
    try:
        record = json.loads((folder / EXPORT_REPORT).read_text())
    except (OSError, ValueError):  # absent, unreadable or not JSON: not an export of ours
        return None
    if isinstance(record, dict) and isinstance(record.get("checkpoint"), dict) and "format" in record:
        return record
    return None


def unlisted(folder: Path, listed: list[str] | None) -> list[str]:
    """Entries of ``folder`` that are not in ``listed`` (what the export wrote); none if it wrote
    no list (exports before the list was kept: then the marker alone says the folder is ours)."""
    if listed is None:
        return []
    ours = set(listed)
    return sorted(p.name for p in folder.iterdir() if p.name not in ours)


def run_entries(folder: Path) -> list[str]:
    """The entries of a training run that ``folder`` holds (empty: not a run)."""
    return [name + ("/" if (folder / name).is_dir() else "") for name in RUN_ENTRIES if (folder / name).exists()]


def is_dataset(folder: Path) -> bool:
    return (folder / DATASET_FILE).is_file()


def listing(folder: Path, limit: int = 4) -> str:
    """``a, b/, c, ... (N entries)``: the first names of a folder, directories marked with /."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def describe(folder: Path) -> str:
    """What a non-empty ``folder`` is, in a few words: the middle of a refusal message."""
    if export_record(folder) is not None:
        return "a dist_sparse export"
    entries = run_entries(folder)
    if entries:
        return f"a training run ({', '.join(entries)})"
    if is_dataset(folder):
        return f"a prepared dataset ({DATASET_FILE})"
    return f"a folder holding {listing(folder)}"


__all__ = ["describe", "export_record", "is_dataset", "listing", "run_entries", "unlisted"]
