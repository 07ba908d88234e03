"""The multi-node launcher hands DeepSpeed's ssh runner the variables it would not pass on.

A fake ``deepspeed`` on PATH records what it was given; the file DS_ENV_FILE names is parsed the
way deepspeed/launcher/runner.py parses .deepspeed_env (every line split once at "=").
"""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FAKE_DEEPSPEED = """#!/usr/bin/env bash
{ echo "ARGS $*"; echo "DS_ENV_FILE $DS_ENV_FILE"; cat "$DS_ENV_FILE"; } > "$FAKE_OUT"
"""


def run_launcher(tmp_path: Path, env: dict, home_env_file: str | None = None) -> tuple[list[str], dict[str, str], str]:
    bin_dir, home, out = tmp_path / "bin", tmp_path / "home", tmp_path / "out.txt"
    bin_dir.mkdir()
    home.mkdir()
    (bin_dir / "deepspeed").write_text(FAKE_DEEPSPEED)
    (bin_dir / "deepspeed").chmod(0o755)
    if home_env_file is not None:
        (home / ".deepspeed_env").write_text(home_env_file)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GLOO_", "NCCL_", "TORCH_NCCL", "DS_ENV"))}
    base.pop("OMP_NUM_THREADS", None)
    full_env = dict(base, PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(home), FAKE_OUT=str(out), **env)
    subprocess.run(["bash", str(ROOT / "launchers" / "multi_node.sh"), "hosts", "cfg.json", "DATA", "bert-large", "RUN",
                    "--max-steps", "5"], cwd=tmp_path, env=full_env, check=True, timeout=60)
    head, env_line, *lines = out.read_text().splitlines()
    parsed = {}
    for line in lines:
        key, val = line.split("=", maxsplit=1)  # what DeepSpeed's runner does; a blank line would raise
        parsed[key] = val
    return head.split()[1:], parsed, env_line.split(" ", 1)[1]


def test_gloo_and_torch_variables_reach_the_other_nodes(tmp_path):
    args, exported, env_file = run_launcher(tmp_path, {"NCCL_SOCKET_IFNAME": "ib", "GLOO_SOCKET_IFNAME": "ib0"})
    assert exported == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "OMP_NUM_THREADS": "4", "NCCL_SOCKET_IFNAME": "ib",
                        "GLOO_SOCKET_IFNAME": "ib0"}
    assert args[:4] == ["--hostfile", "hosts", "--master_port", "29500"] and args[-2:] == ["--max-steps", "5"]
    assert not Path(env_file).exists()  # removed once deepspeed returns


def test_the_users_deepspeed_env_is_kept_and_wins(tmp_path):
    # No trailing newline and a blank line: both would break DeepSpeed's parser if copied as is.
    _, exported, _ = run_launcher(tmp_path, {}, home_env_file="OMP_NUM_THREADS=8\n\nFOO=a b")
    assert exported["OMP_NUM_THREADS"] == "8" and exported["FOO"] == "a b"
    assert "GLOO_SOCKET_IFNAME" not in exported and "NCCL_SOCKET_IFNAME" not in exported
