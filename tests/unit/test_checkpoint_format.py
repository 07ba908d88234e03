"""The checkpoint format (dist_sparse.train.checkpoint) and the atomic writes (dist_sparse.folders),
on small fake tag directories written with torch.save; no process group."""

import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dist_sparse import folders
from dist_sparse.masks.checksum import pack_mask
from dist_sparse.structure import Ticket
from dist_sparse.train import checkpoint as ck
from dist_sparse.train.checkpoint import ClientState, Progress, StructuredState, StructureRecord

MODEL_CONFIG = {"hidden_size": 16, "num_hidden_layers": 2, "layer_num_heads": [1, 2], "vocab_size": 40}
TICKET = {"heads": [[1], [0, 1]], "neurons": [[0, 2], [1, 3]]}
SP_CONFIG = {"method": "earlybert", "max_search_steps": 20}
DETECTOR = {"previous": None, "distances": [0.25, 0.125]}


def shrunk_state() -> dict:
    """What the loop stores today: the pruner's state_dict() plus the section's model_dump()."""
    return {"phase": "shrunk", "ticket": TICKET, "ticket_step": 12, "forced": False, "detector": DETECTOR,
            "config": SP_CONFIG}


def client_dict() -> dict:
    """The client state the loop hands DeepSpeed today (format 1)."""
    return {"format": 1, "progress": {"step": 12, "samples": 96, "tokens": 3000},
            "loader": {"epoch": 0, "position": 12, "seed": 7, "num_examples": 100, "global_batch_size": 8,
                       "drop_last": True},
            "seed": 7, "max_steps": 20, "model": "bert-tiny", "model_config": MODEL_CONFIG,
            "data_meta": {"seq_len": 32, "vocab_size": 40, "nsp": False}, "dp_size": 2, "tp_size": 1,
            "sparsity": "abc123", "structured": shrunk_state()}


# -- typed state ------------------------------------------------------------------------------

def test_client_state_round_trip():
    client = ClientState.from_dict({**client_dict(), "ds_config": {"x": 1}, "module": {}}, source="ckpt")
    assert client.progress == Progress(step=12, samples=96, tokens=3000)
    assert client.structured == StructuredState(phase="shrunk", ticket=Ticket(((1,), (0, 1)), ((0, 2), (1, 3))),
                                                ticket_step=12, forced=False, detector=DETECTOR, config=SP_CONFIG)
    assert (client.model, client.max_steps, client.dp_size, client.tp_size, client.sparsity) == (
        "bert-tiny", 20, 2, 1, "abc123")
    assert client.to_dict() == client_dict()  # DeepSpeed's own keys are not ours: left out
    dense = ClientState.from_dict({**client_dict(), "sparsity": None, "structured": None})
    assert dense.structured is None and dense.to_dict() == {**client_dict(), "sparsity": None, "structured": None}


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("format"), "ckpt/global_step4 was not written by this version of dist_sparse"),
    (lambda d: d.update(format=2), "ckpt/global_step4 was not written by this version of dist_sparse"),
    (lambda d: (d.pop("loader"), d.pop("tp_size")),
     "ckpt/global_step4: the client state has no loader, tp_size (damaged, or not written by dist_sparse?)"),
    (lambda d: d.update(seed="7", sparsity=3),
     "ckpt/global_step4: in the client state, seed is str; sparsity is int (damaged, or not written by "
     "dist_sparse?)"),
    (lambda d: d["progress"].pop("tokens"),
     "ckpt/global_step4: the progress has no tokens (damaged, or not written by dist_sparse?)"),
    (lambda d: d["structured"].update(phase="searching"),
     "ckpt/global_step4: structured-pruning phase 'searching' is none of search, shrunk"),
    (lambda d: d["structured"].update(ticket=None),
     "ckpt/global_step4: the model was shrunk but the structured-pruning state has no ticket"),
    (lambda d: d["structured"].pop("detector"),
     "ckpt/global_step4: the structured-pruning state has no detector (damaged, or not written by dist_sparse?)"),
    (lambda d: d["structured"].update(ticket={"heads": [[1], [1, 0]], "neurons": [[0], [1]]}),
     "ckpt/global_step4: the structured-pruning ticket is unreadable (ValueError('layer 1: kept head indices "
     "must be sorted and unique'))"),
])
def test_client_state_errors_name_what_is_wrong(change, message):
    d = client_dict()
    change(d)
    with pytest.raises(ValueError) as err:
        ClientState.from_dict(d, source=Path("ckpt/global_step4"))
    assert str(err.value) == message


def test_client_state_that_is_not_a_dict():
    with pytest.raises(ValueError) as err:
        ClientState.from_dict(None, source="ckpt")
    assert str(err.value) == "ckpt was not written by this version of dist_sparse"
    with pytest.raises(ValueError) as err:
        StructureRecord.from_dict([1], source="structure.json")
    assert str(err.value) == "structure.json: the structure record is a list, not a dict"


def test_structure_record_round_trip_is_byte_compatible(tmp_path):
    # what the loop writes today: write_json_atomic of the raw dicts
    search = {"phase": "search", "ticket": None, "ticket_step": None, "forced": False, "detector": DETECTOR,
              "config": SP_CONFIG}
    for structured in (shrunk_state(), search, None):
        tag = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
        tag.mkdir()
        folders.write_json_atomic(tag / "structure.json", {"model_config": MODEL_CONFIG, "structured": structured})
        before = (tag / "structure.json").read_bytes()
        record = ck.read_structure(tag)
        assert record.model_config == MODEL_CONFIG
        assert record.to_dict() == {"model_config": MODEL_CONFIG, "structured": structured}
        folders.write_json_atomic(tag / "structure.json", record.to_dict())
        assert (tag / "structure.json").read_bytes() == before
    record = ck.read_structure(tmp_path / "t1")
    st = record.structured
    assert (st.phase, st.searching, st.method, st.distances, st.ticket) == ("search", True, "earlybert",
                                                                            [0.25, 0.125], None)
    assert ck.read_structure(tmp_path) is None  # an older checkpoint: no structure.json
    # without the recorded section (older checkpoints): the method is the default
    old = StructureRecord.from_dict({"model_config": MODEL_CONFIG,
                                     "structured": {k: v for k, v in search.items() if k != "config"}})
    assert old.structured.config is None and old.structured.method == "earlybert"
    (tmp_path / "t0" / "structure.json").write_text("{")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 't0' / 'structure.json'} is damaged (")):
        ck.read_structure(tmp_path / "t0")


def test_check_resume_messages():
    client = ClientState.from_dict(client_dict())
    ok = dict(model="bert-tiny", max_steps=20, dp_size=2, data_meta=client_dict()["data_meta"], data="DATA")
    ck.check_resume(client, **ok)
    cases = [
        (dict(model="bert-mini"), "--resume: the checkpoint is of model 'bert-tiny', not 'bert-mini'"),
        (dict(data_meta={"seq_len": 48, "vocab_size": 40, "nsp": False}, run_data="/runs/data"),
         "--resume: --data DATA has sequence length 48, the run started with 32 (/runs/data); resume with that data"),
        (dict(data_meta={"seq_len": 32, "vocab_size": 41, "nsp": False}),
         "--resume: --data DATA has vocabulary size 41, the run started with 40 (see run.json); resume with that "
         "data"),
        (dict(max_steps=30), "--resume: the run was started for 20 steps, not 30; the learning-rate and sparsity "
                             "schedules depend on it (start a new run to change it)"),
        (dict(dp_size=4), "--resume: the checkpoint was written with data-parallel size 2, this run has 4; exact "
                          "data-order resume needs the same size"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError) as err:
            ck.check_resume(client, **{**ok, **change})
        assert str(err.value) == message


# -- names --------------------------------------------------------------------------------------

def test_file_names_and_tags():
    assert (ck.tag_of(40), ck.step_of("global_step40"), ck.step_of("best"), ck.step_of("global_step")) == (
        "global_step40", 40, None, None)
    assert (ck.sparsity_file(3), ck.rng_file(3)) == ("sparsity_rank3.pt", "rng_state_rank3.pt")
    assert ck.model_states_file(1) == "mp_rank_01_model_states.pt"
    assert ck.model_states_file(0, 2) == "zero_pp_rank_2_mp_rank_00_model_states.pt"
    assert ck.optim_states_file(1, 0, bf16_optimizer=True) == "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    m = ck.MODEL_STATES.match("zero_pp_rank_3_mp_rank_01_model_states.pt")
    assert (m["dp"], m["tp"]) == ("3", "01")
    m = ck.OPTIM_STATES.match("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert (m["bf16"], m["dp"], m["tp"]) == ("bf16_", "1", "00")
    for name in ("mp_rank_00_model_states.pt.tmp", "zero_pp_rank_0_mp_rank_00_optim_states.bin",
                 "fp16_zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        assert not ck.MODEL_STATES.match(name) and not ck.OPTIM_STATES.match(name)


# -- the offline reader -------------------------------------------------------------------------

FULL = torch.tensor([[1, 0, 0, 1, 1, 0],
                     [0, 0, 1, 0, 1, 1],
                     [1, 1, 0, 0, 0, 0],
                     [0, 1, 0, 1, 0, 1]], dtype=torch.bool)   # the logical mask of "w" (4 x 6)


def sparsity_state(zero_stage: int, dp_rank: int, dp: int, tp_rank: int, tp: int) -> dict:
    """A sparsifier state of one rank: "w" split by rows over TP, under ZeRO-3 each DP rank a flat
    slice of its shard."""
    rows = 4 // tp
    shard = FULL[tp_rank * rows:(tp_rank + 1) * rows]
    piece, cut = shard, None
    if zero_stage == 3:
        n = shard.numel() // dp
        cut = [dp_rank * n, (dp_rank + 1) * n]
        piece = shard.flatten()[cut[0]:cut[1]]
    target = {"full_shape": [4, 6], "shard_shape": [rows, 6], "shard_dim": 0 if tp > 1 else None,
              "shard_offset": tp_rank * rows, "slice": cut}
    return {"format": 1, "config": {"method": "static", "sparsity": 0.5}, "step": 12, "max_steps": 20,
            "layout": {"zero_stage": zero_stage, "dp_rank": dp_rank, "dp_size": dp, "tp_rank": tp_rank,
                       "tp_size": tp, "targets": {"w": target}},
            "masks": {"w": pack_mask(piece)}, "history": [{"step": 0}]}


def fake_tag(tag_dir: Path, stage: int = 2, dp: int = 2, tp: int = 2, bf16: bool = False) -> Path:
    """Every file a DP x TP run writes into a tag, each a small complete torch file; global rank
    = dp_rank * tp + tp_rank (TP peers adjacent)."""
    tag_dir.mkdir(parents=True)
    client = client_dict()
    for t in range(tp):
        for d in range(dp):
            rank = d * tp + t
            torch.save({}, tag_dir / ck.optim_states_file(d, t, bf16))
            torch.save(sparsity_state(stage, d, dp, t, tp), tag_dir / ck.sparsity_file(rank))
            torch.save(ck.rng_state(), tag_dir / ck.rng_file(rank))
            if stage == 3:
                torch.save({"module": {}}, tag_dir / ck.model_states_file(t, d))
        if stage != 3:
            torch.save({"module": {}, "ds_config": {"zero_optimization": {"stage": stage}}, "mp_world_size": tp,
                        **client, "dp_size": dp, "tp_size": tp}, tag_dir / ck.model_states_file(t))
    if stage == 3:
        torch.save({"module": {}, "ds_config": {"zero_optimization": {"stage": 3}}, "mp_world_size": tp,
                    **client, "dp_size": dp, "tp_size": tp}, tag_dir / ck.model_states_file(0, 0))
    folders.write_json_atomic(tag_dir / ck.STRUCTURE_FILE, {"model_config": MODEL_CONFIG,
                                                            "structured": shrunk_state()})
    return tag_dir


def test_list_files_sorts_a_tag_by_what_its_files_are(tmp_path):
    tag = fake_tag(tmp_path / "z2" / "global_step12", stage=2, dp=2, tp=2, bf16=True)
    (tag / "notes.txt").write_text("mine")
    files = ck.list_files(tag)
    assert files.model_states == {(None, 0): "mp_rank_00_model_states.pt", (None, 1): "mp_rank_01_model_states.pt"}
    assert files.optim_states == {(d, t): f"bf16_zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt"
                                  for d in (0, 1) for t in (0, 1)}
    assert (files.bf16_optimizer, files.zero3, files.layout, files.has_structure) == (True, False, (2, 2), True)
    assert files.sparsity == {r: f"sparsity_rank{r}.pt" for r in range(4)}
    assert files.rng == {r: f"rng_state_rank{r}.pt" for r in range(4)}
    assert ck.checkpoint_layout(tag) == (2, 2)

    tag3 = fake_tag(tmp_path / "z3" / "global_step12", stage=3, dp=2, tp=1)
    files = ck.list_files(tag3)
    assert files.model_states == {(0, 0): "zero_pp_rank_0_mp_rank_00_model_states.pt",
                                  (1, 0): "zero_pp_rank_1_mp_rank_00_model_states.pt"}
    assert (files.bf16_optimizer, files.zero3, files.layout) == (False, True, (2, 1))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ck.checkpoint_layout(empty) is None


def test_read_info_reads_layout_client_state_and_structure(tmp_path):
    tag = fake_tag(tmp_path / "run" / "checkpoints" / "global_step12", stage=2, dp=2, tp=2, bf16=True)
    info = ck.read_info(tag)
    assert (info.zero_stage, info.dp_size, info.tp_size, info.bf16_optimizer, info.step) == (2, 2, 2, True, 12)
    assert info.model_config == MODEL_CONFIG and info.structured.ticket_step == 12
    assert info.files == {t: [tag / f"bf16_zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt" for d in (0, 1)]
                          + [tag / f"mp_rank_{t:02d}_model_states.pt"] for t in (0, 1)}
    assert ClientState.from_dict(info.client_state) == ClientState.from_dict(
        {**client_dict(), "dp_size": 2, "tp_size": 2})
    assert ck.locate(tmp_path / "run", "global_step12") == tag
    # a checkpoint of an older version, without structure.json: the client state says it
    (tag / ck.STRUCTURE_FILE).unlink()
    assert ck.read_info(tag).structure == StructureRecord.from_dict(
        {"model_config": MODEL_CONFIG, "structured": shrunk_state()})


@pytest.mark.parametrize("stage, dp, tp", [(1, 1, 1), (2, 2, 2), (3, 2, 1), (3, 2, 2)])
def test_logical_masks_put_the_ranks_parts_together(tmp_path, stage, dp, tp):
    tag = fake_tag(tmp_path / "global_step12", stage=stage, dp=dp, tp=tp)
    masks = ck.logical_masks(tag)
    assert list(masks) == ["w"] and torch.equal(masks["w"], FULL)
    summary = ck.sparsity_summary(tag)
    assert summary == {"config": {"method": "static", "sparsity": 0.5}, "step": 12, "max_steps": 20,
                       "history": [{"step": 0}], "ranks": dp * tp,
                       "layout": {"zero_stage": stage, "dp_rank": 0, "dp_size": dp, "tp_rank": 0, "tp_size": tp},
                       "layers": {"w": {"full_shape": (4, 6), "active": 11, "shard_shape": (4 // tp, 6)}}}


def test_a_damaged_file_is_named(tmp_path):
    tag = fake_tag(tmp_path / "global_step12")
    victim = tag / "sparsity_rank1.pt"
    victim.write_bytes(victim.read_bytes()[:30])
    with pytest.raises(ck.DamagedFile) as err:
        ck.logical_masks(tag)
    assert str(err.value) == f"{victim} is damaged (not a complete torch file: File is not a zip file; truncated?)"
    assert (err.value.path, err.value.why) == (victim, "File is not a zip file")
    assert ck.damaged(tag / "mp_rank_00_model_states.pt") is None
    other = fake_tag(tmp_path / "global_step13")
    shard = other / "zero_pp_rank_1_mp_rank_01_optim_states.pt"
    shard.write_bytes(b"")
    with pytest.raises(ck.DamagedFile) as err:
        ck.read_info(other)
    assert err.value.path == shard
    assert ck.sparsity_summary(tmp_path) == {}  # no sparsity files: a dense checkpoint


# -- writing and loading ------------------------------------------------------------------------

class FakeEngine:
    """save_checkpoint / load_checkpoint as DeepSpeed's engine does them, for one rank."""

    def __init__(self, loaded=None):
        self.saved, self.loaded = [], loaded

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        self.saved.append((save_dir, tag, client_state, save_latest))
        (Path(save_dir) / tag).mkdir(parents=True)
        torch.save({"module": {}, **client_state}, Path(save_dir) / tag / ck.model_states_file(0))

    def load_checkpoint(self, load_dir, tag):
        return (None, None) if self.loaded is None else (str(Path(load_dir) / tag), self.loaded)


def test_save_writes_every_part_then_moves_latest_and_prunes(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoints"
    client = ClientState.from_dict(client_dict())
    record = StructureRecord(model_config=MODEL_CONFIG, structured=client.structured)
    engine = FakeEngine()
    for step in (4, 8, 12):
        client.progress.step = step
        ck.save(engine, ckpt, ck.tag_of(step), client, record,
                {ck.rng_file(0): ck.rng_state(), ck.sparsity_file(0): {"masks": {}}}, is_rank0=True, keep=2)
        assert ck.latest_tag(ckpt) == ck.tag_of(step)
    assert engine.saved[-1] == (str(ckpt), "global_step12", {**client_dict(), "progress": {
        "step": 12, "samples": 96, "tokens": 3000}}, False)
    assert sorted(p.name for p in ckpt.iterdir()) == ["global_step12", "global_step8", "latest"]
    assert (ckpt / "latest").read_text() == "global_step12"
    assert sorted(p.name for p in (ckpt / "global_step12").iterdir()) == [
        "mp_rank_00_model_states.pt", "rng_state_rank0.pt", "sparsity_rank0.pt", "structure.json"]
    assert ck.read_structure(ckpt / "global_step12") == record
    assert ck.read_rank_file(ckpt / "global_step12", ck.sparsity_file(0)) == {"masks": {}}
    assert ck.read_rank_file(ckpt / "global_step12", ck.sparsity_file(1)) is None

    # a rank that dies after writing its part: `latest` stays on the last complete checkpoint
    class Died(Exception):
        pass

    def die(code):
        raise Died(code)

    monkeypatch.setenv(ck.CRASH_IN_SAVE_ENV, "global_step16")
    monkeypatch.setattr(ck.os, "_exit", die)
    with pytest.raises(Died):
        ck.save(engine, ckpt, "global_step16", client, record, {}, is_rank0=True, keep=2)
    assert ck.latest_tag(ckpt) == "global_step12" and (ckpt / "global_step16").is_dir()


def test_load_client_state_and_rng_round_trip(tmp_path):
    ckpt = tmp_path / "checkpoints"
    with pytest.raises(ValueError) as err:
        ck.load_client_state(FakeEngine(), ckpt, "global_step4")
    assert str(err.value) == f"--resume: DeepSpeed could not load checkpoint {ckpt / 'global_step4'}"
    with pytest.raises(ValueError) as err:
        ck.load_client_state(FakeEngine(loaded={"format": 0, "model": "x"}), ckpt, "global_step4")
    assert str(err.value) == f"--resume: {ckpt / 'global_step4'} was not written by this version of dist_sparse"
    loaded = ck.load_client_state(FakeEngine(loaded={**client_dict(), "global_steps": 12}), ckpt, "global_step4")
    assert loaded == ClientState.from_dict(client_dict())

    tag = tmp_path / "tag"
    tag.mkdir()
    torch.manual_seed(3)
    torch.save(ck.rng_state(), tag / ck.rng_file(0))
    expected = torch.rand(3)
    torch.manual_seed(4)
    ck.restore_rng_state(ck.read_rank_file(tag, ck.rng_file(0)))
    assert torch.equal(torch.rand(3), expected)


def test_progress_and_structured_state_are_the_loop_s_dicts():
    progress = Progress()
    progress.step += 1
    assert replace(progress, samples=8).__dict__ == {"step": 1, "samples": 8, "tokens": 0}
    assert StructuredState.from_dict(shrunk_state()).to_dict() == shrunk_state()


# -- atomic writes --------------------------------------------------------------------------------

def test_atomic_file_write_leaves_no_temp_file_and_the_old_content_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    folders.write_json_atomic(path, {"b": 1, "a": Path("/x")})
    assert path.read_text() == '{\n  "a": "/x",\n  "b": 1\n}\n'
    ck.commit_latest(tmp_path, "global_step4")
    assert (tmp_path / "latest").read_text() == "global_step4"

    def broken(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="simulated"):
        folders.write_atomic(path, "new")
    with pytest.raises(OSError, match="simulated"):
        ck.commit_latest(tmp_path, "global_step8")
    assert path.read_text() == '{\n  "a": "/x",\n  "b": 1\n}\n'
    assert (tmp_path / "latest").read_text() == "global_step4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run.json"]


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_publish_folder_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    dest = tmp_path / "OUT"
    new = tmp_path / "OUT.tmp-1"
    new.mkdir()
    (new / "a.txt").write_text("first")
    folders.publish_folder(new, dest)
    assert tree(dest) == {"a.txt": "first"} and sorted(p.name for p in tmp_path.iterdir()) == ["OUT"]

    new.mkdir()
    (new / "b.txt").write_text("second")
    folders.publish_folder(new, dest)
    assert tree(dest) == {"b.txt": "second"} and sorted(p.name for p in tmp_path.iterdir()) == ["OUT"]

    # the rename of the new folder fails after the old one was moved aside: the old one comes back
    new.mkdir()
    (new / "c.txt").write_text("third")
    real_rename = os.rename

    def flaky(src, dst):
        if str(src) == str(new):
            raise OSError("rename failed (simulated)")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(OSError, match="simulated"):
        folders.publish_folder(new, dest)
    assert tree(dest) == {"b.txt": "second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT", "OUT.tmp-1"]  # the caller removes its new


def test_a_checkpoint_of_the_per_tensor_lamb_is_told_apart(tmp_path):
    from dist_sparse.train.checkpoint import per_tensor_lamb_groups

    def tag(name, optim_sd, file="zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        d = tmp_path / name
        d.mkdir()
        torch.save({"optimizer_state_dict": optim_sd}, d / file)
        return d

    w = torch.zeros(3)
    old = [{"params": [0], "name": "bert.x.weight", "lr": 1e-3}, {"params": [1], "name": "bert.x.bias", "lr": 1e-3}]
    new = [{"params": [0], "names": ["bert.x.weight"], "lr": 1e-3}, {"params": [1], "names": ["bert.x.bias"]}]
    adamw = [{"params": [0, 1], "lr": 1e-3}]
    assert per_tensor_lamb_groups(tag("zero12_old", {"base_optimizer_state": {"state": {}, "param_groups": old},
                                                     "single_partition_of_fp32_groups": [w]}))
    assert per_tensor_lamb_groups(tag("zero3_old", {"optimizer_state_dict": {"state": {}, "param_groups": old}}))
    assert per_tensor_lamb_groups(tag("bf16_old", {"base_optimizer_state": {"state": {}, "param_groups": old}},
                                      "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert not per_tensor_lamb_groups(tag("zero12_new", {"base_optimizer_state": {"state": {}, "param_groups": new}}))
    assert not per_tensor_lamb_groups(tag("adamw", {"base_optimizer_state": {"state": {}, "param_groups": adamw}}))
    (tmp_path / "no_optim").mkdir()
    assert not per_tensor_lamb_groups(tmp_path / "no_optim")
