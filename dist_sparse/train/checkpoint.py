"""The on-disk format of a dist_sparse checkpoint, defined once.

A run keeps its checkpoints in ``RUN/checkpoints/`` (:data:`CHECKPOINTS_DIR`)::

  latest                       the tag of the last complete checkpoint; moved only after every
                               rank has finished writing it, so a crash mid-save leaves it on the
                               previous good one
  global_step{N}/              one tag per save (:func:`tag_of`)
    mp_rank_XX_model_states.pt                 DeepSpeed: module states per TP rank (per DP x TP
    zero_pp_rank_D_mp_rank_XX_model_states.pt  rank under ZeRO-3), with our client state merged in
    [bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt   DeepSpeed: optimizer partitions per DP x TP
                               rank (``bf16_`` from its BF16_Optimizer)
    structure.json             rank 0: the model shape and the structured-pruning state, readable
                               before any model is built (:class:`StructureRecord`)
    sparsity_rank{r}.pt        each rank: its sparsifier state (masks of the weights it holds)
    rng_state_rank{r}.pt       each rank: torch / numpy / python RNG states

The client state (:class:`ClientState`) is what the loop hands DeepSpeed to store beside the
weights; :data:`FORMAT_VERSION` says which version of it a checkpoint holds.

Three sides, kept apart so each can be used alone:

* writing (:func:`save`) and loading (:func:`load_client_state`, :func:`read_rank_file`) in a
  training run, the only functions that touch an engine or a process group;
* an offline reader for inspect, export and the tests (:func:`list_files`, :func:`read_info`,
  :func:`read_structure`, :func:`read_sparsity`, :func:`logical_masks`,
  :func:`sparsity_summary`, :func:`locate`), which needs no process group and does not import
  DeepSpeed, so a refusal is one line without DeepSpeed's accelerator warning before it;
* the pure checks of a resume against the launch (:func:`check_resume`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from dist_sparse.folders import write_atomic, write_json_atomic
from dist_sparse.structure import Ticket

log = logging.getLogger("dist_sparse.train")

# ---------------------------------------------------------------------------------------------
# names

FORMAT_VERSION = 1                      # of the client state; another value is refused on resume
CHECKPOINTS_DIR = "checkpoints"         # below the run directory
LATEST_FILE = "latest"
TAG_PREFIX = "global_step"
STRUCTURE_FILE = "structure.json"
SPARSITY_FILE_PREFIX = "sparsity_rank"
RNG_FILE_PREFIX = "rng_state_rank"
# Name a checkpoint tag here to make every rank die after writing it but before `latest` moves;
# TAG:RANK makes only that rank SIGKILL itself, after DeepSpeed's files of the tag and before ours.
CRASH_IN_SAVE_ENV = "DIST_SPARSE_TEST_CRASH_IN_SAVE"

# DeepSpeed's per-rank files of a tag: model states (one per TP rank, or per DP x TP rank under
# ZeRO-3) and optimizer states (per DP x TP rank; ``bf16_`` for its BF16_Optimizer).
MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(?P<dp>\d+)_)?mp_rank_(?P<tp>\d+)_model_states\.pt$")
OPTIM_STATES = re.compile(r"^(?P<bf16>bf16_)?zero_pp_rank_(?P<dp>\d+)_mp_rank_(?P<tp>\d+)_optim_states\.pt$")
SPARSITY_FILE = re.compile(rf"^{SPARSITY_FILE_PREFIX}(?P<rank>\d+)\.pt$")
RNG_FILE = re.compile(rf"^{RNG_FILE_PREFIX}(?P<rank>\d+)\.pt$")


def tag_of(step: int) -> str:
    return f"{TAG_PREFIX}{step}"


def step_of(tag: str) -> int | None:
    """The step a ``global_step{N}`` tag was saved at; None for a tag of another name."""
    rest = tag.removeprefix(TAG_PREFIX)
    return int(rest) if rest != tag and rest.isdigit() else None


def sparsity_file(rank: int) -> str:
    return f"{SPARSITY_FILE_PREFIX}{rank}.pt"


def rng_file(rank: int) -> str:
    return f"{RNG_FILE_PREFIX}{rank}.pt"


def model_states_file(tp_rank: int, dp_rank: int | None = None) -> str:
    """DeepSpeed's model-states file name; ``dp_rank`` only under ZeRO-3 (partitioned module)."""
    prefix = "" if dp_rank is None else f"zero_pp_rank_{dp_rank}_"
    return f"{prefix}mp_rank_{tp_rank:02d}_model_states.pt"


def optim_states_file(dp_rank: int, tp_rank: int, bf16_optimizer: bool = False) -> str:
    return f"{'bf16_' if bf16_optimizer else ''}zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt"


# ---------------------------------------------------------------------------------------------
# typed state


def _check_fields(d, fields: dict[str, type | tuple], source, what: str) -> None:
    """``d`` is a dict holding every key of ``fields`` with a value of its type(s); else a
    ValueError naming ``source``, ``what`` it is, and the keys missing or of the wrong type."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{source}: the {what} is a {type(d).__name__}, not a dict")
    missing = [k for k in fields if k not in d]
    if missing:
        raise ValueError(f"{source}: the {what} has no {', '.join(missing)} (damaged, or not written by dist_sparse?)")
    wrong = [f"{k} is {type(d[k]).__name__}" for k, t in fields.items() if not isinstance(d[k], t)]
    if wrong:
        raise ValueError(f"{source}: in the {what}, {'; '.join(wrong)} (damaged, or not written by dist_sparse?)")


@dataclass
class Progress:
    """How far a run is; mutable, the loop counts it up."""
    step: int = 0          # optimizer steps done
    samples: int = 0       # global samples consumed
    tokens: int = 0        # global non-pad tokens consumed

    @classmethod
    def from_dict(cls, d, source="checkpoint") -> "Progress":
        _check_fields(d, {"step": int, "samples": int, "tokens": int}, source, "progress")
        return cls(step=d["step"], samples=d["samples"], tokens=d["tokens"])


PHASES = ("search", "shrunk")


@dataclass(frozen=True)
class StructuredState:
    """Where a structured-pruning run is: searching for its ticket, or shrunk to it.

    ``detector`` (the early-bird detector's own state) and ``config`` (the ``structured_pruning``
    section the run started with, ``model_dump()``) are opaque here: their owners read them.
    """
    phase: str                      # one of PHASES
    ticket: Ticket | None           # the kept heads / neurons (original indices), once drawn
    ticket_step: int | None
    forced: bool                    # drawn at max_search_steps, not by the early-bird criterion
    detector: dict
    config: dict | None = None      # None in checkpoints written before the section was recorded

    @property
    def searching(self) -> bool:
        return self.phase == "search"

    @property
    def method(self) -> str:
        return (self.config or {}).get("method", "earlybert")

    @property
    def distances(self) -> list[float]:
        """The detector's last distances between keep-sets (what inspect shows while searching)."""
        return list(self.detector.get("distances", []))

    def to_dict(self) -> dict:
        """The dict the pruner's ``load_state_dict`` takes (plus ``config``); what is stored."""
        return {"phase": self.phase, "ticket": None if self.ticket is None else self.ticket.to_dict(),
                "ticket_step": self.ticket_step, "forced": self.forced, "detector": self.detector,
                "config": self.config}

    @classmethod
    def from_dict(cls, d, source="checkpoint") -> "StructuredState":
        _check_fields(d, {"phase": str, "ticket": (dict, type(None)), "ticket_step": (int, type(None)),
                          "forced": bool, "detector": dict}, source, "structured-pruning state")
        if d["phase"] not in PHASES:
            raise ValueError(f"{source}: structured-pruning phase {d['phase']!r} is none of {', '.join(PHASES)}")
        if d["phase"] == "shrunk" and d["ticket"] is None:
            raise ValueError(f"{source}: the model was shrunk but the structured-pruning state has no ticket")
        config = d.get("config")
        if config is not None and not isinstance(config, dict):
            raise ValueError(f"{source}: in the structured-pruning state, config is {type(config).__name__}")
        try:
            ticket = None if d["ticket"] is None else Ticket.from_dict(d["ticket"])
        except (KeyError, TypeError, ValueError, AssertionError) as err:
            raise ValueError(f"{source}: the structured-pruning ticket is unreadable ({err!r})") from None
        return cls(phase=d["phase"], ticket=ticket, ticket_step=d["ticket_step"], forced=d["forced"],
                   detector=d["detector"], config=config)


def _structured_from(d, source) -> StructuredState | None:
    return None if d is None else StructuredState.from_dict(d, source)


@dataclass(frozen=True)
class StructureRecord:
    """``structure.json``: the model shape (the run may have shrunk it) and the structured-pruning
    state, readable before any model is built. Checkpoints without the file (older versions)
    have the preset's shape."""
    model_config: dict              # DistSparseBertConfig.to_dict()
    structured: StructuredState | None = None

    def to_dict(self) -> dict:
        return {"model_config": self.model_config,
                "structured": None if self.structured is None else self.structured.to_dict()}

    @classmethod
    def from_dict(cls, d, source="checkpoint") -> "StructureRecord":
        _check_fields(d, {"model_config": dict}, source, "structure record")
        return cls(model_config=d["model_config"], structured=_structured_from(d.get("structured"), source))


_CLIENT_FIELDS = {"progress": dict, "loader": dict, "seed": int, "max_steps": int, "model": str,
                  "model_config": dict, "data_meta": dict, "dp_size": int, "tp_size": int,
                  "sparsity": (str, type(None)), "structured": (dict, type(None))}


@dataclass
class ClientState:
    """What a run stores beside DeepSpeed's states (DeepSpeed merges it into every model-states
    file), everything exact resume needs that is the same on every rank."""
    progress: Progress
    loader: dict                    # ResumableBatchIterator.state_dict()
    seed: int
    max_steps: int
    model: str                      # the preset name the run was started with
    model_config: dict              # DistSparseBertConfig.to_dict(), as trained at this step
    data_meta: dict                 # the prepared data's meta.json
    dp_size: int
    tp_size: int
    sparsity: str | None = None     # fingerprint of the sparsity section (None: dense)
    structured: StructuredState | None = None

    def to_dict(self) -> dict:
        return {"format": FORMAT_VERSION, "progress": asdict(self.progress), "loader": self.loader,
                "seed": self.seed, "max_steps": self.max_steps, "model": self.model,
                "model_config": self.model_config, "data_meta": self.data_meta, "dp_size": self.dp_size,
                "tp_size": self.tp_size, "sparsity": self.sparsity,
                "structured": None if self.structured is None else self.structured.to_dict()}

    @classmethod
    def from_dict(cls, d, source="checkpoint") -> "ClientState":
        """Keys other than ours (DeepSpeed returns its own beside them) are ignored."""
        if not isinstance(d, Mapping) or d.get("format") != FORMAT_VERSION:
            raise ValueError(f"{source} was not written by this version of dist_sparse")
        _check_fields(d, _CLIENT_FIELDS, source, "client state")
        return cls(progress=Progress.from_dict(d["progress"], source), loader=d["loader"], seed=d["seed"],
                   max_steps=d["max_steps"], model=d["model"], model_config=d["model_config"],
                   data_meta=d["data_meta"], dp_size=d["dp_size"], tp_size=d["tp_size"], sparsity=d["sparsity"],
                   structured=_structured_from(d["structured"], source))


# ---------------------------------------------------------------------------------------------
# writing and loading, in a training run


def rng_state() -> dict:
    """This process's RNG states, as ``rng_state_rank{r}.pt`` holds them."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def commit_latest(ckpt_dir: Path, tag: str) -> None:
    """Point ``latest`` at ``tag`` with an atomic rename.

    Called by rank 0 only after every rank has finished writing ``tag`` (a barrier), so a
    process that dies mid-save leaves ``latest`` on the previous good checkpoint.
    """
    write_atomic(ckpt_dir / LATEST_FILE, tag)


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag in ``latest``, if it names a checkpoint directory that exists."""
    latest = ckpt_dir / LATEST_FILE
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if tag and (ckpt_dir / tag).is_dir() else None


def prune_checkpoints(ckpt_dir: Path, keep: int, current: str) -> None:
    """Delete the oldest ``global_step*`` checkpoints beyond the newest ``keep`` (0: keep all)."""
    if keep <= 0:
        return
    tags = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and step_of(p.name) is not None),
                  key=lambda p: step_of(p.name))
    for old in tags[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def save(engine, ckpt_dir: Path, tag: str, client: ClientState, structure: StructureRecord,
         rank_files: dict[str, object], *, is_rank0: bool, keep: int,
         shared_json: dict[str, dict] | None = None) -> None:
    """Write checkpoint ``tag`` on every rank (a collective: all ranks call it).

    ``rank_files``: this rank's own files, name -> object for torch.save (:func:`rng_file`,
    :func:`sparsity_file`); ``shared_json``: files that are the same for every rank, name -> JSON
    object, written by rank 0. DeepSpeed's files and ours are all written, then the ranks agree
    that every one of them succeeded (one all-reduce of a flag per rank), and only then does rank 0
    move ``latest`` and delete the checkpoints beyond the newest ``keep``: a process that dies
    mid-save leaves ``latest`` on the previous complete checkpoint.

    A write that fails (a full disk, a quota, an I/O error) does not leave the other ranks waiting:
    the failing rank keeps its first error, writes nothing more, goes on through DeepSpeed's
    collectives with its peers, and then every rank raises :class:`CheckpointNotSaved` with the
    same message (which ranks, which file, the file system and its free space); rank 0 removes
    the partial tag first. DeepSpeed's files are caught where DeepSpeed writes them (its
    checkpoint engine's ``save``); anything else DeepSpeed raises ends that rank's process, and
    the launcher ends the others.
    """
    from dist_sparse.distributed import comm  # imports DeepSpeed: not at module level (see top)

    tag_dir = ckpt_dir / tag
    rank = comm.rank()
    writes = _Writes(full_disk=_injected(ENOSPC_IN_SAVE_ENV, tag, rank))
    with writes.through(getattr(engine, "checkpoint_engine", None)):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client.to_dict(), save_latest=False)
    crash = _crash_request(tag, rank)
    if crash == "kill":  # one rank dies mid-save, its peers waiting for it (crash-safety drills)
        os.kill(os.getpid(), signal.SIGKILL)
    if is_rank0:
        writes.run(tag_dir / STRUCTURE_FILE, lambda: write_json_atomic(tag_dir / STRUCTURE_FILE, structure.to_dict()))
        for name, obj in (shared_json or {}).items():
            assert Path(name).name == name, f"a shared file is a plain file name, not {name!r}"
            writes.run(tag_dir / name, lambda name=name, obj=obj: write_json_atomic(tag_dir / name, obj))
    for name, obj in rank_files.items():
        assert Path(name).name == name, f"a rank file is a plain file name, not {name!r}"
        writes.run(tag_dir / name, lambda name=name, obj=obj: torch.save(obj, tag_dir / name))
    if crash == "all":  # fault injection for the crash-safety tests: every rank dies here
        os._exit(17)
    # every rank has written its part (or failed) before `latest` moves
    _agree(writes.failure(), ckpt_dir, tag, is_rank0)
    failure = None
    if is_rank0:
        try:
            commit_latest(ckpt_dir, tag)
        except OSError as err:
            failure = _failure_text(rank, ckpt_dir / LATEST_FILE, err)
        else:
            prune_checkpoints(ckpt_dir, keep, tag)
            log.info("saved checkpoint %s", tag_dir)
    _agree(failure, ckpt_dir, tag, is_rank0)


# Test-only fault injection: "TAG:RANK" makes global rank RANK's first write of checkpoint TAG fail
# as on a full disk (the file left half written, then OSError ENOSPC).
ENOSPC_IN_SAVE_ENV = "DIST_SPARSE_TEST_ENOSPC_IN_SAVE"


class CheckpointNotSaved(ValueError):
    """A checkpoint could not be written on some rank; every rank raises it with the same message.
    A ValueError so that the entry point reports it as one line per rank and exits 2."""


def _injected(env: str, tag: str, rank: int) -> bool:
    value = os.environ.get(env)
    return bool(value) and value.rpartition(":")[::2] == (tag, str(rank))


def _crash_request(tag: str, rank: int) -> str | None:
    """``CRASH_IN_SAVE_ENV`` for this save: "all" (value TAG: every rank exits after writing its
    files), "kill" (value TAG:RANK, this rank: it SIGKILLs itself after DeepSpeed's files, before
    ours) or None."""
    value = os.environ.get(CRASH_IN_SAVE_ENV)
    if not value:
        return None
    if value == tag:
        return "all"
    return "kill" if value.rpartition(":")[::2] == (tag, str(rank)) else None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def describe_disk(path: Path) -> str:
    """The file system ``path`` lies on: its mount point and free space (as far as it can be read)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    mount = p
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return f"the file system mounted at {mount}"
    return f"the file system mounted at {mount}: {_size(usage.free)} free of {_size(usage.total)}"


def _failure_text(rank: int, path: Path | None, err: BaseException) -> str:
    what = f"{type(err).__name__}: {err}" if not isinstance(err, OSError) else (
        f"[Errno {err.errno}] {err.strerror or err}" if err.errno else str(err))
    where = f" {path}" if path is not None else ""
    return f"rank {rank} could not write{where} ({what}; {describe_disk(path or Path('.'))})"


class _Writes:
    """This rank's writes of one checkpoint. The first failure is kept, not raised, and later
    writes are not tried (a full disk stays full), so the rank stays in step with its peers'
    collectives; ``failure`` says what went wrong."""

    def __init__(self, full_disk: bool = False):
        self.full_disk = full_disk   # test-only: the first write fails as on a full disk
        self.error: tuple[Path | None, BaseException] | None = None

    def run(self, path: Path, write) -> None:
        if self.error is not None:
            return
        try:
            write()
            if self.full_disk:
                self.full_disk = False
                _half_written(Path(path))
        except Exception as err:  # noqa: BLE001 - kept and reported on every rank by _agree
            self.error = (Path(path), err)

    def failure(self) -> str | None:
        return None if self.error is None else _failure_text(_rank(), *self.error)

    @contextlib.contextmanager
    def through(self, checkpoint_engine):
        """DeepSpeed's writes of the checkpoint go through ``run`` (its checkpoint engine's
        ``save(state_dict, path)``, the one place DeepSpeed writes a checkpoint's files)."""
        if checkpoint_engine is None:
            yield
            return
        original = checkpoint_engine.save
        had_own = "save" in vars(checkpoint_engine)
        checkpoint_engine.save = lambda state_dict, path: self.run(Path(path), lambda: original(state_dict, path))
        try:
            yield
        finally:
            if had_own:
                checkpoint_engine.save = original
            else:
                del checkpoint_engine.save


def _rank() -> int:
    from dist_sparse.distributed import comm
    return comm.rank()


def _half_written(path: Path) -> None:
    """What a write that runs out of space leaves: the file cut short, then ENOSPC (test-only)."""
    size = path.stat().st_size if path.exists() else 0
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.truncate(size // 2)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _agree(failure: str | None, ckpt_dir: Path, tag: str, is_rank0: bool) -> None:
    """Every rank learns whether any rank failed (one flag per rank, summed over the world); if one
    did, rank 0 removes the partial tag and every rank raises CheckpointNotSaved with all the
    ranks' reasons. The same collectives run on every rank either way."""
    from dist_sparse.distributed import comm

    world = comm.world_size()
    flags = torch.zeros(world, dtype=torch.float64)
    flags[comm.rank()] = float(failure is not None)
    comm.all_reduce_sum_(flags)
    if not flags.any():
        return
    reasons = [r for r in comm.all_gather_object(failure) if r is not None]
    latest = latest_tag(ckpt_dir)
    if latest == tag:
        after = (f"{tag}, which `latest` names, was being written again and is incomplete now: resume from an "
                 "earlier checkpoint with --resume-tag")
    else:
        if is_rank0:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        comm.barrier()  # removed before any rank exits (a launcher stops the others when one does)
        after = f"The partial {tag} was removed; " + (
            f"`latest` still names {latest}, which is complete: free space and continue with --resume"
            if latest is not None else "no earlier checkpoint of this run exists")
    raise CheckpointNotSaved(f"checkpoint {ckpt_dir / tag} was not saved: {'; '.join(reasons)}. {after}")


def _param_groups(optim_sd: Mapping) -> list:
    """The optimizer's param groups as DeepSpeed saves them: under ``base_optimizer_state``
    (ZeRO-1/2, BF16_Optimizer) or ``optimizer_state_dict`` (ZeRO-3), or at the top (stage 0)."""
    for key in ("base_optimizer_state", "optimizer_state_dict"):
        if isinstance(optim_sd.get(key), Mapping) and "param_groups" in optim_sd[key]:
            return list(optim_sd[key]["param_groups"])
    return list(optim_sd.get("param_groups", []))


def per_tensor_lamb_groups(tag_dir: Path) -> bool:
    """Whether checkpoint ``tag_dir`` holds the optimizer state of the LAMB of dist_sparse before
    2026-12-05, which kept one param group per tensor (a ``name`` per group); today's keeps BERT's
    few groups (``names``), and DeepSpeed cannot load the one into the other. Reads the param
    groups of one optimizer-states file through a memory map: the tensors are not read."""
    files = sorted(p for p in tag_dir.glob("*optim_states.pt"))
    if not files:
        return False
    sd = torch.load(files[0], map_location="cpu", mmap=True, weights_only=False)
    groups = _param_groups(sd.get("optimizer_state_dict", {}))
    return any("name" in g and "names" not in g for g in groups)


def load_client_state(engine, ckpt_dir: Path, tag: str) -> ClientState:
    """Load checkpoint ``tag`` into ``engine`` (a collective) and return its client state, or a
    ValueError starting ``--resume:`` when DeepSpeed finds nothing or the state is not ours."""
    if per_tensor_lamb_groups(ckpt_dir / tag):  # every rank reads the same file: all stop alike
        raise ValueError(f"--resume: {ckpt_dir / tag} holds the optimizer state of an earlier dist_sparse LAMB "
                         "(one param group per tensor), which this version (BERT's few groups, the trust "
                         "ratio still per tensor) cannot load; resume it with the dist_sparse that wrote it, or "
                         "export its weights (dist-sparse export) and start a new run with --init EXPORT")
    load_path, raw = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if load_path is None or not raw:
        raise ValueError(f"--resume: DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    try:
        return ClientState.from_dict(raw, source=ckpt_dir / tag)
    except ValueError as err:
        raise ValueError(f"--resume: {err}") from None


def read_rank_file(tag_dir: Path, name: str):
    """A per-rank file of ours (:func:`rng_file`, :func:`sparsity_file`), or None if the
    checkpoint has none (RNG states: older checkpoints; masks: a dense run)."""
    path = tag_dir / name
    return torch.load(path, weights_only=False) if path.exists() else None


# ---------------------------------------------------------------------------------------------
# resume checks: the checkpoint against this launch (pure)

# The example counts tell another corpus (or another tokenizer) of the same shape; the data
# iterator would refuse it only after the process groups and the engine were set up.
_DATA_PROPERTIES = (("seq_len", "sequence length"), ("vocab_size", "vocabulary size"), ("nsp", "NSP pairs"),
                    ("tokenizer_type", "tokenizer type"), ("num_train", "training examples"),
                    ("num_eval", "eval examples"))


def check_data(recorded: dict, meta: dict, *, data: str, run_data: str | None = None) -> None:
    """Data of another shape than the run started with (``recorded``: run.json's or the
    checkpoint's ``data_meta``): say which property changed. ``data``: --data as given;
    ``run_data``: the data the run started with, as run.json names it."""
    for key, what in _DATA_PROPERTIES:
        if key in recorded and recorded[key] != meta.get(key):
            raise ValueError(f"--resume: --data {data} has {what} {meta.get(key)}, the run started with "
                             f"{recorded[key]} ({run_data if run_data is not None else 'see run.json'}); "
                             "resume with that data")


def check_max_steps(started_for: int, max_steps: int) -> None:
    """The run's length may not change on resume (run.json says it before any process starts,
    the checkpoint again on load)."""
    if started_for != max_steps:
        raise ValueError(f"--resume: the run was started for {started_for} steps, not {max_steps}; "
                         "the learning-rate and sparsity schedules depend on it (start a new run to change it)")


def check_resume(client: ClientState, *, model: str, max_steps: int | None, dp_size: int | None, data_meta: dict,
                 data: str, run_data: str | None = None) -> None:
    """What exact resume needs to be the same as when the checkpoint was written. ``dp_size``
    None: a resume at another layout (``train.elastic``), which continues the data by samples;
    ``max_steps`` None: an extension (``train.extend``)."""
    if client.model != model:
        raise ValueError(f"--resume: the checkpoint is of model {client.model!r}, not {model!r}")
    check_data(client.data_meta, data_meta, data=data, run_data=run_data)
    if max_steps is not None:
        check_max_steps(client.max_steps, max_steps)
    if dp_size is not None and client.dp_size != dp_size:
        raise ValueError(f"--resume: the checkpoint was written with data-parallel size {client.dp_size}, "
                         f"this run has {dp_size}; exact data-order resume needs the same size")


# ---------------------------------------------------------------------------------------------
# the offline reader


class DamagedFile(ValueError):
    """A torch file that cannot be complete. The message says what; the caller adds what to do
    instead (resume, export and inspect each name their own way out)."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path} is damaged (not a complete torch file: {why}; truncated?)")
        self.path, self.why = path, why


def damaged(path: Path) -> str | None:
    """Why the torch file ``path`` cannot be complete, or None. torch.save writes a zip archive
    whose directory sits at the end, so a truncated file has none; reading it is cheap."""
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        return str(err)
    return None


def check_whole(path: Path) -> None:
    why = damaged(path)
    if why is not None:
        raise DamagedFile(path, why)


def _load_whole(path: Path):
    check_whole(path)
    return torch.load(path, map_location="cpu", weights_only=False)


def _natural_key(tag: str) -> list:
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", tag)]


def is_tag_dir(path: Path) -> bool:
    """Whether ``path`` holds DeepSpeed model states (what makes a tag a checkpoint)."""
    return path.is_dir() and any(MODEL_STATES.match(p.name) for p in path.iterdir())


def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    """Tags in ``ckpt_dir`` that hold model states, in step order."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p.name for p in ckpt_dir.iterdir() if is_tag_dir(p)), key=_natural_key)


@dataclass(frozen=True)
class TagFiles:
    """The files of one tag directory by what they are; from the names alone, nothing loaded."""
    tag_dir: Path
    model_states: dict[tuple[int | None, int], str]   # (DP rank, ZeRO-3 only; TP rank) -> name
    optim_states: dict[tuple[int, int], str]          # (DP rank, TP rank) -> name
    bf16_optimizer: bool                              # DeepSpeed's BF16_Optimizer wrote them
    sparsity: dict[int, str]                          # global rank -> name
    rng: dict[int, str]                               # global rank -> name
    has_structure: bool

    @property
    def layout(self) -> tuple[int, int] | None:
        """(data-parallel size, tensor-parallel size) from the optimizer-state names; None if there
        are none (not written by a ZeRO run)."""
        if not self.optim_states:
            return None
        return len({d for d, _ in self.optim_states}), len({t for _, t in self.optim_states})

    @property
    def zero3(self) -> bool:
        """Module states partitioned per DP rank: ZeRO-3 (stages 1 and 2 differ only in ds_config)."""
        return any(d is not None for d, _ in self.model_states)


def list_files(tag_dir: Path) -> TagFiles:
    model, optim, sparsity, rng = {}, {}, {}, {}
    bf16 = has_structure = False
    for p in sorted(tag_dir.iterdir()):
        if m := MODEL_STATES.match(p.name):
            model[(None if m["dp"] is None else int(m["dp"]), int(m["tp"]))] = p.name
        elif m := OPTIM_STATES.match(p.name):
            optim[(int(m["dp"]), int(m["tp"]))] = p.name
            bf16 = bf16 or m["bf16"] is not None
        elif m := SPARSITY_FILE.match(p.name):
            sparsity[int(m["rank"])] = p.name
        elif m := RNG_FILE.match(p.name):
            rng[int(m["rank"])] = p.name
        elif p.name == STRUCTURE_FILE:
            has_structure = True
    return TagFiles(tag_dir=tag_dir, model_states=model, optim_states=optim, bf16_optimizer=bf16,
                    sparsity=dict(sorted(sparsity.items())), rng=dict(sorted(rng.items())),
                    has_structure=has_structure)


def checkpoint_layout(tag_dir: Path) -> tuple[int, int] | None:
    """(data-parallel size, tensor-parallel size) a checkpoint was written with; see TagFiles.layout."""
    return list_files(tag_dir).layout


def read_structure(tag_dir: Path) -> StructureRecord | None:
    """The model shape and structured-pruning state a checkpoint was written with (None for
    checkpoints of older versions, whose model is the preset)."""
    path = tag_dir / STRUCTURE_FILE
    if not path.exists():
        return None
    try:
        content = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is damaged ({err})") from None
    return StructureRecord.from_dict(content, source=path)


def read_sparsity(tag_dir: Path) -> dict[int, dict]:
    """Every rank's sparsifier state, by global rank ({} for a dense checkpoint); DamagedFile
    names a truncated one."""
    return {rank: _load_whole(tag_dir / name) for rank, name in list_files(tag_dir).sparsity.items()}


def _rank_masks(state: dict):
    """(name, target record, this rank's part of the mask as saved) for every mask of a
    sparsifier state; see ``Sparsifier.state_dict`` for the layout record."""
    from dist_sparse.masks.checksum import unpack_mask

    targets = state["layout"]["targets"]
    for name, (packed, shape) in state["masks"].items():
        yield name, targets[name], unpack_mask(packed, tuple(shape))


def logical_masks(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The whole mask of every sparse weight, put together from the ranks' files."""
    return _merge_masks(read_sparsity(tag_dir).values())


def _merge_masks(states) -> dict[str, torch.Tensor]:
    """Each rank holds the TP shard it trains (``shard_dim``/``shard_offset`` into the whole
    weight), under ZeRO-3 only a flat ``slice`` of it; data-parallel copies fall on the same place."""
    out: dict[str, torch.Tensor] = {}
    for state in states:
        for name, info, mask in _rank_masks(state):
            full = out.setdefault(name, torch.zeros(info["full_shape"], dtype=torch.bool))
            rows, cols = info["shard_shape"]
            shard = torch.zeros(rows * cols, dtype=torch.bool)
            if info["slice"] is not None:  # ZeRO-3: a flat slice of the shard
                shard[info["slice"][0]:info["slice"][1]] = mask
            else:
                shard[:] = mask.flatten()
            dim, off = info["shard_dim"], info["shard_offset"]
            target = full if dim is None else full.narrow(dim, off, (rows, cols)[dim])
            target |= shard.view(rows, cols)
    return out


def sparsity_summary(tag_dir: Path) -> dict:
    """What inspect and export's sparsity.json say of the masks ({} for a dense checkpoint): the
    method config, step, history and layout of rank 0's state, the number of rank files, and per
    sparse weight its whole shape, TP shard shape and active count."""
    states = read_sparsity(tag_dir)
    if not states:
        return {}
    first = states[min(states)]
    targets = first["layout"]["targets"]
    layers = {name: {"full_shape": tuple(targets[name]["full_shape"]), "active": int(mask.sum()),
                     "shard_shape": tuple(targets[name]["shard_shape"])}
              for name, mask in _merge_masks(states.values()).items()}
    return {"config": first["config"], "step": first["step"], "max_steps": first["max_steps"],
            "history": first["history"], "layout": {k: v for k, v in first["layout"].items() if k != "targets"},
            "ranks": len(states), "layers": layers}


def _run_of(path: Path) -> Path | None:
    """The run directory ``path`` is, or whose checkpoints/ it is; None if it is neither."""
    if (path / "run.json").is_file() or (path / CHECKPOINTS_DIR).is_dir():
        return path
    if path.name == CHECKPOINTS_DIR and (path.parent / "run.json").is_file():
        return path.parent
    return None


def no_checkpoint_yet(run: Path, ckpt_dir: Path) -> str:
    """The message for a run that has not written a checkpoint (or only unfinished ones)."""
    unfinished = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir()) if ckpt_dir.is_dir() else []
    partial = f"; {', '.join(unfinished)}: a save that did not finish" if unfinished else ""
    return (f"run {run} has no checkpoint yet (a run saves one every --save-interval steps and at its last "
            f"step{partial}); try again after its first save")


def locate(path: str | Path, tag: str | None = None) -> Path:
    """The checkpoint tag directory that ``path`` (a run, its checkpoints/, or a tag directory)
    and ``tag`` (another one than ``latest`` names) name, or a ValueError saying why not."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is a file, not a run directory or a checkpoint directory")
    if is_tag_dir(path):
        if tag is not None and tag != path.name:
            raise ValueError(f"{path} is itself checkpoint {path.name!r}; --tag {tag} names another one: "
                             "pass the run directory with --tag, or the tag directory alone")
        return path
    ckpt_dir = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    tags = checkpoint_tags(ckpt_dir)
    latest = ckpt_dir / LATEST_FILE
    if not tags and not latest.is_file():
        run = _run_of(path)
        if run is not None:
            raise ValueError(no_checkpoint_yet(run, ckpt_dir))
        siblings = checkpoint_tags(path.parent) if path.parent != path else []
        if siblings or (path.parent / LATEST_FILE).is_file():
            # A tag directory of a checkpoints/ folder, but without DeepSpeed's files: a save that
            # never finished (``latest`` would not name it) or a partial copy.
            raise ValueError(f"{path} holds no model states file: the checkpoint is incomplete "
                             f"(available in {path.parent}: {', '.join(siblings) or 'none'})")
        raise ValueError(f"{path} is not a checkpoint: expected a run directory (with checkpoints/), its "
                         "checkpoints/ directory (with 'latest'), or one checkpoint directory "
                         "(with mp_rank_00_model_states.pt or zero_pp_rank_0_mp_rank_00_model_states.pt)")
    available = ", ".join(tags) if tags else "none"
    if tag is not None:
        if not (ckpt_dir / tag).is_dir():
            raise ValueError(f"no checkpoint {tag!r} in {ckpt_dir} (available: {available})")
        if not is_tag_dir(ckpt_dir / tag):
            raise ValueError(f"{ckpt_dir / tag} holds no model states file: the checkpoint is incomplete or "
                             f"not a DeepSpeed checkpoint (available: {available})")
        return ckpt_dir / tag
    if not latest.is_file():
        raise ValueError(f"{ckpt_dir} has no 'latest' file naming the last complete checkpoint; pick one with "
                         f"--tag (available: {available})")
    name = latest.read_text().strip()
    if not name:
        raise ValueError(f"{latest} is empty; pick a checkpoint with --tag (available: {available})")
    if not (ckpt_dir / name).is_dir():
        raise ValueError(f"{latest} names checkpoint {name!r}, which does not exist in {ckpt_dir}; pick one with "
                         f"--tag (available: {available})")
    if not is_tag_dir(ckpt_dir / name):
        raise ValueError(f"{ckpt_dir / name} (named by {latest}) holds no model states file; pick another "
                         f"checkpoint with --tag (available: {available})")
    return ckpt_dir / name


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself, read from rank 0's model states and structure.json."""

    tag_dir: Path
    client_state: dict              # rank 0's whole model-states dict: DeepSpeed's keys and ours
    zero_stage: int
    dp_size: int
    tp_size: int
    bf16_optimizer: bool
    structure: StructureRecord
    uc_info: dict | None = None
    files: dict[int, list[Path]] = field(default_factory=dict)   # TP rank -> its files

    @property
    def model_config(self) -> dict:
        return self.structure.model_config

    @property
    def structured(self) -> StructuredState | None:
        return self.structure.structured

    @property
    def step(self) -> int:
        return int(self.client_state.get("progress", {}).get("step", 0))


def expected_files(stage: int, dp: int, tp: int, bf16_optimizer: bool = False) -> dict[int, list[str]]:
    """Per TP rank, the DeepSpeed files a ZeRO-``stage`` DP ``dp`` x TP ``tp`` run writes."""
    out: dict[int, list[str]] = {}
    for t in range(tp):
        names = [optim_states_file(d, t, bf16_optimizer) for d in range(dp)]
        if stage == 3:  # ZeRO-3 partitions the module states too: one file per rank
            names += [model_states_file(t, d) for d in range(dp)]
        else:
            names.append(model_states_file(t))
        out[t] = names
    return out


def read_info(tag_dir: Path) -> CheckpointInfo:
    """Client state, layout and file list of a checkpoint; every shard file must be present and
    whole (DamagedFile names one that is not), and no other run's shards may be mixed in."""
    files = list_files(tag_dir)
    rank0 = next((tag_dir / n for n in (model_states_file(0), model_states_file(0, 0))
                  if (tag_dir / n).is_file()), None)
    if rank0 is None:
        raise ValueError(f"{tag_dir}: no model states file of rank 0 (mp_rank_00_model_states.pt or "
                         "zero_pp_rank_0_mp_rank_00_model_states.pt): the checkpoint is incomplete")
    check_whole(rank0)
    try:
        state = torch.load(rank0, map_location="cpu", weights_only=False)
    except Exception as err:  # a foreign file: say which one
        raise ValueError(f"cannot read {rank0}: {err}") from None
    if not isinstance(state, dict) or "module" not in state:
        raise ValueError(f"{rank0} is not a DeepSpeed model states file")
    if "model_config" not in state:
        raise ValueError(f"{tag_dir} is a DeepSpeed checkpoint but not one written by dist_sparse (no model_config "
                         "in its client state)")
    ds_config = state.get("ds_config") or {}
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    if stage not in (1, 2, 3):
        raise ValueError(f"{tag_dir} was trained without ZeRO (stage {stage}); export consolidates ZeRO stage 1-3 "
                         "checkpoints, whose optimizer files hold the fp32 master weights")
    tp = int(state.get("tp_size", state.get("mp_world_size", 1)))
    dp = int(state.get("dp_size", state.get("dp_world_size", 1)))
    if int(state.get("mp_world_size", tp)) != tp:
        raise ValueError(f"{rank0}: dist_sparse recorded tensor-parallel size {tp}, DeepSpeed {state['mp_world_size']}")

    expected = expected_files(stage, dp, tp, files.bf16_optimizer)
    missing = [n for names in expected.values() for n in names if not (tag_dir / n).is_file()]
    if missing:
        total = sum(len(v) for v in expected.values())
        raise ValueError(f"checkpoint {tag_dir} is incomplete: {len(missing)} of the {total} shard files of a "
                         f"ZeRO-{stage} DP {dp} x TP {tp} checkpoint are missing ({', '.join(missing[:4])}"
                         f"{', ...' if len(missing) > 4 else ''}); was it copied whole? Another checkpoint can be "
                         "picked with --tag")
    for names in expected.values():
        for name in names:
            check_whole(tag_dir / name)
    wanted = {n for names in expected.values() for n in names}
    extra = sorted(n for n in (*files.model_states.values(), *files.optim_states.values()) if n not in wanted)
    if extra:
        raise ValueError(f"checkpoint {tag_dir} holds shard files a DP {dp} x TP {tp} run does not write "
                         f"({', '.join(extra[:4])}): files of another run were copied into it?")

    # structure.json is written by rank 0 beside DeepSpeed's files with the same content as the
    # client state; checkpoints of older versions have only the client state.
    structure = read_structure(tag_dir) or StructureRecord.from_dict(
        {"model_config": state["model_config"], "structured": state.get("structured")}, source=rank0)
    return CheckpointInfo(tag_dir=tag_dir, client_state=state, zero_stage=stage, dp_size=dp, tp_size=tp,
                          bf16_optimizer=files.bf16_optimizer, structure=structure,
                          uc_info=state.get("universal_checkpoint_info"),
                          files={t: [tag_dir / n for n in names] for t, names in expected.items()})


__all__ = ["CHECKPOINTS_DIR", "CRASH_IN_SAVE_ENV", "CheckpointInfo", "CheckpointNotSaved", "ClientState",
           "DamagedFile", "ENOSPC_IN_SAVE_ENV", "FORMAT_VERSION", "LATEST_FILE", "MODEL_STATES", "OPTIM_STATES",
           "Progress", "STRUCTURE_FILE", "StructureRecord", "StructuredState", "TAG_PREFIX", "TagFiles",
           "check_data", "check_resume", "check_whole", "checkpoint_layout", "checkpoint_tags", "commit_latest",
           "damaged", "describe_disk", "expected_files", "is_tag_dir", "latest_tag", "list_files",
           "load_client_state", "locate", "logical_masks", "model_states_file", "no_checkpoint_yet",
           "optim_states_file", "per_tensor_lamb_groups", "prune_checkpoints", "read_info", "read_rank_file",
           "read_sparsity", "read_structure", "restore_rng_state", "rng_file", "rng_state", "save",
           "sparsity_file", "sparsity_summary", "step_of", "tag_of"]
