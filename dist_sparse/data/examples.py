"""Pre-training examples from tokenised documents (pure functions, no I/O).

A tokenised document is a list of segments, each a list of token ids without special tokens.

- Packed MLM: all documents form one stream, documents separated by [SEP]; the stream is cut
  into bodies of seq_len-2 tokens, each wrapped as [CLS] body [SEP]; the short remainder is
  dropped, so every example has exactly seq_len tokens and no padding is wasted.
- NSP (BERT's recipe, as in Google's create_pretraining_data.py): segments (sentences) of
  one document are accumulated up to a target length and split at a segment boundary into A
  and B; B is the true continuation (label 0) or, half of the time, text from another
  document (label 1), and then the segments after A are put back for the next pair.

The ``*_batch`` functions adapt these to ``datasets.Dataset.map(batched=True)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

Document = Sequence[Sequence[int]]  # segments of token ids
MIN_SEQ_LEN = 16
NSP_IS_NEXT, NSP_RANDOM_NEXT = 0, 1


def check_seq_len(seq_len: int) -> None:
    if seq_len < MIN_SEQ_LEN:
        raise ValueError(f"--seq-len must be at least {MIN_SEQ_LEN}, got {seq_len}")


# --------------------------------------------------------------------------- packed MLM


def document_stream(documents: Sequence[Document], sep_id: int) -> np.ndarray:
    """Token ids of all documents in order, with [SEP] between consecutive documents."""
    parts: list[np.ndarray] = []
    for index, document in enumerate(documents):
        if index:
            parts.append(np.array([sep_id], dtype=np.int32))
        parts.extend(np.asarray(segment, dtype=np.int32) for segment in document)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def stream_length(num_tokens: Sequence[int]) -> int:
    """Length of `document_stream` for documents with these token counts."""
    return int(sum(num_tokens)) + max(len(num_tokens) - 1, 0)


def wrap_bodies(bodies: np.ndarray, cls_id: int, sep_id: int) -> np.ndarray:
    """[CLS] body [SEP] for each row of `bodies` (shape [n, seq_len-2])."""
    rows = bodies.shape[0]
    cls = np.full((rows, 1), cls_id, dtype=np.int32)
    sep = np.full((rows, 1), sep_id, dtype=np.int32)
    return np.concatenate([cls, bodies.astype(np.int32, copy=False), sep], axis=1)


def pack_stream(stream: np.ndarray, seq_len: int, cls_id: int, sep_id: int) -> np.ndarray:
    """Examples [n, seq_len] cut from a token stream; the last short remainder is dropped."""
    check_seq_len(seq_len)
    body = seq_len - 2
    count = len(stream) // body
    return wrap_bodies(np.asarray(stream[: count * body]).reshape(count, body), cls_id, sep_id)


def packed_examples(
    documents: Sequence[Document], seq_len: int, cls_id: int, sep_id: int
) -> list[list[int]]:
    """Packed MLM examples (each exactly seq_len ids) of `documents`."""
    return pack_stream(document_stream(documents, sep_id), seq_len, cls_id, sep_id).tolist()


def document_starts(num_tokens: Sequence[int]) -> np.ndarray:
    """Stream position of each document's first token (each later one follows a [SEP])."""
    lengths = np.asarray(num_tokens, dtype=np.int64)
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1] + 1, out=starts[1:])
    return starts


def num_packed_examples(num_tokens: Sequence[int], seq_len: int) -> int:
    return stream_length(num_tokens) // (seq_len - 2)


def packed_batch(
    batch: dict,
    *,
    documents,
    starts: np.ndarray,
    seq_len: int,
    cls_id: int,
    sep_id: int,
) -> dict:
    """`map` function over a dataset of consecutive example numbers (column `example`).

    Example k holds stream tokens [k*(seq_len-2), (k+1)*(seq_len-2)); only the documents that
    overlap the batch's range are read, so batches can be built in parallel workers.
    `documents` supports slicing to {"segment_ids": [...]} (a datasets.Dataset or a dict).
    """
    numbers = np.asarray(batch["example"], dtype=np.int64)
    if len(numbers) == 0:
        return {"input_ids": [], "token_type_ids": []}
    assert np.all(np.diff(numbers) == 1), "packed_batch needs consecutive example numbers"
    body = seq_len - 2
    begin, end = int(numbers[0]) * body, (int(numbers[-1]) + 1) * body
    first = int(np.searchsorted(starts, begin, side="right")) - 1
    last = int(np.searchsorted(starts, end - 1, side="right")) - 1
    piece = document_stream(documents[first : last + 1]["segment_ids"], sep_id)
    if last + 1 < len(starts):  # the [SEP] after `last` may be inside the range
        piece = np.append(piece, np.int32(sep_id))
    offset = begin - int(starts[first])
    bodies = piece[offset : offset + (end - begin)].reshape(len(numbers), body)
    input_ids = wrap_bodies(bodies, cls_id, sep_id)
    return {"input_ids": input_ids, "token_type_ids": np.zeros_like(input_ids)}


# --------------------------------------------------------------------------- NSP


def nsp_rng(seed: int, document_index: int) -> random.Random:
    """The generator for one document: results do not depend on batching or workers.

    A string seed is hashed with SHA-512 by `random`, so it is stable across processes and
    Python versions (unlike hash()).
    """
    return random.Random(f"nsp:{seed}:{document_index}")


def truncate_pair(
    tokens_a: list[int], tokens_b: list[int], max_tokens: int, rng: random.Random
) -> None:
    """Trim the longer of A/B one token at a time, from its front or back at random, in place.

    Trimming both ends, not only the back, avoids teaching the model that text near the end
    of a sequence is always cut off.
    """
    while len(tokens_a) + len(tokens_b) > max_tokens:
        longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        assert len(longer) > 1
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def make_pair(tokens_a: Sequence[int], tokens_b: Sequence[int], cls_id: int, sep_id: int):
    """[CLS] A [SEP] B [SEP] and its token types 0 for [CLS] A [SEP], 1 for B [SEP]."""
    input_ids = [cls_id, *tokens_a, sep_id, *tokens_b, sep_id]
    token_type_ids = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
    return input_ids, token_type_ids


def _target_length(max_tokens: int, short_seq_prob: float, rng: random.Random) -> int:
    # Mostly fill the sequence (padding is wasted compute); sometimes go shorter so the
    # model also sees the short inputs of fine-tuning.
    if rng.random() < short_seq_prob:
        return rng.randint(2, max_tokens)
    return max_tokens


def _flatten(segments: Sequence[Sequence[int]]) -> list[int]:
    return [token for segment in segments for token in segment]


def _other_document(document_index: int, num_documents: int, rng: random.Random) -> int:
    other = rng.randrange(num_documents - 1)
    return other + (other >= document_index)  # uniform over all documents but this one


def _random_continuation(document: Document, min_tokens: int, rng: random.Random) -> list[int]:
    """Whole segments of `document` from a random start until at least `min_tokens`."""
    tokens: list[int] = []
    for segment in document[rng.randrange(len(document)) :]:
        tokens.extend(segment)
        if len(tokens) >= min_tokens:
            break
    return tokens


class PairSpan(NamedTuple):
    """Where one NSP pair lies in its document, in segment (sentence) indices.

    A is segments [start, split). For "is next", B is segments [split, end). For "random next",
    B comes from another document, filled up to ``target`` tokens with A, and the segments
    [split, end) are not used: the next pair starts at ``split`` (BERT puts them back).
    """

    start: int
    split: int
    end: int
    is_next: bool
    target: int


def chunk_end(lengths: Sequence[int], start: int, target: int) -> int:
    """End (exclusive) of the chunk that begins at segment `start`.

    Segments are added until the chunk holds `target` tokens and at least two segments, or
    the document ends. Google's code closes a chunk at `target` tokens alone and then has to
    make every one-segment chunk "random next" (A|B must fall on a segment boundary); on the
    default corpus' sentences (vocabulary 8000) that is 4% of the chunks at --seq-len 128 and
    17% at 64 (mostly a sentence longer than a short target), which tilts the labels to 52% and
    58% random. Asking for a second sentence leaves only a document's lone last sentence
    without a continuation; a short target then gives two sentences, truncated if need be.
    """
    tokens, end = 0, start
    while end < len(lengths):
        tokens += lengths[end]
        end += 1
        if tokens >= target and end - start >= 2:
            break
    return end


def pair_spans(
    lengths: Sequence[int], max_tokens: int, rng: random.Random, short_seq_prob: float
) -> list[PairSpan]:
    """The NSP pairs of a document whose segments have these token counts, in order.

    As BERT's create_instances_from_document: fill a target length with segments, split the
    chunk at a random segment boundary, keep the true continuation as B or, with probability
    1/2, take B from another document and put the unused segments back. So every segment is
    used exactly once, in document order, as part of an A or of an "is next" B.
    The label is an even coin for every chunk of two or more segments; only a lone last
    segment is "random next" by necessity (about 0.5% of the pairs on the default corpus).
    """
    spans: list[PairSpan] = []
    start = 0
    while start < len(lengths):
        target = _target_length(max_tokens, short_seq_prob, rng)
        end = chunk_end(lengths, start, target)
        if end - start == 1:  # a document's lone last segment: no continuation exists
            span = PairSpan(start, end, end, False, target)
        else:
            split = rng.randint(start + 1, end - 1)
            span = PairSpan(start, split, end, rng.random() >= 0.5, target)
        spans.append(span)
        start = span.end if span.is_next else span.split
    return spans


def nsp_instances(
    document_index: int,
    num_documents: int,
    get_document: Callable[[int], Document],
    *,
    seq_len: int,
    cls_id: int,
    sep_id: int,
    rng: random.Random,
    short_seq_prob: float = 0.1,
) -> list[dict]:
    """NSP examples of one document, following BERT's create_instances_from_document.

    Segments are sentences (``data.sentences``). Differences from Google's code: a chunk takes
    at least two segments (see `chunk_end`), so the labels are balanced; the random target
    length is drawn again for every pair rather than once per document, so short examples are
    spread over all documents; all spans are drawn before the random B's.
    """
    if num_documents < 2:
        raise ValueError(
            "NSP needs at least 2 documents (B of a 'random next' pair comes from another "
            "document); add documents or leave out --nsp"
        )
    check_seq_len(seq_len)
    max_tokens = seq_len - 3  # [CLS] A [SEP] B [SEP]
    document = [segment for segment in get_document(document_index) if len(segment)]
    spans = pair_spans([len(segment) for segment in document], max_tokens, rng, short_seq_prob)
    instances: list[dict] = []
    for span in spans:
        tokens_a = _flatten(document[span.start : span.split])
        if span.is_next:
            label, tokens_b = NSP_IS_NEXT, _flatten(document[span.split : span.end])
        else:
            other_index = _other_document(document_index, num_documents, rng)
            other = [segment for segment in get_document(other_index) if len(segment)]
            if not other:
                raise ValueError(f"document {other_index} has no tokens; drop empty documents")
            label = NSP_RANDOM_NEXT
            tokens_b = _random_continuation(other, span.target - len(tokens_a), rng)
        truncate_pair(tokens_a, tokens_b, max_tokens, rng)
        input_ids, token_type_ids = make_pair(tokens_a, tokens_b, cls_id, sep_id)
        instances.append(
            {"input_ids": input_ids, "token_type_ids": token_type_ids, "next_sentence_label": label}
        )
    return instances


def nsp_examples(
    documents: Sequence[Document],
    *,
    seq_len: int,
    cls_id: int,
    sep_id: int,
    seed: int,
    short_seq_prob: float = 0.1,
) -> list[dict]:
    """NSP examples of all in-memory `documents`, in document order."""
    examples: list[dict] = []
    for index in range(len(documents)):
        examples.extend(
            nsp_instances(
                index,
                len(documents),
                documents.__getitem__,
                seq_len=seq_len,
                cls_id=cls_id,
                sep_id=sep_id,
                rng=nsp_rng(seed, index),
                short_seq_prob=short_seq_prob,
            )
        )
    return examples


def nsp_batch(
    batch: dict,
    indices: list[int],
    *,
    documents,
    seq_len: int,
    cls_id: int,
    sep_id: int,
    seed: int,
    short_seq_prob: float = 0.1,
) -> dict:
    """`map(batched=True, with_indices=True)` function over documents (column `segment_ids`).

    `documents` is the whole split (random B comes from any of its documents); rows of the
    batch are taken from `batch` to avoid reading them again.
    """
    in_batch = dict(zip(indices, batch["segment_ids"], strict=True))
    num_documents = len(documents)

    def get_document(index: int) -> Document:
        if index in in_batch:
            return in_batch[index]
        return documents[index]["segment_ids"]

    out: dict[str, list] = {"input_ids": [], "token_type_ids": [], "next_sentence_label": []}
    for index in indices:
        for instance in nsp_instances(
            index,
            num_documents,
            get_document,
            seq_len=seq_len,
            cls_id=cls_id,
            sep_id=sep_id,
            rng=nsp_rng(seed, index),
            short_seq_prob=short_seq_prob,
        ):
            for key, value in instance.items():
                out[key].append(value)
    return out


# --------------------------------------------------------------------------- train/eval split


def split_documents(
    num_tokens: Sequence[int],
    *,
    eval_fraction: float,
    seed: int,
    seq_len: int,
    nsp: bool,
) -> tuple[list[int], list[int]]:
    """Hold out whole documents for evaluation: (train indices, eval indices), both sorted.

    Documents are taken in a seeded random order until the eval split has its share of the
    documents AND can produce at least one example (>= 2 documents for NSP, one full
    sequence of tokens for packed MLM). The train split must satisfy the same minimum.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    check_seq_len(seq_len)
    count = len(num_tokens)
    order = list(range(count))
    random.Random(f"split:{seed}").shuffle(order)
    wanted = max(2 if nsp else 1, round(eval_fraction * count))
    taken = eval_tokens = 0
    while taken < count and not (
        taken >= wanted and _can_make_example(taken, eval_tokens, seq_len, nsp)
    ):
        eval_tokens += int(num_tokens[order[taken]])
        taken += 1
    train_tokens = int(sum(num_tokens)) - eval_tokens
    if not (
        _can_make_example(taken, eval_tokens, seq_len, nsp)
        and _can_make_example(count - taken, train_tokens, seq_len, nsp)
    ):
        raise ValueError(_too_small(count, eval_tokens + train_tokens, seq_len, nsp))
    return sorted(order[taken:]), sorted(order[:taken])


def _too_small(count: int, tokens: int, seq_len: int, nsp: bool) -> str:
    """What a corpus too small for a train and an eval split lacks, and what to do about it.

    The eval split holds out whole documents (at least one, two for NSP pairs, whatever
    --eval-fraction says), so the number of documents is checked first: a single file is a
    single document however long it is.
    """
    docs_per_split = 2 if nsp else 1
    if count < 2 * docs_per_split:
        return (f"the corpus has {count} document{'s' if count != 1 else ''}; the train and eval splits hold out "
                f"whole documents and need at least {2 * docs_per_split} ({docs_per_split} each"
                f"{', for NSP pairs' if nsp else ''}): add documents (one .txt file, JSON line or row per "
                "document)")
    return (f"the corpus ({count} documents, {tokens} tokens) is too small: the train and the eval split each "
            f"need {seq_len - 2} tokens for one sequence of --seq-len {seq_len}; add text or lower --seq-len")


def _can_make_example(num_documents: int, tokens: int, seq_len: int, nsp: bool) -> bool:
    if nsp:
        return num_documents >= 2
    return tokens + max(num_documents - 1, 0) >= seq_len - 2  # stream with [SEP]s
