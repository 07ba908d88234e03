"""`dist-sparse export` writes the tokenizer the model was trained with, or refuses (issue 11, item 2).

A tokenizer of another vocabulary, or of the same size trained on other text, gives the same
sentence other ids: the export would be useless although its logits match on those ids. Refused
before anything is written; the verification of a written folder catches it too, by tokenizing
real text with the written tokenizer and comparing with the run's.
"""

import json
from pathlib import Path

import pytest
import torch

from dist_sparse.export.hf import (SAMPLES, check_tokenizer, describe_tokenizer, tokenization_difference,
                                   tokenizer_dirs, tokenizer_mismatch, verify_folder)
from test_export_errors import VOCAB, fake_run, leftovers, make_tokenizer, model_states, refused, snapshot

SPECIAL = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, Path]:
    """The run's tokenizer, one of the same size from other speeches, one of another size."""
    root = tmp_path_factory.mktemp("tokenizers")
    return {"run": make_tokenizer(root / "run" / "DATA" / "tokenizer", slice(0, 3)),
            "other": make_tokenizer(root / "other" / "DATA" / "tokenizer", slice(3, 6)),
            "small": make_tokenizer(root / "small" / "DATA" / "tokenizer", slice(0, 3), vocab=200)}


def refused_export(capfd, tmp_path, run, *args) -> str:
    """A refused export: nothing written, the run and the tokenizers as they were."""
    before = snapshot(tmp_path)
    msg = refused(capfd, "export", run, tmp_path / "hf", *args)
    assert snapshot(tmp_path) == before and not (tmp_path / "hf").exists() and leftovers(tmp_path) == []
    return msg


def test_a_tokenizer_of_another_size_is_refused_even_forced(tmp_path, capfd, toks):
    run = fake_run(tmp_path, toks["run"])
    for force in ([], ["--force-tokenizer"]):
        assert refused_export(capfd, tmp_path, run, "--tokenizer", toks["small"], *force) == (
            f"--tokenizer {toks['small']} has 200 tokens, the model's vocabulary has {VOCAB}: it is not the tokenizer "
            "this model was trained with")


def test_a_tokenizer_of_the_same_size_but_other_pieces_needs_force(tmp_path, capfd, toks):
    run = fake_run(tmp_path, toks["run"])
    assert refused_export(capfd, tmp_path, run, "--tokenizer", toks["other"]) == (
        f"--tokenizer {toks['other']} differs from the tokenizer the run trained with ({toks['run']}) in its "
        "vocabulary (pieces, ids, scores), although size and special ids match: the same text would get other ids; "
        "pass that tokenizer, or --force-tokenizer if this one is meant")
    from dist_sparse.train.checkpoint import read_info

    info = read_info(run / "checkpoints" / "global_step8")
    check_tokenizer(toks["other"], None, info, VOCAB)  # forced: no comparison with the run's
    check_tokenizer(toks["run"], toks["run"], info, VOCAB)
    # the run's tokenizer re-saved elsewhere (a previous export's copy) is the same tokenizer
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(toks["run"]).save_pretrained(tmp_path / "copy")
    check_tokenizer(tmp_path / "copy", toks["run"], info, VOCAB)


def test_a_tokenizer_that_cannot_be_compared_needs_force(tmp_path, capfd, toks):
    """The data moved after training: run.json names a tokenizer that is not there any more."""
    run = fake_run(tmp_path, toks["run"])
    moved = tmp_path / "moved"
    (run / "run.json").write_text(json.dumps({"data": str(moved)}))
    recorded = f"{moved / 'tokenizer'}, as {run / 'run.json'} records it"
    assert refused_export(capfd, tmp_path, run) == (
        f"cannot find the tokenizer the run trained with ({recorded}): pass --tokenizer DIR --force-tokenizer with "
        "that tokenizer")
    assert refused_export(capfd, tmp_path, run, "--tokenizer", toks["run"]) == (
        f"--tokenizer {toks['run']} cannot be checked against the tokenizer the run trained with ({recorded}): pass "
        "--force-tokenizer if it is that tokenizer")
    # run.json unreadable: said so; --force-tokenizer does without it
    (run / "run.json").write_text("{not json")
    assert refused_export(capfd, tmp_path, run).startswith(f"{run / 'run.json'} is damaged (JSONDecodeError(")
    tag = run / "checkpoints" / "global_step8"
    assert tokenizer_dirs(tag, str(toks["run"]), force=True) == (toks["run"], None)
    (tmp_path / "no_tokenizer").mkdir()
    assert refused_export(capfd, tmp_path, run, "--tokenizer", tmp_path / "no_tokenizer", "--force-tokenizer") == (
        f"--tokenizer {tmp_path / 'no_tokenizer'}: no tokenizer.json in it; pass the run's DATA/tokenizer (or a "
        "previous export of the run)")


def test_other_special_ids_are_refused(tmp_path, capfd, toks):
    """The model was trained with [MASK] at id 7 (as its data recorded): a tokenizer with [MASK] at
    4 would make fill-mask predict from the wrong embedding."""
    run = fake_run(tmp_path, toks["run"])
    for f in (run / "checkpoints" / "global_step8").glob("mp_rank_*_model_states.pt"):
        torch.save({**model_states(vocab=VOCAB), "data_meta": {"special_ids": {**SPECIAL, "[MASK]": 7}}}, f)
    for force in ([], ["--force-tokenizer"]):
        assert refused_export(capfd, tmp_path, run, "--tokenizer", toks["run"], *force) == (
            f"--tokenizer {toks['run']} gives the special tokens other ids than the model's ([MASK] is 4, not 7): it "
            "is not the tokenizer this model was trained with")
    # without --tokenizer: the run's own tokenizer no longer fits (the data was prepared again)
    assert refused_export(capfd, tmp_path, run) == (
        f"the run's tokenizer {toks['run']} gives the special tokens other ids than the model's ([MASK] is 4, not 7): "
        "was the data prepared again since the run started? Pass --tokenizer DIR --force-tokenizer with the "
        "tokenizer the run trained with")


def test_mismatch_rules():
    fits = {"size": 300, "roles": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
            "ids": dict(SPECIAL)}
    assert tokenizer_mismatch(fits, 300, SPECIAL) is None
    assert tokenizer_mismatch({**fits, "size": 301}, 300, SPECIAL) == "has 301 tokens, the model's vocabulary has 300"
    assert tokenizer_mismatch({**fits, "roles": {**fits["roles"], "mask": "<mask>"}}, 300, SPECIAL) == (
        "has other special tokens than the model's (mask token is '<mask>', not '[MASK]')")
    assert tokenizer_mismatch({**fits, "ids": {**SPECIAL, "[CLS]": 101, "[SEP]": 102}}, 300, SPECIAL) == (
        "gives the special tokens other ids than the model's ([CLS] is 101, not 2, [SEP] is 102, not 3)")


def test_tokenization_difference_compares_text_by_text(toks):
    from transformers import AutoTokenizer

    run, other = (AutoTokenizer.from_pretrained(toks[k]) for k in ("run", "other"))
    texts = SAMPLES["single"]
    mine = run(texts, padding=True, return_tensors="pt")
    assert tokenization_difference(mine, mine, texts) is None
    run.padding_side = "left"  # the same ids padded on the other side: no difference
    assert tokenization_difference(run(texts, padding=True, return_tensors="pt"), mine, texts) is None
    assert tokenization_difference(other(texts, padding=True, return_tensors="pt"), mine, texts) == (
        f"other input_ids for {texts[0]!r}")
    pairs = SAMPLES["pair"]
    swapped = run([b for _, b in pairs], [a for a, _ in pairs], padding=True, return_tensors="pt")
    run.padding_side = "right"
    want = run([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt")
    assert tokenization_difference(swapped, want, pairs) == f"other input_ids for {pairs[0]!r}"
    assert describe_tokenizer(run)["size"] == VOCAB


def test_verification_runs_text_through_the_written_tokenizer(tmp_path, toks):
    """The self-check on a written folder: the same model with the run's tokenizer passes; with a
    tokenizer of the same size and special ids but other pieces (what --force-tokenizer could let
    through) it fails, naming the text."""
    from transformers import AutoTokenizer, BertConfig, BertForPreTraining

    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=8, max_position_embeddings=64)).eval()
    for name in ("run", "other"):
        folder = tmp_path / name
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(toks[name]).save_pretrained(folder)
    assert verify_folder(tmp_path / "run", model, "dense", toks["run"]) == 0.0
    with pytest.raises(ValueError) as err:
        verify_folder(tmp_path / "other", model, "dense", toks["run"])
    assert str(err.value) == (f"the exported tokenizer gives other input_ids for {SAMPLES['single'][0]!r} than the "
                              f"tokenizer the model was trained with ({toks['run']})")
