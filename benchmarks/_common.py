"""What the benchmark scripts share: process and device set-up, batch arithmetic, synthetic MLM
batches, timing statistics, the record of machine and code state, clean-up after DeepSpeed's
CPU backend, and for the scripts that launch real runs (finetune_pruning.py, dynabert_grid.py) the
launch environment, the prepared corpus, run configs and metrics, and a fine-tuning run's FLOPs.

Every script imports this module as ``_common``: ``python benchmarks/x.py`` (and the deepspeed
launcher, which runs the same) puts benchmarks/ on sys.path; the scripts add it themselves too, so
that importing them from elsewhere works. Importing this module puts the repository root on
sys.path, for a checkout whose package is not installed.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Peak dense (no 2:4 sparsity) bf16 tensor-core TFLOP/s from NVIDIA's data sheets. Matched as a
# substring of torch.cuda.get_device_name() in this order, so the more specific H100 variants
# (PCIe and NVL have lower clocks / fewer SMs than SXM) are tried before the bare "H100".
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),   # SXM5 (device name "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),   # same compute die as H100 SXM, more and faster memory
    ("A100", 312.0),
]

MLM_PROBABILITY = 0.15  # BERT's fraction of positions that carry an MLM label
DATA_POOL = 4           # distinct synthetic batches cycled per rank (enough to avoid one cached batch)


# --- processes and devices ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """Make a plain `python ...` run a world of one: deepspeed.init_distributed otherwise tries MPI
    discovery. A port picked here rather than 29500, which other jobs on the machine may hold."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return  # started by a launcher
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def setup_device(local_rank: int = 0) -> tuple[bool, Callable[[], None]]:
    """Pick this rank's GPU when there is one; return (on_gpu, sync).

    ``sync`` waits for queued device work: CUDA kernels run asynchronously, so without it a clock
    would stop at kernel launch. On CPU it does nothing (work is done when the call returns).
    """
    import torch

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local_rank)

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    return on_gpu, sync


def peak_tflops_for(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_name(on_gpu: bool) -> str:
    import torch

    return torch.cuda.get_device_name() if on_gpu else cpu_model()


def remove_own_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer in /dev/shm.

    DeepSpeed 0.19's CPU shared-memory comm op creates one 69 MB segment per rank
    (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``) and never unlinks it, so every
    multi-rank CPU run leaves world_size x 69 MB of RAM behind; on the shared development
    machines these piled up until the OOM killer ended a run. Called after the last collective:
    unlinking a name leaves the peers' existing mappings intact.
    """
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{os.environ.get('RANK', '')}")
    try:
        os.unlink(name)
    except OSError:
        pass  # not there (GPU run, other DeepSpeed version): nothing to clean


def remove_shm_buffers(port: int) -> None:
    """Unlink the /dev/shm all-reduce buffers a finished launch on ``port`` left behind (the same
    leak as :func:`remove_own_shm_buffer`, cleaned by the parent of a ``deepspeed`` launch). Only
    this port's files are touched: other jobs' runs may still be using theirs."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        try:
            path.unlink()
        except OSError:
            pass


# --- DeepSpeed configs and batches -------------------------------------------------------------

def prepare_deepspeed_dict(raw: dict, micro_batch: int | None) -> dict:
    ds = copy.deepcopy(raw)
    if micro_batch is not None:
        if micro_batch < 1:
            raise ValueError(f"--micro-batch must be >= 1, got {micro_batch}")
        # One micro step per optimizer step and no fixed global batch: the global batch then
        # follows the number of ranks, so the same JSON runs on 1 GPU or 8.
        ds["train_micro_batch_size_per_gpu"] = micro_batch
        ds["gradient_accumulation_steps"] = 1
        ds.pop("train_batch_size", None)
    return ds


def batch_arithmetic(run_cfg) -> tuple[int, int, int, int, int]:
    """(world, dp_size, global_batch, micro_batch, grad_acc) of a parsed RunConfig in this world.

    Called before any process group exists, so that a bad combination fails fast."""
    from dist_sparse.config import resolve_batch_sizes
    from dist_sparse.distributed.topology import ParallelDims

    dims = ParallelDims.from_env(run_cfg.tp_size)
    world, dp_size = dims.world, dims.dp
    global_batch, micro_bs, grad_acc = resolve_batch_sizes(run_cfg.deepspeed, dp_size)
    return world, dp_size, global_batch, micro_bs, grad_acc


def precision(ds: dict) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def synthetic_batches(n: int, micro_bs: int, seq_len: int, vocab: int, seed: int, device):
    """Random token ids, 15% of positions labelled (the rest -100), no padding, random NSP labels,
    and the labelled positions (``mlm_positions``, as the collator sends them: the model computes
    the MLM head there only).

    The NSP label is included because real pre-training batches carry it and the NSP head is
    counted in dense_flops_per_token; its cost is negligible either way.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (micro_bs, seq_len), generator=gen)
        selected = torch.rand(micro_bs, seq_len, generator=gen) < MLM_PROBABILITY
        labels = torch.where(selected, ids, torch.full_like(ids, -100))
        batch = {
            "input_ids": ids,
            "token_type_ids": torch.zeros_like(ids),
            # A full mask as the collator always sends one; it makes attention take the additive-
            # bias SDPA path that real (padded) batches take, not the mask-free flash path.
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
            "next_sentence_label": torch.randint(0, 2, (micro_bs,), generator=gen),
            "mlm_positions": torch.nonzero(selected.flatten()).flatten(),
        }
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


T = TypeVar("T")


# --- timing ------------------------------------------------------------------------------------

def timed(fn: Callable[[], T], sync: Callable[[], None]) -> tuple[float, T]:
    """(seconds, result) of one call of ``fn``, with device work drained before the clock starts
    and before it stops (otherwise a GPU step would be charged to whichever call happens to wait
    for it). One host-device round trip per call, negligible beside a training step."""
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def stats(xs: list[float]) -> dict | None:
    if not xs:
        return None
    return {"n": len(xs), "mean": statistics.fmean(xs), "median": statistics.median(xs),
            "min": min(xs), "max": max(xs)}


def bootstrap_ratio_ci(num: list[float], den: list[float], reps: int = 2000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of sum(num) / sum(den), resampling rounds (pairs stay together).

    It shows how far the scatter of a shared machine lets a ratio be trusted; it does not cover
    slow drifts that hit one variant's rounds more than another's."""
    rng = random.Random(seed)
    n = len(num)
    if n < 2:
        return [float("nan"), float("nan")]
    out = []
    for _ in range(reps):
        idx = [rng.randrange(n) for _ in range(n)]
        out.append(sum(num[i] for i in idx) / sum(den[i] for i in idx))
    out.sort()
    return [out[int(0.025 * reps)], out[int(0.975 * reps) - 1]]


def rotated(variants: tuple[str, ...] | list[str], round_no: int) -> list[str]:
    """The order of one interleaved round: the variants shifted by the round number (A B C, B C A,
    C A B, ...), so that no variant always runs first or last in a round, after the same neighbour."""
    k = round_no % len(variants)
    return list(variants[k:]) + list(variants[:k])


def interleaved(variants, rounds: int, steps_per_round: int, step) -> tuple[list[dict], float, list[float]]:
    """Run ``step(variant, round)`` for every variant in rotated order, ``steps_per_round`` times
    each, for ``rounds`` rounds. Returns (records, wall seconds, 1-minute load before/after)."""
    load_before = loadavg_1m()
    wall0 = time.perf_counter()
    records = []
    for r in range(rounds):
        for v in rotated(variants, r):
            for _ in range(steps_per_round):
                records.append(step(v, r))
    wall = time.perf_counter() - wall0
    return records, wall, [load_before, loadavg_1m()]


def loadavg_1m() -> float:
    """1-minute load average: on a shared machine other jobs' load shows up here."""
    return os.getloadavg()[0]


# --- the record --------------------------------------------------------------------------------

def git_state() -> dict:
    """Commit and whether dist_sparse/ differs from it: the package may change between runs of a
    shared checkout, and a figure is only comparable with one measured on the same code."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dist_sparse"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return {"commit": None, "dist_sparse_modified": None}
    return {"commit": head or None, "dist_sparse_modified": bool(dirty)}


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def utc_now_iso() -> str:
    return utc_now().isoformat(timespec="seconds")


def write_json(path: str | Path, obj: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(obj, indent=2) + "\n")


def run_main(run: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Exit status of a benchmark's ``run``: a user error (ValueError) is one line on stderr naming
    the rank and exit code 2, not a traceback from every rank."""
    try:
        run(argv)
    except ValueError as err:
        print(f"error (rank {os.environ.get('RANK', '0')}): {err}", file=sys.stderr, flush=True)
        return 2
    return 0


# --- launching the project's launchers from a benchmark ---------------------------------------

def bin_dir() -> Path:
    return Path(sys.executable).parent


def launch_env() -> dict:
    """The environment of a ``deepspeed`` launch from a benchmark. One OpenMP thread per rank: N
    ranks on N cores, no oversubscription. DeepSpeed's JIT-built CPU comm op is cached per
    virtual environment unless the caller chose a directory."""
    return dict(os.environ, PATH=f"{bin_dir()}:{os.environ.get('PATH', '')}",
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
                TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")))


def run_logged(name: str, cmd: list[str], log_path: Path, port: int) -> float:
    """Run a launch ``cmd`` (on ``port``) with its output in ``log_path``; its wall seconds. Removes
    the launch's shared-memory buffers; a failure raises with the log's last lines."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    remove_shm_buffers(port)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"run {name} failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    return wall


def exe(name: str) -> str:
    """A console script of this environment (``deepspeed``, ``dist-sparse``), else the bare name
    (found on PATH)."""
    path = bin_dir() / name
    return str(path if path.exists() else name)


def ensure_data(data: str | None, out_dir: Path) -> Path:
    """``data``, a corpus prepared by ``dist-sparse prepare-data`` (checked), else the default corpus
    (vocabulary 8000, seq 128) prepared once into OUT_DIR/data."""
    if data:
        path = Path(data).resolve()
        if not (path / "meta.json").is_file():
            raise ValueError(f"--data {path} is not a prepared dataset (no meta.json)")
        return path
    path = out_dir / "data"
    if (path / "meta.json").is_file():
        print(f"using the prepared default corpus in {path}", flush=True)
        return path
    cmd = [exe("dist-sparse"), "prepare-data", "--default-corpus", "--output", str(path),
           "--vocab-size", "8000", "--seq-len", "128"]
    print("preparing data:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=launch_env(), cwd=ROOT)
    return path


def write_config(out_dir: Path, name: str, cfg: dict) -> Path:
    """A run's DeepSpeed config written as OUT_DIR/configs/NAME.json."""
    path = out_dir / "configs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of RUN/metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: the run did not get far enough to write metrics")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_loop_seconds(rows: list[dict], global_batch: int) -> float:
    """Sum of the logged step times (global batch / samples per second, log_interval 1)."""
    return sum(global_batch / r["samples_per_sec"] for r in rows if r["split"] == "train" and r.get("samples_per_sec"))


# --- FLOPs of a fine-tuning run ----------------------------------------------------------------

def classifier_forward_per_token(config, length: int, num_labels: int) -> float:
    """Dense forward FLOPs per token of the sequence classifier at padded length ``length``:
    ``dense_flops_per_token`` (encoder + MLM head + NSP head) without the MLM head (transform and
    H x V decoder) and the NSP head, plus the pooler and classifier once per sequence."""
    from dist_sparse.model.presets import dense_flops_per_token

    h, v = config.hidden_size, config.vocab_size
    encoder = (dense_flops_per_token(config, length) - 2 * (h * h + h * v) - 2 * (h * h + 2 * h) / length)
    return encoder + 2 * (h * h + h * num_labels) / length


class BatchShapes:
    """The padded micro-batch shapes a fine-tuning run computed: its data order replayed
    (``ResumableBatchIterator`` seeded like the run, every data-parallel rank) over the task's
    example lengths. Each step: a list of (batch size, padded length) over ranks and micro steps."""

    def __init__(self, task: Path):
        from dist_sparse.data.task import load_task

        datasets, self.meta = load_task(str(task))
        self.lengths = [len(x) for x in datasets["train"]["input_ids"]]
        self._cache: dict = {}

    def steps(self, seed: int, micro_bs: int, dp_size: int, grad_acc: int, steps: int) -> list[list[tuple[int, int]]]:
        key = (seed, micro_bs, dp_size, grad_acc, steps)
        if key not in self._cache:
            from dist_sparse.data.loader import ResumableBatchIterator

            loaders = [ResumableBatchIterator(len(self.lengths), micro_bs, r, dp_size, seed, drop_last=False,
                                              step_batch=micro_bs * dp_size * grad_acc)
                       for r in range(dp_size)]
            out = []
            for _ in range(steps):
                step = []
                for _ in range(grad_acc):
                    for loader in loaders:
                        idx = next(loader)
                        step.append((len(idx), max(self.lengths[i] for i in idx)))
                out.append(step)
            self._cache[key] = out
        return self._cache[key]
