"""Bad input to `dist-sparse export`: clear errors that say what to fix, and nothing written.

The checkpoints here are fakes with DeepSpeed's file names; every refusal happens before any
shard is consolidated. (Refusals on real checkpoints -- a shard file deleted, a verification
that fails after the folder was written -- are in tests/distributed/test_export_roundtrip.py.
The tokenizer checks are in test_export_tokenizer.py.)

Through the CLI each refusal must be exactly one line on stderr, nothing on stdout (no progress
bar, no warning), exit code 2, and leave every folder as it was.
"""

import json
import os
import re
from pathlib import Path

import pytest
import torch

from dist_sparse.cli import main
from dist_sparse.train.checkpoint import locate, read_info
from dist_sparse.export.hf import check_out_dir, export
from dist_sparse.model import DistSparseBertConfig


def model_states(stage: int = 2, dp: int = 2, tp: int = 2, dist_sparse: bool = True, vocab: int = 40) -> dict:
    cfg = DistSparseBertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=8)
    state = {"module": {}, "ds_config": {"zero_optimization": {"stage": stage}}, "mp_world_size": tp,
             "dp_size": dp, "tp_size": tp}
    if dist_sparse:
        state.update(model_config=cfg.to_dict(), structured=None)
    return state


def fake_checkpoint(run: Path, tags=("global_step4", "global_step8"), latest="global_step8", stage=2, dp=2, tp=2,
                    skip=(), vocab=40) -> Path:
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
                torch.save(model_states(stage, dp, tp, vocab=vocab), d / name)
            else:
                torch.save({}, d / name)
    if latest is not None:
        (ckpt / "latest").write_text(latest)
    return ckpt


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry below ``folder`` with its bytes (None for a directory): equal before and after
    a refusal means nothing was lost, changed or added."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def cli(capfd, *args) -> tuple[int, str, str]:
    """Run `dist-sparse ARGS`; (exit code, stdout, stderr) as written to the file descriptors, so a
    progress bar or warning from any library would show."""
    capfd.readouterr()
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, out, err


def refused(capfd, command: str, *args) -> str:
    """The one-line message of a refusal (exit code 2, nothing else printed)."""
    code, out, err = cli(capfd, command, *args)
    assert (code, out) == (2, ""), (code, out, err)
    assert err.startswith(f"dist-sparse {command}: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    return err[len(f"dist-sparse {command}: error: "):-1]


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
    with pytest.raises(ValueError, match=re.escape(f"{d / 'mp_rank_00_model_states.pt'} is damaged (not a complete "
                                                   "torch file")):
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
    with pytest.raises(ValueError, match=re.escape(f"{out} exists and is a folder holding keep.txt; pick another "
                                                   "OUT_DIR (--overwrite replaces only a previous export)")):
        export(run, out, tokenizer=str(tok))
    assert (out / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        export(run, tmp_path / "file", overwrite=True, tokenizer=str(tok))
    # --overwrite would replace the folder that holds the checkpoint (or the tokenizer): neither is
    # a previous export, which is all --overwrite replaces
    with pytest.raises(ValueError, match=re.escape(f"{run} exists and is a training run (checkpoints/)")):
        export(run, run, overwrite=True, tokenizer=str(tok))
    with pytest.raises(ValueError, match=re.escape(f"{tok} exists and is a folder holding tokenizer.json")):
        export(run, tok, overwrite=True, tokenizer=str(tok))
    with pytest.raises(ValueError, match="is inside the checkpoint"):
        export(run, run / "checkpoints" / "global_step8" / "hf", tokenizer=str(tok))
    with pytest.raises(ValueError, match="unknown format 'onnx'"):
        export(run, tmp_path / "new", fmt="onnx", tokenizer=str(tok))
    with pytest.raises(ValueError, match=re.escape(f"cannot find the tokenizer the run trained with (no {run / 'run.json'}"
                                                   ": a checkpoint copied out of its run?): pass --tokenizer DIR "
                                                   "--force-tokenizer with that tokenizer")):
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


# -- shared by the tests below: a run whose checkpoint passes every check before consolidation --

VOCAB = 300


def make_tokenizer(folder: Path, documents: slice, vocab: int = VOCAB) -> Path:
    """A prepare-data tokenizer folder (tokenizer.json + spm.model) trained on a few speeches."""
    from dist_sparse.data.corpus import default_corpus_files, read_documents
    from dist_sparse.data.tokenizer import save_tokenizer, train_sentencepiece

    docs, _ = read_documents(default_corpus_files()[documents])
    model = train_sentencepiece([s for doc in docs for s in doc], folder.parent / "spm-train" / "spm.model",
                                vocab_size=vocab)
    save_tokenizer(model, folder, 32)
    return folder


@pytest.fixture(scope="module")
def run_tokenizer(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("data") / "DATA" / "tokenizer", slice(0, 3))


def fake_run(root: Path, tokenizer: Path, **kwargs) -> Path:
    """A run directory as pretrain leaves it: run.json naming its data, metrics, checkpoints."""
    run = root / "run"
    fake_checkpoint(run, vocab=VOCAB, **kwargs)
    (run / "run.json").write_text(json.dumps({"data": str(tokenizer.parent)}))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.1}\n')
    return run


def fake_export(folder: Path, extra: dict[str, str] | None = None) -> Path:
    """A folder as `dist-sparse export` leaves it (the files it lists in sparsity.json)."""
    folder.mkdir(parents=True)
    files = {"config.json": "{}", "model.safetensors": "weights", "tokenizer.json": "{}",
             "tokenizer_config.json": "{}", "README.md": "# card"}
    for name, text in files.items():
        (folder / name).write_text(text)
    record = {"format": "dense", "checkpoint": {"tag": "global_step4", "step": 4}, "layers": {},
              "files": sorted([*files, "sparsity.json"])}
    (folder / "sparsity.json").write_text(json.dumps(record))
    for name, text in (extra or {}).items():
        (folder / name).write_text(text)
    return folder


# -- item 1: --overwrite replaces only a previous export -----------------------------------------

def victims(root: Path) -> dict[str, tuple[Path, str]]:
    """Folders `export --overwrite` must not replace, with how the refusal names each."""
    notes = root / "notes"
    notes.mkdir()
    (notes / "ideas.txt").write_text("keep me")
    other_run = root / "other_run"
    fake_checkpoint(other_run)
    (other_run / "run.json").write_text("{}")
    (other_run / "metrics.jsonl").write_text('{"step": 8}\n')
    dataset = root / "dataset"
    (dataset / "train").mkdir(parents=True)
    (dataset / "meta.json").write_text("{}")
    (dataset / "dataset_dict.json").write_text("{}")
    hf_model = root / "hf_model"  # somebody else's Hugging Face folder: config.json but no export record
    hf_model.mkdir()
    (hf_model / "config.json").write_text("{}")
    (hf_model / "sparsity.json").write_text('{"layers": {}}')
    many = root / "many"
    many.mkdir()
    for i in range(6):
        (many / f"f{i}.txt").write_text(str(i))
    return {"notes": (notes, "a folder holding ideas.txt"),
            "run": (other_run, "a training run (run.json, metrics.jsonl, checkpoints/)"),
            "dataset": (dataset, "a prepared dataset (meta.json)"),
            "hf_model": (hf_model, "a folder holding config.json, sparsity.json"),
            "many": (many, "a folder holding f0.txt, f1.txt, f2.txt, f3.txt, ... (6 entries)")}


@pytest.mark.parametrize("overwrite", [True, False])
def test_overwrite_refuses_every_folder_that_is_not_a_previous_export(tmp_path, capfd, run_tokenizer, overwrite):
    run = fake_run(tmp_path, run_tokenizer)
    for folder, what in victims(tmp_path).values():
        before = snapshot(folder)
        msg = refused(capfd, "export", run, folder, *(["--overwrite"] if overwrite else []))
        assert msg == f"{folder} exists and is {what}; pick another OUT_DIR (--overwrite replaces only a previous export)"
        assert snapshot(folder) == before
    assert leftovers(tmp_path) == []


def test_overwrite_refuses_an_export_with_files_added_since(tmp_path, capfd, run_tokenizer):
    run = fake_run(tmp_path, run_tokenizer)
    previous = fake_export(tmp_path / "hf", extra={"eval_results.json": "{}", "notes.txt": "mine"})
    before = snapshot(previous)
    assert refused(capfd, "export", run, previous, "--overwrite") == (
        f"{previous} is a previous export, but holds files the export did not write (eval_results.json, notes.txt) "
        "that --overwrite would delete; move them out of it or pick another OUT_DIR")
    assert snapshot(previous) == before and leftovers(tmp_path) == []


def test_a_previous_export_is_replaced_only_with_overwrite(tmp_path, capfd, run_tokenizer):
    from dist_sparse.folders import describe, export_record

    run = fake_run(tmp_path, run_tokenizer)
    previous = fake_export(tmp_path / "hf")
    before = snapshot(previous)
    assert refused(capfd, "export", run, previous) == f"{previous} holds a previous export; pass --overwrite to replace it"
    check_out_dir(previous, overwrite=True)  # accepted: what --overwrite is for
    assert export_record(previous)["checkpoint"]["tag"] == "global_step4" and describe(previous) == "a dist_sparse export"
    # an export written before exports listed their files: recognised by its record alone
    record = json.loads((previous / "sparsity.json").read_text())
    del record["files"]
    (previous / "sparsity.json").write_text(json.dumps(record))
    check_out_dir(previous, overwrite=True)
    # accepted, but a later refusal (here: the checkpoint's damaged shard) still leaves it whole
    (previous / "sparsity.json").write_text(json.dumps({**record, "files": sorted(before)}))
    before = snapshot(previous)
    shard = run / "checkpoints" / "global_step8" / "zero_pp_rank_1_mp_rank_01_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:20])
    assert "is damaged" in refused(capfd, "export", run, previous, "--overwrite")
    assert snapshot(previous) == before and leftovers(tmp_path) == []


# -- item 12: a run with no checkpoint yet -------------------------------------------------------

@pytest.mark.parametrize("where", ["run", "checkpoints"])
@pytest.mark.parametrize("command", ["export", "inspect"])
def test_a_run_without_a_checkpoint_yet_says_so(tmp_path, capfd, command, where):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "tensorboard").mkdir()
    (run / "run.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(run)
    path = run if where == "run" else run / "checkpoints"
    out = [tmp_path / "hf"] if command == "export" else []
    assert refused(capfd, command, path, *out) == (
        f"run {run} has no checkpoint yet (a run saves one every --save-interval steps and at its last step); "
        "try again after its first save")
    # a save that died before DeepSpeed wrote its model states
    (run / "checkpoints" / "global_step2").mkdir()
    assert refused(capfd, command, path, *out) == (
        f"run {run} has no checkpoint yet (a run saves one every --save-interval steps and at its last step; "
        "global_step2: a save that did not finish); try again after its first save")
    (run / "checkpoints" / "global_step2").rmdir()
    assert snapshot(run) == before and not (tmp_path / "hf").exists()


# -- item 13: a parent folder that cannot be written ----------------------------------------------

def test_a_parent_that_cannot_be_written_is_one_line(tmp_path, capfd, run_tokenizer):
    """/proc takes no new folders, even from root (for whom permission bits say nothing): the write
    is tried before the slow part and named in one line."""
    run = fake_run(tmp_path, run_tokenizer)
    before = snapshot(run)
    for out in (Path("/proc/dist_sparse_hf"), Path("/proc/dist_sparse_a/b/hf")):
        msg = refused(capfd, "export", run, out)
        assert msg.startswith("cannot write into /proc: ") and msg.endswith(
            "; pick an OUT_DIR in a folder you can write to"), msg
    assert snapshot(run) == before


def test_a_failed_write_removes_the_folders_it_made(tmp_path, capfd, run_tokenizer, monkeypatch):
    import tempfile

    run = fake_run(tmp_path, run_tokenizer)
    parent = tmp_path / "new" / "exports"

    def read_only(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    assert refused(capfd, "export", run, parent / "hf") == (
        f"cannot write into {parent}: Permission denied; pick an OUT_DIR in a folder you can write to")
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_parent_is_named(tmp_path, capfd, run_tokenizer):
    run = fake_run(tmp_path, run_tokenizer)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert refused(capfd, "export", run, locked / "hf") == (
            f"cannot write into {locked}: Permission denied; pick an OUT_DIR in a folder you can write to")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_a_previous_export_that_cannot_be_moved_aside_is_named_and_nothing_is_left(tmp_path, monkeypatch):
    """--overwrite of a read-only previous export (rename(2) must update its '..'): the folder is
    named, not its parent, and no hidden `.hf.old-*` sibling is left (the last step of an export;
    a rename that fails as it does for a user without write permission on the folder)."""
    from dist_sparse import folders
    from dist_sparse.export.hf import _writing_into

    dest = fake_export(tmp_path / "hf")
    before = snapshot(dest)
    new = tmp_path / ".hf.tmp-1"
    new.mkdir()
    real = os.rename

    def rename(src, dst, *args, **kwargs):
        if Path(src) == dest:
            raise PermissionError(13, "Permission denied", str(src), str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(ValueError) as err:
        with _writing_into(dest):
            folders.publish_folder(new, dest)
    assert str(err.value) == f"cannot replace {dest}: Permission denied; make it writable or pick another OUT_DIR"
    assert leftovers(tmp_path) == [".hf.tmp-1"] and snapshot(dest) == before  # the caller removes its tmp


# -- item 14: a truncated shard -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt",
                                  "mp_rank_01_model_states.pt"])
def test_a_truncated_shard_is_named_in_one_line(tmp_path, capfd, run_tokenizer, name):
    run = fake_run(tmp_path, run_tokenizer)
    shard = run / "checkpoints" / "global_step8" / name
    shard.write_bytes(shard.read_bytes()[:100])  # what a full disk or a killed copy leaves
    before = snapshot(run)
    assert refused(capfd, "export", run, tmp_path / "hf") == (
        f"{shard} is damaged (not a complete torch file: File is not a zip file; truncated?); export an earlier "
        "checkpoint with --tag global_step4")
    # the oldest checkpoint damaged: the next one is offered
    shard4 = run / "checkpoints" / "global_step4" / name
    shard4.write_bytes(b"")
    assert refused(capfd, "export", run, tmp_path / "hf", "--tag", "global_step4").endswith(
        "export another checkpoint with --tag global_step8")
    shard4.write_bytes(before[str(shard4.relative_to(run))])
    assert snapshot(run) == before and not (tmp_path / "hf").exists() and leftovers(tmp_path) == []


def test_a_consolidation_error_is_one_line_naming_real_files(tmp_path):
    """zero_to_fp32 draws progress bars while it reads; its error must not bring them along, nor
    name the temporary view it was pointed at."""
    from dist_sparse.export.checkpoint import consolidate

    ckpt = fake_checkpoint(tmp_path / "run", dp=1, tp=1)  # files whole, but no weights in them
    info = read_info(ckpt / "global_step8")
    with pytest.raises(ValueError) as err:
        consolidate(info, DistSparseBertConfig.from_dict(info.model_config))
    msg = str(err.value)
    assert msg.startswith(f"cannot consolidate the ZeRO partitions of tensor-parallel rank 0 of {info.tag_dir}: ")
    assert "\n" not in msg and "%|" not in msg and "dist_sparse_export_" not in msg, msg
