"""What a folder holds, for the ``--overwrite`` rule every command shares.

``--overwrite`` means one thing everywhere: replace what this same command wrote there before,
never whatever happens to be at the path (a folder of the user's notes, another run). Each
command recognises its own output by what it writes:

* ``prepare-data``: ``meta.json`` (``dist_sparse.data.prepare.META_FILE``);
* a training run: ``run.json``, ``metrics.jsonl``, ``checkpoints/`` (``dist_sparse.train.run_dir``);
* ``export``: ``config.json`` beside a ``sparsity.json`` that names the checkpoint it came from and
  lists the files the export wrote, so that files added to the folder later are found too.

A refusal says what the folder is instead (:func:`describe`), so the user sees at once that the
path was another run, a dataset or a folder of their own; these only read.

What every command writes is put in place the same way, so that a reader (another rank, a
resumed run, the user) sees the old content or the new, never a half-written one:
:func:`write_atomic` / :func:`write_json_atomic` for a small file (run.json, ``latest``,
structure.json, metrics.jsonl), :func:`publish_folder` for a finished folder (a prepared
dataset, an export).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
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


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` by one rename of a sibling temporary file; on any failure
    the temporary file is removed and ``path`` keeps its old content."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    """``obj`` as indented JSON with sorted keys (values JSON does not know as strings)."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def publish_folder(new: Path, dest: Path) -> None:
    """Put the finished folder ``new`` (made beside ``dest``: one file system) at ``dest`` by renames.

    An existing ``dest`` is first moved into a fresh hidden sibling and deleted only once ``new``
    is in place; if that rename fails it is moved back. So ``dest`` is always whole: the old
    folder or the new one.
    """
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        try:
            os.rename(dest, old / dest.name)
        except BaseException:  # dest cannot be moved (a read-only folder): leave no hidden sibling
            old.rmdir()
            raise
    try:
        os.rename(new, dest)
    except BaseException:
        if old is not None:
            os.rename(old / dest.name, dest)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


__all__ = ["describe", "export_record", "is_dataset", "listing", "publish_folder", "run_entries", "unlisted",
           "write_atomic", "write_json_atomic"]
