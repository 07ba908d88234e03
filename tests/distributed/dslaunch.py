"""Launch helpers for multi-process tests on gloo.

Two ways to start N ranks:

* ``via="deepspeed"``: the real ``deepspeed --num_gpus N`` launcher, as users start runs. The
  ZeRO-stage and DP x TP pre-training tests use it, ``make demo`` does, and the two-node test
  goes through ``launchers/local_two_nodes.sh``, so the launcher path itself stays covered.
* ``via="spawn"`` (the default): the ranks are started the way DeepSpeed's
  ``deepspeed.launcher.launch`` starts them on one node (same distributed environment
  variables, same ``--local_rank=N`` argument, the other ranks stopped when one fails), without
  the two launcher processes in front. Each of those imports torch and DeepSpeed, about 7 s per
  launch on CI's two cores; the suite launches some forty times.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


def remove_shm_buffers(port: int) -> list[str]:
    """Delete the shared-memory all-reduce buffers DeepSpeed's CPU backend leaves in /dev/shm.

    deepspeed 0.19.8 names them after the master port and does not unlink them at exit (about
    64 MiB per rank); every launch uses a new port, so without this a test session would fill
    the RAM-backed /dev/shm.
    """
    removed = []
    for path in Path("/dev/shm").glob(f"deepspeed_*_{port}_*"):
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def _stop(procs: list[subprocess.Popen]) -> None:
    """Stop every rank and whatever it started (each rank leads its own process group, as
    launch.py's terminate_process_tree reaches a rank's children)."""
    def signal_all(sig):
        for p in procs:  # a rank that has exited may have left children in its group
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    signal_all(signal.SIGKILL)
    for p in procs:
        p.wait()


def spawn_ranks(cmd: list[str], nproc: int, port: int, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Start ``nproc`` ranks of ``python -u cmd[0] --local_rank=i cmd[1:]`` on this node.

    The environment variables are those deepspeed.launcher.launch sets for one node (it also sets
    CUDA_VISIBLE_DEVICES, which a CPU run does not read). When a rank exits with an error the
    others are stopped (they would wait in a collective for ever) and the exit code of the rank
    that failed first is returned. stdout/stderr hold every rank's output under a
    ``--- rank r (exit c) ---`` line, the rank that failed first last, so that the tail of the
    output shows its error rather than its peers' lost connections.
    """
    script, *rest = cmd
    base = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc), CROSS_RANK="0",
                CROSS_SIZE="1", LOCAL_SIZE=str(nproc))
    with tempfile.TemporaryDirectory(prefix="ranks") as logs:
        logs = Path(logs)
        procs, first_failed, timed_out = [], None, False
        try:
            for r in range(nproc):
                with open(logs / f"{r}.out", "w") as out, open(logs / f"{r}.err", "w") as err:
                    procs.append(subprocess.Popen([sys.executable, "-u", script, f"--local_rank={r}", *rest],
                                                  cwd=ROOT, env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
                                                  stdout=out, stderr=err, start_new_session=True))
            deadline = time.monotonic() + timeout
            while True:
                codes = [p.poll() for p in procs]
                failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    first_failed = failed[0]
                    break
                if all(c == 0 for c in codes):
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.1)
        finally:
            _stop(procs)
        order = [r for r in range(len(procs)) if r != first_failed] + ([first_failed] if first_failed is not None else [])
        outs, errs = [], []
        for r in order:
            head = f"--- rank {r} (exit {procs[r].returncode}) ---\n"
            outs.append(head + (logs / f"{r}.out").read_text(errors="replace"))
            errs.append(head + (logs / f"{r}.err").read_text(errors="replace"))
    stdout, stderr = "".join(outs), "".join(errs)
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
    code = 0 if first_failed is None else procs[first_failed].returncode
    return subprocess.CompletedProcess(cmd, code, stdout, stderr)


def launch(args: list, nproc: int = 2, timeout: int = 600, check: bool = True,
           via: str = "spawn", env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``args`` (a script and its arguments) on ``nproc`` CPU ranks; output captured for asserts.
    ``env``: extra environment variables of the ranks."""
    port = free_port()
    env = {**launch_env(), **(env or {})}
    args = [str(a) for a in args]
    try:
        if via == "deepspeed":
            cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port), *args]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        elif via == "spawn":
            cmd = args
            proc = spawn_ranks(args, nproc, port, env, timeout)
        else:
            raise ValueError(f"via: 'spawn' or 'deepspeed', not {via!r}")
    except subprocess.TimeoutExpired as err:
        # subprocess.run leaves bytes in TimeoutExpired even with text=True; spawn_ranks gives str
        tail = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x
                       for x in (err.output or "", err.stderr or ""))[-6000:]
        pytest.fail(f"launch timed out after {timeout} s ({via}): {' '.join(map(str, err.cmd))}\n{tail}")
    finally:
        left = remove_shm_buffers(port)
    # what the job itself left behind (pretrain.py removes its buffers at exit: issue 11, item 15)
    proc.shm_left = left
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"launch failed (exit {proc.returncode}, {via}): {' '.join(cmd)}\n{tail}")
    return proc


def run_script(name: str, *args, nproc: int = 2, **kw) -> subprocess.CompletedProcess:
    return launch([SCRIPTS / name, *args], nproc=nproc, **kw)
