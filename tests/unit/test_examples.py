"""Packed MLM and NSP example construction, and the held-out eval split."""

import random

import datasets
import pytest

from dist_sparse.data.examples import (
    NSP_IS_NEXT,
    NSP_RANDOM_NEXT,
    chunk_end,
    document_starts,
    document_stream,
    make_pair,
    nsp_batch,
    nsp_examples,
    nsp_rng,
    num_packed_examples,
    packed_batch,
    packed_examples,
    pair_spans,
    split_documents,
    truncate_pair,
)

datasets.disable_progress_bars()
CLS, SEP = 2, 3


def unique_token_corpus(num_docs, seed=0, max_segments=12, max_segment_len=40):
    """Documents whose every token id is unique, so each token's origin is known exactly.

    Returns (documents, origin) with origin[token] = (document, segment, position in doc).
    """
    rng = random.Random(seed)
    documents, origin, next_id = [], {}, 10
    for d in range(num_docs):
        document, position = [], 0
        for s in range(rng.randint(1, max_segments)):
            segment = list(range(next_id, next_id + rng.randint(1, max_segment_len)))
            next_id += len(segment)
            for token in segment:
                origin[token] = (d, s, position)
                position += 1
            document.append(segment)
        documents.append(document)
    return documents, origin


# --------------------------------------------------------------------------- packed


def test_document_stream_separates_documents():
    docs = [[[5, 6], [7]], [[8]], [[9, 10]]]
    assert document_stream(docs, SEP).tolist() == [5, 6, 7, SEP, 8, SEP, 9, 10]
    assert document_starts([3, 1, 2]).tolist() == [0, 4, 6]


@pytest.mark.parametrize("seq_len", [16, 17, 128])
def test_packed_lengths_exact(seq_len):
    documents, _ = unique_token_corpus(30, seed=seq_len)
    stream = document_stream(documents, SEP)
    examples = packed_examples(documents, seq_len, CLS, SEP)
    body = seq_len - 2
    assert len(examples) == len(stream) // body
    assert len(examples) == num_packed_examples([sum(map(len, d)) for d in documents], seq_len)
    assert all(len(example) == seq_len for example in examples)
    assert all(example[0] == CLS and example[-1] == SEP for example in examples)
    bodies = [token for example in examples for token in example[1:-1]]
    assert bodies == stream[: len(examples) * body].tolist()  # only the remainder is dropped
    assert len(stream) - len(bodies) < body


def test_packed_examples_drop_short_remainder():
    assert packed_examples([[[7] * 13]], 16, CLS, SEP) == []
    assert packed_examples([[[7] * 14]], 16, CLS, SEP) == [[CLS] + [7] * 14 + [SEP]]
    with pytest.raises(ValueError, match="at least 16"):
        packed_examples([[[7] * 30]], 15, CLS, SEP)


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_packed_batch_matches_in_memory_packing(batch_size):
    documents, _ = unique_token_corpus(25, seed=3)
    seq_len = 32
    expected = packed_examples(documents, seq_len, CLS, SEP)
    table = datasets.Dataset.from_dict({"segment_ids": documents})
    numbers = datasets.Dataset.from_dict({"example": list(range(len(expected)))})
    built = numbers.map(
        packed_batch,
        batched=True,
        batch_size=batch_size,
        remove_columns=["example"],
        fn_kwargs={
            "documents": table,
            "starts": document_starts([sum(map(len, d)) for d in documents]),
            "seq_len": seq_len,
            "cls_id": CLS,
            "sep_id": SEP,
        },
    )
    assert built["input_ids"] == expected
    assert all(set(types) == {0} for types in built["token_type_ids"])


# --------------------------------------------------------------------------- NSP


def test_make_pair_and_truncate_pair():
    ids, types = make_pair([10, 11], [12], CLS, SEP)
    assert ids == [CLS, 10, 11, SEP, 12, SEP]
    assert types == [0, 0, 0, 0, 1, 1]
    rng = random.Random(0)
    a, b = list(range(100, 130)), list(range(200, 210))
    truncate_pair(a, b, 25, rng)
    assert len(a) + len(b) == 25 and len(b) == 10  # only the longer one was trimmed
    assert a == list(range(a[0], a[0] + len(a)))  # still contiguous
    assert a[0] > 100 and a[-1] < 129  # trimmed from both ends (for this seed)


def _check_pair(example, seq_len):
    ids, types = example["input_ids"], example["token_type_ids"]
    assert len(ids) <= seq_len and len(types) == len(ids)
    assert ids[0] == CLS and ids[-1] == SEP
    seps = [i for i, token in enumerate(ids) if token == SEP]
    assert len(seps) == 2 and ids.count(CLS) == 1
    a, b = ids[1 : seps[0]], ids[seps[0] + 1 : -1]
    assert a and b
    assert types == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    return a, b


def _contiguous(tokens, origin):
    docs = {origin[t][0] for t in tokens}
    positions = [origin[t][2] for t in tokens]
    return len(docs) == 1 and positions == list(range(positions[0], positions[0] + len(tokens)))


def test_chunk_end_needs_the_target_and_two_segments():
    lengths = [5, 5, 5, 1, 1, 20]
    assert chunk_end(lengths, 0, 3) == 2  # 5 >= 3 already, but A|B needs a second segment
    assert chunk_end(lengths, 0, 10) == 2
    assert chunk_end(lengths, 0, 11) == 3
    assert chunk_end(lengths, 2, 7) == 5
    assert chunk_end(lengths, 3, 1000) == 6  # the document ends first
    assert chunk_end(lengths, 5, 2) == 6  # a lone last segment
    assert chunk_end(lengths, 6, 2) == 6


def _sentence_lengths(rng, count, longest):
    return [rng.randint(1, longest) for _ in range(count)]


@pytest.mark.parametrize("max_tokens", [13, 61, 125])
def test_pair_spans_use_every_segment_once_in_order(max_tokens):
    rng = random.Random(max_tokens)
    documents = [_sentence_lengths(rng, rng.randint(1, 30), 80) for _ in range(1000)]
    coins = []
    for d, lengths in enumerate(documents):
        spans = pair_spans(lengths, max_tokens, random.Random(d), short_seq_prob=0.1)
        used, start = [], 0
        for k, span in enumerate(spans):
            assert span.start == start and span.start < span.split <= span.end <= len(lengths)
            assert 2 <= span.target <= max_tokens
            # the chunk closes as soon as it holds the target and two segments
            assert span.end == chunk_end(lengths, span.start, span.target)
            if span.end - span.start == 1:  # only a document's lone last segment
                assert span.end == len(lengths) and k == len(spans) - 1
                assert span.split == span.end and not span.is_next
            else:
                assert span.split < span.end
            used += range(span.start, span.split)
            if span.is_next:
                used += range(span.split, span.end)
            start = span.end if span.is_next else span.split  # a random B puts the rest back
            if span.end - span.start >= 2:
                coins.append(span.is_next)
        # A and "is next" B take each segment exactly once, in document order
        assert used == list(range(len(lengths))) and start == len(lengths)
    # the label is an even coin for every chunk, including those whose segments are longer
    # than the target or than max_tokens (Google's code makes these all "random next")
    assert abs(coins.count(False) / len(coins) - 0.5) <= 0.02, coins.count(False) / len(coins)


def test_nsp_pairs_exact():
    """Every pair is [CLS] A [SEP] B [SEP] within seq_len; A is the text of its span and an "is
    next" B the text right after it (exactly, or a contiguous part where the pair had to be
    truncated); a random B is contiguous text of another document."""
    exact = truncated = 0
    for seq_len in (16, 64, 128):
        documents, origin = unique_token_corpus(40, seed=seq_len)
        examples = nsp_examples(documents, seq_len=seq_len, cls_id=CLS, sep_id=SEP, seed=7)
        labels = [e["next_sentence_label"] for e in examples]
        assert labels.count(NSP_IS_NEXT) > 0 and labels.count(NSP_RANDOM_NEXT) > 0
        segment_starts = {t for doc in documents for segment in doc for t in segment[:1]}
        position = 0
        for d, document in enumerate(documents):
            spans = pair_spans([len(s) for s in document], seq_len - 3, nsp_rng(7, d), 0.1)
            mine = examples[position : position + len(spans)]
            for span, example in zip(spans, mine, strict=True):
                a, b = _check_pair(example, seq_len)
                assert _contiguous(a, origin) and _contiguous(b, origin)
                full_a = [t for segment in document[span.start : span.split] for t in segment]
                assert _is_part(a, full_a)
                if span.is_next:
                    assert example["next_sentence_label"] == NSP_IS_NEXT
                    full_b = [t for segment in document[span.split : span.end] for t in segment]
                    assert _is_part(b, full_b)
                    if len(full_a) + len(full_b) <= seq_len - 3:
                        assert (a, b) == (full_a, full_b)  # consecutive sentences, untouched
                        exact += 1
                    else:
                        truncated += 1
                else:
                    assert example["next_sentence_label"] == NSP_RANDOM_NEXT
                    assert origin[b[0]][0] != d
                    # B starts at a segment of the other document unless truncation trimmed it
                    assert b[0] in segment_starts or len(a) + len(b) == seq_len - 3
            position += len(spans)
        assert position == len(examples)
    assert exact > 0 and truncated > 0


def _is_part(tokens, full):
    """`tokens` is a non-empty contiguous run of `full`."""
    return bool(tokens) and any(full[i : i + len(tokens)] == tokens for i in range(len(full)))


def test_nsp_deterministic_and_seeded():
    documents, _ = unique_token_corpus(12, seed=1)
    kwargs = dict(seq_len=64, cls_id=CLS, sep_id=SEP)
    first = nsp_examples(documents, seed=5, **kwargs)
    assert first == nsp_examples(documents, seed=5, **kwargs)
    assert first != nsp_examples(documents, seed=6, **kwargs)


@pytest.mark.parametrize("batch_size", [1, 5, 100])
def test_nsp_batch_independent_of_batching(batch_size):
    documents, _ = unique_token_corpus(15, seed=2)
    expected = nsp_examples(documents, seq_len=48, cls_id=CLS, sep_id=SEP, seed=3)
    table = datasets.Dataset.from_dict({"segment_ids": documents})
    built = table.map(
        nsp_batch,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        remove_columns=["segment_ids"],
        fn_kwargs={"documents": table, "seq_len": 48, "cls_id": CLS, "sep_id": SEP, "seed": 3},
    )
    assert built.to_list() == expected


def test_nsp_needs_two_documents():
    with pytest.raises(ValueError, match="at least 2 documents"):
        nsp_examples([[[10, 11], [12]]], seq_len=32, cls_id=CLS, sep_id=SEP, seed=0)


# --------------------------------------------------------------------------- split


def test_split_holds_out_whole_documents():
    num_tokens = [50] * 300
    train, held = split_documents(num_tokens, eval_fraction=0.01, seed=1, seq_len=128, nsp=False)
    assert len(held) == 3 and sorted(train + held) == list(range(300))
    assert train == sorted(train) and held == sorted(held)
    again = split_documents(num_tokens, eval_fraction=0.01, seed=1, seq_len=128, nsp=False)
    assert again == (train, held)
    other = split_documents(num_tokens, eval_fraction=0.01, seed=2, seq_len=128, nsp=False)
    assert other[1] != held


def test_split_guarantees_an_eval_example():
    # small documents: eval needs several of them to fill one packed sequence
    num_tokens = [10] * 50
    train, held = split_documents(num_tokens, eval_fraction=0.0, seed=0, seq_len=64, nsp=False)
    eval_stream = sum(num_tokens[i] for i in held) + len(held) - 1
    assert eval_stream >= 62 and len(held) == 6
    _, held_nsp = split_documents(num_tokens, eval_fraction=0.0, seed=0, seq_len=64, nsp=True)
    assert len(held_nsp) == 2


def test_split_errors_when_corpus_too_small():
    with pytest.raises(ValueError, match=r"the corpus has 1 document; .* need at least 2 \(1 each\)"):
        split_documents([100], eval_fraction=0.01, seed=0, seq_len=64, nsp=False)
    with pytest.raises(ValueError, match=r"the corpus has 3 documents; .* need at least 4 \(2 each, for NSP"):
        split_documents([100, 100, 100], eval_fraction=0.01, seed=0, seq_len=64, nsp=True)
    with pytest.raises(ValueError, match=r"\(3 documents, 60 tokens\) is too small: .* each need 62 tokens"):
        split_documents([20, 20, 20], eval_fraction=0.01, seed=0, seq_len=64, nsp=False)
    with pytest.raises(ValueError, match="eval-fraction"):
        split_documents([100, 100], eval_fraction=1.0, seed=0, seq_len=64, nsp=False)
    train, held = split_documents([70, 70], eval_fraction=0.5, seed=0, seq_len=64, nsp=False)
    assert len(train) == len(held) == 1 and set(train + held) == {0, 1}


def test_sentence_splitting_keeps_abbreviations_and_initials_together():
    from dist_sparse.data.sentences import split_sentences

    text = ('Mr. Smith went to Washington. He said "Hello!" Then he left. The U.S. Congress met on Jan. 5. '
            'We have 3.5 percent growth. And J. F. Kennedy spoke? (This was noted.) Yes.')
    assert split_sentences(text) == [
        "Mr. Smith went to Washington.", 'He said "Hello!"', "Then he left.", "The U.S. Congress met on Jan. 5.",
        "We have 3.5 percent growth.", "And J. F. Kennedy spoke?", "(This was noted.)", "Yes."]
    # "no", "art" and the pronoun "I" end sentences; "No." before a number does not
    text = ("The answer is no. We go on. See No. 5 and Art. 2 of it. It is state of the art. "
            "Then came I. The G.I. Bill passed. He said \"No.\" Then left.")
    assert split_sentences(text) == [
        "The answer is no.", "We go on.", "See No. 5 and Art. 2 of it.", "It is state of the art.",
        "Then came I.", "The G.I. Bill passed.", 'He said "No."', "Then left."]
    assert split_sentences("no end here") == ["no end here"]
    assert split_sentences("  ") == []
    assert " ".join(split_sentences(text)) == text
