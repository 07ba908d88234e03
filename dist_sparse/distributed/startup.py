"""Start-up rules for the process group: which backend, and which network interface gloo uses.

On CUDA machines the default group is ``cpu:gloo,cuda:nccl``: NCCL carries the CUDA tensors,
gloo the small CPU-side bookkeeping collectives (mask counts and fingerprints, LAMB norms of
CPU runs, structured-pruning gathers). Two things go wrong only on a real cluster:

* a process group initialised by someone else with plain ``nccl`` has no CPU backend, and the
  first bookkeeping collective fails deep inside a run (or, with some launchers, hangs);
* gloo picks its interface from the hostname unless ``GLOO_SOCKET_IFNAME`` is set, while NCCL
  follows ``NCCL_SOCKET_IFNAME``: on nodes with several interfaces (or a hostname that
  resolves to loopback) the gloo groups then try a network the peers cannot reach.

The rules are pure functions here, applied by ``dist_sparse.distributed.comm.init`` on every
rank before anything else talks to another process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

CUDA_BACKEND = "cpu:gloo,cuda:nccl"
# Which devices a single-name backend serves (as torch.distributed.Backend documents them).
_SINGLE_BACKEND_DEVICES = {"gloo": {"cpu", "cuda"}, "mpi": {"cpu", "cuda"}, "ucc": {"cpu", "cuda"},
                           "nccl": {"cuda"}, "ccl": {"cpu"}, "xccl": {"xpu"}, "hccl": {"hpu"}}


def default_backend(cuda: bool) -> str:
    return CUDA_BACKEND if cuda else "gloo"


def backend_devices(backend: str) -> dict[str, str]:
    """Device type -> backend name of a torch.distributed backend string
    (``"cpu:gloo,cuda:nccl"`` or a single name such as ``"nccl"``)."""
    backend = str(backend).strip().lower()
    if ":" not in backend:
        return {device: backend for device in sorted(_SINGLE_BACKEND_DEVICES.get(backend, ()))}
    pairs = [part.split(":", 1) for part in backend.split(",") if part.strip()]
    return {device.strip(): name.strip() for device, name in pairs}


def cpu_backend_problem(backend: str, cuda: bool) -> str | None:
    """Why a default process group with ``backend`` cannot run the CPU-side bookkeeping
    collectives, or None when it can. Without CUDA every tensor is on the CPU and the backend
    that initialised is by definition one that serves it."""
    if not cuda or "cpu" in backend_devices(backend):
        return None
    return (f"the process group backend {backend!r} has no CPU backend, but dist_sparse's bookkeeping "
            "collectives (mask counts and fingerprints, structured-pruning gathers) run on CPU tensors: use "
            f"{CUDA_BACKEND!r} on CUDA machines. dist_sparse.distributed.comm.init() without a backend argument "
            "does, provided nothing initialised torch.distributed before it (deepspeed.init_distributed() or "
            "deepspeed.initialize() called first pick NCCL alone)")


def nccl_interface_rule(rule: str, interfaces: Sequence[str]) -> list[str]:
    """The interfaces, in the given order, that NCCL_SOCKET_IFNAME's ``rule`` selects.

    NCCL's syntax: a comma-separated list of name prefixes (``eth``: eth0, eth1, ...); a
    leading ``=`` makes them exact names (``=eth0``); a leading ``^`` excludes instead of
    selects (``^docker,lo``, ``^=docker0``).
    """
    rule = rule.strip()
    exclude = rule.startswith("^")
    rule = rule[1:] if exclude else rule
    exact = rule.startswith("=")
    rule = rule[1:] if exact else rule
    names = [n.strip() for n in rule.split(",") if n.strip()]

    def listed(interface: str) -> bool:
        return any(interface == n if exact else interface.startswith(n) for n in names)

    return [i for i in interfaces if listed(i) != exclude]


def gloo_socket_ifname(environ: Mapping[str, str], interfaces: Sequence[str]) -> str | None:
    """The GLOO_SOCKET_IFNAME to set on this node, or None to leave the environment alone.

    ``interfaces``: this node's usable interfaces (up, with an address), in system order.
    - GLOO_SOCKET_IFNAME set: kept (every name it lists must exist here).
    - NCCL_SOCKET_IFNAME set: gloo gets the first interface NCCL's rule selects on this node
      (loopback only if nothing else matches), so both backends talk over the network the user
      chose. One interface: given several, gloo spreads its connections over all of them.
    - neither: None; gloo resolves the hostname, as before.
    Raises ValueError, naming what to fix, when a variable selects no interface of this node.
    """
    available = ", ".join(interfaces) or "none"
    gloo = environ.get("GLOO_SOCKET_IFNAME", "").strip()
    if gloo:
        missing = [n for n in gloo.split(",") if n.strip() and n.strip() not in interfaces]
        if missing:
            raise ValueError(f"GLOO_SOCKET_IFNAME={gloo!r} names {', '.join(missing)}, which this node does not have "
                             f"(up, with an address: {available}); set it to this node's interface to the other nodes")
        return None
    nccl = environ.get("NCCL_SOCKET_IFNAME", "").strip()
    if not nccl:
        return None
    # NCCL's rule can select loopback too (``^docker`` does); gloo would then listen where no
    # other node can reach it, so a real interface goes first.
    chosen = sorted(nccl_interface_rule(nccl, interfaces), key=lambda i: i.startswith("lo"))
    if not chosen:
        raise ValueError(f"NCCL_SOCKET_IFNAME={nccl!r} selects none of this node's interfaces (up, with an address: "
                         f"{available}); set it (prefixes 'eth', exact '=eth0', exclusions '^docker,lo') to the "
                         "interface the nodes reach each other on, or set GLOO_SOCKET_IFNAME for gloo explicitly")
    return chosen[0]


__all__ = ["CUDA_BACKEND", "backend_devices", "cpu_backend_problem", "default_backend", "gloo_socket_ifname",
           "nccl_interface_rule"]
