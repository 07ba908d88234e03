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
                (d / name).write_bytes(b"")
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
    # --overwrite would replace the folder that holds the checkpoint (or the tokenizer)
    with pytest.raises(ValueError, match="contains the checkpoint"):
        export(run, run, overwrite=True, tokenizer=str(tok))
    with pytest.raises(ValueError, match="contains the tokenizer"):
        export(run, tok, overwrite=True, tokenizer=str(tok))
    with pytest.raises(ValueError, match="is inside the checkpoint"):
        export(run, run / "checkpoints" / "global_step8" / "hf", tokenizer=str(tok))
    with pytest.raises(ValueError, match="unknown format 'onnx'"):
        export(run, tmp_path / "new", fmt="onnx", tokenizer=str(tok))
    with pytest.raises(ValueError, match=r"run\.json is missing\): pass --tokenizer"):
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
