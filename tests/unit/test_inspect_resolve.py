"""Which checkpoint `dist-sparse inspect` reads, and what it says when it cannot find one."""

import pytest

from dist_sparse.inspect import resolve_checkpoint


def make_run(tmp_path, latest="global_step2", tags=("global_step2",)):
    ckpt = tmp_path / "run" / "checkpoints"
    for tag in tags:
        (ckpt / tag).mkdir(parents=True)
        (ckpt / tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "latest").write_text(latest)
    return tmp_path / "run"


def test_run_checkpoints_dir_and_tag_dir_resolve_to_the_tag(tmp_path):
    run = make_run(tmp_path)
    tag = run / "checkpoints" / "global_step2"
    assert resolve_checkpoint(run) == tag
    assert resolve_checkpoint(run / "checkpoints") == tag
    assert resolve_checkpoint(tag) == tag


def test_latest_naming_a_missing_tag_is_named(tmp_path):
    run = make_run(tmp_path, latest="global_step4")
    with pytest.raises(ValueError, match=r"latest names the checkpoint 'global_step4', which is not in"):
        resolve_checkpoint(run)


def test_an_empty_latest_is_named(tmp_path):
    run = make_run(tmp_path, latest="")
    with pytest.raises(ValueError, match=r"latest is empty"):
        resolve_checkpoint(run)


def test_a_directory_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is neither a run directory"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
