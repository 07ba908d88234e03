"""SentencePiece training and the equivalent Hugging Face fast tokenizer."""

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from dist_sparse.data.corpus import default_corpus_files, read_documents
from dist_sparse.data.tokenizer import (
    SPECIAL_IDS,
    SPECIAL_TOKENS,
    SPM_MODEL_NAME,
    check_sentencepiece_model,
    load_tokenizer,
    resolve_sentencepiece_model,
    save_tokenizer,
    sentencepiece_model_type,
    train_sentencepiece,
)

SEQ_LEN = 64

# Text the tokenizers must agree on beyond plain prose: whitespace runs, tabs and newlines,
# compatibility characters that NFKC rewrites, accents, characters outside the vocabulary
# (-> [UNK]), digits and punctuation.
EDGE_CASES = [
    "  leading, trailing   and   repeated   spaces  ",
    "tabs\tand\nnewlines\r\nin one string",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ１２３ and ﬁ ligature, ½ fraction",
    "café vs cafe\u0301, naïve façade",
    "emoji 😀😀, CJK 漢字漢字 and a snowman ☃",
    "no\u00a0break\u2003em space\u3000ideographic",
    "$1,234,567.89 (approx.) -- 50% of [the] {budget}; e.g. U.S.A.",
    "x",
    "",
]


@pytest.fixture(scope="module")
def corpus_split():
    """Paragraphs of a few speeches to train on, and paragraphs of others to test on."""
    files = default_corpus_files()
    train_docs, _ = read_documents(files[:10])
    test_docs, _ = read_documents(files[200:204])
    train = [segment for doc in train_docs for segment in doc]
    test = [segment for doc in test_docs for segment in doc]
    return train, test[:300] + EDGE_CASES


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def trained(request, corpus_split, tmp_path_factory):
    train, _ = corpus_split
    root = tmp_path_factory.mktemp(request.param)
    model = train_sentencepiece(
        train, root / "model" / "x.model", vocab_size=800, model_type=request.param
    )
    hf = save_tokenizer(model, root / "DATA" / "tokenizer", SEQ_LEN)
    return request.param, model, root / "DATA", hf


def test_special_ids_fixed_in_spm_and_hf(trained):
    kind, model, data_dir, _ = trained
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert [sp.id_to_piece(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert sp.get_piece_size() == 800
    assert sentencepiece_model_type(model) == kind

    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    assert tok.is_fast
    assert tok.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [
        0,
        1,
        2,
        3,
        4,
    ]
    for role, token_id in SPECIAL_IDS.items():
        assert getattr(tok, f"{role}_token") == SPECIAL_TOKENS[role]
        assert getattr(tok, f"{role}_token_id") == token_id
    assert len(tok) == 800
    assert tok.model_max_length == SEQ_LEN
    assert (data_dir / "tokenizer" / SPM_MODEL_NAME).read_bytes() == model.read_bytes()


def test_hf_ids_equal_sentencepiece_ids(trained, corpus_split):
    _, model, data_dir, saved = trained
    _, sample = corpus_split
    sp = spm.SentencePieceProcessor(model_file=str(model))
    expected = sp.encode(sample)
    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    got = tok(sample, add_special_tokens=False)["input_ids"]
    mismatches = [(text, a, b) for text, a, b in zip(sample, got, expected, strict=True) if a != b]
    assert not mismatches, mismatches[:3]
    # the object prepare-data tokenises with is the one that was saved
    fast = [
        e.ids for e in saved.backend_tokenizer.encode_batch_fast(sample, add_special_tokens=False)
    ]
    assert fast == expected
    assert any(sp.unk_id() in ids for ids in expected)  # [UNK] runs were exercised
    assert (
        tok.decode(tok("Hello   world.")["input_ids"], skip_special_tokens=True) == "Hello world."
    )


def test_bert_post_processor_single_and_pair(trained):
    _, model, data_dir, _ = trained
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok = load_tokenizer(data_dir)  # the DATA dir works as well as DATA/tokenizer
    a, b = "The Congress shall assemble.", "Peace and war."
    ids_a, ids_b = sp.encode(a), sp.encode(b)
    single = tok(a)
    assert single["input_ids"] == [2, *ids_a, 3]
    assert single["token_type_ids"] == [0] * (len(ids_a) + 2)
    pair = tok(a, b)
    assert pair["input_ids"] == [2, *ids_a, 3, *ids_b, 3]
    assert pair["token_type_ids"] == [0] * (len(ids_a) + 2) + [1] * (len(ids_b) + 1)
    assert pair["attention_mask"] == [1] * len(pair["input_ids"])


def test_resolve_model_paths(trained, tmp_path):
    _, model, data_dir, _ = trained
    target = data_dir / "tokenizer" / SPM_MODEL_NAME
    assert resolve_sentencepiece_model(model) == model
    assert resolve_sentencepiece_model(data_dir / "tokenizer") == target
    assert resolve_sentencepiece_model(data_dir) == target
    with pytest.raises(ValueError, match="no such file"):
        resolve_sentencepiece_model(tmp_path / "nope")
    with pytest.raises(ValueError, match=f"no {SPM_MODEL_NAME} found"):
        resolve_sentencepiece_model(tmp_path)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="expected a sentencepiece .model"):
        resolve_sentencepiece_model(tmp_path / "x.json")
    with pytest.raises(ValueError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)


def test_foreign_model_without_our_special_ids_is_rejected(corpus_split, tmp_path):
    train, _ = corpus_split
    prefix = tmp_path / "plain"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train), model_prefix=str(prefix), vocab_size=300, minloglevel=2
    )
    with pytest.raises(ValueError, match=r"id 0 must be \[PAD\]"):
        check_sentencepiece_model(f"{prefix}.model")
    (tmp_path / "junk.model").write_bytes(b"\x00\x01not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        check_sentencepiece_model(tmp_path / "junk.model")


def test_training_errors_are_user_errors(tmp_path):
    with pytest.raises(ValueError, match="lower --vocab-size"):
        train_sentencepiece(["tiny corpus", "two lines"], tmp_path / "t.model", vocab_size=5000)
    with pytest.raises(ValueError, match="tokenizer type"):
        train_sentencepiece(["a"], tmp_path / "t.model", vocab_size=100, model_type="wordpiece")
    with pytest.raises(ValueError, match="at least 16"):
        train_sentencepiece(["a"], tmp_path / "t.model", vocab_size=8)
