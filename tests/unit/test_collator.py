"""Dynamic MLM masking: padding, statistics, special tokens, determinism."""

import pytest
import torch

from dist_sparse.data.collator import IGNORE_INDEX, MlmCollator

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = [PAD, UNK, CLS, SEP, MASK]
VOCAB = 1000


def make_collator(seq_len=128, p=0.15):
    return MlmCollator(PAD, MASK, VOCAB, SPECIAL, seq_len, mlm_probability=p)


def random_examples(count, seq_len, seed=0, nsp=False):
    """Examples of random lengths with [CLS]/[SEP] and some [UNK]s inside."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=g))
        ids = torch.randint(5, VOCAB, (length,), generator=g)
        ids[0], ids[-1], ids[length // 2] = CLS, SEP, SEP
        ids[torch.rand(length, generator=g) < 0.01] = UNK
        example = {"input_ids": ids.tolist(), "token_type_ids": [0] * length}
        if nsp:
            example["token_type_ids"] = [0] * (length // 2 + 1) + [1] * (length - length // 2 - 1)
            example["next_sentence_label"] = int(torch.randint(2, (1,), generator=g))
        examples.append(example)
    return examples


def test_padding_static_shapes_and_fields():
    collator = make_collator(seq_len=16)
    examples = [
        {
            "input_ids": [CLS, 10, 11, SEP, 12, SEP],
            "token_type_ids": [0, 0, 0, 0, 1, 1],
            "next_sentence_label": 1,
        },
        {
            "input_ids": [CLS] + [20] * 14 + [SEP],
            "token_type_ids": [0] * 16,
            "next_sentence_label": 0,
        },
    ]
    batch = collator(examples, torch.Generator().manual_seed(0))
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "labels",
        "next_sentence_label",
        "mlm_positions",
    }
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert batch[key].shape == (2, 16) and batch[key].dtype == torch.int64
    # the one field whose length varies: the masked tokens' flat indices (tests/unit/test_mlm_positions.py)
    assert torch.equal(batch["mlm_positions"], torch.nonzero(batch["labels"].flatten() != -100).flatten())
    assert batch["attention_mask"][0].tolist() == [1] * 6 + [0] * 10
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1] + [0] * 10
    assert batch["input_ids"][0, 6:].tolist() == [PAD] * 10
    assert batch["labels"][0, 6:].tolist() == [IGNORE_INDEX] * 10
    assert batch["next_sentence_label"].tolist() == [1, 0]
    # packed examples carry no NSP label
    assert "next_sentence_label" not in collator(
        [{"input_ids": [CLS, 9, SEP]}], torch.Generator().manual_seed(0)
    )


def test_too_long_example_is_an_error():
    with pytest.raises(ValueError, match="longer than seq_len=8"):
        make_collator(seq_len=8)([{"input_ids": list(range(5, 15))}], torch.Generator())
    with pytest.raises(ValueError, match="mlm_probability"):
        make_collator(p=0.0)


def test_masking_statistics_and_special_tokens():
    collator = make_collator(seq_len=128)
    examples = random_examples(2400, 128)  # ~230k real tokens
    padded = collator.pad(examples)
    original, attention = padded["input_ids"], padded["attention_mask"].bool()
    batch = collator(examples, torch.Generator().manual_seed(1234))
    ids, labels = batch["input_ids"], batch["labels"]
    assert torch.equal(batch["attention_mask"], padded["attention_mask"])

    special = torch.isin(original, torch.tensor(SPECIAL))
    candidates = attention & ~special
    selected = labels != IGNORE_INDEX
    assert not (selected & ~candidates).any()  # never specials, [UNK] or padding
    assert torch.equal(ids[~selected], original[~selected])  # unselected tokens untouched
    assert torch.equal(labels[selected], original[selected])

    fraction = selected.sum().item() / candidates.sum().item()
    assert abs(fraction - 0.15) < 0.01
    n = selected.sum().item()
    masked = (ids[selected] == MASK).sum().item() / n
    kept = (ids[selected] == original[selected]).sum().item() / n
    replaced = ids[selected][(ids[selected] != MASK) & (ids[selected] != original[selected])]
    assert abs(masked - 0.8) < 0.015
    assert abs(kept - 0.1) < 0.01  # includes the 0.1% of random draws equal to the original
    assert abs(len(replaced) / n - 0.1) < 0.01
    assert not torch.isin(replaced, torch.tensor(SPECIAL)).any()
    assert replaced.min() >= 5 and replaced.max() < VOCAB
    # replacements are spread over the vocabulary, not a few ids
    assert len(torch.unique(replaced)) > 0.9 * (VOCAB - 5)


def test_same_generator_state_same_batch():
    collator = make_collator(seq_len=64)
    examples = random_examples(32, 64, seed=3, nsp=True)
    a = collator(examples, torch.Generator().manual_seed(42))
    b = collator(examples, torch.Generator().manual_seed(42))
    c = collator(examples, torch.Generator().manual_seed(43))
    for key in a:
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["labels"], c["labels"])
    assert not torch.equal(a["input_ids"], c["input_ids"])
    # the generator advances: consecutive calls give different masks
    g = torch.Generator().manual_seed(42)
    first, second = collator(examples, g), collator(examples, g)
    assert not torch.equal(first["labels"], second["labels"])
