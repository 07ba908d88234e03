"""Launch helpers for multi-process tests: every launch goes through the real ``deepspeed`` launcher on gloo."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    # DeepSpeed JIT-builds a CPU comm op on first use; a cache per virtual environment keeps two
    # checkouts on one machine from rebuilding it for each other.
    return dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false",
                TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")))


def remove_shm_buffers(port: int) -> None:
    """Delete the shared-memory all-reduce buffers DeepSpeed's CPU backend leaves in /dev/shm.

    deepspeed 0.19.8 names them after the master port and does not unlink them at exit (about
    64 MiB per rank); every launch uses a new port, so without this a test session would fill
    the RAM-backed /dev/shm.
    """
    for path in Path("/dev/shm").glob(f"deepspeed_*_{port}_*"):
        path.unlink(missing_ok=True)


def launch(args: list[str], nproc: int = 2, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus nproc ARGS`` (N CPU processes here); output captured for asserts."""
    port = free_port()
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port), *map(str, args)]
    env = launch_env()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        remove_shm_buffers(port)
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"launch failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc


def run_script(name: str, *args, nproc: int = 2, **kw) -> subprocess.CompletedProcess:
    return launch([SCRIPTS / name, *args], nproc=nproc, **kw)
