"""Bad input to `dist-sparse export`: clear errors that say what to fix, and nothing written.

The checkpoints here are fakes with DeepSpeed's file names; every refusal happens before any
shard is consolidated. (Refusals on real checkpoints -- a shard file deleted, a verification
that fails after the folder was written -- are in tests/distributed/test_export_roundtrip.py.)
"""

import re
from pathlib import Path

import pytest
import torch

from dist_sparse.cli import main
from dist_sparse.export.checkpoint import locate, read_info
from dist_sparse.export.hf import export
from dist_sparse.model import DistSparseBertConfig


def model_states(stage: int = 2, dp: int = 2, tp: int = 2, dist_sparse: bool = True) -> dict:
    cfg = DistSparseBertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=8)
    state = {"module": {}, "ds_config": {"zero_optimization": {"stage": stage}}, "mp_world_size": tp,
             "dp_size": dp, "tp_size": tp}
    if dist_sparse:
        state.update(model_config=cfg.to_dict(), structured=None)
    return state


def fake_checkpoint(run: Path, tags=("global_step4", "global_step8"), latest="global_step8", stage=2, dp=2, tp=2,
                    skip=()) -> Path:
    ckpt = run / "checkpoints"
    for tag in tags:
        d = ckpt / tag
        d.mkdir(parents=True)
        names = [f"zero_pp_rank_{r}_mp_rank_{t:02d}_optim_states.pt" for r in range(dp) for t in range(tp)]
        names += ([f"zero_pp_rank_{r}_mp_rank_{t:02d}_model_states.pt" for r in range(dp) for t in range(tp)]
                  if stage == 3 else [f"mp_rank_{t:02d}_model_states.pt" for t in range(tp)])
        for name in names:
            if name in skip:
                continue
            if "model_states" in name:
                torch.save(model_states(stage, dp, tp), d / name)
            else:
                torch.save({}, d / name)
    if latest is not None:
        (ckpt / "latest").write_text(latest)
    return ckpt


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_locate_names_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        locate(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a run directory"):
        locate(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a checkpoint: expected a run directory"):
        locate(tmp_path / "empty")

    run = tmp_path / "run"
    ckpt = fake_checkpoint(run)
    assert locate(run) == ckpt / "global_step8"
    assert locate(ckpt) == ckpt / "global_step8"
    assert locate(run, "global_step4") == ckpt / "global_step4"
    assert locate(ckpt / "global_step4") == ckpt / "global_step4"
    with pytest.raises(ValueError, match=re.escape("no checkpoint 'global_step7' in") + ".*"
                                         + re.escape("(available: global_step4, global_step8)")):
        locate(run, "global_step7")
    with pytest.raises(ValueError, match="is itself checkpoint 'global_step4'; --tag global_step8 names another"):
        locate(ckpt / "global_step4", "global_step8")
    (ckpt / "latest").write_text("global_step12")
    with pytest.raises(ValueError, match="names checkpoint 'global_step12', which does not exist.*pick one with --tag"):
        locate(run)
    (ckpt / "latest").unlink()
    with pytest.raises(ValueError, match="has no 'latest' file.*--tag.*global_step4, global_step8"):
        locate(run)
    (ckpt / "global_step9").mkdir()  # a directory with no DeepSpeed files in it
    with pytest.raises(ValueError, match="holds no model states file"):
        locate(run, "global_step9")
    with pytest.raises(ValueError, match=r"global_step9 holds no model states file: the checkpoint is incomplete "
                                         r"\(available in .*: global_step4, global_step8\)"):
        locate(ckpt / "global_step9")


@pytest.mark.parametrize("stage", [2, 3])
def test_missing_shard_files_are_listed(tmp_path, stage):
    skip = ("zero_pp_rank_1_mp_rank_01_optim_states.pt",)
    ckpt = fake_checkpoint(tmp_path / "run", tags=("global_step8",), stage=stage, skip=skip)
    with pytest.raises(ValueError, match=re.escape(
            f"is incomplete: 1 of the {8 if stage == 3 else 6} shard files of a ZeRO-{stage} DP 2 x TP 2 checkpoint "
            "are missing (zero_pp_rank_1_mp_rank_01_optim_states.pt)")):
        read_info(ckpt / "global_step8")


def test_checkpoints_export_cannot_read(tmp_path):
    d = tmp_path / "a" / "global_step1"
    d.mkdir(parents=True)
    torch.save(model_states(dist_sparse=False), d / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match="not one written by dist_sparse"):
        read_info(d)
    torch.save(model_states(stage=0), d / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match="trained without ZeRO"):
        read_info(d)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read .*mp_rank_00_model_states.pt"):
        read_info(d)
    # shard files of a larger layout copied into the directory
    ckpt = fake_checkpoint(tmp_path / "b", tags=("global_step8",), dp=1, tp=1)
    (ckpt / "global_step8" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="holds shard files a DP 1 x TP 1 run does not write"):
        read_info(ckpt / "global_step8")


def test_out_dir_is_refused_before_anything_is_read(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty; pass --overwrite"):
        export(run, out, tokenizer=str(tok))
    assert (out / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        export(run, tmp_path / "file", overwrite=True, tokenizer=str(tok))
    # --overwrite would replace the folder that holds the checkpoint (or the tokenizer): neither is
    # a previous export, which is all --overwrite replaces
    with pytest.raises(ValueError, match="replaces only a previous export, and .*run is not one"):
        export(run, run, overwrite=True, tokenizer=str(tok))
    with pytest.raises(ValueError, match="replaces only a previous export, and .*tok is not one"):
        export(run, tok, overwrite=True, tokenizer=str(tok))
    with pytest.raises(ValueError, match="is inside the checkpoint"):
        export(run, run / "checkpoints" / "global_step8" / "hf", tokenizer=str(tok))
    with pytest.raises(ValueError, match="unknown format 'onnx'"):
        export(run, tmp_path / "new", fmt="onnx", tokenizer=str(tok))
    with pytest.raises(ValueError, match=r"run\.json naming a dataset with one\): pass --tokenizer"):
        export(run, tmp_path / "new")
    assert (run / "checkpoints" / "global_step8").is_dir() and not (tmp_path / "new").exists()
    assert leftovers(tmp_path) == [] and leftovers(run / "checkpoints") == []


def test_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dist-sparse export: error: ") and "does not exist" in err
    fake_checkpoint(tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--tag", "global_step5"]) == 2
    assert "no checkpoint 'global_step5'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()



# -- issue 11 ---------------------------------------------------------------------------------------

def test_overwrite_replaces_only_a_previous_export(tmp_path, capsys):
    """A folder of the user's notes, or another training run, survives `export --overwrite` intact
    (exit code 2, one line); a folder a previous export wrote is recognised as one."""
    from dist_sparse.export.hf import is_export_folder

    fake_checkpoint(tmp_path / "run")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ideas.txt").write_text("keep me")
    other_run = tmp_path / "other_run"
    fake_checkpoint(other_run)
    (other_run / "run.json").write_text("{}")
    for victim in (notes, other_run):
        before = sorted(str(p) for p in victim.rglob("*"))
        assert main(["export", str(tmp_path / "run"), str(victim), "--overwrite", "--tokenizer", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--overwrite replaces only a previous export" in err
        assert sorted(str(p) for p in victim.rglob("*")) == before
    assert (notes / "ideas.txt").read_text() == "keep me"
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "config.json").write_text("{}")
    (previous / "sparsity.json").write_text('{"checkpoint": {"tag": "global_step4"}}')
    assert is_export_folder(previous) and not is_export_folder(notes) and not is_export_folder(other_run)


def test_run_without_a_checkpoint_yet(tmp_path, capsys):
    from dist_sparse.inspect import resolve_checkpoint

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    with pytest.raises(ValueError, match=r"run has no checkpoint yet: the run has not saved one"):
        locate(run)
    with pytest.raises(ValueError, match=r"run has no checkpoint yet"):
        resolve_checkpoint(run)
    assert main(["inspect", str(run)]) == 2
    assert "has no checkpoint yet" in capsys.readouterr().err


def test_read_only_parent_is_one_line(tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions, so a read-only parent cannot be made here")
    fake_checkpoint(tmp_path / "run")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["export", str(tmp_path / "run"), str(locked / "hf"), "--tokenizer", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot write into {locked}" in err
    finally:
        locked.chmod(0o755)


def test_read_only_parent_message_without_permissions(tmp_path, monkeypatch):
    """The same check where the tests run as root (which ignores permissions): os.access says no."""
    import os

    from dist_sparse.export import hf

    fake_checkpoint(tmp_path / "run")
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(hf.os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    with pytest.raises(ValueError, match=f"cannot write into {locked}: permission denied"):
        export(tmp_path / "run", locked / "hf")
    assert list(locked.iterdir()) == []


def test_truncated_shard_is_named(tmp_path, capsys):
    ckpt = fake_checkpoint(tmp_path / "run")
    victim = ckpt / "global_step8" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:30])
    with pytest.raises(ValueError, match=re.escape(str(victim)) + r" is damaged .*--tag \(available: global_step4, "
                                         r"global_step8\)"):
        read_info(ckpt / "global_step8")
    capsys.readouterr()
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--tokenizer", str(tok)]) == 2
    captured = capsys.readouterr()
    assert str(victim) in captured.err and captured.err.count("\n") == 1
    assert "Loading" not in captured.out + captured.err  # nothing after (or before) the error


def test_a_tokenizer_that_gives_other_ids_is_refused(tmp_path):
    """--tokenizer of another vocabulary size is refused outright; one of the same size but other
    pieces (trained on other text) unless --force-tokenizer; the run's own passes."""
    from dist_sparse.data.prepare import prepare_data
    from dist_sparse.export.checkpoint import CheckpointInfo
    from dist_sparse.export.hf import _check_tokenizer

    toks = {}
    for name, docs, vocab in (("run", 6, 400), ("small", 6, 300), ("other", 10, 400)):
        prepare_data(tmp_path / name, default_corpus=True, max_documents=docs, vocab_size=vocab, seq_len=32)
        toks[name] = tmp_path / name / "tokenizer"
    special = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    info = CheckpointInfo(tag_dir=tmp_path, client_state={"data_meta": {"special_ids": special}}, zero_stage=2,
                          dp_size=1, tp_size=1, model_config={}, structured=None)
    _check_tokenizer(toks["run"], toks["run"], info, 400, force=False)
    with pytest.raises(ValueError, match="has 300 tokens, the model's vocabulary has 400"):
        _check_tokenizer(toks["small"], toks["run"], info, 400, force=True)
    with pytest.raises(ValueError, match="differs from the run's tokenizer .* pass --force-tokenizer"):
        _check_tokenizer(toks["other"], toks["run"], info, 400, force=False)
    _check_tokenizer(toks["other"], toks["run"], info, 400, force=True)
    bad = CheckpointInfo(tag_dir=tmp_path, client_state={"data_meta": {"special_ids": {**special, "[MASK]": 7}}},
                         zero_stage=2, dp_size=1, tp_size=1, model_config={}, structured=None)
    with pytest.raises(ValueError, match=r"\[MASK\]: 4 instead of 7"):
        _check_tokenizer(toks["run"], toks["run"], bad, 400, force=True)
