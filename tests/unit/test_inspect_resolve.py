"""Which checkpoint `dist-sparse inspect` reads, and what it says when it cannot find one.

The same rules and messages as export's (dist_sparse.export.checkpoint.locate); through the CLI a
refusal is one line (no DeepSpeed warning before it), exit code 2, and changes nothing.
"""

import re

import pytest

from dist_sparse.inspect import resolve_checkpoint
from test_export_errors import refused, snapshot


def make_run(tmp_path, latest="global_step2", tags=("global_step2",)):
    ckpt = tmp_path / "run" / "checkpoints"
    for tag in tags:
        (ckpt / tag).mkdir(parents=True)
        (ckpt / tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "latest").write_text(latest)
    return tmp_path / "run"


def test_run_checkpoints_dir_and_tag_dir_resolve_to_the_tag(tmp_path):
    run = make_run(tmp_path, tags=("global_step1", "global_step2"))
    tag = run / "checkpoints" / "global_step2"
    assert resolve_checkpoint(run) == tag
    assert resolve_checkpoint(run / "checkpoints") == tag
    assert resolve_checkpoint(tag) == tag
    assert resolve_checkpoint(run, "global_step1") == run / "checkpoints" / "global_step1"


def test_latest_naming_a_missing_tag_is_named(tmp_path):
    run = make_run(tmp_path, latest="global_step4")
    with pytest.raises(ValueError, match=re.escape(
            f"{run / 'checkpoints' / 'latest'} names checkpoint 'global_step4', which does not exist in "
            f"{run / 'checkpoints'}; pick one with --tag (available: global_step2)")):
        resolve_checkpoint(run)


def test_an_empty_latest_is_named(tmp_path):
    run = make_run(tmp_path, latest="")
    with pytest.raises(ValueError, match=re.escape(
            f"{run / 'checkpoints' / 'latest'} is empty; pick a checkpoint with --tag (available: global_step2)")):
        resolve_checkpoint(run)


def test_a_directory_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a checkpoint: expected a run directory"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")


def test_cli_tag_and_refusals_are_one_line(tmp_path, capfd):
    run = make_run(tmp_path, tags=("global_step1", "global_step2"))
    before = snapshot(run)
    assert refused(capfd, "inspect", run, "--tag", "global_step3") == (
        f"no checkpoint 'global_step3' in {run / 'checkpoints'} (available: global_step1, global_step2)")
    # a truncated per-rank sparsity file is named, not a torch traceback
    sparsity = run / "checkpoints" / "global_step1" / "sparsity_rank0.pt"
    sparsity.write_bytes(b"PK\x03\x04 cut short")
    assert refused(capfd, "inspect", run, "--tag", "global_step1") == (
        f"{sparsity} is damaged (not a complete torch file: File is not a zip file; truncated?); inspect another "
        "checkpoint with --tag")
    sparsity.unlink()
    assert snapshot(run) == before
