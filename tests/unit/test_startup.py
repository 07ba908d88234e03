"""Start-up rules of the process group: CPU backend present, gloo on NCCL's interface (pure)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dist_sparse.distributed import comm
from dist_sparse.distributed.startup import (CUDA_BACKEND, backend_devices, cpu_backend_problem, default_backend,
                                             gloo_socket_ifname, nccl_interface_rule)

NODE = ["lo", "eth0", "eth1", "ib0", "docker0"]
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_backend_strings_map_devices_like_torch():
    assert backend_devices("cpu:gloo,cuda:nccl") == {"cpu": "gloo", "cuda": "nccl"}
    assert backend_devices("NCCL") == {"cuda": "nccl"}
    assert backend_devices("gloo") == {"cpu": "gloo", "cuda": "gloo"}
    # torch.distributed.get_backend_config()'s form for a plain "gloo" group
    assert backend_devices("cpu:gloo,cuda:gloo") == {"cpu": "gloo", "cuda": "gloo"}


def test_cuda_machines_need_a_cpu_backend():
    assert default_backend(cuda=True) == CUDA_BACKEND and default_backend(cuda=False) == "gloo"
    assert cpu_backend_problem(CUDA_BACKEND, cuda=True) is None
    assert cpu_backend_problem("gloo", cuda=True) is None
    assert cpu_backend_problem("cpu:mpi,cuda:nccl", cuda=True) is None
    for bare in ("nccl", "cuda:nccl"):
        message = cpu_backend_problem(bare, cuda=True)
        assert message and "no CPU backend" in message and CUDA_BACKEND in message and "deepspeed.init_distributed" in message
    assert cpu_backend_problem("nccl", cuda=False) is None  # a CPU run's backend serves CPU tensors


def test_nccl_interface_rule_follows_nccls_syntax():
    assert nccl_interface_rule("eth", NODE) == ["eth0", "eth1"]          # prefixes
    assert nccl_interface_rule("=eth1", NODE) == ["eth1"]                # exact
    assert nccl_interface_rule("=eth", NODE) == []
    assert nccl_interface_rule("ib,eth1", NODE) == ["eth1", "ib0"]        # a list, in the node's order
    assert nccl_interface_rule("^docker,lo", NODE) == ["eth0", "eth1", "ib0"]  # exclusions
    assert nccl_interface_rule("^=docker0", NODE) == ["lo", "eth0", "eth1", "ib0"]


def test_gloo_follows_nccl_socket_ifname_on_each_node():
    assert gloo_socket_ifname({"NCCL_SOCKET_IFNAME": "ib"}, NODE) == "ib0"
    assert gloo_socket_ifname({"NCCL_SOCKET_IFNAME": "eth"}, NODE) == "eth0"  # one interface, the first
    # NCCL's ^docker also selects loopback; gloo takes a real interface first.
    assert gloo_socket_ifname({"NCCL_SOCKET_IFNAME": "^docker"}, NODE) == "eth0"
    assert gloo_socket_ifname({"NCCL_SOCKET_IFNAME": "lo"}, NODE) == "lo"  # asked for (two nodes on one host)
    # Interface names may differ per node: each node resolves the rule itself.
    assert gloo_socket_ifname({"NCCL_SOCKET_IFNAME": "en"}, ["lo", "enp1s0"]) == "enp1s0"


def test_an_explicit_gloo_setting_wins_and_nothing_set_changes_nothing():
    assert gloo_socket_ifname({"GLOO_SOCKET_IFNAME": "eth1", "NCCL_SOCKET_IFNAME": "ib"}, NODE) is None
    assert gloo_socket_ifname({}, NODE) is None
    assert gloo_socket_ifname({"NCCL_SOCKET_IFNAME": " "}, NODE) is None


def test_a_rule_that_selects_nothing_here_says_what_to_fix():
    with pytest.raises(ValueError, match=r"NCCL_SOCKET_IFNAME='bond' selects none .*lo, eth0"):
        gloo_socket_ifname({"NCCL_SOCKET_IFNAME": "bond"}, ["lo", "eth0"])
    with pytest.raises(ValueError, match=r"GLOO_SOCKET_IFNAME='eth0,eth9' names eth9"):
        gloo_socket_ifname({"GLOO_SOCKET_IFNAME": "eth0,eth9"}, NODE)


def test_this_machine_lists_its_usable_interfaces():
    interfaces = comm.usable_interfaces()
    assert interfaces and len(set(interfaces)) == len(interfaces)


INIT_SCRIPT = r"""
import os, torch
from dist_sparse.distributed import comm
os.environ["NCCL_SOCKET_IFNAME"] = "no_such_if"
try:
    comm.init()
except ValueError as err:
    print("RULE:", err)
assert not torch.distributed.is_initialized()
os.environ["NCCL_SOCKET_IFNAME"] = "lo"
comm.init()
print("GLOO:", os.environ["GLOO_SOCKET_IFNAME"], torch.distributed.get_backend_config())
t = torch.ones(1)
comm.all_reduce_sum_(t)
# A CUDA machine whose group has no CPU backend (made before comm.init by someone else).
torch.cuda.is_available = lambda: True
torch.distributed.get_backend_config = lambda group=None: "cuda:nccl"
try:
    comm.init()
except ValueError as err:
    print("BACKEND:", err)
"""


def test_comm_init_applies_the_rules_in_a_real_process():
    """One process, world size 1: a rule that selects nothing stops before the rendezvous, NCCL's
    rule sets gloo's interface, and an existing group without a CPU backend is refused."""
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               # DeepSpeed's CPU backend JIT-builds a small op at init: share the distributed tests' cache.
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")))
    env.pop("GLOO_SOCKET_IFNAME", None)
    out = subprocess.run([sys.executable, "-c", INIT_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in out.stdout.splitlines()
             if line.split(":", 1)[0] in ("RULE", "GLOO", "BACKEND")}
    assert "NCCL_SOCKET_IFNAME='no_such_if' selects none" in lines["RULE"]
    assert lines["GLOO"] == "lo cpu:gloo,cuda:gloo"
    assert "'cuda:nccl' has no CPU backend" in lines["BACKEND"]
